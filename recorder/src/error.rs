//! `RecorderError`: every way recording or probing the host can fail.

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

impl From<slug_schema::SchemaError> for RecorderError {
    fn from(e: slug_schema::SchemaError) -> Self {
        RecorderError::Schema(Box::new(e))
    }
}

/// Result with [`RecorderError`].
pub type Result<T, E = RecorderError> = std::result::Result<T, E>;
