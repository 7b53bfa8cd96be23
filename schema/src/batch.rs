//! The columnar batch: events ⇄ the `Batch` capnp message that is one frame's payload.
//!
//! Every field of every kind is its own column (varints, zigzag deltas, fixed 16-byte hashes),
//! so a regular pipeline stream turns into long runs of near-identical bytes that zstd then
//! squeezes to a few bits per event. Layout of each column: `trace.capnp` and docs/FORMAT.md.

use std::collections::HashMap;

use capnp::message::{Builder, HeapAllocator, ReaderOptions};

use crate::event::{
    Counter, Direction, EbpfEvent, EbpfKind, Event, EventKind, KernelSpan, LostEvents, Marker,
    PerfSample, PerfSampleKind, PtChunk, SnapshotEvent, SoftwareKind, SoftwareRecord, StepBoundary,
    Transfer, Transport, layer_wire,
};
use crate::trace_capnp::batch;

/// Why a batch could not be decoded (the caller adds the file and frame offset).
#[derive(Debug)]
pub(crate) enum BatchError {
    /// The capnp message itself is malformed.
    Capnp(capnp::Error),
    /// The message is well-formed capnp but its columns do not add up.
    Columns(&'static str),
}

impl From<capnp::Error> for BatchError {
    fn from(e: capnp::Error) -> Self {
        BatchError::Capnp(e)
    }
}

impl From<capnp::NotInSchema> for BatchError {
    fn from(e: capnp::NotInSchema) -> Self {
        BatchError::Capnp(e.into())
    }
}

fn put_uvar(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Zigzag varint of the wrapping difference `v - prev`: any pair of u64 round-trips.
fn put_svar(out: &mut Vec<u8>, v: u64, prev: u64) {
    put_uvar(out, zigzag(v, prev));
}

fn zigzag(v: u64, prev: u64) -> u64 {
    let d = v.wrapping_sub(prev) as i64;
    ((d << 1) ^ (d >> 63)) as u64
}

fn unzigzag(z: u64, prev: u64) -> u64 {
    let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
    prev.wrapping_add(d as u64)
}

/// Byte-plane layout for timing columns: a plane of byte lengths (one per value: bytes needed,
/// 0..=8), then plane 0 (the lowest byte of every value with length > 0), plane 1, ... plane 7.
/// Keeping the noisy low bytes apart from the steady high bytes lets zstd code each near its
/// entropy, which a mixed varint stream does not.
fn put_planes(out: &mut Vec<u8>, values: &[u64]) {
    out.clear();
    let mut widest = 0;
    out.extend(values.iter().map(|&v| {
        let len = 8 - v.leading_zeros() as usize / 8;
        widest = widest.max(len);
        len as u8
    }));
    for plane in 0..widest {
        let shift = plane * 8;
        out.extend(
            values
                .iter()
                .filter(|&&v| v >> shift != 0)
                .map(|&v| (v >> shift) as u8),
        );
    }
}

fn put_h128(out: &mut Vec<u8>, v: u128) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A cursor over one column; every read is bounds-checked so hostile input only yields errors.
struct Col<'a> {
    data: &'a [u8],
    pos: usize,
    name: &'static str,
}

impl<'a> Col<'a> {
    fn new(data: &'a [u8], name: &'static str) -> Self {
        Col { data, pos: 0, name }
    }

    fn uvar(&mut self) -> Result<u64, BatchError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .data
                .get(self.pos)
                .ok_or(BatchError::Columns(self.name))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(BatchError::Columns(self.name))
    }

    fn u32(&mut self) -> Result<u32, BatchError> {
        u32::try_from(self.uvar()?).map_err(|_| BatchError::Columns(self.name))
    }

    fn svar(&mut self, prev: u64) -> Result<u64, BatchError> {
        Ok(unzigzag(self.uvar()?, prev))
    }

    fn u8(&mut self) -> Result<u8, BatchError> {
        let b = *self
            .data
            .get(self.pos)
            .ok_or(BatchError::Columns(self.name))?;
        self.pos += 1;
        Ok(b)
    }

    fn h128(&mut self) -> Result<u128, BatchError> {
        let bytes = self
            .data
            .get(self.pos..self.pos + 16)
            .ok_or(BatchError::Columns(self.name))?;
        self.pos += 16;
        let mut b = [0u8; 16];
        b.copy_from_slice(bytes);
        Ok(u128::from_le_bytes(b))
    }

    /// A column must be consumed exactly; leftovers mean the batch is inconsistent.
    fn finish(&self) -> Result<(), BatchError> {
        if self.pos == self.data.len() {
            Ok(())
        } else {
            Err(BatchError::Columns(self.name))
        }
    }
}

/// A cursor over a byte-plane column of `n` zigzag values (see [`put_planes`]).
struct Planes<'a> {
    lens: &'a [u8],
    planes: [&'a [u8]; 8],
    pos: [usize; 8],
    next: usize,
}

impl<'a> Planes<'a> {
    fn new(data: &'a [u8], n: usize, name: &'static str) -> Result<Self, BatchError> {
        let bad = BatchError::Columns(name);
        let lens = data.get(..n).ok_or(BatchError::Columns(name))?;
        let mut sizes = [0usize; 8];
        for &len in lens {
            if len > 8 {
                return Err(bad);
            }
            for size in sizes.iter_mut().take(usize::from(len)) {
                *size += 1;
            }
        }
        let mut planes: [&[u8]; 8] = [&[]; 8];
        let mut at = n;
        for (plane, size) in planes.iter_mut().zip(sizes) {
            *plane = data.get(at..at + size).ok_or(BatchError::Columns(name))?;
            at += size;
        }
        if at != data.len() {
            return Err(bad);
        }
        Ok(Planes {
            lens,
            planes,
            pos: [0; 8],
            next: 0,
        })
    }

    /// The next value; the constructor checked that every plane holds enough bytes.
    fn svar(&mut self, prev: u64) -> Result<u64, BatchError> {
        let len = usize::from(
            *self
                .lens
                .get(self.next)
                .ok_or(BatchError::Columns("planes"))?,
        );
        self.next += 1;
        let mut z = 0u64;
        for plane in 0..len {
            let byte = *self.planes[plane]
                .get(self.pos[plane])
                .ok_or(BatchError::Columns("planes"))?;
            self.pos[plane] += 1;
            z |= u64::from(byte) << (plane * 8);
        }
        Ok(unzigzag(z, prev))
    }
}

/// The "previous end" predictor of kernel span starts: the latest end of the spans since the
/// last span that was predicted from it (a group of spans that ran together, like one kernel
/// over all threads), so the next group is predicted from when the whole group finished.
fn next_span_end(current: u64, end_ns: u64, starts_group: bool) -> u64 {
    if starts_group {
        end_ns
    } else {
        current.max(end_ns)
    }
}

/// Column buffers, reused from frame to frame by the encoder.
#[derive(Debug, Default)]
pub(crate) struct Columns {
    kinds: Vec<u8>,
    times: Vec<u8>,
    /// Zigzag values of the byte-plane columns, serialized by `put_planes` at encode time.
    times_z: Vec<u64>,
    span_duration_z: Vec<u64>,
    transfer_duration_z: Vec<u64>,
    span_time_ref: Vec<u8>,
    /// The current transfer's time predictor (flags bit 5), set by `push` before its group.
    transfer_time_ref: bool,
    ks: [Vec<u8>; 10],
    tr: [Vec<u8>; 12],
    sb: [Vec<u8>; 2],
    sn: [Vec<u8>; 6],
    ps: [Vec<u8>; 7],
    pt: [Vec<u8>; 4],
    eb: [Vec<u8>; 7],
    sw: [Vec<u8>; 7],
    le: [Vec<u8>; 3],
    mk: [Vec<u8>; 1],
    ct: [Vec<u8>; 2],
}

/// Running "previous value" state of the delta-encoded columns.
#[derive(Default)]
struct Prev {
    /// Previous primary timestamp per kind: interleaved kinds do not disturb each other's deltas.
    time: [u64; EventKind::COUNT],
    span_step: u64,
    /// See [`next_span_end`].
    span_end: u64,
    transfer_id: u64,
    /// Version 2: previous duration of a span of the same (kernel, layer) in the batch.
    span_duration: HashMap<(u32, u32), u64>,
    /// Version 2: previous `completeNs - postNs` of a transfer of each direction (send, recv).
    transfer_duration: [u64; 2],
    boundary_step: u64,
    ip: u64,
    addr: u64,
    aux: u64,
}

impl Columns {
    fn clear(&mut self) {
        self.kinds.clear();
        self.times.clear();
        self.times_z.clear();
        self.span_duration_z.clear();
        self.transfer_duration_z.clear();
        self.span_time_ref.clear();
        for c in self
            .ks
            .iter_mut()
            .chain(&mut self.tr)
            .chain(&mut self.sb)
            .chain(&mut self.sn)
            .chain(&mut self.ps)
            .chain(&mut self.pt)
            .chain(&mut self.eb)
            .chain(&mut self.sw)
            .chain(&mut self.le)
            .chain(&mut self.mk)
            .chain(&mut self.ct)
        {
            c.clear();
        }
    }

    fn push(&mut self, event: &Event, p: &mut Prev) {
        self.kinds.push(event.kind() as u8);
        let ns = event.ns();
        let prev = &mut p.time[event.kind() as usize];
        if let Event::KernelSpan(e) = event {
            // Spans of one kernel start together (predict from the previous start); the first
            // span of the next kernel starts after the barrier (predict from the previous end).
            let (from_start, from_end) = (zigzag(ns, *prev), zigzag(ns, p.span_end));
            let use_end = from_end < from_start;
            self.span_time_ref.push(u8::from(use_end));
            self.times_z
                .push(if use_end { from_end } else { from_start });
            p.span_end = next_span_end(p.span_end, e.end_ns, use_end);
        } else if let Event::Transfer(_) = event {
            // A send is posted right after the kernel that produced it (predict from the span
            // end); a receive is posted early, near the previous transfer.
            let (from_prev, from_end) = (zigzag(ns, *prev), zigzag(ns, p.span_end));
            let use_end = from_end < from_prev;
            self.transfer_time_ref = use_end;
            self.times_z
                .push(if use_end { from_end } else { from_prev });
        } else if let Event::StepBoundary(_) = event {
            // A step ends when its last kernel does.
            self.times_z.push(zigzag(ns, p.span_end));
        } else {
            self.times_z.push(zigzag(ns, *prev));
        }
        *prev = ns;
        match *event {
            Event::KernelSpan(e) => {
                let c = &mut self.ks;
                put_uvar(&mut c[0], e.kernel.into());
                let layer = layer_wire::encode(e.layer);
                put_uvar(&mut c[1], layer.into());
                put_svar(&mut c[2], e.step, p.span_step);
                p.span_step = e.step;
                put_uvar(&mut c[3], e.seq.into());
                put_uvar(&mut c[4], e.row_start.into());
                put_svar(&mut c[5], e.row_end.into(), e.row_start.into());
                put_uvar(&mut c[6], e.thread.into());
                let duration = e.end_ns.wrapping_sub(e.start_ns);
                let predicted = p
                    .span_duration
                    .insert((e.kernel, layer), duration)
                    .unwrap_or(0);
                self.span_duration_z.push(zigzag(duration, predicted));
                c[8].push(u8::from(e.output_hash.is_some()));
                if let Some(h) = e.output_hash {
                    put_h128(&mut c[9], h);
                }
            }
            Event::Transfer(e) => {
                let c = &mut self.tr;
                put_svar(&mut c[0], e.id, p.transfer_id);
                p.transfer_id = e.id;
                put_uvar(&mut c[1], e.src_endpoint.into());
                put_uvar(&mut c[2], e.dst_endpoint.into());
                put_uvar(&mut c[3], e.src_arena.into());
                put_uvar(&mut c[4], e.dst_arena.into());
                put_uvar(&mut c[5], e.src_offset);
                put_uvar(&mut c[6], e.dst_offset);
                put_uvar(&mut c[7], e.len);
                put_h128(&mut c[8], e.hash);
                let duration = e.complete_ns.wrapping_sub(e.post_ns);
                let dir = e.direction as usize & 1;
                self.transfer_duration_z
                    .push(zigzag(duration, p.transfer_duration[dir]));
                p.transfer_duration[dir] = duration;
                let flags = e.transport as u8
                    | (e.direction as u8) << 3
                    | u8::from(e.payload.is_some()) << 4
                    | u8::from(self.transfer_time_ref) << 5;
                c[10].push(flags);
                if let Some(h) = e.payload {
                    put_h128(&mut c[11], h);
                }
            }
            Event::StepBoundary(e) => {
                put_svar(&mut self.sb[0], e.step, p.boundary_step);
                p.boundary_step = e.step;
                put_uvar(&mut self.sb[1], e.seq.into());
            }
            Event::Snapshot(e) => {
                let c = &mut self.sn;
                put_uvar(&mut c[0], e.stage.into());
                put_uvar(&mut c[1], e.step);
                put_h128(&mut c[2], e.id);
                put_uvar(&mut c[3], e.bytes);
                put_uvar(&mut c[4], e.new_bytes);
                put_uvar(&mut c[5], e.chunks.into());
            }
            Event::PerfSample(e) => {
                let c = &mut self.ps;
                c[0].push(e.kind as u8);
                put_svar(&mut c[1], e.ip, p.ip);
                p.ip = e.ip;
                put_svar(&mut c[2], e.addr, p.addr);
                p.addr = e.addr;
                put_uvar(&mut c[3], e.weight);
                put_uvar(&mut c[4], e.data_source);
                put_uvar(&mut c[5], e.tid.into());
                put_uvar(&mut c[6], e.cpu.into());
            }
            Event::PtChunk(e) => {
                let c = &mut self.pt;
                put_uvar(&mut c[0], e.cpu.into());
                put_svar(&mut c[1], e.aux_offset, p.aux);
                p.aux = e.aux_offset;
                put_uvar(&mut c[2], e.size);
                put_h128(&mut c[3], e.payload);
            }
            Event::Ebpf(e) => {
                let c = &mut self.eb;
                c[0].push(e.kind as u8);
                put_uvar(&mut c[1], e.pid.into());
                put_uvar(&mut c[2], e.tid.into());
                put_uvar(&mut c[3], e.cpu.into());
                put_uvar(&mut c[4], e.arg0);
                put_uvar(&mut c[5], e.arg1);
                put_uvar(&mut c[6], e.arg2);
            }
            Event::PerfSoftware(e) => {
                let c = &mut self.sw;
                c[0].push(e.kind as u8);
                put_uvar(&mut c[1], e.pid.into());
                put_uvar(&mut c[2], e.tid.into());
                put_uvar(&mut c[3], e.cpu.into());
                put_uvar(&mut c[4], e.arg0);
                put_uvar(&mut c[5], e.arg1);
                put_uvar(&mut c[6], e.arg2);
            }
            Event::LostEvents(e) => {
                put_uvar(&mut self.le[0], e.count);
                put_uvar(&mut self.le[1], e.reason.into());
                put_svar(&mut self.le[2], e.to_ns, e.from_ns);
            }
            Event::Marker(e) => put_uvar(&mut self.mk[0], e.text.into()),
            Event::Counter(e) => {
                put_uvar(&mut self.ct[0], e.name.into());
                put_uvar(&mut self.ct[1], e.value);
            }
        }
    }

    /// Fills the columns from `events` and serializes the `Batch` message into `out`.
    pub(crate) fn encode(
        &mut self,
        events: impl Iterator<Item = Event>,
        first_string: u32,
        strings: &[String],
        out: &mut Vec<u8>,
    ) -> u32 {
        self.clear();
        let mut prev = Prev::default();
        let mut base = None;
        for event in events {
            let ns = event.ns();
            if base.is_none() {
                base = Some(ns);
                prev.time = [ns; EventKind::COUNT];
                prev.span_end = ns;
            }
            self.push(&event, &mut prev);
        }
        let count = self.kinds.len() as u32;
        put_planes(&mut self.times, &self.times_z);
        put_planes(&mut self.ks[7], &self.span_duration_z);
        put_planes(&mut self.tr[9], &self.transfer_duration_z);
        let words = self.kinds.len() + self.times.len() + self.column_bytes() + 1024;
        let mut message = Builder::new(
            HeapAllocator::new().first_segment_words((words / 8 + 64).min(1 << 28) as u32),
        );
        let mut b = message.init_root::<batch::Builder>();
        b.set_event_count(count);
        b.set_kinds(&self.kinds);
        b.set_base_ns(base.unwrap_or(0));
        b.set_times(&self.times);
        b.set_first_string_id(first_string);
        if !strings.is_empty() {
            let mut list = b.reborrow().init_strings(strings.len() as u32);
            for (i, s) in strings.iter().enumerate() {
                list.set(i as u32, s.as_str());
            }
        }
        self.write_groups(&mut b);
        out.clear();
        out.extend_from_slice(&capnp::serialize::write_message_to_words(&message));
        count
    }

    fn column_bytes(&self) -> usize {
        self.ks
            .iter()
            .chain(&self.tr)
            .chain(&self.sb)
            .chain(&self.sn)
            .chain(&self.ps)
            .chain(&self.pt)
            .chain(&self.eb)
            .chain(&self.sw)
            .chain(&self.le)
            .chain(&self.mk)
            .chain(&self.ct)
            .map(Vec::len)
            .sum()
    }

    fn write_groups(&self, b: &mut batch::Builder<'_>) {
        if !self.ks[0].is_empty() {
            let c = &self.ks;
            let mut g = b.reborrow().init_kernel_spans();
            g.set_kernel(&c[0]);
            g.set_layer(&c[1]);
            g.set_step(&c[2]);
            g.set_seq(&c[3]);
            g.set_row_start(&c[4]);
            g.set_row_len(&c[5]);
            g.set_thread(&c[6]);
            g.set_duration(&c[7]);
            g.set_has_hash(&c[8]);
            g.set_hashes(&c[9]);
            g.set_time_ref(&self.span_time_ref);
        }
        if !self.tr[0].is_empty() {
            let c = &self.tr;
            let mut g = b.reborrow().init_transfers();
            g.set_id(&c[0]);
            g.set_src_endpoint(&c[1]);
            g.set_dst_endpoint(&c[2]);
            g.set_src_arena(&c[3]);
            g.set_dst_arena(&c[4]);
            g.set_src_offset(&c[5]);
            g.set_dst_offset(&c[6]);
            g.set_len(&c[7]);
            g.set_hash(&c[8]);
            g.set_duration(&c[9]);
            g.set_flags(&c[10]);
            g.set_payloads(&c[11]);
        }
        if !self.sb[0].is_empty() {
            let mut g = b.reborrow().init_step_boundaries();
            g.set_step(&self.sb[0]);
            g.set_seq(&self.sb[1]);
        }
        if !self.sn[0].is_empty() {
            let c = &self.sn;
            let mut g = b.reborrow().init_snapshots();
            g.set_stage(&c[0]);
            g.set_step(&c[1]);
            g.set_id(&c[2]);
            g.set_bytes(&c[3]);
            g.set_new_bytes(&c[4]);
            g.set_chunks(&c[5]);
        }
        if !self.ps[0].is_empty() {
            let c = &self.ps;
            let mut g = b.reborrow().init_perf_samples();
            g.set_kind(&c[0]);
            g.set_ip(&c[1]);
            g.set_addr(&c[2]);
            g.set_weight(&c[3]);
            g.set_data_source(&c[4]);
            g.set_tid(&c[5]);
            g.set_cpu(&c[6]);
        }
        if !self.pt[0].is_empty() {
            let c = &self.pt;
            let mut g = b.reborrow().init_pt_chunks();
            g.set_cpu(&c[0]);
            g.set_aux_offset(&c[1]);
            g.set_size(&c[2]);
            g.set_payload(&c[3]);
        }
        if !self.eb[0].is_empty() {
            let c = &self.eb;
            let mut g = b.reborrow().init_ebpf_events();
            g.set_kind(&c[0]);
            g.set_pid(&c[1]);
            g.set_tid(&c[2]);
            g.set_cpu(&c[3]);
            g.set_arg0(&c[4]);
            g.set_arg1(&c[5]);
            g.set_arg2(&c[6]);
        }
        if !self.sw[0].is_empty() {
            let c = &self.sw;
            let mut g = b.reborrow().init_perf_software();
            g.set_kind(&c[0]);
            g.set_pid(&c[1]);
            g.set_tid(&c[2]);
            g.set_cpu(&c[3]);
            g.set_arg0(&c[4]);
            g.set_arg1(&c[5]);
            g.set_arg2(&c[6]);
        }
        if !self.le[0].is_empty() {
            let mut g = b.reborrow().init_lost_events();
            g.set_count(&self.le[0]);
            g.set_reason(&self.le[1]);
            g.set_duration(&self.le[2]);
        }
        if !self.mk[0].is_empty() {
            b.reborrow().init_markers().set_text(&self.mk[0]);
        }
        if !self.ct[0].is_empty() {
            let mut g = b.reborrow().init_counters();
            g.set_name(&self.ct[0]);
            g.set_value(&self.ct[1]);
        }
    }
}

/// Names of the columns [`column_sizes`] reports, in `Columns` order.
const COLUMN_NAMES: [(&str, &[&str]); 11] = [
    (
        "kernel_span",
        &[
            "kernel",
            "layer",
            "step",
            "seq",
            "row_start",
            "row_len",
            "thread",
            "duration",
            "has_hash",
            "hashes",
        ],
    ),
    (
        "transfer",
        &[
            "id",
            "src_endpoint",
            "dst_endpoint",
            "src_arena",
            "dst_arena",
            "src_offset",
            "dst_offset",
            "len",
            "hash",
            "duration",
            "flags",
            "payloads",
        ],
    ),
    ("step_boundary", &["step", "seq"]),
    (
        "snapshot",
        &["stage", "step", "id", "bytes", "new_bytes", "chunks"],
    ),
    (
        "perf_sample",
        &["kind", "ip", "addr", "weight", "data_source", "tid", "cpu"],
    ),
    ("pt_chunk", &["cpu", "aux_offset", "size", "payload"]),
    (
        "ebpf",
        &["kind", "pid", "tid", "cpu", "arg0", "arg1", "arg2"],
    ),
    ("lost_events", &["count", "reason", "duration"]),
    ("marker", &["text"]),
    ("counter", &["name", "value"]),
    (
        "perf_software",
        &["kind", "pid", "tid", "cpu", "arg0", "arg1", "arg2"],
    ),
];

/// One column of a batch measured on its own: see [`column_sizes`].
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct ColumnSize {
    /// `group.column`; `times.<kind>` is the share of the `times` column of that kind's events
    /// (laid out in planes on its own).
    pub name: String,
    /// Bytes before compression.
    pub raw: usize,
    /// Bytes after zstd at the level asked for, compressing this column alone.
    pub compressed: usize,
}

/// A measurement aid, not part of the format: encodes `events` as one batch and compresses each
/// column on its own, so one can see which columns the bytes of a real log go to. (The frame
/// compresses the whole message at once; the sum here is close to, not equal to, its size.)
#[doc(hidden)]
pub fn column_sizes(events: &[Event], level: i32) -> Vec<ColumnSize> {
    let mut c = Columns::default();
    let mut out = Vec::new();
    c.encode(events.iter().copied(), 0, &[], &mut out);
    let z = |bytes: &[u8]| -> usize {
        if bytes.is_empty() {
            0
        } else {
            zstd::bulk::compress(bytes, level).map_or(bytes.len(), |v| v.len())
        }
    };
    let mut sizes = vec![ColumnSize {
        name: "kinds".into(),
        raw: c.kinds.len(),
        compressed: z(&c.kinds),
    }];
    for kind in EventKind::ALL {
        let values: Vec<u64> = c
            .kinds
            .iter()
            .zip(&c.times_z)
            .filter(|(k, _)| **k == kind as u8)
            .map(|(_, v)| *v)
            .collect();
        if values.is_empty() {
            continue;
        }
        let mut planes = Vec::new();
        put_planes(&mut planes, &values);
        sizes.push(ColumnSize {
            name: format!("times.{}", kind.name()),
            raw: planes.len(),
            compressed: z(&planes),
        });
    }
    sizes.push(ColumnSize {
        name: "kernel_span.time_ref".into(),
        raw: c.span_time_ref.len(),
        compressed: z(&c.span_time_ref),
    });
    let groups: [&[Vec<u8>]; 11] = [
        &c.ks, &c.tr, &c.sb, &c.sn, &c.ps, &c.pt, &c.eb, &c.le, &c.mk, &c.ct, &c.sw,
    ];
    for ((group, names), cols) in COLUMN_NAMES.iter().zip(groups) {
        for (name, col) in names.iter().zip(cols) {
            if !col.is_empty() {
                sizes.push(ColumnSize {
                    name: format!("{group}.{name}"),
                    raw: col.len(),
                    compressed: z(col),
                });
            }
        }
    }
    sizes
}

/// A decoded batch: its events in append order and the strings it defines.
#[derive(Debug, Default)]
pub(crate) struct DecodedBatch {
    pub(crate) events: Vec<Event>,
    pub(crate) first_string: u32,
    pub(crate) strings: Vec<String>,
}

/// Largest number of events one frame may hold; bounds what a hostile frame can make us allocate.
pub const MAX_FRAME_EVENTS: u32 = 1 << 20;

/// Decodes a serialized `Batch`. `want(kind)` chooses which events to materialise; columns of
/// other kinds are still walked so the deltas stay right, but nothing is built for them.
/// Decodes a batch written by log format `version` (1 to 3; see docs/FORMAT.md 5.2-5.3 for what
/// version 2 predicts differently; versions 1-2 stored perf software records under `ebpf`, which
/// this returns as [`Event::PerfSoftware`]).
pub(crate) fn decode(
    bytes: &[u8],
    want: impl Fn(EventKind) -> bool,
    version: u32,
) -> Result<DecodedBatch, BatchError> {
    let v2 = version >= 2;
    let v3 = version >= 3;
    let mut options = ReaderOptions::new();
    // One word of traversal per 8 bytes, plus slack for the struct headers.
    options.traversal_limit_in_words(Some(bytes.len() / 8 + 1024));
    let mut slice = bytes;
    let message = capnp::serialize::read_message_from_flat_slice(&mut slice, options)?;
    let b = message.get_root::<batch::Reader>()?;
    let count = b.get_event_count();
    let kinds = b.get_kinds()?;
    if count > MAX_FRAME_EVENTS || kinds.len() != count as usize {
        return Err(BatchError::Columns("kinds"));
    }
    let strings_reader = b.get_strings()?;
    let mut strings = Vec::with_capacity(strings_reader.len().min(4096) as usize);
    for s in strings_reader.iter() {
        strings.push(s?.to_string().map_err(|_| BatchError::Columns("strings"))?);
    }

    let mut per_kind = [0usize; EventKind::COUNT];
    for &k in kinds {
        *per_kind
            .get_mut(usize::from(k))
            .ok_or(BatchError::Columns("kinds"))? += 1;
    }
    let mut times = Planes::new(b.get_times()?, kinds.len(), "times")?;
    let ks_r = b.get_kernel_spans()?;
    let tr_r = b.get_transfers()?;
    let sb_r = b.get_step_boundaries()?;
    let sn_r = b.get_snapshots()?;
    let ps_r = b.get_perf_samples()?;
    let pt_r = b.get_pt_chunks()?;
    let eb_r = b.get_ebpf_events()?;
    let sw_r = b.get_perf_software()?;
    let le_r = b.get_lost_events()?;
    let mk_r = b.get_markers()?;
    let ct_r = b.get_counters()?;
    let mut ks = [
        Col::new(ks_r.get_kernel()?, "kernelSpans.kernel"),
        Col::new(ks_r.get_layer()?, "kernelSpans.layer"),
        Col::new(ks_r.get_step()?, "kernelSpans.step"),
        Col::new(ks_r.get_seq()?, "kernelSpans.seq"),
        Col::new(ks_r.get_row_start()?, "kernelSpans.rowStart"),
        Col::new(ks_r.get_row_len()?, "kernelSpans.rowLen"),
        Col::new(ks_r.get_thread()?, "kernelSpans.thread"),
        Col::new(ks_r.get_has_hash()?, "kernelSpans.hasHash"),
        Col::new(ks_r.get_hashes()?, "kernelSpans.hashes"),
    ];
    let n_spans = per_kind[EventKind::KernelSpan as usize];
    let mut span_duration = Planes::new(ks_r.get_duration()?, n_spans, "kernelSpans.duration")?;
    let mut span_time_ref = Col::new(ks_r.get_time_ref()?, "kernelSpans.timeRef");
    let mut tr = [
        Col::new(tr_r.get_id()?, "transfers.id"),
        Col::new(tr_r.get_src_endpoint()?, "transfers.srcEndpoint"),
        Col::new(tr_r.get_dst_endpoint()?, "transfers.dstEndpoint"),
        Col::new(tr_r.get_src_arena()?, "transfers.srcArena"),
        Col::new(tr_r.get_dst_arena()?, "transfers.dstArena"),
        Col::new(tr_r.get_src_offset()?, "transfers.srcOffset"),
        Col::new(tr_r.get_dst_offset()?, "transfers.dstOffset"),
        Col::new(tr_r.get_len()?, "transfers.len"),
        Col::new(tr_r.get_hash()?, "transfers.hash"),
        Col::new(tr_r.get_flags()?, "transfers.flags"),
        Col::new(tr_r.get_payloads()?, "transfers.payloads"),
    ];
    let n_transfers = per_kind[EventKind::Transfer as usize];
    let mut transfer_duration =
        Planes::new(tr_r.get_duration()?, n_transfers, "transfers.duration")?;
    let mut sb = [
        Col::new(sb_r.get_step()?, "stepBoundaries.step"),
        Col::new(sb_r.get_seq()?, "stepBoundaries.seq"),
    ];
    let mut sn = [
        Col::new(sn_r.get_stage()?, "snapshots.stage"),
        Col::new(sn_r.get_step()?, "snapshots.step"),
        Col::new(sn_r.get_id()?, "snapshots.id"),
        Col::new(sn_r.get_bytes()?, "snapshots.bytes"),
        Col::new(sn_r.get_new_bytes()?, "snapshots.newBytes"),
        Col::new(sn_r.get_chunks()?, "snapshots.chunks"),
    ];
    let mut ps = [
        Col::new(ps_r.get_kind()?, "perfSamples.kind"),
        Col::new(ps_r.get_ip()?, "perfSamples.ip"),
        Col::new(ps_r.get_addr()?, "perfSamples.addr"),
        Col::new(ps_r.get_weight()?, "perfSamples.weight"),
        Col::new(ps_r.get_data_source()?, "perfSamples.dataSource"),
        Col::new(ps_r.get_tid()?, "perfSamples.tid"),
        Col::new(ps_r.get_cpu()?, "perfSamples.cpu"),
    ];
    let mut pt = [
        Col::new(pt_r.get_cpu()?, "ptChunks.cpu"),
        Col::new(pt_r.get_aux_offset()?, "ptChunks.auxOffset"),
        Col::new(pt_r.get_size()?, "ptChunks.size"),
        Col::new(pt_r.get_payload()?, "ptChunks.payload"),
    ];
    let mut eb = [
        Col::new(eb_r.get_kind()?, "ebpfEvents.kind"),
        Col::new(eb_r.get_pid()?, "ebpfEvents.pid"),
        Col::new(eb_r.get_tid()?, "ebpfEvents.tid"),
        Col::new(eb_r.get_cpu()?, "ebpfEvents.cpu"),
        Col::new(eb_r.get_arg0()?, "ebpfEvents.arg0"),
        Col::new(eb_r.get_arg1()?, "ebpfEvents.arg1"),
        Col::new(eb_r.get_arg2()?, "ebpfEvents.arg2"),
    ];
    let mut sw = [
        Col::new(sw_r.get_kind()?, "perfSoftware.kind"),
        Col::new(sw_r.get_pid()?, "perfSoftware.pid"),
        Col::new(sw_r.get_tid()?, "perfSoftware.tid"),
        Col::new(sw_r.get_cpu()?, "perfSoftware.cpu"),
        Col::new(sw_r.get_arg0()?, "perfSoftware.arg0"),
        Col::new(sw_r.get_arg1()?, "perfSoftware.arg1"),
        Col::new(sw_r.get_arg2()?, "perfSoftware.arg2"),
    ];
    let mut le = [
        Col::new(le_r.get_count()?, "lostEvents.count"),
        Col::new(le_r.get_reason()?, "lostEvents.reason"),
        Col::new(le_r.get_duration()?, "lostEvents.duration"),
    ];
    let mut mk = Col::new(mk_r.get_text()?, "markers.text");
    let mut ct = [
        Col::new(ct_r.get_name()?, "counters.name"),
        Col::new(ct_r.get_value()?, "counters.value"),
    ];

    let mut p = Prev {
        time: [b.get_base_ns(); EventKind::COUNT],
        span_end: b.get_base_ns(),
        ..Prev::default()
    };
    // Never trust `count` for a big up-front allocation; grow as real events decode.
    let mut events = Vec::with_capacity((count as usize).min(1 << 16));
    for &k in kinds {
        let kind = EventKind::from_u8(k).ok_or(BatchError::Columns("kinds"))?;
        let mut starts_group = false;
        // A transfer's flags are read first: in version 2, bit 5 chooses its time predictor.
        let transfer_flags = if kind == EventKind::Transfer {
            tr[9].u8()?
        } else {
            0
        };
        let predictor = match kind {
            EventKind::KernelSpan => match span_time_ref.u8()? {
                0 => p.time[kind as usize],
                1 => {
                    starts_group = true;
                    p.span_end
                }
                _ => return Err(BatchError::Columns("kernelSpans.timeRef")),
            },
            EventKind::Transfer if v2 && transfer_flags & 32 != 0 => p.span_end,
            EventKind::StepBoundary if v2 => p.span_end,
            _ => p.time[kind as usize],
        };
        let ns = times.svar(predictor)?;
        p.time[kind as usize] = ns;
        let event = match kind {
            EventKind::KernelSpan => {
                let c = &mut ks;
                let kernel = c[0].u32()?;
                let layer = c[1].u32()?;
                let step = c[2].svar(p.span_step)?;
                p.span_step = step;
                let seq = c[3].u32()?;
                let row_start = c[4].u32()?;
                let row_end = c[5].svar(row_start.into())?;
                let row_end = u32::try_from(row_end)
                    .map_err(|_| BatchError::Columns("kernelSpans.rowLen"))?;
                let thread = c[6].u32()?;
                let end_ns = if v2 {
                    let predicted = p.span_duration.get(&(kernel, layer)).copied();
                    let duration = span_duration.svar(predicted.unwrap_or(0))?;
                    p.span_duration.insert((kernel, layer), duration);
                    ns.wrapping_add(duration)
                } else {
                    span_duration.svar(ns)?
                };
                p.span_end = next_span_end(p.span_end, end_ns, starts_group);
                let output_hash = match c[7].u8()? {
                    0 => None,
                    1 => Some(c[8].h128()?),
                    _ => return Err(BatchError::Columns("kernelSpans.hasHash")),
                };
                Event::KernelSpan(KernelSpan {
                    kernel,
                    layer: layer_wire::decode(layer),
                    step,
                    seq,
                    row_start,
                    row_end,
                    thread,
                    start_ns: ns,
                    end_ns,
                    output_hash,
                })
            }
            EventKind::Transfer => {
                let c = &mut tr;
                let id = c[0].svar(p.transfer_id)?;
                p.transfer_id = id;
                let src_endpoint = c[1].u32()?;
                let dst_endpoint = c[2].u32()?;
                let src_arena = c[3].u32()?;
                let dst_arena = c[4].u32()?;
                let src_offset = c[5].uvar()?;
                let dst_offset = c[6].uvar()?;
                let len = c[7].uvar()?;
                let hash = c[8].h128()?;
                let flags = transfer_flags;
                let bad = || BatchError::Columns("transfers.flags");
                if flags >> if v2 { 6 } else { 5 } != 0 {
                    return Err(bad());
                }
                let complete_ns = if v2 {
                    let dir = usize::from(flags >> 3 & 1);
                    let duration = transfer_duration.svar(p.transfer_duration[dir])?;
                    p.transfer_duration[dir] = duration;
                    ns.wrapping_add(duration)
                } else {
                    transfer_duration.svar(ns)?
                };
                let transport = Transport::from_u8(flags & 7).ok_or_else(bad)?;
                let direction = if flags & 8 != 0 {
                    Direction::Recv
                } else {
                    Direction::Send
                };
                let payload = if flags & 16 != 0 {
                    Some(c[10].h128()?)
                } else {
                    None
                };
                Event::Transfer(Transfer {
                    id,
                    src_endpoint,
                    dst_endpoint,
                    src_arena,
                    dst_arena,
                    src_offset,
                    dst_offset,
                    len,
                    hash,
                    post_ns: ns,
                    complete_ns,
                    transport,
                    direction,
                    payload,
                })
            }
            EventKind::StepBoundary => {
                let step = sb[0].svar(p.boundary_step)?;
                p.boundary_step = step;
                Event::StepBoundary(StepBoundary {
                    step,
                    seq: sb[1].u32()?,
                    ns,
                })
            }
            EventKind::Snapshot => {
                let c = &mut sn;
                Event::Snapshot(SnapshotEvent {
                    stage: c[0].u32()?,
                    step: c[1].uvar()?,
                    id: c[2].h128()?,
                    bytes: c[3].uvar()?,
                    new_bytes: c[4].uvar()?,
                    chunks: c[5].u32()?,
                    ns,
                })
            }
            EventKind::PerfSample => {
                let c = &mut ps;
                let kind = PerfSampleKind::from_u8(c[0].u8()?)
                    .ok_or(BatchError::Columns("perfSamples.kind"))?;
                let ip = c[1].svar(p.ip)?;
                p.ip = ip;
                let addr = c[2].svar(p.addr)?;
                p.addr = addr;
                Event::PerfSample(PerfSample {
                    kind,
                    ip,
                    addr,
                    weight: c[3].uvar()?,
                    data_source: c[4].uvar()?,
                    tid: c[5].u32()?,
                    cpu: c[6].u32()?,
                    ns,
                })
            }
            EventKind::PtChunk => {
                let c = &mut pt;
                let cpu = c[0].u32()?;
                let aux_offset = c[1].svar(p.aux)?;
                p.aux = aux_offset;
                Event::PtChunk(PtChunk {
                    cpu,
                    aux_offset,
                    size: c[2].uvar()?,
                    payload: c[3].h128()?,
                    ns,
                })
            }
            EventKind::Ebpf => {
                let c = &mut eb;
                let byte = c[0].u8()?;
                let (pid, tid, cpu) = (c[1].u32()?, c[2].u32()?, c[3].u32()?);
                let (arg0, arg1, arg2) = (c[4].uvar()?, c[5].uvar()?, c[6].uvar()?);
                // Before version 3 no eBPF probe existed: what `ebpf` held came from perf.
                match SoftwareKind::from_u8(byte).filter(|_| !v3) {
                    Some(kind) => Event::PerfSoftware(SoftwareRecord {
                        kind,
                        pid,
                        tid,
                        cpu,
                        arg0,
                        arg1,
                        arg2,
                        ns,
                    }),
                    None => Event::Ebpf(EbpfEvent {
                        kind: EbpfKind::from_u8(byte)
                            .ok_or(BatchError::Columns("ebpfEvents.kind"))?,
                        pid,
                        tid,
                        cpu,
                        arg0,
                        arg1,
                        arg2,
                        ns,
                    }),
                }
            }
            EventKind::PerfSoftware => {
                let c = &mut sw;
                Event::PerfSoftware(SoftwareRecord {
                    kind: SoftwareKind::from_u8(c[0].u8()?)
                        .ok_or(BatchError::Columns("perfSoftware.kind"))?,
                    pid: c[1].u32()?,
                    tid: c[2].u32()?,
                    cpu: c[3].u32()?,
                    arg0: c[4].uvar()?,
                    arg1: c[5].uvar()?,
                    arg2: c[6].uvar()?,
                    ns,
                })
            }
            EventKind::LostEvents => Event::LostEvents(LostEvents {
                count: le[0].uvar()?,
                reason: le[1].u32()?,
                from_ns: ns,
                to_ns: le[2].svar(ns)?,
            }),
            EventKind::Marker => Event::Marker(Marker {
                text: mk.u32()?,
                ns,
            }),
            EventKind::Counter => Event::Counter(Counter {
                name: ct[0].u32()?,
                value: ct[1].uvar()?,
                ns,
            }),
        };
        if want(event.kind()) {
            events.push(event);
        }
    }
    mk.finish()?;
    span_time_ref.finish()?;
    for c in ks
        .iter()
        .chain(&tr)
        .chain(&sb)
        .chain(&sn)
        .chain(&ps)
        .chain(&pt)
        .chain(&eb)
        .chain(&sw)
        .chain(&le)
        .chain(&ct)
    {
        c.finish()?;
    }
    Ok(DecodedBatch {
        events,
        first_string: b.get_first_string_id(),
        strings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps of 2 layers x 4 kernels with jittered durations; per step one receive posted early,
    /// one send posted right after the last kernel, and a step boundary.
    fn stream() -> Vec<Event> {
        let mut v = Vec::new();
        let mut t = 5_000_000u64;
        for step in 0..4u64 {
            v.push(Event::Transfer(Transfer {
                id: 100 + step,
                src_endpoint: 0,
                dst_endpoint: 1,
                src_arena: 1,
                dst_arena: 1,
                src_offset: 4096,
                dst_offset: 8192,
                len: 1536,
                hash: u128::from(step) * 0x9e37_79b9_7f4a_7c15,
                post_ns: t.saturating_sub(700_000 + step * 13),
                complete_ns: t - 90 - step,
                transport: Transport::Shm,
                direction: Direction::Recv,
                payload: None,
            }));
            for layer in 2..4u32 {
                for kernel in 0..4u32 {
                    let start = t + 50 + u64::from(kernel * 7 + layer) % 31;
                    let end = start + 1_000 * u64::from(kernel + 1) + (step * 37 + 11) % 97;
                    v.push(Event::KernelSpan(KernelSpan {
                        kernel,
                        layer: Some(layer),
                        step,
                        seq: (step % 2) as u32,
                        row_start: 0,
                        row_end: 12,
                        thread: 0,
                        start_ns: start,
                        end_ns: end,
                        output_hash: None,
                    }));
                    t = end;
                }
            }
            v.push(Event::StepBoundary(StepBoundary {
                step,
                seq: (step % 2) as u32,
                ns: t + 300,
            }));
            v.push(Event::Transfer(Transfer {
                id: 1 << 40 | step,
                src_endpoint: 1,
                dst_endpoint: 2,
                src_arena: 1,
                dst_arena: 1,
                src_offset: 0,
                dst_offset: 0,
                len: 1536,
                hash: u128::MAX - u128::from(step),
                post_ns: t + 400,
                // A send may complete "before" it was posted on another clock: wrapping must hold.
                complete_ns: 3,
                transport: Transport::Tcp,
                direction: Direction::Send,
                payload: Some(7),
            }));
            t += 20_000;
        }
        v
    }

    #[test]
    fn version_2_round_trips_and_version_1_reads_it_differently() {
        let events = stream();
        let (mut c, mut out) = (Columns::default(), Vec::new());
        c.encode(events.iter().copied(), 0, &[], &mut out);
        let got = decode(&out, |_| true, crate::frame::FORMAT_VERSION)
            .expect("version 2 decodes")
            .events;
        assert_eq!(got, events);
        // Sends posted after a span end set flags bit 5, which version 1 reserves: the version
        // in the file header must choose the predictors.
        assert!(decode(&out, |_| true, 1).is_err());
    }

    #[test]
    fn version_2_predictors_shrink_durations_and_step_times() {
        let events = stream();
        let mut c = Columns::default();
        c.encode(events.iter().copied(), 0, &[], &mut Vec::new());
        // Version 1 would store each span's full duration (>= 1000 ns: 2 bytes); repeated
        // (kernel, layer) pairs leave only the jitter (< 128 after zigzag: 1 byte).
        let (spans, bytes): (usize, usize) = c.span_duration_z.iter().fold((0, 0), |(n, b), z| {
            (n + 1, b + (8 - z.leading_zeros() as usize / 8))
        });
        assert!(bytes < 2 * spans, "{bytes} bytes for {spans} spans");
        // A step boundary 300 ns after its last kernel: zigzag 600, two bytes, not three.
        let boundary = c
            .kinds
            .iter()
            .zip(&c.times_z)
            .filter(|(k, _)| **k == EventKind::StepBoundary as u8)
            .map(|(_, z)| *z)
            .collect::<Vec<_>>();
        assert_eq!(boundary, vec![600; 4]);
    }
}
