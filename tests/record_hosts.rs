//! `slug record --hosts`: stages recorded by `slug node` processes that share no directory with
//! the coordinator (each records into a scratch directory under its own TMPDIR), collected over
//! the node connections into one trace that `slug info` reads and `slug replay` replays bit for
//! bit, with each endpoint's real node and clock offset in the manifest.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use slug_transport::auth::{ClusterKey, KEY_ENV};
use slug_transport::node::LISTENING_PREFIX;

fn slug_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_slug"))
}

/// One `slug node --once` per stage, each with its own TMPDIR (its "machine's" disk).
struct Nodes {
    children: Vec<Child>,
    addrs: Vec<String>,
}

impl Nodes {
    fn launch(key: &ClusterKey, tmpdirs: &[PathBuf]) -> Nodes {
        let mut nodes = Nodes {
            children: Vec::new(),
            addrs: Vec::new(),
        };
        for tmp in tmpdirs {
            let mut child = Command::new(slug_bin())
                .args(["node", "--listen", "127.0.0.1:0", "--once"])
                .env(KEY_ENV, key.as_env_value())
                .env("TMPDIR", tmp)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start slug node");
            let mut line = String::new();
            BufReader::new(child.stdout.take().expect("stdout"))
                .read_line(&mut line)
                .expect("listening line");
            let addr = line
                .trim()
                .strip_prefix(LISTENING_PREFIX)
                .unwrap_or_else(|| panic!("expected the listening line, got {line:?}"))
                .to_string();
            nodes.children.push(child);
            nodes.addrs.push(addr);
        }
        nodes
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn slug(args: &[&str], key: Option<&ClusterKey>) -> Output {
    let mut cmd = Command::new(slug_bin());
    cmd.args(args);
    match key {
        Some(k) => cmd.env(KEY_ENV, k.as_env_value()),
        None => cmd.env_remove(KEY_ENV),
    };
    cmd.output().expect("the slug binary runs")
}

fn ok(o: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{what} failed: {stderr}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                pending.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn record_on_hosts_and_replay(stages: usize, extra: &[&str], same_chunks: bool, from_step: &str) {
    let work = tempfile::tempdir().expect("tempdir");
    let key = ClusterKey::random().expect("key");
    let tmpdirs: Vec<PathBuf> = (0..stages)
        .map(|i| {
            let d = work.path().join(format!("node{i}-tmp"));
            std::fs::create_dir(&d).unwrap();
            d
        })
        .collect();
    let mut nodes = Nodes::launch(&key, &tmpdirs);
    let hosts = nodes.addrs.join(",");
    let out = work.path().join("trace");
    let local = work.path().join("local");
    let stages_s = stages.to_string();
    let run_args = [
        "--model",
        "tiny",
        "--layers",
        "4",
        "--stages",
        &stages_s,
        "--tokens",
        "6",
        "--sequences",
        "2",
        "--seed",
        "5",
    ];
    let mut args = vec!["record", "--out", out.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(&run_args);
    args.extend_from_slice(&["--transport", "tcp", "--hosts", &hosts]);
    let recorded: serde_json::Value =
        serde_json::from_str(&ok(&slug(&args, Some(&key)), "record --hosts")).expect("JSON");

    // Every node served its session, sent its files and exited cleanly, leaving no scratch.
    for (i, c) in nodes.children.iter_mut().enumerate() {
        let status = c.wait().expect("node exit");
        assert!(status.success(), "node {i} exited with {status}");
        assert!(
            files_under(&tmpdirs[i]).is_empty(),
            "node {i} left {:?}",
            files_under(&tmpdirs[i])
        );
    }

    // The same run recorded on local threads: same tokens, same stage logs.
    let mut args = vec!["record", "--out", local.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(&run_args);
    let local_rec: serde_json::Value =
        serde_json::from_str(&ok(&slug(&args, None), "local record")).expect("JSON");
    assert_eq!(recorded["tokens"], local_rec["tokens"]);
    assert_eq!(
        recorded["endpoints"].as_array().unwrap().len(),
        stages,
        "{recorded}"
    );
    for s in 0..stages {
        assert!(out.join(format!("endpoints/{s}.slog")).is_file());
        // Closed cleanly before it was sent: the node listed its files only after the log's
        // last owner dropped it.
        let warnings = &recorded["endpoints"][s]["warnings"];
        assert_eq!(warnings.as_array().map(Vec::len), Some(0), "{warnings}");
    }
    let snapshots = |dir: &Path| -> Vec<String> {
        files_under(&dir.join("snapshots"))
            .into_iter()
            .filter(|f| !f.starts_with("chunks"))
            .collect()
    };
    assert!(!snapshots(&out).is_empty(), "no snapshot index collected");
    assert_eq!(snapshots(&out), snapshots(&local));
    if same_chunks {
        // Content-addressed chunks and payloads: the same set a local recording stores. (Only
        // at step 0: later snapshots hold scratch whose content depends on how sequences
        // interleaved, which differs between placements.)
        let addressed = |dir: &Path, sub: &str| -> Vec<String> {
            if dir.join(sub).exists() {
                files_under(&dir.join(sub))
            } else {
                Vec::new()
            }
        };
        for sub in ["snapshots/chunks", "payloads"] {
            assert_eq!(addressed(&out, sub), addressed(&local, sub), "{sub}");
        }
    }
    assert!(
        !files_under(&out).iter().any(|f| f.contains(".partial")),
        "a partial file was left"
    );

    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let endpoints = manifest["endpoints"].as_array().unwrap();
    let clocks = manifest["clocks"].as_array().unwrap();
    assert_eq!(clocks.len(), stages, "{manifest}");
    for (s, ep) in endpoints.iter().enumerate() {
        assert_eq!(ep["node"], nodes.addrs[s].as_str(), "{ep}");
        assert_eq!(ep["host"], "127.0.0.1", "{ep}");
        assert!(
            clocks.iter().any(|c| c["node"] == ep["node"]),
            "no clock for {ep}"
        );
    }

    // The nodes' own machine reports became the manifest's topology and capabilities.
    assert!(!manifest["topology"].as_array().unwrap().is_empty());
    assert!(manifest["capabilities"].as_array().unwrap().len() >= 4);
    assert!(
        !out.join("nodes").exists(),
        "node reports are merged, then removed"
    );

    let info = ok(&slug(&["info", out.to_str().unwrap()], None), "info");
    assert!(info.contains("127.0.0.1"), "{info}");
    // Exit status 0: every transfer of the replay equals the recorded one, bit for bit.
    ok(
        &slug(&["replay", out.to_str().unwrap()], None),
        "replay of the collected trace",
    );
    // Restoring every stage from a collected snapshot checks each of its chunks' hashes.
    ok(
        &slug(
            &["replay", out.to_str().unwrap(), "--from-step", from_step],
            None,
        ),
        "replay from a collected snapshot",
    );
    ok(
        &slug(
            &[
                "replay",
                out.to_str().unwrap(),
                "--transport",
                "tcp",
                "--verify",
                "kernel",
            ],
            None,
        ),
        "kernel-verified replay over tcp",
    );
}

#[test]
fn two_stages_on_hosts_record_into_one_trace_that_replays_bit_for_bit() {
    record_on_hosts_and_replay(2, &["--payloads", "all", "--hash-kernels"], true, "0");
}

#[test]
fn four_stages_with_periodic_snapshots_replay_from_a_collected_mid_run_snapshot() {
    record_on_hosts_and_replay(
        4,
        &[
            "--payloads",
            "boundary",
            "--snapshot-every",
            "2",
            "--hash-kernels",
        ],
        false,
        "4",
    );
}

#[test]
fn recording_on_hosts_without_the_key_fails_naming_the_host() {
    let work = tempfile::tempdir().expect("tempdir");
    let key = ClusterKey::random().expect("key");
    let tmp = work.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let nodes = Nodes::launch(&key, std::slice::from_ref(&tmp));
    let stranger = ClusterKey::random().expect("key");
    let out = work.path().join("trace");
    let o = slug(
        &[
            "record",
            "--out",
            out.to_str().unwrap(),
            "--",
            "--model",
            "tiny",
            "--stages",
            "1",
            "--tokens",
            "2",
            "--transport",
            "tcp",
            "--hosts",
            &nodes.addrs[0],
        ],
        Some(&stranger),
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&nodes.addrs[0]), "{err}");
}

#[test]
fn a_node_killed_mid_record_fails_the_run_naming_it_and_the_others_keep_their_recording() {
    let work = tempfile::tempdir().expect("tempdir");
    let key = ClusterKey::random().expect("key");
    let tmpdirs: Vec<PathBuf> = (0..2)
        .map(|i| {
            let d = work.path().join(format!("node{i}-tmp"));
            std::fs::create_dir(&d).unwrap();
            d
        })
        .collect();
    let mut nodes = Nodes::launch(&key, &tmpdirs);
    let out = work.path().join("trace");
    // A run far longer than the test waits: it only ends by the failure.
    let record = Command::new(slug_bin())
        .args(["record", "--out", out.to_str().unwrap(), "--"])
        .args(["--model", "tiny", "--stages", "2", "--max-seq", "16384"])
        .args(["--tokens", "16000", "--timeout-ms", "20000"])
        .args(["--transport", "tcp", "--hosts", &nodes.addrs.join(",")])
        .env(KEY_ENV, key.as_env_value())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start slug record");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    nodes.children[1].kill().expect("kill node 1");
    let o = record.wait_with_output().expect("record exits");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("stage 1") && err.contains(&nodes.addrs[1]),
        "{err}"
    );
    // The surviving node was told to stop; what it recorded stays in its scratch directory.
    let status = nodes.children[0].wait().expect("node 0 exits");
    assert!(!status.success(), "node 0 reports its failed session");
    let left = files_under(&tmpdirs[0]);
    assert!(
        left.iter()
            .any(|f| f.contains("slug-record-") && f.contains("endpoints/0.")),
        "{left:?}"
    );
}
