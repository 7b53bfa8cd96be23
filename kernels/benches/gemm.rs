//! gemm and gemv GFLOP/s of slug's bit-exact kernels against the `matrixmultiply` crate on the
//! same shapes in the same run; prints the ratio (target: at least 0.7x) and checks that every
//! vector path still equals the scalar path bit for bit.

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use slug_kernels::kernels::{gemm, gemv};
use slug_kernels::{Arith, Isa};

/// (m, k, n): prefill projections of `small` and `base` (a 12-token prompt, then longer ones),
/// and decode (m = 1) projections.
const SHAPES: [(usize, usize, usize); 6] = [
    (12, 768, 3072),
    (64, 384, 1024),
    (128, 768, 768),
    (64, 768, 3072),
    (1, 768, 3072),
    (1, 3072, 768),
];

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
        .collect()
}

fn ours(arith: Arith, a: &[f32], b: &[f32], c: &mut [f32], (m, k, n): (usize, usize, usize)) {
    if m == 1 {
        gemv(arith, a, b, c, k, n, 0..n).expect("shapes match");
    } else {
        gemm(arith, a, b, c, m, k, n, 0..m).expect("shapes match");
    }
}

fn theirs(a: &[f32], b: &[f32], c: &mut [f32], (m, k, n): (usize, usize, usize)) {
    // SAFETY: row-major views whose sizes match the shape.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// Best-of-`reps` seconds of `f`, after one warm-up call.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn bench(c: &mut Criterion) {
    let mut summary = Vec::new();
    for shape in SHAPES {
        let (m, k, n) = shape;
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let mut out = vec![0.0; m * n];
        let mut reference = vec![0.0; m * n];
        ours(Arith::scalar(false), &a, &b, &mut reference, shape);
        let flops = 2.0 * (m * k * n) as f64;
        let kind = if m == 1 { "gemv" } else { "gemm" };
        let mut group = c.benchmark_group(format!("{kind}_{m}x{k}x{n}"));
        group.throughput(Throughput::Elements((m * k * n) as u64));
        group.bench_function("matrixmultiply", |bench| {
            bench.iter(|| theirs(black_box(&a), black_box(&b), &mut out, shape))
        });
        let t_mm = best(20, || theirs(&a, &b, &mut out, shape));
        for isa in Isa::available() {
            for fma in [false, true] {
                let Ok(arith) = Arith::new(isa, fma) else {
                    continue;
                };
                let name = format!("slug_{isa}{}", if fma { "_fma" } else { "" });
                group.bench_function(&name, |bench| {
                    bench.iter(|| ours(arith, black_box(&a), black_box(&b), &mut out, shape))
                });
                let t = best(20, || ours(arith, &a, &b, &mut out, shape));
                let mut check = vec![0.0; m * n];
                ours(Arith::scalar(fma), &a, &b, &mut check, shape);
                ours(arith, &a, &b, &mut out, shape);
                let exact = out
                    .iter()
                    .zip(&check)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                summary.push(format!(
                    "{kind} {m:>4}x{k:>4}x{n:>4} {name:<16} {:>7.2} GFLOP/s  matrixmultiply {:>7.2} GFLOP/s  ratio {:.2}x  bit-exact vs scalar: {}",
                    flops / t / 1e9,
                    flops / t_mm / 1e9,
                    t_mm / t,
                    if exact { "yes" } else { "NO" }
                ));
            }
        }
        group.finish();
    }
    eprintln!("\nslug kernels vs matrixmultiply (single thread, best of 20):");
    for line in summary {
        eprintln!("  {line}");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
