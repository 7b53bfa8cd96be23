//! What a pipeline run is: the model, stages, transport, schedule and checks, as the
//! coordinator sends it to its nodes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slug_kernels::{LayerPlan, ModelConfig};

use crate::error::{Result, TransportError};
use crate::fabric::RingSpec;
use crate::transfer::TransportKind;

use super::launch::NodeLauncher;
use super::settings::ObserverSettings;

/// Everything a pipeline run needs; serialisable because the coordinator sends it to nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelineConfig {
    /// The model (any preset with any overrides; weights come from `model.seed`).
    pub model: ModelConfig,
    /// Pipeline stages; the layers are split evenly ([`LayerPlan::even`]).
    pub stages: usize,
    /// How stages exchange activations and tokens.
    pub transport: TransportKind,
    /// Threads of each stage's persistent pool.
    pub threads: usize,
    /// Sequences in flight at once (microbatches); sequences run in groups of this size.
    pub microbatches: usize,
    /// Prompt token ids, one prompt per sequence.
    pub prompts: Vec<Vec<u32>>,
    /// Tokens to generate per sequence.
    pub tokens: usize,
    /// `host:port` of a `slug node --listen` per stage (`tcp` only); empty: launch locally.
    pub hosts: Vec<String>,
    /// Longest any single blocking wait (a link, a handshake, a node's reply) may take.
    pub timeout_ms: u64,
    /// Put the xxh3-128 digest of every received transfer into the report.
    pub digests: bool,
    /// Put the hash of these kernel outputs into the report (a `--hosts` replay checks them).
    #[serde(default)]
    pub kernel_digests: KernelDigests,
    /// What the node-side [`super::ObserverFactory`] does besides running the stage (record
    /// it, restore it from a trace); `None` (written `null` in a trace's manifest): nothing.
    pub observer_settings: Option<ObserverSettings>,
    /// How `shm` / `tcp` runs without hosts start their nodes.
    #[serde(default)]
    pub launch: Launch,
    /// Flip one bit of one kernel output (`--inject`), on whichever node runs that stage.
    #[serde(default)]
    pub inject: Option<crate::inject::Injection>,
    /// Stop every stage after this stage step (a replay of a prefix of the schedule); the
    /// last stage does not send back tokens for steps that will not run.
    #[serde(default)]
    pub stop_after: Option<u64>,
    /// Instruction set of every stage's kernels (`scalar`, `avx2`, `avx512`, `neon`); default:
    /// the best the node's CPU has. Results are identical for every choice.
    #[serde(default)]
    pub isa: Option<String>,
    /// How TCP data links protect activation bytes: a keyed MAC per transfer (default) or
    /// nothing (`--link-integrity none`, for fabrics the user trusts).
    #[serde(default)]
    pub link_integrity: crate::link::LinkIntegrity,
    /// Stages to move to another node mid-run (`--migrate`), in the order given.
    #[serde(default)]
    pub migrations: Vec<super::migrate::Migration>,
    /// Stages may also be moved while the run goes on (`slug migrate` through [`Self::control`]):
    /// every node is ready to take requested moves up.
    #[serde(default)]
    pub live_moves: bool,
    /// `slug node`s that take over a stage whose node dies (`--spares`), used in order; every
    /// stage then ships a checkpoint to the coordinator every [`Self::checkpoint_every`] steps.
    #[serde(default)]
    pub spares: Vec<String>,
    /// Forward steps between a stage's checkpoints when there are spares (`--checkpoint-every`;
    /// `None`: [`super::failover::DEFAULT_CHECKPOINT_EVERY`]).
    #[serde(default)]
    pub checkpoint_every: Option<u64>,
    /// Address the coordinator takes `slug migrate` requests on (authenticated with the
    /// cluster key); sets `live_moves`.
    #[serde(skip)]
    pub control: Option<String>,
    /// Starts this machine's stage processes when `launch` is [`Launch::Processes`] and there
    /// are no hosts; the program that links this library supplies it.
    #[serde(skip)]
    pub launcher: Option<Arc<dyn NodeLauncher>>,
    /// Cluster key file for `hosts` runs; default: the `SLUG_CLUSTER_KEY` environment variable.
    #[serde(skip)]
    pub key_file: Option<PathBuf>,
    /// Live counters of this run, updated as stages go (nodes send theirs with each heartbeat);
    /// `None`: nobody watches. Each node keeps its own.
    #[serde(skip)]
    pub progress: Option<Arc<super::progress::RunProgress>>,
    /// Called by the coordinator each time a move commits (the stage now runs on its target),
    /// with the move's report so far; a recording lists the move's endpoint in its manifest
    /// then, so that a recording killed later keeps it. `None`: nobody listens.
    #[serde(skip)]
    pub on_move: Option<MoveHook>,
}

/// A callback for [`PipelineConfig::on_move`].
#[derive(Clone)]
pub struct MoveHook(pub Arc<dyn Fn(&super::MigrationReport) + Send + Sync>);

impl std::fmt::Debug for MoveHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MoveHook")
    }
}

/// How a single-machine `shm` / `tcp` run starts its nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Launch {
    /// One `slug node --once` child process per stage (stage processes as in production).
    #[default]
    Processes,
    /// One node per stage served from a thread of this process: the same sockets, fabric file
    /// and protocol, and the [`super::ObserverFactory`] given to [`super::run`] observes every stage.
    Threads,
}

impl PipelineConfig {
    /// A one-stage local run of `model` generating `tokens` tokens for `sequences` copies of
    /// `prompt` (prompt bytes are token ids), all in flight; change fields to taste.
    pub fn new(model: ModelConfig, prompt: &str, sequences: usize, tokens: usize) -> Self {
        Self {
            model,
            stages: 1,
            transport: TransportKind::Local,
            threads: 1,
            microbatches: sequences.max(1),
            prompts: vec![prompt_tokens(prompt); sequences.max(1)],
            tokens,
            hosts: Vec::new(),
            timeout_ms: 60_000,
            digests: false,
            kernel_digests: KernelDigests::None,
            observer_settings: None,
            launch: Launch::Processes,
            inject: None,
            isa: None,
            link_integrity: crate::link::LinkIntegrity::Mac,
            stop_after: None,
            migrations: Vec::new(),
            live_moves: false,
            spares: Vec::new(),
            checkpoint_every: None,
            control: None,
            launcher: None,
            key_file: None,
            progress: None,
            on_move: None,
        }
    }

    /// The layer split.
    pub fn plan(&self) -> Result<LayerPlan> {
        LayerPlan::even(self.model.layers, self.stages).map_err(TransportError::from)
    }

    /// `--timeout-ms`: the longest any wait on another stage may last.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }

    /// Refuses configurations that cannot run, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.plan()?;
        let bad = |m: String| Err(TransportError::Config(m));
        if self.prompts.is_empty() {
            return bad("no sequences: give at least one prompt".into());
        }
        if let Some(i) = self.prompts.iter().position(|p| p.is_empty()) {
            return bad(format!("prompt of sequence {i} is empty"));
        }
        if let Some(&t) = self
            .prompts
            .iter()
            .flatten()
            .find(|&&t| t as usize >= self.model.vocab)
        {
            return bad(format!(
                "prompt token {t} is outside the vocabulary of {} tokens",
                self.model.vocab
            ));
        }
        let longest = self.prompts.iter().map(Vec::len).max().unwrap_or(0);
        if longest + self.tokens.saturating_sub(1) > self.model.max_seq {
            return bad(format!(
                "prompt of {longest} tokens plus {} generated exceeds the context of {} (max_seq)",
                self.tokens, self.model.max_seq
            ));
        }
        if self.tokens == 0 {
            return bad("tokens = 0: nothing to generate".into());
        }
        if self.microbatches == 0 {
            return bad("microbatches = 0: at least one sequence must be in flight".into());
        }
        if self.threads == 0 {
            return bad("threads = 0: each stage needs at least one thread".into());
        }
        if self.stages > crate::fabric::MAX_STAGES {
            return bad(format!(
                "at most {} stages are supported",
                crate::fabric::MAX_STAGES
            ));
        }
        if let Some(inject) = &self.inject {
            inject.validate(&self.plan()?, self.prompts.len(), self.tokens)?;
        }
        if !self.hosts.is_empty() {
            if !matches!(self.transport, TransportKind::Tcp | TransportKind::Rdma) {
                return bad(format!(
                    "--hosts needs the tcp or rdma transport (got {}): other transports stay on \
                     one machine",
                    self.transport
                ));
            }
            if self.hosts.len() != self.stages {
                return bad(format!(
                    "{} hosts for {} stages: give one host:port per stage",
                    self.hosts.len(),
                    self.stages
                ));
            }
        }
        super::migrate::validate(self)?;
        super::failover::validate(self)?;
        Ok(())
    }

    /// Forward steps every stage runs: sequences times tokens.
    pub fn forward_steps(&self) -> u64 {
        self.prompts.len() as u64 * self.tokens as u64
    }

    /// The rings (link shapes) of this pipeline: link `s` goes from stage `s` to `s + 1`, the
    /// last link carries tokens from the last stage back to stage 0.
    pub(crate) fn ring_specs(&self) -> Vec<RingSpec> {
        if self.stages < 2 {
            return Vec::new();
        }
        let longest = self.prompts.iter().map(Vec::len).max().unwrap_or(1) as u64;
        let in_flight = self.microbatches.min(self.prompts.len()).max(1) as u32;
        let message = longest * self.model.dim as u64 * 4;
        let capacity = message.min(SLOT_BYTES);
        // Room for every in-flight message whole, so a sender never waits on a slow consumer
        // for space that the schedule guarantees; pieces of one message overlap in cache.
        let pieces = message.div_ceil(capacity) as u32;
        let mut specs = vec![
            RingSpec {
                slots: in_flight * pieces,
                capacity,
            };
            self.stages - 1
        ];
        specs.push(RingSpec {
            slots: in_flight,
            capacity: 4,
        });
        specs
    }
}

/// Largest slot of an activation ring: big transfers travel in pieces of this size.
const SLOT_BYTES: u64 = 64 << 10;

/// Prompt text to token ids: each byte is a token (the models' vocabularies hold all 256).
pub fn prompt_tokens(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// Which kernel outputs a stage reports the hash of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelDigests {
    /// None (default).
    #[default]
    None,
    /// Only the output head's logits (the last stage's output activations).
    Head,
    /// Every kernel call.
    All,
}
