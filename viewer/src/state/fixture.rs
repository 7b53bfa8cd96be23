//! A small labelled pipeline trace built in memory for unit tests: three stages, kernels of four
//! kinds, transfers logged by both ends, step boundaries, a snapshot, samples and one loss.

use slug_schema::{Direction, PerfSampleKind, Transport};

use crate::error::{Result, ViewerError};
use crate::state::event::{
    EbpfEvent, EbpfKind, EndpointIx, KernelSpan, LostEvents, Names, Nanos, PerfSample,
    SnapshotEvent, StepBoundary, StringId, TraceEvent, Transfer,
};
use crate::state::source::{EndpointInfo, FrameSummary, LogHealth, MemorySource, TraceSource};

/// Time between step starts on one stage.
pub const STEP_NS: Nanos = 1_000_000;
/// Offset between consecutive stages within a step.
pub const STAGE_NS: Nanos = 300_000;
/// Bytes of each activation transfer.
pub const XFER_BYTES: u64 = 4096;
/// Kernels each stage runs per step, with their durations.
pub const KERNELS: [(&str, Nanos); 4] = [
    ("rmsnorm", 20_000),
    ("gemm", 100_000),
    ("attention", 50_000),
    ("swiglu", 30_000),
];

pub fn endpoints(stages: usize) -> Vec<EndpointInfo> {
    (0..stages)
        .map(|s| EndpointInfo {
            id: s as u32,
            name: format!("n{}/s{s}", s / 2),
            node: format!("n{}", s / 2),
            stage: s as u32,
            rank: s as u32,
        })
        .collect()
}

/// How long the stage thread of every stage is off the CPU (in futex) after its kernels.
pub const OFF_CPU_NS: Nanos = 30_000;

/// The id of the one loss's reason in [`names`].
const LOSS_REASON: StringId = KERNELS.len() as StringId;

/// The strings the fixture's events name: [`KERNELS`] by index, then the loss reason.
pub fn names() -> Names {
    let mut names = Names::default();
    for (kernel, _) in KERNELS {
        names.intern(kernel);
    }
    names.intern("ring overflow");
    names
}

/// Events per endpoint for `stages` stages and `steps` steps.
pub fn pipeline_events(stages: usize, steps: u64) -> Vec<Vec<TraceEvent>> {
    let mut per_ep: Vec<Vec<TraceEvent>> = vec![Vec::new(); stages];
    for step in 0..steps {
        for s in 0..stages {
            let mut t = step * STEP_NS + s as Nanos * STAGE_NS;
            per_ep[s].push(TraceEvent::StepBoundary(StepBoundary {
                ns: t,
                step,
                seq: 0,
            }));
            if step == 0 {
                per_ep[s].push(TraceEvent::Snapshot(Box::new(SnapshotEvent {
                    ns: t,
                    step,
                    stage: s as u32,
                    bytes: 1 << 20,
                    new_bytes: 1 << 20,
                    chunks: 16,
                    id: 0xabc + s as u128,
                })));
            }
            for (i, (_, base)) in KERNELS.iter().enumerate() {
                // Stage 1's gemm is slower: it is the fixture's bottleneck.
                let dur = if s == 1 && i == 1 {
                    base * 3 / 2
                } else {
                    *base
                };
                per_ep[s].push(TraceEvent::KernelSpan(KernelSpan {
                    start_ns: t,
                    end_ns: t + dur,
                    kernel: i as StringId,
                    step,
                    layer: Some(s as u32),
                    seq: 0,
                    rows: 64,
                    output_hash: None,
                }));
                per_ep[s].push(TraceEvent::PerfSample(PerfSample {
                    ns: t + dur / 2,
                    kind: PerfSampleKind::CpuClock,
                    ip: 0x1000 + i as u64,
                    addr: 0,
                    weight: 1,
                    data_source: 0,
                    tid: 7,
                    cpu: s as u32,
                }));
                t += dur;
            }
            if step == 0 {
                per_ep[s].push(TraceEvent::Ebpf(EbpfEvent {
                    ns: t - 1_000,
                    kind: EbpfKind::PageFault,
                    arg0: 0x7f00_0000,
                    arg1: 0x1000,
                    arg2: 2,
                    pid: 1,
                    tid: 7,
                    cpu: s as u32,
                }));
            }
            // After its kernels the stage thread blocks in futex for 30us, woken by tid 8.
            per_ep[s].push(TraceEvent::Ebpf(EbpfEvent {
                ns: t,
                kind: EbpfKind::OffCpu,
                arg0: OFF_CPU_NS,
                arg1: (203 << 32) | 1,
                arg2: 8,
                pid: 1,
                tid: 7,
                cpu: s as u32,
            }));
            if step == 1 && s == 0 {
                per_ep[s].push(TraceEvent::Ebpf(EbpfEvent {
                    ns: t + OFF_CPU_NS,
                    kind: EbpfKind::Migration,
                    arg0: 0,
                    arg1: 3,
                    arg2: 1,
                    pid: 1,
                    tid: 7,
                    cpu: 3,
                }));
            }
            if s + 1 < stages {
                let mut x = transfer(
                    step * stages as u64 + s as u64,
                    (s, s + 1),
                    XFER_BYTES,
                    (t, t + 20_000),
                    Direction::Send,
                );
                x.record.transport = Transport::Shm;
                x.record.dst_offset = 4096;
                x.record.hash = 0x1234;
                let mut received = x.clone();
                received.record.direction = Direction::Recv;
                per_ep[s + 1].push(TraceEvent::Transfer(Box::new(received)));
                per_ep[s].push(TraceEvent::Transfer(Box::new(x)));
            }
        }
    }
    if stages > 1 && steps > 2 {
        per_ep[1].push(TraceEvent::LostEvents(LostEvents {
            from_ns: 2 * STEP_NS + 900_000,
            to_ns: 2 * STEP_NS + 950_000,
            count: 12,
            reason: LOSS_REASON,
        }));
    }
    per_ep
}

/// A hash-only tcp transfer record from endpoint index `src` to `dst` (their ids equal to the
/// indexes), logged by the end `direction` names.
pub fn transfer(
    id: u64,
    (src, dst): (EndpointIx, EndpointIx),
    bytes: u64,
    (post, complete): (Nanos, Nanos),
    direction: Direction,
) -> Transfer {
    Transfer {
        record: slug_schema::Transfer {
            id,
            src_endpoint: src as u32,
            dst_endpoint: dst as u32,
            src_arena: 0,
            dst_arena: 0,
            src_offset: 0,
            dst_offset: 0,
            len: bytes,
            hash: 0,
            post_ns: post,
            complete_ns: complete,
            transport: Transport::Tcp,
            direction,
            payload: None,
        },
        src,
        dst,
    }
}

/// The fixture as a source with frames of `frame_len` events.
pub fn pipeline(stages: usize, steps: u64, frame_len: usize) -> MemorySource {
    MemorySource::new(endpoints(stages), pipeline_events(stages, steps), frame_len)
        .with_names(names())
}

/// A source whose one frame fails to decode, as a damaged log's would.
#[derive(Debug)]
pub struct FailingSource {
    pub inner: MemorySource,
    pub bad: (EndpointIx, usize),
}

impl TraceSource for FailingSource {
    fn endpoints(&self) -> &[EndpointInfo] {
        self.inner.endpoints()
    }

    fn frames(&self, endpoint: EndpointIx) -> &[FrameSummary] {
        self.inner.frames(endpoint)
    }

    fn frame_events(&self, endpoint: EndpointIx, frame: usize) -> Result<Vec<TraceEvent>> {
        if (endpoint, frame) == self.bad {
            return Err(ViewerError::FrameUnreadable {
                endpoint: self.inner.endpoints()[endpoint].name.clone(),
                frame,
                reason: "checksum mismatch".to_string(),
            });
        }
        self.inner.frame_events(endpoint, frame)
    }

    fn health(&self, endpoint: EndpointIx) -> LogHealth {
        self.inner.health(endpoint)
    }

    fn names(&self) -> &Names {
        self.inner.names()
    }
}
