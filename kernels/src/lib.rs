//! CKE-style pure kernels and the decoder model laid out in one bump arena per stage.
//!
//! - [`kernels`]: pure kernels (gemm, gemv, rmsnorm, rope, softmax, attention, swiglu,
//!   embedding, residual add, argmax). No allocation, no threads, no global state; each call
//!   covers a row range; every instruction set and every row split give the same bits.
//! - [`ModelConfig`], [`LayerPlan`]: the Llama-style decoder and how its layers split into
//!   pipeline stages.
//! - [`StageLayout`], [`StageArena`]: one anonymous map per stage, laid out once into
//!   weights | KV cache | activations (per-sequence inbox and outbox) | workspace.
//! - [`Stage`]: runs one forward step of one sequence inside its arena; [`StageCursor`] plus the
//!   arena bytes are the stage's whole state.
//! - [`ThreadPool`]: the orchestrator's persistent pool that splits one kernel call by rows.
//! - [`generate`]: the single-process reference driver (stages one after another).
//! - [`Hooks`]: what the recorder and replayer observe (every kernel call, every step boundary).

mod arena;
mod config;
mod dirty;
mod error;
mod hooks;
mod init;
pub mod kernels;
mod layout;
mod plan;
mod pool;
mod sequential;
mod simd;
mod stage;

pub use arena::{StageArena, check_fits, mem_available};
pub use config::{ModelConfig, PRESETS};
pub use dirty::{DIRTY_PAGE, DirtyPages};
pub use error::Error;
pub use hooks::{Hooks, KernelCall, KernelId, NoHooks, monotonic_ns};
pub use layout::{
    LayerWeights, Payload, REGION_ALIGN, Region, SECTION_ALIGN, Section, Span, StageLayout,
    Workspace,
};
pub use plan::LayerPlan;
pub use pool::ThreadPool;
pub use sequential::{Generation, generate};
pub use simd::{Arith, Isa, has_hardware_fma};
pub use stage::{Stage, StageCursor};
