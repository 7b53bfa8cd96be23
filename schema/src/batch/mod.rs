//! The columnar batch: events ⇄ the `Batch` capnp message that is one frame's payload.
//!
//! Every field of every kind is its own column (varints, zigzag deltas, fixed 16-byte hashes),
//! so a regular pipeline stream turns into long runs of near-identical bytes that zstd then
//! squeezes to a few bits per event. Layout of each column: `trace.capnp` and docs/FORMAT.md.
//!
//! This file holds what every kind shares: the column codecs, the `kinds` and `times` columns
//! and their predictors, and the walk over a batch. Each kind's columns live in their own file
//! (`kernel_span.rs`, `transfer.rs`, ...) as named fields, with the kind's encoder and decoder
//! side by side.

mod counter;
mod ebpf;
mod kernel_span;
mod lost_events;
mod marker;
mod migration;
mod perf_sample;
mod pt_chunk;
mod snapshot;
mod step_boundary;
mod transfer;

use std::collections::HashMap;

use capnp::message::{Builder, HeapAllocator, ReaderOptions};

use crate::event::{Event, EventKind};
use crate::trace_capnp::batch;

use counter::{CounterColumns, CounterReader};
use ebpf::{EbpfColumns, EbpfReader, Group};
use kernel_span::{KernelSpanColumns, KernelSpanReader};
use lost_events::{LostEventsColumns, LostEventsReader};
use marker::{MarkerColumns, MarkerReader};
use migration::{MigrationColumns, MigrationReader};
use perf_sample::{PerfSampleColumns, PerfSampleReader};
use pt_chunk::{PtChunkColumns, PtChunkReader};
use snapshot::{SnapshotColumns, SnapshotReader};
use step_boundary::{StepBoundaryColumns, StepBoundaryReader};
use transfer::{TransferColumns, TransferReader};

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

/// Unsigned LEB128 varint.
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

/// Declares one group's column buffers as named `Vec<u8>` fields (in `trace.capnp` order), plus
/// `clear`, `is_empty` (the group is written only when its first column has values) and
/// `columns` (each column with its name, for [`column_sizes`]). `scratch` fields are cleared
/// with the columns but are not columns.
macro_rules! columns {
    (
        $(#[$meta:meta])*
        $name:ident {
            $(#[$first_meta:meta])* $first:ident
            $(, $(#[$field_meta:meta])* $field:ident)* $(,)?
        }
        $(scratch { $($(#[$scratch_meta:meta])* $scratch:ident: $ty:ty),* $(,)? })?
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub(super) struct $name {
            $(#[$first_meta])* pub(super) $first: Vec<u8>,
            $($(#[$field_meta])* pub(super) $field: Vec<u8>,)*
            $($($(#[$scratch_meta])* pub(super) $scratch: $ty,)*)?
        }

        impl $name {
            pub(super) fn clear(&mut self) {
                self.$first.clear();
                $(self.$field.clear();)*
                $($(self.$scratch.clear();)*)?
            }

            pub(super) fn is_empty(&self) -> bool {
                self.$first.is_empty()
            }

            pub(super) fn columns(&self) -> super::NamedColumns<'_> {
                vec![
                    (stringify!($first), self.$first.as_slice()),
                    $((stringify!($field), self.$field.as_slice()),)*
                ]
            }
        }
    };
}
pub(crate) use columns;

/// A group's columns, each with its name.
type NamedColumns<'a> = Vec<(&'static str, &'a [u8])>;

/// Column buffers, reused from frame to frame by the encoder.
#[derive(Debug, Default)]
pub(crate) struct Columns {
    kinds: Vec<u8>,
    times: Vec<u8>,
    /// Zigzag values of the times, serialized by `put_planes` at encode time.
    times_z: Vec<u64>,
    kernel_spans: KernelSpanColumns,
    transfers: TransferColumns,
    step_boundaries: StepBoundaryColumns,
    snapshots: SnapshotColumns,
    perf_samples: PerfSampleColumns,
    pt_chunks: PtChunkColumns,
    ebpf_events: EbpfColumns,
    lost_events: LostEventsColumns,
    markers: MarkerColumns,
    counters: CounterColumns,
    perf_software: EbpfColumns,
    migrations: MigrationColumns,
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
    span_duration: SpanDurations,
    /// Version 2: previous `completeNs - postNs` of a transfer of each direction (send, recv).
    transfer_duration: [u64; 2],
    boundary_step: u64,
    ip: u64,
    addr: u64,
    aux: u64,
}

/// The previous duration of a span per (kernel, stored layer), 0 when there is none: a flat
/// table for the keys pipelines use (kernel below 32, layer below 256 or none), a map for any
/// other key an untrusted frame may hold. Hashing every span's key with SipHash cost more than
/// the rest of its encoding.
#[derive(Default)]
struct SpanDurations {
    flat: Vec<u64>,
    other: HashMap<(u32, u32), u64>,
}

impl SpanDurations {
    const KERNELS: u32 = 32;
    const LAYERS: u32 = 256;

    fn slot(kernel: u32, layer: u32) -> Option<usize> {
        let layer = if layer == crate::event::layer_wire::encode(None) {
            Self::LAYERS
        } else if layer < Self::LAYERS {
            layer
        } else {
            return None;
        };
        (kernel < Self::KERNELS).then(|| (kernel * (Self::LAYERS + 1) + layer) as usize)
    }

    fn get(&self, kernel: u32, layer: u32) -> u64 {
        match Self::slot(kernel, layer) {
            Some(i) => self.flat.get(i).copied().unwrap_or(0),
            None => self.other.get(&(kernel, layer)).copied().unwrap_or(0),
        }
    }

    /// Stores `duration` for the key; returns the one it replaces.
    fn replace(&mut self, kernel: u32, layer: u32, duration: u64) -> u64 {
        match Self::slot(kernel, layer) {
            Some(i) => {
                if self.flat.is_empty() {
                    self.flat = vec![0; (Self::KERNELS * (Self::LAYERS + 1)) as usize];
                }
                std::mem::replace(&mut self.flat[i], duration)
            }
            None => self.other.insert((kernel, layer), duration).unwrap_or(0),
        }
    }
}

impl Columns {
    fn clear(&mut self) {
        self.kinds.clear();
        self.times.clear();
        self.times_z.clear();
        self.kernel_spans.clear();
        self.transfers.clear();
        self.step_boundaries.clear();
        self.snapshots.clear();
        self.perf_samples.clear();
        self.pt_chunks.clear();
        self.ebpf_events.clear();
        self.lost_events.clear();
        self.markers.clear();
        self.counters.clear();
        self.perf_software.clear();
        self.migrations.clear();
    }

    /// Every group's columns with the name of its kind, in the order [`column_sizes`] lists them.
    fn groups(&self) -> [(EventKind, NamedColumns<'_>); 12] {
        [
            (EventKind::KernelSpan, self.kernel_spans.columns()),
            (EventKind::Transfer, self.transfers.columns()),
            (EventKind::StepBoundary, self.step_boundaries.columns()),
            (EventKind::Snapshot, self.snapshots.columns()),
            (EventKind::PerfSample, self.perf_samples.columns()),
            (EventKind::PtChunk, self.pt_chunks.columns()),
            (EventKind::Ebpf, self.ebpf_events.columns()),
            (EventKind::LostEvents, self.lost_events.columns()),
            (EventKind::Marker, self.markers.columns()),
            (EventKind::Counter, self.counters.columns()),
            (EventKind::PerfSoftware, self.perf_software.columns()),
            (EventKind::Migration, self.migrations.columns()),
        ]
    }

    fn push(&mut self, event: &Event, p: &mut Prev) {
        self.kinds.push(event.kind() as u8);
        let ns = event.ns();
        let prev = &mut p.time[event.kind() as usize];
        match event {
            Event::KernelSpan(e) => {
                // Spans of one kernel start together (predict from the previous start); the
                // first span of the next kernel starts after the barrier (predict from the
                // previous end).
                let (from_start, from_end) = (zigzag(ns, *prev), zigzag(ns, p.span_end));
                let use_end = from_end < from_start;
                self.times_z
                    .push(if use_end { from_end } else { from_start });
                *prev = ns;
                p.span_end = next_span_end(p.span_end, e.end_ns, use_end);
                self.kernel_spans.push(e, use_end, p);
            }
            Event::Transfer(e) => {
                // A send is posted right after the kernel that produced it (predict from the
                // span end); a receive is posted early, near the previous transfer.
                let (from_prev, from_end) = (zigzag(ns, *prev), zigzag(ns, p.span_end));
                let use_end = from_end < from_prev;
                self.times_z
                    .push(if use_end { from_end } else { from_prev });
                *prev = ns;
                self.transfers.push(e, use_end, p);
            }
            Event::StepBoundary(e) => {
                // A step ends when its last kernel does.
                self.times_z.push(zigzag(ns, p.span_end));
                *prev = ns;
                self.step_boundaries.push(e, p);
            }
            _ => {
                self.times_z.push(zigzag(ns, *prev));
                *prev = ns;
                match event {
                    Event::KernelSpan(_) | Event::Transfer(_) | Event::StepBoundary(_) => {}
                    Event::Snapshot(e) => self.snapshots.push(e),
                    Event::PerfSample(e) => self.perf_samples.push(e, p),
                    Event::PtChunk(e) => self.pt_chunks.push(e, p),
                    Event::Ebpf(e) => self.ebpf_events.push(e.kind as u8, e),
                    Event::PerfSoftware(e) => self.perf_software.push(e.kind as u8, e),
                    Event::LostEvents(e) => self.lost_events.push(e),
                    Event::Marker(e) => self.markers.push(e),
                    Event::Counter(e) => self.counters.push(e),
                    Event::Migration(e) => self.migrations.push(e),
                }
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
        self.kernel_spans.seal();
        self.transfers.seal();
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
        self.groups()
            .iter()
            .flat_map(|(_, columns)| columns.iter().map(|(_, c)| c.len()))
            .sum()
    }

    /// Writes each group that holds events (in `trace.capnp` order, so the bytes never change).
    fn write_groups(&self, b: &mut batch::Builder<'_>) {
        if !self.kernel_spans.is_empty() {
            self.kernel_spans.write(b.reborrow().init_kernel_spans());
        }
        if !self.transfers.is_empty() {
            self.transfers.write(b.reborrow().init_transfers());
        }
        if !self.step_boundaries.is_empty() {
            self.step_boundaries
                .write(b.reborrow().init_step_boundaries());
        }
        if !self.snapshots.is_empty() {
            self.snapshots.write(b.reborrow().init_snapshots());
        }
        if !self.perf_samples.is_empty() {
            self.perf_samples.write(b.reborrow().init_perf_samples());
        }
        if !self.pt_chunks.is_empty() {
            self.pt_chunks.write(b.reborrow().init_pt_chunks());
        }
        if !self.ebpf_events.is_empty() {
            self.ebpf_events.write(b.reborrow().init_ebpf_events());
        }
        if !self.perf_software.is_empty() {
            self.perf_software.write(b.reborrow().init_perf_software());
        }
        if !self.lost_events.is_empty() {
            self.lost_events.write(b.reborrow().init_lost_events());
        }
        if !self.markers.is_empty() {
            self.markers.write(b.reborrow().init_markers());
        }
        if !self.counters.is_empty() {
            self.counters.write(b.reborrow().init_counters());
        }
        if !self.migrations.is_empty() {
            self.migrations.write(b.reborrow().init_migrations());
        }
    }
}

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
    for (kind, columns) in c.groups() {
        for (name, col) in columns {
            if !col.is_empty() {
                sizes.push(ColumnSize {
                    name: format!("{}.{name}", kind.name()),
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
/// Decodes a batch written by log format `version` (1 to 4; see docs/FORMAT.md 5.2-5.3 for what
/// version 2 predicts differently; versions 1-2 stored perf software records under `ebpf`, which
/// this returns as [`Event::PerfSoftware`]; migration events exist from version 4).
pub(crate) fn decode(
    bytes: &[u8],
    want: impl Fn(EventKind) -> bool,
    version: u32,
) -> Result<DecodedBatch, BatchError> {
    let v2 = version >= 2;
    let v3 = version >= 3;
    let v4 = version >= 4;
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
    let mut kernel_spans = KernelSpanReader::new(
        b.get_kernel_spans()?,
        per_kind[EventKind::KernelSpan as usize],
    )?;
    let mut transfers =
        TransferReader::new(b.get_transfers()?, per_kind[EventKind::Transfer as usize])?;
    let mut step_boundaries = StepBoundaryReader::new(b.get_step_boundaries()?)?;
    let mut snapshots = SnapshotReader::new(b.get_snapshots()?)?;
    let mut perf_samples = PerfSampleReader::new(b.get_perf_samples()?)?;
    let mut pt_chunks = PtChunkReader::new(b.get_pt_chunks()?)?;
    let mut ebpf_events = EbpfReader::new(b.get_ebpf_events()?, Group::Ebpf)?;
    let mut perf_software = EbpfReader::new(b.get_perf_software()?, Group::Software)?;
    let mut lost_events = LostEventsReader::new(b.get_lost_events()?)?;
    let mut markers = MarkerReader::new(b.get_markers()?)?;
    let mut counters = CounterReader::new(b.get_counters()?)?;
    let mut migrations = MigrationReader::new(b.get_migrations()?)?;

    let mut p = Prev {
        time: [b.get_base_ns(); EventKind::COUNT],
        span_end: b.get_base_ns(),
        ..Prev::default()
    };
    // Never trust `count` for a big up-front allocation; grow as real events decode.
    let mut events = Vec::with_capacity((count as usize).min(1 << 16));
    for &k in kinds {
        let kind = EventKind::from_u8(k)
            .filter(|&k| v4 || k != EventKind::Migration)
            .ok_or(BatchError::Columns("kinds"))?;
        let mut starts_group = false;
        // A transfer's flags are read first: in version 2, bit 5 chooses its time predictor.
        let transfer_flags = if kind == EventKind::Transfer {
            transfers.flags()?
        } else {
            0
        };
        let predictor = match kind {
            EventKind::KernelSpan => {
                starts_group = kernel_spans.starts_group()?;
                if starts_group {
                    p.span_end
                } else {
                    p.time[kind as usize]
                }
            }
            EventKind::Transfer if v2 && transfer_flags & 32 != 0 => p.span_end,
            EventKind::StepBoundary if v2 => p.span_end,
            _ => p.time[kind as usize],
        };
        let ns = times.svar(predictor)?;
        p.time[kind as usize] = ns;
        let event = match kind {
            EventKind::KernelSpan => {
                Event::KernelSpan(kernel_spans.next(ns, starts_group, v2, &mut p)?)
            }
            EventKind::Transfer => {
                Event::Transfer(transfers.next(ns, transfer_flags, v2, &mut p)?)
            }
            EventKind::StepBoundary => Event::StepBoundary(step_boundaries.next(ns, &mut p)?),
            EventKind::Snapshot => Event::Snapshot(snapshots.next(ns)?),
            EventKind::PerfSample => Event::PerfSample(perf_samples.next(ns, &mut p)?),
            EventKind::PtChunk => Event::PtChunk(pt_chunks.next(ns, &mut p)?),
            EventKind::Ebpf => match ebpf_events.next_ebpf(ns, v3)? {
                Ok(e) => Event::Ebpf(e),
                Err(software) => Event::PerfSoftware(software),
            },
            EventKind::PerfSoftware => Event::PerfSoftware(perf_software.next_software(ns)?),
            EventKind::LostEvents => Event::LostEvents(lost_events.next(ns)?),
            EventKind::Marker => Event::Marker(markers.next(ns)?),
            EventKind::Counter => Event::Counter(counters.next(ns)?),
            EventKind::Migration => Event::Migration(migrations.next(ns)?),
        };
        if want(event.kind()) {
            events.push(event);
        }
    }
    markers.finish()?;
    kernel_spans.finish()?;
    transfers.finish()?;
    step_boundaries.finish()?;
    snapshots.finish()?;
    perf_samples.finish()?;
    pt_chunks.finish()?;
    ebpf_events.finish()?;
    perf_software.finish()?;
    lost_events.finish()?;
    counters.finish()?;
    migrations.finish()?;
    Ok(DecodedBatch {
        events,
        first_string: b.get_first_string_id(),
        strings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Direction, KernelSpan, StepBoundary, Transfer, Transport};

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
                        rows: 12,
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
        let (spans, bytes): (usize, usize) =
            c.kernel_spans.duration_z.iter().fold((0, 0), |(n, b), z| {
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
