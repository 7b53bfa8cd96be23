//! Rotary position embedding, applied in place to interleaved pairs of each head.

use std::ops::Range;

use super::{check_len, check_min_len, check_range, mul};
use crate::error::Error;

/// Rotates rows `rows` of a `[n_rows x heads * head_dim]` matrix in place (`x_rows` holds just
/// those rows). Row `r` is the token at position `pos0 + r`; pair `(2i, 2i + 1)` of each head
/// turns by the angle whose cosine and sine are `cos[pos * head_dim / 2 + i]` and
/// `sin[...]`. Element-wise with a fixed formula (`x0 * c - x1 * s`, `x0 * s + x1 * c`, never
/// fused), so every split and every CPU agree; it has no vector path because it is a tiny
/// share of the work.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    x_rows: &mut [f32],
    n_rows: usize,
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    pos0: usize,
    rows: Range<usize>,
) -> Result<(), Error> {
    const NAME: &str = "rope";
    let width = mul(NAME, heads, head_dim)?;
    check_range(NAME, &rows, n_rows)?;
    check_len(NAME, "x_rows", x_rows.len(), mul(NAME, rows.len(), width)?)?;
    if !head_dim.is_multiple_of(2) {
        return Err(crate::error::Error::Shape {
            kernel: NAME,
            what: "head_dim (must be even)",
            expected: head_dim + 1,
            got: head_dim,
        });
    }
    let half = head_dim / 2;
    let needed = mul(NAME, pos0 + n_rows, half)?;
    check_min_len(NAME, "cos", cos.len(), needed)?;
    check_min_len(NAME, "sin", sin.len(), needed)?;
    for (r, row) in rows.zip(x_rows.chunks_exact_mut(width.max(1))) {
        let t = (pos0 + r) * half;
        let (c, s) = (&cos[t..t + half], &sin[t..t + half]);
        for head in row.chunks_exact_mut(head_dim.max(1)) {
            for (pair, (&c, &s)) in head.chunks_exact_mut(2).zip(c.iter().zip(s)) {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0 * c - x1 * s;
                pair[1] = x0 * s + x1 * c;
            }
        }
    }
    Ok(())
}
