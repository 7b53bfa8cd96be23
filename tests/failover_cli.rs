//! `slug run --spares` on loopback: the node of a stage is killed (SIGKILL) mid-run, a spare
//! takes the stage over from its latest checkpoint, and the tokens and every transfer's bytes
//! stay those of a run without the failure; with the spares used up, the loss ends the run
//! with an error naming the stage, its node and its step; flags that cannot work say why.

#[path = "support/cli.rs"]
mod cli;
#[path = "support/nodes.rs"]
mod nodes;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::Value;

use nodes::{Node, key_file};
use slug_transport::auth::KEY_ENV;

/// 4 stages of a 4-layer tiny model, 4 sequences (2 in flight), 100 tokens: 400 forward steps
/// per stage, checkpointed every 4, so a stage killed once all are armed has most of the run
/// still ahead of it. (The runs add `--timeout-ms`.)
const PIPELINE: [&str; 13] = [
    "run",
    "--json",
    "--transfer-digest",
    "--layers",
    "4",
    "--stages",
    "4",
    "--tokens",
    "100",
    "--sequences",
    "4",
    "--microbatches",
    "2",
];
/// How long a link or a node's answer may take (a killed node's links end at once).
const TIMEOUT_MS: &str = "20000";
const STEPS: u64 = 400;

/// The run without failures: every stage a thread of one process.
fn baseline() -> Value {
    let mut args = PIPELINE.to_vec();
    args.extend(["--transport", "local", "--timeout-ms", TIMEOUT_MS]);
    let o = cli::run(&args);
    assert!(o.status.success(), "{}", cli::text(&o));
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

/// Four stage nodes and `spares` spares, and the run over them, its stderr lines arriving on
/// the receiver.
struct Cluster {
    _dir: tempfile::TempDir,
    stages: Vec<Node>,
    spares: Vec<Node>,
    run: Child,
    stderr: Receiver<String>,
}

impl Cluster {
    fn start(spares: usize) -> Cluster {
        Self::checkpointed(spares, "4")
    }

    /// Checkpointed every `every` steps.
    fn checkpointed(spares: usize, every: &str) -> Cluster {
        Self::with_timeout(spares, every, TIMEOUT_MS)
    }

    /// Checkpointed every `every` steps, links and answers waited for `timeout_ms`.
    fn with_timeout(spares: usize, every: &str, timeout_ms: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = key_file(dir.path(), "cluster.key");
        let stages: Vec<Node> = (0..4).map(|_| Node::start(&key)).collect();
        let spares: Vec<Node> = (0..spares).map(|_| Node::start(&key)).collect();
        let hosts: Vec<&str> = stages.iter().map(|n| n.addr.as_str()).collect();
        let spare_list: Vec<&str> = spares.iter().map(|n| n.addr.as_str()).collect();
        let mut run = Command::new(cli::slug())
            .args(PIPELINE)
            .args(["--transport", "tcp", "--key-file"])
            .arg(&key)
            .args(["--hosts", &hosts.join(","), "--timeout-ms", timeout_ms])
            .args([
                "--spares",
                &spare_list.join(","),
                "--checkpoint-every",
                every,
            ])
            .env_remove(KEY_ENV)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the run");
        let err = run.stderr.take().expect("stderr");
        let (tx, stderr) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        Cluster {
            _dir: dir,
            stages,
            spares,
            run,
            stderr,
        }
    }

    /// Waits (at most a minute) for a stderr line starting with `prefix`.
    fn wait_for(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(line) => seen.push(line),
                Err(e) => panic!(
                    "no stderr line starting with {prefix:?} ({e}); it said:\n{}",
                    seen.join("\n")
                ),
            }
        }
    }

    /// The run's exit status and stdout, with what else it said on stderr.
    fn finish(self) -> (bool, Value, String) {
        let Cluster {
            run, stderr, _dir, ..
        } = self;
        let o = run.wait_with_output().expect("the run ends");
        // Every line, up to the end of the pipe (the reader may still be forwarding some).
        let mut said = Vec::new();
        while let Ok(line) = stderr.recv_timeout(Duration::from_secs(10)) {
            said.push(line);
        }
        let json = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        (o.status.success(), json, said.join("\n"))
    }
}

/// Same tokens, same bytes in every transfer, every step run once per stage.
fn assert_same_run(got: &Value, want: &Value) {
    assert_eq!(got["sequence_tokens"], want["sequence_tokens"]);
    assert_eq!(got["transfers"], want["transfers"]);
    assert_eq!(got["transfer_digest"], want["transfer_digest"]);
    let reports = got["stage_reports"].as_array().expect("stage reports");
    for (r, w) in reports
        .iter()
        .zip(want["stage_reports"].as_array().expect("reports"))
    {
        assert_eq!(
            r["steps"], STEPS,
            "every step of stage {} counted once",
            r["stage"]
        );
        assert_eq!(r["layers"], w["layers"]);
    }
}

/// Failover `i` of the run: stage `stage` recovered on `spare` from a checkpoint, both
/// times measured.
fn assert_failed_over(got: &Value, i: usize, stage: u64, spare: &str) {
    let f = &got["failover"]["failovers"][i];
    assert_eq!(f["stage"], stage, "{f}");
    assert_eq!(f["recovered"], true, "{f}");
    assert_eq!(f["to"], spare, "{f}");
    let step = f["restored_step"].as_u64().expect("restored step");
    assert!(step > 0 && step.is_multiple_of(4) && step < STEPS, "{f}");
    assert!(f["restored_bytes"].as_u64().expect("bytes") > 0, "{f}");
    assert!(f["detection_ms"].as_f64().is_some(), "{f}");
    assert!(
        f["recovery_ms"].as_f64().expect("recovery measured") > 0.0,
        "{f}"
    );
    assert_eq!(got["stage_reports"][stage as usize]["host"], spare);
}

#[test]
fn a_spare_takes_over_stage_2_after_kill_9_with_the_same_tokens_and_transfers() {
    let want = baseline();
    let mut c = Cluster::start(1);
    // Every stage has a checkpoint: the kill falls mid-run, after at least one.
    c.wait_for("slug: every stage has a checkpoint");
    c.stages[2].kill();
    let lost = c.wait_for("slug: stage 2's node");
    let spare = c.spares[0].addr.clone();
    assert!(lost.contains(&format!("on spare {spare}")), "{lost}");
    let runs = c.wait_for("slug: stage 2 runs again");
    assert!(runs.contains(&spare), "{runs}");
    let (ok, got, said) = c.finish();
    assert!(ok, "{said}");
    assert_same_run(&got, &want);
    assert_failed_over(&got, 0, 2, &spare);
    assert_eq!(got["failover"]["spares_left"], serde_json::json!([]));
    assert!(got["failover"]["checkpoints"].as_u64().expect("count") >= 4);
}

#[test]
fn a_stopped_node_is_declared_lost_within_the_heartbeat_limit_and_its_neighbours_go_on() {
    let want = baseline();
    // Links would wait 10 minutes for a silent peer: the run finishing at all (each wait below
    // gives up after a minute) shows that nothing waits for the stopped node that long.
    let c = Cluster::with_timeout(1, "4", "600000");
    c.wait_for("slug: every stage has a checkpoint");
    // A host that vanished: its process keeps its sockets open and says nothing.
    let stopped = Command::new("kill")
        .args(["-STOP", &c.stages[2].child.id().to_string()])
        .status()
        .expect("kill -STOP");
    assert!(stopped.success());
    let lost = c.wait_for("slug: stage 2's node");
    let spare = c.spares[0].addr.clone();
    assert!(lost.contains(&format!("on spare {spare}")), "{lost}");
    c.wait_for("slug: stage 2 runs again");
    let (ok, got, said) = c.finish();
    assert!(ok, "{said}");
    assert_same_run(&got, &want);
    assert_failed_over(&got, 0, 2, &spare);
    // Noticed by the heartbeat limit, far from the links' timeout, and said with its time.
    assert!(
        lost.contains("node stopped responding (no heartbeat for 5000 ms); noticed "),
        "{lost}"
    );
    let f = &got["failover"]["failovers"][0];
    let detected = f["detection_ms"].as_f64().expect("detection measured");
    assert!(detected < 60_000.0, "{f}");
}

#[test]
fn the_last_stage_fails_over_too_and_a_second_spare_takes_the_next_loss() {
    let want = baseline();
    let mut c = Cluster::start(2);
    c.wait_for("slug: every stage has a checkpoint");
    c.stages[2].kill();
    // Once stage 2 runs again (a node lost while its neighbour's spare is still connecting
    // to it is not recovered: the spare's first connection fails).
    c.wait_for("slug: stage 2 runs again");
    // The last stage holds the generated tokens and feeds stage 0 back.
    c.stages[3].kill();
    c.wait_for("slug: stage 3 runs again");
    let (a, b) = (c.spares[0].addr.clone(), c.spares[1].addr.clone());
    let (ok, got, said) = c.finish();
    assert!(ok, "{said}");
    assert_same_run(&got, &want);
    assert_failed_over(&got, 0, 2, &a);
    assert_failed_over(&got, 1, 3, &b);
}

#[test]
fn a_stage_lost_before_any_checkpoint_is_rebuilt_from_the_seed_and_re_fed_from_the_start() {
    let want = baseline();
    // No checkpoint within the run's 400 steps: a spare can only start from step 0.
    let mut c = Cluster::checkpointed(1, "65536");
    // Every stage has run a step: every link is up.
    c.wait_for("slug: failover armed");
    c.stages[2].kill();
    c.wait_for("slug: stage 2 runs again");
    let spare = c.spares[0].addr.clone();
    let (ok, got, said) = c.finish();
    assert!(ok, "{said}");
    assert_same_run(&got, &want);
    let f = &got["failover"]["failovers"][0];
    assert_eq!(f["recovered"], true, "{f}");
    assert_eq!(f["restored_step"], 0, "{f}");
    assert_eq!(f["restored_bytes"], 0, "{f}");
    assert_eq!(got["stage_reports"][2]["host"], spare.as_str());
    assert_eq!(got["failover"]["checkpoints"], 0);
}

/// Process ids of `pid`'s children, lowest first.
fn children(pid: u32) -> Vec<u32> {
    let mut kids: Vec<u32> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            // The parent is the 4th field of /proc/PID/stat, after the parenthesised name.
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|st| {
                    let rest = &st[st.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect();
    kids.sort_unstable();
    kids
}

#[test]
fn a_stage_process_of_a_local_tcp_run_killed_mid_run_fails_over_too() {
    let want = baseline();
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key_file(dir.path(), "cluster.key");
    let spare = Node::start(&key);
    let mut run = Command::new(cli::slug())
        .args(PIPELINE)
        .args([
            "--transport",
            "tcp",
            "--timeout-ms",
            TIMEOUT_MS,
            "--key-file",
        ])
        .arg(&key)
        .args(["--spares", &spare.addr])
        .env_remove(KEY_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the run");
    let err = run.stderr.take().expect("stderr");
    let mut lines = BufReader::new(err).lines();
    let armed = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.starts_with("slug: failover armed"));
    assert!(armed, "the run never said every stage had a checkpoint");
    // The run started one stage process per stage, in stage order.
    let stages = children(run.id());
    assert_eq!(stages.len(), 4, "{stages:?}");
    let killed = Command::new("kill")
        .args(["-9", &stages[2].to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let said: Vec<String> = lines.map_while(Result::ok).collect();
    let o = run.wait_with_output().expect("the run ends");
    assert!(o.status.success(), "{}", said.join("\n"));
    let got: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_same_run(&got, &want);
    let f = &got["failover"]["failovers"][0];
    assert_eq!(f["recovered"], true, "{f}");
    assert_eq!(f["to"], spare.addr.as_str(), "{f}");
}

#[test]
fn with_every_spare_used_a_lost_node_ends_the_run_naming_stage_host_and_step() {
    let mut c = Cluster::start(1);
    c.wait_for("slug: every stage has a checkpoint");
    c.stages[2].kill();
    c.wait_for("slug: stage 2 runs again");
    let spare = c.spares[0].addr.clone();
    // The spare now runs stage 2; it dies too, and no spare is left.
    c.spares[0].kill();
    let (ok, _, said) = c.finish();
    assert!(!ok, "{said}");
    assert!(
        said.contains(&format!("stage 2 on {spare} failed at ")),
        "{said}"
    );
    assert!(said.contains("no spare is left"), "{said}");
}

#[test]
fn spares_that_cannot_work_are_refused_with_the_fix() {
    for (args, want) in [
        (
            vec!["--transport", "shm", "--spares", "127.0.0.1:1"],
            "--transport tcp",
        ),
        (
            vec!["--transport", "local", "--spares", "127.0.0.1:1"],
            "one process",
        ),
        (
            vec!["--transport", "tcp", "--checkpoint-every", "4"],
            "no --spares",
        ),
        (
            vec![
                "--transport",
                "tcp",
                "--spares",
                "127.0.0.1:1",
                "--checkpoint-every",
                "0",
            ],
            "every 1 to",
        ),
        (
            vec![
                "--transport",
                "tcp",
                "--spares",
                "127.0.0.1:1",
                "--migrate",
                "stage=1,to=127.0.0.1:2,at-step=3",
            ],
            "cannot be combined",
        ),
    ] {
        let mut all = vec!["run", "--stages", "2"];
        all.extend(&args);
        let o = cli::run(&all);
        assert!(!o.status.success(), "{args:?}");
        assert!(cli::text(&o).contains(want), "{args:?}: {}", cli::text(&o));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("trace");
    let o = cli::run(&[
        "record",
        "--out",
        out.to_str().expect("utf-8"),
        "--stages",
        "2",
        "--transport",
        "tcp",
        "--spares",
        "127.0.0.1:1",
    ]);
    assert!(!o.status.success());
    assert!(
        cli::text(&o).contains("not supported while recording"),
        "{}",
        cli::text(&o)
    );
    assert!(!out.exists(), "a refused record writes nothing");
}
