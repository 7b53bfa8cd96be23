//! What every endpoint of one recording shares: where the trace goes and what to capture.

use std::path::PathBuf;
use std::sync::Arc;

use slug_schema::WriterOptions;

use super::transfers::PayloadPolicy;
use crate::ebpf::EbpfRequest;
use crate::perf::PerfConfig;

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
    /// Counts events written by every endpoint, for a progress display.
    pub progress: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Snapshots of every stage at step 0 and every K steps (`Some(0)`: step 0 only); `None`:
    /// none (a replay then rebuilds stages from the seed).
    pub snapshot_every: Option<u64>,
    /// Hash every kernel output into its span (`--hash-kernels`).
    pub hash_kernels: bool,
    /// eBPF probes (`--ebpf`).
    pub ebpf: EbpfRequest,
}
