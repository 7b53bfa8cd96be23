//! Stage processes launched by the runtime (`slug node --once` children): shm and tcp give the
//! same tokens and transfer bytes as in-process threads, a killed stage process ends the run
//! quickly with an error naming it, and nodes refuse coordinators without the cluster key.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slug_kernels::ModelConfig;
use slug_transport::TransportError;
use slug_transport::auth::{ClusterKey, KEY_ENV};
use slug_transport::node::LISTENING_PREFIX;
use slug_transport::pipeline::{
    NoObservers, NodeCommand, PipelineConfig, launch_local_nodes, prompt_tokens, run, run_on_nodes,
};
use slug_transport::transfer::TransportKind;

fn slug() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_slug"))
}

/// Starts stage nodes the way the `slug` binary does.
fn launcher() -> NodeCommand {
    NodeCommand::new(
        slug(),
        [
            "node",
            "--listen",
            "127.0.0.1:0",
            "--once",
            "--key-file",
            "-",
        ],
    )
}

fn config(
    transport: TransportKind,
    stages: usize,
    threads: usize,
    microbatches: usize,
) -> PipelineConfig {
    let mut model = ModelConfig::preset("tiny").expect("tiny preset");
    model.layers = 4;
    model.seed = 3;
    let mut cfg = PipelineConfig::new(model, "x", 1, 6);
    cfg.prompts = ["The slug", "crossed", "the garden path", "slowly"]
        .iter()
        .map(|p| prompt_tokens(p))
        .collect();
    cfg.transport = transport;
    cfg.stages = stages;
    cfg.threads = threads;
    cfg.microbatches = microbatches;
    cfg.digests = true;
    cfg.timeout_ms = 20_000;
    cfg.launcher = Some(Arc::new(launcher()));
    cfg
}

#[test]
fn shm_and_tcp_stage_processes_match_local_threads() {
    for (stages, threads, microbatches) in [(2, 2, 1), (4, 1, 4)] {
        let local =
            run(&config(TransportKind::Local, stages, 1, 4), &NoObservers).expect("local run");
        assert_eq!(local.tokens.len(), 4);
        for transport in [TransportKind::Shm, TransportKind::Tcp] {
            let cfg = config(transport, stages, threads, microbatches);
            let got = run(&cfg, &NoObservers).expect("process run");
            assert_eq!(got.tokens, local.tokens, "{transport} stages {stages}");
            assert_eq!(
                got.digests(),
                local.digests(),
                "{transport} stages {stages}"
            );
            let pids: Vec<u32> = got.stage_reports.iter().map(|r| r.pid).collect();
            assert!(
                !pids.contains(&std::process::id()),
                "stages ran in their own processes"
            );
            assert!(got.stage_reports.iter().all(|r| r.clock.is_some()));
            let direct: u64 = got
                .stage_reports
                .iter()
                .filter_map(|r| r.inbound)
                .map(|l| l.direct)
                .sum();
            // Cross-process direct placement depends on the kernel allowing process_vm_writev.
            eprintln!("{transport} stages {stages}: {direct} transfers placed directly");
        }
    }
}

#[test]
fn killing_a_stage_process_mid_run_fails_fast_and_names_it() {
    for transport in [TransportKind::Tcp, TransportKind::Shm] {
        let key = ClusterKey::random().expect("key");
        let mut cfg = config(transport, 4, 1, 1);
        // A run far longer than the test waits: it only ends by the failure.
        cfg.model.max_seq = 16_384;
        cfg.tokens = 16_000;
        let mut nodes =
            launch_local_nodes(&launcher(), 4, &key, Duration::from_secs(20)).expect("nodes");
        let addrs = nodes.addrs();
        let runner = {
            let (cfg, addrs, key) = (cfg.clone(), addrs.clone(), key.clone());
            std::thread::spawn(move || run_on_nodes(&cfg, &addrs, &key))
        };
        std::thread::sleep(Duration::from_millis(2500));
        assert!(
            !runner.is_finished(),
            "{transport}: the run ended before the kill"
        );
        nodes.kill(2).expect("kill stage 2");
        let killed = Instant::now();
        let result = runner.join().expect("coordinator thread");
        let waited = killed.elapsed();
        assert!(
            waited < Duration::from_secs(10),
            "{transport}: took {waited:?} to notice"
        );
        match result {
            Err(TransportError::StageFailed {
                stage,
                host,
                step,
                detail,
            }) => {
                assert_eq!(stage, 2, "{transport}: {detail}");
                assert_eq!(host, addrs[2]);
                assert!(step.starts_with("step "), "{transport}: step {step:?}");
            }
            other => panic!("{transport}: expected a stage failure, got {other:?}"),
        }
        // The surviving nodes were told to stop and exit on their own.
        nodes.finish(Duration::from_secs(5));
    }
}

#[test]
fn node_refuses_a_coordinator_without_the_cluster_key_and_logs_why() {
    let key = ClusterKey::random().expect("key");
    let mut child = Command::new(slug())
        .args(["node", "--listen", "127.0.0.1:0", "--once"])
        .env(KEY_ENV, key.as_env_value())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start slug node");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listening line");
    let addr = line
        .trim()
        .strip_prefix(LISTENING_PREFIX)
        .expect("address line")
        .to_string();
    let stranger = ClusterKey::random().expect("key");
    let cfg = config(TransportKind::Tcp, 1, 1, 4);
    let err =
        run_on_nodes(&cfg, std::slice::from_ref(&addr), &stranger).expect_err("stranger refused");
    assert!(
        err.to_string()
            .contains("does not hold this node's cluster key"),
        "{err}"
    );
    // Still serving after the refusal: the real coordinator runs, then the node exits (--once).
    let ok = run_on_nodes(&cfg, &[addr], &key).expect("run with the key");
    assert_eq!(ok.tokens.len(), 4);
    let out = child.wait_with_output().expect("node exit");
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("refused") && log.contains("cluster key"),
        "{log}"
    );
}

#[test]
fn node_without_a_key_says_how_to_give_one() {
    let out = Command::new(slug())
        .args(["node", "--listen", "127.0.0.1:0"])
        .env_remove(KEY_ENV)
        .output()
        .expect("run slug node");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SLUG_CLUSTER_KEY") && err.contains("--key-file"),
        "{err}"
    );
}

#[test]
fn node_with_an_unreadable_key_file_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such.key");
    let out = Command::new(slug())
        .args(["node", "--listen", "127.0.0.1:0", "--key-file"])
        .arg(&missing)
        .output()
        .expect("run slug node");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such.key"), "{err}");
}
