//! Recording cost on the real fabrics: tokens/s of a 4-stage pipeline recorded vs the same
//! pipeline unrecorded, for the `small` and `base` presets on `shm` and on `tcp`.
//!
//! Variants per (model, transport), all measured in the same bench run:
//! - `baseline_unrecorded`: `slug run` semantics, no observers;
//! - `recorded`: transfer hashes + kernel spans + step boundaries + `--perf auto` (on a host
//!   without PT/PEBS/IBS that is the software sampling: cpu-clock IPs, page faults, context
//!   switches, per-step counters), `--payloads none`, no snapshots (`--no-snapshots`: snapshot
//!   writing is its own bench, `snapshot.rs`, and a `base` arena snapshot would dwarf the rest);
//! - `recorded_payloads_all`: the same plus `--payloads all` (every transfer's bytes stored,
//!   content-addressed and compressed).
//!
//! Stage processes: [`Launch::Processes`], i.e. one `slug node --once` child per stage, each
//! recording itself, exactly as `slug record --transport shm|tcp` runs. [`Launch::Threads`]
//! would use the same sockets and fabric file, but `slug_recorder::record` records `shm`/`tcp`
//! stages only through the node processes' own recorders (the coordinator passes
//! `observer_settings` and observes nothing itself), so threads would measure an unrecorded run
//! twice. The children are the built `slug` binary: `$SLUG_BIN`, or `target/<profile>/slug`
//! next to this bench executable. Build it first: `cargo build --release -p slug`.
//!
//! Criterion times whole runs (process launch and model build included: `base` builds 115M
//! parameters in every stage process); after each group the generation throughput (tokens/s as
//! the pipeline reports it, model build excluded) is compared over interleaved rounds, so a
//! loaded machine's drift hits the three variants alike. Ratios: `ours / unrecorded`.

#[path = "support/tally.rs"]
mod tally;

use std::cell::Cell;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use slug_kernels::ModelConfig;
use slug_recorder::observe::PayloadPolicy;
use slug_recorder::perf::{PerfConfig, PerfRequest};
use slug_recorder::{RecordConfig, record};
use slug_transport::pipeline::{Launch, NoObservers, NodeCommand, PipelineConfig, run};
use slug_transport::transfer::TransportKind;
use tally::Tally;

/// The `slug` binary the stage processes run.
fn slug_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SLUG_BIN") {
        return Some(PathBuf::from(p));
    }
    // target/<profile>/deps/fabric-<hash> -> target/<profile>/slug
    let exe = std::env::current_exe().ok()?;
    let candidate = exe.parent()?.parent()?.join("slug");
    candidate.is_file().then_some(candidate)
}

fn pipeline(model: &str, transport: TransportKind, tokens: usize, node: &Path) -> PipelineConfig {
    let model = ModelConfig::preset(model).expect("preset");
    let mut p = PipelineConfig::new(model, "benchmark", 4, tokens);
    p.stages = 4;
    p.transport = transport;
    p.launch = Launch::Processes;
    p.launcher = Some(Arc::new(NodeCommand::new(
        node,
        [
            "node",
            "--listen",
            "127.0.0.1:0",
            "--once",
            "--key-file",
            "-",
        ],
    )));
    p
}

/// Mean generation throughput over runs.
#[derive(Default)]
struct Rate {
    sum: Cell<f64>,
    n: Cell<u64>,
}

impl Rate {
    fn add(&self, tokens_per_s: f64) {
        self.sum.set(self.sum.get() + tokens_per_s);
        self.n.set(self.n.get() + 1);
    }

    fn mean(&self) -> f64 {
        self.sum.get() / self.n.get().max(1) as f64
    }
}

/// Records one run into `out`, removes it, returns tokens/s and log bytes per event.
fn record_once(p: &PipelineConfig, out: PathBuf, payloads: PayloadPolicy) -> (f64, f64) {
    let cfg = RecordConfig {
        payloads,
        perf: PerfConfig {
            request: PerfRequest::Auto,
            ..PerfConfig::default()
        },
        snapshot_every: None,
        ..RecordConfig::new(&out)
    };
    let s = record(&cfg, p).expect("record");
    let _ = std::fs::remove_dir_all(&out);
    let bytes: u64 = s.endpoints.iter().map(|e| e.bytes).sum();
    (s.tokens_per_s, bytes as f64 / s.events().max(1) as f64)
}

/// Interleaved rounds of the generation-throughput comparison.
const ROUNDS: usize = 3;

fn bench_one(c: &mut Criterion, model: &str, transport: TransportKind, tokens: usize) {
    let Some(node) = slug_binary() else {
        eprintln!(
            "{model}/{}: no `slug` binary next to this bench (set SLUG_BIN or run \
             `cargo build --release -p slug` with the same target dir): not measured",
            transport.name()
        );
        return;
    };
    let p = pipeline(model, transport, tokens, &node);
    let dir = tempfile::tempdir().expect("temp dir");
    let runs = Cell::new(0u64);
    let next_dir = || {
        runs.set(runs.get() + 1);
        dir.path().join(format!("t{}", runs.get()))
    };
    let (plain, recorded, payloads) = (Tally::default(), Tally::default(), Tally::default());
    let name = format!("{model}_{}_4_stages", transport.name());
    let mut g = c.benchmark_group(&name);
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("baseline_unrecorded", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                black_box(run(&p, &NoObservers).expect("run"));
            }
            plain.add(t.elapsed(), iters)
        })
    });
    for (variant, policy, tally) in [
        ("recorded", PayloadPolicy::None, &recorded),
        ("recorded_payloads_all", PayloadPolicy::All, &payloads),
    ] {
        g.bench_function(variant, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let out = next_dir();
                    let t = Instant::now();
                    black_box(record_once(&p, out, policy));
                    total += t.elapsed();
                }
                tally.add(total, iters)
            })
        });
    }
    g.finish();
    if !plain.ran() {
        // Filtered out on the command line.
        return;
    }
    let (plain_rate, recorded_rate, payloads_rate) =
        (Rate::default(), Rate::default(), Rate::default());
    let mut bpe = (0.0, 0.0);
    for _ in 0..ROUNDS {
        plain_rate.add(run(&p, &NoObservers).expect("run").tokens_per_s);
        let (r, b) = record_once(&p, next_dir(), PayloadPolicy::None);
        recorded_rate.add(r);
        let (r, b_all) = record_once(&p, next_dir(), PayloadPolicy::All);
        payloads_rate.add(r);
        bpe = (b, b_all);
    }
    let base = plain.per_iter_ns();
    eprintln!(
        "{name} (4 sequences x {tokens} tokens, stage processes):\n  \
         generation tokens/s over {ROUNDS} interleaved rounds: unrecorded {:.1}; recorded {:.1} \
         (ratio {:.3}); --payloads all {:.1} (ratio {:.3})\n  \
         wall time per run incl. launch + model build: recorded ratio {:.3}; --payloads all \
         ratio {:.3}\n  \
         log bytes per event (perf samples included): {:.2}; with --payloads all {:.2}",
        plain_rate.mean(),
        recorded_rate.mean(),
        recorded_rate.mean() / plain_rate.mean(),
        payloads_rate.mean(),
        payloads_rate.mean() / plain_rate.mean(),
        recorded.per_iter_ns() / base,
        payloads.per_iter_ns() / base,
        bpe.0,
        bpe.1,
    );
}

fn bench_small(c: &mut Criterion) {
    bench_one(c, "small", TransportKind::Shm, 16);
    bench_one(c, "small", TransportKind::Tcp, 16);
}

fn bench_base(c: &mut Criterion) {
    bench_one(c, "base", TransportKind::Shm, 4);
    bench_one(c, "base", TransportKind::Tcp, 4);
}

criterion_group!(benches, bench_small, bench_base);
criterion_main!(benches);
