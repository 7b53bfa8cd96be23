//! `slug record --hosts` across network namespaces: three namespaces on a private bridge
//! (10.79.0.0/24), one `slug node --listen` per namespace recording into its own TMPDIR, the
//! coordinator in the root namespace collecting their files over the node connections; the
//! collected trace is read by `slug info` and replayed bit for bit by `slug replay`. Needs root
//! and `ip`; otherwise it says why it skipped. A guard tears down everything it creates.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use slug_transport::auth::{ClusterKey, KEY_ENV};
use slug_transport::node::LISTENING_PREFIX;

const NODES: usize = 3;
const SUBNET: &str = "10.79.0";

/// Runs `ip` with `args`; returns stderr on failure.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why this machine cannot run the test, if it cannot.
fn skip_reason() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("unknown");
    if uid != "0" {
        return Some(format!(
            "not root (effective uid {uid}); network namespaces need root"
        ));
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("the `ip` tool (iproute2) is not installed".into());
    }
    let addrs = Command::new("ip").args(["-4", "addr"]).output().ok()?;
    if String::from_utf8_lossy(&addrs.stdout).contains(&format!("{SUBNET}.")) {
        return Some(format!("{SUBNET}.0/24 is already in use on this machine"));
    }
    None
}

/// Namespaces, bridge and node processes of one test; removed on drop.
struct Testbed {
    tag: String,
    namespaces: Vec<String>,
    bridge: Option<String>,
    nodes: Vec<Child>,
}

impl Testbed {
    fn new() -> Self {
        Self {
            tag: format!("{}", std::process::id() % 100_000),
            namespaces: Vec::new(),
            bridge: None,
            nodes: Vec::new(),
        }
    }

    fn build(&mut self) -> Result<Vec<String>, String> {
        let bridge = format!("srb{}", self.tag);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        self.bridge = Some(bridge.clone());
        ip(&["addr", "add", &format!("{SUBNET}.1/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        let mut addrs = Vec::new();
        for i in 0..NODES {
            let ns = format!("slugr{}n{i}", self.tag);
            ip(&["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            let (host_end, ns_end) = (
                format!("srv{}n{i}", self.tag),
                format!("srp{}n{i}", self.tag),
            );
            ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end,
            ])?;
            ip(&["link", "set", &ns_end, "netns", &ns])?;
            ip(&["link", "set", &host_end, "master", &bridge])?;
            ip(&["link", "set", &host_end, "up"])?;
            let addr = format!("{SUBNET}.{}", 10 + i);
            ip(&[
                "netns",
                "exec",
                &ns,
                "ip",
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &ns_end,
            ])?;
            ip(&["netns", "exec", &ns, "ip", "link", "set", &ns_end, "up"])?;
            ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
            addrs.push(addr);
        }
        Ok(addrs)
    }

    /// Starts `slug node --listen ADDR:7070 --once` inside namespace `i` with its own TMPDIR
    /// (where it records); returns its address.
    fn start_node(
        &mut self,
        i: usize,
        addr: &str,
        key: &ClusterKey,
        tmp: &Path,
    ) -> Result<String, String> {
        let slug = PathBuf::from(env!("CARGO_BIN_EXE_slug"));
        let listen = format!("{addr}:7070");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.namespaces[i]])
            .arg(&slug)
            .args(["node", "--listen", &listen, "--once"])
            .env(KEY_ENV, key.as_env_value())
            .env("TMPDIR", tmp)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("start node {i}: {e}"))?;
        let stdout = child.stdout.take();
        self.nodes.push(child);
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(out) = stdout {
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(out).read_line(&mut line);
                let _ = tx.send(line);
            });
        }
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| format!("node {i} did not start listening"))?;
        line.trim()
            .strip_prefix(LISTENING_PREFIX)
            .map(str::to_string)
            .ok_or_else(|| format!("node {i} said {line:?}"))
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for c in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting a namespace deletes its veth end, and with it the peer on the bridge.
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        if let Some(b) = &self.bridge {
            let _ = ip(&["link", "del", b]);
        }
    }
}

fn slug(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(args)
        .env_remove(KEY_ENV)
        .output()
        .expect("the slug binary runs")
}

#[test]
fn three_namespaces_record_one_trace_that_replays_bit_for_bit() {
    if let Some(why) = skip_reason() {
        eprintln!("netns record test skipped: {why}");
        return;
    }
    let mut bed = Testbed::new();
    let addrs = match bed.build() {
        Ok(a) => a,
        Err(e) => {
            // Containers may allow root but not namespaces or bridges: say so and stop.
            eprintln!("netns record test skipped: cannot build the test network: {e}");
            return;
        }
    };
    let work = tempfile::tempdir().expect("tempdir");
    let key = ClusterKey::random().expect("cluster key");
    let key_file = work.path().join("cluster.key");
    std::fs::write(&key_file, key.as_env_value()).expect("write key file");
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
        .map(|(i, a)| bed.start_node(i, a, &key, &tmps[i]).expect("node"))
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
