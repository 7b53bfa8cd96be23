//! Perfetto protobuf export: a `Trace` of `TracePacket`s with one process track per endpoint, a
//! thread track per worker thread (kernel slices), a transfers track per endpoint (flow ends),
//! counter tracks for the perf lanes and recorded counters, and per OS thread with eBPF events a
//! thread track holding its off-CPU intervals and slow syscalls as slices and its migrations as
//! instants.
//!
//! Field numbers are Perfetto's (protos/perfetto/trace/trace.proto, trace_packet.proto,
//! track_event/track_event.proto, track_descriptor.proto, process_descriptor.proto,
//! thread_descriptor.proto, counter_descriptor.proto, debug_annotation.proto). Flow ids are the
//! transfer id plus one, because Perfetto treats flow id 0 as absent.

use std::collections::{HashMap, HashSet};
use std::io::Write;

use crate::error::{Result, ViewerError};
use crate::export::ExportSummary;
use crate::export::proto::{Message, Value, decode};
use crate::export::walk::{Item, ebpf_track_shape, walk};
use crate::state::event::{EbpfKind, EndpointIx, EventKind, TraceEvent, Transfer, format_bytes};
use crate::state::source::TraceSource;
use crate::state::system;

/// `Trace.packet`.
const TRACE_PACKET: u32 = 1;
/// `TracePacket` fields.
mod packet {
    pub const TIMESTAMP: u32 = 8;
    pub const TRUSTED_PACKET_SEQUENCE_ID: u32 = 10;
    pub const TRACK_EVENT: u32 = 11;
    pub const SEQUENCE_FLAGS: u32 = 13;
    pub const TRACK_DESCRIPTOR: u32 = 60;
    /// `SEQ_INCREMENTAL_STATE_CLEARED`.
    pub const SEQ_INCREMENTAL_STATE_CLEARED: u64 = 1;
}
/// `TrackDescriptor` fields.
mod track {
    pub const UUID: u32 = 1;
    pub const NAME: u32 = 2;
    pub const PROCESS: u32 = 3;
    pub const THREAD: u32 = 4;
    pub const PARENT_UUID: u32 = 5;
    pub const COUNTER: u32 = 8;
    /// `ProcessDescriptor.pid` / `.process_name`.
    pub const PROCESS_PID: u32 = 1;
    pub const PROCESS_NAME: u32 = 6;
    /// `ThreadDescriptor.pid` / `.tid` / `.thread_name`.
    pub const THREAD_PID: u32 = 1;
    pub const THREAD_TID: u32 = 2;
    pub const THREAD_NAME: u32 = 5;
    /// `CounterDescriptor.unit_name`.
    pub const COUNTER_UNIT_NAME: u32 = 6;
}
/// `TrackEvent` fields and types.
mod event {
    pub const DEBUG_ANNOTATIONS: u32 = 4;
    pub const TYPE: u32 = 9;
    pub const TRACK_UUID: u32 = 11;
    pub const CATEGORIES: u32 = 22;
    pub const NAME: u32 = 23;
    pub const DOUBLE_COUNTER_VALUE: u32 = 44;
    pub const FLOW_IDS: u32 = 47;
    pub const TERMINATING_FLOW_IDS: u32 = 48;
    pub const TYPE_SLICE_BEGIN: u64 = 1;
    pub const TYPE_SLICE_END: u64 = 2;
    pub const TYPE_INSTANT: u64 = 3;
    pub const TYPE_COUNTER: u64 = 4;
    /// `DebugAnnotation.name` / `.uint_value`.
    pub const ANNOTATION_NAME: u32 = 10;
    pub const ANNOTATION_UINT: u32 = 3;
}

const SEQUENCE_ID: u64 = 1;
const TRANSFERS_TRACK: u64 = 0xffff_0000;
const COUNTER_TRACK: u64 = 0xfffe_0000;
/// OS thread tracks: this bit plus the tid (below 2^30, Linux's pid limit is 2^22).
const OS_THREAD_TRACK: u64 = 0x4000_0000;

fn endpoint_uuid(ep: EndpointIx) -> u64 {
    (ep as u64 + 1) << 32
}

fn pid(ep: EndpointIx) -> u64 {
    ep as u64 + 1
}

/// What a track is, for its descriptor.
enum TrackKind {
    Endpoint,
    Kernels,
    OsThread(u32),
    Transfers,
    Counter(String),
}

struct Writer<'a> {
    out: &'a mut dyn Write,
    source: &'a dyn TraceSource,
    declared: HashSet<u64>,
    counter_ids: HashMap<(EndpointIx, String), u64>,
    first: bool,
    summary: ExportSummary,
    /// Reused buffers: a track event and the packet around it, so a slice allocates nothing.
    event: Message,
    packet: Message,
}

impl Writer<'_> {
    fn packet(&mut self, mut p: Message) -> Result<()> {
        let r = self.finish_packet(&mut p);
        self.packet = p;
        r
    }

    /// Adds the sequence fields and writes `p` framed as one `Trace.packet`.
    fn finish_packet(&mut self, p: &mut Message) -> Result<()> {
        p.varint(packet::TRUSTED_PACKET_SEQUENCE_ID, SEQUENCE_ID);
        if std::mem::take(&mut self.first) {
            p.varint(
                packet::SEQUENCE_FLAGS,
                packet::SEQ_INCREMENTAL_STATE_CLEARED,
            );
        }
        let io = |e| ViewerError::io("the Perfetto output", e);
        self.out.write_all(&p.framing(TRACE_PACKET)).map_err(io)?;
        self.out.write_all(p.as_bytes()).map_err(io)
    }

    /// Writes one track event built by `build` at time `ts`, reusing the writer's buffers.
    fn emit(&mut self, ts: u64, build: impl FnOnce(&mut Message)) -> Result<()> {
        let mut ev = std::mem::take(&mut self.event);
        ev.clear();
        build(&mut ev);
        let mut p = std::mem::take(&mut self.packet);
        p.clear();
        p.varint(packet::TIMESTAMP, ts)
            .message(packet::TRACK_EVENT, &ev);
        let r = self.finish_packet(&mut p);
        self.event = ev;
        self.packet = p;
        r
    }

    fn name(&self, ep: EndpointIx) -> String {
        self.source
            .endpoints()
            .get(ep)
            .map_or_else(|| format!("endpoint {ep}"), |e| e.name.clone())
    }

    /// Declares a track the first time it is used and returns its uuid.
    fn track(&mut self, ep: EndpointIx, kind: TrackKind) -> Result<u64> {
        let base = endpoint_uuid(ep);
        let uuid = match &kind {
            TrackKind::Endpoint => base,
            TrackKind::Kernels => base | 1,
            TrackKind::OsThread(tid) => base | OS_THREAD_TRACK | u64::from(*tid & 0x3fff_ffff),
            TrackKind::Transfers => base | TRANSFERS_TRACK,
            TrackKind::Counter(name) => {
                let next = self.counter_ids.len() as u64;
                base | COUNTER_TRACK | *self.counter_ids.entry((ep, name.clone())).or_insert(next)
            }
        };
        if self.declared.contains(&uuid) {
            return Ok(uuid);
        }
        if !matches!(kind, TrackKind::Endpoint) {
            self.track(ep, TrackKind::Endpoint)?;
        }
        self.declared.insert(uuid);
        let mut d = Message::new();
        d.varint(track::UUID, uuid);
        match kind {
            TrackKind::Endpoint => {
                let mut p = Message::new();
                p.varint(track::PROCESS_PID, pid(ep))
                    .string(track::PROCESS_NAME, &self.name(ep));
                d.string(track::NAME, &self.name(ep))
                    .message(track::PROCESS, &p);
            }
            TrackKind::Kernels => {
                let mut th = Message::new();
                th.varint(track::THREAD_PID, pid(ep))
                    .varint(track::THREAD_TID, pid(ep) * 1000 + 1)
                    .string(track::THREAD_NAME, &format!("{} kernels", self.name(ep)));
                d.varint(track::PARENT_UUID, base)
                    .message(track::THREAD, &th);
            }
            TrackKind::OsThread(tid) => {
                let mut th = Message::new();
                th.varint(track::THREAD_PID, pid(ep))
                    .varint(track::THREAD_TID, u64::from(tid))
                    .string(
                        track::THREAD_NAME,
                        &format!("{} thread {tid} (eBPF)", self.name(ep)),
                    );
                d.varint(track::PARENT_UUID, base)
                    .message(track::THREAD, &th);
            }
            TrackKind::Transfers => {
                d.varint(track::PARENT_UUID, base)
                    .string(track::NAME, "transfers");
            }
            TrackKind::Counter(name) => {
                let mut c = Message::new();
                c.string(
                    track::COUNTER_UNIT_NAME,
                    if name.contains("bytes") {
                        "bytes"
                    } else {
                        "count"
                    },
                );
                d.varint(track::PARENT_UUID, base)
                    .string(track::NAME, &name)
                    .message(track::COUNTER, &c);
            }
        }
        self.summary.tracks += 1;
        let mut p = Message::new();
        p.message(packet::TRACK_DESCRIPTOR, &d);
        self.packet(p)?;
        Ok(uuid)
    }

    fn instant(&mut self, ep: EndpointIx, ts: u64, name: &str) -> Result<()> {
        let uuid = self.track(ep, TrackKind::Endpoint)?;
        self.summary.instants += 1;
        self.emit(ts, |ev| {
            ev.varint(event::TYPE, event::TYPE_INSTANT)
                .varint(event::TRACK_UUID, uuid)
                .string(event::CATEGORIES, "slug")
                .string(event::NAME, name);
        })
    }

    fn counter(&mut self, ep: EndpointIx, name: &str, ts: u64, value: f64) -> Result<()> {
        let uuid = self.track(ep, TrackKind::Counter(name.to_string()))?;
        self.summary.counters += 1;
        self.emit(ts, |ev| {
            ev.varint(event::TYPE, event::TYPE_COUNTER)
                .varint(event::TRACK_UUID, uuid)
                .double(event::DOUBLE_COUNTER_VALUE, value);
        })
    }

    fn flow_end(&mut self, x: &Transfer, start: bool) -> Result<()> {
        let (ep, ts, verb, field) = if start {
            (x.src, x.post(), "send", event::FLOW_IDS)
        } else {
            (
                x.dst,
                x.complete().max(x.post()),
                "recv",
                event::TERMINATING_FLOW_IDS,
            )
        };
        let uuid = self.track(ep, TrackKind::Transfers)?;
        if start {
            self.summary.flows += 1;
        }
        let name = format!("{verb} #{} {}", x.id(), format_bytes(x.bytes()));
        self.emit(ts, |ev| {
            ev.varint(event::TYPE, event::TYPE_INSTANT)
                .varint(event::TRACK_UUID, uuid)
                .string(event::CATEGORIES, EventKind::Transfer.name())
                .string(event::NAME, &name);
            annotate(ev, "bytes", x.bytes());
            ev.fixed64(field, x.id() + 1);
        })
    }

    fn item(&mut self, item: Item<'_>) -> Result<()> {
        match item {
            Item::FlowStart(x) => self.flow_end(x, true),
            Item::FlowEnd(x) => self.flow_end(x, false),
            Item::Lane(ep, name, ts, v) => self.counter(ep, name, ts, v),
            Item::Event(ep, e) => match e {
                TraceEvent::KernelSpan(k) => {
                    let uuid = self.track(ep, TrackKind::Kernels)?;
                    self.summary.slices += 1;
                    let name = self.source.names().get(k.kernel);
                    self.emit(k.start_ns, |ev| {
                        ev.varint(event::TYPE, event::TYPE_SLICE_BEGIN)
                            .varint(event::TRACK_UUID, uuid)
                            .string(event::CATEGORIES, EventKind::KernelSpan.name())
                            .string(event::NAME, name);
                        annotate(ev, "step", k.step);
                        if let Some(layer) = k.layer {
                            annotate(ev, "layer", u64::from(layer));
                        }
                    })?;
                    self.emit(k.end_ns.max(k.start_ns), |ev| {
                        ev.varint(event::TYPE, event::TYPE_SLICE_END)
                            .varint(event::TRACK_UUID, uuid);
                    })
                }
                TraceEvent::Counter(c) => {
                    let name = self.source.names().get(c.name);
                    self.counter(ep, name, c.ns, c.value as f64)
                }
                TraceEvent::Ebpf(s) => {
                    let Some((cat, instant)) = ebpf_track_shape(s.kind) else {
                        return Ok(());
                    };
                    let uuid = self.track(ep, TrackKind::OsThread(s.tid))?;
                    let name = system::ebpf_label(s);
                    if instant {
                        self.summary.instants += 1;
                        return self.emit(s.ns, |ev| {
                            ev.varint(event::TYPE, event::TYPE_INSTANT)
                                .varint(event::TRACK_UUID, uuid)
                                .string(event::CATEGORIES, &cat)
                                .string(event::NAME, &name);
                        });
                    }
                    self.summary.slices += 1;
                    self.emit(s.ns, |ev| {
                        ev.varint(event::TYPE, event::TYPE_SLICE_BEGIN)
                            .varint(event::TRACK_UUID, uuid)
                            .string(event::CATEGORIES, &cat)
                            .string(event::NAME, &name);
                        if s.kind == EbpfKind::OffCpu {
                            annotate(ev, "waker_tid", s.arg2);
                        }
                    })?;
                    self.emit(s.end_ns(), |ev| {
                        ev.varint(event::TYPE, event::TYPE_SLICE_END)
                            .varint(event::TRACK_UUID, uuid);
                    })
                }
                // Lanes already carry samples, faults and PT volume as counters.
                TraceEvent::PerfSample(_)
                | TraceEvent::PtChunk(_)
                | TraceEvent::PerfSoftware(_)
                | TraceEvent::Transfer(_) => Ok(()),
                TraceEvent::Migration(m) => {
                    let uuid = self.track(ep, TrackKind::Endpoint)?;
                    self.summary.instants += 1;
                    let (r, label) = (m.record, e.label(self.source.names()));
                    self.emit(r.ns, |ev| {
                        ev.varint(event::TYPE, event::TYPE_INSTANT)
                            .varint(event::TRACK_UUID, uuid)
                            .string(event::CATEGORIES, EventKind::Migration.name())
                            .string(event::NAME, &label);
                        annotate(ev, "stage", u64::from(r.stage));
                        annotate(ev, "step", r.step);
                        annotate(ev, "move", u64::from(r.index));
                        annotate(ev, "peer_endpoint", u64::from(r.peer));
                    })
                }
                TraceEvent::StepBoundary(_)
                | TraceEvent::Snapshot(_)
                | TraceEvent::LostEvents(_)
                | TraceEvent::Marker(_) => {
                    let label = e.label(self.source.names());
                    self.instant(ep, e.start(), &label)
                }
            },
        }
    }
}

/// Adds a `DebugAnnotation{name, uint_value}` to a track event.
fn annotate(ev: &mut Message, name: &str, v: u64) {
    ev.string_varint_pair(
        event::DEBUG_ANNOTATIONS,
        event::ANNOTATION_NAME,
        name,
        event::ANNOTATION_UINT,
        v,
    );
}

/// Writes `source` as a Perfetto protobuf trace.
pub fn write(source: &dyn TraceSource, out: &mut dyn Write) -> Result<ExportSummary> {
    let mut w = Writer {
        out,
        source,
        declared: HashSet::new(),
        counter_ids: HashMap::new(),
        first: true,
        summary: ExportSummary::default(),
        event: Message::new(),
        packet: Message::new(),
    };
    for ep in 0..source.endpoints().len() {
        w.track(ep, TrackKind::Endpoint)?;
    }
    let unreadable = walk(source, |item| w.item(item))?;
    Ok(ExportSummary {
        unreadable_frames: unreadable,
        ..w.summary
    })
}

/// A track read back from a Perfetto trace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackRecord {
    /// Track name (process, thread or track name).
    pub name: String,
    /// Parent track, 0 for none.
    pub parent: u64,
    /// Whether it is a counter track.
    pub counter: bool,
}

/// What a Perfetto trace holds, read back for checking an export.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PerfettoContents {
    /// Tracks by uuid.
    pub tracks: HashMap<u64, TrackRecord>,
    /// Slices begun per track uuid.
    pub slices: HashMap<u64, u64>,
    /// Slice names and how often each appears.
    pub slice_names: HashMap<String, u64>,
    /// Flow id → track of the event that starts it.
    pub flow_starts: HashMap<u64, u64>,
    /// Flow id → track of the event that terminates it.
    pub flow_ends: HashMap<u64, u64>,
    /// Counter values per track uuid.
    pub counters: HashMap<u64, u64>,
    /// Instant events (excluding flow ends).
    pub instants: u64,
    /// Whether every track event had a timestamp and a sequence id.
    pub well_formed: bool,
}

/// Decodes a Perfetto trace written by [`write`] (or any trace using the same fields).
pub fn read(data: &[u8]) -> Result<PerfettoContents> {
    let mut c = PerfettoContents {
        well_formed: true,
        ..PerfettoContents::default()
    };
    for (field, value) in decode(data)? {
        let Some(packet_bytes) = value.as_bytes().filter(|_| field == TRACE_PACKET) else {
            continue;
        };
        let fields = decode(packet_bytes)?;
        let get = |n: u32| fields.iter().find(|(f, _)| *f == n).map(|(_, v)| *v);
        if get(packet::TRUSTED_PACKET_SEQUENCE_ID).is_none() {
            c.well_formed = false;
        }
        if let Some(d) = get(packet::TRACK_DESCRIPTOR).and_then(Value::as_bytes) {
            let d = decode(d)?;
            let dget = |n: u32| d.iter().find(|(f, _)| *f == n).map(|(_, v)| *v);
            let nested_name = |n: u32, name_field: u32| -> Result<Option<String>> {
                match dget(n).and_then(Value::as_bytes) {
                    Some(b) => Ok(decode(b)?
                        .iter()
                        .find(|(f, _)| *f == name_field)
                        .and_then(|(_, v)| v.as_str())
                        .map(str::to_string)),
                    None => Ok(None),
                }
            };
            let name = dget(track::NAME)
                .and_then(Value::as_str)
                .map(str::to_string)
                .or(nested_name(track::THREAD, track::THREAD_NAME)?)
                .or(nested_name(track::PROCESS, track::PROCESS_NAME)?)
                .unwrap_or_default();
            let uuid = dget(track::UUID).and_then(Value::as_u64).unwrap_or(0);
            c.tracks.insert(
                uuid,
                TrackRecord {
                    name,
                    parent: dget(track::PARENT_UUID)
                        .and_then(Value::as_u64)
                        .unwrap_or(0),
                    counter: dget(track::COUNTER).is_some(),
                },
            );
        }
        if let Some(ev) = get(packet::TRACK_EVENT).and_then(Value::as_bytes) {
            if get(packet::TIMESTAMP).is_none() {
                c.well_formed = false;
            }
            let ev = decode(ev)?;
            let eget = |n: u32| ev.iter().find(|(f, _)| *f == n).map(|(_, v)| *v);
            let track = eget(event::TRACK_UUID).and_then(Value::as_u64).unwrap_or(0);
            let kind = eget(event::TYPE).and_then(Value::as_u64).unwrap_or(0);
            let mut is_flow = false;
            for (f, v) in &ev {
                if let Some(id) = v.as_u64() {
                    if *f == event::FLOW_IDS {
                        c.flow_starts.insert(id, track);
                        is_flow = true;
                    } else if *f == event::TERMINATING_FLOW_IDS {
                        c.flow_ends.insert(id, track);
                        is_flow = true;
                    }
                }
            }
            match kind {
                event::TYPE_SLICE_BEGIN => {
                    *c.slices.entry(track).or_default() += 1;
                    let name = eget(event::NAME)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    *c.slice_names.entry(name).or_default() += 1;
                }
                event::TYPE_INSTANT if !is_flow => c.instants += 1,
                event::TYPE_COUNTER => *c.counters.entry(track).or_default() += 1,
                _ => {}
            }
        }
    }
    Ok(c)
}
