//! A recording killed with SIGKILL mid-run keeps what it had appended: `slug info` rebuilds the
//! logs from the journals and flight rings left behind and summarises them.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn slug() -> Command {
    Command::new(env!("CARGO_BIN_EXE_slug"))
}

/// Bytes in the journals and rings of `dir/endpoints`.
fn unclosed_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir.join("endpoints")) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".journal")
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[test]
fn info_recovers_a_recording_killed_mid_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("trace");
    // Long enough to be killed mid-run on any machine: thousands of decode steps.
    let mut child = slug()
        .args(["record", "--out"])
        .arg(&out)
        .args(["--perf", "none", "--stages", "2", "--sequences", "2"])
        .args([
            "--max-seq",
            "4096",
            "--tokens",
            "4000",
            "--prompt",
            "kill me",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while unclosed_bytes(&out) < 64 * 1024 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the recording ended before it could be killed; make it longer"
        );
        assert!(
            Instant::now() < deadline,
            "the recording wrote no journal in 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let info = slug().args(["info", "--json"]).arg(&out).output().unwrap();
    let stderr = String::from_utf8_lossy(&info.stderr);
    assert!(info.status.success(), "{stderr}");
    assert!(stderr.contains("recovered endpoint"), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let text = summary.to_string();
    let spans = summary["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["counts"]["kernel_span"].as_u64().unwrap_or(0))
        .sum::<u64>();
    assert!(spans > 100, "kernel spans survived the kill: {text}");

    // A second look finds a clean trace: nothing left to recover.
    let again = slug().args(["info"]).arg(&out).output().unwrap();
    assert!(again.status.success());
    assert!(!String::from_utf8_lossy(&again.stderr).contains("recovered endpoint"));
}
