//! The pure kernels: no allocation, no threads, no global state; explicit inputs, outputs and
//! workspace; each call covers a row range so an orchestrator can split one call across threads.
//!
//! Every kernel takes an [`Arith`](crate::Arith) (instruction set and FMA flag) and returns the
//! same bits for every instruction set and every row split. Products accumulate over `k` in
//! ascending order, vectorised across output columns. Horizontal sums (RMSNorm's sum of
//! squares, softmax's sum, attention's dot products) use one canonical order on every path:
//! 16 logical lanes, lane `l` summing elements `l, l + 16, ...`, then a fixed pairwise tree.

mod attention;
mod elementwise;
mod gemm;
mod norm;
pub(crate) mod reduce;
mod rope;
mod softmax;

pub use attention::{AttentionShape, attention, attention_work_size};
pub use elementwise::{add_assign, argmax, embed, swiglu};
pub use gemm::{gemm, gemm_work_size, gemv, gemv_work_size};
pub use norm::rmsnorm;
pub use rope::rope;
pub use softmax::softmax;

use std::ops::Range;

use crate::error::Error;

/// Refuses a buffer whose length is not exactly `expected`.
pub(crate) fn check_len(
    kernel: &'static str,
    what: &'static str,
    got: usize,
    expected: usize,
) -> Result<(), Error> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::Shape {
            kernel,
            what,
            expected,
            got,
        })
    }
}

/// Refuses a buffer shorter than `expected`.
pub(crate) fn check_min_len(
    kernel: &'static str,
    what: &'static str,
    got: usize,
    expected: usize,
) -> Result<(), Error> {
    if got >= expected {
        Ok(())
    } else {
        Err(Error::Shape {
            kernel,
            what,
            expected,
            got,
        })
    }
}

/// Refuses a row range that is reversed or runs past `rows`.
pub(crate) fn check_range(
    kernel: &'static str,
    range: &Range<usize>,
    rows: usize,
) -> Result<(), Error> {
    if range.start <= range.end && range.end <= rows {
        Ok(())
    } else {
        Err(Error::RowRange {
            kernel,
            start: range.start,
            end: range.end,
            rows,
        })
    }
}

/// `a * b`, refused as a shape error when it overflows.
pub(crate) fn mul(kernel: &'static str, a: usize, b: usize) -> Result<usize, Error> {
    a.checked_mul(b).ok_or(Error::Shape {
        kernel,
        what: "shape product",
        expected: usize::MAX,
        got: a,
    })
}
