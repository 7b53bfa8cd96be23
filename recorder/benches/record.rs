//! Recording costs, each against a baseline measured in the same run:
//! - `append`: one event into a thread's flight ring (the hot path) vs a 128-byte memcpy into a Vec;
//! - `pipeline`: a `small` model, 4 local stages, recorded (hashes + spans + software perf
//!   sampling; then `--payloads all`) vs the same run unrecorded: criterion times whole runs
//!   (model build included), and generation throughput is compared over interleaved rounds so
//!   a loaded machine's drift hits all three alike. Bytes per event on disk are printed too.
//!
//! Ratios are printed after each group (`ratio = ours / baseline`).

#[path = "support/tally.rs"]
mod tally;

use std::cell::Cell;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use slug_kernels::ModelConfig;
use slug_recorder::ebpf::EbpfRequest;
use slug_recorder::endpoint::{EndpointOptions, EndpointRecorder};
use slug_recorder::observe::PayloadPolicy;
use slug_recorder::perf::{PerfConfig, PerfRequest, StreamKind};
use slug_recorder::{RecordConfig, RecordSummary, record};
use slug_schema::{Event, KernelSpan, RawRecord, WriterOptions};
use slug_transport::pipeline::{NoObservers, PipelineConfig, run};
use tally::Tally;

const BATCH: usize = 16 * 1024;

fn span(i: u64) -> Event {
    Event::KernelSpan(KernelSpan {
        kernel: (i % 16) as u32,
        layer: Some((i / 16 % 6) as u32),
        step: i / 96,
        seq: 0,
        rows: 1,
        start_ns: 1_000_000 + i * 700,
        end_ns: 1_000_000 + i * 700 + 500,
        output_hash: None,
    })
}

fn bench_append(c: &mut Criterion) {
    let events: Vec<Event> = (0..BATCH as u64).map(span).collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let drained = Arc::new(AtomicU64::new(0));
    let options = EndpointOptions {
        endpoint: 0,
        endpoints_dir: dir.path().to_path_buf(),
        ring_records: 1 << 18,
        writer: WriterOptions::default(),
        progress: Some(Arc::clone(&drained)),
        ebpf: None,
    };
    let recorder = EndpointRecorder::start(&options, None, None).expect("recorder");
    let shared = recorder.shared().clone();
    // The thread's ring is created (a file, once per thread) by its first append: not timed.
    shared.append(&events[0]);
    let appended = Cell::new(1u64);
    let (ours, base) = (Tally::default(), Tally::default());
    let mut g = c.benchmark_group("append");
    g.throughput(Throughput::Elements(1));
    g.bench_function("flight_ring_append", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BATCH as u64) as usize;
                let t = Instant::now();
                for e in &events[..n] {
                    shared.append(black_box(e));
                }
                total += t.elapsed();
                left -= n as u64;
                appended.set(appended.get() + n as u64);
                // Wait for the writer to drain, so the ring never fills during timing (a full
                // ring makes appends cheaper: they only count the loss).
                while drained.load(Ordering::Relaxed) < appended.get() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            ours.add(total, iters)
        })
    });
    g.bench_function("baseline_memcpy_128B", |b| {
        let records: Vec<[u8; RawRecord::SIZE]> = events
            .iter()
            .map(|e| RawRecord::from_event(e).to_bytes())
            .collect();
        let mut dst: Vec<[u8; RawRecord::SIZE]> = Vec::with_capacity(BATCH);
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BATCH as u64) as usize;
                dst.clear();
                let t = Instant::now();
                for r in &records[..n] {
                    dst.push(*black_box(r));
                }
                total += t.elapsed();
                black_box(&dst);
                left -= n as u64;
            }
            base.add(total, iters)
        })
    });
    g.finish();
    let stats = recorder.finish().expect("finish");
    if !ours.ran() || !base.ran() {
        // The group was filtered out on the command line: no ratio to print.
        return;
    }
    eprintln!(
        "append: {:.1} ns/event vs memcpy {:.1} ns: ratio {:.2}; ring losses {}",
        ours.per_iter_ns(),
        base.per_iter_ns(),
        ours.per_iter_ns() / base.per_iter_ns().max(0.001),
        stats.ring_lost
    );
}

fn pipeline() -> PipelineConfig {
    let model = ModelConfig::preset("small").expect("preset");
    let mut p = PipelineConfig::new(model, "benchmark", 4, 24);
    p.stages = 4;
    p
}

/// Mean of the generation throughput (tokens/s, model building excluded) over runs.
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

/// Software perf streams only: what every host can record.
fn software_perf() -> PerfConfig {
    PerfConfig {
        request: PerfRequest::List(vec![
            StreamKind::CpuClock,
            StreamKind::PageFaults,
            StreamKind::ContextSwitches,
            StreamKind::StepCounters,
        ]),
        ..PerfConfig::default()
    }
}

fn record_once(
    p: &PipelineConfig,
    out: PathBuf,
    payloads: PayloadPolicy,
    perf: PerfConfig,
) -> RecordSummary {
    let cfg = RecordConfig {
        payloads,
        perf,
        // What this bench measures is the recorder's own cost; benches/ebpf.rs measures probes.
        ebpf: EbpfRequest::None,
        ..RecordConfig::new(&out)
    };
    let s = record(&cfg, p).expect("record");
    let _ = std::fs::remove_dir_all(&out);
    s
}

/// Rounds of the interleaved throughput comparison.
const ROUNDS: usize = 5;

fn bench_pipeline(c: &mut Criterion) {
    let p = pipeline();
    let dir = tempfile::tempdir().expect("temp dir");
    let (plain, recorded, payloads) = (Tally::default(), Tally::default(), Tally::default());
    let runs = Cell::new(0u64);
    let next_dir = || {
        runs.set(runs.get() + 1);
        dir.path().join(format!("t{}", runs.get()))
    };
    let mut g = c.benchmark_group("pipeline_small_4_stages");
    g.sample_size(10);
    g.bench_function("baseline_unrecorded", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                black_box(run(&p, &NoObservers).expect("run"));
            }
            plain.add(t.elapsed(), iters)
        })
    });
    for (name, policy, tally) in [
        (
            "recorded_hashes_spans_sampling",
            PayloadPolicy::None,
            &recorded,
        ),
        ("recorded_payloads_all", PayloadPolicy::All, &payloads),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let out = next_dir();
                    let t = Instant::now();
                    black_box(record_once(&p, out, policy, software_perf()));
                    total += t.elapsed();
                }
                tally.add(total, iters)
            })
        });
    }
    g.finish();
    if !plain.ran() {
        // The group was filtered out on the command line.
        return;
    }

    // Generation throughput (model build excluded), runs interleaved so that the machine's
    // changing load hits all three alike.
    let (plain_rate, recorded_rate, payloads_rate) =
        (Rate::default(), Rate::default(), Rate::default());
    let mut bytes_per_event = 0.0;
    for _ in 0..ROUNDS {
        plain_rate.add(run(&p, &NoObservers).expect("run").tokens_per_s);
        let s = record_once(&p, next_dir(), PayloadPolicy::None, software_perf());
        recorded_rate.add(s.tokens_per_s);
        let bytes: u64 = s.endpoints.iter().map(|e| e.bytes).sum();
        bytes_per_event = bytes as f64 / s.events().max(1) as f64;
        payloads_rate
            .add(record_once(&p, next_dir(), PayloadPolicy::All, software_perf()).tokens_per_s);
    }
    // Spans, transfers, step boundaries and counters only: what the 3-bytes-per-event target is about.
    let quiet = PerfConfig {
        request: PerfRequest::None,
        ..PerfConfig::default()
    };
    let s = record_once(&p, next_dir(), PayloadPolicy::None, quiet);
    let bytes: u64 = s.endpoints.iter().map(|e| e.bytes).sum();
    let pipeline_bytes_per_event = bytes as f64 / s.events().max(1) as f64;
    eprintln!(
        "generation throughput (tokens/s, model build excluded), {ROUNDS} interleaved rounds:\n  \
         unrecorded {:.1}; recorded {:.1} (ratio {:.3}); --payloads all {:.1} (ratio {:.3})\n  \
         log bytes per event: {:.2} with software perf samples, {:.2} without (spans, transfers, steps, counters)",
        plain_rate.mean(),
        recorded_rate.mean(),
        recorded_rate.mean() / plain_rate.mean(),
        payloads_rate.mean(),
        payloads_rate.mean() / plain_rate.mean(),
        bytes_per_event,
        pipeline_bytes_per_event
    );
    let base = plain.per_iter_ns();
    eprintln!(
        "pipeline (small, 4 local stages, 4 sequences x 24 tokens), wall time per run incl. model build:\n  \
         recorded: ratio {:.3}; --payloads all: ratio {:.3}",
        recorded.per_iter_ns() / base,
        payloads.per_iter_ns() / base,
    );
}

criterion_group!(benches, bench_append, bench_pipeline);
criterion_main!(benches);
