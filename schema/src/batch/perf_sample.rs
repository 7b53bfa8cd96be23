//! Perf sample columns, encode and decode side by side.

use super::{BatchError, Col, Prev, put_svar, put_uvar};
use crate::event::{PerfSample, PerfSampleKind};
use crate::trace_capnp::perf_sample_columns;

super::columns!(
    /// The `perfSamples` group of a batch.
    PerfSampleColumns {
        kind,
        ip,
        addr,
        weight,
        data_source,
        tid,
        cpu,
    }
);

impl PerfSampleColumns {
    pub(super) fn push(&mut self, e: &PerfSample, p: &mut Prev) {
        self.kind.push(e.kind as u8);
        put_svar(&mut self.ip, e.ip, p.ip);
        p.ip = e.ip;
        put_svar(&mut self.addr, e.addr, p.addr);
        p.addr = e.addr;
        put_uvar(&mut self.weight, e.weight);
        put_uvar(&mut self.data_source, e.data_source);
        put_uvar(&mut self.tid, e.tid.into());
        put_uvar(&mut self.cpu, e.cpu.into());
    }

    pub(super) fn write(&self, mut g: perf_sample_columns::Builder<'_>) {
        g.set_kind(&self.kind);
        g.set_ip(&self.ip);
        g.set_addr(&self.addr);
        g.set_weight(&self.weight);
        g.set_data_source(&self.data_source);
        g.set_tid(&self.tid);
        g.set_cpu(&self.cpu);
    }
}

/// Reads the `perfSamples` group back.
pub(super) struct PerfSampleReader<'a> {
    kind: Col<'a>,
    ip: Col<'a>,
    addr: Col<'a>,
    weight: Col<'a>,
    data_source: Col<'a>,
    tid: Col<'a>,
    cpu: Col<'a>,
}

impl<'a> PerfSampleReader<'a> {
    pub(super) fn new(r: perf_sample_columns::Reader<'a>) -> Result<Self, BatchError> {
        Ok(PerfSampleReader {
            kind: Col::new(r.get_kind()?, "perfSamples.kind"),
            ip: Col::new(r.get_ip()?, "perfSamples.ip"),
            addr: Col::new(r.get_addr()?, "perfSamples.addr"),
            weight: Col::new(r.get_weight()?, "perfSamples.weight"),
            data_source: Col::new(r.get_data_source()?, "perfSamples.dataSource"),
            tid: Col::new(r.get_tid()?, "perfSamples.tid"),
            cpu: Col::new(r.get_cpu()?, "perfSamples.cpu"),
        })
    }

    pub(super) fn next(&mut self, ns: u64, p: &mut Prev) -> Result<PerfSample, BatchError> {
        let kind = PerfSampleKind::from_u8(self.kind.u8()?)
            .ok_or(BatchError::Columns("perfSamples.kind"))?;
        let ip = self.ip.svar(p.ip)?;
        p.ip = ip;
        let addr = self.addr.svar(p.addr)?;
        p.addr = addr;
        Ok(PerfSample {
            kind,
            ip,
            addr,
            weight: self.weight.uvar()?,
            data_source: self.data_source.uvar()?,
            tid: self.tid.u32()?,
            cpu: self.cpu.u32()?,
            ns,
        })
    }

    pub(super) fn finish(&self) -> Result<(), BatchError> {
        for c in [
            &self.kind,
            &self.ip,
            &self.addr,
            &self.weight,
            &self.data_source,
            &self.tid,
            &self.cpu,
        ] {
            c.finish()?;
        }
        Ok(())
    }
}
