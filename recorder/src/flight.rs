//! Flight-recorder rings: per-thread, fixed-size, memory-mapped files of [`RawRecord`]s.
//!
//! One thread appends (the pipeline thread that owns the ring), one thread drains (the
//! endpoint's writer). Appending is one 128-byte copy and one release store: no lock, no
//! allocation, no system call. A full ring counts the record as lost instead of waiting.
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
//! 64   head u64  (records ever appended; written by the appender)
//! 72   lost u64  (records dropped because the ring was full; written by the appender)
//! 128  tail u64  (records ever drained; written by the drainer; own cache line)
//! 256  capacity × 128-byte record slots
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapRaw;
use slug_schema::{EventKind, RawRecord};

use crate::error::{RecorderError, Result};

const MAGIC: &[u8; 8] = b"SLUGRING";
const VERSION: u32 = 1;
const HEAD_AT: usize = 64;
const LOST_AT: usize = 72;
const TAIL_AT: usize = 128;
const SLOTS_AT: usize = 256;

/// Default ring capacity: 128 Ki records (16 MiB). A ring keeps its records until the log
/// frame holding them is written (64 Ki events), so it holds a frame being filled plus one
/// being encoded before the writer has to cut a frame early.
pub const DEFAULT_RING_RECORDS: usize = 1 << 17;

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
    /// Records ever passed to the drainer (it alone touches this): records between `tail` and
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
    /// Creates the ring file at `path` (truncating any old one) holding `capacity` records,
    /// rounded up to a power of two.
    pub fn create(
        path: impl AsRef<Path>,
        endpoint: u32,
        thread: u32,
        tid: u32,
        capacity: usize,
    ) -> Result<FlightRing> {
        let path = path.as_ref().to_path_buf();
        let capacity = capacity.max(1).next_power_of_two();
        let len = SLOTS_AT + capacity * RawRecord::SIZE;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| RecorderError::io(&path, e))?;
        // Reserve the blocks now, so a full disk fails here and not as SIGBUS on a later append.
        if let Err(e) = reserve(&file, len as u64) {
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

    /// Appends `record`; `false` (and one more lost record) if the ring is full.
    ///
    /// Only one thread may append to a ring (the recorder gives each thread its own).
    #[inline]
    pub fn append(&self, record: &RawRecord) -> bool {
        let head = self.word(HEAD_AT).load(Ordering::Relaxed);
        let tail = self.word(TAIL_AT).load(Ordering::Acquire);
        if head - tail >= self.capacity {
            let lost = self.word(LOST_AT);
            lost.store(lost.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            return false;
        }
        let slot = SLOTS_AT + (head & self.mask) as usize * RawRecord::SIZE;
        // SAFETY: the slot is inside the mapping, and it is free: the drainer has released it
        // (tail > head - capacity) and will not read it before the release store below. It is
        // 8-aligned (page-aligned mapping, 256-byte header, 128-byte slots), and `RawRecord` is
        // `repr(C)` without padding, laid out byte for byte as `RawRecord::to_bytes` writes it,
        // so one direct store replaces a copy through a byte array.
        unsafe {
            self.map
                .as_mut_ptr()
                .add(slot)
                .cast::<RawRecord>()
                .write(*record);
        }
        self.word(HEAD_AT).store(head + 1, Ordering::Release);
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
    /// slots, so they stay recoverable until the caller has them on disk; returns how many and
    /// the position to [`FlightRing::release`] up to. Only one thread may drain a ring.
    pub fn read_pending(&self, mut sink: impl FnMut(RawRecord)) -> (usize, u64) {
        let released = self.word(TAIL_AT).load(Ordering::Relaxed);
        let tail = self.read.load(Ordering::Relaxed).max(released);
        let head = self.word(HEAD_AT).load(Ordering::Acquire);
        self.read.store(head, Ordering::Relaxed);
        let mut bytes = [0u8; RawRecord::SIZE];
        for i in tail..head {
            let slot = SLOTS_AT + (i & self.mask) as usize * RawRecord::SIZE;
            // SAFETY: slots tail..head were published by the appender's release store of head
            // (acquired above) and stay untouched until tail moves past them.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.map.as_ptr().add(slot),
                    bytes.as_mut_ptr(),
                    RawRecord::SIZE,
                );
            }
            sink(RawRecord::from_bytes(&bytes));
        }
        ((head - tail) as usize, head)
    }

    /// Records appended and not yet released (drained or not): how full the ring is.
    pub fn unreleased(&self) -> u64 {
        let tail = self.word(TAIL_AT).load(Ordering::Relaxed);
        let head = self.word(HEAD_AT).load(Ordering::Acquire);
        head.saturating_sub(tail)
    }

    /// Records the ring holds at most.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Records dropped so far because the ring was full.
    pub fn lost(&self) -> u64 {
        self.word(LOST_AT).load(Ordering::Relaxed)
    }
}

/// Bytes of a ring file holding `capacity` records (rounded up to a power of two, as
/// [`FlightRing::create`] does): all preallocated when the ring is created.
pub fn ring_file_len(capacity: usize) -> u64 {
    (SLOTS_AT + capacity.max(1).next_power_of_two() * RawRecord::SIZE) as u64
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

/// The largest ring capacity a ring file may claim (128 MiB of records); the recorder's rings
/// are far smaller, so a larger claim is damage, not a reason to read or allocate that much.
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
    if u32_at(8) != VERSION {
        return Err(bad(format!("unknown version {}", u32_at(8))));
    }
    let (endpoint, capacity, thread) = (u32_at(12), u64_at(16), u32_at(24));
    let (head, lost, tail) = (u64_at(HEAD_AT), u64_at(LOST_AT), u64_at(TAIL_AT));
    if capacity == 0 || capacity > MAX_RING_RECORDS {
        return Err(bad(format!(
            "capacity {capacity} records is outside 1..={MAX_RING_RECORDS}"
        )));
    }
    if file_len < SLOTS_AT as u64 + capacity * RawRecord::SIZE as u64 {
        return Err(bad(format!(
            "{file_len} bytes, shorter than its capacity of {capacity} records"
        )));
    }
    if tail > head || head - tail > capacity {
        return Err(bad(format!("head {head} and tail {tail} are inconsistent")));
    }
    let mut records = Vec::with_capacity((head - tail) as usize);
    for i in tail..head {
        let at = SLOTS_AT as u64 + (i % capacity) * RawRecord::SIZE as u64;
        let mut b = [0u8; RawRecord::SIZE];
        file.read_exact_at(&mut b, at)
            .map_err(|e| RecorderError::io(path, e))?;
        let r = RawRecord::from_bytes(&b);
        // A record with an impossible kind was never written whole; nothing after it is trusted.
        if EventKind::from_u8(r.kind_byte()).is_none() {
            break;
        }
        records.push(r);
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
    use slug_schema::{Event, Marker, StepBoundary};

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

    #[test]
    fn appends_drain_in_order_across_wraparound() {
        let dir = tempfile::tempdir().unwrap();
        let ring = FlightRing::create(dir.path().join("r.ring"), 1, 0, 0, 8).unwrap();
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
        let ring = FlightRing::create(dir.path().join("r.ring"), 1, 0, 0, 4).unwrap();
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
        let ring = FlightRing::create(&path, 7, 2, 0, 8).unwrap();
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
                ring.append(&step(n));
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
        assert_eq!(steps(&rec.records), (0..500).collect::<Vec<_>>());
    }
}
