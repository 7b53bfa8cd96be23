//! The pipeline runtime against the single-process reference driver: same tokens and same
//! transferred bytes for every placement, thread count, microbatching and transport.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use slug_kernels::{
    Hooks, KernelCall, LayerPlan, ModelConfig, NoHooks, Stage, ThreadPool, generate,
};
use slug_transport::TransportError;
use slug_transport::auth::ClusterKey;
use slug_transport::node::{NodeOptions, serve};
use slug_transport::pipeline::{
    Launch, NoObservers, NodeCommand, ObserverFactory, PipelineConfig, RunReport, StageContext,
    StageObservers, TransferDigest, prompt_tokens, run, run_on_nodes,
};
use slug_transport::transfer::{Observers, Tag, Transfer, TransferObserver, TransportKind};

const TOKENS: usize = 5;

fn model() -> ModelConfig {
    let mut m = ModelConfig::preset("tiny").expect("tiny preset");
    // Four layers so that four stages each own one.
    m.layers = 4;
    m.seed = 11;
    m
}

fn prompts() -> Vec<Vec<u32>> {
    ["Once upon", "a", "time there was", "slug"]
        .iter()
        .map(|p| prompt_tokens(p))
        .collect()
}

fn config(
    transport: TransportKind,
    stages: usize,
    threads: usize,
    microbatches: usize,
) -> PipelineConfig {
    let mut cfg = PipelineConfig::new(model(), "x", 1, TOKENS);
    cfg.prompts = prompts();
    cfg.transport = transport;
    cfg.stages = stages;
    cfg.threads = threads;
    cfg.microbatches = microbatches;
    cfg.digests = true;
    cfg.timeout_ms = 20_000;
    cfg
}

fn reference() -> Vec<Vec<u32>> {
    let m = model();
    let plan = LayerPlan::even(m.layers, 1).expect("plan");
    let pool = ThreadPool::new(1).expect("pool");
    let mut stages = vec![Stage::new(&m, &plan, 0, prompts().len(), &pool).expect("stage")];
    prompts()
        .iter()
        .enumerate()
        .map(|(seq, p)| {
            generate(&mut stages, &pool, &mut NoHooks, seq, p, TOKENS)
                .expect("reference generation")
                .tokens
        })
        .collect()
}

fn by_tag(report: &RunReport) -> BTreeMap<Tag, TransferDigest> {
    report.digests().into_iter().map(|d| (d.tag, d)).collect()
}

/// Transfers at the same layer boundary of the same sequence and step carry the same bytes
/// whatever the placement; returns how many boundaries the two runs share.
fn assert_shared_boundaries_equal(a: &RunReport, b: &RunReport) -> usize {
    let (a, b) = (by_tag(a), by_tag(b));
    let mut shared = 0;
    for (tag, da) in &a {
        if let Some(db) = b.get(tag) {
            assert_eq!(
                (da.len, da.hash),
                (db.len, db.hash),
                "bytes differ at {tag:?}"
            );
            shared += 1;
        }
    }
    shared
}

#[test]
fn local_runs_match_the_reference_for_every_placement() {
    let want = reference();
    let mut per_stages: BTreeMap<usize, RunReport> = BTreeMap::new();
    for stages in [1, 2, 4] {
        for threads in [1, 2] {
            for microbatches in [1, 4] {
                let cfg = config(TransportKind::Local, stages, threads, microbatches);
                let got = run(&cfg, &NoObservers).expect("local run");
                assert_eq!(
                    got.tokens, want,
                    "stages {stages} threads {threads} mb {microbatches}"
                );
                let expected_transfers = if stages == 1 {
                    0
                } else {
                    // Per sequence: TOKENS steps through stages-1 boundaries, TOKENS-1 tokens back.
                    4 * (TOKENS * (stages - 1) + TOKENS - 1)
                };
                assert_eq!(got.digests().len(), expected_transfers);
                match per_stages.get(&stages) {
                    Some(first) => assert_eq!(first.digests(), got.digests()),
                    None => {
                        per_stages.insert(stages, got);
                    }
                }
            }
        }
    }
    // Layer boundaries 2 (hidden states) and 4 (token back) exist in both placements.
    let shared = assert_shared_boundaries_equal(&per_stages[&2], &per_stages[&4]);
    assert_eq!(shared, 4 * (TOKENS + TOKENS - 1));
}

/// Starts `n` in-process nodes (threads serving one session each) and returns their addresses.
fn nodes(n: usize, key: &ClusterKey) -> Vec<String> {
    let (tx, rx) = mpsc::channel();
    for _ in 0..n {
        let opts = NodeOptions {
            listen: "127.0.0.1:0".into(),
            key: key.clone(),
            once: true,
            stop: slug_transport::AbortFlag::new(),
        };
        let tx = tx.clone();
        std::thread::spawn(move || {
            let _ = serve(
                &opts,
                &NoObservers,
                &|addr| {
                    let _ = tx.send(addr.to_string());
                },
                &|_| {},
            );
        });
    }
    (0..n)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(10))
                .expect("node address")
        })
        .collect()
}

#[test]
fn tcp_and_shm_nodes_move_the_same_bytes_as_local() {
    let key = ClusterKey::from_bytes(b"pipeline-test-cluster-key").expect("key");
    let local = run(&config(TransportKind::Local, 4, 1, 4), &NoObservers).expect("local run");
    for transport in [TransportKind::Tcp, TransportKind::Shm] {
        let cfg = config(transport, 4, 2, 4);
        let got = run_on_nodes(&cfg, &nodes(4, &key), &key).expect("node run");
        assert_eq!(got.tokens, local.tokens, "{transport}");
        assert_eq!(got.digests(), local.digests(), "{transport}");
        for r in &got.stage_reports {
            let clock = r.clock.expect("clock offset of every node");
            // One machine: the same CLOCK_MONOTONIC, so the estimate is near zero.
            assert!(clock.offset_ns.abs() < 50_000_000, "{clock:?}");
            assert!(r.inbound.is_some_and(|l| l.transfers > 0));
        }
    }
}

#[test]
fn a_coordinator_with_the_wrong_key_is_refused() {
    let key = ClusterKey::from_bytes(b"pipeline-test-cluster-key").expect("key");
    let stranger = ClusterKey::from_bytes(b"not-the-cluster-key-at-all").expect("key");
    let addrs = nodes(1, &key);
    let cfg = config(TransportKind::Tcp, 1, 1, 4);
    let start = Instant::now();
    match run_on_nodes(&cfg, &addrs, &stranger) {
        Err(TransportError::StageFailed { detail, .. }) => {
            assert!(
                detail.contains("does not hold this node's cluster key"),
                "{detail}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(10));
    // The node is still serving: the right key gets through.
    let ok = run_on_nodes(&cfg, &addrs, &key).expect("run with the right key");
    assert_eq!(ok.tokens.len(), 4);
}

#[test]
fn bad_configurations_are_refused_before_running() {
    let mut cfg = config(TransportKind::Local, 8, 1, 1);
    assert!(matches!(
        run(&cfg, &NoObservers),
        Err(TransportError::Kernel(_))
    ));
    cfg.stages = 2;
    cfg.tokens = 1000;
    assert!(matches!(
        run(&cfg, &NoObservers),
        Err(TransportError::Config(_))
    ));
    cfg.tokens = 2;
    cfg.hosts = vec!["127.0.0.1:1".into()];
    assert!(matches!(
        run(&cfg, &NoObservers),
        Err(TransportError::Config(_))
    ));
}

#[test]
fn launched_stage_processes_come_from_the_callers_launcher() {
    for transport in [TransportKind::Shm, TransportKind::Tcp] {
        let mut cfg = config(transport, 2, 1, 1);
        cfg.launch = Launch::Processes;
        let e = run(&cfg, &NoObservers)
            .expect_err("no launcher")
            .to_string();
        assert!(e.contains("no launcher"), "{transport}: {e}");
        assert!(e.contains("PipelineConfig::launcher"), "{transport}: {e}");
        // The library runs exactly the command the launcher gives, nothing of its own.
        cfg.launcher = Some(Arc::new(NodeCommand::new(
            "/nonexistent/slug-test-node",
            ["--serve-once"],
        )));
        let e = run(&cfg, &NoObservers)
            .expect_err("missing program")
            .to_string();
        assert!(
            e.contains("start stage process 0 (/nonexistent/slug-test-node)"),
            "{transport}: {e}"
        );
    }
}

/// Counts what the hooks see, per stage.
#[derive(Default)]
struct Counts {
    posted: AtomicUsize,
    completed: AtomicUsize,
    boundaries: AtomicUsize,
}

impl TransferObserver for Counts {
    fn posted(&self, _: &Transfer, _: &[u8]) {
        self.posted.fetch_add(1, Ordering::Relaxed);
    }
    fn completed(&self, _: &Transfer, _: &[u8]) {
        self.completed.fetch_add(1, Ordering::Relaxed);
    }
}

struct CountHooks(Arc<Counts>);

impl Hooks for CountHooks {
    fn kernel(&mut self, _: &KernelCall, _: &mut [f32]) {}
    fn step_boundary(&mut self, _: u64, _: u32) {
        self.0.boundaries.fetch_add(1, Ordering::Relaxed);
    }
}

struct CountFactory(Arc<Counts>);

impl ObserverFactory for CountFactory {
    fn stage_observers(&self, _: &StageContext<'_>) -> Result<StageObservers, TransportError> {
        Ok(StageObservers {
            transfers: Observers::none().with(self.0.clone()),
            hooks: Box::new(CountHooks(self.0.clone())),
        })
    }
}

#[test]
fn thread_nodes_show_every_tcp_and_shm_transfer_to_the_factory_observers() {
    for transport in [TransportKind::Tcp, TransportKind::Shm] {
        let counts = Arc::new(Counts::default());
        let mut cfg = config(transport, 2, 1, 4);
        cfg.launch = Launch::Threads;
        let report = run(&cfg, &CountFactory(counts.clone())).expect("thread-node run");
        let transfers = report.digests().len();
        assert_eq!(transfers, 4 * (TOKENS + TOKENS - 1));
        assert_eq!(
            counts.posted.load(Ordering::Relaxed),
            transfers,
            "{transport}"
        );
        assert_eq!(
            counts.completed.load(Ordering::Relaxed),
            transfers,
            "{transport}"
        );
        // Every stage reports a step boundary per (sequence, step).
        assert_eq!(counts.boundaries.load(Ordering::Relaxed), 2 * 4 * TOKENS);
        assert_eq!(report.tokens, reference());
    }
}

#[test]
fn one_node_serves_several_stages_of_a_run_at_once() {
    let key = ClusterKey::from_bytes(b"pipeline-test-cluster-key").expect("key");
    let (tx, rx) = mpsc::channel();
    let stop = slug_transport::AbortFlag::new();
    let opts = NodeOptions {
        listen: "127.0.0.1:0".into(),
        key: key.clone(),
        once: false,
        stop: stop.clone(),
    };
    let server = std::thread::spawn(move || {
        serve(
            &opts,
            &NoObservers,
            &|addr| {
                let _ = tx.send(addr.to_string());
            },
            &|_| {},
        )
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("node address");
    let cfg = config(TransportKind::Tcp, 2, 1, 4);
    let report = run_on_nodes(&cfg, &[addr.clone(), addr], &key).expect("two stages, one node");
    assert_eq!(report.tokens, reference());
    stop.raise();
    server
        .join()
        .expect("server thread")
        .expect("server ends cleanly");
}

/// Hooks that panic at one step of one stage, as a buggy observer would.
struct PanicAt {
    stage: usize,
    step: u64,
}

struct PanicHooks(u64);

impl Hooks for PanicHooks {
    fn kernel(&mut self, _: &KernelCall, _: &mut [f32]) {}
    fn step_boundary(&mut self, step: u64, _: u32) {
        assert!(step != self.0, "observer failure injected at step {step}");
    }
}

impl ObserverFactory for PanicAt {
    fn stage_observers(&self, ctx: &StageContext<'_>) -> Result<StageObservers, TransportError> {
        let at = if ctx.stage == self.stage {
            self.step
        } else {
            u64::MAX
        };
        Ok(StageObservers {
            transfers: Observers::none(),
            hooks: Box::new(PanicHooks(at)),
        })
    }
}

#[test]
fn a_panicking_local_stage_ends_the_run_at_once_naming_the_stage() {
    let mut cfg = config(TransportKind::Local, 4, 1, 1);
    cfg.timeout_ms = 60_000;
    let start = Instant::now();
    match run(&cfg, &PanicAt { stage: 2, step: 3 }) {
        Err(TransportError::StageFailed { stage, host, .. }) => {
            assert_eq!((stage, host.as_str()), (2, "local"));
        }
        other => panic!("expected stage 2 to fail, got {other:?}"),
    }
    // Far below the 60 s link timeout: the other stages were woken, not timed out.
    assert!(start.elapsed() < Duration::from_secs(10));
}
