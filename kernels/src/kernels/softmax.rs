//! Softmax along rows, in place: `exp(x - max) / sum`, with the shared exponential and the
//! canonical sum order.

use std::ops::Range;

use super::{check_len, check_range, mul, reduce};
use crate::error::Error;
use crate::simd::{Arith, Scalar, Simd, simd_kernel};

/// Replaces rows `rows` of a `[n_rows x n]` matrix (`x_rows` holds just those rows) by their
/// softmax.
pub fn softmax(
    arith: Arith,
    x_rows: &mut [f32],
    n_rows: usize,
    n: usize,
    rows: Range<usize>,
) -> Result<(), Error> {
    const NAME: &str = "softmax";
    check_range(NAME, &rows, n_rows)?;
    check_len(NAME, "x_rows", x_rows.len(), mul(NAME, rows.len(), n)?)?;
    if n == 0 {
        return Ok(());
    }
    for row in x_rows.chunks_exact_mut(n) {
        // SAFETY: `row` holds `n` elements.
        unsafe { softmax_row(arith, row.as_mut_ptr(), n) };
    }
    Ok(())
}

simd_kernel! {
    /// One row of softmax (`n >= 1`).
    pub(crate) unsafe fn softmax_row<S, F>(x: *mut f32, n: usize) {
        // SAFETY: forwarded from the caller.
        unsafe { softmax_in_place::<S>(x, n) }
    }
}

/// The softmax body, shared with attention.
///
/// # Safety
/// `x` must be valid for `n >= 1` reads and writes; `S` must run on this CPU.
#[inline(always)]
pub(crate) unsafe fn softmax_in_place<S: Simd>(x: *mut f32, n: usize) {
    // SAFETY: every index is below `n`.
    unsafe {
        let m = reduce::max::<S>(x, n);
        let mv = S::splat(m);
        let full = n / S::LANES * S::LANES;
        let mut j = 0;
        while j < full {
            S::store(x.add(j), reduce::exp::<S>(S::sub(S::load(x.add(j)), mv)));
            j += S::LANES;
        }
        for j in full..n {
            *x.add(j) = reduce::exp::<Scalar>(*x.add(j) - m);
        }
        let inv = 1.0 / reduce::sum::<S>(x, n);
        let iv = S::splat(inv);
        let mut j = 0;
        while j < full {
            S::store(x.add(j), S::mul(S::load(x.add(j)), iv));
            j += S::LANES;
        }
        for j in full..n {
            *x.add(j) *= inv;
        }
    }
}
