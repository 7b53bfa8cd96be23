//! Links: the only way bytes move between endpoints, and the seam every link backend plugs into.
//!
//! A transfer copies `len` bytes from an offset of a registered arena on the sending endpoint to
//! an offset of a registered arena on the receiving endpoint. [`LinkSender`] and
//! [`LinkReceiver`] own what is the same on every backend: the deterministic id (link, sequence
//! number), the [`TransferHeader`] that travels with the bytes, bounds checks, counters, and the
//! endpoint's [`Observers`], called on both ends for every transfer. What differs, how the bytes
//! get across, is a backend behind the [`SendBackend`] / [`RecvBackend`] traits:
//! - [`ring`]: a slot ring in a [`Fabric`](crate::fabric::Fabric), `local` (heap fabric, stages
//!   are threads) and `shm` (a memory-mapped fabric file, stages are processes);
//! - [`tcp`]: a socket per link, authenticated by the run's secret, optionally MACed.
//!
//! A backend only moves bytes: it cannot skip the observers, renumber transfers or report a
//! transfer the receiver did not get, because the link around it does those.
//!
//! Connecting is the other half of a backend. A stage run by a node agent gets its two link
//! ends through [`LinkSetup`], in the node protocol's two phases: [`select::prepare_node_links`] (the
//! one place a backend is chosen by its [`TransportKind`]) readies the stage's side before it
//! reports ready, with the [`address`](LinkSetup::address) its upstream neighbour needs (a
//! tcp `host:port`; an RDMA backend's queue pair, GID, rkey and base address); the coordinator
//! forwards each stage its downstream neighbour's address, and [`connect`](LinkSetup::connect)
//! makes both ends. A backend that needs more exchanged than one address does it over the
//! connection it opens (as tcp proves the run's secret and measures the clock there).
//!
//! A new backend (MPI, RDMA verbs) is a module here implementing [`SendBackend`] and
//! [`RecvBackend`], a [`TransportKind`] variant, and either a [`LinkSetup`] chosen in
//! [`select::prepare_node_links`] (backends that run under node agents) or its own constructor of
//! [`StageLinks`] (MPI ranks). The runtime drives every backend through [`LinkSender`] and
//! [`LinkReceiver`] and needs no change.

pub mod ring;
pub mod select;
pub mod shm;
pub mod tcp;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::ClusterKey;
use crate::clock::{ClockOffset, monotonic_ns};
use crate::error::{Result, TransportError};
use crate::fabric::RingSpec;
use crate::transfer::{
    ArenaId, EndpointId, LinkId, Observers, Place, Tag, Transfer, TransferHeader, TransferId,
    TransportKind,
};
use crate::wire::AbortFlag;

/// A registered arena as a sender sees it: its id and its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Region<'a> {
    /// Id the arena was registered under.
    pub arena: ArenaId,
    /// The arena's bytes.
    pub bytes: &'a [u8],
}

/// A registered arena as a receiver sees it: its id and its writable bytes.
#[derive(Debug)]
pub struct RegionMut<'a> {
    /// Id the arena was registered under.
    pub arena: ArenaId,
    /// The arena's bytes.
    pub bytes: &'a mut [u8],
}

/// The byte range `offset..offset + len` of an arena of `size` bytes, or the error naming it.
pub fn check_range(
    arena: ArenaId,
    size: usize,
    offset: u64,
    len: u64,
) -> Result<std::ops::Range<usize>> {
    let end = offset.checked_add(len);
    match end {
        Some(end) if end <= size as u64 => Ok(offset as usize..end as usize),
        _ => Err(TransportError::OutOfBounds {
            arena: arena.0,
            offset,
            len,
            size: size as u64,
        }),
    }
}

/// Checks that transfer `h` may land in the receiver's arena `arena` of `size` bytes: it must
/// address that arena and fit in it. Every receiving backend calls this before it writes.
pub fn check_place(ends: &LinkEnds, arena: ArenaId, size: usize, h: &TransferHeader) -> Result<()> {
    if h.dst_arena != arena.0 {
        return Err(TransportError::Protocol {
            peer: ends.name(),
            detail: format!(
                "transfer {} addresses arena {}, but the receiver offered arena {}",
                h.seq, h.dst_arena, arena.0
            ),
        });
    }
    check_range(arena, size, h.dst_off, h.len).map(|_| ())
}

/// Checks that `h`, which a backend moving transfers in pieces of one slot found in a slot, is
/// piece `chunk` of the transfer whose first piece was `first`, as the protocol promises.
pub fn check_piece(
    ends: &LinkEnds,
    h: &TransferHeader,
    first: &TransferHeader,
    chunk: u64,
) -> Result<()> {
    // The piece's length derives from its header, so every piece must repeat the first's length.
    if h.seq == first.seq && h.len == first.len && u64::from(h.chunk) == chunk {
        return Ok(());
    }
    Err(TransportError::Protocol {
        peer: ends.name(),
        detail: format!(
            "slot holds piece {} of transfer {} ({} bytes) where piece {chunk} of transfer {} \
             ({} bytes) was due",
            h.chunk, h.seq, h.len, first.seq, first.len
        ),
    })
}

/// How the bytes of a TCP data link are protected against tampering on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkIntegrity {
    /// Every transfer (header and payload) carries a keyed BLAKE3 MAC under a key fresh for
    /// the connection; a transfer that fails it ends the run.
    #[default]
    Mac,
    /// No MAC: only for fabrics the user trusts (the link still proves it belongs to the run).
    None,
}

impl LinkIntegrity {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mac => "mac",
            Self::None => "none",
        }
    }
}

impl std::fmt::Display for LinkIntegrity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LinkIntegrity {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mac" => Ok(Self::Mac),
            "none" => Ok(Self::None),
            other => Err(TransportError::Config(format!(
                "unknown link integrity {other:?}: use mac (default) or none"
            ))),
        }
    }
}

/// Who a link connects and how long its blocking calls may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkEnds {
    /// Link id (index in the pipeline's link table).
    pub id: LinkId,
    /// Sending endpoint.
    pub src: EndpointId,
    /// Receiving endpoint.
    pub dst: EndpointId,
    /// Longest a send or receive may block before failing with [`TransportError::Timeout`].
    pub timeout: Duration,
}

impl LinkEnds {
    /// The link as error messages name it: `0 (stage 0 -> stage 1)`.
    pub fn name(&self) -> String {
        format!(
            "{} (stage {} -> stage {})",
            self.id.0, self.src.0, self.dst.0
        )
    }
}

/// Counters of one end of a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Transfers moved.
    pub transfers: u64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Nanoseconds spent inside send/recv (copying and waiting).
    pub busy_ns: u64,
    /// Transfers copied straight into a waiting receiver's arena (one copy, not two).
    #[serde(default)]
    pub direct: u64,
}

impl LinkStats {
    /// Adds another link end's counters (the same link served by two nodes in turn, as when
    /// a stage migrates).
    pub fn merge(&mut self, other: &Self) {
        self.transfers += other.transfers;
        self.bytes += other.bytes;
        self.busy_ns += other.busy_ns;
        self.direct += other.direct;
    }

    fn add(&mut self, len: u64, since: u64, delivery: Delivery) {
        self.transfers += 1;
        self.bytes += len;
        self.busy_ns += monotonic_ns().saturating_sub(since);
        if delivery == Delivery::Direct {
            self.direct += 1;
        }
    }
}

/// How a backend delivered one transfer (counted in [`LinkStats::direct`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Straight from the sender's arena into the receiver's (one copy, or none).
    Direct,
    /// Through a buffer in between (ring slots, socket buffers).
    Staged,
}

/// What both halves of a link backend tell the link around them.
pub trait LinkBackend: Send {
    /// The transport observers see on this link's transfers.
    fn kind(&self) -> TransportKind;

    /// Clock offset of the other end (its clock minus ours), if measured at connection.
    fn clock(&self) -> Option<ClockOffset> {
        None
    }

    /// What ends this link's connection from another thread, for backends that have one: a
    /// peer declared lost is cut off with it rather than waited for until the link's timeout.
    fn cutter(&self) -> Option<Cutter> {
        None
    }
}

/// Ends a link's connection from another thread: a send or receive blocked on it (or the next
/// one) fails at once, as if the peer had closed it (see [`LinkBackend::cutter`]).
#[derive(Debug)]
pub struct Cutter(std::net::TcpStream);

impl Cutter {
    /// A cutter of the connection `stream` is one end of (a duplicate handle to it).
    pub fn of(stream: &std::net::TcpStream) -> Option<Self> {
        stream.try_clone().ok().map(Self)
    }

    /// Shuts the connection down both ways.
    pub fn cut(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// The sending half of a link backend: moves one transfer's bytes towards the receiver.
///
/// [`LinkSender`] calls it with the transfer's header already numbered and the source bytes
/// already bounds-checked, and observes the transfer after it returns.
pub trait SendBackend: LinkBackend {
    /// Moves `payload` (the `header.len` source bytes) so that the receiving backend can place
    /// it at `header.dst_off` of arena `header.dst_arena`. Returns once the source bytes may be
    /// overwritten (they are in the fabric, the socket or the receiver's arena), within
    /// `ends.timeout`; a failed send must not be retried on the same backend.
    fn send(
        &mut self,
        ends: &LinkEnds,
        header: &TransferHeader,
        payload: &[u8],
    ) -> Result<Delivery>;

    /// Waits until every transfer sent has left this end: nothing is buffered here any more,
    /// so the link can be re-pointed ([`LinkEnd::repoint`]) without losing a transfer. A
    /// backend whose `send` only returns once the bytes have left does nothing.
    fn flush(&mut self, ends: &LinkEnds) -> Result<()>;
}

/// The receiving half of a link backend: places the next transfer's bytes in the receiver's arena.
pub trait RecvBackend: LinkBackend {
    /// Waits (at most `ends.timeout`) for the next transfer, checks its header with
    /// [`check_place`] against `dst` before writing anything, places its bytes at
    /// `header.dst_off` of `dst` and returns the header. [`LinkReceiver`] checks the numbering
    /// and observes the transfer after it returns.
    fn recv(
        &mut self,
        ends: &LinkEnds,
        dst: &mut RegionMut<'_>,
    ) -> Result<(TransferHeader, Delivery)>;
}

/// One end of a link over a backend `B`: its numbering, counters and observers.
pub struct LinkEnd<B: ?Sized> {
    ends: LinkEnds,
    kind: TransportKind,
    observers: Observers,
    next_seq: u64,
    stats: LinkStats,
    backend: Box<B>,
}

/// The sending end of a link.
pub type LinkSender = LinkEnd<dyn SendBackend>;

/// The receiving end of a link.
pub type LinkReceiver = LinkEnd<dyn RecvBackend>;

impl<B: ?Sized> std::fmt::Debug for LinkEnd<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkEnd")
            .field("ends", &self.ends)
            .field("kind", &self.kind)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

impl<B: LinkBackend + ?Sized> LinkEnd<B> {
    /// This end of link `ends` over a connected `backend`; every transfer reaches `observers`.
    pub fn new(ends: LinkEnds, backend: Box<B>, observers: Observers) -> Self {
        Self {
            ends,
            kind: backend.kind(),
            observers,
            next_seq: 0,
            stats: LinkStats::default(),
            backend,
        }
    }

    /// Numbers the next transfer `next_seq`: a stage resumed from a snapshot (or moved to
    /// another node) continues the link's numbering where it was (both ends must agree).
    pub fn resume_at(&mut self, next_seq: u64) {
        self.next_seq = next_seq;
    }

    /// Sequence number of the next transfer.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Re-points this end at another connected backend (the stage at the other end moved),
    /// keeping the link's numbering, counters and observers, and returns the old backend (drop
    /// it to close it). Call it between transfers at a step boundary both ends reached, the
    /// sender after [`flush`](LinkSender::flush) and the receiver once it has received every
    /// transfer the old sender sent, so that none is lost or moved twice.
    /// What ends the connection under this link from another thread, if it has one.
    pub fn cutter(&self) -> Option<Cutter> {
        self.backend.cutter()
    }

    pub fn repoint(&mut self, backend: Box<B>) -> Box<B> {
        self.kind = backend.kind();
        std::mem::replace(&mut self.backend, backend)
    }

    /// Counters so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Who this link connects.
    pub fn ends(&self) -> LinkEnds {
        self.ends
    }

    /// Clock offset of the other end (its clock minus ours), measured at connection (TCP only).
    pub fn clock(&self) -> Option<ClockOffset> {
        self.backend.clock()
    }
}

impl LinkEnd<dyn SendBackend> {
    /// Moves `len` bytes at `src_offset` of `src` to `dst_offset` of arena `dst_arena` on the
    /// receiving endpoint. Observers see the transfer after its bytes have left (queued in the
    /// ring, copied into the receiver's arena or written to the socket), with the time the send
    /// began as its post time; a send that fails is not observed.
    pub fn send(
        &mut self,
        src: Region<'_>,
        src_offset: u64,
        len: u64,
        dst_arena: ArenaId,
        dst_offset: u64,
        tag: Tag,
    ) -> Result<Transfer> {
        let range = check_range(src.arena, src.bytes.len(), src_offset, len)?;
        let post_ns = monotonic_ns();
        let payload = &src.bytes[range];
        let header = TransferHeader {
            seq: self.next_seq,
            sequence: tag.sequence,
            step: tag.step,
            layer: tag.layer,
            src_arena: src.arena.0,
            dst_arena: dst_arena.0,
            chunk: 0,
            src_off: src_offset,
            dst_off: dst_offset,
            len,
            post_ns,
        };
        let delivery = self.backend.send(&self.ends, &header, payload)?;
        self.next_seq += 1;
        self.stats.add(len, post_ns, delivery);
        // Observed once the bytes have left: the sender's completion time is then known, and a
        // send that failed (timeout, broken link) is reported by its error, not as a transfer.
        let transfer = Transfer {
            id: TransferId {
                link: self.ends.id,
                seq: header.seq,
            },
            tag,
            src: Place {
                endpoint: self.ends.src,
                arena: src.arena,
                offset: src_offset,
            },
            dst: Place {
                endpoint: self.ends.dst,
                arena: dst_arena,
                offset: dst_offset,
            },
            len,
            post_ns,
            complete_ns: monotonic_ns(),
            transport: self.kind,
        };
        self.observers.posted(&transfer, payload);
        Ok(transfer)
    }

    /// Waits until every transfer sent has left this end ([`SendBackend::flush`]).
    pub fn flush(&mut self) -> Result<()> {
        self.backend.flush(&self.ends)
    }
}

impl LinkEnd<dyn RecvBackend> {
    /// Waits for the next transfer and places its bytes in `dst`, which must be the arena the
    /// sender addressed. Observers see the transfer once the bytes are in place.
    pub fn recv(&mut self, dst: &mut RegionMut<'_>) -> Result<Transfer> {
        let start = monotonic_ns();
        let (header, delivery) = self.backend.recv(&self.ends, dst)?;
        if header.seq != self.next_seq {
            return Err(TransportError::Protocol {
                peer: self.ends.name(),
                detail: format!(
                    "transfer {} arrived where {} was due; the link lost or reordered data",
                    header.seq, self.next_seq
                ),
            });
        }
        // The backend checked the place before writing; the range is checked again here so
        // that no backend can make the link index outside the arena.
        let r = check_range(dst.arena, dst.bytes.len(), header.dst_off, header.len)?;
        let transfer = Transfer {
            id: TransferId {
                link: self.ends.id,
                seq: header.seq,
            },
            tag: header.tag(),
            src: Place {
                endpoint: self.ends.src,
                arena: ArenaId(header.src_arena),
                offset: header.src_off,
            },
            dst: Place {
                endpoint: self.ends.dst,
                arena: dst.arena,
                offset: header.dst_off,
            },
            len: header.len,
            post_ns: header.post_ns,
            complete_ns: monotonic_ns(),
            transport: self.kind,
        };
        self.observers.completed(&transfer, &dst.bytes[r]);
        self.next_seq += 1;
        self.stats.add(header.len, start, delivery);
        Ok(transfer)
    }
}

/// The two link ends a pipeline stage uses: from its upstream stage, to its downstream stage
/// (neither in a one-stage pipeline).
#[derive(Debug, Default)]
pub struct StageLinks {
    /// The end receiving from the upstream stage.
    pub inbound: Option<LinkReceiver>,
    /// The end sending to the downstream stage.
    pub outbound: Option<LinkSender>,
}

impl StageLinks {
    /// Accepts the inbound link (`accept`, on a thread of its own named `thread`, which is also
    /// the acceptor's name in errors) while `connect` makes the outbound one: every stage does
    /// both at once, so no order of stages can deadlock. A failed outbound connection raises
    /// `abort`, so the acceptor stops waiting for a caller that will not come.
    pub fn accept_and_connect(
        thread: &str,
        abort: &AbortFlag,
        accept: impl FnOnce() -> Result<LinkReceiver> + Send,
        connect: impl FnOnce() -> Result<LinkSender>,
    ) -> Result<StageLinks> {
        std::thread::scope(|scope| {
            let inbound = std::thread::Builder::new()
                .name(thread.into())
                .spawn_scoped(scope, accept)
                .map_err(|e| TransportError::io(format!("start the {thread} thread"), e))?;
            let outbound = connect();
            if outbound.is_err() {
                abort.raise();
            }
            let inbound = inbound.join().unwrap_or_else(|_| {
                Err(TransportError::Aborted {
                    reason: format!("{thread} panicked"),
                })
            });
            Ok(StageLinks {
                inbound: Some(inbound?),
                outbound: Some(outbound?),
            })
        })
    }
}

/// What a node agent knows about its stage's links when it prepares them.
#[derive(Debug, Clone)]
pub struct NodeLinkPlan {
    /// The backend.
    pub kind: TransportKind,
    /// The link from the upstream stage (its id is its ring in a fabric).
    pub inbound: LinkEnds,
    /// The link to the downstream stage.
    pub outbound: LinkEnds,
    /// Shape of every ring of the run's fabric (`shm`).
    pub ring_specs: Vec<RingSpec>,
    /// The fabric file the coordinator created (`shm`).
    pub fabric: Option<PathBuf>,
    /// This node's host name or address, where data links are accepted (`tcp`).
    pub host: String,
    /// The run's link secret every data link proves.
    pub key: ClusterKey,
    /// How data links protect transfers (`tcp`).
    pub integrity: LinkIntegrity,
}

/// A backend's connection setup for one stage of a node agent; see the module documentation.
pub trait LinkSetup: Send + Sync {
    /// What the upstream stage needs to reach this one, sent to the coordinator when the stage
    /// is ready; `None` when the backend needs nothing exchanged (a shared fabric file).
    fn address(&self) -> Result<Option<String>>;

    /// Makes both ends of the stage's links once every stage is ready; `next` is the
    /// downstream stage's [`address`](Self::address). Gives up when `abort` is raised, and
    /// reports callers it refused through `log`.
    fn connect(
        &self,
        next: Option<&str>,
        observers: &Observers,
        abort: &AbortFlag,
        log: &(dyn Fn(&str) + Sync),
    ) -> Result<StageLinks>;

    /// Wakes every wait of this stage's links at once (the run is being aborted), where the
    /// `abort` flag given to [`connect`](Self::connect) does not already reach them.
    fn abort(&self);

    /// The socket this stage accepts its upstream neighbour's data link on, for accepting a
    /// moved neighbour's new node later (`--migrate`); `None` for backends without one.
    fn data_listener(&self) -> Option<std::net::TcpListener> {
        None
    }
}

#[cfg(test)]
mod tests;
