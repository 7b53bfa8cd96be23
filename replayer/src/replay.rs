//! Re-running a recorded run: the whole pipeline from its step-0 states on any transport and
//! thread count, or one stage alone fed its recorded inbound payloads; both checked against the
//! trace as they go.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::Serialize;
use slug_kernels::{Hooks, NoHooks, Stage, ThreadPool};
use slug_transport::TransportError;
use slug_transport::inject::{FaultInjector, Injection};
use slug_transport::pipeline::{
    KernelDigests, Launch, ObserverFactory, PipelineConfig, RunProgress, StageContext,
    StageObservers, StageState, restore_stage, run, schedule_slot,
};
use slug_transport::transfer::{Observers, Tag, Transfer, TransferObserver, TransportKind};

use crate::divergence::{Checker, Counts, Divergence, KernelCheck, StepPlace, place_of};
use crate::error::{ReplayError, Result};
use crate::recorded::{RecordedRun, StateSource};

/// How deep verification goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verify {
    /// Every transfer's content hash (default).
    #[default]
    Transfer,
    /// Also every kernel call's output hash (needs `slug record --hash-kernels`).
    Kernel,
}

impl std::str::FromStr for Verify {
    type Err = ReplayError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "transfer" => Ok(Verify::Transfer),
            "kernel" => Ok(Verify::Kernel),
            other => Err(ReplayError::Usage(format!(
                "--verify {other}: use transfer or kernel"
            ))),
        }
    }
}

/// What to replay and how.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Transport of the replay (default: the recorded one).
    pub transport: Option<TransportKind>,
    /// Threads per stage (default: the recorded count).
    pub threads: Option<usize>,
    /// First stage step to check.
    pub from_step: Option<u64>,
    /// Last stage step to check (and, for one stage, to run).
    pub to_step: Option<u64>,
    /// Verification level.
    pub verify: Verify,
    /// A fault to inject into the replay.
    pub inject: Option<Injection>,
    /// Link wait limit in milliseconds (default: the recorded one).
    pub timeout_ms: Option<u64>,
    /// `host:port` of a `slug node --listen` per stage (tcp); the nodes restore their stage
    /// from their own copy of the trace ([`crate::NodeReplayFactory`]).
    pub hosts: Vec<String>,
    /// Where the trace lies on the nodes (default: the same path as here).
    pub node_trace: Option<std::path::PathBuf>,
    /// Cluster key file for `hosts` (default: the `SLUG_CLUSTER_KEY` environment variable).
    pub key_file: Option<std::path::PathBuf>,
    /// Live counters to update as the replay goes, for a progress display: one stage per
    /// replayed stage ([`replay_stage`] counts its one stage as stage 0).
    pub progress: Option<Arc<RunProgress>>,
}

/// What a replay did and found.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// `pipeline` or `stage`.
    pub mode: &'static str,
    /// The replayed stage (stage mode).
    pub stage: Option<usize>,
    /// Transport used.
    pub transport: TransportKind,
    /// Threads per stage.
    pub threads: usize,
    /// Stage steps checked, inclusive.
    pub checked_steps: (u64, u64),
    /// Verification level.
    pub verify: Verify,
    /// Where each replayed stage's state came from, in stage order.
    pub state_sources: Vec<StateSource>,
    /// The stage step each replayed stage started from.
    pub started_at: Vec<u64>,
    /// Counts of checked and differing transfers and kernels.
    pub counts: Counts,
    /// True when every check matched and something was checked.
    pub bit_exact: bool,
    /// The first divergence, if any.
    pub first: Option<Divergence>,
    /// Decode step and sequence of the first divergence's step.
    pub first_place: Option<StepPlace>,
    /// Wall time of the replayed steps, nanoseconds.
    pub wall_ns: u64,
    /// Wall time the recorded run took for the same steps, when the trace has its step times.
    pub recorded_ns: Option<u64>,
    /// Transfers the run sent in the checked steps, by its configuration: what a complete
    /// check compares.
    pub transfers_expected: u64,
    /// Kernel outputs the replay produced in the checked steps (`--verify kernel`).
    pub kernels_expected: u64,
    /// Set when not everything that should have been checked was: "N of M ... checked,
    /// because ...". Such a replay is never bit-exact.
    pub incomplete: Option<String>,
    /// Things the user should know (fallbacks, unchecked steps).
    pub notes: Vec<String>,
}

impl ReplayReport {
    fn finish(
        &mut self,
        checker: &Checker,
        cfg: &PipelineConfig,
        rec: &RecordedRun,
        stages: &[u32],
    ) {
        self.counts = checker.counts();
        self.first = checker.first();
        self.first_place = self.first.as_ref().and_then(|d| place_of(cfg, d.step));
        let (from, to) = self.checked_steps;
        let tags = crate::recorded::send_tags(rec.config());
        let last = cfg.stages.saturating_sub(1) as u32;
        let pipeline = self.mode == "pipeline";
        let step_of = |t: Tag| checker.stage_step(t);
        self.transfers_expected = stages
            .iter()
            .filter_map(|&s| tags.get(s as usize).map(|v| (s, v)))
            .flat_map(|(s, v)| v.iter().map(move |t| (s, *t)))
            .filter(|&(_, t)| step_of(t).is_some_and(|f| (from..=to).contains(&f)))
            // A whole pipeline stopped after `to` does not send back the tokens that would
            // feed steps past it.
            .filter(|&(s, t)| {
                let next = Tag {
                    step: t.step + 1,
                    ..t
                };
                !pipeline || s != last || step_of(next).is_some_and(|f| f <= to)
            })
            .count() as u64;
        let c = &self.counts;
        // Every kernel call the hooks were asked to check: all of them at `--verify kernel`,
        // the last stage's `head` at the default level.
        self.kernels_expected = c.kernels_checked + c.kernels_unrecorded;
        let mut missing = Vec::new();
        if c.transfers_checked < self.transfers_expected {
            missing.push(format!(
                "{} of {} transfers checked",
                c.transfers_checked, self.transfers_expected
            ));
        }
        if c.kernels_checked < self.kernels_expected {
            missing.push(format!(
                "{} of {} kernel outputs checked",
                c.kernels_checked, self.kernels_expected
            ));
        }
        if !missing.is_empty() {
            let because = if rec.damage().is_empty() {
                "the trace has no record of the rest (events lost while recording?)".to_owned()
            } else {
                rec.damage().join("; ")
            };
            self.incomplete = Some(format!("{}, because {because}", missing.join(" and ")));
        }
        let checked = self.counts.transfers_checked + self.counts.kernels_checked;
        self.bit_exact = self.first.is_none() && checked > 0 && self.incomplete.is_none();
        if checked == 0 {
            self.notes.push(
                "nothing was checked: the trace holds no transfers (or kernel hashes) in the \
                 checked steps"
                    .into(),
            );
        }
        if self.counts.transfers_unrecorded > 0 && self.incomplete.is_none() {
            self.notes.push(format!(
                "{} replayed transfers have no record in the trace (lost events?) and were not checked",
                self.counts.transfers_unrecorded
            ));
        }
    }
}

fn steps_of(cfg: &PipelineConfig) -> u64 {
    (cfg.tokens * cfg.prompts.len()) as u64
}

fn check_kernel_level(rec: &RecordedRun, verify: Verify) -> Result<()> {
    if verify == Verify::Kernel && !rec.has_kernel_hashes() {
        return Err(ReplayError::Usage(format!(
            "--verify kernel: {} has no kernel output hashes ({} kernel spans without them); \
             record with `slug record --hash-kernels`, or use --verify transfer",
            rec.dir().display(),
            rec.kernel_spans()
        )));
    }
    Ok(())
}

fn range(cfg: &PipelineConfig, opts: &ReplayOptions) -> Result<(u64, u64)> {
    let last = steps_of(cfg).saturating_sub(1);
    let from = opts.from_step.unwrap_or(0);
    let to = opts.to_step.unwrap_or(last);
    if from > to || to > last {
        return Err(ReplayError::Usage(format!(
            "--from-step {from} --to-step {to}: the trace's stages ran steps 0..={last}"
        )));
    }
    Ok((from, to))
}

/// The replay's pipeline configuration: the recorded one with the asked-for transport,
/// threads and fault.
fn replay_config(
    rec: &RecordedRun,
    opts: &ReplayOptions,
    elsewhere: bool,
) -> Result<PipelineConfig> {
    let mut cfg = rec.config().clone();
    if let Some(t) = opts.transport {
        cfg.transport = t;
    } else if cfg.transport == TransportKind::Mpi && !elsewhere {
        // An MPI recording replays on this machine's threads unless MPI ranks run it.
        cfg.transport = TransportKind::Local;
    }
    if let Some(n) = opts.threads {
        cfg.threads = n;
    }
    if let Some(ms) = opts.timeout_ms {
        cfg.timeout_ms = ms;
    }
    cfg.inject = opts.inject.clone();
    cfg.progress = opts.progress.clone();
    cfg.hosts = opts.hosts.clone();
    cfg.key_file = opts.key_file.clone();
    if opts.hosts.is_empty() && !elsewhere {
        cfg.digests = false;
        cfg.observer_settings = None;
        // Stage processes would build their own (non-checking) observers: serve every stage
        // from a thread of this process over the same sockets or fabric file instead.
        cfg.launch = Launch::Threads;
    } else {
        if opts.transport.is_none() && !elsewhere {
            cfg.transport = TransportKind::Tcp;
        }
        // Remote nodes report the digest of every transfer they receive, and of the kernel
        // outputs this level checks; they restore their stage from their copy of the trace.
        cfg.digests = true;
        cfg.kernel_digests = match opts.verify {
            Verify::Kernel => KernelDigests::All,
            Verify::Transfer if rec.has_stage_output_hashes() => KernelDigests::Head,
            Verify::Transfer => KernelDigests::None,
        };
        let dir = match &opts.node_trace {
            Some(d) => d.clone(),
            None => std::path::absolute(rec.dir()).map_err(|e| {
                ReplayError::Usage(format!(
                    "cannot name {} for the nodes: {e}",
                    rec.dir().display()
                ))
            })?,
        };
        cfg.observer_settings = Some(crate::node::node_settings(&dir, 0, rec.trace_id()));
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The kernel hooks that check `stage`: every kernel output at `--verify kernel`; at the
/// default level the last stage's logits (kernel `head`) when the trace hashed them, so a
/// change that leaves the argmax token alone is still seen.
fn check_hooks(
    rec: &RecordedRun,
    checker: &Checker,
    verify: Verify,
    stage: u32,
) -> Box<dyn Hooks + Send> {
    let last = stage as usize + 1 == rec.config().stages;
    match verify {
        Verify::Kernel => Box::new(KernelCheck::new(checker.clone(), stage)),
        Verify::Transfer if last && rec.has_stage_output_hashes() => Box::new(KernelCheck::only(
            checker.clone(),
            stage,
            slug_kernels::KernelId::Head,
        )),
        Verify::Transfer => Box::new(NoHooks),
    }
}

/// Checks what a stage sends, on the sending side.
struct SendCheck {
    checker: Checker,
    stage: u32,
}

impl TransferObserver for SendCheck {
    fn posted(&self, t: &Transfer, bytes: &[u8]) {
        if t.src.endpoint.0 == self.stage {
            self.checker.transfer(self.stage, t.tag, bytes);
        }
    }

    fn completed(&self, _t: &Transfer, _bytes: &[u8]) {}
}

/// Builds each replayed stage: its recorded state at `start` and checking observers.
struct ReplayFactory {
    rec: Arc<RecordedRun>,
    checker: Checker,
    verify: Verify,
    start: u64,
}

impl ObserverFactory for ReplayFactory {
    fn stage_observers(
        &self,
        ctx: &StageContext<'_>,
    ) -> std::result::Result<StageObservers, TransportError> {
        let stage = ctx.stage as u32;
        let hooks = check_hooks(&self.rec, &self.checker, self.verify, stage);
        Ok(StageObservers {
            transfers: Observers::none().with(Arc::new(SendCheck {
                checker: self.checker.clone(),
                stage,
            })),
            hooks,
        })
    }

    fn initial_state(
        &self,
        ctx: &StageContext<'_>,
    ) -> std::result::Result<Option<StageState>, TransportError> {
        self.rec
            .state_at(ctx.stage as u32, self.start)
            .map(|(state, _)| state)
            .map_err(|e| TransportError::Config(e.to_string()))
    }
}

/// Replays the whole pipeline: every stage restored from the latest step at or before
/// `from` where all stages have a snapshot (step 0 without snapshots: rebuilt from the recorded
/// seed, noted in the report), run on `opts`' transport and thread count up to stage step
/// `to`, every transfer of stage steps `from..=to` (and every kernel output at
/// `--verify kernel`) checked against the trace.
pub fn replay_pipeline(rec: Arc<RecordedRun>, opts: &ReplayOptions) -> Result<ReplayReport> {
    replay_pipeline_with(rec, opts, None)
}

/// Runs the replay's stages somewhere this crate does not start them (MPI ranks): gets the
/// replay's configuration, in which every stage restores itself from its own copy of the trace
/// ([`crate::NodeReplayFactory`]) and reports the digests of what it received, and returns the
/// run's report with every stage's.
pub type StageRunner<'a> =
    &'a mut dyn FnMut(
        &PipelineConfig,
    ) -> slug_transport::Result<slug_transport::pipeline::RunReport>;

/// [`replay_pipeline`], with the stages run by `runner` when one is given (see
/// [`StageRunner`]); the checking happens here, on the stages' digests, as for `--hosts`.
pub fn replay_pipeline_with(
    rec: Arc<RecordedRun>,
    opts: &ReplayOptions,
    mut runner: Option<StageRunner<'_>>,
) -> Result<ReplayReport> {
    check_kernel_level(&rec, opts.verify)?;
    let mut cfg = replay_config(&rec, opts, runner.is_some())?;
    let (from, to) = range(&cfg, opts)?;
    let start = rec.common_snapshot_at_or_before(cfg.stages, from);
    if (!opts.hosts.is_empty() || runner.is_some())
        && let Some(replay) = cfg
            .observer_settings
            .as_mut()
            .and_then(|s| s.replay.as_mut())
    {
        replay.step = start;
    }
    let mut notes = Vec::new();
    let mut sources = Vec::with_capacity(cfg.stages);
    for s in 0..cfg.stages as u32 {
        let src = if rec.snapshot_steps(s).contains(&start) {
            StateSource::Snapshot
        } else {
            StateSource::Seed
        };
        if src == StateSource::Seed {
            notes.push(format!(
                "stage {s}: the trace has no step-0 snapshot; its state was rebuilt from the \
                 recorded seed {}",
                cfg.model.seed
            ));
        }
        sources.push(src);
    }
    if opts.verify == Verify::Transfer && !rec.has_stage_output_hashes() {
        notes.push(
            "the trace was recorded without stage-output hashes (before slug hashed every step's \
             logits): the last stage's logits are checked only through the tokens they chose"
                .into(),
        );
    }
    if from > start {
        notes.push(format!(
            "every stage resumed at step {start} (the latest step all stages have a snapshot \
             of); steps {start}..{from} were re-run but not checked"
        ));
    }
    let last = steps_of(&cfg) - 1;
    if to < last {
        cfg.stop_after = Some(to);
    }
    let checker = Checker::new(rec.clone(), from, to);
    let factory = ReplayFactory {
        rec: rec.clone(),
        checker: checker.clone(),
        verify: opts.verify,
        start,
    };
    let started = Instant::now();
    let report = match runner.as_mut() {
        Some(run_stages) => run_stages(&cfg)?,
        None => run(&cfg, &factory)?,
    };
    let wall_ns = started.elapsed().as_nanos() as u64;
    for d in report.digests() {
        checker.transfer_digest(d.src, d.tag, d.len, d.hash.0);
    }
    for r in &report.stage_reports {
        let last = r.stage + 1 == cfg.stages;
        for d in &r.kernel_digests {
            // At the default level only the last stage's logits are checked, as locally.
            if opts.verify == Verify::Kernel || last {
                checker.kernel_digest(r.stage as u32, d.step, d.kernel, d.layer, d.index, d.hash.0);
            }
        }
    }
    let recorded_ns = (0..cfg.stages as u32)
        .filter_map(|s| rec.recorded_ns(s, start, to))
        .max();
    let mut out = ReplayReport {
        mode: "pipeline",
        stage: None,
        transport: cfg.transport,
        threads: cfg.threads,
        checked_steps: (from, to),
        verify: opts.verify,
        state_sources: sources,
        started_at: vec![start; cfg.stages],
        counts: Counts::default(),
        bit_exact: false,
        first: None,
        first_place: None,
        wall_ns: report.wall_ns.min(wall_ns),
        recorded_ns,
        transfers_expected: 0,
        kernels_expected: 0,
        incomplete: None,
        notes,
    };
    let stages: Vec<u32> = (0..cfg.stages as u32).collect();
    out.finish(&checker, &cfg, &rec, &stages);
    Ok(out)
}

/// A stage replayed alone, with its state after the last replayed step (for `--dump`).
#[derive(Debug)]
pub struct StageReplay {
    /// What was checked and found.
    pub report: ReplayReport,
    /// The stage after its last replayed step.
    pub stage: Stage,
}

/// One input of a replayed stage step: the bytes its inbox receives.
enum Input {
    Prompt(Vec<u32>),
    OwnToken,
    Bytes(Vec<u8>),
}

/// Replays stage `s` alone: restored from its latest snapshot at or before `--from-step`,
/// fed the inbound payloads the trace recorded (no network), its outbound transfers of
/// `from..=to` checked. Needs `--payloads all` (stage 0 also works with `boundary`).
pub fn replay_stage(rec: Arc<RecordedRun>, s: usize, opts: &ReplayOptions) -> Result<StageReplay> {
    check_kernel_level(&rec, opts.verify)?;
    let mut cfg = rec.config().clone();
    if let Some(n) = opts.threads {
        cfg.threads = n;
    }
    cfg.inject = opts.inject.clone();
    cfg.validate()?;
    if s >= cfg.stages {
        return Err(ReplayError::Usage(format!(
            "--stage {s}: the trace's pipeline has stages 0..{}",
            cfg.stages
        )));
    }
    let (from, to) = range(&cfg, opts)?;
    let plan = cfg.plan()?;
    let pool = ThreadPool::new(cfg.threads)?;
    let mut stage = Stage::new(&cfg.model, &plan, s, cfg.prompts.len(), &pool)?;
    let mut notes = Vec::new();
    let (start, source) = match rec.snapshot_at_or_before(s as u32, from) {
        Some(k) => {
            restore_stage(&mut stage, &rec.snapshot_state(s as u32, k)?)?;
            (k, StateSource::Snapshot)
        }
        None => {
            notes.push(format!(
                "stage {s}: the trace has no snapshot at or before step {from}; started from the \
                 step-0 state rebuilt from the recorded seed {}",
                cfg.model.seed
            ));
            (0, StateSource::Seed)
        }
    };
    let inputs = stage_inputs(&rec, &cfg, s, start, to)?;
    let checker = Checker::new(rec.clone(), from, to);
    let mut hooks = check_hooks(&rec, &checker, opts.verify, s as u32);
    if let Some(i) = cfg.inject.as_ref().filter(|i| i.stage == s) {
        hooks = Box::new(FaultInjector::new(i.clone(), hooks));
    }
    let n_stages = cfg.stages;
    let last = s + 1 == n_stages;
    let dim_bytes = cfg.model.dim * 4;
    let out_layer = if last {
        plan.layers()
    } else {
        plan.layers_of(s + 1).start
    } as u32;
    let mut timed_from = None;
    for (f, input) in (start..=to).zip(inputs) {
        if f == from {
            timed_from = Some(Instant::now());
        }
        let slot = schedule_slot(&cfg, f).ok_or_else(|| {
            ReplayError::Usage(format!("step {f} is past the end of the recorded schedule"))
        })?;
        let seq = slot.seq as usize;
        let n = match input {
            Input::Prompt(tokens) => {
                stage.inbox_tokens_mut(seq)?[..tokens.len()].copy_from_slice(&tokens);
                tokens.len()
            }
            Input::OwnToken => {
                let token = stage.outbox_token(seq)?;
                stage.inbox_tokens_mut(seq)?[0] = token;
                1
            }
            Input::Bytes(bytes) => {
                let inbox = stage.layout().inboxes[seq];
                if bytes.len() > inbox.bytes() {
                    return Err(ReplayError::NotReplayable {
                        path: rec.dir().to_path_buf(),
                        reason: format!(
                            "a recorded input of stage {s} step {f} has {} bytes, more than its \
                             {}-byte inbox",
                            bytes.len(),
                            inbox.bytes()
                        ),
                    });
                }
                stage.arena_mut().bytes_mut()[inbox.offset..inbox.offset + bytes.len()]
                    .copy_from_slice(&bytes);
                if s == 0 { 1 } else { bytes.len() / dim_bytes }
            }
        };
        stage.forward(&pool, &mut *hooks, seq, n)?;
        if let Some(p) = opts.progress.as_ref().and_then(|p| p.stage(0)) {
            p.steps.store(f + 1, Ordering::Relaxed);
        }
        let sends = n_stages > 1 && !(last && slot.step as usize + 1 == cfg.tokens);
        if sends {
            let out = stage.layout().outboxes[seq];
            let len = if last { 4 } else { n * dim_bytes };
            let tag = Tag {
                sequence: slot.seq,
                step: slot.step,
                layer: out_layer,
            };
            checker.transfer(
                s as u32,
                tag,
                &stage.arena().bytes()[out.offset..out.offset + len],
            );
        }
    }
    let wall_ns = timed_from.map_or(0, |t| t.elapsed().as_nanos() as u64);
    let mut report = ReplayReport {
        mode: "stage",
        stage: Some(s),
        transport: cfg.transport,
        threads: cfg.threads,
        checked_steps: (from, to),
        verify: opts.verify,
        state_sources: vec![source],
        started_at: vec![start],
        counts: Counts::default(),
        bit_exact: false,
        first: None,
        first_place: None,
        wall_ns,
        recorded_ns: rec.recorded_ns(s as u32, from, to),
        transfers_expected: 0,
        kernels_expected: 0,
        incomplete: None,
        notes,
    };
    report.finish(&checker, &cfg, &rec, &[s as u32]);
    if n_stages == 1 {
        report.notes.push(
            "a one-stage pipeline sends no transfers: only kernel outputs can be checked".into(),
        );
    }
    Ok(StageReplay { report, stage })
}

/// The inputs of stage `s` for steps `start..=to`, read before the replay runs so it never
/// waits on the disk. Refuses, naming the policy, a trace without the needed payloads.
fn stage_inputs(
    rec: &RecordedRun,
    cfg: &PipelineConfig,
    s: usize,
    start: u64,
    to: u64,
) -> Result<Vec<Input>> {
    let n = cfg.stages;
    let plan = cfg.plan()?;
    let mut inputs = Vec::with_capacity((to + 1 - start) as usize);
    for f in start..=to {
        let Some(slot) = schedule_slot(cfg, f) else {
            break;
        };
        if s == 0 && slot.step == 0 {
            inputs.push(Input::Prompt(cfg.prompts[slot.seq as usize].clone()));
            continue;
        }
        if n == 1 {
            inputs.push(Input::OwnToken);
            continue;
        }
        let up = ((s + n - 1) % n) as u32;
        let tag = if s == 0 {
            Tag {
                sequence: slot.seq,
                step: slot.step - 1,
                layer: plan.layers() as u32,
            }
        } else {
            Tag {
                sequence: slot.seq,
                step: slot.step,
                layer: plan.layers_of(s).start as u32,
            }
        };
        let Some(t) = rec.sent(up, tag) else {
            return Err(ReplayError::NotReplayable {
                path: rec.dir().to_path_buf(),
                reason: format!(
                    "it has no record of the transfer stage {up} sent to stage {s} for step {f} \
                     (sequence {}, decode step {}); replay the whole pipeline instead (drop --stage)",
                    tag.sequence, tag.step
                ),
            });
        };
        match rec.payload(t)? {
            Some(bytes) => inputs.push(Input::Bytes(bytes)),
            None => {
                return Err(ReplayError::Usage(format!(
                    "--stage {s}: replaying a stage alone needs the bytes it received, but {} was \
                     recorded with --payloads {} (transfer {} from stage {up} has no payload). \
                     Replay the whole pipeline instead (drop --stage; it needs only snapshots), \
                     or record with --payloads all",
                    rec.dir().display(),
                    rec.payloads(),
                    t.id
                )));
            }
        }
    }
    Ok(inputs)
}
