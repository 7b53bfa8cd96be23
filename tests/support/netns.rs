//! Network namespaces joined by a private bridge, for the multi-host tests of the binary: one
//! `slug node --listen` per namespace. Everything a `Testbed` creates is removed when it drops,
//! also when the test fails. Only the /24 the test names is used.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use slug_transport::auth::{ClusterKey, KEY_ENV};
use slug_transport::node::LISTENING_PREFIX;

/// Runs `ip` with `args`; returns stderr on failure.
pub fn ip(args: &[&str]) -> Result<(), String> {
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

/// Ids of the processes in namespace `ns` (`ip netns pids`).
fn namespace_pids(ns: &str) -> Vec<String> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Why this machine cannot run the test, if it cannot.
pub fn skip_reason(subnet: &str) -> Option<String> {
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
    if String::from_utf8_lossy(&addrs.stdout).contains(&format!("{subnet}.")) {
        return Some(format!("{subnet}.0/24 is already in use on this machine"));
    }
    None
}

/// A fresh cluster key and its key file in `dir`, mode 0600: a node refuses a key file other
/// users can read.
#[allow(dead_code)] // The MPI test uses no cluster key.
pub fn cluster_key(dir: &Path) -> (ClusterKey, PathBuf) {
    let key = ClusterKey::random().expect("cluster key");
    let file = dir.join("cluster.key");
    std::fs::write(&file, key.as_env_value()).expect("write key file");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod key file");
    (key, file)
}

/// Namespaces, bridge and node processes of one test; removed on drop.
pub struct Testbed {
    /// Short prefix of this test's interface and namespace names (unique per test file).
    prefix: &'static str,
    /// First three octets of the test's private /24.
    subnet: &'static str,
    nodes_wanted: usize,
    tag: String,
    namespaces: Vec<String>,
    bridge: Option<String>,
    nodes: Vec<Child>,
}

impl Testbed {
    /// A testbed of `nodes` namespaces on `subnet`.0/24, names starting with `prefix`.
    pub fn new(prefix: &'static str, subnet: &'static str, nodes: usize) -> Self {
        Self {
            prefix,
            subnet,
            nodes_wanted: nodes,
            tag: format!("{}", std::process::id() % 100_000),
            namespaces: Vec::new(),
            bridge: None,
            nodes: Vec::new(),
        }
    }

    /// A built testbed and each namespace's address, or `None` after saying on stderr why
    /// `what` is skipped: not root, no `ip`, the subnet taken, or a container that allows root
    /// but not namespaces or bridges.
    #[allow(dead_code)] // The MPI test builds its own, to report what it could not build.
    pub fn up(
        prefix: &'static str,
        subnet: &'static str,
        nodes: usize,
        what: &str,
    ) -> Option<(Self, Vec<String>)> {
        if let Some(why) = skip_reason(subnet) {
            eprintln!("{what} skipped: {why}");
            return None;
        }
        let mut bed = Self::new(prefix, subnet, nodes);
        match bed.build() {
            Ok(addrs) => Some((bed, addrs)),
            Err(e) => {
                eprintln!("{what} skipped: cannot build the test network: {e}");
                None
            }
        }
    }

    /// Creates the bridge and the namespaces; returns each namespace's address.
    pub fn build(&mut self) -> Result<Vec<String>, String> {
        let (p, subnet) = (self.prefix, self.subnet);
        let bridge = format!("{p}b{}", self.tag);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        self.bridge = Some(bridge.clone());
        ip(&["addr", "add", &format!("{subnet}.1/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        let mut addrs = Vec::new();
        for i in 0..self.nodes_wanted {
            let ns = format!("{p}{}n{i}", self.tag);
            ip(&["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            let (host_end, ns_end) = (
                format!("{p}v{}n{i}", self.tag),
                format!("{p}p{}n{i}", self.tag),
            );
            ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end,
            ])?;
            ip(&["link", "set", &ns_end, "netns", &ns])?;
            ip(&["link", "set", &host_end, "master", &bridge])?;
            ip(&["link", "set", &host_end, "up"])?;
            let addr = format!("{subnet}.{}", 10 + i);
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

    /// The namespaces [`build`](Self::build) made, in address order.
    #[allow(dead_code)] // Only the MPI test launches into the namespaces by name.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// The processes running in this testbed's namespaces, one `NS PID COMMAND` line each.
    #[allow(dead_code)] // Only the MPI test reports them (its daemons are not our children).
    pub fn processes(&self) -> String {
        let mut out = String::new();
        for ns in &self.namespaces {
            for pid in namespace_pids(ns) {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                out.push_str(&format!("{ns} {pid} {}\n", cmd.trim_end()));
            }
        }
        out
    }

    /// Kills (SIGKILL) every process left in this testbed's namespaces: a namespace is only
    /// gone once nothing runs in it, and a daemon started there is no child of the test.
    pub fn kill_processes(&self) {
        for ns in &self.namespaces {
            for pid in namespace_pids(ns) {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        }
    }

    /// Starts `slug node --listen ADDR:7070 --once` inside namespace `i` (with `tmp` as its
    /// TMPDIR, where it records, when given); returns its address.
    #[allow(dead_code)] // The MPI test starts no slug nodes: mpirun launches its ranks.
    pub fn start_node(
        &mut self,
        i: usize,
        addr: &str,
        key: &ClusterKey,
        tmp: Option<&Path>,
    ) -> Result<String, String> {
        let slug = PathBuf::from(env!("CARGO_BIN_EXE_slug"));
        let listen = format!("{addr}:7070");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespaces[i]])
            .arg(&slug)
            .args(["node", "--listen", &listen, "--once"])
            .env(KEY_ENV, key.as_env_value());
        if let Some(tmp) = tmp {
            command.env("TMPDIR", tmp);
        }
        let mut child = command
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

impl Testbed {
    /// Kills (SIGKILL) the `i`-th node started, as a crash would.
    #[allow(dead_code)] // Only the failover test kills a node.
    pub fn kill_node(&mut self, i: usize) -> Result<(), String> {
        let child = self
            .nodes
            .get_mut(i)
            .ok_or_else(|| format!("no node {i}"))?;
        child.kill().map_err(|e| format!("kill node {i}: {e}"))?;
        let _ = child.wait();
        Ok(())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for c in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.kill_processes();
        // Deleting a namespace deletes its veth end, and with it the peer on the bridge.
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        if let Some(b) = &self.bridge {
            let _ = ip(&["link", "del", b]);
        }
    }
}
