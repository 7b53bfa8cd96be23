//! Per-endpoint recorder: flight-recorder rings drained into endpoint logs, transfer and kernel
//! observers for the pipeline runtime, perf streams, host topology and snapshots.
//!
//! - [`record()`]: runs a pipeline with every endpoint recorded into a trace directory.
//! - [`recover()`]: after a SIGKILL, rebuilds the logs from their whole frames and the flight
//!   rings (and the journals older recorders left)
//!   ([`preview()`]: the same into a private temporary directory, for reading commands).
//! - [`observe`]: the transfer observer, kernel hooks and observer factory the runtime calls.
//! - [`endpoint`]: one endpoint's rings, perf streams and writer thread.
//! - [`journal`]: reads the journals that recorders older than the rings-as-journal left behind.
//! - [`flight`]: per-thread flight-recorder rings in memory-mapped files (SIGKILL-safe), whose
//!   slots are released only once the log frame holding their records is written.
//! - [`perf`]: perf streams (Intel PT, PEBS / IBS memory samples, software fallbacks) with a
//!   capability report.
//! - [`topology`]: CPUs, NUMA nodes, caches and huge pages of the host, for the manifest.
//!
//! The snapshot and payload stores the recorder writes into belong to the trace directory:
//! `slug_schema::snapshot` and `slug_schema::blob`.

pub mod ebpf;
pub mod endpoint;
mod error;
pub mod flight;
pub mod journal;
pub mod observe;
mod out_dir;
pub mod perf;
mod record;
mod recover;
pub mod topology;

pub use error::{RecorderError, Result};
pub use record::{
    EndpointRecording, RecordConfig, RecordSummary, StageRunner, record, record_with,
};
pub use recover::{
    EndpointLeftovers, Leftovers, Outcome, Preview, RecoveredEndpoint, RecoveryReport, preview,
    recover,
};
