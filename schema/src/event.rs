//! The events an endpoint records: one plain Rust type per kind, plus kind sets for filters.

/// Id of a string interned in one endpoint log (kernel names, marker texts, counter names); the
/// viewer renumbers every log's ids into one table for the trace.
///
/// Ids are dense, start at 0 and are only meaningful within the log that defined them;
/// resolve them with [`crate::LogReader::string`].
pub type StringId = u32;

/// The kind of an [`Event`]; the `u8` value is what the log stores. Its table (every kind,
/// from a stored value, the name) is derived from the variants.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    strum::EnumCount,
    strum::FromRepr,
    strum::IntoStaticStr,
    strum::VariantArray,
)]
#[strum(serialize_all = "snake_case")]
#[repr(u8)]
pub enum EventKind {
    /// A kernel ran on one thread over a range of rows.
    KernelSpan = 0,
    /// Bytes moved between two endpoints (logged by both ends under the same id).
    Transfer = 1,
    /// A stage finished a pipeline step of one sequence (microbatch).
    StepBoundary = 2,
    /// A snapshot of a stage's state was taken.
    Snapshot = 3,
    /// A hardware or software perf sample (perf_event_open sampling).
    PerfSample = 4,
    /// A chunk of Intel PT AUX data was stored.
    PtChunk = 5,
    /// An event from an eBPF endpoint probe (and nothing else: see [`EventKind::PerfSoftware`]).
    Ebpf = 6,
    /// The recorder lost events (ring overflow, perf lost records).
    LostEvents = 7,
    /// A user marker.
    Marker = 8,
    /// A counter reading (task-clock, page faults, ...).
    Counter = 9,
    /// A perf software record: a context switch or a page fault (format version 3; versions 1
    /// and 2 stored these under [`EventKind::Ebpf`]).
    PerfSoftware = 10,
    /// The endpoint's stage moved between nodes (format version 4): on the endpoint that handed
    /// it off and on the one that took it over.
    Migration = 11,
}

impl EventKind {
    /// Number of event kinds.
    pub const COUNT: usize = <Self as strum::EnumCount>::COUNT;

    /// Every kind, in `u8` order.
    pub const ALL: [EventKind; Self::COUNT] = {
        let variants = <Self as strum::VariantArray>::VARIANTS;
        let mut all = [EventKind::KernelSpan; Self::COUNT];
        let mut i = 0;
        while i < Self::COUNT {
            all[i] = variants[i];
            i += 1;
        }
        all
    };

    /// The kind stored as `value`, or `None` for a value no kind has.
    pub fn from_u8(value: u8) -> Option<EventKind> {
        Self::from_repr(value)
    }

    /// The kind's one name, used by `slug info`, the viewer's `/kind:` filter, exports and the
    /// docs alike (`kernel_span`, `transfer`, ...).
    pub fn name(self) -> &'static str {
        self.into()
    }
}

impl EventKind {
    /// The kind whose [`EventKind::name`] is `name`.
    pub fn from_name(name: &str) -> Option<EventKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// A set of event kinds, for filtering reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KindSet(u16);

impl KindSet {
    /// Every kind.
    pub const ALL: KindSet = KindSet((1 << EventKind::COUNT) - 1);
    /// No kind.
    pub const NONE: KindSet = KindSet(0);

    /// The set holding exactly `kinds`.
    pub fn of(kinds: &[EventKind]) -> KindSet {
        KindSet(kinds.iter().fold(0, |bits, &k| bits | 1 << k as u16))
    }

    /// Whether `kind` is in the set.
    pub fn contains(self, kind: EventKind) -> bool {
        self.0 & (1 << kind as u16) != 0
    }

    /// This set plus `kind`.
    pub fn with(self, kind: EventKind) -> KindSet {
        KindSet(self.0 | 1 << kind as u16)
    }
}

/// How a transfer moved its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::FromRepr, strum::IntoStaticStr)]
#[strum(serialize_all = "lowercase")]
#[repr(u8)]
pub enum Transport {
    /// Same process.
    Local = 0,
    /// Shared-memory pool between processes on one node.
    Shm = 1,
    /// TCP socket.
    Tcp = 2,
    /// MPI.
    Mpi = 3,
    /// RDMA verbs.
    Rdma = 4,
}

impl Transport {
    /// The transport's name (`local`, `shm`, `tcp`, `mpi`, `rdma`).
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// The transport stored as `value`.
    pub fn from_u8(value: u8) -> Option<Transport> {
        Self::from_repr(value)
    }
}

/// Which end of a transfer logged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Direction {
    /// The sending endpoint.
    Send = 0,
    /// The receiving endpoint.
    Recv = 1,
}

/// What a perf sample measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::FromRepr, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
#[repr(u8)]
pub enum PerfSampleKind {
    /// Software cpu-clock timer.
    CpuClock = 0,
    /// Software task-clock timer.
    TaskClock = 1,
    /// Hardware cycles.
    Cycles = 2,
    /// Hardware instructions retired.
    Instructions = 3,
    /// Memory load (PEBS / IBS) with address, latency weight and data source.
    MemLoad = 4,
    /// Memory store (PEBS / IBS).
    MemStore = 5,
    /// Branch misses.
    BranchMiss = 6,
    /// Cache misses.
    CacheMiss = 7,
}

impl PerfSampleKind {
    /// The sample kind's name, as the viewer and exports show it (`cpu-clock`, `mem-load`, ...).
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// The sample kind stored as `value`.
    pub fn from_u8(value: u8) -> Option<PerfSampleKind> {
        Self::from_repr(value)
    }
}

/// Which probe produced an eBPF event (the meaning of `arg0..arg2` depends on it; see trace.capnp).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::FromRepr, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
#[repr(u8)]
pub enum EbpfKind {
    /// A syscall that took at least the recorder's threshold: `ns` = entry, arg0 = syscall nr,
    /// arg1 = return value, arg2 = duration ns.
    Syscall = 0,
    /// A thread was off the CPU: `ns` = when it left, arg0 = duration ns, arg1 = reason (bits
    /// 0-31: the task state it left in, 0 = preempted while runnable, else blocked; bits 32-63:
    /// the syscall it was in plus one, 0 = none), arg2 = tid of the thread that woke it (0 = not
    /// seen).
    OffCpu = 1,
    /// A user page fault: arg0 = address, arg1 = ip, arg2 = error code.
    PageFault = 2,
    /// The scheduler moved a thread: arg0 = from cpu, arg1 = to cpu, arg2 = 1 if the two CPUs are
    /// on different NUMA nodes.
    Migration = 3,
    /// Syscalls shorter than the threshold, counted since the previous histogram event of the
    /// same thread and syscall: arg0 = syscall nr, arg1 = log2 bucket (durations in
    /// `[2^arg1, 2^(arg1+1))` ns), arg2 = count; `ns` = when the counts were read.
    SyscallHistogram = 4,
    /// TCP retransmitted a segment of a socket a thread of the stage sends or receives on:
    /// `tid` = that thread, arg0 = local port << 16 | remote port.
    TcpRetransmit = 5,
    /// The kernel dropped a packet of such a socket: `tid` and arg0 as for retransmits, arg1 =
    /// the kernel's `skb_drop_reason`.
    TcpDrop = 6,
}

impl EbpfKind {
    /// The probe kind stored as `value`.
    pub fn from_u8(value: u8) -> Option<EbpfKind> {
        Self::from_repr(value)
    }

    /// What the probe saw, as the viewer and exports name it (`off-cpu`, `syscall-histogram`, ...).
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// What a perf software record is (the meaning of `arg0..arg2` depends on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::FromRepr, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
#[repr(u8)]
pub enum SoftwareKind {
    /// A context switch: arg0 = tid switched out (else 0), arg1 = tid switched in (else 0),
    /// arg2 = 0 if the thread switched out was preempted (still runnable), 1 if it blocked.
    ContextSwitch = 1,
    /// A page-fault sample: arg0 = data address, arg1 = ip, arg2 = 0.
    PageFault = 2,
}

impl SoftwareKind {
    /// The record kind stored as `value` (the same values the version 1-2 `ebpf` kind used).
    pub fn from_u8(value: u8) -> Option<SoftwareKind> {
        Self::from_repr(value)
    }

    /// What was recorded, as the viewer and exports name it (`context-switch`, `page-fault`).
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// A kernel ran over `rows` output rows of one step.
///
/// The log also has room for the first row and a worker-thread index (`rowStart`, `thread` in
/// trace.capnp); slug's recorder runs every kernel call whole, so it writes both as zero and
/// readers leave them out. An older log that filled them reads back with `rows` the rows its
/// span covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelSpan {
    /// Interned kernel name.
    pub kernel: StringId,
    /// Model layer; `None` for a kernel outside every layer (embedding, final norm, output
    /// head, argmax). The log cannot hold `Some(u32::MAX)`: it reads back as `None`.
    pub layer: Option<u32>,
    /// Pipeline step (token position).
    pub step: u64,
    /// Microbatch (sequence) in flight.
    pub seq: u32,
    /// Output rows the call computed.
    pub rows: u32,
    /// Start, CLOCK_MONOTONIC ns of the endpoint's node.
    pub start_ns: u64,
    /// End, same clock.
    pub end_ns: u64,
    /// xxh3-128 of the output rows, when kernel verification was recorded.
    pub output_hash: Option<u128>,
}

/// How the log stores [`KernelSpan::layer`]: `None` travels as `u32::MAX`, a value no real
/// layer has. The sentinel is a wire detail; only the encoders and decoders see it.
pub(crate) mod layer_wire {
    const NONE: u32 = u32::MAX;

    /// The stored value of a layer.
    pub(crate) fn encode(layer: Option<u32>) -> u32 {
        layer.unwrap_or(NONE)
    }

    /// The layer a stored value means.
    pub(crate) fn decode(stored: u32) -> Option<u32> {
        (stored != NONE).then_some(stored)
    }
}

/// Bytes moved between two endpoints; both ends log it under the same `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Transfer {
    /// Transfer id, equal on both ends.
    pub id: u64,
    /// Sending endpoint.
    pub src_endpoint: u32,
    /// Receiving endpoint.
    pub dst_endpoint: u32,
    /// Arena the bytes came from.
    pub src_arena: u32,
    /// Arena the bytes went to.
    pub dst_arena: u32,
    /// Offset in the source arena.
    pub src_offset: u64,
    /// Offset in the destination arena.
    pub dst_offset: u64,
    /// Bytes moved.
    pub len: u64,
    /// xxh3-128 of the bytes moved.
    pub hash: u128,
    /// When the transfer was posted.
    pub post_ns: u64,
    /// When it completed at this end.
    pub complete_ns: u64,
    /// How it moved.
    pub transport: Transport,
    /// Which end logged it.
    pub direction: Direction,
    /// Content hash of the stored payload, when payloads were recorded.
    pub payload: Option<u128>,
}

/// A stage finished step `step` of sequence `seq`: the event is logged after the step's last
/// kernel, when the arena and cursor are consistent (where a snapshot may be taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StepBoundary {
    /// The stage's step that just ended (its cursor step before it moved on).
    pub step: u64,
    /// Sequence (microbatch) the step ran.
    pub seq: u32,
    /// When the step ended.
    pub ns: u64,
}

/// A snapshot of a stage's state was taken (chunks live in the trace's `snapshots/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnapshotEvent {
    /// Stage snapshotted.
    pub stage: u32,
    /// Step boundary it was taken at.
    pub step: u64,
    /// Snapshot id (content hash of its index).
    pub id: u128,
    /// Total bytes of state.
    pub bytes: u64,
    /// Bytes in chunks not stored before.
    pub new_bytes: u64,
    /// Number of chunks.
    pub chunks: u32,
    /// When.
    pub ns: u64,
}

/// A hardware or software perf sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PerfSample {
    /// What was sampled.
    pub kind: PerfSampleKind,
    /// Instruction pointer.
    pub ip: u64,
    /// Data address (memory samples), else 0.
    pub addr: u64,
    /// Latency weight (memory samples), else the period.
    pub weight: u64,
    /// perf `data_src` (memory samples), else 0.
    pub data_source: u64,
    /// Thread id.
    pub tid: u32,
    /// CPU.
    pub cpu: u32,
    /// When.
    pub ns: u64,
}

/// A chunk of Intel PT AUX data, stored by content hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PtChunk {
    /// CPU whose AUX buffer it came from.
    pub cpu: u32,
    /// Offset in the AUX stream.
    pub aux_offset: u64,
    /// Bytes.
    pub size: u64,
    /// Content hash of the stored bytes.
    pub payload: u128,
    /// When.
    pub ns: u64,
}

/// What the operating system did to a stage's threads, as one of two sources saw it: an eBPF
/// endpoint probe ([`EbpfEvent`], `K` = [`EbpfKind`]) or a perf software record
/// ([`SoftwareRecord`], `K` = [`SoftwareKind`]). The kind says what the three arguments mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SystemRecord<K> {
    /// What happened.
    pub kind: K,
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// CPU.
    pub cpu: u32,
    /// First argument.
    pub arg0: u64,
    /// Second argument.
    pub arg1: u64,
    /// Third argument.
    pub arg2: u64,
    /// When (an interval's or a syscall's start).
    pub ns: u64,
}

/// An event from an eBPF endpoint probe.
pub type EbpfEvent = SystemRecord<EbpfKind>;

/// A perf software record (context switch or page-fault sample), from perf_event_open.
pub type SoftwareRecord = SystemRecord<SoftwareKind>;

impl<K> SystemRecord<K> {
    /// The three arguments in order.
    pub fn args(&self) -> [u64; 3] {
        [self.arg0, self.arg1, self.arg2]
    }
}

impl EbpfEvent {
    /// When it ends: an off-CPU interval's or slow syscall's end, else its time.
    pub fn end_ns(&self) -> u64 {
        match self.kind {
            EbpfKind::OffCpu => self.ns.saturating_add(self.arg0),
            EbpfKind::Syscall => self.ns.saturating_add(self.arg2),
            _ => self.ns,
        }
    }
}

/// The recorder lost `count` events between `from_ns` and `to_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LostEvents {
    /// Events lost.
    pub count: u64,
    /// Interned reason ("ring overflow", "perf lost records", ...).
    pub reason: StringId,
    /// Start of the gap.
    pub from_ns: u64,
    /// End of the gap.
    pub to_ns: u64,
}

/// A user marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Marker {
    /// Interned text.
    pub text: StringId,
    /// When.
    pub ns: u64,
}

/// A counter reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Counter {
    /// Interned counter name ("task-clock", "page-faults", ...).
    pub name: StringId,
    /// Value.
    pub value: u64,
    /// When.
    pub ns: u64,
}

/// Which side of a stage's move between nodes an endpoint was on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::FromRepr, strum::IntoStaticStr)]
#[strum(serialize_all = "lowercase")]
#[repr(u8)]
pub enum MoveRole {
    /// The endpoint's node handed the stage off: its log ends here.
    Left = 0,
    /// The endpoint's node took the stage over: its log starts here.
    Arrived = 1,
}

impl MoveRole {
    /// `left` or `arrived`.
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// The role stored as `value`.
    pub fn from_u8(value: u8) -> Option<MoveRole> {
        Self::from_repr(value)
    }
}

/// A stage moved between nodes (`--migrate`, `slug migrate`): both endpoints of the move hold
/// one, the one that left and the one that arrived, each naming the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MigrationEvent {
    /// The stage that moved.
    pub stage: u32,
    /// The stage's forward step at which the new node took over (its first step there).
    pub step: u64,
    /// The move's number in the run.
    pub index: u32,
    /// Which side of the move this endpoint was on.
    pub role: MoveRole,
    /// The endpoint on the other side.
    pub peer: u32,
    /// When this endpoint's node let go of the stage (left) or started it (arrived).
    pub ns: u64,
}

/// One recorded event; the endpoint is implicit (one log per endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// See [`KernelSpan`].
    KernelSpan(KernelSpan),
    /// See [`Transfer`].
    Transfer(Transfer),
    /// See [`StepBoundary`].
    StepBoundary(StepBoundary),
    /// See [`SnapshotEvent`].
    Snapshot(SnapshotEvent),
    /// See [`PerfSample`].
    PerfSample(PerfSample),
    /// See [`PtChunk`].
    PtChunk(PtChunk),
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
    /// See [`MigrationEvent`].
    Migration(MigrationEvent),
}

impl Event {
    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::KernelSpan(_) => EventKind::KernelSpan,
            Event::Transfer(_) => EventKind::Transfer,
            Event::StepBoundary(_) => EventKind::StepBoundary,
            Event::Snapshot(_) => EventKind::Snapshot,
            Event::PerfSample(_) => EventKind::PerfSample,
            Event::PtChunk(_) => EventKind::PtChunk,
            Event::Ebpf(_) => EventKind::Ebpf,
            Event::LostEvents(_) => EventKind::LostEvents,
            Event::Marker(_) => EventKind::Marker,
            Event::Counter(_) => EventKind::Counter,
            Event::PerfSoftware(_) => EventKind::PerfSoftware,
            Event::Migration(_) => EventKind::Migration,
        }
    }

    /// The primary timestamp: a span's start, a transfer's post, a gap's start, else `ns`.
    pub fn ns(&self) -> u64 {
        match self {
            Event::KernelSpan(e) => e.start_ns,
            Event::Transfer(e) => e.post_ns,
            Event::StepBoundary(e) => e.ns,
            Event::Snapshot(e) => e.ns,
            Event::PerfSample(e) => e.ns,
            Event::PtChunk(e) => e.ns,
            Event::Ebpf(e) => e.ns,
            Event::LostEvents(e) => e.from_ns,
            Event::Marker(e) => e.ns,
            Event::Counter(e) => e.ns,
            Event::PerfSoftware(e) => e.ns,
            Event::Migration(e) => e.ns,
        }
    }

    /// The time the event ends: a span's end, a transfer's completion, a gap's end, an off-CPU
    /// interval's or slow syscall's end, else `ns`.
    pub fn end_ns(&self) -> u64 {
        match self {
            Event::KernelSpan(e) => e.end_ns,
            Event::Transfer(e) => e.complete_ns,
            Event::LostEvents(e) => e.to_ns,
            Event::Ebpf(e) => e.end_ns(),
            other => other.ns(),
        }
    }
}
