//! `slug run --hosts ... --migrate` across five network namespaces on a private bridge
//! (10.83.0.0/24): four stage nodes and one spare, stage 2 moved to the spare mid-run; tokens and
//! every transfer's bytes equal the single-process run's. Needs root and `ip`; otherwise it says
//! why it skipped. Everything it creates is torn down by a guard, even on failure.

#[path = "support/netns.rs"]
mod netns;

use std::process::Command;

use netns::{Testbed, cluster_key};
use serde_json::Value;
use slug_transport::auth::KEY_ENV;

const SUBNET: &str = "10.83.0";
/// Four stages and one spare.
const NODES: usize = 5;

fn slug_json(args: &[&str]) -> Value {
    let o = Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(args)
        .env_remove(KEY_ENV)
        .output()
        .expect("the slug binary runs");
    assert!(
        o.status.success(),
        "slug {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

const PIPELINE: [&str; 12] = [
    "run",
    "--json",
    "--transfer-digest",
    "--layers",
    "4",
    "--stages",
    "4",
    "--tokens",
    "8",
    "--sequences",
    "2",
    "--timeout-ms=20000",
];

#[test]
fn a_stage_moves_to_the_spare_namespace_and_the_run_is_unchanged() {
    let Some((mut bed, addrs)) = Testbed::up("sm", SUBNET, NODES, "netns migrate test") else {
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
    let want = slug_json(&local);
    let m = format!("stage=2,to={spare},at-step=6");
    let mut moved = PIPELINE.to_vec();
    moved.extend([
        "--transport",
        "tcp",
        "--hosts",
        &hosts,
        "--key-file",
        key_file.to_str().expect("utf-8"),
        "--migrate",
        &m,
    ]);
    let got = slug_json(&moved);
    assert_eq!(got["sequence_tokens"], want["sequence_tokens"]);
    assert_eq!(got["transfers"], want["transfers"]);
    assert_eq!(got["transfer_digest"], want["transfer_digest"]);
    let mv = &got["migrations"][0];
    assert_eq!(mv["moved"], true, "{mv}");
    assert_eq!(mv["from"], nodes[2].as_str());
    assert_eq!(mv["to"], spare.as_str());
    assert!(mv["stall_ms"].as_f64().is_some(), "{mv}");
    assert_eq!(got["stage_reports"][2]["host"], spare.as_str());
    assert_eq!(got["stage_reports"][2]["steps"], 16);
}
