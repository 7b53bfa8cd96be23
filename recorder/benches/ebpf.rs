//! What the eBPF probes cost a recorded pipeline, against the same recording with `--ebpf none`
//! measured in the same run (`ratio = with probes / without`):
//! - criterion: wall time of whole recorded runs (`small`, 4 local stages, 4 x 24 tokens);
//! - interleaved rounds: generation throughput (tokens/s) and the process's CPU time per token,
//!   user and system apart (a probe runs in the kernel, in the context of the traced thread, so
//!   its cost lands in system time);
//! - callgrind (when valgrind is installed): user-space instructions per generated token of a
//!   `tiny` 2-stage and a `small` 4-stage recording (from the difference between a 48- and a
//!   16-token run), and the
//!   one-off cost of loading the probes. Callgrind counts no kernel instructions, so this is the
//!   recorder's side of the probes (draining the ring buffer, writing the events), not the
//!   probes' own: that shows in the system CPU time above.
//!
//! Without root (no probes load) it says so and measures nothing. With
//! `SLUG_EBPF_BENCH_CALLGRIND_ONLY=1` it runs only the callgrind rows.

#[path = "support/tally.rs"]
mod tally;

use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use slug_kernels::ModelConfig;
use slug_recorder::ebpf::EbpfRequest;
use slug_recorder::perf::{PerfConfig, PerfRequest, StreamKind};
use slug_recorder::{RecordConfig, RecordSummary, record};
use slug_transport::pipeline::PipelineConfig;
use tally::Tally;

/// Set in the environment of the bench re-run under callgrind: record once and exit.
const CALLGRIND_CHILD: &str = "SLUG_EBPF_BENCH_CALLGRIND_CHILD";
/// How the re-run under callgrind reports its `ebpf` and `perf_software` events.
const CHILD_EVENTS: &str = "ebpf-bench-events:";
/// Set (to anything) to run only the callgrind rows.
const CALLGRIND_ONLY: &str = "SLUG_EBPF_BENCH_CALLGRIND_ONLY";

fn pipeline(model: &str, stages: usize, tokens: usize) -> PipelineConfig {
    let model = ModelConfig::preset(model).expect("preset");
    let mut p = PipelineConfig::new(model, "benchmark", 4, tokens);
    p.stages = stages;
    p
}

fn record_once(p: &PipelineConfig, out: &Path, ebpf: EbpfRequest) -> RecordSummary {
    let cfg = RecordConfig {
        perf: PerfConfig {
            request: PerfRequest::List(vec![
                StreamKind::CpuClock,
                StreamKind::ContextSwitches,
                StreamKind::StepCounters,
            ]),
            ..PerfConfig::default()
        },
        ebpf,
        ..RecordConfig::new(out)
    };
    let s = record(&cfg, p).expect("record");
    let _ = std::fs::remove_dir_all(out);
    s
}

/// User and system CPU time of this process so far, ns.
fn cpu_ns() -> (u64, u64) {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `u` is a valid rusage to write; RUSAGE_SELF always exists.
    let u = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr());
        u.assume_init()
    };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    (ns(u.ru_utime), ns(u.ru_stime))
}

fn probes_load() -> bool {
    let (session, caps) = slug_recorder::ebpf::EbpfSession::open(
        &EbpfRequest::Auto,
        slug_recorder::endpoint::EBPF_LOST_REASONS,
    );
    if session.is_none() {
        eprintln!(
            "ebpf bench: no probes load here ({:?}); nothing to measure",
            caps.notices
        );
    }
    session.is_some()
}

const ROUNDS: usize = 5;

fn bench_ebpf(c: &mut Criterion) {
    if let Ok(child) = std::env::var(CALLGRIND_CHILD) {
        let mut parts = child.split(':');
        let (mode, tokens, model, stages) = (
            parts.next().expect("MODE"),
            parts.next().expect("TOKENS"),
            parts.next().expect("MODEL"),
            parts.next().expect("STAGES"),
        );
        let ebpf = if mode == "auto" {
            EbpfRequest::Auto
        } else {
            EbpfRequest::None
        };
        let tokens = tokens.parse().expect("a token count");
        let dir = tempfile::tempdir().expect("temp dir");
        let stages = stages.parse().expect("a stage count");
        let s = record_once(
            &pipeline(model, stages, tokens),
            &dir.path().join("t"),
            ebpf,
        );
        let count = |kind: &str| -> u64 {
            s.endpoints
                .iter()
                .flat_map(|e| &e.counts)
                .filter(|(k, _)| k == kind)
                .map(|(_, n)| n)
                .sum()
        };
        eprintln!(
            "{CHILD_EVENTS} {} {}",
            count("ebpf"),
            count("perf_software")
        );
        black_box(s);
        std::process::exit(0);
    }
    if !probes_load() {
        return;
    }
    if std::env::var_os(CALLGRIND_ONLY).is_some() {
        callgrind();
        return;
    }
    let p = pipeline("small", 4, 24);
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("t");
    let (none, auto) = (Tally::default(), Tally::default());
    let mut g = c.benchmark_group("pipeline_small_4_stages_ebpf");
    g.sample_size(10);
    for (name, req, tally) in [
        ("baseline_ebpf_none", EbpfRequest::None, &none),
        ("ebpf_auto", EbpfRequest::Auto, &auto),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    black_box(record_once(&p, &out, req.clone()));
                }
                tally.add(t.elapsed(), iters)
            })
        });
    }
    g.finish();
    if !none.ran() || !auto.ran() {
        return;
    }
    eprintln!(
        "recorded run wall time incl. model build, --ebpf auto vs none: {:.0} vs {:.0} ms: ratio {:.3}",
        auto.per_iter_ns() / 1e6,
        none.per_iter_ns() / 1e6,
        auto.per_iter_ns() / none.per_iter_ns().max(1.0)
    );
    // Interleaved, so the machine's changing load hits both alike.
    let mut rate = [0.0f64; 2];
    let mut cpu = [(0u64, 0u64); 2];
    let mut tokens = [0u64; 2];
    let mut events = [0u64; 2];
    for _ in 0..ROUNDS {
        for (i, req) in [EbpfRequest::None, EbpfRequest::Auto]
            .into_iter()
            .enumerate()
        {
            let before = cpu_ns();
            let s = record_once(&p, &out, req);
            let after = cpu_ns();
            rate[i] += s.tokens_per_s / ROUNDS as f64;
            cpu[i].0 += after.0 - before.0;
            cpu[i].1 += after.1 - before.1;
            tokens[i] += s.tokens.iter().map(|t| t.len() as u64).sum::<u64>();
            events[i] += s.events();
        }
    }
    let per_token = |i: usize, t: u64| t as f64 / tokens[i].max(1) as f64 / 1e3;
    eprintln!(
        "--ebpf auto vs none (small, 4 local stages, {ROUNDS} interleaved rounds):\n  \
         tokens/s {:.1} vs {:.1}: ratio {:.3}\n  \
         CPU per token: user {:.1} vs {:.1} us (ratio {:.3}), system {:.1} vs {:.1} us (ratio {:.3})\n  \
         events per run {} vs {}",
        rate[1],
        rate[0],
        rate[1] / rate[0],
        per_token(1, cpu[1].0),
        per_token(0, cpu[0].0),
        cpu[1].0 as f64 / cpu[0].0.max(1) as f64,
        per_token(1, cpu[1].1),
        per_token(0, cpu[0].1),
        cpu[1].1 as f64 / cpu[0].1.max(1) as f64,
        events[1] / ROUNDS as u64,
        events[0] / ROUNDS as u64,
    );
    callgrind();
}

/// User-space instructions of recordings with and without probes, under callgrind, at two
/// lengths: the difference per generated token is the steady cost, the rest is one-off (loading
/// the probes parses the kernel's BTF in user space). `tiny` on 2 stages shows the fixed cost per
/// stage step (its steps are almost free); `small` on 4 stages is the pipeline the contract is
/// about.
fn callgrind() {
    callgrind_of("tiny", 2);
    callgrind_of("small", 4);
}

/// Threads of a recording, by what they ran (callgrind writes one profile per thread).
#[derive(Debug, Clone, Copy, Default)]
struct Groups {
    /// The pipeline: stage threads, their pools, the main thread.
    pipeline: u64,
    /// The eBPF session's reader (`drain_loop`), only with probes.
    reader: u64,
    /// The endpoints' writers and log encoders.
    recorder: u64,
}

impl Groups {
    fn total(&self) -> u64 {
        self.pipeline + self.reader + self.recorder
    }

    /// Sums the per-thread profiles `base-01`, `base-02`, ... into groups.
    fn read(base: &Path) -> Option<Groups> {
        let dir = base.parent()?;
        let name = base.file_name()?.to_str()?;
        let mut g = Groups::default();
        let mut threads = 0;
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let file = entry.file_name();
            let Some(suffix) = file.to_str().and_then(|f| f.strip_prefix(name)) else {
                continue;
            };
            if !suffix.starts_with('-') {
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).ok()?;
            let total = text
                .lines()
                .find_map(|l| l.strip_prefix("summary: ").or(l.strip_prefix("totals: ")))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())?;
            let slot = if text.contains("slug_recorder::ebpf::drain_loop") {
                &mut g.reader
            } else if ["writer_loop", "encode_loop"]
                .iter()
                .any(|f| text.contains(f))
            {
                &mut g.recorder
            } else {
                &mut g.pipeline
            };
            *slot += total;
            threads += 1;
        }
        (threads > 0).then_some(g)
    }
}

fn callgrind_of(model: &str, stages: usize) {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("callgrind: valgrind is not installed; no instruction counts");
        return;
    }
    let exe = std::env::current_exe().expect("the bench executable");
    let dir = tempfile::tempdir().expect("temp dir");
    const SHORT: usize = 16;
    const LONG: usize = 48;
    let mut ir = [[Groups::default(); 2]; 2];
    // The probes' events (with probes) or perf's software records (without), per run.
    let mut system_events = [[0u64; 2]; 2];
    for (i, mode) in ["none", "auto"].into_iter().enumerate() {
        for (j, tokens) in [SHORT, LONG].into_iter().enumerate() {
            let out = dir.path().join(format!("callgrind.{mode}.{tokens}"));
            let status = Command::new("valgrind")
                .arg("--tool=callgrind")
                .arg("--separate-threads=yes")
                .arg(format!("--callgrind-out-file={}", out.display()))
                .arg(&exe)
                .arg("--bench")
                .env(CALLGRIND_CHILD, format!("{mode}:{tokens}:{model}:{stages}"))
                .output();
            match (status, Groups::read(&out)) {
                (Ok(o), _) if !o.status.success() => {
                    eprintln!(
                        "callgrind --ebpf {mode}: the recording failed: {}",
                        String::from_utf8_lossy(&o.stderr)
                            .lines()
                            .last()
                            .unwrap_or("")
                    );
                    return;
                }
                (Ok(o), Some(g)) => {
                    ir[i][j] = g;
                    let counts = String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .find_map(|l| l.strip_prefix(CHILD_EVENTS).map(str::to_owned))
                        .unwrap_or_default();
                    let counts: Vec<u64> = counts
                        .split_whitespace()
                        .filter_map(|n| n.parse().ok())
                        .collect();
                    system_events[i][j] = counts.get(1 - i).copied().unwrap_or(0);
                }
                (Ok(_), None) => {
                    eprintln!("callgrind --ebpf {mode}: no instruction counts in its output");
                    return;
                }
                (Err(e), _) => {
                    eprintln!("callgrind: cannot run valgrind: {e}");
                    return;
                }
            }
        }
    }
    // 4 sequences each.
    let per_token = |m: [Groups; 2], f: fn(&Groups) -> u64| {
        f(&m[1]) as f64 - f(&m[0]) as f64
    } / (4 * (LONG - SHORT)) as f64;
    let row = |label: &str, f: fn(&Groups) -> u64| {
        let (none, auto) = (per_token(ir[0], f), per_token(ir[1], f));
        eprintln!(
            "  {label:<34} {auto:>9.0} vs {none:>9.0}: ratio {:.4}",
            auto / none.max(1.0)
        );
        (none, auto)
    };
    eprintln!(
        "callgrind ({model}, {stages} local stages, 4 sequences; user-space instructions per \
         generated token (48 vs 16 tokens), --ebpf auto vs none; the kernel's not counted):"
    );
    let (none, auto) = row("whole process", Groups::total);
    let pipeline = row("pipeline threads (stages, pools)", |g| g.pipeline);
    let reader = per_token(ir[1], |g| g.reader);
    eprintln!("  {:<34} {reader:>9.0}", "eBPF reader thread");
    row("endpoint writers, log encoders", |g| g.recorder);
    eprintln!(
        "  the probes' own user-space cost (pipeline threads' difference + reader): {:.0} per \
         token, ratio {:.4}\n  \
         (the writers journal what they drained every 2 ms of wall time, and under valgrind wall \
         time follows the machine's load: their row swings in either run)",
        pipeline.1 - pipeline.0 + reader,
        (none + pipeline.1 - pipeline.0 + reader) / none.max(1.0)
    );
    let events = |m: [u64; 2]| m[1].saturating_sub(m[0]) as f64 / (4 * (LONG - SHORT)) as f64;
    eprintln!(
        "  probe events per token {:.1} (perf software records without probes {:.1}); under \
         valgrind the stage threads also block and make syscalls for valgrind itself",
        events(system_events[1]),
        events(system_events[0])
    );
    let one_off =
        ir[1][0].total() as f64 - ir[0][0].total() as f64 - (auto - none) * (4 * SHORT) as f64;
    eprintln!(
        "  one-off with probes (load, BTF parse, attach, detach): {:.1} M instructions",
        one_off / 1e6
    );
}

criterion_group!(benches, bench_ebpf);
criterion_main!(benches);
