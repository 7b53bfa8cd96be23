//! The coordinator side of process transports: starting local stage processes (with the
//! caller's [`NodeLauncher`]), driving
//! `slug node` servers over authenticated control connections, and turning the first failure
//! anywhere into one error that names the stage, its host and the step it reached.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
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

mod recovery;
use super::migrate::{
    Migration, MigrationReport, MoveNote, MoveRequest, PrecopyRound, Verdict, forward_of,
};
use super::progress::RunProgress;
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
        /// Take the stage over by move `incoming` of `config.migrations`: build it, then
        /// receive its state and wait for [`ToNode::Start`].
        #[serde(default)]
        incoming: Option<usize>,
    },
    /// Connect the outbound data link to `next` (tcp) and run.
    Start { next: Option<String> },
    /// Stop now: another stage failed.
    Abort { reason: String },
    /// Send these files of your listing (the coordinator lacks them), in this order.
    Fetch { paths: Vec<String> },
    /// Every fetched file arrived: the node may delete its copies.
    Collected,
    /// The coordinator's verdict on move `index`, sent to every node.
    Move { index: usize, verdict: Verdict },
    /// Target of move `index`: the last delta has arrived; take this cursor and confirm.
    Restore {
        index: usize,
        cursor: slug_kernels::StageCursor,
    },
    /// Target of a move that will not happen: end the session without running.
    Dismiss { reason: String },
    /// Move `index` was requested while the run goes on (`slug migrate`).
    Plan { index: usize, migration: Migration },
    /// A checkpoint kept, or a stage restored on a spare (`--spares`).
    Failover(super::failover::CoordinatorNote),
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
        /// Hash of the stage's weights, from nodes that take part in a move.
        #[serde(default)]
        weights: Option<String>,
    },
    /// Heartbeat with the step being worked on, the steps finished, the events recorded and
    /// the bytes sent so far (older nodes send only the step).
    Progress {
        step: u32,
        seq: u32,
        #[serde(default)]
        done: u64,
        #[serde(default)]
        events: u64,
        #[serde(default)]
        bytes: u64,
    },
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
    /// A step of a move.
    Move(MoveNote),
    /// The stage moved to another node at the step the report ends with; with `collect`, a
    /// [`ToCoordinator::Files`] listing of what it recorded until then follows.
    Migrated {
        report: Box<StageReport>,
        #[serde(default)]
        collect: bool,
    },
    /// A checkpoint, or the first step done (`--spares`).
    Failover(super::failover::NodeNote),
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
    super::failover::validate_coordinator(cfg)?;
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
    let control = match &cfg.control {
        Some(addr) => {
            let listener = TcpListener::bind(addr).map_err(|e| {
                TransportError::io(format!("listen for `slug migrate` on --control {addr}"), e)
            })?;
            let bound = listener
                .local_addr()
                .map_err(|e| TransportError::io("read the control endpoint's address", e))?;
            eprintln!(
                "slug: control endpoint listening on {bound} (slug migrate --control {bound} \
                 --stage S --to HOST:PORT)"
            );
            Some(listener)
        }
        None => None,
    };
    let (conns, clocks) = connect_nodes(addrs, key, timeout)?;
    let mut session = Session::new(
        conns,
        clocks,
        addrs,
        fabric.as_ref().map(|f| f.fabric().clone()),
    )?;
    session.keeper = recovery::Keeper::for_config(cfg)?;
    let fabric_path = fabric.as_ref().map(|f| f.path().to_owned());
    session.assign(cfg, fabric_path.clone())?;
    session.plan_moves(cfg);
    if let Some(f) = &fabric
        && cfg.migrations.is_empty()
        && cfg.control.is_none()
    {
        // Every node has mapped the fabric: unlink it now so that nothing is left in /dev/shm
        // even if this process is killed. (A run that moves stages keeps it for their new
        // nodes until it ends.)
        f.unlink();
    }
    session.start(timeout)?;
    let start = Instant::now();
    let watched = session.watch(cfg, key, fabric_path, control)?;
    let wall = start.elapsed();
    let hosts = session.stage_hosts();
    let parts = watched.parts.clone();
    let (reports, collects) = match watched.outcome(&hosts) {
        Ok(done) => done,
        Err(e) => return Err(session.abort(e)),
    };
    if let Some(into) = collect_into {
        session.collect(&collects, into, timeout)?;
    }
    let reports = reports
        .into_iter()
        .zip(parts)
        .enumerate()
        .map(|(s, (r, parts))| {
            let mut r = if parts.is_empty() {
                r
            } else {
                super::migrate::merge_reports(parts, r)
            };
            let c = session.host[s];
            r.host = session.addr[c].clone();
            r.clock = Some(session.clocks[c]);
            r
        })
        .collect();
    let mut report = RunReport::assemble(cfg, reports, wall);
    report.migrations = session.migration_reports(cfg, wall);
    report.failover = session.failover_summary();
    Ok(report)
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
    /// Where the nodes' heartbeat counters go, for a progress display.
    progress: Option<Arc<RunProgress>>,
    /// Per stage, the reports of the nodes it moved away from, earliest first.
    parts: Vec<Vec<StageReport>>,
}

impl Watched {
    fn new(stages: usize, progress: Option<Arc<RunProgress>>) -> Self {
        Self {
            reports: vec![None; stages],
            collects: vec![false; stages],
            at: vec!["startup".to_string(); stages],
            failures: Vec::new(),
            progress,
            parts: vec![Vec::new(); stages],
        }
    }

    /// Takes in one message (or read failure) from stage `s`'s control connection.
    fn note(&mut self, s: usize, msg: Result<ToCoordinator>) {
        match msg {
            Ok(ToCoordinator::Progress {
                step,
                seq,
                done,
                events,
                bytes,
            }) => {
                self.at[s] = format!("step {step} (sequence {seq})");
                if let Some(p) = &self.progress {
                    p.set(s, done, events, bytes);
                }
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
                ToCoordinator::Ready { .. }
                | ToCoordinator::Files { .. }
                | ToCoordinator::Cleaned
                | ToCoordinator::Move(_)
                | ToCoordinator::Migrated { .. }
                | ToCoordinator::Failover(_),
            ) => self.failures.push((
                Cause::Stage,
                s,
                self.at[s].clone(),
                "sent Ready, Files, Cleaned or a move message out of turn".into(),
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
    expected_file_of(stage, stage as u32, path)
}

/// [`expected_file`] for the node that recorded `stage` as endpoint `endpoint` (the node a move
/// brought the stage to records it as an endpoint of its own).
pub fn expected_file_of(stage: usize, endpoint: u32, path: &str) -> Option<(PathBuf, bool)> {
    let parts: Vec<&str> = path.split('/').collect();
    let shared = match parts.as_slice() {
        ["endpoints", log] => *log == format!("{endpoint}.slog"),
        // The node's capabilities and topology, merged into the manifest by the coordinator.
        ["nodes", report] => *report == format!("{endpoint}.json"),
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
    (stage, endpoint): (usize, u32),
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
        let (rel, content_addressed) =
            expected_file_of(stage, endpoint, &f.path).ok_or_else(|| {
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
            "the node did not list endpoints/{endpoint}.slog, the log of the stage it ran"
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

/// The live control connections of a run: one per stage node, then one per move target.
struct Session {
    conns: Vec<Conn>,
    fabric: Option<Arc<Fabric>>,
    /// Per connection: the node's address, clock offset, data address, weights hash, the
    /// stage it serves, and whether its session is over (moved away, dismissed).
    addr: Vec<String>,
    clocks: Vec<ClockOffset>,
    data: Vec<Option<String>>,
    weights: Vec<Option<String>>,
    stage_of: Vec<usize>,
    ended: Vec<bool>,
    /// Per stage: the connection of the node running it now.
    host: Vec<usize>,
    /// The run's data-link secret.
    link_secret: String,
    moves: Vec<MoveState>,
    /// Every verdict sent so far: a target that joins later hears them first.
    verdicts: Vec<(usize, Verdict)>,
    /// The configuration with every move so far (requested ones appended), as targets get it.
    live_cfg: Option<PipelineConfig>,
    /// Per stage: the forward step its node last said it works on.
    progress: Vec<u64>,
    started: Instant,
    /// What a requested move needs to open its target: the cluster key, the fabric file and
    /// the sender of the watch loop's events (set while watching).
    opener: Option<(ClusterKey, Option<PathBuf>, Events)>,
    /// Checkpoints and spares (`--spares`).
    keeper: Option<recovery::Keeper>,
    /// The connections of nodes a stage moved away from, and whether each has files to collect.
    collects_moved: Vec<(usize, bool)>,
}

/// The coordinator's view of one `--migrate`.
struct MoveState {
    plan: Migration,
    /// Connection to the target node.
    target: Option<usize>,
    phase: Phase,
    /// When the source's last step completed (by this process's clock).
    quiesced_at: Option<Instant>,
    report: MigrationReport,
    /// Nodes with a part in a requested move that have not yet said they can keep to it.
    acks: Vec<usize>,
    /// Where the `slug migrate` that asked for this move waits for its outcome.
    reply: Option<crossbeam_channel::Sender<MigrationReport>>,
    /// A requested move and how many times it was placed before (a node had passed the
    /// step): it is placed again further ahead.
    request: Option<(MoveRequest, u32)>,
    /// Replaced by a later attempt at the same request (left out of the run's report).
    superseded: bool,
}

/// Where a move is. Moves commit one at a time, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The coordinator is opening a session with the target, which builds the stage.
    Opening,
    /// The target is built and its weights match; the source pre-copies when it gets there.
    Prepared,
    /// The source paused at the move's step; its last delta and cursor went to the target.
    Quiesced,
    /// The target confirmed the restore; the commit waits for earlier moves.
    Restored,
    /// Every node was told; the target runs the stage.
    Committed,
    /// Will not happen; the stage keeps running where it was.
    Cancelled,
}

/// One thing heard on a control connection.
enum Heard {
    Message(Result<ToCoordinator>),
    /// An arena chunk of a move, to relay to its target.
    Chunk(Vec<u8>),
    /// `slug migrate` asks for a move; its outcome goes back through the sender.
    Request(MoveRequest, crossbeam_channel::Sender<MigrationReport>),
    /// The session with move `.0`'s target is open and the stage built there, or why not.
    Opened(usize, std::result::Result<OpenedTarget, String>),
}

/// Where the watch loop's events go, each with the connection it came from.
type Events = crossbeam_channel::Sender<(usize, Heard)>;

/// A move's target, connected, assigned and built.
struct OpenedTarget {
    conn: Conn,
    clock: ClockOffset,
    data: Option<String>,
    weights: Option<String>,
}

/// How many `slug migrate` callers are still being answered. The run waits for them, briefly,
/// before it returns, so a caller hears what became of its move rather than a closed connection.
#[derive(Debug, Clone, Default)]
struct Answering(std::sync::Arc<std::sync::atomic::AtomicUsize>);

/// One caller being answered: counted in [`Answering`] until dropped.
struct AnsweringOne(Answering);

impl Answering {
    fn one(&self) -> AnsweringOne {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        AnsweringOne(self.clone())
    }

    /// Waits until every caller has been answered, or `limit` has passed.
    fn wait(&self, limit: Duration) {
        let until = Instant::now() + limit;
        while self.0.load(std::sync::atomic::Ordering::SeqCst) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for AnsweringOne {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Takes `slug migrate` requests on `listener` (each caller must prove the cluster key, as a
/// coordinator does to a node) and hands them to the coordinator through `tx`, answering each
/// with what became of its move; stops with `stop`. The callers still being answered are
/// counted in what it returns.
fn serve_control(
    listener: TcpListener,
    key: ClusterKey,
    tx: Events,
    stop: AbortFlag,
) -> Result<Answering> {
    let answering = Answering::default();
    let counted = answering.clone();
    listener
        .set_nonblocking(true)
        .map_err(|e| TransportError::io("make the control endpoint non-blocking", e))?;
    std::thread::spawn(move || {
        while !stop.raised() {
            let (stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            };
            let (key, tx, stop, counted) = (key.clone(), tx.clone(), stop.clone(), counted.clone());
            std::thread::spawn(move || {
                let asked = stream
                    .set_nonblocking(false)
                    .map_err(|e| TransportError::io("configure a control caller's socket", e))
                    .and_then(|()| {
                        crate::auth::server_handshake(
                            stream,
                            format!("control caller {peer}"),
                            &key,
                            stop,
                            Duration::from_secs(10),
                            |hello| match hello.role {
                                Role::Control => Ok(()),
                                Role::Data => {
                                    Err("this is a coordinator's control endpoint".into())
                                }
                            },
                        )
                    })
                    .and_then(|hs| {
                        let mut conn = hs.conn;
                        let request = conn.recv_json::<MoveRequest>(Duration::from_secs(10))?;
                        Ok((conn, request))
                    });
                let (mut conn, request) = match asked {
                    Ok(asked) => asked,
                    Err(e) => {
                        eprintln!(
                            "slug: control endpoint: refused {peer}: {}",
                            printable(&e.to_string(), PEER_TEXT)
                        );
                        return;
                    }
                };
                let _answering = counted.one();
                let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
                if tx
                    .send((usize::MAX, Heard::Request(request, reply_tx)))
                    .is_err()
                {
                    return;
                }
                if let Ok(report) = reply_rx.recv() {
                    let _ = conn.send_json(&report, Duration::from_secs(10));
                }
            });
        }
    });
    Ok(answering)
}

/// Opens a session with move `index`'s target and has it build the stage (weights regenerated
/// from the seed there). A dead address is given up on after a quarter of the timeout, so the
/// move is cancelled well before a stage waiting for its verdict gives up.
fn open_target(
    cfg: &PipelineConfig,
    key: &ClusterKey,
    index: usize,
    fabric: Option<PathBuf>,
    link_secret: String,
) -> std::result::Result<OpenedTarget, String> {
    let m = &cfg.migrations[index];
    let timeout = cfg.timeout();
    let abort = AbortFlag::new();
    let hs = connect(&m.to, timeout / 4, &abort)
        .and_then(|stream| {
            let hello = Hello::new(Role::Control, COORDINATOR, m.stage as u32)?;
            client_handshake(
                stream,
                format!("node {}", m.to),
                key,
                hello,
                abort.clone(),
                timeout / 4,
            )
        })
        .map_err(|e| format!("could not open a session with the target node: {e}"))?;
    let mut conn = hs.conn;
    let assign = ToNode::Assign {
        stage: m.stage,
        config: Box::new(cfg.clone()),
        fabric,
        link_secret,
        incoming: Some(index),
    };
    conn.send_json(&assign, timeout)
        .map_err(|e| format!("the target node did not take the assignment: {e}"))?;
    match conn.recv_json::<ToCoordinator>(timeout / 2) {
        Ok(ToCoordinator::Ready {
            data_addr, weights, ..
        }) => Ok(OpenedTarget {
            conn,
            clock: hs.clock,
            data: data_addr,
            weights,
        }),
        Ok(ToCoordinator::Failed { error, .. }) => Err(format!(
            "the target node refused the stage: {}",
            printable(&error, PEER_TEXT)
        )),
        Ok(other) => Err(format!("the target node sent {}", shown(&other))),
        Err(e) => Err(format!("the target node did not get ready: {e}")),
    }
}

/// How many times a requested move is placed, each time twice as far ahead, before the
/// request is refused because the pipeline keeps outrunning it.
const MAX_PLACEMENTS: u32 = 4;

/// How long a message to a node that may be gone may take.
const BRIEF: Duration = Duration::from_secs(2);

impl Session {
    fn new(
        conns: Vec<Conn>,
        clocks: Vec<ClockOffset>,
        addrs: &[String],
        fabric: Option<Arc<Fabric>>,
    ) -> Result<Self> {
        let n = conns.len();
        Ok(Self {
            conns,
            fabric,
            addr: addrs.to_vec(),
            clocks,
            data: vec![None; n],
            weights: vec![None; n],
            stage_of: (0..n).collect(),
            ended: vec![false; n],
            host: (0..n).collect(),
            link_secret: ClusterKey::random()?.as_env_value(),
            moves: Vec::new(),
            verdicts: Vec::new(),
            live_cfg: None,
            progress: vec![0; n],
            started: Instant::now(),
            opener: None,
            keeper: None,
            collects_moved: Vec::new(),
        })
    }

    /// The address of the node running each stage now.
    fn stage_hosts(&self) -> Vec<String> {
        self.host.iter().map(|&c| self.addr[c].clone()).collect()
    }

    /// Sends every node its stage, the configuration, the fabric file and the run's link
    /// secret; notes the data address each node then listens on (if its links need one).
    fn assign(&mut self, cfg: &PipelineConfig, fabric: Option<PathBuf>) -> Result<()> {
        let timeout = cfg.timeout();
        for (s, conn) in self.conns.iter_mut().enumerate() {
            let assign = ToNode::Assign {
                stage: s,
                config: Box::new(cfg.clone()),
                fabric: fabric.clone(),
                link_secret: self.link_secret.clone(),
                incoming: None,
            };
            conn.send_json(&assign, timeout)
                .map_err(|e| failed(s, &self.addr[s], "startup", e.to_string()))?;
        }
        for s in 0..self.conns.len() {
            let addr = self.addr[s].clone();
            match self.conns[s].recv_json::<ToCoordinator>(timeout) {
                Ok(ToCoordinator::Ready {
                    data_addr, weights, ..
                }) => {
                    self.data[s] = data_addr;
                    self.weights[s] = weights;
                }
                Ok(ToCoordinator::Failed { at, error, .. }) => {
                    let (at, error) = (printable(&at, PEER_TEXT), printable(&error, PEER_TEXT));
                    return Err(self.abort(failed(s, &addr, &at, error)));
                }
                Ok(other) => {
                    let e = failed(
                        s,
                        &addr,
                        "startup",
                        format!("unexpected message {}", shown(&other)),
                    );
                    return Err(self.abort(e));
                }
                Err(e) => return Err(self.abort(failed(s, &addr, "startup", e.to_string()))),
            }
        }
        Ok(())
    }

    /// The moves of the run, none under way yet.
    fn plan_moves(&mut self, cfg: &PipelineConfig) {
        self.live_cfg = Some(cfg.clone());
        self.moves = cfg
            .migrations
            .iter()
            .map(|m| MoveState {
                plan: m.clone(),
                target: None,
                phase: Phase::Opening,
                quiesced_at: None,
                acks: Vec::new(),
                reply: None,
                request: None,
                superseded: false,
                report: MigrationReport {
                    stage: m.stage,
                    from: self.addr[self.host[m.stage]].clone(),
                    to: m.to.clone(),
                    at_step: m.at_step,
                    moved: false,
                    reason: None,
                    rounds: Vec::new(),
                    stall_ms: None,
                    step_ms: None,
                    restored_ms: None,
                    index: 0,
                    clocks: None,
                },
            })
            .collect();
    }

    /// A target that is ready: if its weights match the stage's, it joins the session and
    /// every node hears that the move may go ahead; otherwise it is dismissed and the move
    /// cancelled.
    fn target_opened(&mut self, index: usize, opened: OpenedTarget) -> Option<usize> {
        let stage = self.moves[index].plan.stage;
        let source = &self.weights[stage];
        if opened.weights.is_none() || opened.weights != *source {
            let reason = format!(
                "the target built weights with hash {} but the stage's node has {}: a \
                 different slug version or model on the target",
                opened.weights.as_deref().unwrap_or("(none)"),
                source.as_deref().unwrap_or("(none)")
            );
            let mut conn = opened.conn;
            let _ = conn.send_json(
                &ToNode::Dismiss {
                    reason: reason.clone(),
                },
                BRIEF,
            );
            self.cancel(index, reason);
            return None;
        }
        self.conns.push(opened.conn);
        self.addr.push(self.moves[index].plan.to.clone());
        self.clocks.push(opened.clock);
        self.data.push(opened.data);
        self.weights.push(opened.weights);
        self.stage_of.push(stage);
        self.ended.push(false);
        let c = self.conns.len() - 1;
        let m = &mut self.moves[index];
        m.target = Some(c);
        m.phase = Phase::Prepared;
        for (i, verdict) in self.verdicts.clone() {
            let said = ToNode::Move { index: i, verdict };
            if self.conns[c].send_json(&said, BRIEF).is_err() {
                self.cancel(index, "lost the target node as it joined".into());
                return None;
            }
        }
        self.broadcast_verdict(index, Verdict::Prepare);
        Some(c)
    }

    /// Tells every stage node where its downstream stage listens, which starts the run.
    fn start(&mut self, timeout: Duration) -> Result<()> {
        let n = self.host.len();
        for s in 0..n {
            let next = self.data[(s + 1) % n].clone();
            if let Err(e) = self.conns[s].send_json(&ToNode::Start { next }, timeout) {
                let addr = self.addr[s].clone();
                return Err(self.abort(failed(s, &addr, "startup", e.to_string())));
            }
        }
        Ok(())
    }

    /// Sends every node the verdict on move `index`, and remembers it for targets joining later.
    fn broadcast_verdict(&mut self, index: usize, verdict: Verdict) {
        self.verdicts.push((index, verdict.clone()));
        self.broadcast(&ToNode::Move { index, verdict });
    }

    /// Sends `msg` to every node whose session is still on; one that is gone is skipped (its
    /// reader reports the loss).
    fn broadcast(&mut self, msg: &ToNode) {
        for (c, conn) in self.conns.iter_mut().enumerate() {
            if !self.ended[c] {
                let _ = conn.send_json(msg, BRIEF);
            }
        }
    }

    /// The move whose target is connection `c`, while it is not committed.
    fn uncommitted_target(&self, c: usize) -> Option<usize> {
        self.moves
            .iter()
            .position(|m| m.target == Some(c) && m.phase != Phase::Committed)
    }

    /// Cancels move `index` unless it was committed: every node hears why, the target is
    /// dismissed, and later moves may commit.
    fn cancel(&mut self, index: usize, reason: String) {
        let m = &mut self.moves[index];
        if matches!(m.phase, Phase::Committed | Phase::Cancelled) {
            return;
        }
        m.phase = Phase::Cancelled;
        m.report.reason = Some(printable(&reason, PEER_TEXT));
        if let Some(reply) = m.reply.take() {
            let _ = reply.send(m.report.clone());
        }
        let target = m.target;
        self.broadcast_verdict(index, Verdict::Cancel { reason });
        if let Some(t) = target {
            let reason = "its move was cancelled".to_string();
            let _ = self.conns[t].send_json(&ToNode::Dismiss { reason }, BRIEF);
            self.ended[t] = true;
        }
        self.advance();
    }

    /// Commits restored moves in order, up to the first one still under way.
    fn advance(&mut self) {
        for i in 0..self.moves.len() {
            match self.moves[i].phase {
                Phase::Committed | Phase::Cancelled => {}
                Phase::Restored if self.moves[i].acks.is_empty() => self.commit(i),
                Phase::Restored => return,
                Phase::Opening | Phase::Prepared | Phase::Quiesced => return,
            }
        }
    }

    /// Tells every node that move `index` happened (the upstream neighbour gets the target's
    /// data address) and starts the target.
    fn commit(&mut self, index: usize) {
        let Some(t) = self.moves[index].target else {
            return;
        };
        let stage = self.moves[index].plan.stage;
        let data_addr = self.data[t].clone();
        self.broadcast_verdict(index, Verdict::Commit { data_addr });
        let source = std::mem::replace(&mut self.host[stage], t);
        let clocks = [self.clocks[source], self.clocks[t]];
        let n = self.host.len();
        let next = self.data[self.host[(stage + 1) % n]].clone();
        // A target that is gone now fails the run through its reader, like any stage node.
        let _ = self.conns[t].send_json(&ToNode::Start { next }, BRIEF);
        let m = &mut self.moves[index];
        m.phase = Phase::Committed;
        m.report.moved = true;
        m.report.index = index;
        m.report.clocks = Some(clocks);
        if let Some(hook) = self.live_cfg.as_ref().and_then(|c| c.on_move.as_ref()) {
            (hook.0)(&self.moves[index].report);
        }
    }

    /// Relays an arena chunk from the node running a moving stage to the move's target.
    fn relay(&mut self, c: usize, body: Vec<u8>) {
        let Ok((index, _, _)) = super::migrate::parse_chunk(&body) else {
            return;
        };
        let Some(m) = self.moves.get(index) else {
            return;
        };
        if !matches!(m.phase, Phase::Prepared | Phase::Quiesced) || self.host[m.plan.stage] != c {
            return;
        }
        let Some(t) = m.target else { return };
        if let Err(e) = self.conns[t].send_frame(crate::wire::kind::ARENA, &body, BRIEF) {
            self.cancel(index, format!("lost the target node during pre-copy ({e})"));
        }
    }

    /// A step of a move, heard from connection `c`.
    fn on_note(&mut self, c: usize, note: MoveNote) {
        match note {
            MoveNote::Precopied {
                index,
                chunks,
                bytes,
                last,
                ..
            } => {
                if let Some(m) = self.moves.get_mut(index) {
                    m.report.rounds.push(PrecopyRound {
                        chunks,
                        bytes,
                        last,
                    });
                }
            }
            MoveNote::Quiesced {
                index,
                cursor,
                since_step_ns,
            } => {
                let Some(m) = self.moves.get_mut(index) else {
                    return;
                };
                if m.phase != Phase::Prepared || self.host[m.plan.stage] != c {
                    return;
                }
                let Some(t) = m.target else { return };
                m.phase = Phase::Quiesced;
                m.quiesced_at = Instant::now().checked_sub(Duration::from_nanos(since_step_ns));
                m.report.from = self.addr[c].clone();
                if let Err(e) = self.conns[t].send_json(&ToNode::Restore { index, cursor }, BRIEF) {
                    self.cancel(
                        index,
                        format!("lost the target node before the restore ({e})"),
                    );
                }
            }
            MoveNote::Restored { index } => {
                if let Some(m) = self.moves.get_mut(index)
                    && m.target == Some(c)
                    && m.phase == Phase::Quiesced
                {
                    m.phase = Phase::Restored;
                    m.report.restored_ms = m.quiesced_at.map(|t| t.elapsed().as_secs_f64() * 1e3);
                    self.advance();
                }
            }
            MoveNote::Resumed { index } => {
                let steps = self.progress.iter().copied().max().unwrap_or(0).max(1) as f64;
                let elapsed = self.started.elapsed().as_secs_f64() * 1e3;
                if let Some(m) = self.moves.get_mut(index)
                    && m.target == Some(c)
                {
                    m.report.stall_ms = m.quiesced_at.map(|t| t.elapsed().as_secs_f64() * 1e3);
                    if let Some(reply) = m.reply.take() {
                        let mut report = m.report.clone();
                        let stall = report.stall_ms.unwrap_or(0.0);
                        report.step_ms = Some(((elapsed - stall) / steps).max(0.0));
                        let _ = reply.send(report);
                    }
                }
            }
            MoveNote::Planned { index, ok } => {
                let Some(m) = self.moves.get_mut(index) else {
                    return;
                };
                m.acks.retain(|&a| a != c);
                let retry = match (&m.request, &m.reply) {
                    (Some((request, attempt)), Some(_))
                        if !ok
                            && *attempt + 1 < MAX_PLACEMENTS
                            && !matches!(m.phase, Phase::Committed | Phase::Cancelled) =>
                    {
                        Some((request.clone(), *attempt))
                    }
                    _ => None,
                };
                if let Some((request, attempt)) = retry {
                    // Too late for a node: place the same request again, further ahead.
                    let reply = m.reply.take();
                    m.superseded = true;
                    self.cancel(index, "placed again further ahead".into());
                    if let Some(reply) = reply {
                        self.requested(request, reply, attempt + 1);
                    }
                } else if !ok {
                    let reason = format!(
                        "{} had already passed its part of step {} when it heard of the move: \
                         the pipeline ran ahead of the request; ask again",
                        self.addr[c], m.plan.at_step
                    );
                    self.cancel(index, reason);
                } else {
                    self.advance();
                }
            }
        }
    }

    /// Pending moves whose node running stage `s` has not said whether it keeps to its part,
    /// and whose heartbeat shows it past that part: the plan reached it too late. It may now
    /// wait on a link for a transfer that its neighbour holds back until the move is settled
    /// (the moved stage, waiting for the input of the move's step), so it never gets to say so
    /// itself; it counts as having said it passed, and the move is placed again further ahead.
    fn passed_unheard(&mut self, s: usize) {
        let (Some(cfg), Some(&c)) = (self.live_cfg.as_ref(), self.host.get(s)) else {
            return;
        };
        let started = self.progress[s];
        let late: Vec<usize> = (self.moves.iter().enumerate())
            .filter(|(_, m)| {
                !matches!(m.phase, Phase::Committed | Phase::Cancelled)
                    && m.acks.contains(&c)
                    && super::migrate::passed(cfg, s, &m.plan, started)
            })
            .map(|(index, _)| index)
            .collect();
        for index in late {
            eprintln!(
                "slug: stage {s}'s node {} went past its part in the move of stage {} at step \
                 {} before hearing of it",
                self.addr[c], self.moves[index].plan.stage, self.moves[index].plan.at_step
            );
            self.on_note(c, MoveNote::Planned { index, ok: false });
        }
    }

    /// Takes in what connection `c` said.
    fn hear(&mut self, c: usize, msg: Result<ToCoordinator>, watched: &mut Watched) {
        let s = self.stage_of[c];
        if msg.is_ok() {
            self.heard_from(c);
        }
        if let Some(index) = self.uncommitted_target(c) {
            match msg {
                Ok(ToCoordinator::Progress { .. }) => {}
                Ok(ToCoordinator::Move(note)) => self.on_note(c, note),
                Ok(ToCoordinator::Failed { error, .. }) => self.cancel(
                    index,
                    format!("the target node failed: {}", printable(&error, PEER_TEXT)),
                ),
                Ok(other) => self.cancel(
                    index,
                    format!("the target node sent {} out of turn", shown(&other)),
                ),
                Err(e) => self.cancel(index, format!("lost the target node ({e})")),
            }
            return;
        }
        match msg {
            Ok(ToCoordinator::Move(note)) => self.on_note(c, note),
            Ok(ToCoordinator::Failover(note)) => self.on_failover(c, note),
            Err(e) if self.host[s] == c && self.fails_over(s, watched) => {
                self.fail_over(c, s, &e, watched);
            }
            Ok(ToCoordinator::Migrated { report, collect }) => {
                self.ended[c] = true;
                self.collects_moved.push((c, collect));
                watched.parts[s].push(*report);
            }
            // The node the stage left keeps heartbeating until its session ends.
            Ok(ToCoordinator::Progress { .. }) if self.host[s] != c => {}
            Ok(ToCoordinator::Progress {
                step,
                seq,
                done,
                events,
                bytes,
            }) => {
                if let Some(cfg) = &self.live_cfg {
                    self.progress[s] = self.progress[s].max(forward_of(cfg, step, seq));
                }
                self.passed_unheard(s);
                let heartbeat = ToCoordinator::Progress {
                    step,
                    seq,
                    done,
                    events,
                    bytes,
                };
                watched.note(s, Ok(heartbeat));
            }
            other => watched.note(s, other),
        }
    }

    /// Listens to every node (one reader thread each) until all stages have reported, or,
    /// once one has failed, for [`SETTLE`] more to hear the root cause; relays and commits
    /// moves on the way.
    fn watch(
        &mut self,
        cfg: &PipelineConfig,
        key: &ClusterKey,
        fabric: Option<PathBuf>,
        control: Option<TcpListener>,
    ) -> Result<Watched> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let stop_readers = AbortFlag::new();
        let answering = match control {
            Some(listener) => {
                serve_control(listener, key.clone(), tx.clone(), stop_readers.clone())?
            }
            None => Answering::default(),
        };
        for c in 0..self.conns.len() {
            if !self.ended[c] {
                self.listen(c, &tx, &stop_readers)?;
            }
        }
        for index in 0..self.moves.len() {
            let (cfg, key, fabric, secret, tx) = (
                cfg.clone(),
                key.clone(),
                fabric.clone(),
                self.link_secret.clone(),
                tx.clone(),
            );
            std::thread::spawn(move || {
                let opened = open_target(&cfg, &key, index, fabric, secret);
                let _ = tx.send((usize::MAX, Heard::Opened(index, opened)));
            });
        }
        self.opener = Some((key.clone(), fabric.clone(), tx.clone()));
        self.watch_failover(&tx, &stop_readers, key);
        let mut watched = Watched::new(self.host.len(), cfg.progress.clone());
        let mut settle_until: Option<Instant> = None;
        while watched.reports.iter().any(Option::is_none) {
            let wait = match settle_until {
                Some(t) => t.saturating_duration_since(Instant::now()),
                None => SILENCE_LIMIT * 2,
            };
            let Ok((c, heard)) = rx.recv_timeout(wait) else {
                break;
            };
            match heard {
                Heard::Chunk(body) => {
                    if !self.keep_chunk(c, &body) {
                        self.relay(c, body);
                    }
                }
                Heard::Message(msg) => self.hear(c, msg, &mut watched),
                Heard::Opened(index, Ok(mut opened))
                    if self.moves[index].phase != Phase::Opening =>
                {
                    // Cancelled while the target was being opened.
                    let reason = "its move was cancelled".to_string();
                    let _ = opened.conn.send_json(&ToNode::Dismiss { reason }, BRIEF);
                }
                Heard::Opened(index, Ok(opened)) => {
                    if let Some(c) = self.target_opened(index, opened)
                        && let Err(e) = self.listen(c, &tx, &stop_readers)
                    {
                        self.cancel(index, format!("cannot listen to the target node: {e}"));
                    }
                }
                Heard::Opened(index, Err(reason)) => self.cancel(index, reason),
                Heard::Request(request, reply) => self.requested(request, reply, 0),
            }
            if !watched.failures.is_empty() && settle_until.is_none() {
                settle_until = Some(Instant::now() + SETTLE);
            }
            if settle_until.is_some_and(|t| Instant::now() >= t) {
                break;
            }
        }
        stop_readers.raise();
        self.opener = None;
        for m in &mut self.moves {
            if let Some(reply) = m.reply.take() {
                let mut report = m.report.clone();
                if !report.moved && report.reason.is_none() {
                    report.reason = Some("the run ended before the move's step".into());
                }
                let _ = reply.send(report);
            }
        }
        // Requests that came too late to be placed are answered, not left to a closed
        // connection; a caller answered just now hears it before this process can exit.
        while let Ok((_, heard)) = rx.try_recv() {
            if let Heard::Request(request, reply) = heard {
                let mut report = self.unplaced(&request);
                report.reason = Some("the run ended before the move could be placed".into());
                let _ = reply.send(report);
            }
        }
        answering.wait(Duration::from_secs(2));
        // Targets still being opened are dismissed: the run is over.
        for m in &self.moves {
            if let (Some(t), Phase::Opening | Phase::Prepared) = (m.target, m.phase) {
                let reason = "the run ended before the move's step".to_string();
                let _ = self.conns[t].send_json(&ToNode::Dismiss { reason }, BRIEF);
            }
        }
        Ok(watched)
    }

    /// The report of a requested move before it is placed: nothing moved yet.
    fn unplaced(&self, request: &MoveRequest) -> MigrationReport {
        MigrationReport {
            stage: request.stage,
            from: self
                .host
                .get(request.stage)
                .map(|&c| self.addr[c].clone())
                .unwrap_or_default(),
            to: request.to.clone(),
            at_step: 0,
            moved: false,
            reason: None,
            rounds: Vec::new(),
            stall_ms: None,
            step_ms: None,
            restored_ms: None,
            index: 0,
            clocks: None,
        }
    }

    /// A move `slug migrate` asked for: placed far enough ahead of the stage and its
    /// neighbours that every node hears of it before its point (a node that has passed it
    /// says so and the move is cancelled), then run like a scripted one.
    fn requested(
        &mut self,
        request: MoveRequest,
        reply: crossbeam_channel::Sender<MigrationReport>,
        attempt: u32,
    ) {
        let n = self.host.len();
        let stage = request.stage;
        let mut report = self.unplaced(&request);
        let refuse = |mut report: MigrationReport, reason: String| {
            report.reason = Some(reason);
            let _ = reply.send(report);
        };
        let Some(live) = self.live_cfg.as_mut() else {
            return refuse(report, "the run has no configuration to move from".into());
        };
        if stage >= n {
            return refuse(report, format!("the pipeline has stages 0..{}", n - 1));
        }
        if let Some(m) = self
            .moves
            .iter()
            .find(|m| !matches!(m.phase, Phase::Committed | Phase::Cancelled))
        {
            let reason = format!(
                "the move of stage {} to {} is still under way; ask again when it is done",
                m.plan.stage, m.plan.to
            );
            return refuse(report, reason);
        }
        let mb = live.microbatches.max(1) as u64;
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        let fastest = self.progress.iter().copied().max().unwrap_or(0);
        // Heartbeats are 250 ms apart and the request takes a moment to reach every node: a
        // second of steps ahead (at the run's rate so far), plus the microbatches a
        // neighbour may run ahead, plus the pre-copy rounds.
        let rate = fastest as f64 / elapsed;
        let margin =
            (rate.ceil() as u64 + 2 * mb + 2 + u64::from(request.rounds)) << attempt.min(8);
        let ahead = [stage, (stage + n - 1) % n, (stage + 1) % n]
            .iter()
            .map(|&s| self.progress[s])
            .max()
            .unwrap_or(0);
        let mut at = ahead + margin;
        if let Some(prev) = live.migrations.last() {
            at = at.max(prev.at_step + mb + 1);
        }
        report.at_step = at;
        let m = Migration {
            stage,
            to: request.to.clone(),
            at_step: at,
            rounds: request.rounds,
        };
        live.migrations.push(m.clone());
        if let Err(e) = live.validate() {
            live.migrations.pop();
            let steps = live.forward_steps();
            return refuse(
                report,
                format!("stage {stage} is near step {ahead} of {steps}, too late to move: {e}"),
            );
        }
        let index = self.moves.len();
        let tcp_links = live.transport == TransportKind::Tcp && n > 1;
        let mut acks = vec![self.host[stage]];
        if tcp_links {
            for s in [(stage + n - 1) % n, (stage + 1) % n] {
                if !acks.contains(&self.host[s]) {
                    acks.push(self.host[s]);
                }
            }
        }
        let live = live.clone();
        self.moves.push(MoveState {
            plan: m.clone(),
            target: None,
            phase: Phase::Opening,
            quiesced_at: None,
            report,
            acks,
            reply: Some(reply),
            request: Some((request, attempt)),
            superseded: false,
        });
        self.broadcast(&ToNode::Plan {
            index,
            migration: m,
        });
        let Some((key, fabric, tx)) = self.opener.clone() else {
            return;
        };
        let secret = self.link_secret.clone();
        std::thread::spawn(move || {
            let opened = open_target(&live, &key, index, fabric, secret);
            let _ = tx.send((usize::MAX, Heard::Opened(index, opened)));
        });
    }

    /// Starts the reader of connection `c`: what it hears goes to `tx` until its node's
    /// session ends.
    fn listen(&self, c: usize, tx: &Events, stop: &AbortFlag) -> Result<()> {
        let mut reader = self.conns[c].try_clone()?;
        reader.abort = stop.clone();
        let tx = tx.clone();
        std::thread::spawn(move || {
            loop {
                let heard = match reader.recv_frame(SILENCE_LIMIT) {
                    Ok((crate::wire::kind::ARENA, body)) => Heard::Chunk(body),
                    Ok((crate::wire::kind::JSON, body)) => {
                        Heard::Message(reader.decode_json::<ToCoordinator>(&body))
                    }
                    Ok((kind, _)) => Heard::Message(Err(TransportError::Protocol {
                        peer: reader.peer.clone(),
                        detail: format!("unexpected frame kind {kind} on a control link"),
                    })),
                    Err(e) => Heard::Message(Err(e)),
                };
                let last = match &heard {
                    Heard::Message(m) => !matches!(
                        m,
                        Ok(ToCoordinator::Progress { .. }
                            | ToCoordinator::Move(_)
                            | ToCoordinator::Failover(_))
                    ),
                    _ => false,
                };
                if tx.send((c, heard)).is_err() || last {
                    break;
                }
            }
        });
        Ok(())
    }

    /// What became of each move, with the run's step time beside each stall.
    fn migration_reports(&self, cfg: &PipelineConfig, wall: Duration) -> Vec<MigrationReport> {
        let stalls: f64 = self.moves.iter().filter_map(|m| m.report.stall_ms).sum();
        let steps = cfg.forward_steps().max(1) as f64;
        let step_ms = ((wall.as_secs_f64() * 1e3 - stalls) / steps).max(0.0);
        self.moves
            .iter()
            .filter(|m| !m.superseded)
            .map(|m| {
                let mut r = m.report.clone();
                if r.moved {
                    r.step_ms = Some(step_ms);
                }
                r
            })
            .collect()
    }

    /// Fetches every node's recorded files into `into`, all nodes at once; the first node
    /// whose collection fails ends the run with what it said.
    fn collect(&mut self, collects: &[bool], into: &Path, timeout: Duration) -> Result<()> {
        // Per connection whose files to fetch: its stage, the endpoint it recorded the stage
        // as, and whether it said it has files. Each stage's last node, and every node a stage
        // moved away from.
        let n = self.host.len();
        let endpoint_of = |c: usize| {
            if c < n {
                return c as u32;
            }
            self.moves
                .iter()
                .position(|m| m.target == Some(c))
                .map_or(u32::MAX, |i| super::migrate::continuation_endpoint(n, i))
        };
        let mut jobs: HashMap<usize, (usize, u32, bool)> = HashMap::new();
        for (s, &collect) in collects.iter().enumerate() {
            let c = self.host[s];
            jobs.insert(c, (s, endpoint_of(c), collect));
        }
        for &(c, collect) in &self.collects_moved {
            jobs.insert(c, (self.stage_of[c], endpoint_of(c), collect));
        }
        let claimed = Mutex::new(HashSet::new());
        let claimed = &claimed;
        let results: Vec<(usize, std::result::Result<(), String>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .conns
                .iter_mut()
                .enumerate()
                .filter_map(|(c, conn)| Some((c, conn, *jobs.get(&c)?)))
                .map(|(c, conn, (stage, endpoint, collect))| {
                    let handle = scope.spawn(move || {
                        if !collect {
                            return Err("the node recorded nothing to collect: serve stages with \
                                 a recording `slug node` of this version"
                                .to_string());
                        }
                        collect_files(conn, (stage, endpoint), into, claimed, timeout)
                    });
                    (c, handle)
                })
                .collect();
            handles
                .into_iter()
                .map(|(c, h)| {
                    let r = h
                        .join()
                        .unwrap_or_else(|_| Err("the collecting thread panicked".into()));
                    (c, r)
                })
                .collect()
        });
        if let Some((c, detail)) = results
            .into_iter()
            .find_map(|(c, r)| r.err().map(|d| (c, d)))
        {
            let detail = format!(
                "{detail}; files that arrived whole are kept in {}",
                into.display()
            );
            let (stage, addr) = (self.stage_of[c], self.addr[c].clone());
            return Err(self.abort(failed(stage, &addr, COLLECTING, detail)));
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
        let err = collect_files(&mut coord, (0, 0), dir.path(), &Mutex::default(), T).unwrap_err();
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
        let err = collect_files(&mut coord, (1, 1), dir.path(), &Mutex::default(), T).unwrap_err();
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
            let err =
                collect_files(&mut coord, (0, 0), dir.path(), &Mutex::default(), T).unwrap_err();
            assert!(err.contains("does not produce"), "{bad}: {err}");
        }
        let mut big = file("endpoints/0.slog", b"x");
        big.len = MAX_COLLECTED_FILE + 1;
        node.send_json(&ToCoordinator::Files { files: vec![big] }, T)
            .unwrap();
        let err = collect_files(&mut coord, (0, 0), dir.path(), &Mutex::default(), T).unwrap_err();
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
        let err = collect_files(&mut coord, (0, 0), dir.path(), &Mutex::default(), T).unwrap_err();
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
