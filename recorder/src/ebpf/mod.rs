//! eBPF endpoint probes: loads the committed probe object (`probes.bpf.o`, built from
//! `probes.bpf.c`) with aya, filtered in the kernel to this process's threads, and turns its
//! ring-buffer records and syscall histograms into `ebpf` trace events, each routed to the
//! endpoint whose thread it concerns.
//!
//! One [`EbpfSession`] serves every endpoint of a process (the stages of a `local` run, or the
//! one stage of a `slug node`). Threads are routed to an endpoint when they first record an
//! event ([`EbpfSession::route`]), which also registers them with the probes: the kernel probes
//! only routed threads, so the recorder's own threads (writers, encoders, this session's reader)
//! make no records to read and throw away.
//!
//! What the reader does is bounded by what the stages did, not by how long they took: each
//! wakeup drains the ring (one event per record), reads completed steps' histograms from the
//! `step_hist` map mapped into memory (no syscall), and walks the window histograms only when
//! the probes counted something there since the last walk.

mod record;

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::AsFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, RingBuf};
use aya::programs::RawTracePoint;
use aya::{Ebpf, EbpfLoader};
use memmap2::{MmapOptions, MmapRaw};
use slug_schema::{Capability, EbpfEvent, EbpfKind, Event, LostEvents, StringId};

use crate::error::{RecorderError, Result};
use crate::perf::{Capabilities, StreamKind, monotonic_ns};
pub use record::ProbeRecord;

/// The compiled probes (`clang -target bpf`, see `recorder/tests/ebpf_bootstrap.rs`).
static PROBES: &[u8] = aya::include_bytes_aligned!("probes.bpf.o");

/// Syscalls that take at least this long are recorded one by one; shorter ones only count in
/// the per-thread log2 latency histograms.
pub const SLOW_SYSCALL_NS: u64 = 1_000_000;

/// How often the session drains the ring buffer.
const POLL_EVERY: Duration = Duration::from_millis(10);
/// How often it reads the per-thread window histograms and the lost counters. A window event is
/// written per thread, syscall and bucket that counted something, so the window's length sets
/// how many there are: the hot-path syscalls, counted per step, are not in them.
const HISTOGRAM_EVERY: Duration = Duration::from_secs(1);
/// Stages (endpoints of one process) whose syscalls are counted per step; `probes.bpf.c` has the
/// same numbers.
const STAGES: u32 = 8;
/// Steps of one stage whose histograms the kernel holds at once (the drain reads completed
/// ones every [`POLL_EVERY`]).
const STEP_SLOTS: u64 = 64;
const STEP_CLASSES: usize = 8;
const STEP_BUCKETS: usize = 32;
/// Bytes of one `struct step_hist`: the step it counts (u64), the probes in it (u32), padding,
/// then a u32 count per syscall class and log2 bucket.
const STEP_SLOT_BYTES: usize = 16 + 4 * STEP_CLASSES * STEP_BUCKETS;
/// A slot's `step` while the reader collects it: the probes count what comes then as lost (it
/// is larger than any step, so never due).
const STEP_CLOSED: u64 = u64::MAX;
/// How many times the reader looks for the probes to leave a slot it closed before it leaves
/// the slot for its next wakeup (a probe adds one count: nanoseconds, unless it was preempted).
const STEP_BUSY_TRIES: u32 = 1000;
const THREAD_SLOTS: u32 = 65536;
/// `thread_stage`'s stage for a routed thread whose syscalls are not counted per step.
const NO_STAGE: u32 = u32::MAX;
/// Indices in the probes' `lost` array: the ring was full, `syscall_hist` was full, a per-step
/// count found its slot not armed for its step, and (not a loss) counts made in `syscall_hist`.
const LOST_RING: u32 = 0;
const LOST_HIST_FULL: u32 = 1;
const LOST_STEP: u32 = 2;
const HIST_GENERATION: u32 = 3;

/// The syscalls counted per step (class `i + 1` is `PER_STEP_SYSCALLS[i]`): the ones a stage
/// makes on its hot path (futex, sendmsg, recvmsg, writev, process_vm_writev, mmap, write).
/// Others are counted in the per-thread window histograms.
#[cfg(target_arch = "x86_64")]
const PER_STEP_SYSCALLS: &[u64] = &[202, 46, 47, 20, 311, 9, 1];
#[cfg(not(target_arch = "x86_64"))]
const PER_STEP_SYSCALLS: &[u64] = &[];

/// Events an endpoint's outbox holds before further ones are dropped (and counted).
const OUTBOX_LIMIT: usize = 1 << 20;
/// How often an endpoint's writer gets its outbox (sooner if [`HANDOVER_EVENTS`] wait, and all
/// of it once the session stops). The writer journals what it drains, and each journal append
/// has a fixed cost: handing the probes' events over in bigger, rarer batches keeps them from
/// adding appends of their own.
const HANDOVER_EVERY: Duration = Duration::from_millis(100);
const HANDOVER_EVENTS: usize = 4096;

/// One probe group, as `--ebpf` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Probe {
    /// sched_switch / sched_waking: off-CPU intervals with reason, syscall and waker.
    OffCpu,
    /// sys_enter / sys_exit: latency histograms, exact events above [`SLOW_SYSCALL_NS`].
    Syscalls,
    /// page_fault_user: user page faults with address, ip and error code (x86).
    PageFaults,
    /// sched_migrate_task: CPU and NUMA-node moves.
    Migrations,
    /// tcp_retransmit_skb / kfree_skb on the sockets the process sends or receives on
    /// (sock_send_length / sock_recv_length).
    Tcp,
}

impl Probe {
    /// Every probe group.
    pub const ALL: [Probe; 5] = [
        Probe::OffCpu,
        Probe::Syscalls,
        Probe::PageFaults,
        Probe::Migrations,
        Probe::Tcp,
    ];

    /// The name `--ebpf` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Probe::OffCpu => "off-cpu",
            Probe::Syscalls => "syscalls",
            Probe::PageFaults => "page-faults",
            Probe::Migrations => "migrations",
            Probe::Tcp => "tcp",
        }
    }

    /// The capability name in the manifest.
    pub fn capability(self) -> &'static str {
        match self {
            Probe::OffCpu => "ebpf_off_cpu",
            Probe::Syscalls => "ebpf_syscalls",
            Probe::PageFaults => "ebpf_page_faults",
            Probe::Migrations => "ebpf_migrations",
            Probe::Tcp => "ebpf_tcp",
        }
    }

    /// What stands in for the probe when the kernel refuses it.
    fn fallback(self) -> &'static str {
        match self {
            Probe::OffCpu => "perf's context switches (--perf) without wait reasons",
            Probe::Syscalls => "no syscall latencies",
            Probe::PageFaults => "perf's page-fault samples (--perf)",
            Probe::Migrations => "no CPU migrations",
            Probe::Tcp => "no TCP retransmits or drops",
        }
    }

    /// (program in the object, raw tracepoint it attaches to).
    fn programs(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Probe::OffCpu => &[
                ("slug_sched_switch", "sched_switch"),
                ("slug_sched_waking", "sched_waking"),
            ],
            Probe::Syscalls => &[
                ("slug_sys_enter", "sys_enter"),
                ("slug_sys_exit", "sys_exit"),
            ],
            Probe::PageFaults => &[("slug_page_fault_user", "page_fault_user")],
            Probe::Migrations => &[("slug_sched_migrate_task", "sched_migrate_task")],
            Probe::Tcp => &[
                ("slug_sock_send_length", "sock_send_length"),
                ("slug_sock_recv_length", "sock_recv_length"),
                ("slug_tcp_retransmit_skb", "tcp_retransmit_skb"),
                ("slug_kfree_skb", "kfree_skb"),
            ],
        }
    }
}

/// What `--ebpf` asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum EbpfRequest {
    /// Every probe the kernel accepts; none (said in one line) without root or CAP_BPF.
    #[default]
    Auto,
    /// No probes.
    None,
    /// Exactly these probe groups.
    List(Vec<Probe>),
}

impl EbpfRequest {
    /// The probe groups asked for.
    pub fn probes(&self) -> Vec<Probe> {
        match self {
            EbpfRequest::Auto => Probe::ALL.to_vec(),
            EbpfRequest::None => Vec::new(),
            EbpfRequest::List(l) => l.clone(),
        }
    }
}

impl FromStr for EbpfRequest {
    type Err = RecorderError;

    fn from_str(s: &str) -> Result<EbpfRequest> {
        match s.trim() {
            "auto" => Ok(EbpfRequest::Auto),
            "none" => Ok(EbpfRequest::None),
            list => {
                let mut probes = Vec::new();
                for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    let probe = Probe::ALL
                        .into_iter()
                        .find(|p| p.name() == name)
                        .ok_or_else(|| RecorderError::UnknownEbpfProbe {
                            name: name.into(),
                            known: Probe::ALL.map(Probe::name).join(", "),
                        })?;
                    if !probes.contains(&probe) {
                        probes.push(probe);
                    }
                }
                if probes.is_empty() {
                    return Err(RecorderError::UnknownEbpfProbe {
                        name: s.into(),
                        known: Probe::ALL.map(Probe::name).join(", "),
                    });
                }
                Ok(EbpfRequest::List(probes))
            }
        }
    }
}

impl std::fmt::Display for EbpfRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EbpfRequest::Auto => f.write_str("auto"),
            EbpfRequest::None => f.write_str("none"),
            EbpfRequest::List(l) => {
                f.write_str(&l.iter().map(|p| p.name()).collect::<Vec<_>>().join(","))
            }
        }
    }
}

/// The interned reasons an endpoint log uses for the session's lost records.
#[derive(Debug, Clone, Copy)]
pub struct LostReasons {
    /// The ring buffer was full.
    pub ring_full: StringId,
    /// A probe's map was full (an off-CPU interval or histogram count was dropped).
    pub map_full: StringId,
    /// The endpoint's outbox was full (its writer fell behind).
    pub outbox_full: StringId,
    /// Syscalls counted per step that found their step's histogram slot not theirs: a stage ran
    /// [`STEP_SLOTS`] steps ahead of the drain thread (the slot was not re-armed yet), or the
    /// call returned while the drain thread was reading its step back.
    pub step_behind: StringId,
}

/// The probes of one process, their drain thread and the per-endpoint outboxes.
#[derive(Debug)]
pub struct EbpfSession {
    shared: Arc<SessionShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    probes: Vec<Probe>,
}

#[derive(Debug)]
struct SessionShared {
    tgid: u32,
    reasons: LostReasons,
    routes: Mutex<TidMap<u32>>,
    outboxes: Mutex<BTreeMap<u32, Outbox>>,
    stop: AtomicBool,
    /// NUMA node of each CPU (index), when the host says.
    cpu_node: Vec<Option<u32>>,
    steps: Mutex<StepRegistry>,
}

/// Maps keyed by thread ids and probe keys, looked up once per event: hashed with one multiply,
/// since SipHash's protection against chosen keys buys nothing for keys the kernel hands us.
type TidMap<V> = HashMap<u32, V, BuildHasherDefault<IntHasher>>;

/// See [`TidMap`].
#[derive(Debug, Default, Clone, Copy)]
struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The routed threads and the stages whose syscalls the probes count per step, and the maps
/// that say so.
struct StepRegistry {
    thread_stage: Array<MapData, [u32; 2]>,
    stage_step: Array<MapData, u64>,
    step_hist: StepSlots,
    syscall_class: Array<MapData, u32>,
    stages: BTreeMap<u32, StageSteps>,
}

/// The probes' `step_hist` map (BPF_F_MMAPABLE) mapped into this process: the probes count into
/// it and the drain thread reads and re-arms completed steps in place, without a syscall.
struct StepSlots {
    mem: MmapRaw,
    /// Keeps the map's descriptor (the mapping holds the map too).
    _map: MapData,
}

/// One slot of [`StepSlots`]; its u32 counts are read two at a time, and classes from 1 on
/// (class 0 is never counted per step).
struct StepSlot<'a> {
    step: &'a AtomicU64,
    busy: &'a AtomicU32,
    counts: &'a [AtomicU64],
}

impl std::fmt::Debug for StepRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepRegistry")
            .field("stages", &self.stages)
            .finish_non_exhaustive()
    }
}

/// One stage's step counter (read by the probes at its address) and the next step to collect.
#[derive(Debug)]
struct StageSteps {
    index: u32,
    step: Arc<AtomicU64>,
    next: u64,
}

/// Where a drained event goes.
#[derive(Debug, Clone, Copy)]
enum Route {
    /// The endpoint the thread is routed to.
    Thread(u32),
    /// This endpoint.
    Endpoint(u32),
    /// The first endpoint (process-wide counts, charged once).
    First,
}

#[derive(Debug, Default)]
struct Outbox {
    events: Vec<Event>,
    dropped: u64,
    /// When the writer last got the outbox.
    handed: Option<Instant>,
}

impl EbpfSession {
    /// Loads and attaches the probes `request` asks for, filtered to this process. Returns the
    /// session (if any probe attached) and the capability report with one notice per probe that
    /// is missing and why.
    pub fn open(
        request: &EbpfRequest,
        reasons: LostReasons,
    ) -> (Option<Arc<EbpfSession>>, Capabilities) {
        let asked = request.probes();
        let mut caps = Capabilities::default();
        if asked.is_empty() {
            for p in Probe::ALL {
                caps.entries.push(Capability {
                    name: p.capability().into(),
                    requested: false,
                    available: false,
                    captured: false,
                    reason: Some("--ebpf none (not loaded, so availability is unknown)".into()),
                });
            }
            return (None, caps);
        }
        let tgid = std::process::id();
        let loaded = EbpfLoader::new()
            .override_global("target_tgid", &tgid, true)
            .override_global("slow_syscall_ns", &SLOW_SYSCALL_NS, true)
            .load(PROBES);
        let mut ebpf = match loaded {
            Ok(e) => e,
            Err(e) => {
                let why = load_failure(&e.to_string());
                caps.notices.push(format!(
                    "no eBPF probes: {why}; recording perf's software context switches and page faults (--perf) instead"
                ));
                for p in Probe::ALL {
                    caps.entries.push(Capability {
                        name: p.capability().into(),
                        requested: asked.contains(&p),
                        available: false,
                        captured: false,
                        reason: Some(why.clone()),
                    });
                }
                return (None, caps);
            }
        };
        let mut attached = Vec::new();
        for p in Probe::ALL {
            if !asked.contains(&p) {
                caps.entries.push(Capability {
                    name: p.capability().into(),
                    requested: false,
                    available: true,
                    captured: false,
                    reason: Some(format!("--ebpf {request} leaves it out")),
                });
                continue;
            }
            match attach(&mut ebpf, p) {
                Ok(()) => {
                    attached.push(p);
                    caps.entries.push(Capability {
                        name: p.capability().into(),
                        requested: true,
                        available: true,
                        captured: true,
                        reason: None,
                    });
                }
                Err(why) => {
                    caps.notices.push(format!(
                        "no eBPF {} probe: {why}; recording {} instead",
                        p.name(),
                        p.fallback()
                    ));
                    caps.entries.push(Capability {
                        name: p.capability().into(),
                        requested: true,
                        available: false,
                        captured: false,
                        reason: Some(why),
                    });
                }
            }
        }
        if attached.is_empty() {
            return (None, caps);
        }
        let taken =
            DrainMaps::take(&mut ebpf).and_then(|m| Ok((m, StepRegistry::take(&mut ebpf)?)));
        let (maps, steps) = match taken {
            Ok(m) => m,
            Err(why) => {
                caps.notices.push(format!("no eBPF probes: {why}"));
                for c in &mut caps.entries {
                    c.captured = false;
                    c.reason = Some(why.clone());
                }
                return (None, caps);
            }
        };
        let shared = Arc::new(SessionShared {
            tgid,
            reasons,
            routes: Mutex::new(TidMap::default()),
            outboxes: Mutex::new(BTreeMap::new()),
            stop: AtomicBool::new(false),
            cpu_node: cpu_nodes(),
            steps: Mutex::new(steps),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("slug-ebpf".into())
            .spawn(move || drain_loop(&worker, ebpf, maps));
        match thread {
            Ok(t) => (
                Some(Arc::new(EbpfSession {
                    shared,
                    thread: Mutex::new(Some(t)),
                    probes: attached,
                })),
                caps,
            ),
            Err(e) => {
                caps.notices.push(format!(
                    "no eBPF probes: cannot start their drain thread: {e}"
                ));
                for c in &mut caps.entries {
                    c.captured = false;
                }
                (None, caps)
            }
        }
    }

    /// The perf streams whose events attached probes record too (with more about each): perf
    /// context switches (off-CPU intervals) and page-fault samples (page faults with ip and
    /// error code). The recorder does not open them, so nothing is recorded twice.
    pub fn covered_perf_streams(&self) -> Vec<(StreamKind, &'static str)> {
        let mut out = Vec::new();
        if self.probes.contains(&Probe::OffCpu) {
            out.push((StreamKind::ContextSwitches, Probe::OffCpu.name()));
        }
        if self.probes.contains(&Probe::PageFaults) {
            out.push((StreamKind::PageFaults, Probe::PageFaults.name()));
        }
        out
    }

    /// Sends the records of thread `tid` to `endpoint`'s outbox from now on, and counts its
    /// syscalls in the endpoint's per-step histograms if [`EbpfSession::step_counter`] gave
    /// the endpoint one.
    pub fn route(&self, tid: u32, endpoint: u32) {
        lock(&self.shared.routes).insert(tid, endpoint);
        lock(&self.shared.outboxes).entry(endpoint).or_default();
        let mut steps = lock(&self.shared.steps);
        let index = steps.stages.get(&endpoint).map_or(NO_STAGE, |s| s.index);
        // The probes follow registered threads only. The update of an existing array element
        // cannot fail; were it to, the thread would go unprobed, as the recorder's own threads.
        let _ = steps.thread_stage.set(tid % THREAD_SLOTS, [tid, index], 0);
    }

    /// The counter whose value the probes take as `endpoint`'s current step: the stage stores
    /// each step it starts there, and its threads' syscalls (the ones in `PER_STEP_SYSCALLS`)
    /// are counted per step in the kernel, read by the drain thread with one map lookup per
    /// completed step. `None` (the stage's syscalls stay in the window histograms) when
    /// [`STAGES`] endpoints have one already or the maps refuse the registration.
    pub fn step_counter(&self, endpoint: u32) -> Option<Arc<AtomicU64>> {
        let mut steps = lock(&self.shared.steps);
        if let Some(s) = steps.stages.get(&endpoint) {
            return Some(Arc::clone(&s.step));
        }
        let index = u32::try_from(steps.stages.len())
            .ok()
            .filter(|i| *i < STAGES)?;
        for k in 0..STEP_SLOTS {
            let slot = steps.step_hist.slot(index * STEP_SLOTS as u32 + k as u32)?;
            slot.drain(|_, _| {});
            slot.arm(k);
        }
        for (i, nr) in PER_STEP_SYSCALLS.iter().enumerate() {
            steps
                .syscall_class
                .set(u32::try_from(*nr).ok()?, i as u32 + 1, 0)
                .ok()?;
        }
        let step = Arc::new(AtomicU64::new(0));
        // The probes read the counter at this address, in this process, for as long as the
        // session (which holds the Arc) lives.
        let address = Arc::as_ptr(&step) as u64;
        steps.stage_step.set(index, address, 0).ok()?;
        steps.stages.insert(
            endpoint,
            StageSteps {
                index,
                step: Arc::clone(&step),
                next: 0,
            },
        );
        Some(step)
    }

    /// Moves `endpoint`'s pending events into `out` (with a lost-events record for what its
    /// outbox had to drop): every [`HANDOVER_EVERY`], or sooner when [`HANDOVER_EVENTS`] are
    /// pending, and everything once [`EbpfSession::stop`] was called.
    pub fn take(&self, endpoint: u32, out: &mut Vec<Event>) {
        let stopped = self.shared.stop.load(Ordering::Acquire);
        let mut boxes = lock(&self.shared.outboxes);
        if let Some(b) = boxes.get_mut(&endpoint) {
            let due = stopped
                || b.events.len() >= HANDOVER_EVENTS
                || b.handed.is_none_or(|t| t.elapsed() >= HANDOVER_EVERY);
            if !due {
                return;
            }
            b.handed = Some(Instant::now());
            out.append(&mut b.events);
            if b.dropped > 0 {
                let now = monotonic_ns();
                out.push(Event::LostEvents(LostEvents {
                    count: b.dropped,
                    reason: self.shared.reasons.outbox_full,
                    from_ns: now,
                    to_ns: now,
                }));
                b.dropped = 0;
            }
        }
    }

    /// Detaches the probes after a last drain of the ring buffer and histograms into the
    /// outboxes; call before the endpoints' writers take their last events.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Drop for EbpfSession {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Says why loading failed in terms of what to do.
fn load_failure(error: &str) -> String {
    let euid = effective_uid();
    if euid != 0 {
        format!(
            "loading eBPF programs needs root or CAP_BPF and CAP_PERFMON (running as uid {euid}): {error}"
        )
    } else {
        format!("the kernel refused the probe object: {error}")
    }
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn attach(ebpf: &mut Ebpf, probe: Probe) -> std::result::Result<(), String> {
    for (program, tracepoint) in probe.programs() {
        let prog: &mut RawTracePoint = ebpf
            .program_mut(program)
            .ok_or_else(|| format!("the probe object has no program {program}"))?
            .try_into()
            .map_err(|e| format!("{program}: {e}"))?;
        prog.load()
            .map_err(|e| format!("the kernel refused {program}: {}", error_chain(&e)))?;
        prog.attach(tracepoint).map_err(|e| {
            format!(
                "cannot attach {program} to raw tracepoint {tracepoint}: {}",
                error_chain(&e)
            )
        })?;
    }
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    // The verifier log can be long; its first line says enough for a notice.
    // SLUG_EBPF_VERIFIER_LOG=1 keeps the whole verifier log, to debug a probe.
    if std::env::var_os("SLUG_EBPF_VERIFIER_LOG").is_some() {
        return s;
    }
    s.lines().next().unwrap_or_default().to_string()
}

impl StepRegistry {
    fn take(ebpf: &mut Ebpf) -> std::result::Result<StepRegistry, String> {
        let mut map = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| format!("the probe object has no map {name}"))
        };
        Ok(StepRegistry {
            thread_stage: Array::try_from(map("thread_stage")?)
                .map_err(|e| format!("thread_stage: {e}"))?,
            stage_step: Array::try_from(map("stage_step")?)
                .map_err(|e| format!("stage_step: {e}"))?,
            step_hist: StepSlots::map(map("step_hist")?)?,
            syscall_class: Array::try_from(map("syscall_class")?)
                .map_err(|e| format!("syscall_class: {e}"))?,
            stages: BTreeMap::new(),
        })
    }

    /// Moves the histograms of every completed step (and, when `stopping`, of the current one)
    /// into `out` and re-arms their slots for the step `STEP_SLOTS` later, reading them in the
    /// mapped `step_hist`: no syscall, and work in proportion to the steps the stages ran.
    fn collect(&mut self, tgid: u32, stopping: bool, out: &mut Vec<(Route, Event)>) {
        let now = monotonic_ns();
        for (endpoint, stage) in &mut self.stages {
            let current = stage.step.load(Ordering::Acquire);
            let end = if stopping {
                current.saturating_add(1)
            } else {
                current
            };
            // A slot left unread for more than STEP_SLOTS steps still holds the step it was
            // armed for (the probes counted the later steps that found it so as lost): the
            // last STEP_SLOTS steps visit every slot once.
            let from = stage.next.max(end.saturating_sub(STEP_SLOTS));
            let mut done = from;
            for step in from..end {
                let key = stage.index * STEP_SLOTS as u32 + (step % STEP_SLOTS) as u32;
                let Some(slot) = self.step_hist.slot(key) else {
                    done = step + 1;
                    continue;
                };
                match slot.take(step) {
                    SlotRead::Counts(armed) => {
                        slot.drain(|i, count| {
                            let Some(nr) = (i / STEP_BUCKETS)
                                .checked_sub(1)
                                .and_then(|c| PER_STEP_SYSCALLS.get(c))
                            else {
                                return;
                            };
                            let bucket = (i % STEP_BUCKETS) as u64;
                            out.push((
                                Route::Endpoint(*endpoint),
                                Event::Ebpf(EbpfEvent {
                                    kind: EbpfKind::SyscallHistogram,
                                    pid: tgid,
                                    tid: 0,
                                    cpu: 0,
                                    arg0: *nr,
                                    arg1: bucket | (armed + 1) << 8,
                                    arg2: u64::from(count),
                                    ns: now,
                                }),
                            ));
                        });
                        slot.arm(step + STEP_SLOTS);
                    }
                    SlotRead::NotDue => {}
                    // A probe is still adding to it: the next wakeup reads it (and the steps
                    // after it, in order).
                    SlotRead::Busy => break,
                }
                done = step + 1;
            }
            stage.next = stage.next.max(done);
        }
    }
}

/// What [`StepSlot::take`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotRead {
    /// The slot is closed and holds the counts of this completed step (the step asked for, or
    /// an earlier one that was never read): read them, then re-arm it.
    Counts(u64),
    /// The slot is armed for a step not completed yet: nothing to read.
    NotDue,
    /// A probe is still adding to it: it was left open, try again later.
    Busy,
}

impl StepSlots {
    /// Maps `step_hist` into this process.
    fn map(map: Map) -> std::result::Result<StepSlots, String> {
        let Map::Array(data) = map else {
            return Err("step_hist: not an array map".into());
        };
        let len = (STAGES as usize) * (STEP_SLOTS as usize) * STEP_SLOT_BYTES;
        let mem = MmapOptions::new()
            .len(len)
            .map_raw(&data.fd().as_fd())
            .map_err(|e| {
                format!(
                    "cannot map the per-step histograms (step_hist) into memory: {e}; the kernel \
                     needs BPF_F_MMAPABLE array maps (Linux 5.5)"
                )
            })?;
        Ok(StepSlots { mem, _map: data })
    }

    /// Slot `key` (`stage * STEP_SLOTS + step % STEP_SLOTS`), `None` past the map's end.
    fn slot(&self, key: u32) -> Option<StepSlot<'_>> {
        let at = usize::try_from(key).ok()?.checked_mul(STEP_SLOT_BYTES)?;
        if at.checked_add(STEP_SLOT_BYTES)? > self.mem.len() {
            return None;
        }
        // SAFETY: `at..at + STEP_SLOT_BYTES` lies in the mapping (checked above), which lives as
        // long as `self`; array map values are 8-byte aligned in a page-aligned mapping, so each
        // field is aligned for its atomic type. The kernel's probes change these words only with
        // atomic adds and the reader only through atomics, so shared references to atomics are
        // sound; the reader touches the counts (as pairs) only while no probe is inside the
        // slot (`StepSlot::take`).
        unsafe {
            let base = self.mem.as_ptr().add(at);
            Some(StepSlot {
                step: &*base.cast::<AtomicU64>(),
                busy: &*base.add(8).cast::<AtomicU32>(),
                counts: std::slice::from_raw_parts(
                    base.add(16 + 4 * STEP_BUCKETS).cast::<AtomicU64>(),
                    (STEP_CLASSES - 1) * STEP_BUCKETS / 2,
                ),
            })
        }
    }
}

impl StepSlot<'_> {
    /// Closes the slot if it is armed for a step up to `upto` (completed), so that from now on
    /// the probes count what comes for it as lost, and waits for probes already adding to it to
    /// finish.
    fn take(&self, upto: u64) -> SlotRead {
        let armed = self.step.load(Ordering::Acquire);
        if armed > upto {
            return SlotRead::NotDue;
        }
        // Closing, then reading `busy` (both sequentially consistent) pairs with the probe's
        // locked add to `busy` before it reads `step`: either the probe saw the slot closed, or
        // this thread sees it busy and waits.
        self.step.store(STEP_CLOSED, Ordering::SeqCst);
        for _ in 0..STEP_BUSY_TRIES {
            if self.busy.load(Ordering::SeqCst) == 0 {
                return SlotRead::Counts(armed);
            }
            std::hint::spin_loop();
        }
        self.step.store(armed, Ordering::SeqCst);
        SlotRead::Busy
    }

    /// Calls `f(class * STEP_BUCKETS + bucket, count)` for each count that is not 0, and
    /// empties the slot. Only for a slot [`StepSlot::take`] closed (no probe writes to it).
    fn drain(&self, mut f: impl FnMut(usize, u32)) {
        for (w, pair) in self.counts.iter().enumerate() {
            let v = pair.load(Ordering::Relaxed);
            if v == 0 {
                continue;
            }
            pair.store(0, Ordering::Relaxed);
            // Little-endian: the lower half is the first count of the pair.
            let i = STEP_BUCKETS + 2 * w;
            for (k, count) in [v as u32, (v >> 32) as u32].into_iter().enumerate() {
                if count != 0 {
                    f(i + k, count);
                }
            }
        }
    }

    /// Arms the (empty) slot for `step`.
    fn arm(&self, step: u64) {
        self.step.store(step, Ordering::Release);
    }
}

/// The maps the drain thread reads.
struct DrainMaps {
    ring: RingBuf<MapData>,
    hist: BpfHashMap<MapData, u64, u64>,
    lost: Array<MapData, u64>,
}

impl DrainMaps {
    fn take(ebpf: &mut Ebpf) -> std::result::Result<DrainMaps, String> {
        let mut map = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| format!("the probe object has no map {name}"))
        };
        Ok(DrainMaps {
            ring: RingBuf::try_from(map("events")?).map_err(|e| format!("events: {e}"))?,
            hist: BpfHashMap::try_from(map("syscall_hist")?)
                .map_err(|e| format!("syscall_hist: {e}"))?,
            lost: Array::try_from(map("lost")?).map_err(|e| format!("lost: {e}"))?,
        })
    }
}

/// NUMA node of every CPU, from `/sys/devices/system/node/node*/cpulist`.
fn cpu_nodes() -> Vec<Option<u32>> {
    let mut map = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/devices/system/node") else {
        return map;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(node) = name
            .to_str()
            .and_then(|n| n.strip_prefix("node"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path().join("cpulist");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(cpus) = crate::topology::parse_cpu_list(&path, text.trim()) else {
            continue;
        };
        for cpu in cpus {
            let i = cpu as usize;
            if i < 65536 {
                if map.len() <= i {
                    map.resize(i + 1, None);
                }
                map[i] = Some(node);
            }
        }
    }
    map
}

fn drain_loop(shared: &SessionShared, ebpf: Ebpf, mut maps: DrainMaps) {
    let mut hist_seen: HashMap<u64, u64, BuildHasherDefault<IntHasher>> = HashMap::default();
    let mut hist_generation = 0u64;
    let mut lost_seen = [0u64; 3];
    let mut last_hist = Instant::now();
    let mut last_ns = monotonic_ns();
    let mut batch: Vec<(Route, Event)> = Vec::new();
    loop {
        let stopping = shared.stop.load(Ordering::Acquire);
        while let Some(item) = maps.ring.next() {
            if let Some(r) = ProbeRecord::parse(&item)
                && let Some(e) = r.to_event(shared.tgid, &shared.cpu_node)
            {
                batch.push((Route::Thread(r.tid), e));
            }
        }
        lock(&shared.steps).collect(shared.tgid, stopping, &mut batch);
        if stopping || last_hist.elapsed() >= HISTOGRAM_EVERY {
            let now = monotonic_ns();
            // Walking the hash map costs two syscalls a key: only when the probes counted
            // something in it since the last walk (read first, so a count made during the walk
            // brings another).
            let changed = match maps.lost.get(&HIST_GENERATION, 0) {
                Ok(g) => std::mem::replace(&mut hist_generation, g) != g,
                Err(_) => true,
            };
            if changed {
                for (key, count) in maps.hist.iter().flatten() {
                    let seen = hist_seen.entry(key).or_insert(0);
                    if count > *seen {
                        let tid = key as u32;
                        batch.push((
                            Route::Thread(tid),
                            Event::Ebpf(EbpfEvent {
                                kind: EbpfKind::SyscallHistogram,
                                pid: shared.tgid,
                                tid,
                                cpu: 0,
                                arg0: (key >> 32) & 0xffff,
                                arg1: key >> 48,
                                arg2: count - *seen,
                                ns: now,
                            }),
                        ));
                        *seen = count;
                    }
                }
            }
            let reasons = [
                (LOST_RING, shared.reasons.ring_full),
                (LOST_HIST_FULL, shared.reasons.map_full),
                (LOST_STEP, shared.reasons.step_behind),
            ];
            for ((index, reason), seen) in reasons.into_iter().zip(lost_seen.iter_mut()) {
                let n = maps.lost.get(&index, 0).unwrap_or(*seen);
                if n > *seen {
                    // Process-wide: charged to the first endpoint, so it is counted once.
                    batch.push((
                        Route::First,
                        Event::LostEvents(LostEvents {
                            count: n - *seen,
                            reason,
                            from_ns: last_ns,
                            to_ns: now,
                        }),
                    ));
                    *seen = n;
                }
            }
            last_ns = now;
            last_hist = Instant::now();
        }
        deliver(shared, &mut batch);
        if stopping {
            break;
        }
        std::thread::sleep(POLL_EVERY);
    }
    // Dropping the object detaches every probe.
    drop(maps);
    drop(ebpf);
}

/// Moves `batch` into the outboxes of the endpoints its threads are routed to.
fn deliver(shared: &SessionShared, batch: &mut Vec<(Route, Event)>) {
    if batch.is_empty() {
        return;
    }
    let routes = lock(&shared.routes);
    let mut boxes = lock(&shared.outboxes);
    let first = boxes.keys().next().copied();
    for (route, event) in batch.drain(..) {
        let endpoint = match route {
            Route::Thread(tid) => routes.get(&tid).copied(),
            Route::Endpoint(e) => Some(e),
            Route::First => first,
        };
        match endpoint.and_then(|e| boxes.get_mut(&e)) {
            Some(b) if b.events.len() < OUTBOX_LIMIT => b.events.push(event),
            Some(b) => b.dropped += 1,
            // A thread no endpoint claimed: the recorder's own, whose waits are not the stage's.
            None => {}
        }
    }
}
