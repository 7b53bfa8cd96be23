//! `record`: runs a pipeline with every endpoint recorded into a new trace directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use serde::Serialize;
use slug_schema::{
    EndpointInfo, Event, EventKind, KindSet, Manifest, NodeClock, TimeRange, Trace, WriterOptions,
};
use slug_transport::pipeline::{
    NoObservers, ObserverSettings, PipelineConfig, RecordSettings, RunReport,
    continuation_endpoint, run, run_on_nodes_collecting,
};
use slug_transport::transfer::TransportKind;

use crate::ebpf::EbpfRequest;
use crate::endpoint::{EndpointStats, PERF_FULL_REASON};
use crate::error::{RecorderError, Result};
use crate::flight::{DEFAULT_RING_RECORDS, ring_file_len};

use crate::observe::{
    NODE_REPORTS_DIR, NodeReport, PayloadPolicy, RecorderFactory, RecorderSettings,
};
use crate::out_dir::{SpaceNeeded, human_bytes, prepare_out};
use crate::perf::{Capabilities, PerfConfig, probe};
use crate::topology::host_topology;
use slug_schema::snapshot::SnapshotStore;

/// What to record and where.
#[derive(Debug, Clone)]
pub struct RecordConfig {
    /// The trace directory to create.
    pub out: PathBuf,
    /// Replace the slug trace in a non-empty `out` (nothing else: see `prepare_out`).
    pub force: bool,
    /// Which payloads to store.
    pub payloads: PayloadPolicy,
    /// Perf streams.
    pub perf: PerfConfig,
    /// Records per thread ring.
    pub ring_records: usize,
    /// Counts events as endpoints write them (local transport), for a progress display.
    pub progress: Option<Arc<AtomicU64>>,
    /// Snapshot every stage at step 0 and every K steps (`Some(0)`: step 0 only); `None`: none.
    pub snapshot_every: Option<u64>,
    /// Hash every kernel output into its span, so `slug replay --verify kernel` can name it.
    pub hash_kernels: bool,
    /// eBPF endpoint probes.
    pub ebpf: EbpfRequest,
    /// The RDMA device the run's links write with, as the recording process found it (an
    /// rdma run started here; `None` elsewhere), for the manifest's `rdma_verbs` capability.
    pub rdma_device: Option<String>,
}

impl RecordConfig {
    /// Defaults: no payloads, `--perf auto` at 1 kHz, 128 Ki-record rings, a step-0 snapshot of
    /// every stage, no kernel hashes.
    pub fn new(out: impl Into<PathBuf>) -> RecordConfig {
        RecordConfig {
            out: out.into(),
            force: false,
            payloads: PayloadPolicy::None,
            perf: PerfConfig::default(),
            ring_records: DEFAULT_RING_RECORDS,
            progress: None,
            snapshot_every: Some(0),
            hash_kernels: false,
            ebpf: EbpfRequest::Auto,
            rdma_device: None,
        }
    }
}

/// What recording one endpoint wrote: its share of a [`RecordSummary`] (what its log holds
/// when read back is `slug_schema::EndpointSummary`).
#[derive(Debug, Clone, Serialize)]
pub struct EndpointRecording {
    /// Endpoint id.
    pub endpoint: u32,
    /// Events written to its log.
    pub events: u64,
    /// Events per kind name.
    pub counts: Vec<(String, u64)>,
    /// Log bytes on disk.
    pub bytes: u64,
    /// The same events as raw 128-byte records.
    pub raw_bytes: u64,
    /// Events lost (full rings, perf rings).
    pub lost: u64,
    /// Payload blobs written.
    pub payloads: u64,
    /// Their compressed bytes.
    pub payload_bytes: u64,
    /// Problems that did not stop the run.
    pub warnings: Vec<String>,
}

/// Room each endpoint's log and journal need for their first writes, checked before the run.
const LOG_HEADROOM: u64 = 64 << 10;

/// Data a recording lost: what, how much and why. A recording with any is not complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Loss {
    /// The endpoint that lost it (`None`: the trace as a whole, e.g. snapshots).
    pub endpoint: Option<u32>,
    /// What was lost, e.g. "events not written to the log".
    pub what: String,
    /// How many events (or payloads) were lost.
    pub count: u64,
    /// Their bytes (raw 128-byte records for events, uncompressed bytes for payloads; 0 when
    /// unknown).
    pub bytes: u64,
    /// Why, e.g. "No space left on device (os error 28)".
    pub why: String,
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(e) = self.endpoint {
            write!(f, "endpoint {e}: ")?;
        }
        write!(f, "{}", self.what)?;
        if self.count > 0 {
            write!(f, ": {}", self.count)?;
        }
        if self.bytes > 0 {
            write!(f, " ({})", human_bytes(self.bytes))?;
        }
        write!(f, ", because {}", self.why)
    }
}

/// What `record` did.
#[derive(Debug, Clone, Serialize)]
pub struct RecordSummary {
    /// The trace directory.
    pub trace: PathBuf,
    /// Generated tokens per sequence.
    pub tokens: Vec<Vec<u32>>,
    /// Throughput of the recorded run.
    pub tokens_per_s: f64,
    /// Per endpoint.
    pub endpoints: Vec<EndpointRecording>,
    /// One line per capability that is missing, with its fallback.
    pub notices: Vec<String>,
    /// Capability names that were captured.
    pub captured: Vec<String>,
    /// Capability names that were asked for and not captured.
    pub not_captured: Vec<String>,
    /// Problems of the trace as a whole that did not stop the run.
    pub warnings: Vec<String>,
    /// Data the recording lost (empty: everything asked for was recorded, except perf samples
    /// the kernel itself dropped, which are counted in each endpoint's `lost`).
    pub losses: Vec<Loss>,
}

impl RecordSummary {
    /// Total events over all endpoints.
    pub fn events(&self) -> u64 {
        self.endpoints.iter().map(|e| e.events).sum()
    }

    /// Raw bytes over compressed bytes of all logs.
    pub fn compression_ratio(&self) -> f64 {
        let bytes: u64 = self.endpoints.iter().map(|e| e.bytes).sum();
        let raw: u64 = self.endpoints.iter().map(|e| e.raw_bytes).sum();
        raw as f64 / bytes.max(1) as f64
    }
}

/// What endpoint `s` lost, and why.
fn losses_of(s: &EndpointStats) -> Vec<Loss> {
    let e = Some(s.endpoint);
    let raw = slug_schema::RawRecord::SIZE as u64;
    let mut out = Vec::new();
    if s.unringed > 0 {
        out.push(Loss {
            endpoint: e,
            what: "events lost: no flight ring could be created for a thread".into(),
            count: s.unringed,
            bytes: s.unringed * raw,
            why: s.ring_error.clone().unwrap_or_default(),
        });
    }
    let full = s.ring_lost - s.unringed;
    if full > 0 {
        out.push(Loss {
            endpoint: e,
            what: "events dropped by full flight rings".into(),
            count: full,
            bytes: full * raw,
            why: "the endpoint's writer fell behind its threads".into(),
        });
    }
    if let Some(why) = &s.log_error {
        let lost = s.drained.saturating_sub(s.log.events);
        out.push(Loss {
            endpoint: e,
            what: format!(
                "events not written to its log ({} of {} are in it; its journal and rings were \
                 kept for `slug recover`)",
                s.log.events, s.drained
            ),
            count: lost,
            bytes: lost * raw,
            why: why.clone(),
        });
    }
    if s.payload_failures > 0 {
        out.push(Loss {
            endpoint: e,
            what: "payloads not stored".into(),
            count: s.payload_failures,
            bytes: s.payload_failed_bytes,
            why: s.payload_error.clone().unwrap_or_default(),
        });
    }
    out
}

fn summarize_stats(s: EndpointStats) -> EndpointRecording {
    EndpointRecording {
        endpoint: s.endpoint,
        events: s.log.events,
        counts: EventKind::ALL
            .iter()
            .map(|k| (k.name().to_string(), s.log.counts[*k as usize]))
            .filter(|(_, n)| *n > 0)
            .collect(),
        bytes: s.log.bytes,
        raw_bytes: s.log.raw_bytes,
        lost: s.ring_lost + s.perf_lost + s.ebpf_lost,
        payloads: s.payloads,
        payload_bytes: s.payload_bytes,
        warnings: s.warnings,
    }
}

/// An endpoint's summary read back from its closed log (the node that wrote it is gone).
fn summarize_log(
    trace: &Trace,
    endpoint: u32,
    losses: &mut Vec<Loss>,
) -> Result<EndpointRecording> {
    let log = trace.endpoint_log(endpoint).map_err(|e| RecorderError::OutputDir {
        path: trace.dir().to_path_buf(),
        problem: format!(
            "stage {endpoint} left no readable log ({e}); the `slug node` processes must record \
             (serve with slug_recorder::observe::NodeRecorderFactory)"
        ),
    })?;
    let counts = log.counts();
    let events: u64 = counts.iter().sum();
    let lost = log
        .events_in(TimeRange::ALL, KindSet::of(&[EventKind::LostEvents]))
        .filter_map(|e| match e {
            Ok(Event::LostEvents(l)) => Some(l),
            _ => None,
        })
        .collect::<Vec<_>>();
    // Perf samples the kernel dropped are sampling, not lost recording.
    let recording_lost: u64 = lost
        .iter()
        .filter(|l| l.reason != PERF_FULL_REASON)
        .map(|l| l.count)
        .sum();
    let lost = lost.iter().map(|l| l.count).sum();
    let (payloads, payload_bytes) = stored_payloads(trace, &log);
    let mut warnings = Vec::new();
    if !log.recovery().is_clean() {
        warnings.push(format!("log was not closed cleanly: {:?}", log.recovery()));
    }
    if recording_lost > 0 {
        losses.push(Loss {
            endpoint: Some(endpoint),
            what: "events recorded as lost in its log".into(),
            count: recording_lost,
            bytes: 0,
            why: "its node's flight rings were full or a payload could not be stored".into(),
        });
    }
    if !log.recovery().is_clean() {
        losses.push(Loss {
            endpoint: Some(endpoint),
            what: "its log was not closed cleanly".into(),
            count: 0,
            bytes: log.recovery().truncated_bytes + log.recovery().corrupt_bytes,
            why: "its node's recorder stopped before closing it".into(),
        });
    }
    Ok(EndpointRecording {
        endpoint,
        events,
        counts: EventKind::ALL
            .iter()
            .map(|k| (k.name().to_string(), counts[*k as usize]))
            .filter(|(_, n)| *n > 0)
            .collect(),
        bytes: log.file_len(),
        raw_bytes: events * slug_schema::RawRecord::SIZE as u64,
        lost,
        payloads,
        payload_bytes,
        warnings,
    })
}

/// The payloads a node stored for `log`'s endpoint, as far as the trace shows: the distinct
/// payloads its transfers reference that lie in the trace's payload store, and their bytes
/// on disk (a payload both ends of a link reference counts at both).
fn stored_payloads(trace: &Trace, log: &slug_schema::LogReader) -> (u64, u64) {
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0u64;
    let dir = trace.dir().join(slug_schema::PAYLOADS_DIR);
    let transfers = log.events_in(
        TimeRange::new(0, u64::MAX),
        KindSet::of(&[EventKind::Transfer]),
    );
    for e in transfers {
        let Ok(Event::Transfer(t)) = e else {
            continue;
        };
        let Some(hash) = t.payload.filter(|h| seen.insert(*h)) else {
            continue;
        };
        let hex = format!("{hash:032x}");
        let path = dir.join(&hex[..2]).join(format!("{hex}.zst"));
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => bytes += m.len(),
            _ => {
                seen.remove(&hash);
            }
        }
    }
    (seen.len() as u64, bytes)
}

/// Runs `pipeline` with every endpoint recorded into `cfg.out`; prints nothing (the CLI prints
/// the summary, including one line per missing capability).
///
/// `local`: stages are threads of this process, recorded by a [`RecorderFactory`]. `shm` and
/// `tcp`: each stage is a launched `slug node` process that records itself
/// ([`crate::observe::NodeRecorderFactory`]) into the same directory. `tcp` on `hosts`: each
/// node records into a scratch directory of its own, and the coordinator collects the files over
/// the node connections when the run ends (no shared file system needed).
pub fn record(cfg: &RecordConfig, pipeline: &PipelineConfig) -> Result<RecordSummary> {
    record_with(cfg, pipeline, None)
}

/// Runs a pipeline whose stages some launcher outside this crate starts, each recording
/// itself as a `slug node` would: `run` gets the configuration with the recorder's node
/// settings (each stage records into a scratch directory of its own host) and must run every
/// stage and place their files into `cfg.out` before it returns, as MPI rank 0 does for
/// `mpirun ... slug record --transport mpi` (ranks = stages, no shared file system).
pub type StageRunner<'a> = &'a mut dyn FnMut(&PipelineConfig) -> slug_transport::Result<RunReport>;

/// [`record`], with the stages started by `runner` when one is given (see [`StageRunner`]).
pub fn record_with(
    cfg: &RecordConfig,
    pipeline: &PipelineConfig,
    mut runner: Option<StageRunner<'_>>,
) -> Result<RecordSummary> {
    pipeline
        .validate()
        .map_err(|e| RecorderError::Pipeline(Box::new(e)))?;
    // Stages recorded elsewhere, their files collected into `out` at the end.
    let on_hosts = !pipeline.hosts.is_empty() || runner.is_some();
    // Every stage recorded on this machine preallocates its first flight ring now-ish: make a
    // full disk show before the run, not as lost events (nodes on --hosts record remotely).
    let ring = ring_file_len(cfg.ring_records);
    let space = (!on_hosts).then(|| SpaceNeeded {
        bytes: pipeline.stages as u64 * ring,
        what: format!(
            "{} endpoint{} × a flight ring of {}",
            pipeline.stages,
            if pipeline.stages == 1 { "" } else { "s" },
            human_bytes(ring)
        ),
        headroom: pipeline.stages as u64 * LOG_HEADROOM,
    });
    prepare_out(&cfg.out, cfg.force, space.as_ref())?;
    let host = crate::topology::host_name();
    let mut manifest = Manifest::new(serde_json::json!({
        "pipeline": pipeline,
        "payloads": cfg.payloads.to_string(),
        "perf_freq_hz": cfg.perf.freq_hz,
        "snapshot_every": cfg.snapshot_every,
        "hash_kernels": cfg.hash_kernels,
    }));
    manifest.endpoints = (0..pipeline.stages as u32)
        .map(|s| EndpointInfo {
            id: s,
            node: host.clone(),
            host: host.clone(),
            rank: 0,
            stage: s,
            log: Trace::log_path_for(s),
            continues: None,
            steps: None,
        })
        .collect();
    manifest.clocks = vec![NodeClock {
        node: host.clone(),
        offset_ns: 0,
        uncertainty_ns: 0,
    }];
    manifest.topology = vec![host_topology(&host)?];
    let mut trace =
        Trace::create(&cfg.out, manifest).map_err(|e| RecorderError::Schema(Box::new(e)))?;
    let settings = RecorderSettings {
        trace_dir: cfg.out.clone(),
        payloads: cfg.payloads,
        perf: cfg.perf.clone(),
        ring_records: cfg.ring_records,
        writer: WriterOptions::default(),
        progress: cfg.progress.clone(),
        snapshot_every: cfg.snapshot_every,
        hash_kernels: cfg.hash_kernels,
        ebpf: cfg.ebpf.clone(),
    };
    let pmus = probe()?;
    let mut snapshot_warning = None;
    let mut losses = Vec::new();
    // On hosts: the nodes' own topologies (this machine ran no stage) and problems reading them.
    let mut manifest_topology = None;
    let mut node_warnings = Vec::new();
    let (report, endpoints, caps) = if pipeline.transport == TransportKind::Local {
        let factory = RecorderFactory::new(settings, pmus)?;
        let report = run(pipeline, &factory);
        // Close every log even when the run failed: what was recorded up to the failure is kept.
        let snapshots = factory.finish_snapshots();
        let stats = factory.finish();
        let report = report.map_err(|e| RecorderError::Pipeline(Box::new(e)))?;
        if let Err(e) = snapshots {
            snapshot_warning = Some(format!("snapshots incomplete: {e}"));
            losses.push(Loss {
                endpoint: None,
                what: "snapshots not written".into(),
                count: 0,
                bytes: 0,
                why: e.to_string(),
            });
        }
        // A write failure (disk full, permissions) ends that endpoint's log, not the run: it
        // becomes a warning of its summary.
        let endpoints = stats
            .into_iter()
            .enumerate()
            .map(|(i, s)| match s {
                Ok(s) => {
                    losses.extend(losses_of(&s));
                    summarize_stats(s)
                }
                Err(e) => {
                    losses.push(Loss {
                        endpoint: Some(i as u32),
                        what: "its whole recording".into(),
                        count: 0,
                        bytes: 0,
                        why: e.to_string(),
                    });
                    EndpointRecording {
                        endpoint: i as u32,
                        events: 0,
                        counts: Vec::new(),
                        bytes: 0,
                        raw_bytes: 0,
                        lost: 0,
                        payloads: 0,
                        payload_bytes: 0,
                        warnings: vec![format!("recording stopped: {e}")],
                    }
                }
            })
            .collect::<Vec<_>>();
        (
            report,
            endpoints,
            factory.capabilities().unwrap_or_default(),
        )
    } else {
        // Each stage is a `slug node` process that records itself (NodeRecorderFactory): into
        // the same directory on this machine, or into a scratch directory of its own on --hosts
        // (no shared file system), collected over the node's control connection at the end.
        let node = RecordSettings {
            trace_dir: std::path::absolute(&cfg.out).map_err(|e| RecorderError::io(&cfg.out, e))?,
            payloads: cfg.payloads.to_string(),
            perf: cfg.perf.request.to_string(),
            perf_freq_hz: cfg.perf.freq_hz,
            perf_ring_pages_exp: Some(cfg.perf.ring_pages_exp),
            ring_records: cfg.ring_records,
            snapshot_every: cfg.snapshot_every,
            hash_kernels: cfg.hash_kernels,
            ebpf: cfg.ebpf.to_string(),
            scratch_run: on_hosts.then(run_id),
        };
        let mut p = pipeline.clone();
        p.observer_settings = Some(ObserverSettings {
            record: Some(node),
            replay: None,
        });
        if !on_hosts {
            p.on_move = Some(list_moves_as_they_commit(&trace, pipeline));
        }
        let report = if let Some(run_stages) = runner.as_mut() {
            run_stages(&p)
        } else if on_hosts {
            slug_transport::auth::ClusterKey::resolve(p.key_file.as_deref())
                .and_then(|key| run_on_nodes_collecting(&p, &p.hosts, &key, Some(&cfg.out)))
        } else {
            run(&p, &NoObservers)
        }
        .map_err(|e| RecorderError::Pipeline(Box::new(e)))?;
        if report.migrations.iter().any(|m| m.moved) {
            // The nodes the stages moved to wrote logs of their own: list them before reading.
            let mut manifest = trace.manifest().clone();
            add_continuations(&mut manifest, pipeline, &report.migrations);
            trace
                .set_manifest(manifest)
                .map_err(|e| RecorderError::Schema(Box::new(e)))?;
        }
        let ids: Vec<u32> = trace.manifest().endpoints.iter().map(|e| e.id).collect();
        if pipeline.control.is_some() || !pipeline.migrations.is_empty() {
            node_warnings.extend(remove_unused_continuations(&cfg.out, pipeline.stages, &ids));
        }
        let endpoints = ids
            .iter()
            .map(|&id| summarize_log(&trace, id, &mut losses))
            .collect::<Result<Vec<_>>>()?;
        // Every node reports what it could record (on --hosts, its topology too).
        let mut topology = None;
        let caps = node_reports(&cfg.out, &ids, &mut topology, &mut node_warnings);
        if on_hosts {
            manifest_topology = topology;
        }
        (report, endpoints, caps)
    };
    let mut manifest = trace.manifest().clone();
    if on_hosts {
        place_endpoints(&mut manifest, &report);
        place_moved(&mut manifest, &report);
        if report.transport == TransportKind::Mpi {
            manifest.mpi = Some(mpi_table(pipeline.stages as u32));
        }
        if let Some(t) = manifest_topology {
            manifest.topology = t;
        }
    }
    manifest.capabilities = caps.entries.clone();
    manifest.capabilities.push(slug_schema::Capability {
        name: format!("payloads_{}", cfg.payloads),
        requested: true,
        available: true,
        captured: true,
        reason: None,
    });
    let mut warnings: Vec<String> = snapshot_warning.into_iter().chain(node_warnings).collect();
    let snapshots_written = snapshot_count(&cfg.out).unwrap_or_else(|e| {
        warnings.push(format!("cannot count the snapshots written: {e}"));
        0
    });
    manifest.capabilities.push(slug_schema::Capability {
        name: "snapshots".into(),
        requested: cfg.snapshot_every.is_some(),
        available: true,
        captured: snapshots_written > 0,
        reason: match cfg.snapshot_every {
            None => Some("--no-snapshots: a replay rebuilds stages from the seed".into()),
            Some(_) if snapshots_written == 0 => Some("no snapshot was written".into()),
            Some(0) => Some(format!("{snapshots_written} (step 0 of every stage)")),
            Some(k) => Some(format!("{snapshots_written} (step 0 and every {k} steps)")),
        },
    });
    manifest.capabilities.push(slug_schema::Capability {
        name: slug_schema::STAGE_OUTPUT_HASHES.into(),
        requested: true,
        available: true,
        captured: true,
        reason: Some("the last stage's logits (kernel head), every step".into()),
    });
    if pipeline.transport == TransportKind::Rdma {
        manifest.capabilities.push(slug_schema::Capability {
            name: "rdma_verbs".into(),
            requested: true,
            available: true,
            captured: true,
            reason: Some(match &cfg.rdma_device {
                Some(dev) => format!("links wrote with RDMA WRITE WITH IMMEDIATE on {dev}"),
                None => "links wrote with RDMA WRITE WITH IMMEDIATE on each node's device".into(),
            }),
        });
    }
    manifest.capabilities.push(slug_schema::Capability {
        name: "kernel_hashes".into(),
        requested: cfg.hash_kernels,
        available: true,
        captured: cfg.hash_kernels,
        reason: None,
    });
    if let Err(e) = trace.set_manifest(manifest) {
        warnings.push(format!(
            "the manifest keeps its initial content (no capability report): {e}"
        ));
    }
    Ok(RecordSummary {
        trace: cfg.out.clone(),
        warnings,
        losses,
        tokens: report.tokens,
        tokens_per_s: report.tokens_per_s,
        endpoints,
        notices: caps.notices,
        captured: caps
            .entries
            .iter()
            .filter(|c| c.captured)
            .map(|c| c.name.clone())
            .collect(),
        not_captured: caps
            .entries
            .iter()
            .filter(|c| c.requested && !c.captured)
            .map(|c| c.name.clone())
            .collect(),
    })
}

/// Merges the nodes' reports (collected under `out`) into one capability report (a capability
/// counts as captured only if every node captured it) and their topologies, then removes them.
fn node_reports(
    out: &Path,
    endpoints: &[u32],
    topology: &mut Option<Vec<slug_schema::HostTopology>>,
    warnings: &mut Vec<String>,
) -> Capabilities {
    let mut caps = Capabilities::default();
    let mut topologies: Vec<slug_schema::HostTopology> = Vec::new();
    for &s in endpoints {
        let report = match NodeReport::read(out, s) {
            Ok(r) => r,
            Err(e) => {
                warnings.push(format!(
                    "endpoint {s}: no capability report from its node ({e})"
                ));
                continue;
            }
        };
        for c in report.capabilities {
            match caps.entries.iter_mut().find(|e| e.name == c.name) {
                Some(e) => {
                    e.available &= c.available;
                    e.captured &= c.captured;
                    if e.reason.is_none() {
                        e.reason = c.reason.map(|r| format!("stage {s}: {r}"));
                    }
                }
                None => caps.entries.push(c),
            }
        }
        for n in report.notices {
            if !caps.notices.contains(&n) {
                caps.notices.push(n);
            }
        }
        match (report.topology, report.topology_error) {
            (Some(t), _) if !topologies.iter().any(|k| k.node == t.node) => topologies.push(t),
            (Some(_), _) => {}
            (None, e) => warnings.push(format!(
                "stage {s}: its node could not read its topology ({})",
                e.unwrap_or_default()
            )),
        }
    }
    if !topologies.is_empty() {
        *topology = Some(topologies);
    }
    let dir = out.join(NODE_REPORTS_DIR);
    if let Err(e) = std::fs::remove_dir_all(&dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warnings.push(format!("cannot remove {}: {e}", dir.display()));
    }
    caps
}

/// A run id unique enough to name the nodes' scratch directories (letters, digits, dashes).
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}-{:x}", std::process::id(), nanos)
}

/// Names each endpoint's real node (`host:port` of its `slug node`) and host, and gives every
/// node the clock offset measured when the coordinator connected, so that timelines align.
/// The manifest's `mpi` table of a run of `stages` ranks: what the MPI link backend used, from
/// the definitions it sends with ([`slug_transport::mpi_wire`]).
fn mpi_table(stages: u32) -> slug_schema::MpiTable {
    use slug_transport::mpi_wire::{COMMUNICATOR, INLINE, header_tag, link_ranks, payload_tag};
    let links = if stages < 2 { 0 } else { stages };
    slug_schema::MpiTable {
        communicator: COMMUNICATOR.to_string(),
        inline_limit: INLINE as u64,
        links: (0..links)
            .map(|link| {
                let (source_rank, dest_rank) = link_ranks(stages, link);
                slug_schema::MpiLink {
                    link,
                    source_rank,
                    dest_rank,
                    header_tag: header_tag(link).unsigned_abs(),
                    payload_tag: payload_tag(link).unsigned_abs(),
                }
            })
            .collect(),
    }
}

fn place_endpoints(manifest: &mut Manifest, report: &RunReport) {
    manifest.clocks.clear();
    let mpi = report.transport == TransportKind::Mpi;
    for r in &report.stage_reports {
        if mpi {
            // Ranks share hosts: each rank is a node of its own, with its own clock offset
            // from rank 0 (the reference, offset 0), measured over MPI.
            let node = format!("rank {} on {}", r.stage, r.host);
            if let Some(ep) = manifest
                .endpoints
                .iter_mut()
                .find(|e| e.stage == r.stage as u32)
            {
                ep.node = node.clone();
                ep.host = r.host.clone();
                ep.rank = r.stage as u32;
            }
            let (offset_ns, uncertainty_ns) = r
                .clock
                .map_or((0, 0), |c| (-c.offset_ns, c.rtt_ns.unsigned_abs() / 2));
            manifest.clocks.push(NodeClock {
                node,
                offset_ns,
                uncertainty_ns,
            });
            continue;
        }
        let host = r
            .host
            .rsplit_once(':')
            .map_or(r.host.as_str(), |(h, _)| h)
            .trim_matches(['[', ']'])
            .to_string();
        // The stage's last endpoint: the node it ran on at the end (a moved stage's earlier
        // endpoints are placed by `place_moved`).
        if let Some(ep) = manifest
            .endpoints
            .iter_mut()
            .filter(|e| e.stage == r.stage as u32)
            .max_by_key(|e| e.steps.map_or(0, |s| s[0]))
        {
            ep.node = r.host.clone();
            ep.host = host;
        }
        if let Some(c) = r.clock {
            // The measured offset is node minus coordinator; the manifest's is what to add
            // to the node's clock to get the coordinator's (the reference).
            manifest.clocks.push(NodeClock {
                node: r.host.clone(),
                offset_ns: -c.offset_ns,
                uncertainty_ns: c.rtt_ns.unsigned_abs() / 2,
            });
        }
    }
}

/// Places the first endpoint of every stage that moved on the node the stage left (the
/// endpoints the stage moved to are on their target nodes already) and gives every node of a
/// move its clock offset, measured when the coordinator connected.
fn place_moved(manifest: &mut Manifest, report: &RunReport) {
    for m in report.migrations.iter().filter(|m| m.moved) {
        let id = continuation_endpoint(report.stage_reports.len(), m.index);
        let before = manifest
            .endpoints
            .iter()
            .find(|e| e.id == id)
            .and_then(|e| e.continues);
        if let Some(first) = before.and_then(|b| {
            manifest
                .endpoints
                .iter_mut()
                .find(|e| e.id == b && e.continues.is_none())
        }) {
            first.node = m.from.clone();
            first.host = host_of(&m.from);
        }
        for (node, clock) in [&m.from, &m.to].into_iter().zip(m.clocks.iter().flatten()) {
            if !manifest.clocks.iter().any(|c| &c.node == node) {
                manifest.clocks.push(NodeClock {
                    node: node.clone(),
                    offset_ns: -clock.offset_ns,
                    uncertainty_ns: clock.rtt_ns.unsigned_abs() / 2,
                });
            }
        }
    }
}

/// The host part of a node's `host:port` address.
fn host_of(addr: &str) -> String {
    addr.rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_matches(['[', ']'])
        .to_string()
}

/// Lists the endpoint each move of the run started on the node it moved the stage to (its log
/// continues the stage's log from the move's step), the steps every endpoint of a moved stage
/// ran, and the clock offset of each target node (measured when the coordinator connected).
fn add_continuations(
    manifest: &mut Manifest,
    pipeline: &PipelineConfig,
    migrations: &[slug_transport::pipeline::MigrationReport],
) {
    let end = pipeline.forward_steps();
    let mut moved: Vec<&slug_transport::pipeline::MigrationReport> =
        migrations.iter().filter(|m| m.moved).collect();
    moved.sort_by_key(|m| m.index);
    // Per stage, the endpoint running it after the moves so far.
    let mut current: Vec<u32> = (0..pipeline.stages as u32).collect();
    for m in moved {
        let Some(&before) = current.get(m.stage) else {
            continue;
        };
        let id = continuation_endpoint(pipeline.stages, m.index);
        if let Some(prev) = manifest.endpoints.iter_mut().find(|e| e.id == before) {
            let first = prev.steps.map_or(0, |s| s[0]);
            prev.steps = Some([first, m.at_step]);
        }
        manifest.endpoints.push(EndpointInfo {
            id,
            node: m.to.clone(),
            host: host_of(&m.to),
            rank: 0,
            stage: m.stage as u32,
            log: Trace::log_path_for(id),
            continues: Some(before),
            steps: Some([m.at_step, end]),
        });
        if let Some([_, to]) = m.clocks
            && !manifest.clocks.iter().any(|c| c.node == m.to)
        {
            manifest.clocks.push(NodeClock {
                node: m.to.clone(),
                offset_ns: -to.offset_ns,
                uncertainty_ns: to.rtt_ns.unsigned_abs() / 2,
            });
        }
        current[m.stage] = id;
    }
}

/// A hook that rewrites the manifest each time a move commits, listing the endpoints the moves
/// so far started (as [`add_continuations`] does at the end of the run): a recording killed
/// after a move keeps the endpoint its stage continued in, and `slug recover` rebuilds it. The
/// manifest at the end of the run replaces this one. Only for nodes that record into the trace
/// directory itself (not `--hosts`, whose logs are collected at the end).
fn list_moves_as_they_commit(
    trace: &Trace,
    pipeline: &PipelineConfig,
) -> slug_transport::pipeline::MoveHook {
    let dir = trace.dir().to_path_buf();
    let first = trace.manifest().clone();
    let pipeline = pipeline.clone();
    let committed = std::sync::Mutex::new(Vec::new());
    slug_transport::pipeline::MoveHook(std::sync::Arc::new(move |m| {
        let Ok(mut committed) = committed.lock() else {
            return;
        };
        committed.push(m.clone());
        let mut manifest = first.clone();
        add_continuations(&mut manifest, &pipeline, &committed);
        if let Err(e) = Trace::write_manifest_to(&dir, &manifest) {
            eprintln!(
                "slug record: cannot list the endpoint of the move of stage {} in the manifest \
                 yet (it is listed when the run ends): {e}",
                m.stage
            );
        }
    }))
}

/// Removes the logs (and node reports) that targets of moves which did not happen started
/// before they were dismissed: endpoint ids past the stages that the manifest does not list.
/// The trace directory was empty when the recording began, so they are this run's own files;
/// only regular files with exactly those names are removed. Returns what could not be removed.
fn remove_unused_continuations(out: &Path, stages: usize, listed: &[u32]) -> Vec<String> {
    let mut warnings = Vec::new();
    let dir = out.join(slug_schema::ENDPOINTS_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return warnings;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".slog"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if (id as usize) < stages || listed.contains(&id) {
            continue;
        }
        for path in [entry.path(), NodeReport::path(out, id)] {
            let regular = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file());
            if regular && let Err(e) = std::fs::remove_file(&path) {
                warnings.push(format!(
                    "cannot remove {}, left by the target of a move that did not happen: {e}",
                    path.display()
                ));
            }
        }
    }
    warnings
}

/// Snapshots in the trace's store (each stage's every snapshot index).
fn snapshot_count(dir: &Path) -> Result<usize> {
    let snapshots = dir.join(slug_schema::SNAPSHOTS_DIR);
    if !snapshots.exists() {
        return Ok(0);
    }
    Ok(SnapshotStore::open(snapshots)?.snapshots()?.len())
}
