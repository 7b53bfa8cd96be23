//! Snapshots at step boundaries: the stage state observer that captures changed chunks and
//! hands them to the background snapshot writer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use slug_kernels::{Section, Stage};
use slug_schema::snapshot::{SnapshotInfo, SnapshotStore, SnapshotWriter};
use slug_schema::{Event, SnapshotEvent};
use slug_transport::TransportError;
use slug_transport::pipeline::StageStateObserver;

use super::settings::RecorderSettings;
use crate::endpoint::EndpointShared;
use crate::error::{RecorderError, Result};
use crate::perf::monotonic_ns;

/// Snapshots of one stage at step 0 and every `every` steps: the hot-path capture (hash every
/// chunk, copy the new ones) runs here; compression and writing run on the [`SnapshotWriter`].
///
/// Meant for the runtime's step boundary, where the arena and cursor are consistent.
#[derive(Debug)]
pub struct StageSnapshotter {
    stage: u32,
    every: u64,
    writer: Arc<SnapshotWriter>,
    shared: Arc<EndpointShared>,
    /// Per chunk: the hash of the last snapshot if the chunk lies wholly in the stage's weights
    /// (written once at build), so later snapshots need not hash it again.
    weight_hashes: Vec<Option<u128>>,
}

impl StageSnapshotter {
    /// Snapshots of `stage` into `writer`'s store every `every` steps (0: only step 0), logging
    /// a snapshot event through `shared`.
    pub fn new(
        stage: u32,
        every: u64,
        writer: Arc<SnapshotWriter>,
        shared: Arc<EndpointShared>,
    ) -> StageSnapshotter {
        StageSnapshotter {
            stage,
            every,
            writer,
            shared,
            weight_hashes: Vec::new(),
        }
    }

    /// Which chunks lie wholly inside the stage's weights section (sections are contiguous and
    /// in address order, so the section is one span, alignment padding included).
    fn weight_chunks(&self, stage: &Stage) -> Vec<bool> {
        let size = self.writer.store().chunk_size();
        let weights = stage
            .layout()
            .regions
            .iter()
            .filter(|r| r.section == Section::Weights);
        let start = weights.clone().map(|r| r.offset).min().unwrap_or(0);
        let end = weights.map(|r| r.offset + r.bytes).max().unwrap_or(0);
        let len = stage.arena().len();
        (0..len.div_ceil(size))
            .map(|i| start <= i * size && ((i + 1) * size).min(len) <= end)
            .collect()
    }

    /// Takes a snapshot of `stage` if its step counter is due; returns its totals when taken.
    /// The cursor is stored as JSON in the snapshot index.
    pub fn at_step_boundary(&mut self, stage: &Stage) -> Result<Option<SnapshotInfo>> {
        let step = stage.cursor().step;
        // Step 0 always; with `every` = 0 only step 0 (the only multiple of 0).
        let due = step.is_multiple_of(self.every);
        if !due {
            return Ok(None);
        }
        let cursor = serde_json::to_vec(stage.cursor())
            .map_err(|e| RecorderError::io(self.writer.store().dir(), std::io::Error::other(e)))?;
        let pending = self.writer.store().capture_with(
            self.stage,
            step,
            stage.arena().bytes(),
            &cursor,
            &self.weight_hashes,
        )?;
        if self.weight_hashes.is_empty() {
            let hashes = &pending.index().chunks;
            self.weight_hashes = self
                .weight_chunks(stage)
                .into_iter()
                .zip(hashes)
                .map(|(weight, &h)| weight.then_some(h))
                .collect();
        }
        let info = pending.info();
        self.writer.submit(pending);
        self.shared.append(&Event::Snapshot(SnapshotEvent {
            stage: self.stage,
            step,
            id: info.id,
            bytes: info.bytes,
            new_bytes: info.new_bytes,
            chunks: info.chunks,
            ns: monotonic_ns(),
        }));
        Ok(Some(info))
    }
}

/// The snapshot side of a factory: one background writer for the whole recording (chunks are
/// content-addressed, so weights shared by stages are stored once) and each started stage's
/// endpoint, which logs its snapshot events.
#[derive(Debug)]
pub(super) struct Snapshots {
    every: Option<u64>,
    pub(super) writer: Mutex<Option<Arc<SnapshotWriter>>>,
    stages: Mutex<HashMap<u32, Arc<EndpointShared>>>,
}

impl Snapshots {
    pub(super) fn new(settings: &RecorderSettings) -> Result<Snapshots> {
        let writer = match settings.snapshot_every {
            Some(_) => {
                let dir = settings.trace_dir.join(slug_schema::SNAPSHOTS_DIR);
                let store = Arc::new(SnapshotStore::open(dir)?);
                Some(Arc::new(SnapshotWriter::spawn(store)?))
            }
            None => None,
        };
        Ok(Snapshots {
            every: settings.snapshot_every,
            writer: Mutex::new(writer),
            stages: Mutex::new(HashMap::new()),
        })
    }

    pub(super) fn remember(&self, stage: u32, shared: &Arc<EndpointShared>) {
        if self.every.is_some() {
            let mut stages = self.stages.lock().unwrap_or_else(|p| p.into_inner());
            stages.insert(stage, Arc::clone(shared));
        }
    }

    /// The snapshotter of a stage started before (through `remember`), if snapshots are on.
    pub(super) fn observer(&self, stage: u32) -> Option<Box<dyn StageStateObserver>> {
        let every = self.every?;
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let shared = self
            .stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&stage)?;
        Some(Box::new(SnapshotObserver(Some(StageSnapshotter::new(
            stage, every, writer, shared,
        )))))
    }

    /// Waits for every queued snapshot to be written (once the stages have dropped their
    /// snapshotters); returns how many were written.
    pub(super) fn finish(&self) -> Result<usize> {
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        match writer.map(Arc::try_unwrap) {
            None => Ok(0),
            Some(Ok(writer)) => Ok(writer.finish()?.len()),
            // A stage still holds it: its drop joins the writer thread, so nothing is lost.
            Some(Err(_)) => Ok(0),
        }
    }
}

/// A [`StageSnapshotter`] as the runtime's step-boundary observer. A failed snapshot (full
/// disk, write error) never stops the pipeline: it becomes a warning of the endpoint and the
/// stage takes no further snapshots.
#[derive(Debug)]
pub(super) struct SnapshotObserver(Option<StageSnapshotter>);

impl StageStateObserver for SnapshotObserver {
    fn at_step_boundary(&mut self, stage: &Stage) -> std::result::Result<(), TransportError> {
        if let Some(snapshotter) = &mut self.0
            && let Err(e) = snapshotter.at_step_boundary(stage)
        {
            snapshotter.shared.note_error(format!(
                "snapshots stopped at step {}: {e}",
                stage.cursor().step
            ));
            self.0 = None;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{EndpointOptions, EndpointRecorder};
    use slug_kernels::{LayerPlan, ModelConfig, ThreadPool};
    use slug_schema::WriterOptions;
    use slug_transport::pipeline::StageState;

    #[test]
    fn a_stage_snapshot_restores_into_a_fresh_stage() {
        let dir = tempfile::tempdir().unwrap();
        let endpoints = dir.path().join("endpoints");
        std::fs::create_dir(&endpoints).unwrap();
        let recorder = EndpointRecorder::start(
            &EndpointOptions {
                endpoint: 0,
                endpoints_dir: endpoints,
                ring_records: 1024,
                writer: WriterOptions::default(),
                progress: None,
                ebpf: None,
            },
            None,
            None,
        )
        .unwrap();
        // Small chunks, so the tiny model's weights fill some whole chunks.
        let store =
            Arc::new(SnapshotStore::open_with(dir.path().join("snapshots"), 4096, 1).unwrap());
        let writer = Arc::new(SnapshotWriter::spawn(Arc::clone(&store)).unwrap());
        let mut snap =
            StageSnapshotter::new(0, 4, Arc::clone(&writer), Arc::clone(recorder.shared()));

        let cfg = ModelConfig::preset("tiny").unwrap();
        let plan = LayerPlan::even(cfg.layers, 2).unwrap();
        let pool = ThreadPool::new(1).unwrap();
        let mut stage = Stage::new(&cfg, &plan, 0, 1, &pool).unwrap();
        let taken = snap
            .at_step_boundary(&stage)
            .unwrap()
            .expect("step 0 is always taken");
        assert!(taken.new_chunks > 0);
        // Weight chunks keep their hash; a later snapshot hashes only the rest.
        let weights = snap.weight_hashes.iter().filter(|h| h.is_some()).count();
        assert!(weights > 0 && weights < snap.weight_hashes.len());
        let fresh = Stage::new(&cfg, &plan, 0, 1, &pool).unwrap();
        // The KV cache and the cursor change; weights do not (the snapshotter relies on it).
        stage.set_position(0, 3).unwrap();
        let kv = stage.layout().kv.offset;
        stage.arena_mut().bytes_mut()[kv..kv + 64].fill(0x5A);
        let again = snap
            .at_step_boundary(&stage)
            .unwrap()
            .expect("step 0 again: the cursor step did not move");
        assert_eq!(again.new_chunks, 1, "only the touched KV chunk is new");

        let mut other = Stage::new(&cfg, &plan, 0, 1, &pool).unwrap();
        other.arena_mut().bytes_mut().fill(0);
        drop(snap);
        let writer = Arc::try_unwrap(writer).expect("only the test holds the writer");
        let infos = writer.finish().unwrap();
        assert_eq!(infos.len(), 2);
        // The later snapshot (same step, so same index file) restores the changed stage.
        let mut arena = vec![0u8; other.arena().len()];
        let cursor = store.restore(0, 0, &mut arena).unwrap();
        let state = StageState {
            arena,
            cursor: serde_json::from_slice(&cursor).unwrap(),
        };
        slug_transport::pipeline::restore_stage(&mut other, &state).unwrap();
        assert!(
            other.arena().bytes() == stage.arena().bytes(),
            "restored arena differs"
        );
        assert_eq!(other.cursor(), stage.cursor());
        assert!(other.arena().bytes() != fresh.arena().bytes());
        let stats = recorder.finish().unwrap();
        assert_eq!(
            stats.log.counts[slug_schema::EventKind::Snapshot as usize],
            2
        );
    }
}
