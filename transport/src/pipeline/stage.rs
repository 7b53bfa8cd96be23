//! One stage's work loop, identical for every transport: take the step's input (prompt, token
//! or hidden states) into the arena inbox, run the stage's layers, post the outbox onwards.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use slug_kernels::{LayerPlan, Stage, StageLayout, ThreadPool};

use crate::error::{Result, TransportError};
use crate::link::{LinkEnds, LinkReceiver, LinkSender, LinkStats, Region, RegionMut, StageLinks};
use crate::transfer::{ArenaId, EndpointId, LinkId, Tag};

use super::config::PipelineConfig;
use super::failover::{self, Guard};
use super::migrate::{AtBoundary, Moves};
use super::observe::{DigestObserver, Observed, ObserverFactory, StageContext};
use super::report::StageReport;
use super::state::{consumed_at, resume_links};
use super::state::{restore_stage, schedule_slot};

/// Every stage registers its whole [`slug_kernels::StageArena`] as this arena.
pub const STAGE_ARENA: ArenaId = ArenaId(0);

/// Link `link` of a pipeline of `stages` stages: stage `link` to stage `link + 1`, wrapping to 0.
pub(crate) fn link_ends(stages: usize, link: usize, timeout: Duration) -> LinkEnds {
    LinkEnds {
        id: LinkId(link as u32),
        src: EndpointId(link as u32),
        dst: EndpointId(((link + 1) % stages) as u32),
        timeout,
    }
}

/// What a stage's loop produced, before it becomes a [`StageReport`].
#[derive(Debug)]
pub(crate) struct StageOutcome {
    pub steps: u64,
    pub forward_ns: u64,
    pub tokens: Vec<Vec<u32>>,
    pub inbound: Option<LinkStats>,
    pub outbound: Option<LinkStats>,
    pub inbound_clock: Option<crate::clock::ClockOffset>,
    /// The stage stopped early because it moved to another node: the move and its step.
    pub handed_off: Option<(usize, u64)>,
}

impl StageOutcome {
    pub fn into_report(
        self,
        plan: &LayerPlan,
        s: usize,
        host: &str,
        digests: &Option<Arc<DigestObserver>>,
    ) -> StageReport {
        let layers = plan.layers_of(s);
        StageReport {
            stage: s,
            host: host.to_string(),
            pid: std::process::id(),
            layers: (layers.start, layers.end),
            steps: self.steps,
            forward_ns: self.forward_ns,
            inbound: self.inbound,
            outbound: self.outbound,
            clock: None,
            inbound_clock: self.inbound_clock,
            digests: digests.as_ref().map(|d| d.take()).unwrap_or_default(),
            kernel_digests: digests
                .as_ref()
                .map(|d| d.take_kernels())
                .unwrap_or_default(),
            tokens: self.tokens,
        }
    }
}

/// Runs stage `s` to the end of the schedule. Sequences go in groups of `microbatches`; within a
/// group every stage handles (step, sequence) in the same order, so links stay FIFO-consistent.
/// A stage restored mid-run (cursor step K > 0) resumes at the K-th forward step; every stage
/// of the pipeline must be restored at the same K (links continue their recorded numbering).
/// The state observer sees the stage before its first step and after every step; `moves`
/// (process transports) is consulted at every step boundary, send and receive, and so is
/// `failover` (runs with spares: checkpoints, the sent log, re-linking to a neighbour's spare).
/// On failure returns where the stage was ("step 3 (sequence 1)") with the error.
#[allow(clippy::too_many_arguments)]
pub(crate) fn drive_stage(
    cfg: &PipelineConfig,
    plan: &LayerPlan,
    s: usize,
    pool: &ThreadPool,
    mut stage: Stage,
    mut io: StageLinks,
    mut moves: Option<Moves>,
    mut failover: Option<&mut Guard>,
    observed: Observed,
    progress: &dyn Fn(u32, u32),
) -> std::result::Result<StageOutcome, (String, TransportError)> {
    let Observed {
        mut hooks,
        state: mut state_observer,
    } = observed;
    let n_stages = cfg.stages;
    let last = s + 1 == n_stages;
    let sequences = cfg.prompts.len();
    let dim_bytes = cfg.model.dim * 4;
    let mut at = "startup".to_string();
    let fail = |at: &str, e: TransportError| (at.to_string(), e);
    // Where the downstream stage's inboxes are: its layout is a pure function of the config.
    let next_layout = if n_stages > 1 {
        let next = (s + 1) % n_stages;
        Some(
            StageLayout::new(&cfg.model, plan, next, sequences, pool.threads())
                .map_err(|e| fail(&at, e.into()))?,
        )
    } else {
        None
    };
    let next_first_layer = if last {
        plan.layers()
    } else {
        plan.layers_of(s + 1).start
    } as u32;
    let mut tokens = vec![Vec::with_capacity(cfg.tokens); if last { sequences } else { 0 }];
    let mut forward_ns = 0u64;
    let mut steps = 0u64;
    let resume_at = stage.cursor().step;
    let links_resumed = moves.as_ref().is_some_and(|m| m.links_resumed);
    if resume_at > 0 && n_stages > 1 && !links_resumed {
        // Every stage was restored at the same step: continue each link's numbering, and send
        // stage 0 again the tokens the recorded run had sent but it had not consumed yet.
        let (send_seq, recv_seq, pending) = resume_links(cfg, s, resume_at);
        if let Some(inbound) = io.inbound.as_mut() {
            inbound.resume_at(recv_seq);
        }
        if let (Some(out), Some(next)) = (io.outbound.as_mut(), next_layout.as_ref()) {
            out.resume_at(send_seq);
            for f in pending {
                let Some(slot) = schedule_slot(cfg, f) else {
                    continue;
                };
                if cfg.stop_after.is_some_and(|l| consumed_at(cfg, s, f) > l) {
                    continue;
                }
                let seq = slot.seq as usize;
                at = format!("resending the token of step {} (sequence {seq})", slot.step);
                let tag = Tag {
                    sequence: slot.seq,
                    step: slot.step,
                    layer: next_first_layer,
                };
                let region = Region {
                    arena: STAGE_ARENA,
                    bytes: stage.arena().bytes(),
                };
                out.send(
                    region,
                    stage.layout().outboxes[seq].offset as u64,
                    4,
                    STAGE_ARENA,
                    next.inboxes[seq].offset as u64,
                    tag,
                )
                .map_err(|e| fail(&at, e))?;
            }
        }
    }
    if let Some(o) = state_observer.as_mut() {
        o.at_step_boundary(&stage).map_err(|e| fail(&at, e))?;
    }
    let mut forward = 0u64;
    let mut handed_off = None;
    let seq_ids: Vec<usize> = (0..sequences).collect();
    'schedule: for group in seq_ids.chunks(cfg.microbatches) {
        for step in 0..cfg.tokens {
            for &seq in group {
                forward += 1;
                if forward <= resume_at {
                    continue;
                }
                // `forward - 1` is this step's index: every stage stops after the same one.
                if cfg.stop_after.is_some_and(|last| forward - 1 > last) {
                    break 'schedule;
                }
                at = format!("step {step} (sequence {seq})");
                if let Some(m) = moves.as_mut()
                    && let AtBoundary::HandedOff { index, at_step } = m
                        .at_boundary(&stage, forward - 1)
                        .map_err(|e| fail(&at, e))?
                {
                    handed_off = Some((index, at_step));
                    break 'schedule;
                }
                if let Some(f) = failover.as_deref_mut() {
                    f.at_boundary(&stage, forward - 1, &tokens, (steps, forward_ns), &io)
                        .map_err(|e| fail(&at, e))?;
                }
                progress(step as u32, seq as u32);
                let n = take_input(
                    cfg,
                    &mut stage,
                    &mut io,
                    (&mut moves, failover.as_deref_mut()),
                    s,
                    seq,
                    step,
                    dim_bytes,
                )
                .map_err(|e| fail(&at, e))?;
                let t0 = Instant::now();
                stage
                    .forward(pool, &mut *hooks, seq, n)
                    .map_err(|e| fail(&at, e.into()))?;
                forward_ns += t0.elapsed().as_nanos() as u64;
                steps += 1;
                if let Some(m) = moves.as_mut() {
                    m.step_done().map_err(|e| fail(&at, e))?;
                }
                if let Some(o) = state_observer.as_mut() {
                    o.at_step_boundary(&stage).map_err(|e| fail(&at, e))?;
                }
                if last {
                    let token = stage.outbox_token(seq).map_err(|e| fail(&at, e.into()))?;
                    tokens[seq].push(token);
                }
                // The last generated token is never fed back, nor one whose consumer (the same
                // sequence's next step, a group later) is past `stop_after`.
                let feeds_back = step + 1 < cfg.tokens
                    && cfg
                        .stop_after
                        .is_none_or(|l| forward - 1 + group.len() as u64 <= l);
                if let (Some(out), Some(next)) = (io.outbound.as_mut(), next_layout.as_ref())
                    && (!last || feeds_back)
                {
                    let src = stage.layout().outboxes[seq];
                    let dst = next.inboxes[seq];
                    let len = if last { 4 } else { (n * dim_bytes) as u64 };
                    let tag = Tag {
                        sequence: seq as u32,
                        step: step as u32,
                        layer: next_first_layer,
                    };
                    if let Some(m) = moves.as_mut() {
                        m.before_send(out).map_err(|e| fail(&at, e))?;
                    }
                    let region = Region {
                        arena: STAGE_ARENA,
                        bytes: stage.arena().bytes(),
                    };
                    failover::send(
                        out,
                        failover.as_deref_mut(),
                        region,
                        src.offset as u64,
                        len,
                        STAGE_ARENA,
                        dst.offset as u64,
                        tag,
                    )
                    .map_err(|e| fail(&at, e))?;
                }
                if let Some(p) = cfg.progress.as_ref().and_then(|p| p.stage(s)) {
                    p.steps.store(forward, Ordering::Relaxed);
                    let sent = io.outbound.as_ref().map_or(0, |o| o.stats().bytes);
                    p.bytes.store(sent, Ordering::Relaxed);
                }
            }
        }
    }
    if let Some(f) = failover {
        // The links close as `io` drops: nothing may hold their sockets open after that.
        f.forget_links();
    }
    Ok(StageOutcome {
        steps,
        forward_ns,
        tokens,
        inbound: io.inbound.as_ref().map(LinkReceiver::stats),
        outbound: io.outbound.as_ref().map(LinkSender::stats),
        inbound_clock: io.inbound.as_ref().and_then(LinkReceiver::clock),
        handed_off,
    })
}

/// Puts the input of (`seq`, `step`) into the stage's inbox; returns how many tokens it covers.
#[allow(clippy::too_many_arguments)]
fn take_input(
    cfg: &PipelineConfig,
    stage: &mut Stage,
    io: &mut StageLinks,
    (moves, failover): (&mut Option<Moves>, Option<&mut Guard>),
    s: usize,
    seq: usize,
    step: usize,
    dim_bytes: usize,
) -> Result<usize> {
    if s == 0 && step == 0 {
        let prompt = &cfg.prompts[seq];
        stage.inbox_tokens_mut(seq)?[..prompt.len()].copy_from_slice(prompt);
        return Ok(prompt.len());
    }
    let Some(inbound) = io.inbound.as_mut() else {
        // One stage: the token it chose last step is this step's input.
        let token = stage.outbox_token(seq)?;
        stage.inbox_tokens_mut(seq)?[0] = token;
        return Ok(1);
    };
    if let Some(m) = moves.as_mut() {
        m.before_recv(inbound)?;
    }
    let mut region = RegionMut {
        arena: STAGE_ARENA,
        bytes: stage.arena_mut().bytes_mut(),
    };
    let t = failover::recv(inbound, failover, &mut region)?;
    // Stage 0 receives the token produced in the previous step; others this step's hidden states.
    let want_step = if s == 0 { step - 1 } else { step };
    let inbox = stage.layout().inboxes[seq];
    if t.tag.sequence as usize != seq
        || t.tag.step as usize != want_step
        || t.dst.offset != inbox.offset as u64
    {
        return Err(TransportError::Protocol {
            peer: format!("stage {}", t.src.endpoint.0),
            detail: format!(
                "expected sequence {seq} step {want_step} at inbox offset {}, got sequence {} step {} at offset {}; \
                 the stages disagree on the schedule (different configs?)",
                inbox.offset, t.tag.sequence, t.tag.step, t.dst.offset
            ),
        });
    }
    if t.len > inbox.bytes() as u64 {
        return Err(TransportError::Protocol {
            peer: format!("stage {}", t.src.endpoint.0),
            detail: format!(
                "{} bytes overflow the {}-byte inbox of sequence {seq}",
                t.len,
                inbox.bytes()
            ),
        });
    }
    if s == 0 {
        Ok(1)
    } else if (t.len as usize).is_multiple_of(dim_bytes) && t.len > 0 {
        Ok(t.len as usize / dim_bytes)
    } else {
        Err(TransportError::Protocol {
            peer: format!("stage {}", t.src.endpoint.0),
            detail: format!(
                "hidden states of {} bytes are not a whole number of {dim_bytes}-byte rows",
                t.len
            ),
        })
    }
}

/// Builds stage `ctx.stage` and, when the factory has a state for it, restores that state.
pub(crate) fn build_stage(
    cfg: &PipelineConfig,
    plan: &LayerPlan,
    pool: &slug_kernels::ThreadPool,
    factory: &dyn ObserverFactory,
    ctx: &StageContext<'_>,
) -> Result<slug_kernels::Stage> {
    let sequences = cfg.prompts.len();
    let mut stage = match &cfg.isa {
        None => slug_kernels::Stage::new(&cfg.model, plan, ctx.stage, sequences, pool)?,
        Some(name) => {
            let isa = slug_kernels::Isa::from_name(name).ok_or_else(|| {
                TransportError::Config(format!(
                    "isa {name}: unknown instruction set; use scalar, avx2, avx512 or neon"
                ))
            })?;
            let arith = slug_kernels::Arith::new(isa, cfg.model.fma)?;
            slug_kernels::Stage::with_arith(&cfg.model, plan, ctx.stage, sequences, pool, arith)?
        }
    };
    if let Some(state) = factory.initial_state(ctx)? {
        restore_stage(&mut stage, &state)?;
    }
    Ok(stage)
}
