//! Perfetto protobuf export: a `Trace` of `TracePacket`s with one process track per endpoint,
//! kernel-slice thread tracks per endpoint (`<endpoint> kernels`, then `kernels 2`, ... when
//! spans overlap), transfer tracks per endpoint (a `send` slice from post to the sender's
//! completion, a `recv` slice from post to arrival, joined by a flow), counter tracks for the perf
//! lanes and recorded counters, and per OS thread with perf software records or eBPF events a
//! thread track holding its off-CPU intervals and slow syscalls as slices and the rest
//! (context switches, page faults, migrations, ...) as instants.
//!
//! The encoding follows Perfetto's TrackEvent docs for compact traces:
//! - every track's events are one packet sequence (`trusted_packet_sequence_id`) whose first
//!   packet sets `SEQ_INCREMENTAL_STATE_CLEARED`, `TracePacketDefaults` (the track's uuid and
//!   the timestamp clock) and a `ClockSnapshot`; later packets set `SEQ_NEEDS_INCREMENTAL_STATE`;
//! - event names, categories and annotation names are interned per sequence (`InternedData`,
//!   then `name_iid` / `category_iids` / `name_iid`); names that are one-offs (labels with a
//!   duration in them) stay inline;
//! - timestamps are deltas on a sequence-scoped incremental clock (id 64) that the snapshot ties
//!   to `CLOCK_MONOTONIC` (a packet that would go back in time carries its absolute MONOTONIC
//!   timestamp instead), and every snapshot names MONOTONIC the trace's primary clock, so
//!   Perfetto shows slug's times as they were recorded;
//! - packets are written in batches of about 1 MiB deflated into `compressed_packets`, as
//!   Perfetto's own tracing service does.
//!
//! Field numbers are Perfetto's (protos/perfetto/trace/trace_packet.proto, clock_snapshot.proto,
//! trace_packet_defaults.proto, interned_data/interned_data.proto, track_event/*.proto); the
//! export test decodes the output with Perfetto's compiled protos. Flow ids are the transfer id
//! plus one, because Perfetto treats flow id 0 as absent.

use std::collections::HashMap;
use std::io::{Read, Write};

use crate::error::{Result, ViewerError};
use crate::export::ExportSummary;
use crate::export::proto::{Message, Value, decode};
use crate::export::walk::{
    Item, Lanes, ebpf_track_shape, mpi_numbers, mpi_of, software_categories, walk,
};
use crate::state::event::{EndpointIx, EventKind, TraceEvent, Transfer};
use crate::state::system;
use crate::state::{event::Nanos, source::TraceSource};

/// `Trace.packet`.
const TRACE_PACKET: u32 = 1;
/// `TracePacket` fields.
mod packet {
    pub const CLOCK_SNAPSHOT: u32 = 6;
    pub const TIMESTAMP: u32 = 8;
    pub const TRUSTED_PACKET_SEQUENCE_ID: u32 = 10;
    pub const TRACK_EVENT: u32 = 11;
    pub const INTERNED_DATA: u32 = 12;
    pub const SEQUENCE_FLAGS: u32 = 13;
    pub const COMPRESSED_PACKETS: u32 = 50;
    pub const TIMESTAMP_CLOCK_ID: u32 = 58;
    pub const TRACE_PACKET_DEFAULTS: u32 = 59;
    pub const TRACK_DESCRIPTOR: u32 = 60;
    /// `SequenceFlags`.
    pub const SEQ_INCREMENTAL_STATE_CLEARED: u64 = 1;
    pub const SEQ_NEEDS_INCREMENTAL_STATE: u64 = 2;
}
/// `TracePacketDefaults` and `TrackEventDefaults` fields.
mod defaults {
    pub const TIMESTAMP_CLOCK_ID: u32 = 58;
    pub const TRACK_EVENT_DEFAULTS: u32 = 11;
    pub const TRACK_UUID: u32 = 11;
}
/// `ClockSnapshot` and `ClockSnapshot.Clock` fields and clock ids.
mod clock {
    pub const CLOCKS: u32 = 1;
    pub const PRIMARY_TRACE_CLOCK: u32 = 2;
    pub const CLOCK_ID: u32 = 1;
    pub const TIMESTAMP: u32 = 2;
    pub const IS_INCREMENTAL: u32 = 3;
    /// `BUILTIN_CLOCK_MONOTONIC`: slug's timestamps (the trace-global clock is the nodes'
    /// CLOCK_MONOTONIC moved by their manifest offsets).
    pub const MONOTONIC: u64 = 3;
    /// The first sequence-scoped clock id: each track sequence's incremental clock.
    pub const SEQUENCE_CLOCK: u64 = 64;
}
/// `InternedData` fields (`EventCategory`, `EventName` and `DebugAnnotationName` are each
/// `{iid = 1, name = 2}`).
mod interned {
    pub const IID: u32 = 1;
    pub const NAME: u32 = 2;
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
/// `TrackEvent` and `DebugAnnotation` fields and event types.
mod event {
    pub const CATEGORY_IIDS: u32 = 3;
    pub const DEBUG_ANNOTATIONS: u32 = 4;
    pub const TYPE: u32 = 9;
    pub const NAME_IID: u32 = 10;
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
    /// `DebugAnnotation.name_iid` / `.name` / `.uint_value` / `.string_value`.
    pub const ANNOTATION_NAME_IID: u32 = 1;
    pub const ANNOTATION_NAME: u32 = 10;
    pub const ANNOTATION_UINT: u32 = 3;
    pub const ANNOTATION_STRING: u32 = 6;
}

/// The sequence of the track descriptors (and the first clock snapshot).
const META_SEQUENCE: u32 = 1;
/// Packet bytes deflated into one `compressed_packets`.
const BATCH_BYTES: usize = 1 << 20;
/// Most bytes one `compressed_packets` may inflate to when read back.
const MAX_INFLATED_BATCH: u64 = 256 << 20;

const TRANSFERS_TRACK: u64 = 0xffff_0000;
const COUNTER_TRACK: u64 = 0xfffe_0000;
/// OS thread tracks: this bit plus (tid << 4 | lane); tids are below 2^22 on Linux.
const OS_THREAD_TRACK: u64 = 0x4000_0000;

fn endpoint_uuid(ep: EndpointIx) -> u64 {
    (ep as u64 + 1) << 32
}

fn pid(ep: EndpointIx) -> u64 {
    ep as u64 + 1
}

/// The thread id of an endpoint's kernels lane: above Linux's largest tid (2^22), so it never
/// names a real thread of the OS thread tracks, and unique over the trace.
fn kernels_tid(ep: EndpointIx, lane: usize) -> u64 {
    (1 << 22) + ep as u64 * Lanes::MAX as u64 + lane as u64
}

/// A track's name with its lane: `kernels`, `kernels 2`, ...
fn laned(name: &str, lane: usize) -> String {
    if lane == 0 {
        name.to_string()
    } else {
        format!("{name} {}", lane + 1)
    }
}

/// What a track is, for its descriptor.
#[derive(Clone, Debug)]
enum TrackKind {
    Endpoint,
    Kernels(usize),
    OsThread(u32, usize),
    Transfers(usize),
    Counter(String),
}

/// An annotation of a track event: name, then value.
enum Ann<'a> {
    Uint(&'a str, u64),
    Str(&'a str, &'a str),
}

/// A track event to write.
struct Ev<'a> {
    ty: u64,
    cats: Option<&'a str>,
    /// The name, and whether to intern it (only names from small sets: kernels, kinds).
    name: Option<(&'a str, bool)>,
    anns: &'a [Ann<'a>],
    /// `FLOW_IDS` or `TERMINATING_FLOW_IDS`, and the id.
    flow: Option<(u32, u64)>,
    counter: Option<f64>,
}

impl Ev<'_> {
    const END: Ev<'static> = Ev {
        ty: event::TYPE_SLICE_END,
        cats: None,
        name: None,
        anns: &[],
        flow: None,
        counter: None,
    };
}

/// Interned strings of one sequence: categories, event names, annotation names.
#[derive(Default)]
struct Seq {
    id: u32,
    /// Last timestamp on the sequence's incremental clock.
    last_ts: Nanos,
    tables: [HashMap<Box<str>, u64>; 3],
}

/// `InternedData` field of each table of [`Seq::tables`].
const TABLE_FIELDS: [u32; 3] = [1, 2, 3];

impl Seq {
    /// The iid of `s` in table `t`; a new one is added to `interned` for this packet.
    fn intern(&mut self, t: usize, s: &str, interned: &mut Message) -> u64 {
        if let Some(&iid) = self.tables[t].get(s) {
            return iid;
        }
        let iid = self.tables[t].len() as u64 + 1;
        self.tables[t].insert(s.into(), iid);
        interned.string_varint_pair(TABLE_FIELDS[t], interned::NAME, s, interned::IID, iid);
        iid
    }
}

/// Frames packets into batches and deflates each batch into one `compressed_packets` packet.
struct Sink<'a> {
    out: &'a mut dyn Write,
    batch: Vec<u8>,
    compress: bool,
    raw_bytes: u64,
}

impl Sink<'_> {
    fn io(e: std::io::Error) -> ViewerError {
        ViewerError::io("the Perfetto output", e)
    }

    fn packet(&mut self, p: &Message) -> Result<()> {
        let head = p.framing(TRACE_PACKET);
        self.raw_bytes += (head.len() + p.as_bytes().len()) as u64;
        if !self.compress {
            self.out.write_all(&head).map_err(Self::io)?;
            return self.out.write_all(p.as_bytes()).map_err(Self::io);
        }
        self.batch.extend_from_slice(&head);
        self.batch.extend_from_slice(p.as_bytes());
        if self.batch.len() >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let mut z = flate2::write::ZlibEncoder::new(
            Vec::with_capacity(self.batch.len() / 4),
            // Level 2: on the 10M-event synthetic trace's packets (zlib-rs, 100 MB sample) it
            // deflates 4.9x at ~100 MB/s; level 1 only 3.8x, level 5 5.9x at ~40 MB/s.
            flate2::Compression::new(2),
        );
        z.write_all(&self.batch).map_err(Self::io)?;
        let deflated = z.finish().map_err(Self::io)?;
        self.batch.clear();
        let mut outer = Message::new();
        outer.bytes(packet::COMPRESSED_PACKETS, &deflated);
        self.out
            .write_all(&outer.framing(TRACE_PACKET))
            .map_err(Self::io)?;
        self.out.write_all(outer.as_bytes()).map_err(Self::io)
    }
}

struct Writer<'a> {
    sink: Sink<'a>,
    source: &'a dyn TraceSource,
    /// Track uuid → index in `seqs` once the track has had an event; declared tracks map to
    /// `None` until then.
    tracks: HashMap<u64, Option<usize>>,
    seqs: Vec<Seq>,
    counter_ids: HashMap<(EndpointIx, String), u64>,
    kernel_lanes: Vec<Lanes>,
    transfer_lanes: Vec<Lanes>,
    thread_lanes: HashMap<(EndpointIx, u32), Lanes>,
    summary: ExportSummary,
    /// Reused buffers, so an event allocates nothing.
    event: Message,
    packet: Message,
    interned: Message,
    scratch: Message,
}

impl Writer<'_> {
    fn name(&self, ep: EndpointIx) -> String {
        self.source
            .endpoints()
            .get(ep)
            .map_or_else(|| format!("endpoint {ep}"), |e| e.name.clone())
    }

    /// The clock snapshot every sequence starts with: its incremental clock and MONOTONIC both
    /// at 0, MONOTONIC the trace's primary clock.
    fn clock_snapshot(with_sequence_clock: bool) -> Message {
        let mut s = Message::new();
        if with_sequence_clock {
            let mut c = Message::new();
            c.varint(clock::CLOCK_ID, clock::SEQUENCE_CLOCK)
                .varint(clock::TIMESTAMP, 0)
                .varint(clock::IS_INCREMENTAL, 1);
            s.message(clock::CLOCKS, &c);
        }
        let mut m = Message::new();
        m.varint(clock::CLOCK_ID, clock::MONOTONIC)
            .varint(clock::TIMESTAMP, 0);
        s.message(clock::CLOCKS, &m)
            .varint(clock::PRIMARY_TRACE_CLOCK, clock::MONOTONIC);
        s
    }

    /// Declares a track the first time it is named and returns its uuid.
    fn track(&mut self, ep: EndpointIx, kind: TrackKind) -> Result<u64> {
        let base = endpoint_uuid(ep);
        let uuid = match &kind {
            TrackKind::Endpoint => base,
            TrackKind::Kernels(lane) => base | (1 + *lane as u64),
            TrackKind::OsThread(tid, lane) => {
                base | OS_THREAD_TRACK | (u64::from(*tid & 0x3f_ffff) << 4) | *lane as u64
            }
            TrackKind::Transfers(lane) => base | TRANSFERS_TRACK | *lane as u64,
            TrackKind::Counter(name) => {
                let next = self.counter_ids.len() as u64;
                base | COUNTER_TRACK | *self.counter_ids.entry((ep, name.clone())).or_insert(next)
            }
        };
        if self.tracks.contains_key(&uuid) {
            return Ok(uuid);
        }
        if !matches!(kind, TrackKind::Endpoint) {
            self.track(ep, TrackKind::Endpoint)?;
        }
        self.tracks.insert(uuid, None);
        let ep_name = self.name(ep);
        let mut d = Message::new();
        d.varint(track::UUID, uuid);
        match kind {
            TrackKind::Endpoint => {
                let mut p = Message::new();
                p.varint(track::PROCESS_PID, pid(ep))
                    .string(track::PROCESS_NAME, &ep_name);
                d.string(track::NAME, &ep_name).message(track::PROCESS, &p);
            }
            TrackKind::Kernels(lane) => {
                let mut th = Message::new();
                th.varint(track::THREAD_PID, pid(ep))
                    .varint(track::THREAD_TID, kernels_tid(ep, lane))
                    .string(
                        track::THREAD_NAME,
                        &laned(&format!("{ep_name} kernels"), lane),
                    );
                d.varint(track::PARENT_UUID, base)
                    .message(track::THREAD, &th);
            }
            // A named track, not a ThreadDescriptor: tids repeat across nodes (and tid 0 across
            // every process), and Perfetto merges the threads a tid names.
            TrackKind::OsThread(tid, lane) => {
                d.varint(track::PARENT_UUID, base).string(
                    track::NAME,
                    &laned(&format!("{ep_name} thread {tid}"), lane),
                );
            }
            TrackKind::Transfers(lane) => {
                d.varint(track::PARENT_UUID, base)
                    .string(track::NAME, &laned("transfers", lane));
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
        p.varint(packet::TRUSTED_PACKET_SEQUENCE_ID, u64::from(META_SEQUENCE))
            .message(packet::TRACK_DESCRIPTOR, &d);
        self.sink.packet(&p)?;
        Ok(uuid)
    }

    /// The sequence of track `uuid`, started (state cleared, defaults, clock) on first use.
    fn sequence(&mut self, uuid: u64) -> Result<usize> {
        if let Some(Some(i)) = self.tracks.get(&uuid) {
            return Ok(*i);
        }
        let i = self.seqs.len();
        let id = META_SEQUENCE + 1 + i as u32;
        self.seqs.push(Seq {
            id,
            ..Seq::default()
        });
        self.tracks.insert(uuid, Some(i));
        let mut track_defaults = Message::new();
        track_defaults.varint(defaults::TRACK_UUID, uuid);
        let mut d = Message::new();
        d.varint(defaults::TIMESTAMP_CLOCK_ID, clock::SEQUENCE_CLOCK)
            .message(defaults::TRACK_EVENT_DEFAULTS, &track_defaults);
        let mut p = Message::new();
        p.varint(packet::TRUSTED_PACKET_SEQUENCE_ID, u64::from(id))
            .varint(
                packet::SEQUENCE_FLAGS,
                packet::SEQ_INCREMENTAL_STATE_CLEARED,
            )
            .message(packet::TRACE_PACKET_DEFAULTS, &d)
            .message(packet::CLOCK_SNAPSHOT, &Self::clock_snapshot(true));
        self.sink.packet(&p)?;
        Ok(i)
    }

    /// Writes one track event on track `uuid` at `ts`.
    fn emit(&mut self, uuid: u64, ts: Nanos, ev: &Ev<'_>) -> Result<()> {
        let si = self.sequence(uuid)?;
        let seq = &mut self.seqs[si];
        let (e, interned, scratch) = (&mut self.event, &mut self.interned, &mut self.scratch);
        e.clear();
        interned.clear();
        e.varint(event::TYPE, ev.ty);
        if let Some(cats) = ev.cats {
            e.varint(event::CATEGORY_IIDS, seq.intern(0, cats, interned));
        }
        match ev.name {
            Some((name, true)) => {
                e.varint(event::NAME_IID, seq.intern(1, name, interned));
            }
            Some((name, false)) => {
                e.string(event::NAME, name);
            }
            None => {}
        }
        for ann in ev.anns {
            scratch.clear();
            let (name, value) = match ann {
                Ann::Uint(n, v) => (n, Ok(*v)),
                Ann::Str(n, s) => (n, Err(*s)),
            };
            scratch.varint(event::ANNOTATION_NAME_IID, seq.intern(2, name, interned));
            match value {
                Ok(v) => scratch.varint(event::ANNOTATION_UINT, v),
                Err(s) => scratch.string(event::ANNOTATION_STRING, s),
            };
            e.message(event::DEBUG_ANNOTATIONS, scratch);
        }
        if let Some((field, id)) = ev.flow {
            e.fixed64(field, id);
        }
        if let Some(v) = ev.counter {
            e.double(event::DOUBLE_COUNTER_VALUE, v);
        }
        let p = &mut self.packet;
        p.clear();
        p.varint(packet::TRUSTED_PACKET_SEQUENCE_ID, u64::from(seq.id))
            .varint(packet::SEQUENCE_FLAGS, packet::SEQ_NEEDS_INCREMENTAL_STATE);
        if ts >= seq.last_ts {
            p.varint(packet::TIMESTAMP, ts - seq.last_ts);
            seq.last_ts = ts;
        } else {
            // Back in time on this track (a log out of order): absolute, on MONOTONIC.
            p.varint(packet::TIMESTAMP, ts)
                .varint(packet::TIMESTAMP_CLOCK_ID, clock::MONOTONIC);
        }
        if !interned.as_bytes().is_empty() {
            p.message(packet::INTERNED_DATA, interned);
        }
        p.message(packet::TRACK_EVENT, e);
        let p = std::mem::take(&mut self.packet);
        let r = self.sink.packet(&p);
        self.packet = p;
        r
    }

    fn slice(&mut self, uuid: u64, start: Nanos, end: Nanos, begin: &Ev<'_>) -> Result<()> {
        self.emit(uuid, start, begin)?;
        self.emit(uuid, end.max(start), &Ev::END)
    }

    fn instant(&mut self, ep: EndpointIx, ts: Nanos, cats: &str, name: &str) -> Result<()> {
        let uuid = self.track(ep, TrackKind::Endpoint)?;
        self.summary.instants += 1;
        let ev = Ev {
            ty: event::TYPE_INSTANT,
            cats: Some(cats),
            name: Some((name, false)),
            ..Ev::END
        };
        self.emit(uuid, ts, &ev)
    }

    fn counter(&mut self, ep: EndpointIx, name: &str, ts: Nanos, value: f64) -> Result<()> {
        let uuid = self.track(ep, TrackKind::Counter(name.to_string()))?;
        self.summary.counters += 1;
        let ev = Ev {
            ty: event::TYPE_COUNTER,
            counter: Some(value),
            ..Ev::END
        };
        self.emit(uuid, ts, &ev)
    }

    /// One end of a transfer: a slice from post to this end's completion on the end's
    /// transfers track, starting (send) or terminating (recv) the transfer's flow.
    fn transfer(&mut self, x: &Transfer, send: bool) -> Result<()> {
        let ep = if send { x.src } else { x.dst };
        let (start, end) = (x.post(), x.complete().max(x.post()));
        let Some(lanes) = self.transfer_lanes.get_mut(ep) else {
            return Ok(());
        };
        let lane = lanes.place(start, end);
        let uuid = self.track(ep, TrackKind::Transfers(lane))?;
        if send {
            self.summary.flows += 1;
        }
        let key = slug_schema::TransferKey::unpack(x.id()).to_string();
        let mut anns = Vec::with_capacity(9);
        anns.extend([
            Ann::Str("transfer", &key),
            Ann::Uint("bytes", x.bytes()),
            Ann::Uint("id", x.id()),
            Ann::Str("transport", x.record.transport.name()),
        ]);
        let mpi = mpi_of(self.source.mpi(), x);
        if let Some(m) = &mpi {
            anns.push(Ann::Str("communicator", m.communicator));
            let (numbers, n) = mpi_numbers(m);
            anns.extend(numbers[..n].iter().map(|&(k, v)| Ann::Uint(k, v)));
        }
        let ev = Ev {
            ty: event::TYPE_SLICE_BEGIN,
            cats: Some(EventKind::Transfer.name()),
            name: Some((if send { "send" } else { "recv" }, true)),
            anns: &anns,
            flow: Some((
                if send {
                    event::FLOW_IDS
                } else {
                    event::TERMINATING_FLOW_IDS
                },
                x.id().wrapping_add(1),
            )),
            counter: None,
        };
        self.slice(uuid, start, end, &ev)
    }

    /// A perf software record or eBPF event on its OS thread's track.
    fn system(
        &mut self,
        ep: EndpointIx,
        tid: u32,
        (start, end, instant): (Nanos, Nanos, bool),
        cats: &str,
        (name, intern): (&str, bool),
        fields: &[(&'static str, String)],
    ) -> Result<()> {
        let lane = if instant {
            0
        } else {
            self.thread_lanes
                .entry((ep, tid))
                .or_default()
                .place(start, end)
        };
        let uuid = self.track(ep, TrackKind::OsThread(tid, lane))?;
        self.summary.system += 1;
        let anns: Vec<Ann<'_>> = fields.iter().map(|(k, v)| Ann::Str(k, v)).collect();
        let ev = Ev {
            ty: if instant {
                event::TYPE_INSTANT
            } else {
                event::TYPE_SLICE_BEGIN
            },
            cats: Some(cats),
            name: Some((name, intern)),
            anns: &anns,
            flow: None,
            counter: None,
        };
        if instant {
            self.emit(uuid, start, &ev)
        } else {
            self.slice(uuid, start, end, &ev)
        }
    }

    fn item(&mut self, item: Item<'_>) -> Result<()> {
        match item {
            Item::Send(x) => self.transfer(x, true),
            Item::Recv(x) => self.transfer(x, false),
            Item::Lane(ep, name, ts, v) => self.counter(ep, name, ts, v),
            Item::Event(ep, e) => match e {
                TraceEvent::KernelSpan(k) => {
                    let end = k.end_ns.max(k.start_ns);
                    let Some(lanes) = self.kernel_lanes.get_mut(ep) else {
                        return Ok(());
                    };
                    let lane = lanes.place(k.start_ns, end);
                    let uuid = self.track(ep, TrackKind::Kernels(lane))?;
                    self.summary.slices += 1;
                    let names = self.source.names();
                    let mut anns = [
                        Ann::Uint("step", k.step),
                        Ann::Uint("seq", u64::from(k.seq)),
                        Ann::Uint("layer", 0),
                    ];
                    // A kernel outside every layer (embedding, head, argmax) has no `layer`.
                    let n = match k.layer {
                        Some(layer) => {
                            anns[2] = Ann::Uint("layer", u64::from(layer));
                            3
                        }
                        None => 2,
                    };
                    let ev = Ev {
                        ty: event::TYPE_SLICE_BEGIN,
                        cats: Some(EventKind::KernelSpan.name()),
                        name: Some((names.get(k.kernel), true)),
                        anns: &anns[..n],
                        flow: None,
                        counter: None,
                    };
                    self.slice(uuid, k.start_ns, end, &ev)
                }
                TraceEvent::Counter(c) => {
                    let name = self.source.names().get(c.name).to_string();
                    self.counter(ep, &name, c.ns, c.value as f64)
                }
                TraceEvent::Ebpf(s) => {
                    let (cats, instant) = ebpf_track_shape(s.kind);
                    let mut fields = Vec::new();
                    system::describe_ebpf(s, &mut fields);
                    // Slices' labels carry their duration: one-offs, not interned.
                    let (label, intern) = match s.kind {
                        slug_schema::EbpfKind::PageFault
                        | slug_schema::EbpfKind::TcpRetransmit
                        | slug_schema::EbpfKind::TcpDrop => (s.kind.name().to_string(), true),
                        _ => (system::ebpf_label(s), false),
                    };
                    self.system(
                        ep,
                        s.tid,
                        (s.ns, s.end_ns(), instant),
                        cats,
                        (&label, intern),
                        &fields,
                    )
                }
                TraceEvent::PerfSoftware(s) => {
                    let mut fields = Vec::new();
                    system::describe_software(s, &mut fields);
                    self.system(
                        ep,
                        s.tid,
                        (s.ns, s.ns, true),
                        software_categories(s.kind),
                        (s.kind.name(), true),
                        &fields,
                    )
                }
                // Lanes already carry samples and PT volume as counters.
                TraceEvent::PerfSample(_) | TraceEvent::PtChunk(_) | TraceEvent::Transfer(_) => {
                    Ok(())
                }
                TraceEvent::Migration(m) => {
                    let uuid = self.track(ep, TrackKind::Endpoint)?;
                    self.summary.instants += 1;
                    let (r, label) = (m.record, e.label(self.source.names()));
                    let anns = [
                        Ann::Uint("stage", u64::from(r.stage)),
                        Ann::Uint("step", r.step),
                        Ann::Uint("move", u64::from(r.index)),
                        Ann::Str("role", m.role()),
                        Ann::Uint("peer_endpoint", u64::from(r.peer)),
                    ];
                    let ev = Ev {
                        ty: event::TYPE_INSTANT,
                        cats: Some(EventKind::Migration.name()),
                        name: Some((&label, false)),
                        anns: &anns,
                        ..Ev::END
                    };
                    self.emit(uuid, r.ns, &ev)
                }
                TraceEvent::StepBoundary(_)
                | TraceEvent::Snapshot(_)
                | TraceEvent::LostEvents(_)
                | TraceEvent::Marker(_) => {
                    let label = e.label(self.source.names());
                    self.instant(ep, e.start(), e.kind().name(), &label)
                }
            },
        }
    }
}

/// Writes `source` as a Perfetto protobuf trace, its packets deflated in batches.
pub fn write(source: &dyn TraceSource, out: &mut dyn Write) -> Result<ExportSummary> {
    write_with(source, out, true)
}

/// [`write`], choosing whether to deflate the packets (`compress = false` writes plain packets,
/// for tools that cannot inflate `compressed_packets`).
pub fn write_with(
    source: &dyn TraceSource,
    out: &mut dyn Write,
    compress: bool,
) -> Result<ExportSummary> {
    let endpoints = source.endpoints().len();
    let mut w = Writer {
        sink: Sink {
            out,
            batch: Vec::with_capacity(BATCH_BYTES + (64 << 10)),
            compress,
            raw_bytes: 0,
        },
        source,
        tracks: HashMap::new(),
        seqs: Vec::new(),
        counter_ids: HashMap::new(),
        kernel_lanes: (0..endpoints).map(|_| Lanes::default()).collect(),
        transfer_lanes: (0..endpoints).map(|_| Lanes::default()).collect(),
        thread_lanes: HashMap::new(),
        summary: ExportSummary::default(),
        event: Message::new(),
        packet: Message::new(),
        interned: Message::new(),
        scratch: Message::new(),
    };
    // The first packet: MONOTONIC is the trace's clock.
    let mut first = Message::new();
    first
        .varint(packet::TRUSTED_PACKET_SEQUENCE_ID, u64::from(META_SEQUENCE))
        .varint(
            packet::SEQUENCE_FLAGS,
            packet::SEQ_INCREMENTAL_STATE_CLEARED,
        )
        .message(packet::CLOCK_SNAPSHOT, &Writer::clock_snapshot(false));
    w.sink.packet(&first)?;
    for ep in 0..endpoints {
        w.track(ep, TrackKind::Endpoint)?;
    }
    let unreadable = walk(source, |item| w.item(item))?;
    w.sink.flush()?;
    Ok(ExportSummary {
        unreadable_frames: unreadable,
        uncompressed_bytes: w.sink.raw_bytes,
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

/// What a Perfetto trace holds, read back for checking an export: sequence defaults, interned
/// names and incremental timestamps resolved as Perfetto resolves them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PerfettoContents {
    /// Tracks by uuid.
    pub tracks: HashMap<u64, TrackRecord>,
    /// Slices begun per track uuid.
    pub slices: HashMap<u64, u64>,
    /// Slice names and how often each appears.
    pub slice_names: HashMap<String, u64>,
    /// Categories of slices and instants and how often each appears.
    pub categories: HashMap<String, u64>,
    /// Annotation names on slice begins and instants and how often each appears.
    pub annotations: HashMap<String, u64>,
    /// Flow id → track of the event that starts it.
    pub flow_starts: HashMap<u64, u64>,
    /// Flow id → track of the event that terminates it.
    pub flow_ends: HashMap<u64, u64>,
    /// Counter values per track uuid.
    pub counters: HashMap<u64, u64>,
    /// Instant events per track uuid.
    pub instants: HashMap<u64, u64>,
    /// The primary trace clock a clock snapshot named, if one did.
    pub primary_clock: Option<u64>,
    /// `compressed_packets` packets inflated.
    pub compressed_batches: u64,
    /// Whether every track event had a timestamp, a sequence whose state was cleared first, a
    /// track, and interned ids its sequence defined.
    pub well_formed: bool,
    /// Whether, on every track, each slice end closes a slice begun before it (in time order,
    /// ties in file order) and no slice is left open.
    pub balanced: bool,
}

/// Per-sequence state while reading.
#[derive(Default)]
struct ReadSeq {
    cleared: bool,
    default_track: Option<u64>,
    clock: Option<u64>,
    incremental: HashMap<u64, u64>,
    tables: [HashMap<u64, String>; 3],
}

struct Reader {
    c: PerfettoContents,
    seqs: HashMap<u64, ReadSeq>,
    /// Per track: (time, file order, +1 begin / -1 end).
    edges: HashMap<u64, Vec<(u64, u64, i8)>>,
    order: u64,
}

fn field<'a>(fields: &[(u32, Value<'a>)], n: u32) -> Option<Value<'a>> {
    fields.iter().find(|(f, _)| *f == n).map(|(_, v)| *v)
}

fn nested_name(fields: &[(u32, Value<'_>)], n: u32, name_field: u32) -> Result<Option<String>> {
    match field(fields, n).and_then(Value::as_bytes) {
        Some(b) => Ok(field(&decode(b)?, name_field)
            .and_then(Value::as_str)
            .map(str::to_string)),
        None => Ok(None),
    }
}

impl Reader {
    fn trace(&mut self, data: &[u8]) -> Result<()> {
        for (f, value) in decode(data)? {
            if let Some(p) = value.as_bytes().filter(|_| f == TRACE_PACKET) {
                self.packet(p)?;
            }
        }
        Ok(())
    }

    fn packet(&mut self, bytes: &[u8]) -> Result<()> {
        let fields = decode(bytes)?;
        if let Some(z) = field(&fields, packet::COMPRESSED_PACKETS).and_then(Value::as_bytes) {
            let mut inflated = Vec::new();
            flate2::read::ZlibDecoder::new(z)
                .take(MAX_INFLATED_BATCH)
                .read_to_end(&mut inflated)
                .map_err(|e| ViewerError::io("compressed_packets", e))?;
            self.c.compressed_batches += 1;
            return self.trace(&inflated);
        }
        let seq_id = field(&fields, packet::TRUSTED_PACKET_SEQUENCE_ID).and_then(Value::as_u64);
        let Some(seq_id) = seq_id else {
            self.c.well_formed = false;
            return Ok(());
        };
        let seq = self.seqs.entry(seq_id).or_default();
        let flags = field(&fields, packet::SEQUENCE_FLAGS)
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if flags & packet::SEQ_INCREMENTAL_STATE_CLEARED != 0 {
            *seq = ReadSeq {
                cleared: true,
                ..ReadSeq::default()
            };
        }
        if let Some(d) = field(&fields, packet::TRACE_PACKET_DEFAULTS).and_then(Value::as_bytes) {
            let d = decode(d)?;
            seq.clock = field(&d, defaults::TIMESTAMP_CLOCK_ID).and_then(Value::as_u64);
            if let Some(t) = field(&d, defaults::TRACK_EVENT_DEFAULTS).and_then(Value::as_bytes) {
                seq.default_track =
                    field(&decode(t)?, defaults::TRACK_UUID).and_then(Value::as_u64);
            }
        }
        if let Some(i) = field(&fields, packet::INTERNED_DATA).and_then(Value::as_bytes) {
            for (f, v) in decode(i)? {
                let Some(t) = TABLE_FIELDS.iter().position(|x| *x == f) else {
                    continue;
                };
                let entry = decode(v.as_bytes().unwrap_or_default())?;
                let iid = field(&entry, interned::IID).and_then(Value::as_u64);
                let name = field(&entry, interned::NAME).and_then(Value::as_str);
                if let (Some(iid), Some(name)) = (iid, name) {
                    seq.tables[t].insert(iid, name.to_string());
                }
            }
        }
        if let Some(s) = field(&fields, packet::CLOCK_SNAPSHOT).and_then(Value::as_bytes) {
            let s = decode(s)?;
            if let Some(p) = field(&s, clock::PRIMARY_TRACE_CLOCK).and_then(Value::as_u64) {
                self.c.primary_clock = Some(p);
            }
            for (f, v) in &s {
                if *f != clock::CLOCKS {
                    continue;
                }
                let c = decode(v.as_bytes().unwrap_or_default())?;
                let id = field(&c, clock::CLOCK_ID).and_then(Value::as_u64);
                let inc = field(&c, clock::IS_INCREMENTAL).and_then(Value::as_u64) == Some(1);
                if let (Some(id), true) = (id, inc) {
                    let ts = field(&c, clock::TIMESTAMP)
                        .and_then(Value::as_u64)
                        .unwrap_or(0);
                    seq.incremental.insert(id, ts);
                }
            }
            return Ok(());
        }
        if let Some(d) = field(&fields, packet::TRACK_DESCRIPTOR).and_then(Value::as_bytes) {
            let d = decode(d)?;
            let name = field(&d, track::NAME)
                .and_then(Value::as_str)
                .map(str::to_string)
                .or(nested_name(&d, track::THREAD, track::THREAD_NAME)?)
                .or(nested_name(&d, track::PROCESS, track::PROCESS_NAME)?)
                .unwrap_or_default();
            let uuid = field(&d, track::UUID).and_then(Value::as_u64).unwrap_or(0);
            self.c.tracks.insert(
                uuid,
                TrackRecord {
                    name,
                    parent: field(&d, track::PARENT_UUID)
                        .and_then(Value::as_u64)
                        .unwrap_or(0),
                    counter: field(&d, track::COUNTER).is_some(),
                },
            );
        }
        let Some(ev) = field(&fields, packet::TRACK_EVENT).and_then(Value::as_bytes) else {
            return Ok(());
        };
        let seq_cleared = seq.cleared;
        // The timestamp, resolved as Perfetto does: the packet's clock, else the sequence's.
        let clock_id = field(&fields, packet::TIMESTAMP_CLOCK_ID)
            .and_then(Value::as_u64)
            .or(seq.clock);
        let ts = match field(&fields, packet::TIMESTAMP).and_then(Value::as_u64) {
            None => None,
            Some(t) => match clock_id.and_then(|c| seq.incremental.get_mut(&c)) {
                Some(last) => {
                    *last = last.wrapping_add(t);
                    Some(*last)
                }
                None => Some(t),
            },
        };
        let ev = decode(ev)?;
        let track = field(&ev, event::TRACK_UUID)
            .and_then(Value::as_u64)
            .or(seq.default_track);
        let resolve = |t: usize, iid: Option<u64>| iid.and_then(|i| seq.tables[t].get(&i).cloned());
        let mut ok = ts.is_some() && seq_cleared && track.is_some();
        let name = match field(&ev, event::NAME_IID).and_then(Value::as_u64) {
            Some(iid) => {
                let n = resolve(1, Some(iid));
                ok &= n.is_some();
                n
            }
            None => field(&ev, event::NAME)
                .and_then(Value::as_str)
                .map(str::to_string),
        };
        let mut cats = Vec::new();
        let mut anns = Vec::new();
        let mut flows = Vec::new();
        for (f, v) in &ev {
            match *f {
                event::CATEGORY_IIDS => {
                    let c = resolve(0, v.as_u64());
                    ok &= c.is_some();
                    cats.extend(c);
                }
                event::CATEGORIES => cats.extend(v.as_str().map(str::to_string)),
                event::DEBUG_ANNOTATIONS => {
                    let a = decode(v.as_bytes().unwrap_or_default())?;
                    let n = match field(&a, event::ANNOTATION_NAME_IID).and_then(Value::as_u64) {
                        Some(iid) => resolve(2, Some(iid)),
                        None => field(&a, event::ANNOTATION_NAME)
                            .and_then(Value::as_str)
                            .map(str::to_string),
                    };
                    ok &= n.is_some();
                    anns.extend(n);
                }
                event::FLOW_IDS | event::TERMINATING_FLOW_IDS => {
                    flows.extend(v.as_u64().map(|id| (*f, id)));
                }
                _ => {}
            }
        }
        if !ok {
            self.c.well_formed = false;
        }
        let track = track.unwrap_or(0);
        let ts = ts.unwrap_or(0);
        for (f, id) in flows {
            let map = if f == event::FLOW_IDS {
                &mut self.c.flow_starts
            } else {
                &mut self.c.flow_ends
            };
            map.insert(id, track);
        }
        let kind = field(&ev, event::TYPE).and_then(Value::as_u64).unwrap_or(0);
        if matches!(kind, event::TYPE_SLICE_BEGIN | event::TYPE_INSTANT) {
            for c in cats {
                *self.c.categories.entry(c).or_default() += 1;
            }
            for a in anns {
                *self.c.annotations.entry(a).or_default() += 1;
            }
        }
        self.order += 1;
        match kind {
            event::TYPE_SLICE_BEGIN => {
                *self.c.slices.entry(track).or_default() += 1;
                *self
                    .c
                    .slice_names
                    .entry(name.unwrap_or_default())
                    .or_default() += 1;
                self.edges
                    .entry(track)
                    .or_default()
                    .push((ts, self.order, 1));
            }
            event::TYPE_SLICE_END => {
                self.edges
                    .entry(track)
                    .or_default()
                    .push((ts, self.order, -1));
            }
            event::TYPE_INSTANT => *self.c.instants.entry(track).or_default() += 1,
            event::TYPE_COUNTER => *self.c.counters.entry(track).or_default() += 1,
            _ => {}
        }
        Ok(())
    }
}

/// The trace with every `compressed_packets` inflated into the plain packets it holds (each at
/// most 256 MiB), for tools that read packets byte by byte.
pub fn inflate(data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() * 4);
    for (f, value) in decode(data)? {
        let Some(p) = value.as_bytes().filter(|_| f == TRACE_PACKET) else {
            continue;
        };
        match field(&decode(p)?, packet::COMPRESSED_PACKETS).and_then(Value::as_bytes) {
            Some(z) => {
                flate2::read::ZlibDecoder::new(z)
                    .take(MAX_INFLATED_BATCH)
                    .read_to_end(&mut out)
                    .map_err(|e| ViewerError::io("compressed_packets", e))?;
            }
            None => {
                let mut m = Message::new();
                m.bytes(TRACE_PACKET, p);
                out.extend_from_slice(m.as_bytes());
            }
        }
    }
    Ok(out)
}

/// Decodes a Perfetto trace written by [`write`] (or any trace using the same fields),
/// inflating `compressed_packets` (each at most 256 MiB).
pub fn read(data: &[u8]) -> Result<PerfettoContents> {
    let mut r = Reader {
        c: PerfettoContents {
            well_formed: true,
            balanced: true,
            ..PerfettoContents::default()
        },
        seqs: HashMap::new(),
        edges: HashMap::new(),
        order: 0,
    };
    r.trace(data)?;
    for edges in r.edges.values_mut() {
        edges.sort_unstable();
        let mut depth = 0i64;
        for (_, _, d) in edges.iter() {
            depth += i64::from(*d);
            if depth < 0 {
                r.c.balanced = false;
            }
        }
        if depth != 0 {
            r.c.balanced = false;
        }
    }
    Ok(r.c)
}
