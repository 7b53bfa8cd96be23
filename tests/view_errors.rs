//! `slug view` on bad input: a missing path, a directory that is not a trace, a corrupt endpoint
//! log, a divergence report that does not parse, and no terminal each give a clear message and
//! exit code 2, never a panic.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use slug_schema::synth::{SynthConfig, write_trace};

fn slug_view(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slug"))
        .arg("view")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("slug runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tiny_trace(dir: &Path) {
    let cfg = SynthConfig {
        stages: 2,
        steps: 2,
        microbatches: 1,
        layers_per_stage: 1,
        threads: 1,
        ..SynthConfig::default()
    };
    write_trace(dir, &cfg).expect("synthetic trace written");
}

#[test]
fn missing_trace_path() {
    let o = slug_view(&["/nonexistent/slug-trace"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("no trace at /nonexistent/slug-trace: the directory does not exist"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn directory_that_is_not_a_trace() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let o = slug_view(&[tmp.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("cannot read the trace at"), "{err}");
    assert!(err.contains("not a slug trace"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn corrupt_endpoint_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("trace");
    tiny_trace(&dir);
    std::fs::write(
        dir.join("endpoints/1.slog"),
        b"this is not a slug log at all",
    )
    .expect("overwrite");
    let o = slug_view(&[dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("cannot read the trace at") && err.contains("1.slog"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn unreadable_divergence_report() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("trace");
    tiny_trace(&dir);
    let report = tmp.path().join("report.json");
    std::fs::write(&report, b"{\"step\": \"three\"}").expect("write report");
    let o = slug_view(&[
        dir.to_str().unwrap(),
        "--divergence",
        report.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("cannot read the divergence report") && err.contains("report.json"),
        "{err}"
    );
}

#[test]
fn no_terminal_is_refused_with_a_hint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("trace");
    tiny_trace(&dir);
    let o = slug_view(&[dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("stdout is not one; use `slug export`"),
        "{}",
        stderr(&o)
    );
}
