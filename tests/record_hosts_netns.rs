//! `slug record --hosts` across network namespaces: three namespaces on a private bridge
//! (10.79.0.0/24), one `slug node --listen` per namespace recording into its own TMPDIR, the
//! coordinator in the root namespace collecting their files over the node connections; the
//! collected trace is read by `slug info` and replayed bit for bit by `slug replay`. Needs root
//! and `ip`; otherwise it says why it skipped. A guard tears down everything it creates.

use std::path::PathBuf;
use std::process::Command;

#[path = "support/netns.rs"]
mod netns;

use netns::{Testbed, cluster_key};
use slug_transport::auth::KEY_ENV;

const NODES: usize = 3;
const SUBNET: &str = "10.79.0";

fn slug(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(args)
        .env_remove(KEY_ENV)
        .output()
        .expect("the slug binary runs")
}

#[test]
fn three_namespaces_record_one_trace_that_replays_bit_for_bit() {
    let Some((mut bed, addrs)) = Testbed::up("sr", SUBNET, NODES, "netns record test") else {
        return;
    };
    let work = tempfile::tempdir().expect("tempdir");
    let (key, key_file) = cluster_key(work.path());
    let tmps: Vec<PathBuf> = (0..NODES)
        .map(|i| {
            let d = work.path().join(format!("node{i}-tmp"));
            std::fs::create_dir(&d).expect("node tmp");
            d
        })
        .collect();
    let hosts: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| bed.start_node(i, a, &key, Some(&tmps[i])).expect("node"))
        .collect();
    let out = work.path().join("trace");
    let o = slug(&[
        "record",
        "--out",
        out.to_str().unwrap(),
        "--payloads",
        "all",
        "--snapshot-every",
        "3",
        "--json",
        "--",
        "--model",
        "tiny",
        "--layers",
        "3",
        "--stages",
        "3",
        "--tokens",
        "6",
        "--sequences",
        "2",
        "--transport",
        "tcp",
        "--hosts",
        &hosts.join(","),
        "--key-file",
        key_file.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "record: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    for (s, ep) in manifest["endpoints"].as_array().unwrap().iter().enumerate() {
        assert_eq!(ep["node"], hosts[s].as_str(), "{ep}");
        assert_eq!(ep["host"], addrs[s].as_str(), "{ep}");
        assert!(out.join(format!("endpoints/{s}.slog")).is_file());
    }
    assert_eq!(manifest["clocks"].as_array().unwrap().len(), NODES);
    // No wait needed: record succeeds only once every node confirmed it removed its scratch.
    for (i, tmp) in tmps.iter().enumerate() {
        let left: Vec<_> = std::fs::read_dir(tmp).unwrap().collect();
        assert!(left.is_empty(), "node {i} left its scratch: {left:?}");
    }
    let info = slug(&["info", out.to_str().unwrap()]);
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    assert!(String::from_utf8_lossy(&info.stdout).contains(&hosts[2]));
    for args in [vec![], vec!["--from-step", "3"], vec!["--stage", "1"]] {
        let mut a = vec!["replay", out.to_str().unwrap()];
        a.extend(args.iter());
        let r = slug(&a);
        assert!(
            r.status.success(),
            "replay {args:?}: {}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
    }
}
