//! Live progress of a running pipeline, per stage: steps done, events recorded, bytes sent.
//!
//! The runtime updates it from each stage thread (local runs) or from the nodes' heartbeats
//! (process transports and `--hosts`), so a command can show how far every stage has come
//! while the run goes on. It is only ever read for display: nothing depends on its values.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::config::PipelineConfig;

/// One stage's counters.
#[derive(Debug, Default)]
pub struct StageProgress {
    /// Forward steps of the schedule this stage has finished (a restored stage starts at the
    /// step it was restored at).
    pub steps: AtomicU64,
    /// Events its recorder has written so far (0 when nothing records).
    pub events: Arc<AtomicU64>,
    /// Bytes it has sent on its outbound link.
    pub bytes: AtomicU64,
}

/// What every stage of a run has done so far; share it with the run through
/// [`super::PipelineConfig::progress`].
#[derive(Debug)]
pub struct RunProgress {
    stages: Vec<StageProgress>,
    steps_per_stage: u64,
}

/// A consistent-enough reading of [`RunProgress`] for one line of display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressReading {
    /// Steps each stage has finished, in stage order.
    pub stage_steps: Vec<u64>,
    /// Steps each stage runs in all.
    pub steps_per_stage: u64,
    /// Events recorded by every stage together.
    pub events: u64,
    /// Bytes sent on links by every stage together.
    pub bytes: u64,
}

impl ProgressReading {
    /// Steps finished over all stages.
    pub fn steps(&self) -> u64 {
        self.stage_steps.iter().sum()
    }

    /// Steps of all stages together.
    pub fn total(&self) -> u64 {
        self.steps_per_stage * self.stage_steps.len() as u64
    }

    /// Tokens generated so far: every step the last stage finished yields one.
    pub fn tokens(&self) -> u64 {
        self.stage_steps.last().copied().unwrap_or(0)
    }
}

impl RunProgress {
    /// Counters for `stages` stages, each running `steps_per_stage` forward steps.
    pub fn new(stages: usize, steps_per_stage: u64) -> Arc<Self> {
        Arc::new(Self {
            stages: (0..stages).map(|_| StageProgress::default()).collect(),
            steps_per_stage,
        })
    }

    /// Counters for the run `cfg` describes: its stages, each running its schedule up to
    /// [`PipelineConfig::stop_after`].
    pub fn for_config(cfg: &PipelineConfig) -> Arc<Self> {
        let all = (cfg.tokens * cfg.prompts.len()) as u64;
        let steps = cfg.stop_after.map_or(all, |last| (last + 1).min(all));
        Self::new(cfg.stages, steps)
    }

    /// Stage `s`'s counters, if the run has that stage.
    pub fn stage(&self, s: usize) -> Option<&StageProgress> {
        self.stages.get(s)
    }

    /// The counter stage `s`'s recorder adds its written events to.
    pub fn events_of(&self, s: usize) -> Option<Arc<AtomicU64>> {
        self.stages.get(s).map(|p| Arc::clone(&p.events))
    }

    /// Stores what stage `s` reported (a node's heartbeat); unknown stages are ignored.
    pub fn set(&self, s: usize, steps: u64, events: u64, bytes: u64) {
        if let Some(p) = self.stages.get(s) {
            p.steps.store(steps, Ordering::Relaxed);
            p.events.store(events, Ordering::Relaxed);
            p.bytes.store(bytes, Ordering::Relaxed);
        }
    }

    /// Reads every counter now.
    pub fn read(&self) -> ProgressReading {
        ProgressReading {
            stage_steps: self
                .stages
                .iter()
                .map(|p| p.steps.load(Ordering::Relaxed))
                .collect(),
            steps_per_stage: self.steps_per_stage,
            events: self
                .stages
                .iter()
                .map(|p| p.events.load(Ordering::Relaxed))
                .sum(),
            bytes: self
                .stages
                .iter()
                .map(|p| p.bytes.load(Ordering::Relaxed))
                .sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_sum_stages_and_count_tokens_at_the_last_stage() {
        let p = RunProgress::new(3, 10);
        p.set(0, 5, 100, 4096);
        p.set(1, 4, 50, 1024);
        p.set(2, 3, 7, 12);
        p.set(9, 1, 1, 1);
        p.events_of(2).unwrap().fetch_add(3, Ordering::Relaxed);
        let r = p.read();
        assert_eq!(r.stage_steps, vec![5, 4, 3]);
        assert_eq!((r.steps(), r.total(), r.tokens()), (12, 30, 3));
        assert_eq!((r.events, r.bytes), (160, 5132));
    }
}
