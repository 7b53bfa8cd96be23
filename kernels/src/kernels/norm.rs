//! RMSNorm: `out = x / sqrt(mean(x^2) + eps) * w`, one row per token.

use std::ops::Range;

use super::{check_len, check_range, mul, reduce};
use crate::error::Error;
use crate::simd::{Arith, simd_kernel};

/// Writes rows `rows` of `rmsnorm(x) * w` into `out_rows`.
///
/// `x` is `[n_rows x dim]`, `w` is `[dim]`, `out_rows` is `[rows.len() x dim]`. The sum of
/// squares uses the canonical 16-lane order; the scale is `1 / sqrt(ss / dim + eps)` and each
/// element is `(x * scale) * w`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm(
    arith: Arith,
    x: &[f32],
    w: &[f32],
    out_rows: &mut [f32],
    n_rows: usize,
    dim: usize,
    eps: f32,
    rows: Range<usize>,
) -> Result<(), Error> {
    const NAME: &str = "rmsnorm";
    check_len(NAME, "x", x.len(), mul(NAME, n_rows, dim)?)?;
    check_len(NAME, "w", w.len(), dim)?;
    check_range(NAME, &rows, n_rows)?;
    check_len(
        NAME,
        "out_rows",
        out_rows.len(),
        mul(NAME, rows.len(), dim)?,
    )?;
    for (r, out) in rows.zip(out_rows.chunks_exact_mut(dim.max(1))) {
        // SAFETY: row `r` of `x`, `w` and `out` each hold `dim` elements.
        unsafe {
            rmsnorm_row(
                arith,
                x.as_ptr().add(r * dim),
                w.as_ptr(),
                out.as_mut_ptr(),
                dim,
                eps,
            )
        };
    }
    Ok(())
}

simd_kernel! {
    /// One row of RMSNorm.
    unsafe fn rmsnorm_row<S, F>(x: *const f32, w: *const f32, out: *mut f32, dim: usize, eps: f32) {
        // SAFETY: forwarded from the caller.
        unsafe {
            let ss = reduce::dot::<S, F>(x, x, dim);
            let scale = 1.0 / (ss / dim as f32 + eps).sqrt();
            let sv = S::splat(scale);
            let full = dim / S::LANES * S::LANES;
            let mut j = 0;
            while j < full {
                S::store(out.add(j), S::mul(S::mul(S::load(x.add(j)), sv), S::load(w.add(j))));
                j += S::LANES;
            }
            for j in full..dim {
                *out.add(j) = (*x.add(j) * scale) * *w.add(j);
            }
        }
    }
}
