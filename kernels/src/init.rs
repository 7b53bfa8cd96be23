//! Deterministic weight values and RoPE tables, computed from the seed with IEEE basic
//! operations only (no platform `libm`), so every node generates the same bits.
//!
//! Weights are counter-based: the value at index `i` of tensor `t` is a pure function of
//! `(seed, t, i)`, so any thread can generate any slice directly into the arena, in any order.

/// Identity of one weight tensor, independent of how layers are split into stages, so a
/// layer's weights are the same whichever stage owns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tensor {
    /// Token embedding table.
    Embed,
    /// Final RMSNorm weight.
    FinalNorm,
    /// Output head.
    Head,
    /// A tensor of decoder layer `layer`; `kind` numbers the nine tensors of a layer.
    Layer { layer: usize, kind: LayerTensor },
}

/// The tensors of one decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LayerTensor {
    AttnNorm,
    Wq,
    Wk,
    Wv,
    Wo,
    FfnNorm,
    Gate,
    Up,
    Down,
}

impl Tensor {
    fn id(self) -> u64 {
        match self {
            Tensor::Embed => 1,
            Tensor::FinalNorm => 2,
            Tensor::Head => 3,
            Tensor::Layer { layer, kind } => ((layer as u64 + 1) << 8) | (kind as u64 + 16),
        }
    }
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fill {
    /// Uniform in `[-scale, scale)`.
    Uniform { scale: f32 },
    /// `1 + 0.1 * uniform[-1, 1)`: norm weights near one.
    NearOne,
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Uniform in `[-1, 1)` with 24 random bits, exact in f32.
fn uniform(seed: u64, tensor: u64, index: u64) -> f32 {
    let h = splitmix64(splitmix64(seed ^ tensor.wrapping_mul(0xd6e8_feb8_6659_fd93)) ^ index);
    (h >> 40) as f32 * (1.0 / 8_388_608.0) - 1.0
}

/// Writes elements `first..first + out.len()` of `tensor` into `out`.
pub(crate) fn fill(seed: u64, tensor: Tensor, how: Fill, first: usize, out: &mut [f32]) {
    let id = tensor.id();
    for (i, o) in out.iter_mut().enumerate() {
        let u = uniform(seed, id, (first + i) as u64);
        *o = match how {
            Fill::Uniform { scale } => u * scale,
            Fill::NearOne => 1.0 + 0.1 * u,
        };
    }
}

const LN2: f64 = std::f64::consts::LN_2;
const SQRT2: f64 = std::f64::consts::SQRT_2;
const TAU: f64 = std::f64::consts::TAU;

/// Natural logarithm of a positive normal `x` (atanh series).
fn ln(x: f64) -> f64 {
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    if m > SQRT2 {
        m /= 2.0;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let (mut term, mut sum) = (s, 0.0);
    for k in 0..40 {
        sum += term / (2 * k + 1) as f64;
        term *= s2;
    }
    2.0 * sum + e as f64 * LN2
}

/// `e^x` for `x` in about `[-700, 700]` (Taylor series after reduction by `ln 2`).
fn exp(x: f64) -> f64 {
    let n = (x / LN2).round();
    let r = x - n * LN2;
    let (mut term, mut sum) = (1.0, 1.0);
    for k in 1..30 {
        term *= r / k as f64;
        sum += term;
    }
    sum * f64::from_bits(((n as i64 + 1023) as u64) << 52)
}

/// `(cos a, sin a)` (Taylor series after reduction by `2 pi`).
fn cos_sin(a: f64) -> (f64, f64) {
    let r = a - (a / TAU).round() * TAU;
    let r2 = r * r;
    let (mut c, mut s) = (0.0, 0.0);
    let (mut ct, mut st) = (1.0, r);
    for k in 0..40 {
        c += ct;
        s += st;
        let (a, b) = ((2 * k + 1) as f64, (2 * k + 2) as f64);
        ct *= -r2 / (a * b);
        st *= -r2 / (b * (b + 1.0));
    }
    (c, s)
}

/// Fills `cos` and `sin` (`[max_seq x head_dim / 2]`) with the RoPE angles
/// `pos * theta^(-2i / head_dim)`.
pub(crate) fn rope_tables(theta: f32, head_dim: usize, cos: &mut [f32], sin: &mut [f32]) {
    let half = (head_dim / 2).max(1);
    let ln_theta = ln(theta as f64);
    for (t, (c, s)) in cos.iter_mut().zip(sin.iter_mut()).enumerate() {
        let (pos, i) = (t / half, t % half);
        let freq = exp(-((2 * i) as f64) / head_dim as f64 * ln_theta);
        let (cv, sv) = cos_sin(pos as f64 * freq);
        *c = cv as f32;
        *s = sv as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_math_matches_libm_closely() {
        for x in [1e-3, 0.5, 1.0, 2.0, 10_000.0, 1e6] {
            assert!(
                (ln(x) - x.ln()).abs() < 1e-14 * x.ln().abs().max(1.0),
                "ln {x}"
            );
        }
        for x in [-20.0, -1.0, 0.0, 0.3, 5.0] {
            assert!((exp(x) / x.exp() - 1.0).abs() < 1e-14, "exp {x}");
        }
        for a in [0.0, 0.1, 1.0, 3.0, 100.0, 1023.0] {
            let (c, s) = cos_sin(a);
            assert!(
                (c - a.cos()).abs() < 1e-12 && (s - a.sin()).abs() < 1e-12,
                "{a}"
            );
        }
    }

    #[test]
    fn weights_depend_on_seed_tensor_and_index_only() {
        let mut a = vec![0.0; 100];
        let mut b = vec![0.0; 60];
        let t = Tensor::Layer {
            layer: 3,
            kind: LayerTensor::Up,
        };
        fill(7, t, Fill::Uniform { scale: 0.5 }, 0, &mut a);
        fill(7, t, Fill::Uniform { scale: 0.5 }, 40, &mut b);
        assert_eq!(a[40..], b[..]);
        assert!(a.iter().all(|v| (-0.5..0.5).contains(v)));
        let mut c = vec![0.0; 100];
        fill(8, t, Fill::Uniform { scale: 0.5 }, 0, &mut c);
        assert_ne!(a, c);
    }
}
