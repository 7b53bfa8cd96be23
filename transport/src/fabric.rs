//! Pooled fabric memory: one byte region (process heap or a shared memory-mapped file) holding
//! every link's slot ring, the abort word and per-stage progress, with futex-based blocking waits.
//!
//! Layout (all offsets fixed by the [`FabricLayout`], identical in every process that maps it):
//! a 4 KiB header (magic, version, size, abort word, stage progress), then per link a ring
//! header (head / tail counters on their own cache lines, each with a waiter count) followed by
//! `slots` slots of a 64-byte slot header plus `capacity` bytes. A ring has one sender and one
//! receiver: the sender alone advances `head`, the receiver alone advances `tail`. The ring
//! header also holds a waiting receiver's post for direct placement (`Ring::post_and_wait`).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memmap2::MmapMut;

use crate::error::{Result, TransportError};
use crate::transfer::TransferHeader;

const MAGIC: u64 = u64::from_le_bytes(*b"SLUGFAB1");
const FABRIC_VERSION: u32 = 2;
const HEADER_BYTES: usize = 4096;
const ABORT_AT: usize = 64;
const PROGRESS_AT: usize = 128;
/// Stages whose progress the header can hold.
pub const MAX_STAGES: usize = 256;
const RING_HEADER_BYTES: usize = 256;
/// Offsets in a ring header of a waiting receiver's direct-placement post (see [`Ring::post_and_wait`]).
const POST_STATE: usize = 128;
const POST_PID: usize = 132;
const POST_ADDR: usize = 136;
const POST_LEN: usize = 144;
const POST_ARENA: usize = 152;
const POST_HEADER: usize = 192;
/// Post states: no post, a receiver waits with its arena, a sender is copying into it, done.
const IDLE: u32 = 0;
const POSTED: u32 = 1;
const CLAIMED: u32 = 2;
const DONE: u32 = 3;
const SLOT_HEADER_BYTES: usize = TransferHeader::LEN;
/// A waiter spins this long (a peer mid-copy usually finishes within it, and a futex wake-up
/// costs several microseconds), then yields the CPU until [`YIELD_FOR`], then sleeps on the futex.
const SPIN_FOR: Duration = Duration::from_micros(20);
const YIELD_FOR: Duration = Duration::from_micros(200);
/// Longest single futex sleep: bounds how late an abort or a lost wake-up is noticed.
const SLEEP_SLICE: Duration = Duration::from_millis(10);

/// Shape of one ring: how many messages it buffers and how large each may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSpec {
    /// Messages that can be in flight on the link.
    pub slots: u32,
    /// Largest message in bytes.
    pub capacity: u64,
}

/// Where every ring lives in the fabric region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FabricLayout {
    rings: Vec<(usize, RingSpec)>,
    total: usize,
}

fn round64(n: usize) -> usize {
    n.div_ceil(64) * 64
}

impl FabricLayout {
    /// Lays out rings one after another after the header.
    pub fn new(specs: &[RingSpec]) -> Result<Self> {
        let mut at = HEADER_BYTES;
        let mut rings = Vec::with_capacity(specs.len());
        for spec in specs {
            if spec.slots == 0 || spec.capacity == 0 {
                return Err(TransportError::Config(
                    "a link needs at least one slot of at least one byte".into(),
                ));
            }
            let cap = usize::try_from(spec.capacity).map_err(|_| {
                TransportError::Config(format!("slot capacity {} too large", spec.capacity))
            })?;
            rings.push((at, *spec));
            at += RING_HEADER_BYTES + spec.slots as usize * (SLOT_HEADER_BYTES + round64(cap));
        }
        Ok(Self { rings, total: at })
    }

    /// Bytes the whole fabric occupies.
    pub fn total_bytes(&self) -> usize {
        self.total
    }

    /// Number of rings.
    pub fn rings(&self) -> usize {
        self.rings.len()
    }
}

/// The memory `Fabric::base` points into, owned so that it lives as long as the fabric.
enum Backing {
    Heap(Box<[u64]>),
    Mapped { map: MmapMut, path: PathBuf },
}

/// A fabric region, shared by the threads (heap) or processes (mapped file) of one pipeline.
pub struct Fabric {
    base: *mut u8,
    layout: FabricLayout,
    backing: Backing,
}

// SAFETY: all shared mutable state in the region is either atomics or slot bytes whose exclusive
// ownership is handed between exactly one sender and one receiver by the ring protocol.
unsafe impl Send for Fabric {}
// SAFETY: as above.
unsafe impl Sync for Fabric {}

impl std::fmt::Debug for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = match &self.backing {
            Backing::Heap(words) => format!("heap, {} bytes", words.len() * 8),
            Backing::Mapped { map, path } => format!("{}, {} bytes", path.display(), map.len()),
        };
        f.debug_struct("Fabric")
            .field("backing", &place)
            .field("bytes", &self.layout.total)
            .field("rings", &self.layout.rings.len())
            .finish()
    }
}

impl Fabric {
    /// A fabric in this process's memory, for stages that are threads.
    pub fn heap(layout: FabricLayout) -> Self {
        let mut words = vec![0u64; layout.total.div_ceil(8)].into_boxed_slice();
        let base = words.as_mut_ptr().cast::<u8>();
        let fabric = Self {
            base,
            layout,
            backing: Backing::Heap(words),
        };
        fabric.write_header();
        fabric
    }

    /// Creates the shared fabric file at `path` (the coordinator does this once per run).
    pub fn create(path: &Path, layout: FabricLayout) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        // Activations cross this file: only the user running the pipeline may map it.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| TransportError::io(format!("create fabric file {}", path.display()), e))?;
        file.set_len(layout.total as u64).map_err(|e| {
            TransportError::io(
                format!(
                    "size fabric file {} to {} bytes",
                    path.display(),
                    layout.total
                ),
                e,
            )
        })?;
        let fabric = Self::map(file, path, layout)?;
        fabric.write_header();
        Ok(fabric)
    }

    /// Maps an existing fabric file created by [`Fabric::create`] with the same layout.
    pub fn open(path: &Path, layout: FabricLayout) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| TransportError::io(format!("open fabric file {}", path.display()), e))?;
        let fabric = Self::map(file, path, layout)?;
        let magic = fabric.word64(0).load(Ordering::Acquire);
        let version = fabric.word32(8).load(Ordering::Acquire);
        let total = fabric.word64(16).load(Ordering::Acquire);
        if magic != MAGIC || version != FABRIC_VERSION || total != fabric.layout.total as u64 {
            return Err(TransportError::Config(format!(
                "fabric file {} does not match this run (magic {magic:#x}, version {version}, \
                 {total} bytes; expected version {FABRIC_VERSION}, {} bytes)",
                path.display(),
                fabric.layout.total
            )));
        }
        Ok(fabric)
    }

    fn map(file: File, path: &Path, layout: FabricLayout) -> Result<Self> {
        let len = file
            .metadata()
            .map_err(|e| TransportError::io(format!("stat fabric file {}", path.display()), e))?
            .len();
        if len < layout.total as u64 {
            return Err(TransportError::Config(format!(
                "fabric file {} has {len} bytes, the run needs {}",
                path.display(),
                layout.total
            )));
        }
        // SAFETY: the file is private to this run (created by its coordinator); every process
        // maps it whole and touches it only through the ring protocol and atomics.
        let mut map = unsafe { MmapMut::map_mut(&file) }
            .map_err(|e| TransportError::io(format!("map fabric file {}", path.display()), e))?;
        let base = map.as_mut_ptr();
        Ok(Self {
            base,
            layout,
            backing: Backing::Mapped {
                map,
                path: path.to_path_buf(),
            },
        })
    }

    fn write_header(&self) {
        self.word32(8).store(FABRIC_VERSION, Ordering::Relaxed);
        self.word64(16)
            .store(self.layout.total as u64, Ordering::Relaxed);
        self.word64(0).store(MAGIC, Ordering::Release);
    }

    fn word32(&self, at: usize) -> &AtomicU32 {
        debug_assert!(at.is_multiple_of(4) && at + 4 <= self.layout.total);
        // SAFETY: `at` is 4-aligned inside the region (layout offsets are multiples of 64) and
        // the region outlives `self`; the word is only ever accessed atomically.
        unsafe { &*self.base.add(at).cast::<AtomicU32>() }
    }

    fn word64(&self, at: usize) -> &AtomicU64 {
        debug_assert!(at.is_multiple_of(8) && at + 8 <= self.layout.total);
        // SAFETY: as in `word32`, with 8-byte alignment.
        unsafe { &*self.base.add(at).cast::<AtomicU64>() }
    }

    /// The layout this fabric was built with.
    pub fn layout(&self) -> &FabricLayout {
        &self.layout
    }

    /// Marks the run aborted and wakes every waiter so that each notices within one sleep slice.
    pub fn abort(&self) {
        self.word32(ABORT_AT).store(1, Ordering::SeqCst);
        for ring in 0..self.layout.rings.len() {
            let r = self.ring(ring);
            futex_wake(r.head());
            futex_wake(r.tail());
        }
    }

    /// True once [`Fabric::abort`] was called by any process sharing the fabric.
    pub fn aborted(&self) -> bool {
        self.word32(ABORT_AT).load(Ordering::SeqCst) != 0
    }

    /// Publishes how far `stage` got (an opaque counter, e.g. its step), read back by the coordinator.
    pub fn set_progress(&self, stage: usize, value: u64) {
        if stage < MAX_STAGES {
            self.word64(PROGRESS_AT + 8 * stage)
                .store(value, Ordering::Relaxed);
        }
    }

    /// Reads what [`Fabric::set_progress`] last stored for `stage`.
    pub fn progress(&self, stage: usize) -> u64 {
        if stage < MAX_STAGES {
            self.word64(PROGRESS_AT + 8 * stage).load(Ordering::Relaxed)
        } else {
            0
        }
    }

    pub(crate) fn ring(&self, index: usize) -> Ring<'_> {
        let (at, spec) = self.layout.rings[index];
        Ring {
            fabric: self,
            at,
            spec,
        }
    }
}

/// One single-producer single-consumer ring inside a fabric.
pub(crate) struct Ring<'f> {
    fabric: &'f Fabric,
    at: usize,
    spec: RingSpec,
}

/// Why a wait ended without its condition.
pub(crate) enum WaitFailure {
    Aborted,
    TimedOut(Duration),
}

impl Ring<'_> {
    fn head(&self) -> &AtomicU32 {
        self.fabric.word32(self.at)
    }
    fn head_waiters(&self) -> &AtomicU32 {
        self.fabric.word32(self.at + 4)
    }
    fn tail(&self) -> &AtomicU32 {
        self.fabric.word32(self.at + 64)
    }
    fn tail_waiters(&self) -> &AtomicU32 {
        self.fabric.word32(self.at + 68)
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.spec.capacity
    }

    /// Receiver side of direct placement. With nothing queued, the waiting receiver posts its
    /// destination arena (`dst`, registered as `arena`) in the ring header, so that a sender
    /// finding the ring drained copies the next transfer straight into it: one copy instead of
    /// two. Returns the transfer's header when it landed that way, `None` when a queued slot
    /// message is there to take instead. `dst` stays exclusively borrowed for the whole call and
    /// the post is withdrawn (or the sender's copy finished) before returning, so the sender
    /// writes into it only while the receiver is blocked here and does not touch it.
    pub(crate) fn post_and_wait(
        &self,
        timeout: Duration,
        arena: u32,
        dst: &mut [u8],
    ) -> std::result::Result<Option<TransferHeader>, WaitFailure> {
        let tail = self.tail().load(Ordering::Relaxed);
        if self.head().load(Ordering::Acquire) != tail {
            return Ok(None);
        }
        let state = self.fabric.word32(self.at + POST_STATE);
        self.fabric
            .word32(self.at + POST_PID)
            .store(std::process::id(), Ordering::Relaxed);
        self.fabric.word64(self.at + POST_ADDR).store(
            dst.as_mut_ptr().expose_provenance() as u64,
            Ordering::Relaxed,
        );
        self.fabric
            .word64(self.at + POST_LEN)
            .store(dst.len() as u64, Ordering::Relaxed);
        self.fabric
            .word32(self.at + POST_ARENA)
            .store(arena, Ordering::Relaxed);
        state.store(POSTED, Ordering::SeqCst);
        let waited = wait_until(
            self.fabric,
            || self.head().load(Ordering::Acquire) != tail || state.load(Ordering::Acquire) == DONE,
            self.head(),
            self.head_waiters(),
            timeout,
        );
        loop {
            match state.compare_exchange(POSTED, IDLE, Ordering::SeqCst, Ordering::SeqCst) {
                // Withdrawn before any sender claimed it: a slot message came, or the wait failed.
                Ok(_) => return waited.map(|()| None),
                Err(DONE) => {
                    let mut raw = [0u8; SLOT_HEADER_BYTES];
                    // SAFETY: the header area lies inside this ring's header; the sender wrote it
                    // before publishing DONE, and nobody writes it again until the next post.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            self.fabric.base.add(self.at + POST_HEADER),
                            raw.as_mut_ptr(),
                            SLOT_HEADER_BYTES,
                        )
                    };
                    state.store(IDLE, Ordering::SeqCst);
                    return Ok(Some(TransferHeader::decode(&raw)));
                }
                // A sender is mid-copy into `dst`: a bounded memcpy, unless the run was aborted
                // because that sender's process died, which cannot write any more.
                Err(CLAIMED) if self.fabric.aborted() => return Err(WaitFailure::Aborted),
                Err(CLAIMED) => std::thread::yield_now(),
                Err(_) => return waited.map(|()| None),
            }
        }
    }

    /// Sender side of the rendezvous before direct placement: waits at most `budget` (never
    /// sleeping, and not once the run is aborted) for a receiver to post its arena, so that
    /// [`Ring::try_direct`] can copy the transfer once instead of staging it in slots (a copy
    /// on each side). True when a post is there.
    pub(crate) fn await_post(&self, budget: Duration) -> bool {
        let state = self.fabric.word32(self.at + POST_STATE);
        let posted = || state.load(Ordering::Acquire) == POSTED;
        posted() || poll_until(self.fabric, posted, Instant::now(), budget)
    }

    /// Sender side of direct placement: if the receiver waits with a post for `header.dst_arena`
    /// that holds the destination range, and every earlier message was consumed, copies
    /// `payload` straight into the receiver's arena and completes the transfer. Returns false
    /// (nothing delivered) when the slot path must carry the transfer; `direct` is cleared when
    /// the operating system refuses cross-process copies, so later transfers do not retry.
    pub(crate) fn try_direct(
        &self,
        header: &TransferHeader,
        payload: &[u8],
        direct: &mut bool,
    ) -> bool {
        let state = self.fabric.word32(self.at + POST_STATE);
        if !*direct
            || state.load(Ordering::SeqCst) != POSTED
            || self.tail().load(Ordering::Acquire) != self.head().load(Ordering::Relaxed)
        {
            return false;
        }
        if state
            .compare_exchange(POSTED, CLAIMED, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return false;
        }
        // Read the post only once claimed: the receiver cannot change or withdraw it now.
        let arena = self
            .fabric
            .word32(self.at + POST_ARENA)
            .load(Ordering::Relaxed);
        let len = self
            .fabric
            .word64(self.at + POST_LEN)
            .load(Ordering::Relaxed);
        let fits = header
            .dst_off
            .checked_add(payload.len() as u64)
            .is_some_and(|end| end <= len);
        if arena != header.dst_arena || !fits {
            // Let the slot path deliver it, so the receiver reports the bad address.
            state.store(POSTED, Ordering::SeqCst);
            return false;
        }
        let pid = self
            .fabric
            .word32(self.at + POST_PID)
            .load(Ordering::Relaxed);
        let addr = self
            .fabric
            .word64(self.at + POST_ADDR)
            .load(Ordering::Relaxed)
            + header.dst_off;
        let copied = if pid == std::process::id() {
            let dst = std::ptr::with_exposed_provenance_mut::<u8>(addr as usize);
            // SAFETY: the receiver exposed this pointer from a `&mut [u8]` it keeps borrowed,
            // untouched, until it sees DONE (see `post_and_wait`); the range was checked against
            // that slice's length above, and CLAIMED makes this sender its only writer.
            unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), dst, payload.len()) };
            true
        } else {
            write_other_process(pid, addr, payload)
        };
        if !copied {
            // The slot path delivers instead; the post stays for it to be withdrawn.
            *direct = false;
            state.store(POSTED, Ordering::SeqCst);
            return false;
        }
        let raw = header.encode();
        // SAFETY: the header area lies inside this ring's header; CLAIMED makes it ours.
        unsafe {
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                self.fabric.base.add(self.at + POST_HEADER),
                SLOT_HEADER_BYTES,
            )
        };
        state.store(DONE, Ordering::SeqCst);
        if self.head_waiters().load(Ordering::SeqCst) > 0 {
            futex_wake(self.head());
        }
        true
    }

    fn slot_ptr(&self, counter: u32) -> *mut u8 {
        let index = (counter % self.spec.slots) as usize;
        let stride = SLOT_HEADER_BYTES + round64(self.spec.capacity as usize);
        // SAFETY: index < slots, so the slot lies inside this ring's part of the region.
        unsafe {
            self.fabric
                .base
                .add(self.at + RING_HEADER_BYTES + index * stride)
        }
    }

    /// Waits for a free slot, lets `fill` write header and payload into it, then publishes it.
    ///
    /// `fill` receives the payload area (`capacity` bytes) and returns the header to store.
    pub(crate) fn send(
        &self,
        timeout: Duration,
        fill: impl FnOnce(&mut [u8]) -> TransferHeader,
    ) -> std::result::Result<(), WaitFailure> {
        let head = self.head().load(Ordering::Relaxed);
        let slots = self.spec.slots;
        wait_until(
            self.fabric,
            || head.wrapping_sub(self.tail().load(Ordering::Acquire)) < slots,
            self.tail(),
            self.tail_waiters(),
            timeout,
        )?;
        let slot = self.slot_ptr(head);
        // SAFETY: the slot at `head` is free (tail has passed it), and only this ring's single
        // sender writes it until `head` is advanced below.
        let payload = unsafe {
            std::slice::from_raw_parts_mut(slot.add(SLOT_HEADER_BYTES), self.spec.capacity as usize)
        };
        let header = fill(payload).encode();
        // SAFETY: same exclusive slot; the header area is SLOT_HEADER_BYTES long.
        unsafe { std::ptr::copy_nonoverlapping(header.as_ptr(), slot, SLOT_HEADER_BYTES) };
        self.head().store(head.wrapping_add(1), Ordering::SeqCst);
        if self.head_waiters().load(Ordering::SeqCst) > 0 {
            futex_wake(self.head());
        }
        Ok(())
    }

    /// Waits for a message, hands its header and payload to `take`, then frees the slot.
    pub(crate) fn recv<T>(
        &self,
        timeout: Duration,
        take: impl FnOnce(&TransferHeader, &[u8]) -> T,
    ) -> std::result::Result<T, WaitFailure> {
        let tail = self.tail().load(Ordering::Relaxed);
        wait_until(
            self.fabric,
            || self.head().load(Ordering::Acquire) != tail,
            self.head(),
            self.head_waiters(),
            timeout,
        )?;
        let slot = self.slot_ptr(tail);
        let mut raw = [0u8; SLOT_HEADER_BYTES];
        // SAFETY: the slot at `tail` was published by the sender (head passed it) and stays
        // untouched until this receiver advances `tail`.
        unsafe { std::ptr::copy_nonoverlapping(slot, raw.as_mut_ptr(), SLOT_HEADER_BYTES) };
        let header = TransferHeader::decode(&raw);
        let start = u64::from(header.chunk).saturating_mul(self.spec.capacity);
        let len = header.len.saturating_sub(start).min(self.spec.capacity) as usize;
        // SAFETY: as above; `len` is clamped to the slot capacity.
        let payload = unsafe { std::slice::from_raw_parts(slot.add(SLOT_HEADER_BYTES), len) };
        let out = take(&header, payload);
        self.tail().store(tail.wrapping_add(1), Ordering::SeqCst);
        if self.tail_waiters().load(Ordering::SeqCst) > 0 {
            futex_wake(self.tail());
        }
        Ok(out)
    }
}

/// Spins briefly, then yields, then sleeps on `word` in bounded slices until `ready()` holds,
/// the fabric is aborted, or `timeout` passes. Never spins forever.
fn wait_until(
    fabric: &Fabric,
    ready: impl Fn() -> bool,
    word: &AtomicU32,
    waiters: &AtomicU32,
    timeout: Duration,
) -> std::result::Result<(), WaitFailure> {
    if ready() {
        return Ok(());
    }
    let start = Instant::now();
    if poll_until(fabric, &ready, start, YIELD_FOR) {
        return Ok(());
    }
    loop {
        let observed = word.load(Ordering::SeqCst);
        if ready() {
            return Ok(());
        }
        if fabric.aborted() {
            return Err(WaitFailure::Aborted);
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(WaitFailure::TimedOut(waited));
        }
        waiters.fetch_add(1, Ordering::SeqCst);
        if !ready() && !fabric.aborted() {
            futex_wait(word, observed, SLEEP_SLICE.min(timeout - waited));
        }
        waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Spins (until [`SPIN_FOR`]), then yields the CPU, until `ready()` holds (true), or `limit`
/// has passed since `start` or the fabric is aborted (false). Never sleeps.
fn poll_until(fabric: &Fabric, ready: impl Fn() -> bool, start: Instant, limit: Duration) -> bool {
    let mut rounds = 0u32;
    // Reading the clock costs more than a spin round; look at it every 64 rounds.
    while !rounds.is_multiple_of(64) || start.elapsed() < SPIN_FOR.min(limit) {
        if ready() {
            return true;
        }
        rounds = rounds.wrapping_add(1);
        std::hint::spin_loop();
    }
    while start.elapsed() < limit && !fabric.aborted() {
        if ready() {
            return true;
        }
        std::thread::yield_now();
    }
    ready()
}

/// Copies `bytes` to `addr` in process `pid` (a receiver on this machine that posted its arena
/// there) with one kernel-mediated copy. False when the kernel refuses (ptrace restrictions such
/// as Yama's `ptrace_scope`) or the copy came up short.
fn write_other_process(pid: u32, addr: u64, bytes: &[u8]) -> bool {
    let local = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: `local` describes readable memory of this process; the kernel validates `remote`
    // against the target's address space and fails rather than fault.
    let n = unsafe { libc::process_vm_writev(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    n >= 0 && n as usize == bytes.len()
}

/// Sleeps while `*word == expected`, at most `timeout`. Spurious returns are fine: callers re-check.
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid aligned u32 for the duration of the call; FUTEX_WAIT (not the
    // private variant) because the word may live in memory shared between processes.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid aligned u32; waking has no memory effects beyond the syscall.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn one_ring(slots: u32, capacity: u64) -> Arc<Fabric> {
        let layout = FabricLayout::new(&[RingSpec { slots, capacity }]).expect("layout");
        Arc::new(Fabric::heap(layout))
    }

    #[test]
    fn header_round_trips() {
        let h = TransferHeader {
            seq: 7,
            sequence: 2,
            step: 9,
            layer: 4,
            src_arena: 1,
            dst_arena: 3,
            chunk: 5,
            src_off: 4096,
            dst_off: 8192,
            len: 100,
            post_ns: 123_456_789,
        };
        assert_eq!(TransferHeader::decode(&h.encode()), h);
    }

    #[test]
    fn ring_preserves_order_and_bytes_across_threads_with_few_slots() {
        let fabric = one_ring(2, 64);
        let tx = Arc::clone(&fabric);
        let sender = std::thread::spawn(move || {
            for i in 0..500u64 {
                let sent = tx.ring(0).send(Duration::from_secs(10), |buf| {
                    buf[..8].copy_from_slice(&i.to_le_bytes());
                    TransferHeader {
                        seq: i,
                        len: 8,
                        ..TransferHeader::default()
                    }
                });
                assert!(sent.is_ok(), "send {i} failed");
            }
        });
        for i in 0..500u64 {
            let got = fabric
                .ring(0)
                .recv(Duration::from_secs(10), |h, p| {
                    (h.seq, u64::from_le_bytes(p.try_into().expect("8 bytes")))
                })
                .unwrap_or((u64::MAX, u64::MAX));
            assert_eq!(got, (i, i));
        }
        sender.join().expect("sender thread");
    }

    #[test]
    fn empty_ring_times_out_and_abort_ends_waits() {
        let fabric = one_ring(1, 8);
        let start = Instant::now();
        let r = fabric.ring(0).recv(Duration::from_millis(50), |_, _| ());
        assert!(matches!(r, Err(WaitFailure::TimedOut(_))));
        assert!(start.elapsed() < Duration::from_secs(2));

        let f2 = Arc::clone(&fabric);
        let waiter = std::thread::spawn(move || {
            matches!(
                f2.ring(0).recv(Duration::from_secs(30), |_, _| ()),
                Err(WaitFailure::Aborted)
            )
        });
        std::thread::sleep(Duration::from_millis(30));
        fabric.abort();
        assert!(waiter.join().expect("waiter thread"));
    }

    #[test]
    fn mapped_fabric_is_shared_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fabric");
        let layout = FabricLayout::new(&[RingSpec {
            slots: 1,
            capacity: 16,
        }])
        .expect("layout");
        let a = Fabric::create(&path, layout.clone()).expect("create");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o077, 0, "fabric file readable by others: {mode:o}");
        let b = Fabric::open(&path, layout).expect("open");
        a.set_progress(3, 42);
        assert_eq!(b.progress(3), 42);
        let other = FabricLayout::new(&[RingSpec {
            slots: 2,
            capacity: 16,
        }])
        .expect("layout");
        assert!(Fabric::open(&path, other).is_err());
    }
}
