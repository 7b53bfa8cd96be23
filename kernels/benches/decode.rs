//! Decode tokens/s of the `small` and `base` presets at 1 and 2 threads (one stage holding
//! every layer). Baseline measured in the same run: reading the stage's weight bytes once
//! (decode streams every weight once per token, so this is its memory-bandwidth floor).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use slug_kernels::{LayerPlan, ModelConfig, NoHooks, Section, Stage, ThreadPool};

/// Prompt length before decode steps are timed.
const PROMPT: usize = 16;

/// One decode step at the next position; rewinds to just after the prompt when the context
/// is full (the rewound positions' cache entries are simply overwritten).
fn decode_step(stage: &mut Stage, pool: &ThreadPool) {
    if stage.cursor().positions[0] + 1 >= stage.config().max_seq {
        stage
            .set_position(0, PROMPT)
            .expect("position inside the context");
    }
    let t = stage.outbox_token(0).expect("last stage");
    stage.inbox_tokens_mut(0).expect("first stage")[0] = t;
    stage
        .forward(pool, &mut NoHooks, 0, 1)
        .expect("a valid decode step");
}

fn weight_read_seconds(stage: &Stage) -> f64 {
    let (offset, bytes) = stage.layout().section(Section::Weights);
    let weights = &stage.arena().bytes()[offset..offset + bytes];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let sum = weights.chunks_exact(64).fold(0u64, |acc, line| {
            acc.wrapping_add(line[0] as u64 + line[63] as u64)
        });
        black_box(sum);
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn bench(c: &mut Criterion) {
    let mut summary = Vec::new();
    for preset in ["small", "base"] {
        let config = ModelConfig::preset(preset).expect("known preset");
        let plan = LayerPlan::even(config.layers, 1).expect("one stage");
        let mut per_token = Vec::new();
        for threads in [1, 2] {
            let pool = ThreadPool::new(threads).expect("threads start");
            let mut stage = Stage::new(&config, &plan, 0, 1, &pool).expect("stage fits");
            let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| 65 + i).collect();
            stage.inbox_tokens_mut(0).expect("first stage")[..PROMPT].copy_from_slice(&prompt);
            stage
                .forward(&pool, &mut NoHooks, 0, PROMPT)
                .expect("prefill");
            let mut group = c.benchmark_group(format!("decode_{preset}"));
            group.sample_size(10);
            group.bench_function(format!("{threads}_threads"), |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    for _ in 0..iters {
                        decode_step(&mut stage, &pool);
                    }
                    t.elapsed()
                })
            });
            group.finish();
            let steps = 20;
            let t = Instant::now();
            for _ in 0..steps {
                decode_step(&mut stage, &pool);
            }
            let step: Duration = t.elapsed() / steps;
            per_token.push(step.as_secs_f64());
            let floor = weight_read_seconds(&stage);
            summary.push(format!(
                "{preset:<5} ({:>5.1}M params) {threads} thread(s): {:>7.1} tokens/s  ({:.2} ms/token; reading the weights once takes {:.2} ms: ratio {:.2}x)",
                config.parameters() as f64 / 1e6,
                1.0 / step.as_secs_f64(),
                step.as_secs_f64() * 1e3,
                floor * 1e3,
                step.as_secs_f64() / floor
            ));
        }
        summary.push(format!(
            "{preset:<5} speed-up 2 threads vs 1: {:.2}x",
            per_token[0] / per_token[1]
        ));
    }
    eprintln!("\ndecode throughput (one stage, all layers):");
    for line in summary {
        eprintln!("  {line}");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
