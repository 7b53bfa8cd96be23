//! The crate's one error type: every way moving bytes between stages, or running the pipeline, can fail.

use std::io;

/// Errors of `slug-transport`: transfers, links, handshakes and the pipeline runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A file, socket or child-process operation failed; `context` names what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being attempted, naming the file, address or process.
        context: String,
        /// The operating-system error.
        #[source]
        source: io::Error,
    },
    /// A transfer names a range outside its registered arena.
    #[error("range {offset}..{offset}+{len} lies outside arena {arena} of {size} bytes")]
    OutOfBounds {
        /// The arena id.
        arena: u32,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Size of the registered arena.
        size: u64,
    },
    /// A blocking wait on a link ran past its deadline.
    #[error("link {link}: nothing {what} within {waited_ms} ms; the peer stage is stuck or gone")]
    Timeout {
        /// The link, as `stage a -> stage b`.
        link: String,
        /// What was awaited ("received", "a free slot").
        what: &'static str,
        /// How long the wait lasted.
        waited_ms: u64,
    },
    /// A peer process stayed silent past the run's timeout while it was awaited outside any
    /// link (e.g. rank 0 of an MPI job awaiting a rank's report or recorded files).
    #[error(
        "{peer} sent nothing within {waited_ms} ms while {awaited} was awaited from it; it is \
         stopped, stuck or overloaded: check that process, or raise --timeout-ms if it is only slow"
    )]
    Silent {
        /// The peer, e.g. `rank 2 on node-b`.
        peer: String,
        /// What was awaited, e.g. `its stage report` or `file endpoints/2.slog`.
        awaited: String,
        /// How long the wait lasted.
        waited_ms: u64,
    },
    /// The run was aborted because some other part of it failed first.
    #[error("aborted: {reason}")]
    Aborted {
        /// Why the run was aborted.
        reason: String,
    },
    /// The peer of a link closed it or the connection failed mid-transfer.
    #[error("link {link} broke: {detail}")]
    LinkBroken {
        /// The link, as `stage a -> stage b`.
        link: String,
        /// What the operating system or peer said.
        detail: String,
    },
    /// A peer was refused (or refused us) during the handshake.
    #[error("handshake with {peer} refused: {reason}")]
    Refused {
        /// The peer address or stage.
        peer: String,
        /// Why: version mismatch, wrong stage, failed key proof.
        reason: String,
    },
    /// A peer sent bytes that do not follow the slug wire protocol.
    #[error("protocol error from {peer}: {detail}")]
    Protocol {
        /// The peer address.
        peer: String,
        /// What was wrong with the message.
        detail: String,
    },
    /// The cluster key could not be found or read.
    #[error(
        "cluster key: {0}; set SLUG_CLUSTER_KEY or pass --key-file with the same secret on every node"
    )]
    Key(String),
    /// A pipeline stage failed; names the stage, its host and the step it was at.
    #[error("stage {stage} on {host} failed at {step}: {detail}")]
    StageFailed {
        /// Stage index.
        stage: usize,
        /// Host (address or "local") the stage ran on.
        host: String,
        /// The step it had reached, e.g. "step 3 (sequence 1)" or "startup".
        step: String,
        /// The underlying failure.
        detail: String,
    },
    /// The pipeline configuration cannot be run.
    #[error("invalid pipeline configuration: {0}")]
    Config(String),
    /// An rdma run was asked for where no RDMA device can be used; says what verbs answered.
    #[error("no RDMA device ({0}); use --transport tcp")]
    NoRdmaDevice(String),
    /// The model kernels reported an error.
    #[error("kernels: {0}")]
    Kernel(String),
}

impl TransportError {
    /// Wraps an I/O error with the context of what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;

impl From<slug_kernels::Error> for TransportError {
    fn from(e: slug_kernels::Error) -> Self {
        Self::Kernel(e.to_string())
    }
}
