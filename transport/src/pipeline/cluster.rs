//! The coordinator side of process transports: starting local stage processes (with the
//! caller's [`NodeLauncher`]), driving
//! `slug node` servers over authenticated control connections, and turning the first failure
//! anywhere into one error that names the stage, its host and the step it reached.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::auth::{COORDINATOR, ClusterKey, Hello, Role, client_handshake};
use crate::clock::ClockOffset;
use crate::error::{Result, TransportError};
use crate::fabric::{Fabric, FabricLayout};
use crate::link::shm::FabricFile;
use crate::transfer::TransportKind;
use crate::wire::{AbortFlag, Conn, PEER_TEXT, connect, printable, shown};

use super::config::PipelineConfig;
use super::launch::NodeLauncher;
use super::report::{RunReport, StageReport};

/// First line a `slug node` prints on stdout, followed by the address it listens on.
pub const LISTENING_PREFIX: &str = "slug node: listening on ";
/// How often a node reports progress; a node silent for [`SILENCE_LIMIT`] is declared gone.
pub(crate) const HEARTBEAT: Duration = Duration::from_millis(250);
/// Silence after which the coordinator gives up on a node (a host that vanished sends no EOF).
pub(crate) const SILENCE_LIMIT: Duration = Duration::from_secs(5);
/// How long to keep listening for the root cause once some stage has failed.
const SETTLE: Duration = Duration::from_millis(500);
/// Largest piece of a collected file in one frame (well under the wire's frame limit).
pub const FILE_PIECE: usize = 4 << 20;
/// At most this many files are collected from one node (a bound on the listing's size).
pub const MAX_COLLECTED_FILES: usize = 1 << 20;
/// At most this many bytes per collected file.
pub const MAX_COLLECTED_FILE: u64 = 1 << 40;
/// Where a failing collection is reported as having reached.
const COLLECTING: &str = "collecting recorded files";

/// Coordinator to node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ToNode {
    /// Build stage `stage` of `config` (and map the shm fabric at `fabric`); data links of
    /// this run prove `link_secret`, fresh for every run and only ever sent sealed.
    Assign {
        stage: usize,
        config: Box<PipelineConfig>,
        fabric: Option<PathBuf>,
        link_secret: String,
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
pub struct RecordedFile {
    /// Relative path with `/` separators, e.g. `endpoints/1.slog`.
    pub path: String,
    /// Its length in bytes.
    pub len: u64,
    /// BLAKE3 of its bytes, hex; the coordinator keeps the file only if what arrived matches.
    pub digest: String,
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
    /// The node removed its copies of the collected files (its scratch directory).
    Cleaned,
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

/// Starts `count` stage processes with `launcher`, handing them `key` on stdin, and waits (at
/// most `timeout`) for each to say where it listens.
pub fn launch_local_nodes(
    launcher: &dyn NodeLauncher,
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
        let mut cmd = launcher.node_command(i);
        // The key goes in on stdin: the environment of a process is readable with `ps e`.
        let mut child = cmd
            .env_remove(crate::auth::KEY_ENV)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                TransportError::io(
                    format!(
                        "start stage process {i} ({})",
                        Path::new(cmd.get_program()).display()
                    ),
                    e,
                )
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            // Dropping stdin closes it, so the node's read ends.
            let _ = writeln!(stdin, "{}", key.as_env_value());
        }
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
    let fabric = match cfg.transport {
        TransportKind::Shm => Some(FabricFile::create(FabricLayout::new(&cfg.ring_specs())?)?),
        _ => None,
    };
    let (conns, clocks) = connect_nodes(addrs, key, timeout)?;
    let mut session = Session {
        conns,
        fabric: fabric.as_ref().map(|f| f.fabric().clone()),
    };
    let data_addrs = session.assign(cfg, addrs, fabric.as_ref().map(|f| f.path().to_owned()))?;
    if let Some(f) = &fabric {
        // Every node has mapped the fabric.
        f.unlink();
    }
    session.start(addrs, &data_addrs, timeout)?;
    let start = Instant::now();
    let watched = session.watch()?;
    let wall = start.elapsed();
    let (reports, collects) = match watched.outcome(addrs) {
        Ok(done) => done,
        Err(e) => return Err(session.abort(e)),
    };
    if let Some(into) = collect_into {
        session.collect(addrs, &collects, into, timeout)?;
    }
    let reports = reports
        .into_iter()
        .enumerate()
        .map(|(s, mut r)| {
            r.host = addrs[s].clone();
            r.clock = Some(clocks[s]);
            r
        })
        .collect();
    Ok(RunReport::assemble(cfg, reports, wall))
}

/// Opens an authenticated control connection to every node, in stage order, with the clock
/// offset each handshake estimated.
fn connect_nodes(
    addrs: &[String],
    key: &ClusterKey,
    timeout: Duration,
) -> Result<(Vec<Conn>, Vec<ClockOffset>)> {
    let abort = AbortFlag::new();
    let mut conns = Vec::with_capacity(addrs.len());
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
    Ok((conns, clocks))
}

/// What the nodes said while the run went on: the reports that arrived and every failure.
struct Watched {
    reports: Vec<Option<StageReport>>,
    /// Whether each node has recorded files to collect.
    collects: Vec<bool>,
    /// Where each stage last said it was.
    at: Vec<String>,
    failures: Vec<(Cause, usize, String, String)>,
}

impl Watched {
    fn new(stages: usize) -> Self {
        Self {
            reports: vec![None; stages],
            collects: vec![false; stages],
            at: vec!["startup".to_string(); stages],
            failures: Vec::new(),
        }
    }

    /// Takes in one message (or read failure) from stage `s`'s control connection.
    fn note(&mut self, s: usize, msg: Result<ToCoordinator>) {
        match msg {
            Ok(ToCoordinator::Progress { step, seq }) => {
                self.at[s] = format!("step {step} (sequence {seq})");
            }
            Ok(ToCoordinator::Done { report, collect }) => {
                self.reports[s] = Some(*report);
                self.collects[s] = collect;
            }
            Ok(ToCoordinator::Failed {
                at: where_,
                error,
                cause,
            }) => self.failures.push((
                cause,
                s,
                printable(&where_, PEER_TEXT),
                printable(&error, PEER_TEXT),
            )),
            Ok(
                ToCoordinator::Ready { .. } | ToCoordinator::Files { .. } | ToCoordinator::Cleaned,
            ) => self.failures.push((
                Cause::Stage,
                s,
                self.at[s].clone(),
                "sent Ready, Files or Cleaned out of turn".into(),
            )),
            Err(e) if self.reports[s].is_none() => {
                let detail = match &e {
                    TransportError::Timeout { .. } => format!(
                        "node stopped responding (no heartbeat for {} ms)",
                        SILENCE_LIMIT.as_millis()
                    ),
                    other => format!(
                        "lost the node's control connection ({other}); did the stage process die?"
                    ),
                };
                self.failures
                    .push((Cause::Lost, s, self.at[s].clone(), detail));
            }
            Err(_) => {}
        }
    }

    /// Every stage's report and whether it has files to collect, or the failure that names
    /// the root cause (the most telling cause; among equals, the lowest stage).
    fn outcome(self, addrs: &[String]) -> Result<(Vec<StageReport>, Vec<bool>)> {
        if let Some((_, s, where_, error)) = self
            .failures
            .into_iter()
            .max_by_key(|f| (f.0, std::cmp::Reverse(f.1)))
        {
            return Err(failed(s, &addrs[s], &where_, error));
        }
        if let Some(s) = self.reports.iter().position(Option::is_none) {
            return Err(failed(s, &addrs[s], &self.at[s], "no report from the node"));
        }
        Ok((self.reports.into_iter().flatten().collect(), self.collects))
    }
}

/// Whether a name is `len` lowercase hex digits.
fn is_hex(name: &str, len: usize) -> bool {
    name.len() == len && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `path` is a file the recording of `stage` produces, and so one the coordinator
/// accepts from that stage's node: its endpoint log, its node report, its snapshot indexes, and
/// content-addressed snapshot chunks and payloads (`true` in the second place: a file two
/// nodes may both hold). Anything else (another stage's log, a journal, a ring, a stray
/// file, any path that could leave the trace directory) is refused.
pub fn expected_file(stage: usize, path: &str) -> Option<(PathBuf, bool)> {
    let parts: Vec<&str> = path.split('/').collect();
    let shared = match parts.as_slice() {
        ["endpoints", log] => *log == format!("{stage}.slog"),
        // The node's capabilities and topology, merged into the manifest by the coordinator.
        ["nodes", report] => *report == format!("{stage}.json"),
        ["snapshots", dir, idx] => {
            *dir == format!("stage-{stage}")
                && idx
                    .strip_prefix("step-")
                    .and_then(|r| r.strip_suffix(".idx"))
                    .is_some_and(|n| {
                        !n.is_empty() && n.len() <= 20 && n.bytes().all(|b| b.is_ascii_digit())
                    })
        }
        ["snapshots", "chunks", fan, name] | ["payloads", fan, name] => {
            let ok = is_hex(fan, 2)
                && name
                    .strip_suffix(".zst")
                    .is_some_and(|h| is_hex(h, 32) && h.starts_with(fan));
            return ok.then(|| (PathBuf::from(path), true));
        }
        _ => false,
    };
    shared.then(|| (PathBuf::from(path), false))
}

/// Fetches one node's recorded files into `into` (see [`run_on_nodes_collecting`]), accepting
/// only the files `stage`'s recording produces, each checked against the digest the node sent,
/// then waits for the node to confirm it removed its copies.
/// `claimed` holds the files another node's collection already fetches: content-addressed
/// files (a payload both ends of a link stored) are fetched from one node only.
fn collect_files(
    conn: &mut Conn,
    stage: usize,
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
            ToCoordinator::Failed { error, .. } => return Err(printable(&error, PEER_TEXT)),
            other => {
                return Err(format!(
                    "expected the recorded file list, got {}",
                    shown(&other)
                ));
            }
        }
    };
    if files.len() > MAX_COLLECTED_FILES {
        return Err(format!(
            "the node lists {} recorded files, more than the {MAX_COLLECTED_FILES} accepted",
            files.len()
        ));
    }
    let mut wanted = Vec::new();
    let mut listed = HashSet::new();
    let mut has_log = false;
    for f in files {
        let shown = printable(&f.path, PEER_TEXT);
        let (rel, content_addressed) = expected_file(stage, &f.path).ok_or_else(|| {
            format!(
                "the node listed {shown:?}, which the recording of stage {stage} does not \
                 produce; nothing of it was accepted"
            )
        })?;
        if !listed.insert(rel.clone()) {
            return Err(format!("the node listed {shown:?} twice"));
        }
        if f.len > MAX_COLLECTED_FILE {
            return Err(format!(
                "recorded file {shown} is {} bytes, more than the {MAX_COLLECTED_FILE} accepted",
                f.len
            ));
        }
        if !is_hex(&f.digest, 64) {
            return Err(format!(
                "recorded file {shown} comes without a BLAKE3 digest"
            ));
        }
        has_log |= !content_addressed && f.path.starts_with("endpoints/");
        let dest = into.join(rel);
        let present = content_addressed
            && std::fs::symlink_metadata(&dest).is_ok_and(|m| m.is_file() && m.len() == f.len);
        let mut claimed = claimed.lock().unwrap_or_else(|p| p.into_inner());
        if !present && claimed.insert(dest.clone()) {
            wanted.push((f, dest));
        }
    }
    if !has_log {
        return Err(format!(
            "the node did not list endpoints/{stage}.slog, the log of the stage it ran"
        ));
    }
    let paths = wanted.iter().map(|(f, _)| f.path.clone()).collect();
    conn.send_json(&ToNode::Fetch { paths }, timeout)
        .map_err(lost)?;
    for (f, dest) in &wanted {
        receive_file(conn, f, dest, timeout)?;
    }
    conn.send_json(&ToNode::Collected, timeout).map_err(lost)?;
    match conn.recv_json::<ToCoordinator>(timeout).map_err(lost)? {
        ToCoordinator::Cleaned => Ok(()),
        ToCoordinator::Failed { error, .. } => Err(format!(
            "the node could not remove its scratch copy: {}",
            printable(&error, PEER_TEXT)
        )),
        other => Err(format!(
            "expected the node to confirm it removed its scratch copy, got {}",
            shown(&other)
        )),
    }
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
    // A new file, never through a link or over something already there.
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)
        .map_err(|e| io("create", &partial, e))?;
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
    let mut hasher = blake3::Hasher::new();
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
                Ok(ToCoordinator::Failed { error, .. }) => printable(&error, PEER_TEXT),
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
        hasher.update(&body);
        out.write_all(&body)
            .map_err(|e| format!("write {}: {e}", partial.display()))?;
        left -= body.len() as u64;
    }
    if hasher.finalize().to_hex().as_str() != f.digest {
        return Err(format!(
            "{} does not match the digest the node sent for it; not kept",
            f.path
        ));
    }
    Ok(())
}

/// The live control connections of a run.
struct Session {
    conns: Vec<Conn>,
    fabric: Option<Arc<Fabric>>,
}

impl Session {
    /// Sends every node its stage, the configuration, the fabric file and the run's link
    /// secret; returns the data address each node then listens on (if its links need one).
    fn assign(
        &mut self,
        cfg: &PipelineConfig,
        addrs: &[String],
        fabric: Option<PathBuf>,
    ) -> Result<Vec<Option<String>>> {
        let timeout = cfg.timeout();
        let link_secret = ClusterKey::random()?.as_env_value();
        for (s, conn) in self.conns.iter_mut().enumerate() {
            let assign = ToNode::Assign {
                stage: s,
                config: Box::new(cfg.clone()),
                fabric: fabric.clone(),
                link_secret: link_secret.clone(),
            };
            conn.send_json(&assign, timeout)
                .map_err(|e| failed(s, &addrs[s], "startup", e.to_string()))?;
        }
        let mut data_addrs = Vec::with_capacity(addrs.len());
        for (s, addr) in addrs.iter().enumerate() {
            match self.conns[s].recv_json::<ToCoordinator>(timeout) {
                Ok(ToCoordinator::Ready { data_addr, .. }) => data_addrs.push(data_addr),
                Ok(ToCoordinator::Failed { at, error, .. }) => {
                    let (at, error) = (printable(&at, PEER_TEXT), printable(&error, PEER_TEXT));
                    return Err(self.abort(failed(s, addr, &at, error)));
                }
                Ok(other) => {
                    let e = failed(
                        s,
                        addr,
                        "startup",
                        format!("unexpected message {}", shown(&other)),
                    );
                    return Err(self.abort(e));
                }
                Err(e) => return Err(self.abort(failed(s, addr, "startup", e.to_string()))),
            }
        }
        Ok(data_addrs)
    }

    /// Tells every node where its downstream stage listens, which starts the run.
    fn start(
        &mut self,
        addrs: &[String],
        data_addrs: &[Option<String>],
        timeout: Duration,
    ) -> Result<()> {
        for s in 0..addrs.len() {
            let next = data_addrs[(s + 1) % addrs.len()].clone();
            if let Err(e) = self.conns[s].send_json(&ToNode::Start { next }, timeout) {
                return Err(self.abort(failed(s, &addrs[s], "startup", e.to_string())));
            }
        }
        Ok(())
    }

    /// Listens to every node (one reader thread each) until all have reported, or, once one
    /// has failed, for [`SETTLE`] more to hear the root cause.
    fn watch(&self) -> Result<Watched> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let stop_readers = AbortFlag::new();
        for (s, conn) in self.conns.iter().enumerate() {
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
        let mut watched = Watched::new(self.conns.len());
        let mut settle_until: Option<Instant> = None;
        while watched.reports.iter().any(Option::is_none) {
            let wait = match settle_until {
                Some(t) => t.saturating_duration_since(Instant::now()),
                None => SILENCE_LIMIT * 2,
            };
            let Ok((s, msg)) = rx.recv_timeout(wait) else {
                break;
            };
            watched.note(s, msg);
            if !watched.failures.is_empty() && settle_until.is_none() {
                settle_until = Some(Instant::now() + SETTLE);
            }
            if settle_until.is_some_and(|t| Instant::now() >= t) {
                break;
            }
        }
        stop_readers.raise();
        Ok(watched)
    }

    /// Fetches every node's recorded files into `into`, all nodes at once; the first node
    /// whose collection fails ends the run with what it said.
    fn collect(
        &mut self,
        addrs: &[String],
        collects: &[bool],
        into: &Path,
        timeout: Duration,
    ) -> Result<()> {
        let claimed = Mutex::new(HashSet::new());
        let claimed = &claimed;
        let results: Vec<std::result::Result<(), String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .conns
                .iter_mut()
                .zip(collects)
                .enumerate()
                .map(|(stage, (conn, &collect))| {
                    scope.spawn(move || {
                        if !collect {
                            return Err("the node recorded nothing to collect: serve stages with \
                                 a recording `slug node` of this version"
                                .to_string());
                        }
                        collect_files(conn, stage, into, claimed, timeout)
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
            return Err(self.abort(failed(s, &addrs[s], COLLECTING, detail)));
        }
        Ok(())
    }

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
    use crate::auth::server_handshake;

    /// A connected (coordinator, node) pair of sealed control connections over loopback.
    fn pair() -> (Conn, Conn) {
        let key = ClusterKey::from_bytes(b"cluster-test-key-0123456789").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let k2 = key.clone();
        let node = std::thread::spawn(move || {
            let (server, _) = listener.accept().unwrap();
            server_handshake(
                server,
                "coordinator".into(),
                &k2,
                AbortFlag::new(),
                T,
                |_| Ok(()),
            )
            .unwrap()
            .conn
        });
        let client = std::net::TcpStream::connect(addr).unwrap();
        let hello = Hello::new(Role::Control, COORDINATOR, 0).unwrap();
        let coord = client_handshake(client, "node".into(), &key, hello, AbortFlag::new(), T)
            .unwrap()
            .conn;
        (coord, node.join().unwrap())
    }

    fn file(path: &str, bytes: &[u8]) -> RecordedFile {
        RecordedFile {
            path: path.into(),
            len: bytes.len() as u64,
            digest: blake3::hash(bytes).to_hex().to_string(),
        }
    }

    const T: Duration = Duration::from_secs(5);
    const CHUNK: &str = "snapshots/chunks/ab/abcd0123456789abcdef0123456789ab.zst";

    #[test]
    fn a_node_dying_mid_transfer_keeps_the_whole_files_and_names_the_broken_one() {
        let dir = tempfile::tempdir().unwrap();
        // Already present with the right length: content-addressed, so not fetched again.
        std::fs::create_dir_all(dir.path().join("snapshots/chunks/ab")).unwrap();
        std::fs::write(dir.path().join(CHUNK), b"xyz").unwrap();
        let (mut coord, mut node) = pair();
        let fake_node = std::thread::spawn(move || {
            let files = vec![
                file("endpoints/0.slog", b"abcdef"),
                file(CHUNK, b"xyz"),
                file("snapshots/stage-0/step-0.idx", b"0123456789"),
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
        let err = collect_files(&mut coord, 0, dir.path(), &Mutex::default(), T).unwrap_err();
        let paths = fake_node.join().unwrap();
        assert_eq!(paths, ["endpoints/0.slog", "snapshots/stage-0/step-0.idx"]);
        assert!(
            err.contains("snapshots/stage-0/step-0.idx") && err.contains("4 of 10 bytes"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(dir.path().join("endpoints/0.slog")).unwrap(),
            b"abcdef"
        );
        let left = std::fs::read_dir(dir.path().join("snapshots/stage-0"))
            .unwrap()
            .count();
        assert_eq!(left, 0, "no partial file is left");
    }

    #[test]
    fn success_waits_for_the_node_to_confirm_its_scratch_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (mut coord, mut node) = pair();
        let fake_node = std::thread::spawn(move || {
            let files = vec![file("endpoints/1.slog", b"log")];
            node.send_json(&ToCoordinator::Files { files }, T).unwrap();
            assert!(matches!(
                node.recv_json::<ToNode>(T).unwrap(),
                ToNode::Fetch { .. }
            ));
            node.send_frame(crate::wire::kind::FILE, b"log", T).unwrap();
            assert!(matches!(
                node.recv_json::<ToNode>(T).unwrap(),
                ToNode::Collected
            ));
            // The node could not remove its scratch directory.
            let failed = ToCoordinator::Failed {
                at: "cleanup".into(),
                error: "remove /tmp/x: busy".into(),
                cause: Cause::Stage,
            };
            node.send_json(&failed, T).unwrap();
        });
        let err = collect_files(&mut coord, 1, dir.path(), &Mutex::default(), T).unwrap_err();
        fake_node.join().unwrap();
        assert!(err.contains("could not remove its scratch"), "{err}");
    }

    #[test]
    fn files_the_stage_does_not_produce_or_that_fail_their_digest_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut coord, mut node) = pair();
        for bad in [
            "../escape",
            "/etc/passwd",
            "endpoints/../../x",
            "",
            "endpoints/0.journal",
            "endpoints/0.t0.ring",
            "endpoints/1.slog",
            "nodes/1.json",
            "snapshots/stage-1/step-0.idx",
            "snapshots/chunks/ab/zz.zst",
            "snapshots/chunks/cd/abcd0123456789abcdef0123456789ab.zst",
            "extra.txt",
        ] {
            let files = vec![file("endpoints/0.slog", b"x"), file(bad, b"x")];
            node.send_json(&ToCoordinator::Files { files }, T).unwrap();
            let err = collect_files(&mut coord, 0, dir.path(), &Mutex::default(), T).unwrap_err();
            assert!(err.contains("does not produce"), "{bad}: {err}");
        }
        let mut big = file("endpoints/0.slog", b"x");
        big.len = MAX_COLLECTED_FILE + 1;
        node.send_json(&ToCoordinator::Files { files: vec![big] }, T)
            .unwrap();
        let err = collect_files(&mut coord, 0, dir.path(), &Mutex::default(), T).unwrap_err();
        assert!(err.contains("more than"), "{err}");
        // The bytes that arrive differ from what the node's digest says.
        let fake_node = std::thread::spawn(move || {
            let files = vec![file("endpoints/0.slog", b"good")];
            node.send_json(&ToCoordinator::Files { files }, T).unwrap();
            assert!(matches!(
                node.recv_json::<ToNode>(T).unwrap(),
                ToNode::Fetch { .. }
            ));
            node.send_frame(crate::wire::kind::FILE, b"evil", T)
                .unwrap();
        });
        let err = collect_files(&mut coord, 0, dir.path(), &Mutex::default(), T).unwrap_err();
        fake_node.join().unwrap();
        assert!(err.contains("does not match the digest"), "{err}");
        assert!(!dir.path().join("endpoints/0.slog").exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("endpoints"))
                .unwrap()
                .count(),
            0
        );
    }
}
