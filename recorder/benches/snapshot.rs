//! Snapshot write speed against a memcpy of the same arena, measured in the same run:
//! - `capture_first`: the hot-path half of a first snapshot (hash every chunk, copy all out);
//! - `capture_incremental`: the hot-path half when one chunk changed since the last snapshot;
//! - `capture_incremental_weights_known`: the same with the weights' hashes reused (as the
//!   stage snapshotter does), so only the KV cache and activations are hashed;
//! - `write_first`: capture + zstd + write of a first snapshot to a fresh store (the whole cost);
//! - `baseline_memcpy`: copying the arena into a preallocated buffer.
//!
//! Ratios (`ours / memcpy`, lower is better) are printed after the group.

#[path = "support/tally.rs"]
mod tally;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use slug_schema::snapshot::{DEFAULT_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL, SnapshotStore};
use tally::Tally;

/// A stage-like arena: pseudo-random "weights" followed by a zeroed KV cache.
const WEIGHT_BYTES: usize = 24 << 20;
const KV_BYTES: usize = 8 << 20;

fn arena() -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut a: Vec<u8> = (0..WEIGHT_BYTES / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Small floats like real weights: the exponent bytes repeat, mantissas do not.
            let w = ((x >> 40) as f32 / 16_777_216.0 - 0.5) * 0.02;
            let v = (x as u32 as f32 / 4_294_967_296.0 - 0.5) * 0.02;
            [w.to_le_bytes(), v.to_le_bytes()].concat()
        })
        .collect();
    a.resize(WEIGHT_BYTES + KV_BYTES, 0);
    a
}

fn bench_snapshot(c: &mut Criterion) {
    let src = arena();
    let len = src.len();
    let (memcpy, first, incremental, write) = (
        Tally::default(),
        Tally::default(),
        Tally::default(),
        Tally::default(),
    );
    // This machine's load changes between benchmarks: each measurement also times a memcpy of
    // the same bytes right before it, and ratios use these paired baselines.
    let (first_base, incremental_base, write_base) =
        (Tally::default(), Tally::default(), Tally::default());
    let (weights_known, known_base) = (Tally::default(), Tally::default());
    let dst = std::cell::RefCell::new(vec![1u8; len]);
    let paired_memcpy = |tally: &Tally| {
        let mut d = dst.borrow_mut();
        let t = Instant::now();
        d.copy_from_slice(black_box(&src));
        black_box(&*d);
        tally.add(t.elapsed(), 1);
    };
    let mut g = c.benchmark_group("snapshot_32MiB");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(len as u64));

    g.bench_function("baseline_memcpy", |b| {
        let mut dst = vec![1u8; len];
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                dst.copy_from_slice(black_box(&src));
                black_box(&dst);
            }
            memcpy.add(t.elapsed(), iters)
        })
    });

    g.bench_function("capture_first", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().expect("temp dir");
                let store = SnapshotStore::open(dir.path()).expect("store");
                paired_memcpy(&first_base);
                let t = Instant::now();
                black_box(store.capture(0, 0, black_box(&src), &[]).expect("capture"));
                total += t.elapsed();
            }
            first.add(total, iters)
        })
    });

    g.bench_function("capture_incremental", |b| {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SnapshotStore::open(dir.path()).expect("store");
        let mut a = src.clone();
        black_box(store.capture(0, 0, &a, &[]).expect("capture"));
        let mut step = 0u64;
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                step += 1;
                // One KV chunk changes per step, as decoding one token does.
                let at = WEIGHT_BYTES
                    + (step as usize % (KV_BYTES / DEFAULT_CHUNK_SIZE)) * DEFAULT_CHUNK_SIZE;
                a[at..at + 8].copy_from_slice(&step.to_le_bytes());
                paired_memcpy(&incremental_base);
                let t = Instant::now();
                black_box(store.capture(0, step, black_box(&a), &[]).expect("capture"));
                total += t.elapsed();
            }
            incremental.add(total, iters)
        })
    });

    g.bench_function("capture_incremental_weights_known", |b| {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SnapshotStore::open(dir.path()).expect("store");
        let mut a = src.clone();
        let first = store.capture(0, 0, &a, &[]).expect("capture");
        // As the stage snapshotter does: weight chunks keep the hash of the first snapshot.
        let known: Vec<Option<u128>> = first
            .index()
            .chunks
            .iter()
            .enumerate()
            .map(|(i, &h)| ((i + 1) * DEFAULT_CHUNK_SIZE <= WEIGHT_BYTES).then_some(h))
            .collect();
        let mut step = 0u64;
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                step += 1;
                let at = WEIGHT_BYTES
                    + (step as usize % (KV_BYTES / DEFAULT_CHUNK_SIZE)) * DEFAULT_CHUNK_SIZE;
                a[at..at + 8].copy_from_slice(&step.to_le_bytes());
                paired_memcpy(&known_base);
                let t = Instant::now();
                black_box(
                    store
                        .capture_with(0, step, black_box(&a), &[], &known)
                        .expect("capture"),
                );
                total += t.elapsed();
            }
            weights_known.add(total, iters)
        })
    });

    g.bench_function("write_first", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().expect("temp dir");
                let store = SnapshotStore::open(dir.path()).expect("store");
                paired_memcpy(&write_base);
                let t = Instant::now();
                let pending = store.capture(0, 0, black_box(&src), &[]).expect("capture");
                black_box(store.persist(pending).expect("persist"));
                total += t.elapsed();
            }
            write.add(total, iters)
        })
    });
    g.finish();

    if !memcpy.ran() {
        eprintln!("snapshot: the memcpy baseline was filtered out; no ratios to print");
        return;
    }
    let base = memcpy.per_iter_ns();
    let gbps = |ns: f64| len as f64 / ns;
    eprintln!(
        "snapshot of a {} MiB arena (chunks {} KiB, zstd level {DEFAULT_ZSTD_LEVEL}); ratio = ours / memcpy ({:.2} GB/s):",
        len >> 20,
        DEFAULT_CHUNK_SIZE >> 10,
        gbps(base)
    );
    for (name, t, paired) in [
        ("capture_first (hot path)", &first, &first_base),
        (
            "capture_incremental (hot path)",
            &incremental,
            &incremental_base,
        ),
        (
            "capture_incremental, weights known",
            &weights_known,
            &known_base,
        ),
        ("write_first (capture + zstd + write)", &write, &write_base),
    ] {
        if !t.ran() || !paired.ran() {
            continue;
        }
        let ns = t.per_iter_ns();
        eprintln!(
            "  {name:38} {:8.2} ms  {:6.2} GB/s  ratio {:.2} (to the memcpy timed next to it: {:.2})",
            ns / 1e6,
            gbps(ns),
            ns / base,
            ns / paired.per_iter_ns()
        );
    }
}

criterion_group!(benches, bench_snapshot);
criterion_main!(benches);
