//! Row-wise kernels without reductions across rows: embedding lookup, residual add, SwiGLU
//! activation, argmax.

use std::ops::Range;

use super::{check_len, check_range, mul, reduce};
use crate::error::Error;
use crate::simd::{Arith, Scalar, Simd, simd_kernel};

/// Copies the embedding rows of `tokens[rows]` from `table` (`[vocab x dim]`) into `out_rows`
/// (`[rows.len() x dim]`). Refuses a token id that is not below `vocab`.
pub fn embed(
    tokens: &[u32],
    table: &[f32],
    out_rows: &mut [f32],
    vocab: usize,
    dim: usize,
    rows: Range<usize>,
) -> Result<(), Error> {
    const NAME: &str = "embed";
    check_len(NAME, "table", table.len(), mul(NAME, vocab, dim)?)?;
    check_range(NAME, &rows, tokens.len())?;
    check_len(
        NAME,
        "out_rows",
        out_rows.len(),
        mul(NAME, rows.len(), dim)?,
    )?;
    for (&token, out) in tokens[rows]
        .iter()
        .zip(out_rows.chunks_exact_mut(dim.max(1)))
    {
        let t = token as usize;
        if t >= vocab {
            return Err(Error::TokenOutOfRange { token, vocab });
        }
        out.copy_from_slice(&table[t * dim..(t + 1) * dim]);
    }
    Ok(())
}

/// Residual add: rows `rows` of `x += y`, where `x_rows` holds those rows of `x` and `y` is the
/// whole `[n_rows x width]` matrix.
pub fn add_assign(
    arith: Arith,
    x_rows: &mut [f32],
    y: &[f32],
    n_rows: usize,
    width: usize,
    rows: Range<usize>,
) -> Result<(), Error> {
    const NAME: &str = "add_assign";
    check_len(NAME, "y", y.len(), mul(NAME, n_rows, width)?)?;
    check_range(NAME, &rows, n_rows)?;
    check_len(NAME, "x_rows", x_rows.len(), mul(NAME, rows.len(), width)?)?;
    // SAFETY: both views hold `x_rows.len()` elements from these starts.
    unsafe {
        add_raw(
            arith,
            x_rows.as_mut_ptr(),
            y.as_ptr().add(rows.start * width),
            x_rows.len(),
        )
    };
    Ok(())
}

simd_kernel! {
    /// `x[..n] += y[..n]`.
    unsafe fn add_raw<S, F>(x: *mut f32, y: *const f32, n: usize) {
        // SAFETY: forwarded from the caller.
        unsafe {
            let full = n / S::LANES * S::LANES;
            let mut i = 0;
            while i < full {
                S::store(x.add(i), S::add(S::load(x.add(i)), S::load(y.add(i))));
                i += S::LANES;
            }
            for i in full..n {
                *x.add(i) += *y.add(i);
            }
        }
    }
}

/// SwiGLU activation in place: rows `rows` of `gate = silu(gate) * up`, with
/// `silu(g) = g / (1 + exp(-g))`. `gate_rows` holds those rows; `up` is the whole
/// `[n_rows x ffn]` matrix.
pub fn swiglu(
    arith: Arith,
    gate_rows: &mut [f32],
    up: &[f32],
    n_rows: usize,
    ffn: usize,
    rows: Range<usize>,
) -> Result<(), Error> {
    const NAME: &str = "swiglu";
    check_len(NAME, "up", up.len(), mul(NAME, n_rows, ffn)?)?;
    check_range(NAME, &rows, n_rows)?;
    check_len(
        NAME,
        "gate_rows",
        gate_rows.len(),
        mul(NAME, rows.len(), ffn)?,
    )?;
    // SAFETY: both views hold `gate_rows.len()` elements from these starts.
    unsafe {
        swiglu_raw(
            arith,
            gate_rows.as_mut_ptr(),
            up.as_ptr().add(rows.start * ffn),
            gate_rows.len(),
        )
    };
    Ok(())
}

/// `silu(g) * u` for one vector.
#[inline(always)]
unsafe fn silu_mul<S: Simd>(g: S::V, u: S::V) -> S::V {
    // SAFETY: lane-wise arithmetic only.
    unsafe {
        let e = reduce::exp::<S>(S::sub(S::splat(0.0), g));
        S::mul(S::div(g, S::add(S::splat(1.0), e)), u)
    }
}

simd_kernel! {
    /// `g[..n] = silu(g) * u`.
    unsafe fn swiglu_raw<S, F>(g: *mut f32, u: *const f32, n: usize) {
        // SAFETY: forwarded from the caller.
        unsafe {
            let full = n / S::LANES * S::LANES;
            let mut i = 0;
            while i < full {
                S::store(g.add(i), silu_mul::<S>(S::load(g.add(i)), S::load(u.add(i))));
                i += S::LANES;
            }
            for i in full..n {
                *g.add(i) = silu_mul::<Scalar>(*g.add(i), *u.add(i));
            }
        }
    }
}

/// Greedy decoding: for rows `rows` of `logits` (`[n_rows x n]`), the index of the first
/// largest element, written to `out` (`[rows.len()]`). `n` must be at least 1.
pub fn argmax(
    logits: &[f32],
    out: &mut [u32],
    n_rows: usize,
    n: usize,
    rows: Range<usize>,
) -> Result<(), Error> {
    const NAME: &str = "argmax";
    check_len(NAME, "logits", logits.len(), mul(NAME, n_rows, n)?)?;
    check_range(NAME, &rows, n_rows)?;
    check_len(NAME, "out", out.len(), rows.len())?;
    if n == 0 || n > u32::MAX as usize {
        return Err(Error::Shape {
            kernel: NAME,
            what: "n (between 1 and u32::MAX)",
            expected: 1,
            got: n,
        });
    }
    for (r, o) in rows.zip(out.iter_mut()) {
        let row = &logits[r * n..(r + 1) * n];
        let mut best = 0;
        for (j, &v) in row.iter().enumerate().skip(1) {
            if v > row[best] {
                best = j;
            }
        }
        *o = best as u32;
    }
    Ok(())
}
