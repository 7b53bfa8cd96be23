//! `slug node` processes on loopback for the end-to-end tests of moves and failover, and the
//! cluster key files they hold.
#![allow(dead_code)] // Each test file uses the part it needs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use slug_transport::auth::KEY_ENV;
use slug_transport::node::LISTENING_PREFIX;

/// The `slug` binary cargo built for this test.
fn slug() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_slug"))
}

/// A fresh cluster key file `name` (mode 0600) in `dir`, made by `slug keygen`.
pub fn key_file(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let o = Command::new(slug())
        .arg("keygen")
        .arg(&path)
        .output()
        .expect("run slug keygen");
    assert!(
        o.status.success(),
        "keygen: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    path
}

/// A `slug node --listen 127.0.0.1:0` holding the key in a key file (never the environment's);
/// killed on drop.
pub struct Node {
    pub child: Child,
    pub addr: String,
}

impl Node {
    /// A node serving sessions until dropped; its stderr goes to the test's.
    pub fn start(key_file: &Path) -> Node {
        Node::start_with(key_file, &[], Stdio::inherit())
    }

    /// A node with `extra` arguments (`--once`) and its stderr sent to `stderr`.
    pub fn start_with(key_file: &Path, extra: &[&str], stderr: Stdio) -> Node {
        let mut child = Command::new(slug())
            .args(["node", "--listen", "127.0.0.1:0", "--key-file"])
            .arg(key_file)
            .args(extra)
            .env_remove(KEY_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
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
        Node { child, addr }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill -9 the node");
        let _ = self.child.wait();
    }

    /// Open file descriptors of the node process (a session adds its socket).
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
