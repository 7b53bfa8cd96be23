//! The coordinator's side of failover (`--spares`): it keeps every stage's latest checkpoint
//! (arena chunks, cursor, and what the stage did before it), tells each stage's upstream
//! neighbour when one is kept, and when a stage's node is lost restores the stage on the next
//! spare from that checkpoint, tells the neighbours to re-link, and starts it.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use slug_kernels::{StageCursor, StageLayout};

use crate::auth::{COORDINATOR, ClusterKey, Hello, Role, client_handshake};
use crate::error::{Result, TransportError};
use crate::wire::{AbortFlag, PEER_TEXT, connect, kind, printable, shown};

use super::super::config::PipelineConfig;
use super::super::failover::{
    CHECKPOINT_CHUNKS, CoordinatorNote, FailoverReport, FailoverSummary, NodeNote, every,
};
use super::super::migrate::{CHUNK, Migration, MoveNote, chunk_frame, movable, parse_chunk};
use super::super::report::StageReport;
use super::{Cause, Events, Session, ToCoordinator, ToNode, Watched};

/// What the coordinator keeps for failover.
pub(super) struct Keeper {
    every: u64,
    spares: VecDeque<String>,
    stages: Vec<Kept>,
    reports: Vec<FailoverReport>,
    /// Per connection: when its node was last heard.
    last_heard: Vec<Instant>,
    /// Spares restored and not yet past their first step: (connection, report, loss noticed).
    resuming: Vec<(usize, usize, Instant)>,
    checkpoints: u64,
    checkpoint_bytes: u64,
    /// Stages whose node has done its first step: once all have, every link is up and a lost
    /// stage can be restored (said once on stderr).
    stepped: Vec<bool>,
    /// Whether every stage has had a checkpoint kept (said once on stderr).
    checkpointed: bool,
    /// Where a spare's reader sends what it hears, what stops it, and the cluster key spares
    /// hold (set while watching).
    events: Option<(Events, AbortFlag, ClusterKey)>,
}

/// One stage's latest kept checkpoint, and the one arriving.
struct Kept {
    /// The stage's decoder layers, `[start, end)` (the report of its part says them).
    layers: (usize, usize),
    /// The arena bytes a checkpoint may hold (between the weights and the workspace).
    range: Range<usize>,
    /// Chunks by arena offset, as of `step`.
    image: BTreeMap<usize, Vec<u8>>,
    step: u64,
    cursor: Option<StageCursor>,
    /// Chunks of the checkpoint arriving, and their bytes.
    delta: Vec<(usize, Vec<u8>)>,
    delta_bytes: usize,
    /// What the stage did before `step` (steps, tokens, digests), on whichever nodes ran it.
    part: Option<StageReport>,
    /// Why this stage's checkpoints can no longer be trusted.
    broken: Option<String>,
}

impl Keeper {
    /// The keeper of a run with spares (`None` without).
    pub(super) fn for_config(cfg: &PipelineConfig) -> Result<Option<Self>> {
        if cfg.spares.is_empty() {
            return Ok(None);
        }
        let plan = cfg.plan()?;
        let stages = (0..cfg.stages)
            .map(|s| {
                let layout =
                    StageLayout::new(&cfg.model, &plan, s, cfg.prompts.len(), cfg.threads)?;
                let layers = plan.layers_of(s);
                Ok(Kept {
                    layers: (layers.start, layers.end),
                    range: movable(&layout),
                    image: BTreeMap::new(),
                    step: 0,
                    cursor: None,
                    delta: Vec::new(),
                    delta_bytes: 0,
                    part: None,
                    broken: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Self {
            every: every(cfg),
            spares: cfg.spares.iter().cloned().collect(),
            stages,
            reports: Vec::new(),
            last_heard: vec![Instant::now(); cfg.stages],
            resuming: Vec::new(),
            checkpoints: 0,
            checkpoint_bytes: 0,
            stepped: vec![false; cfg.stages],
            checkpointed: false,
            events: None,
        }))
    }

    /// What failover did in this run.
    pub(super) fn summary(&self) -> FailoverSummary {
        FailoverSummary {
            checkpoint_every: self.every,
            checkpoints: self.checkpoints,
            checkpoint_bytes: self.checkpoint_bytes,
            spares_left: self.spares.iter().cloned().collect(),
            failovers: self.reports.clone(),
        }
    }

    /// Takes in one arena chunk of stage `s`'s arriving checkpoint (refusing chunks outside
    /// the stage's state, and more bytes than it has).
    fn chunk(&mut self, s: usize, offset: usize, bytes: &[u8]) {
        let Some(k) = self.stages.get_mut(s) else {
            return;
        };
        let aligned = offset
            .checked_sub(k.range.start)
            .is_some_and(|d| d.is_multiple_of(CHUNK));
        let fits = offset
            .checked_add(bytes.len())
            .is_some_and(|end| end <= k.range.end);
        if !aligned || !fits || bytes.len() > CHUNK || k.delta_bytes + bytes.len() > k.range.len() {
            k.broken.get_or_insert_with(|| {
                format!(
                    "its node sent a checkpoint chunk of {} bytes at offset {offset}, outside \
                     the stage's state ({}..{})",
                    bytes.len(),
                    k.range.start,
                    k.range.end
                )
            });
            return;
        }
        k.delta_bytes += bytes.len();
        k.delta.push((offset, bytes.to_vec()));
    }

    /// Stage `s`'s checkpoint at `step` is whole: it replaces the kept one, unless the stage's
    /// checkpoints cannot be trusted (then it is dropped and the stage cannot fail over).
    fn commit(
        &mut self,
        s: usize,
        step: u64,
        cursor: StageCursor,
        chunks: u64,
        mut part: StageReport,
    ) {
        let every = self.every;
        let Some(k) = self.stages.get_mut(s) else {
            return;
        };
        let delta = std::mem::take(&mut k.delta);
        let bytes = std::mem::take(&mut k.delta_bytes);
        if k.broken.is_some() {
            return;
        }
        if delta.len() as u64 != chunks
            || cursor.step != step
            || step <= k.step
            || !step.is_multiple_of(every)
        {
            k.broken = Some(format!(
                "its checkpoint at step {step} came with {} chunks where it announced {chunks} \
                 (or out of order after step {}); the kept state would not be the stage's",
                delta.len(),
                k.step
            ));
            return;
        }
        for (offset, chunk) in delta {
            k.image.insert(offset, chunk);
        }
        k.step = step;
        k.cursor = Some(cursor);
        part.stage = s;
        part.layers = k.layers;
        k.part = Some(match k.part.take() {
            None => part,
            Some(before) => super::super::migrate::merge_reports(vec![before], part),
        });
        self.checkpoints += 1;
        self.checkpoint_bytes += bytes as u64;
    }
}

/// How long a spare may take to build the stage and answer.
const SPARE_TIMEOUT: Duration = Duration::from_secs(30);

impl Session {
    /// Where the readers of spares joining while the run is watched send what they hear.
    pub(super) fn watch_failover(&mut self, tx: &Events, stop: &AbortFlag, key: &ClusterKey) {
        if let Some(k) = self.keeper.as_mut() {
            k.events = Some((tx.clone(), stop.clone(), key.clone()));
        }
    }

    /// What failover did, for the run's report.
    pub(super) fn failover_summary(&self) -> Option<FailoverSummary> {
        self.keeper.as_ref().map(Keeper::summary)
    }

    /// Notes that connection `c` was heard from.
    pub(super) fn heard_from(&mut self, c: usize) {
        if let Some(k) = self.keeper.as_mut() {
            if k.last_heard.len() <= c {
                k.last_heard.resize(c + 1, Instant::now());
            }
            k.last_heard[c] = Instant::now();
        }
    }

    /// Takes an arena chunk of a checkpoint from connection `c`; `false` if it is not one.
    pub(super) fn keep_chunk(&mut self, c: usize, body: &[u8]) -> bool {
        let Ok((index, offset, bytes)) = parse_chunk(body) else {
            return false;
        };
        if index != CHECKPOINT_CHUNKS {
            return false;
        }
        let s = self.stage_of[c];
        if self.host[s] == c
            && let Some(k) = self.keeper.as_mut()
        {
            k.chunk(s, offset, bytes);
        }
        true
    }

    /// A failover note from connection `c`.
    pub(super) fn on_failover(&mut self, c: usize, note: NodeNote) {
        let s = self.stage_of[c];
        let Some(k) = self.keeper.as_mut() else {
            return;
        };
        match note {
            NodeNote::Checkpointed {
                step,
                cursor,
                chunks,
                part,
                ..
            } => {
                if self.host[s] == c {
                    k.commit(s, step, cursor, chunks, *part);
                    if !k.checkpointed && k.stages.iter().all(|k| k.step > 0) {
                        k.checkpointed = true;
                        eprintln!(
                            "slug: every stage has a checkpoint (they come every {} steps)",
                            k.every
                        );
                    }
                    // Said even when it was not kept (the stage then cannot fail over, and says
                    // why if it must): the upstream's sent log must not fill up waiting for it.
                    let kept = ToNode::Failover(CoordinatorNote::Kept { stage: s, step });
                    self.broadcast(&kept);
                }
            }
            NodeNote::Stepped => {
                let all = k.stepped.iter().all(|&b| b);
                if let Some(b) = k.stepped.get_mut(s) {
                    *b = true;
                }
                if !all && k.stepped.iter().all(|&b| b) {
                    eprintln!(
                        "slug: failover armed: every stage runs, a lost one restarts on a spare \
                         from its latest checkpoint (every {} steps; step 0 before the first); \
                         spares: {}",
                        k.every,
                        k.spares.iter().cloned().collect::<Vec<_>>().join(",")
                    );
                }
                if let Some(i) = k.resuming.iter().position(|r| r.0 == c) {
                    let (_, report, noticed) = k.resuming.remove(i);
                    let ms = noticed.elapsed().as_secs_f64() * 1e3;
                    k.reports[report].recovery_ms = Some(ms);
                    eprintln!(
                        "slug: stage {s} runs again, on spare {}: recovered {ms:.1} ms after its \
                         node was lost",
                        self.addr[c]
                    );
                }
            }
        }
    }

    /// Whether a lost stage `s` is failover's to handle: the run has spares and the stage has
    /// not finished.
    pub(super) fn fails_over(&self, s: usize, watched: &Watched) -> bool {
        self.keeper.is_some() && watched.reports[s].is_none()
    }

    /// Stage `s`'s node (connection `c`) is lost (`e`): restores the stage on the next spare
    /// that takes it; when none does, the run fails with the loss and why.
    pub(super) fn fail_over(
        &mut self,
        c: usize,
        s: usize,
        e: &TransportError,
        watched: &mut Watched,
    ) {
        let noticed = Instant::now();
        let last = self
            .keeper
            .as_ref()
            .and_then(|k| k.last_heard.get(c).copied())
            .unwrap_or(noticed);
        let lost = match e {
            TransportError::Timeout { .. } => format!(
                "node stopped responding (no heartbeat for {} ms)",
                super::SILENCE_LIMIT.as_millis()
            ),
            other => {
                format!("lost the node's control connection ({other}); did the stage process die?")
            }
        };
        // Whatever is left of it must not run the stage beside its spare, and the chunks of a
        // checkpoint it did not finish are not the spare's.
        self.ended[c] = true;
        if let Some(kept) = self.keeper.as_mut().and_then(|k| k.stages.get_mut(s)) {
            kept.delta.clear();
            kept.delta_bytes = 0;
        }
        let _ = self.conns[c].send_json(
            &ToNode::Abort {
                reason: "declared lost; a spare takes the stage over".into(),
            },
            Duration::from_millis(200),
        );
        self.conns[c].shutdown();
        let mut report = FailoverReport {
            stage: s,
            from: self.addr[c].clone(),
            to: None,
            lost_at: watched.at[s].clone(),
            recovered: false,
            reason: None,
            restored_step: 0,
            restored_bytes: 0,
            detection_ms: noticed.saturating_duration_since(last).as_secs_f64() * 1e3,
            recovery_ms: None,
        };
        let detected_ms = report.detection_ms;
        let mut why = Vec::new();
        while let Some(spare) = self.keeper.as_mut().and_then(|k| k.spares.pop_front()) {
            report.to = Some(spare.clone());
            match self.restore_on(&spare, s, c) {
                Ok((joined, step, bytes)) => {
                    report.recovered = true;
                    report.restored_step = step;
                    report.restored_bytes = bytes;
                    if let Some(k) = self.keeper.as_mut() {
                        k.reports.push(report);
                        let index = k.reports.len() - 1;
                        k.resuming.push((joined, index, noticed));
                        watched.parts[s] = k.stages[s].part.clone().into_iter().collect();
                    }
                    eprintln!(
                        "slug: stage {s}'s node {} was lost at {} ({lost}; noticed {:.1} ms \
                         after its last message); restoring it on spare {spare} from its \
                         checkpoint at forward step {step}",
                        self.addr[c], watched.at[s], detected_ms
                    );
                    watched.at[s] = format!("restored at step {step} on {spare}");
                    return;
                }
                Err(reason) => why.push(format!("spare {spare}: {reason}")),
            }
        }
        let reason = if why.is_empty() {
            "no spare is left (every --spares node has taken a stage over or refused)".to_string()
        } else {
            format!("no spare could take it over: {}", why.join("; "))
        };
        report.reason = Some(reason.clone());
        if let Some(k) = self.keeper.as_mut() {
            k.reports.push(report);
        }
        watched.failures.push((
            Cause::Lost,
            s,
            watched.at[s].clone(),
            format!("{lost}; {reason}"),
        ));
    }

    /// Restores stage `s` (whose lost node was connection `dead`) on `spare` from its kept
    /// checkpoint, re-links its neighbours and starts it; returns the spare's connection, the
    /// checkpoint's step and the bytes shipped.
    fn restore_on(
        &mut self,
        spare: &str,
        s: usize,
        dead: usize,
    ) -> std::result::Result<(usize, u64, u64), String> {
        let cfg = self
            .live_cfg
            .clone()
            .ok_or("the run has no configuration to restore from")?;
        let Some(k) = self.keeper.as_ref() else {
            return Err("the run keeps no checkpoints".into());
        };
        let kept = &k.stages[s];
        if let Some(broken) = &kept.broken {
            return Err(format!("stage {s}'s checkpoints are unusable: {broken}"));
        }
        let step = kept.step;
        let key = k
            .events
            .as_ref()
            .map(|e| e.2.clone())
            .ok_or("the run is not being watched")?;
        let mut spare_cfg = cfg.clone();
        let incoming = (step > 0).then(|| {
            spare_cfg.migrations = vec![Migration {
                stage: s,
                to: spare.to_string(),
                at_step: step,
                rounds: 0,
            }];
            0
        });
        let timeout = cfg.timeout().min(SPARE_TIMEOUT);
        let abort = AbortFlag::new();
        let hs = connect(spare, timeout, &abort)
            .and_then(|stream| {
                let hello = Hello::new(Role::Control, COORDINATOR, s as u32)?;
                client_handshake(
                    stream,
                    format!("spare {spare}"),
                    &key,
                    hello,
                    abort.clone(),
                    timeout,
                )
            })
            .map_err(|e| format!("could not open a session: {e}"))?;
        let mut conn = hs.conn;
        let assign = ToNode::Assign {
            stage: s,
            config: Box::new(spare_cfg),
            fabric: None,
            link_secret: self.link_secret.clone(),
            incoming,
        };
        conn.send_json(&assign, timeout)
            .map_err(|e| format!("it did not take the assignment: {e}"))?;
        let (data_addr, weights) = match conn.recv_json::<ToCoordinator>(timeout) {
            Ok(ToCoordinator::Ready {
                data_addr, weights, ..
            }) => (data_addr, weights),
            Ok(ToCoordinator::Failed { error, .. }) => {
                return Err(format!(
                    "it refused the stage: {}",
                    printable(&error, PEER_TEXT)
                ));
            }
            Ok(other) => return Err(format!("it sent {}", shown(&other))),
            Err(e) => return Err(format!("it did not get ready: {e}")),
        };
        let dismiss = |conn: &mut crate::wire::Conn, reason: &str| {
            let _ = conn.send_json(
                &ToNode::Dismiss {
                    reason: reason.to_string(),
                },
                super::BRIEF,
            );
        };
        if weights.is_none() || weights != self.weights[dead] {
            let reason = format!(
                "it built weights with hash {} but the lost node had {}: a different slug \
                 version or model there",
                weights.as_deref().unwrap_or("(none)"),
                self.weights[dead].as_deref().unwrap_or("(none)")
            );
            dismiss(&mut conn, &reason);
            return Err(reason);
        }
        let mut shipped = 0u64;
        if let (Some(index), Some(cursor)) = (incoming, kept.cursor.clone()) {
            for (&offset, bytes) in &kept.image {
                conn.send_frame(kind::ARENA, &chunk_frame(index, offset, bytes), timeout)
                    .map_err(|e| format!("lost it while shipping the checkpoint: {e}"))?;
                shipped += bytes.len() as u64;
            }
            conn.send_json(&ToNode::Restore { index, cursor }, timeout)
                .map_err(|e| format!("lost it while shipping the checkpoint: {e}"))?;
            loop {
                match conn.recv_json::<ToCoordinator>(timeout) {
                    Ok(ToCoordinator::Progress { .. }) => {}
                    Ok(ToCoordinator::Move(MoveNote::Restored { .. })) => break,
                    Ok(ToCoordinator::Failed { error, .. }) => {
                        return Err(format!(
                            "it could not restore the checkpoint: {}",
                            printable(&error, PEER_TEXT)
                        ));
                    }
                    Ok(other) => return Err(format!("it sent {}", shown(&other))),
                    Err(e) => return Err(format!("lost it during the restore: {e}")),
                }
            }
        }
        // Both neighbours hear of the spare before it connects to them.
        let recovered = ToNode::Failover(CoordinatorNote::Recovered {
            stage: s,
            step,
            data_addr: data_addr.clone(),
        });
        self.broadcast(&recovered);
        let n = self.host.len();
        let next = self.data[self.host[(s + 1) % n]].clone();
        conn.send_json(&ToNode::Start { next }, timeout)
            .map_err(|e| format!("lost it as it started: {e}"))?;
        self.conns.push(conn);
        self.addr.push(spare.to_string());
        self.clocks.push(hs.clock);
        self.data.push(data_addr);
        self.weights.push(weights);
        self.stage_of.push(s);
        self.ended.push(false);
        let joined = self.conns.len() - 1;
        self.host[s] = joined;
        self.heard_from(joined);
        let events = self.keeper.as_ref().and_then(|k| k.events.clone());
        if let Some((tx, stop, _)) = events
            && let Err(e) = self.listen(joined, &tx, &stop)
        {
            return Err(format!("cannot listen to it: {e}"));
        }
        Ok((joined, step, shipped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::TransportKind;
    use slug_kernels::ModelConfig;

    fn keeper() -> Keeper {
        let mut cfg = PipelineConfig::new(ModelConfig::preset("tiny").unwrap(), "ab", 2, 4);
        cfg.stages = 2;
        cfg.transport = TransportKind::Tcp;
        cfg.spares = vec!["127.0.0.1:7070".into()];
        cfg.checkpoint_every = Some(2);
        Keeper::for_config(&cfg).unwrap().unwrap()
    }

    fn cursor(step: u64) -> StageCursor {
        StageCursor {
            step,
            positions: vec![0, 0],
        }
    }

    #[test]
    fn a_whole_checkpoint_replaces_the_kept_one_and_its_part_accumulates() {
        let mut k = keeper();
        let start = k.stages[1].range.start;
        k.chunk(1, start, &[1; 8]);
        let part = StageReport {
            steps: 2,
            tokens: vec![vec![5], vec![6]],
            ..Default::default()
        };
        k.commit(1, 2, cursor(2), 1, part.clone());
        k.chunk(1, start, &[2; 8]);
        k.commit(1, 4, cursor(4), 1, part);
        let kept = &k.stages[1];
        assert_eq!(kept.broken, None);
        assert_eq!((kept.step, k.checkpoints, k.checkpoint_bytes), (4, 2, 16));
        assert_eq!(kept.image[&start], vec![2; 8]);
        let part = kept.part.as_ref().unwrap();
        assert_eq!(part.steps, 4);
        assert_eq!(part.tokens, vec![vec![5, 5], vec![6, 6]]);
        assert_eq!(part.layers, (1, 2));
    }

    #[test]
    fn chunks_outside_the_state_or_a_count_that_does_not_match_are_not_kept() {
        let mut k = keeper();
        let range = k.stages[0].range.clone();
        // Inside the weights, before the movable part.
        k.chunk(0, range.start.saturating_sub(CHUNK), &[0; 8]);
        k.commit(0, 2, cursor(2), 1, StageReport::default());
        assert!(k.stages[0].broken.as_deref().unwrap().contains("outside"));
        assert_eq!((k.stages[0].step, k.checkpoints), (0, 0));
        // Announced 2 chunks, 1 arrived: the kept state would not be the stage's.
        k.chunk(1, k.stages[1].range.start, &[0; 8]);
        k.commit(1, 2, cursor(2), 2, StageReport::default());
        assert!(
            k.stages[1]
                .broken
                .as_deref()
                .unwrap()
                .contains("announced 2")
        );
        assert!(k.stages[1].cursor.is_none());
    }

    #[test]
    fn checkpoints_off_the_interval_or_out_of_order_are_refused() {
        let mut k = keeper();
        k.commit(0, 3, cursor(3), 0, StageReport::default());
        assert!(k.stages[0].broken.is_some());
        k.commit(1, 4, cursor(4), 0, StageReport::default());
        k.commit(1, 2, cursor(2), 0, StageReport::default());
        assert_eq!(k.stages[1].step, 4);
        assert!(k.stages[1].broken.is_some());
    }
}
