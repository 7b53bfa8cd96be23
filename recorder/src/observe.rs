//! The recorder's taps into the pipeline runtime: a transfer observer, kernel/step hooks, and
//! the factory that builds both (plus the endpoint's recorder) for every stage.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use slug_kernels::{Hooks, KernelCall};
use slug_schema::{
    Counter, Direction, Event, KernelSpan, StepBoundary, Transfer as TransferEvent, Transport,
    WriterOptions,
};
use slug_transport::TransportError;
use slug_transport::pipeline::{ObserverFactory, StageContext, StageObservers};
use slug_transport::transfer::{Observers, Transfer, TransferObserver, TransportKind};
use xxhash_rust::xxh3::xxh3_128;

use crate::blob::BlobStore;
use crate::endpoint::{
    EndpointOptions, EndpointRecorder, EndpointShared, EndpointStats, PAGE_FAULTS_NAME,
    TASK_CLOCK_NAME,
};
use crate::error::{RecorderError, Result};
use crate::perf::{
    Capabilities, HostPmus, PerfConfig, PerfStreams, PerfTarget, StepCounters, StreamKind,
    current_tid, monotonic_ns,
};

/// Which transfer payloads a recording stores (hashes are always recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PayloadPolicy {
    /// None: the pipeline replays from snapshots and the prompt.
    #[default]
    None,
    /// Only what crosses the pipeline's boundary: the tokens the last stage sends back to
    /// stage 0 (its output), enough to check a replay's result without re-running it.
    Boundary,
    /// Every transfer: any single stage can be replayed alone from its recorded inputs.
    All,
}

impl FromStr for PayloadPolicy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<PayloadPolicy, String> {
        match s {
            "none" => Ok(PayloadPolicy::None),
            "boundary" => Ok(PayloadPolicy::Boundary),
            "all" => Ok(PayloadPolicy::All),
            other => Err(format!(
                "unknown payload policy `{other}`; use none, boundary or all"
            )),
        }
    }
}

/// The transfer id the trace stores: the link in the top 24 bits, its sequence number below.
pub fn trace_transfer_id(t: &Transfer) -> u64 {
    u64::from(t.id.link.0) << 40 | (t.id.seq & ((1 << 40) - 1))
}

fn transport(kind: TransportKind) -> Transport {
    match kind {
        TransportKind::Local => Transport::Local,
        TransportKind::Shm => Transport::Shm,
        TransportKind::Tcp => Transport::Tcp,
    }
}

/// Logs every transfer of one endpoint with its content hash (and payload, by policy).
#[derive(Debug)]
pub struct TransferRecorder {
    shared: Arc<EndpointShared>,
    policy: PayloadPolicy,
    /// Tag layer of the token link (the model's layer count).
    token_layer: u32,
}

impl TransferRecorder {
    fn record(&self, t: &Transfer, bytes: &[u8], direction: Direction) {
        let hash = xxh3_128(bytes);
        let wanted = match self.policy {
            PayloadPolicy::None => false,
            PayloadPolicy::Boundary => t.tag.layer == self.token_layer,
            PayloadPolicy::All => true,
        };
        let payload = (wanted && self.shared.store_payload(hash, bytes)).then_some(hash);
        self.shared.append(&Event::Transfer(TransferEvent {
            id: trace_transfer_id(t),
            src_endpoint: t.src.endpoint.0,
            dst_endpoint: t.dst.endpoint.0,
            src_arena: t.src.arena.0,
            dst_arena: t.dst.arena.0,
            src_offset: t.src.offset,
            dst_offset: t.dst.offset,
            len: t.len,
            hash,
            post_ns: t.post_ns,
            complete_ns: t.complete_ns,
            transport: transport(t.transport),
            direction,
            payload,
        }));
    }
}

impl TransferObserver for TransferRecorder {
    fn posted(&self, transfer: &Transfer, bytes: &[u8]) {
        self.record(transfer, bytes, Direction::Send);
    }

    fn completed(&self, transfer: &Transfer, bytes: &[u8]) {
        self.record(transfer, bytes, Direction::Recv);
    }
}

/// Kernel spans, step boundaries and per-step counters of one stage.
#[derive(Debug)]
pub struct StageHooks {
    shared: Arc<EndpointShared>,
    /// Opened on the stage thread at its first step boundary (the hooks are built elsewhere).
    counters: Option<StepCounters>,
    want_counters: bool,
}

impl Hooks for StageHooks {
    fn kernel(&mut self, call: &KernelCall, _output: &mut [f32]) {
        self.shared.append(&Event::KernelSpan(KernelSpan {
            kernel: u32::from(call.kernel.index()),
            layer: call.layer.unwrap_or(u32::MAX),
            step: call.step,
            seq: call.seq,
            row_start: 0,
            row_end: call.rows,
            thread: 0,
            start_ns: call.start_ns,
            end_ns: call.end_ns,
            output_hash: None,
        }));
    }

    fn step_boundary(&mut self, step: u64, seq: u32) {
        let ns = monotonic_ns();
        self.shared
            .append(&Event::StepBoundary(StepBoundary { step, seq, ns }));
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

/// Settings shared by every endpoint of a recording.
#[derive(Debug, Clone)]
pub struct RecorderSettings {
    /// The trace directory.
    pub trace_dir: PathBuf,
    /// Payload policy.
    pub payloads: PayloadPolicy,
    /// Perf streams.
    pub perf: PerfConfig,
    /// Records per thread ring.
    pub ring_records: usize,
    /// Log frame size and zstd level.
    pub writer: WriterOptions,
}

/// Builds each stage's recorder and observers; collects their results at the end.
#[derive(Debug)]
pub struct RecorderFactory {
    settings: RecorderSettings,
    pmus: HostPmus,
    blobs: Option<Arc<BlobStore>>,
    endpoints: Mutex<Vec<EndpointRecorder>>,
    capabilities: Mutex<Option<Capabilities>>,
}

impl RecorderFactory {
    /// A factory recording into `settings.trace_dir` (which must exist).
    pub fn new(settings: RecorderSettings, pmus: HostPmus) -> Result<RecorderFactory> {
        // Payloads and Intel PT chunks are blobs; without either no store is created.
        let needs_blobs = settings.payloads != PayloadPolicy::None || pmus.intel_pt.is_ok();
        let blobs = match needs_blobs {
            true => Some(Arc::new(BlobStore::open(
                settings.trace_dir.join("payloads"),
                settings.writer.zstd_level,
            )?)),
            false => None,
        };
        Ok(RecorderFactory {
            settings,
            pmus,
            blobs,
            endpoints: Mutex::new(Vec::new()),
            capabilities: Mutex::new(None),
        })
    }

    fn start_stage(&self, stage: u32, layers: u32) -> Result<StageObservers> {
        let tid = current_tid();
        let (perf, caps) =
            PerfStreams::open(&self.pmus, &self.settings.perf, &PerfTarget::Thread(tid));
        let want_counters = perf.kinds().contains(&StreamKind::StepCounters);
        {
            // Every stage sees the same host: keep the first stage's report for the manifest.
            let mut c = self.capabilities.lock().unwrap_or_else(|p| p.into_inner());
            if c.is_none() {
                *c = Some(caps);
            }
        }
        let options = EndpointOptions {
            endpoint: stage,
            endpoints_dir: self.settings.trace_dir.join(slug_schema::ENDPOINTS_DIR),
            ring_records: self.settings.ring_records,
            writer: self.settings.writer,
        };
        let recorder = EndpointRecorder::start(&options, Some(perf), self.blobs.clone())?;
        let shared = Arc::clone(recorder.shared());
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(recorder);
        let transfers = Arc::new(TransferRecorder {
            shared: Arc::clone(&shared),
            policy: self.settings.payloads,
            token_layer: layers,
        });
        Ok(StageObservers {
            transfers: Observers::none().with(transfers),
            hooks: Box::new(StageHooks {
                shared,
                counters: None,
                want_counters,
            }),
        })
    }

    /// The perf capability report (after at least one stage started).
    pub fn capabilities(&self) -> Option<Capabilities> {
        self.capabilities
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops every endpoint's writer and returns each one's totals, in endpoint order.
    pub fn finish(&self) -> Vec<Result<EndpointStats>> {
        let mut all: Vec<EndpointRecorder> = self
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        all.sort_by_key(|e| e.shared().endpoint());
        all.into_iter().map(EndpointRecorder::finish).collect()
    }
}

impl ObserverFactory for RecorderFactory {
    fn stage_observers(
        &self,
        ctx: &StageContext<'_>,
    ) -> std::result::Result<StageObservers, TransportError> {
        self.start_stage(ctx.stage as u32, ctx.config.model.layers as u32)
            .map_err(|e: RecorderError| {
                TransportError::io(
                    format!("start the recorder of stage {}", ctx.stage),
                    std::io::Error::other(e.to_string()),
                )
            })
    }
}
