//! Recording on a `slug node`: the settings the coordinator sends, the node's capability
//! report, and the observer factory a node builds its stages' observers with.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use slug_schema::WriterOptions;
use slug_transport::TransportError;
use slug_transport::pipeline::{
    ObserverFactory, RecordSettings, StageContext, StageObservers, StageStateObserver,
};

use super::factory::{blob_store, observers, start_endpoint};
use super::settings::RecorderSettings;
use super::snapshots::Snapshots;
use crate::ebpf::{EbpfRequest, EbpfSession};
use crate::endpoint::EBPF_LOST_REASONS;
use crate::error::{RecorderError, Result};
use crate::perf::{Capabilities, PerfConfig};

/// Where stage `stage` records on a node and with which recorder settings, from the
/// [`RecordSettings`] the coordinator sent.
trait NodeRecording {
    /// `trace_dir`, or the endpoint's scratch directory when the run is collected (one per
    /// endpoint: the node a stage moved to may share a machine with the one it left).
    fn stage_dir(&self, endpoint: u32) -> std::result::Result<PathBuf, String>;
    /// The settings parsed, naming the one that does not parse.
    fn recorder_settings(&self, endpoint: u32) -> std::result::Result<RecorderSettings, String>;
}

impl NodeRecording for RecordSettings {
    fn stage_dir(&self, endpoint: u32) -> std::result::Result<PathBuf, String> {
        let Some(run) = &self.scratch_run else {
            return Ok(self.trace_dir.clone());
        };
        // The id names a directory: refuse anything that could step outside the temp dir.
        if run.is_empty() || !run.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(format!(
                "run id {run:?} is not made of letters, digits and dashes"
            ));
        }
        Ok(std::env::temp_dir().join(format!("slug-record-{run}-endpoint-{endpoint}")))
    }

    fn recorder_settings(&self, endpoint: u32) -> std::result::Result<RecorderSettings, String> {
        Ok(RecorderSettings {
            trace_dir: self.stage_dir(endpoint)?,
            payloads: self.payloads.parse()?,
            perf: PerfConfig {
                request: self
                    .perf
                    .parse()
                    .map_err(|e: RecorderError| e.to_string())?,
                freq_hz: self.perf_freq_hz,
                ring_pages_exp: match self.perf_ring_pages_exp {
                    None => PerfConfig::default().ring_pages_exp,
                    Some(e) if e <= 16 => e,
                    Some(e) => return Err(format!("perf ring of 2^{e} pages is too large")),
                },
                ..PerfConfig::default()
            },
            ring_records: self.ring_records,
            writer: WriterOptions::default(),
            progress: None,
            snapshot_every: self.snapshot_every,
            hash_kernels: self.hash_kernels,
            ebpf: if self.ebpf.is_empty() {
                EbpfRequest::None
            } else {
                self.ebpf
                    .parse()
                    .map_err(|e: RecorderError| e.to_string())?
            },
        })
    }
}

/// Folder of a recording on hosts that carries each node's [`NodeReport`] until the
/// coordinator merges them into the manifest.
pub const NODE_REPORTS_DIR: &str = "nodes";

/// What a node recording a stage on `--hosts` tells the coordinator about its machine.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodeReport {
    /// Perf capabilities: requested, available, captured, with reasons.
    pub capabilities: Vec<slug_schema::Capability>,
    /// One line per missing capability, naming its fallback.
    pub notices: Vec<String>,
    /// The node's hardware; `None` when /sys could not be read (said in `topology_error`).
    pub topology: Option<slug_schema::HostTopology>,
    /// Why `topology` is missing.
    pub topology_error: Option<String>,
}

impl NodeReport {
    fn new(caps: Capabilities) -> NodeReport {
        let host = crate::topology::host_name();
        let (topology, topology_error) = match crate::topology::host_topology(&host) {
            Ok(t) => (Some(t), None),
            Err(e) => (None, Some(e.to_string())),
        };
        NodeReport {
            capabilities: caps.entries,
            notices: caps.notices,
            topology,
            topology_error,
        }
    }

    /// The report's path for `endpoint` under a trace (or scratch) directory.
    pub fn path(dir: &std::path::Path, endpoint: u32) -> PathBuf {
        dir.join(NODE_REPORTS_DIR).join(format!("{endpoint}.json"))
    }

    fn write(&self, dir: &std::path::Path, endpoint: u32) -> Result<()> {
        let path = NodeReport::path(dir, endpoint);
        let parent = dir.join(NODE_REPORTS_DIR);
        std::fs::create_dir_all(&parent).map_err(|e| RecorderError::io(&parent, e))?;
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| RecorderError::io(&path, std::io::Error::other(e)))?;
        std::fs::write(&path, json).map_err(|e| RecorderError::io(&path, e))
    }

    /// Reads the report of `endpoint` from a trace directory.
    pub fn read(dir: &std::path::Path, endpoint: u32) -> Result<NodeReport> {
        let path = NodeReport::path(dir, endpoint);
        let bytes = std::fs::read(&path).map_err(|e| RecorderError::io(&path, e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| RecorderError::io(&path, std::io::Error::other(e)))
    }
}

/// The factory `slug node` serves stages with: records a stage when the coordinator's
/// configuration carries [`RecordSettings`], observes nothing otherwise. The stage's log closes
/// when the runtime drops the stage's observers.
#[derive(Debug, Default)]
pub struct NodeRecorderFactory {
    /// Per stage served, its snapshots (a node may serve several stages over its life).
    snapshots: Mutex<HashMap<usize, Snapshots>>,
}

impl ObserverFactory for NodeRecorderFactory {
    fn stage_observers(
        &self,
        ctx: &StageContext<'_>,
    ) -> std::result::Result<StageObservers, TransportError> {
        let Some(node) = ctx
            .config
            .observer_settings
            .as_ref()
            .and_then(|s| s.record.as_ref())
        else {
            return Ok(StageObservers::none());
        };
        let fail = |e: String| {
            TransportError::io(
                format!("start the recorder of stage {}", ctx.stage),
                std::io::Error::other(e),
            )
        };
        let settings = node.recorder_settings(ctx.endpoint).map_err(fail)?;
        if node.scratch_run.is_some() {
            // A scratch directory starts empty: a leftover of an earlier failed run with the
            // same id must not be collected as this run's.
            let dir = &settings.trace_dir;
            if dir.exists() {
                std::fs::remove_dir_all(dir)
                    .map_err(|e| fail(format!("clear {}: {e}", dir.display())))?;
            }
            let endpoints = dir.join(slug_schema::ENDPOINTS_DIR);
            std::fs::create_dir_all(&endpoints)
                .map_err(|e| fail(format!("create {}: {e}", endpoints.display())))?;
        }
        let started = (|| {
            let pmus = crate::perf::probe()?;
            let blobs = blob_store(&settings, &pmus)?;
            let ebpf = EbpfSession::open(&settings.ebpf, EBPF_LOST_REASONS);
            start_endpoint(&settings, &pmus, blobs, ctx, &ebpf)
        })();
        let (recorder, caps, want_counters) = started.map_err(|e| fail(e.to_string()))?;
        // The coordinator learns this node's capabilities (and, on another machine, its
        // topology) from this file, collected with the logs.
        NodeReport::new(caps)
            .write(&settings.trace_dir, ctx.endpoint)
            .map_err(|e| fail(e.to_string()))?;
        let recorder = Arc::new(recorder);
        let snapshots = Snapshots::new(&settings).map_err(|e| fail(e.to_string()))?;
        snapshots.remember(ctx.stage as u32, recorder.shared());
        self.snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ctx.stage, snapshots);
        Ok(observers(
            Arc::clone(recorder.shared()),
            Some(recorder),
            &settings,
            ctx.config.model.layers as u32,
            want_counters,
        ))
    }

    fn state_observer(
        &self,
        ctx: &StageContext<'_>,
    ) -> std::result::Result<Option<Box<dyn StageStateObserver>>, TransportError> {
        // The stage's snapshotter owns the writer from here: dropping it with the stage's
        // observers waits for every queued snapshot to reach the disk.
        let snapshots = self
            .snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ctx.stage);
        Ok(snapshots.and_then(|s| {
            let observer = s.observer(ctx.stage as u32);
            drop(s.writer.lock().unwrap_or_else(|p| p.into_inner()).take());
            observer
        }))
    }

    fn collected_files(&self, ctx: &StageContext<'_>) -> Option<PathBuf> {
        let node = ctx.config.observer_settings.as_ref()?.record.as_ref()?;
        node.scratch_run.as_ref()?;
        node.stage_dir(ctx.endpoint).ok()
    }
}
