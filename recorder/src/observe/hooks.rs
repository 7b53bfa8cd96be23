//! The kernel and step hooks: every kernel call of a stage as a span, every step's end as a
//! step boundary, and the per-step perf counters.

use std::sync::Arc;

use slug_kernels::{Hooks, KernelCall, KernelId};
use slug_schema::{Counter, Event, KernelSpan, StepBoundary};
use slug_transport::transfer::kernel_output_hash;

use crate::endpoint::{EndpointRecorder, EndpointShared, PAGE_FAULTS_NAME, TASK_CLOCK_NAME};
use crate::perf::{StepCounters, current_tid, monotonic_ns};

/// Kernel spans, step boundaries and per-step counters of one stage.
#[derive(Debug)]
pub struct StageHooks {
    pub(super) shared: Arc<EndpointShared>,
    /// On a node the observers own the recorder: the log closes when the stage drops them.
    pub(super) _recorder: Option<Arc<EndpointRecorder>>,
    /// Opened on the stage thread at its first step boundary (the hooks are built elsewhere).
    pub(super) counters: Option<StepCounters>,
    pub(super) want_counters: bool,
    /// `--hash-kernels`: every span carries its output's hash, so a replay can name the kernel.
    pub(super) hash_kernels: bool,
}

impl Hooks for StageHooks {
    fn kernel(&mut self, call: &KernelCall, output: &mut [f32]) {
        self.shared.append(&Event::KernelSpan(KernelSpan {
            kernel: u32::from(call.kernel.index()),
            layer: call.layer,
            step: call.step,
            seq: call.seq,
            rows: call.rows,
            start_ns: call.start_ns,
            end_ns: call.end_ns,
            // The head's logits are the last stage's output activations: always hashed, so a
            // replay at the default level sees a change that leaves the argmax token alone.
            output_hash: (self.hash_kernels || call.kernel == KernelId::Head)
                .then(|| kernel_output_hash(output)),
        }));
    }

    fn step_boundary(&mut self, step: u64, seq: u32) {
        let ns = monotonic_ns();
        self.shared
            .append(&Event::StepBoundary(StepBoundary { step, seq, ns }));
        self.shared.mark_step(step);
        if self.want_counters && self.counters.is_none() {
            // Failing here was already reported when the capability was probed.
            self.counters = StepCounters::open_thread(current_tid()).ok();
            self.want_counters = self.counters.is_some();
        }
        if let Some(c) = &self.counters
            && let Ok(v) = c.read()
        {
            for (name, value) in [
                (TASK_CLOCK_NAME, v.task_clock_ns),
                (PAGE_FAULTS_NAME, v.page_faults),
            ] {
                self.shared
                    .append(&Event::Counter(Counter { name, value, ns }));
            }
        }
    }
}
