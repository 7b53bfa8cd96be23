//! Instruction-set selection (AVX-512, AVX2, NEON, scalar) and the small vector trait the kernels are written against.
//!
//! Every kernel body is generic over [`Simd`]; each back end only provides lane-wise IEEE
//! operations (add, mul, fused mul-add, max, min, a power of two). Because the kernels decide
//! the order of every operation, and each back end performs exactly that order, the scalar
//! back end and every vector back end produce the same bits.

use crate::error::Error;

/// An instruction set the kernels can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isa {
    /// Plain Rust arithmetic, one lane: the reference every other path must equal.
    Scalar,
    /// x86-64 AVX2 with FMA, 8 lanes.
    Avx2,
    /// x86-64 AVX-512F, 16 lanes.
    Avx512,
    /// aarch64 NEON, 4 lanes.
    Neon,
}

impl Isa {
    /// Every instruction set, best first.
    pub const ALL: [Isa; 4] = [Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Scalar];

    /// Lower-case name, as accepted by `--isa`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// Parses a lower-case name (`scalar`, `avx2`, `avx512`, `neon`).
    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|isa| isa.name() == name)
    }

    /// Whether this CPU can run this instruction set (checked at run time).
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Why this instruction set cannot be used here, or `None` when it can.
    pub fn unavailable_reason(self) -> Option<&'static str> {
        if self.is_available() {
            return None;
        }
        Some(match self {
            Isa::Avx2 | Isa::Avx512 if !cfg!(target_arch = "x86_64") => "not an x86-64 CPU",
            Isa::Avx2 => "this CPU lacks avx2 or fma",
            Isa::Avx512 => "this CPU lacks avx512f",
            Isa::Neon if !cfg!(target_arch = "aarch64") => "not an aarch64 CPU",
            _ => "this CPU lacks the required features",
        })
    }

    /// The instruction sets this CPU has, best first (always ends with `Scalar`).
    pub fn available() -> Vec<Isa> {
        Isa::ALL
            .into_iter()
            .filter(|isa| isa.is_available())
            .collect()
    }

    /// The best instruction set this CPU has.
    pub fn best() -> Isa {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.is_available())
            .unwrap_or(Isa::Scalar)
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The arithmetic a kernel call uses: which instruction set, and whether multiply-add is fused.
///
/// Only constructible for an instruction set the CPU has, which is what makes the kernels'
/// internal `unsafe` dispatch sound. `fma` changes results (one rounding instead of two), so it
/// belongs to the model config and travels with a run; the instruction set never changes results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Arith {
    isa: Isa,
    fma: bool,
    /// `fma` and the CPU has an FMA unit: the scalar path may then use the instruction
    /// instead of the (equally exact, much slower) software `fmaf`.
    hardware_fma: bool,
}

impl Arith {
    /// Arithmetic on `isa`, refused if this CPU lacks it (or lacks FMA when `fma` is asked for).
    pub fn new(isa: Isa, fma: bool) -> Result<Arith, Error> {
        if !isa.is_available() {
            let available = Isa::available()
                .iter()
                .map(|isa| isa.name())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Error::IsaUnavailable {
                isa: isa.name(),
                available,
            });
        }
        if fma && !has_hardware_fma() {
            return Err(Error::FmaUnavailable);
        }
        Ok(Arith {
            isa,
            fma,
            hardware_fma: fma,
        })
    }

    /// The best instruction set of this CPU, with or without fused multiply-add.
    pub fn best(fma: bool) -> Result<Arith, Error> {
        Arith::new(Isa::best(), fma)
    }

    /// The scalar reference path. With `fma` it uses `f32::mul_add`, which is exact on any CPU
    /// (in software where there is no FMA unit), so tests can compare FMA paths everywhere.
    pub fn scalar(fma: bool) -> Arith {
        Arith {
            isa: Isa::Scalar,
            fma,
            hardware_fma: fma && has_hardware_fma(),
        }
    }

    /// The instruction set.
    pub fn isa(self) -> Isa {
        self.isa
    }

    /// Whether multiply-add is fused (one rounding).
    pub fn fma(self) -> bool {
        self.fma
    }

    /// Whether fused multiply-add runs on an FMA unit (false when `fma` is off).
    pub fn hardware_fma(self) -> bool {
        self.hardware_fma
    }
}

/// Whether this CPU has a hardware fused multiply-add unit.
pub fn has_hardware_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("fma")
    }
    #[cfg(target_arch = "aarch64")]
    {
        true
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Lane-wise IEEE-754 single-precision operations of one back end.
///
/// # Safety
/// All functions are `unsafe` because vector back ends may only run on a CPU with their
/// features (guaranteed by [`Arith`]) and because loads and stores take raw pointers that
/// must be valid for `LANES` elements.
pub(crate) trait Simd: Copy {
    /// Number of f32 lanes in one vector.
    const LANES: usize;
    /// One vector.
    type V: Copy;
    /// All lanes `x`.
    unsafe fn splat(x: f32) -> Self::V;
    /// Loads `LANES` elements (unaligned).
    unsafe fn load(p: *const f32) -> Self::V;
    /// Stores `LANES` elements (unaligned).
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a + b`.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `a - b`.
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    /// `a * b`.
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// `a / b`.
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c` with one rounding.
    unsafe fn fused(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `if a > b { a } else { b }` per lane (the x86 `maxps` rule, also for NaN).
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// `if a < b { a } else { b }` per lane (the x86 `minps` rule, also for NaN).
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    /// `2^n` for lanes holding an integral `n` in `-126..=127`.
    unsafe fn pow2i(n: Self::V) -> Self::V;
}

/// `c + a * b`: two roundings, or one when `F` (the model's `fma` flag) is set.
#[inline(always)]
pub(crate) unsafe fn madd<S: Simd, const F: bool>(a: S::V, b: S::V, c: S::V) -> S::V {
    // SAFETY: forwarded from the caller.
    unsafe {
        if F {
            S::fused(a, b, c)
        } else {
            S::add(c, S::mul(a, b))
        }
    }
}

/// The one-lane reference back end.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scalar;

impl Simd for Scalar {
    const LANES: usize = 1;
    type V = f32;
    #[inline(always)]
    unsafe fn splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        // SAFETY: the caller guarantees `p` is valid for one element.
        unsafe { p.read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        // SAFETY: the caller guarantees `p` is valid for one element.
        unsafe { p.write_unaligned(v) }
    }
    #[inline(always)]
    unsafe fn add(a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    unsafe fn sub(a: f32, b: f32) -> f32 {
        a - b
    }
    #[inline(always)]
    unsafe fn mul(a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    unsafe fn div(a: f32, b: f32) -> f32 {
        a / b
    }
    #[inline(always)]
    unsafe fn fused(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
    #[inline(always)]
    unsafe fn max(a: f32, b: f32) -> f32 {
        if a > b { a } else { b }
    }
    #[inline(always)]
    unsafe fn min(a: f32, b: f32) -> f32 {
        if a < b { a } else { b }
    }
    #[inline(always)]
    unsafe fn pow2i(n: f32) -> f32 {
        f32::from_bits(((n as i32 + 127) as u32) << 23)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
    use std::arch::x86_64::*;

    /// AVX2 + FMA, 8 lanes.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2;

    // SAFETY (whole impl): only reached through `Arith`, which proves avx2 and fma are present.
    impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn div(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_div_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn fused(a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn min(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_min_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn pow2i(n: __m256) -> __m256 {
            unsafe {
                let i = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
                _mm256_castsi256_ps(_mm256_slli_epi32::<23>(i))
            }
        }
    }

    /// AVX-512F, 16 lanes.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512;

    // SAFETY (whole impl): only reached through `Arith`, which proves avx512f is present.
    impl Simd for Avx512 {
        const LANES: usize = 16;
        type V = __m512;
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn div(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_div_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn fused(a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn min(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_min_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn pow2i(n: __m512) -> __m512 {
            unsafe {
                let i = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
                _mm512_castsi512_ps(_mm512_slli_epi32::<23>(i))
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) use arm::Neon;

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::Simd;
    use std::arch::aarch64::*;

    /// NEON, 4 lanes.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Neon;

    // SAFETY (whole impl): only reached through `Arith`, which proves neon is present.
    impl Simd for Neon {
        const LANES: usize = 4;
        type V = float32x4_t;
        #[inline(always)]
        unsafe fn splat(x: f32) -> float32x4_t {
            unsafe { vdupq_n_f32(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> float32x4_t {
            unsafe { vld1q_f32(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: float32x4_t) {
            unsafe { vst1q_f32(p, v) }
        }
        #[inline(always)]
        unsafe fn add(a: float32x4_t, b: float32x4_t) -> float32x4_t {
            unsafe { vaddq_f32(a, b) }
        }
        #[inline(always)]
        unsafe fn sub(a: float32x4_t, b: float32x4_t) -> float32x4_t {
            unsafe { vsubq_f32(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: float32x4_t, b: float32x4_t) -> float32x4_t {
            unsafe { vmulq_f32(a, b) }
        }
        #[inline(always)]
        unsafe fn div(a: float32x4_t, b: float32x4_t) -> float32x4_t {
            unsafe { vdivq_f32(a, b) }
        }
        #[inline(always)]
        unsafe fn fused(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
            unsafe { vfmaq_f32(c, a, b) }
        }
        #[inline(always)]
        unsafe fn max(a: float32x4_t, b: float32x4_t) -> float32x4_t {
            // NEON's fmax propagates NaN; select instead so NaN follows the scalar rule.
            unsafe { vbslq_f32(vcgtq_f32(a, b), a, b) }
        }
        #[inline(always)]
        unsafe fn min(a: float32x4_t, b: float32x4_t) -> float32x4_t {
            unsafe { vbslq_f32(vcltq_f32(a, b), a, b) }
        }
        #[inline(always)]
        unsafe fn pow2i(n: float32x4_t) -> float32x4_t {
            unsafe {
                let i = vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127));
                vreinterpretq_f32_s32(vshlq_n_s32::<23>(i))
            }
        }
    }
}

/// Defines `unsafe fn $name(arith: Arith, args...)` from a body generic over the back end `S`
/// and the FMA flag `F`. Each vector back end gets its own copy of the body inside a function
/// compiled for that back end's target features, so the `#[inline(always)]` helpers and
/// intrinsics it calls are inlined into vector code.
macro_rules! simd_kernel {
    (
        $(#[$meta:meta])*
        $vis:vis unsafe fn $name:ident<$S:ident, $F:ident>($($p:ident : $t:ty),+ $(,)?) $(-> $ret:ty)?
        $body:block
    ) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis unsafe fn $name(arith: $crate::simd::Arith, $($p: $t),+) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn body<$S: $crate::simd::Simd, const $F: bool>($($p: $t),+) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2(fma: bool, $($p: $t),+) $(-> $ret)? {
                // SAFETY: forwarded from the caller of `$name`.
                unsafe {
                    if fma {
                        body::<$crate::simd::Avx2, true>($($p),+)
                    } else {
                        body::<$crate::simd::Avx2, false>($($p),+)
                    }
                }
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512(fma: bool, $($p: $t),+) $(-> $ret)? {
                // SAFETY: forwarded from the caller of `$name`.
                unsafe {
                    if fma {
                        body::<$crate::simd::Avx512, true>($($p),+)
                    } else {
                        body::<$crate::simd::Avx512, false>($($p),+)
                    }
                }
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn scalar_fma($($p: $t),+) $(-> $ret)? {
                // SAFETY: forwarded from the caller of `$name`.
                unsafe { body::<$crate::simd::Scalar, true>($($p),+) }
            }

            #[cfg(target_arch = "aarch64")]
            #[target_feature(enable = "neon")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn neon(fma: bool, $($p: $t),+) $(-> $ret)? {
                // SAFETY: forwarded from the caller of `$name`.
                unsafe {
                    if fma {
                        body::<$crate::simd::Neon, true>($($p),+)
                    } else {
                        body::<$crate::simd::Neon, false>($($p),+)
                    }
                }
            }

            // SAFETY: `Arith` is only constructed for instruction sets this CPU has; pointer
            // validity is forwarded from the caller.
            unsafe {
                match arith.isa() {
                    #[cfg(target_arch = "x86_64")]
                    $crate::simd::Isa::Avx2 => avx2(arith.fma(), $($p),+),
                    #[cfg(target_arch = "x86_64")]
                    $crate::simd::Isa::Avx512 => avx512(arith.fma(), $($p),+),
                    #[cfg(target_arch = "aarch64")]
                    $crate::simd::Isa::Neon => neon(arith.fma(), $($p),+),
                    // Scalar, and instruction sets of other architectures (which `Arith`
                    // never holds here): the reference path.
                    #[cfg(target_arch = "x86_64")]
                    $crate::simd::Isa::Scalar if arith.hardware_fma() => scalar_fma($($p),+),
                    _ => {
                        if arith.fma() {
                            body::<$crate::simd::Scalar, true>($($p),+)
                        } else {
                            body::<$crate::simd::Scalar, false>($($p),+)
                        }
                    }
                }
            }
        }
    };
}
pub(crate) use simd_kernel;
