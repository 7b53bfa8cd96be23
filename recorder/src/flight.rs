//! Flight-recorder rings: per-thread, fixed-size, memory-mapped files of 64-byte slots.
//!
//! One thread appends (the pipeline thread that owns the ring), one thread drains (the
//! endpoint's writer). Appending is one small copy and one release store: no lock, no
//! allocation, no system call. A full ring counts the record as lost instead of waiting.
//!
//! The frequent kind takes one slot: a kernel span is written as a compact 64-byte record
//! straight into its slot. Every other event is its 128-byte [`RawRecord`] over two slots (a
//! transfer's fields alone are 98 bytes). The first byte of a record's first slot says which:
//! [`SPAN_TAG`] or the event kind of a [`RawRecord`].
//!
//! The ring is a shared mapping of a file, so a record is in the page cache the moment it is
//! appended: if the process is killed (even by SIGKILL) everything appended and not yet
//! released is still in the file, and [`recover_ring`] reads it back. The endpoint writer
//! releases slots only once the log frame holding their records is written (as LTTng's
//! buffers do), so the ring is the journal: each event is encoded and compressed once, into
//! its frame.
//!
//! File layout (native endianness; a ring never leaves the machine that wrote it):
//!
//! ```text
//! 0    magic "SLUGRING", version u32, endpoint u32, capacity u64, thread u32, tid u32
//! 64   head u64  (slots ever filled; written by the appender)
//! 72   lost u64  (records dropped because the ring was full; written by the appender)
//! 128  tail u64  (slots ever released; written by the drainer; own cache line)
//! 256  capacity × 64-byte slots
//! ```
//!
//! Version 1 rings (older recorders) held one 128-byte [`RawRecord`] per slot and counted
//! records; [`recover_ring`] still reads them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapRaw;
use slug_schema::{Event, EventKind, KernelSpan, RawRecord};

use crate::error::{RecorderError, Result};

const MAGIC: &[u8; 8] = b"SLUGRING";
const VERSION: u32 = 2;
/// Version 1: one 128-byte [`RawRecord`] per slot, head and tail counting records.
const VERSION_RAW_SLOTS: u32 = 1;
const HEAD_AT: usize = 64;
const LOST_AT: usize = 72;
const TAIL_AT: usize = 128;
const SLOTS_AT: usize = 256;

/// Bytes of one slot.
pub const SLOT: usize = 64;
/// Slots a [`RawRecord`] takes.
const RAW_SLOTS: u64 = (RawRecord::SIZE / SLOT) as u64;

/// First byte of a compact kernel span's slot; a [`RawRecord`]'s first byte is its event kind,
/// always below [`EventKind::COUNT`].
pub const SPAN_TAG: u8 = 0xC5;
const _: () = assert!(SPAN_TAG as usize >= EventKind::COUNT);

/// Flag bit of a compact span: its output hash is present.
const SPAN_HASHED: u8 = 1;

/// A kernel span as one slot: every field of [`KernelSpan`], no padding the compiler adds.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(8))]
struct SpanSlot {
    tag: u8,
    flags: u8,
    spare: u16,
    kernel: u32,
    layer: u32,
    seq: u32,
    rows: u32,
    spare2: u32,
    step: u64,
    start_ns: u64,
    end_ns: u64,
    hash: [u64; 2],
}

const _: () = assert!(std::mem::size_of::<SpanSlot>() == SLOT);

impl SpanSlot {
    #[inline]
    fn new(s: &KernelSpan) -> SpanSlot {
        let h = s.output_hash.unwrap_or(0);
        SpanSlot {
            tag: SPAN_TAG,
            flags: if s.output_hash.is_some() {
                SPAN_HASHED
            } else {
                0
            },
            spare: 0,
            kernel: s.kernel,
            // The log cannot hold `Some(u32::MAX)` either (it reads back as `None`).
            layer: s.layer.unwrap_or(u32::MAX),
            seq: s.seq,
            rows: s.rows,
            spare2: 0,
            step: s.step,
            start_ns: s.start_ns,
            end_ns: s.end_ns,
            hash: [h as u64, (h >> 64) as u64],
        }
    }

    /// The slot's span from its bytes (any bytes are some span).
    fn read(b: &[u8]) -> KernelSpan {
        let u32_at = |at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
        let layer = u32_at(8);
        KernelSpan {
            kernel: u32_at(4),
            layer: (layer != u32::MAX).then_some(layer),
            seq: u32_at(12),
            rows: u32_at(16),
            step: u64_at(24),
            start_ns: u64_at(32),
            end_ns: u64_at(40),
            output_hash: (b[1] & SPAN_HASHED != 0)
                .then(|| u128::from(u64_at(48)) | u128::from(u64_at(56)) << 64),
        }
    }
}

/// Default ring capacity: 256 Ki slots (16 MiB), 256 Ki spans or 128 Ki other records. A ring
/// keeps its records until the log frame holding them is written (64 Ki events), so it holds a
/// frame being filled plus one being encoded before the writer has to cut a frame early.
pub const DEFAULT_RING_RECORDS: usize = 1 << 18;

/// A flight-recorder ring in a memory-mapped file.
#[derive(Debug)]
pub struct FlightRing {
    path: PathBuf,
    map: MmapRaw,
    capacity: u64,
    /// `capacity - 1`: capacity is a power of two, so a slot index is a mask, not a division
    /// (a 64-bit divide was a third of the append's cost). Slot `i % capacity` either way, so
    /// readers of the file need not know.
    mask: u64,
    /// Slots ever passed to the drainer (it alone touches this): records between `tail` and
    /// here are read, not yet released, and are not read again.
    read: AtomicU64,
}

// SAFETY: the mapping is shared memory; every field the two sides touch is an atomic (head,
// lost, tail) or a slot published by a release store of `head` and reclaimed by a release store
// of `tail`. The single-appender / single-drainer discipline is documented on the methods.
unsafe impl Send for FlightRing {}
// SAFETY: see `Send`.
unsafe impl Sync for FlightRing {}

impl FlightRing {
    /// Creates the ring file at `path` (truncating any old one) holding `capacity` 64-byte
    /// slots, rounded up to a power of two (at least 2: one record of any kind).
    pub fn create(
        path: impl AsRef<Path>,
        endpoint: u32,
        thread: u32,
        tid: u32,
        capacity: usize,
    ) -> Result<FlightRing> {
        let path = path.as_ref().to_path_buf();
        let capacity = capacity.max(RAW_SLOTS as usize).next_power_of_two();
        let len = ring_file_len(capacity);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| RecorderError::io(&path, e))?;
        // Reserve the blocks now, so a full disk fails here and not as SIGBUS on a later append.
        if let Err(e) = reserve(&file, len) {
            // This call created (or truncated) the file: leave no empty ring behind.
            let _ = std::fs::remove_file(&path);
            return Err(RecorderError::io(&path, e));
        }
        let map = MmapRaw::map_raw(&file).map_err(|e| RecorderError::io(&path, e))?;
        let ring = FlightRing {
            path,
            map,
            capacity: capacity as u64,
            mask: capacity as u64 - 1,
            read: AtomicU64::new(0),
        };
        let mut meta = [0u8; 32];
        meta[..8].copy_from_slice(MAGIC);
        meta[8..12].copy_from_slice(&VERSION.to_ne_bytes());
        meta[12..16].copy_from_slice(&endpoint.to_ne_bytes());
        meta[16..24].copy_from_slice(&(capacity as u64).to_ne_bytes());
        meta[24..28].copy_from_slice(&thread.to_ne_bytes());
        meta[28..32].copy_from_slice(&tid.to_ne_bytes());
        // SAFETY: the mapping is at least SLOTS_AT bytes long and nobody else sees it yet.
        unsafe { std::ptr::copy_nonoverlapping(meta.as_ptr(), ring.map.as_mut_ptr(), meta.len()) };
        Ok(ring)
    }

    /// The ring file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn word(&self, at: usize) -> &AtomicU64 {
        // SAFETY: `at` is one of the 8-aligned header offsets inside the page-aligned mapping,
        // which lives as long as `self`; AtomicU64 has u64's layout.
        unsafe { &*self.map.as_ptr().add(at).cast::<AtomicU64>() }
    }

    /// The position of `slots` free slots, or `None` (and one more lost record) if the ring
    /// does not have them.
    #[inline]
    fn reserve_slots(&self, slots: u64) -> Option<u64> {
        let head = self.word(HEAD_AT).load(Ordering::Relaxed);
        let tail = self.word(TAIL_AT).load(Ordering::Acquire);
        if head - tail > self.capacity - slots {
            let lost = self.word(LOST_AT);
            lost.store(lost.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            return None;
        }
        Some(head)
    }

    /// The address of slot position `at`.
    #[inline]
    fn slot(&self, at: u64) -> *mut u8 {
        // SAFETY: the slot index is below capacity, so the slot is inside the mapping.
        unsafe {
            self.map
                .as_mut_ptr()
                .add(SLOTS_AT + (at & self.mask) as usize * SLOT)
        }
    }

    /// Appends `event`: a kernel span as one compact slot, any other kind as its
    /// [`RawRecord`]; `false` (and one more lost record) if the ring is full.
    ///
    /// Only one thread may append to a ring (the recorder gives each thread its own).
    #[inline]
    pub fn append_event(&self, event: &Event) -> bool {
        match event {
            Event::KernelSpan(s) => self.append_span(s),
            other => self.append(&RawRecord::from_event(other)),
        }
    }

    /// Appends a kernel span as one compact slot; `false` (and one more lost record) if the
    /// ring is full. Only one thread may append to a ring.
    #[inline]
    pub fn append_span(&self, span: &KernelSpan) -> bool {
        let Some(head) = self.reserve_slots(1) else {
            return false;
        };
        // SAFETY: the slot is free: the drainer has released it and will not read it before
        // the release store below. It is 8-aligned (page-aligned mapping, 256-byte header,
        // 64-byte slots) and `SpanSlot` is `repr(C)` of plain integers.
        unsafe {
            self.slot(head)
                .cast::<SpanSlot>()
                .write(SpanSlot::new(span))
        };
        self.word(HEAD_AT).store(head + 1, Ordering::Release);
        true
    }

    /// Appends `record` (two slots); `false` (and one more lost record) if the ring is full.
    ///
    /// Only one thread may append to a ring (the recorder gives each thread its own).
    #[inline]
    pub fn append(&self, record: &RawRecord) -> bool {
        let Some(head) = self.reserve_slots(RAW_SLOTS) else {
            return false;
        };
        // SAFETY: both slots are free (see `append_span`) and 8-aligned; `RawRecord` is
        // `repr(C)` without padding, laid out byte for byte as `RawRecord::to_bytes` writes it.
        // Its halves go to slots `head` and `head + 1`, which are adjacent unless `head` is the
        // last slot of the ring.
        unsafe {
            if head & self.mask != self.mask {
                self.slot(head).cast::<RawRecord>().write(*record);
            } else {
                let bytes = record.to_bytes();
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.slot(head), SLOT);
                std::ptr::copy_nonoverlapping(bytes[SLOT..].as_ptr(), self.slot(head + 1), SLOT);
            }
        }
        self.word(HEAD_AT)
            .store(head + RAW_SLOTS, Ordering::Release);
        true
    }

    /// Passes every appended, undrained record to `sink` in order and frees their slots;
    /// returns how many. Only one thread may drain a ring.
    pub fn drain(&self, sink: impl FnMut(RawRecord)) -> usize {
        let (n, upto) = self.read_pending(sink);
        self.release(upto);
        n
    }

    /// Frees the slots of every record before position `upto` (from [`FlightRing::read_pending`]);
    /// positions only move forward, so releases may come late or twice.
    pub fn release(&self, upto: u64) {
        let tail = self.word(TAIL_AT);
        if upto > tail.load(Ordering::Relaxed) {
            tail.store(upto, Ordering::Release);
        }
    }

    /// Passes every appended record not read before to `sink` in order without freeing their
    /// slots, so they stay recoverable until the caller has them on disk; returns how many
    /// records and the position to [`FlightRing::release`] up to. Only one thread may drain a
    /// ring.
    pub fn read_pending(&self, mut sink: impl FnMut(RawRecord)) -> (usize, u64) {
        let released = self.word(TAIL_AT).load(Ordering::Relaxed);
        let from = self.read.load(Ordering::Relaxed).max(released);
        let head = self.word(HEAD_AT).load(Ordering::Acquire);
        self.read.store(head, Ordering::Relaxed);
        let mut n = 0;
        let mut at = from;
        while at < head {
            let mut bytes = [0u8; RawRecord::SIZE];
            // SAFETY: slots from..head were published by the appender's release store of head
            // (acquired above) and stay untouched until tail moves past them; the appender wrote
            // whole records, so a record's second slot is below head too.
            unsafe { std::ptr::copy_nonoverlapping(self.slot(at), bytes.as_mut_ptr(), SLOT) };
            let (record, slots) = if bytes[0] == SPAN_TAG {
                (span_record(&bytes[..SLOT]), 1)
            } else {
                // SAFETY: as above.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.slot(at + 1),
                        bytes[SLOT..].as_mut_ptr(),
                        SLOT,
                    )
                };
                (RawRecord::from_bytes(&bytes), RAW_SLOTS)
            };
            sink(record);
            n += 1;
            at += slots;
        }
        (n, head)
    }

    /// Slots filled and not yet released (drained or not): how full the ring is.
    pub fn unreleased(&self) -> u64 {
        let tail = self.word(TAIL_AT).load(Ordering::Relaxed);
        let head = self.word(HEAD_AT).load(Ordering::Acquire);
        head.saturating_sub(tail)
    }

    /// Slots the ring holds.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Records dropped so far because the ring was full.
    pub fn lost(&self) -> u64 {
        self.word(LOST_AT).load(Ordering::Relaxed)
    }
}

/// The [`RawRecord`] of a compact span slot.
fn span_record(slot: &[u8]) -> RawRecord {
    RawRecord::from_event(&Event::KernelSpan(SpanSlot::read(slot)))
}

/// Bytes of a ring file holding `capacity` slots (rounded up to a power of two, as
/// [`FlightRing::create`] does): all preallocated when the ring is created.
pub fn ring_file_len(capacity: usize) -> u64 {
    (SLOTS_AT + capacity.max(RAW_SLOTS as usize).next_power_of_two() * SLOT) as u64
}

fn reserve(file: &std::fs::File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open fd.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    match rc {
        0 => Ok(()),
        // File systems without fallocate: write the zeros, so the blocks exist (and a full
        // disk fails here) before the file is mapped; a mapping's lazy block would be SIGBUS.
        libc::EOPNOTSUPP | libc::EINVAL => {
            use std::os::unix::fs::FileExt;
            let zeros = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < len {
                let n = (len - at).min(zeros.len() as u64);
                file.write_all_at(&zeros[..n as usize], at)?;
                at += n;
            }
            Ok(())
        }
        err => Err(std::io::Error::from_raw_os_error(err)),
    }
}

/// What a ring file held when read back after its process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredRing {
    /// Endpoint whose thread wrote it.
    pub endpoint: u32,
    /// Thread index within the endpoint.
    pub thread: u32,
    /// Records appended but never drained, in order.
    pub records: Vec<RawRecord>,
    /// Records the ring dropped because it was full (all of the ring's life).
    pub lost: u64,
}

/// The largest ring capacity a ring file may claim, in slots (64 MiB of 64-byte slots; a
/// version 1 ring's slots were 128 bytes). `slug record --ring-records` stays within it, so a
/// larger claim is damage, not a reason to read or allocate that much.
pub const MAX_RING_RECORDS: u64 = 1 << 20;

/// Reads the undrained records of a ring file left by a process that ended without draining it.
/// The file must be a regular file (a link is not followed); memory is bounded by
/// [`MAX_RING_RECORDS`] records.
pub fn recover_ring(path: impl AsRef<Path>) -> Result<RecoveredRing> {
    use std::os::unix::fs::FileExt;
    let path = path.as_ref();
    let file = crate::recover::open_regular(path)?;
    let bad = |problem: String| RecorderError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a readable flight-recorder ring: {problem}"),
        ),
    };
    let file_len = file
        .metadata()
        .map_err(|e| RecorderError::io(path, e))?
        .len();
    let mut header = [0u8; SLOTS_AT];
    if file_len < SLOTS_AT as u64 || file.read_exact_at(&mut header, 0).is_err() {
        return Err(bad(format!(
            "{file_len} bytes, shorter than the {SLOTS_AT}-byte header (killed while creating it)"
        )));
    }
    if &header[..8] != MAGIC {
        return Err(bad("wrong magic".into()));
    }
    let u32_at = |at: usize| u32::from_ne_bytes(header[at..at + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |at: usize| u64::from_ne_bytes(header[at..at + 8].try_into().unwrap_or([0; 8]));
    // Bytes per slot, and slots per record that is not a compact span.
    let (slot, raw_slots) = match u32_at(8) {
        VERSION => (SLOT as u64, RAW_SLOTS),
        VERSION_RAW_SLOTS => (RawRecord::SIZE as u64, 1),
        v => return Err(bad(format!("unknown version {v}"))),
    };
    let (endpoint, capacity, thread) = (u32_at(12), u64_at(16), u32_at(24));
    let (head, lost, tail) = (u64_at(HEAD_AT), u64_at(LOST_AT), u64_at(TAIL_AT));
    if capacity < raw_slots || capacity > MAX_RING_RECORDS {
        return Err(bad(format!(
            "capacity {capacity} slots is outside {raw_slots}..={MAX_RING_RECORDS}"
        )));
    }
    if file_len < SLOTS_AT as u64 + capacity * slot {
        return Err(bad(format!(
            "{file_len} bytes, shorter than its capacity of {capacity} slots"
        )));
    }
    if tail > head || head - tail > capacity {
        return Err(bad(format!("head {head} and tail {tail} are inconsistent")));
    }
    let mut records = Vec::with_capacity((head - tail) as usize);
    let slot_at = |i: u64| SLOTS_AT as u64 + (i % capacity) * slot;
    let mut at = tail;
    while at < head {
        let mut b = [0u8; RawRecord::SIZE];
        let first = &mut b[..slot as usize];
        file.read_exact_at(first, slot_at(at))
            .map_err(|e| RecorderError::io(path, e))?;
        if raw_slots > 1 && b[0] == SPAN_TAG {
            records.push(span_record(&b[..SLOT]));
            at += 1;
            continue;
        }
        // A record with an impossible kind, or one running past head, was never written whole;
        // nothing after it is trusted.
        if EventKind::from_u8(b[0]).is_none() || head - at < raw_slots {
            break;
        }
        if raw_slots > 1 {
            file.read_exact_at(&mut b[SLOT..], slot_at(at + 1))
                .map_err(|e| RecorderError::io(path, e))?;
        }
        records.push(RawRecord::from_bytes(&b));
        at += raw_slots;
    }
    Ok(RecoveredRing {
        endpoint,
        thread,
        records,
        lost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use slug_schema::{Marker, StepBoundary};

    fn step(n: u64) -> RawRecord {
        RawRecord::from_event(&Event::StepBoundary(StepBoundary {
            step: n,
            seq: 0,
            ns: n * 10,
        }))
    }

    fn steps(records: &[RawRecord]) -> Vec<u64> {
        records
            .iter()
            .map(|r| match r.to_event() {
                Some(Event::StepBoundary(s)) => s.step,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn span(n: u64) -> KernelSpan {
        KernelSpan {
            kernel: n as u32 % 7,
            layer: (!n.is_multiple_of(3)).then_some(n as u32 % 5),
            step: n / 11,
            seq: n as u32 % 4,
            rows: n as u32 % 9,
            start_ns: n * 100,
            end_ns: n * 100 + 42,
            output_hash: n.is_multiple_of(2).then_some(u128::MAX - u128::from(n)),
        }
    }

    /// Event `n` of a mixed stream: mostly spans, a step boundary now and then.
    fn mixed(n: u64) -> Event {
        if n % 4 == 3 {
            Event::StepBoundary(StepBoundary {
                step: n,
                seq: 1,
                ns: n,
            })
        } else {
            Event::KernelSpan(span(n))
        }
    }

    fn events(records: &[RawRecord]) -> Vec<Event> {
        records.iter().map(|r| r.to_event().unwrap()).collect()
    }

    #[test]
    fn a_compact_span_keeps_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let ring = FlightRing::create(dir.path().join("r.ring"), 1, 0, 0, 64).unwrap();
        let mut spans: Vec<KernelSpan> = (0..6).map(span).collect();
        spans.push(KernelSpan {
            kernel: u32::MAX,
            layer: Some(u32::MAX - 1),
            step: u64::MAX,
            seq: u32::MAX,
            rows: u32::MAX,
            start_ns: u64::MAX - 1,
            end_ns: u64::MAX,
            output_hash: Some(0),
        });
        for s in &spans {
            assert!(ring.append_span(s));
        }
        assert_eq!(ring.unreleased(), spans.len() as u64, "one slot each");
        let mut got = Vec::new();
        ring.drain(|r| got.push(r));
        let want: Vec<Event> = spans.iter().map(|s| Event::KernelSpan(*s)).collect();
        assert_eq!(events(&got), want);
    }

    #[test]
    fn spans_and_records_drain_in_order_when_a_record_wraps_around_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let ring = FlightRing::create(dir.path().join("r.ring"), 1, 0, 0, 8).unwrap();
        let mut got = Vec::new();
        let mut wrapped = 0;
        for n in 0..300 {
            let head = ring.word(HEAD_AT).load(Ordering::Relaxed);
            let e = mixed(n);
            if !matches!(e, Event::KernelSpan(_)) && head & ring.mask == ring.mask {
                wrapped += 1;
            }
            assert!(ring.append_event(&e), "event {n}");
            if n % 4 == 3 {
                ring.drain(|r| got.push(r));
            }
        }
        ring.drain(|r| got.push(r));
        assert!(wrapped > 0, "a two-slot record started in the last slot");
        assert_eq!(events(&got), (0..300).map(mixed).collect::<Vec<_>>());
        assert_eq!(ring.lost(), 0);
    }

    #[test]
    fn a_record_that_needs_two_slots_is_lost_when_one_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let ring = FlightRing::create(dir.path().join("r.ring"), 1, 0, 0, 4).unwrap();
        for n in 0..3 {
            assert!(ring.append_span(&span(n)));
        }
        assert!(!ring.append(&step(3)), "one slot left");
        assert!(ring.append_span(&span(4)), "a span still fits");
        assert!(!ring.append_span(&span(5)));
        assert_eq!(ring.lost(), 2);
        let mut got = Vec::new();
        ring.drain(|r| got.push(r));
        let want: Vec<Event> = [0, 1, 2, 4].map(|n| Event::KernelSpan(span(n))).to_vec();
        assert_eq!(events(&got), want);
    }

    #[test]
    fn appends_drain_in_order_across_wraparound() {
        let dir = tempfile::tempdir().unwrap();
        let ring = FlightRing::create(dir.path().join("r.ring"), 1, 0, 0, 16).unwrap();
        let mut got = Vec::new();
        for n in 0..100 {
            assert!(ring.append(&step(n)));
            if n % 5 == 4 {
                ring.drain(|r| got.push(r));
            }
        }
        assert_eq!(steps(&got), (0..100).collect::<Vec<_>>());
        assert_eq!(ring.lost(), 0);
    }

    #[test]
    fn a_full_ring_counts_losses_and_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let ring = FlightRing::create(dir.path().join("r.ring"), 1, 0, 0, 8).unwrap();
        let accepted = (0..10).filter(|&n| ring.append(&step(n))).count();
        assert_eq!(accepted, 4);
        assert_eq!(ring.lost(), 6);
        let mut got = Vec::new();
        ring.drain(|r| got.push(r));
        assert_eq!(steps(&got), [0, 1, 2, 3]);
        assert!(ring.append(&step(10)));
    }

    #[test]
    fn concurrent_appender_and_drainer_see_every_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let ring = std::sync::Arc::new(
            FlightRing::create(dir.path().join("r.ring"), 1, 0, 0, 64).unwrap(),
        );
        let n = 50_000u64;
        let appender = {
            let ring = std::sync::Arc::clone(&ring);
            std::thread::spawn(move || {
                for i in 0..n {
                    while !ring.append(&step(i)) {
                        std::thread::yield_now();
                    }
                }
            })
        };
        let mut got = Vec::with_capacity(n as usize);
        while got.len() < n as usize {
            if ring.drain(|r| got.push(r)) == 0 {
                std::thread::yield_now();
            }
        }
        appender.join().unwrap();
        assert_eq!(steps(&got), (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn undrained_records_are_recovered_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.ring");
        let ring = FlightRing::create(&path, 7, 2, 0, 32).unwrap();
        for n in 0..6 {
            ring.append(&step(n));
        }
        ring.drain(|_| {});
        for n in 6..12 {
            ring.append(&step(n));
        }
        let marker = RawRecord::from_event(&Event::Marker(Marker { text: 3, ns: 1 }));
        ring.append(&marker);
        // The process "dies" here: nothing drains the ring again.
        let rec = recover_ring(&path).unwrap();
        assert_eq!((rec.endpoint, rec.thread), (7, 2));
        assert_eq!(steps(&rec.records[..6]), [6, 7, 8, 9, 10, 11]);
        assert_eq!(rec.records[6], marker);
        assert!(recover_ring(dir.path().join("missing.ring")).is_err());
        std::fs::write(dir.path().join("junk.ring"), b"junk").unwrap();
        assert!(recover_ring(dir.path().join("junk.ring")).is_err());
    }

    #[test]
    fn undrained_spans_and_records_are_recovered_and_a_torn_record_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.ring");
        let ring = FlightRing::create(&path, 7, 2, 0, 16).unwrap();
        for n in 0..9 {
            ring.append_event(&mixed(n));
        }
        ring.drain(|_| {});
        for n in 9..20 {
            ring.append_event(&mixed(n));
        }
        let rec = recover_ring(&path).unwrap();
        assert_eq!(events(&rec.records), (9..20).map(mixed).collect::<Vec<_>>());
        // A head that ends inside a two-slot record (never published so by the appender):
        // everything before it is recovered, the torn record is not.
        let head = ring.word(HEAD_AT).load(Ordering::Relaxed);
        ring.word(HEAD_AT).store(head - 1, Ordering::Relaxed);
        let rec = recover_ring(&path).unwrap();
        assert_eq!(events(&rec.records), (9..19).map(mixed).collect::<Vec<_>>());
    }

    /// A ring left by an older recorder (version 1: a 128-byte record per slot) still reads.
    #[test]
    fn a_version_1_ring_is_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.ring");
        let capacity = 4u64;
        let mut bytes = vec![0u8; SLOTS_AT + capacity as usize * RawRecord::SIZE];
        bytes[..8].copy_from_slice(MAGIC);
        bytes[8..12].copy_from_slice(&VERSION_RAW_SLOTS.to_ne_bytes());
        bytes[12..16].copy_from_slice(&5u32.to_ne_bytes());
        bytes[16..24].copy_from_slice(&capacity.to_ne_bytes());
        // Records 0..6 appended, 0..3 released: 3, 4, 5 are left, 4 and 5 wrapped around.
        bytes[HEAD_AT..HEAD_AT + 8].copy_from_slice(&6u64.to_ne_bytes());
        bytes[TAIL_AT..TAIL_AT + 8].copy_from_slice(&3u64.to_ne_bytes());
        let span0 = Event::KernelSpan(span(0));
        for (n, e) in [(3, step(3).to_event().unwrap()), (4, span0), (5, mixed(5))] {
            let at = SLOTS_AT + (n % 4) * RawRecord::SIZE;
            bytes[at..at + RawRecord::SIZE].copy_from_slice(&RawRecord::from_event(&e).to_bytes());
        }
        std::fs::write(&path, &bytes).unwrap();
        let rec = recover_ring(&path).unwrap();
        assert_eq!(rec.endpoint, 5);
        assert_eq!(
            events(&rec.records),
            [step(3).to_event().unwrap(), span0, mixed(5)]
        );
    }

    #[test]
    fn a_damaged_ring_header_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.ring");
        FlightRing::create(&path, 1, 0, 0, 8).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[16..24].copy_from_slice(&(1u64 << 57).to_ne_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = recover_ring(&path).unwrap_err().to_string();
        assert!(err.contains("capacity"), "{err}");
        std::fs::write(&path, b"").unwrap();
        let err = recover_ring(&path).unwrap_err().to_string();
        assert!(err.contains("0 bytes"), "{err}");
        let link = dir.path().join("link.ring");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(recover_ring(&link).is_err(), "a link is not followed");
    }

    /// A child process appends and is killed with SIGKILL; its records are in the file.
    #[test]
    fn records_survive_sigkill_of_the_appending_process() {
        if let Ok(path) = std::env::var("SLUG_RING_CHILD") {
            let ring = FlightRing::create(&path, 3, 0, 0, 1024).unwrap();
            for n in 0..500 {
                ring.append_event(&mixed(n));
            }
            std::fs::write(format!("{path}.ready"), b"").unwrap();
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("child.ring");
        let exe = std::env::current_exe().unwrap();
        let mut child = std::process::Command::new(exe)
            .args([
                "--exact",
                "flight::tests::records_survive_sigkill_of_the_appending_process",
                "--nocapture",
            ])
            .env("SLUG_RING_CHILD", &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let ready = dir.path().join("child.ring.ready");
        let start = std::time::Instant::now();
        while !ready.exists() {
            assert!(start.elapsed().as_secs() < 30, "child never got ready");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let rec = recover_ring(&path).unwrap();
        assert_eq!(
            events(&rec.records),
            (0..500).map(mixed).collect::<Vec<_>>()
        );
    }
}
