//! Fault injection: flips one bit of one kernel call's output so tests (and users) can check
//! that a replay's divergence report points at exactly that place.
//!
//! `--inject stage=2,layer=3,kernel=down,step=5[,element=0][,bit=22]` parses into an
//! [`Injection`]; the runtime wraps the target stage's hooks in a [`FaultInjector`] when
//! [`crate::pipeline::PipelineConfig::inject`] is set, on whichever node runs the stage.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use slug_kernels::{Hooks, KernelCall, KernelId, LayerPlan};

use crate::error::{Result, TransportError};

/// Which bit of which kernel output to flip, once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Injection {
    /// Stage whose kernel output is changed.
    pub stage: usize,
    /// Global decoder layer; `None` for calls outside layers (embed, final_norm, head, argmax).
    pub layer: Option<u32>,
    /// What the user named: a call site (`q_proj`, `down`, ...) or a kernel function (`gemm`).
    pub kernel: String,
    /// Call sites `kernel` stands for, in execution order; the first one that runs is hit.
    pub calls: Vec<KernelId>,
    /// The stage's step counter, as in kernel spans and step boundaries of a trace (one step
    /// is one forward pass of one sequence; [`crate::pipeline::schedule_slot`] names its
    /// decode step and sequence).
    pub step: u64,
    /// Element of the output whose bit is flipped (taken modulo the output length).
    pub element: usize,
    /// Bit of the element's 32 bits (0 = lowest mantissa bit, 31 = sign).
    pub bit: u8,
}

/// Bit flipped when `bit=` is not given: the top mantissa bit changes the value by up to half
/// without ever producing an infinity or NaN.
pub const DEFAULT_BIT: u8 = 22;

/// Call sites of a kernel function name, or of one call-site name.
fn calls_named(name: &str) -> Option<Vec<KernelId>> {
    use KernelId::*;
    let calls = match name {
        "gemm" | "gemv" | "linear" => vec![QProj, KProj, VProj, OProj, Gate, Up, Down, Head],
        "rmsnorm" | "norm" => vec![AttnNorm, FfnNorm, FinalNorm],
        "rope" => vec![RopeQ, RopeK],
        "residual" | "add" => vec![AttnResidual, FfnResidual],
        other => vec![KernelId::ALL.into_iter().find(|k| k.name() == other)?],
    };
    Some(calls)
}

impl FromStr for Injection {
    type Err = TransportError;

    fn from_str(spec: &str) -> Result<Self> {
        let bad = |m: String| {
            TransportError::Config(format!(
                "--inject {spec:?}: {m}; expected e.g. stage=1,layer=2,kernel=down,step=3 \
                 [,element=E][,bit=B]"
            ))
        };
        let (mut stage, mut layer, mut kernel, mut step) = (None, None, None, None);
        let (mut element, mut bit) = (0usize, DEFAULT_BIT);
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("`{part}` is not key=value")))?;
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("{key}={v} is not a non-negative integer")))
            };
            match key {
                "stage" => stage = Some(num(value)? as usize),
                "layer" => layer = Some(num(value)? as u32),
                "kernel" => kernel = Some(value.to_string()),
                "step" => step = Some(num(value)?),
                "element" => element = num(value)? as usize,
                "bit" => {
                    bit = u8::try_from(num(value)?)
                        .ok()
                        .filter(|b| *b < 32)
                        .ok_or_else(|| bad(format!("bit={value} must be 0..=31")))?
                }
                other => return Err(bad(format!("unknown key `{other}`"))),
            }
        }
        let kernel = kernel.ok_or_else(|| bad("kernel= is missing".into()))?;
        let calls = calls_named(&kernel).ok_or_else(|| {
            let names: Vec<&str> = KernelId::ALL.iter().map(|k| k.name()).collect();
            bad(format!(
                "unknown kernel `{kernel}`; use gemm, rmsnorm, rope, residual or one of {}",
                names.join(", ")
            ))
        })?;
        Ok(Injection {
            stage: stage.ok_or_else(|| bad("stage= is missing".into()))?,
            layer,
            kernel,
            calls,
            step: step.ok_or_else(|| bad("step= is missing".into()))?,
            element,
            bit,
        })
    }
}

impl fmt::Display for Injection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stage={}", self.stage)?;
        if let Some(l) = self.layer {
            write!(f, ",layer={l}")?;
        }
        write!(f, ",kernel={},step={}", self.kernel, self.step)?;
        write!(f, ",element={},bit={}", self.element, self.bit)
    }
}

impl Injection {
    /// Refuses an injection that could never fire in a run with the layer `plan` and `sequences`
    /// sequences of `tokens` tokens each, naming what is out of range.
    pub fn validate(&self, plan: &LayerPlan, sequences: usize, tokens: usize) -> Result<()> {
        let bad = |m: String| Err(TransportError::Config(format!("--inject {self}: {m}")));
        if self.stage >= plan.stages() {
            return bad(format!("the pipeline has {} stages", plan.stages()));
        }
        let steps = (tokens * sequences) as u64;
        if self.step >= steps {
            return bad(format!(
                "a stage runs steps 0..{steps} ({tokens} tokens x {sequences} sequences)"
            ));
        }
        let owned = plan.layers_of(self.stage);
        let in_layer = |k: &KernelId| {
            !matches!(
                k,
                KernelId::Embed | KernelId::FinalNorm | KernelId::Head | KernelId::Argmax
            )
        };
        match self.layer {
            Some(l) if !owned.contains(&(l as usize)) => bad(format!(
                "stage {} owns layers {}..{}, not layer {l}",
                self.stage, owned.start, owned.end
            )),
            Some(_) if !self.calls.iter().any(in_layer) => bad(format!(
                "{} runs outside decoder layers: leave out layer=",
                self.kernel
            )),
            None if self.calls.iter().all(in_layer) => bad(format!(
                "{0} runs inside a decoder layer: give layer= (stage {1} owns layers {2}..{3}, \
                 e.g. stage={1},layer={2},kernel={0},step={4})",
                self.kernel, self.stage, owned.start, owned.end, self.step
            )),
            None if self.calls.contains(&KernelId::Embed) && !plan.is_first(self.stage) => {
                bad("embed runs on stage 0 only".into())
            }
            None if !self.calls.contains(&KernelId::Embed) && !plan.is_last(self.stage) => {
                bad(format!("{} runs on the last stage only", self.kernel))
            }
            _ => Ok(()),
        }
    }
}

/// Hooks that flip the injected bit, then pass every call on to the stage's own hooks (which
/// therefore see, hash and record the faulty output, as a real fault would look).
pub struct FaultInjector {
    injection: Injection,
    inner: Box<dyn Hooks + Send>,
    fired: Option<KernelCall>,
}

impl fmt::Debug for FaultInjector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultInjector")
            .field("injection", &self.injection)
            .field("fired", &self.fired)
            .finish_non_exhaustive()
    }
}

impl FaultInjector {
    /// Wraps `inner`.
    pub fn new(injection: Injection, inner: Box<dyn Hooks + Send>) -> Self {
        Self {
            injection,
            inner,
            fired: None,
        }
    }

    /// The call whose output was changed, once it ran.
    pub fn fired(&self) -> Option<&KernelCall> {
        self.fired.as_ref()
    }

    fn hits(&self, call: &KernelCall) -> bool {
        let i = &self.injection;
        self.fired.is_none()
            && call.layer == i.layer
            && i.calls.contains(&call.kernel)
            && call.step == i.step
    }
}

impl Hooks for FaultInjector {
    fn timing(&self) -> bool {
        self.inner.timing()
    }

    fn kernel(&mut self, call: &KernelCall, output: &mut [f32]) {
        if self.hits(call) && !output.is_empty() {
            let e = self.injection.element % output.len();
            output[e] = f32::from_bits(output[e].to_bits() ^ (1 << self.injection.bit));
            self.fired = Some(*call);
        }
        self.inner.kernel(call, output);
    }

    fn step_boundary(&mut self, step: u64, seq: u32) {
        self.inner.step_boundary(step, seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slug_kernels::NoHooks;

    /// Two stages of two layers each, 2 sequences of 4 tokens.
    fn check(i: &Injection) -> Result<()> {
        i.validate(&LayerPlan::even(4, 2).unwrap(), 2, 4)
    }

    #[test]
    fn parses_validates_and_prints_back() {
        let i: Injection = "stage=1,layer=3,kernel=gemm,step=2".parse().unwrap();
        assert_eq!(i.calls[0], KernelId::QProj);
        assert_eq!(i.bit, DEFAULT_BIT);
        check(&i).unwrap();
        assert_eq!(i.to_string().parse::<Injection>().unwrap(), i);
        for (spec, needle) in [
            ("stage=1,layer=1,kernel=down,step=2", "owns layers 2..4"),
            ("stage=1,layer=3,kernel=down,step=9", "steps 0..8"),
            ("stage=0,kernel=head,step=0", "last stage only"),
            (
                "stage=1,kernel=down,step=0",
                "give layer= (stage 1 owns layers 2..4, e.g. stage=1,layer=2,kernel=down,step=0)",
            ),
            ("stage=1,layer=3,kernel=argmax,step=0", "leave out layer="),
        ] {
            let e = check(&spec.parse::<Injection>().unwrap()).unwrap_err();
            assert!(e.to_string().contains(needle), "{spec}: {e}");
        }
        for (spec, needle) in [
            ("stage=1,kernel=fft,step=0", "unknown kernel `fft`"),
            ("stage=1,layer=x,kernel=down,step=0", "layer=x"),
            ("layer=1,kernel=down,step=0", "stage= is missing"),
            ("stage=1,layer=1,kernel=down,step=0,bit=32", "0..=31"),
        ] {
            let e = spec.parse::<Injection>().unwrap_err();
            assert!(e.to_string().contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn flips_exactly_one_bit_of_the_first_matching_call() {
        let i: Injection = "stage=1,layer=2,kernel=gemm,step=3,element=3,bit=0"
            .parse()
            .unwrap();
        check(&i).unwrap();
        let mut hooks = FaultInjector::new(i, Box::new(NoHooks));
        let call = |kernel, step| KernelCall {
            kernel,
            layer: Some(2),
            step,
            seq: 0,
            rows: 1,
            start_ns: 0,
            end_ns: 0,
        };
        let mut out = vec![1.0f32; 8];
        // Step 2: too early.
        hooks.kernel(&call(KernelId::QProj, 2), &mut out);
        assert!(out.iter().all(|v| *v == 1.0));
        // Step 3: attn_norm is not a gemm, q_proj is.
        hooks.kernel(&call(KernelId::AttnNorm, 3), &mut out);
        assert!(out.iter().all(|v| *v == 1.0));
        hooks.kernel(&call(KernelId::QProj, 3), &mut out);
        assert_eq!(out[3].to_bits(), 1.0f32.to_bits() ^ 1);
        assert_eq!(hooks.fired().map(|c| c.kernel), Some(KernelId::QProj));
        // Only once.
        hooks.kernel(&call(KernelId::KProj, 3), &mut out);
        assert_eq!(out.iter().filter(|v| **v != 1.0).count(), 1);
    }
}
