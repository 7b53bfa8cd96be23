//! The observer factory of a local recording: per stage, its endpoint recorder, transfer
//! observers, kernel hooks and snapshotter.

use std::sync::{Arc, Mutex};

use slug_schema::blob::BlobStore;
use slug_transport::TransportError;
use slug_transport::pipeline::{ObserverFactory, StageContext, StageObservers, StageStateObserver};
use slug_transport::transfer::Observers;

use super::hooks::StageHooks;
use super::settings::RecorderSettings;
use super::snapshots::Snapshots;
use super::transfers::{PayloadPolicy, TransferRecorder};
use crate::ebpf::EbpfSession;
use crate::endpoint::{
    EBPF_LOST_REASONS, EndpointOptions, EndpointRecorder, EndpointShared, EndpointStats,
};
use crate::error::{RecorderError, Result};
use crate::perf::{Capabilities, HostPmus, PerfStreams, PerfTarget, StreamKind, current_tid};

/// Builds each stage's recorder and observers; collects their results at the end.
#[derive(Debug)]
pub struct RecorderFactory {
    settings: RecorderSettings,
    pmus: HostPmus,
    /// The process's probes (every stage is a thread of it) and their capability report.
    ebpf: (Option<Arc<EbpfSession>>, Capabilities),
    blobs: Option<Arc<BlobStore>>,
    endpoints: Mutex<Vec<EndpointRecorder>>,
    capabilities: Mutex<Option<Capabilities>>,
    snapshots: Snapshots,
}

impl RecorderFactory {
    /// A factory recording into `settings.trace_dir` (which must exist).
    pub fn new(settings: RecorderSettings, pmus: HostPmus) -> Result<RecorderFactory> {
        let blobs = blob_store(&settings, &pmus)?;
        let snapshots = Snapshots::new(&settings)?;
        let ebpf = EbpfSession::open(&settings.ebpf, EBPF_LOST_REASONS);
        Ok(RecorderFactory {
            settings,
            pmus,
            ebpf,
            blobs,
            endpoints: Mutex::new(Vec::new()),
            capabilities: Mutex::new(None),
            snapshots,
        })
    }

    fn start_stage(&self, ctx: &StageContext<'_>) -> Result<StageObservers> {
        let (stage, layers) = (ctx.stage as u32, ctx.config.model.layers as u32);
        let (recorder, caps, want_counters) = start_endpoint(
            &self.settings,
            &self.pmus,
            self.blobs.clone(),
            ctx,
            &self.ebpf,
        )?;
        {
            // Every stage sees the same host: keep the first stage's report for the manifest.
            let mut c = self.capabilities.lock().unwrap_or_else(|p| p.into_inner());
            if c.is_none() {
                *c = Some(caps);
            }
        }
        let shared = Arc::clone(recorder.shared());
        self.snapshots.remember(stage, &shared);
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(recorder);
        Ok(observers(
            shared,
            None,
            &self.settings,
            layers,
            want_counters,
        ))
    }

    /// The perf capability report (after at least one stage started).
    pub fn capabilities(&self) -> Option<Capabilities> {
        self.capabilities
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until every snapshot taken is on disk; returns how many were written.
    pub fn finish_snapshots(&self) -> Result<usize> {
        self.snapshots.finish()
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
        if let Some(e) = &self.ebpf.0 {
            e.stop();
        }
        all.into_iter().map(EndpointRecorder::finish).collect()
    }
}

/// Opens the perf streams on the calling (stage) thread and starts the endpoint's recorder,
/// fed the events of its threads by the process's eBPF probes (`ebpf`, with their report).
pub(super) fn start_endpoint(
    settings: &RecorderSettings,
    pmus: &HostPmus,
    blobs: Option<Arc<BlobStore>>,
    ctx: &StageContext<'_>,
    ebpf: &(Option<Arc<EbpfSession>>, Capabilities),
) -> Result<(EndpointRecorder, Capabilities, bool)> {
    let mut perf_config = settings.perf.clone();
    if let Some(session) = &ebpf.0 {
        perf_config.covered_by_ebpf = session.covered_perf_streams();
    }
    let (perf, mut caps) =
        PerfStreams::open(pmus, &perf_config, &PerfTarget::Thread(current_tid()));
    caps.entries.extend(ebpf.1.entries.iter().cloned());
    caps.notices.extend(ebpf.1.notices.iter().cloned());
    let want_counters = perf.kinds().contains(&StreamKind::StepCounters);
    let options = EndpointOptions {
        endpoint: ctx.endpoint,
        endpoints_dir: settings.trace_dir.join(slug_schema::ENDPOINTS_DIR),
        ring_records: settings.ring_records,
        writer: settings.writer,
        // Events count toward the run's own progress when someone watches it (a node sends
        // its stage's count with each heartbeat).
        progress: settings.progress.clone().or_else(|| {
            ctx.config
                .progress
                .as_ref()
                .and_then(|p| p.events_of(ctx.stage))
        }),
        ebpf: ebpf.0.clone(),
    };
    let recorder = EndpointRecorder::start(&options, Some(perf), blobs)?;
    Ok((recorder, caps, want_counters))
}

pub(super) fn observers(
    shared: Arc<EndpointShared>,
    owner: Option<Arc<EndpointRecorder>>,
    settings: &RecorderSettings,
    layers: u32,
    want_counters: bool,
) -> StageObservers {
    let transfers = Arc::new(TransferRecorder {
        shared: Arc::clone(&shared),
        _recorder: owner.clone(),
        policy: settings.payloads,
        token_layer: layers,
    });
    StageObservers {
        transfers: Observers::none().with(transfers),
        hooks: Box::new(StageHooks {
            shared,
            _recorder: owner,
            counters: None,
            want_counters,
            hash_kernels: settings.hash_kernels,
        }),
    }
}

pub(super) fn blob_store(
    settings: &RecorderSettings,
    pmus: &HostPmus,
) -> Result<Option<Arc<BlobStore>>> {
    // Payloads and Intel PT chunks are blobs; without either no store is created.
    if settings.payloads == PayloadPolicy::None && pmus.intel_pt.is_err() {
        return Ok(None);
    }
    Ok(Some(Arc::new(BlobStore::open(
        settings.trace_dir.join(slug_schema::PAYLOADS_DIR),
        settings.writer.zstd_level,
    )?)))
}

impl ObserverFactory for RecorderFactory {
    fn stage_observers(
        &self,
        ctx: &StageContext<'_>,
    ) -> std::result::Result<StageObservers, TransportError> {
        self.start_stage(ctx).map_err(|e: RecorderError| {
            TransportError::io(
                format!("start the recorder of stage {}", ctx.stage),
                std::io::Error::other(e.to_string()),
            )
        })
    }

    fn state_observer(
        &self,
        ctx: &StageContext<'_>,
    ) -> std::result::Result<Option<Box<dyn StageStateObserver>>, TransportError> {
        Ok(self.snapshots.observer(ctx.stage as u32))
    }
}
