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
//! [`node::serve`] (the config's typed [`ObserverSettings`] travel to the nodes for that).

mod cluster;
mod config;
mod failover;
mod launch;
mod migrate;
pub mod node;
mod observe;
mod progress;
mod report;
mod settings;
mod stage;
mod state;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use slug_kernels::LayerPlan;

use crate::auth::ClusterKey;
use crate::error::{Result, TransportError};
use crate::fabric::{Fabric, FabricLayout};
use crate::link::{StageLinks, ring};
use crate::transfer::TransportKind;
use crate::wire::AbortFlag;

/// What a recording node hands over, and what a collector accepts (also used by MPI rank 0).
pub use cluster::{
    FILE_PIECE, MAX_COLLECTED_FILE, MAX_COLLECTED_FILES, RecordedFile, expected_file,
};
pub use cluster::{LocalNodes, launch_local_nodes, run_on_nodes, run_on_nodes_collecting};
pub use config::{KernelDigests, Launch, MoveHook, PipelineConfig, prompt_tokens};
pub use failover::{
    DEFAULT_CHECKPOINT_EVERY, FailoverReport, FailoverSummary, MAX_CHECKPOINT_EVERY,
};
pub use launch::{NodeCommand, NodeLauncher};
pub use migrate::{
    DEFAULT_ROUNDS, Migration, MigrationReport, PrecopyRound, continuation_endpoint,
    request_migration,
};
pub use node::list_recorded_files;
pub use observe::{NoObservers, ObserverFactory, StageContext, StageObservers};
pub use progress::{ProgressReading, RunProgress, StageProgress};
pub use report::{HexHash, KernelDigest, RunReport, StageReport, TransferDigest};
pub use settings::{ObserverSettings, RecordSettings, ReplaySettings};
pub use stage::STAGE_ARENA;
pub use state::{
    ReferencedWeights, ScheduleSlot, StageState, StageStateObserver, restore_stage, schedule_slot,
};

use observe::{Observed, stage_observers};
use stage::{build_stage, drive_stage, link_ends};

/// Runs the pipeline described by `cfg` and returns its tokens, timings, clock offsets and
/// per-link counters. Fails within bounded time, naming stage, host and step, when a stage or
/// link fails.
pub fn run(cfg: &PipelineConfig, observers: &dyn ObserverFactory) -> Result<RunReport> {
    cfg.validate()?;
    match cfg.transport {
        TransportKind::Local => run_local(cfg, observers),
        TransportKind::Mpi => Err(TransportError::Config(
            "an mpi run is one process per stage started by mpirun: each rank runs its stage \
             with slug-mpi (`mpirun -np S slug run --transport mpi --stages S`), not run()"
                .into(),
        )),
        TransportKind::Tcp | TransportKind::Rdma if !cfg.hosts.is_empty() => {
            let key = ClusterKey::resolve(cfg.key_file.as_deref())?;
            run_on_nodes(cfg, &cfg.hosts, &key)
        }
        TransportKind::Shm | TransportKind::Tcp | TransportKind::Rdma
            if cfg.launch == Launch::Threads =>
        {
            run_on_thread_nodes(cfg, observers)
        }
        TransportKind::Shm | TransportKind::Tcp | TransportKind::Rdma => {
            let key = run_key(cfg)?;
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

/// The key of a run's own stage nodes: fresh, unless stages move to `slug node`s of the user's
/// (`--migrate`) or to spares (`--spares`), which hold the cluster key.
fn run_key(cfg: &PipelineConfig) -> Result<ClusterKey> {
    if cfg.migrations.is_empty() && cfg.control.is_none() && cfg.spares.is_empty() {
        ClusterKey::random()
    } else {
        ClusterKey::resolve(cfg.key_file.as_deref())
    }
}

/// Runs stage `s` of `cfg` on this thread, on `host`, over the links `connect` makes from the
/// stage's transfer observers: how a launcher outside this crate runs a stage (each MPI rank
/// runs its own this way). `ready` is called once the stage is built, just before its first
/// step (a barrier across ranks). Fails with [`TransportError::StageFailed`] naming the stage,
/// host and step.
pub fn run_stage(
    cfg: &PipelineConfig,
    s: usize,
    host: &str,
    factory: &dyn ObserverFactory,
    connect: &mut dyn FnMut(&crate::transfer::Observers) -> Result<StageLinks>,
    ready: &mut dyn FnMut() -> Result<()>,
) -> Result<StageReport> {
    let failed = |step: String, e: TransportError| TransportError::StageFailed {
        stage: s,
        host: host.to_string(),
        step,
        detail: e.to_string(),
    };
    let startup = |e| failed("startup".into(), e);
    let plan = cfg.plan().map_err(startup)?;
    let ctx = StageContext {
        stage: s,
        endpoint: s as u32,
        host,
        config: cfg,
    };
    let (obs, digests) = stage_observers(factory, &ctx).map_err(startup)?;
    let io = connect(&obs.transfers).map_err(startup)?;
    let pool = slug_kernels::ThreadPool::new(cfg.threads).map_err(|e| startup(e.into()))?;
    let stage = build_stage(cfg, &plan, &pool, factory, &ctx).map_err(startup)?;
    let state = factory.state_observer(&ctx).map_err(startup)?;
    ready().map_err(startup)?;
    let observed = Observed {
        hooks: obs.hooks,
        state,
    };
    let outcome = drive_stage(
        cfg,
        &plan,
        s,
        &pool,
        stage,
        io,
        None,
        None,
        observed,
        &|_, _| {},
    )
    .map_err(|(at, e)| failed(at, e))?;
    Ok(outcome.into_report(&plan, s, host, &digests))
}

/// Serves every stage from a node thread of this process, then coordinates them over loopback.
fn run_on_thread_nodes(cfg: &PipelineConfig, factory: &dyn ObserverFactory) -> Result<RunReport> {
    let key = run_key(cfg)?;
    let stop = AbortFlag::new();
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::scope(|scope| {
        for _ in 0..cfg.stages {
            let opts = node::NodeOptions {
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
                let _ = node::serve(&opts, factory, &announce, &|msg| {
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

/// Stage `s`'s ends of the heap fabric's rings (none for a one-stage pipeline).
fn local_links(
    cfg: &PipelineConfig,
    s: usize,
    fabric: &Arc<Fabric>,
    observers: &crate::transfer::Observers,
) -> Result<StageLinks> {
    let n = cfg.stages;
    if n < 2 {
        return Ok(StageLinks::default());
    }
    let (inbound, outbound) = (
        link_ends(n, (s + n - 1) % n, cfg.timeout()),
        link_ends(n, s, cfg.timeout()),
    );
    ring::stage_links(fabric, inbound, outbound, TransportKind::Local, observers)
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
            endpoint: s as u32,
            host: "local",
            config: cfg,
        };
        let (obs, digests) = stage_observers(factory, &ctx)?;
        let io = local_links(cfg, s, fabric, &obs.transfers)?;
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
    let outcome = drive_stage(
        cfg,
        plan,
        s,
        &pool,
        stage,
        io,
        None,
        None,
        observed,
        &|_, _| {},
    )
    .map_err(|(at, e)| (s, at, e))?;
    Ok(outcome.into_report(plan, s, "local", &digests))
}
