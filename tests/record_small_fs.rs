//! Recording onto a small file system: a full disk is said before the run when the preallocated
//! flight rings do not fit, and a recording that lost data mid-run exits non-zero naming what it
//! lost (endpoint, how many, why), never 0 with an empty log. Needs root to mount a tmpfs;
//! skips with the reason otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A tmpfs of `size` mounted in a fresh temporary directory; unmounted on drop.
struct SmallFs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("small");
        std::fs::create_dir(&mnt).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mnt)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipping: cannot mount a {size} tmpfs here (needs root and mount(8))");
            return None;
        }
        Some(SmallFs { mnt, _dir: dir })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

fn record(out: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(["record", "--perf", "none", "--out"])
        .arg(out)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn rings_that_do_not_fit_are_refused_before_the_run() {
    for (size, stages) in [("2m", "2"), ("20m", "3")] {
        let Some(fs) = SmallFs::mount(size) else {
            return;
        };
        let out = fs.mnt.join("trace");
        let o = record(
            &out,
            &["--stages", stages, "--layers", "3", "--tokens", "4"],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{size}: {err}");
        assert!(
            err.contains("before the run starts") && err.contains("flight ring"),
            "{size}: {err}"
        );
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("recorded"),
            "{size}: the run did not start"
        );
        assert!(!out.exists(), "{size}: nothing is created");
    }
}

#[test]
fn a_recording_that_fills_the_disk_exits_non_zero_naming_the_loss() {
    let Some(fs) = SmallFs::mount("1200k") else {
        return;
    };
    let out = fs.mnt.join("trace");
    // Two 512 KiB rings (8192 slots of 64 bytes) fit; what the recording writes after them (the writers' own rings, the
    // step-0 snapshots' ~300 KiB of mutable state, the logs) does not.
    let o = record(
        &out,
        &[
            "--stages",
            "2",
            "--model",
            "small",
            "--tokens",
            "4",
            "--ring-records",
            "8192",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("is incomplete; it lost:"), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    // What was recorded stays readable.
    let info = Command::new(env!("CARGO_BIN_EXE_slug"))
        .arg("info")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
}
