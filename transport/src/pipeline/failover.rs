//! Failover (`--spares HOST:PORT,... --checkpoint-every K`), the node side and what both sides
//! share: each stage ships a checkpoint of its state to the coordinator every K forward steps,
//! each sender keeps the transfers it sent since its downstream neighbour's last kept
//! checkpoint, and when a stage's node dies its neighbours re-feed the stage's new node (a
//! spare, restored by the coordinator from that checkpoint) and skip what it sends again.
//! The coordinator's side is `cluster/recovery.rs`.
//!
//! Why nothing is lost or duplicated: a checkpoint at forward step C is taken at the step
//! boundary after step C - 1's output was sent, so the restored stage continues its outbound
//! link at the sequence number [`outbound_switch`] gives for C and its inbound one at
//! [`inbound_switch`]'s (the same arithmetic a migration uses). The upstream neighbour re-sends
//! every transfer from that inbound number on (its log reaches back that far because it drops
//! entries only below the downstream's latest *kept* checkpoint), and the downstream neighbour
//! drops every transfer below the number it expects next, which the restored stage computes
//! again bit for bit (the kernels are deterministic).

use std::collections::VecDeque;
use std::net::TcpListener;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use slug_kernels::{Stage, StageCursor};

use crate::auth::ClusterKey;
use crate::clock::monotonic_ns;
use crate::error::{Result, TransportError};
use crate::link::tcp::{TcpRecv, TcpSend};
use crate::link::{
    Cutter, Delivery, LinkBackend, LinkEnds, LinkIntegrity, LinkReceiver, LinkSender, LinkStats,
    RecvBackend, Region, RegionMut, SendBackend, StageLinks,
};
use crate::transfer::{ArenaId, Tag, Transfer, TransferHeader, TransportKind};
use crate::wire::{AbortFlag, Conn, kind};

use super::cluster::ToCoordinator;
use super::config::PipelineConfig;
use super::migrate::{CHUNK, chunk_frame, inbound_switch, movable};
use super::observe::DigestObserver;
use super::report::StageReport;
use super::stage::link_ends;

/// Forward steps between checkpoints when `--spares` is given without `--checkpoint-every`.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 16;
/// Largest `--checkpoint-every`: a checkpoint's note carries the digests of its steps, and a
/// sender's log the transfers of about that many steps.
pub const MAX_CHECKPOINT_EVERY: u64 = 1 << 16;
/// The move index arena-chunk frames of a checkpoint carry (moves count up from 0).
pub(crate) const CHECKPOINT_CHUNKS: usize = u32::MAX as usize;

/// Refuses failover settings that cannot work, naming the flag and the fix.
pub(crate) fn validate(cfg: &PipelineConfig) -> Result<()> {
    let bad = |m: String| Err(TransportError::Config(m));
    if let Some(k) = cfg.checkpoint_every
        && !(1..=MAX_CHECKPOINT_EVERY).contains(&k)
    {
        return bad(format!(
            "--checkpoint-every {k}: take a checkpoint every 1 to {MAX_CHECKPOINT_EVERY} steps"
        ));
    }
    if cfg.spares.is_empty() {
        if cfg.checkpoint_every.is_some() {
            return bad(
                "--checkpoint-every sets how often stages are checkpointed for a spare to take \
                 over from, but no --spares were given: add --spares HOST:PORT,... or leave \
                 --checkpoint-every out"
                    .into(),
            );
        }
        return Ok(());
    }
    match cfg.transport {
        TransportKind::Tcp => {}
        TransportKind::Local => {
            return bad(
                "--spares takes over a stage whose node dies, but --transport local runs every \
                 stage as a thread of this one process, which dies whole: use --transport tcp"
                    .into(),
            );
        }
        other => {
            return bad(format!(
                "--spares needs --transport tcp (got {other}): a {other} link cannot be re-fed \
                 to a new node (shm rings live in one shared file that a killed process may \
                 leave half-written), while a tcp link is simply connected again"
            ));
        }
    }
    if cfg.control.is_some() || cfg.live_moves {
        return bad(
            "--spares and --control cannot be combined yet: a stage moved while another one \
             fails over would need both protocols at once; leave one out"
                .into(),
        );
    }
    if cfg.observer_settings.is_some() || cfg.stop_after.is_some() {
        return bad(
            "--spares works for `slug run`: while recording or replaying, the endpoint's log \
             would have to continue on the spare, which slug does not do yet"
                .into(),
        );
    }
    if let Some(s) = cfg.spares.iter().find(|s| s.is_empty()) {
        return bad(format!("--spares {s:?}: give each spare as HOST:PORT"));
    }
    Ok(())
}

/// What a coordinator refuses besides [`validate`] (a spare's own configuration names the move
/// that restores it, so nodes accept a move beside spares).
pub(crate) fn validate_coordinator(cfg: &PipelineConfig) -> Result<()> {
    if !cfg.spares.is_empty() && !cfg.migrations.is_empty() {
        return Err(TransportError::Config(
            "--spares and --migrate cannot be combined yet: a stage moved while another one \
             fails over would need both protocols at once; leave one out"
                .into(),
        ));
    }
    Ok(())
}

/// Forward steps between checkpoints.
pub(crate) fn every(cfg: &PipelineConfig) -> u64 {
    cfg.checkpoint_every
        .unwrap_or(DEFAULT_CHECKPOINT_EVERY)
        .max(1)
}

/// Most transfers a sender keeps: those of the steps since its downstream neighbour's last
/// kept checkpoint (at most K plus the microbatches it may run ahead), with room for the
/// coordinator's confirmation to arrive; a sender that reaches it waits for that confirmation.
pub(crate) fn log_limit(cfg: &PipelineConfig) -> usize {
    let mb = cfg.microbatches.max(1) as u64;
    (3 * every(cfg) + 3 * mb + 8) as usize
}

/// What a node tells its coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "note", rename_all = "snake_case")]
pub(crate) enum NodeNote {
    /// The stage's state at the boundary before forward step `step`: the arena chunks changed
    /// since the previous checkpoint went just before (`chunks` frames, `bytes` bytes); `part`
    /// is what the stage did since the previous checkpoint (steps, tokens, digests).
    Checkpointed {
        step: u64,
        cursor: StageCursor,
        chunks: u64,
        bytes: u64,
        part: Box<StageReport>,
    },
    /// The first forward step on this node completed (a spare's marks the recovery's end).
    Stepped,
}

/// What a coordinator tells every node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "note", rename_all = "snake_case")]
pub(crate) enum CoordinatorNote {
    /// The coordinator holds stage `stage`'s checkpoint at `step`: its upstream neighbour may
    /// drop what it sent that the stage consumed before that step.
    Kept { stage: usize, step: u64 },
    /// Stage `stage` was restored at `step` on a spare listening for data at `data_addr`: its
    /// upstream neighbour re-feeds it from there, its downstream neighbour accepts it.
    Recovered {
        stage: usize,
        step: u64,
        data_addr: Option<String>,
    },
}

/// One transfer a sender keeps for re-feeding.
struct Sent {
    header: TransferHeader,
    payload: Vec<u8>,
}

/// What a node's control reader hears and its stage thread and re-feeder act on.
struct State {
    /// Transfers sent on the outbound link, oldest first.
    log: VecDeque<Sent>,
    /// The downstream neighbour's latest recovery: `Some(None)` while its spare is being
    /// re-fed, then the link to it, re-fed up to (not including) the sequence number given.
    down: Option<Option<(Box<dyn SendBackend>, u64)>>,
    /// The upstream neighbour was restored on a spare that will connect to this node's data
    /// port.
    up: bool,
    /// What cuts the inbound and the outbound link as they are now: a neighbour declared lost
    /// may be a host that vanished without closing anything (powered off, unplugged, stopped),
    /// and this stage may be blocked on its link until the timeout; cut, that wait ends at
    /// once and the stage goes on with the neighbour's spare.
    cut_in: Option<Cutter>,
    cut_out: Option<Cutter>,
}

/// The part of a stage's failover state its control reader shares.
pub(crate) struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    cfg: PipelineConfig,
    stage: usize,
    key: ClusterKey,
    integrity: LinkIntegrity,
    abort: AbortFlag,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn down(&self) -> usize {
        (self.stage + 1) % self.cfg.stages
    }

    fn up(&self) -> usize {
        (self.stage + self.cfg.stages - 1) % self.cfg.stages
    }

    /// Takes in what the coordinator said (called by the node's control reader).
    pub(crate) fn heard(self: &Arc<Self>, note: CoordinatorNote) {
        if self.cfg.stages < 2 {
            return;
        }
        match note {
            CoordinatorNote::Kept { stage, step } if stage == self.down() => {
                let keep_from = inbound_switch(&self.cfg, stage, step);
                let mut st = self.lock();
                while st.log.front().is_some_and(|e| e.header.seq < keep_from) {
                    st.log.pop_front();
                }
                self.changed.notify_all();
            }
            CoordinatorNote::Kept { .. } => {}
            CoordinatorNote::Recovered {
                stage,
                step,
                data_addr,
            } => {
                if stage == self.up() {
                    let mut st = self.lock();
                    // The lost node may still hold its end open: do not wait on it.
                    if let Some(cut) = st.cut_in.take() {
                        cut.cut();
                    }
                    st.up = true;
                    drop(st);
                    self.changed.notify_all();
                }
                if stage == self.down() {
                    let mut st = self.lock();
                    if let Some(cut) = st.cut_out.take() {
                        cut.cut();
                    }
                    st.down = Some(None);
                    drop(st);
                    let me = self.clone();
                    // Re-fed from its own thread: this stage may be waiting on its upstream
                    // neighbour, which waits (around the ring) for the spare this feeds.
                    std::thread::spawn(move || {
                        let fed = me.refeed(stage, step, data_addr.as_deref());
                        // A spare that cannot be fed is given up on; the stage waits for the
                        // coordinator's next one (or its abort).
                        let fed = fed
                            .inspect_err(|e| {
                                eprintln!(
                                    "slug node: stage {}: could not re-feed stage {stage}'s \
                                     spare: {e}",
                                    me.stage
                                )
                            })
                            .ok();
                        me.lock().down = fed.map(Some);
                        me.changed.notify_all();
                    });
                }
            }
        }
    }

    /// Connects to the downstream neighbour's spare and sends it every logged transfer it
    /// consumes at or after `step`; returns the link and the sequence number it was fed up to.
    fn refeed(
        &self,
        stage: usize,
        step: u64,
        addr: Option<&str>,
    ) -> Result<(Box<dyn SendBackend>, u64)> {
        let ends = link_ends(self.cfg.stages, self.stage, self.cfg.timeout());
        let from = inbound_switch(&self.cfg, stage, step);
        // Copied out so the stage thread can go on logging while the spare is fed.
        let (first, pending): (Option<u64>, Vec<(TransferHeader, Vec<u8>)>) = {
            let st = self.lock();
            (
                st.log.front().map(|e| e.header.seq),
                st.log
                    .iter()
                    .filter(|e| e.header.seq >= from)
                    .map(|e| (e.header, e.payload.clone()))
                    .collect(),
            )
        };
        if let Some(first) = first
            && first > from
        {
            return Err(TransportError::Config(format!(
                "stage {stage} was restored at step {step}, which needs transfer {from} of link \
                 {} again, but this node keeps them only from {first} on (it has not run since \
                 that checkpoint, or was itself restored after it)",
                ends.name()
            )));
        }
        let addr = addr.ok_or_else(|| {
            TransportError::Config(format!("stage {stage}'s spare sent no data address"))
        })?;
        let mut backend = TcpSend::connect(addr, &self.key, self.integrity, &ends, &self.abort)?;
        let mut next = from;
        for (mut header, payload) in pending {
            header.post_ns = monotonic_ns();
            backend.send(&ends, &header, &payload)?;
            next = header.seq + 1;
        }
        Ok((Box::new(backend), next))
    }
}

/// A stage's part in failover, consulted by its loop at every step boundary, send and receive.
pub(crate) struct Guard {
    shared: Arc<Shared>,
    writer: Arc<Mutex<Conn>>,
    /// The data listener the upstream neighbour's spare connects to.
    listener: Option<TcpListener>,
    every: u64,
    total: u64,
    /// The step this node started at: its first checkpoint comes after it.
    from: u64,
    stepped: bool,
    /// The hash of each arena chunk as last shipped.
    hashes: Vec<Option<u64>>,
    digests: Option<Arc<DigestObserver>>,
    /// What the previous checkpoint covered: steps, compute time, digests, tokens, link counters.
    marks: Marks,
    limit: usize,
    /// Whether the links' cutters were handed to the control reader.
    cutters: (bool, bool),
}

#[derive(Default)]
struct Marks {
    steps: u64,
    forward_ns: u64,
    digests: usize,
    kernels: usize,
    tokens: Vec<usize>,
    inbound: LinkStats,
    outbound: LinkStats,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.forget_links();
    }
}

impl Guard {
    /// Stage `s`'s guard when the run has spares, starting at forward step `from`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn for_stage(
        cfg: &PipelineConfig,
        s: usize,
        from: u64,
        writer: Arc<Mutex<Conn>>,
        digests: Option<Arc<DigestObserver>>,
        listener: Option<TcpListener>,
        key: &ClusterKey,
        abort: &AbortFlag,
    ) -> Option<Self> {
        if cfg.spares.is_empty() {
            return None;
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                log: VecDeque::new(),
                down: None,
                up: false,
                cut_in: None,
                cut_out: None,
            }),
            changed: Condvar::new(),
            cfg: cfg.clone(),
            stage: s,
            key: key.clone(),
            integrity: cfg.link_integrity,
            abort: abort.clone(),
        });
        Some(Self {
            shared,
            writer,
            listener,
            every: every(cfg),
            total: cfg.forward_steps(),
            from,
            stepped: false,
            hashes: Vec::new(),
            digests,
            marks: Marks::default(),
            limit: log_limit(cfg),
            cutters: (false, false),
        })
    }

    /// Drops the cutters of the stage's links (their duplicate handles would keep the sockets
    /// open after the links close).
    pub(crate) fn forget_links(&mut self) {
        let mut st = self.shared.lock();
        st.cut_in = None;
        st.cut_out = None;
    }

    /// What the node's control reader hands the coordinator's notes to.
    pub(crate) fn ears(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// At the boundary before forward step `done` (steps before it ran, their outputs sent):
    /// says when this node's first step is done, and ships a checkpoint every K steps.
    pub(crate) fn at_boundary(
        &mut self,
        stage: &Stage,
        done: u64,
        tokens: &[Vec<u32>],
        so_far: (u64, u64),
        io: &StageLinks,
    ) -> Result<()> {
        let timeout = self.shared.cfg.timeout();
        if !self.stepped && done > self.from {
            self.stepped = true;
            self.send(&ToCoordinator::Failover(NodeNote::Stepped), timeout)?;
        }
        if done == self.from || done == 0 || done >= self.total || !done.is_multiple_of(self.every)
        {
            return Ok(());
        }
        let range = movable(stage.layout());
        let count = range.len().div_ceil(CHUNK);
        self.hashes.resize(count, None);
        let bytes = stage.arena().bytes();
        let (mut chunks, mut shipped) = (0u64, 0u64);
        {
            let mut w = self.writer.lock().map_err(|_| poisoned())?;
            for (c, hash) in self.hashes.iter_mut().enumerate() {
                let start = range.start + c * CHUNK;
                let piece = &bytes[start..(start + CHUNK).min(range.end)];
                let h = xxhash_rust::xxh3::xxh3_64(piece);
                if *hash != Some(h) {
                    w.send_frame(
                        kind::ARENA,
                        &chunk_frame(CHECKPOINT_CHUNKS, start, piece),
                        timeout,
                    )?;
                    *hash = Some(h);
                    chunks += 1;
                    shipped += piece.len() as u64;
                }
            }
        }
        let part = self.part(stage, tokens, so_far, io);
        let note = NodeNote::Checkpointed {
            step: done,
            cursor: stage.cursor().clone(),
            chunks,
            bytes: shipped,
            part: Box::new(part),
        };
        self.send(&ToCoordinator::Failover(note), timeout)
    }

    /// What the stage did since the previous checkpoint.
    fn part(
        &mut self,
        stage: &Stage,
        tokens: &[Vec<u32>],
        (steps, forward_ns): (u64, u64),
        io: &StageLinks,
    ) -> StageReport {
        let m = &mut self.marks;
        let (digests, kernel_digests) = match &self.digests {
            Some(d) => d.since(m.digests, m.kernels),
            None => (Vec::new(), Vec::new()),
        };
        m.digests += digests.len();
        m.kernels += kernel_digests.len();
        m.tokens.resize(tokens.len(), 0);
        let tokens = tokens
            .iter()
            .zip(&mut m.tokens)
            .map(|(t, mark)| {
                let new = t.get(*mark..).unwrap_or_default().to_vec();
                *mark = t.len();
                new
            })
            .collect();
        let delta = |now: LinkStats, mark: &mut LinkStats| {
            let d = LinkStats {
                transfers: now.transfers.saturating_sub(mark.transfers),
                bytes: now.bytes.saturating_sub(mark.bytes),
                busy_ns: now.busy_ns.saturating_sub(mark.busy_ns),
                direct: now.direct.saturating_sub(mark.direct),
            };
            *mark = now;
            d
        };
        let inbound = io
            .inbound
            .as_ref()
            .map(|l| delta(l.stats(), &mut m.inbound));
        let outbound = io
            .outbound
            .as_ref()
            .map(|l| delta(l.stats(), &mut m.outbound));
        let report = StageReport {
            stage: stage.index(),
            steps: steps - m.steps,
            forward_ns: forward_ns - m.forward_ns,
            inbound,
            outbound,
            digests,
            kernel_digests,
            tokens,
            ..Default::default()
        };
        m.steps = steps;
        m.forward_ns = forward_ns;
        report
    }

    fn send(&self, msg: &ToCoordinator, timeout: Duration) -> Result<()> {
        self.writer
            .lock()
            .map_err(|_| poisoned())?
            .send_json(msg, timeout)
    }

    /// Waits until `ready` accepts the shared state, the run is aborted or the timeout passes
    /// (`what`: what is awaited, as a timeout names it).
    fn wait(&self, what: &'static str, ready: impl Fn(&State) -> bool) -> Result<()> {
        let timeout = self.shared.cfg.timeout();
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if ready(&st) {
                return Ok(());
            }
            if self.shared.abort.raised() {
                return Err(TransportError::Aborted {
                    reason: format!("run aborted while waiting for: {what}"),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Timeout {
                    link: format!("stage {}", self.shared.stage),
                    what,
                    waited_ms: timeout.as_millis() as u64,
                });
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left.min(Duration::from_millis(50)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Before the next send: once the downstream neighbour's spare is fed, the link points at
    /// it (after the transfers sent to the dead node while it was being fed).
    fn before_send(&mut self, out: &mut LinkSender) -> Result<()> {
        let fed = {
            let mut st = self.shared.lock();
            if !self.cutters.1 {
                st.cut_out = out.cutter();
                self.cutters.1 = true;
            }
            match st.down {
                Some(Some(_)) => st.down.take().flatten(),
                _ => None,
            }
        };
        let Some((mut backend, fed_to)) = fed else {
            return Ok(());
        };
        let ends = out.ends();
        let tail: Vec<(TransferHeader, Vec<u8>)> = self
            .shared
            .lock()
            .log
            .iter()
            .filter(|e| e.header.seq >= fed_to && e.header.seq < out.next_seq())
            .map(|e| (e.header, e.payload.clone()))
            .collect();
        for (mut header, payload) in tail {
            header.post_ns = monotonic_ns();
            backend.send(&ends, &header, &payload)?;
        }
        drop(out.repoint(backend));
        self.shared.lock().cut_out = out.cutter();
        Ok(())
    }

    /// Before the next receive: once the upstream neighbour's spare is restored, takes its
    /// link, skipping what it sends again that this stage already has.
    fn before_recv(&mut self, inbound: &mut LinkReceiver) -> Result<()> {
        let up = {
            let mut st = self.shared.lock();
            if !self.cutters.0 {
                st.cut_in = inbound.cutter();
                self.cutters.0 = true;
            }
            std::mem::take(&mut st.up)
        };
        if !up {
            return Ok(());
        }
        let listener = self.listener.as_ref().ok_or_else(|| {
            TransportError::Config("no data listener to accept a spare on".into())
        })?;
        let s = &self.shared;
        let ends = inbound.ends();
        let spare = TcpRecv::accept(listener, &s.key, s.integrity, &ends, &s.abort, &|e| {
            eprintln!("slug node: refused a data-link caller: {e}")
        })?;
        let below = inbound.next_seq();
        drop(inbound.repoint(Box::new(SkipSent {
            inner: Box::new(spare),
            below,
        })));
        self.shared.lock().cut_in = inbound.cutter();
        Ok(())
    }

    /// Keeps a transfer just sent, waiting (bounded) for the downstream neighbour's next
    /// checkpoint when the log is full.
    fn sent(&mut self, t: &Transfer, payload: &[u8]) -> Result<()> {
        let limit = self.limit;
        self.wait(
            "the downstream stage's next checkpoint kept (its upstream's sent log is full)",
            |st| st.log.len() < limit,
        )?;
        let header = TransferHeader {
            seq: t.id.seq,
            sequence: t.tag.sequence,
            step: t.tag.step,
            layer: t.tag.layer,
            src_arena: t.src.arena.0,
            dst_arena: t.dst.arena.0,
            chunk: 0,
            src_off: t.src.offset,
            dst_off: t.dst.offset,
            len: t.len,
            post_ns: t.post_ns,
        };
        self.shared.lock().log.push_back(Sent {
            header,
            payload: payload.to_vec(),
        });
        Ok(())
    }
}

/// Whether `e` is what a link to a node that died gives (a broken or silent socket, or a
/// transfer cut off mid-way), so that a spare may be waited for instead.
fn a_link_failure(e: &TransportError) -> bool {
    matches!(
        e,
        TransportError::LinkBroken { .. }
            | TransportError::Timeout { .. }
            | TransportError::Io { .. }
            | TransportError::Protocol { .. }
    )
}

fn poisoned() -> TransportError {
    TransportError::Aborted {
        reason: "control writer poisoned by a panicked thread".into(),
    }
}

/// Sends one transfer on `out`; with a guard, a send that fails waits for the downstream
/// neighbour's spare and goes to it instead, and every transfer sent is kept for re-feeding.
#[allow(clippy::too_many_arguments)]
pub(crate) fn send(
    out: &mut LinkSender,
    guard: Option<&mut Guard>,
    src: Region<'_>,
    src_offset: u64,
    len: u64,
    dst_arena: ArenaId,
    dst_offset: u64,
    tag: Tag,
) -> Result<Transfer> {
    let Some(g) = guard else {
        return out.send(src, src_offset, len, dst_arena, dst_offset, tag);
    };
    let t = loop {
        g.before_send(out)?;
        match out.send(src, src_offset, len, dst_arena, dst_offset, tag) {
            Ok(t) => break t,
            Err(e) if !a_link_failure(&e) => return Err(e),
            Err(e) => {
                g.wait(
                    "a spare re-fed in place of the failed downstream stage",
                    |st| matches!(st.down, Some(Some(_))),
                )
                .map_err(|_| e)?;
            }
        }
    };
    let r = crate::link::check_range(src.arena, src.bytes.len(), src_offset, len)?;
    g.sent(&t, &src.bytes[r])?;
    Ok(t)
}

/// Receives one transfer on `inbound`; with a guard, a receive that fails waits for the
/// upstream neighbour's spare and takes the transfer from it instead.
pub(crate) fn recv(
    inbound: &mut LinkReceiver,
    guard: Option<&mut Guard>,
    dst: &mut RegionMut<'_>,
) -> Result<Transfer> {
    let Some(g) = guard else {
        return inbound.recv(dst);
    };
    loop {
        g.before_recv(inbound)?;
        match inbound.recv(dst) {
            Ok(t) => return Ok(t),
            Err(e) if !a_link_failure(&e) => return Err(e),
            Err(e) => {
                g.wait("a spare in place of the failed upstream stage", |st| st.up)
                    .map_err(|_| e)?;
            }
        }
    }
}

/// A spare's link as the downstream neighbour receives it: transfers below `below` (which it
/// already received from the dead node, and the spare computed again) are read and dropped.
struct SkipSent {
    inner: Box<dyn RecvBackend>,
    below: u64,
}

impl LinkBackend for SkipSent {
    fn kind(&self) -> TransportKind {
        self.inner.kind()
    }

    fn clock(&self) -> Option<crate::clock::ClockOffset> {
        self.inner.clock()
    }

    fn cutter(&self) -> Option<crate::link::Cutter> {
        self.inner.cutter()
    }
}

impl RecvBackend for SkipSent {
    fn recv(
        &mut self,
        ends: &LinkEnds,
        dst: &mut RegionMut<'_>,
    ) -> Result<(TransferHeader, Delivery)> {
        loop {
            // A dropped transfer lands in an inbox whose input was consumed already: nothing
            // waits in an inbox between receives.
            let (h, delivery) = self.inner.recv(ends, dst)?;
            if h.seq >= self.below {
                return Ok((h, delivery));
            }
        }
    }
}

/// What became of one stage whose node died.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailoverReport {
    /// The stage.
    pub stage: usize,
    /// The node that died.
    pub from: String,
    /// The spare that took the stage over (the last one tried when none could).
    pub to: Option<String>,
    /// Where the stage last said it was on the dead node.
    pub lost_at: String,
    /// Whether a spare took it over (`false`: the run failed, see `reason`).
    pub recovered: bool,
    /// Why no spare could take it over.
    pub reason: Option<String>,
    /// The checkpoint's forward step the spare restored (0: rebuilt from the seed).
    pub restored_step: u64,
    /// Arena bytes of the checkpoint shipped to the spare.
    pub restored_bytes: u64,
    /// The coordinator's last message from the node to noticing its loss, ms: an upper bound
    /// on the detection time (a killed process's connection ends at once; a host that vanishes
    /// is declared gone after 5 s of silence).
    pub detection_ms: f64,
    /// Loss noticed to the spare's first completed step, ms (building the stage there,
    /// shipping the checkpoint, reconnecting both neighbours and re-running the steps since
    /// the checkpoint up to the first).
    pub recovery_ms: Option<f64>,
}

impl FailoverReport {
    /// One line for people.
    pub fn describe(&self) -> String {
        if !self.recovered {
            return format!(
                "stage {} lost its node {} at {}: no spare took it over: {}",
                self.stage,
                self.from,
                self.lost_at,
                self.reason.as_deref().unwrap_or("no reason given")
            );
        }
        let recovery = self
            .recovery_ms
            .map_or_else(|| "not measured".into(), |r| format!("{r:.1} ms"));
        format!(
            "failed over stage {} from {} (lost at {}) to spare {} from its checkpoint at \
             forward step {} ({:.1} KiB): detected within {:.1} ms of its last message, recovered in {recovery}",
            self.stage,
            self.from,
            self.lost_at,
            self.to.as_deref().unwrap_or("?"),
            self.restored_step,
            self.restored_bytes as f64 / 1024.0,
            self.detection_ms
        )
    }
}

/// What failover cost and did in a run with spares.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FailoverSummary {
    /// Forward steps between checkpoints.
    pub checkpoint_every: u64,
    /// Checkpoints the coordinator kept, all stages together.
    pub checkpoints: u64,
    /// Arena bytes shipped for them (only chunks changed since a stage's previous checkpoint).
    pub checkpoint_bytes: u64,
    /// Spares not used.
    pub spares_left: Vec<String>,
    /// Every stage whose node died, in order.
    pub failovers: Vec<FailoverReport>,
}

impl FailoverSummary {
    /// One line for people (each failover follows on its own line).
    pub fn describe(&self) -> String {
        format!(
            "failover: {} checkpoint(s) every {} steps, {:.1} KiB shipped; {} failover(s); \
             spares left: {}",
            self.checkpoints,
            self.checkpoint_every,
            self.checkpoint_bytes as f64 / 1024.0,
            self.failovers.len(),
            if self.spares_left.is_empty() {
                "none".to_string()
            } else {
                self.spares_left.join(",")
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slug_kernels::ModelConfig;

    fn cfg() -> PipelineConfig {
        let mut c = PipelineConfig::new(ModelConfig::preset("tiny").unwrap(), "ab", 2, 4);
        c.stages = 2;
        c.transport = TransportKind::Tcp;
        c.spares = vec!["127.0.0.1:7070".into()];
        c
    }

    #[test]
    fn spares_need_tcp_and_a_sane_interval_and_say_why() {
        let mut c = cfg();
        validate(&c).unwrap();
        for (t, want) in [
            (TransportKind::Local, "one process"),
            (TransportKind::Shm, "half-written"),
        ] {
            c.transport = t;
            let e = validate(&c).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("--transport tcp"), "{e}");
        }
        c.transport = TransportKind::Tcp;
        c.checkpoint_every = Some(0);
        assert!(validate(&c).unwrap_err().to_string().contains("1 to"));
        c.checkpoint_every = Some(4);
        c.spares.clear();
        let e = validate(&c).unwrap_err().to_string();
        assert!(e.contains("no --spares"), "{e}");
        let mut c = cfg();
        c.migrations = vec!["stage=1,to=h:1,at-step=3".parse().unwrap()];
        validate(&c).unwrap();
        assert!(
            validate_coordinator(&c)
                .unwrap_err()
                .to_string()
                .contains("--migrate")
        );
    }

    #[test]
    fn the_log_bound_follows_the_interval() {
        let mut c = cfg();
        c.checkpoint_every = Some(4);
        c.microbatches = 2;
        assert_eq!(log_limit(&c), 3 * 4 + 3 * 2 + 8);
        c.checkpoint_every = None;
        assert_eq!(every(&c), DEFAULT_CHECKPOINT_EVERY);
    }

    /// A receiving backend that hands out transfers numbered from a list.
    struct Numbered(Vec<u64>);

    impl LinkBackend for Numbered {
        fn kind(&self) -> TransportKind {
            TransportKind::Tcp
        }
    }

    impl RecvBackend for Numbered {
        fn recv(
            &mut self,
            _ends: &LinkEnds,
            _dst: &mut RegionMut<'_>,
        ) -> Result<(TransferHeader, Delivery)> {
            let seq = self.0.remove(0);
            Ok((
                TransferHeader {
                    seq,
                    ..TransferHeader::default()
                },
                Delivery::Staged,
            ))
        }
    }

    #[test]
    fn a_spares_link_drops_what_the_receiver_already_has() {
        let mut skip = SkipSent {
            inner: Box::new(Numbered(vec![3, 4, 5, 6])),
            below: 5,
        };
        let ends = link_ends(2, 0, Duration::from_secs(1));
        let mut bytes = [0u8; 4];
        let mut dst = RegionMut {
            arena: ArenaId(0),
            bytes: &mut bytes,
        };
        assert_eq!(skip.recv(&ends, &mut dst).unwrap().0.seq, 5);
        assert_eq!(skip.recv(&ends, &mut dst).unwrap().0.seq, 6);
    }

    #[test]
    fn a_recovered_downstream_is_refed_only_from_its_checkpoint_and_kept_trims_the_log() {
        let c = cfg();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                log: (0..6)
                    .map(|seq| Sent {
                        header: TransferHeader {
                            seq,
                            ..TransferHeader::default()
                        },
                        payload: Vec::new(),
                    })
                    .collect(),
                down: None,
                up: false,
                cut_in: None,
                cut_out: None,
            }),
            changed: Condvar::new(),
            cfg: c.clone(),
            stage: 0,
            key: ClusterKey::from_bytes(b"failover-test-key-0123456789").unwrap(),
            integrity: LinkIntegrity::Mac,
            abort: AbortFlag::new(),
        });
        // Stage 1 consumes stage 0's transfer f at step f: keeping its checkpoint at step 4
        // drops transfers 0..4.
        shared.heard(CoordinatorNote::Kept { stage: 1, step: 4 });
        let kept: Vec<u64> = shared.lock().log.iter().map(|e| e.header.seq).collect();
        assert_eq!(kept, vec![4, 5]);
        // A restore at step 2 would need transfer 2, which is gone: said, not guessed.
        let e = shared.refeed(1, 2, None).err().unwrap().to_string();
        assert!(e.contains("only from 4 on"), "{e}");
        // From step 4 on it has all it needs (and then needs the spare's address).
        let e = shared.refeed(1, 4, None).err().unwrap().to_string();
        assert!(e.contains("no data address"), "{e}");
        // The lost neighbour's links are cut, not waited on until their timeout (it may be a
        // stopped or unplugged host that never closes them): this end reads their end at once.
        let pair = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let ours = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let theirs = l.accept().unwrap().0;
            ours.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            (ours, theirs)
        };
        let ((inbound, _a), (outbound, _b)) = (pair(), pair());
        {
            let mut st = shared.lock();
            st.cut_in = Cutter::of(&inbound);
            st.cut_out = Cutter::of(&outbound);
        }
        shared.heard(CoordinatorNote::Recovered {
            stage: 1,
            step: 4,
            data_addr: None,
        });
        for mut link in [&inbound, &outbound] {
            assert_eq!(std::io::Read::read(&mut link, &mut [0u8; 1]).unwrap(), 0);
        }
    }
}
