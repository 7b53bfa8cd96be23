//! Snapshot event columns, encode and decode side by side.

use super::{BatchError, Col, put_h128, put_uvar};
use crate::event::SnapshotEvent;
use crate::trace_capnp::snapshot_columns;

super::columns!(
    /// The `snapshots` group of a batch.
    SnapshotColumns {
        stage,
        step,
        id,
        bytes,
        new_bytes,
        chunks,
    }
);

impl SnapshotColumns {
    pub(super) fn push(&mut self, e: &SnapshotEvent) {
        put_uvar(&mut self.stage, e.stage.into());
        put_uvar(&mut self.step, e.step);
        put_h128(&mut self.id, e.id);
        put_uvar(&mut self.bytes, e.bytes);
        put_uvar(&mut self.new_bytes, e.new_bytes);
        put_uvar(&mut self.chunks, e.chunks.into());
    }

    pub(super) fn write(&self, mut g: snapshot_columns::Builder<'_>) {
        g.set_stage(&self.stage);
        g.set_step(&self.step);
        g.set_id(&self.id);
        g.set_bytes(&self.bytes);
        g.set_new_bytes(&self.new_bytes);
        g.set_chunks(&self.chunks);
    }
}

/// Reads the `snapshots` group back.
pub(super) struct SnapshotReader<'a> {
    stage: Col<'a>,
    step: Col<'a>,
    id: Col<'a>,
    bytes: Col<'a>,
    new_bytes: Col<'a>,
    chunks: Col<'a>,
}

impl<'a> SnapshotReader<'a> {
    pub(super) fn new(r: snapshot_columns::Reader<'a>) -> Result<Self, BatchError> {
        Ok(SnapshotReader {
            stage: Col::new(r.get_stage()?, "snapshots.stage"),
            step: Col::new(r.get_step()?, "snapshots.step"),
            id: Col::new(r.get_id()?, "snapshots.id"),
            bytes: Col::new(r.get_bytes()?, "snapshots.bytes"),
            new_bytes: Col::new(r.get_new_bytes()?, "snapshots.newBytes"),
            chunks: Col::new(r.get_chunks()?, "snapshots.chunks"),
        })
    }

    pub(super) fn next(&mut self, ns: u64) -> Result<SnapshotEvent, BatchError> {
        Ok(SnapshotEvent {
            stage: self.stage.u32()?,
            step: self.step.uvar()?,
            id: self.id.h128()?,
            bytes: self.bytes.uvar()?,
            new_bytes: self.new_bytes.uvar()?,
            chunks: self.chunks.u32()?,
            ns,
        })
    }

    pub(super) fn finish(&self) -> Result<(), BatchError> {
        for c in [
            &self.stage,
            &self.step,
            &self.id,
            &self.bytes,
            &self.new_bytes,
            &self.chunks,
        ] {
            c.finish()?;
        }
        Ok(())
    }
}
