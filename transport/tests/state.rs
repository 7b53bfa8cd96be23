//! The runtime's state hooks: stages seen at every step boundary, started from restored state
//! on any transport and thread count, and the fault injector changing exactly one stage's bytes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use slug_kernels::{ModelConfig, Stage};
use slug_transport::TransportError;
use slug_transport::pipeline::{
    Launch, NoObservers, ObserverFactory, PipelineConfig, RunReport, StageContext, StageObservers,
    StageState, StageStateObserver, prompt_tokens, run,
};
use slug_transport::transfer::TransportKind;

fn config(transport: TransportKind, threads: usize) -> PipelineConfig {
    let mut m = ModelConfig::preset("tiny").expect("tiny preset");
    m.layers = 4;
    m.seed = 5;
    let mut cfg = PipelineConfig::new(m, "x", 1, 4);
    cfg.prompts = ["The slug", "crossed"]
        .iter()
        .map(|p| prompt_tokens(p))
        .collect();
    cfg.stages = 2;
    cfg.transport = transport;
    cfg.threads = threads;
    cfg.microbatches = 2;
    cfg.digests = true;
    cfg.timeout_ms = 20_000;
    cfg.launch = Launch::Threads;
    cfg
}

type States = Arc<Mutex<BTreeMap<(usize, u64), StageState>>>;

/// Keeps every stage's state at every step boundary.
struct Keep(States);

struct KeepStage(usize, States);

impl StageStateObserver for KeepStage {
    fn at_step_boundary(&mut self, stage: &Stage) -> Result<(), TransportError> {
        let state = StageState {
            arena: stage.arena().bytes().to_vec(),
            cursor: stage.cursor().clone(),
            weights: None,
        };
        self.1
            .lock()
            .expect("states")
            .insert((self.0, stage.cursor().step), state);
        Ok(())
    }
}

impl ObserverFactory for Keep {
    fn stage_observers(&self, _: &StageContext<'_>) -> Result<StageObservers, TransportError> {
        Ok(StageObservers::none())
    }

    fn state_observer(
        &self,
        ctx: &StageContext<'_>,
    ) -> Result<Option<Box<dyn StageStateObserver>>, TransportError> {
        Ok(Some(Box::new(KeepStage(ctx.stage, self.0.clone()))))
    }
}

/// Starts every stage from a kept state.
struct Restore(States, u64);

impl ObserverFactory for Restore {
    fn stage_observers(&self, _: &StageContext<'_>) -> Result<StageObservers, TransportError> {
        Ok(StageObservers::none())
    }

    fn initial_state(&self, ctx: &StageContext<'_>) -> Result<Option<StageState>, TransportError> {
        Ok(self
            .0
            .lock()
            .expect("states")
            .get(&(ctx.stage, self.1))
            .cloned())
    }
}

fn hashes(r: &RunReport) -> Vec<(u32, u32, u128)> {
    r.digests()
        .iter()
        .map(|d| (d.tag.step, d.src, d.hash.0))
        .collect()
}

#[test]
fn every_step_boundary_is_seen_and_step_zero_states_restore_on_any_transport_and_thread_count() {
    let states = States::default();
    let cfg = config(TransportKind::Local, 1);
    let recorded = run(&cfg, &Keep(states.clone())).expect("recorded run");
    // Before the first step and after each of 2 sequences x 4 steps, for both stages.
    assert_eq!(states.lock().unwrap().len(), 2 * (1 + 2 * 4));
    for (transport, threads) in [(TransportKind::Local, 2), (TransportKind::Tcp, 1)] {
        let mut other = config(transport, threads);
        // A different seed: the tokens can only match if the restored weights were used.
        other.model.seed = 99;
        let fresh = run(&other, &NoObservers).expect("fresh run");
        assert_ne!(fresh.tokens, recorded.tokens);
        let replayed = run(&other, &Restore(states.clone(), 0)).expect("restored run");
        assert_eq!(replayed.tokens, recorded.tokens, "{transport} x{threads}");
        assert_eq!(hashes(&replayed), hashes(&recorded));
    }
}

#[test]
fn pipelines_resume_from_mid_run_states_with_the_recorded_transfers() {
    for stages in [1, 2] {
        let states = States::default();
        let mut cfg = config(TransportKind::Local, 1);
        cfg.stages = stages;
        let recorded = run(&cfg, &Keep(states.clone())).expect("recorded run");
        for (transport, at) in [
            (TransportKind::Local, 5),
            (TransportKind::Tcp, 3),
            (TransportKind::Shm, 4),
        ] {
            let mut other = config(transport, 2);
            other.stages = stages;
            let resumed = run(&other, &Restore(states.clone(), at)).expect("resumed run");
            // Forward steps before `at` ran already: (0,0) (0,1) (1,0) (1,1) (2,0) ... as
            // (step, sequence), so each sequence has the steps after its last one left.
            let done = |seq: u64| (0..at).filter(|f| f % 2 == seq).count();
            for seq in 0..2 {
                assert_eq!(
                    resumed.tokens[seq as usize],
                    recorded.tokens[seq as usize][done(seq)..],
                    "{stages} stages, {transport}, at {at}"
                );
            }
            // Every transfer of the resumed run is one of the recorded run, bytes and all.
            let all = hashes(&recorded);
            assert!(hashes(&resumed).iter().all(|h| all.contains(h)));
        }
    }
}

#[test]
fn injection_changes_the_bytes_from_the_injected_stage_and_step_on() {
    let clean = run(&config(TransportKind::Local, 1), &NoObservers).expect("clean run");
    for transport in [TransportKind::Local, TransportKind::Shm] {
        let mut cfg = config(transport, 1);
        cfg.inject = Some("stage=0,layer=1,kernel=down,step=5".parse().expect("spec"));
        let faulty = run(&cfg, &NoObservers).expect("injected run");
        let first_diff = hashes(&clean)
            .into_iter()
            .zip(hashes(&faulty))
            .find(|(a, b)| a != b)
            .map(|(a, _)| (a.0, a.1));
        // Step 5 of a stage is decode step 2 of sequence 1: the first changed transfer is
        // stage 0's hidden states of that step.
        assert_eq!(first_diff, Some((2, 0)), "{transport}");
    }
}

#[test]
fn every_stage_stops_after_the_same_step_on_every_transport() {
    let full = run(&config(TransportKind::Local, 1), &NoObservers).expect("full run");
    for transport in [TransportKind::Local, TransportKind::Shm, TransportKind::Tcp] {
        let mut cfg = config(transport, 1);
        // Steps 0..=4: both sequences' steps 0 and 1, and step 2 of sequence 0.
        cfg.stop_after = Some(4);
        let short = run(&cfg, &NoObservers).expect("stopped run");
        assert_eq!(short.tokens[0], full.tokens[0][..3], "{transport}");
        assert_eq!(short.tokens[1], full.tokens[1][..2], "{transport}");
        let prefix: Vec<_> = hashes(&full)
            .into_iter()
            .filter(|h| hashes(&short).contains(h))
            .collect();
        assert_eq!(prefix.len(), hashes(&short).len(), "{transport}");
    }
}
