//! The viewer's events: the schema's own records, as an endpoint logged them, moved onto the
//! trace-global clock when the viewer loads them, plus what the viewer derives from them.
//!
//! A [`TraceEvent`] has the kinds and names of [`slug_schema::Event`]. Loading applies the node's
//! clock offset to every time, renumbers interned strings into the trace's [`Names`] (one table
//! for all endpoint logs) and resolves a transfer's endpoint ids to indexes; nothing else changes.
//! Rendering, statistics and export are tested on events built in memory, without a trace.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

pub use slug_schema::{
    Counter, EbpfEvent, EbpfKind, EventKind, KernelSpan, LostEvents, Marker, PerfSample, PtChunk,
    SnapshotEvent, SoftwareKind, SoftwareRecord, StepBoundary, StringId, TimeRange,
};

use crate::state::system;

/// Nanoseconds on the trace-global clock (each node's monotonic clock plus its manifest offset).
pub type Nanos = u64;

/// Index of an endpoint in the trace's endpoint list.
pub type EndpointIx = usize;

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

/// The strings of a whole trace (kernel names, loss reasons, marker texts, counter names): the
/// viewer's events name them by [`StringId`]s into this table, which every endpoint log's
/// interned strings are merged into once, when the trace opens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    list: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, StringId>,
}

impl Names {
    /// The id of `name`, adding it if it is new.
    pub fn intern(&mut self, name: &str) -> StringId {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.list.len() as StringId;
        let name: Arc<str> = Arc::from(name);
        self.list.push(Arc::clone(&name));
        self.ids.insert(name, id);
        id
    }

    /// The string `id` names, or `?` for an id the table does not hold.
    pub fn get(&self, id: StringId) -> &str {
        self.list.get(id as usize).map_or("?", |s| s)
    }

    /// [`Names::get`], shared.
    pub fn shared(&self, id: StringId) -> Arc<str> {
        self.list
            .get(id as usize)
            .map_or_else(|| Arc::from("?"), Arc::clone)
    }
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

/// One event of an endpoint log, as the viewer draws it: a [`slug_schema::Event`] on the
/// trace-global clock, its strings in the trace's [`Names`].
///
/// The large, rarer variants are boxed so the enum stays small: the frame cache holds up to a
/// million of these.
#[derive(Clone, Debug, PartialEq)]
pub enum TraceEvent {
    /// See [`KernelSpan`].
    KernelSpan(KernelSpan),
    /// See [`Transfer`].
    Transfer(Box<Transfer>),
    /// See [`StepBoundary`].
    StepBoundary(StepBoundary),
    /// See [`SnapshotEvent`].
    Snapshot(Box<SnapshotEvent>),
    /// See [`PerfSample`].
    PerfSample(PerfSample),
    /// See [`PtChunk`].
    PtChunk(Box<PtChunk>),
    /// See [`EbpfEvent`].
    Ebpf(EbpfEvent),
    /// See [`LostEvents`].
    LostEvents(LostEvents),
    /// See [`Marker`].
    Marker(Marker),
    /// See [`Counter`].
    Counter(Counter),
    /// See [`SoftwareRecord`].
    PerfSoftware(SoftwareRecord),
    /// See [`Migration`].
    Migration(Migration),
}

/// A stage's move between nodes as one endpoint logged it, with the endpoint on the other side
/// resolved to a timeline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Migration {
    /// The record as logged, on the trace-global clock.
    pub record: slug_schema::MigrationEvent,
    /// The endpoint on the other side of the move.
    pub peer: EndpointIx,
}

impl Migration {
    /// `left` (this endpoint handed the stage off) or `arrived` (it took it over).
    pub fn role(&self) -> &'static str {
        self.record.role.name()
    }
}

impl TraceEvent {
    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        match self {
            TraceEvent::KernelSpan(_) => EventKind::KernelSpan,
            TraceEvent::Transfer(_) => EventKind::Transfer,
            TraceEvent::StepBoundary(_) => EventKind::StepBoundary,
            TraceEvent::Snapshot(_) => EventKind::Snapshot,
            TraceEvent::PerfSample(_) => EventKind::PerfSample,
            TraceEvent::PtChunk(_) => EventKind::PtChunk,
            TraceEvent::Ebpf(_) => EventKind::Ebpf,
            TraceEvent::LostEvents(_) => EventKind::LostEvents,
            TraceEvent::Marker(_) => EventKind::Marker,
            TraceEvent::Counter(_) => EventKind::Counter,
            TraceEvent::PerfSoftware(_) => EventKind::PerfSoftware,
            TraceEvent::Migration(_) => EventKind::Migration,
        }
    }

    /// When the event starts (post time for transfers).
    pub fn start(&self) -> Nanos {
        match self {
            TraceEvent::KernelSpan(k) => k.start_ns,
            TraceEvent::Transfer(x) => x.post(),
            TraceEvent::StepBoundary(s) => s.ns,
            TraceEvent::Snapshot(s) => s.ns,
            TraceEvent::PerfSample(p) => p.ns,
            TraceEvent::PtChunk(p) => p.ns,
            TraceEvent::Ebpf(e) => e.ns,
            TraceEvent::LostEvents(l) => l.from_ns,
            TraceEvent::Marker(m) => m.ns,
            TraceEvent::Counter(c) => c.ns,
            TraceEvent::PerfSoftware(s) => s.ns,
            TraceEvent::Migration(m) => m.record.ns,
        }
    }

    /// When the event ends (completion for transfers; the start for instants).
    pub fn end(&self) -> Nanos {
        match self {
            TraceEvent::KernelSpan(k) => k.end_ns.max(k.start_ns),
            TraceEvent::Transfer(x) => x.complete().max(x.post()),
            TraceEvent::LostEvents(l) => l.to_ns.max(l.from_ns),
            TraceEvent::Ebpf(e) => e.end_ns(),
            other => other.start(),
        }
    }

    /// A one-line label: kernel name, transfer size, step number...
    pub fn label(&self, names: &Names) -> String {
        match self {
            TraceEvent::KernelSpan(k) => names.get(k.kernel).to_string(),
            TraceEvent::Transfer(x) => format!("#{} {}", x.id(), format_bytes(x.bytes())),
            TraceEvent::StepBoundary(s) => format!("step {}", s.step),
            TraceEvent::Snapshot(s) => format!("snapshot step {}", s.step),
            TraceEvent::PerfSample(p) => format!("{} sample", p.kind.name()),
            TraceEvent::PtChunk(p) => format!("PT {}", format_bytes(p.size)),
            TraceEvent::Ebpf(e) => system::ebpf_label(e),
            TraceEvent::PerfSoftware(s) => s.kind.name().to_string(),
            TraceEvent::LostEvents(l) => format!("lost {} ({})", l.count, names.get(l.reason)),
            TraceEvent::Marker(m) => names.get(m.text).to_string(),
            TraceEvent::Counter(c) => format!("{} = {}", names.get(c.name), c.value),
            TraceEvent::Migration(m) => format!(
                "stage {} {} at step {}",
                m.record.stage,
                m.role(),
                m.record.step
            ),
        }
    }

    /// Every field of the event as (name, value) pairs, for the detail pane; times are shown
    /// from `origin` (the trace start), as the time axis shows them.
    pub fn fields(
        &self,
        origin: Nanos,
        names: &Names,
        endpoint_name: &dyn Fn(EndpointIx) -> String,
    ) -> Vec<(&'static str, String)> {
        let format_time = |t: Nanos| format_time(t.saturating_sub(origin));
        let mut out = vec![("kind", self.kind().name().to_string())];
        match self {
            TraceEvent::KernelSpan(k) => {
                out.push(("kernel", names.get(k.kernel).to_string()));
                out.push(("start", format_time(k.start_ns)));
                out.push(("end", format_time(k.end_ns)));
                out.push((
                    "duration",
                    format_duration(k.end_ns.saturating_sub(k.start_ns)),
                ));
                out.push(("step", k.step.to_string()));
                out.push((
                    "layer",
                    k.layer.map_or_else(|| "-".to_string(), |l| l.to_string()),
                ));
                out.push(("seq", k.seq.to_string()));
                out.push(("rows", k.rows.to_string()));
                out.push((
                    "output hash",
                    k.output_hash
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
                // The links' definition (bytes / time in flight) for this one transfer.
                out.push(("achieved", format_bandwidth(x.bytes(), took)));
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
            TraceEvent::StepBoundary(s) => {
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
            TraceEvent::PerfSample(p) => {
                out.push(("time", format_time(p.ns)));
                out.push(("source", p.kind.name().to_string()));
                out.push(("ip", format!("{:#x}", p.ip)));
                out.push(("addr", format!("{:#x}", p.addr)));
                out.push(("weight", p.weight.to_string()));
                out.push(("data source", format!("{:#x}", p.data_source)));
                out.push(("tid", p.tid.to_string()));
                out.push(("cpu", p.cpu.to_string()));
            }
            TraceEvent::PtChunk(p) => {
                out.push(("time", format_time(p.ns)));
                out.push(("bytes", format_bytes(p.size)));
                out.push(("cpu", p.cpu.to_string()));
                out.push(("aux offset", p.aux_offset.to_string()));
                out.push(("payload", format!("{:032x}", p.payload)));
            }
            TraceEvent::Ebpf(e) => {
                out.push(("time", format_time(e.ns)));
                out.push(("what", e.kind.name().to_string()));
                system::describe_ebpf(e, &mut out);
                out.push(("pid", e.pid.to_string()));
                out.push(("tid", e.tid.to_string()));
                out.push(("cpu", e.cpu.to_string()));
            }
            TraceEvent::PerfSoftware(s) => {
                out.push(("time", format_time(s.ns)));
                out.push(("what", s.kind.name().to_string()));
                system::describe_software(s, &mut out);
                out.push(("pid", s.pid.to_string()));
                out.push(("tid", s.tid.to_string()));
                out.push(("cpu", s.cpu.to_string()));
            }
            TraceEvent::LostEvents(l) => {
                out.push(("from", format_time(l.from_ns)));
                out.push(("to", format_time(l.to_ns)));
                out.push(("count", l.count.to_string()));
                out.push(("reason", names.get(l.reason).to_string()));
            }
            TraceEvent::Marker(m) => {
                out.push(("time", format_time(m.ns)));
                out.push(("text", names.get(m.text).to_string()));
            }
            TraceEvent::Counter(c) => {
                out.push(("time", format_time(c.ns)));
                out.push(("counter", names.get(c.name).to_string()));
                out.push(("value", c.value.to_string()));
            }
            TraceEvent::Migration(m) => {
                out.push(("time", format_time(m.record.ns)));
                out.push(("stage", m.record.stage.to_string()));
                out.push(("step", m.record.step.to_string()));
                out.push(("move", m.record.index.to_string()));
                out.push(("role", m.role().to_string()));
                let side = match m.record.role {
                    slug_schema::MoveRole::Left => "moved to",
                    slug_schema::MoveRole::Arrived => "moved from",
                };
                out.push((side, endpoint_name(m.peer)));
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
    fn names_are_one_table_for_the_trace() {
        let mut names = Names::default();
        let gemm = names.intern("gemm");
        assert_eq!(names.intern("rmsnorm"), gemm + 1);
        assert_eq!(names.intern("gemm"), gemm, "interned once");
        assert_eq!(names.get(gemm), "gemm");
        assert_eq!(names.get(99), "?");
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
