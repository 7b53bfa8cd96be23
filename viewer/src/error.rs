//! The one error type of `slug-viewer`: every way opening, reading, viewing or exporting a trace can fail.

use std::path::PathBuf;

/// Everything that can go wrong in the viewer and the exporters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ViewerError {
    /// The trace directory given on the command line does not exist.
    #[error(
        "no trace at {path}: the directory does not exist (pass the directory `slug record` wrote)"
    )]
    TraceMissing {
        /// The path the user gave.
        path: PathBuf,
    },
    /// The trace exists but could not be opened or decoded.
    #[error(
        "cannot read the trace at {path}: {reason} (is it a slug trace directory? try `slug info {path}`)"
    )]
    TraceUnreadable {
        /// The trace directory or the file inside it that failed.
        path: PathBuf,
        /// What the trace reader reported.
        reason: String,
    },
    /// A frame of an endpoint log failed to decode while the viewer was reading it.
    #[error("endpoint {endpoint}: frame {frame} cannot be decoded: {reason}")]
    FrameUnreadable {
        /// Name of the endpoint whose log holds the frame.
        endpoint: String,
        /// Index of the frame in that log.
        frame: usize,
        /// What the decoder reported.
        reason: String,
    },
    /// The divergence report given with `--divergence` could not be read or parsed.
    #[error(
        "cannot read the divergence report {path}: {reason} (expected the JSON object `slug replay` writes)"
    )]
    DivergenceUnreadable {
        /// The report path.
        path: PathBuf,
        /// The I/O or JSON error.
        reason: String,
    },
    /// Writing the export output or talking to the terminal failed.
    #[error("I/O error on {what}: {source}")]
    Io {
        /// The file or device involved.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An exported file could not be decoded back (used when checking an export).
    #[error("malformed {format} data at byte {offset}: {reason}")]
    MalformedExport {
        /// Which format was being decoded.
        format: &'static str,
        /// Byte offset of the problem.
        offset: usize,
        /// What was wrong.
        reason: String,
    },
}

impl ViewerError {
    /// Wraps an I/O error with the name of what was being read or written.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = ViewerError> = std::result::Result<T, E>;
