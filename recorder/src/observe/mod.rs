//! The recorder's taps into the pipeline runtime: a transfer observer, kernel/step hooks, and
//! the factory that builds both (plus the endpoint's recorder) for every stage.
//!
//! - [`transfers`]: the payload policy and the transfer observer.
//! - [`hooks`]: kernel spans, step boundaries and per-step counters.
//! - [`snapshots`]: snapshots at step boundaries.
//! - [`settings`]: what every endpoint of a recording shares.
//! - [`factory`]: the observer factory of a local recording.
//! - [`node`]: recording on a `slug node` (settings, capability report, factory).

mod factory;
mod hooks;
mod node;
mod settings;
mod snapshots;
mod transfers;

pub use factory::RecorderFactory;
pub use hooks::StageHooks;
pub use node::{NODE_REPORTS_DIR, NodeRecorderFactory, NodeReport};
pub use settings::RecorderSettings;
pub use snapshots::{StageCapture, StageSnapshotter, snapshot_stage};
pub use transfers::{PayloadPolicy, TransferRecorder};
