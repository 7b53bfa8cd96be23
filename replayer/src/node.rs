//! The node side of a `--hosts` replay: a `slug node` restores its assigned stage from its own
//! copy of the trace (named in the run's observer settings) instead of building it from the seed.

use std::path::Path;

use slug_transport::TransportError;
use slug_transport::pipeline::{
    ObserverFactory, StageContext, StageObservers, StageState, StageStateObserver,
};

use crate::recorded::node_state;

/// Key of the replayer's entry in the pipeline configuration's `observer_settings`.
pub const NODE_SETTINGS_KEY: &str = "slug_replayer";

/// The observer settings that make [`NodeReplayFactory`] nodes restore their stage from its
/// snapshot at `step` in `trace_dir`.
pub fn node_settings(trace_dir: &Path, step: u64) -> serde_json::Value {
    serde_json::json!({ NODE_SETTINGS_KEY: { "trace_dir": trace_dir, "step": step } })
}

/// Wraps a node's factory (e.g. the recorder's): observers come from it; a stage of a replay
/// starts from its snapshot in the trace the settings name (at step 0 without one: from the
/// recorded seed, as a local replay does).
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeReplayFactory<F>(pub F);

impl<F: ObserverFactory> ObserverFactory for NodeReplayFactory<F> {
    fn stage_observers(&self, ctx: &StageContext<'_>) -> Result<StageObservers, TransportError> {
        self.0.stage_observers(ctx)
    }

    fn state_observer(
        &self,
        ctx: &StageContext<'_>,
    ) -> Result<Option<Box<dyn StageStateObserver>>, TransportError> {
        self.0.state_observer(ctx)
    }

    fn collected_files(&self, ctx: &StageContext<'_>) -> Option<std::path::PathBuf> {
        self.0.collected_files(ctx)
    }

    fn initial_state(&self, ctx: &StageContext<'_>) -> Result<Option<StageState>, TransportError> {
        let settings = ctx
            .config
            .observer_settings
            .as_ref()
            .and_then(|v| v.get(NODE_SETTINGS_KEY));
        let dir = settings
            .and_then(|v| v.get("trace_dir"))
            .and_then(|v| v.as_str());
        let step = settings
            .and_then(|v| v.get("step"))
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        match dir {
            Some(dir) => node_state(Path::new(dir), ctx.stage as u32, step).map_err(|e| {
                TransportError::Config(format!(
                    "replay of stage {} on {}: {e} (copy the trace to this node, or pass \
                     --node-trace with where it lies here)",
                    ctx.stage, ctx.host
                ))
            }),
            None => self.0.initial_state(ctx),
        }
    }
}
