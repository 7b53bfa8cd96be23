//! The node side of a `--hosts` replay: a `slug node` restores its assigned stage from its own
//! copy of the trace (named in the run's observer settings) instead of building it from the seed.

use std::path::Path;

use slug_transport::TransportError;
use slug_transport::pipeline::{
    ObserverFactory, ObserverSettings, ReplaySettings, StageContext, StageObservers, StageState,
    StageStateObserver,
};

use crate::recorded::node_state;

/// The observer settings that make [`NodeReplayFactory`] nodes restore their stage from its
/// snapshot at `step` in `trace_dir`, after checking that trace is the one with `trace_id`
/// (when the coordinator's trace has an id).
pub fn node_settings(trace_dir: &Path, step: u64, trace_id: Option<&str>) -> ObserverSettings {
    ObserverSettings {
        record: None,
        replay: Some(ReplaySettings {
            trace_dir: trace_dir.to_path_buf(),
            step,
            trace_id: trace_id.map(str::to_string),
        }),
    }
}

/// Refuses, before anything runs, a node copy of the trace at `dir` that is not the trace
/// with id `want`: replaying another recording would only report a meaningless divergence.
pub fn check_trace_id(dir: &Path, want: &str) -> Result<(), String> {
    let trace = slug_schema::Trace::open(dir).map_err(|e| {
        format!(
            "{e} (copy the coordinator's trace to this node, or pass --node-trace with where it \
             lies here)"
        )
    })?;
    match trace.manifest().trace_id.as_deref() {
        Some(have) if have == want => Ok(()),
        have => Err(format!(
            "wrong trace: {} on this node has trace id {}, the coordinator wants {want}; copy \
             the coordinator's trace here or pass --node-trace with where it lies",
            dir.display(),
            have.unwrap_or("(none: recorded before trace ids)")
        )),
    }
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
        let Some(replay) = ctx
            .config
            .observer_settings
            .as_ref()
            .and_then(|s| s.replay.as_ref())
        else {
            return self.0.initial_state(ctx);
        };
        if let Some(want) = &replay.trace_id {
            check_trace_id(&replay.trace_dir, want).map_err(|e| {
                TransportError::Config(format!(
                    "replay of stage {} on {}: {e}",
                    ctx.stage, ctx.host
                ))
            })?;
        }
        node_state(&replay.trace_dir, ctx.stage as u32, replay.step).map_err(|e| {
            TransportError::Config(format!(
                "replay of stage {} on {}: {e} (copy the trace to this node, or pass \
                 --node-trace with where it lies here)",
                ctx.stage, ctx.host
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slug_schema::{Manifest, Trace};

    #[test]
    fn a_node_refuses_another_trace_by_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, old) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("old"),
        );
        let ta = Trace::create(&a, Manifest::new(serde_json::json!({}))).unwrap();
        Trace::create(&b, Manifest::new(serde_json::json!({}))).unwrap();
        let mut m = Manifest::new(serde_json::json!({}));
        m.trace_id = None;
        Trace::create(&old, m).unwrap();
        let id = ta.manifest().trace_id.clone().unwrap();
        assert_eq!(id.len(), 32);
        check_trace_id(&a, &id).unwrap();
        let e = check_trace_id(&b, &id).unwrap_err();
        assert!(e.starts_with("wrong trace: ") && e.contains(&id), "{e}");
        let e = check_trace_id(&old, &id).unwrap_err();
        assert!(e.contains("recorded before trace ids"), "{e}");
    }
}
