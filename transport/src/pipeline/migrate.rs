//! Moving a live stage to another node (`--migrate stage=S,to=HOST:PORT,at-step=N`): the plan,
//! the transfer at which each neighbour's link switches to the new node, the gate a stage's loop
//! consults at those points, the source's iterative pre-copy of dirtied arena chunks, and what a
//! run reports about each move.
//!
//! Why no transfer is ever in flight across a switch: every node computes from the config the
//! sequence number of the first transfer the moved stage consumes (and produces) at or after
//! step N. The upstream stage sends transfers below that number to the old node and the rest
//! to the new one; the downstream stage receives from the old node below the other number and
//! from the new node after it. The old node consumes exactly the inputs of its steps before N
//! and produces exactly their outputs, so both links change hands at a transfer boundary and
//! continue their numbering. Over `shm` the rings live in the shared fabric file: they stay
//! where they are and the new node simply continues reading and writing them.

use std::net::TcpListener;
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use slug_kernels::{Section, Stage, StageLayout};

use crate::auth::ClusterKey;
use crate::error::{Result, TransportError};
use crate::link::tcp::{TcpRecv, TcpSend};
use crate::link::{LinkEnds, LinkIntegrity, LinkReceiver, LinkSender};
use crate::transfer::TransportKind;
use crate::wire::AbortFlag;

use super::config::PipelineConfig;
use super::report::StageReport;
use super::state::{consumed_at, sends_after};

/// Pre-copy rounds before the switch when the spec does not say (`rounds=`).
pub const DEFAULT_ROUNDS: u32 = 3;
/// Most pre-copy rounds a move may ask for.
const MAX_ROUNDS: u32 = 64;
/// Dirty tracking granularity: the arena's state is shipped in chunks of this many bytes.
pub(crate) const CHUNK: usize = 16 << 10;

/// One scripted move of a stage to another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// The stage to move.
    pub stage: usize,
    /// `host:port` of the `slug node --listen` that takes it over.
    pub to: String,
    /// The stage's forward step (its cursor step: the (step, sequence) pairs it has run) at
    /// which the new node takes over.
    pub at_step: u64,
    /// Pre-copy rounds: the steps before `at_step` at whose boundaries the chunks dirtied since
    /// the previous round are shipped while the stage runs. 0 is stop-and-copy: the whole
    /// state moves while the stage is paused.
    pub rounds: u32,
}

impl FromStr for Migration {
    type Err = TransportError;

    /// Parses `stage=S,to=HOST:PORT,at-step=N[,rounds=R]`.
    fn from_str(spec: &str) -> Result<Self> {
        let bad = |detail: String| {
            TransportError::Config(format!(
                "--migrate {spec:?}: {detail}; write it as stage=S,to=HOST:PORT,at-step=N \
                 (optionally rounds=R), e.g. stage=1,to=10.0.0.5:7070,at-step=20"
            ))
        };
        let (mut stage, mut to, mut at_step, mut rounds) = (None, None, None, DEFAULT_ROUNDS);
        for part in spec.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            let number = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("{key}={v:?} is not a whole number")))
            };
            match key {
                "stage" => stage = Some(number(value)? as usize),
                "to" if !value.is_empty() => to = Some(value.to_string()),
                "at-step" => at_step = Some(number(value)?),
                "rounds" => {
                    rounds = u32::try_from(number(value)?)
                        .ok()
                        .filter(|r| *r <= MAX_ROUNDS)
                        .ok_or_else(|| bad(format!("rounds is at most {MAX_ROUNDS}")))?;
                }
                other => return Err(bad(format!("unknown key {other:?}"))),
            }
        }
        Ok(Self {
            stage: stage.ok_or_else(|| bad("stage= is missing".into()))?,
            to: to.ok_or_else(|| bad("to= is missing".into()))?,
            at_step: at_step.ok_or_else(|| bad("at-step= is missing".into()))?,
            rounds,
        })
    }
}

/// Refuses moves that cannot happen, naming the flag and the fix.
pub(crate) fn validate(cfg: &PipelineConfig) -> Result<()> {
    let bad = |m: String| Err(TransportError::Config(m));
    if cfg.control.is_some() && cfg.transport == TransportKind::Local {
        return bad(
            "--control takes `slug migrate` requests, but --transport local runs every stage as \
             a thread of this one process, so no stage can move: use --transport shm or tcp"
                .into(),
        );
    }
    if cfg.transport == TransportKind::Rdma && (cfg.control.is_some() || !cfg.migrations.is_empty())
    {
        return bad(
            "--migrate and --control move a stage to another node, whose rdma queue pairs would              have to be connected anew mid-run, which the rdma backend does not do: use              --transport tcp or shm to move stages"
                .into(),
        );
    }
    if cfg.migrations.is_empty() {
        return Ok(());
    }
    if cfg.transport == TransportKind::Local {
        return bad(
            "--migrate moves a stage to another `slug node`, but --transport local runs every \
             stage as a thread of this one process, so there is no node to move it from or to: \
             use --transport shm or tcp (one node process per stage)"
                .into(),
        );
    }
    if cfg.stop_after.is_some() {
        return bad("a replay of a prefix of the schedule cannot migrate stages".into());
    }
    let steps = cfg.forward_steps();
    let mut previous: Option<&Migration> = None;
    for m in &cfg.migrations {
        if m.stage >= cfg.stages {
            return bad(format!(
                "--migrate stage={}: the pipeline has stages 0..{}",
                m.stage,
                cfg.stages - 1
            ));
        }
        if m.at_step == 0 || m.at_step >= steps {
            return bad(format!(
                "--migrate at-step={}: each stage runs {steps} forward steps (sequences x \
                 tokens); move it at a step from 1 to {}",
                m.at_step,
                steps.saturating_sub(1)
            ));
        }
        // Moves are committed one at a time, in order; a neighbour may have to wait at its
        // switch for the previous move's commit, which needs up to a microbatch group of steps.
        let gap = cfg.microbatches.max(1) as u64 + 1;
        if let Some(p) = previous
            && m.at_step < p.at_step + gap
        {
            return bad(format!(
                "--migrate at-step={} comes {} step(s) after the previous move (at-step={}): \
                 give the moves in order, each at least {gap} steps (microbatches + 1) after \
                 the one before",
                m.at_step,
                m.at_step.saturating_sub(p.at_step),
                p.at_step
            ));
        }
        previous = Some(m);
    }
    Ok(())
}

/// The forward step of (decode `step`, sequence `seq`) in `cfg`'s schedule (the inverse of
/// [`super::state::schedule_slot`]).
pub(crate) fn forward_of(cfg: &PipelineConfig, step: u32, seq: u32) -> u64 {
    let mb = cfg.microbatches.max(1) as u64;
    let tokens = cfg.tokens as u64;
    let sequences = cfg.prompts.len() as u64;
    let seq = u64::from(seq).min(sequences.saturating_sub(1));
    let group = seq / mb;
    let first = group * mb;
    let size = mb.min(sequences - first);
    group * mb * tokens + u64::from(step) * size + (seq - first)
}

/// Sequence number of the first transfer into `stage` that it consumes at or after forward step
/// `n`: the upstream stage sends this one and later ones to the new node.
pub(crate) fn inbound_switch(cfg: &PipelineConfig, stage: usize, n: u64) -> u64 {
    let up = (stage + cfg.stages - 1) % cfg.stages;
    (0..n)
        .filter(|&f| sends_after(cfg, up, f) && consumed_at(cfg, up, f) < n)
        .count() as u64
}

/// Sequence number of the first transfer `stage` sends after forward step `n - 1`: the
/// downstream stage receives this one and later ones from the new node.
pub(crate) fn outbound_switch(cfg: &PipelineConfig, stage: usize, n: u64) -> u64 {
    (0..n).filter(|&f| sends_after(cfg, stage, f)).count() as u64
}

/// Whether stage `s`, having started forward step `started` (as its heartbeat says), is past
/// its point in move `m`, which [`Moves::absorb`] would then refuse: the moved stage once it
/// began the move's step without pausing, its upstream neighbour once it sent the first
/// transfer meant for the new node, its downstream neighbour once it received past the last
/// one from the old node. (A neighbour at the very step of that transfer may be either side.)
pub(crate) fn passed(cfg: &PipelineConfig, s: usize, m: &Migration, started: u64) -> bool {
    let n = cfg.stages;
    let links = cfg.transport == TransportKind::Tcp && n > 1;
    let mut passed = m.stage == s && started >= m.at_step;
    if links && (m.stage + n - 1) % n == s {
        passed |= outbound_switch(cfg, s, started) > inbound_switch(cfg, m.stage, m.at_step);
    }
    if links && (m.stage + 1) % n == s {
        passed |= inbound_switch(cfg, s, started) > outbound_switch(cfg, m.stage, m.at_step);
    }
    passed
}

/// The part of a stage's arena that a move ships: everything between the weights (regenerated
/// on the target and checked by hash) and the workspace (dead between steps).
pub(crate) fn movable(layout: &StageLayout) -> std::ops::Range<usize> {
    let (w_start, w_len) = layout.section(Section::Weights);
    let (workspace, _) = layout.section(Section::Workspace);
    (w_start + w_len)..workspace
}

/// xxh3-128 of a stage's weights section, as 32 hex digits: source and target must agree
/// before any state moves.
pub(crate) fn weights_hash(stage: &Stage) -> String {
    let (start, len) = stage.layout().section(Section::Weights);
    let bytes = &stage.arena().bytes()[start..start + len];
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

/// What the coordinator tells every node about move `index`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub(crate) enum Verdict {
    /// The target is built and its weights match: the source may pre-copy and quiesce.
    Prepare,
    /// The target restored the state: switch the links to it (`data_addr`: its data port, tcp).
    Commit { data_addr: Option<String> },
    /// The move will not happen (the reason is printed by the coordinator).
    Cancel { reason: String },
}

/// Verdicts per move, shared by a node's control reader (which sets them) and its stage thread
/// (which waits for them at switch points).
#[derive(Debug, Default)]
pub(crate) struct Gate {
    verdicts: Mutex<Vec<Option<Verdict>>>,
    changed: Condvar,
    /// Moves requested while the run goes on (`slug migrate`), not yet seen by the stage thread.
    plans: Mutex<Vec<(usize, Migration)>>,
}

/// Most moves one run may hold (scripted and requested): a bound on what a coordinator can
/// make a node keep.
const MAX_MOVES: usize = 4096;

impl Gate {
    pub(crate) fn new(moves: usize) -> Self {
        Self {
            verdicts: Mutex::new(vec![None; moves]),
            changed: Condvar::new(),
            plans: Mutex::new(Vec::new()),
        }
    }

    /// A move requested while the run goes on; the stage thread takes it up at its next
    /// switch point check.
    pub(crate) fn plan(&self, index: usize, migration: Migration) {
        if index < MAX_MOVES {
            let mut p = self.plans.lock().unwrap_or_else(|e| e.into_inner());
            p.push((index, migration));
        }
    }

    fn take_plans(&self) -> Vec<(usize, Migration)> {
        std::mem::take(&mut *self.plans.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records the coordinator's verdict on move `index` (indexes past [`MAX_MOVES`] are
    /// ignored).
    pub(crate) fn set(&self, index: usize, verdict: Verdict) {
        let mut v = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        if index < MAX_MOVES && v.len() <= index {
            v.resize(index + 1, None);
        }
        if let Some(slot) = v.get_mut(index) {
            // A final verdict is never replaced by an earlier stage of the protocol.
            if !matches!(slot, Some(Verdict::Commit { .. } | Verdict::Cancel { .. })) {
                *slot = Some(verdict);
            }
        }
        self.changed.notify_all();
    }

    pub(crate) fn now(&self, index: usize) -> Option<Verdict> {
        let v = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        v.get(index).cloned().flatten()
    }

    /// Waits until `done` accepts the verdict on move `index`, the run is aborted or
    /// `timeout` passes.
    fn wait(
        &self,
        index: usize,
        what: &str,
        timeout: Duration,
        abort: &AbortFlag,
        done: impl Fn(&Verdict) -> bool,
    ) -> Result<Verdict> {
        let deadline = Instant::now() + timeout;
        let mut v = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(verdict) = v.get(index).cloned().flatten()
                && done(&verdict)
            {
                return Ok(verdict);
            }
            if abort.raised() {
                return Err(TransportError::Aborted {
                    reason: format!("run aborted while waiting for {what} of move {index}"),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Timeout {
                    link: format!("move {index}"),
                    what: "the coordinator's verdict",
                    waited_ms: timeout.as_millis() as u64,
                });
            }
            v = self
                .changed
                .wait_timeout(v, left.min(Duration::from_millis(50)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

fn is_final(v: &Verdict) -> bool {
    matches!(v, Verdict::Commit { .. } | Verdict::Cancel { .. })
}

/// What a node tells its coordinator about a move.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "note", rename_all = "snake_case")]
pub(crate) enum MoveNote {
    /// Source: a pre-copy round of move `index` shipped `chunks` chunks, `bytes` bytes (their
    /// frames went just before); `last`: the final delta, shipped while quiesced.
    Precopied {
        index: usize,
        round: u32,
        chunks: u64,
        bytes: u64,
        last: bool,
    },
    /// Source: quiesced at the move's step; `since_step_ns` after its last step completed.
    Quiesced {
        index: usize,
        cursor: slug_kernels::StageCursor,
        since_step_ns: u64,
    },
    /// Target: the state is in place and the cursor set.
    Restored { index: usize },
    /// Target: its first step after the move completed.
    Resumed { index: usize },
    /// A node with a part in requested move `index`: `ok` if it had not yet passed its point
    /// (it then waits there for the verdict), `false` if the move comes too late for it.
    Planned { index: usize, ok: bool },
}

/// What a node's stage thread hands its control writer during a move, in order.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// An arena chunk for move `index`: [`kind::ARENA`](crate::wire::kind) frame body.
    Chunk(Vec<u8>),
    /// A control message.
    Message(MoveNote),
}

/// Body of an arena-chunk frame: move index, offset in the arena, bytes.
pub(crate) fn chunk_frame(index: usize, offset: usize, bytes: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(12 + bytes.len());
    body.extend_from_slice(&(index as u32).to_le_bytes());
    body.extend_from_slice(&(offset as u64).to_le_bytes());
    body.extend_from_slice(bytes);
    body
}

/// Parses an arena-chunk frame body into (move index, offset, bytes).
pub(crate) fn parse_chunk(body: &[u8]) -> Result<(usize, usize, &[u8])> {
    if body.len() < 12 {
        return Err(TransportError::Config(format!(
            "an arena chunk frame of {} bytes is shorter than its 12-byte header",
            body.len()
        )));
    }
    let index = u32::from_le_bytes(body[..4].try_into().unwrap_or_default()) as usize;
    let offset = u64::from_le_bytes(body[4..12].try_into().unwrap_or_default());
    Ok((index, offset as usize, &body[12..]))
}

/// Writes a received chunk into the target's arena, only inside the movable part.
pub(crate) fn apply_chunk(stage: &mut Stage, offset: usize, bytes: &[u8]) -> Result<()> {
    let range = movable(stage.layout());
    let end = offset.checked_add(bytes.len());
    if offset < range.start || end.is_none_or(|e| e > range.end) {
        return Err(TransportError::Config(format!(
            "an arena chunk of {} bytes at offset {offset} lies outside the stage's state \
             ({}..{}): refused",
            bytes.len(),
            range.start,
            range.end
        )));
    }
    stage.arena_mut().bytes_mut()[offset..offset + bytes.len()].copy_from_slice(bytes);
    Ok(())
}

/// Re-pointing a tcp link at a moved neighbour's new node.
pub(crate) struct Relink {
    /// This node's data listener (the new upstream node connects to it).
    pub listener: Option<TcpListener>,
    /// The run's link secret.
    pub key: ClusterKey,
    pub integrity: LinkIntegrity,
    pub abort: AbortFlag,
    pub inbound: LinkEnds,
    pub outbound: LinkEnds,
}

/// One stage's part in every move of the run, consulted by its loop.
pub(crate) struct Moves {
    cfg: PipelineConfig,
    stage: usize,
    gate: Arc<Gate>,
    relink: Option<Relink>,
    outbox: crossbeam_channel::Sender<Outgoing>,
    abort: AbortFlag,
    timeout: Duration,
    /// (forward step, move index, rounds) of the moves of this stage.
    sources: Vec<(u64, usize, u32)>,
    /// (send sequence number, move index) at which the outbound link switches.
    upstream: Vec<(u64, usize)>,
    /// (receive sequence number, move index) at which the inbound link switches.
    downstream: Vec<(u64, usize)>,
    /// Per move of this stage: the hash of each chunk as last shipped, and the rounds so far.
    shipped: std::collections::HashMap<usize, (Vec<Option<u64>>, u32)>,
    /// The last step boundary, send and receive the loop went through (a move requested
    /// later than its point on this node comes too late).
    last_done: Option<u64>,
    last_send: Option<u64>,
    last_recv: Option<u64>,
    /// The move that brought this stage here, confirmed to the coordinator after the first step.
    arrived: Option<usize>,
    /// The links were set to continue a moved stage's numbering (no snapshot resume).
    pub(crate) links_resumed: bool,
    last_step_done: Instant,
}

impl std::fmt::Debug for Moves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moves")
            .field("sources", &self.sources)
            .field("upstream", &self.upstream)
            .field("downstream", &self.downstream)
            .finish()
    }
}

/// What the loop does after consulting [`Moves`] at a step boundary.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AtBoundary {
    Continue,
    /// The target confirmed move `index`, at the stage's forward step `at_step`: this node
    /// lets go of the stage.
    HandedOff {
        index: usize,
        at_step: u64,
    },
}

impl Moves {
    /// The roles stage `stage`, run from forward step `from_step`, has in `cfg`'s moves (only
    /// those still ahead). `relink` is needed for tcp links; `arrived` is the move that
    /// brought the stage to this node.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: &PipelineConfig,
        stage: usize,
        from_step: u64,
        gate: Arc<Gate>,
        relink: Option<Relink>,
        outbox: crossbeam_channel::Sender<Outgoing>,
        abort: AbortFlag,
        arrived: Option<usize>,
    ) -> Self {
        let mut moves = Self {
            cfg: cfg.clone(),
            stage,
            gate,
            relink,
            outbox,
            abort,
            timeout: cfg.timeout(),
            sources: Vec::new(),
            upstream: Vec::new(),
            downstream: Vec::new(),
            shipped: std::collections::HashMap::new(),
            last_done: from_step.checked_sub(1),
            last_send: None,
            last_recv: None,
            arrived,
            links_resumed: false,
            last_step_done: Instant::now(),
        };
        for (i, m) in cfg.migrations.iter().enumerate() {
            if m.stage != stage || m.at_step > from_step {
                moves.take_part(i, m);
            }
        }
        moves
    }

    /// Adds this stage's roles in move `index`; returns whether it has any.
    fn take_part(&mut self, index: usize, m: &Migration) -> bool {
        let n = self.cfg.stages;
        let switches_links = self.cfg.transport == TransportKind::Tcp && n > 1;
        let mut involved = false;
        if m.stage == self.stage {
            self.sources.push((m.at_step, index, m.rounds));
            involved = true;
        }
        if switches_links && (m.stage + n - 1) % n == self.stage {
            let x = inbound_switch(&self.cfg, m.stage, m.at_step);
            self.upstream.push((x, index));
            involved = true;
        }
        if switches_links && (m.stage + 1) % n == self.stage {
            let x = outbound_switch(&self.cfg, m.stage, m.at_step);
            self.downstream.push((x, index));
            involved = true;
        }
        involved
    }

    /// Takes up the moves requested since the last check: each node with a part in one says
    /// whether it can still keep to it (it has not passed its point), and only then keeps it.
    fn absorb(&mut self) -> Result<()> {
        for (index, m) in self.gate.take_plans() {
            let n = self.cfg.stages;
            let links = self.cfg.transport == TransportKind::Tcp && n > 1;
            let mut involved = false;
            let mut passed = false;
            if m.stage == self.stage {
                involved = true;
                passed |= self.last_done.is_some_and(|d| d >= m.at_step);
            }
            if links && (m.stage + n - 1) % n == self.stage {
                involved = true;
                let x = inbound_switch(&self.cfg, m.stage, m.at_step);
                passed |= self.last_send.is_some_and(|l| l >= x);
            }
            if links && (m.stage + 1) % n == self.stage {
                involved = true;
                let x = outbound_switch(&self.cfg, m.stage, m.at_step);
                passed |= self.last_recv.is_some_and(|l| l >= x);
            }
            if !involved {
                continue;
            }
            if !passed {
                self.take_part(index, &m);
            }
            self.ship(Outgoing::Message(MoveNote::Planned { index, ok: !passed }))?;
        }
        Ok(())
    }

    fn ship(&self, msg: Outgoing) -> Result<()> {
        self.outbox.send(msg).map_err(|_| TransportError::Aborted {
            reason: "the node's control writer stopped during a move".into(),
        })
    }

    /// Before the outbound link sends its next transfer: at a move's switch, waits for the
    /// verdict and, on commit, connects to the moved stage's new node.
    pub(crate) fn before_send(&mut self, out: &mut LinkSender) -> Result<()> {
        self.absorb()?;
        let seq = out.next_seq();
        self.last_send = Some(seq);
        let Some(&(_, index)) = self.upstream.iter().find(|(x, _)| *x == seq) else {
            return Ok(());
        };
        let verdict = self
            .gate
            .wait(index, "the commit", self.timeout, &self.abort, is_final)?;
        if let (Verdict::Commit { data_addr }, Some(r)) = (verdict, &self.relink) {
            let addr = data_addr.ok_or_else(|| {
                TransportError::Config(format!("move {index} committed without a data address"))
            })?;
            out.flush()?;
            let next = TcpSend::connect(&addr, &r.key, r.integrity, &r.outbound, &r.abort)?;
            // The old backend (the link to the node the stage left) closes as it drops.
            drop(out.repoint(Box::new(next)));
        }
        Ok(())
    }

    /// Before the inbound link receives its next transfer: at a move's switch, waits for the
    /// verdict and, on commit, accepts the moved stage's new node on this node's data port.
    pub(crate) fn before_recv(&mut self, inbound: &mut LinkReceiver) -> Result<()> {
        self.absorb()?;
        let seq = inbound.next_seq();
        self.last_recv = Some(seq);
        let Some(&(_, index)) = self.downstream.iter().find(|(x, _)| *x == seq) else {
            return Ok(());
        };
        let verdict = self
            .gate
            .wait(index, "the commit", self.timeout, &self.abort, is_final)?;
        if let (Verdict::Commit { .. }, Some(r)) = (verdict, &self.relink) {
            let listener = r.listener.as_ref().ok_or_else(|| {
                TransportError::Config("no data listener to accept the moved stage on".into())
            })?;
            let next =
                TcpRecv::accept(listener, &r.key, r.integrity, &r.inbound, &r.abort, &|e| {
                    eprintln!("slug node: refused a data-link caller: {e}")
                })?;
            drop(inbound.repoint(Box::new(next)));
        }
        Ok(())
    }

    /// After forward step `done - 1` completed (the stage's cursor is `done`): confirms an
    /// arrival, ships a pre-copy round when one is due, and at a move's step quiesces, ships
    /// the last delta and the cursor, and waits for the verdict.
    pub(crate) fn at_boundary(&mut self, stage: &Stage, done: u64) -> Result<AtBoundary> {
        self.absorb()?;
        self.last_done = Some(done);
        let sources = self.sources.clone();
        for (at, index, rounds) in sources {
            if done < at && done + u64::from(rounds) >= at {
                if self.gate.now(index) == Some(Verdict::Prepare) {
                    self.round(stage, index, false)?;
                }
            } else if done == at {
                // The coordinator gives up on a target within the timeout: wait longer.
                let verdict = self.gate.wait(
                    index,
                    "the target's readiness",
                    self.timeout * 2,
                    &self.abort,
                    |v| !matches!(v, Verdict::Commit { .. }),
                )?;
                if verdict != Verdict::Prepare {
                    continue;
                }
                self.round(stage, index, true)?;
                let since = self.last_step_done.elapsed().as_nanos() as u64;
                self.ship(Outgoing::Message(MoveNote::Quiesced {
                    index,
                    cursor: stage.cursor().clone(),
                    since_step_ns: since,
                }))?;
                let verdict = self.gate.wait(
                    index,
                    "the target's restore",
                    self.timeout,
                    &self.abort,
                    is_final,
                )?;
                if matches!(verdict, Verdict::Commit { .. }) {
                    return Ok(AtBoundary::HandedOff { index, at_step: at });
                }
            }
        }
        Ok(AtBoundary::Continue)
    }

    /// Notes that a forward step just completed (the stall is measured from the source's last
    /// to the target's first, which the coordinator hears of here).
    pub(crate) fn step_done(&mut self) -> Result<()> {
        self.last_step_done = Instant::now();
        match self.arrived.take() {
            Some(index) => self.ship(Outgoing::Message(MoveNote::Resumed { index })),
            None => Ok(()),
        }
    }

    /// Ships the chunks of the stage's state that changed since the last round of move `index`
    /// (all of them in the first round).
    fn round(&mut self, stage: &Stage, index: usize, last: bool) -> Result<()> {
        let range = movable(stage.layout());
        let chunks = range.len().div_ceil(CHUNK);
        let (hashes, round) = self
            .shipped
            .entry(index)
            .or_insert_with(|| (vec![None; chunks], 0));
        *round += 1;
        let round = *round;
        let bytes = stage.arena().bytes();
        let (mut sent_chunks, mut sent_bytes) = (0u64, 0u64);
        let mut frames = Vec::new();
        for (c, hash) in hashes.iter_mut().enumerate() {
            let start = range.start + c * CHUNK;
            let piece = &bytes[start..(start + CHUNK).min(range.end)];
            let h = xxhash_rust::xxh3::xxh3_64(piece);
            if *hash != Some(h) {
                *hash = Some(h);
                frames.push(chunk_frame(index, start, piece));
                sent_chunks += 1;
                sent_bytes += piece.len() as u64;
            }
        }
        for f in frames {
            self.ship(Outgoing::Chunk(f))?;
        }
        self.ship(Outgoing::Message(MoveNote::Precopied {
            index,
            round,
            chunks: sent_chunks,
            bytes: sent_bytes,
            last,
        }))
    }
}

/// What `slug migrate` asks a running coordinator (over its `--control` endpoint).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MoveRequest {
    pub stage: usize,
    pub to: String,
    pub rounds: u32,
}

/// Asks the coordinator whose `--control` endpoint is at `control` to move `stage` to the
/// `slug node` at `to` now (after `rounds` pre-copy rounds), proving `key`; waits for the
/// move to happen or be refused (at most `timeout` for each step of the exchange, and as long
/// as the move takes) and returns what became of it.
pub fn request_migration(
    control: &str,
    key: &ClusterKey,
    stage: usize,
    to: &str,
    rounds: u32,
    timeout: Duration,
) -> Result<MigrationReport> {
    let abort = AbortFlag::new();
    let stream = crate::wire::connect(control, timeout, &abort)?;
    let hello = crate::auth::Hello::new(
        crate::auth::Role::Control,
        crate::auth::COORDINATOR,
        stage as u32,
    )?;
    let mut conn = crate::auth::client_handshake(
        stream,
        format!("coordinator control endpoint {control}"),
        key,
        hello,
        abort,
        timeout,
    )?
    .conn;
    let request = MoveRequest {
        stage,
        to: to.to_string(),
        rounds,
    };
    conn.send_json(&request, timeout)?;
    // The move itself may take a while (pre-copy, the step it waits for): the coordinator
    // answers when it happened or was refused, or closes the connection when the run ends.
    conn.recv_json::<MigrationReport>(Duration::from_secs(24 * 3600))
}

/// One round of a move's pre-copy, as the coordinator saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrecopyRound {
    /// Chunks shipped.
    pub chunks: u64,
    /// Bytes shipped.
    pub bytes: u64,
    /// Whether this was the last delta, shipped while the stage was paused.
    pub last: bool,
}

/// What became of one `--migrate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// The stage.
    pub stage: usize,
    /// Node that ran it before.
    pub from: String,
    /// Node asked to take it over.
    pub to: String,
    /// The stage's forward step at which the target took over.
    pub at_step: u64,
    /// Whether the stage moved (`false`: it kept running on `from`, see `reason`).
    pub moved: bool,
    /// Why it did not move.
    pub reason: Option<String>,
    /// Pre-copy rounds, the last delta last.
    pub rounds: Vec<PrecopyRound>,
    /// Last step completed on the source to first step completed on the target, ms (as the
    /// coordinator saw the two nodes' messages arrive).
    pub stall_ms: Option<f64>,
    /// The run's mean time per forward step without the stalls, ms.
    pub step_ms: Option<f64>,
    /// Part of the stall until the target confirmed the restore (last delta shipped and
    /// applied, cursor set), ms; the rest is the commit, the links' reconnection and the
    /// target's first step.
    #[serde(default)]
    pub restored_ms: Option<f64>,
    /// The move's number in the run: a recording's endpoint for the stage on `to` is
    /// [`continuation_endpoint`] of it.
    #[serde(default)]
    pub index: usize,
    /// The clock offsets of `from` and `to` from the coordinator's clock, measured when each
    /// node connected (set on a move that happened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clocks: Option<[crate::clock::ClockOffset; 2]>,
}

impl MigrationReport {
    /// The stall minus the step time the pipeline would have spent anyway, ms.
    pub fn lost_ms(&self) -> Option<f64> {
        Some((self.stall_ms? - self.step_ms?).max(0.0))
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        if !self.moved {
            return format!(
                "migration of stage {} from {} to {} at step {}: refused, the stage kept running \
                 on {}: {}",
                self.stage,
                self.from,
                self.to,
                self.at_step,
                self.from,
                self.reason.as_deref().unwrap_or("no reason given")
            );
        }
        let rounds: Vec<String> = self
            .rounds
            .iter()
            .map(|r| {
                format!(
                    "{}{:.1} KiB",
                    if r.last { "last delta " } else { "" },
                    r.bytes as f64 / 1024.0
                )
            })
            .collect();
        let mut line = format!(
            "migrated stage {} from {} to {} at step {}: {} round(s): {}",
            self.stage,
            self.from,
            self.to,
            self.at_step,
            self.rounds.len(),
            rounds.join(", ")
        );
        if let (Some(stall), Some(step)) = (self.stall_ms, self.step_ms) {
            line.push_str(&format!(
                "; stall {stall:.2} ms = {:.1} step time(s) of {step:.2} ms, lost {:.2} ms",
                if step > 0.0 { stall / step } else { 0.0 },
                self.lost_ms().unwrap_or(0.0)
            ));
        }
        line
    }
}

/// The endpoint id a stage records as on the node that move `index` of a run of `stages`
/// stages brought it to: ids past the stages' own, one per move, so every node that ran a
/// stage writes a log of its own (the trace's manifest joins them: `continues`).
pub fn continuation_endpoint(stages: usize, index: usize) -> u32 {
    u32::try_from(stages.saturating_add(index)).unwrap_or(u32::MAX)
}

/// The endpoint that ran stage `stage` before move `index` took it away: the stage's own, or
/// the target of the last earlier move of it that `committed` says happened.
pub(crate) fn endpoint_before(
    cfg: &PipelineConfig,
    stage: usize,
    index: usize,
    committed: impl Fn(usize) -> bool,
) -> u32 {
    cfg.migrations
        .iter()
        .enumerate()
        .take(index)
        .filter(|&(i, m)| m.stage == stage && committed(i))
        .last()
        .map_or(stage as u32, |(i, _)| continuation_endpoint(cfg.stages, i))
}

/// Joins the reports of the nodes that ran one stage in turn (earliest first) into one.
pub(crate) fn merge_reports(mut parts: Vec<StageReport>, last: StageReport) -> StageReport {
    parts.push(last);
    let mut merged = parts.remove(0);
    for p in parts {
        merged.steps += p.steps;
        merged.forward_ns += p.forward_ns;
        for (mine, theirs) in [
            (&mut merged.inbound, p.inbound),
            (&mut merged.outbound, p.outbound),
        ] {
            match (mine.as_mut(), theirs) {
                (Some(m), Some(t)) => m.merge(&t),
                (None, t) => *mine = t,
                (_, None) => {}
            }
        }
        merged.digests.extend(p.digests);
        merged.kernel_digests.extend(p.kernel_digests);
        if merged.tokens.len() < p.tokens.len() {
            merged.tokens.resize(p.tokens.len(), Vec::new());
        }
        for (mine, theirs) in merged.tokens.iter_mut().zip(p.tokens) {
            mine.extend(theirs);
        }
        merged.host = p.host;
        merged.pid = p.pid;
        merged.clock = p.clock;
        merged.inbound_clock = p.inbound_clock.or(merged.inbound_clock);
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use slug_kernels::ModelConfig;

    fn cfg(stages: usize, sequences: usize, mb: usize, tokens: usize) -> PipelineConfig {
        let mut c = PipelineConfig::new(
            ModelConfig::preset("tiny").unwrap(),
            "ab",
            sequences,
            tokens,
        );
        c.stages = stages;
        c.microbatches = mb;
        c.transport = TransportKind::Tcp;
        c
    }

    #[test]
    fn specs_parse_and_bad_ones_say_how_to_write_them() {
        let m: Migration = "stage=1,to=10.0.0.5:7070,at-step=20".parse().unwrap();
        assert_eq!(
            m,
            Migration {
                stage: 1,
                to: "10.0.0.5:7070".into(),
                at_step: 20,
                rounds: DEFAULT_ROUNDS
            }
        );
        let m: Migration = "to=h:1,at-step=3,stage=0,rounds=0".parse().unwrap();
        assert_eq!(m.rounds, 0);
        for bad in [
            "stage=1,at-step=2",
            "stage=x,to=h:1,at-step=2",
            "stage=1,to=h:1,at-step=2,wat=1",
            "rounds=99,stage=1,to=h:1,at-step=2",
        ] {
            let e = bad.parse::<Migration>().unwrap_err().to_string();
            assert!(e.contains("stage=S,to=HOST:PORT,at-step=N"), "{bad}: {e}");
        }
    }

    #[test]
    fn local_runs_and_steps_out_of_range_are_refused_with_the_fix() {
        let mut c = cfg(2, 2, 2, 4);
        c.migrations = vec!["stage=1,to=h:1,at-step=3".parse().unwrap()];
        validate(&c).unwrap();
        c.transport = TransportKind::Local;
        assert!(
            validate(&c)
                .unwrap_err()
                .to_string()
                .contains("--transport shm or tcp")
        );
        c.transport = TransportKind::Tcp;
        c.migrations[0].at_step = 8;
        assert!(
            validate(&c)
                .unwrap_err()
                .to_string()
                .contains("from 1 to 7")
        );
        c.migrations = vec![
            "stage=1,to=h:1,at-step=3".parse().unwrap(),
            "stage=0,to=h:1,at-step=5".parse().unwrap(),
        ];
        assert!(
            validate(&c)
                .unwrap_err()
                .to_string()
                .contains("at least 3 steps")
        );
    }

    #[test]
    fn switch_points_split_every_link_at_a_transfer_boundary() {
        // 3 stages, 2 sequences in one group, 4 tokens: 8 forward steps per stage.
        let c = cfg(3, 2, 2, 4);
        for stage in 0..3 {
            for n in 1..8u64 {
                let up = (stage + 2) % 3;
                // What the old node receives is exactly what it consumes before step n.
                let consumed_before: u64 = (0..8)
                    .filter(|&f| sends_after(&c, up, f) && consumed_at(&c, up, f) < n)
                    .count() as u64;
                assert_eq!(inbound_switch(&c, stage, n), consumed_before);
                // The downstream stage's receive count before consuming step n's output.
                let sent_before = (0..n).filter(|&f| sends_after(&c, stage, f)).count() as u64;
                assert_eq!(outbound_switch(&c, stage, n), sent_before);
            }
        }
        // The last stage sends no token after a sequence's last step.
        assert_eq!(outbound_switch(&c, 2, 8), 6);
        // Stage 0 consumes the last stage's token of step f at f + 2 (group of 2).
        assert_eq!(inbound_switch(&c, 0, 4), 2);
    }

    #[test]
    fn forward_of_inverts_the_schedule() {
        let mut c = cfg(2, 5, 2, 3);
        c.microbatches = 2;
        for f in 0..15 {
            let slot = super::super::state::schedule_slot(&c, f).unwrap();
            assert_eq!(forward_of(&c, slot.step, slot.seq), f);
        }
    }

    #[test]
    fn a_heartbeat_past_a_nodes_part_in_a_move_counts_as_passed() {
        // 3 stages; stage 1 moves at forward step 9. Its neighbours' switching transfers are
        // those of step 9 too (hidden states are consumed at the step they are made).
        let c = cfg(3, 4, 2, 40);
        let m: Migration = "stage=1,to=h:1,at-step=9".parse().unwrap();
        // The moved stage passed once it began step 9 without pausing there.
        assert!(!passed(&c, 1, &m, 8));
        assert!(passed(&c, 1, &m, 9));
        // Upstream and downstream: in step 9 they may be either side of the switch; once they
        // began step 10 they are past it.
        for s in [0, 2] {
            assert!(!passed(&c, s, &m, 9), "stage {s}");
            assert!(passed(&c, s, &m, 10), "stage {s}");
        }
        // Not over shm: no links switch, only the moved stage has a point to pass.
        let mut shm = c.clone();
        shm.transport = TransportKind::Shm;
        assert!(!passed(&shm, 0, &m, 100));
        assert!(passed(&shm, 1, &m, 9));
        // Stage 0 downstream of a moving last stage takes its tokens one group later.
        let last: Migration = "stage=2,to=h:1,at-step=9".parse().unwrap();
        let switch = outbound_switch(&c, 2, 9);
        let first_past = (0..200)
            .find(|&p| inbound_switch(&c, 0, p) > switch)
            .unwrap();
        assert!(first_past > 10, "{first_past}");
        assert!(!passed(&c, 0, &last, first_past - 1));
        assert!(passed(&c, 0, &last, first_past));
    }

    #[test]
    fn a_final_verdict_is_never_replaced() {
        let g = Gate::new(1);
        g.set(0, Verdict::Prepare);
        g.set(0, Verdict::Cancel { reason: "x".into() });
        g.set(0, Verdict::Prepare);
        assert_eq!(g.now(0), Some(Verdict::Cancel { reason: "x".into() }));
        let got = g
            .wait(
                0,
                "t",
                Duration::from_millis(10),
                &AbortFlag::new(),
                is_final,
            )
            .unwrap();
        assert!(matches!(got, Verdict::Cancel { .. }));
        let g = Gate::new(1);
        let e = g
            .wait(
                0,
                "t",
                Duration::from_millis(10),
                &AbortFlag::new(),
                is_final,
            )
            .unwrap_err();
        assert!(matches!(e, TransportError::Timeout { .. }));
    }

    #[test]
    fn merged_reports_keep_every_step_token_and_transfer() {
        let a = StageReport {
            steps: 3,
            tokens: vec![vec![1, 2], vec![3]],
            host: "a".into(),
            ..Default::default()
        };
        let b = StageReport {
            steps: 2,
            tokens: vec![vec![4], vec![5, 6]],
            host: "b".into(),
            ..Default::default()
        };
        let m = merge_reports(vec![a], b);
        assert_eq!(m.steps, 5);
        assert_eq!(m.tokens, vec![vec![1, 2, 4], vec![3, 5, 6]]);
        assert_eq!(m.host, "b");
    }
}
