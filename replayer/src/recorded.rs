//! What a trace says the run did: its pipeline configuration, every sent transfer by (stage,
//! tag), kernel output hashes, step times, snapshots and payloads — and whether this node can
//! reproduce it at all (format version, CPU features).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use slug_kernels::{KernelId, StageCursor};
use slug_schema::blob::BlobStore;
use slug_schema::snapshot::SnapshotStore;
use slug_schema::{Direction, Event, EventKind, KindSet, TimeRange, Trace, Transfer, TransferKey};
use slug_transport::pipeline::{PipelineConfig, ReferencedWeights, StageState, schedule_slot};
use slug_transport::transfer::Tag;

use crate::error::{ReplayError, Result};

/// A kernel call of a stage: (stage, stage step, kernel, layer if the kernel has one).
pub type KernelKey = (u32, u64, KernelId, Option<u32>);

/// Where a stage's starting state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StateSource {
    /// A snapshot of the trace (verified chunk by chunk).
    Snapshot,
    /// The trace has no step-0 snapshot of the stage: its weights are regenerated from the
    /// recorded model seed (a step-0 state is a pure function of the configuration).
    Seed,
}

/// A trace opened for replay.
#[derive(Debug)]
pub struct RecordedRun {
    dir: PathBuf,
    config: PipelineConfig,
    payloads: String,
    sends: HashMap<(u32, Tag), Transfer>,
    kernels: HashMap<KernelKey, u128>,
    kernel_spans: u64,
    boundaries: HashMap<(u32, u64), u64>,
    first_kernel_ns: HashMap<u32, u64>,
    snapshots: Option<SnapshotStore>,
    snapshot_steps: Vec<(u32, u64)>,
    blobs: Option<BlobStore>,
    damage: Vec<String>,
    trace_id: Option<String>,
    stage_output_hashes: bool,
    all_kernel_hashes: bool,
}

impl RecordedRun {
    /// Opens the trace in `dir`, refusing a format version this build cannot read and a run
    /// that depended on a CPU feature this node lacks, and indexes its transfers and kernels.
    pub fn open(dir: impl AsRef<Path>) -> Result<RecordedRun> {
        let dir = dir.as_ref().to_path_buf();
        let trace_err = |e: slug_schema::SchemaError| ReplayError::Trace {
            path: dir.clone(),
            cause: Box::new(e),
        };
        let trace = Trace::open(&dir).map_err(trace_err)?;
        let not = |reason: String| ReplayError::NotReplayable {
            path: dir.clone(),
            reason,
        };
        let run = &trace.manifest().run;
        let mut config: PipelineConfig = serde_json::from_value(
            run.get("pipeline")
                .cloned()
                .ok_or_else(|| not("its manifest has no pipeline configuration (`run.pipeline`); it was not written by `slug record`".into()))?,
        )
        .map_err(|e| not(format!("its pipeline configuration does not parse ({e})")))?;
        // Where stages ran does not change what they compute: a replay runs every stage where
        // it places them, and the moves of the recorded run (its `--migrate` targets, its
        // `--control` endpoint) are not repeated.
        config.migrations.clear();
        config.control = None;
        config.live_moves = false;
        config
            .validate()
            .map_err(|e| not(format!("its pipeline configuration is invalid ({e})")))?;
        check_cpu(&config, &dir, slug_kernels::has_hardware_fma())?;
        check_size(&config, &dir, slug_kernels::mem_available())?;
        let payloads = run
            .get("payloads")
            .and_then(|v| v.as_str())
            .unwrap_or("none")
            .to_string();
        let send_tags = send_tags(&config);
        let mut rec = RecordedRun {
            dir: dir.clone(),
            config,
            payloads,
            sends: HashMap::new(),
            kernels: HashMap::new(),
            kernel_spans: 0,
            boundaries: HashMap::new(),
            first_kernel_ns: HashMap::new(),
            snapshots: None,
            snapshot_steps: Vec::new(),
            blobs: None,
            damage: Vec::new(),
            trace_id: trace.manifest().trace_id.clone(),
            all_kernel_hashes: false,
            stage_output_hashes: trace
                .manifest()
                .capabilities
                .iter()
                .any(|c| c.name == slug_schema::STAGE_OUTPUT_HASHES && c.captured),
        };
        let kinds = KindSet::of(&[
            EventKind::Transfer,
            EventKind::KernelSpan,
            EventKind::StepBoundary,
        ]);
        let stages = rec.config.stages;
        let mut seen_stages = vec![false; stages];
        for ep in &trace.manifest().endpoints {
            let who = format!("endpoint {} ({})", ep.id, ep.log.display());
            if ep.stage as usize >= stages {
                rec.damage.push(format!(
                    "{who}: the manifest puts it at stage {}, but the run had stages 0..{stages}; \
                     its log was not read",
                    ep.stage
                ));
                continue;
            }
            // A stage that moved between nodes has one endpoint per node it ran on; each one
            // after the first names the endpoint whose log it continues.
            if std::mem::replace(&mut seen_stages[ep.stage as usize], true)
                && ep.continues.is_none()
            {
                rec.damage.push(format!(
                    "{who}: a second endpoint for stage {}; its log was not read",
                    ep.stage
                ));
                continue;
            }
            let log = match trace.log_of(ep) {
                Ok(log) => log,
                // A path outside the trace or not a regular file is a crafted trace: refuse.
                Err(e @ slug_schema::SchemaError::UnsafePath { .. }) => return Err(trace_err(e)),
                Err(e) => {
                    rec.damage
                        .push(format!("{who}: its log cannot be read ({e})"));
                    continue;
                }
            };
            if log.header().endpoint != ep.id {
                rec.damage.push(format!(
                    "{who}: the log belongs to endpoint {}, not to the endpoint the manifest \
                     lists; it was not read",
                    log.header().endpoint
                ));
                continue;
            }
            let r = log.recovery();
            if r.corrupt_frames > 0 {
                rec.damage.push(format!(
                    "{who}: {} corrupt frame{} ({} bytes) skipped",
                    r.corrupt_frames,
                    if r.corrupt_frames == 1 { "" } else { "s" },
                    r.corrupt_bytes
                ));
            }
            if r.truncated_bytes > 0 && r.partial_frames > 0 {
                rec.damage.push(format!(
                    "{who}: cut short, {} bytes of a partial frame lost",
                    r.truncated_bytes
                ));
            }
            let names: HashMap<u32, KernelId> = KernelId::ALL
                .iter()
                .filter_map(|k| {
                    let id = u32::from(k.index());
                    (log.string(id) == Some(k.name())).then_some((id, *k))
                })
                .collect();
            let mut undecodable = 0u64;
            let mut foreign = 0u64;
            for event in log.events_in(TimeRange::ALL, kinds) {
                let Ok(event) = event else {
                    undecodable += 1;
                    continue;
                };
                match event {
                    Event::Transfer(t) if t.direction == Direction::Send => {
                        let TransferKey { link, seq } = TransferKey::unpack(t.id);
                        if link != ep.stage {
                            foreign += 1;
                            continue;
                        }
                        let tag = usize::try_from(seq)
                            .ok()
                            .and_then(|n| send_tags.get(link as usize)?.get(n));
                        if let Some(tag) = tag {
                            rec.sends.insert((link, *tag), t);
                        }
                    }
                    Event::KernelSpan(k) => {
                        rec.kernel_spans += 1;
                        let first = rec.first_kernel_ns.entry(ep.stage).or_insert(u64::MAX);
                        if k.step == 0 && k.start_ns > 0 {
                            *first = (*first).min(k.start_ns);
                        }
                        if let (Some(hash), Some(kernel)) = (k.output_hash, names.get(&k.kernel)) {
                            // The head's hash is always recorded; the others only with
                            // `--hash-kernels`.
                            rec.all_kernel_hashes |= *kernel != KernelId::Head;
                            rec.kernels
                                .insert((ep.stage, k.step, *kernel, k.layer), hash);
                        }
                    }
                    Event::StepBoundary(b) => {
                        rec.boundaries.insert((ep.stage, b.step), b.ns);
                    }
                    _ => {}
                }
            }
            if undecodable > 0 {
                rec.damage.push(format!(
                    "{who}: {undecodable} frame{} passed its checksum but does not decode",
                    if undecodable == 1 { "" } else { "s" }
                ));
            }
            if foreign > 0 {
                rec.damage.push(format!(
                    "{who}: {foreign} sent transfers belong to another stage's link (the \
                     manifest's stage {} is not the stage that wrote this log); ignored",
                    ep.stage
                ));
            }
        }
        if let Some(s) = seen_stages.iter().position(|seen| !seen) {
            rec.damage
                .push(format!("stage {s}: the manifest lists no endpoint for it"));
        }
        let snap_dir = dir.join(slug_schema::SNAPSHOTS_DIR);
        refuse_symlink(&dir, slug_schema::SNAPSHOTS_DIR)?;
        refuse_symlink(&dir, slug_schema::PAYLOADS_DIR)?;
        if snap_dir.is_dir() {
            let store = SnapshotStore::open(&snap_dir).map_err(|e| rec.store_err(e))?;
            rec.snapshot_steps = store.snapshots().map_err(|e| rec.store_err(e))?;
            rec.snapshots = Some(store);
        }
        let blob_dir = dir.join(slug_schema::PAYLOADS_DIR);
        if blob_dir.is_dir() {
            rec.blobs = Some(BlobStore::open(&blob_dir, 1).map_err(|e| rec.store_err(e))?);
        }
        Ok(rec)
    }

    fn store_err(&self, e: slug_schema::SchemaError) -> ReplayError {
        ReplayError::Store {
            path: self.dir.clone(),
            cause: Box::new(e),
        }
    }

    /// What could not be read from the trace's logs (damaged frames, a log that belongs to
    /// another endpoint, ...), each a sentence naming the endpoint: why checks may be missing.
    pub fn damage(&self) -> &[String] {
        &self.damage
    }

    /// Whether the recorder hashed every step's stage output (the last stage's logits), so
    /// the default verification level checks them.
    pub fn has_stage_output_hashes(&self) -> bool {
        self.stage_output_hashes
    }

    /// The trace's random id, when it has one (traces from before ids have none).
    pub fn trace_id(&self) -> Option<&str> {
        self.trace_id.as_deref()
    }

    /// The trace directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The recorded pipeline configuration.
    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// The recorded payload policy (`none`, `boundary` or `all`).
    pub fn payloads(&self) -> &str {
        &self.payloads
    }

    /// The transfer stage `src` sent with `tag`, as recorded.
    pub fn sent(&self, src: u32, tag: Tag) -> Option<&Transfer> {
        self.sends.get(&(src, tag))
    }

    /// Recorded sent transfers.
    pub fn sent_count(&self) -> usize {
        self.sends.len()
    }

    /// The recorded output hash of a kernel call, when the trace has kernel hashes.
    pub fn kernel_hash(&self, key: &KernelKey) -> Option<u128> {
        self.kernels.get(key).copied()
    }

    /// Whether the trace holds per-kernel output hashes (`slug record --hash-kernels`).
    pub fn has_kernel_hashes(&self) -> bool {
        self.all_kernel_hashes
    }

    /// Kernel spans in the trace (with or without hashes).
    pub fn kernel_spans(&self) -> u64 {
        self.kernel_spans
    }

    /// Recorded nanoseconds stage `stage` took for its steps `from..=to`: from the end of step
    /// `from - 1` (or the first kernel of step 0) to the end of step `to`, waits included.
    pub fn recorded_ns(&self, stage: u32, from: u64, to: u64) -> Option<u64> {
        let start = if from == 0 {
            self.first_kernel_ns
                .get(&stage)
                .copied()
                .filter(|n| *n != u64::MAX)?
        } else {
            *self.boundaries.get(&(stage, from - 1))?
        };
        let end = *self.boundaries.get(&(stage, to))?;
        end.checked_sub(start)
    }

    /// Payload bytes of a recorded transfer, when they were stored.
    pub fn payload(&self, t: &Transfer) -> Result<Option<Vec<u8>>> {
        // No transfer of this run can carry more than a whole context of hidden states.
        let m = &self.config.model;
        let max = (m.max_seq as u64)
            .saturating_mul(m.dim as u64)
            .saturating_mul(4);
        if t.payload.is_some() && t.len > max {
            return Err(ReplayError::NotReplayable {
                path: self.dir.clone(),
                reason: format!(
                    "transfer {} claims {} bytes, more than any transfer of its recorded model can \
                     carry (max_seq {} x dim {} x 4 = {max}); the log is damaged or crafted",
                    t.id, t.len, m.max_seq, m.dim
                ),
            });
        }
        match (t.payload, &self.blobs) {
            (Some(hash), Some(blobs)) => blobs
                .get(hash, t.len)
                .map(Some)
                .map_err(|e| self.store_err(e)),
            _ => Ok(None),
        }
    }

    /// The latest snapshot step of `stage` at or before `step`.
    pub fn snapshot_at_or_before(&self, stage: u32, step: u64) -> Option<u64> {
        self.snapshot_steps
            .iter()
            .filter(|(s, k)| *s == stage && *k <= step)
            .map(|(_, k)| *k)
            .max()
    }

    /// Steps of `stage` that have a snapshot.
    pub fn snapshot_steps(&self, stage: u32) -> Vec<u64> {
        self.snapshot_steps
            .iter()
            .filter(|(s, _)| *s == stage)
            .map(|(_, k)| *k)
            .collect()
    }

    /// The state of `stage` at `step` from its snapshot (every chunk's hash verified).
    pub fn snapshot_state(&self, stage: u32, step: u64) -> Result<StageState> {
        let store = self
            .snapshots
            .as_ref()
            .ok_or_else(|| ReplayError::NotReplayable {
                path: self.dir.clone(),
                reason: "it has no snapshots/ directory".into(),
            })?;
        read_snapshot(&self.dir, store, stage, step)
    }

    /// The state of `stage` at `step`: its snapshot; at step 0 without one, `None` (the caller
    /// rebuilds it from the recorded seed).
    pub fn state_at(&self, stage: u32, step: u64) -> Result<(Option<StageState>, StateSource)> {
        if step == 0 && !self.snapshot_steps.contains(&(stage, 0)) {
            return Ok((None, StateSource::Seed));
        }
        Ok((
            Some(self.snapshot_state(stage, step)?),
            StateSource::Snapshot,
        ))
    }

    /// The latest step at or before `step` at which every one of `stages` stages has a
    /// snapshot (where a whole pipeline can resume), 0 when there is none.
    pub fn common_snapshot_at_or_before(&self, stages: usize, step: u64) -> u64 {
        self.snapshot_steps(0)
            .into_iter()
            .filter(|k| *k <= step)
            .filter(|k| (1..stages as u32).all(|s| self.snapshot_steps.contains(&(s, *k))))
            .max()
            .unwrap_or(0)
    }
}

/// `stage`'s snapshot at `step` from `store` (of the trace in `dir`), every chunk verified.
fn read_snapshot(dir: &Path, store: &SnapshotStore, stage: u32, step: u64) -> Result<StageState> {
    let store_err = |e| ReplayError::Store {
        path: dir.to_path_buf(),
        cause: Box::new(e),
    };
    let index = store.read_index(stage, step).map_err(store_err)?;
    // The index is untrusted: never allocate what it claims before checking it can fit.
    let len = usize::try_from(index.arena_len)
        .ok()
        .filter(|_| slug_kernels::check_fits(index.arena_len).is_ok())
        .ok_or_else(|| ReplayError::NotReplayable {
            path: store.index_path(stage, step),
            reason: format!(
                "its snapshot index claims a {}-byte arena, more than this machine has available \
                 ({} MiB MemAvailable); the index is damaged or crafted",
                index.arena_len,
                slug_kernels::mem_available().unwrap_or(0) >> 20
            ),
        })?;
    let mut arena = vec![0u8; len];
    let restored = store.restore(stage, step, &mut arena).map_err(store_err)?;
    let cursor: StageCursor =
        serde_json::from_slice(&restored.cursor).map_err(|e| ReplayError::NotReplayable {
            path: store.index_path(stage, step),
            reason: format!("its cursor is not a stage cursor ({e})"),
        })?;
    // Referenced weights stay zero here: restore_stage checks the ones the stage regenerated.
    let weights = restored.weights.map(|w| ReferencedWeights {
        range: w.byte_range(index.chunk_size as usize, len),
        hash: w.hash,
        source: w.source,
    });
    Ok(StageState {
        arena,
        cursor,
        weights,
    })
}

/// The state of `stage` at `step` from the trace in `dir` without indexing its logs (what a
/// node serving a `--hosts` replay needs): at step 0 `None` when the trace has no snapshot
/// (rebuilt from the seed); an error when `dir` is not there or a later snapshot is missing.
pub fn node_state(dir: &Path, stage: u32, step: u64) -> Result<Option<StageState>> {
    if !dir.is_dir() {
        return Err(ReplayError::NotReplayable {
            path: dir.to_path_buf(),
            reason: "there is no trace directory there".into(),
        });
    }
    let snap_dir = dir.join(slug_schema::SNAPSHOTS_DIR);
    let index = slug_schema::snapshot::index_path(&snap_dir, stage, step);
    if step == 0 && !index.is_file() {
        return Ok(None);
    }
    let store = SnapshotStore::open(&snap_dir).map_err(|e| ReplayError::Store {
        path: dir.to_path_buf(),
        cause: Box::new(e),
    })?;
    read_snapshot(dir, &store, stage, step).map(Some)
}

/// Refuses `dir/name` when it is a symlink: the stores under it must lie inside the trace.
fn refuse_symlink(dir: &Path, name: &str) -> Result<()> {
    let path = dir.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_symlink() => Err(ReplayError::NotReplayable {
            path: dir.to_path_buf(),
            reason: format!(
                "{} is a symbolic link; a trace's files must lie inside it",
                path.display()
            ),
        }),
        _ => Ok(()),
    }
}

/// A lower bound of the bytes the run's stages hold together: every layer's weights and KV
/// cache plus the embedding, from the configuration alone (before any layout is built).
fn model_bytes_lower_bound(config: &PipelineConfig) -> u64 {
    let m = &config.model;
    let (d, kv, ffn) = (m.dim as u64, m.kv_dim() as u64, m.ffn as u64);
    let seqs = config.prompts.len() as u64;
    let per_layer = (2 * d * d)
        .saturating_add(2 * d * kv)
        .saturating_add(3 * d * ffn)
        .saturating_add(
            (2 * m.max_seq as u64)
                .saturating_mul(kv)
                .saturating_mul(seqs),
        );
    (m.layers as u64)
        .saturating_mul(per_layer)
        .saturating_add((m.vocab as u64).saturating_mul(d))
        .saturating_mul(4)
}

/// Refuses a trace whose recorded configuration needs more memory than this machine has
/// available (`available`, from `MemAvailable`): a crafted `layers: 100000` must fail at once,
/// not after minutes of laying out and generating weights.
fn check_size(config: &PipelineConfig, dir: &Path, available: Option<u64>) -> Result<()> {
    let needed = model_bytes_lower_bound(config);
    match available {
        Some(available) if needed > available => Err(ReplayError::NotReplayable {
            path: dir.to_path_buf(),
            reason: format!(
                "its recorded model ({} layers, dim {}, max_seq {}, {} sequences) needs at least \
                 {} MiB, more than the {} MiB this machine has available (MemAvailable)",
                config.model.layers,
                config.model.dim,
                config.model.max_seq,
                config.prompts.len(),
                needed >> 20,
                available >> 20
            ),
        }),
        _ => Ok(()),
    }
}

/// Refuses a run that used FMA on a node without it (`has_fma`): fused and unfused
/// multiply-adds round differently, so no replay there could be bit-exact.
fn check_cpu(config: &PipelineConfig, dir: &Path, has_fma: bool) -> Result<()> {
    if config.model.fma && !has_fma {
        return Err(ReplayError::MissingCpuFeature {
            feature: "FMA",
            path: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// For each link (= sending stage) of `cfg`, the tags of its transfers in send order, so a
/// recorded transfer id (link, n) names the bytes it carried whatever the replay's schedule.
pub fn send_tags(cfg: &PipelineConfig) -> Vec<Vec<Tag>> {
    let n = cfg.stages;
    let Ok(plan) = cfg.plan() else {
        return Vec::new();
    };
    if n < 2 {
        return Vec::new();
    }
    (0..n)
        .map(|s| {
            let last = s + 1 == n;
            let layer = if last {
                plan.layers()
            } else {
                plan.layers_of(s + 1).start
            } as u32;
            (0u64..)
                .map_while(|f| schedule_slot(cfg, f))
                .filter(|slot| !(last && slot.step as usize + 1 == cfg.tokens))
                .map(|slot| Tag {
                    sequence: slot.seq,
                    step: slot.step,
                    layer,
                })
                .collect()
        })
        .collect()
}

/// The stage step at which (`step`, `seq`) runs in `cfg`'s schedule.
pub fn stage_step_of(cfg: &PipelineConfig, step: u32, seq: u32) -> Option<u64> {
    (0u64..)
        .map_while(|f| schedule_slot(cfg, f).map(|s| (f, s)))
        .find(|(_, s)| s.step == step && s.seq == seq)
        .map(|(f, _)| f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_fma_run_is_refused_only_where_fma_is_missing() {
        let mut cfg = PipelineConfig::new(
            slug_kernels::ModelConfig::preset("tiny").unwrap(),
            "a",
            1,
            2,
        );
        let dir = Path::new("/traces/t1");
        check_cpu(&cfg, dir, false).unwrap();
        cfg.model.fma = true;
        check_cpu(&cfg, dir, true).unwrap();
        let msg = check_cpu(&cfg, dir, false).unwrap_err().to_string();
        assert!(
            msg.contains("lacks FMA") && msg.contains("/traces/t1"),
            "{msg}"
        );
    }

    #[test]
    fn a_snapshot_index_claiming_a_1_tib_arena_is_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let stage_dir = dir.path().join("snapshots/stage-0");
        std::fs::create_dir_all(&stage_dir).unwrap();
        let index = slug_schema::snapshot::SnapshotIndex {
            stage: 0,
            step: 0,
            arena_len: 1 << 40,
            chunk_size: 1 << 31,
            cursor: b"{}".to_vec(),
            chunks: vec![1; 512],
            weights: None,
        };
        std::fs::write(stage_dir.join("step-0.idx"), index.encode()).unwrap();
        let e = node_state(dir.path(), 0, 0).unwrap_err().to_string();
        assert!(
            e.contains("claims a 1099511627776-byte arena") && e.contains("MemAvailable"),
            "{e}"
        );
    }

    #[test]
    fn a_model_larger_than_memory_is_refused_from_its_configuration() {
        let mut cfg = PipelineConfig::new(
            slug_kernels::ModelConfig::preset("tiny").unwrap(),
            "a",
            1,
            2,
        );
        let dir = Path::new("/traces/t1");
        check_size(&cfg, dir, Some(1 << 30)).unwrap();
        cfg.model.layers = 100_000;
        let e = check_size(&cfg, dir, Some(1 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("100000 layers") && e.contains("1024 MiB this machine has available"),
            "{e}"
        );
    }

    #[test]
    fn send_tags_follow_the_schedule_and_skip_the_last_token() {
        let mut cfg = PipelineConfig::new(
            slug_kernels::ModelConfig::preset("tiny").unwrap(),
            "a",
            2,
            3,
        );
        cfg.stages = 2;
        let tags = send_tags(&cfg);
        assert_eq!(tags[0].len(), 6);
        // The last stage sends back steps 0 and 1 of each sequence, never step 2.
        let back: Vec<(u32, u32)> = tags[1].iter().map(|t| (t.sequence, t.step)).collect();
        assert_eq!(back, vec![(0, 0), (1, 0), (0, 1), (1, 1)]);
        assert_eq!(stage_step_of(&cfg, 1, 1), Some(3));
    }
}
