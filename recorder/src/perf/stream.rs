//! Opening and draining perf events: sampled ring-buffer streams, the Intel PT AUX stream and
//! per-thread step counters.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use perf_event_open::config::{Clock, Cpu, Inherit, Opts, Priv, Proc, SampleOn, SampleSkid};
use perf_event_open::count::Counter;
use perf_event_open::event::dp::DynamicPmu;
use perf_event_open::event::sw::Software;
use perf_event_open::sample::Sampler;

use super::decode::decode_record;
use super::probe::PmuEvent;
use super::{PerfConfig, PerfRecord, StreamKind};
use crate::error::{RecorderError, Result};

/// Whose execution a perf stream observes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PerfTarget {
    /// One thread (a Linux tid), on whatever CPU it runs.
    Thread(u32),
    /// A process and the threads it creates after the streams are opened, one ring per CPU.
    ProcessPerCpu {
        /// Process id.
        pid: u32,
        /// CPUs to open a ring on (usually every online CPU).
        cpus: Vec<u32>,
    },
}

/// The calling thread's Linux thread id.
pub fn current_tid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    (unsafe { libc::gettid() }) as u32
}

/// CLOCK_MONOTONIC now, in ns: the clock perf timestamps are requested in.
pub use slug_kernels::monotonic_ns;

/// Kernel samples need `perf_event_paranoid` ≤ 1 unless we are root; else exclude the kernel.
fn privilege_filter() -> Priv {
    let paranoid = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .unwrap_or(2);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let user_only = paranoid > 1 && !root;
    Priv {
        kernel: user_only,
        hv: user_only,
        ..Priv::default()
    }
}

fn pmu_event(e: &PmuEvent) -> DynamicPmu {
    DynamicPmu {
        ty: e.ty,
        config: e.config,
        config1: e.config1,
        config2: e.config2,
        config3: 0,
    }
}

/// The event and attribute options of one sampled stream kind.
fn stream_opts(
    kind: StreamKind,
    config: &PerfConfig,
    pmu: Option<&PmuEvent>,
) -> Result<(EventSpec, Opts)> {
    let perf_err = |source| RecorderError::Perf {
        event: kind.name().into(),
        source,
    };
    let mut opts = Opts {
        exclude: privilege_filter(),
        timer: Some(Clock::Monotonic),
        record_id_all: true,
        ..Opts::default()
    };
    opts.record_id_format.task = true;
    opts.record_id_format.time = true;
    opts.record_id_format.cpu = true;
    opts.sample_format.code_addr = true;
    opts.sample_format.period = true;
    let need_pmu = || {
        pmu.ok_or_else(|| {
            perf_err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the host has no PMU for it",
            ))
        })
    };
    let event = match kind {
        StreamKind::CpuClock => {
            opts.sample_on = SampleOn::Freq(config.freq_hz);
            EventSpec::Software(Software::CpuClock)
        }
        StreamKind::PageFaults => {
            opts.sample_on = SampleOn::Count(config.page_fault_period.max(1));
            opts.sample_format.data_addr = true;
            EventSpec::Software(Software::PageFault)
        }
        StreamKind::ContextSwitches => {
            // A dummy event samples nothing; it exists to carry switch records.
            opts.extra_record.ctx_switch = true;
            EventSpec::Software(Software::Dummy)
        }
        StreamKind::MemLoads | StreamKind::MemStores | StreamKind::IbsOp => {
            opts.sample_on = SampleOn::Freq(config.freq_hz);
            opts.sample_format.data_addr = true;
            opts.sample_format.weight = Some(perf_event_open::config::Repr::Full);
            opts.sample_format.data_source = true;
            if kind != StreamKind::IbsOp {
                // PEBS: the sampled IP and address are the instruction's own, not a skid.
                opts.sample_skid = SampleSkid::ReqZero;
            }
            EventSpec::Pmu(pmu_event(need_pmu()?))
        }
        StreamKind::IntelPt => {
            // Sideband a PT decoder needs: where code is mapped, who runs, when switches happen.
            opts.extra_record.mmap.code = true;
            opts.extra_record.comm = true;
            opts.extra_record.ctx_switch = true;
            opts.sample_format.code_addr = false;
            opts.sample_format.period = false;
            EventSpec::Pmu(pmu_event(need_pmu()?))
        }
        StreamKind::StepCounters => {
            return Err(perf_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "step counters are read with StepCounters, not sampled",
            )));
        }
    };
    Ok((event, opts))
}

/// The event of a stream (the crate's `Event` cannot be passed back to `Counter::new`).
#[derive(Debug, Clone)]
enum EventSpec {
    Software(Software),
    Pmu(DynamicPmu),
}

fn open_counter(
    kind: StreamKind,
    event: &EventSpec,
    target: &Target,
    opts: &Opts,
) -> Result<Counter> {
    let mut opts = opts.clone();
    let target: perf_event_open::config::Target = match *target {
        Target::Thread(tid) => (Proc(tid), Cpu::ALL).into(),
        Target::Cpu { pid, cpu } => {
            opts.inherit = Some(Inherit::NewThread);
            (Proc(pid), Cpu(cpu)).into()
        }
    };
    let opened = match event {
        EventSpec::Software(sw) => Counter::new(*sw, target, &opts),
        EventSpec::Pmu(pmu) => Counter::new(pmu.clone(), target, &opts),
    };
    opened.map_err(|source| RecorderError::Perf {
        event: kind.name().into(),
        source,
    })
}

/// One perf event with its own ring: where it looks.
#[derive(Debug, Clone, Copy)]
enum Target {
    Thread(u32),
    Cpu { pid: u32, cpu: u32 },
}

impl Target {
    fn cpu(self) -> u32 {
        match self {
            Target::Thread(_) => u32::MAX,
            Target::Cpu { cpu, .. } => cpu,
        }
    }
}

fn targets(target: &PerfTarget) -> Vec<Target> {
    match target {
        PerfTarget::Thread(tid) => vec![Target::Thread(*tid)],
        PerfTarget::ProcessPerCpu { pid, cpus } => cpus
            .iter()
            .map(|&cpu| Target::Cpu { pid: *pid, cpu })
            .collect(),
    }
}

/// A sampled stream: one perf event and its mmap ring, drained by the caller.
pub(crate) struct RingStream {
    kind: StreamKind,
    counter: Counter,
    sampler: Sampler,
    sample_type: u64,
    sample_id_all: bool,
}

impl std::fmt::Debug for RingStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingStream")
            .field("kind", &self.kind)
            .field("sample_type", &self.sample_type)
            .finish_non_exhaustive()
    }
}

impl RingStream {
    /// Opens `kind` on every target (one ring each), disabled until [`RingStream::enable`].
    pub(crate) fn open(
        kind: StreamKind,
        config: &PerfConfig,
        pmu: Option<&PmuEvent>,
        target: &PerfTarget,
    ) -> Result<Vec<RingStream>> {
        let (event, opts) = stream_opts(kind, config, pmu)?;
        targets(target)
            .into_iter()
            .map(|t| {
                let counter = open_counter(kind, &event, &t, &opts)?;
                let sampler = counter.sampler(config.ring_pages_exp).map_err(|source| {
                    RecorderError::Perf {
                        event: kind.name().into(),
                        source,
                    }
                })?;
                let parser = sampler.parser();
                let (sample_type, sample_id_all) = (parser.sample_type, parser.sample_id_all);
                Ok(RingStream {
                    kind,
                    counter,
                    sampler,
                    sample_type,
                    sample_id_all,
                })
            })
            .collect()
    }

    pub(crate) fn enable(&self) -> Result<()> {
        self.counter.enable().map_err(|source| RecorderError::Perf {
            event: self.kind.name().into(),
            source,
        })
    }

    pub(crate) fn disable(&self) -> Result<()> {
        self.counter
            .disable()
            .map_err(|source| RecorderError::Perf {
                event: self.kind.name().into(),
                source,
            })
    }

    /// Moves every record in the ring to `out`; returns how many were read.
    pub(crate) fn drain(&self, out: &mut Vec<PerfRecord>) -> usize {
        drain_ring(
            &self.sampler,
            self.kind,
            self.sample_type,
            self.sample_id_all,
            out,
        )
    }
}

fn drain_ring(
    sampler: &Sampler,
    kind: StreamKind,
    sample_type: u64,
    sample_id_all: bool,
    out: &mut Vec<PerfRecord>,
) -> usize {
    // Only one iterator can exist per sampler and we never hold one across calls.
    let Some(iter) = sampler.iter() else { return 0 };
    let mut cow = iter.into_cow();
    let mut n = 0;
    while let Some(raw) = cow.lending_next() {
        n += 1;
        if let Some(r) = decode_record(kind, sample_type, sample_id_all, raw.as_raw().as_bytes()) {
            out.push(r);
        }
    }
    n
}

/// An Intel PT stream. The AUX area mapping must outlive every drain (unmapping it stops the
/// trace), and the crate ties it to the sampler by a borrow, so a thread owns both and moves
/// AUX chunks and sideband records to a shared queue the recorder drains.
pub(crate) struct PtStream {
    stop: Arc<AtomicBool>,
    queue: Arc<Mutex<Vec<PerfRecord>>>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PtStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PtStream").finish_non_exhaustive()
    }
}

/// How often the PT thread empties the AUX area.
const PT_POLL: Duration = Duration::from_millis(5);
/// Largest AUX chunk handed over as one PT chunk event.
const PT_MAX_CHUNK: usize = 1 << 20;

impl PtStream {
    /// Opens Intel PT on every target and starts tracing (the AUX area is mapped first).
    pub(crate) fn open(
        config: &PerfConfig,
        pmu: &PmuEvent,
        target: &PerfTarget,
    ) -> Result<Vec<PtStream>> {
        let kind = StreamKind::IntelPt;
        let (event, opts) = stream_opts(kind, config, Some(pmu))?;
        let perf_err = |source| RecorderError::Perf {
            event: kind.name().into(),
            source,
        };
        let mut streams = Vec::new();
        for t in targets(target) {
            let counter = open_counter(kind, &event, &t, &opts)?;
            let sampler = counter.sampler(config.ring_pages_exp).map_err(perf_err)?;
            let stop = Arc::new(AtomicBool::new(false));
            let queue = Arc::new(Mutex::new(Vec::new()));
            let (ready_tx, ready_rx) = mpsc::channel();
            let aux_exp = config.aux_pages_exp;
            let (stop2, queue2) = (Arc::clone(&stop), Arc::clone(&queue));
            let handle = std::thread::Builder::new()
                .name("slug-intel-pt".into())
                .spawn(move || {
                    pt_thread(
                        counter,
                        sampler,
                        aux_exp,
                        t.cpu(),
                        &stop2,
                        &queue2,
                        ready_tx,
                    )
                })
                .map_err(perf_err)?;
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = handle.join();
                    return Err(perf_err(e));
                }
                Err(_) => {
                    let _ = handle.join();
                    return Err(perf_err(std::io::Error::other(
                        "the Intel PT thread ended before mapping its AUX area",
                    )));
                }
            }
            streams.push(PtStream {
                stop,
                queue,
                handle: Some(handle),
            });
        }
        Ok(streams)
    }

    pub(crate) fn drain(&self, out: &mut Vec<PerfRecord>) -> usize {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let n = q.len();
        out.append(&mut q);
        n
    }

    /// Stops tracing, waits for the thread's last drain and hands over what it read.
    pub(crate) fn stop(mut self, out: &mut Vec<PerfRecord>) -> usize {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.drain(out)
    }
}

impl Drop for PtStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn pt_thread(
    counter: Counter,
    sampler: Sampler,
    aux_exp: u8,
    cpu: u32,
    stop: &AtomicBool,
    queue: &Mutex<Vec<PerfRecord>>,
    ready: mpsc::Sender<std::io::Result<()>>,
) {
    let aux = match sampler.aux_tracer(aux_exp) {
        Ok(aux) => aux,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if let Err(e) = counter.enable() {
        let _ = ready.send(Err(e));
        return;
    }
    let _ = ready.send(Ok(()));
    let (sample_type, sample_id_all) = {
        let p = sampler.parser();
        (p.sample_type, p.sample_id_all)
    };
    let mut aux_offset = 0u64;
    let mut batch = Vec::new();
    loop {
        let stopping = stop.load(Ordering::Acquire);
        if stopping {
            // Disabling flushes the PMU's last bytes into the AUX area before the final drain.
            let _ = counter.disable();
        }
        if let Some(iter) = aux.iter() {
            let mut cow = iter.into_cow();
            while let Some(chunk) = cow.lending_next(NonZeroUsize::new(PT_MAX_CHUNK)) {
                let bytes = chunk.as_bytes().to_vec();
                let size = bytes.len() as u64;
                batch.push(PerfRecord::PtChunk {
                    cpu,
                    aux_offset,
                    bytes,
                    ns: monotonic_ns(),
                });
                aux_offset += size;
            }
        }
        drain_ring(
            &sampler,
            StreamKind::IntelPt,
            sample_type,
            sample_id_all,
            &mut batch,
        );
        if !batch.is_empty() {
            queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .append(&mut batch);
        }
        if stopping {
            return;
        }
        std::thread::sleep(PT_POLL);
    }
}

/// Task-clock and page-fault counts of one thread, read at step boundaries.
pub struct StepCounters {
    task_clock: Counter,
    page_faults: Counter,
}

impl std::fmt::Debug for StepCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepCounters").finish_non_exhaustive()
    }
}

/// One reading of [`StepCounters`] (cumulative since they were opened).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCounts {
    /// CPU time the thread ran, ns.
    pub task_clock_ns: u64,
    /// Page faults the thread took.
    pub page_faults: u64,
}

impl StepCounters {
    /// Opens both counters on thread `tid`, counting from now.
    pub fn open_thread(tid: u32) -> Result<StepCounters> {
        let open = |sw: Software, name: &str| {
            let opts = Opts {
                exclude: privilege_filter(),
                enable: true,
                ..Opts::default()
            };
            Counter::new(sw, (Proc(tid), Cpu::ALL), opts).map_err(|source| RecorderError::Perf {
                event: name.into(),
                source,
            })
        };
        Ok(StepCounters {
            task_clock: open(Software::TaskClock, "task-clock")?,
            page_faults: open(Software::PageFault, "page-faults")?,
        })
    }

    /// Reads both counts (one `read` syscall each).
    pub fn read(&self) -> Result<StepCounts> {
        let read = |c: &Counter, name: &str| {
            c.stat()
                .map(|s| s.count)
                .map_err(|source| RecorderError::Perf {
                    event: name.into(),
                    source,
                })
        };
        Ok(StepCounts {
            task_clock_ns: read(&self.task_clock, "task-clock")?,
            page_faults: read(&self.page_faults, "page-faults")?,
        })
    }
}
