//! Temporary files a kill leaves mid-write (`chunks/**/*.tmp.PID.N`, `manifest.json.tmp`, ...)
//! are never mistaken for data by readers, and `slug recover` removes exactly those (regular
//! files with slug's own names), never following a link.

#[path = "support/tree.rs"]
mod tree;

use std::path::Path;
use std::process::{Command, Output};

fn slug(args: &[&str], trace: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(args)
        .arg(trace)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The first subdirectory of `dir` (a two-hex-digit fan-out directory of a store).
fn first_subdir(dir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .find(|e| e.file_type().unwrap().is_dir())
        .unwrap()
        .path()
}

#[test]
fn readers_ignore_interrupted_writes_and_recover_removes_only_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("trace");
    let rec = Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(["record", "--out"])
        .arg(&out)
        .args([
            "--perf",
            "none",
            "--payloads",
            "all",
            "--snapshot-every",
            "2",
        ])
        .args(["--stages", "2", "--tokens", "4"])
        .output()
        .unwrap();
    assert!(rec.status.success(), "{}", stderr(&rec));
    let chunks = first_subdir(&out.join("snapshots/chunks"));
    let payloads = first_subdir(&out.join("payloads"));
    let hex = "0123456789abcdef0123456789abcdef";
    let garbage: Vec<_> = [
        out.join("manifest.json.tmp"),
        chunks.join(format!("{hex}.tmp.4242.0")),
        out.join("snapshots/stage-0/step-0.tmp.4242.1"),
        payloads.join(format!("{hex}.tmp.4242")),
    ]
    .into_iter()
    .collect();
    for g in &garbage {
        std::fs::write(g, b"half-written garbage").unwrap();
    }
    // Not slug's names, or not regular files: recover must leave these alone.
    let outside = tmp.path().join("precious.txt");
    std::fs::write(&outside, b"not yours").unwrap();
    let kept = [
        chunks.join(format!("{hex}.tmp.4242.9")),
        out.join("snapshots/stage-0/notes.tmp"),
    ];
    std::os::unix::fs::symlink(&outside, &kept[0]).unwrap();
    std::fs::write(&kept[1], b"the user's").unwrap();
    let before = tree::state(&out);

    let info = slug(&["info"], &out);
    assert!(info.status.success(), "{}", stderr(&info));
    assert!(stderr(&info).contains("slug recover"), "{}", stderr(&info));
    let replay = slug(&["replay"], &out);
    assert!(replay.status.success(), "{}", stderr(&replay));
    let export = Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(["export", "--format", "chrome", "--out"])
        .arg(tmp.path().join("t.json"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(export.status.success(), "{}", stderr(&export));
    assert_eq!(tree::state(&out), before, "readers wrote into the trace");

    let recover = slug(&["recover"], &out);
    assert!(recover.status.success(), "{}", stderr(&recover));
    for g in &garbage {
        assert!(!g.exists(), "{} removed", g.display());
    }
    assert!(kept[0].is_symlink() && kept[1].exists());
    assert_eq!(std::fs::read(&outside).unwrap(), b"not yours");
    assert!(
        stderr(&recover).contains("not a regular file"),
        "{}",
        stderr(&recover)
    );
    let replay = slug(&["replay"], &out);
    assert!(replay.status.success(), "{}", stderr(&replay));
}
