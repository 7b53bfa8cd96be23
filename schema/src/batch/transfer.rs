//! Transfer columns: one value per transfer in each, encode and decode side by side.

use super::{BatchError, Col, Planes, Prev, put_h128, put_planes, put_svar, put_uvar, zigzag};
use crate::event::{Direction, Transfer, Transport};
use crate::trace_capnp::transfer_columns;

super::columns!(
    /// The `transfers` group of a batch.
    TransferColumns {
        id,
        src_endpoint,
        dst_endpoint,
        src_arena,
        dst_arena,
        src_offset,
        dst_offset,
        len,
        hash,
        duration,
        /// Per transfer: transport (bits 0-2), direction (3), has payload (4), time predicted
        /// from the previous span end (5, version 2).
        flags,
        payloads,
    }
    scratch {
        /// Zigzag durations, laid out in planes into `duration` at the end of the batch.
        duration_z: Vec<u64>,
    }
);

impl TransferColumns {
    pub(super) fn push(&mut self, e: &Transfer, use_end: bool, p: &mut Prev) {
        put_svar(&mut self.id, e.id, p.transfer_id);
        p.transfer_id = e.id;
        put_uvar(&mut self.src_endpoint, e.src_endpoint.into());
        put_uvar(&mut self.dst_endpoint, e.dst_endpoint.into());
        put_uvar(&mut self.src_arena, e.src_arena.into());
        put_uvar(&mut self.dst_arena, e.dst_arena.into());
        put_uvar(&mut self.src_offset, e.src_offset);
        put_uvar(&mut self.dst_offset, e.dst_offset);
        put_uvar(&mut self.len, e.len);
        put_h128(&mut self.hash, e.hash);
        let duration = e.complete_ns.wrapping_sub(e.post_ns);
        let dir = e.direction as usize & 1;
        self.duration_z
            .push(zigzag(duration, p.transfer_duration[dir]));
        p.transfer_duration[dir] = duration;
        let flags = e.transport as u8
            | (e.direction as u8) << 3
            | u8::from(e.payload.is_some()) << 4
            | u8::from(use_end) << 5;
        self.flags.push(flags);
        if let Some(h) = e.payload {
            put_h128(&mut self.payloads, h);
        }
    }

    pub(super) fn seal(&mut self) {
        put_planes(&mut self.duration, &self.duration_z);
    }

    pub(super) fn write(&self, mut g: transfer_columns::Builder<'_>) {
        g.set_id(&self.id);
        g.set_src_endpoint(&self.src_endpoint);
        g.set_dst_endpoint(&self.dst_endpoint);
        g.set_src_arena(&self.src_arena);
        g.set_dst_arena(&self.dst_arena);
        g.set_src_offset(&self.src_offset);
        g.set_dst_offset(&self.dst_offset);
        g.set_len(&self.len);
        g.set_hash(&self.hash);
        g.set_duration(&self.duration);
        g.set_flags(&self.flags);
        g.set_payloads(&self.payloads);
    }
}

/// Reads the `transfers` group back, one transfer at a time.
pub(super) struct TransferReader<'a> {
    id: Col<'a>,
    src_endpoint: Col<'a>,
    dst_endpoint: Col<'a>,
    src_arena: Col<'a>,
    dst_arena: Col<'a>,
    src_offset: Col<'a>,
    dst_offset: Col<'a>,
    len: Col<'a>,
    hash: Col<'a>,
    duration: Planes<'a>,
    flags: Col<'a>,
    payloads: Col<'a>,
}

impl<'a> TransferReader<'a> {
    pub(super) fn new(r: transfer_columns::Reader<'a>, n: usize) -> Result<Self, BatchError> {
        Ok(TransferReader {
            id: Col::new(r.get_id()?, "transfers.id"),
            src_endpoint: Col::new(r.get_src_endpoint()?, "transfers.srcEndpoint"),
            dst_endpoint: Col::new(r.get_dst_endpoint()?, "transfers.dstEndpoint"),
            src_arena: Col::new(r.get_src_arena()?, "transfers.srcArena"),
            dst_arena: Col::new(r.get_dst_arena()?, "transfers.dstArena"),
            src_offset: Col::new(r.get_src_offset()?, "transfers.srcOffset"),
            dst_offset: Col::new(r.get_dst_offset()?, "transfers.dstOffset"),
            len: Col::new(r.get_len()?, "transfers.len"),
            hash: Col::new(r.get_hash()?, "transfers.hash"),
            duration: Planes::new(r.get_duration()?, n, "transfers.duration")?,
            flags: Col::new(r.get_flags()?, "transfers.flags"),
            payloads: Col::new(r.get_payloads()?, "transfers.payloads"),
        })
    }

    /// The next transfer's flags, read before its time: in version 2, bit 5 chooses its time
    /// predictor.
    pub(super) fn flags(&mut self) -> Result<u8, BatchError> {
        self.flags.u8()
    }

    pub(super) fn next(
        &mut self,
        ns: u64,
        flags: u8,
        v2: bool,
        p: &mut Prev,
    ) -> Result<Transfer, BatchError> {
        let id = self.id.svar(p.transfer_id)?;
        p.transfer_id = id;
        let src_endpoint = self.src_endpoint.u32()?;
        let dst_endpoint = self.dst_endpoint.u32()?;
        let src_arena = self.src_arena.u32()?;
        let dst_arena = self.dst_arena.u32()?;
        let src_offset = self.src_offset.uvar()?;
        let dst_offset = self.dst_offset.uvar()?;
        let len = self.len.uvar()?;
        let hash = self.hash.h128()?;
        let bad = || BatchError::Columns("transfers.flags");
        if flags >> if v2 { 6 } else { 5 } != 0 {
            return Err(bad());
        }
        let complete_ns = if v2 {
            let dir = usize::from(flags >> 3 & 1);
            let duration = self.duration.svar(p.transfer_duration[dir])?;
            p.transfer_duration[dir] = duration;
            ns.wrapping_add(duration)
        } else {
            self.duration.svar(ns)?
        };
        let transport = Transport::from_u8(flags & 7).ok_or_else(bad)?;
        let direction = if flags & 8 != 0 {
            Direction::Recv
        } else {
            Direction::Send
        };
        let payload = if flags & 16 != 0 {
            Some(self.payloads.h128()?)
        } else {
            None
        };
        Ok(Transfer {
            id,
            src_endpoint,
            dst_endpoint,
            src_arena,
            dst_arena,
            src_offset,
            dst_offset,
            len,
            hash,
            post_ns: ns,
            complete_ns,
            transport,
            direction,
            payload,
        })
    }

    pub(super) fn finish(&self) -> Result<(), BatchError> {
        for c in [
            &self.id,
            &self.src_endpoint,
            &self.dst_endpoint,
            &self.src_arena,
            &self.dst_arena,
            &self.src_offset,
            &self.dst_offset,
            &self.len,
            &self.hash,
            &self.flags,
            &self.payloads,
        ] {
            c.finish()?;
        }
        Ok(())
    }
}
