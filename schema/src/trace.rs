//! The trace directory: `manifest.json`, `endpoints/<id>.slog`, `snapshots/`, and the `Trace` handle.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, SchemaError};
use crate::frame::LogHeader;
use crate::reader::LogReader;
use crate::writer::{LogWriter, WriterOptions};

/// Newest trace directory (manifest) version this build writes and reads.
pub const TRACE_FORMAT_VERSION: u32 = 4;
/// Name of the manifest file in a trace directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Directory of endpoint logs.
pub const ENDPOINTS_DIR: &str = "endpoints";
/// Directory of snapshot chunks and indexes.
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// Directory of recorded transfer payloads and PT chunks ([`crate::blob::BlobStore`]).
pub const PAYLOADS_DIR: &str = "payloads";

/// Capability name saying every step's stage output (the last stage's logits, kernel `head`)
/// carries its hash, so a replay at the default level checks it.
pub const STAGE_OUTPUT_HASHES: &str = "stage_output_hashes";

/// Most endpoints a trace may list: far above any real pipeline, low enough that a crafted
/// manifest cannot make a reader open millions of logs.
pub const MAX_ENDPOINTS: usize = 4096;

/// `manifest.json`: everything about a trace that is not an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Trace format version ([`TRACE_FORMAT_VERSION`]).
    pub format_version: u32,
    /// Random id of this recording (32 hex digits), so a node can tell one trace from another.
    /// Traces written before it existed have none and still read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Wall-clock time the trace was created (Unix ns).
    pub created_unix_ns: u64,
    /// The run's configuration (model, placement, transports, flags) as the recorder saw it.
    pub run: serde_json::Value,
    /// One entry per endpoint log.
    pub endpoints: Vec<EndpointInfo>,
    /// Per-node clock offsets relative to the coordinator's clock.
    pub clocks: Vec<NodeClock>,
    /// Per-node host topology.
    pub topology: Vec<HostTopology>,
    /// What was asked for, possible and captured, with reasons.
    pub capabilities: Vec<Capability>,
    /// How the transfers of a `--transport mpi` recording travelled: communicator, and per
    /// link its ranks and tags. Other recordings, and MPI ones made before it existed, have
    /// none and still read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mpi: Option<crate::MpiTable>,
}

impl Manifest {
    /// An empty manifest of the current version for `run`.
    pub fn new(run: serde_json::Value) -> Manifest {
        let created_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Manifest {
            format_version: TRACE_FORMAT_VERSION,
            trace_id: Some(new_trace_id(created_unix_ns)),
            created_unix_ns,
            run,
            endpoints: Vec::new(),
            clocks: Vec::new(),
            topology: Vec::new(),
            capabilities: Vec::new(),
            mpi: None,
        }
    }
}

/// 128 random bits from the kernel as 32 hex digits (time and pid mixed in if `getrandom` fails).
fn new_trace_id(now_ns: u64) -> String {
    let mut b = [0u8; 16];
    // SAFETY: `b` is a valid writable buffer of `b.len()` bytes.
    let got = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if got != b.len() as isize {
        let mix = xxhash_rust::xxh3::xxh3_128(
            &[
                now_ns.to_le_bytes(),
                u64::from(std::process::id()).to_le_bytes(),
            ]
            .concat(),
        );
        b = mix.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One endpoint: a pipeline stage on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    /// Endpoint id (also in the log header).
    pub id: u32,
    /// Node name (as in `clocks` and `topology`).
    pub node: String,
    /// Host name of the node.
    pub host: String,
    /// Process rank.
    pub rank: u32,
    /// Pipeline stage.
    pub stage: u32,
    /// Log path relative to the trace directory (`endpoints/<id>.slog`).
    pub log: PathBuf,
    /// The endpoint whose log this one continues: the stage moved to this endpoint's node from
    /// that one's (format version 4; `None`: the stage started here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continues: Option<u32>,
    /// The stage's forward steps this endpoint ran, `[first, end)`; set on every endpoint of a
    /// stage that moved (`None`: all of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<[u64; 2]>,
}

impl EndpointInfo {
    /// The endpoint id of the node that took stage `stage` over by move `index` of a run of
    /// `stages` stages: ids past the stages, one per move.
    pub fn continuation_id(stages: u32, index: u32) -> u32 {
        stages.saturating_add(index)
    }
}

/// A node's clock: add `offset_ns` to its CLOCK_MONOTONIC readings to get the reference clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeClock {
    /// Node name.
    pub node: String,
    /// Offset to the reference clock, ns.
    pub offset_ns: i64,
    /// Half-width of the offset's uncertainty (round-trip / 2), ns.
    pub uncertainty_ns: u64,
}

/// The hardware a node ran on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostTopology {
    /// Node name.
    pub node: String,
    /// Online logical CPUs.
    pub cpus: u32,
    /// NUMA nodes.
    pub numa_nodes: Vec<NumaNode>,
    /// CPU caches.
    pub caches: Vec<Cache>,
    /// Huge page pools.
    pub huge_pages: Vec<HugePages>,
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NumaNode {
    /// NUMA node id.
    pub id: u32,
    /// Its CPUs.
    pub cpus: Vec<u32>,
    /// Its memory in bytes.
    pub memory_bytes: u64,
    /// SLIT distances to every NUMA node, in id order.
    pub distances: Vec<u32>,
}

/// One CPU cache (as listed in sysfs).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cache {
    /// Level (1, 2, 3).
    pub level: u32,
    /// "data", "instruction" or "unified".
    pub kind: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Line size in bytes.
    pub line_bytes: u32,
    /// CPUs sharing one instance.
    pub shared_by_cpus: Vec<u32>,
}

/// One huge page pool.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HugePages {
    /// Page size in bytes.
    pub page_bytes: u64,
    /// Pages in the pool.
    pub total: u64,
    /// Pages free when recording began.
    pub free: u64,
}

/// A recording capability (Intel PT, PEBS, eBPF probes, payloads...) and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    /// Name (`intel_pt`, `pebs`, `ebpf_sched`, `payloads_all`, ...).
    pub name: String,
    /// The user asked for it.
    pub requested: bool,
    /// The host supports it.
    pub available: bool,
    /// It is in the trace.
    pub captured: bool,
    /// Why it is not captured, or what replaced it.
    pub reason: Option<String>,
}

/// A trace directory on disk.
#[derive(Debug)]
pub struct Trace {
    dir: PathBuf,
    manifest: Manifest,
}

impl Trace {
    /// Creates `dir` (which must not exist or be empty) with `endpoints/`, `snapshots/` and the manifest.
    pub fn create(dir: impl AsRef<Path>, manifest: Manifest) -> Result<Trace> {
        let dir = dir.as_ref().to_path_buf();
        if dir.exists() {
            let mut entries = std::fs::read_dir(&dir).map_err(|e| SchemaError::io(&dir, e))?;
            if entries.next().is_some() {
                return Err(SchemaError::TraceExists { path: dir });
            }
        }
        for sub in [ENDPOINTS_DIR, SNAPSHOTS_DIR] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|e| SchemaError::io(&p, e))?;
        }
        let trace = Trace { dir, manifest };
        trace.write_manifest()?;
        Ok(trace)
    }

    /// Opens the trace in `dir`, reading and checking its manifest.
    pub fn open(dir: impl AsRef<Path>) -> Result<Trace> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join(MANIFEST_FILE);
        if !dir.is_dir() {
            return Err(if dir.exists() {
                SchemaError::NotATrace { path: dir }
            } else {
                SchemaError::NoSuchTrace { path: dir }
            });
        }
        if !path.exists() {
            return Err(SchemaError::NotATrace { path: dir });
        }
        let text = crate::contained::read_in(
            &dir,
            Path::new(MANIFEST_FILE),
            crate::contained::MAX_MANIFEST_BYTES,
        )?;
        let value: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| SchemaError::Manifest {
                path: path.clone(),
                reason: format!("not valid JSON ({e}); the trace is damaged"),
            })?;
        let version = value
            .get("format_version")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        if version > u64::from(TRACE_FORMAT_VERSION) {
            return Err(SchemaError::UnsupportedTraceVersion {
                path,
                found: version.min(u64::from(u32::MAX)) as u32,
                supported: TRACE_FORMAT_VERSION,
            });
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|e| SchemaError::Manifest {
                path: path.clone(),
                reason: format!(
                    "not a slug manifest ({e}); the trace is damaged or from another tool"
                ),
            })?;
        if manifest.endpoints.len() > MAX_ENDPOINTS {
            return Err(SchemaError::Limit {
                path,
                what: format!(
                    "it lists {} endpoints, more than the {MAX_ENDPOINTS} a slug trace may hold",
                    manifest.endpoints.len()
                ),
            });
        }
        if let Some(mpi) = &manifest.mpi {
            mpi.check(&manifest.endpoints)
                .map_err(|what| SchemaError::Manifest {
                    path,
                    reason: format!(
                        "its mpi table {what}; the trace is damaged or was not written by \
                         slug: record it again, or remove the \"mpi\" table to read the rest"
                    ),
                })?;
        }
        Ok(Trace { dir, manifest })
    }

    /// The trace directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Replaces the manifest and rewrites `manifest.json` atomically.
    pub fn set_manifest(&mut self, manifest: Manifest) -> Result<()> {
        self.manifest = manifest;
        self.write_manifest()
    }

    fn write_manifest(&self) -> Result<()> {
        Self::write_manifest_to(&self.dir, &self.manifest)
    }

    /// Rewrites `manifest.json` of the trace in `dir` atomically (temporary file + rename), for
    /// a writer that updates the manifest of a trace another handle created (a recording that
    /// lists a move's endpoint as the move commits).
    pub fn write_manifest_to(dir: &Path, manifest: &Manifest) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
        let text = serde_json::to_string_pretty(manifest).map_err(|e| SchemaError::Manifest {
            path: path.clone(),
            reason: format!("cannot serialize: {e}"),
        })?;
        std::fs::write(&tmp, text + "\n").map_err(|e| SchemaError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| SchemaError::io(&path, e))
    }

    /// The conventional log path of endpoint `id`, relative to the trace directory.
    pub fn log_path_for(id: u32) -> PathBuf {
        Path::new(ENDPOINTS_DIR).join(format!("{id}.slog"))
    }

    /// The manifest entry of endpoint `id`.
    pub fn endpoint(&self, id: u32) -> Result<&EndpointInfo> {
        self.manifest
            .endpoints
            .iter()
            .find(|e| e.id == id)
            .ok_or(SchemaError::UnknownEndpoint {
                path: self.dir.clone(),
                id,
            })
    }

    /// Path of endpoint `id`'s log; refused when the manifest names one outside the trace.
    pub fn endpoint_log_path(&self, id: u32) -> Result<PathBuf> {
        crate::contained::join_in(&self.dir, &self.endpoint(id)?.log)
    }

    /// Opens endpoint `id`'s log for reading: it must be a regular file inside the trace
    /// (see [`crate::contained::open_in`]).
    pub fn endpoint_log(&self, id: u32) -> Result<LogReader> {
        self.log_of(self.endpoint(id)?)
    }

    /// Opens the log of manifest entry `ep` under the rules of [`Trace::endpoint_log`].
    pub fn log_of(&self, ep: &EndpointInfo) -> Result<LogReader> {
        let (file, _) = crate::contained::open_in(&self.dir, &ep.log, u64::MAX)?;
        LogReader::from_file(self.dir.join(&ep.log), &file)
    }

    /// Creates endpoint `id`'s log (the endpoint must be in the manifest).
    pub fn create_endpoint_log(
        &self,
        id: u32,
        header: LogHeader,
        options: WriterOptions,
    ) -> Result<LogWriter> {
        LogWriter::create_with(self.endpoint_log_path(id)?, header, options)
    }
}
