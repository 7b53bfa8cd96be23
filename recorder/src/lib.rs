//! Per-endpoint recorder: perf streams, host topology and content-addressed snapshots.
//!
//! - [`snapshot`]: a stage's arena and cursor as deduplicated zstd chunks under `<trace>/snapshots/`.

mod error;
pub mod snapshot;

pub use error::{RecorderError, Result};
