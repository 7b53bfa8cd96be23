//! The crate's one error type: every way a replay can be refused or fail.

use std::path::PathBuf;

/// Errors of `slug-replayer`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The trace directory, a log or the manifest could not be read (or is a newer format).
    #[error("{cause}")]
    Trace {
        /// The trace directory.
        path: PathBuf,
        /// What the schema reader said (it names the file).
        cause: Box<slug_schema::SchemaError>,
    },
    /// The trace cannot be replayed as it is; `reason` says why and what to do.
    #[error("trace {path} cannot be replayed: {reason}")]
    NotReplayable {
        /// The trace directory.
        path: PathBuf,
        /// Why, and what to do instead.
        reason: String,
    },
    /// A snapshot or payload of the trace is missing, damaged or does not fit the stage.
    #[error("trace {path}: {cause}")]
    Store {
        /// The trace directory.
        path: PathBuf,
        /// What the snapshot or payload store said (it names the file).
        cause: Box<slug_schema::SchemaError>,
    },
    /// This machine cannot reproduce the trace bit for bit.
    #[error(
        "this CPU lacks {feature}, which the run in {path} used; results would differ: replay on \
         a node with {feature}"
    )]
    MissingCpuFeature {
        /// The CPU feature (`FMA`).
        feature: &'static str,
        /// The trace directory.
        path: PathBuf,
    },
    /// The arguments ask for something this trace or mode cannot do; the message says what to use.
    #[error("{0}")]
    Usage(String),
    /// The re-run pipeline failed (not a divergence: it could not run).
    #[error("replayed pipeline: {0}")]
    Pipeline(slug_transport::TransportError),
    /// The re-run stage failed in a kernel.
    #[error("replayed stage: {0}")]
    Kernel(slug_kernels::Error),
    /// Writing an output file (`--report`, `--out`) failed.
    #[error("cannot write {path}: {cause}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The operating-system error.
        cause: std::io::Error,
    },
}

/// Result alias of this crate.
pub type Result<T, E = ReplayError> = std::result::Result<T, E>;

// By hand rather than `#[from]`: the message already holds the cause, and a `source` would make
// `{:#}` print it twice.
impl From<slug_transport::TransportError> for ReplayError {
    fn from(e: slug_transport::TransportError) -> Self {
        ReplayError::Pipeline(e)
    }
}

impl From<slug_kernels::Error> for ReplayError {
    fn from(e: slug_kernels::Error) -> Self {
        ReplayError::Kernel(e)
    }
}
