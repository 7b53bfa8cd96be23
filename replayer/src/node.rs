//! The node side of a `--hosts` replay: a `slug node` restores its assigned stage from its own
//! copy of the trace (named in the run's observer settings) instead of building it from the seed.

use std::path::Path;

use slug_transport::TransportError;
use slug_transport::pipeline::{
    ObserverFactory, StageContext, StageObservers, StageState, StageStateObserver,
};

use crate::recorded::step0_state;

/// Key of the replayer's entry in the pipeline configuration's `observer_settings`.
pub const NODE_SETTINGS_KEY: &str = "slug_replayer";

/// The observer settings that make [`NodeReplayFactory`] nodes restore from `trace_dir`.
pub fn node_settings(trace_dir: &Path) -> serde_json::Value {
    serde_json::json!({ NODE_SETTINGS_KEY: { "trace_dir": trace_dir } })
}

/// Wraps a node's factory (e.g. the recorder's): observers come from it; a stage of a replay
/// starts from its step-0 snapshot in the trace the settings name (or from the recorded seed
/// when the trace has none, as a local replay does).
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

    fn initial_state(&self, ctx: &StageContext<'_>) -> Result<Option<StageState>, TransportError> {
        let dir = ctx
            .config
            .observer_settings
            .as_ref()
            .and_then(|v| v.get(NODE_SETTINGS_KEY))
            .and_then(|v| v.get("trace_dir"))
            .and_then(|v| v.as_str());
        match dir {
            Some(dir) => step0_state(Path::new(dir), ctx.stage as u32).map_err(|e| {
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
