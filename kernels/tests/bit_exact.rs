//! Every kernel gives the same bits on every available instruction set as on the scalar path,
//! for every row split, on awkward sizes (1, 7, 63, 64, 65, 1000), with and without FMA.

use std::ops::Range;

use slug_kernels::kernels::{self, AttentionShape};
use slug_kernels::{Arith, Isa, ThreadPool};

const SIZES: [usize; 6] = [1, 7, 63, 64, 65, 1000];

/// Largest `m * k * n` tried: every shape pair with 1000 in release (`cargo test --release`),
/// the cheaper ones in debug so the suite stays fast.
const GEMM_LIMIT: usize = if cfg!(debug_assertions) {
    300_000
} else {
    1_000_000
};

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The vector paths this CPU has, with the reason for each one it lacks printed once.
fn vector_paths() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|&isa| isa != Isa::Scalar)
        .filter(|&isa| match isa.unavailable_reason() {
            None => true,
            Some(why) => {
                eprintln!("skipping {isa}: {why}");
                false
            }
        })
        .collect()
}

/// Row splits to try for `n` rows: every two-way split for small `n`, plus 2..=4 even parts.
fn splits(n: usize) -> Vec<Vec<Range<usize>>> {
    let mut out = vec![vec![0..n]];
    let cuts: Vec<usize> = if n <= 8 {
        (1..n).collect()
    } else {
        vec![1, n / 2, n - 1]
    };
    for c in cuts {
        out.push(vec![0..c, c..n]);
    }
    for parts in 2..=4.min(n) {
        out.push(
            (0..parts)
                .map(|p| ThreadPool::partition(n, parts, p))
                .collect(),
        );
    }
    out
}

/// Runs `kernel(arith, rows, out_rows)` over each split and checks the result against the
/// scalar path over all rows.
fn check<F>(name: &str, n_rows: usize, row_len: usize, init: &[f32], kernel: F)
where
    F: Fn(Arith, Range<usize>, &mut [f32]),
{
    for fma in [false, true] {
        let mut want = init.to_vec();
        kernel(Arith::scalar(fma), 0..n_rows, &mut want[..n_rows * row_len]);
        let mut paths: Vec<Arith> = vector_paths()
            .into_iter()
            .filter_map(|isa| Arith::new(isa, fma).ok())
            .collect();
        paths.push(Arith::scalar(fma));
        for arith in paths {
            for split in splits(n_rows) {
                let mut got = init.to_vec();
                for rows in split.iter().cloned() {
                    let chunk = &mut got[rows.start * row_len..rows.end * row_len];
                    kernel(arith, rows, chunk);
                }
                assert!(
                    bits(&got) == bits(&want),
                    "{name}: {:?} fma={fma} split {split:?} differs from scalar",
                    arith.isa()
                );
            }
        }
    }
}

#[test]
fn gemm_matches_scalar_for_every_shape_isa_and_split() {
    for &m in &SIZES {
        for &k in &SIZES {
            for &n in &SIZES {
                if m * k * n > GEMM_LIMIT {
                    continue;
                }
                let a = values(m * k, 1);
                let b = values(k * n, 2);
                let c0 = values(m * n, 3);
                check(&format!("gemm {m}x{k}x{n}"), m, n, &c0, |arith, rows, c| {
                    kernels::gemm(arith, &a, &b, c, m, k, n, rows).unwrap()
                });
            }
        }
    }
}

#[test]
fn gemv_matches_scalar_and_equals_each_gemm_row() {
    for &k in &SIZES {
        for &n in &SIZES {
            let x = values(k, 4);
            let b = values(k * n, 5);
            let y0 = vec![0.0; n];
            check(&format!("gemv {k}x{n}"), n, 1, &y0, |arith, cols, y| {
                kernels::gemv(arith, &x, &b, y, k, n, cols).unwrap()
            });
            let arith = Arith::best(false).unwrap();
            let mut y = vec![0.0; n];
            kernels::gemv(arith, &x, &b, &mut y, k, n, 0..n).unwrap();
            let mut c = vec![0.0; n];
            kernels::gemm(Arith::scalar(false), &x, &b, &mut c, 1, k, n, 0..1).unwrap();
            assert_eq!(bits(&y), bits(&c), "gemv {k}x{n} vs gemm row");
        }
    }
}

#[test]
fn gemm_is_close_to_a_f64_reference() {
    let (m, k, n) = (7, 300, 65);
    let a = values(m * k, 6);
    let b = values(k * n, 7);
    let mut c = vec![0.0; m * n];
    kernels::gemm(Arith::best(false).unwrap(), &a, &b, &mut c, m, k, n, 0..m).unwrap();
    for i in 0..m {
        for j in 0..n {
            let want: f64 = (0..k)
                .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                .sum();
            assert!((c[i * n + j] as f64 - want).abs() < 1e-3, "{i},{j}");
        }
    }
}

#[test]
fn rmsnorm_softmax_swiglu_add_match_scalar() {
    for &d in &SIZES {
        let rows = 5;
        let x = values(rows * d, 8);
        let w = values(d, 9);
        let zero = vec![0.0; rows * d];
        check(&format!("rmsnorm {d}"), rows, d, &zero, |arith, r, o| {
            kernels::rmsnorm(arith, &x, &w, o, rows, d, 1e-5, r).unwrap()
        });
        let mut scaled = x.clone();
        scaled.iter_mut().for_each(|v| *v *= 30.0);
        check(&format!("softmax {d}"), rows, d, &scaled, |arith, r, o| {
            kernels::softmax(arith, o, rows, d, r).unwrap()
        });
        let up = values(rows * d, 10);
        check(&format!("swiglu {d}"), rows, d, &scaled, |arith, r, o| {
            kernels::swiglu(arith, o, &up, rows, d, r).unwrap()
        });
        check(&format!("add {d}"), rows, d, &x, |arith, r, o| {
            kernels::add_assign(arith, o, &up, rows, d, r).unwrap()
        });
    }
    // Softmax rows sum to one and match exp/sum in f64.
    let mut s = values(1000, 11);
    kernels::softmax(Arith::best(false).unwrap(), &mut s, 1, 1000, 0..1).unwrap();
    let total: f32 = s.iter().sum();
    assert!((total - 1.0).abs() < 1e-4);
}

#[test]
fn attention_matches_scalar_for_prefill_and_decode() {
    let cases = [
        // (heads, kv_heads, head_dim, n_tokens, pos0)
        (4, 2, 64, 7, 0),
        (3, 3, 7, 1, 62),
        (2, 1, 65, 2, 62),
        (4, 4, 63, 1, 999),
        (1, 1, 1, 63, 1),
        (2, 2, 1000, 1, 64),
    ];
    for (heads, kv_heads, hd, n, pos0) in cases {
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim: hd,
        };
        let ctx = pos0 + n;
        let q = values(n * heads * hd, 12);
        let k = values(ctx * kv_heads * hd, 13);
        let v = values(ctx * kv_heads * hd, 14);
        let rows = n * heads;
        let zero = vec![0.0; rows * hd];
        check(
            &format!("attention h{heads}/{kv_heads} d{hd} n{n} pos{pos0}"),
            rows,
            hd,
            &zero,
            |arith, r, o| {
                let mut work = vec![0.0; kernels::attention_work_size(ctx)];
                kernels::attention(arith, &q, &k, &v, o, shape, n, pos0, r, &mut work).unwrap()
            },
        );
    }
}

#[test]
fn rope_embed_argmax_are_split_invariant() {
    let (rows, heads, hd, pos0) = (65, 2, 8, 3);
    let half = hd / 2;
    let angles = values((pos0 + rows) * half, 15);
    let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    let x = values(rows * heads * hd, 16);
    check("rope", rows, heads * hd, &x, |_, r, o| {
        kernels::rope(o, rows, heads, hd, &cos, &sin, pos0, r).unwrap()
    });
    let tokens: Vec<u32> = (0..rows as u32).map(|t| (t * 37) % 300).collect();
    let table = values(300 * 7, 17);
    let zero = vec![0.0; rows * 7];
    check("embed", rows, 7, &zero, |_, r, o| {
        kernels::embed(&tokens, &table, o, 300, 7, r).unwrap()
    });
    assert!(kernels::embed(&[300], &table, &mut [0.0; 7], 300, 7, 0..1).is_err());
    for &n in &SIZES {
        let logits = values(3 * n, 18);
        let mut all = vec![0u32; 3];
        kernels::argmax(&logits, &mut all, 3, n, 0..3).unwrap();
        for r in 0..3 {
            let mut one = [0u32];
            kernels::argmax(&logits, &mut one, 3, n, r..r + 1).unwrap();
            assert_eq!(one[0], all[r]);
            let row = &logits[r * n..(r + 1) * n];
            assert!(row.iter().all(|&v| v <= row[all[r] as usize]));
        }
    }
}

#[test]
fn kernels_refuse_wrong_shapes() {
    let arith = Arith::scalar(false);
    let a = vec![0.0; 6];
    let mut c = vec![0.0; 4];
    assert!(kernels::gemm(arith, &a, &a, &mut c, 2, 3, 2, 0..2).is_ok());
    assert!(kernels::gemm(arith, &a, &a, &mut c, 2, 3, 2, 0..3).is_err());
    assert!(kernels::gemm(arith, &a, &a, &mut c[..3], 2, 3, 2, 0..2).is_err());
    assert!(kernels::gemm(arith, &a[..5], &a, &mut c, 2, 3, 2, 0..2).is_err());
    assert!(kernels::gemv(arith, &a[..3], &a, &mut c[..2], 3, 2, 1..3).is_err());
    let shape = AttentionShape {
        heads: 3,
        kv_heads: 2,
        head_dim: 2,
    };
    let err = kernels::attention(arith, &a, &a, &a, &mut c, shape, 1, 0, 0..1, &mut [0.0; 4]);
    assert!(err.is_err());
}
