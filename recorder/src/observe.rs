//! The recorder's taps into the pipeline runtime: a transfer observer, kernel/step hooks, and
//! the factory that builds both (plus the endpoint's recorder) for every stage.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use slug_kernels::{Hooks, KernelCall, KernelId, Section, Stage, StageCursor};
use slug_schema::{
    Counter, Direction, Event, KernelSpan, SnapshotEvent, StepBoundary, Transfer as TransferEvent,
    Transport, WriterOptions,
};
use slug_transport::TransportError;
use slug_transport::pipeline::{ObserverFactory, StageContext, StageObservers, StageStateObserver};
use slug_transport::transfer::{
    Observers, Transfer, TransferObserver, TransportKind, kernel_output_hash,
};
use xxhash_rust::xxh3::xxh3_128;

use crate::blob::BlobStore;
use crate::ebpf::{EbpfRequest, EbpfSession};
use crate::endpoint::{
    EBPF_LOST_REASONS, EndpointOptions, EndpointRecorder, EndpointShared, EndpointStats,
    PAGE_FAULTS_NAME, TASK_CLOCK_NAME,
};
use crate::error::{RecorderError, Result};
use crate::perf::{
    Capabilities, HostPmus, PerfConfig, PerfStreams, PerfTarget, StepCounters, StreamKind,
    current_tid, monotonic_ns,
};
use crate::snapshot::{SnapshotInfo, SnapshotStore, SnapshotWriter};

/// Which transfer payloads a recording stores (hashes are always recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PayloadPolicy {
    /// None: the pipeline replays from snapshots and the prompt.
    #[default]
    None,
    /// Only what crosses the pipeline's boundary: the tokens the last stage sends back to
    /// stage 0 (its output), enough to check a replay's result without re-running it.
    Boundary,
    /// Every transfer: any single stage can be replayed alone from its recorded inputs.
    All,
}

impl FromStr for PayloadPolicy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<PayloadPolicy, String> {
        match s {
            "none" => Ok(PayloadPolicy::None),
            "boundary" => Ok(PayloadPolicy::Boundary),
            "all" => Ok(PayloadPolicy::All),
            other => Err(format!(
                "unknown payload policy `{other}`; use none, boundary or all"
            )),
        }
    }
}

impl std::fmt::Display for PayloadPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PayloadPolicy::None => "none",
            PayloadPolicy::Boundary => "boundary",
            PayloadPolicy::All => "all",
        })
    }
}

/// The transfer id the trace stores: the link in the top 24 bits, its sequence number below.
pub fn trace_transfer_id(t: &Transfer) -> u64 {
    u64::from(t.id.link.0) << 40 | (t.id.seq & ((1 << 40) - 1))
}

fn transport(kind: TransportKind) -> Transport {
    match kind {
        TransportKind::Local => Transport::Local,
        TransportKind::Shm => Transport::Shm,
        TransportKind::Tcp => Transport::Tcp,
    }
}

/// Logs every transfer of one endpoint with its content hash (and payload, by policy).
#[derive(Debug)]
pub struct TransferRecorder {
    shared: Arc<EndpointShared>,
    /// On a node the observers own the recorder: the log closes when the stage drops them.
    _recorder: Option<Arc<EndpointRecorder>>,
    policy: PayloadPolicy,
    /// Tag layer of the token link (the model's layer count).
    token_layer: u32,
}

impl TransferRecorder {
    fn record(&self, t: &Transfer, bytes: &[u8], direction: Direction) {
        let hash = xxh3_128(bytes);
        let wanted = match self.policy {
            PayloadPolicy::None => false,
            PayloadPolicy::Boundary => t.tag.layer == self.token_layer,
            PayloadPolicy::All => true,
        };
        let payload = (wanted && self.shared.store_payload(hash, bytes)).then_some(hash);
        self.shared.append(&Event::Transfer(TransferEvent {
            id: trace_transfer_id(t),
            src_endpoint: t.src.endpoint.0,
            dst_endpoint: t.dst.endpoint.0,
            src_arena: t.src.arena.0,
            dst_arena: t.dst.arena.0,
            src_offset: t.src.offset,
            dst_offset: t.dst.offset,
            len: t.len,
            hash,
            post_ns: t.post_ns,
            complete_ns: t.complete_ns,
            transport: transport(t.transport),
            direction,
            payload,
        }));
    }
}

impl TransferObserver for TransferRecorder {
    fn posted(&self, transfer: &Transfer, bytes: &[u8]) {
        self.record(transfer, bytes, Direction::Send);
    }

    fn completed(&self, transfer: &Transfer, bytes: &[u8]) {
        self.record(transfer, bytes, Direction::Recv);
    }
}

/// Kernel spans, step boundaries and per-step counters of one stage.
#[derive(Debug)]
pub struct StageHooks {
    shared: Arc<EndpointShared>,
    /// On a node the observers own the recorder: the log closes when the stage drops them.
    _recorder: Option<Arc<EndpointRecorder>>,
    /// Opened on the stage thread at its first step boundary (the hooks are built elsewhere).
    counters: Option<StepCounters>,
    want_counters: bool,
    /// `--hash-kernels`: every span carries its output's hash, so a replay can name the kernel.
    hash_kernels: bool,
}

impl Hooks for StageHooks {
    fn kernel(&mut self, call: &KernelCall, output: &mut [f32]) {
        self.shared.append(&Event::KernelSpan(KernelSpan {
            kernel: u32::from(call.kernel.index()),
            layer: call.layer.unwrap_or(u32::MAX),
            step: call.step,
            seq: call.seq,
            row_start: 0,
            row_end: call.rows,
            thread: 0,
            start_ns: call.start_ns,
            end_ns: call.end_ns,
            // The head's logits are the last stage's output activations: always hashed, so a
            // replay at the default level sees a change that leaves the argmax token alone.
            output_hash: (self.hash_kernels || call.kernel == KernelId::Head)
                .then(|| kernel_output_hash(output)),
        }));
    }

    fn step_boundary(&mut self, step: u64, seq: u32) {
        let ns = monotonic_ns();
        self.shared
            .append(&Event::StepBoundary(StepBoundary { step, seq, ns }));
        self.shared.mark_step(step);
        if self.want_counters && self.counters.is_none() {
            // Failing here was already reported when the capability was probed.
            self.counters = StepCounters::open_thread(current_tid()).ok();
            self.want_counters = self.counters.is_some();
        }
        if let Some(c) = &self.counters
            && let Ok(v) = c.read()
        {
            for (name, value) in [
                (TASK_CLOCK_NAME, v.task_clock_ns),
                (PAGE_FAULTS_NAME, v.page_faults),
            ] {
                self.shared
                    .append(&Event::Counter(Counter { name, value, ns }));
            }
        }
    }
}

/// Snapshots of one stage at step 0 and every `every` steps: the hot-path capture (hash every
/// chunk, copy the new ones) runs here; compression and writing run on the [`SnapshotWriter`].
///
/// Meant for the runtime's step boundary, where the arena and cursor are consistent.
#[derive(Debug)]
pub struct StageSnapshotter {
    stage: u32,
    every: u64,
    writer: Arc<SnapshotWriter>,
    shared: Arc<EndpointShared>,
    /// Per chunk: the hash of the last snapshot if the chunk lies wholly in the stage's weights
    /// (written once at build), so later snapshots need not hash it again.
    weight_hashes: Vec<Option<u128>>,
}

impl StageSnapshotter {
    /// Snapshots of `stage` into `writer`'s store every `every` steps (0: only step 0), logging
    /// a snapshot event through `shared`.
    pub fn new(
        stage: u32,
        every: u64,
        writer: Arc<SnapshotWriter>,
        shared: Arc<EndpointShared>,
    ) -> StageSnapshotter {
        StageSnapshotter {
            stage,
            every,
            writer,
            shared,
            weight_hashes: Vec::new(),
        }
    }

    /// Which chunks lie wholly inside the stage's weights section (sections are contiguous and
    /// in address order, so the section is one span, alignment padding included).
    fn weight_chunks(&self, stage: &Stage) -> Vec<bool> {
        let size = self.writer.store().chunk_size();
        let weights = stage
            .layout()
            .regions
            .iter()
            .filter(|r| r.section == Section::Weights);
        let start = weights.clone().map(|r| r.offset).min().unwrap_or(0);
        let end = weights.map(|r| r.offset + r.bytes).max().unwrap_or(0);
        let len = stage.arena().len();
        (0..len.div_ceil(size))
            .map(|i| start <= i * size && ((i + 1) * size).min(len) <= end)
            .collect()
    }

    /// Takes a snapshot of `stage` if its step counter is due; returns its totals when taken.
    /// The cursor is stored as JSON in the snapshot index.
    pub fn at_step_boundary(&mut self, stage: &Stage) -> Result<Option<SnapshotInfo>> {
        let step = stage.cursor().step;
        // Step 0 always; with `every` = 0 only step 0 (the only multiple of 0).
        let due = step.is_multiple_of(self.every);
        if !due {
            return Ok(None);
        }
        let cursor = serde_json::to_vec(stage.cursor())
            .map_err(|e| RecorderError::io(self.writer.store().dir(), std::io::Error::other(e)))?;
        let pending = self.writer.store().capture_with(
            self.stage,
            step,
            stage.arena().bytes(),
            &cursor,
            &self.weight_hashes,
        )?;
        if self.weight_hashes.is_empty() {
            let hashes = &pending.index().chunks;
            self.weight_hashes = self
                .weight_chunks(stage)
                .into_iter()
                .zip(hashes)
                .map(|(weight, &h)| weight.then_some(h))
                .collect();
        }
        let info = pending.info();
        self.writer.submit(pending);
        self.shared.append(&Event::Snapshot(SnapshotEvent {
            stage: self.stage,
            step,
            id: info.id,
            bytes: info.bytes,
            new_bytes: info.new_bytes,
            chunks: info.chunks,
            ns: monotonic_ns(),
        }));
        Ok(Some(info))
    }
}

/// Restores `stage` from its snapshot at `step` in `store` (arena bytes verified chunk by chunk).
pub fn restore_stage(store: &SnapshotStore, stage: &mut Stage, step: u64) -> Result<()> {
    let index = stage.index() as u32;
    let mut bytes = vec![0u8; stage.arena().len()];
    let cursor = store.restore(index, step, &mut bytes)?;
    let path = store.index_path(index, step);
    let cursor: StageCursor =
        serde_json::from_slice(&cursor).map_err(|e| RecorderError::SnapshotIndex {
            path: path.clone(),
            problem: format!("cursor is not a stage cursor ({e})"),
        })?;
    stage
        .restore(&bytes, cursor)
        .map_err(|e| RecorderError::SnapshotIndex {
            path,
            problem: format!("does not fit this stage ({e})"),
        })
}

/// Settings shared by every endpoint of a recording.
#[derive(Debug, Clone)]
pub struct RecorderSettings {
    /// The trace directory.
    pub trace_dir: PathBuf,
    /// Payload policy.
    pub payloads: PayloadPolicy,
    /// Perf streams.
    pub perf: PerfConfig,
    /// Records per thread ring.
    pub ring_records: usize,
    /// Log frame size and zstd level.
    pub writer: WriterOptions,
    /// Counts events written by every endpoint, for a progress display.
    pub progress: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Snapshots of every stage at step 0 and every K steps (`Some(0)`: step 0 only); `None`:
    /// none (a replay then rebuilds stages from the seed).
    pub snapshot_every: Option<u64>,
    /// Hash every kernel output into its span (`--hash-kernels`).
    pub hash_kernels: bool,
    /// eBPF probes (`--ebpf`).
    pub ebpf: EbpfRequest,
}

/// Builds each stage's recorder and observers; collects their results at the end.
#[derive(Debug)]
pub struct RecorderFactory {
    settings: RecorderSettings,
    pmus: HostPmus,
    /// The process's probes (every stage is a thread of it) and their capability report.
    ebpf: (Option<Arc<EbpfSession>>, Capabilities),
    blobs: Option<Arc<BlobStore>>,
    endpoints: Mutex<Vec<EndpointRecorder>>,
    capabilities: Mutex<Option<Capabilities>>,
    snapshots: Snapshots,
}

impl RecorderFactory {
    /// A factory recording into `settings.trace_dir` (which must exist).
    pub fn new(settings: RecorderSettings, pmus: HostPmus) -> Result<RecorderFactory> {
        let blobs = blob_store(&settings, &pmus)?;
        let snapshots = Snapshots::new(&settings)?;
        let ebpf = EbpfSession::open(&settings.ebpf, EBPF_LOST_REASONS);
        Ok(RecorderFactory {
            settings,
            pmus,
            ebpf,
            blobs,
            endpoints: Mutex::new(Vec::new()),
            capabilities: Mutex::new(None),
            snapshots,
        })
    }

    fn start_stage(&self, stage: u32, layers: u32) -> Result<StageObservers> {
        let (recorder, caps, want_counters) = start_endpoint(
            &self.settings,
            &self.pmus,
            self.blobs.clone(),
            stage,
            &self.ebpf,
        )?;
        {
            // Every stage sees the same host: keep the first stage's report for the manifest.
            let mut c = self.capabilities.lock().unwrap_or_else(|p| p.into_inner());
            if c.is_none() {
                *c = Some(caps);
            }
        }
        let shared = Arc::clone(recorder.shared());
        self.snapshots.remember(stage, &shared);
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(recorder);
        Ok(observers(
            shared,
            None,
            &self.settings,
            layers,
            want_counters,
        ))
    }

    /// The perf capability report (after at least one stage started).
    pub fn capabilities(&self) -> Option<Capabilities> {
        self.capabilities
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until every snapshot taken is on disk; returns how many were written.
    pub fn finish_snapshots(&self) -> Result<usize> {
        self.snapshots.finish()
    }

    /// Stops every endpoint's writer and returns each one's totals, in endpoint order.
    pub fn finish(&self) -> Vec<Result<EndpointStats>> {
        let mut all: Vec<EndpointRecorder> = self
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        all.sort_by_key(|e| e.shared().endpoint());
        if let Some(e) = &self.ebpf.0 {
            e.stop();
        }
        all.into_iter().map(EndpointRecorder::finish).collect()
    }
}

/// Opens the perf streams on the calling (stage) thread and starts the endpoint's recorder,
/// fed the events of its threads by the process's eBPF probes (`ebpf`, with their report).
fn start_endpoint(
    settings: &RecorderSettings,
    pmus: &HostPmus,
    blobs: Option<Arc<BlobStore>>,
    stage: u32,
    ebpf: &(Option<Arc<EbpfSession>>, Capabilities),
) -> Result<(EndpointRecorder, Capabilities, bool)> {
    let mut perf_config = settings.perf.clone();
    if let Some(session) = &ebpf.0 {
        perf_config.covered_by_ebpf = session.covered_perf_streams();
    }
    let (perf, mut caps) =
        PerfStreams::open(pmus, &perf_config, &PerfTarget::Thread(current_tid()));
    caps.entries.extend(ebpf.1.entries.iter().cloned());
    caps.notices.extend(ebpf.1.notices.iter().cloned());
    let want_counters = perf.kinds().contains(&StreamKind::StepCounters);
    let options = EndpointOptions {
        endpoint: stage,
        endpoints_dir: settings.trace_dir.join(slug_schema::ENDPOINTS_DIR),
        ring_records: settings.ring_records,
        writer: settings.writer,
        progress: settings.progress.clone(),
        ebpf: ebpf.0.clone(),
    };
    let recorder = EndpointRecorder::start(&options, Some(perf), blobs)?;
    Ok((recorder, caps, want_counters))
}

fn observers(
    shared: Arc<EndpointShared>,
    owner: Option<Arc<EndpointRecorder>>,
    settings: &RecorderSettings,
    layers: u32,
    want_counters: bool,
) -> StageObservers {
    let transfers = Arc::new(TransferRecorder {
        shared: Arc::clone(&shared),
        _recorder: owner.clone(),
        policy: settings.payloads,
        token_layer: layers,
    });
    StageObservers {
        transfers: Observers::none().with(transfers),
        hooks: Box::new(StageHooks {
            shared,
            _recorder: owner,
            counters: None,
            want_counters,
            hash_kernels: settings.hash_kernels,
        }),
    }
}

/// The snapshot side of a factory: one background writer for the whole recording (chunks are
/// content-addressed, so weights shared by stages are stored once) and each started stage's
/// endpoint, which logs its snapshot events.
#[derive(Debug)]
struct Snapshots {
    every: Option<u64>,
    writer: Mutex<Option<Arc<SnapshotWriter>>>,
    stages: Mutex<HashMap<u32, Arc<EndpointShared>>>,
}

impl Snapshots {
    fn new(settings: &RecorderSettings) -> Result<Snapshots> {
        let writer = match settings.snapshot_every {
            Some(_) => {
                let dir = settings.trace_dir.join(slug_schema::SNAPSHOTS_DIR);
                let store = Arc::new(SnapshotStore::open(dir)?);
                Some(Arc::new(SnapshotWriter::spawn(store)?))
            }
            None => None,
        };
        Ok(Snapshots {
            every: settings.snapshot_every,
            writer: Mutex::new(writer),
            stages: Mutex::new(HashMap::new()),
        })
    }

    fn remember(&self, stage: u32, shared: &Arc<EndpointShared>) {
        if self.every.is_some() {
            let mut stages = self.stages.lock().unwrap_or_else(|p| p.into_inner());
            stages.insert(stage, Arc::clone(shared));
        }
    }

    /// The snapshotter of a stage started before (through `remember`), if snapshots are on.
    fn observer(&self, stage: u32) -> Option<Box<dyn StageStateObserver>> {
        let every = self.every?;
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let shared = self
            .stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&stage)?;
        Some(Box::new(SnapshotObserver(Some(StageSnapshotter::new(
            stage, every, writer, shared,
        )))))
    }

    /// Waits for every queued snapshot to be written (once the stages have dropped their
    /// snapshotters); returns how many were written.
    fn finish(&self) -> Result<usize> {
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        match writer.map(Arc::try_unwrap) {
            None => Ok(0),
            Some(Ok(writer)) => Ok(writer.finish()?.len()),
            // A stage still holds it: its drop joins the writer thread, so nothing is lost.
            Some(Err(_)) => Ok(0),
        }
    }
}

/// A [`StageSnapshotter`] as the runtime's step-boundary observer. A failed snapshot (full
/// disk, write error) never stops the pipeline: it becomes a warning of the endpoint and the
/// stage takes no further snapshots.
#[derive(Debug)]
struct SnapshotObserver(Option<StageSnapshotter>);

impl StageStateObserver for SnapshotObserver {
    fn at_step_boundary(&mut self, stage: &Stage) -> std::result::Result<(), TransportError> {
        if let Some(snapshotter) = &mut self.0
            && let Err(e) = snapshotter.at_step_boundary(stage)
        {
            snapshotter.shared.note_error(format!(
                "snapshots stopped at step {}: {e}",
                stage.cursor().step
            ));
            self.0 = None;
        }
        Ok(())
    }
}

fn blob_store(settings: &RecorderSettings, pmus: &HostPmus) -> Result<Option<Arc<BlobStore>>> {
    // Payloads and Intel PT chunks are blobs; without either no store is created.
    if settings.payloads == PayloadPolicy::None && pmus.intel_pt.is_err() {
        return Ok(None);
    }
    Ok(Some(Arc::new(BlobStore::open(
        settings.trace_dir.join("payloads"),
        settings.writer.zstd_level,
    )?)))
}

/// Key of the recorder's entry in [`slug_transport::pipeline::PipelineConfig::observer_settings`].
pub const NODE_SETTINGS_KEY: &str = "slug_recorder";

/// What a `slug node` needs to record its stage (sent inside the pipeline configuration).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeSettings {
    /// The trace directory (on a file system the node shares with the coordinator).
    pub trace_dir: PathBuf,
    /// `--payloads`.
    pub payloads: String,
    /// `--perf`.
    pub perf: String,
    /// `--perf-freq`.
    pub perf_freq_hz: u64,
    /// Records per thread ring.
    pub ring_records: usize,
    /// `--snapshot-every` (`None`: `--no-snapshots`).
    #[serde(default)]
    pub snapshot_every: Option<u64>,
    /// `--hash-kernels`.
    #[serde(default)]
    pub hash_kernels: bool,
    /// `--ebpf` (empty, from a coordinator that predates it: none).
    #[serde(default)]
    pub ebpf: String,
    /// A run id: record into a scratch directory of the node's own (named by it) instead of
    /// `trace_dir`, for the coordinator to collect after the stage ends (hosts without a shared
    /// file system).
    #[serde(default)]
    pub scratch_run: Option<String>,
}

impl NodeSettings {
    /// The observer settings value carrying these settings.
    pub fn to_observer_settings(&self) -> serde_json::Value {
        serde_json::json!({ NODE_SETTINGS_KEY: self })
    }

    /// Where stage `stage` records on this node: `trace_dir`, or its scratch directory.
    fn stage_dir(&self, stage: usize) -> std::result::Result<PathBuf, String> {
        let Some(run) = &self.scratch_run else {
            return Ok(self.trace_dir.clone());
        };
        // The id names a directory: refuse anything that could step outside the temp dir.
        if run.is_empty() || !run.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(format!(
                "run id {run:?} is not made of letters, digits and dashes"
            ));
        }
        Ok(std::env::temp_dir().join(format!("slug-record-{run}-stage-{stage}")))
    }

    fn recorder_settings(&self, stage: usize) -> std::result::Result<RecorderSettings, String> {
        Ok(RecorderSettings {
            trace_dir: self.stage_dir(stage)?,
            payloads: self.payloads.parse()?,
            perf: PerfConfig {
                request: self
                    .perf
                    .parse()
                    .map_err(|e: RecorderError| e.to_string())?,
                freq_hz: self.perf_freq_hz,
                ..PerfConfig::default()
            },
            ring_records: self.ring_records,
            writer: WriterOptions::default(),
            progress: None,
            snapshot_every: self.snapshot_every,
            hash_kernels: self.hash_kernels,
            ebpf: if self.ebpf.is_empty() {
                EbpfRequest::None
            } else {
                self.ebpf
                    .parse()
                    .map_err(|e: RecorderError| e.to_string())?
            },
        })
    }
}

/// Folder of a recording on hosts that carries each node's [`NodeReport`] until the
/// coordinator merges them into the manifest.
pub const NODE_REPORTS_DIR: &str = "nodes";

/// What a node recording a stage on `--hosts` tells the coordinator about its machine.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodeReport {
    /// Perf capabilities: requested, available, captured, with reasons.
    pub capabilities: Vec<slug_schema::Capability>,
    /// One line per missing capability, naming its fallback.
    pub notices: Vec<String>,
    /// The node's hardware; `None` when /sys could not be read (said in `topology_error`).
    pub topology: Option<slug_schema::HostTopology>,
    /// Why `topology` is missing.
    pub topology_error: Option<String>,
}

impl NodeReport {
    fn new(caps: Capabilities) -> NodeReport {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let (topology, topology_error) = match crate::topology::host_topology(&host) {
            Ok(t) => (Some(t), None),
            Err(e) => (None, Some(e.to_string())),
        };
        NodeReport {
            capabilities: caps.entries,
            notices: caps.notices,
            topology,
            topology_error,
        }
    }

    /// The report's path for `stage` under a trace (or scratch) directory.
    pub fn path(dir: &std::path::Path, stage: usize) -> PathBuf {
        dir.join(NODE_REPORTS_DIR).join(format!("{stage}.json"))
    }

    fn write(&self, dir: &std::path::Path, stage: usize) -> Result<()> {
        let path = NodeReport::path(dir, stage);
        let parent = dir.join(NODE_REPORTS_DIR);
        std::fs::create_dir_all(&parent).map_err(|e| RecorderError::io(&parent, e))?;
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| RecorderError::io(&path, std::io::Error::other(e)))?;
        std::fs::write(&path, json).map_err(|e| RecorderError::io(&path, e))
    }

    /// Reads the report of `stage` from a trace directory.
    pub fn read(dir: &std::path::Path, stage: usize) -> Result<NodeReport> {
        let path = NodeReport::path(dir, stage);
        let bytes = std::fs::read(&path).map_err(|e| RecorderError::io(&path, e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| RecorderError::io(&path, std::io::Error::other(e)))
    }
}

/// The factory `slug node` serves stages with: records a stage when the coordinator's
/// configuration carries [`NodeSettings`], observes nothing otherwise. The stage's log closes
/// when the runtime drops the stage's observers.
#[derive(Debug, Default)]
pub struct NodeRecorderFactory {
    /// Per stage served, its snapshots (a node may serve several stages over its life).
    snapshots: Mutex<HashMap<usize, Snapshots>>,
}

impl ObserverFactory for NodeRecorderFactory {
    fn stage_observers(
        &self,
        ctx: &StageContext<'_>,
    ) -> std::result::Result<StageObservers, TransportError> {
        let Some(value) = ctx
            .config
            .observer_settings
            .as_ref()
            .and_then(|v| v.get(NODE_SETTINGS_KEY))
        else {
            return Ok(StageObservers::none());
        };
        let fail = |e: String| {
            TransportError::io(
                format!("start the recorder of stage {}", ctx.stage),
                std::io::Error::other(e),
            )
        };
        let node: NodeSettings = serde_json::from_value(value.clone())
            .map_err(|e| fail(format!("bad recorder settings: {e}")))?;
        let settings = node.recorder_settings(ctx.stage).map_err(fail)?;
        if node.scratch_run.is_some() {
            // A scratch directory starts empty: a leftover of an earlier failed run with the
            // same id must not be collected as this run's.
            let dir = &settings.trace_dir;
            if dir.exists() {
                std::fs::remove_dir_all(dir)
                    .map_err(|e| fail(format!("clear {}: {e}", dir.display())))?;
            }
            let endpoints = dir.join(slug_schema::ENDPOINTS_DIR);
            std::fs::create_dir_all(&endpoints)
                .map_err(|e| fail(format!("create {}: {e}", endpoints.display())))?;
        }
        let started = (|| {
            let pmus = crate::perf::probe()?;
            let blobs = blob_store(&settings, &pmus)?;
            let ebpf = EbpfSession::open(&settings.ebpf, EBPF_LOST_REASONS);
            start_endpoint(&settings, &pmus, blobs, ctx.stage as u32, &ebpf)
        })();
        let (recorder, caps, want_counters) = started.map_err(|e| fail(e.to_string()))?;
        // The coordinator learns this node's capabilities (and, on another machine, its
        // topology) from this file, collected with the logs.
        NodeReport::new(caps)
            .write(&settings.trace_dir, ctx.stage)
            .map_err(|e| fail(e.to_string()))?;
        let recorder = Arc::new(recorder);
        let snapshots = Snapshots::new(&settings).map_err(|e| fail(e.to_string()))?;
        snapshots.remember(ctx.stage as u32, recorder.shared());
        self.snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ctx.stage, snapshots);
        Ok(observers(
            Arc::clone(recorder.shared()),
            Some(recorder),
            &settings,
            ctx.config.model.layers as u32,
            want_counters,
        ))
    }

    fn state_observer(
        &self,
        ctx: &StageContext<'_>,
    ) -> std::result::Result<Option<Box<dyn StageStateObserver>>, TransportError> {
        // The stage's snapshotter owns the writer from here: dropping it with the stage's
        // observers waits for every queued snapshot to reach the disk.
        let snapshots = self
            .snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ctx.stage);
        Ok(snapshots.and_then(|s| {
            let observer = s.observer(ctx.stage as u32);
            drop(s.writer.lock().unwrap_or_else(|p| p.into_inner()).take());
            observer
        }))
    }

    fn collected_files(&self, ctx: &StageContext<'_>) -> Option<PathBuf> {
        let node: NodeSettings = ctx
            .config
            .observer_settings
            .as_ref()
            .and_then(|v| v.get(NODE_SETTINGS_KEY))
            .and_then(|v| serde_json::from_value(v.clone()).ok())?;
        node.scratch_run.as_ref()?;
        node.stage_dir(ctx.stage).ok()
    }
}

impl ObserverFactory for RecorderFactory {
    fn stage_observers(
        &self,
        ctx: &StageContext<'_>,
    ) -> std::result::Result<StageObservers, TransportError> {
        self.start_stage(ctx.stage as u32, ctx.config.model.layers as u32)
            .map_err(|e: RecorderError| {
                TransportError::io(
                    format!("start the recorder of stage {}", ctx.stage),
                    std::io::Error::other(e.to_string()),
                )
            })
    }

    fn state_observer(
        &self,
        ctx: &StageContext<'_>,
    ) -> std::result::Result<Option<Box<dyn StageStateObserver>>, TransportError> {
        Ok(self.snapshots.observer(ctx.stage as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slug_kernels::{LayerPlan, ModelConfig, ThreadPool};

    #[test]
    fn a_stage_snapshot_restores_into_a_fresh_stage() {
        let dir = tempfile::tempdir().unwrap();
        let endpoints = dir.path().join("endpoints");
        std::fs::create_dir(&endpoints).unwrap();
        let recorder = EndpointRecorder::start(
            &EndpointOptions {
                endpoint: 0,
                endpoints_dir: endpoints,
                ring_records: 1024,
                writer: WriterOptions::default(),
                progress: None,
                ebpf: None,
            },
            None,
            None,
        )
        .unwrap();
        // Small chunks, so the tiny model's weights fill some whole chunks.
        let store =
            Arc::new(SnapshotStore::open_with(dir.path().join("snapshots"), 4096, 1).unwrap());
        let writer = Arc::new(SnapshotWriter::spawn(Arc::clone(&store)).unwrap());
        let mut snap =
            StageSnapshotter::new(0, 4, Arc::clone(&writer), Arc::clone(recorder.shared()));

        let cfg = ModelConfig::preset("tiny").unwrap();
        let plan = LayerPlan::even(cfg.layers, 2).unwrap();
        let pool = ThreadPool::new(1).unwrap();
        let mut stage = Stage::new(&cfg, &plan, 0, 1, &pool).unwrap();
        let taken = snap
            .at_step_boundary(&stage)
            .unwrap()
            .expect("step 0 is always taken");
        assert!(taken.new_chunks > 0);
        // Weight chunks keep their hash; a later snapshot hashes only the rest.
        let weights = snap.weight_hashes.iter().filter(|h| h.is_some()).count();
        assert!(weights > 0 && weights < snap.weight_hashes.len());
        let fresh = Stage::new(&cfg, &plan, 0, 1, &pool).unwrap();
        // The KV cache and the cursor change; weights do not (the snapshotter relies on it).
        stage.set_position(0, 3).unwrap();
        let kv = stage.layout().kv.offset;
        stage.arena_mut().bytes_mut()[kv..kv + 64].fill(0x5A);
        let again = snap
            .at_step_boundary(&stage)
            .unwrap()
            .expect("step 0 again: the cursor step did not move");
        assert_eq!(again.new_chunks, 1, "only the touched KV chunk is new");

        let mut other = Stage::new(&cfg, &plan, 0, 1, &pool).unwrap();
        other.arena_mut().bytes_mut().fill(0);
        drop(snap);
        let writer = Arc::try_unwrap(writer).expect("only the test holds the writer");
        let infos = writer.finish().unwrap();
        assert_eq!(infos.len(), 2);
        // The later snapshot (same step, so same index file) restores the changed stage.
        restore_stage(&store, &mut other, 0).unwrap();
        assert!(
            other.arena().bytes() == stage.arena().bytes(),
            "restored arena differs"
        );
        assert_eq!(other.cursor(), stage.cursor());
        assert!(other.arena().bytes() != fresh.arena().bytes());
        let stats = recorder.finish().unwrap();
        assert_eq!(
            stats.log.counts[slug_schema::EventKind::Snapshot as usize],
            2
        );
    }
}
