//! `slug run --hosts ... --spares` across five network namespaces on a private bridge
//! (10.85.0.0/24): four stage nodes and one spare; stage 2's node is killed (SIGKILL) mid-run,
//! the spare takes the stage over from its latest checkpoint, and the tokens and every
//! transfer's bytes equal the single-process run's. Needs root and `ip`; otherwise it says why
//! it skipped. Everything it creates is torn down by a guard, even on failure.

#[path = "support/netns.rs"]
mod netns;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use netns::{Testbed, cluster_key};
use serde_json::Value;
use slug_transport::auth::KEY_ENV;

const SUBNET: &str = "10.85.0";
/// Four stages and one spare.
const NODES: usize = 5;

/// 400 forward steps per stage, checkpointed every 4.
const PIPELINE: [&str; 14] = [
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
    "--timeout-ms=20000",
];

#[test]
fn stage_2s_node_killed_in_its_namespace_fails_over_to_the_spare_namespace() {
    let Some((mut bed, addrs)) = Testbed::up("fo", SUBNET, NODES, "netns failover test") else {
        return;
    };
    let work = tempfile::tempdir().expect("tempdir");
    let (key, key_file) = cluster_key(work.path());
    let nodes: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| bed.start_node(i, a, &key, None).expect("node"))
        .collect();
    let hosts = nodes[..4].join(",");
    let spare = &nodes[4];
    let mut local = PIPELINE.to_vec();
    local.extend(["--transport", "local"]);
    let o = Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(&local)
        .output()
        .expect("the slug binary runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want: Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let mut run = Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(PIPELINE)
        .args(["--transport", "tcp", "--hosts", &hosts, "--key-file"])
        .arg(&key_file)
        .args(["--spares", spare, "--checkpoint-every", "4"])
        .env_remove(KEY_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the run");
    let mut lines = BufReader::new(run.stderr.take().expect("stderr")).lines();
    let armed = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.starts_with("slug: every stage has a checkpoint"));
    assert!(armed, "the run never said every stage had a checkpoint");
    bed.kill_node(2).expect("kill stage 2's node");
    let said: Vec<String> = lines.map_while(Result::ok).collect();
    let o = run.wait_with_output().expect("the run ends");
    assert!(o.status.success(), "{}", said.join("\n"));
    let got: Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(got["sequence_tokens"], want["sequence_tokens"]);
    assert_eq!(got["transfers"], want["transfers"]);
    assert_eq!(got["transfer_digest"], want["transfer_digest"]);
    let f = &got["failover"]["failovers"][0];
    assert_eq!(f["recovered"], true, "{f}");
    assert_eq!(f["stage"], 2, "{f}");
    assert_eq!(f["from"], nodes[2].as_str(), "{f}");
    assert_eq!(f["to"], spare.as_str(), "{f}");
    assert!(f["recovery_ms"].as_f64().is_some(), "{f}");
    assert_eq!(got["stage_reports"][2]["host"], spare.as_str());
    assert_eq!(got["stage_reports"][2]["steps"], 400);
    assert!(
        said.iter()
            .any(|l| l.starts_with("slug: stage 2 runs again")),
        "{said:?}"
    );
}
