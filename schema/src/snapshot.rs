//! Content-addressed snapshot store: a stage's arena and cursor as deduplicated zstd chunks.
//!
//! Layout under a trace's `snapshots/` directory:
//!
//! ```text
//! chunks/<h2>/<h32>.zst     one chunk, named by the xxh3-128 of its uncompressed bytes
//! stage-<S>/step-<N>.idx    one index per (stage, step): sizes, the cursor blob, chunk hashes
//! ```
//!
//! A chunk is stored once however many snapshots and stages contain it, so weights (which never
//! change) cost their bytes once per trace and each later snapshot only adds what changed.
//!
//! Taking a snapshot has two halves so the pipeline only pays for the copy of new bytes:
//! [`SnapshotStore::capture`] runs at the step boundary on the pipeline's thread, hashes every
//! chunk of the arena and copies out only the chunks the store has not seen; the pipeline may
//! then overwrite its arena. [`SnapshotStore::persist`] compresses and writes those copies and
//! the index; [`SnapshotWriter`] runs it on a background thread.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use xxhash_rust::xxh3::{xxh3_64, xxh3_128};

use crate::error::{Result, SchemaError};

/// Default chunk size: large enough that an index stays small (4 KiB per GiB of arena) and zstd
/// has context, small enough that a changed KV-cache row re-stores little.
pub const DEFAULT_CHUNK_SIZE: usize = 256 * 1024;

/// Default zstd level for chunks: fast, since the background writer must keep up with the run.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

const INDEX_MAGIC: &[u8; 8] = b"SLUGSNAP";
/// Version 2 adds the referenced weights ([`WeightsRef`]); version 1 indexes still read.
const INDEX_VERSION: u32 = 2;
/// Header flag (the u32 at byte 44): the index ends with a [`WeightsRef`].
const FLAG_WEIGHTS: u32 = 1;
/// The longest weights source an index may hold.
const MAX_SOURCE_LEN: usize = 4096;
const INDEX_HEADER_LEN: usize = 48;
/// Directory of chunk files inside the store.
pub const CHUNKS_DIR: &str = "chunks";

/// Path of the index of `stage`'s snapshot at `step` in the store at `dir` (a trace's
/// `snapshots/`): `stage-<S>/step-<N>.idx`.
pub fn index_path(dir: &Path, stage: u32, step: u64) -> PathBuf {
    dir.join(format!("stage-{stage}"))
        .join(format!("step-{step}.idx"))
}

/// Weights a snapshot references instead of storing: they are immutable and reproducible, so
/// the restorer regenerates them (from the seed) or loads them (from a checkpoint file) into
/// its stage and checks them against `hash` before it takes the snapshot's other chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightsRef {
    /// First referenced chunk: chunks `first_chunk..first_chunk + chunks` are the weights (the
    /// whole chunks inside the weights section; a chunk it shares with other state is stored).
    pub first_chunk: u32,
    /// Referenced chunks; their entries in [`SnapshotIndex::chunks`] are 0 (nothing stored).
    pub chunks: u32,
    /// xxh3-128 of the arena bytes those chunks cover.
    pub hash: u128,
    /// Where the weights come from, for the restorer and its error messages (e.g. `seed 42 of
    /// the small preset`).
    pub source: String,
}

impl WeightsRef {
    /// The arena bytes the referenced chunks cover, for an arena of `arena_len` bytes chunked
    /// by `chunk_size`.
    pub fn byte_range(&self, chunk_size: usize, arena_len: usize) -> std::ops::Range<usize> {
        let chunks = self.chunk_range();
        let start = chunks.start.saturating_mul(chunk_size).min(arena_len);
        let end = chunks.end.saturating_mul(chunk_size).min(arena_len);
        start..end
    }

    /// The referenced chunks' indexes.
    pub fn chunk_range(&self) -> std::ops::Range<usize> {
        let first = self.first_chunk as usize;
        first..first.saturating_add(self.chunks as usize)
    }
}

/// What one snapshot holds: the arena size, the chunking, the cursor blob and each chunk's hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotIndex {
    /// Stage snapshotted.
    pub stage: u32,
    /// Step boundary it was taken at.
    pub step: u64,
    /// Arena bytes.
    pub arena_len: u64,
    /// Chunk size; the last chunk may be shorter.
    pub chunk_size: u32,
    /// The stage's small position state (step counters, sequence positions), stored inline.
    pub cursor: Vec<u8>,
    /// xxh3-128 of each chunk's bytes, in arena order (0 for a chunk of `weights`).
    pub chunks: Vec<u128>,
    /// The weights, referenced instead of stored (version 2 indexes; `None`: every chunk is
    /// stored, as version 1 stored them).
    pub weights: Option<WeightsRef>,
}

impl SnapshotIndex {
    /// The index file's bytes: a fixed header, the cursor, the hashes and an xxh3-64 checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(INDEX_HEADER_LEN + self.cursor.len() + self.chunks.len() * 16 + 8);
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        out.extend_from_slice(&self.stage.to_le_bytes());
        out.extend_from_slice(&self.step.to_le_bytes());
        out.extend_from_slice(&self.arena_len.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.cursor.len() as u32).to_le_bytes());
        let flags = if self.weights.is_some() {
            FLAG_WEIGHTS
        } else {
            0
        };
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&self.cursor);
        for hash in &self.chunks {
            out.extend_from_slice(&hash.to_le_bytes());
        }
        if let Some(w) = &self.weights {
            out.extend_from_slice(&w.first_chunk.to_le_bytes());
            out.extend_from_slice(&w.chunks.to_le_bytes());
            out.extend_from_slice(&w.hash.to_le_bytes());
            out.extend_from_slice(&(w.source.len() as u32).to_le_bytes());
            out.extend_from_slice(w.source.as_bytes());
        }
        let checksum = xxh3_64(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        out
    }

    /// Parses index bytes read from `path` (named in errors), checking every length and the checksum.
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<SnapshotIndex> {
        let bad = |problem: String| SchemaError::SnapshotIndex {
            path: path.to_path_buf(),
            problem,
        };
        if bytes.len() < INDEX_HEADER_LEN + 8 {
            return Err(bad(format!("truncated ({} bytes)", bytes.len())));
        }
        if &bytes[..8] != INDEX_MAGIC {
            return Err(bad("not a snapshot index (wrong magic)".into()));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 8);
        if xxh3_64(body).to_le_bytes() != tail {
            return Err(bad("corrupt (checksum mismatch)".into()));
        }
        let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap_or([0; 8]));
        let version = u32_at(8);
        if version == 0 || version > INDEX_VERSION {
            return Err(bad(format!(
                "version {version}, this slug reads versions 1 to {INDEX_VERSION}"
            )));
        }
        let flags = if version >= 2 { u32_at(44) } else { 0 };
        if flags & !FLAG_WEIGHTS != 0 {
            return Err(bad(format!("corrupt (unknown flags {flags:#x})")));
        }
        let (stage, step, arena_len) = (u32_at(12), u64_at(16), u64_at(24));
        let (chunk_size, count, cursor_len) = (u32_at(32), u32_at(36), u32_at(40));
        if chunk_size == 0 {
            return Err(bad("corrupt (chunk size 0)".into()));
        }
        if arena_len.div_ceil(u64::from(chunk_size)) != u64::from(count) {
            return Err(bad(format!(
                "corrupt ({count} chunks of {chunk_size} bytes cannot hold {arena_len} bytes)"
            )));
        }
        let expected = INDEX_HEADER_LEN as u64 + u64::from(cursor_len) + u64::from(count) * 16;
        let fixed_ok = if flags & FLAG_WEIGHTS == 0 {
            body.len() as u64 == expected
        } else {
            body.len() as u64 >= expected + 28
        };
        if !fixed_ok {
            return Err(bad(format!(
                "corrupt ({} bytes, the header implies {expected}{})",
                body.len(),
                if flags & FLAG_WEIGHTS == 0 {
                    ""
                } else {
                    " plus the weights reference"
                }
            )));
        }
        let cursor_end = INDEX_HEADER_LEN + cursor_len as usize;
        let hashes_end = cursor_end + count as usize * 16;
        let cursor = body[INDEX_HEADER_LEN..cursor_end].to_vec();
        let chunks: Vec<u128> = body[cursor_end..hashes_end]
            .chunks_exact(16)
            .map(|h| u128::from_le_bytes(h.try_into().unwrap_or([0; 16])))
            .collect();
        let weights = if flags & FLAG_WEIGHTS == 0 {
            None
        } else {
            let at = hashes_end;
            let (first_chunk, n) = (u32_at(at), u32_at(at + 4));
            let hash = u128::from_le_bytes(body[at + 8..at + 24].try_into().unwrap_or([0; 16]));
            let source_len = u32_at(at + 24) as usize;
            if source_len > MAX_SOURCE_LEN || body.len() != at + 28 + source_len {
                return Err(bad(format!(
                    "corrupt (a {source_len}-byte weights source in {} bytes)",
                    body.len()
                )));
            }
            if u64::from(first_chunk) + u64::from(n) > u64::from(count) {
                return Err(bad(format!(
                    "corrupt (weights chunks {first_chunk}..+{n} outside its {count} chunks)"
                )));
            }
            let source = std::str::from_utf8(&body[at + 28..])
                .map_err(|_| bad("corrupt (the weights source is not UTF-8)".into()))?
                .to_owned();
            Some(WeightsRef {
                first_chunk,
                chunks: n,
                hash,
                source,
            })
        };
        Ok(SnapshotIndex {
            stage,
            step,
            arena_len,
            chunk_size,
            cursor,
            chunks,
            weights,
        })
    }

    /// The snapshot's id: the xxh3-128 of its encoded index.
    pub fn id(&self) -> u128 {
        xxh3_128(&self.encode())
    }
}

/// Totals of one snapshot, for the endpoint log's snapshot event and the run summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Stage.
    pub stage: u32,
    /// Step.
    pub step: u64,
    /// Snapshot id ([`SnapshotIndex::id`]).
    pub id: u128,
    /// Arena plus cursor bytes.
    pub bytes: u64,
    /// Bytes in chunks the store did not hold before.
    pub new_bytes: u64,
    /// Chunks in the snapshot.
    pub chunks: u32,
    /// Chunks the store did not hold before.
    pub new_chunks: u32,
    /// Compressed bytes written (0 until persisted).
    pub stored_bytes: u64,
}

/// What [`SnapshotStore::restore`] read besides the arena's stored chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredSnapshot {
    /// The stage's cursor blob.
    pub cursor: Vec<u8>,
    /// The weights the snapshot references instead of storing (not written into the arena).
    pub weights: Option<WeightsRef>,
}

/// A captured snapshot whose new chunks are copied out of the arena but not yet written.
#[derive(Debug)]
pub struct PendingSnapshot {
    index: SnapshotIndex,
    new_chunks: Vec<(u128, Vec<u8>)>,
}

impl PendingSnapshot {
    /// The index this snapshot will write.
    pub fn index(&self) -> &SnapshotIndex {
        &self.index
    }

    /// Its totals (`stored_bytes` is 0: nothing is written yet).
    pub fn info(&self) -> SnapshotInfo {
        let new_bytes: usize = self.new_chunks.iter().map(|(_, b)| b.len()).sum();
        SnapshotInfo {
            stage: self.index.stage,
            step: self.index.step,
            id: self.index.id(),
            bytes: self.index.arena_len + self.index.cursor.len() as u64,
            new_bytes: new_bytes as u64,
            chunks: self.index.chunks.len() as u32,
            new_chunks: self.new_chunks.len() as u32,
            stored_bytes: 0,
        }
    }
}

#[derive(Debug, Default)]
struct StoreState {
    /// Chunks stored or captured for storing (so a second capture does not copy them again).
    known: HashSet<u128>,
    /// The first persist failure; once set the store refuses further snapshots.
    failed: Option<String>,
}

/// The snapshot store of one trace (`<trace>/snapshots/`), shared by every stage recorded into it.
#[derive(Debug)]
pub struct SnapshotStore {
    dir: PathBuf,
    chunk_size: usize,
    zstd_level: i32,
    state: Mutex<StoreState>,
    tmp_counter: AtomicU64,
}

impl SnapshotStore {
    /// Opens (creating if needed) the store in `dir`, learning which chunks it already holds.
    pub fn open(dir: impl AsRef<Path>) -> Result<SnapshotStore> {
        Self::open_with(dir, DEFAULT_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL)
    }

    /// [`SnapshotStore::open`] with a chunk size (clamped to at least 4 KiB) and zstd level.
    pub fn open_with(
        dir: impl AsRef<Path>,
        chunk_size: usize,
        zstd_level: i32,
    ) -> Result<SnapshotStore> {
        let dir = dir.as_ref().to_path_buf();
        let chunks = dir.join(CHUNKS_DIR);
        std::fs::create_dir_all(&chunks).map_err(|e| SchemaError::io(&chunks, e))?;
        let mut known = HashSet::new();
        for fan in std::fs::read_dir(&chunks).map_err(|e| SchemaError::io(&chunks, e))? {
            let fan = fan.map_err(|e| SchemaError::io(&chunks, e))?.path();
            if !fan.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(&fan).map_err(|e| SchemaError::io(&fan, e))? {
                let name = entry.map_err(|e| SchemaError::io(&fan, e))?.file_name();
                let hash = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".zst"))
                    .and_then(|hex| u128::from_str_radix(hex, 16).ok());
                // Leftover temporary files of an interrupted write are not chunks.
                if let Some(hash) = hash {
                    known.insert(hash);
                }
            }
        }
        Ok(SnapshotStore {
            dir,
            chunk_size: chunk_size.max(4096),
            zstd_level,
            state: Mutex::new(StoreState {
                known,
                failed: None,
            }),
            tmp_counter: AtomicU64::new(0),
        })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The chunk size new snapshots use.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Path of the chunk file for `hash`.
    pub fn chunk_path(&self, hash: u128) -> PathBuf {
        let hex = format!("{hash:032x}");
        self.dir
            .join(CHUNKS_DIR)
            .join(&hex[..2])
            .join(format!("{hex}.zst"))
    }

    /// Path of the index of `stage`'s snapshot at `step`.
    pub fn index_path(&self, stage: u32, step: u64) -> PathBuf {
        index_path(&self.dir, stage, step)
    }

    /// Whether the store holds (or has captured for writing) the chunk `hash`.
    pub fn has_chunk(&self, hash: u128) -> bool {
        self.lock().known.contains(&hash)
    }

    fn lock(&self) -> MutexGuard<'_, StoreState> {
        // A panic while holding the lock cannot leave the set inconsistent (single inserts),
        // so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_healthy(&self, state: &StoreState) -> Result<()> {
        match &state.failed {
            Some(first_error) => Err(SchemaError::StoreFailed {
                path: self.dir.clone(),
                first_error: first_error.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The hot-path half of a snapshot: hashes every chunk of `arena` and copies out the chunks
    /// the store lacks. After it returns the caller may modify `arena` freely.
    pub fn capture(
        &self,
        stage: u32,
        step: u64,
        arena: &[u8],
        cursor: &[u8],
    ) -> Result<PendingSnapshot> {
        self.capture_with(stage, step, arena, cursor, &[])
    }

    /// [`SnapshotStore::capture`] where `known[i]`, when `Some`, is the hash chunk `i` still
    /// has (it has not changed since it was hashed: weights), so it is not hashed again. The
    /// caller vouches for those hashes; chunks past `known`'s end are hashed.
    pub fn capture_with(
        &self,
        stage: u32,
        step: u64,
        arena: &[u8],
        cursor: &[u8],
        known: &[Option<u128>],
    ) -> Result<PendingSnapshot> {
        self.capture_referencing(stage, step, arena, cursor, known, None)
    }

    /// [`SnapshotStore::capture_with`] that references `weights` instead of storing them: their
    /// chunks are neither hashed nor copied (the caller vouches for `weights.hash`, computed
    /// once: weights never change), and the index says where they come from.
    pub fn capture_referencing(
        &self,
        stage: u32,
        step: u64,
        arena: &[u8],
        cursor: &[u8],
        known: &[Option<u128>],
        weights: Option<&WeightsRef>,
    ) -> Result<PendingSnapshot> {
        let referenced = weights.map_or(0..0, WeightsRef::chunk_range);
        let hashes: Vec<u128> = arena
            .chunks(self.chunk_size)
            .enumerate()
            .map(|(i, c)| {
                if referenced.contains(&i) {
                    return 0;
                }
                known
                    .get(i)
                    .copied()
                    .flatten()
                    .unwrap_or_else(|| xxh3_128(c))
            })
            .collect();
        let mut new_chunks = Vec::new();
        {
            let mut state = self.lock();
            self.check_healthy(&state)?;
            for (i, &hash) in hashes.iter().enumerate() {
                if referenced.contains(&i) {
                    continue;
                }
                if state.known.insert(hash) {
                    let start = i * self.chunk_size;
                    let end = (start + self.chunk_size).min(arena.len());
                    new_chunks.push((hash, arena[start..end].to_vec()));
                }
            }
        }
        Ok(PendingSnapshot {
            index: SnapshotIndex {
                stage,
                step,
                arena_len: arena.len() as u64,
                chunk_size: self.chunk_size as u32,
                cursor: cursor.to_vec(),
                chunks: hashes,
                weights: weights.cloned(),
            },
            new_chunks,
        })
    }

    /// The background half: compresses and writes the new chunks, then the index. A failure
    /// stops the store (later snapshots could reference the chunk that was not written).
    pub fn persist(&self, pending: PendingSnapshot) -> Result<SnapshotInfo> {
        self.check_healthy(&self.lock())?;
        let mut info = pending.info();
        let result = self.write_all(&pending);
        match result {
            Ok(stored) => {
                info.stored_bytes = stored;
                Ok(info)
            }
            Err(e) => {
                let mut state = self.lock();
                if state.failed.is_none() {
                    state.failed = Some(e.to_string());
                }
                Err(e)
            }
        }
    }

    fn write_all(&self, pending: &PendingSnapshot) -> Result<u64> {
        let mut stored = 0u64;
        for (hash, bytes) in &pending.new_chunks {
            stored += self.write_chunk(*hash, bytes)?;
        }
        let path = self.index_path(pending.index.stage, pending.index.step);
        self.write_atomic(&path, &pending.index.encode())?;
        Ok(stored)
    }

    fn write_chunk(&self, hash: u128, bytes: &[u8]) -> Result<u64> {
        let path = self.chunk_path(hash);
        // Another process recording into the same trace may have stored it already.
        if path.exists() {
            return Ok(0);
        }
        let compressed =
            zstd::bulk::compress(bytes, self.zstd_level).map_err(|e| SchemaError::io(&path, e))?;
        self.write_atomic(&path, &compressed)?;
        Ok(compressed.len() as u64)
    }

    /// Writes through a temporary name and renames, so a crash never leaves a partial file
    /// under a name that claims a content hash.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| SchemaError::io(parent, e))?;
        }
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
        if let Err(e) = std::fs::write(&tmp, bytes) {
            // Best effort: a partial temporary file is not a chunk, but do not leave it behind.
            let _ = std::fs::remove_file(&tmp);
            return Err(SchemaError::io(&tmp, e));
        }
        std::fs::rename(&tmp, path).map_err(|e| SchemaError::io(path, e))
    }

    /// Reads and checks the index of `stage`'s snapshot at `step`.
    pub fn read_index(&self, stage: u32, step: u64) -> Result<SnapshotIndex> {
        let path = self.index_path(stage, step);
        let rel = path.strip_prefix(&self.dir).unwrap_or(&path);
        // A regular file inside the store, of a size an index can have (64 MiB indexes 256 TiB).
        let bytes = crate::contained::read_in(&self.dir, rel, 64 << 20).map_err(|e| {
            SchemaError::SnapshotIndex {
                path: path.clone(),
                problem: format!("unreadable ({e})"),
            }
        })?;
        let index = SnapshotIndex::decode(&path, &bytes)?;
        if index.stage != stage || index.step != step {
            return Err(SchemaError::SnapshotIndex {
                path,
                problem: format!(
                    "for stage {} step {} but stored as stage {stage} step {step}",
                    index.stage, index.step
                ),
            });
        }
        Ok(index)
    }

    /// Every `(stage, step)` with an index in the store, sorted.
    pub fn snapshots(&self) -> Result<Vec<(u32, u64)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| SchemaError::io(&self.dir, e))? {
            let entry = entry.map_err(|e| SchemaError::io(&self.dir, e))?;
            let name = entry.file_name();
            let Some(stage) = name
                .to_str()
                .and_then(|n| n.strip_prefix("stage-"))
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let sdir = entry.path();
            for e in std::fs::read_dir(&sdir).map_err(|e| SchemaError::io(&sdir, e))? {
                let file = e.map_err(|e| SchemaError::io(&sdir, e))?.file_name();
                let step = file
                    .to_str()
                    .and_then(|n| n.strip_prefix("step-"))
                    .and_then(|n| n.strip_suffix(".idx"))
                    .and_then(|s| s.parse::<u64>().ok());
                if let Some(step) = step {
                    out.push((stage, step));
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Restores `stage`'s snapshot at `step` into `arena` (which must be the recorded size),
    /// verifying every chunk's hash; returns the cursor blob and the referenced weights, whose
    /// bytes it leaves as they are: the caller regenerates them and checks
    /// [`WeightsRef::hash`] (`slug_transport::pipeline::restore_stage` does).
    pub fn restore(&self, stage: u32, step: u64, arena: &mut [u8]) -> Result<RestoredSnapshot> {
        let index = self.read_index(stage, step)?;
        if index.arena_len != arena.len() as u64 {
            return Err(SchemaError::ArenaSize {
                stage,
                step,
                expected: index.arena_len,
                got: arena.len() as u64,
            });
        }
        let chunk_size = index.chunk_size as usize;
        let referenced = index.weights.as_ref().map_or(0..0, WeightsRef::chunk_range);
        for (i, (dst, &hash)) in arena.chunks_mut(chunk_size).zip(&index.chunks).enumerate() {
            if !referenced.contains(&i) {
                self.read_chunk_into(hash, dst)?;
            }
        }
        Ok(RestoredSnapshot {
            cursor: index.cursor,
            weights: index.weights,
        })
    }

    /// Decompresses chunk `hash` into `dst` (exactly its size) and checks its content hash.
    pub fn read_chunk_into(&self, hash: u128, dst: &mut [u8]) -> Result<()> {
        let path = self.chunk_path(hash);
        let rel = path.strip_prefix(&self.dir).unwrap_or(&path);
        let max = zstd::zstd_safe::compress_bound(dst.len()) as u64 + 1024;
        let compressed = match crate::contained::read_in(&self.dir, rel, max) {
            Ok(c) => c,
            Err(SchemaError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {
                return Err(SchemaError::MissingChunk { path });
            }
            Err(e) => {
                return Err(SchemaError::CorruptChunk {
                    path,
                    problem: e.to_string(),
                });
            }
        };
        let corrupt = |problem: String| SchemaError::CorruptChunk {
            path: path.clone(),
            problem,
        };
        let n = zstd::bulk::decompress_to_buffer(&compressed, dst)
            .map_err(|e| corrupt(format!("zstd: {e}")))?;
        if n != dst.len() {
            return Err(corrupt(format!(
                "decompressed to {n} bytes, expected {}",
                dst.len()
            )));
        }
        let got = xxh3_128(dst);
        if got != hash {
            return Err(corrupt(format!("content hash is {got:032x}")));
        }
        Ok(())
    }
}

/// Persists captured snapshots on a background thread so the pipeline never waits for zstd or disk.
#[derive(Debug)]
pub struct SnapshotWriter {
    tx: Option<mpsc::Sender<PendingSnapshot>>,
    handle: Option<JoinHandle<Vec<Result<SnapshotInfo>>>>,
    store: Arc<SnapshotStore>,
}

impl SnapshotWriter {
    /// Starts the writer thread for `store`.
    pub fn spawn(store: Arc<SnapshotStore>) -> Result<SnapshotWriter> {
        let (tx, rx) = mpsc::channel::<PendingSnapshot>();
        let worker_store = Arc::clone(&store);
        let handle = std::thread::Builder::new()
            .name("slug-snapshots".into())
            .spawn(move || rx.iter().map(|p| worker_store.persist(p)).collect())
            .map_err(|e| SchemaError::io(store.dir(), e))?;
        Ok(SnapshotWriter {
            tx: Some(tx),
            handle: Some(handle),
            store,
        })
    }

    /// The store written to.
    pub fn store(&self) -> &Arc<SnapshotStore> {
        &self.store
    }

    /// Queues `pending` for writing; never blocks.
    pub fn submit(&self, pending: PendingSnapshot) {
        if let Some(tx) = &self.tx {
            // The receiver only goes away when the thread has ended, which `finish` reports.
            let _ = tx.send(pending);
        }
    }

    /// Waits for every queued snapshot to be written; returns each one's totals, or the first error.
    pub fn finish(mut self) -> Result<Vec<SnapshotInfo>> {
        self.tx = None;
        let results = match self.handle.take().map(JoinHandle::join) {
            Some(Ok(results)) => results,
            Some(Err(_)) => {
                return Err(SchemaError::StoreFailed {
                    path: self.store.dir().to_path_buf(),
                    first_error: "the snapshot writer thread panicked".into(),
                });
            }
            None => Vec::new(),
        };
        results.into_iter().collect()
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(handle) = self.handle.take() {
            // Dropped without `finish`: still let queued writes complete; errors were the caller's to ask for.
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: usize = 4096;

    fn arena(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn store(dir: &Path) -> SnapshotStore {
        SnapshotStore::open_with(dir, CHUNK, 1).expect("store")
    }

    #[test]
    fn round_trip_restores_arena_and_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let a = arena(CHUNK * 5 + 123, 7);
        let p = s.capture(2, 10, &a, b"cursor").unwrap();
        assert_eq!(p.info().chunks, 6);
        s.persist(p).unwrap();
        let mut back = vec![0u8; a.len()];
        let restored = s.restore(2, 10, &mut back).unwrap();
        assert_eq!(back, a);
        assert_eq!(restored.cursor, b"cursor");
        assert_eq!(restored.weights, None);
        assert_eq!(s.snapshots().unwrap(), vec![(2, 10)]);
    }

    #[test]
    fn identical_chunks_are_stored_once_across_snapshots_and_stages() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let weights = arena(CHUNK * 8, 3);
        let mut a = weights.clone();
        a.extend_from_slice(&[0u8; CHUNK * 4]);
        let first = s.persist(s.capture(0, 0, &a, &[]).unwrap()).unwrap();
        // Four zero chunks are one chunk.
        assert_eq!(first.new_chunks, 9);
        // Change one KV chunk: only it is new.
        a[CHUNK * 9 + 5] = 1;
        let p = s.capture(0, 4, &a, &[]).unwrap();
        assert_eq!(p.info().new_chunks, 1);
        assert_eq!(p.info().new_bytes, CHUNK as u64);
        s.persist(p).unwrap();
        // Another stage with the same weights adds nothing new.
        let other = s.persist(s.capture(1, 0, &weights, &[]).unwrap()).unwrap();
        assert_eq!(other.new_chunks, 0);
        // A reopened store knows what is on disk.
        let again = store(dir.path());
        assert_eq!(
            again
                .capture(3, 0, &weights, &[])
                .unwrap()
                .info()
                .new_chunks,
            0
        );
        let files: usize = walk(&dir.path().join(CHUNKS_DIR));
        assert_eq!(files, 10);
    }

    fn walk(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                if p.is_dir() { walk(&p) } else { 1 }
            })
            .sum()
    }

    #[test]
    fn known_hashes_are_not_recomputed_and_unknown_chunks_are() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let mut a = arena(CHUNK * 4, 8);
        let first = s.capture(0, 0, &a, &[]).unwrap();
        let hashes = first.index().chunks.clone();
        s.persist(first).unwrap();
        a[CHUNK * 3] ^= 1;
        // Chunks 0..2 are vouched for; 3 (changed) is hashed again.
        let known = [Some(hashes[0]), Some(hashes[1]), Some(hashes[2])];
        let p = s.capture_with(0, 1, &a, &[], &known).unwrap();
        assert_eq!(p.index().chunks[..3], hashes[..3]);
        assert_eq!(p.index().chunks[3], xxh3_128(&a[CHUNK * 3..]));
        assert_eq!(p.info().new_chunks, 1);
        // A wrong vouched hash is taken as given: the caller owns that promise.
        let lie = [Some(7u128)];
        assert_eq!(
            s.capture_with(0, 2, &a, &[], &lie).unwrap().index().chunks[0],
            7
        );
    }

    #[test]
    fn capture_copies_so_the_arena_may_change_before_persist() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let mut a = arena(CHUNK * 3, 11);
        let original = a.clone();
        let p = s.capture(0, 1, &a, &[]).unwrap();
        a.fill(0xAB);
        s.persist(p).unwrap();
        let mut back = vec![0u8; a.len()];
        s.restore(0, 1, &mut back).unwrap();
        assert_eq!(back, original);
    }

    #[test]
    fn missing_chunk_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let a = arena(CHUNK * 2, 5);
        s.persist(s.capture(0, 0, &a, &[]).unwrap()).unwrap();
        let victim = s.chunk_path(xxh3_128(&a[CHUNK..]));
        std::fs::remove_file(&victim).unwrap();
        let err = s.restore(0, 0, &mut vec![0; a.len()]).unwrap_err();
        assert!(matches!(err, SchemaError::MissingChunk { ref path } if *path == victim));
        assert!(err.to_string().contains(&victim.display().to_string()));
    }

    #[test]
    fn corrupt_chunk_is_detected_by_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let a = arena(CHUNK * 2, 9);
        s.persist(s.capture(0, 0, &a, &[]).unwrap()).unwrap();
        let victim = s.chunk_path(xxh3_128(&a[..CHUNK]));
        // A valid zstd frame of the right size but the wrong content.
        let wrong = zstd::bulk::compress(&a[CHUNK..], 1).unwrap();
        std::fs::write(&victim, wrong).unwrap();
        let err = s.restore(0, 0, &mut vec![0; a.len()]).unwrap_err();
        assert!(matches!(err, SchemaError::CorruptChunk { ref path, .. } if *path == victim));
        // Garbage that is not zstd at all.
        std::fs::write(&victim, b"not zstd").unwrap();
        let err = s.restore(0, 0, &mut vec![0; a.len()]).unwrap_err();
        assert!(matches!(err, SchemaError::CorruptChunk { .. }));
    }

    #[test]
    fn damaged_index_and_wrong_arena_size_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let a = arena(CHUNK, 1);
        s.persist(s.capture(0, 0, &a, b"c").unwrap()).unwrap();
        let err = s.restore(0, 0, &mut vec![0; CHUNK + 1]).unwrap_err();
        assert!(
            matches!(err, SchemaError::ArenaSize { expected, got: g, .. } if expected == CHUNK as u64 && g == CHUNK as u64 + 1)
        );
        let path = s.index_path(0, 0);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 9;
        bytes[last] ^= 0xFF;
        std::fs::write(&path, &bytes).unwrap();
        let err = s.restore(0, 0, &mut vec![0; CHUNK]).unwrap_err();
        assert!(matches!(err, SchemaError::SnapshotIndex { .. }), "{err}");
        std::fs::write(&path, b"short").unwrap();
        assert!(s.read_index(0, 0).is_err());
    }

    #[test]
    fn index_encoding_round_trips_and_checks_lengths() {
        let index = SnapshotIndex {
            stage: 3,
            step: 99,
            arena_len: 10_000,
            chunk_size: 4096,
            cursor: vec![1, 2, 3],
            chunks: vec![1, u128::MAX, 42],
            weights: None,
        };
        let bytes = index.encode();
        let p = Path::new("x.idx");
        assert_eq!(SnapshotIndex::decode(p, &bytes).unwrap(), index);
        let mut short = index.clone();
        short.chunks.pop();
        assert!(SnapshotIndex::decode(p, &short.encode()).is_err());
        let referencing = SnapshotIndex {
            chunks: vec![0, 0, 42],
            weights: Some(WeightsRef {
                first_chunk: 0,
                chunks: 2,
                hash: 7 << 100,
                source: "seed 1 of tiny".into(),
            }),
            ..index.clone()
        };
        let bytes = referencing.encode();
        assert_eq!(SnapshotIndex::decode(p, &bytes).unwrap(), referencing);
        let mut outside = referencing.clone();
        outside.weights.as_mut().unwrap().chunks = 4;
        let err = SnapshotIndex::decode(p, &outside.encode()).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        // A version 1 index (no flags word in use) still reads.
        let mut v1 = index.encode();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let n = v1.len() - 8;
        let sum = xxh3_64(&v1[..n]).to_le_bytes();
        v1[n..].copy_from_slice(&sum);
        assert_eq!(SnapshotIndex::decode(p, &v1).unwrap(), index);
    }

    /// Referenced weights are neither hashed, copied nor stored; restore leaves their bytes to
    /// the caller and hands back the reference to check them against.
    #[test]
    fn referenced_weights_are_not_stored_and_come_back_as_a_reference() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let a = arena(CHUNK * 6, 9);
        let weights = WeightsRef {
            first_chunk: 1,
            chunks: 3,
            hash: xxh3_128(&a[CHUNK..4 * CHUNK]),
            source: "seed 9".into(),
        };
        assert_eq!(weights.byte_range(CHUNK, a.len()), CHUNK..4 * CHUNK);
        let p = s
            .capture_referencing(0, 0, &a, b"c", &[], Some(&weights))
            .unwrap();
        assert_eq!(p.info().new_chunks, 3, "only the three unreferenced chunks");
        assert_eq!(p.index().chunks[1..4], [0, 0, 0]);
        s.persist(p).unwrap();
        let mut back = vec![0xEEu8; a.len()];
        let restored = s.restore(0, 0, &mut back).unwrap();
        assert_eq!(restored.weights, Some(weights));
        assert_eq!(back[..CHUNK], a[..CHUNK]);
        assert!(
            back[CHUNK..4 * CHUNK].iter().all(|&b| b == 0xEE),
            "left alone"
        );
        assert_eq!(back[4 * CHUNK..], a[4 * CHUNK..]);
    }

    #[test]
    fn background_writer_persists_everything_queued() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(store(dir.path()));
        let w = SnapshotWriter::spawn(Arc::clone(&s)).unwrap();
        let mut a = arena(CHUNK * 4, 2);
        for step in 0..5u64 {
            a[0] = step as u8;
            w.submit(s.capture(0, step, &a, &step.to_le_bytes()).unwrap());
        }
        let infos = w.finish().unwrap();
        assert_eq!(infos.len(), 5);
        assert!(infos[0].stored_bytes > 0);
        let mut back = vec![0; a.len()];
        assert_eq!(
            s.restore(0, 3, &mut back).unwrap().cursor,
            3u64.to_le_bytes()
        );
        assert_eq!(back[0], 3);
        assert_eq!(back[1..], a[1..]);
    }

    #[test]
    fn write_failure_stops_the_store_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let a = arena(CHUNK, 4);
        let p = s.capture(0, 0, &a, &[]).unwrap();
        // A file where the stage directory must go makes the index write fail.
        std::fs::write(dir.path().join("stage-0"), b"in the way").unwrap();
        assert!(matches!(s.persist(p), Err(SchemaError::Io { .. })));
        let err = s.capture(0, 1, &a, &[]).unwrap_err();
        assert!(matches!(err, SchemaError::StoreFailed { .. }), "{err}");
    }
}
