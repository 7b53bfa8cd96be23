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

    /// The trace event (`None` for a kind this build does not know); migrations get arg2 = 1
    /// when the two CPUs are on different NUMA nodes of `cpu_node` (index: CPU).
    pub fn to_event(&self, tgid: u32, cpu_node: &[Option<u32>]) -> Option<Event> {
        let kind = u8::try_from(self.kind).ok().and_then(EbpfKind::from_u8)?;
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
        Some(Event::Ebpf(EbpfEvent {
            kind,
            pid: tgid,
            tid: self.tid,
            cpu: self.cpu,
            arg0: self.arg0,
            arg1: self.arg1,
            arg2,
            ns: self.ns,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(kind: u32, arg0: u64, arg1: u64) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [5_000u64, arg0, arg1, 7] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for v in [kind, 42, 3, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    #[test]
    fn records_parse_and_migrations_say_whether_the_numa_node_changed() {
        let nodes = [Some(0), Some(0), Some(1), Some(1)];
        let across = ProbeRecord::parse(&bytes(3, 1, 2)).unwrap();
        assert_eq!((across.ns, across.tid, across.cpu), (5_000, 42, 3));
        let Some(Event::Ebpf(e)) = across.to_event(9, &nodes) else {
            panic!("a migration event");
        };
        assert_eq!(
            (e.kind, e.pid, e.arg0, e.arg1, e.arg2),
            (EbpfKind::Migration, 9, 1, 2, 1)
        );
        let within = ProbeRecord::parse(&bytes(3, 2, 3)).unwrap();
        assert!(matches!(within.to_event(9, &nodes), Some(Event::Ebpf(e)) if e.arg2 == 0));
        let off_cpu = ProbeRecord::parse(&bytes(1, 100, 203 << 32)).unwrap();
        assert!(matches!(off_cpu.to_event(9, &nodes), Some(Event::Ebpf(e)) if e.arg2 == 7));
    }

    #[test]
    fn short_records_and_unknown_kinds_are_dropped() {
        assert_eq!(ProbeRecord::parse(&bytes(1, 0, 0)[..47]), None);
        let unknown = ProbeRecord::parse(&bytes(99, 0, 0)).unwrap();
        assert_eq!(unknown.to_event(9, &[]), None);
    }
}
