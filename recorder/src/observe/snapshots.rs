//! Snapshots at step boundaries: the stage state observer that captures changed chunks and
//! hands them to the background snapshot writer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use slug_kernels::{Section, Stage};
use slug_schema::snapshot::{
    PendingSnapshot, SnapshotInfo, SnapshotStore, SnapshotWriter, WeightsRef,
};
use slug_schema::{Event, SnapshotEvent};
use slug_transport::TransportError;
use slug_transport::pipeline::StageStateObserver;
use xxhash_rust::xxh3::xxh3_128;

use super::settings::RecorderSettings;
use crate::endpoint::EndpointShared;
use crate::error::{RecorderError, Result};
use crate::perf::monotonic_ns;

/// What a stage's snapshots need to remember between two of them, so each costs what changed:
/// the weights' reference (hashed once: they never change, and no snapshot stores them), each
/// chunk's hash at the last snapshot, and the stage's dirty-page checkpoint taken then (chunks
/// not written since are not hashed again).
#[derive(Debug, Default)]
pub struct StageCapture {
    weights: Option<WeightsRef>,
    hashes: Vec<u128>,
    checkpoint: Option<u64>,
}

impl StageCapture {
    /// The whole chunks (of `chunk_size`) inside the stage's weights section, as a
    /// `(first, count)` run (sections are contiguous and in address order, so the section is
    /// one span, alignment padding included).
    fn weight_chunks(stage: &Stage, chunk_size: usize) -> (usize, usize) {
        let weights = stage
            .layout()
            .regions
            .iter()
            .filter(|r| r.section == Section::Weights);
        let start = weights.clone().map(|r| r.offset).min().unwrap_or(0);
        let end = weights.map(|r| r.offset + r.bytes).max().unwrap_or(0);
        let first = start.div_ceil(chunk_size);
        let last = end / chunk_size;
        (first, last.saturating_sub(first))
    }

    /// Captures `stage` (index `index`) into `store`: referenced weights, the cursor as JSON,
    /// and every other chunk, hashed only if written since the last capture.
    pub fn capture(
        &mut self,
        store: &SnapshotStore,
        index: u32,
        stage: &Stage,
    ) -> Result<PendingSnapshot> {
        let chunk_size = store.chunk_size();
        let arena = stage.arena().bytes();
        if self.weights.is_none() {
            let (first, chunks) = Self::weight_chunks(stage, chunk_size);
            if chunks > 0 {
                let range = first * chunk_size..((first + chunks) * chunk_size).min(arena.len());
                let c = stage.config();
                self.weights = Some(WeightsRef {
                    first_chunk: first as u32,
                    chunks: chunks as u32,
                    hash: xxh3_128(&arena[range]),
                    source: format!(
                        "the weights generated from seed {} for {} ({} layers, dim {}), stage {}",
                        c.seed,
                        c.name,
                        c.layers,
                        c.dim,
                        stage.index()
                    ),
                });
            }
        }
        let dirty = stage.dirty();
        let count = arena.len().div_ceil(chunk_size);
        let previous = self
            .checkpoint
            .filter(|_| self.hashes.len() == count)
            .map(|cp| (cp, &self.hashes));
        let mut zeros = ZeroHashes::default();
        let known: Vec<Option<u128>> = (0..count)
            .map(|i| {
                let range = i * chunk_size..((i + 1) * chunk_size).min(arena.len());
                match previous {
                    Some((cp, hashes)) if !dirty.written_since(cp, range.clone()) => {
                        Some(hashes[i])
                    }
                    // Never written since the arena was mapped: zeros, hashed once per size.
                    _ if dirty.never_written(range.clone()) => Some(zeros.of(range.len())),
                    _ => None,
                }
            })
            .collect();
        // The stage waits while this runs: writes after this point are the next capture's.
        self.checkpoint = Some(dirty.checkpoint());
        let cursor = serde_json::to_vec(stage.cursor())
            .map_err(|e| RecorderError::io(store.dir(), std::io::Error::other(e)))?;
        let pending = store.capture_referencing(
            index,
            stage.cursor().step,
            arena,
            &cursor,
            &known,
            self.weights.as_ref(),
        )?;
        self.hashes.clone_from(&pending.index().chunks);
        Ok(pending)
    }
}

/// Hashes of all-zero chunks by length (a stage has at most two chunk lengths).
#[derive(Default)]
struct ZeroHashes(Vec<(usize, u128)>);

impl ZeroHashes {
    fn of(&mut self, len: usize) -> u128 {
        if let Some(&(_, h)) = self.0.iter().find(|(l, _)| *l == len) {
            return h;
        }
        let h = xxh3_128(&vec![0u8; len]);
        self.0.push((len, h));
        h
    }
}

/// Snapshots of one stage at step 0 and every `every` steps: the hot-path capture (hash the
/// chunks written since the last one, copy the new ones; weights are referenced, never hashed
/// again or stored) runs here; compression and writing run on the [`SnapshotWriter`].
///
/// Meant for the runtime's step boundary, where the arena and cursor are consistent.
#[derive(Debug)]
pub struct StageSnapshotter {
    stage: u32,
    every: u64,
    writer: Arc<SnapshotWriter>,
    shared: Arc<EndpointShared>,
    capture: StageCapture,
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
            capture: StageCapture::default(),
        }
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
        let pending = self
            .capture
            .capture(self.writer.store(), self.stage, stage)?;
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

/// Takes one snapshot of `stage` (index `index`) into `store` and writes it, on this thread,
/// the way a recording's step-0 snapshot does.
pub fn snapshot_stage(store: &SnapshotStore, index: u32, stage: &Stage) -> Result<SnapshotInfo> {
    let pending = StageCapture::default().capture(store, index, stage)?;
    Ok(store.persist(pending)?)
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
    use slug_transport::pipeline::{ReferencedWeights, StageState};

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
        // The weights are referenced, not stored: far fewer new bytes than the arena holds.
        let weights = snap
            .capture
            .weights
            .clone()
            .expect("tiny's weights fill whole chunks");
        assert!(weights.chunks > 0);
        let weight_bytes = weights.byte_range(4096, stage.arena().len()).len() as u64;
        assert!(taken.new_bytes <= stage.arena().len() as u64 - weight_bytes);
        let fresh = Stage::new(&cfg, &plan, 0, 1, &pool).unwrap();
        // The KV cache and the cursor change; weights do not (the snapshotter relies on it).
        stage.set_position(0, 3).unwrap();
        let kv = stage.layout().kv.offset;
        stage.arena_mut().bytes_mut()[kv..kv + 64].fill(0x5A);
        stage.mark_written(kv..kv + 64);
        let again = snap
            .at_step_boundary(&stage)
            .unwrap()
            .expect("step 0 again: the cursor step did not move");
        assert_eq!(again.new_chunks, 1, "only the touched KV chunk is new");
        // Chunks not marked written are not hashed again: an unmarked write goes unseen (which
        // is why writers through arena_mut must mark what they write).
        let unmarked = kv + 8192;
        let before = stage.arena().bytes()[unmarked];
        stage.arena_mut().bytes_mut()[unmarked] ^= 0xFF;
        let mut probe = StageCapture {
            weights: snap.capture.weights.clone(),
            hashes: snap.capture.hashes.clone(),
            checkpoint: snap.capture.checkpoint,
        };
        let unseen = probe.capture(&store, 0, &stage).unwrap();
        assert_eq!(
            unseen.info().new_chunks,
            0,
            "the unmarked write was not re-hashed"
        );
        stage.arena_mut().bytes_mut()[unmarked] = before;

        let mut other = Stage::new(&cfg, &plan, 0, 1, &pool).unwrap();
        // Everything but the weights (which `other` regenerated from the seed) is lost.
        let keep = weights.byte_range(4096, other.arena().len());
        let len = other.arena().len();
        other.arena_mut().bytes_mut()[..keep.start].fill(0);
        other.arena_mut().bytes_mut()[keep.end..len].fill(0);
        drop(snap);
        let writer = Arc::try_unwrap(writer).expect("only the test holds the writer");
        let infos = writer.finish().unwrap();
        assert_eq!(infos.len(), 2);
        // The later snapshot (same step, so same index file) restores the changed stage.
        let mut arena = vec![0u8; other.arena().len()];
        let restored = store.restore(0, 0, &mut arena).unwrap();
        let referenced = restored.weights.expect("the index references the weights");
        let state = StageState {
            arena,
            cursor: serde_json::from_slice(&restored.cursor).unwrap(),
            weights: Some(ReferencedWeights {
                range: referenced.byte_range(4096, len),
                hash: referenced.hash,
                source: referenced.source,
            }),
        };
        // Weights that are not the recorded ones are refused, naming the hash.
        let mut wrong = Stage::new(&cfg, &plan, 0, 1, &pool).unwrap();
        wrong.arena_mut().bytes_mut()[keep.start] ^= 1;
        let err = slug_transport::pipeline::restore_stage(&mut wrong, &state).unwrap_err();
        assert!(
            err.to_string().contains("weights, regenerated here"),
            "{err}"
        );
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
