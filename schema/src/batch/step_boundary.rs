//! Step boundary columns, encode and decode side by side.

use super::{BatchError, Col, Prev, put_svar, put_uvar};
use crate::event::StepBoundary;
use crate::trace_capnp::step_boundary_columns;

super::columns!(
    /// The `stepBoundaries` group of a batch.
    StepBoundaryColumns { step, seq }
);

impl StepBoundaryColumns {
    pub(super) fn push(&mut self, e: &StepBoundary, p: &mut Prev) {
        put_svar(&mut self.step, e.step, p.boundary_step);
        p.boundary_step = e.step;
        put_uvar(&mut self.seq, e.seq.into());
    }

    pub(super) fn write(&self, mut g: step_boundary_columns::Builder<'_>) {
        g.set_step(&self.step);
        g.set_seq(&self.seq);
    }
}

/// Reads the `stepBoundaries` group back.
pub(super) struct StepBoundaryReader<'a> {
    step: Col<'a>,
    seq: Col<'a>,
}

impl<'a> StepBoundaryReader<'a> {
    pub(super) fn new(r: step_boundary_columns::Reader<'a>) -> Result<Self, BatchError> {
        Ok(StepBoundaryReader {
            step: Col::new(r.get_step()?, "stepBoundaries.step"),
            seq: Col::new(r.get_seq()?, "stepBoundaries.seq"),
        })
    }

    pub(super) fn next(&mut self, ns: u64, p: &mut Prev) -> Result<StepBoundary, BatchError> {
        let step = self.step.svar(p.boundary_step)?;
        p.boundary_step = step;
        Ok(StepBoundary {
            step,
            seq: self.seq.u32()?,
            ns,
        })
    }

    pub(super) fn finish(&self) -> Result<(), BatchError> {
        self.step.finish()?;
        self.seq.finish()
    }
}
