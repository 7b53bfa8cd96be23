//! Migration event columns (format version 4), encode and decode side by side.

use super::{BatchError, Col, put_uvar};
use crate::event::{MigrationEvent, MoveRole};
use crate::trace_capnp::migration_columns;

super::columns!(
    /// The `migrations` group of a batch.
    MigrationColumns {
        stage,
        step,
        index,
        role,
        peer,
    }
);

impl MigrationColumns {
    pub(super) fn push(&mut self, e: &MigrationEvent) {
        put_uvar(&mut self.stage, e.stage.into());
        put_uvar(&mut self.step, e.step);
        put_uvar(&mut self.index, e.index.into());
        self.role.push(e.role as u8);
        put_uvar(&mut self.peer, e.peer.into());
    }

    pub(super) fn write(&self, mut g: migration_columns::Builder<'_>) {
        g.set_stage(&self.stage);
        g.set_step(&self.step);
        g.set_index(&self.index);
        g.set_role(&self.role);
        g.set_peer(&self.peer);
    }
}

/// Reads the `migrations` group back.
pub(super) struct MigrationReader<'a> {
    stage: Col<'a>,
    step: Col<'a>,
    index: Col<'a>,
    role: Col<'a>,
    peer: Col<'a>,
}

impl<'a> MigrationReader<'a> {
    pub(super) fn new(r: migration_columns::Reader<'a>) -> Result<Self, BatchError> {
        Ok(MigrationReader {
            stage: Col::new(r.get_stage()?, "migrations.stage"),
            step: Col::new(r.get_step()?, "migrations.step"),
            index: Col::new(r.get_index()?, "migrations.index"),
            role: Col::new(r.get_role()?, "migrations.role"),
            peer: Col::new(r.get_peer()?, "migrations.peer"),
        })
    }

    pub(super) fn next(&mut self, ns: u64) -> Result<MigrationEvent, BatchError> {
        let stage = self.stage.u32()?;
        let step = self.step.uvar()?;
        let index = self.index.u32()?;
        let role = self.role.u8()?;
        Ok(MigrationEvent {
            stage,
            step,
            index,
            role: MoveRole::from_u8(role).ok_or(BatchError::Columns("migrations.role"))?,
            peer: self.peer.u32()?,
            ns,
        })
    }

    pub(super) fn finish(&self) -> Result<(), BatchError> {
        for c in [&self.stage, &self.step, &self.index, &self.role, &self.peer] {
            c.finish()?;
        }
        Ok(())
    }
}
