//! The eBPF probes on this kernel: a thread that sleeps in a known syscall is seen in that
//! syscall for that long, and the off-CPU intervals agree with perf's context-switch records.
//! Loading probes needs root (or CAP_BPF + CAP_PERFMON); without it each test prints why it
//! skipped.

use std::time::Duration;

use slug_recorder::ebpf::{EbpfRequest, EbpfSession, LostReasons};
use slug_recorder::perf::{
    PerfConfig, PerfRecord, PerfRequest, PerfStreams, PerfTarget, StreamKind, current_tid, probe,
};
use slug_schema::{EbpfKind, Event};

/// x86-64 `clock_nanosleep`, which `std::thread::sleep` calls.
#[cfg(target_arch = "x86_64")]
const CLOCK_NANOSLEEP: u64 = 230;

const REASONS: LostReasons = LostReasons {
    ring_full: 1,
    map_full: 2,
    outbox_full: 3,
    step_behind: 4,
};

fn session(request: &str) -> Option<std::sync::Arc<EbpfSession>> {
    let (session, caps) = EbpfSession::open(&request.parse::<EbpfRequest>().unwrap(), REASONS);
    if session.is_none() {
        println!("skipped: no eBPF probes here: {:?}", caps.notices);
    }
    session
}

#[cfg(target_arch = "x86_64")]
#[test]
fn a_thread_sleeping_in_clock_nanosleep_is_seen_there_for_as_long() {
    let Some(s) = session("off-cpu,syscalls") else {
        return;
    };
    let tid = current_tid();
    s.route(tid, 0);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(30));
    }
    s.stop();
    let mut events = Vec::new();
    s.take(0, &mut events);
    let ebpf: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Ebpf(b) if b.tid == tid => Some(*b),
            _ => None,
        })
        .collect();
    let sleeps: Vec<_> = ebpf
        .iter()
        .filter(|b| b.kind == EbpfKind::Syscall && b.arg0 == CLOCK_NANOSLEEP)
        .collect();
    assert_eq!(
        sleeps.len(),
        3,
        "three slow clock_nanosleep calls: {ebpf:?}"
    );
    for b in &sleeps {
        assert!(
            (30_000_000..60_000_000).contains(&b.arg2),
            "a 30 ms sleep took {} ns in the kernel",
            b.arg2
        );
        assert_eq!(b.arg1, 0, "clock_nanosleep returned 0");
    }
    let waits: Vec<_> = ebpf
        .iter()
        .filter(|b| b.kind == EbpfKind::OffCpu && b.arg1 >> 32 == CLOCK_NANOSLEEP + 1)
        .collect();
    assert_eq!(
        waits.len(),
        3,
        "three blocked intervals in clock_nanosleep: {ebpf:?}"
    );
    for b in &waits {
        assert!(
            (29_000_000..60_000_000).contains(&b.arg0),
            "off the CPU for {} ns in a 30 ms sleep",
            b.arg0
        );
        assert_ne!(
            b.arg1 as u32, 0,
            "a sleep blocks: its task state is not 0 (preempted)"
        );
    }
}

#[test]
fn off_cpu_intervals_agree_with_perf_context_switches() {
    let Some(s) = session("off-cpu") else {
        return;
    };
    let tid = current_tid();
    let pmus = probe().unwrap();
    let config = PerfConfig {
        request: PerfRequest::List(vec![StreamKind::ContextSwitches]),
        ..PerfConfig::default()
    };
    let (perf, caps) = PerfStreams::open(&pmus, &config, &PerfTarget::Thread(tid));
    if !perf.kinds().contains(&StreamKind::ContextSwitches) {
        println!(
            "skipped: no perf context-switch records here: {:?}",
            caps.notices
        );
        return;
    }
    s.route(tid, 0);
    perf.enable().unwrap();
    // Block often (sleeps) and burn a little CPU in between, so both kinds of switch happen.
    for i in 0..200u64 {
        std::thread::sleep(Duration::from_micros(200));
        std::hint::black_box((0..2_000 + i).sum::<u64>());
    }
    let mut records = Vec::new();
    perf.stop(&mut records);
    s.stop();
    let perf_outs = records
        .iter()
        .filter(|r| matches!(r, PerfRecord::ContextSwitch { out: true, tid: t, .. } if *t == tid))
        .count();
    let mut events = Vec::new();
    s.take(0, &mut events);
    let ebpf_outs = events
        .iter()
        .filter(|e| matches!(e, Event::Ebpf(b) if b.kind == EbpfKind::OffCpu && b.tid == tid))
        .count();
    println!("200 sleeps: perf saw {perf_outs} switch-outs, eBPF {ebpf_outs} off-CPU intervals");
    assert!(
        perf_outs >= 200,
        "perf saw {perf_outs} switch-outs of 200 sleeps"
    );
    let diff = perf_outs.abs_diff(ebpf_outs) as f64 / perf_outs as f64;
    assert!(
        diff <= 0.10,
        "eBPF saw {ebpf_outs} off-CPU intervals, perf {perf_outs} switch-outs ({:.1}% apart)",
        diff * 100.0
    );
}

/// x86-64 `write`, one of the syscalls counted per step.
#[cfg(target_arch = "x86_64")]
const WRITE: u64 = 1;

#[cfg(target_arch = "x86_64")]
#[test]
fn syscalls_are_counted_per_step_in_the_kernel() {
    use std::io::Write;
    use std::sync::atomic::Ordering;

    let Some(s) = session("syscalls") else {
        return;
    };
    let step = s
        .step_counter(0)
        .expect("the first endpoint of a session gets a step counter");
    let tid = current_tid();
    s.route(tid, 0);
    let mut null = std::fs::File::create("/dev/null").unwrap();
    // Step k makes 3k + 1 writes; step 2 is long enough that the drain thread reads earlier
    // steps while later ones run.
    let steps = 6u64;
    for k in 0..steps {
        step.store(k, Ordering::Release);
        for _ in 0..3 * k + 1 {
            null.write_all(b"x").unwrap();
        }
        if k == 2 {
            std::thread::sleep(Duration::from_millis(30));
        }
    }
    s.stop();
    let mut events = Vec::new();
    s.take(0, &mut events);
    let mut writes = vec![0u64; steps as usize];
    for e in &events {
        if let Event::Ebpf(b) = e
            && b.kind == EbpfKind::SyscallHistogram
            && b.arg1 >> 8 != 0
        {
            assert_eq!(b.tid, 0, "a per-step histogram covers the stage: {b:?}");
            let k = (b.arg1 >> 8) - 1;
            assert!(
                k < steps,
                "a histogram of step {k}, only 0..{steps} ran: {b:?}"
            );
            if b.arg0 == WRITE {
                writes[k as usize] += b.arg2;
            }
        }
    }
    let expected: Vec<u64> = (0..steps).map(|k| 3 * k + 1).collect();
    assert_eq!(
        writes, expected,
        "write calls per step, counted in the kernel"
    );
}
