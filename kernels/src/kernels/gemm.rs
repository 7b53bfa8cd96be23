//! Matrix products: `gemm` (many rows, split by output rows) and `gemv` (one row, split by output columns).
//!
//! Both compute `C[i, j] = sum over k ascending of A[i, k] * B[k, j]`, starting from `+0.0`,
//! one multiply and one add per term (or one fused multiply-add with the model's `fma` flag).
//! Vectors run across output columns, so each output element is reduced sequentially in index
//! order on every back end; cache blocking over `k` accumulates straight into `C`, which keeps
//! that order. A row of `gemm` therefore equals `gemv` of that row, bit for bit.

// Tiles index several arrays with the same counters; iterator chains would hide the layout.
#![allow(clippy::needless_range_loop)]

use std::ops::Range;

use super::{check_len, check_range, mul};
use crate::error::Error;
use crate::simd::{Arith, Scalar, Simd, madd, simd_kernel};

/// Depth of one cache block: an `MR x KC` slab of `A` stays in L1.
const KC: usize = 256;
/// Width of one column block: a `KC x NC` panel of `B` stays in L2.
const NC: usize = 256;
/// Widest register tile that is packed (the stack buffer holds `KC x PACK_MAX_NR` floats).
const PACK_MAX_NR: usize = 32;

/// Scratch `gemm` needs: none (it accumulates in registers and in `C`).
pub fn gemm_work_size(_m: usize, _k: usize, _n: usize) -> usize {
    0
}

/// Writes rows `rows` of `C = A · B` into `c_rows`.
///
/// `a` is `[m x k]`, `b` is `[k x n]`, both row-major; `c_rows` is `[rows.len() x n]`.
/// Any split of `0..m` into row ranges gives the same bits as one call over all rows.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    arith: Arith,
    a: &[f32],
    b: &[f32],
    c_rows: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    rows: Range<usize>,
) -> Result<(), Error> {
    const NAME: &str = "gemm";
    check_len(NAME, "a", a.len(), mul(NAME, m, k)?)?;
    check_len(NAME, "b", b.len(), mul(NAME, k, n)?)?;
    check_range(NAME, &rows, m)?;
    check_len(NAME, "c_rows", c_rows.len(), mul(NAME, rows.len(), n)?)?;
    // SAFETY: the lengths above bound every access made by the body.
    unsafe {
        gemm_raw(
            arith,
            a.as_ptr().add(rows.start * k),
            k,
            b.as_ptr(),
            n,
            c_rows.as_mut_ptr(),
            n,
            rows.len(),
            k,
            n,
        );
    }
    Ok(())
}

/// Scratch `gemv` needs: none.
pub fn gemv_work_size(_k: usize, _n: usize) -> usize {
    0
}

/// Writes columns `cols` of `y = x · B` into `y_cols`.
///
/// `x` is `[k]`, `b` is `[k x n]` row-major, `y_cols` is `[cols.len()]`. Any split of `0..n`
/// into column ranges gives the same bits as one call over all columns, and the same bits as
/// the matching row of [`gemm`].
pub fn gemv(
    arith: Arith,
    x: &[f32],
    b: &[f32],
    y_cols: &mut [f32],
    k: usize,
    n: usize,
    cols: Range<usize>,
) -> Result<(), Error> {
    const NAME: &str = "gemv";
    check_len(NAME, "x", x.len(), k)?;
    check_len(NAME, "b", b.len(), mul(NAME, k, n)?)?;
    check_range(NAME, &cols, n)?;
    check_len(NAME, "y_cols", y_cols.len(), cols.len())?;
    // SAFETY: the lengths above bound every access made by the body.
    unsafe {
        gemv_raw(
            arith,
            x.as_ptr(),
            b.as_ptr().add(cols.start),
            n,
            y_cols.as_mut_ptr(),
            k,
            cols.len(),
        );
    }
    Ok(())
}

simd_kernel! {
    /// `C[m x n] = A[m x k] · B[k x n]` over strided views.
    unsafe fn gemm_raw<S, F>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        m: usize,
        k: usize,
        n: usize,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match S::LANES {
                16 => blocked::<S, F, 8, 2>(a, lda, b, ldb, c, ldc, m, k, n),
                8 if F => blocked::<S, F, 6, 2>(a, lda, b, ldb, c, ldc, m, k, n),
                8 => blocked::<S, F, 4, 2>(a, lda, b, ldb, c, ldc, m, k, n),
                _ => blocked::<S, F, 4, 4>(a, lda, b, ldb, c, ldc, m, k, n),
            }
        }
    }
}

simd_kernel! {
    /// `y[n] = x[k] · B[k x n]` over a strided view of `B`.
    unsafe fn gemv_raw<S, F>(x: *const f32, b: *const f32, ldb: usize, y: *mut f32, k: usize, n: usize) {
        // SAFETY: forwarded from the caller.
        unsafe { blocked::<S, F, 1, 8>(x, k, b, ldb, y, n, 1, k, n) }
    }
}

/// Cache-blocked driver: `k` in blocks of `KC` (accumulating into `C` after the first); for
/// more than one row tile, each `KC x NR` panel of `B` is first copied into a contiguous stack
/// buffer (so the register tiles stream it from L1 instead of striding across pages), then
/// every row tile runs over it. Packing moves values, never reorders arithmetic.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn blocked<S: Simd, const F: bool, const MR: usize, const NV: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    m: usize,
    k: usize,
    n: usize,
) {
    // SAFETY: all offsets stay inside the `m x k`, `k x n` and `m x n` views.
    unsafe {
        if k == 0 {
            for i in 0..m {
                for j in 0..n {
                    *c.add(i * ldc + j) = 0.0;
                }
            }
            return;
        }
        let nr = NV * S::LANES;
        let pack = m >= 4 && nr <= PACK_MAX_NR;
        let mut packed = [0.0f32; KC * PACK_MAX_NR];
        let mut k0 = 0;
        while k0 < k {
            let kc = KC.min(k - k0);
            let accumulate = k0 > 0;
            let mut j0 = 0;
            while j0 < n {
                let jn = NC.min(n - j0);
                let bp = b.add(k0 * ldb + j0);
                let full = if pack { jn / nr * nr } else { 0 };
                let mut j = 0;
                while j < full {
                    for p in 0..kc {
                        std::ptr::copy_nonoverlapping(
                            bp.add(p * ldb + j),
                            packed.as_mut_ptr().add(p * nr),
                            nr,
                        );
                    }
                    let (ap, cp) = (a.add(k0), c.add(j0 + j));
                    all_rows::<S, F, MR, NV, true>(
                        ap,
                        lda,
                        packed.as_ptr(),
                        nr,
                        cp,
                        ldc,
                        m,
                        kc,
                        nr,
                        accumulate,
                    );
                    j += nr;
                }
                let (ap, cp) = (a.add(k0), c.add(j0 + full));
                let (bp, rest) = (bp.add(full), jn - full);
                if rest > 0 {
                    all_rows::<S, F, MR, NV, false>(
                        ap, lda, bp, ldb, cp, ldc, m, kc, rest, accumulate,
                    );
                }
                j0 += jn;
            }
            k0 += kc;
        }
    }
}

/// Every row of one column panel: `MR`-row tiles, then 4-, 2- and 1-row tiles for the rest
/// (so a 12-token prefill does not fall back to one row at a time). `PACKED`: `b` is a packed
/// `kc x ncols` panel that one register tile covers; otherwise `b` is strided and `ncols` wide.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn all_rows<S: Simd, const F: bool, const MR: usize, const NV: usize, const PACKED: bool>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    m: usize,
    kc: usize,
    ncols: usize,
    accumulate: bool,
) {
    // SAFETY: every tile stays inside the `m`-row views the caller checked.
    unsafe {
        let mut i = 0;
        while i + MR <= m {
            rows_tile::<S, F, MR, NV, PACKED>(a, lda, b, ldb, c, ldc, i, kc, ncols, accumulate);
            i += MR;
        }
        if MR > 4 {
            while i + 4 <= m {
                rows_tile::<S, F, 4, NV, PACKED>(a, lda, b, ldb, c, ldc, i, kc, ncols, accumulate);
                i += 4;
            }
        }
        if MR > 2 {
            while i + 2 <= m {
                rows_tile::<S, F, 2, NV, PACKED>(a, lda, b, ldb, c, ldc, i, kc, ncols, accumulate);
                i += 2;
            }
        }
        while i < m {
            rows_tile::<S, F, 1, NV, PACKED>(a, lda, b, ldb, c, ldc, i, kc, ncols, accumulate);
            i += 1;
        }
    }
}

/// `R` rows starting at row `i` of one column panel.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_tile<S: Simd, const F: bool, const R: usize, const NV: usize, const PACKED: bool>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    i: usize,
    kc: usize,
    ncols: usize,
    accumulate: bool,
) {
    // SAFETY: rows `i..i + R` are inside the caller's view.
    unsafe {
        let (ap, cp) = (a.add(i * lda), c.add(i * ldc));
        if PACKED {
            tile::<S, F, R, NV>(ap, lda, b, ldb, cp, ldc, kc, accumulate);
        } else {
            columns::<S, F, R, NV>(ap, lda, b, ldb, cp, ldc, kc, ncols, accumulate);
        }
    }
}

/// One row tile across `ncols` columns: full vector tiles, then single vectors, then scalars.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn columns<S: Simd, const F: bool, const MR: usize, const NV: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    kc: usize,
    ncols: usize,
    accumulate: bool,
) {
    let nr = NV * S::LANES;
    let mut j = 0;
    // SAFETY: `j` plus each tile's width stays below `ncols`.
    unsafe {
        while j + nr <= ncols {
            tile::<S, F, MR, NV>(a, lda, b.add(j), ldb, c.add(j), ldc, kc, accumulate);
            j += nr;
        }
        while j + S::LANES <= ncols {
            tile::<S, F, MR, 1>(a, lda, b.add(j), ldb, c.add(j), ldc, kc, accumulate);
            j += S::LANES;
        }
        while j < ncols {
            tile::<Scalar, F, MR, 1>(a, lda, b.add(j), ldb, c.add(j), ldc, kc, accumulate);
            j += 1;
        }
    }
}

/// Register tile: `MR` rows by `NV` vectors of columns, `kc` steps of `k` in ascending order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<S: Simd, const F: bool, const MR: usize, const NV: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    kc: usize,
    accumulate: bool,
) {
    // SAFETY: the tile lies inside the views the caller checked.
    unsafe {
        let mut t = [[S::splat(0.0); NV]; MR];
        if accumulate {
            for i in 0..MR {
                for v in 0..NV {
                    t[i][v] = S::load(c.add(i * ldc + v * S::LANES));
                }
            }
        }
        for p in 0..kc {
            let bp = b.add(p * ldb);
            let mut bv = [S::splat(0.0); NV];
            for v in 0..NV {
                bv[v] = S::load(bp.add(v * S::LANES));
            }
            for i in 0..MR {
                let av = S::splat(*a.add(i * lda + p));
                for v in 0..NV {
                    t[i][v] = madd::<S, F>(av, bv[v], t[i][v]);
                }
            }
        }
        for i in 0..MR {
            for v in 0..NV {
                S::store(c.add(i * ldc + v * S::LANES), t[i][v]);
            }
        }
    }
}
