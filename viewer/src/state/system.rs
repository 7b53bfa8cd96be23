//! What the viewer reads into the schema's eBPF events and perf software records: labels, the
//! arguments by meaning, why a thread was off the CPU, syscall names.
//!
//! The records themselves are the schema's ([`EbpfEvent`], [`SoftwareRecord`]); their kind says
//! what the three arguments hold (see [`EbpfKind`] and [`SoftwareKind`]).

use slug_schema::{EbpfEvent, EbpfKind, SoftwareKind, SoftwareRecord};

use crate::state::event::format_duration;

/// For an off-CPU interval: what the thread waited on (`futex`, `preempted`, `blocked`).
pub fn waited_on(e: &EbpfEvent) -> Option<String> {
    if e.kind != EbpfKind::OffCpu {
        return None;
    }
    let state = e.arg1 as u32;
    let syscall = e.arg1 >> 32;
    Some(match (state, syscall) {
        (0, _) => "preempted".to_string(),
        (_, 0) => "blocked".to_string(),
        (_, nr) => syscall_name(nr - 1),
    })
}

/// A short label: `off-cpu futex 1.2ms`, `write 3ms`, `migration cpu 1->3 (NUMA node)`.
pub fn ebpf_label(e: &EbpfEvent) -> String {
    match e.kind {
        EbpfKind::OffCpu => format!(
            "off-cpu {} {}",
            waited_on(e).unwrap_or_default(),
            format_duration(e.arg0)
        ),
        EbpfKind::Syscall => format!("{} {}", syscall_name(e.arg0), format_duration(e.arg2)),
        EbpfKind::SyscallHistogram => format!(
            "{} x{} ~{}",
            syscall_name(e.arg0),
            e.arg2,
            format_duration(1u64 << (e.arg1 & 0xff).min(63))
        ),
        EbpfKind::Migration => format!(
            "migration cpu {}->{}{}",
            e.arg0,
            e.arg1,
            if e.arg2 == 1 { " (NUMA node)" } else { "" }
        ),
        other => other.name().to_string(),
    }
}

/// An eBPF event's arguments by meaning, for the detail pane and exports.
pub fn describe_ebpf(e: &EbpfEvent, out: &mut Vec<(&'static str, String)>) {
    let a = e.args();
    match e.kind {
        EbpfKind::OffCpu => {
            out.push(("off cpu for", format_duration(a[0])));
            out.push(("waited on", waited_on(e).unwrap_or_default()));
            out.push(("task state", format!("{:#x}", a[1] as u32)));
            out.push((
                "woken by tid",
                if a[2] == 0 {
                    "not seen".into()
                } else {
                    a[2].to_string()
                },
            ));
        }
        EbpfKind::Syscall => {
            out.push(("syscall", syscall_name(a[0])));
            out.push(("returned", (a[1] as i64).to_string()));
            out.push(("took", format_duration(a[2])));
        }
        EbpfKind::SyscallHistogram => {
            out.push(("syscall", syscall_name(a[0])));
            let bucket = a[1] & 0xff;
            out.push((
                "took",
                format!(
                    "{} to {}",
                    format_duration(1u64 << bucket.min(63)),
                    format_duration(1u64 << (bucket + 1).min(63))
                ),
            ));
            if a[1] >> 8 != 0 {
                out.push(("step", ((a[1] >> 8) - 1).to_string()));
            }
            out.push(("calls", a[2].to_string()));
        }
        EbpfKind::PageFault => {
            out.push(("address", format!("{:#x}", a[0])));
            out.push(("ip", format!("{:#x}", a[1])));
            out.push(("error code", format!("{:#x}", a[2])));
        }
        EbpfKind::TcpRetransmit | EbpfKind::TcpDrop => {
            out.push(("local port", (a[0] >> 16).to_string()));
            out.push(("remote port", (a[0] & 0xffff).to_string()));
            if e.kind == EbpfKind::TcpDrop {
                out.push(("drop reason", a[1].to_string()));
            }
        }
        EbpfKind::Migration => {
            out.push(("from cpu", a[0].to_string()));
            out.push(("to cpu", a[1].to_string()));
            out.push(("NUMA node changed", (a[2] == 1).to_string()));
        }
    }
}

/// A perf software record's arguments by meaning, for the detail pane.
pub fn describe_software(e: &SoftwareRecord, out: &mut Vec<(&'static str, String)>) {
    match e.kind {
        SoftwareKind::ContextSwitch => {
            out.push(("tid out", e.arg0.to_string()));
            out.push(("tid in", e.arg1.to_string()));
            out.push(("blocked", (e.arg2 == 1).to_string()));
        }
        SoftwareKind::PageFault => {
            out.push(("address", format!("{:#x}", e.arg0)));
            out.push(("ip", format!("{:#x}", e.arg1)));
        }
    }
}

/// The name of x86-64 syscall `nr` for the ones a pipeline stage makes, else `syscall N`.
pub fn syscall_name(nr: u64) -> String {
    let name = match nr {
        0 => "read",
        1 => "write",
        7 => "poll",
        9 => "mmap",
        10 => "mprotect",
        11 => "munmap",
        20 => "writev",
        23 => "select",
        24 => "sched_yield",
        28 => "madvise",
        35 => "nanosleep",
        44 => "sendto",
        45 => "recvfrom",
        46 => "sendmsg",
        47 => "recvmsg",
        202 => "futex",
        230 => "clock_nanosleep",
        232 => "epoll_wait",
        270 => "pselect6",
        271 => "ppoll",
        281 => "epoll_pwait",
        310 => "process_vm_readv",
        311 => "process_vm_writev",
        _ => return format!("syscall {nr}"),
    };
    name.to_string()
}
