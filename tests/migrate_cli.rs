//! `slug run --migrate` on loopback: stages move to other `slug node`s mid-run (tcp, shm,
//! `--hosts`; twice; stage 0 and the last stage) and the tokens and every transfer's bytes stay
//! those of the unmigrated run; moves that cannot happen (dead address, wrong key, a target
//! killed during pre-copy, `--transport local`) leave the stage where it was and say why.

#[path = "support/cli.rs"]
mod cli;
#[path = "support/nodes.rs"]
mod nodes;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use nodes::{Node, key_file};
use slug_transport::auth::KEY_ENV;

/// 4 stages of a 4-layer tiny model, 2 sequences in flight, 6 tokens: 12 forward steps each.
const PIPELINE: [&str; 10] = [
    "--layers",
    "4",
    "--stages",
    "4",
    "--tokens",
    "6",
    "--sequences",
    "2",
    "--timeout-ms",
    "20000",
];

/// `slug run PIPELINE ARGS --json --transfer-digest`, which must succeed.
fn run_json(args: &[&str]) -> Value {
    let mut all: Vec<&str> = vec!["run", "--json", "--transfer-digest"];
    all.extend(PIPELINE);
    all.extend(args);
    let o = cli::run(&all);
    assert!(o.status.success(), "slug {all:?}: {}", cli::text(&o));
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

/// The unmigrated run: every stage a thread of one process.
fn baseline() -> Value {
    run_json(&["--transport", "local"])
}

/// Same tokens, and the same bytes in every transfer (the digest of all of them).
fn assert_same_run(got: &Value, want: &Value) {
    assert_eq!(got["sequence_tokens"], want["sequence_tokens"]);
    assert_eq!(got["transfers"], want["transfers"]);
    assert_eq!(got["transfer_digest"], want["transfer_digest"]);
    for r in got["stage_reports"].as_array().expect("stage reports") {
        assert_eq!(
            r["steps"], 12,
            "every step of stage {} ran once",
            r["stage"]
        );
    }
}

/// The moves all happened, each with its rounds, last delta and stall.
fn assert_moved(got: &Value, targets: &[&str]) {
    let moves = got["migrations"].as_array().expect("migrations");
    assert_eq!(moves.len(), targets.len());
    for (m, to) in moves.iter().zip(targets) {
        assert_eq!(m["moved"], true, "{m}");
        assert_eq!(m["to"], *to);
        let rounds = m["rounds"].as_array().expect("rounds");
        assert_eq!(rounds.last().expect("a last delta")["last"], true);
        assert!(m["stall_ms"].as_f64().expect("stall measured") > 0.0, "{m}");
        assert!(m["step_ms"].as_f64().is_some(), "{m}");
    }
}

#[test]
fn tcp_moves_stage_0_and_the_last_stage_and_one_stage_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key_file(dir.path(), "cluster.key");
    let (a, b) = (Node::start(&key), Node::start(&key));
    let want = baseline();
    let k = key.to_str().expect("utf-8");
    let moves = [
        format!("stage=0,to={},at-step=3", a.addr),
        format!("stage=3,to={},at-step=6,rounds=0", b.addr),
        format!("stage=0,to={},at-step=9", b.addr),
    ];
    let mut args = vec!["--transport", "tcp", "--key-file", k];
    for m in &moves {
        args.extend(["--migrate", m.as_str()]);
    }
    let got = run_json(&args);
    assert_same_run(&got, &want);
    assert_moved(&got, &[&a.addr, &b.addr, &b.addr]);
    let m = &got["migrations"];
    // The second move of stage 0 left the node the first one brought it to.
    assert_eq!(m[2]["from"], a.addr.as_str());
    // Stop-and-copy: one round, the whole state, shipped while paused.
    assert_eq!(m[1]["rounds"].as_array().map(Vec::len), Some(1));
    assert_eq!(got["stage_reports"][0]["host"], b.addr.as_str());
    assert_eq!(got["stage_reports"][3]["host"], b.addr.as_str());
}

#[test]
fn shm_moves_a_stage_twice_and_text_output_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key_file(dir.path(), "cluster.key");
    let (a, b) = (Node::start(&key), Node::start(&key));
    let want = baseline();
    let k = key.to_str().expect("utf-8");
    let first = format!("stage=1,to={},at-step=4", a.addr);
    let second = format!("stage=1,to={},at-step=8", b.addr);
    let args = [
        "--transport",
        "shm",
        "--key-file",
        k,
        "--migrate",
        &first,
        "--migrate",
        &second,
    ];
    let got = run_json(&args);
    assert_same_run(&got, &want);
    assert_moved(&got, &[&a.addr, &b.addr]);
    let mut all = vec!["run"];
    all.extend(PIPELINE);
    all.extend(args);
    let o = cli::run(&all);
    let out = cli::text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("migrated stage 1 from ") && out.contains("stall "),
        "{out}"
    );
}

#[test]
fn hosts_runs_move_a_stage_to_a_spare_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key_file(dir.path(), "cluster.key");
    let nodes: Vec<Node> = (0..5)
        .map(|_| Node::start_with(&key, &["--once"], Stdio::inherit()))
        .collect();
    let hosts: Vec<&str> = nodes[..4].iter().map(|n| n.addr.as_str()).collect();
    let hosts = hosts.join(",");
    let spare = &nodes[4].addr;
    let want = baseline();
    let k = key.to_str().expect("utf-8");
    let m = format!("stage=2,to={spare},at-step=5");
    let got = run_json(&[
        "--transport",
        "tcp",
        "--hosts",
        &hosts,
        "--key-file",
        k,
        "--migrate",
        &m,
    ]);
    assert_same_run(&got, &want);
    assert_moved(&got, &[spare]);
    assert_eq!(got["stage_reports"][2]["host"], spare.as_str());
}

#[test]
fn refused_moves_leave_the_stage_running_and_say_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key_file(dir.path(), "cluster.key");
    let other = key_file(dir.path(), "other.key");
    let stranger = Node::start(&other);
    // An address nobody listens on any more.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let want = baseline();
    let k = key.to_str().expect("utf-8");
    let to_dead = format!("stage=1,to={dead},at-step=3");
    let to_stranger = format!("stage=2,to={},at-step=7", stranger.addr);
    let got = run_json(&[
        "--transport",
        "tcp",
        "--key-file",
        k,
        "--migrate",
        &to_dead,
        "--migrate",
        &to_stranger,
    ]);
    assert_same_run(&got, &want);
    for m in got["migrations"].as_array().expect("migrations") {
        assert_eq!(m["moved"], false, "{m}");
        let reason = m["reason"].as_str().expect("a reason");
        assert!(
            reason.contains("could not open a session with the target node"),
            "{reason}"
        );
        eprintln!("refused as it should be: {reason}");
    }
    // One process cannot move a stage anywhere: said before anything runs.
    let mut all = vec!["run", "--transport", "local", "--migrate", &to_dead];
    all.extend(PIPELINE);
    let o = cli::run(&all);
    assert!(!o.status.success());
    assert!(
        cli::text(&o).contains("use --transport shm or tcp"),
        "{}",
        cli::text(&o)
    );
}

#[test]
fn a_target_killed_during_pre_copy_leaves_the_stage_on_its_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key_file(dir.path(), "cluster.key");
    let target = Node::start(&key);
    let idle = target.fds();
    let k = key.to_str().expect("utf-8");
    // 80 forward steps; pre-copy rounds from step 6 on, the switch at 70.
    let m = format!("stage=1,to={},at-step=70,rounds=64", target.addr);
    let long = [
        "run",
        "--json",
        "--transfer-digest",
        "--layers",
        "3",
        "--stages",
        "3",
        "--tokens",
        "40",
        "--sequences",
        "2",
        "--timeout-ms",
        "20000",
    ];
    let want = {
        let mut a = long.to_vec();
        a.extend(["--transport", "local"]);
        let o = cli::run(&a);
        assert!(o.status.success(), "{}", cli::text(&o));
        serde_json::from_slice::<Value>(&o.stdout).expect("json")
    };
    let mut args = long.to_vec();
    args.extend(["--transport", "tcp", "--key-file", k, "--migrate", &m]);
    let run = Command::new(cli::slug())
        .args(&args)
        .env_remove(KEY_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the run");
    // Once the coordinator's session is open on the target, and its first rounds have had
    // time to arrive, the target dies.
    let deadline = Instant::now() + Duration::from_secs(20);
    while target.fds() <= idle && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut target = target;
    target.child.kill().expect("kill -9 the target");
    let o = run.wait_with_output().expect("the run ends");
    assert!(o.status.success(), "{}", cli::text(&o));
    let got: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(got["sequence_tokens"], want["sequence_tokens"]);
    assert_eq!(got["transfer_digest"], want["transfer_digest"]);
    let mv = &got["migrations"][0];
    assert_eq!(mv["moved"], false, "{mv}");
    let reason = mv["reason"].as_str().expect("a reason");
    assert!(reason.contains("target node"), "{reason}");
}

/// A long tcp run taking `slug migrate` requests; returns it and its control address.
fn live_run(key: &Path) -> (Child, String, std::sync::mpsc::Receiver<String>) {
    let mut run = Command::new(cli::slug())
        .args(LIVE)
        .args(["--transport", "tcp", "--key-file"])
        .arg(key)
        .args(["--control", "127.0.0.1:0"])
        .env_remove(KEY_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the run");
    let stderr = run.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the run announces its control endpoint");
        if let Some(rest) = line.strip_prefix("slug: control endpoint listening on ") {
            break rest.split(' ').next().expect("an address").to_string();
        }
    };
    (run, addr, rx)
}

/// 3 stages of 2 layers, 8 sequences (2 in flight), 400 tokens: 3200 forward steps, long
/// enough to be moved three times mid-run. Each requested move is placed about a second of
/// steps ahead of the pipeline (more when a node went past it), so three moves take seconds
/// whatever the machine's speed: the run must last well beyond that on a fast, idle machine
/// (1600 steps of 1-layer stages lasted about 5 s in CI, too close).
const LIVE: [&str; 17] = [
    "run",
    "--json",
    "--transfer-digest",
    "--layers",
    "6",
    "--stages",
    "3",
    "--tokens",
    "400",
    "--max-seq",
    "512",
    "--sequences",
    "8",
    "--microbatches",
    "2",
    "--timeout-ms",
    "20000",
];

/// What the live run said on stderr, once it has ended (killed if it has not within 30 s).
fn stderr_of(mut run: Child, lines: &std::sync::mpsc::Receiver<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    while run.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = run.kill();
    let status = run.wait().map(|s| s.to_string()).unwrap_or_default();
    let mut said = Vec::new();
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(2)) {
        said.push(line);
    }
    format!("{}\n(run {status})", said.join("\n"))
}

fn migrate(args: &[&str]) -> std::process::Output {
    let mut all = vec!["migrate"];
    all.extend(args);
    Command::new(cli::slug())
        .args(&all)
        .env_remove(KEY_ENV)
        .output()
        .expect("run slug migrate")
}

#[test]
fn slug_migrate_moves_stages_of_a_running_pipeline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key_file(dir.path(), "cluster.key");
    let other = key_file(dir.path(), "other.key");
    let (a, b) = (Node::start(&key), Node::start(&key));
    let want = {
        let mut local = LIVE.to_vec();
        local.extend(["--transport", "local"]);
        let o = cli::run(&local);
        assert!(o.status.success(), "{}", cli::text(&o));
        serde_json::from_slice::<Value>(&o.stdout).expect("json")
    };
    let (run, control, stderr) = live_run(&key);
    let k = key.to_str().expect("utf-8");
    // A caller without the cluster key is refused before it can ask anything.
    let stranger = migrate(&[
        "--control",
        &control,
        "--stage",
        "1",
        "--to",
        &a.addr,
        "--key-file",
        other.to_str().expect("utf-8"),
    ]);
    assert!(!stranger.status.success());
    assert!(
        cli::text(&stranger).contains("cluster key"),
        "{}",
        cli::text(&stranger)
    );
    // A stage the pipeline does not have: refused, exit status 1, nothing moves.
    let bad = migrate(&[
        "--control",
        &control,
        "--stage",
        "7",
        "--to",
        &a.addr,
        "--key-file",
        k,
    ]);
    assert_eq!(bad.status.code(), Some(1), "{}", cli::text(&bad));
    assert!(
        cli::text(&bad).contains("stages 0..2"),
        "{}",
        cli::text(&bad)
    );
    let mut reports = Vec::new();
    for (stage, to) in [("1", &a.addr), ("2", &b.addr), ("0", &b.addr)] {
        let o = migrate(&[
            "--control",
            &control,
            "--stage",
            stage,
            "--to",
            to,
            "--key-file",
            k,
            "--json",
        ]);
        let r: Option<Value> = serde_json::from_slice(&o.stdout).ok();
        if !o.status.success() || r.as_ref().is_none_or(|r| r["moved"] != true) {
            panic!(
                "move stage {stage}: {}\nthe run's stderr:\n{}",
                cli::text(&o),
                stderr_of(run, &stderr)
            );
        }
        let r = r.expect("json");
        assert!(r["stall_ms"].as_f64().is_some(), "{r}");
        reports.push(r);
    }
    let o = run.wait_with_output().expect("the run ends");
    let said: String = stderr.try_iter().collect::<Vec<_>>().join("\n");
    assert!(
        o.status.success(),
        "{}\n{said}",
        String::from_utf8_lossy(&o.stdout)
    );
    let got: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(got["sequence_tokens"], want["sequence_tokens"]);
    assert_eq!(got["transfers"], want["transfers"]);
    assert_eq!(got["transfer_digest"], want["transfer_digest"]);
    let moves = got["migrations"].as_array().expect("migrations");
    assert_eq!(moves.len(), 3, "{moves:?}");
    for (m, r) in moves.iter().zip(&reports) {
        assert_eq!(m["at_step"], r["at_step"]);
        assert_eq!(m["moved"], true);
    }
    assert_eq!(got["stage_reports"][0]["host"], b.addr.as_str());
    assert_eq!(got["stage_reports"][1]["host"], a.addr.as_str());
    assert_eq!(got["stage_reports"][2]["host"], b.addr.as_str());
}
