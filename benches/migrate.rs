//! Stall of a stage migration, pre-copy against stop-and-copy, measured in the same run, for
//! the `small` and `base` models on loopback (a bench binary: a migration is one multi-second
//! pipeline run, not a loop criterion could time).
//!
//! For each model: a 2-stage tcp pipeline (stage nodes as threads of this process, on loopback),
//! stage 1 moved to a node thread at step 12 of 32, once with 3 pre-copy rounds and once with
//! `rounds=0` (the whole state shipped while paused). Printed per model: the median stall of
//! each (the source's last step to the target's first, as the coordinator saw them), the
//! pipeline's step time, the stall as a multiple of it, the last delta's size, and the ratio
//! stop-and-copy / pre-copy. Goal: stall <= one step time + the last delta's transfer time;
//! for `base`, under 50 ms.
//!
//! `cargo bench --bench migrate` (add `-- small` or `-- base` for one model).

use std::sync::mpsc;
use std::time::Duration;

use slug_kernels::ModelConfig;
use slug_transport::AbortFlag;
use slug_transport::auth::ClusterKey;
use slug_transport::node::{NodeOptions, serve};
use slug_transport::pipeline::{
    Launch, Migration, MigrationReport, NoObservers, PipelineConfig, prompt_tokens, run,
};
use slug_transport::transfer::TransportKind;

/// Runs per variant; the median is printed.
const RUNS: usize = 3;

fn pipeline(model: &str, key_file: &std::path::Path, to: &str, rounds: u32) -> PipelineConfig {
    let m = ModelConfig::preset(model).expect("preset");
    let mut cfg = PipelineConfig::new(m, "x", 1, 16);
    cfg.prompts = ["The slug crossed the garden", "slowly"]
        .iter()
        .map(|p| prompt_tokens(p))
        .collect();
    cfg.stages = 2;
    cfg.microbatches = 2;
    cfg.threads = 1;
    cfg.transport = TransportKind::Tcp;
    cfg.launch = Launch::Threads;
    cfg.key_file = Some(key_file.to_path_buf());
    cfg.migrations = vec![Migration {
        stage: 1,
        to: to.to_string(),
        at_step: 12,
        rounds,
    }];
    cfg
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median stall, step time and restore part of the stall (ms), and the last delta (bytes) of
/// `RUNS` runs.
fn measure(model: &str, key_file: &std::path::Path, to: &str, rounds: u32) -> (f64, f64, f64, u64) {
    let (mut stalls, mut steps, mut restores, mut last) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for _ in 0..RUNS {
        let report = run(&pipeline(model, key_file, to, rounds), &NoObservers).expect("run");
        let m: &MigrationReport = &report.migrations[0];
        assert!(m.moved, "the move was refused: {:?}", m.reason);
        stalls.push(m.stall_ms.expect("stall measured"));
        steps.push(m.step_ms.expect("step time"));
        restores.push(m.restored_ms.expect("restore time"));
        last = m.rounds.last().map_or(0, |r| r.bytes);
    }
    (median(stalls), median(steps), median(restores), last)
}

fn main() {
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("cluster.key");
    slug_transport::auth::write_new_key(&key_file).expect("key file");
    let key = ClusterKey::resolve(Some(&key_file)).expect("key");
    // The target: a node served from a thread of this process, as `slug node` would.
    let stop = AbortFlag::new();
    let (tx, rx) = mpsc::channel();
    let opts = NodeOptions {
        listen: "127.0.0.1:0".into(),
        key,
        once: false,
        stop: stop.clone(),
    };
    std::thread::spawn(move || {
        let announce = |a: std::net::SocketAddr| {
            let _ = tx.send(a.to_string());
        };
        let _ = serve(&opts, &NoObservers, &announce, &|_| {});
    });
    let to = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the target node listens");
    for model in ["small", "base"] {
        if !only.is_empty() && !only.iter().any(|o| o == model) {
            continue;
        }
        let (pre, step, pre_restore, pre_last) = measure(model, &key_file, &to, 3);
        let (stop_copy, _, stop_restore, whole) = measure(model, &key_file, &to, 0);
        println!(
            "migrate/{model}: pre-copy stall {pre:.2} ms ({:.2} step times of {step:.2} ms; last \
             delta {:.1} KiB, restored after {pre_restore:.2} ms) vs stop-and-copy stall \
             {stop_copy:.2} ms ({:.2} step times; whole state {:.1} KiB, restored after \
             {stop_restore:.2} ms): stop-and-copy / pre-copy = {:.2}x (median of {RUNS} runs each)",
            pre / step,
            pre_last as f64 / 1024.0,
            stop_copy / step,
            whole as f64 / 1024.0,
            stop_copy / pre,
        );
    }
    stop.raise();
}
