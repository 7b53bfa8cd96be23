//! Per-endpoint recorder: perf streams, host topology and content-addressed snapshots.
//!
//! - [`flight`]: per-thread flight-recorder rings in memory-mapped files (SIGKILL-safe).
//! - [`perf`]: perf streams (Intel PT, PEBS / IBS memory samples, software fallbacks) with a
//!   capability report.
//! - [`topology`]: CPUs, NUMA nodes, caches and huge pages of the host, for the manifest.
//! - [`snapshot`]: a stage's arena and cursor as deduplicated zstd chunks under `<trace>/snapshots/`.

mod error;
pub mod flight;
pub mod perf;
pub mod snapshot;
pub mod topology;

pub use error::{RecorderError, Result};
