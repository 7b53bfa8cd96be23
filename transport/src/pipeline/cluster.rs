//! The coordinator side of process transports: launching local stage processes, driving
//! `slug node` servers over authenticated control connections, and turning the first failure
//! anywhere into one error that names the stage, its host and the step it reached.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::auth::{COORDINATOR, ClusterKey, Hello, KEY_ENV, Role, client_handshake};
use crate::error::{Result, TransportError};
use crate::fabric::{Fabric, FabricLayout};
use crate::transfer::TransportKind;
use crate::wire::{AbortFlag, Conn, connect};

use super::{PipelineConfig, RunReport, StageReport};

/// First line a `slug node` prints on stdout, followed by the address it listens on.
pub const LISTENING_PREFIX: &str = "slug node: listening on ";
/// How often a node reports progress; a node silent for [`SILENCE_LIMIT`] is declared gone.
pub(crate) const HEARTBEAT: Duration = Duration::from_millis(250);
/// Silence after which the coordinator gives up on a node (a host that vanished sends no EOF).
pub(crate) const SILENCE_LIMIT: Duration = Duration::from_secs(5);
/// How long to keep listening for the root cause once some stage has failed.
const SETTLE: Duration = Duration::from_millis(500);
/// Largest piece of a collected file in one frame (well under the wire's frame limit).
pub(crate) const FILE_PIECE: usize = 4 << 20;
/// At most this many files are collected from one node (a bound on the listing's size).
const MAX_COLLECTED_FILES: usize = 1 << 20;
/// At most this many bytes per collected file.
const MAX_COLLECTED_FILE: u64 = 1 << 40;
/// Where a failing collection is reported as having reached.
const COLLECTING: &str = "collecting recorded files";

/// Coordinator to node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ToNode {
    /// Build stage `stage` of `config` (and map the shm fabric at `fabric`).
    Assign {
        stage: usize,
        config: Box<PipelineConfig>,
        fabric: Option<PathBuf>,
    },
    /// Connect the outbound data link to `next` (tcp) and run.
    Start { next: Option<String> },
    /// Stop now: another stage failed.
    Abort { reason: String },
    /// Send these files of your listing (the coordinator lacks them), in this order.
    Fetch { paths: Vec<String> },
    /// Every fetched file arrived: the node may delete its copies.
    Collected,
}

/// One file a node recorded for its stage, relative to its scratch directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RecordedFile {
    /// Relative path with `/` separators, e.g. `endpoints/1.slog`.
    pub path: String,
    /// Its length in bytes.
    pub len: u64,
}

/// What kind of failure a node reports, so the coordinator can name the root cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Cause {
    /// The node stopped because it was told to.
    Aborted,
    /// A link to a neighbour broke or timed out: usually a consequence of the neighbour.
    Link,
    /// The stage itself failed (bad config, kernel error, refused peer).
    Stage,
    /// The coordinator lost the node (process died, host vanished).
    Lost,
}

impl Cause {
    pub(crate) fn of(e: &TransportError) -> Self {
        match e {
            TransportError::Aborted { .. } => Cause::Aborted,
            TransportError::LinkBroken { .. } | TransportError::Timeout { .. } => Cause::Link,
            _ => Cause::Stage,
        }
    }
}

/// Node to coordinator.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ToCoordinator {
    /// Stage built; tcp data links are accepted at `data_addr`.
    Ready {
        data_addr: Option<String>,
        pid: u32,
        host: String,
    },
    /// Heartbeat with the step being worked on.
    Progress { step: u32, seq: u32 },
    /// Finished; with `collect`, a [`ToCoordinator::Files`] listing follows.
    Done {
        report: Box<StageReport>,
        #[serde(default)]
        collect: bool,
    },
    /// The files the node recorded for its stage, for the coordinator to fetch.
    Files { files: Vec<RecordedFile> },
    /// Failed at `at`.
    Failed {
        at: String,
        error: String,
        cause: Cause,
    },
}

/// Stage processes this coordinator started on this machine; killed on drop.
#[derive(Debug)]
pub struct LocalNodes {
    children: Vec<Child>,
    addrs: Vec<String>,
}

impl LocalNodes {
    /// `host:port` of each node, in stage order.
    pub fn addrs(&self) -> Vec<String> {
        self.addrs.clone()
    }

    /// Process ids, in stage order.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Kills node `index` (SIGKILL), as a crash would.
    pub fn kill(&mut self, index: usize) -> Result<()> {
        match self.children.get_mut(index) {
            Some(c) => c
                .kill()
                .map_err(|e| TransportError::io(format!("kill stage process {}", c.id()), e)),
            None => Err(TransportError::Config(format!("no node {index}"))),
        }
    }

    /// Waits up to `grace` for the nodes to exit on their own, then kills the rest.
    pub fn finish(mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        for c in &mut self.children {
            while Instant::now() < deadline {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
}

impl Drop for LocalNodes {
    fn drop(&mut self) {
        for c in &mut self.children {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// Starts `count` `slug node --listen 127.0.0.1:0 --once` processes of `binary`, handing them
/// `key` through the environment, and waits (at most `timeout`) for each to say where it listens.
pub fn launch_local_nodes(
    binary: &Path,
    count: usize,
    key: &ClusterKey,
    timeout: Duration,
) -> Result<LocalNodes> {
    let mut nodes = LocalNodes {
        children: Vec::with_capacity(count),
        addrs: Vec::with_capacity(count),
    };
    let mut lines = Vec::with_capacity(count);
    for i in 0..count {
        let mut child = Command::new(binary)
            .args(["node", "--listen", "127.0.0.1:0", "--once"])
            .env(KEY_ENV, key.as_env_value())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                TransportError::io(format!("start stage process {i} ({})", binary.display()), e)
            })?;
        let stdout = child.stdout.take();
        nodes.children.push(child);
        let (tx, rx) = crossbeam_channel::bounded(1);
        if let Some(out) = stdout {
            // Keeps draining the child's stdout so it can never block on a full pipe.
            std::thread::spawn(move || {
                let mut first = true;
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if first {
                        let _ = tx.send(line);
                        first = false;
                    }
                }
            });
        }
        lines.push(rx);
    }
    let deadline = Instant::now() + timeout;
    for (i, rx) in lines.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .map_err(|_| TransportError::StageFailed {
                stage: i,
                host: "127.0.0.1".into(),
                step: "startup".into(),
                detail: format!(
                    "stage process {} did not announce its address within {} ms",
                    nodes.children[i].id(),
                    timeout.as_millis()
                ),
            })?;
        let addr = line
            .strip_prefix(LISTENING_PREFIX)
            .ok_or_else(|| TransportError::Protocol {
                peer: format!("stage process {}", nodes.children[i].id()),
                detail: format!("expected {LISTENING_PREFIX:?}..., got {line:?}"),
            })?;
        nodes.addrs.push(addr.trim().to_string());
    }
    Ok(nodes)
}

/// A fabric file for one shm run, removed when dropped.
struct FabricFile {
    fabric: Arc<Fabric>,
    path: PathBuf,
}

impl FabricFile {
    fn create(cfg: &PipelineConfig) -> Result<Self> {
        let dir = Path::new("/dev/shm");
        let dir = if dir.is_dir() {
            dir.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!(
            "slug-fabric-{}-{}",
            std::process::id(),
            crate::clock::monotonic_ns()
        ));
        let fabric = Arc::new(Fabric::create(
            &path,
            FabricLayout::new(&cfg.ring_specs())?,
        )?);
        Ok(Self { fabric, path })
    }
}

impl Drop for FabricFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn failed(stage: usize, host: &str, step: &str, detail: impl Into<String>) -> TransportError {
    TransportError::StageFailed {
        stage,
        host: host.to_string(),
        step: step.to_string(),
        detail: detail.into(),
    }
}

/// Runs `cfg` with stage `s` on the `slug node` at `addrs[s]`, authenticating with `key`.
/// For `shm` every node must be on this machine (the coordinator creates the fabric file).
pub fn run_on_nodes(cfg: &PipelineConfig, addrs: &[String], key: &ClusterKey) -> Result<RunReport> {
    run_on_nodes_collecting(cfg, addrs, key, None)
}

/// [`run_on_nodes`], then (with `collect_into`) fetches the files every node recorded for its
/// stage into that directory, all nodes at once. A file already there with the same length is
/// skipped: recorded files are content-addressed (chunks, payloads) or unique per stage (logs,
/// snapshot indexes), and one that two nodes list (a payload both ends of a link stored) is
/// fetched once. Each file arrives under a partial name and is renamed when whole, so a node
/// that dies mid-transfer leaves every file that arrived before it intact.
pub fn run_on_nodes_collecting(
    cfg: &PipelineConfig,
    addrs: &[String],
    key: &ClusterKey,
    collect_into: Option<&Path>,
) -> Result<RunReport> {
    cfg.validate()?;
    if addrs.len() != cfg.stages {
        return Err(TransportError::Config(format!(
            "{} node addresses for {} stages",
            addrs.len(),
            cfg.stages
        )));
    }
    let timeout = cfg.timeout();
    let abort = AbortFlag::new();
    let fabric = match cfg.transport {
        TransportKind::Shm => Some(FabricFile::create(cfg)?),
        _ => None,
    };
    let mut conns: Vec<Conn> = Vec::with_capacity(addrs.len());
    let mut clocks = Vec::with_capacity(addrs.len());
    for (s, addr) in addrs.iter().enumerate() {
        let hs = connect(addr, timeout, &abort)
            .and_then(|stream| {
                let hello = Hello::new(Role::Control, COORDINATOR, s as u32)?;
                client_handshake(
                    stream,
                    format!("node {addr}"),
                    key,
                    hello,
                    abort.clone(),
                    timeout,
                )
            })
            .map_err(|e| failed(s, addr, "connect", e.to_string()))?;
        conns.push(hs.conn);
        clocks.push(hs.clock);
    }
    let mut session = Session {
        conns,
        fabric: fabric.as_ref().map(|f| f.fabric.clone()),
    };
    for (s, conn) in session.conns.iter_mut().enumerate() {
        let assign = ToNode::Assign {
            stage: s,
            config: Box::new(cfg.clone()),
            fabric: fabric.as_ref().map(|f| f.path.clone()),
        };
        conn.send_json(&assign, timeout)
            .map_err(|e| failed(s, &addrs[s], "startup", e.to_string()))?;
    }
    let mut data_addrs = Vec::with_capacity(addrs.len());
    for (s, addr) in addrs.iter().enumerate() {
        match session.conns[s].recv_json::<ToCoordinator>(timeout) {
            Ok(ToCoordinator::Ready { data_addr, .. }) => data_addrs.push(data_addr),
            Ok(ToCoordinator::Failed { at, error, .. }) => {
                return Err(session.abort(failed(s, addr, &at, error)));
            }
            Ok(other) => {
                let e = failed(s, addr, "startup", format!("unexpected message {other:?}"));
                return Err(session.abort(e));
            }
            Err(e) => return Err(session.abort(failed(s, addr, "startup", e.to_string()))),
        }
    }
    if let Some(f) = &fabric {
        // Every node has mapped the fabric: unlink it now so that nothing is left in /dev/shm
        // even if this process is killed.
        let _ = std::fs::remove_file(&f.path);
    }
    for s in 0..addrs.len() {
        let next = data_addrs[(s + 1) % addrs.len()].clone();
        if let Err(e) = session.conns[s].send_json(&ToNode::Start { next }, timeout) {
            return Err(session.abort(failed(s, &addrs[s], "startup", e.to_string())));
        }
    }
    let start = Instant::now();
    let (tx, rx) = crossbeam_channel::unbounded();
    let stop_readers = AbortFlag::new();
    for (s, conn) in session.conns.iter().enumerate() {
        let mut reader = conn.try_clone()?;
        reader.abort = stop_readers.clone();
        let tx = tx.clone();
        std::thread::spawn(move || {
            loop {
                let msg = reader.recv_json::<ToCoordinator>(SILENCE_LIMIT);
                let last = !matches!(msg, Ok(ToCoordinator::Progress { .. }));
                if tx.send((s, msg)).is_err() || last {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut reports: Vec<Option<StageReport>> = vec![None; addrs.len()];
    let mut collects = vec![false; addrs.len()];
    let mut at = vec!["startup".to_string(); addrs.len()];
    let mut failures: Vec<(Cause, usize, String, String)> = Vec::new();
    let mut settle_until: Option<Instant> = None;
    while reports.iter().any(Option::is_none) {
        let wait = match settle_until {
            Some(t) => t.saturating_duration_since(Instant::now()),
            None => SILENCE_LIMIT * 2,
        };
        let Ok((s, msg)) = rx.recv_timeout(wait) else {
            break;
        };
        match msg {
            Ok(ToCoordinator::Progress { step, seq }) => {
                at[s] = format!("step {step} (sequence {seq})")
            }
            Ok(ToCoordinator::Done { report, collect }) => {
                reports[s] = Some(*report);
                collects[s] = collect;
            }
            Ok(ToCoordinator::Failed {
                at: where_,
                error,
                cause,
            }) => failures.push((cause, s, where_, error)),
            Ok(ToCoordinator::Ready { .. } | ToCoordinator::Files { .. }) => failures.push((
                Cause::Stage,
                s,
                at[s].clone(),
                "sent Ready or Files out of turn".into(),
            )),
            Err(e) if reports[s].is_none() => {
                let detail = match &e {
                    TransportError::Timeout { .. } => format!(
                        "node stopped responding (no heartbeat for {} ms)",
                        SILENCE_LIMIT.as_millis()
                    ),
                    other => format!(
                        "lost the node's control connection ({other}); did the stage process die?"
                    ),
                };
                failures.push((Cause::Lost, s, at[s].clone(), detail));
            }
            Err(_) => {}
        }
        if !failures.is_empty() && settle_until.is_none() {
            settle_until = Some(Instant::now() + SETTLE);
        }
        if settle_until.is_some_and(|t| Instant::now() >= t) {
            break;
        }
    }
    stop_readers.raise();
    let wall = start.elapsed();
    if let Some((_, s, where_, error)) = failures
        .into_iter()
        .max_by_key(|f| (f.0, std::cmp::Reverse(f.1)))
    {
        return Err(session.abort(failed(s, &addrs[s], &where_, error)));
    }
    if let Some(s) = reports.iter().position(Option::is_none) {
        let e = failed(s, &addrs[s], &at[s], "no report from the node");
        return Err(session.abort(e));
    }
    if let Some(into) = collect_into {
        let claimed = Mutex::new(HashSet::new());
        let claimed = &claimed;
        let results: Vec<std::result::Result<(), String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = session
                .conns
                .iter_mut()
                .zip(&collects)
                .map(|(conn, &collect)| {
                    scope.spawn(move || {
                        if !collect {
                            return Err("the node recorded nothing to collect: serve stages with \
                                 a recording `slug node` of this version"
                                .to_string());
                        }
                        collect_files(conn, into, claimed, timeout)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("the collecting thread panicked".into()))
                })
                .collect()
        });
        if let Some((s, detail)) = results
            .into_iter()
            .enumerate()
            .find_map(|(s, r)| r.err().map(|d| (s, d)))
        {
            let detail = format!(
                "{detail}; files that arrived whole are kept in {}",
                into.display()
            );
            return Err(session.abort(failed(s, &addrs[s], COLLECTING, detail)));
        }
    }
    let reports = reports
        .into_iter()
        .enumerate()
        .map(|(s, r)| {
            let mut r = r.unwrap_or_default();
            r.host = addrs[s].clone();
            r.clock = Some(clocks[s]);
            r
        })
        .collect();
    Ok(RunReport::assemble(cfg, reports, wall))
}

/// A node-supplied relative path, accepted only when it stays inside the trace directory.
fn safe_relative(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    let normal = p.components().all(|c| matches!(c, Component::Normal(_)));
    (!path.is_empty() && normal).then(|| p.to_path_buf())
}

/// Fetches one node's recorded files into `into` (see [`run_on_nodes_collecting`]).
/// `claimed` holds the files another node's collection already fetches: content-addressed
/// files (a payload both ends of a link stored) are fetched from one node only.
fn collect_files(
    conn: &mut Conn,
    into: &Path,
    claimed: &Mutex<HashSet<PathBuf>>,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let lost = |e: TransportError| format!("{e}; did the node process die?");
    let files = loop {
        match conn.recv_json::<ToCoordinator>(timeout).map_err(lost)? {
            // Heartbeats sent just before the stage's report may still be in flight.
            ToCoordinator::Progress { .. } => {}
            ToCoordinator::Files { files } => break files,
            ToCoordinator::Failed { error, .. } => return Err(error),
            other => return Err(format!("expected the recorded file list, got {other:?}")),
        }
    };
    if files.len() > MAX_COLLECTED_FILES {
        return Err(format!(
            "the node lists {} recorded files, more than the {MAX_COLLECTED_FILES} accepted",
            files.len()
        ));
    }
    let mut wanted = Vec::new();
    for f in files {
        let rel = safe_relative(&f.path).ok_or_else(|| {
            format!(
                "the node named a recorded file {:?} outside the trace directory",
                f.path
            )
        })?;
        if f.len > MAX_COLLECTED_FILE {
            return Err(format!(
                "recorded file {} is {} bytes, more than the {MAX_COLLECTED_FILE} accepted",
                f.path, f.len
            ));
        }
        let dest = into.join(rel);
        let present = std::fs::metadata(&dest).is_ok_and(|m| m.is_file() && m.len() == f.len);
        let mut claimed = claimed.lock().unwrap_or_else(|p| p.into_inner());
        if !present && claimed.insert(dest.clone()) {
            wanted.push((f, dest));
        }
    }
    let paths = wanted.iter().map(|(f, _)| f.path.clone()).collect();
    conn.send_json(&ToNode::Fetch { paths }, timeout)
        .map_err(lost)?;
    for (f, dest) in &wanted {
        receive_file(conn, f, dest, timeout)?;
    }
    conn.send_json(&ToNode::Collected, timeout).map_err(lost)
}

/// Receives `f` into `dest` through a partial file, renamed only when whole.
fn receive_file(
    conn: &mut Conn,
    f: &RecordedFile,
    dest: &Path,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let io = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
    }
    let mut partial = dest.as_os_str().to_owned();
    // Named per connection: no two collections ever write the same partial file.
    partial.push(format!(
        ".partial-{}",
        conn.stream.local_addr().map_or(0, |a| a.port())
    ));
    let partial = PathBuf::from(partial);
    let mut out = std::fs::File::create(&partial).map_err(|e| io("create", &partial, e))?;
    let received = receive_pieces(conn, f, &mut out, &partial, timeout);
    drop(out);
    if received.is_err() {
        // Half a file is no use to a reader and would only look like one.
        let _ = std::fs::remove_file(&partial);
    }
    received?;
    std::fs::rename(&partial, dest).map_err(|e| io("rename", &partial, e))
}

/// Receives the pieces of `f` into `out` (the file at `partial`).
fn receive_pieces(
    conn: &mut Conn,
    f: &RecordedFile,
    out: &mut std::fs::File,
    partial: &Path,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let mut left = f.len;
    while left > 0 {
        let (kind, body) = conn.recv_frame(timeout).map_err(|e| {
            format!(
                "{e} while receiving {} ({} of {} bytes arrived); did the node process die?",
                f.path,
                f.len - left,
                f.len
            )
        })?;
        if kind == crate::wire::kind::JSON {
            return Err(match serde_json::from_slice::<ToCoordinator>(&body) {
                Ok(ToCoordinator::Failed { error, .. }) => error,
                _ => format!("a control message interrupted the file {}", f.path),
            });
        }
        if kind != crate::wire::kind::FILE || body.is_empty() || body.len() as u64 > left {
            return Err(format!(
                "bad piece of {} (frame kind {kind}, {} bytes, {left} expected)",
                f.path,
                body.len()
            ));
        }
        out.write_all(&body)
            .map_err(|e| format!("write {}: {e}", partial.display()))?;
        left -= body.len() as u64;
    }
    Ok(())
}

/// The live control connections of a run.
struct Session {
    conns: Vec<Conn>,
    fabric: Option<Arc<Fabric>>,
}

impl Session {
    /// Tells every node to stop, wakes shm waiters, and returns `error` for the caller.
    fn abort(&mut self, error: TransportError) -> TransportError {
        if let Some(f) = &self.fabric {
            f.abort();
        }
        let reason = error.to_string();
        for conn in &mut self.conns {
            let _ = conn.send_json(
                &ToNode::Abort {
                    reason: reason.clone(),
                },
                Duration::from_millis(200),
            );
            conn.shutdown();
        }
        error
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// A connected (coordinator, node) pair of control connections over loopback.
    fn pair() -> (Conn, Conn) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut coord = Conn::new(client, "node".into(), AbortFlag::new()).unwrap();
        let mut node = Conn::new(server, "coordinator".into(), AbortFlag::new()).unwrap();
        coord.authenticated();
        node.authenticated();
        (coord, node)
    }

    fn file(path: &str, len: u64) -> RecordedFile {
        RecordedFile {
            path: path.into(),
            len,
        }
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn a_node_dying_mid_transfer_keeps_the_whole_files_and_names_the_broken_one() {
        let dir = tempfile::tempdir().unwrap();
        // Already present with the right length: content-addressed, so not fetched again.
        std::fs::create_dir_all(dir.path().join("snapshots/chunks/ab")).unwrap();
        std::fs::write(dir.path().join("snapshots/chunks/ab/abcd.zst"), b"xyz").unwrap();
        let (mut coord, mut node) = pair();
        let fake_node = std::thread::spawn(move || {
            let files = vec![
                file("endpoints/0.slog", 6),
                file("snapshots/chunks/ab/abcd.zst", 3),
                file("snapshots/0-0.idx", 10),
            ];
            node.send_json(&ToCoordinator::Files { files }, T).unwrap();
            let paths = match node.recv_json::<ToNode>(T).unwrap() {
                ToNode::Fetch { paths } => paths,
                other => panic!("expected fetch, got {other:?}"),
            };
            node.send_frame(crate::wire::kind::FILE, b"abc", T).unwrap();
            node.send_frame(crate::wire::kind::FILE, b"def", T).unwrap();
            node.send_frame(crate::wire::kind::FILE, b"0123", T)
                .unwrap();
            // Dies with 6 of the index's 10 bytes unsent.
            node.shutdown();
            paths
        });
        let err = collect_files(&mut coord, dir.path(), &Mutex::default(), T).unwrap_err();
        let paths = fake_node.join().unwrap();
        assert_eq!(paths, ["endpoints/0.slog", "snapshots/0-0.idx"]);
        assert!(
            err.contains("snapshots/0-0.idx") && err.contains("4 of 10 bytes"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(dir.path().join("endpoints/0.slog")).unwrap(),
            b"abcdef"
        );
        assert!(!dir.path().join("snapshots/0-0.idx").exists());
        let left = std::fs::read_dir(dir.path().join("snapshots"))
            .unwrap()
            .count();
        assert_eq!(left, 1, "only the chunks folder: no partial file is left");
    }

    #[test]
    fn a_file_named_outside_the_trace_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut coord, mut node) = pair();
        for bad in ["../escape", "/etc/passwd", "endpoints/../../x", ""] {
            let files = vec![file(bad, 1)];
            node.send_json(&ToCoordinator::Files { files }, T).unwrap();
            let err = collect_files(&mut coord, dir.path(), &Mutex::default(), T).unwrap_err();
            assert!(err.contains("outside the trace directory"), "{bad}: {err}");
        }
        let files = vec![file("big", MAX_COLLECTED_FILE + 1)];
        node.send_json(&ToCoordinator::Files { files }, T).unwrap();
        let err = collect_files(&mut coord, dir.path(), &Mutex::default(), T).unwrap_err();
        assert!(err.contains("more than"), "{err}");
    }
}
