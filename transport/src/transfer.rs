//! What a transfer is (id, tag, source and destination places, times) and the observer hook every transfer passes through.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A pipeline endpoint: one stage (rank) of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointId(pub u32);

/// A registered arena of an endpoint. Ids are chosen by the endpoint that registers the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ArenaId(pub u32);

/// A directed link between two endpoints; its index in the pipeline's link table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LinkId(pub u32);

/// Deterministic transfer id: the link and the transfer's sequence number on it (0, 1, 2, ...).
///
/// Ids give happens-before across endpoints: the post with an id precedes its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TransferId {
    /// The link the transfer travelled on.
    pub link: LinkId,
    /// Position of the transfer on that link.
    pub seq: u64,
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.link.0, self.seq)
    }
}

/// What a transfer carries in pipeline terms: which sequence, which step, which layer boundary.
///
/// Unlike the [`TransferId`], the tag does not depend on scheduling, so the same tag names the
/// same bytes in any placement, transport, thread count or microbatching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Tag {
    /// Sequence (microbatch member) index.
    pub sequence: u32,
    /// Decode step: 0 is the prompt (prefill), then one per generated token.
    pub step: u32,
    /// First layer the receiver runs on these bytes; the layer count for the token sent back to stage 0.
    pub layer: u32,
}

/// A byte position in a registered arena of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Place {
    /// The endpoint owning the arena.
    pub endpoint: EndpointId,
    /// The arena.
    pub arena: ArenaId,
    /// Byte offset into the arena.
    pub offset: u64,
}

/// The transport a transfer used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// Stages are threads of one process; links are slot rings in process memory.
    Local,
    /// Stages are processes sharing a memory-mapped fabric file.
    Shm,
    /// Stages are processes, possibly on other hosts, connected by TCP.
    Tcp,
    /// Stages are MPI ranks (rank = stage) started by `mpirun`/`srun`; links are MPI
    /// point-to-point messages on `MPI_COMM_WORLD` (the `slug-mpi` crate, feature `mpi`).
    Mpi,
}

impl TransportKind {
    /// The name used on the command line and in traces.
    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Shm => "shm",
            Self::Tcp => "tcp",
            Self::Mpi => "mpi",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TransportKind {
    type Err = crate::TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(Self::Local),
            "shm" => Ok(Self::Shm),
            "tcp" => Ok(Self::Tcp),
            "mpi" => Ok(Self::Mpi),
            other => Err(crate::TransportError::Config(format!(
                "unknown transport {other:?}; use local, shm, tcp or mpi"
            ))),
        }
    }
}

/// One transfer as the observers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// Deterministic id.
    pub id: TransferId,
    /// Pipeline meaning of the bytes.
    pub tag: Tag,
    /// Where the bytes came from.
    pub src: Place,
    /// Where the bytes went.
    pub dst: Place,
    /// Number of bytes.
    pub len: u64,
    /// Sender's CLOCK_MONOTONIC when the transfer was posted.
    pub post_ns: u64,
    /// When this end was done: in the `posted` callback the sender's CLOCK_MONOTONIC when its
    /// send returned (the bytes are in the fabric or already in the receiver's arena); in the
    /// `completed` callback the receiver's when the bytes were in place.
    pub complete_ns: u64,
    /// The backend that moved the bytes.
    pub transport: TransportKind,
}

/// The hook the recorder taps: called by every link for every transfer, on both ends.
///
/// Links call `posted` on the sending endpoint once its send has returned (post and completion
/// times both known), with the source bytes, and `completed` on the receiving endpoint once the
/// bytes are in the destination arena, with the destination bytes. The two may run in either
/// order. Implementations must be cheap: they run on the pipeline's hot path.
pub trait TransferObserver: Send + Sync {
    /// The sender's send of `transfer` returned; `bytes` are the source bytes.
    fn posted(&self, transfer: &Transfer, bytes: &[u8]);
    /// The receiver holds the bytes; `bytes` are the destination bytes.
    fn completed(&self, transfer: &Transfer, bytes: &[u8]);
}

/// The observers of one endpoint, shared by all its links.
#[derive(Clone, Default)]
pub struct Observers {
    list: Vec<Arc<dyn TransferObserver>>,
}

impl fmt::Debug for Observers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observers")
            .field("count", &self.list.len())
            .finish()
    }
}

impl Observers {
    /// No observers.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds an observer; every later transfer of links built with these observers reaches it.
    pub fn with(mut self, observer: Arc<dyn TransferObserver>) -> Self {
        self.list.push(observer);
        self
    }

    /// Number of observers.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// True when no observer is attached.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub(crate) fn posted(&self, transfer: &Transfer, bytes: &[u8]) {
        for o in &self.list {
            o.posted(transfer, bytes);
        }
    }

    pub(crate) fn completed(&self, transfer: &Transfer, bytes: &[u8]) {
        for o in &self.list {
            o.completed(transfer, bytes);
        }
    }
}

/// 128-bit content hash of transferred bytes (xxh3-128), as traces record it.
pub fn content_hash(bytes: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

/// 128-bit hash of a kernel call's output as traces record it (`slug record --hash-kernels`) and
/// replays check it: [`content_hash`] of the f32s' bytes as they lie in memory (little-endian on
/// every architecture slug runs on, so the same on every node).
pub fn kernel_output_hash(output: &[f32]) -> u128 {
    // SAFETY: f32 has no padding and every byte pattern is a valid u8; same lifetime and size.
    let bytes = unsafe {
        std::slice::from_raw_parts(output.as_ptr().cast::<u8>(), std::mem::size_of_val(output))
    };
    content_hash(bytes)
}
