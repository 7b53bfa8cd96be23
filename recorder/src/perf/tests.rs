//! Tests of perf streams on this host: software streams run wherever perf_event_open works;
//! hardware streams are exercised through their planning and fallback paths.

use std::path::PathBuf;
use std::time::Duration;

use super::*;

/// perf_event_open may be refused (seccomp, paranoid level, no permission): then skip, saying why.
fn perf_works() -> bool {
    match StepCounters::open_thread(current_tid()) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipping: software perf events cannot be opened here: {e}");
            false
        }
    }
}

fn no_hardware() -> HostPmus {
    let root = PathBuf::from("/nonexistent/devices");
    HostPmus {
        cpu_pmu_name: None,
        intel_pt: Err(format!("no {}", root.join("intel_pt").display())),
        mem_loads: Err(format!(
            "no {}",
            root.join("cpu/events/mem-loads").display()
        )),
        mem_stores: Err(format!(
            "no {}",
            root.join("cpu/events/mem-stores").display()
        )),
        ibs_op: Err(format!("no {}", root.join("ibs_op").display())),
        root,
    }
}

fn config(request: PerfRequest) -> PerfConfig {
    PerfConfig {
        request,
        ..PerfConfig::default()
    }
}

/// Anonymous memory that faults once per 4 KiB page on first touch (no transparent huge pages).
struct Pages {
    ptr: *mut u8,
    len: usize,
}

impl Pages {
    fn new(pages: usize) -> Pages {
        let len = pages * 4096;
        // SAFETY: a fresh private anonymous mapping; checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        // SAFETY: the range was just mapped. Huge pages would fault once per 2 MiB.
        unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
        Pages {
            ptr: ptr.cast(),
            len,
        }
    }

    fn touch(&self, page: usize) {
        // SAFETY: `page` is within the mapping (callers stay below `len / 4096`).
        unsafe { self.ptr.add(page * 4096).write_volatile(1) };
    }

    fn contains(&self, addr: u64) -> bool {
        let start = self.ptr as u64;
        (start..start + self.len as u64).contains(&addr)
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn samples(records: &[PerfRecord], stream: StreamKind) -> Vec<SampleRecord> {
    records
        .iter()
        .filter_map(|r| match r {
            PerfRecord::Sample(s) if s.stream == stream => Some(*s),
            _ => None,
        })
        .collect()
}

fn lost(records: &[PerfRecord]) -> u64 {
    records
        .iter()
        .map(|r| match r {
            PerfRecord::Lost { count, .. } => *count,
            _ => 0,
        })
        .sum()
}

/// This thread's CPU time: on a loaded machine wall time says little about what ran.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn burn(cpu_time: Duration) -> u64 {
    let t = thread_cpu_time();
    let mut x = 1u64;
    while thread_cpu_time() - t < cpu_time {
        for _ in 0..10_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    x
}

#[test]
fn perf_lists_parse_and_unknown_names_are_errors() {
    assert_eq!("auto".parse::<PerfRequest>().unwrap(), PerfRequest::Auto);
    assert_eq!("none".parse::<PerfRequest>().unwrap(), PerfRequest::None);
    assert_eq!(
        "cpu-clock, page-faults,cpu-clock"
            .parse::<PerfRequest>()
            .unwrap(),
        PerfRequest::List(vec![StreamKind::CpuClock, StreamKind::PageFaults])
    );
    let err = "cpu-clock,pt".parse::<PerfRequest>().unwrap_err();
    assert!(err.to_string().contains("`pt`") && err.to_string().contains("intel-pt"));
    assert!("".parse::<PerfRequest>().is_err());
}

#[test]
fn a_host_without_hardware_says_each_fallback_once_and_records_software() {
    if !perf_works() {
        return;
    }
    let (streams, caps) = PerfStreams::open(
        &no_hardware(),
        &config(PerfRequest::Auto),
        &PerfTarget::Thread(current_tid()),
    );
    for n in &caps.notices {
        eprintln!("{n}");
    }
    assert_eq!(
        caps.notices,
        [
            "no Intel PT on this CPU (no /nonexistent/devices/intel_pt): recording cpu-clock IP samples at 1000 Hz instead",
            "no PEBS load samples on this CPU (no /nonexistent/devices/cpu/events/mem-loads): recording page-fault samples with the faulting data address instead",
        ]
    );
    let pt = caps.get("intel_pt").unwrap();
    assert!(pt.requested && !pt.available && !pt.captured);
    assert!(pt.reason.as_deref().unwrap().contains("cpu-clock"));
    assert!(!caps.get("pebs_stores").unwrap().available);
    for name in [
        "cpu_clock",
        "page_faults",
        "context_switches",
        "step_counters",
    ] {
        let c = caps.get(name).unwrap();
        assert!(c.available && c.captured, "{c:?}");
    }
    assert!(
        !caps.get("cpu_clock").unwrap().requested,
        "cpu-clock is a fallback here"
    );
    assert_eq!(
        streams.kinds(),
        [
            StreamKind::PageFaults,
            StreamKind::ContextSwitches,
            StreamKind::StepCounters,
            StreamKind::CpuClock
        ]
    );
}

#[test]
fn hardware_that_fails_to_open_falls_back_with_the_kernel_error() {
    if !perf_works() {
        return;
    }
    let mut pmus = no_hardware();
    // A PMU type no kernel has: perf_event_open refuses it like a PT-less VM would.
    pmus.intel_pt = Ok(PmuEvent {
        pmu: "intel_pt".into(),
        ty: 0x7fff_0000,
        config: 0,
        config1: 0,
        config2: 0,
    });
    let (streams, caps) = PerfStreams::open(
        &pmus,
        &config(PerfRequest::List(vec![StreamKind::IntelPt])),
        &PerfTarget::Thread(current_tid()),
    );
    let pt = caps.get("intel_pt").unwrap();
    assert!(pt.requested && pt.available && !pt.captured, "{pt:?}");
    assert!(caps.notices[0].starts_with("intel-pt could not be opened (perf event intel-pt: "));
    assert!(caps.notices[0].ends_with("recording cpu-clock IP samples at 1000 Hz instead"));
    assert_eq!(streams.kinds(), [StreamKind::CpuClock]);
}

#[test]
fn perf_none_opens_nothing_and_says_so() {
    let (streams, caps) = PerfStreams::open(
        &no_hardware(),
        &config(PerfRequest::None),
        &PerfTarget::Thread(current_tid()),
    );
    assert!(streams.kinds().is_empty() && caps.entries.is_empty());
    assert_eq!(caps.notices.len(), 1);
}

#[test]
fn cpu_clock_samples_carry_this_thread_and_monotonic_times() {
    if !perf_works() {
        return;
    }
    let tid = current_tid();
    let cfg = PerfConfig {
        freq_hz: 4000,
        ..config(PerfRequest::List(vec![StreamKind::CpuClock]))
    };
    let (streams, _) = PerfStreams::open(&no_hardware(), &cfg, &PerfTarget::Thread(tid));
    let start = monotonic_ns();
    streams.enable().unwrap();
    burn(Duration::from_millis(60));
    let mut out = Vec::new();
    streams.stop(&mut out);
    let end = monotonic_ns();
    let s = samples(&out, StreamKind::CpuClock);
    assert!(s.len() >= 10, "only {} samples in 60 ms at 4 kHz", s.len());
    for x in &s {
        assert_eq!(x.tid, tid);
        assert!(x.ip != 0 && x.period > 0);
        assert!(
            (start..=end).contains(&x.ns),
            "{} not in {start}..{end}",
            x.ns
        );
    }
}

#[test]
fn page_fault_samples_give_each_first_touched_address() {
    if !perf_works() {
        return;
    }
    let cfg = config(PerfRequest::List(vec![StreamKind::PageFaults]));
    let (streams, _) = PerfStreams::open(&no_hardware(), &cfg, &PerfTarget::Thread(current_tid()));
    let pages = Pages::new(256);
    streams.enable().unwrap();
    for p in 0..256 {
        pages.touch(p);
    }
    let mut out = Vec::new();
    streams.stop(&mut out);
    let mut hit: Vec<u64> = samples(&out, StreamKind::PageFaults)
        .iter()
        .filter(|s| pages.contains(s.addr))
        .map(|s| (s.addr - pages.ptr as u64) / 4096)
        .collect();
    hit.sort_unstable();
    hit.dedup();
    assert_eq!(hit, (0..256).collect::<Vec<u64>>(), "lost {}", lost(&out));
}

#[test]
fn a_one_page_ring_wraps_many_times_without_losing_or_garbling_records() {
    if !perf_works() {
        return;
    }
    let cfg = PerfConfig {
        ring_pages_exp: 0,
        ..config(PerfRequest::List(vec![StreamKind::PageFaults]))
    };
    let tid = current_tid();
    let (streams, _) = PerfStreams::open(&no_hardware(), &cfg, &PerfTarget::Thread(tid));
    let n = 3000;
    let pages = Pages::new(n);
    let mut out = Vec::with_capacity(2 * n);
    streams.enable().unwrap();
    // ~73 samples fill one page; draining every 16 touches wraps the ring ~40 times at
    // every offset, so records split across the end are reassembled many times.
    for p in 0..n {
        pages.touch(p);
        if p % 16 == 15 {
            streams.drain(&mut out);
        }
    }
    streams.stop(&mut out);
    let s = samples(&out, StreamKind::PageFaults);
    assert!(s.iter().all(|x| x.tid == tid), "a garbled record");
    let inside = s.iter().filter(|x| pages.contains(x.addr)).count();
    assert_eq!(lost(&out), 0);
    assert_eq!(inside, n);
}

#[test]
fn an_undrained_full_ring_reports_lost_records() {
    if !perf_works() {
        return;
    }
    let cfg = PerfConfig {
        ring_pages_exp: 0,
        ..config(PerfRequest::List(vec![StreamKind::PageFaults]))
    };
    let (streams, _) = PerfStreams::open(&no_hardware(), &cfg, &PerfTarget::Thread(current_tid()));
    let n = 2000;
    let pages = Pages::new(n);
    streams.enable().unwrap();
    for p in 0..n - 10 {
        pages.touch(p);
    }
    // The kernel writes its lost-records record once the ring has room again: the recorder's
    // periodic drain makes that room and the next event carries the count.
    let mut out = Vec::new();
    streams.drain(&mut out);
    for p in n - 10..n {
        pages.touch(p);
    }
    streams.stop(&mut out);
    let inside = samples(&out, StreamKind::PageFaults)
        .iter()
        .filter(|x| pages.contains(x.addr))
        .count() as u64;
    let lost = lost(&out);
    eprintln!("{inside} samples kept, {lost} lost");
    assert!(lost > 0);
    assert!(inside + lost >= n as u64);
}

#[test]
fn context_switches_of_a_sleeping_thread_are_recorded() {
    if !perf_works() {
        return;
    }
    let tid = current_tid();
    let cfg = config(PerfRequest::List(vec![StreamKind::ContextSwitches]));
    let (streams, _) = PerfStreams::open(&no_hardware(), &cfg, &PerfTarget::Thread(tid));
    streams.enable().unwrap();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut out = Vec::new();
    streams.stop(&mut out);
    let outs = out
        .iter()
        .filter(|r| matches!(r, PerfRecord::ContextSwitch { tid: t, out: true, .. } if *t == tid))
        .count();
    assert!(outs >= 5, "{outs} switch-outs for 5 sleeps");
}

#[test]
fn per_cpu_streams_follow_threads_created_after_opening() {
    if !perf_works() {
        return;
    }
    let cpus: Vec<u32> =
        (0..std::thread::available_parallelism().map_or(1, |n| n.get()) as u32).collect();
    let cfg = PerfConfig {
        freq_hz: 4000,
        ..config(PerfRequest::List(vec![StreamKind::CpuClock]))
    };
    let target = PerfTarget::ProcessPerCpu {
        pid: std::process::id(),
        cpus,
    };
    let (streams, caps) = PerfStreams::open(&no_hardware(), &cfg, &target);
    if !caps.get("cpu_clock").is_some_and(|c| c.captured) {
        eprintln!(
            "skipping: per-CPU streams cannot be opened here: {:?}",
            caps.notices
        );
        return;
    }
    streams.enable().unwrap();
    let worker = std::thread::spawn(|| {
        burn(Duration::from_millis(60));
        current_tid()
    })
    .join()
    .unwrap();
    let mut out = Vec::new();
    streams.stop(&mut out);
    let from_worker = samples(&out, StreamKind::CpuClock)
        .iter()
        .filter(|s| s.tid == worker)
        .count();
    assert!(from_worker >= 10, "{from_worker} samples from the worker");
}

#[test]
fn step_counters_count_cpu_time_and_faults_of_this_thread() {
    if !perf_works() {
        return;
    }
    let c = StepCounters::open_thread(current_tid()).unwrap();
    let before = c.read().unwrap();
    burn(Duration::from_millis(20));
    let pages = Pages::new(100);
    for p in 0..100 {
        pages.touch(p);
    }
    let after = c.read().unwrap();
    assert!(after.task_clock_ns - before.task_clock_ns >= 15_000_000);
    assert!(after.page_faults - before.page_faults >= 100);
}
