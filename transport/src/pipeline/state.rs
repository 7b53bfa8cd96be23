//! A stage's state as the runtime hands it to observers and takes it back: the step-boundary
//! callback (for snapshots), starting a stage from restored state, and the schedule that maps a
//! stage's forward counter to (step, sequence).

use slug_kernels::{Section, Stage, StageCursor};

use crate::error::{Result, TransportError};

use super::config::PipelineConfig;

/// The whole state of one stage: its arena bytes and cursor (what a snapshot holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageState {
    /// The arena bytes. Only the part before the workspace section is used on restore: the
    /// workspace is dead between steps and its size depends on the thread count, so a state
    /// taken with N threads restores into a stage running with M.
    pub arena: Vec<u8>,
    /// Step counter and sequence positions.
    pub cursor: StageCursor,
    /// Weights the state references instead of holding (their bytes in `arena` are not used):
    /// the stage restored into regenerated them itself, and they must hash the same.
    pub weights: Option<ReferencedWeights>,
}

/// Weights a [`StageState`] references: arena bytes `range` hold immutable weights that the
/// restoring stage regenerates (from the seed) or loads (from a checkpoint), checked against
/// `hash` (xxh3-128) before the rest of the state is taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferencedWeights {
    /// Arena bytes of the weights.
    pub range: std::ops::Range<usize>,
    /// xxh3-128 of those bytes when the state was taken.
    pub hash: u128,
    /// Where they come from, for error messages (e.g. `seed 42 of the small preset`).
    pub source: String,
}

/// Sees a stage's arena and cursor at every step boundary, on the stage's own thread, while
/// the stage waits: once before the first forward step, then after each one. What it copies
/// here is consistent (no kernel runs, no transfer writes the arena); it should copy only what
/// it needs (changed chunks) because the pipeline waits for it.
pub trait StageStateObserver: Send {
    /// `stage` is between steps; `stage.cursor().step` forward steps have run.
    fn at_step_boundary(&mut self, stage: &Stage) -> Result<()>;
}

/// Copies `state` into `stage`: everything before the workspace section plus the cursor, except
/// referenced weights, which `stage` already holds (built from the seed) and which are checked
/// against the state's hash instead. Refuses a state from a differently shaped stage (other
/// model, plan, index or sequences) or whose weights do not match.
pub fn restore_stage(stage: &mut Stage, state: &StageState) -> Result<()> {
    let (workspace, _) = stage.layout().section(Section::Workspace);
    let mismatch = |detail: String| {
        TransportError::Config(format!(
            "cannot restore stage {}: {detail}; the state comes from another model, plan or \
             sequence count",
            stage.index()
        ))
    };
    if state.arena.len() < workspace {
        return Err(mismatch(format!(
            "its arena has {} bytes, the stage's state (weights, KV cache, boxes) needs {workspace}",
            state.arena.len()
        )));
    }
    if state.cursor.positions.len() != stage.layout().sequences {
        return Err(mismatch(format!(
            "{} sequence positions for {} sequences",
            state.cursor.positions.len(),
            stage.layout().sequences
        )));
    }
    let mut bytes = stage.arena().bytes().to_vec();
    match &state.weights {
        None => bytes[..workspace].copy_from_slice(&state.arena[..workspace]),
        Some(w) => {
            if w.range.start > w.range.end || w.range.end > workspace {
                return Err(mismatch(format!(
                    "its weights reference bytes {:?}, outside the stage's state (0..{workspace})",
                    w.range
                )));
            }
            let got = xxhash_rust::xxh3::xxh3_128(&bytes[w.range.clone()]);
            if got != w.hash {
                return Err(TransportError::Config(format!(
                    "cannot restore stage {}: its weights, regenerated here, hash to {got:032x} \
                     but the snapshot recorded {:032x} for {}; the trace was recorded with other \
                     weights (model, seed or checkpoint), or this build generates them \
                     differently: replay with the recorded model and seed",
                    stage.index(),
                    w.hash,
                    w.source
                )));
            }
            bytes[..w.range.start].copy_from_slice(&state.arena[..w.range.start]);
            bytes[w.range.end..workspace].copy_from_slice(&state.arena[w.range.end..workspace]);
        }
    }
    stage.restore(&bytes, state.cursor.clone())?;
    Ok(())
}

/// Where forward step number `forward` (a stage's cursor step: every stage runs the same
/// sequence of (step, sequence) pairs) falls in the schedule of `cfg`: sequences go in groups
/// of `microbatches`, each group runs every step, a step runs each sequence of the group.
/// `None` past the end of the schedule.
pub fn schedule_slot(cfg: &PipelineConfig, forward: u64) -> Option<ScheduleSlot> {
    let sequences = cfg.prompts.len() as u64;
    let mb = cfg.microbatches.max(1) as u64;
    let tokens = cfg.tokens as u64;
    if tokens == 0 || forward >= sequences * tokens {
        return None;
    }
    // Every group but the last is full, so the group index is a plain division.
    let group = forward / (mb * tokens);
    let first = group * mb;
    let size = mb.min(sequences - first);
    let within = forward - group * mb * tokens;
    Some(ScheduleSlot {
        step: (within / size) as u32,
        seq: (first + within % size) as u32,
    })
}

/// Whether stage `s` sends its output after forward step `f` (the last stage never sends back
/// a sequence's last token).
pub(crate) fn sends_after(cfg: &PipelineConfig, s: usize, f: u64) -> bool {
    let last = s + 1 == cfg.stages;
    schedule_slot(cfg, f).is_some_and(|slot| !(last && slot.step as usize + 1 == cfg.tokens))
}

/// The forward step at which the downstream stage consumes what stage `s` sent after forward
/// step `f`: the same step for hidden states; for the last stage's token, the same sequence's
/// next step, one group later.
pub(crate) fn consumed_at(cfg: &PipelineConfig, s: usize, f: u64) -> u64 {
    if s + 1 < cfg.stages {
        return f;
    }
    let mb = cfg.microbatches.max(1) as u64;
    let first = f / (mb * cfg.tokens as u64) * mb;
    f + mb.min(cfg.prompts.len() as u64 - first)
}

/// How a stage restored at forward step `k` (with every other stage at `k`) resumes its
/// links: the sequence number of the next transfer it sends and receives, and (last stage)
/// the forward steps whose tokens the recorded run had sent but stage 0 had not yet consumed,
/// which it must send again.
pub(crate) fn resume_links(cfg: &PipelineConfig, s: usize, k: u64) -> (u64, u64, Vec<u64>) {
    let n = cfg.stages;
    let up = (s + n - 1) % n;
    let delivered = |stage: usize| {
        (0..k)
            .filter(|&f| sends_after(cfg, stage, f) && consumed_at(cfg, stage, f) < k)
            .count() as u64
    };
    let pending = (0..k)
        .filter(|&f| sends_after(cfg, s, f) && consumed_at(cfg, s, f) >= k)
        .collect();
    (delivered(s), delivered(up), pending)
}

/// One forward step of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScheduleSlot {
    /// Decode step: 0 is the prompt (prefill), then one per generated token.
    pub step: u32,
    /// Sequence.
    pub seq: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use slug_kernels::ModelConfig;

    #[test]
    fn schedule_slots_follow_groups_steps_and_sequences() {
        let model = ModelConfig::preset("tiny").unwrap();
        let mut cfg = PipelineConfig::new(model, "ab", 5, 3);
        cfg.microbatches = 2;
        // Group {0,1}: 3 steps x 2, group {2,3}: 3 x 2, group {4}: 3 x 1.
        let slots: Vec<(u32, u32)> = (0..15)
            .map(|f| schedule_slot(&cfg, f).map(|s| (s.step, s.seq)).unwrap())
            .collect();
        assert_eq!(
            slots,
            vec![
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (2, 0),
                (2, 1),
                (0, 2),
                (0, 3),
                (1, 2),
                (1, 3),
                (2, 2),
                (2, 3),
                (0, 4),
                (1, 4),
                (2, 4)
            ]
        );
        assert_eq!(schedule_slot(&cfg, 15), None);
        cfg.stages = 2;
        // Resuming at forward 8 = (step 1, seq 3): stage 1 (last) sent the tokens of forwards
        // 0..=3 (consumed at 2..=5), then 6 and 7 (consumed at 8 and 9): those two are pending.
        assert_eq!(resume_links(&cfg, 1, 8), (4, 8, vec![6, 7]));
        // Stage 0 sent 8 and received the 4 delivered tokens.
        assert_eq!(resume_links(&cfg, 0, 8), (8, 4, vec![]));
        // The last group has one sequence: its token feeds the very next forward.
        assert_eq!(consumed_at(&cfg, 1, 12), 13);
    }
}
