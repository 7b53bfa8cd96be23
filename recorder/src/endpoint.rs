//! One endpoint's recording: its threads' flight rings, its perf streams, its payload store and
//! the writer thread that drains them all into `endpoints/<id>.slog`.
//!
//! Pipeline threads append through [`EndpointShared::append`]: each thread gets its own ring
//! on first use (one file creation per thread, then no lock and no allocation per event). The
//! writer thread wakes every few milliseconds, moves ring contents into the schema's
//! [`LogWriter`] (which encodes and compresses on its own thread), converts perf records to
//! events and stores payloads.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
#[cfg(test)]
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use slug_kernels::KernelId;
use slug_schema::{
    Clock, Event, LogHeader, LogStats, LogWriter, LostEvents, PerfSample, PerfSampleKind, PtChunk,
    RawRecord, SoftwareKind, SoftwareRecord, StringId, WriterOptions,
};
use xxhash_rust::xxh3::xxh3_128;

use crate::ebpf::{EbpfSession, LostReasons};
use crate::error::{RecorderError, Result};
use crate::flight::FlightRing;
use crate::perf::{PerfRecord, PerfStreams, StreamKind, monotonic_ns};
use slug_schema::blob::BlobStore;

/// String id of the `task-clock` counter name (kernel names take ids `0..KernelId::ALL.len()`).
pub const TASK_CLOCK_NAME: StringId = KernelId::ALL.len() as StringId;
/// String id of the `page-faults` counter name.
pub const PAGE_FAULTS_NAME: StringId = TASK_CLOCK_NAME + 1;
const RING_FULL_REASON: StringId = TASK_CLOCK_NAME + 2;
/// String id of the reason of a lost-events record for perf samples the kernel dropped.
pub(crate) const PERF_FULL_REASON: StringId = TASK_CLOCK_NAME + 3;
const PAYLOAD_FAILED_REASON: StringId = TASK_CLOCK_NAME + 4;

/// Every string an endpoint log interns, in id order: interned first, so records made on the
/// hot path (and recovered from rings or the journal) can carry fixed ids.
pub fn fixed_strings() -> impl Iterator<Item = &'static str> {
    KernelId::ALL.into_iter().map(KernelId::name).chain([
        "task-clock",
        "page-faults",
        "flight ring full",
        "perf ring full",
        "payload write failed",
        "ebpf ring buffer full",
        "ebpf map full",
        "ebpf outbox full",
        "ebpf per-step syscall count after its step was read or overwritten",
    ])
}

/// The interned reasons of the eBPF session's lost records (fixed ids after the ones above).
pub const EBPF_LOST_REASONS: LostReasons = LostReasons {
    ring_full: TASK_CLOCK_NAME + 5,
    map_full: TASK_CLOCK_NAME + 6,
    outbox_full: TASK_CLOCK_NAME + 7,
    step_behind: TASK_CLOCK_NAME + 8,
};

/// How often the writer drains rings and perf streams.
const DRAIN_EVERY: Duration = Duration::from_millis(2);

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's ring for each endpoint recorder it has appended to, by recorder key.
    static THREAD_RINGS: RefCell<Vec<(u64, Arc<FlightRing>)>> = const { RefCell::new(Vec::new()) };
}

/// Settings of one endpoint's recording.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    /// Endpoint id (the stage index).
    pub endpoint: u32,
    /// The trace's `endpoints/` directory (log and ring files go there).
    pub endpoints_dir: PathBuf,
    /// Records per thread ring.
    pub ring_records: usize,
    /// Events per log frame and zstd level.
    pub writer: WriterOptions,
    /// Incremented by the number of events written, for a progress display.
    pub progress: Option<Arc<AtomicU64>>,
    /// The process's eBPF probes, whose events of this endpoint's threads go to its log.
    pub ebpf: Option<Arc<EbpfSession>>,
}

/// The part of an endpoint recorder the pipeline's threads share.
#[derive(Debug)]
pub struct EndpointShared {
    key: u64,
    endpoint: u32,
    endpoints_dir: PathBuf,
    ring_records: usize,
    rings: Mutex<Vec<Arc<FlightRing>>>,
    /// Events dropped because a thread's ring could not be created.
    unringed: AtomicU64,
    ring_error: Mutex<Option<String>>,
    first_error: Mutex<Option<String>>,
    stop: AtomicBool,
    payloads: Option<(Arc<BlobStore>, Sender<Payload>)>,
    ebpf: Option<Arc<EbpfSession>>,
    /// The step the eBPF probes count this endpoint's syscalls in (see
    /// [`EbpfSession::step_counter`]).
    ebpf_step: Option<Arc<AtomicU64>>,
    progress: Option<Arc<AtomicU64>>,
}

/// A payload on its way to the writer thread: its content hash and a copy of its bytes.
type Payload = (u128, Vec<u8>);

impl EndpointShared {
    /// The endpoint id.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    /// Tells the eBPF probes that this endpoint's threads are in `step` now (one atomic store).
    #[inline]
    pub fn mark_step(&self, step: u64) {
        if let Some(s) = &self.ebpf_step {
            s.store(step, Ordering::Release);
        }
    }

    /// Appends `event` to the calling thread's ring (the hot path).
    #[inline]
    pub fn append(&self, event: &Event) {
        THREAD_RINGS.with(|cell| {
            let mut rings = cell.borrow_mut();
            if let Some((_, ring)) = rings.iter().find(|(k, _)| *k == self.key) {
                ring.append_event(event);
                return;
            }
            self.append_first(&mut rings, event);
        });
    }

    /// Creates the writer thread's own ring: like a pipeline thread's, but its thread is not
    /// routed to the eBPF probes (the writer's system calls are not the stage's).
    fn writer_ring(&self) -> Result<Arc<FlightRing>> {
        let mut all = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let thread = all.len() as u32;
        let path = self
            .endpoints_dir
            .join(format!("{}.t{thread}.ring", self.endpoint));
        let tid = crate::perf::current_tid();
        let ring = Arc::new(FlightRing::create(
            &path,
            self.endpoint,
            thread,
            tid,
            self.ring_records,
        )?);
        all.push(Arc::clone(&ring));
        Ok(ring)
    }

    #[cold]
    fn append_first(&self, rings: &mut Vec<(u64, Arc<FlightRing>)>, event: &Event) {
        // Rings of finished recorders are only held here: let them go.
        rings.retain(|(_, r)| Arc::strong_count(r) > 1);
        let mut all = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let thread = all.len() as u32;
        let path = self
            .endpoints_dir
            .join(format!("{}.t{thread}.ring", self.endpoint));
        let tid = crate::perf::current_tid();
        if let Some(ebpf) = &self.ebpf {
            ebpf.route(tid, self.endpoint);
        }
        match FlightRing::create(&path, self.endpoint, thread, tid, self.ring_records) {
            Ok(ring) => {
                let ring = Arc::new(ring);
                ring.append_event(event);
                all.push(Arc::clone(&ring));
                rings.push((self.key, ring));
            }
            Err(e) => {
                self.unringed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.ring_error.lock().unwrap_or_else(|p| p.into_inner());
                if first.is_none() {
                    *first = Some(e.to_string());
                }
            }
        }
    }

    pub(crate) fn note_error(&self, e: String) {
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(e);
        }
    }

    /// Stores a payload in the trace (on the writer thread) unless it is already stored.
    /// `false` when this endpoint does not record payloads.
    pub fn store_payload(&self, hash: u128, bytes: &[u8]) -> bool {
        let Some((blobs, tx)) = &self.payloads else {
            return false;
        };
        if !blobs.contains(hash) {
            // The writer owns the receiver until it stops; a send error means it is gone.
            let _ = tx.send((hash, bytes.to_vec()));
        }
        true
    }
}

/// What an endpoint's recording wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Endpoint id.
    pub endpoint: u32,
    /// The log's totals.
    pub log: LogStats,
    /// Events the rings dropped because they were full (or could not be created).
    pub ring_lost: u64,
    /// Records the kernel dropped from perf rings.
    pub perf_lost: u64,
    /// eBPF records lost (ring buffer, probe maps or this endpoint's outbox full).
    pub ebpf_lost: u64,
    /// Payload blobs written and their compressed bytes.
    pub payloads: u64,
    /// Compressed payload bytes written.
    pub payload_bytes: u64,
    /// Problems that did not stop the pipeline (disk full, a ring that could not be created).
    pub warnings: Vec<String>,
    /// Of `ring_lost`: events lost because a thread's ring could not be created.
    pub unringed: u64,
    /// Why the first ring could not be created.
    pub ring_error: Option<String>,
    /// Events handed to the log writer.
    pub drained: u64,
    /// Why the log could not be written to its end (then `log.events` counts the events that
    /// read back from it).
    pub log_error: Option<String>,
    /// Payloads that could not be stored, their bytes, and why the first one failed.
    pub payload_failures: u64,
    /// Uncompressed bytes of those payloads.
    pub payload_failed_bytes: u64,
    /// Why the first payload could not be stored.
    pub payload_error: Option<String>,
}

/// One endpoint's recorder: the shared append side and its writer thread.
#[derive(Debug)]
pub struct EndpointRecorder {
    shared: Arc<EndpointShared>,
    writer: Option<JoinHandle<Result<EndpointStats>>>,
}

impl EndpointRecorder {
    /// Creates the endpoint's log and starts its writer. `perf` streams (already opened on the
    /// endpoint's threads) are enabled and drained by the writer; `payloads` is where payload
    /// blobs go when the run records them.
    pub fn start(
        options: &EndpointOptions,
        perf: Option<PerfStreams>,
        payloads: Option<Arc<BlobStore>>,
    ) -> Result<EndpointRecorder> {
        let path = options
            .endpoints_dir
            .join(format!("{}.slog", options.endpoint));
        let header = LogHeader::new(options.endpoint, Clock::Monotonic, monotonic_ns());
        let mut log = LogWriter::create_with(&path, header, options.writer)
            .map_err(|e| RecorderError::Schema(Box::new(e)))?;
        // Fixed ids for the names the hot path uses, so it never interns.
        for name in fixed_strings() {
            log.intern(name);
        }
        let (payloads, payload_rx) = match payloads {
            Some(store) => {
                let (tx, rx) = crossbeam_channel::unbounded();
                (Some((store, tx)), Some(rx))
            }
            None => (None, None),
        };
        let shared = Arc::new(EndpointShared {
            key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            endpoint: options.endpoint,
            endpoints_dir: options.endpoints_dir.clone(),
            ring_records: options.ring_records,
            rings: Mutex::new(Vec::new()),
            unringed: AtomicU64::new(0),
            ring_error: Mutex::new(None),
            first_error: Mutex::new(None),
            stop: AtomicBool::new(false),
            payloads,
            progress: options.progress.clone(),
            ebpf: options.ebpf.clone(),
            ebpf_step: options
                .ebpf
                .as_ref()
                .and_then(|e| e.step_counter(options.endpoint)),
        });
        if let Some(p) = &perf {
            p.enable()?;
        }
        let worker = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name(format!("slug-recorder-{}", options.endpoint))
            .spawn(move || writer_loop(&worker, log, perf, payload_rx))
            .map_err(|e| RecorderError::io(&path, e))?;
        Ok(EndpointRecorder {
            shared,
            writer: Some(writer),
        })
    }

    /// The append side, for the pipeline's observers and hooks.
    pub fn shared(&self) -> &Arc<EndpointShared> {
        &self.shared
    }

    /// Stops the writer after a last drain, closes the log and removes the drained rings.
    pub fn finish(mut self) -> Result<EndpointStats> {
        // The probes' last records reach the outboxes before the writer's last drain.
        if let Some(e) = &self.shared.ebpf {
            e.stop();
        }
        self.shared.stop.store(true, Ordering::Release);
        let handle = self.writer.take();
        match handle.map(JoinHandle::join) {
            Some(Ok(stats)) => stats,
            Some(Err(_)) => Err(RecorderError::Io {
                path: self.shared.endpoints_dir.clone(),
                source: std::io::Error::other(format!(
                    "the writer thread of endpoint {} panicked",
                    self.shared.endpoint
                )),
            }),
            None => Ok(EndpointStats::default()),
        }
    }
}

impl Drop for EndpointRecorder {
    fn drop(&mut self) {
        if let Some(e) = &self.shared.ebpf {
            e.stop();
        }
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

/// The writer thread's state: the log, and the ring where the events it makes itself (perf
/// samples, eBPF events, loss records) wait, like the pipeline threads' events, until the frame
/// holding them is written.
struct Writer<'a> {
    shared: &'a EndpointShared,
    log: LogWriter,
    own: Option<Arc<FlightRing>>,
    /// Creating `own` failed (said once, not tried again).
    own_failed: bool,
    lost_seen: Vec<u64>,
    last_drain_ns: u64,
    /// Records the writer made since its last drain.
    made: Vec<RawRecord>,
}

impl Writer<'_> {
    /// Moves every ring's new records into the log, then hands the writer's own records to its
    /// ring (they reach the log at the next drain). Slots are released only when the frame
    /// holding their records is in the file, so a kill at any moment loses nothing appended.
    fn drain(&mut self, stats: &mut EndpointStats) {
        let now = monotonic_ns();
        let rings: Vec<Arc<FlightRing>> = self
            .shared
            .rings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.lost_seen.resize(rings.len(), 0);
        let before = self.log.appended();
        let mut release = Vec::with_capacity(rings.len());
        for (ring, seen) in rings.iter().zip(self.lost_seen.iter_mut()) {
            let log = &mut self.log;
            let (n, upto) = ring.read_pending(|r| log.append_raw(r));
            if n > 0 {
                release.push((Arc::clone(ring), upto));
            }
            let lost = ring.lost();
            if lost > *seen {
                self.made
                    .push(RawRecord::from_event(&Event::LostEvents(LostEvents {
                        count: lost - *seen,
                        reason: RING_FULL_REASON,
                        from_ns: self.last_drain_ns,
                        to_ns: now,
                    })));
                stats.ring_lost += lost - *seen;
                *seen = lost;
            }
        }
        let n = self.log.appended() - before;
        if !release.is_empty() {
            self.log.after_written(move || {
                for (ring, upto) in release {
                    ring.release(upto);
                }
            });
        }
        if let Some(p) = &self.shared.progress {
            p.fetch_add(n, Ordering::Relaxed);
        }
        stats.drained += n;
        // A ring fuller than this cannot wait for the frame being filled: cut it now, unless it
        // is still small (the full ring then waits on frames already being encoded).
        if let Some(cap) = rings
            .iter()
            .filter(|r| r.unreleased() > r.capacity() / 4 * 3)
            .map(|r| r.capacity())
            .min()
            && self.log.buffered() as u64 >= cap / 8
        {
            self.log.cut_frame();
        }
        self.last_drain_ns = now;
        self.keep_made(stats);
    }

    /// Puts the writer's own records in its ring (created on first use); without one they go
    /// straight to the log.
    fn keep_made(&mut self, stats: &mut EndpointStats) {
        if self.made.is_empty() {
            return;
        }
        if self.own.is_none() && !self.own_failed {
            match self.shared.writer_ring() {
                Ok(r) => self.own = Some(r),
                Err(e) => {
                    stats.warnings.push(format!(
                        "{e}; the recorder's own events (perf samples, eBPF events, losses) go \
                         to the log unguarded: a kill loses those the log had not written"
                    ));
                    self.own_failed = true;
                }
            }
        }
        match &self.own {
            // A full ring counts the record lost, and the next drain reports it.
            Some(ring) => self.made.drain(..).for_each(|r| {
                ring.append(&r);
            }),
            None => {
                stats.drained += self.made.len() as u64;
                self.made.drain(..).for_each(|r| self.log.append_raw(r));
            }
        }
    }
}

fn writer_loop(
    shared: &EndpointShared,
    log: LogWriter,
    perf: Option<PerfStreams>,
    payload_rx: Option<Receiver<Payload>>,
) -> Result<EndpointStats> {
    let mut stats = EndpointStats {
        endpoint: shared.endpoint,
        ..EndpointStats::default()
    };
    let mut perf_buf = Vec::new();
    let mut ebpf_buf = Vec::new();
    let mut w = Writer {
        shared,
        log,
        own: None,
        own_failed: false,
        lost_seen: Vec::new(),
        last_drain_ns: monotonic_ns(),
        made: Vec::new(),
    };
    let mut sink = PerfSink {
        blobs: shared.payloads.as_ref().map(|(b, _)| Arc::clone(b)),
        sideband_path: shared
            .endpoints_dir
            .join(format!("{}.sideband.perf", shared.endpoint)),
        sideband: None,
    };
    loop {
        let stopping = shared.stop.load(Ordering::Acquire);
        if let Some(p) = &perf {
            p.drain(&mut perf_buf);
        }
        for rec in perf_buf.drain(..) {
            write_perf(&mut w.made, rec, &mut sink, &mut stats);
        }
        if let Some(ebpf) = &shared.ebpf {
            ebpf.take(shared.endpoint, &mut ebpf_buf);
            for e in ebpf_buf.drain(..) {
                if let Event::LostEvents(l) = &e {
                    stats.ebpf_lost += l.count;
                }
                w.made.push(RawRecord::from_event(&e));
            }
        }
        if let Some(rx) = &payload_rx {
            let mut failures = 0u64;
            for (hash, bytes) in rx.try_iter() {
                match shared.payloads.as_ref().map(|(b, _)| b.put(hash, &bytes)) {
                    Some(Ok(n)) => {
                        stats.payloads += u64::from(n > 0);
                        stats.payload_bytes += n;
                    }
                    Some(Err(e)) => {
                        failures += 1;
                        stats.payload_failed_bytes += bytes.len() as u64;
                        stats.payload_error.get_or_insert_with(|| e.to_string());
                    }
                    None => {}
                }
            }
            stats.payload_failures += failures;
            if failures > 0 {
                w.made
                    .push(RawRecord::from_event(&Event::LostEvents(LostEvents {
                        count: failures,
                        reason: PAYLOAD_FAILED_REASON,
                        from_ns: w.last_drain_ns,
                        to_ns: monotonic_ns(),
                    })));
            }
        }
        // What was made above goes to the writer's ring after this drain, so the next drain
        // (or the last one below) moves it to the log.
        w.drain(&mut stats);
        if stopping {
            break;
        }
        std::thread::sleep(DRAIN_EVERY);
    }
    if let Some(p) = perf {
        p.stop(&mut perf_buf);
        for rec in perf_buf.drain(..) {
            write_perf(&mut w.made, rec, &mut sink, &mut stats);
        }
    }
    // The last drain: every ring to the log; then the writer's last records go straight to the
    // log, which closes right after.
    w.drain(&mut stats);
    let unringed = shared.unringed.load(Ordering::Relaxed);
    if unringed > 0 {
        w.made
            .push(RawRecord::from_event(&Event::LostEvents(LostEvents {
                count: unringed,
                reason: RING_FULL_REASON,
                from_ns: w.last_drain_ns,
                to_ns: monotonic_ns(),
            })));
        stats.ring_lost += unringed;
        stats.unringed = unringed;
    }
    stats.ring_error = shared
        .ring_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    // What the last drain put in the writer's ring, then the records made since.
    if let Some(ring) = &w.own {
        let log = &mut w.log;
        let (n, _) = ring.read_pending(|r| log.append_raw(r));
        stats.drained += n as u64;
    }
    stats.drained += w.made.len() as u64;
    for r in w.made.drain(..) {
        w.log.append_raw(r);
    }
    // A log that cannot be written (disk full) ends this endpoint's recording, not the run; its
    // rings stay for `recover` (they hold what the log could not).
    let log_path = w.log.path().to_path_buf();
    let closed = match w.log.close() {
        Ok(l) => {
            stats.log = l;
            true
        }
        Err(e) => {
            // What did reach the file: the loss is what was drained and does not read back.
            stats.log.events = slug_schema::LogReader::open(&log_path).map_or(0, |r| {
                r.frames().flatten().map(|f| f.events.len() as u64).sum()
            });
            stats.log_error = Some(e.to_string());
            false
        }
    };
    // Everything is in the closed log: the rings are no longer needed for recovery.
    let rings: Vec<Arc<FlightRing>> = shared
        .rings
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
        .collect();
    if closed {
        for path in rings.iter().map(|r| r.path()) {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => stats.warnings.push(RecorderError::io(path, e).to_string()),
            }
        }
    }
    if let Some(e) = shared
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        stats.warnings.push(e);
    }
    Ok(stats)
}

/// Writes one perf record as the trace's event (or payload) for it.
///
/// Page faults and context switches are `perf_software` records: page fault arg0 = data
/// address, arg1 = ip; context switch arg0 = tid switched out (else 0), arg1 = tid switched in
/// (else 0), arg2 = 0 if preempted (still runnable), 1 if it blocked.
/// Where perf data that is not an event goes: PT bytes as blobs, PT sideband as one file.
struct PerfSink {
    blobs: Option<Arc<BlobStore>>,
    sideband_path: PathBuf,
    sideband: Option<std::fs::File>,
}

fn write_perf(
    batch: &mut Vec<RawRecord>,
    rec: PerfRecord,
    sink: &mut PerfSink,
    stats: &mut EndpointStats,
) {
    let event = match rec {
        PerfRecord::Sample(s) => {
            let kind = match s.stream {
                StreamKind::PageFaults => {
                    batch.push(RawRecord::from_event(&Event::PerfSoftware(
                        SoftwareRecord {
                            kind: SoftwareKind::PageFault,
                            pid: s.pid,
                            tid: s.tid,
                            cpu: s.cpu,
                            arg0: s.addr,
                            arg1: s.ip,
                            arg2: 0,
                            ns: s.ns,
                        },
                    )));
                    return;
                }
                StreamKind::MemLoads | StreamKind::IbsOp => PerfSampleKind::MemLoad,
                StreamKind::MemStores => PerfSampleKind::MemStore,
                _ => PerfSampleKind::CpuClock,
            };
            let weight = if kind == PerfSampleKind::CpuClock {
                s.period
            } else {
                s.weight
            };
            Event::PerfSample(PerfSample {
                kind,
                ip: s.ip,
                addr: s.addr,
                weight,
                data_source: s.data_source,
                tid: s.tid,
                cpu: s.cpu,
                ns: s.ns,
            })
        }
        PerfRecord::ContextSwitch {
            pid,
            tid,
            cpu,
            ns,
            out,
            preempted,
        } => Event::PerfSoftware(SoftwareRecord {
            kind: SoftwareKind::ContextSwitch,
            pid,
            tid,
            cpu,
            arg0: if out { u64::from(tid) } else { 0 },
            arg1: if out { 0 } else { u64::from(tid) },
            arg2: u64::from(out && !preempted),
            ns,
        }),
        PerfRecord::PtChunk {
            cpu,
            aux_offset,
            bytes,
            ns,
        } => {
            let hash = xxh3_128(&bytes);
            if let Some(b) = &sink.blobs
                && let Err(e) = b.put(hash, &bytes)
            {
                stats.warnings.push(e.to_string());
            }
            Event::PtChunk(PtChunk {
                cpu,
                aux_offset,
                size: bytes.len() as u64,
                payload: hash,
                ns,
            })
        }
        // PT sideband (raw perf records, in stream order) goes to `<id>.sideband.perf` next to
        // the log: a decoder replays it alongside the PT chunks.
        PerfRecord::Sideband { bytes, .. } => {
            use std::io::Write;
            if sink.sideband.is_none() {
                match std::fs::File::create(&sink.sideband_path) {
                    Ok(f) => sink.sideband = Some(f),
                    Err(e) => {
                        stats
                            .warnings
                            .push(RecorderError::io(&sink.sideband_path, e).to_string());
                        return;
                    }
                }
            }
            if let Some(f) = sink.sideband.as_mut()
                && let Err(e) = f.write_all(&bytes)
            {
                stats
                    .warnings
                    .push(RecorderError::io(&sink.sideband_path, e).to_string());
            }
            return;
        }
        PerfRecord::Lost { count, ns, .. } => {
            stats.perf_lost += count;
            Event::LostEvents(LostEvents {
                count,
                reason: PERF_FULL_REASON,
                from_ns: ns,
                to_ns: ns,
            })
        }
    };
    batch.push(RawRecord::from_event(&event));
}

/// Path of ring files an endpoint may leave behind after being killed.
pub fn ring_files(endpoints_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(endpoints_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(RecorderError::io(endpoints_dir, e)),
    };
    for entry in entries {
        let path = entry
            .map_err(|e| RecorderError::io(endpoints_dir, e))?
            .path();
        if path.extension().is_some_and(|e| e == "ring") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use slug_schema::{Marker, WriterOptions};

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < Duration::from_secs(20), "{what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The rings are the journal: a drained record keeps its slot until the frame holding it is
    /// written, and no sooner.
    #[test]
    fn ring_slots_are_released_only_once_their_frame_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let progress = Arc::new(AtomicU64::new(0));
        let options = EndpointOptions {
            endpoint: 0,
            endpoints_dir: dir.path().to_path_buf(),
            ring_records: 4096,
            writer: WriterOptions {
                events_per_frame: 1000,
                zstd_level: 1,
            },
            progress: Some(Arc::clone(&progress)),
            ebpf: None,
        };
        let recorder = EndpointRecorder::start(&options, None, None).unwrap();
        let shared = Arc::clone(recorder.shared());
        let marker = |ns| Event::Marker(Marker { text: 0, ns });
        for ns in 0..10 {
            shared.append(&marker(ns));
        }
        wait_for("the writer drains", || {
            progress.load(Ordering::Relaxed) == 10
        });
        let ring = Arc::clone(&shared.rings.lock().unwrap()[0]);
        // Drained into the frame being filled, not written: still in the ring (two slots per
        // marker), read once.
        std::thread::sleep(DRAIN_EVERY * 5);
        assert_eq!(ring.unreleased(), 20);
        assert_eq!(progress.load(Ordering::Relaxed), 10, "drained once");
        for ns in 10..1000 {
            shared.append(&marker(ns));
        }
        wait_for("the frame is written and the ring released", || {
            ring.unreleased() == 0
        });
        let log = slug_schema::LogReader::open(dir.path().join("0.slog")).unwrap();
        let events: usize = log.frames().flatten().map(|f| f.events.len()).sum();
        assert_eq!(events, 1000);
        let stats = recorder.finish().unwrap();
        assert_eq!(stats.log.events, 1000);
        assert!(!ring.path().exists(), "a clean close removes the rings");
    }
}
