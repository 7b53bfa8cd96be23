//! Replay speed against the recorded run, both measured in the same benchmark run (the trace is
//! recorded here first):
//! - `stage_replay`: stage 1 of a 2-stage `small` pipeline alone, fed its recorded payloads,
//!   vs the wall time the recorded run's stage 1 took for the same steps (waits on its
//!   neighbour included: a stage replayed alone never waits on a network). Target >= 1.0x.
//! - `pipeline_replay`: the whole pipeline restored and re-run with every transfer checked vs
//!   the recorded run's wall time.
//!
//! Ratios are printed after each group as `recorded / replayed` (above 1: replay is faster);
//! criterion's own times include building the stages, the ratios count only the steps.

use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use slug_kernels::ModelConfig;
use slug_recorder::observe::PayloadPolicy;
use slug_recorder::perf::{PerfConfig, PerfRequest};
use slug_recorder::{RecordConfig, record};
use slug_replayer::{RecordedRun, ReplayOptions, ReplayReport, replay_pipeline, replay_stage};
use slug_transport::pipeline::{PipelineConfig, prompt_tokens};

fn pipeline() -> PipelineConfig {
    let m = ModelConfig::preset("small").expect("small preset");
    let mut cfg = PipelineConfig::new(m, "x", 1, 16);
    cfg.prompts = ["The slug crossed the garden", "slowly"]
        .iter()
        .map(|p| prompt_tokens(p))
        .collect();
    cfg.stages = 2;
    cfg.microbatches = 2;
    cfg
}

/// Sums the replayed and recorded nanoseconds of every measured replay.
#[derive(Default)]
struct Ratio {
    replayed: Cell<u64>,
    recorded: Cell<u64>,
    runs: Cell<u64>,
}

impl Ratio {
    fn add(&self, r: &ReplayReport) {
        if let Some(rec) = r.recorded_ns {
            self.replayed.set(self.replayed.get() + r.wall_ns);
            self.recorded.set(self.recorded.get() + rec);
            self.runs.set(self.runs.get() + 1);
        }
    }

    fn print(&self, what: &str) {
        let (rep, rec, n) = (self.replayed.get(), self.recorded.get(), self.runs.get());
        if rep > 0 && rec > 0 {
            println!(
                "{what}: recorded / replayed = {:.2}x (replayed {:.2} ms, recorded {:.2} ms, \
                 mean of {n} replays)",
                rec as f64 / rep as f64,
                rep as f64 / 1e6 / n as f64,
                rec as f64 / 1e6 / n as f64
            );
        }
    }
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("trace");
    let rc = RecordConfig {
        payloads: PayloadPolicy::All,
        perf: PerfConfig {
            request: PerfRequest::None,
            ..PerfConfig::default()
        },
        ..RecordConfig::new(&out)
    };
    record(&rc, &pipeline()).expect("record the trace to replay");
    let rec = Arc::new(RecordedRun::open(&out).expect("open the trace"));
    // Steps after the prefill: both stages are in steady decode there.
    let opts = ReplayOptions {
        from_step: Some(2),
        ..ReplayOptions::default()
    };

    let stage = Ratio::default();
    let mut g = c.benchmark_group("stage_replay");
    g.sample_size(10);
    g.bench_function("stage_1_alone", |b| {
        b.iter(|| {
            let r = replay_stage(rec.clone(), 1, &opts).expect("stage replay");
            assert!(r.report.bit_exact);
            stage.add(&r.report);
            black_box(r.stage.cursor().step)
        })
    });
    g.finish();
    stage.print("stage 1 replayed alone vs its recorded steps");

    let whole = Ratio::default();
    let opts = ReplayOptions::default();
    let mut g = c.benchmark_group("pipeline_replay");
    g.sample_size(10);
    g.bench_function("local_2_stages", |b| {
        b.iter(|| {
            let r = replay_pipeline(rec.clone(), &opts).expect("pipeline replay");
            assert!(r.bit_exact);
            whole.add(&r);
            black_box(r.counts.transfers_checked)
        })
    });
    g.finish();
    whole.print("whole pipeline replayed vs recorded");
}

criterion_group!(benches, bench);
criterion_main!(benches);
