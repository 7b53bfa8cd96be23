//! End-to-end recording of a tiny local pipeline: what the trace holds, payload policies, and
//! refusals of unusable output directories.

use slug_kernels::ModelConfig;
use slug_recorder::observe::PayloadPolicy;
use slug_recorder::perf::{PerfConfig, PerfRequest};
use slug_recorder::{RecordConfig, RecorderError, record};
use slug_schema::{Event, EventKind, KindSet, LogReader, TimeRange, Trace};
use slug_transport::pipeline::{NoObservers, PipelineConfig, run};

fn pipeline(stages: usize, tokens: usize) -> PipelineConfig {
    let mut cfg = PipelineConfig::new(ModelConfig::preset("tiny").unwrap(), "hi", 2, tokens);
    cfg.stages = stages;
    cfg
}

fn config(out: &std::path::Path) -> RecordConfig {
    RecordConfig {
        // Software streams only where perf works; the recording must not depend on them.
        perf: PerfConfig {
            request: PerfRequest::Auto,
            ..PerfConfig::default()
        },
        ..RecordConfig::new(out)
    }
}

fn events(trace: &Trace, endpoint: u32, kind: EventKind) -> Vec<Event> {
    let log: LogReader = trace.endpoint_log(endpoint).unwrap();
    assert!(log.recovery().is_clean(), "{:?}", log.recovery());
    log.events_in(TimeRange::ALL, KindSet::of(&[kind]))
        .map(|e| e.unwrap())
        .collect()
}

#[test]
fn a_recorded_run_has_the_same_tokens_and_logs_every_transfer_and_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace");
    let p = pipeline(2, 4);
    let plain = run(&p, &NoObservers).unwrap();
    let summary = record(&config(&out), &p).unwrap();
    assert_eq!(summary.tokens, plain.tokens, "recording changed the tokens");
    for n in &summary.notices {
        eprintln!("{n}");
    }
    let trace = Trace::open(&out).unwrap();
    let m = trace.manifest();
    assert_eq!(m.endpoints.len(), 2);
    assert!(m.topology[0].cpus >= 1);
    assert!(m.capabilities.iter().any(|c| c.name == "intel_pt"));
    // Both ends log each transfer under the same id, with the same content hash.
    let sent = events(&trace, 0, EventKind::Transfer);
    let got = events(&trace, 1, EventKind::Transfer);
    assert!(!sent.is_empty() && !got.is_empty());
    let mut twins = 0;
    for e in &got {
        let Event::Transfer(r) = e else {
            unreachable!()
        };
        assert_eq!(r.payload, None, "--payloads none stores no payload");
        let twin = sent.iter().find_map(|s| match s {
            Event::Transfer(s) if s.id == r.id && s.direction != r.direction => Some(s),
            _ => None,
        });
        if let Some(s) = twin {
            assert_eq!((s.hash, s.len), (r.hash, r.len));
            twins += 1;
        }
    }
    // Stage 0 sends activations to stage 1: every one of them arrived with the same hash.
    assert!(twins >= 4, "{twins} transfers matched on both ends");
    let spans = events(&trace, 1, EventKind::KernelSpan);
    assert!(spans.len() > 10);
    assert!(!events(&trace, 0, EventKind::StepBoundary).is_empty());
    // The flight rings are gone after a clean close.
    let rings = slug_recorder::endpoint::ring_files(&out.join("endpoints")).unwrap();
    assert!(rings.is_empty(), "{rings:?}");
    assert!(summary.events() > 0 && summary.compression_ratio() > 1.0);
}

#[test]
fn payloads_all_stores_every_transfer_once_by_content() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace");
    let cfg = RecordConfig {
        payloads: PayloadPolicy::All,
        perf: PerfConfig {
            request: PerfRequest::None,
            ..PerfConfig::default()
        },
        ..RecordConfig::new(&out)
    };
    record(&cfg, &pipeline(2, 3)).unwrap();
    let trace = Trace::open(&out).unwrap();
    let store = slug_schema::blob::BlobStore::open(out.join(slug_schema::PAYLOADS_DIR), 1).unwrap();
    let recv = events(&trace, 1, EventKind::Transfer);
    assert!(!recv.is_empty());
    for e in recv {
        let Event::Transfer(t) = e else {
            unreachable!()
        };
        let hash = t.payload.expect("payload recorded");
        let bytes = store.get(hash, t.len).unwrap();
        assert_eq!(bytes.len() as u64, t.len);
        assert_eq!(xxhash_rust::xxh3::xxh3_128(&bytes), t.hash);
    }
}

#[test]
fn unusable_output_directories_are_refused_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(1, 2);
    let missing_parent = dir.path().join("no/such/trace");
    let err = record(&config(&missing_parent), &p).unwrap_err();
    assert!(matches!(err, RecorderError::OutputDir { .. }), "{err}");
    assert!(err.to_string().contains("does not exist"));
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep"), b"x").unwrap();
    let err = record(&config(&full), &p).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    assert!(full.join("keep").exists());
    let forced = RecordConfig {
        force: true,
        ..config(&full)
    };
    // --force replaces only a slug trace: a directory of other files is refused and kept.
    let err = record(&forced, &p).unwrap_err();
    assert!(err.to_string().contains("not a slug trace"), "{err}");
    assert_eq!(std::fs::read(full.join("keep")).unwrap(), b"x");
    let trace = dir.path().join("trace");
    record(&config(&trace), &p).unwrap();
    let forced = RecordConfig {
        force: true,
        ..config(&trace)
    };
    record(&forced, &p).unwrap();
}

/// Whether `slug recover` of the trace at `out`, as it is this moment (its recorder frozen),
/// would take some of endpoint `endpoint`'s events from its flight rings: found by recovering a
/// copy, so the trace itself is left as the kill will leave it.
fn rings_hold_unwritten(out: &std::path::Path, endpoint: u32) -> bool {
    fn copy(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            let target = to.join(entry.file_name());
            if kind.is_dir() {
                copy(&entry.path(), &target);
            } else if kind.is_file() {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let scratch = tempfile::tempdir().unwrap();
    let copied = scratch.path().join("trace");
    copy(out, &copied);
    slug_recorder::recover(&copied).is_ok_and(|report| {
        report
            .endpoints
            .iter()
            .any(|r| r.endpoint == endpoint && r.from_rings > 0)
    })
}

/// A recording process killed with SIGKILL mid-run: the logs read up to their last whole frame
/// and `recover` adds what the flight rings still held, leaving clean logs.
#[test]
fn a_recording_killed_mid_run_is_recovered_from_its_rings() {
    if let Ok(out) = std::env::var("SLUG_RECORD_CHILD") {
        let mut p = pipeline(2, 100);
        p.prompts = vec![vec![104, 105]; 64];
        p.microbatches = 2;
        let cfg = RecordConfig {
            perf: PerfConfig {
                request: PerfRequest::None,
                ..PerfConfig::default()
            },
            // Small rings: the writer cuts frames early to keep them from filling, so the kill
            // finds events both in the log's frames and in the rings.
            ring_records: 4096,
            ..RecordConfig::new(&out)
        };
        record(&cfg, &p).unwrap();
        std::process::exit(0);
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_recording_killed_mid_run_is_recovered_from_its_rings",
        ])
        .env("SLUG_RECORD_CHILD", &out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let log = out.join("endpoints/1.slog");
    let start = std::time::Instant::now();
    // Wait until the writer has written frames of a good part of the run and endpoint 1's rings
    // hold events its log does not, then kill. The child is frozen (SIGSTOP) while a copy of the
    // trace is recovered, so what is checked is exactly what the kill leaves: right after a
    // frame is written the rings can hold nothing new, and a kill then tests nothing of them.
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    loop {
        assert!(
            start.elapsed().as_secs() < 120,
            "the child never wrote a frame with events left in its rings"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child finished too early"
        );
        if std::fs::metadata(&log).map_or(0, |m| m.len()) >= 8 * 1024 {
            // SAFETY: signalling our own child process, which has not been reaped.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
            if rings_hold_unwritten(&out, 1) {
                break;
            }
            // SAFETY: as above.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let rings = slug_recorder::endpoint::ring_files(&out.join("endpoints")).unwrap();
    assert!(!rings.is_empty(), "a killed recorder leaves its rings");
    // The log writer buffers in memory: after the kill its file may not even hold a header.
    let before: u64 = match LogReader::open(&log) {
        Ok(killed) => {
            assert!(!killed.recovery().is_clean(), "no footer after SIGKILL");
            killed.counts().iter().sum()
        }
        Err(e) => {
            panic!("the killed log holds whole frames and must read: {e}");
        }
    };

    let report = slug_recorder::recover(&out).unwrap();
    assert!(report.succeeded(), "{report:?}");
    let recovered = report.endpoints;
    assert!(!recovered.is_empty());
    let total: u64 = recovered
        .iter()
        .map(|r| r.from_journal + r.from_log + r.from_rings)
        .sum();
    assert!(total > 500, "only {total} events recovered");
    let trace = Trace::open(&out).unwrap();
    for r in &recovered {
        assert_eq!(r.outcome, slug_recorder::Outcome::Rebuilt);
        let log = trace.endpoint_log(r.endpoint).unwrap();
        assert!(log.recovery().is_clean(), "{:?}", log.recovery());
        let total: u64 = log.counts().iter().sum();
        assert_eq!(
            total,
            r.from_journal + r.from_log + r.from_rings + u64::from(r.ring_lost > 0)
        );
        assert_eq!(total, r.events);
    }
    let e1 = recovered.iter().find(|r| r.endpoint == 1).unwrap();
    assert_eq!(e1.from_journal, 0, "recorders write no journal");
    assert_eq!(
        e1.from_log, before,
        "every whole frame of the killed log is kept"
    );
    assert!(
        e1.from_rings > 0,
        "the rings hold what the log had not written"
    );
    assert!(
        slug_recorder::endpoint::ring_files(&out.join("endpoints"))
            .unwrap()
            .is_empty()
    );
    // Recovering a clean trace changes nothing.
    assert_eq!(
        slug_recorder::recover(&out).unwrap(),
        slug_recorder::RecoveryReport::default()
    );
}

#[test]
fn full_rings_count_lost_events_and_never_block_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace");
    let p = pipeline(2, 20);
    let plain = run(&p, &NoObservers).unwrap();
    let cfg = RecordConfig {
        ring_records: 2,
        ..config(&out)
    };
    let summary = record(&cfg, &p).unwrap();
    assert_eq!(summary.tokens, plain.tokens);
    let lost: u64 = summary.endpoints.iter().map(|e| e.lost).sum();
    assert!(lost > 0, "two-record rings must overflow");
    let trace = Trace::open(&out).unwrap();
    let gaps = events(&trace, 1, EventKind::LostEvents);
    let logged: u64 = gaps
        .iter()
        .map(|e| match e {
            Event::LostEvents(l) => l.count,
            _ => 0,
        })
        .sum();
    assert!(
        logged > 0 && logged <= lost,
        "{logged} logged, {lost} counted"
    );
}

/// Unmounts the small file system even when the test fails.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_stops_recording_with_named_losses_and_the_run_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=400k", "tmpfs"])
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipping: cannot mount a small tmpfs here (needs root)");
        return;
    }
    let _guard = Mount(mnt.clone());
    let p = pipeline(2, 60);
    let plain = run(&p, &NoObservers).unwrap();
    let cfg = RecordConfig {
        payloads: PayloadPolicy::All,
        ring_records: 256,
        ..config(&mnt.join("trace"))
    };
    let summary = record(&cfg, &p).unwrap();
    assert_eq!(summary.tokens, plain.tokens, "the pipeline finished");
    let warnings: Vec<&String> = summary
        .endpoints
        .iter()
        .flat_map(|e| &e.warnings)
        .chain(&summary.warnings)
        .collect();
    eprintln!("{warnings:#?}\n{:#?}", summary.losses);
    // Every loss says which endpoint (or the snapshots), how much and why.
    assert!(!summary.losses.is_empty());
    assert!(
        summary
            .losses
            .iter()
            .any(|l| l.endpoint.is_some() && l.why.contains("No space left")),
        "{:?}",
        summary.losses
    );
    for l in &summary.losses {
        assert!(!l.why.is_empty(), "{l}");
    }
}
