//! A trace from someone else must be safe to open: paths outside the trace, devices, FIFOs,
//! absurd sizes and counts, a closed output pipe — each a clear error (or a quiet exit), never a
//! hang, a huge allocation or a panic. Every command runs under a hang guard.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn slug() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_slug"))
}

/// Runs slug; kills it and fails the test if it is still running after a minute (a hang, not
/// a measurement: every case here should end in well under a second).
fn run(args: &[&str]) -> Output {
    let mut child = Command::new(slug())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run slug");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("slug {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn record(out: &Path, payloads: &str) {
    let o = run(&[
        "record",
        "--out",
        out.to_str().expect("utf-8 path"),
        "--payloads",
        payloads,
        "--perf",
        "none",
        "--stages",
        "2",
        "--tokens",
        "3",
        "--sequences",
        "2",
    ]);
    assert!(o.status.success(), "record failed: {}", text(&o));
}

fn edit_manifest(trace: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = trace.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut m);
    std::fs::write(&path, serde_json::to_string(&m).unwrap()).unwrap();
}

fn no_panic(o: &Output) {
    let t = text(o);
    assert!(!t.contains("panicked"), "{t}");
    assert!(o.status.code().is_some(), "killed by a signal: {t}");
}

#[test]
fn log_paths_outside_the_trace_or_not_regular_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean");
    record(&clean, "none");
    let fifo = clean.join("endpoints/fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let cases = [
        ("/dev/zero", "absolute"),
        ("../../etc/passwd", "climbs out"),
        ("/etc/passwd", "absolute"),
        ("endpoints/fifo", "not a regular file"),
        ("endpoints/link", "symbolic link"),
    ];
    for (i, (log, why)) in cases.iter().enumerate() {
        let t = dir.path().join(format!("t{i}"));
        let o = Command::new("cp")
            .args(["-a", clean.to_str().unwrap(), t.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(o.success());
        std::os::unix::fs::symlink("/dev/zero", t.join("endpoints/link")).unwrap();
        edit_manifest(&t, |m| m["endpoints"][1]["log"] = (*log).into());
        let info = run(&["info", t.to_str().unwrap()]);
        no_panic(&info);
        assert_eq!(info.status.code(), Some(1), "{log}: {}", text(&info));
        assert!(
            text(&info).contains("refused to open") && text(&info).contains(why),
            "{log}: {}",
            text(&info)
        );
        let replay = run(&["replay", t.to_str().unwrap()]);
        no_panic(&replay);
        assert_eq!(replay.status.code(), Some(2), "{log}: {}", text(&replay));
        assert!(text(&replay).contains(why), "{log}: {}", text(&replay));
    }
}

#[test]
fn a_missing_payload_is_called_a_payload() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    record(&t, "all");
    for fan in std::fs::read_dir(t.join("payloads")).unwrap() {
        std::fs::remove_dir_all(fan.unwrap().path()).unwrap();
    }
    let o = run(&["replay", t.to_str().unwrap(), "--stage", "1"]);
    no_panic(&o);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("transfer payload is missing") && !text(&o).contains("snapshot"),
        "{}",
        text(&o)
    );
}

#[test]
fn absurd_thread_counts_are_refused_with_the_limit() {
    let o = run(&[
        "run",
        "--model",
        "tiny",
        "--tokens",
        "2",
        "--threads",
        "100000",
    ]);
    no_panic(&o);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("more than the limit of"), "{}", text(&o));
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    record(&t, "none");
    edit_manifest(&t, |m| m["run"]["pipeline"]["threads"] = 100_000.into());
    let o = run(&["replay", t.to_str().unwrap()]);
    no_panic(&o);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("100000 threads per stage asked for"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_huge_recorded_model_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    record(&t, "none");
    edit_manifest(&t, |m| {
        m["run"]["pipeline"]["model"]["layers"] = 10_000_000.into();
    });
    let o = run(&["replay", t.to_str().unwrap()]);
    no_panic(&o);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("10000000 layers") && text(&o).contains("MemAvailable"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_manifest_with_a_million_endpoints_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    record(&t, "none");
    edit_manifest(&t, |m| {
        let one = m["endpoints"][0].clone();
        m["endpoints"] = serde_json::Value::Array(vec![one; 1_000_000]);
    });
    for cmd in ["info", "replay"] {
        let o = run(&[cmd, t.to_str().unwrap()]);
        no_panic(&o);
        assert_eq!(o.status.code(), Some(2), "{cmd}: {}", text(&o));
        assert!(
            text(&o).contains("bytes allowed") || text(&o).contains("endpoints, more than"),
            "{cmd}: {}",
            text(&o)
        );
    }
    edit_manifest(&t, |m| {
        let one = m["endpoints"][0].clone();
        m["endpoints"] = serde_json::Value::Array(vec![one; 5000]);
    });
    let o = run(&["info", t.to_str().unwrap()]);
    assert!(
        text(&o).contains("5000 endpoints, more than the 4096"),
        "{}",
        text(&o)
    );
}

#[test]
fn an_implausible_clock_offset_is_damage_not_a_278_second_span() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    record(&t, "none");
    edit_manifest(&t, |m| {
        m["endpoints"][1]["node"] = "n1".into();
        m["clocks"] =
            serde_json::json!([{"node": "n1", "offset_ns": i64::MIN, "uncertainty_ns": 0}]);
    });
    let o = run(&["info", "--json", t.to_str().unwrap()]);
    no_panic(&o);
    let json: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    let problems = json["endpoints"][1]["problems"].to_string();
    assert!(problems.contains("implausible"), "{problems}");
    assert_eq!(json["endpoints"][0]["problems"].to_string(), "[]");
    let span = &json["time_span"];
    let ns = span["end_ns"].as_u64().unwrap() - span["start_ns"].as_u64().unwrap();
    assert!(ns < 60_000_000_000, "span of {ns} ns for a short recording");
    let o = run(&["info", t.to_str().unwrap()]);
    assert!(text(&o).contains("clock offset of node"), "{}", text(&o));
}

#[test]
fn info_into_a_closed_pipe_exits_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    record(&t, "none");
    for json in [true, false] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut args = vec!["info", t.to_str().unwrap()];
        if json {
            args.push("--json");
        }
        let o = Command::new(slug())
            .args(&args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.is_empty(), "json {json}: {err}");
        assert_eq!(o.status.code(), Some(0), "json {json}: {err}");
    }
}

#[test]
fn an_os_error_is_printed_once() {
    // `record --out /proc/sys/x` once printed "Read-only file system (os error 30)" twice; record
    // now refuses that file system for its free space first, so an export into a directory that
    // cannot exist shows the same error chain.
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t");
    record(&trace, "none");
    let o = run(&[
        "export",
        trace.to_str().expect("utf-8 path"),
        "--format",
        "chrome",
        "--out",
        "/proc/sys/x.json",
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert_eq!(t.matches("(os error").count(), 1, "{t}");
}

#[test]
fn view_and_export_refuse_a_log_outside_the_trace() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    record(&t, "none");
    edit_manifest(&t, |m| m["endpoints"][0]["log"] = "/dev/zero".into());
    let out = dir.path().join("x.json");
    let o = run(&[
        "export",
        t.to_str().unwrap(),
        "--format",
        "chrome",
        "--out",
        out.to_str().unwrap(),
    ]);
    no_panic(&o);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("absolute"), "{}", text(&o));
}
