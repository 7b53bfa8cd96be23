//! A real multi-host run: four network namespaces on a private bridge (10.77.0.0/24), one
//! `slug node --listen` per namespace, a 4-stage tcp pipeline coordinated from the root
//! namespace, tokens compared with the single-process run. Needs root and `ip`; otherwise it
//! says why it skipped. Everything it creates is torn down by a guard, even on failure.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use slug_kernels::ModelConfig;
use slug_transport::auth::{ClusterKey, KEY_ENV};
use slug_transport::node::LISTENING_PREFIX;
use slug_transport::pipeline::{NoObservers, PipelineConfig, prompt_tokens, run};
use slug_transport::transfer::TransportKind;

const NODES: usize = 4;
const SUBNET: &str = "10.77.0";

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
        let bridge = format!("slb{}", self.tag);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        self.bridge = Some(bridge.clone());
        ip(&["addr", "add", &format!("{SUBNET}.1/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        let mut addrs = Vec::new();
        for i in 0..NODES {
            let ns = format!("slug{}n{i}", self.tag);
            ip(&["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            let (host_end, ns_end) = (
                format!("slv{}n{i}", self.tag),
                format!("slp{}n{i}", self.tag),
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

    /// Starts `slug node --listen ADDR:7070 --once` inside namespace `i`; returns its address.
    fn start_node(&mut self, i: usize, addr: &str, key: &ClusterKey) -> Result<String, String> {
        let slug = PathBuf::from(env!("CARGO_BIN_EXE_slug"));
        let listen = format!("{addr}:7070");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.namespaces[i]])
            .arg(&slug)
            .args(["node", "--listen", &listen, "--once"])
            .env(KEY_ENV, key.as_env_value())
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

fn config() -> PipelineConfig {
    let mut model = ModelConfig::preset("tiny").expect("tiny preset");
    model.layers = 4;
    model.seed = 5;
    let mut cfg = PipelineConfig::new(model, "x", 1, 8);
    cfg.prompts = ["four hosts", "one pipeline"]
        .iter()
        .map(|p| prompt_tokens(p))
        .collect();
    cfg.stages = NODES;
    cfg.timeout_ms = 20_000;
    cfg
}

#[test]
fn four_namespaces_run_the_same_tokens_as_one_process() {
    if let Some(why) = skip_reason() {
        eprintln!("netns test skipped: {why}");
        return;
    }
    let mut bed = Testbed::new();
    let addrs = match bed.build() {
        Ok(a) => a,
        Err(e) => {
            // Containers may allow root but not namespaces or bridges: say so and stop.
            eprintln!("netns test skipped: cannot build the test network: {e}");
            return;
        }
    };
    let key = ClusterKey::random().expect("cluster key");
    let hosts: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| bed.start_node(i, a, &key).expect("node"))
        .collect();
    let single = run(&config(), &NoObservers).expect("single-process run");
    let mut cfg = config();
    cfg.transport = TransportKind::Tcp;
    cfg.hosts = hosts.clone();
    cfg.digests = true;
    // The coordinator reads the key from a file, as `slug run --hosts` does.
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("cluster.key");
    std::fs::write(&key_file, key.as_env_value()).expect("write key file");
    cfg.key_file = Some(key_file);
    let distributed = run(&cfg, &NoObservers).expect("four-namespace run");
    assert_eq!(distributed.tokens, single.tokens);
    for (r, host) in distributed.stage_reports.iter().zip(&hosts) {
        assert_eq!(
            &r.host, host,
            "stage {} ran on its namespace's node",
            r.stage
        );
        assert!(r.clock.is_some());
    }
    assert_eq!(distributed.digests().len(), 2 * (8 * 3 + 7));
}
