//! The columns of eBPF events and of perf software records: both kinds have the same shape
//! (`EbpfColumns` in trace.capnp), held in two groups. Encode and decode side by side.

use super::{BatchError, Col, put_uvar};
use crate::event::{EbpfEvent, EbpfKind, SoftwareKind, SoftwareRecord, SystemRecord};
use crate::trace_capnp::ebpf_columns;

super::columns!(
    /// The `ebpfEvents` or the `perfSoftware` group of a batch.
    EbpfColumns {
        /// The [`EbpfKind`] or [`SoftwareKind`] byte.
        kind,
        pid,
        tid,
        cpu,
        arg0,
        arg1,
        arg2,
    }
);

/// One row of an [`EbpfColumns`] group, before its kind byte is given meaning.
struct Row {
    kind: u8,
    pid: u32,
    tid: u32,
    cpu: u32,
    arg0: u64,
    arg1: u64,
    arg2: u64,
    ns: u64,
}

impl EbpfColumns {
    /// Appends an eBPF event or perf software record whose kind is stored as `kind`.
    pub(super) fn push<K>(&mut self, kind: u8, e: &SystemRecord<K>) {
        self.kind.push(kind);
        put_uvar(&mut self.pid, e.pid.into());
        put_uvar(&mut self.tid, e.tid.into());
        put_uvar(&mut self.cpu, e.cpu.into());
        put_uvar(&mut self.arg0, e.arg0);
        put_uvar(&mut self.arg1, e.arg1);
        put_uvar(&mut self.arg2, e.arg2);
    }

    pub(super) fn write(&self, mut g: ebpf_columns::Builder<'_>) {
        g.set_kind(&self.kind);
        g.set_pid(&self.pid);
        g.set_tid(&self.tid);
        g.set_cpu(&self.cpu);
        g.set_arg0(&self.arg0);
        g.set_arg1(&self.arg1);
        g.set_arg2(&self.arg2);
    }
}

/// Which group a reader walks: its column names in errors.
pub(super) enum Group {
    Ebpf,
    Software,
}

/// Reads an `ebpfEvents` or `perfSoftware` group back.
pub(super) struct EbpfReader<'a> {
    kind: Col<'a>,
    pid: Col<'a>,
    tid: Col<'a>,
    cpu: Col<'a>,
    arg0: Col<'a>,
    arg1: Col<'a>,
    arg2: Col<'a>,
    kind_error: &'static str,
}

impl<'a> EbpfReader<'a> {
    pub(super) fn new(r: ebpf_columns::Reader<'a>, group: Group) -> Result<Self, BatchError> {
        let names = match group {
            Group::Ebpf => [
                "ebpfEvents.kind",
                "ebpfEvents.pid",
                "ebpfEvents.tid",
                "ebpfEvents.cpu",
                "ebpfEvents.arg0",
                "ebpfEvents.arg1",
                "ebpfEvents.arg2",
            ],
            Group::Software => [
                "perfSoftware.kind",
                "perfSoftware.pid",
                "perfSoftware.tid",
                "perfSoftware.cpu",
                "perfSoftware.arg0",
                "perfSoftware.arg1",
                "perfSoftware.arg2",
            ],
        };
        Ok(EbpfReader {
            kind: Col::new(r.get_kind()?, names[0]),
            pid: Col::new(r.get_pid()?, names[1]),
            tid: Col::new(r.get_tid()?, names[2]),
            cpu: Col::new(r.get_cpu()?, names[3]),
            arg0: Col::new(r.get_arg0()?, names[4]),
            arg1: Col::new(r.get_arg1()?, names[5]),
            arg2: Col::new(r.get_arg2()?, names[6]),
            kind_error: names[0],
        })
    }

    fn row(&mut self, ns: u64) -> Result<Row, BatchError> {
        Ok(Row {
            kind: self.kind.u8()?,
            pid: self.pid.u32()?,
            tid: self.tid.u32()?,
            cpu: self.cpu.u32()?,
            arg0: self.arg0.uvar()?,
            arg1: self.arg1.uvar()?,
            arg2: self.arg2.uvar()?,
            ns,
        })
    }

    /// The next row of the `ebpfEvents` group. Before version 3 no eBPF probe existed: what
    /// the group held came from perf, and is returned as a [`SoftwareRecord`].
    pub(super) fn next_ebpf(
        &mut self,
        ns: u64,
        v3: bool,
    ) -> Result<Result<EbpfEvent, SoftwareRecord>, BatchError> {
        let r = self.row(ns)?;
        if let Some(kind) = SoftwareKind::from_u8(r.kind).filter(|_| !v3) {
            return Ok(Err(r.with_kind(kind)));
        }
        let kind = EbpfKind::from_u8(r.kind).ok_or(BatchError::Columns(self.kind_error))?;
        Ok(Ok(r.with_kind(kind)))
    }

    /// The next row of the `perfSoftware` group.
    pub(super) fn next_software(&mut self, ns: u64) -> Result<SoftwareRecord, BatchError> {
        let r = self.row(ns)?;
        let kind = SoftwareKind::from_u8(r.kind).ok_or(BatchError::Columns(self.kind_error))?;
        Ok(r.with_kind(kind))
    }

    pub(super) fn finish(&self) -> Result<(), BatchError> {
        for c in [
            &self.kind, &self.pid, &self.tid, &self.cpu, &self.arg0, &self.arg1, &self.arg2,
        ] {
            c.finish()?;
        }
        Ok(())
    }
}

impl Row {
    /// The row as a record of `kind` (the kind byte, given meaning).
    fn with_kind<K>(&self, kind: K) -> SystemRecord<K> {
        SystemRecord {
            kind,
            pid: self.pid,
            tid: self.tid,
            cpu: self.cpu,
            arg0: self.arg0,
            arg1: self.arg1,
            arg2: self.arg2,
            ns: self.ns,
        }
    }
}
