//! The viewer's own event model: what one endpoint log says happened, in trace-global nanoseconds.
//!
//! The viewer keeps its own types instead of drawing the schema's directly so that rendering,
//! statistics and export are tested without a trace on disk, and so that node clock offsets are
//! applied once, when events are loaded.

use std::fmt::Write as _;
use std::sync::Arc;

/// Nanoseconds on the trace-global clock (each node's monotonic clock plus its manifest offset).
pub type Nanos = u64;

/// A half-open time interval `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TimeRange {
    /// First nanosecond inside the range.
    pub start: Nanos,
    /// First nanosecond after the range.
    pub end: Nanos,
}

impl TimeRange {
    /// Builds a range, swapping the bounds if they are reversed.
    pub fn new(a: Nanos, b: Nanos) -> Self {
        Self {
            start: a.min(b),
            end: a.max(b),
        }
    }

    /// Length of the range in nanoseconds.
    pub fn len(&self) -> Nanos {
        self.end - self.start
    }

    /// Whether the range holds no time at all.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Whether `[start, end]` (an event, possibly instantaneous) touches this range.
    pub fn touches(&self, start: Nanos, end: Nanos) -> bool {
        start < self.end && end >= self.start
    }

    /// Nanoseconds shared by this range and `[start, end)`.
    pub fn overlap(&self, start: Nanos, end: Nanos) -> Nanos {
        end.min(self.end).saturating_sub(start.max(self.start))
    }
}

/// Index of an endpoint in the trace's endpoint list.
pub type EndpointIx = usize;

/// Step boundaries, snapshots, perf samples and PT chunks are the schema's own records, with
/// their `ns` moved to the trace-global clock when the viewer loads them.
pub use slug_schema::{PerfSample, PtChunk, SnapshotEvent, StepBoundary};

/// The kinds of events a trace holds: the schema's, with the schema's names (the UI lists
/// them in [`EventKind::ALL`] order).
pub use slug_schema::EventKind;

/// Counts of events per kind (one slot per [`EventKind::ALL`] entry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindCounts(pub [u64; EventKind::COUNT]);

impl KindCounts {
    /// The count of one kind.
    pub fn get(&self, kind: EventKind) -> u64 {
        self.0[kind as usize]
    }

    /// Adds `n` to one kind.
    pub fn add(&mut self, kind: EventKind, n: u64) {
        self.0[kind as usize] += n;
    }

    /// Sum over all kinds.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// One kernel execution.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelSpan {
    /// When the kernel started.
    pub start: Nanos,
    /// When it returned.
    pub end: Nanos,
    /// Kernel name (`gemm`, `rmsnorm`, ...).
    pub kernel: Arc<str>,
    /// Pipeline step the kernel belongs to.
    pub step: u64,
    /// Model layer, when the kernel belongs to one.
    pub layer: Option<u32>,
    /// Worker thread that ran it.
    pub thread: u32,
    /// Microbatch (sequence) in flight.
    pub seq: u32,
    /// Rows `[start, end)` this thread computed.
    pub rows: (u32, u32),
    /// Hash of the output rows, when kernel verification was recorded (boxed: most spans have
    /// none, and a bare `u128` would grow every cached event).
    pub output_hash: Option<Box<u128>>,
}

/// One transfer between two endpoints: the schema's record, its times moved to the
/// trace-global clock, plus what the viewer derives from it.
#[derive(Clone, Debug, PartialEq)]
pub struct Transfer {
    /// The record as the endpoint logged it (`post_ns` and `complete_ns` on the global clock).
    pub record: slug_schema::Transfer,
    /// Sending endpoint, as an index in the trace's endpoint list.
    pub src: EndpointIx,
    /// Receiving endpoint, as an index in the trace's endpoint list.
    pub dst: EndpointIx,
}

impl Transfer {
    /// Transfer id, unique in the trace; it orders events across endpoints.
    pub fn id(&self) -> u64 {
        self.record.id
    }

    /// Payload length in bytes.
    pub fn bytes(&self) -> u64 {
        self.record.len
    }

    /// When the sender posted it.
    pub fn post(&self) -> Nanos {
        self.record.post_ns
    }

    /// When this end saw it complete.
    pub fn complete(&self) -> Nanos {
        self.record.complete_ns
    }

    /// Whether the receiving end logged this record (else the sender did).
    pub fn logged_by_receiver(&self) -> bool {
        self.record.direction == slug_schema::Direction::Recv
    }
}

/// What an eBPF probe saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SystemKind {
    /// A slow system call (eBPF): args = nr, return value, duration ns.
    Syscall,
    /// A thread off the CPU (eBPF): args = duration ns, reason (bits 0-31 task state, 0 =
    /// preempted; bits 32-63 syscall nr + 1), waker tid.
    OffCpu,
    /// Counts of shorter syscalls (eBPF): args = nr, log2 ns bucket, count.
    SyscallHistogram,
    /// A context switch (perf): args = tid out, tid in, 1 if it blocked.
    ContextSwitch,
    /// A page fault: args = address, ip, error code (eBPF) or 0 (perf).
    PageFault,
    /// A thread migrated between CPUs (eBPF): args = from cpu, to cpu, 1 if the NUMA node changed.
    Migration,
    /// TCP retransmitted on a socket of the thread (eBPF): args = ports, 0, 0.
    TcpRetransmit,
    /// The kernel dropped a packet of a socket of the thread (eBPF): args = ports, reason, 0.
    TcpDrop,
}

impl SystemKind {
    /// Lowercase name for display.
    pub fn name(self) -> &'static str {
        match self {
            SystemKind::Syscall => "syscall",
            SystemKind::OffCpu => "off-cpu",
            SystemKind::SyscallHistogram => "syscall-histogram",
            SystemKind::ContextSwitch => "context-switch",
            SystemKind::PageFault => "page-fault",
            SystemKind::Migration => "migration",
            SystemKind::TcpRetransmit => "tcp-retransmit",
            SystemKind::TcpDrop => "tcp-drop",
        }
    }
}

/// Who produced a [`SystemEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SystemSource {
    /// An eBPF endpoint probe.
    Ebpf,
    /// A perf software record.
    Perf,
}

/// One eBPF probe event or perf software record.
#[derive(Clone, Debug, PartialEq)]
pub struct SystemEvent {
    /// Event time (an interval's or syscall's start).
    pub t: Nanos,
    /// What happened.
    pub kind: SystemKind,
    /// Who recorded it.
    pub source: SystemSource,
    /// Arguments, as [`SystemKind`] says.
    pub args: [u64; 3],
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// CPU.
    pub cpu: u32,
}

impl SystemEvent {
    /// When it ends: an off-CPU interval's or slow syscall's end, else its time.
    pub fn end(&self) -> Nanos {
        match self.kind {
            SystemKind::OffCpu => self.t.saturating_add(self.args[0]),
            SystemKind::Syscall => self.t.saturating_add(self.args[2]),
            _ => self.t,
        }
    }

    /// For an off-CPU interval: what the thread waited on (`futex`, `preempted`, `blocked`).
    pub fn waited_on(&self) -> Option<String> {
        if self.kind != SystemKind::OffCpu {
            return None;
        }
        let state = self.args[1] as u32;
        let syscall = self.args[1] >> 32;
        Some(match (state, syscall) {
            (0, _) => "preempted".to_string(),
            (_, 0) => "blocked".to_string(),
            (_, nr) => syscall_name(nr - 1),
        })
    }

    /// A short label: `off-cpu futex 1.2ms`, `syscall write 3ms`, `migration cpu 1->3 (NUMA)`.
    pub fn label(&self) -> String {
        match self.kind {
            SystemKind::OffCpu => format!(
                "off-cpu {} {}",
                self.waited_on().unwrap_or_default(),
                format_duration(self.args[0])
            ),
            SystemKind::Syscall => format!(
                "{} {}",
                syscall_name(self.args[0]),
                format_duration(self.args[2])
            ),
            SystemKind::SyscallHistogram => format!(
                "{} x{} ~{}",
                syscall_name(self.args[0]),
                self.args[2],
                format_duration(1u64 << (self.args[1] & 0xff).min(63))
            ),
            SystemKind::Migration => format!(
                "migration cpu {}->{}{}",
                self.args[0],
                self.args[1],
                if self.args[2] == 1 {
                    " (NUMA node)"
                } else {
                    ""
                }
            ),
            other => other.name().to_string(),
        }
    }

    /// The arguments by meaning, for the detail pane.
    pub fn describe(&self, out: &mut Vec<(&'static str, String)>) {
        let a = self.args;
        match self.kind {
            SystemKind::OffCpu => {
                out.push(("off cpu for", format_duration(a[0])));
                out.push(("waited on", self.waited_on().unwrap_or_default()));
                out.push(("task state", format!("{:#x}", a[1] as u32)));
                out.push((
                    "woken by tid",
                    if a[2] == 0 {
                        "not seen".into()
                    } else {
                        a[2].to_string()
                    },
                ));
            }
            SystemKind::Syscall => {
                out.push(("syscall", syscall_name(a[0])));
                out.push(("returned", (a[1] as i64).to_string()));
                out.push(("took", format_duration(a[2])));
            }
            SystemKind::SyscallHistogram => {
                out.push(("syscall", syscall_name(a[0])));
                let bucket = a[1] & 0xff;
                out.push((
                    "took",
                    format!(
                        "{} to {}",
                        format_duration(1u64 << bucket.min(63)),
                        format_duration(1u64 << (bucket + 1).min(63))
                    ),
                ));
                if a[1] >> 8 != 0 {
                    out.push(("step", ((a[1] >> 8) - 1).to_string()));
                }
                out.push(("calls", a[2].to_string()));
            }
            SystemKind::ContextSwitch => {
                out.push(("tid out", a[0].to_string()));
                out.push(("tid in", a[1].to_string()));
                out.push(("blocked", (a[2] == 1).to_string()));
            }
            SystemKind::PageFault => {
                out.push(("address", format!("{:#x}", a[0])));
                out.push(("ip", format!("{:#x}", a[1])));
                out.push(("error code", format!("{:#x}", a[2])));
            }
            SystemKind::TcpRetransmit | SystemKind::TcpDrop => {
                out.push(("local port", (a[0] >> 16).to_string()));
                out.push(("remote port", (a[0] & 0xffff).to_string()));
                if self.kind == SystemKind::TcpDrop {
                    out.push(("drop reason", a[1].to_string()));
                }
            }
            SystemKind::Migration => {
                out.push(("from cpu", a[0].to_string()));
                out.push(("to cpu", a[1].to_string()));
                out.push(("NUMA node changed", (a[2] == 1).to_string()));
            }
        }
    }
}

/// The name of x86-64 syscall `nr` for the ones a pipeline stage makes, else `syscall N`.
pub fn syscall_name(nr: u64) -> String {
    let name = match nr {
        0 => "read",
        1 => "write",
        7 => "poll",
        9 => "mmap",
        10 => "mprotect",
        11 => "munmap",
        20 => "writev",
        23 => "select",
        24 => "sched_yield",
        28 => "madvise",
        35 => "nanosleep",
        44 => "sendto",
        45 => "recvfrom",
        46 => "sendmsg",
        47 => "recvmsg",
        202 => "futex",
        230 => "clock_nanosleep",
        232 => "epoll_wait",
        270 => "pselect6",
        271 => "ppoll",
        281 => "epoll_pwait",
        310 => "process_vm_readv",
        311 => "process_vm_writev",
        _ => return format!("syscall {nr}"),
    };
    name.to_string()
}

/// A record of events the recorder dropped.
#[derive(Clone, Debug, PartialEq)]
pub struct LostEvents {
    /// Start of the gap.
    pub t: Nanos,
    /// End of the gap.
    pub to: Nanos,
    /// How many events were lost.
    pub count: u64,
    /// Why (ring overflow, perf lost records, ...).
    pub reason: Arc<str>,
}

/// A user marker.
#[derive(Clone, Debug, PartialEq)]
pub struct UserMarker {
    /// Marker time.
    pub t: Nanos,
    /// Its text.
    pub text: Arc<str>,
}

/// A counter reading.
#[derive(Clone, Debug, PartialEq)]
pub struct CounterReading {
    /// Reading time.
    pub t: Nanos,
    /// Counter name (`task-clock`, `page-faults`, ...).
    pub name: Arc<str>,
    /// Value.
    pub value: u64,
}

/// One event of an endpoint log, as the viewer draws it.
///
/// The large, rarer variants are boxed so the enum stays small: the frame cache holds up to a
/// million of these.
#[derive(Clone, Debug, PartialEq)]
pub enum TraceEvent {
    /// A kernel span.
    Kernel(KernelSpan),
    /// A transfer.
    Transfer(Box<Transfer>),
    /// A step boundary.
    Step(StepBoundary),
    /// A snapshot marker.
    Snapshot(Box<SnapshotEvent>),
    /// A perf sample.
    Perf(PerfSample),
    /// A PT chunk.
    Pt(Box<PtChunk>),
    /// An eBPF event.
    System(SystemEvent),
    /// A lost-events record.
    Lost(LostEvents),
    /// A user marker.
    Marker(UserMarker),
    /// A counter reading.
    Counter(CounterReading),
}

impl TraceEvent {
    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        match self {
            TraceEvent::Kernel(_) => EventKind::KernelSpan,
            TraceEvent::Transfer(_) => EventKind::Transfer,
            TraceEvent::Step(_) => EventKind::StepBoundary,
            TraceEvent::Snapshot(_) => EventKind::Snapshot,
            TraceEvent::Perf(_) => EventKind::PerfSample,
            TraceEvent::Pt(_) => EventKind::PtChunk,
            TraceEvent::System(s) if s.source == SystemSource::Perf => EventKind::PerfSoftware,
            TraceEvent::System(_) => EventKind::Ebpf,
            TraceEvent::Lost(_) => EventKind::LostEvents,
            TraceEvent::Marker(_) => EventKind::Marker,
            TraceEvent::Counter(_) => EventKind::Counter,
        }
    }

    /// When the event starts (post time for transfers).
    pub fn start(&self) -> Nanos {
        match self {
            TraceEvent::Kernel(k) => k.start,
            TraceEvent::Transfer(x) => x.post(),
            TraceEvent::Step(s) => s.ns,
            TraceEvent::Snapshot(s) => s.ns,
            TraceEvent::Perf(p) => p.ns,
            TraceEvent::Pt(p) => p.ns,
            TraceEvent::System(s) => s.t,
            TraceEvent::Lost(l) => l.t,
            TraceEvent::Marker(m) => m.t,
            TraceEvent::Counter(c) => c.t,
        }
    }

    /// When the event ends (completion for transfers; the start for instants).
    pub fn end(&self) -> Nanos {
        match self {
            TraceEvent::Kernel(k) => k.end.max(k.start),
            TraceEvent::Transfer(x) => x.complete().max(x.post()),
            TraceEvent::Lost(l) => l.to.max(l.t),
            TraceEvent::System(s) => s.end(),
            other => other.start(),
        }
    }

    /// A one-line label: kernel name, transfer size, step number...
    pub fn label(&self) -> String {
        match self {
            TraceEvent::Kernel(k) => k.kernel.to_string(),
            TraceEvent::Transfer(x) => format!("#{} {}", x.id(), format_bytes(x.bytes())),
            TraceEvent::Step(s) => format!("step {}", s.step),
            TraceEvent::Snapshot(s) => format!("snapshot step {}", s.step),
            TraceEvent::Perf(p) => format!("{} sample", p.kind.name()),
            TraceEvent::Pt(p) => format!("PT {}", format_bytes(p.size)),
            TraceEvent::System(s) => s.label(),
            TraceEvent::Lost(l) => format!("lost {} ({})", l.count, l.reason),
            TraceEvent::Marker(m) => m.text.to_string(),
            TraceEvent::Counter(c) => format!("{} = {}", c.name, c.value),
        }
    }

    /// Every field of the event as (name, value) pairs, for the detail pane; times are shown
    /// from `origin` (the trace start), as the time axis shows them.
    pub fn fields(
        &self,
        origin: Nanos,
        endpoint_name: &dyn Fn(EndpointIx) -> String,
    ) -> Vec<(&'static str, String)> {
        let format_time = |t: Nanos| format_time(t.saturating_sub(origin));
        let mut out = vec![("kind", self.kind().name().to_string())];
        match self {
            TraceEvent::Kernel(k) => {
                out.push(("kernel", k.kernel.to_string()));
                out.push(("start", format_time(k.start)));
                out.push(("end", format_time(k.end)));
                out.push(("duration", format_duration(k.end.saturating_sub(k.start))));
                out.push(("step", k.step.to_string()));
                out.push((
                    "layer",
                    k.layer.map_or_else(|| "-".to_string(), |l| l.to_string()),
                ));
                out.push(("thread", k.thread.to_string()));
                out.push(("seq", k.seq.to_string()));
                out.push(("rows", format!("{}..{}", k.rows.0, k.rows.1)));
                out.push((
                    "output hash",
                    k.output_hash
                        .as_deref()
                        .map_or_else(|| "-".to_string(), |h| format!("{h:032x}")),
                ));
            }
            TraceEvent::Transfer(x) => {
                out.push(("id", x.id().to_string()));
                out.push(("src", endpoint_name(x.src)));
                out.push(("dst", endpoint_name(x.dst)));
                out.push((
                    "bytes",
                    format!("{} ({})", x.bytes(), format_bytes(x.bytes())),
                ));
                out.push(("post", format_time(x.post())));
                out.push(("complete", format_time(x.complete())));
                let took = x.complete().saturating_sub(x.post());
                out.push(("latency", format_duration(took)));
                out.push(("bandwidth", format_bandwidth(x.bytes(), took)));
                out.push(("src arena", x.record.src_arena.to_string()));
                out.push(("dst arena", x.record.dst_arena.to_string()));
                out.push(("src offset", x.record.src_offset.to_string()));
                out.push(("dst offset", x.record.dst_offset.to_string()));
                out.push(("hash", format!("{:032x}", x.record.hash)));
                out.push(("transport", x.record.transport.name().to_string()));
                out.push((
                    "payload",
                    x.record
                        .payload
                        .map_or_else(|| "hash only".to_string(), |h| format!("{h:032x}")),
                ));
                out.push((
                    "logged by",
                    if x.logged_by_receiver() {
                        "receiver"
                    } else {
                        "sender"
                    }
                    .to_string(),
                ));
            }
            TraceEvent::Step(s) => {
                out.push(("time", format_time(s.ns)));
                out.push(("step", s.step.to_string()));
                out.push(("seq", s.seq.to_string()));
            }
            TraceEvent::Snapshot(s) => {
                out.push(("time", format_time(s.ns)));
                out.push(("stage", s.stage.to_string()));
                out.push(("step", s.step.to_string()));
                out.push(("bytes", format_bytes(s.bytes)));
                out.push(("new bytes", format_bytes(s.new_bytes)));
                out.push(("chunks", s.chunks.to_string()));
                out.push(("id", format!("{:032x}", s.id)));
            }
            TraceEvent::Perf(p) => {
                out.push(("time", format_time(p.ns)));
                out.push(("source", p.kind.name().to_string()));
                out.push(("ip", format!("{:#x}", p.ip)));
                out.push(("addr", format!("{:#x}", p.addr)));
                out.push(("weight", p.weight.to_string()));
                out.push(("data source", format!("{:#x}", p.data_source)));
                out.push(("tid", p.tid.to_string()));
                out.push(("cpu", p.cpu.to_string()));
            }
            TraceEvent::Pt(p) => {
                out.push(("time", format_time(p.ns)));
                out.push(("bytes", format_bytes(p.size)));
                out.push(("cpu", p.cpu.to_string()));
                out.push(("aux offset", p.aux_offset.to_string()));
                out.push(("payload", format!("{:032x}", p.payload)));
            }
            TraceEvent::System(s) => {
                out.push(("time", format_time(s.t)));
                out.push((
                    "source",
                    match s.source {
                        SystemSource::Ebpf => "eBPF probe",
                        SystemSource::Perf => "perf software record",
                    }
                    .to_string(),
                ));
                out.push(("what", s.kind.name().to_string()));
                s.describe(&mut out);
                out.push(("pid", s.pid.to_string()));
                out.push(("tid", s.tid.to_string()));
                out.push(("cpu", s.cpu.to_string()));
            }
            TraceEvent::Lost(l) => {
                out.push(("from", format_time(l.t)));
                out.push(("to", format_time(l.to)));
                out.push(("count", l.count.to_string()));
                out.push(("reason", l.reason.to_string()));
            }
            TraceEvent::Marker(m) => {
                out.push(("time", format_time(m.t)));
                out.push(("text", m.text.to_string()));
            }
            TraceEvent::Counter(c) => {
                out.push(("time", format_time(c.t)));
                out.push(("counter", c.name.to_string()));
                out.push(("value", c.value.to_string()));
            }
        }
        out
    }
}

/// Formats a trace-global time as seconds with microsecond precision (`1.234567s`).
pub fn format_time(t: Nanos) -> String {
    format!("{}.{:06}s", t / 1_000_000_000, (t % 1_000_000_000) / 1_000)
}

/// Formats a duration with a unit that keeps three significant figures or so.
pub fn format_duration(d: Nanos) -> String {
    let mut s = String::new();
    let _ = match d {
        0..1_000 => write!(s, "{d}ns"),
        1_000..1_000_000 => write!(s, "{:.1}us", d as f64 / 1e3),
        1_000_000..1_000_000_000 => write!(s, "{:.2}ms", d as f64 / 1e6),
        _ => write!(s, "{:.3}s", d as f64 / 1e9),
    };
    s
}

/// Formats a byte count with a binary unit (`4.0KiB`).
pub fn format_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

/// Formats bytes moved over a duration as a rate (`1.2GB/s`, decimal units as links are quoted).
pub fn format_bandwidth(bytes: u64, over: Nanos) -> String {
    if over == 0 {
        return "-".to_string();
    }
    let per_s = bytes as f64 * 1e9 / over as f64;
    match per_s {
        v if v >= 1e9 => format!("{:.2}GB/s", v / 1e9),
        v if v >= 1e6 => format!("{:.1}MB/s", v / 1e6),
        v if v >= 1e3 => format!("{:.1}kB/s", v / 1e3),
        v => format!("{v:.0}B/s"),
    }
}

/// Parses a user-typed time: a number with an optional unit (`ns`, `us`, `ms`, `s`; default `ms`).
pub fn parse_time(text: &str) -> Option<Nanos> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let value: f64 = num.parse().ok()?;
    let scale = match unit.trim() {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "" | "ms" => 1e6,
        "s" => 1e9,
        _ => return None,
    };
    let ns = value * scale;
    (ns.is_finite() && ns >= 0.0 && ns < u64::MAX as f64).then_some(ns as Nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_parsing_accepts_units_and_rejects_garbage() {
        assert_eq!(parse_time("1.5ms"), Some(1_500_000));
        assert_eq!(parse_time("2"), Some(2_000_000));
        assert_eq!(parse_time("7 us"), Some(7_000));
        assert_eq!(parse_time("3s"), Some(3_000_000_000));
        assert_eq!(parse_time("abc"), None);
        assert_eq!(parse_time("5 parsecs"), None);
    }

    #[test]
    fn units_are_readable() {
        assert_eq!(format_bytes(512), "512B");
        assert_eq!(format_bytes(4096), "4.0KiB");
        assert_eq!(format_duration(1_500), "1.5us");
        assert_eq!(format_bandwidth(1_000_000_000, 1_000_000_000), "1.00GB/s");
        assert_eq!(format_time(1_234_567_890), "1.234567s");
    }

    #[test]
    fn ranges_measure_overlap() {
        let r = TimeRange::new(10, 20);
        assert_eq!(r.overlap(5, 15), 5);
        assert_eq!(r.overlap(20, 30), 0);
        assert!(r.touches(15, 15));
        assert!(!r.touches(20, 25));
    }
}

#[cfg(test)]
mod size_tests {
    #[test]
    fn cached_events_stay_small() {
        // The frame cache budget assumes about 80 bytes per event.
        assert!(
            std::mem::size_of::<super::TraceEvent>() <= 80,
            "{}",
            std::mem::size_of::<super::TraceEvent>()
        );
    }
}
