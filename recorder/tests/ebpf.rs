//! The eBPF probes on this kernel: a thread that sleeps in a known syscall is seen in that
//! syscall for that long, inside the span the thread measured on the same clock; the off-CPU
//! intervals agree with perf's context-switch records; syscalls are counted per step exactly,
//! and none vanishes while steps race past the reader.
//! Loading probes needs root (or CAP_BPF + CAP_PERFMON); without it each test prints why it
//! skipped.

use std::time::Duration;

use slug_recorder::ebpf::{EbpfRequest, EbpfSession, LostReasons};
use slug_recorder::perf::{
    PerfConfig, PerfRecord, PerfRequest, PerfStreams, PerfTarget, StreamKind, current_tid,
    monotonic_ns, probe,
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
    // Each sleep's span as this thread saw it, on the clock the probes use: what the kernel
    // saw must lie inside it, however loaded the machine is.
    let mut spans = Vec::new();
    for _ in 0..3 {
        let before = monotonic_ns();
        std::thread::sleep(Duration::from_millis(30));
        spans.push(before..monotonic_ns());
    }
    s.stop();
    let inside = |start: u64, len: u64| {
        spans
            .iter()
            .any(|s| s.start <= start && start + len <= s.end)
    };
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
            b.arg2 >= 30_000_000 && inside(b.ns, b.arg2),
            "a 30 ms sleep took {} ns from {} in the kernel; the sleeps took {spans:?}",
            b.arg2,
            b.ns
        );
        assert_eq!(b.arg1, 0, "clock_nanosleep returned 0");
    }
    // Blocked intervals only: on a loaded machine the thread may also be preempted inside the
    // call (task state 0), on its way in or out, which is a real off-CPU interval of its own.
    let waits: Vec<_> = ebpf
        .iter()
        .filter(|b| {
            b.kind == EbpfKind::OffCpu && b.arg1 >> 32 == CLOCK_NANOSLEEP + 1 && b.arg1 as u32 != 0
        })
        .collect();
    assert_eq!(
        waits.len(),
        3,
        "three blocked intervals in clock_nanosleep: {ebpf:?}"
    );
    for b in &waits {
        assert!(
            b.arg0 >= 29_000_000 && inside(b.ns, b.arg0),
            "off the CPU for {} ns from {} in a 30 ms sleep; the sleeps took {spans:?}",
            b.arg0,
            b.ns
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
    // A sleep need not switch out: in a VM whose virtual CPU the host stops for longer than the
    // sleep (steal time), the timer has fired before the thread gets to block. Sleeps of 1 ms
    // make that rare, not impossible, so perf must see most of them, and eBPF what perf saw.
    for i in 0..200u64 {
        std::thread::sleep(Duration::from_millis(1));
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
        perf_outs >= 180,
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

#[cfg(target_arch = "x86_64")]
#[test]
fn every_per_step_call_is_counted_in_a_step_or_as_lost() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};

    let Some(s) = session("syscalls") else {
        return;
    };
    let step = s
        .step_counter(0)
        .expect("the first endpoint of a session gets a step counter");
    // One thread writes while this one moves the step on as fast as it can, often past the
    // slots the reader has not collected yet, and while the reader closes the slots the writes
    // count into: no write may vanish, each is in a step's histogram or counted lost.
    const WRITES: u64 = 20_000;
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let writer = {
        let s = std::sync::Arc::clone(&s);
        let done = std::sync::Arc::clone(&done);
        std::thread::spawn(move || {
            s.route(current_tid(), 0);
            let mut null = std::fs::File::create("/dev/null").unwrap();
            for _ in 0..WRITES {
                null.write_all(b"x").unwrap();
            }
            done.store(true, Ordering::Release);
        })
    };
    let mut k = 0u64;
    while !done.load(Ordering::Acquire) {
        k += 1;
        step.store(k, Ordering::Release);
        std::hint::black_box((0..200u64).sum::<u64>());
    }
    writer.join().unwrap();
    s.stop();
    let mut events = Vec::new();
    s.take(0, &mut events);
    let (mut counted, mut lost) = (0u64, 0u64);
    for e in &events {
        match e {
            Event::Ebpf(b)
                if b.kind == EbpfKind::SyscallHistogram && b.arg1 >> 8 != 0 && b.arg0 == WRITE =>
            {
                assert!(
                    (b.arg1 >> 8) - 1 <= k,
                    "a histogram of a step not run: {b:?}"
                );
                counted += b.arg2;
            }
            Event::LostEvents(l) if l.reason == REASONS.step_behind => lost += l.count,
            _ => {}
        }
    }
    println!("{WRITES} writes over {k} steps: {counted} counted in steps, {lost} lost");
    assert_eq!(counted + lost, WRITES, "writes counted per step or lost");
}
