//! The pipeline runtime: S stages over a transport, several sequences in flight so the stages
//! overlap, the last stage's token going back to stage 0; one persistent thread pool per stage.
//!
//! [`run`] is the one entry point for `slug run`, the recorder and the replayer:
//! - `local`: every stage is a thread of this process; links are rings in process memory.
//! - `shm` / `tcp` without hosts: this process starts one node process per stage with the
//!   [`PipelineConfig::launcher`] its program handed it (the `slug` binary's runs `slug node
//!   --once` on a loopback port), then coordinates them like remote nodes; `shm` links are rings in
//!   a shared memory-mapped fabric file, `tcp` links are sockets.
//! - `tcp` with [`PipelineConfig::hosts`]: stage `s` runs on the `slug node --listen` at
//!   `hosts[s]`; the coordinator sends the configuration (weights regenerate from the seed).
//!
//! Observers: for `local` the [`ObserverFactory`] given to [`run`] builds each stage's hooks in
//! this process; for the process transports each node builds them with the factory given to
//! [`crate::node::serve`] (the config's `observer_settings` travels to the nodes for that).

pub(crate) mod cluster;
mod launch;
mod stage;
mod state;

use std::path::PathBuf;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use slug_kernels::{Hooks, LayerPlan, ModelConfig, NoHooks};

use crate::clock::ClockOffset;
use crate::error::{Result, TransportError};
use crate::fabric::{Fabric, FabricLayout, RingSpec};
use crate::link::LinkStats;
use crate::transfer::{Observers, Tag, Transfer, TransferObserver, TransportKind, content_hash};

pub use cluster::{LocalNodes, launch_local_nodes, run_on_nodes, run_on_nodes_collecting};
pub use launch::{NodeCommand, NodeLauncher};
pub use stage::STAGE_ARENA;
pub(crate) use stage::{StageIo, drive_stage, link_ends};
pub use state::{ScheduleSlot, StageState, StageStateObserver, restore_stage, schedule_slot};

/// Everything a pipeline run needs; serialisable because the coordinator sends it to nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelineConfig {
    /// The model (any preset with any overrides; weights come from `model.seed`).
    pub model: ModelConfig,
    /// Pipeline stages; the layers are split evenly ([`LayerPlan::even`]).
    pub stages: usize,
    /// How stages exchange activations and tokens.
    pub transport: TransportKind,
    /// Threads of each stage's persistent pool.
    pub threads: usize,
    /// Sequences in flight at once (microbatches); sequences run in groups of this size.
    pub microbatches: usize,
    /// Prompt token ids, one prompt per sequence.
    pub prompts: Vec<Vec<u32>>,
    /// Tokens to generate per sequence.
    pub tokens: usize,
    /// `host:port` of a `slug node --listen` per stage (`tcp` only); empty: launch locally.
    pub hosts: Vec<String>,
    /// Longest any single blocking wait (a link, a handshake, a node's reply) may take.
    pub timeout_ms: u64,
    /// Put the xxh3-128 digest of every received transfer into the report.
    pub digests: bool,
    /// Put the hash of these kernel outputs into the report (a `--hosts` replay checks them).
    #[serde(default)]
    pub kernel_digests: KernelDigests,
    /// Opaque settings for the node-side [`ObserverFactory`] (e.g. where to record).
    pub observer_settings: Option<serde_json::Value>,
    /// How `shm` / `tcp` runs without hosts start their nodes.
    #[serde(default)]
    pub launch: Launch,
    /// Flip one bit of one kernel output (`--inject`), on whichever node runs that stage.
    #[serde(default)]
    pub inject: Option<crate::inject::Injection>,
    /// Stop every stage after this stage step (a replay of a prefix of the schedule); the
    /// last stage does not send back tokens for steps that will not run.
    #[serde(default)]
    pub stop_after: Option<u64>,
    /// Instruction set of every stage's kernels (`scalar`, `avx2`, `avx512`, `neon`); default:
    /// the best the node's CPU has. Results are identical for every choice.
    #[serde(default)]
    pub isa: Option<String>,
    /// How TCP data links protect activation bytes: a keyed MAC per transfer (default) or
    /// nothing (`--link-integrity none`, for fabrics the user trusts).
    #[serde(default)]
    pub link_integrity: crate::link::LinkIntegrity,
    /// Starts this machine's stage processes when `launch` is [`Launch::Processes`] and there
    /// are no hosts; the program that links this library supplies it.
    #[serde(skip)]
    pub launcher: Option<Arc<dyn NodeLauncher>>,
    /// Cluster key file for `hosts` runs; default: the `SLUG_CLUSTER_KEY` environment variable.
    #[serde(skip)]
    pub key_file: Option<PathBuf>,
}

/// How a single-machine `shm` / `tcp` run starts its nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Launch {
    /// One `slug node --once` child process per stage (stage processes as in production).
    #[default]
    Processes,
    /// One node per stage served from a thread of this process: the same sockets, fabric file
    /// and protocol, and the [`ObserverFactory`] given to [`run`] observes every stage.
    Threads,
}

impl PipelineConfig {
    /// A one-stage local run of `model` generating `tokens` tokens for `sequences` copies of
    /// `prompt` (prompt bytes are token ids), all in flight; change fields to taste.
    pub fn new(model: ModelConfig, prompt: &str, sequences: usize, tokens: usize) -> Self {
        Self {
            model,
            stages: 1,
            transport: TransportKind::Local,
            threads: 1,
            microbatches: sequences.max(1),
            prompts: vec![prompt_tokens(prompt); sequences.max(1)],
            tokens,
            hosts: Vec::new(),
            timeout_ms: 60_000,
            digests: false,
            kernel_digests: KernelDigests::None,
            observer_settings: None,
            launch: Launch::Processes,
            inject: None,
            isa: None,
            link_integrity: crate::link::LinkIntegrity::Mac,
            stop_after: None,
            launcher: None,
            key_file: None,
        }
    }

    /// The layer split.
    pub fn plan(&self) -> Result<LayerPlan> {
        LayerPlan::even(self.model.layers, self.stages).map_err(TransportError::from)
    }

    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }

    /// Refuses configurations that cannot run, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.plan()?;
        let bad = |m: String| Err(TransportError::Config(m));
        if self.prompts.is_empty() {
            return bad("no sequences: give at least one prompt".into());
        }
        if let Some(i) = self.prompts.iter().position(|p| p.is_empty()) {
            return bad(format!("prompt of sequence {i} is empty"));
        }
        if let Some(&t) = self
            .prompts
            .iter()
            .flatten()
            .find(|&&t| t as usize >= self.model.vocab)
        {
            return bad(format!(
                "prompt token {t} is outside the vocabulary of {} tokens",
                self.model.vocab
            ));
        }
        let longest = self.prompts.iter().map(Vec::len).max().unwrap_or(0);
        if longest + self.tokens.saturating_sub(1) > self.model.max_seq {
            return bad(format!(
                "prompt of {longest} tokens plus {} generated exceeds the context of {} (max_seq)",
                self.tokens, self.model.max_seq
            ));
        }
        if self.tokens == 0 {
            return bad("tokens = 0: nothing to generate".into());
        }
        if self.microbatches == 0 {
            return bad("microbatches = 0: at least one sequence must be in flight".into());
        }
        if self.threads == 0 {
            return bad("threads = 0: each stage needs at least one thread".into());
        }
        if self.stages > crate::fabric::MAX_STAGES {
            return bad(format!(
                "at most {} stages are supported",
                crate::fabric::MAX_STAGES
            ));
        }
        if let Some(inject) = &self.inject {
            inject.validate(self)?;
        }
        if !self.hosts.is_empty() {
            if self.transport != TransportKind::Tcp {
                return bad(format!(
                    "--hosts needs the tcp transport (got {}): other transports stay on one machine",
                    self.transport
                ));
            }
            if self.hosts.len() != self.stages {
                return bad(format!(
                    "{} hosts for {} stages: give one host:port per stage",
                    self.hosts.len(),
                    self.stages
                ));
            }
        }
        Ok(())
    }

    /// The rings (link shapes) of this pipeline: link `s` goes from stage `s` to `s + 1`, the
    /// last link carries tokens from the last stage back to stage 0.
    pub(crate) fn ring_specs(&self) -> Vec<RingSpec> {
        if self.stages < 2 {
            return Vec::new();
        }
        let longest = self.prompts.iter().map(Vec::len).max().unwrap_or(1) as u64;
        let in_flight = self.microbatches.min(self.prompts.len()).max(1) as u32;
        let message = longest * self.model.dim as u64 * 4;
        let capacity = message.min(SLOT_BYTES);
        // Room for every in-flight message whole, so a sender never waits on a slow consumer
        // for space that the schedule guarantees; pieces of one message overlap in cache.
        let pieces = message.div_ceil(capacity) as u32;
        let mut specs = vec![
            RingSpec {
                slots: in_flight * pieces,
                capacity,
            };
            self.stages - 1
        ];
        specs.push(RingSpec {
            slots: in_flight,
            capacity: 4,
        });
        specs
    }
}

/// Largest slot of an activation ring: big transfers travel in pieces of this size.
const SLOT_BYTES: u64 = 64 << 10;

/// Prompt text to token ids: each byte is a token (the models' vocabularies hold all 256).
pub fn prompt_tokens(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// Where a stage runs, for observers and reports.
#[derive(Debug, Clone, Copy)]
pub struct StageContext<'a> {
    /// Stage index.
    pub stage: usize,
    /// Host the stage runs on ("local" for threads).
    pub host: &'a str,
    /// The run's configuration.
    pub config: &'a PipelineConfig,
}

/// The observers of one stage: its transfer observers and its kernel hooks.
pub struct StageObservers {
    /// Called for every transfer the stage posts or completes.
    pub transfers: Observers,
    /// Called for every kernel call and step boundary of the stage.
    pub hooks: Box<dyn Hooks + Send>,
}

impl std::fmt::Debug for StageObservers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageObservers")
            .field("transfers", &self.transfers)
            .finish_non_exhaustive()
    }
}

impl StageObservers {
    /// No transfer observers, no kernel hooks.
    pub fn none() -> Self {
        Self {
            transfers: Observers::none(),
            hooks: Box::new(NoHooks),
        }
    }
}

/// Builds each stage's observers, in the process where the stage runs.
pub trait ObserverFactory: Send + Sync {
    /// Observers for the stage described by `ctx`.
    fn stage_observers(&self, ctx: &StageContext<'_>) -> Result<StageObservers>;

    /// The state the stage starts from (a restored snapshot) instead of weights generated from
    /// the seed; `None` (the default): generate. Called after the stage is built.
    fn initial_state(&self, _ctx: &StageContext<'_>) -> Result<Option<StageState>> {
        Ok(None)
    }

    /// An observer of the stage's arena and cursor at every step boundary (snapshots), run on
    /// the stage's own thread; `None` (the default): nobody looks.
    fn state_observer(
        &self,
        _ctx: &StageContext<'_>,
    ) -> Result<Option<Box<dyn StageStateObserver>>> {
        Ok(None)
    }

    /// A directory of files this factory wrote for the stage on a node that the coordinator
    /// must collect (a recording on hosts without a shared file system); `None` (the default):
    /// nothing to collect. Asked after the stage's observers were dropped, so the files are
    /// complete; the node removes the directory once the coordinator confirms it has them.
    fn collected_files(&self, _ctx: &StageContext<'_>) -> Option<std::path::PathBuf> {
        None
    }
}

/// The factory that observes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObservers;

impl ObserverFactory for NoObservers {
    fn stage_observers(&self, _ctx: &StageContext<'_>) -> Result<StageObservers> {
        Ok(StageObservers::none())
    }
}

/// Digest of one received transfer, keyed by what it carries rather than how it was scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TransferDigest {
    /// Sequence, step and layer boundary of the bytes.
    pub tag: Tag,
    /// Sending stage.
    pub src: u32,
    /// Receiving stage.
    pub dst: u32,
    /// Bytes moved.
    pub len: u64,
    /// xxh3-128 of the bytes, as 32 hex digits.
    pub hash: HexHash,
}

/// A 128-bit hash that serialises as 32 hex digits (JSON numbers cannot hold it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HexHash(pub u128);

impl Serialize for HexHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:032x}", self.0))
    }
}

impl<'de> Deserialize<'de> for HexHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        u128::from_str_radix(&s, 16)
            .map(HexHash)
            .map_err(|e| serde::de::Error::custom(format!("bad hash {s:?}: {e}")))
    }
}

/// Which kernel outputs a stage reports the hash of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelDigests {
    /// None (default).
    #[default]
    None,
    /// Only the output head's logits (the last stage's output activations).
    Head,
    /// Every kernel call.
    All,
}

/// Hash of one kernel output of a stage, as a node reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelDigest {
    /// The stage's step counter.
    pub step: u64,
    /// Call site.
    pub kernel: slug_kernels::KernelId,
    /// Decoder layer (`None` outside layers).
    pub layer: Option<u32>,
    /// Position of the call within its step.
    pub index: u32,
    /// [`crate::transfer::kernel_output_hash`] of the output, as 32 hex digits.
    pub hash: HexHash,
}

/// Collects a [`TransferDigest`] of every transfer a stage receives and, through
/// [`DigestHooks`], a [`KernelDigest`] of the kernel outputs asked for.
#[derive(Debug, Default)]
pub(crate) struct DigestObserver(Mutex<Vec<TransferDigest>>, Mutex<Vec<KernelDigest>>);

/// Kernel hooks that record a [`KernelDigest`] of each selected output, then call the stage's
/// own hooks. They sit inside the fault injector, so they see what the next kernel reads.
struct DigestHooks {
    inner: Box<dyn Hooks + Send>,
    sink: Arc<DigestObserver>,
    which: KernelDigests,
    step: u64,
    index: u32,
}

impl Hooks for DigestHooks {
    fn timing(&self) -> bool {
        self.inner.timing()
    }

    fn kernel(&mut self, call: &slug_kernels::KernelCall, output: &mut [f32]) {
        if call.step != self.step {
            self.step = call.step;
            self.index = 0;
        }
        let wanted = match self.which {
            KernelDigests::None => false,
            KernelDigests::Head => call.kernel == slug_kernels::KernelId::Head,
            KernelDigests::All => true,
        };
        if wanted && let Ok(mut v) = self.sink.1.lock() {
            v.push(KernelDigest {
                step: call.step,
                kernel: call.kernel,
                layer: call.layer,
                index: self.index,
                hash: HexHash(crate::transfer::kernel_output_hash(output)),
            });
        }
        self.index += 1;
        self.inner.kernel(call, output);
    }

    fn step_boundary(&mut self, step: u64, seq: u32) {
        self.inner.step_boundary(step, seq);
    }
}

impl TransferObserver for DigestObserver {
    fn posted(&self, _transfer: &Transfer, _bytes: &[u8]) {}

    fn completed(&self, t: &Transfer, bytes: &[u8]) {
        let d = TransferDigest {
            tag: t.tag,
            src: t.src.endpoint.0,
            dst: t.dst.endpoint.0,
            len: t.len,
            hash: HexHash(content_hash(bytes)),
        };
        if let Ok(mut v) = self.0.lock() {
            v.push(d);
        }
    }
}

impl DigestObserver {
    pub(crate) fn take(&self) -> Vec<TransferDigest> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    pub(crate) fn take_kernels(&self) -> Vec<KernelDigest> {
        self.1
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// What one stage did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageReport {
    /// Stage index.
    pub stage: usize,
    /// Host it ran on ("local" for threads, else the node address).
    pub host: String,
    /// Process id of the stage.
    pub pid: u32,
    /// Decoder layers it owned, `[start, end)`.
    pub layers: (usize, usize),
    /// Forward steps run.
    pub steps: u64,
    /// Nanoseconds inside `Stage::forward`.
    pub forward_ns: u64,
    /// Counters of the link into this stage.
    pub inbound: Option<LinkStats>,
    /// Counters of the link out of this stage.
    pub outbound: Option<LinkStats>,
    /// The node's clock minus the coordinator's (process transports).
    pub clock: Option<ClockOffset>,
    /// The upstream stage's clock minus this stage's, measured on the inbound TCP link.
    pub inbound_clock: Option<ClockOffset>,
    /// Digests of received transfers, when the config asked for them.
    pub digests: Vec<TransferDigest>,
    /// Digests of kernel outputs, when the config asked for them.
    #[serde(default)]
    pub kernel_digests: Vec<KernelDigest>,
    /// Generated tokens per sequence (last stage only).
    pub tokens: Vec<Vec<u32>>,
}

/// What a pipeline run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// Transport used.
    pub transport: TransportKind,
    /// Stages.
    pub stages: usize,
    /// Threads per stage.
    pub threads: usize,
    /// Sequences in flight.
    pub microbatches: usize,
    /// Generated tokens, one list per sequence.
    pub tokens: Vec<Vec<u32>>,
    /// Wall time of generation (after every stage was built), nanoseconds.
    pub wall_ns: u64,
    /// Generated tokens (all sequences) per second of `wall_ns`.
    pub tokens_per_s: f64,
    /// One report per stage, in stage order.
    pub stage_reports: Vec<StageReport>,
}

impl RunReport {
    fn assemble(cfg: &PipelineConfig, mut stage_reports: Vec<StageReport>, wall: Duration) -> Self {
        stage_reports.sort_by_key(|r| r.stage);
        let tokens = stage_reports
            .last()
            .map(|r| r.tokens.clone())
            .unwrap_or_default();
        let generated: usize = tokens.iter().map(Vec::len).sum();
        let secs = wall.as_secs_f64();
        Self {
            transport: cfg.transport,
            stages: cfg.stages,
            threads: cfg.threads,
            microbatches: cfg.microbatches,
            tokens,
            wall_ns: wall.as_nanos() as u64,
            tokens_per_s: if secs > 0.0 {
                generated as f64 / secs
            } else {
                0.0
            },
            stage_reports,
        }
    }

    /// Every transfer digest of the run, sorted by tag and stages (empty unless asked for).
    pub fn digests(&self) -> Vec<TransferDigest> {
        let mut all: Vec<_> = self
            .stage_reports
            .iter()
            .flat_map(|r| r.digests.iter().copied())
            .collect();
        all.sort();
        all
    }
}

/// Runs the pipeline described by `cfg` and returns its tokens, timings, clock offsets and
/// per-link counters. Fails within bounded time, naming stage, host and step, when a stage or
/// link fails.
pub fn run(cfg: &PipelineConfig, observers: &dyn ObserverFactory) -> Result<RunReport> {
    cfg.validate()?;
    match cfg.transport {
        TransportKind::Local => run_local(cfg, observers),
        TransportKind::Tcp if !cfg.hosts.is_empty() => {
            let key = crate::auth::ClusterKey::resolve(cfg.key_file.as_deref())?;
            run_on_nodes(cfg, &cfg.hosts, &key)
        }
        TransportKind::Shm | TransportKind::Tcp if cfg.launch == Launch::Threads => {
            run_on_thread_nodes(cfg, observers)
        }
        TransportKind::Shm | TransportKind::Tcp => {
            let key = crate::auth::ClusterKey::random()?;
            let launcher = cfg.launcher.as_deref().ok_or_else(|| {
                TransportError::Config(format!(
                    "a {} run without hosts starts one process per stage, but no launcher was \
                     given: set PipelineConfig::launcher, or launch = threads",
                    cfg.transport
                ))
            })?;
            let nodes = launch_local_nodes(launcher, cfg.stages, &key, cfg.timeout())?;
            let result = run_on_nodes(cfg, &nodes.addrs(), &key);
            nodes.finish(Duration::from_secs(5));
            result
        }
    }
}

/// Serves every stage from a node thread of this process, then coordinates them over loopback.
fn run_on_thread_nodes(cfg: &PipelineConfig, factory: &dyn ObserverFactory) -> Result<RunReport> {
    let key = crate::auth::ClusterKey::random()?;
    let stop = crate::wire::AbortFlag::new();
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::scope(|scope| {
        for _ in 0..cfg.stages {
            let opts = crate::node::NodeOptions {
                listen: "127.0.0.1:0".into(),
                key: key.clone(),
                once: true,
                stop: stop.clone(),
            };
            let tx = tx.clone();
            scope.spawn(move || {
                let announce = |addr: std::net::SocketAddr| {
                    let _ = tx.send(addr.to_string());
                };
                // A failed session is reported to the coordinator, which returns it.
                let _ = crate::node::serve(&opts, factory, &announce, &|msg| {
                    eprintln!("slug node thread: {msg}")
                });
            });
        }
        let mut addrs = Vec::with_capacity(cfg.stages);
        for _ in 0..cfg.stages {
            match rx.recv_timeout(cfg.timeout()) {
                Ok(a) => addrs.push(a),
                Err(_) => {
                    stop.raise();
                    return Err(TransportError::Config(
                        "a node thread could not listen on 127.0.0.1".into(),
                    ));
                }
            }
        }
        let result = run_on_nodes(cfg, &addrs, &key);
        stop.raise();
        result
    })
}

/// Aborts the fabric if a stage thread unwinds (a panicking observer, say), so that the other
/// stages stop waiting for it at once instead of at their timeout.
struct AbortOnPanic<'a>(&'a Fabric);

impl Drop for AbortOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.abort();
        }
    }
}

/// A stage's report, or the stage, where it was and what failed.
type StageResult = std::result::Result<StageReport, (usize, String, TransportError)>;

/// Every stage a thread of this process, links in a heap fabric.
fn run_local(cfg: &PipelineConfig, factory: &dyn ObserverFactory) -> Result<RunReport> {
    let plan = cfg.plan()?;
    let fabric = Arc::new(Fabric::heap(FabricLayout::new(&cfg.ring_specs())?));
    let built = Barrier::new(cfg.stages + 1);
    let (results, wall): (Vec<StageResult>, Duration) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..cfg.stages)
            .map(|s| {
                let (fabric, plan, built) = (&fabric, &plan, &built);
                std::thread::Builder::new()
                    .name(format!("slug-stage-{s}"))
                    .spawn_scoped(scope, move || {
                        let guard = AbortOnPanic(fabric);
                        let r = local_stage(cfg, plan, s, fabric, built, factory);
                        if r.is_err() {
                            fabric.abort();
                        }
                        drop(guard);
                        r
                    })
            })
            .collect();
        let spawned_all = handles.iter().all(|h| h.is_ok());
        if spawned_all {
            built.wait();
        } else {
            fabric.abort();
        }
        let start = Instant::now();
        let out: Vec<_> = handles
            .into_iter()
            .enumerate()
            .map(|(s, h)| match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    Err((
                        s,
                        "unknown step".into(),
                        TransportError::Kernel(
                            "the stage thread panicked (see the message above)".into(),
                        ),
                    ))
                }),
                Err(e) => Err((
                    s,
                    "startup".into(),
                    TransportError::io("spawn stage thread", e),
                )),
            })
            .collect();
        (out, start.elapsed())
    });
    let mut reports = Vec::with_capacity(results.len());
    let mut first_error = None;
    for r in results {
        match r {
            Ok(rep) => reports.push(rep),
            Err((stage, at, e)) => {
                let root_cause = !matches!(e, TransportError::Aborted { .. });
                if first_error.is_none()
                    || (root_cause
                        && matches!(first_error, Some((_, _, TransportError::Aborted { .. }))))
                {
                    first_error = Some((stage, at, e));
                }
            }
        }
    }
    if let Some((stage, step, e)) = first_error {
        return Err(TransportError::StageFailed {
            stage,
            host: "local".into(),
            step,
            detail: e.to_string(),
        });
    }
    Ok(RunReport::assemble(cfg, reports, wall))
}

fn local_stage(
    cfg: &PipelineConfig,
    plan: &LayerPlan,
    s: usize,
    fabric: &Arc<Fabric>,
    built: &Barrier,
    factory: &dyn ObserverFactory,
) -> StageResult {
    let startup = |e: TransportError| (s, "startup".to_string(), e);
    let prepared = (|| {
        let ctx = StageContext {
            stage: s,
            host: "local",
            config: cfg,
        };
        let (obs, digests) = stage_observers(factory, &ctx)?;
        let io = StageIo::over_fabric(cfg, s, fabric, TransportKind::Local, &obs.transfers)?;
        let pool = slug_kernels::ThreadPool::new(cfg.threads)?;
        let stage = build_stage(cfg, plan, &pool, factory, &ctx)?;
        let state = factory.state_observer(&ctx)?;
        Ok::<_, TransportError>((obs, digests, io, pool, stage, state))
    })();
    // Every thread reaches the barrier, built or not, so the coordinator never waits forever.
    built.wait();
    let (obs, digests, io, pool, stage, state) = prepared.map_err(startup)?;
    let observed = Observed {
        hooks: obs.hooks,
        state,
    };
    let outcome = drive_stage(cfg, plan, s, &pool, stage, io, observed, &|_, _| {})
        .map_err(|(at, e)| (s, at, e))?;
    Ok(outcome.into_report(plan, s, "local", &digests))
}

/// Builds stage `ctx.stage` and, when the factory has a state for it, restores that state.
pub(crate) fn build_stage(
    cfg: &PipelineConfig,
    plan: &LayerPlan,
    pool: &slug_kernels::ThreadPool,
    factory: &dyn ObserverFactory,
    ctx: &StageContext<'_>,
) -> Result<slug_kernels::Stage> {
    let sequences = cfg.prompts.len();
    let mut stage = match &cfg.isa {
        None => slug_kernels::Stage::new(&cfg.model, plan, ctx.stage, sequences, pool)?,
        Some(name) => {
            let isa = slug_kernels::Isa::from_name(name).ok_or_else(|| {
                TransportError::Config(format!(
                    "isa {name}: unknown instruction set; use scalar, avx2, avx512 or neon"
                ))
            })?;
            let arith = slug_kernels::Arith::new(isa, cfg.model.fma)?;
            slug_kernels::Stage::with_arith(&cfg.model, plan, ctx.stage, sequences, pool, arith)?
        }
    };
    if let Some(state) = factory.initial_state(ctx)? {
        restore_stage(&mut stage, &state)?;
    }
    Ok(stage)
}

/// What watches a running stage: its kernel hooks and its state observer.
pub(crate) struct Observed {
    pub hooks: Box<dyn Hooks + Send>,
    pub state: Option<Box<dyn StageStateObserver>>,
}

/// The factory's observers for a stage, plus the digest collector when the config asks for it;
/// the hooks of the stage named by `--inject` are wrapped in the fault injector.
pub(crate) fn stage_observers(
    factory: &dyn ObserverFactory,
    ctx: &StageContext<'_>,
) -> Result<(StageObservers, Option<Arc<DigestObserver>>)> {
    let mut obs = factory.stage_observers(ctx)?;
    let which = ctx.config.kernel_digests;
    let sink = (ctx.config.digests || which != KernelDigests::None)
        .then(|| Arc::new(DigestObserver::default()));
    if let Some(sink) = sink.as_ref().filter(|_| which != KernelDigests::None) {
        obs.hooks = Box::new(DigestHooks {
            inner: obs.hooks,
            sink: sink.clone(),
            which,
            step: u64::MAX,
            index: 0,
        });
    }
    if let Some(inject) = ctx.config.inject.as_ref().filter(|i| i.stage == ctx.stage) {
        obs.hooks = Box::new(crate::inject::FaultInjector::new(inject.clone(), obs.hooks));
    }
    if let Some(sink) = sink.as_ref().filter(|_| ctx.config.digests) {
        obs.transfers = obs.transfers.with(sink.clone());
    }
    Ok((obs, sink))
}
