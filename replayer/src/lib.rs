//! Bit-exact replay of a slug trace, and the first place where a replay diverges from it.
//!
//! - [`RecordedRun`]: a trace opened for replay — its pipeline configuration, every sent
//!   transfer by (stage, tag), kernel output hashes, step times, snapshots and payloads; it
//!   refuses a format it cannot read and a run that needed a CPU feature this node lacks (FMA).
//! - [`replay_pipeline`]: every stage from its step-0 state, on any transport and thread count,
//!   each transfer (and at [`Verify::Kernel`] each kernel output) checked against the trace.
//! - [`replay_stage`]: one stage alone, from its latest snapshot, fed its recorded inbound
//!   payloads (no network), its outbound transfers checked.
//! - [`Divergence`]: the first difference (endpoint, step, layer, kernel, transfer, element,
//!   expected vs got, how many later differ) in the JSON shape `slug view --divergence` reads.
//! - [`NodeReplayFactory`]: what a `slug node` serves a `--hosts` replay with (each node
//!   restores its stage from its own copy of the trace).
//! - [`npy`]: named arena sections (KV cache of a layer, boxes, any layout region) as `.npy`.
//!
//! Steps are a stage's step counter (one forward pass of one sequence), as everywhere in a
//! trace; [`place_of`] names the decode step and sequence of one.

// Replay touches no raw memory: the arena, links and kernels it drives keep their own `unsafe`.
#![forbid(unsafe_code)]

mod divergence;
mod error;
mod node;
pub mod npy;
mod recorded;
mod replay;

pub use divergence::{Checker, Counts, Divergence, KernelCheck, StepPlace, place_of};
pub use error::{ReplayError, Result};
pub use node::{NodeReplayFactory, node_settings};
pub use recorded::{KernelKey, RecordedRun, StateSource, node_state, send_tags, stage_step_of};
pub use replay::{
    ReplayOptions, ReplayReport, StageReplay, StageRunner, Verify, replay_pipeline,
    replay_pipeline_with, replay_stage,
};
