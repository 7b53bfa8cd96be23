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
    /// Stages are processes, possibly on other hosts, whose links are RDMA verbs queue pairs:
    /// writes with immediate from one registered buffer into the receiver's registered inbox
    /// (the `slug-rdma` crate, feature `rdma`).
    Rdma,
}

impl TransportKind {
    /// The name used on the command line and in traces.
    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Shm => "shm",
            Self::Tcp => "tcp",
            Self::Mpi => "mpi",
            Self::Rdma => "rdma",
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
            "rdma" => Ok(Self::Rdma),
            other => Err(crate::TransportError::Config(format!(
                "unknown transport {other:?}; use local, shm, tcp, mpi or rdma"
            ))),
        }
    }
}

/// The metadata that travels with a transfer's bytes, the same on every backend (a fabric
/// ring slot's header, the first 64 bytes of a tcp frame): the receiving end rebuilds the
/// [`Transfer`] its observers see from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransferHeader {
    /// Position of the transfer on its link (the [`TransferId`]'s `seq`).
    pub seq: u64,
    /// [`Tag::sequence`].
    pub sequence: u32,
    /// [`Tag::step`].
    pub step: u32,
    /// [`Tag::layer`].
    pub layer: u32,
    /// Arena the bytes came from, on the sender.
    pub src_arena: u32,
    /// Arena the bytes go to, on the receiver.
    pub dst_arena: u32,
    /// Which piece of the transfer this header heads, for backends that move a large transfer
    /// in consecutive pieces (fabric rings: one slot each, so the two copies overlap in cache);
    /// 0 elsewhere.
    pub chunk: u32,
    /// Offset of the bytes in the source arena.
    pub src_off: u64,
    /// Offset the bytes go to in the destination arena.
    pub dst_off: u64,
    /// Length of the whole transfer in bytes.
    pub len: u64,
    /// Sender's CLOCK_MONOTONIC when the transfer was posted.
    pub post_ns: u64,
}

impl TransferHeader {
    /// Encoded length in bytes.
    pub const LEN: usize = 64;

    /// The header as it travels: every field little-endian, in declaration order.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..12].copy_from_slice(&self.sequence.to_le_bytes());
        b[12..16].copy_from_slice(&self.step.to_le_bytes());
        b[16..20].copy_from_slice(&self.layer.to_le_bytes());
        b[20..24].copy_from_slice(&self.src_arena.to_le_bytes());
        b[24..28].copy_from_slice(&self.dst_arena.to_le_bytes());
        b[28..32].copy_from_slice(&self.chunk.to_le_bytes());
        b[32..40].copy_from_slice(&self.src_off.to_le_bytes());
        b[40..48].copy_from_slice(&self.dst_off.to_le_bytes());
        b[48..56].copy_from_slice(&self.len.to_le_bytes());
        b[56..64].copy_from_slice(&self.post_ns.to_le_bytes());
        b
    }

    /// Reads a header [`encode`](Self::encode) wrote. Any 64 bytes decode; the receiving link
    /// checks the fields against its arena and numbering before it trusts them.
    pub fn decode(b: &[u8; Self::LEN]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        Self {
            seq: u64_at(0),
            sequence: u32_at(8),
            step: u32_at(12),
            layer: u32_at(16),
            src_arena: u32_at(20),
            dst_arena: u32_at(24),
            chunk: u32_at(28),
            src_off: u64_at(32),
            dst_off: u64_at(40),
            len: u64_at(48),
            post_ns: u64_at(56),
        }
    }

    /// The pipeline meaning of the bytes.
    pub fn tag(&self) -> Tag {
        Tag {
            sequence: self.sequence,
            step: self.step,
            layer: self.layer,
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
    /// The endpoint's stage moved between nodes: its links now join another node (called
    /// once on the node that let go, once on the node that took over; default: ignored).
    fn stage_moved(&self, _mark: &StageMove) {}
}

/// A stage's move between nodes, as one side of it saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageMove {
    /// The stage.
    pub stage: u32,
    /// Its forward step at which the new node took over.
    pub at_step: u64,
    /// The move's number in the run.
    pub index: u32,
    /// `true` on the node that took the stage over, `false` on the one that let go.
    pub arrived: bool,
    /// The endpoint on the other side of the move (see
    /// [`continuation_endpoint`](crate::pipeline::continuation_endpoint)).
    pub peer: u32,
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

    pub(crate) fn stage_moved(&self, mark: &StageMove) {
        for o in &self.list {
            o.stage_moved(mark);
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
