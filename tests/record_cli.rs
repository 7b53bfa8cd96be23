//! `slug record` end to end: a recorded trace that `slug` tools can open, the plain-language
//! capability lines, JSON output, and refusals made before the run starts.

use std::process::{Command, Output};

fn slug(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(args)
        .output()
        .expect("the slug binary runs")
}

#[test]
fn records_a_two_stage_run_into_a_trace_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace");
    let out_s = out.to_str().unwrap();
    let o = slug(&[
        "record",
        "--out",
        out_s,
        "--stages",
        "2",
        "--tokens",
        "6",
        "--sequences",
        "2",
        "--payloads",
        "all",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["endpoints"].as_array().unwrap().len(), 2);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 2);
    assert!(v["endpoints"][1]["payloads"].as_u64().unwrap() > 0);
    // Every capability that is asked for and missing is named, with its fallback, in the JSON.
    for n in v["notices"].as_array().unwrap() {
        assert!(n.as_str().unwrap().contains("instead"), "{n}");
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest["capabilities"].as_array().unwrap().len() >= 4);
    assert!(out.join("endpoints/0.slog").exists() && out.join("endpoints/1.slog").exists());
    let leftovers: Vec<_> = std::fs::read_dir(out.join("endpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".ring") || n.ends_with(".journal"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "a clean close removes the rings: {leftovers:?}"
    );
}

#[test]
fn missing_capabilities_are_said_in_one_line_each_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace");
    let o = slug(&["record", "--out", out.to_str().unwrap(), "--tokens", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("recorded") && stdout.contains("captured:"),
        "{stdout}"
    );
    if !std::path::Path::new("/sys/bus/event_source/devices/intel_pt").exists() {
        let pt: Vec<_> = stderr.lines().filter(|l| l.contains("Intel PT")).collect();
        assert_eq!(pt.len(), 1, "{stderr}");
        assert!(
            pt[0].contains("cpu-clock"),
            "the fallback is named: {}",
            pt[0]
        );
    }
}

#[test]
fn unusable_arguments_are_refused_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/parent/trace");
    let o = slug(&["record", "--out", missing.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));

    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), b"x").unwrap();
    let o = slug(&["record", "--out", full.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));

    let out = dir.path().join("t");
    let o = slug(&[
        "record",
        "--out",
        out.to_str().unwrap(),
        "--perf",
        "intel-pt,bogus",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown perf stream `bogus`"));
    let o = slug(&[
        "record",
        "--out",
        out.to_str().unwrap(),
        "--payloads",
        "some",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("[possible values: none, boundary, all]"));
    assert!(!out.exists(), "nothing is created for refused arguments");
}

#[test]
fn records_stage_processes_over_shm_and_tcp() {
    for transport in ["shm", "tcp"] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("trace");
        let o = slug(&[
            "record",
            "--out",
            out.to_str().unwrap(),
            "--stages",
            "2",
            "--tokens",
            "4",
            "--transport",
            transport,
            "--json",
        ]);
        assert!(
            o.status.success(),
            "{transport}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for e in v["endpoints"].as_array().unwrap() {
            let kinds: Vec<&str> = e["counts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c[0].as_str().unwrap())
                .collect();
            assert!(
                kinds.contains(&"transfer") && kinds.contains(&"kernel_span"),
                "{e}"
            );
            assert!(e["warnings"].as_array().unwrap().is_empty(), "{e}");
        }
    }
}

fn slug_in(cwd: &std::path::Path, home: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(args)
        .current_dir(cwd)
        .env("HOME", home)
        .output()
        .expect("the slug binary runs")
}

#[test]
fn force_replaces_only_a_slug_trace() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fn record(out: &str, force: bool) -> Vec<&str> {
        let mut args = vec!["record", "--out", out, "--perf", "none", "--tokens", "2"];
        if force {
            args.push("--force");
        }
        args
    }
    let state = |p: &std::path::Path| {
        let mut names: Vec<_> = walk(p);
        names.sort();
        names
    };

    // A directory of unrelated files survives intact, and the error names it.
    let mine = root.join("mine");
    std::fs::create_dir_all(mine.join("sub")).unwrap();
    std::fs::write(mine.join("a.txt"), b"a").unwrap();
    std::fs::write(mine.join("sub/b.txt"), b"b").unwrap();
    let o = slug_in(root, root, &record("mine", true));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("mine") && err.contains("not a slug trace"),
        "{err}"
    );
    assert_eq!(state(&mine), ["a.txt", "sub", "sub/b.txt"]);

    // A trace is replaced by a new one...
    let o = slug_in(root, root, &record("t", false));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = slug_in(root, root, &record("t", true));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = root.join("t");
    // ...but never when it is the current directory, an ancestor of it, or $HOME.
    for (cwd, out, home, why) in [
        (t.clone(), ".", root, "current directory"),
        (t.join("endpoints"), "..", root, "current directory"),
        (root.to_path_buf(), "t", t.as_path(), "home directory"),
    ] {
        let before = state(&t);
        let o = slug_in(&cwd, home, &record(out, true));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(why), "{out}: {err}");
        assert_eq!(state(&t), before);
    }
    // A trace holding something slug never writes is refused, naming it, and kept whole.
    std::fs::write(t.join("notes.txt"), b"mine").unwrap();
    let o = slug_in(root, root, &record("t", true));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("notes.txt"), "{err}");
    assert!(t.join("manifest.json").exists());
    std::fs::remove_file(t.join("notes.txt")).unwrap();
    let outside = root.join("precious");
    std::fs::write(&outside, b"x").unwrap();
    std::os::unix::fs::symlink(&outside, t.join("endpoints/evil")).unwrap();
    let o = slug_in(root, root, &record("t", true));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("evil"), "{err}");
    assert_eq!(std::fs::read(&outside).unwrap(), b"x");
    assert!(t.join("endpoints/evil").is_symlink());

    // `--out afile/x` where afile is a file: said as such, not "does not exist".
    std::fs::write(root.join("afile"), b"").unwrap();
    let o = slug_in(root, root, &record("afile/x", false));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("afile is a file, not a directory"), "{err}");
}

/// Paths under `dir`, relative to it (links not followed).
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()).into_iter().map(|n| format!("{name}/{n}")));
        }
        out.push(name);
    }
    out
}
