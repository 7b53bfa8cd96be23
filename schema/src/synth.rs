//! Labelled synthetic traces: a deterministic model of a pipeline-parallel transformer run.
//!
//! Not a recording. The manifest says `"synthetic": true`, the clock is [`Clock::Synthetic`] and
//! capabilities name this module as their source. What it does model: S stages each owning some
//! layers; per step and microbatch a step boundary, the activation received from the previous
//! stage, one span per kernel per thread (row-partitioned, with timing jitter), the activation
//! sent on (both ends log the same transfer id and hash); plus perf samples, counters, eBPF
//! events, PT chunks, snapshots, markers and one lost-events record per endpoint. Every stream is
//! reproducible from the config alone, which is how `slug demo` verifies a round trip.

use std::path::Path;

use xxhash_rust::xxh3::xxh3_128;

use crate::error::{Result, SchemaError};
use crate::event::{
    Counter, Direction, EbpfEvent, EbpfKind, Event, KernelSpan, LostEvents, Marker, PerfSample,
    PerfSampleKind, PtChunk, SnapshotEvent, SoftwareKind, SoftwareRecord, StepBoundary, StringId,
    Transfer, Transport,
};
use crate::frame::{Clock, LogHeader};
use crate::trace::{Capability, EndpointInfo, HostTopology, Manifest, NodeClock, NumaNode, Trace};
use crate::writer::{LogStats, WriterOptions};

/// Kernels of one transformer layer, in execution order, with their base duration (ns, whole layer).
const KERNELS: [(&str, u64); 9] = [
    ("rmsnorm", 3_000),
    ("gemm_qkv", 40_000),
    ("rope", 2_000),
    ("attention", 25_000),
    ("gemm_o", 14_000),
    ("rmsnorm", 3_000),
    ("gemm_gate_up", 80_000),
    ("swiglu", 4_000),
    ("gemm_down", 40_000),
];

/// Strings every synthetic log interns first, in this order (ids are their indices).
pub const STRINGS: [&str; 13] = [
    "rmsnorm",
    "gemm_qkv",
    "rope",
    "attention",
    "gemm_o",
    "gemm_gate_up",
    "swiglu",
    "gemm_down",
    "task-clock",
    "page-faults",
    "ring overflow (synthetic)",
    "synthetic pipeline start",
    "synthetic pipeline end",
];

const S_TASK_CLOCK: StringId = 8;
const S_PAGE_FAULTS: StringId = 9;
const S_LOST: StringId = 10;
const S_START: StringId = 11;
const S_END: StringId = 12;

fn kernel_id(name: &str) -> StringId {
    STRINGS.iter().position(|s| *s == name).unwrap_or(0) as StringId
}

/// Shape of a synthetic pipeline run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthConfig {
    /// Pipeline stages, one endpoint each (1..=64). Two stages share a node.
    pub stages: u32,
    /// Steps (generated tokens).
    pub steps: u64,
    /// Microbatches in flight per step (1..=64).
    pub microbatches: u32,
    /// Layers per stage (1..=256).
    pub layers_per_stage: u32,
    /// Worker threads per stage; each kernel yields one span per thread (1..=256).
    pub threads: u32,
    /// Hidden size: rows of each kernel and bytes of each activation (4 bytes per element).
    pub hidden: u32,
    /// Seed of all jitter and hashes.
    pub seed: u64,
    /// Log writer options.
    pub writer: WriterOptions,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            stages: 4,
            steps: 64,
            microbatches: 4,
            layers_per_stage: 4,
            threads: 4,
            hidden: 2048,
            seed: 0x51u64,
            writer: WriterOptions::default(),
        }
    }
}

impl SynthConfig {
    /// The default shape with enough steps for about `events` events in total (at least one step).
    pub fn with_events(events: u64) -> SynthConfig {
        let mut cfg = SynthConfig {
            steps: 1,
            ..SynthConfig::default()
        };
        let per_step = cfg.events_per_endpoint_step() * u64::from(cfg.stages);
        cfg.steps = (events / per_step).max(1);
        cfg
    }

    /// Approximate events one endpoint logs per step (periodic extras excluded).
    fn events_per_endpoint_step(&self) -> u64 {
        let spans =
            u64::from(self.layers_per_stage) * KERNELS.len() as u64 * u64::from(self.threads);
        // boundary + recv + spans + send + 2 perf samples per microbatch; 2 counters + 1 sched per step.
        u64::from(self.microbatches) * (spans + 5) + 3
    }

    fn validate(&self) -> Result<()> {
        let check = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(SchemaError::Synth(what.to_owned()))
            }
        };
        check((1..=64).contains(&self.stages), "stages must be 1..=64")?;
        check(self.steps >= 1, "steps must be at least 1")?;
        check(
            (1..=64).contains(&self.microbatches),
            "microbatches must be 1..=64",
        )?;
        check(
            (1..=256).contains(&self.layers_per_stage),
            "layers_per_stage must be 1..=256",
        )?;
        check((1..=256).contains(&self.threads), "threads must be 1..=256")?;
        check(
            self.hidden >= self.threads && self.hidden <= 1 << 20,
            "hidden must be threads..=1048576",
        )
    }
}

/// What [`write_trace`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthSummary {
    /// Events in all logs.
    pub events: u64,
    /// Per endpoint, in id order.
    pub endpoints: Vec<LogStats>,
    /// Bytes of all logs on disk.
    pub bytes: u64,
}

/// The node an endpoint runs on: two stages per node.
fn node_of(endpoint: u32) -> u32 {
    endpoint / 2
}

/// The clock offset of a node's synthetic CLOCK_MONOTONIC against node 0's.
fn node_offset_ns(node: u32) -> u64 {
    u64::from(node) * 1_234_567
}

/// Writes a synthetic trace into `dir` (which must not exist or be empty).
pub fn write_trace(dir: impl AsRef<Path>, cfg: &SynthConfig) -> Result<SynthSummary> {
    cfg.validate()?;
    let dir = dir.as_ref();
    let mut manifest = Manifest::new(serde_json::json!({
        "synthetic": true,
        "generator": "slug_schema::synth",
        "stages": cfg.stages,
        "steps": cfg.steps,
        "microbatches": cfg.microbatches,
        "layers_per_stage": cfg.layers_per_stage,
        "threads": cfg.threads,
        "hidden": cfg.hidden,
        "seed": cfg.seed,
    }));
    let nodes = node_of(cfg.stages - 1) + 1;
    for id in 0..cfg.stages {
        manifest.endpoints.push(EndpointInfo {
            id,
            node: format!("node{}", node_of(id)),
            host: format!("synthetic-host-{}", node_of(id)),
            rank: id,
            stage: id,
            log: Trace::log_path_for(id),
            continues: None,
            steps: None,
        });
    }
    for node in 0..nodes {
        manifest.clocks.push(NodeClock {
            node: format!("node{node}"),
            offset_ns: -(node_offset_ns(node) as i64),
            uncertainty_ns: if node == 0 { 0 } else { 2_500 },
        });
        manifest.topology.push(HostTopology {
            node: format!("node{node}"),
            cpus: cfg.threads * 2,
            numa_nodes: vec![NumaNode {
                id: 0,
                cpus: (0..cfg.threads * 2).collect(),
                memory_bytes: 64 << 30,
                distances: vec![10],
            }],
            caches: Vec::new(),
            huge_pages: Vec::new(),
        });
    }
    let synthetic = |name: &str, captured: bool| Capability {
        name: name.to_owned(),
        requested: true,
        available: captured,
        captured,
        reason: Some(if captured {
            "generated by slug_schema::synth".to_owned()
        } else {
            "synthetic trace: no hardware was traced".to_owned()
        }),
    };
    manifest.capabilities = vec![
        synthetic("kernel_spans", true),
        synthetic("transfer_hashes", true),
        synthetic("software_samples", true),
        synthetic("context_switches", true),
        synthetic("ebpf_off_cpu", true),
        synthetic("intel_pt", false),
        synthetic("payloads", false),
    ];
    let trace = Trace::create(dir, manifest)?;

    // Endpoints are written in parallel, but no more at once than there are CPUs: each writer
    // holds a fixed pool of record buffers, so 64 concurrent writers would hold too much memory.
    let parallel = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    let ids: Vec<u32> = (0..cfg.stages).collect();
    let mut results: Vec<Result<LogStats>> = Vec::with_capacity(ids.len());
    for batch in ids.chunks(parallel) {
        std::thread::scope(|scope| {
            let handles: Vec<_> = batch
                .iter()
                .map(|&id| {
                    let trace = &trace;
                    scope.spawn(move || write_endpoint(trace, cfg, id))
                })
                .collect();
            results.extend(handles.into_iter().map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(SchemaError::Synth(
                        "a synthetic endpoint writer thread panicked".into(),
                    ))
                })
            }));
        });
    }
    let endpoints = results.into_iter().collect::<Result<Vec<_>>>()?;
    Ok(SynthSummary {
        events: endpoints.iter().map(|s| s.events).sum(),
        bytes: endpoints.iter().map(|s| s.bytes).sum(),
        endpoints,
    })
}

fn write_endpoint(trace: &Trace, cfg: &SynthConfig, id: u32) -> Result<LogStats> {
    let stream = EndpointStream::new(cfg, id);
    let header = LogHeader::new(id, Clock::Synthetic, stream.start_ns());
    let mut log = trace.create_endpoint_log(id, header, cfg.writer)?;
    for s in STRINGS {
        log.intern(s);
    }
    for event in stream {
        log.append(&event);
    }
    log.close()
}

/// splitmix64: small, fast and good enough for jitter.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// `base` scaled by roughly 1 ± 2% (triangular noise).
    fn jitter(&mut self, base: u64) -> u64 {
        let spread = (base / 50).max(1);
        let noise = self.below(spread) + self.below(spread);
        base - spread + noise
    }
}

/// The events of one synthetic endpoint, in append order.
#[derive(Debug, Clone)]
pub struct EndpointStream {
    cfg: SynthConfig,
    endpoint: u32,
    rng: Rng,
    step: u64,
    buf: Vec<Event>,
    pos: usize,
    aux_offset: u64,
    slot_ns: u64,
}

impl EndpointStream {
    /// The stream of `endpoint` (0..stages) under `cfg`.
    pub fn new(cfg: &SynthConfig, endpoint: u32) -> EndpointStream {
        let layer_ns: u64 = KERNELS
            .iter()
            .map(|k| k.1 / u64::from(cfg.threads) + 400)
            .sum();
        // One microbatch slot: a stage's compute plus slack for transfers and attention growth.
        let slot_ns = layer_ns * u64::from(cfg.layers_per_stage) + 20_000;
        EndpointStream {
            cfg: cfg.clone(),
            endpoint,
            rng: Rng(cfg.seed ^ (u64::from(endpoint) + 1).wrapping_mul(0xa076_1d64_78bd_642f)),
            step: 0,
            buf: Vec::new(),
            pos: 0,
            aux_offset: 0,
            slot_ns,
        }
    }

    /// The endpoint's clock reading at the start of the run.
    pub fn start_ns(&self) -> u64 {
        1_000_000_000 + node_offset_ns(node_of(self.endpoint))
    }

    fn transfer_hash(&self, id: u64) -> u128 {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.cfg.seed.to_le_bytes());
        b[8..].copy_from_slice(&id.to_le_bytes());
        xxh3_128(&b)
    }

    /// Id of the transfer leaving `stage` for (step, seq): equal on both ends.
    fn transfer_id(&self, step: u64, seq: u32, stage: u32) -> u64 {
        (step * u64::from(self.cfg.microbatches) + u64::from(seq)) * u64::from(self.cfg.stages)
            + u64::from(stage)
    }

    fn transfer(
        &self,
        step: u64,
        seq: u32,
        src: u32,
        dir: Direction,
        post: u64,
        complete: u64,
    ) -> Event {
        let stages = self.cfg.stages;
        let dst = (src + 1) % stages;
        let id = self.transfer_id(step, seq, src);
        // The last stage sends a token id back to stage 0; the others send activations.
        let len = if dst == 0 {
            4
        } else {
            u64::from(self.cfg.hidden) * 4
        };
        let slot = u64::from(seq) * len;
        Event::Transfer(Transfer {
            id,
            src_endpoint: src,
            dst_endpoint: dst,
            src_arena: src,
            dst_arena: dst,
            src_offset: slot,
            dst_offset: slot,
            len,
            hash: self.transfer_hash(id),
            post_ns: post,
            complete_ns: complete,
            transport: if node_of(src) == node_of(dst) {
                Transport::Shm
            } else {
                Transport::Tcp
            },
            direction: dir,
            payload: None,
        })
    }

    /// Generates all events of the next step into `buf`.
    fn fill_step(&mut self) {
        self.buf.clear();
        self.pos = 0;
        let step = self.step;
        let cfg = &self.cfg;
        let (stage, stages, mb, threads) =
            (self.endpoint, cfg.stages, cfg.microbatches, cfg.threads);
        let cpu_base = (stage % 2) * threads;
        let mut busy_ns = 0u64;
        let mut out = std::mem::take(&mut self.buf);
        if step == 0 {
            out.push(Event::Marker(Marker {
                text: S_START,
                ns: self.start_ns(),
            }));
        }
        for seq in 0..mb {
            // Steady-state pipeline: stage s works on slot (step*mb + seq + s).
            let slot = step * u64::from(mb) + u64::from(seq) + u64::from(stage);
            let mut t = self.start_ns() + 100_000 + slot * self.slot_ns + self.rng.below(2_000);
            out.push(Event::StepBoundary(StepBoundary { step, seq, ns: t }));
            if seq == 0 && step.is_multiple_of(32) {
                let bytes = 96u64 << 20;
                out.push(Event::Snapshot(SnapshotEvent {
                    stage,
                    step,
                    id: xxh3_128(
                        &[
                            cfg.seed.to_le_bytes(),
                            step.to_le_bytes(),
                            u64::from(stage).to_le_bytes(),
                        ]
                        .concat(),
                    ),
                    bytes,
                    new_bytes: if step == 0 {
                        bytes
                    } else {
                        step * 4096 * u64::from(cfg.layers_per_stage)
                    },
                    chunks: (bytes >> 20) as u32,
                    ns: t,
                }));
            }
            let prev = (stage + stages - 1) % stages;
            let (recv_step, recv_seq) = (
                if stage == 0 {
                    step.wrapping_sub(1)
                } else {
                    step
                },
                seq,
            );
            if stages > 1 && (stage != 0 || step > 0) {
                let arrive = t + self.rng.jitter(3_000);
                let recv = self.transfer(recv_step, recv_seq, prev, Direction::Recv, t, arrive);
                out.push(recv);
                t = arrive + 300;
            }
            for layer in 0..cfg.layers_per_stage {
                let global_layer = stage * cfg.layers_per_stage + layer;
                for (ki, &(name, base)) in KERNELS.iter().enumerate() {
                    let base = base + if name == "attention" { step * 10 } else { 0 };
                    let per_thread = base / u64::from(threads);
                    let mut end_max = t;
                    for th in 0..threads {
                        let start = t + self.rng.below(300);
                        let end = start + self.rng.jitter(per_thread);
                        end_max = end_max.max(end);
                        busy_ns += end - start;
                        let rows = cfg.hidden / threads;
                        out.push(Event::KernelSpan(KernelSpan {
                            kernel: kernel_id(name),
                            layer: Some(global_layer),
                            step,
                            seq,
                            rows: if th + 1 == threads {
                                cfg.hidden - th * rows
                            } else {
                                rows
                            },
                            start_ns: start,
                            end_ns: end,
                            output_hash: None,
                        }));
                        if ki == 1 && layer == 0 && th < 2 {
                            let ip = 0x5555_0000_0000 + ki as u64 * 0x4000 + self.rng.below(0x4000);
                            let mem = th == 1;
                            out.push(Event::PerfSample(PerfSample {
                                kind: if mem {
                                    PerfSampleKind::MemLoad
                                } else {
                                    PerfSampleKind::CpuClock
                                },
                                ip,
                                addr: if mem {
                                    0x7f00_0000_0000 + self.rng.below(96 << 20)
                                } else {
                                    0
                                },
                                weight: if mem {
                                    30 + self.rng.below(270)
                                } else {
                                    1_000_000
                                },
                                data_source: if mem { 0x6a10_0142 } else { 0 },
                                tid: 1000 + stage * 64 + th,
                                cpu: cpu_base + th,
                                ns: start + self.rng.below(per_thread.max(1)),
                            }));
                        }
                    }
                    t = end_max + 150 + self.rng.below(100);
                }
            }
            let last = stage + 1 == stages;
            if stages > 1 && (!last || step + 1 < cfg.steps) {
                let done = t + self.rng.jitter(2_500);
                let send = self.transfer(step, seq, stage, Direction::Send, t, done);
                out.push(send);
            }
        }
        let step_end = self.start_ns() + 100_000 + (step + 1) * u64::from(mb) * self.slot_ns;
        out.push(Event::Counter(Counter {
            name: S_TASK_CLOCK,
            value: busy_ns,
            ns: step_end,
        }));
        out.push(Event::Counter(Counter {
            name: S_PAGE_FAULTS,
            value: self.rng.below(4),
            ns: step_end,
        }));
        out.push(Event::PerfSoftware(SoftwareRecord {
            kind: SoftwareKind::ContextSwitch,
            pid: 4242 + stage,
            tid: 1000 + stage * 64,
            cpu: cpu_base,
            arg0: u64::from(1000 + stage * 64),
            arg1: 0,
            arg2: 1,
            ns: step_end + 500,
        }));
        out.push(Event::Ebpf(EbpfEvent {
            kind: EbpfKind::OffCpu,
            pid: 4242 + stage,
            tid: 1000 + stage * 64,
            cpu: cpu_base,
            arg0: 20_000 + self.rng.below(5_000),
            arg1: (203 << 32) | 1,
            arg2: u64::from(1001 + stage * 64),
            ns: step_end + 600,
        }));
        if step % 7 == 3 {
            out.push(Event::PerfSoftware(SoftwareRecord {
                kind: SoftwareKind::PageFault,
                pid: 4242 + stage,
                tid: 1001 + stage * 64,
                cpu: cpu_base + 1,
                arg0: 0x7f00_0000_0000 + self.rng.below(96 << 20),
                arg1: 0x5555_0000_4000,
                arg2: 6,
                ns: step_end + 800,
            }));
        }
        if step.is_multiple_of(8) {
            let size = 64 * 1024;
            out.push(Event::PtChunk(PtChunk {
                cpu: cpu_base,
                aux_offset: self.aux_offset,
                size,
                payload: xxh3_128(
                    &[
                        self.aux_offset.to_le_bytes(),
                        u64::from(stage).to_le_bytes(),
                    ]
                    .concat(),
                ),
                ns: step_end + 900,
            }));
            self.aux_offset += size;
        }
        if step == cfg.steps / 2 {
            out.push(Event::LostEvents(LostEvents {
                count: 17 + u64::from(stage),
                reason: S_LOST,
                from_ns: step_end + 1_000,
                to_ns: step_end + 6_000,
            }));
        }
        if step + 1 == cfg.steps {
            out.push(Event::Marker(Marker {
                text: S_END,
                ns: step_end + 10_000,
            }));
        }
        self.buf = out;
        self.step += 1;
    }
}

impl Iterator for EndpointStream {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        if self.pos == self.buf.len() {
            if self.step >= self.cfg.steps {
                return None;
            }
            self.fill_step();
        }
        let e = self.buf.get(self.pos).copied();
        self.pos += 1;
        e
    }
}
