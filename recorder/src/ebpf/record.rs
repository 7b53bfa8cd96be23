//! The probes' ring-buffer record (`struct record` in `probes.bpf.c`) and its trace event.

use slug_schema::{EbpfEvent, EbpfKind, Event};

/// One record as the probes write it: 48 bytes, little-endian, fields in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeRecord {
    /// CLOCK_MONOTONIC ns (an interval's or syscall's start).
    pub ns: u64,
    /// First argument (see [`EbpfKind`]).
    pub arg0: u64,
    /// Second argument.
    pub arg1: u64,
    /// Third argument.
    pub arg2: u64,
    /// `EbpfKind` value.
    pub kind: u32,
    /// Thread id.
    pub tid: u32,
    /// CPU the probe ran on.
    pub cpu: u32,
}

impl ProbeRecord {
    /// Bytes of one record.
    pub const SIZE: usize = 48;

    /// Reads a record; `None` if `bytes` is too short.
    pub fn parse(bytes: &[u8]) -> Option<ProbeRecord> {
        let b = bytes.get(..Self::SIZE)?;
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        Some(ProbeRecord {
            ns: u64_at(0),
            arg0: u64_at(8),
            arg1: u64_at(16),
            arg2: u64_at(24),
            kind: u32_at(32),
            tid: u32_at(36),
            cpu: u32_at(40),
        })
    }

    /// The trace event; migrations get arg2 = 1 when the two CPUs are on different NUMA nodes
    /// of `cpu_node` (index: CPU).
    pub fn to_event(&self, tgid: u32, cpu_node: &[Option<u32>]) -> Event {
        let kind = u8::try_from(self.kind)
            .ok()
            .and_then(EbpfKind::from_u8)
            .unwrap_or(EbpfKind::Syscall);
        let node = |cpu: u64| {
            usize::try_from(cpu)
                .ok()
                .and_then(|c| cpu_node.get(c).copied().flatten())
        };
        let arg2 = if kind == EbpfKind::Migration {
            match (node(self.arg0), node(self.arg1)) {
                (Some(a), Some(b)) => u64::from(a != b),
                _ => 0,
            }
        } else {
            self.arg2
        };
        Event::Ebpf(EbpfEvent {
            kind,
            pid: tgid,
            tid: self.tid,
            cpu: self.cpu,
            arg0: self.arg0,
            arg1: self.arg1,
            arg2,
            ns: self.ns,
        })
    }
}
