//! `SchemaError`: every way reading or writing a log, a manifest or a trace directory can fail.

use std::path::PathBuf;

/// Errors of the trace format crate. Each names the file involved and what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// A file or directory could not be read, written or created.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// The file does not start with the `.slog` magic.
    #[error(
        "{path}: not a slug endpoint log (wrong magic); pass a file from a trace's endpoints/ directory"
    )]
    NotALog {
        /// The file.
        path: PathBuf,
    },

    /// The log was written by a newer slug.
    #[error(
        "{path}: log format version {found} is newer than this slug understands (up to {supported}); upgrade slug to read it"
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Newest version this build reads.
        supported: u32,
    },

    /// The file is shorter than a log header or its header checksum is wrong.
    #[error(
        "{path}: log header is {problem}; the file was cut short or overwritten and cannot be read"
    )]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong ("truncated", "corrupt").
        problem: &'static str,
    },

    /// One frame could not be decoded (checksum, decompression or batch layout).
    #[error(
        "{path}: frame at byte {offset} is corrupt ({reason}); other frames are still readable"
    )]
    CorruptFrame {
        /// The file.
        path: PathBuf,
        /// Byte offset of the frame.
        offset: u64,
        /// What was wrong.
        reason: String,
    },

    /// A record handed to the encoder holds an unknown kind or enum value.
    #[error(
        "raw record {index} of a batch holds an unknown event kind or enum value (kind byte {kind})"
    )]
    InvalidRecord {
        /// Index of the record in the batch.
        index: usize,
        /// Its kind byte.
        kind: u8,
    },

    /// The background encoder of a log writer failed or stopped.
    #[error("{path}: log writer's encoder thread failed: {reason}")]
    Writer {
        /// The log being written.
        path: PathBuf,
        /// Why.
        reason: String,
    },

    /// Writer options out of range.
    #[error("invalid log writer options: {0}")]
    Options(String),

    /// `manifest.json` is missing, not JSON, or not a manifest.
    #[error("{path}: {reason}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },

    /// The trace directory was written by a newer slug.
    #[error(
        "{path}: trace format version {found} is newer than this slug understands (up to {supported}); upgrade slug"
    )]
    UnsupportedTraceVersion {
        /// The manifest file.
        path: PathBuf,
        /// Version in the manifest.
        found: u32,
        /// Newest version this build reads.
        supported: u32,
    },

    /// `Trace::create` was pointed at a directory that already holds files.
    #[error("{path}: directory exists and is not empty; choose a new directory or remove this one")]
    TraceExists {
        /// The directory.
        path: PathBuf,
    },

    /// The path is not a trace directory.
    #[error(
        "{path}: not a slug trace (no manifest.json); pass a directory written by `slug record` or `slug demo`"
    )]
    NotATrace {
        /// The directory.
        path: PathBuf,
    },

    /// The trace directory does not exist.
    #[error(
        "{path}: no such directory; pass a trace directory written by `slug record` or `slug demo`"
    )]
    NoSuchTrace {
        /// The path given.
        path: PathBuf,
    },

    /// The manifest has no endpoint with this id.
    #[error("{path}: trace has no endpoint {id}; `slug info` lists the endpoints it has")]
    UnknownEndpoint {
        /// The trace directory.
        path: PathBuf,
        /// The endpoint asked for.
        id: u32,
    },

    /// A path the trace names leaves the trace directory, is not a regular file or is too big.
    #[error(
        "{dir}: refused to open {path}, which the trace names: {reason}; the trace is damaged or crafted"
    )]
    UnsafePath {
        /// The trace (or store) directory.
        dir: PathBuf,
        /// The path as the trace names it.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },

    /// The trace claims more of something than this reader accepts.
    #[error("{path}: {what}; the trace is damaged or crafted")]
    Limit {
        /// The file making the claim.
        path: PathBuf,
        /// What it claims and the limit (with where the limit comes from).
        what: String,
    },

    /// Synthetic trace parameters out of range.
    #[error("invalid synthetic trace config: {0}")]
    Synth(String),

    /// A snapshot index file is damaged or not a snapshot index.
    #[error("{path}: snapshot index is {problem}; the snapshot cannot be restored")]
    SnapshotIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },

    /// A transfer's recorded payload is not in the trace's `payloads/`.
    #[error("{path}: transfer payload is missing; copy the trace's payloads/ directory completely")]
    MissingPayload {
        /// The payload file that should exist.
        path: PathBuf,
    },

    /// A payload file is not what the trace says (size, hash, not a regular file, a bomb).
    #[error("{path}: transfer payload is corrupt ({problem})")]
    CorruptPayload {
        /// The payload file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },

    /// A snapshot references a chunk that is not in the store.
    #[error("{path}: snapshot chunk is missing; copy the trace's snapshots/ directory completely")]
    MissingChunk {
        /// The chunk file that should exist.
        path: PathBuf,
    },

    /// A chunk file does not decompress to bytes with the hash that names it.
    #[error("{path}: snapshot chunk is corrupt ({problem}); the snapshot cannot be restored")]
    CorruptChunk {
        /// The chunk file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },

    /// The arena to restore into is not the size that was snapshotted.
    #[error(
        "snapshot of stage {stage} at step {step} holds {expected} arena bytes but the target arena has {got}; restore into an arena of the recorded model and stage layout"
    )]
    ArenaSize {
        /// Stage.
        stage: u32,
        /// Step.
        step: u64,
        /// Bytes in the snapshot.
        expected: u64,
        /// Bytes in the target arena.
        got: u64,
    },

    /// An earlier background write failed, so the store no longer accepts snapshots.
    #[error(
        "snapshot store {path} stopped after an earlier write failure ({first_error}); free disk space or fix permissions and record again"
    )]
    StoreFailed {
        /// The store directory.
        path: PathBuf,
        /// The first failure.
        first_error: String,
    },
}

impl SchemaError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SchemaError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result with [`SchemaError`].
pub type Result<T, E = SchemaError> = std::result::Result<T, E>;
