//! A recording killed with SIGKILL mid-run keeps what it had appended: reading commands show it
//! rebuilt in memory without writing into the trace, `slug recover` makes it permanent, and
//! what the kill (or a hostile hand) left behind never costs data or a file outside the trace.

#[path = "support/tree.rs"]
mod tree;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn slug() -> Command {
    Command::new(env!("CARGO_BIN_EXE_slug"))
}

fn run(args: &[&str], trace: &Path) -> Output {
    slug().args(args).arg(trace).output().unwrap()
}

/// Slots that endpoint `id`'s flight rings fill (a kernel span takes one, another record two;
/// appended, not yet released because the log frame holding them is not written yet), from the ring
/// headers (layout in `recorder/src/flight.rs`: head at byte 64, tail at 128, native endianness).
fn ring_slots(dir: &Path, id: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir.join("endpoints")) else {
        return 0;
    };
    let prefix = format!("{id}.t");
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix) && name.ends_with(".ring")
        })
        .filter_map(|e| std::fs::read(e.path()).ok().filter(|b| b.len() >= 256))
        .map(|b| {
            let word = |at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().unwrap());
            word(64).saturating_sub(word(128))
        })
        .sum()
}

/// Records into `out` and kills the recorder with SIGKILL once every endpoint's rings hold a
/// good part of the run.
fn killed_recording(out: &Path) {
    // Long enough to be killed mid-run on any machine: thousands of decode steps.
    let mut child = slug()
        .args(["record", "--out"])
        .arg(out)
        .args(["--perf", "none", "--stages", "2", "--sequences", "2"])
        .args(["--max-seq", "4096", "--tokens", "4000"])
        .args(["--prompt", "kill me"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ring_slots(out, 0) < 2000 || ring_slots(out, 1) < 2000 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the recording ended before it could be killed; make it longer"
        );
        assert!(
            Instant::now() < deadline,
            "the recording put no events in its rings in 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// Kernel spans per endpoint in `slug info --json` output.
fn spans(info: &Output) -> Vec<u64> {
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    v["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["counts"]["kernel_span"].as_u64().unwrap_or(0))
        .collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn info_shows_a_killed_recording_rebuilt_and_recover_makes_it_permanent() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("trace");
    killed_recording(&out);
    let before = tree::state(&out);

    let info = run(&["info", "--json"], &out);
    assert!(info.status.success(), "{}", stderr(&info));
    assert!(stderr(&info).contains("was killed"), "{}", stderr(&info));
    assert!(stderr(&info).contains("slug recover"), "{}", stderr(&info));
    let shown = spans(&info);
    assert!(
        shown.iter().all(|&n| n > 100),
        "kernel spans survived the kill: {shown:?}"
    );
    let export = slug()
        .args(["export", "--format", "chrome", "--out"])
        .arg(tmp.path().join("t.json"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        stderr(&export).contains("slug recover"),
        "{}",
        stderr(&export)
    );
    let replay = run(&["replay"], &out);
    assert!(!replay.status.success());
    assert!(
        stderr(&replay).contains("slug recover"),
        "{}",
        stderr(&replay)
    );
    assert_eq!(
        tree::state(&out),
        before,
        "reading commands wrote into the trace"
    );

    let recover = run(&["recover", "--json"], &out);
    assert!(recover.status.success(), "{}", stderr(&recover));
    let report: serde_json::Value = serde_json::from_slice(&recover.stdout).unwrap();
    assert_eq!(report["endpoints"].as_array().unwrap().len(), 2, "{report}");
    for e in report["endpoints"].as_array().unwrap() {
        assert_eq!(e["outcome"], "rebuilt", "{report}");
        let saved = e["from_log"].as_u64().unwrap() + e["from_rings"].as_u64().unwrap();
        assert!(saved > 2000, "{report}");
    }
    for name in ["0.t0.ring", "1.t0.ring"] {
        assert!(!out.join("endpoints").join(name).exists(), "{name} removed");
    }

    // The recovered trace is clean and holds exactly what info had shown.
    let again = run(&["info", "--json"], &out);
    assert!(again.status.success());
    assert!(
        !stderr(&again).contains("slug recover"),
        "{}",
        stderr(&again)
    );
    assert_eq!(spans(&again), shown);
    let v: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    for e in v["endpoints"].as_array().unwrap() {
        assert_eq!(e["recovery"]["footer"], "valid", "{e}");
    }
    let twice = run(&["recover"], &out);
    assert!(twice.status.success());
    assert!(String::from_utf8_lossy(&twice.stdout).contains("nothing to recover"));
}

#[test]
fn hostile_leftovers_never_cost_data_or_a_file_outside_the_trace() {
    let tmp = tempfile::tempdir().unwrap();
    let killed = tmp.path().join("killed");
    killed_recording(&killed);
    let copy = |name: &str| -> PathBuf {
        let to = tmp.path().join(name);
        copy_tree(&killed, &to);
        to
    };

    // A link named like a recovery file, pointing outside the trace, is never written through.
    let outside = tmp.path().join("precious.txt");
    std::fs::write(&outside, b"not yours").unwrap();
    let linked = copy("linked");
    for name in ["0.slog.recovering", "1.slog.recovering.1"] {
        std::os::unix::fs::symlink(&outside, linked.join("endpoints").join(name)).unwrap();
    }
    let info = run(&["info"], &linked);
    assert!(info.status.success(), "{}", stderr(&info));
    assert_eq!(std::fs::read(&outside).unwrap(), b"not yours");
    let recover = run(&["recover"], &linked);
    assert!(recover.status.success(), "{}", stderr(&recover));
    assert_eq!(std::fs::read(&outside).unwrap(), b"not yours");
    for name in ["0.slog.recovering", "1.slog.recovering.1"] {
        assert!(
            linked.join("endpoints").join(name).is_symlink(),
            "{name} kept"
        );
    }
    assert!(
        stderr(&recover).contains("1.slog.recovering.1"),
        "{}",
        stderr(&recover)
    );

    // A trace whose endpoints/ is a link to elsewhere: nothing there is read or removed.
    let elsewhere = tmp.path().join("elsewhere");
    copy_tree(&killed.join("endpoints"), &elsewhere);
    let before = tree::state(&elsewhere);
    let redirected = copy("redirected");
    std::fs::remove_dir_all(redirected.join("endpoints")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, redirected.join("endpoints")).unwrap();
    let _ = run(&["info"], &redirected);
    let recover = run(&["recover"], &redirected);
    assert!(
        stderr(&recover).contains("not a regular file"),
        "{}",
        stderr(&recover)
    );
    assert_eq!(tree::state(&elsewhere), before);

    // A 0-byte ring (killed while creating it) costs only that ring: the other endpoint's rings
    // and log are recovered whole.
    let whole = spans(&run(&["info", "--json"], &killed));
    let zero = copy("zero-ring");
    std::fs::File::create(zero.join("endpoints/0.t0.ring")).unwrap();
    let info = run(&["info", "--json"], &zero);
    assert!(info.status.success(), "{}", stderr(&info));
    assert!(stderr(&info).contains("0.t0.ring"), "{}", stderr(&info));
    assert!(
        spans(&info)[0] <= whole[0],
        "{:?} vs {whole:?}",
        spans(&info)
    );
    assert_eq!(spans(&info)[1], whole[1]);
    let recover = run(&["recover"], &zero);
    assert!(recover.status.success(), "{}", stderr(&recover));
    assert!(
        stderr(&recover).contains("0.t0.ring"),
        "{}",
        stderr(&recover)
    );
    let after = run(&["info", "--json"], &zero);
    assert_eq!(spans(&after), spans(&info));

    // An empty stray journal next to an intact log never replaces that log.
    let intact = copy("intact");
    assert!(run(&["recover"], &intact).status.success());
    let log = std::fs::read(intact.join("endpoints/1.slog")).unwrap();
    let clean = spans(&run(&["info", "--json"], &intact));
    std::fs::File::create(intact.join("endpoints/1.journal")).unwrap();
    let info = run(&["info", "--json"], &intact);
    assert!(info.status.success(), "{}", stderr(&info));
    assert_eq!(spans(&info), clean);
    assert!(stderr(&info).contains("leftover"), "{}", stderr(&info));
    let recover = run(&["recover"], &intact);
    assert!(recover.status.success(), "{}", stderr(&recover));
    assert_eq!(std::fs::read(intact.join("endpoints/1.slog")).unwrap(), log);
    assert!(!intact.join("endpoints/1.journal").exists());

    // An empty journal next to a killed log: the log's frames are kept, never replaced by less.
    let partial = copy("partial");
    let _ = std::fs::remove_file(partial.join("endpoints/1.slog"));
    std::fs::copy(
        intact.join("endpoints/1.slog"),
        partial.join("endpoints/1.slog"),
    )
    .unwrap();
    chop_footer(&partial.join("endpoints/1.slog"));
    std::fs::remove_file(partial.join("endpoints/1.t0.ring")).unwrap();
    std::fs::File::create(partial.join("endpoints/1.journal")).unwrap();
    let recover = run(&["recover", "--json"], &partial);
    assert!(recover.status.success(), "{}", stderr(&recover));
    let report: serde_json::Value = serde_json::from_slice(&recover.stdout).unwrap();
    let e1 = &report["endpoints"][1];
    assert_eq!(e1["from_journal"], 0, "{report}");
    assert!(
        e1["events"].as_u64().unwrap() >= e1["old_events"].as_u64().unwrap()
            && e1["from_log"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(spans(&run(&["info", "--json"], &partial))[1], clean[1]);
}

/// Cuts a closed log's footer (its last bytes after the last frame), as a kill before close would.
fn chop_footer(log: &Path) {
    let len = std::fs::metadata(log).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(log).unwrap();
    f.set_len(len - 8).unwrap();
}

/// Copies the tree at `from` (regular files and directories) to `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
