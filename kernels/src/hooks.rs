//! Observation points of a stage for the recorder and replayer: one call after every kernel
//! call and one at every step boundary, free when nobody listens.

use serde::{Deserialize, Serialize};

/// Which kernel call of the model a [`KernelCall`] reports (a call site, not just a kernel
/// function: the query and key projections are both `gemm`, but different calls).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum KernelId {
    /// Embedding lookup of the step's tokens (stage 0).
    Embed,
    /// RMSNorm before attention.
    AttnNorm,
    /// Query projection.
    QProj,
    /// Key projection, written straight into the KV cache.
    KProj,
    /// Value projection, written straight into the KV cache.
    VProj,
    /// RoPE on the queries.
    RopeQ,
    /// RoPE on the new keys (in the KV cache).
    RopeK,
    /// Causal attention against the KV cache.
    Attention,
    /// Attention output projection.
    OProj,
    /// Residual add after attention.
    AttnResidual,
    /// RMSNorm before the MLP.
    FfnNorm,
    /// SwiGLU gate projection.
    Gate,
    /// SwiGLU up projection.
    Up,
    /// SwiGLU activation (`silu(gate) * up`).
    SwiGlu,
    /// MLP down projection.
    Down,
    /// Residual add after the MLP.
    FfnResidual,
    /// Final RMSNorm of the last token (last stage).
    FinalNorm,
    /// Output head: logits of the last token (last stage).
    Head,
    /// Greedy choice of the next token (last stage); its output is the token id.
    Argmax,
}

impl KernelId {
    /// Every kernel call site, in execution order within a step.
    pub const ALL: [KernelId; 19] = [
        KernelId::Embed,
        KernelId::AttnNorm,
        KernelId::QProj,
        KernelId::KProj,
        KernelId::VProj,
        KernelId::RopeQ,
        KernelId::RopeK,
        KernelId::Attention,
        KernelId::OProj,
        KernelId::AttnResidual,
        KernelId::FfnNorm,
        KernelId::Gate,
        KernelId::Up,
        KernelId::SwiGlu,
        KernelId::Down,
        KernelId::FfnResidual,
        KernelId::FinalNorm,
        KernelId::Head,
        KernelId::Argmax,
    ];

    /// Stable snake_case name, for traces and reports.
    pub fn name(self) -> &'static str {
        match self {
            KernelId::Embed => "embed",
            KernelId::AttnNorm => "attn_norm",
            KernelId::QProj => "q_proj",
            KernelId::KProj => "k_proj",
            KernelId::VProj => "v_proj",
            KernelId::RopeQ => "rope_q",
            KernelId::RopeK => "rope_k",
            KernelId::Attention => "attention",
            KernelId::OProj => "o_proj",
            KernelId::AttnResidual => "attn_residual",
            KernelId::FfnNorm => "ffn_norm",
            KernelId::Gate => "gate",
            KernelId::Up => "up",
            KernelId::SwiGlu => "swiglu",
            KernelId::Down => "down",
            KernelId::FfnResidual => "ffn_residual",
            KernelId::FinalNorm => "final_norm",
            KernelId::Head => "head",
            KernelId::Argmax => "argmax",
        }
    }

    /// Stable small number (the position in [`KernelId::ALL`]), for compact encodings.
    pub fn index(self) -> u8 {
        self as u8
    }

    /// The kernel with index `index`, if any.
    pub fn from_index(index: u8) -> Option<KernelId> {
        KernelId::ALL.get(index as usize).copied()
    }
}

/// One finished kernel call, as reported to [`Hooks::kernel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelCall {
    /// Which call of the model.
    pub kernel: KernelId,
    /// Global decoder layer, `None` for embedding, final norm, head and argmax.
    pub layer: Option<u32>,
    /// Stage step counter (one step = one `forward` call).
    pub step: u64,
    /// Sequence (microbatch) the step ran for.
    pub seq: u32,
    /// Tokens the step processed.
    pub rows: u32,
    /// `CLOCK_MONOTONIC` nanoseconds at the start (0 when [`Hooks::timing`] is false).
    pub start_ns: u64,
    /// `CLOCK_MONOTONIC` nanoseconds at the end (0 when [`Hooks::timing`] is false).
    pub end_ns: u64,
}

/// Observer of a stage's execution. Called on the thread that runs `forward`, after the
/// thread pool has finished the call, once per kernel call (never per row).
pub trait Hooks {
    /// Whether the stage should read the clock around kernel calls. Checked once per call.
    fn timing(&self) -> bool {
        true
    }

    /// A kernel call finished. `output` is everything it wrote (for `Argmax`, the u32 token
    /// ids reinterpreted bit for bit as f32). It is mutable so a fault injector can flip a bit
    /// before the next kernel reads it, and so a recorder can hash it in place.
    fn kernel(&mut self, call: &KernelCall, output: &mut [f32]);

    /// Sequence `seq` finished step `step`: the arena and cursor are consistent here, so this
    /// is where a snapshot may be taken.
    fn step_boundary(&mut self, step: u64, seq: u32);
}

/// Hooks that do nothing and turn off the clock reads.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHooks;

impl Hooks for NoHooks {
    #[inline]
    fn timing(&self) -> bool {
        false
    }

    #[inline]
    fn kernel(&mut self, _call: &KernelCall, _output: &mut [f32]) {}

    #[inline]
    fn step_boundary(&mut self, _step: u64, _seq: u32) {}
}

impl<H: Hooks + ?Sized> Hooks for &mut H {
    fn timing(&self) -> bool {
        (**self).timing()
    }

    fn kernel(&mut self, call: &KernelCall, output: &mut [f32]) {
        (**self).kernel(call, output)
    }

    fn step_boundary(&mut self, step: u64, seq: u32) {
        (**self).step_boundary(step, seq)
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of every timestamp in a trace.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux and macOS.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
