//! What a run reports: per-stage counters, timings, clock offsets and the digests replay
//! verification compares.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::ClockOffset;
use crate::link::LinkStats;
use crate::transfer::{Tag, TransportKind};

use super::config::PipelineConfig;

/// Digest of one received transfer, keyed by what it carries rather than how it was scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TransferDigest {
    /// Sequence, step and layer boundary of the bytes.
    pub tag: Tag,
    /// Sending stage.
    pub src: u32,
    /// Receiving stage.
    pub dst: u32,
    /// Bytes moved.
    pub len: u64,
    /// xxh3-128 of the bytes, as 32 hex digits.
    pub hash: HexHash,
}

/// A 128-bit hash that serialises as 32 hex digits (JSON numbers cannot hold it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HexHash(pub u128);

impl Serialize for HexHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:032x}", self.0))
    }
}

impl<'de> Deserialize<'de> for HexHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        u128::from_str_radix(&s, 16)
            .map(HexHash)
            .map_err(|e| serde::de::Error::custom(format!("bad hash {s:?}: {e}")))
    }
}

/// Hash of one kernel output of a stage, as a node reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelDigest {
    /// The stage's step counter.
    pub step: u64,
    /// Call site.
    pub kernel: slug_kernels::KernelId,
    /// Decoder layer (`None` outside layers).
    pub layer: Option<u32>,
    /// Position of the call within its step.
    pub index: u32,
    /// [`crate::transfer::kernel_output_hash`] of the output, as 32 hex digits.
    pub hash: HexHash,
}

/// What one stage did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageReport {
    /// Stage index.
    pub stage: usize,
    /// Host it ran on ("local" for threads, else the node address).
    pub host: String,
    /// Process id of the stage.
    pub pid: u32,
    /// Decoder layers it owned, `[start, end)`.
    pub layers: (usize, usize),
    /// Forward steps run.
    pub steps: u64,
    /// Nanoseconds inside `Stage::forward`.
    pub forward_ns: u64,
    /// Counters of the link into this stage.
    pub inbound: Option<LinkStats>,
    /// Counters of the link out of this stage.
    pub outbound: Option<LinkStats>,
    /// The node's clock minus the coordinator's (process transports).
    pub clock: Option<ClockOffset>,
    /// The upstream stage's clock minus this stage's, measured on the inbound TCP link.
    pub inbound_clock: Option<ClockOffset>,
    /// Digests of received transfers, when the config asked for them.
    pub digests: Vec<TransferDigest>,
    /// Digests of kernel outputs, when the config asked for them.
    #[serde(default)]
    pub kernel_digests: Vec<KernelDigest>,
    /// Generated tokens per sequence (last stage only).
    pub tokens: Vec<Vec<u32>>,
}

/// What a pipeline run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// Transport used.
    pub transport: TransportKind,
    /// Stages.
    pub stages: usize,
    /// Threads per stage.
    pub threads: usize,
    /// Sequences in flight.
    pub microbatches: usize,
    /// Generated tokens, one list per sequence.
    pub tokens: Vec<Vec<u32>>,
    /// Wall time of generation (after every stage was built), nanoseconds.
    pub wall_ns: u64,
    /// Generated tokens (all sequences) per second of `wall_ns`.
    pub tokens_per_s: f64,
    /// One report per stage, in stage order.
    pub stage_reports: Vec<StageReport>,
    /// What became of each `--migrate`, in the order given.
    #[serde(default)]
    pub migrations: Vec<super::migrate::MigrationReport>,
    /// Checkpoints and failovers of a run with spares (`--spares`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<super::failover::FailoverSummary>,
}

impl RunReport {
    /// The run's report from every stage's (any order), `wall` being the generation time: how
    /// a launcher outside this crate (MPI rank 0) assembles what its ranks sent.
    pub fn assemble(
        cfg: &PipelineConfig,
        mut stage_reports: Vec<StageReport>,
        wall: Duration,
    ) -> Self {
        stage_reports.sort_by_key(|r| r.stage);
        let tokens = stage_reports
            .last()
            .map(|r| r.tokens.clone())
            .unwrap_or_default();
        let generated: usize = tokens.iter().map(Vec::len).sum();
        let secs = wall.as_secs_f64();
        Self {
            transport: cfg.transport,
            stages: cfg.stages,
            threads: cfg.threads,
            microbatches: cfg.microbatches,
            tokens,
            wall_ns: wall.as_nanos() as u64,
            tokens_per_s: if secs > 0.0 {
                generated as f64 / secs
            } else {
                0.0
            },
            stage_reports,
            migrations: Vec::new(),
            failover: None,
        }
    }

    /// Every transfer digest of the run, sorted by tag and stages (empty unless asked for).
    pub fn digests(&self) -> Vec<TransferDigest> {
        let mut all: Vec<_> = self
            .stage_reports
            .iter()
            .flat_map(|r| r.digests.iter().copied())
            .collect();
        all.sort();
        all
    }
}
