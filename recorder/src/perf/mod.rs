//! Perf streams of one endpoint: what to record given `--perf` and the host, opening it with
//! fallbacks, and draining the rings into [`PerfRecord`]s.
//!
//! Hardware streams (Intel PT, PEBS memory samples, AMD IBS op) are used when the host has them.
//! Each one that is missing or refuses to open is said in one line naming its fallback, and the
//! [`Capabilities`] report (requested / available / captured, with reasons) goes to the manifest.

mod decode;
pub mod probe;
mod stream;

use std::str::FromStr;

use slug_schema::Capability;

pub use probe::{HostPmus, PmuEvent, Probed, probe, probe_at};
pub use stream::{PerfTarget, StepCounters, StepCounts, current_tid, monotonic_ns};

use crate::error::{RecorderError, Result};
use stream::{PtStream, RingStream};

/// One kind of perf stream, named as `--perf` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum StreamKind {
    /// Intel Processor Trace into the AUX area, with its decoding sideband.
    IntelPt,
    /// PEBS load samples with address, latency and data source.
    MemLoads,
    /// PEBS store samples with address and data source.
    MemStores,
    /// AMD IBS op samples with address, latency and data source.
    IbsOp,
    /// Software cpu-clock IP samples at `freq_hz`.
    #[default]
    CpuClock,
    /// Software page-fault samples with the faulting data address.
    PageFaults,
    /// Context-switch records.
    ContextSwitches,
    /// Task-clock and page-fault counts read at every step boundary.
    StepCounters,
}

impl StreamKind {
    /// Every kind, in the order the recorder opens them.
    pub const ALL: [StreamKind; 8] = [
        StreamKind::IntelPt,
        StreamKind::MemLoads,
        StreamKind::MemStores,
        StreamKind::IbsOp,
        StreamKind::CpuClock,
        StreamKind::PageFaults,
        StreamKind::ContextSwitches,
        StreamKind::StepCounters,
    ];

    /// The name `--perf` accepts (`intel-pt`, `cpu-clock`, ...).
    pub fn name(self) -> &'static str {
        match self {
            StreamKind::IntelPt => "intel-pt",
            StreamKind::MemLoads => "mem-loads",
            StreamKind::MemStores => "mem-stores",
            StreamKind::IbsOp => "ibs-op",
            StreamKind::CpuClock => "cpu-clock",
            StreamKind::PageFaults => "page-faults",
            StreamKind::ContextSwitches => "context-switches",
            StreamKind::StepCounters => "step-counters",
        }
    }

    /// The capability name in the manifest (`intel_pt`, `pebs_loads`, ...).
    pub fn capability(self) -> &'static str {
        match self {
            StreamKind::IntelPt => "intel_pt",
            StreamKind::MemLoads => "pebs_loads",
            StreamKind::MemStores => "pebs_stores",
            StreamKind::IbsOp => "ibs_op",
            StreamKind::CpuClock => "cpu_clock",
            StreamKind::PageFaults => "page_faults",
            StreamKind::ContextSwitches => "context_switches",
            StreamKind::StepCounters => "step_counters",
        }
    }

    /// What is recorded instead when this hardware stream is missing.
    fn fallback(self) -> Option<StreamKind> {
        match self {
            StreamKind::IntelPt => Some(StreamKind::CpuClock),
            StreamKind::MemLoads | StreamKind::MemStores | StreamKind::IbsOp => {
                Some(StreamKind::PageFaults)
            }
            _ => None,
        }
    }
}

/// What `--perf` asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PerfRequest {
    /// The best the host offers: hardware streams where present, software fallbacks otherwise.
    #[default]
    Auto,
    /// No perf streams.
    None,
    /// Exactly these streams (plus the fallbacks of those the host lacks).
    List(Vec<StreamKind>),
}

impl FromStr for PerfRequest {
    type Err = RecorderError;

    fn from_str(s: &str) -> Result<PerfRequest> {
        match s.trim() {
            "auto" => Ok(PerfRequest::Auto),
            "none" => Ok(PerfRequest::None),
            list => {
                let mut kinds = Vec::new();
                for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    let kind = StreamKind::ALL
                        .into_iter()
                        .find(|k| k.name() == name)
                        .ok_or_else(|| RecorderError::UnknownPerfStream {
                            name: name.into(),
                            known: StreamKind::ALL.map(StreamKind::name).join(", "),
                        })?;
                    if !kinds.contains(&kind) {
                        kinds.push(kind);
                    }
                }
                if kinds.is_empty() {
                    return Err(RecorderError::UnknownPerfStream {
                        name: s.into(),
                        known: StreamKind::ALL.map(StreamKind::name).join(", "),
                    });
                }
                Ok(PerfRequest::List(kinds))
            }
        }
    }
}

impl std::fmt::Display for PerfRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PerfRequest::Auto => f.write_str("auto"),
            PerfRequest::None => f.write_str("none"),
            PerfRequest::List(kinds) => {
                let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
                f.write_str(&names.join(","))
            }
        }
    }
}

/// Perf settings of a recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerfConfig {
    /// Which streams.
    pub request: PerfRequest,
    /// Sampling frequency of cpu-clock and memory samples (`--perf-freq`), Hz.
    pub freq_hz: u64,
    /// Record every n-th page fault (1: every fault, i.e. every first touch).
    pub page_fault_period: u64,
    /// Each ring holds 2^n pages of records.
    pub ring_pages_exp: u8,
    /// The Intel PT AUX area holds 2^n pages.
    pub aux_pages_exp: u8,
    /// Streams the recording's eBPF probes already record (the same events, with more said
    /// about them), with the probe's name: not opened, so nothing is recorded twice.
    pub covered_by_ebpf: Vec<(StreamKind, &'static str)>,
}

impl Default for PerfConfig {
    fn default() -> PerfConfig {
        PerfConfig {
            request: PerfRequest::Auto,
            freq_hz: 1000,
            page_fault_period: 1,
            ring_pages_exp: 5,
            aux_pages_exp: 9,
            covered_by_ebpf: Vec::new(),
        }
    }
}

/// A sample from a sampled stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SampleRecord {
    /// The stream it came from.
    pub stream: StreamKind,
    /// Instruction pointer.
    pub ip: u64,
    /// Data address (page faults, memory samples), else 0.
    pub addr: u64,
    /// Load latency (memory samples), else 0.
    pub weight: u64,
    /// Raw perf `data_src` word (memory samples), else 0.
    pub data_source: u64,
    /// Sampling period in effect.
    pub period: u64,
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// CPU.
    pub cpu: u32,
    /// CLOCK_MONOTONIC ns.
    pub ns: u64,
}

/// One thing read from a perf stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PerfRecord {
    /// A sample.
    Sample(SampleRecord),
    /// A thread was switched out or in.
    ContextSwitch {
        /// Process id.
        pid: u32,
        /// Thread id.
        tid: u32,
        /// CPU.
        cpu: u32,
        /// CLOCK_MONOTONIC ns.
        ns: u64,
        /// Switched out (else in).
        out: bool,
        /// Switched out while runnable (preempted), not blocked.
        preempted: bool,
    },
    /// Intel PT bytes from the AUX area.
    PtChunk {
        /// CPU whose AUX area it came from (`u32::MAX` for a per-thread stream).
        cpu: u32,
        /// Offset of the first byte in this stream's AUX data.
        aux_offset: u64,
        /// The PT packets.
        bytes: Vec<u8>,
        /// When it was read, CLOCK_MONOTONIC ns.
        ns: u64,
    },
    /// A raw perf record a PT decoder needs (mmap, comm, itrace_start, aux, switch).
    Sideband {
        /// The stream it came from.
        stream: StreamKind,
        /// The record, header included, as the kernel wrote it.
        bytes: Vec<u8>,
    },
    /// The kernel dropped `count` records of `stream` because its ring was full.
    Lost {
        /// The stream.
        stream: StreamKind,
        /// Records lost.
        count: u64,
        /// When the loss was noticed, CLOCK_MONOTONIC ns (0 if unknown).
        ns: u64,
    },
}

/// What was requested, available and captured, with reasons, plus the lines to print.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// One entry per stream kind considered (manifest `capabilities`).
    pub entries: Vec<Capability>,
    /// One line per missing capability, naming its fallback.
    pub notices: Vec<String>,
}

impl Capabilities {
    /// The entry named `name` (`intel_pt`, `cpu_clock`, ...).
    pub fn get(&self, name: &str) -> Option<&Capability> {
        self.entries.iter().find(|c| c.name == name)
    }

    fn entry(&mut self, kind: StreamKind) -> &mut Capability {
        let name = kind.capability();
        if let Some(i) = self.entries.iter().position(|c| c.name == name) {
            return &mut self.entries[i];
        }
        self.entries.push(Capability {
            name: name.into(),
            requested: false,
            available: false,
            captured: false,
            reason: None,
        });
        let last = self.entries.len() - 1;
        &mut self.entries[last]
    }
}

fn pmu_for(pmus: &HostPmus, kind: StreamKind) -> Option<&Probed> {
    match kind {
        StreamKind::IntelPt => Some(&pmus.intel_pt),
        StreamKind::MemLoads => Some(&pmus.mem_loads),
        StreamKind::MemStores => Some(&pmus.mem_stores),
        StreamKind::IbsOp => Some(&pmus.ibs_op),
        _ => None,
    }
}

fn describe_missing(kind: StreamKind) -> &'static str {
    match kind {
        StreamKind::IntelPt => "no Intel PT on this CPU",
        StreamKind::MemLoads => "no PEBS load samples on this CPU",
        StreamKind::MemStores => "no PEBS store samples on this CPU",
        StreamKind::IbsOp => "no AMD IBS op samples on this CPU",
        _ => "stream unavailable",
    }
}

fn describe_fallback(kind: StreamKind, config: &PerfConfig) -> String {
    match kind {
        StreamKind::CpuClock => format!(
            "recording cpu-clock IP samples at {} Hz instead",
            config.freq_hz
        ),
        StreamKind::PageFaults => {
            "recording page-fault samples with the faulting data address instead".into()
        }
        other => format!("recording {} instead", other.name()),
    }
}

/// The streams `request` means on a host with `pmus`, before fallbacks.
fn requested_streams(pmus: &HostPmus, request: &PerfRequest) -> Vec<StreamKind> {
    match request {
        PerfRequest::None => Vec::new(),
        PerfRequest::List(kinds) => kinds.clone(),
        PerfRequest::Auto => {
            let mut kinds = vec![StreamKind::IntelPt];
            // PEBS (Intel) and IBS (AMD) never coexist; ask for the one the vendor has, so a
            // host with neither prints one line about memory samples.
            if pmus.ibs_op.is_ok() {
                kinds.push(StreamKind::IbsOp);
            } else {
                kinds.extend([StreamKind::MemLoads, StreamKind::MemStores]);
            }
            kinds.extend([
                StreamKind::PageFaults,
                StreamKind::ContextSwitches,
                StreamKind::StepCounters,
            ]);
            kinds
        }
    }
}

/// The opened perf streams of one endpoint (or one thread of it).
#[derive(Debug, Default)]
pub struct PerfStreams {
    rings: Vec<RingStream>,
    pt: Vec<PtStream>,
    kinds: Vec<StreamKind>,
}

impl PerfStreams {
    /// Opens what `config` asks for on `target`, falling back where the host lacks hardware or a
    /// stream fails to open. Never fails as a whole: every problem is a reason in the report.
    /// Sampled streams start disabled; call [`PerfStreams::enable`]. Intel PT starts at once.
    pub fn open(
        pmus: &HostPmus,
        config: &PerfConfig,
        target: &PerfTarget,
    ) -> (PerfStreams, Capabilities) {
        let mut caps = Capabilities::default();
        let mut streams = PerfStreams::default();
        let mut queue = requested_streams(pmus, &config.request);
        for &k in &queue {
            caps.entry(k).requested = true;
        }
        let mut announced: Vec<StreamKind> = Vec::new();
        let mut i = 0;
        while i < queue.len() {
            let kind = queue[i];
            i += 1;
            if streams.kinds.contains(&kind) {
                continue;
            }
            if let Some((_, probe)) = config.covered_by_ebpf.iter().find(|(k, _)| *k == kind) {
                let entry = caps.entry(kind);
                entry.requested = false;
                entry.reason = Some(format!(
                    "the eBPF {probe} probe records these events instead, with more about each"
                ));
                continue;
            }
            let probed = pmu_for(pmus, kind);
            let pmu = match probed {
                Some(Ok(pmu)) => Some(pmu),
                Some(Err(why)) => {
                    let entry = caps.entry(kind);
                    entry.available = false;
                    let fallback = kind.fallback();
                    let instead = fallback.map(|f| describe_fallback(f, config));
                    entry.reason = Some(match &instead {
                        Some(i) => format!("{why}; {i}"),
                        None => why.clone(),
                    });
                    let mut line = format!("{} ({why})", describe_missing(kind));
                    if let Some(f) = fallback {
                        line.push_str(&format!(": {}", describe_fallback(f, config)));
                        if !queue.contains(&f) {
                            queue.push(f);
                        }
                    }
                    // Loads and stores share one fallback: one line says it.
                    if fallback.is_none_or(|f| !announced.contains(&f)) {
                        caps.notices.push(line);
                    }
                    announced.extend(fallback);
                    continue;
                }
                None => None,
            };
            caps.entry(kind).available = true;
            let opened = match kind {
                StreamKind::StepCounters => {
                    // Counted per thread at step boundaries by the recorder; check it opens here.
                    StepCounters::open_thread(current_tid()).map(|_| ())
                }
                StreamKind::IntelPt => pmu
                    .ok_or_else(|| RecorderError::Perf {
                        event: kind.name().into(),
                        source: std::io::Error::from(std::io::ErrorKind::NotFound),
                    })
                    .and_then(|pmu| PtStream::open(config, pmu, target))
                    .map(|pt| streams.pt.extend(pt)),
                _ => RingStream::open(kind, config, pmu, target).map(|r| streams.rings.extend(r)),
            };
            match opened {
                Ok(()) => {
                    streams.kinds.push(kind);
                    caps.entry(kind).captured = true;
                }
                Err(e) => {
                    let fallback = kind.fallback();
                    let mut line = format!("{} could not be opened ({e})", kind.name());
                    if let Some(f) = fallback {
                        line.push_str(&format!(": {}", describe_fallback(f, config)));
                        if !queue.contains(&f) {
                            queue.push(f);
                        }
                        announced.push(f);
                    }
                    caps.entry(kind).reason = Some(e.to_string());
                    caps.notices.push(line);
                }
            }
        }
        if matches!(config.request, PerfRequest::None) {
            caps.notices
                .push("perf streams off (--perf none): no samples, switches or counters".into());
        }
        (streams, caps)
    }

    /// The stream kinds that opened (step counters included: they are opened per thread).
    pub fn kinds(&self) -> &[StreamKind] {
        &self.kinds
    }

    /// Starts the sampled streams.
    pub fn enable(&self) -> Result<()> {
        self.rings.iter().try_for_each(RingStream::enable)
    }

    /// Moves every record read so far to `out`; returns how many records were read.
    pub fn drain(&self, out: &mut Vec<PerfRecord>) -> usize {
        let rings: usize = self.rings.iter().map(|r| r.drain(out)).sum();
        let pt: usize = self.pt.iter().map(|p| p.drain(out)).sum();
        rings + pt
    }

    /// Stops every stream and moves what remains to `out`.
    ///
    /// The kernel reports records lost to a full ring with the first record written after the
    /// ring has room again, so a loss in the last interval before `stop` with no later event
    /// is not reported; drain often enough (every few ms) that rings do not fill.
    pub fn stop(self, out: &mut Vec<PerfRecord>) -> usize {
        let mut n = 0;
        for r in &self.rings {
            // A stream that cannot be disabled is still drained; its fd closes on drop.
            let _ = r.disable();
            n += r.drain(out);
        }
        for p in self.pt {
            n += p.stop(out);
        }
        n
    }
}

#[cfg(test)]
mod tests;
