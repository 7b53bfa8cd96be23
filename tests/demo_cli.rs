//! `slug demo` end to end: the recorded demo (record, replay, single-stage replay, injected fault
//! found, info) and the synthetic format tour; neither clobbers a directory.

use std::process::Command;

#[test]
fn synthetic_demo_writes_verifies_and_summarises() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("demo");
    let out = Command::new(env!("CARGO_BIN_EXE_slug"))
        .args([
            "demo",
            "--synthetic",
            "--out",
            out_dir.to_str().unwrap(),
            "--events",
            "20000",
        ])
        .output()
        .expect("run slug demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("every event identical to what was written"),
        "{text}"
    );
    assert!(text.contains("events per kind"), "{text}");
    assert!(
        text.contains(&format!("next: slug info {}", out_dir.display())),
        "{text}"
    );
    assert!(out_dir.join("manifest.json").is_file());
    for id in 0..4 {
        assert!(out_dir.join(format!("endpoints/{id}.slog")).is_file());
    }

    // The same directory again: now it is not empty, so demo must refuse and say why.
    let again = Command::new(env!("CARGO_BIN_EXE_slug"))
        .args([
            "demo",
            "--synthetic",
            "--out",
            out_dir.to_str().unwrap(),
            "--events",
            "1000",
        ])
        .output()
        .expect("run slug demo");
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("not empty") && err.contains("demo"), "{err}");
}

#[test]
fn demo_rejects_zero_events() {
    let out = Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(["demo", "--synthetic", "--events", "0"])
        .output()
        .expect("run slug demo");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--events 0"));
}

#[test]
fn recorded_demo_replays_bit_exact_and_finds_the_injected_fault() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(["demo", "--model", "tiny", "--layers", "4", "--tokens", "12"])
        .arg("--out")
        .arg(&out_dir)
        .output()
        .expect("run slug demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Two clean replays (whole pipeline on tcp, stage 2 alone at kernel level), then the fault.
    assert_eq!(text.matches("\nbit-exact\n").count(), 2, "{text}");
    assert!(text.contains("replayed pipeline on tcp"), "{text}");
    assert!(text.contains("replayed stage 2 alone"), "{text}");
    assert!(
        text.contains(
            "the report points at the injected fault: endpoint 1, step 5, layer 1, kernel down"
        ),
        "{text}"
    );
    assert!(
        text.contains("snapshots "),
        "info lists the snapshots: {text}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("demo-divergence.json")).unwrap())
            .unwrap();
    assert_eq!(report["kernel"], "down");
}

#[test]
fn demo_help_describes_the_recorded_demo_first() {
    let out = Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(["demo", "--help"])
        .output()
        .expect("run slug demo --help");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("Record a 4-stage pipeline, replay it bit for bit"),
        "{text}"
    );
    assert!(text.contains("--synthetic"), "{text}");
}

/// `slug demo --transport shm` (README) records with one `slug node` process per stage, which the
/// binary launches itself: the demo must hand the runtime its launcher.
#[test]
fn recorded_demo_on_shm_launches_its_stage_processes() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_slug"))
        .args([
            "demo",
            "--transport",
            "shm",
            "--model",
            "tiny",
            "--layers",
            "4",
        ])
        .args(["--tokens", "8", "--out"])
        .arg(dir.path().join("run"))
        .output()
        .expect("run slug demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("pipeline on shm"), "{text}");
    assert_eq!(text.matches("\nbit-exact\n").count(), 2, "{text}");
}
