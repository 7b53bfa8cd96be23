//! `RecorderError`: every way recording, probing the host, or storing and restoring snapshots can fail.

use std::path::PathBuf;

/// Errors of the recorder crate. Each names the file, event or value involved and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecorderError {
    /// A file or directory could not be read, written or created.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// `perf_event_open`, its ring-buffer mmap or an ioctl on it failed.
    #[error(
        "perf event {event}: {source} (check /proc/sys/kernel/perf_event_paranoid, or run with --perf none)"
    )]
    Perf {
        /// The event, as `--perf` names it (`cpu-clock`, `intel-pt`, ...).
        event: String,
        /// The error the kernel returned.
        source: std::io::Error,
    },

    /// A `--perf` list named a stream this recorder does not know.
    #[error("unknown perf stream `{name}`; use auto, none, or a comma-separated list of: {known}")]
    UnknownPerfStream {
        /// The name given.
        name: String,
        /// The names that are accepted.
        known: String,
    },

    /// An `--ebpf` list named a probe this recorder does not have.
    #[error("unknown eBPF probe `{name}`; use auto, none, or a comma-separated list of: {known}")]
    UnknownEbpfProbe {
        /// The name given.
        name: String,
        /// The names that are accepted.
        known: String,
    },

    /// A sysfs file exists but does not hold what the kernel documents.
    #[error("{path}: unexpected content `{content}`; expected {expected}")]
    Sysfs {
        /// The file.
        path: PathBuf,
        /// What it held (trimmed).
        content: String,
        /// What was expected there.
        expected: &'static str,
    },

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

    /// Writing or reading the trace format failed.
    #[error("{0}")]
    Schema(Box<slug_schema::SchemaError>),

    /// The pipeline failed while it was being recorded.
    #[error("the recorded pipeline failed: {0}")]
    Pipeline(Box<slug_transport::TransportError>),

    /// The output directory cannot be used.
    #[error("{path}: {problem}")]
    OutputDir {
        /// The directory given with --out.
        path: PathBuf,
        /// What is wrong and what to do.
        problem: String,
    },
}

impl RecorderError {
    /// An [`RecorderError::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> RecorderError {
        RecorderError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result with [`RecorderError`].
pub type Result<T, E = RecorderError> = std::result::Result<T, E>;
