//! `slug record --migrate`: a stage moved while recording is a `migration` event on both
//! endpoints, its log continues in the new node's endpoint (the manifest joins them, with the
//! steps each ran), and `slug replay` of the trace is bit-exact, the whole pipeline and one
//! stage alone from snapshots taken on either side of the move.
//!
//! Run under `flock /tmp/slug-test.lock` with the other multi-process tests.

#[path = "support/cli.rs"]
mod cli;
#[path = "support/nodes.rs"]
mod nodes;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use nodes::{Node, key_file};
use slug_transport::auth::KEY_ENV;

/// Records 3 stages of a 3-layer tiny model, 2 sequences of 6 tokens (12 forward steps per
/// stage), with every payload and a snapshot every 2 steps, moving stages by `moves`.
fn record(out: &Path, key: &Path, transport: &str, moves: &[String]) {
    let args: Vec<String> = moves.iter().map(|m| format!("--migrate={m}")).collect();
    record_with(out, key, transport, &args);
}

/// [`record`] with `extra` run flags after the pipeline's.
fn record_with(out: &Path, key: &Path, transport: &str, extra: &[String]) {
    let out = out.to_str().expect("utf-8 path");
    let key = key.to_str().expect("utf-8 path");
    let mut args = vec![
        "record",
        "--out",
        out,
        "--quiet",
        "--payloads",
        "all",
        "--snapshot-every",
        "2",
        "--perf",
        "none",
        "--ebpf",
        "none",
        "--",
        "--layers",
        "3",
        "--stages",
        "3",
        "--tokens",
        "6",
        "--sequences",
        "2",
        "--timeout-ms",
        "20000",
        "--transport",
        transport,
        "--key-file",
        key,
    ];
    args.extend(extra.iter().map(String::as_str));
    let o = Command::new(cli::slug())
        .args(&args)
        .env_remove(KEY_ENV)
        .output()
        .expect("run slug record");
    assert!(o.status.success(), "slug {args:?}: {}", cli::text(&o));
}

fn info(trace: &Path) -> Value {
    let o = cli::run(&["info", "--json", trace.to_str().expect("utf-8 path")]);
    assert!(o.status.success(), "slug info: {}", cli::text(&o));
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

/// `slug replay TRACE ARGS` exits 0 and says bit-exact.
fn replays_bit_exact(trace: &Path, args: &[&str]) {
    let mut all = vec!["replay", trace.to_str().expect("utf-8 path")];
    all.extend(args);
    let o = cli::run(&all);
    let text = cli::text(&o);
    assert!(o.status.success(), "slug {all:?}: {text}");
    assert!(text.contains("bit-exact"), "slug {all:?}: {text}");
    assert!(text.contains(" 0 differ"), "slug {all:?}: {text}");
}

/// One endpoint of a stage: its id, the endpoint it continues, the steps it ran.
type Part = (u64, Option<u64>, Option<(u64, u64)>);

/// The endpoints of `stage` in the manifest, in step order.
fn parts(info: &Value, stage: u64) -> Vec<Part> {
    let mut out: Vec<_> = info["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter(|e| e["stage"] == stage)
        .map(|e| {
            let steps = e["steps"].as_array().map(|s| {
                (
                    s[0].as_u64().expect("first step"),
                    s[1].as_u64().expect("end step"),
                )
            });
            (
                e["id"].as_u64().expect("id"),
                e["continues"].as_u64(),
                steps,
            )
        })
        .collect();
    out.sort_by_key(|p| p.2.map_or(0, |s| s.0));
    out
}

/// The `migration` instants of a Chrome export, as (role, stage, step, peer endpoint).
fn exported_moves(trace: &Path, dir: &Path) -> Vec<(String, u64, u64, u64)> {
    let json = dir.join("trace.json");
    let o = cli::run(&[
        "export",
        trace.to_str().expect("utf-8 path"),
        "--format",
        "chrome",
        "--out",
        json.to_str().expect("utf-8 path"),
    ]);
    assert!(o.status.success(), "slug export: {}", cli::text(&o));
    let doc: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("export reads")).expect("JSON");
    let mut moves: Vec<_> = doc["traceEvents"]
        .as_array()
        .expect("traceEvents")
        .iter()
        .filter(|e| e["cat"] == "migration")
        .map(|e| {
            let a = &e["args"];
            (
                a["role"].as_str().expect("role").to_string(),
                a["stage"].as_u64().expect("stage"),
                a["step"].as_u64().expect("step"),
                a["peer_endpoint"].as_u64().expect("peer"),
            )
        })
        .collect();
    moves.sort();
    moves
}

#[test]
fn tcp_recording_moves_a_stage_twice_and_replays_bit_exact_across_both_moves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key_file(dir.path(), "cluster.key");
    let (a, b) = (Node::start(&key), Node::start(&key));
    let trace = dir.path().join("run");
    let moves = [
        format!("stage=1,to={},at-step=4", a.addr),
        format!("stage=1,to={},at-step=8", b.addr),
    ];
    record(&trace, &key, "tcp", &moves);

    let info = info(&trace);
    assert_eq!(info["format_version"], 4);
    assert_eq!(info["counts"]["migration"], 4, "two moves, two sides each");
    // Stage 1 ran on three nodes in turn: endpoint 1, then 3 (move 0), then 4 (move 1).
    assert_eq!(
        parts(&info, 1),
        vec![
            (1, None, Some((0, 4))),
            (3, Some(1), Some((4, 8))),
            (4, Some(3), Some((8, 12))),
        ]
    );
    assert_eq!(parts(&info, 0), vec![(0, None, None)]);
    let nodes: Vec<&str> = info["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| e["node"].as_str().expect("node"))
        .collect();
    assert!(nodes.contains(&a.addr.as_str()) && nodes.contains(&b.addr.as_str()));
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(trace.join("manifest.json")).expect("manifest reads"),
    )
    .expect("manifest JSON");
    for node in [&a.addr, &b.addr] {
        assert!(
            manifest["clocks"]
                .as_array()
                .expect("clocks")
                .iter()
                .any(|c| c["node"] == node.as_str()),
            "no clock offset for {node}: {manifest}"
        );
    }
    // Each side names the other; the arriving endpoint's log starts at the move's step.
    assert_eq!(
        exported_moves(&trace, dir.path()),
        vec![
            ("arrived".into(), 1, 4, 1),
            ("arrived".into(), 1, 8, 3),
            ("left".into(), 1, 4, 3),
            ("left".into(), 1, 8, 4),
        ]
    );

    replays_bit_exact(&trace, &[]);
    // Stage 1 alone from a snapshot its first node took (step 2), across both moves, and from
    // one its second node took (step 6), across the second.
    replays_bit_exact(&trace, &["--stage", "1", "--from-step", "2"]);
    replays_bit_exact(&trace, &["--stage", "1", "--from-step", "6"]);
    // The pipeline from a step after the first move: every stage restores from step 6.
    replays_bit_exact(&trace, &["--from-step", "6"]);
}

#[test]
fn shm_recording_moves_stage_0_and_the_last_stage_and_replays_bit_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key_file(dir.path(), "cluster.key");
    let node = Node::start(&key);
    let trace = dir.path().join("run");
    let moves = [
        format!("stage=0,to={},at-step=5", node.addr),
        format!("stage=2,to={},at-step=9,rounds=0", node.addr),
    ];
    record(&trace, &key, "shm", &moves);

    let info = info(&trace);
    assert_eq!(info["counts"]["migration"], 4);
    assert_eq!(
        parts(&info, 0),
        vec![(0, None, Some((0, 5))), (3, Some(0), Some((5, 12)))]
    );
    assert_eq!(
        parts(&info, 2),
        vec![(2, None, Some((0, 9))), (4, Some(2), Some((9, 12)))]
    );
    let text = cli::text(&cli::run(&["info", trace.to_str().expect("utf-8")]));
    assert!(
        text.contains("stage 2: endpoint 2 on ") && text.contains(" steps 9..12"),
        "{text}"
    );
    replays_bit_exact(&trace, &[]);
    replays_bit_exact(&trace, &["--stage", "0", "--from-step", "4"]);
    replays_bit_exact(&trace, &["--stage", "2", "--from-step", "8"]);
}

#[test]
fn hosts_recording_collects_every_node_a_stage_ran_on_and_replays_bit_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key_file(dir.path(), "cluster.key");
    let (a, b, c) = (Node::start(&key), Node::start(&key), Node::start(&key));
    let trace = dir.path().join("run");
    // Stage 1 goes from b to the spare c, then back onto a, which also runs stages 0 and 2;
    // each node records into a scratch directory of its own, collected when the run ends.
    let args = [
        format!("--hosts={},{},{}", a.addr, b.addr, a.addr),
        format!("--migrate=stage=1,to={},at-step=4", c.addr),
        format!("--migrate=stage=1,to={},at-step=8", a.addr),
    ];
    record_with(&trace, &key, "tcp", &args);

    let info = info(&trace);
    assert_eq!(info["counts"]["migration"], 4);
    let stage1: Vec<(u64, String)> = {
        let mut v: Vec<_> = info["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .filter(|e| e["stage"] == 1)
            .map(|e| {
                let first = e["steps"][0].as_u64().expect("steps");
                (first, e["node"].as_str().expect("node").to_string())
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        stage1,
        vec![
            (0, b.addr.clone()),
            (4, c.addr.clone()),
            (8, a.addr.clone())
        ]
    );
    replays_bit_exact(&trace, &[]);
    replays_bit_exact(&trace, &["--stage", "1", "--from-step", "2"]);
}

#[test]
fn slug_migrate_moves_a_stage_of_a_running_recording() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key_file(dir.path(), "cluster.key");
    let target = Node::start(&key);
    let trace = dir.path().join("run");
    // 4 sequences of 500 tokens (2000 forward steps): long enough to be moved mid-run.
    let mut run = Command::new(cli::slug())
        .args(["record", "--out"])
        .arg(&trace)
        .args(["--quiet", "--perf", "none", "--ebpf", "none", "--"])
        .args([
            "--layers",
            "3",
            "--stages",
            "3",
            "--tokens",
            "500",
            "--max-seq",
            "512",
        ])
        .args([
            "--sequences",
            "4",
            "--microbatches",
            "2",
            "--timeout-ms",
            "20000",
        ])
        .args([
            "--transport",
            "tcp",
            "--control",
            "127.0.0.1:0",
            "--key-file",
        ])
        .arg(&key)
        .env_remove(KEY_ENV)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the recording");
    let mut stderr = BufReader::new(run.stderr.take().expect("stderr"));
    let control = loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).expect("stderr reads") > 0,
            "the recording ended before announcing its control endpoint"
        );
        if let Some(rest) = line.strip_prefix("slug: control endpoint listening on ") {
            break rest.split(' ').next().expect("an address").to_string();
        }
    };
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let o = Command::new(cli::slug())
        .args([
            "migrate",
            "--control",
            &control,
            "--stage",
            "1",
            "--to",
            &target.addr,
        ])
        .arg("--key-file")
        .arg(&key)
        .arg("--json")
        .env_remove(KEY_ENV)
        .output()
        .expect("run slug migrate");
    assert!(o.status.success(), "slug migrate: {}", cli::text(&o));
    let moved: Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let at = moved["at_step"].as_u64().expect("the move's step");
    assert!(run.wait().expect("the recording ends").success());

    let info = info(&trace);
    assert_eq!(info["counts"]["migration"], 2);
    let id = moved["index"].as_u64().expect("the move's number") + 3;
    assert_eq!(
        parts(&info, 1),
        vec![(1, None, Some((0, at))), (id, Some(1), Some((at, 2000)))]
    );
    replays_bit_exact(&trace, &[]);
}

/// Slots that endpoint `id`'s flight rings fill (a kernel span takes one, another record two;
/// appended, not yet drained into its log), from the ring headers (layout in
/// `recorder/src/flight.rs`: head at byte 64, tail at 128, native endianness).
fn ring_slots(dir: &Path, id: u64) -> u64 {
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
            let word = |at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"));
            word(64).saturating_sub(word(128))
        })
        .sum()
}

/// The ids `manifest.json` of `trace` lists (none while it cannot be read).
fn listed(trace: &Path) -> Vec<u64> {
    std::fs::read(trace.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|m| {
            m["endpoints"]
                .as_array()
                .map(|a| a.iter().filter_map(|e| e["id"].as_u64()).collect())
        })
        .unwrap_or_default()
}

#[test]
fn recording_killed_after_a_move_recovers_the_endpoint_the_stage_moved_to() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key_file(dir.path(), "cluster.key");
    let target = Node::start(&key);
    let trace = dir.path().join("run");
    // 4 sequences of 500 tokens (2000 forward steps per stage): long enough to be killed after
    // the move at step 5, on any machine.
    let mut run = Command::new(cli::slug())
        .args(["record", "--out"])
        .arg(&trace)
        .args(["--quiet", "--perf", "none", "--ebpf", "none", "--"])
        .args(["--layers", "3", "--stages", "3", "--tokens", "500"])
        .args([
            "--max-seq",
            "512",
            "--sequences",
            "4",
            "--microbatches",
            "2",
        ])
        .args(["--timeout-ms", "20000", "--transport", "tcp", "--key-file"])
        .arg(&key)
        .arg(format!("--migrate=stage=1,to={},at-step=5", target.addr))
        .env_remove(KEY_ENV)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the recording");
    // The move committed once the manifest lists its endpoint (3: stages + move 0); kill the
    // recording once that endpoint has recorded a good part of what it ran: 1000 ring slots
    // hold at least 500 records (a record takes one slot or two).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !listed(&trace).contains(&3) || ring_slots(&trace, 3) < 1000 {
        assert!(
            run.try_wait().expect("poll the recording").is_none(),
            "the recording ended before it could be killed after its move; make it longer"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the move's endpoint was not listed, or recorded nothing, in 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    run.kill().expect("SIGKILL the recording");
    run.wait().expect("the recording ends");
    // The node the stage moved to goes with it (the whole cluster lost).
    drop(target);

    let listed_now = listed(&trace);
    assert_eq!(
        listed_now,
        vec![0, 1, 2, 3],
        "the manifest lists the move's endpoint"
    );
    let o = cli::run(&["recover", "--json", trace.to_str().expect("utf-8 path")]);
    assert!(o.status.success(), "slug recover: {}", cli::text(&o));
    let report: Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let rebuilt = report["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["endpoint"] == 3)
        .unwrap_or_else(|| panic!("endpoint 3 not recovered: {report}"));
    assert_eq!(rebuilt["outcome"], "rebuilt", "{report}");
    let saved = rebuilt["from_log"].as_u64().expect("from_log")
        + rebuilt["from_rings"].as_u64().expect("from_rings");
    assert!(saved >= 500, "{report}");

    let info = info(&trace);
    let parts = parts(&info, 1);
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert_eq!(parts[0].0, 1);
    assert_eq!(parts[1].0, 3);
    assert_eq!(parts[1].1, Some(1), "endpoint 3 continues endpoint 1");
    let at = parts[1].2.expect("the move's steps").0;
    assert_eq!(parts[0].2, Some((0, at)));
    let e3 = info["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["id"] == 3)
        .expect("endpoint 3 in info");
    assert_eq!(e3["recovery"]["footer"], "valid", "{e3}");
    assert_eq!(
        info["counts"]["migration"], 2,
        "both sides of the move survived"
    );

    // Replay checks what was recorded, across the move, and says the rest was cut off.
    let o = cli::run(&["replay", trace.to_str().expect("utf-8 path")]);
    let text = cli::text(&o);
    assert_eq!(o.status.code(), Some(3), "slug replay: {text}");
    assert!(text.contains(" 0 differ"), "slug replay: {text}");
}
