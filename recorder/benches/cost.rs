//! The recording-cost contract (issue 16), each number against its baseline measured in the
//! same run:
//! - callgrind (when valgrind is installed): user-space instructions of a `small` 4-stage local
//!   pipeline (4 sequences, 2 microbatches), recorded vs unrecorded, per generated token in
//!   steady state, `(recorded(72) - recorded(24)) / (unrecorded(72) - unrecorded(24))`, with
//!   spans + transfer hashes only (`--perf none --no-snapshots --payloads none`), and whole
//!   24-token runs without and with the step-0 snapshot. Instructions, not wall time: they
//!   repeat to the instruction where a 2-core VM's wall clock swings more than the 2% goal;
//! - `append`: one span into a thread's flight ring vs a 128-byte memcpy into a Vec (criterion);
//! - bytes per event on disk, per kind, of a real recording (`small`, spans + transfers + step
//!   boundaries): each kind's events of every endpoint re-encoded as logs of their own, vs the
//!   128-byte raw record;
//! - the step-0 snapshot of `base` (one stage of 4): bytes stored and time, vs the arena's
//!   bytes and a memcpy of the arena.
//!
//! Tokens/s of `small` and `base` recorded vs unrecorded on `shm` and `tcp` are the `fabric`
//! bench (`cargo bench -p slug-recorder --bench fabric`): it needs the built `slug` binary for
//! its stage processes.
//!
//! `SLUG_COST_QUICK=1` (what CI runs): 8- and 24-token callgrind runs instead of 24 and 72, no
//! `base` snapshot, a short criterion group. `SLUG_COST_ONLY=append,bytes,snapshot,callgrind`
//! (any of them, comma-separated) runs only those parts.

#[path = "support/tally.rs"]
mod tally;

use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use slug_kernels::{ModelConfig, Stage, ThreadPool};
use slug_recorder::ebpf::EbpfRequest;
use slug_recorder::endpoint::{EndpointOptions, EndpointRecorder};
use slug_recorder::observe::PayloadPolicy;
use slug_recorder::perf::{PerfConfig, PerfRequest};
use slug_recorder::{RecordConfig, record};
use slug_schema::snapshot::SnapshotStore;
use slug_schema::{
    Clock, Event, EventKind, KernelSpan, LogHeader, LogWriter, RawRecord, Trace, WriterOptions,
};
use slug_transport::pipeline::{NoObservers, PipelineConfig, run};
use tally::Tally;

/// Set in the environment of the bench re-run under callgrind: `MODE:TOKENS`, run once, exit.
const CALLGRIND_CHILD: &str = "SLUG_COST_CALLGRIND_CHILD";

fn quick() -> bool {
    std::env::var_os("SLUG_COST_QUICK").is_some_and(|v| v != "0")
}

/// The pipeline the contract is about: `small`, 4 local stages, 4 sequences, 2 microbatches.
fn pipeline(tokens: usize) -> PipelineConfig {
    let model = ModelConfig::preset("small").expect("preset");
    let mut p = PipelineConfig::new(model, "benchmark", 4, tokens);
    p.stages = 4;
    p.microbatches = 2;
    p
}

/// Spans + transfer hashes (+ the step-0 snapshot when `snapshot`), nothing else.
fn record_config(out: &Path, snapshot: bool) -> RecordConfig {
    RecordConfig {
        payloads: PayloadPolicy::None,
        perf: PerfConfig {
            request: PerfRequest::None,
            ..PerfConfig::default()
        },
        ebpf: EbpfRequest::None,
        snapshot_every: snapshot.then_some(0),
        ..RecordConfig::new(out)
    }
}

fn callgrind_child(spec: &str) -> ! {
    let (mode, tokens) = spec.split_once(':').expect("MODE:TOKENS");
    let p = pipeline(tokens.parse().expect("a token count"));
    let dir = tempfile::tempdir().expect("temp dir");
    match mode {
        "unrecorded" => {
            black_box(run(&p, &NoObservers).expect("run"));
        }
        "spans" | "snapshot" => {
            let cfg = record_config(&dir.path().join("t"), mode == "snapshot");
            black_box(record(&cfg, &p).expect("record"));
        }
        other => panic!("unknown mode {other}"),
    }
    std::process::exit(0);
}

/// Instructions of one child run under callgrind, or why there are none.
fn instructions(mode: &str, tokens: usize) -> Result<u64, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out = dir.path().join("callgrind.out");
    let o = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(&exe)
        .arg("--bench")
        .env(CALLGRIND_CHILD, format!("{mode}:{tokens}"))
        .output()
        .map_err(|e| format!("cannot run valgrind: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "the {mode} run failed under callgrind: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    std::fs::read_to_string(&out)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("summary: ").or(l.strip_prefix("totals: ")))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .ok_or_else(|| format!("no instruction count in callgrind's output for {mode}"))
}

fn callgrind() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("callgrind: skipped, valgrind is not installed (apt-get install valgrind)");
        return;
    }
    let (short, long) = if quick() { (8, 24) } else { (24, 72) };
    let mut ir = std::collections::HashMap::new();
    for mode in ["unrecorded", "spans", "snapshot"] {
        for tokens in [short, long] {
            if mode == "snapshot" && tokens == long {
                continue;
            }
            match instructions(mode, tokens) {
                Ok(n) => {
                    ir.insert((mode, tokens), n as f64);
                }
                Err(e) => {
                    eprintln!("callgrind: {e}");
                    return;
                }
            }
        }
    }
    let per_token = |mode| (ir[&(mode, long)] - ir[&(mode, short)]) / (4 * (long - short)) as f64;
    let (plain, spans) = (per_token("unrecorded"), per_token("spans"));
    let base = ir[&("unrecorded", short)];
    eprintln!(
        "callgrind (small, 4 local stages, 4 sequences, 2 microbatches; user-space instructions):\n  \
         spans + hashes, per generated token ({long} vs {short} tokens): {spans:.0} vs unrecorded {plain:.0}: ratio {:.4} (goal <= 1.02)\n  \
         spans + hashes, whole {short}-token run: {:.3e} vs {base:.3e}: ratio {:.4}\n  \
         with the step-0 snapshot, whole {short}-token run: {:.3e}: ratio {:.4} (goal <= 1.10)",
        spans / plain,
        ir[&("spans", short)],
        ir[&("spans", short)] / base,
        ir[&("snapshot", short)],
        ir[&("snapshot", short)] / base,
    );
}

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

const BATCH: usize = 16 * 1024;

fn append(c: &mut Criterion) {
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
    shared.append(&events[0]);
    let mut appended = 1u64;
    let (ours, base) = (Tally::default(), Tally::default());
    let mut g = c.benchmark_group("cost_append");
    g.throughput(Throughput::Elements(1));
    if quick() {
        g.warm_up_time(Duration::from_millis(300));
        g.measurement_time(Duration::from_secs(1));
    }
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
                appended += n as u64;
                // A full ring makes appends cheaper (they only count the loss): let it drain.
                while drained.load(Ordering::Relaxed) < appended {
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
    if ours.ran() && base.ran() {
        eprintln!(
            "append: {:.1} ns/event vs 128-byte memcpy {:.1} ns: ratio {:.2} (goal <= 20 ns); ring losses {}",
            ours.per_iter_ns(),
            base.per_iter_ns(),
            ours.per_iter_ns() / base.per_iter_ns().max(0.001),
            stats.ring_lost
        );
    }
}

/// Bytes per event of each kind: a real recording's events of that kind (all endpoints),
/// re-encoded as logs holding only that kind, with the recorder's writer options.
fn bytes_per_kind() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("t");
    let tokens = if quick() { 24 } else { 72 };
    record(&record_config(&out, false), &pipeline(tokens)).expect("record");
    let trace = Trace::open(&out).expect("trace");
    let total_bytes: u64 = (0..4)
        .map(|id| {
            std::fs::metadata(trace.endpoint_log_path(id).expect("log"))
                .expect("log")
                .len()
        })
        .sum();
    let mut per_kind: Vec<(u64, u64)> = vec![(0, 0); EventKind::COUNT];
    let mut all = 0u64;
    for id in 0..4 {
        let log = trace.endpoint_log(id).expect("log");
        let events: Vec<Event> = log
            .frames()
            .flatten()
            .flat_map(|f| f.events.into_iter())
            .collect();
        all += events.len() as u64;
        for kind in EventKind::ALL {
            let of_kind: Vec<&Event> = events.iter().filter(|e| e.kind() == kind).collect();
            if of_kind.is_empty() {
                continue;
            }
            let path = dir.path().join(format!("{id}.{kind:?}.slog"));
            let mut w =
                LogWriter::create(&path, LogHeader::new(id, Clock::Monotonic, 0)).expect("log");
            for e in &of_kind {
                w.append(e);
            }
            let stats = w.close().expect("close");
            let empty = empty_log_bytes(dir.path(), id);
            let slot = &mut per_kind[kind as usize];
            slot.0 += of_kind.len() as u64;
            slot.1 += stats.bytes.saturating_sub(empty);
        }
    }
    eprintln!(
        "bytes per event on disk (small, 4 local stages, {tokens} tokens, spans + transfers + steps; \
         each kind re-encoded alone; raw record {} B):\n  whole logs: {:.2} B/event over {all} events",
        RawRecord::SIZE,
        total_bytes as f64 / all.max(1) as f64
    );
    for kind in EventKind::ALL {
        let (n, bytes) = per_kind[kind as usize];
        if n > 0 {
            eprintln!(
                "  {:<14} {:>8} events  {:.2} B/event (goal <= 3)",
                kind.name(),
                n,
                bytes as f64 / n as f64
            );
        }
    }
}

/// Bytes of a log holding no events (header, string frame, footer), subtracted per log.
fn empty_log_bytes(dir: &Path, id: u32) -> u64 {
    let path = dir.join(format!("{id}.empty.slog"));
    let w = LogWriter::create(&path, LogHeader::new(id, Clock::Monotonic, 0)).expect("log");
    w.close().expect("close").bytes
}

/// The step-0 snapshot of one `base` stage (of 4): bytes stored and time taken, against the
/// arena's size and a plain copy of it.
fn base_snapshot() {
    if quick() {
        eprintln!("snapshot (base): skipped in quick mode");
        return;
    }
    let model = ModelConfig::preset("base").expect("preset");
    let p = PipelineConfig {
        stages: 4,
        ..PipelineConfig::new(model, "benchmark", 4, 1)
    };
    let plan = p.plan().expect("plan");
    let pool = ThreadPool::new(1).expect("pool");
    let stage = Stage::new(&p.model, &plan, 0, 4, &pool).expect("stage");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SnapshotStore::open(dir.path().join("snapshots")).expect("store");
    let arena = stage.arena().bytes();
    let t = Instant::now();
    let mut copy = arena.to_vec();
    black_box(&mut copy);
    let memcpy = t.elapsed();
    drop(copy);
    let t = Instant::now();
    let info = slug_recorder::observe::snapshot_stage(&store, 0, &stage).expect("snapshot");
    let took = t.elapsed();
    eprintln!(
        "snapshot (base, stage 0 of 4, step 0): {} stored of a {} B arena (ratio {:.4}); \
         {:.1} ms vs arena memcpy {:.1} ms: ratio {:.2}",
        info.new_bytes,
        arena.len(),
        info.new_bytes as f64 / arena.len() as f64,
        took.as_secs_f64() * 1e3,
        memcpy.as_secs_f64() * 1e3,
        took.as_secs_f64() / memcpy.as_secs_f64().max(1e-9)
    );
}

/// Whether `SLUG_COST_ONLY` (unset: everything) names `part`.
fn wanted(part: &str) -> bool {
    std::env::var("SLUG_COST_ONLY").map_or(true, |only| only.split(',').any(|p| p.trim() == part))
}

fn cost(c: &mut Criterion) {
    if let Ok(spec) = std::env::var(CALLGRIND_CHILD) {
        callgrind_child(&spec);
    }
    if wanted("append") {
        append(c);
    }
    if wanted("bytes") {
        bytes_per_kind();
    }
    if wanted("snapshot") {
        base_snapshot();
    }
    if wanted("callgrind") {
        callgrind();
    }
}

criterion_group!(benches, cost);
criterion_main!(benches);
