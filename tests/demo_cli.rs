//! `slug demo` end to end: writes, verifies and summarises a trace; refuses to clobber a directory.

use std::process::Command;

#[test]
fn demo_writes_verifies_and_summarises() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("demo");
    let out = Command::new(env!("CARGO_BIN_EXE_slug"))
        .args([
            "demo",
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
        .args(["demo", "--events", "0"])
        .output()
        .expect("run slug demo");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--events 0"));
}
