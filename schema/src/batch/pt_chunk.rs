//! Intel PT chunk columns, encode and decode side by side.

use super::{BatchError, Col, Prev, put_h128, put_svar, put_uvar};
use crate::event::PtChunk;
use crate::trace_capnp::pt_chunk_columns;

super::columns!(
    /// The `ptChunks` group of a batch.
    PtChunkColumns {
        cpu,
        aux_offset,
        size,
        payload,
    }
);

impl PtChunkColumns {
    pub(super) fn push(&mut self, e: &PtChunk, p: &mut Prev) {
        put_uvar(&mut self.cpu, e.cpu.into());
        put_svar(&mut self.aux_offset, e.aux_offset, p.aux);
        p.aux = e.aux_offset;
        put_uvar(&mut self.size, e.size);
        put_h128(&mut self.payload, e.payload);
    }

    pub(super) fn write(&self, mut g: pt_chunk_columns::Builder<'_>) {
        g.set_cpu(&self.cpu);
        g.set_aux_offset(&self.aux_offset);
        g.set_size(&self.size);
        g.set_payload(&self.payload);
    }
}

/// Reads the `ptChunks` group back.
pub(super) struct PtChunkReader<'a> {
    cpu: Col<'a>,
    aux_offset: Col<'a>,
    size: Col<'a>,
    payload: Col<'a>,
}

impl<'a> PtChunkReader<'a> {
    pub(super) fn new(r: pt_chunk_columns::Reader<'a>) -> Result<Self, BatchError> {
        Ok(PtChunkReader {
            cpu: Col::new(r.get_cpu()?, "ptChunks.cpu"),
            aux_offset: Col::new(r.get_aux_offset()?, "ptChunks.auxOffset"),
            size: Col::new(r.get_size()?, "ptChunks.size"),
            payload: Col::new(r.get_payload()?, "ptChunks.payload"),
        })
    }

    pub(super) fn next(&mut self, ns: u64, p: &mut Prev) -> Result<PtChunk, BatchError> {
        let cpu = self.cpu.u32()?;
        let aux_offset = self.aux_offset.svar(p.aux)?;
        p.aux = aux_offset;
        Ok(PtChunk {
            cpu,
            aux_offset,
            size: self.size.uvar()?,
            payload: self.payload.h128()?,
            ns,
        })
    }

    pub(super) fn finish(&self) -> Result<(), BatchError> {
        for c in [&self.cpu, &self.aux_offset, &self.size, &self.payload] {
            c.finish()?;
        }
        Ok(())
    }
}
