//! The observer settings a process run sends every node inside its [`PipelineConfig`]: whether
//! and how the node records its stage, and where it restores the stage from for a replay.
//!
//! They are plain data here because the runtime carries them to the nodes; the recorder and
//! the replayer, which sit above this crate, give them meaning (parse the choices, open the
//! trace). The serde names (`slug_recorder`, `slug_replayer`) are the keys the settings have
//! always travelled under, so coordinators and nodes of this protocol version and the run
//! configuration in existing traces' manifests (where they are `null`) read unchanged.
//!
//! [`PipelineConfig`]: super::PipelineConfig

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What a node's [`super::ObserverFactory`] does besides running its stage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObserverSettings {
    /// Record the stage (`slug record` of a process run).
    #[serde(
        rename = "slug_recorder",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub record: Option<RecordSettings>,
    /// Restore the stage from a trace on the node (`slug replay --hosts`).
    #[serde(
        rename = "slug_replayer",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub replay: Option<ReplaySettings>,
}

/// How a node records its stage: the `slug record` options, as the command line spells them
/// (the recorder parses them on the node and names a bad one in the stage's error).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordSettings {
    /// The trace directory (on a file system the node shares with the coordinator).
    pub trace_dir: PathBuf,
    /// `--payloads`.
    pub payloads: String,
    /// `--perf`.
    pub perf: String,
    /// `--perf-freq`.
    pub perf_freq_hz: u64,
    /// Records per thread ring.
    pub ring_records: usize,
    /// `--snapshot-every` (`None`: `--no-snapshots`).
    #[serde(default)]
    pub snapshot_every: Option<u64>,
    /// `--hash-kernels`.
    #[serde(default)]
    pub hash_kernels: bool,
    /// `--ebpf` (empty, from a coordinator that predates it: none).
    #[serde(default)]
    pub ebpf: String,
    /// A run id: record into a scratch directory of the node's own (named by it) instead of
    /// `trace_dir`, for the coordinator to collect after the stage ends (hosts without a shared
    /// file system).
    #[serde(default)]
    pub scratch_run: Option<String>,
}

/// Where a node restores its stage from for a replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplaySettings {
    /// The node's copy of the trace.
    pub trace_dir: PathBuf,
    /// The stage step whose snapshot to start from (0: rebuilt from the recorded seed when
    /// the trace has no snapshot there).
    #[serde(default)]
    pub step: u64,
    /// The coordinator's trace id; the node refuses a copy with another (`None`: a trace
    /// recorded before trace ids, which nodes cannot tell apart).
    #[serde(default)]
    pub trace_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_travel_under_the_keys_they_always_had() {
        let record = RecordSettings {
            trace_dir: "/t".into(),
            payloads: "all".into(),
            perf: "auto".into(),
            perf_freq_hz: 999,
            ring_records: 4096,
            snapshot_every: Some(4),
            hash_kernels: true,
            ebpf: "none".into(),
            scratch_run: None,
        };
        let settings = ObserverSettings {
            record: Some(record.clone()),
            replay: None,
        };
        let json = serde_json::to_value(&settings).expect("serialize");
        assert_eq!(json["slug_recorder"]["perf_freq_hz"], 999);
        assert!(json.get("slug_replayer").is_none(), "{json}");
        // What a coordinator of this protocol version sends (serde_json::json! of the key).
        let sent = serde_json::json!({ "slug_replayer": {
            "trace_dir": "/data/run1", "step": 8, "trace_id": null } });
        let read: ObserverSettings = serde_json::from_value(sent).expect("replay settings");
        assert_eq!(
            read.replay,
            Some(ReplaySettings {
                trace_dir: "/data/run1".into(),
                step: 8,
                trace_id: None,
            })
        );
        assert_eq!(read.record, None);
        // Recorder settings from before `--ebpf` and scratch runs existed still read.
        let old = serde_json::json!({ "slug_recorder": {
            "trace_dir": "/t", "payloads": "all", "perf": "auto", "perf_freq_hz": 999,
            "ring_records": 4096 } });
        let read: ObserverSettings = serde_json::from_value(old).expect("old recorder settings");
        let got = read.record.expect("record");
        assert_eq!((got.ebpf.as_str(), got.snapshot_every), ("", None));
    }
}
