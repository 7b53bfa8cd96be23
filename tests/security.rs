//! `slug node` against strangers and `slug keygen` / key handling (issue 11): idle connections
//! cost a bounded number of threads and never keep the real coordinator out, peer-supplied
//! text cannot forge node log lines or send terminal escapes, and key files are private.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use slug_kernels::ModelConfig;
use slug_transport::auth::{ClusterKey, KEY_ENV};
use slug_transport::node::{LISTENING_PREFIX, MAX_PENDING_HANDSHAKES};
use slug_transport::pipeline::{PipelineConfig, prompt_tokens, run_on_nodes};
use slug_transport::transfer::TransportKind;

fn slug() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_slug"))
}

fn config() -> PipelineConfig {
    let model = ModelConfig::preset("tiny").expect("tiny preset");
    let mut cfg = PipelineConfig::new(model, "x", 1, 4);
    cfg.prompts = vec![prompt_tokens("the slug")];
    cfg.transport = TransportKind::Tcp;
    cfg.timeout_ms = 20_000;
    cfg
}

/// A `slug node` serving many sessions, with its key in a 0600 file; returns it and its address.
fn node(key: &ClusterKey, dir: &std::path::Path) -> (Child, String) {
    let key_file = dir.join("cluster.key");
    std::fs::write(&key_file, key.as_env_value()).expect("write key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut child = Command::new(slug())
        .args(["node", "--listen", "127.0.0.1:0", "--key-file"])
        .arg(&key_file)
        .env_remove(KEY_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start slug node");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listening line");
    let addr = line
        .trim()
        .strip_prefix(LISTENING_PREFIX)
        .expect("address line")
        .to_string();
    (child, addr)
}

fn threads_of(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("Threads line")
}

/// Stops the node once its log satisfies `done` (or after 20 s) and returns the log.
fn stop_after(mut child: Child, done: impl Fn(&str) -> bool) -> String {
    let mut stderr = child.stderr.take().expect("stderr");
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let log2 = log.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            log2.lock()
                .expect("lock")
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done(&log.lock().expect("lock")) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    reader.join().expect("stderr reader");
    log.lock().expect("lock").clone()
}

#[test]
fn strangers_holding_connections_neither_starve_nor_crash_a_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = ClusterKey::random().expect("key");
    let (child, addr) = node(&key, dir.path());
    let pid = child.id();
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(&addr).expect("stranger connects"))
        .collect();
    // Give the node time to accept them all (it polls its listener every 10 ms).
    std::thread::sleep(Duration::from_millis(500));
    let threads = threads_of(pid);
    assert!(
        threads <= MAX_PENDING_HANDSHAKES + 8,
        "200 idle strangers made {threads} threads"
    );
    // The real coordinator is served while the strangers still hold their sockets.
    let report = run_on_nodes(&config(), std::slice::from_ref(&addr), &key)
        .expect("the coordinator is served despite the strangers");
    assert_eq!(report.tokens.len(), 1);
    drop(idle);
    let log = stop_after(child, |log| {
        log.contains("closed unheard") && log.contains("finished")
    });
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("closed unheard"), "{log}");
    assert!(!log.contains("failed"), "{log}");
}

#[test]
fn peer_text_cannot_forge_node_log_lines_or_send_terminal_escapes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = ClusterKey::random().expect("key");
    let (child, addr) = node(&key, dir.path());
    let evil = "x\nslug node: stage 0 for coordinator 10.0.0.1:1 finished\n\x1b[2J\x1b]0;owned\x07";
    let mut s = TcpStream::connect(&addr).expect("connect");
    // A REFUSE frame (kind 5) as the first thing said: length, kind, text.
    let mut frame = ((evil.len() + 1) as u32).to_le_bytes().to_vec();
    frame.push(5);
    frame.extend_from_slice(evil.as_bytes());
    s.write_all(&frame).expect("send refuse");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    // A legitimate session proves the node still serves.
    run_on_nodes(&config(), std::slice::from_ref(&addr), &key).expect("real run");
    let log = stop_after(child, |log| {
        log.contains("refused") && log.contains("finished")
    });
    assert!(!log.contains('\x1b') && !log.contains('\x07'), "{log:?}");
    for line in log.lines() {
        assert!(
            line.starts_with("slug node: "),
            "a line the node did not write: {line:?}"
        );
    }
    assert!(
        !log.lines()
            .any(|l| l.starts_with("slug node: stage 0 for coordinator 10.0.0.1")),
        "a forged line: {log}"
    );
    assert!(log.contains("\\n") && log.contains("\\u{1b}"), "{log}");
}

#[test]
fn keygen_makes_a_private_key_that_nodes_accept_and_never_overwrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cluster.key");
    let out = Command::new(slug())
        .arg("keygen")
        .arg(&path)
        .output()
        .expect("slug keygen");
    assert!(out.status.success(), "{out:?}");
    let mode = std::fs::metadata(&path).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let key = std::fs::read(&path).expect("key");
    assert_eq!(key.trim_ascii().len(), 64);
    let again = Command::new(slug())
        .arg("keygen")
        .arg(&path)
        .output()
        .expect("slug keygen");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    assert_eq!(std::fs::read(&path).expect("key"), key, "not replaced");
}

#[test]
fn a_key_file_others_can_read_is_refused_with_the_chmod_to_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cluster.key");
    std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").expect("key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = Command::new(slug())
        .args(["node", "--listen", "127.0.0.1:0", "--key-file"])
        .arg(&path)
        .output()
        .expect("slug node");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("chmod 600 {}", path.display())),
        "{err}"
    );
}

#[test]
fn a_key_in_the_environment_is_warned_about() {
    let out = Command::new(slug())
        .args(["node", "--listen", "256.0.0.1:0"])
        .env(KEY_ENV, "0123456789abcdef0123456789abcdef")
        .output()
        .expect("slug node");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l.contains("warning") && l.contains(KEY_ENV) && l.contains("ps e")),
        "{err}"
    );
}
