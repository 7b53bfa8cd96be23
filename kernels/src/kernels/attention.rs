//! Causal multi-head attention (GQA allowed) of new tokens against a sequence's KV cache — the
//! same kernel serves prefill (many tokens) and decode (one token).

use std::ops::Range;

use super::softmax::softmax_in_place;
use super::{check_len, check_min_len, check_range, mul, reduce};
use crate::error::Error;
use crate::simd::{Arith, Scalar, madd, simd_kernel};

/// Head layout of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; `heads` must be a multiple (grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// Scratch floats one attention call needs for a context of `ctx` positions (the scores of one
/// row). An orchestrator gives each thread its own.
pub fn attention_work_size(ctx: usize) -> usize {
    ctx
}

/// Attention for rows `rows` of `n_tokens * heads` (row `r` is token `r / heads`, head
/// `r % heads`), written to `out_rows` (`[rows.len() x head_dim]`, i.e. those rows of the
/// `[n_tokens x heads * head_dim]` output).
///
/// `q` is `[n_tokens x heads * head_dim]` with RoPE applied; `k_cache` and `v_cache` are
/// `[>= pos0 + n_tokens x kv_heads * head_dim]` and already hold the new tokens' keys and values
/// at positions `pos0..`. Token `t` attends to positions `0..=pos0 + t`. Scores are canonical
/// dot products times `1 / sqrt(head_dim)`; the weighted sum of values runs over positions in
/// ascending order, vectorised across the head's columns.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    arith: Arith,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    out_rows: &mut [f32],
    shape: AttentionShape,
    n_tokens: usize,
    pos0: usize,
    rows: Range<usize>,
    work: &mut [f32],
) -> Result<(), Error> {
    const NAME: &str = "attention";
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::Shape {
            kernel: NAME,
            what: "heads (must be a multiple of kv_heads)",
            expected: kv_heads,
            got: heads,
        });
    }
    let width = mul(NAME, heads, head_dim)?;
    let kv_width = mul(NAME, kv_heads, head_dim)?;
    let ctx = pos0 + n_tokens;
    check_len(NAME, "q", q.len(), mul(NAME, n_tokens, width)?)?;
    check_min_len(NAME, "k_cache", k_cache.len(), mul(NAME, ctx, kv_width)?)?;
    check_min_len(NAME, "v_cache", v_cache.len(), mul(NAME, ctx, kv_width)?)?;
    let n_rows = mul(NAME, n_tokens, heads)?;
    check_range(NAME, &rows, n_rows)?;
    check_len(
        NAME,
        "out_rows",
        out_rows.len(),
        mul(NAME, rows.len(), head_dim)?,
    )?;
    check_min_len(NAME, "work", work.len(), attention_work_size(ctx))?;
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    for (r, out) in rows.zip(out_rows.chunks_exact_mut(head_dim.max(1))) {
        let (t, h) = (r / heads, r % heads);
        let kvh = h / group;
        // SAFETY: `q` row `t` head `h`, cache rows `0..pos0 + t + 1` at head `kvh`, `out` and
        // `work` are inside the buffers checked above.
        unsafe {
            attention_row(
                arith,
                q.as_ptr().add(t * width + h * head_dim),
                k_cache.as_ptr().add(kvh * head_dim),
                v_cache.as_ptr().add(kvh * head_dim),
                kv_width,
                out.as_mut_ptr(),
                work.as_mut_ptr(),
                pos0 + t + 1,
                head_dim,
                scale,
            );
        }
    }
    Ok(())
}

simd_kernel! {
    /// One (token, head) row: scores over `len` positions, softmax, weighted sum of values.
    unsafe fn attention_row<S, F>(
        q: *const f32,
        k: *const f32,
        v: *const f32,
        stride: usize,
        out: *mut f32,
        scores: *mut f32,
        len: usize,
        head_dim: usize,
        scale: f32,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            for j in 0..len {
                *scores.add(j) = reduce::dot::<S, F>(q, k.add(j * stride), head_dim) * scale;
            }
            softmax_in_place::<S>(scores, len);
            let full = head_dim / S::LANES * S::LANES;
            let mut d = 0;
            while d < full {
                let mut acc = S::splat(0.0);
                for j in 0..len {
                    acc = madd::<S, F>(S::splat(*scores.add(j)), S::load(v.add(j * stride + d)), acc);
                }
                S::store(out.add(d), acc);
                d += S::LANES;
            }
            for d in full..head_dim {
                let mut acc = 0.0f32;
                for j in 0..len {
                    acc = madd::<Scalar, F>(*scores.add(j), *v.add(j * stride + d), acc);
                }
                *out.add(d) = acc;
            }
        }
    }
}
