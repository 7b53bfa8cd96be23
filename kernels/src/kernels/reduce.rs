//! The canonical reduction order and the exponential every back end shares.
//!
//! A horizontal sum is defined as 16 logical lanes — lane `l` accumulates elements
//! `l, l + 16, l + 32, ...` in ascending order, starting from `+0.0` — followed by a fixed
//! pairwise tree (`lane[i] += lane[i + 8]`, then `+ 4`, `+ 2`, `+ 1`). A 16-lane back end keeps
//! the 16 lanes in one vector, an 8-lane back end in two, NEON in four, scalar in sixteen
//! variables: the same additions in the same order, so the same bits.

use crate::simd::{Scalar, Simd, madd};

/// Logical lanes of the canonical reduction.
pub(crate) const LANES: usize = 16;

/// Fixed pairwise tree over the 16 logical lanes.
#[inline(always)]
fn tree16(mut lanes: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    lanes[0]
}

/// Canonical dot product of `x[..len]` and `y[..len]`.
///
/// # Safety
/// `x` and `y` must be valid for `len` reads; `S` must be runnable on this CPU.
#[inline(always)]
pub(crate) unsafe fn dot<S: Simd, const F: bool>(x: *const f32, y: *const f32, len: usize) -> f32 {
    let per = LANES / S::LANES;
    let full = len / LANES * LANES;
    // SAFETY: every index read is below `len`.
    unsafe {
        let mut acc = [S::splat(0.0); LANES];
        let mut i = 0;
        while i < full {
            for (v, a) in acc.iter_mut().enumerate().take(per) {
                let o = i + v * S::LANES;
                *a = madd::<S, F>(S::load(x.add(o)), S::load(y.add(o)), *a);
            }
            i += LANES;
        }
        let mut lanes = [0.0f32; LANES];
        for (v, a) in acc.iter().enumerate().take(per) {
            S::store(lanes.as_mut_ptr().add(v * S::LANES), *a);
        }
        for t in full..len {
            let l = &mut lanes[t - full];
            *l = madd::<Scalar, F>(*x.add(t), *y.add(t), *l);
        }
        tree16(lanes)
    }
}

/// Canonical sum of `x[..len]`.
///
/// # Safety
/// `x` must be valid for `len` reads; `S` must be runnable on this CPU.
#[inline(always)]
pub(crate) unsafe fn sum<S: Simd>(x: *const f32, len: usize) -> f32 {
    let per = LANES / S::LANES;
    let full = len / LANES * LANES;
    // SAFETY: every index read is below `len`.
    unsafe {
        let mut acc = [S::splat(0.0); LANES];
        let mut i = 0;
        while i < full {
            for (v, a) in acc.iter_mut().enumerate().take(per) {
                *a = S::add(*a, S::load(x.add(i + v * S::LANES)));
            }
            i += LANES;
        }
        let mut lanes = [0.0f32; LANES];
        for (v, a) in acc.iter().enumerate().take(per) {
            S::store(lanes.as_mut_ptr().add(v * S::LANES), *a);
        }
        for t in full..len {
            lanes[t - full] += *x.add(t);
        }
        tree16(lanes)
    }
}

/// Maximum of `x[..len]` (`len >= 1`), by the `maxps` rule; the order does not matter for
/// finite values, so vector and scalar agree.
///
/// # Safety
/// `x` must be valid for `len >= 1` reads; `S` must be runnable on this CPU.
#[inline(always)]
pub(crate) unsafe fn max<S: Simd>(x: *const f32, len: usize) -> f32 {
    // SAFETY: every index read is below `len`.
    unsafe {
        let mut m = *x;
        let full = len / S::LANES * S::LANES;
        if full > 0 {
            let mut acc = S::load(x);
            let mut i = S::LANES;
            while i < full {
                acc = S::max(acc, S::load(x.add(i)));
                i += S::LANES;
            }
            let mut lanes = [0.0f32; LANES];
            S::store(lanes.as_mut_ptr(), acc);
            for &l in &lanes[..S::LANES] {
                m = Scalar::max(m, l);
            }
        }
        for t in full..len {
            m = Scalar::max(m, *x.add(t));
        }
        m
    }
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 1.5 * 2^23: adding and subtracting it rounds to the nearest integer (ties to even) with
/// plain additions, the same on every back end.
const ROUND_MAGIC: f32 = 12_582_912.0;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `e^x` per lane from additions and multiplications only (never fused), so that every back
/// end and the `fma` flag give the same bits. Inputs are clamped to `[-87, 88]`; relative error
/// is about 2 ulp over that range.
///
/// # Safety
/// `S` must be runnable on this CPU.
#[inline(always)]
pub(crate) unsafe fn exp<S: Simd>(x: S::V) -> S::V {
    // SAFETY: lane-wise arithmetic only.
    unsafe {
        let x = S::min(S::max(x, S::splat(-87.0)), S::splat(88.0));
        let t = S::mul(x, S::splat(LOG2E));
        let n = S::sub(S::add(t, S::splat(ROUND_MAGIC)), S::splat(ROUND_MAGIC));
        let r = S::sub(x, S::mul(n, S::splat(LN2_HI)));
        let r = S::sub(r, S::mul(n, S::splat(LN2_LO)));
        let mut p = S::splat(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = S::add(S::mul(p, r), S::splat(c));
        }
        let r2 = S::mul(r, r);
        let y = S::add(S::add(S::mul(p, r2), r), S::splat(1.0));
        S::mul(y, S::pow2i(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp_scalar(x: f32) -> f32 {
        // SAFETY: the scalar back end runs everywhere.
        unsafe { exp::<Scalar>(x) }
    }

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        for i in 0..=2000 {
            let x = -87.0 + i as f32 * (87.0 + 10.0) / 2000.0;
            let got = exp_scalar(x) as f64;
            let want = (x as f64).exp();
            let rel = ((got - want) / want).abs();
            assert!(rel < 1e-6, "exp({x}) = {got}, want {want} (rel err {rel})");
        }
        assert_eq!(exp_scalar(0.0), 1.0);
    }

    #[test]
    fn tree_adds_pairs_in_the_documented_order() {
        let mut lanes = [0.0f32; LANES];
        lanes[0] = 1e8;
        lanes[8] = -1e8;
        lanes[1] = 1.0;
        // (1e8 + -1e8) first, then + 1.0: exactly 1.0. A left-to-right sum would lose nothing
        // here either, so also check a case where order matters.
        assert_eq!(tree16(lanes), 1.0);
        let mut lanes = [0.0f32; LANES];
        lanes[0] = 1e8;
        lanes[1] = 1.0;
        lanes[9] = 1.0;
        lanes[8] = -1e8;
        // Tree: l0 = 1e8 + -1e8 = 0, l1 = 1 + 1 = 2, then 0 + 2 = 2.
        assert_eq!(tree16(lanes), 2.0);
    }
}
