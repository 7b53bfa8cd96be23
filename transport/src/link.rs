//! Links: the only way bytes move between endpoints. A transfer copies `len` bytes from an offset
//! of a registered arena on the sending endpoint to an offset of a registered arena on the
//! receiving endpoint; every transfer gets a deterministic id and post/complete times and is shown
//! to the endpoint's [`Observers`] on both ends. The backends (fabric rings for `local` and `shm`,
//! sockets for `tcp`) are private, so no code path can move bytes without passing the hook.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::auth::{ClusterKey, Hello, Role, client_handshake, server_handshake};
use crate::clock::{ClockOffset, monotonic_ns};
use crate::error::{Result, TransportError};
use crate::fabric::{Fabric, HEADER_LEN, SlotHeader, WaitFailure};
use crate::transfer::{
    ArenaId, EndpointId, LinkId, Observers, Place, Tag, Transfer, TransferId, TransportKind,
};
use crate::wire::{AbortFlag, Conn};

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

fn check_range(
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

/// Length of the MAC that follows every transfer of a [`LinkIntegrity::Mac`] TCP link.
const MAC_LEN: usize = 32;

/// The keyed MAC of one transfer: its header (which holds its sequence number, so nothing can
/// be replayed or reordered) and its payload.
fn transfer_mac(key: &[u8; 32], head: &[u8], payload: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(head);
    h.update(payload);
    h.finalize()
}

/// Large payloads are hashed piece by piece right after each piece is written or read, while
/// its bytes are still in cache.
const MAC_PIECE: usize = 128 << 10;

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
    /// The link as errors name it: `1 (stage 1 -> stage 2)`.
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
    fn add(&mut self, len: u64, since: u64) {
        self.transfers += 1;
        self.bytes += len;
        self.busy_ns += monotonic_ns().saturating_sub(since);
    }
}

/// Length of the header a link sends before each transfer's payload.
pub const LINK_HEADER_LEN: usize = HEADER_LEN;

/// A link backend that lives in another crate (MPI: `slug-mpi`, behind its feature). It carries
/// each transfer's [`LINK_HEADER_LEN`]-byte header, then its payload, in order; the
/// [`LinkSender`] around it numbers, checks and observes the transfer like any other.
pub trait ExternalSend: Send {
    /// Sends `header`, then `payload` (bytes of the sender's arena, sent in place), returning
    /// once both have left this endpoint's buffers.
    fn send(
        &mut self,
        header: &[u8; LINK_HEADER_LEN],
        payload: &[u8],
        ends: &LinkEnds,
    ) -> Result<()>;
}

/// The receiving side of an [`ExternalSend`] backend.
pub trait ExternalRecv: Send {
    /// Waits for the next transfer's header.
    fn recv_header(&mut self, ends: &LinkEnds) -> Result<[u8; LINK_HEADER_LEN]>;
    /// Receives that transfer's payload straight into `out`, its place in the receiver's
    /// arena (checked against the arena before this is called).
    fn recv_payload(&mut self, out: &mut [u8], ends: &LinkEnds) -> Result<()>;
}

enum SendPath {
    External(Box<dyn ExternalSend>),
    Ring {
        fabric: Arc<Fabric>,
        ring: usize,
    },
    Tcp {
        conn: Conn,
        frame: Vec<u8>,
        mac: Option<[u8; 32]>,
    },
}

enum RecvPath {
    External(Box<dyn ExternalRecv>),
    Ring {
        fabric: Arc<Fabric>,
        ring: usize,
    },
    Tcp {
        conn: Conn,
        pending: ReadAhead,
        mac: Option<[u8; 32]>,
    },
}

/// Bytes read from a socket ahead of the transfer they belong to: one read usually returns a
/// small transfer's header and payload together, saving a system call per transfer.
struct ReadAhead {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl ReadAhead {
    fn new() -> Self {
        Self {
            buf: vec![0u8; COALESCE + HEADER_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Makes at least `n` unread bytes available.
    fn fill(&mut self, conn: &mut Conn, n: usize, timeout: Duration) -> Result<()> {
        if self.end - self.start >= n {
            return Ok(());
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        let got = conn.read_at_least(&mut self.buf[self.end..], n - self.end, timeout)?;
        self.end += got;
        Ok(())
    }

    /// Moves up to `out.len()` buffered bytes into `out`; returns how many.
    fn drain_into(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        n
    }
}

/// Longest an accepted data-link caller may take to complete the handshake.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);
/// Most data-link callers in their handshake at once; more are closed at once (and logged).
const MAX_PENDING_LINKS: usize = 16;

/// Frames up to this size go out as one write (header and payload together).
const COALESCE: usize = 64 << 10;

/// The sending end of a link.
pub struct LinkSender {
    ends: LinkEnds,
    kind: TransportKind,
    path: SendPath,
    /// Whether to try direct placement into a waiting receiver's arena (ring links).
    direct: bool,
    observers: Observers,
    next_seq: u64,
    stats: LinkStats,
    clock: Option<ClockOffset>,
}

/// The receiving end of a link.
pub struct LinkReceiver {
    ends: LinkEnds,
    kind: TransportKind,
    path: RecvPath,
    observers: Observers,
    next_seq: u64,
    stats: LinkStats,
    clock: Option<ClockOffset>,
}

impl std::fmt::Debug for LinkSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSender")
            .field("ends", &self.ends)
            .field("kind", &self.kind)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

impl std::fmt::Debug for LinkReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkReceiver")
            .field("ends", &self.ends)
            .field("kind", &self.kind)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

fn wait_error(ends: &LinkEnds, failure: WaitFailure, what: &'static str) -> TransportError {
    match failure {
        WaitFailure::Aborted => TransportError::Aborted {
            reason: format!("run aborted while link {} waited for {what}", ends.name()),
        },
        WaitFailure::TimedOut(waited) => TransportError::Timeout {
            link: ends.name(),
            what,
            waited_ms: waited.as_millis() as u64,
        },
    }
}

impl LinkSender {
    /// The sending end of ring `ring` of `fabric` (`local` when the fabric is on the heap, `shm` when mapped).
    pub fn over_fabric(
        fabric: Arc<Fabric>,
        ring: usize,
        ends: LinkEnds,
        kind: TransportKind,
        observers: Observers,
    ) -> Result<Self> {
        check_ring(&fabric, ring)?;
        Ok(Self {
            ends,
            kind,
            path: SendPath::Ring { fabric, ring },
            direct: true,
            observers,
            next_seq: 0,
            stats: LinkStats::default(),
            clock: None,
        })
    }

    /// The sending end of a link whose bytes an [`ExternalSend`] backend carries; `clock` is the
    /// receiving end's clock minus ours, when the backend measured it.
    pub fn over_external(
        path: Box<dyn ExternalSend>,
        ends: LinkEnds,
        kind: TransportKind,
        observers: Observers,
        clock: Option<ClockOffset>,
    ) -> Self {
        Self {
            ends,
            kind,
            path: SendPath::External(path),
            direct: false,
            observers,
            next_seq: 0,
            stats: LinkStats::default(),
            clock,
        }
    }

    /// Connects to the receiving stage listening at `addr`, proving `key` (the run's link
    /// secret); the node checks that this is the stage it expects to hear from and that both
    /// ends protect transfers the same way (`integrity`).
    pub fn connect_tcp(
        addr: &str,
        key: &ClusterKey,
        integrity: LinkIntegrity,
        ends: LinkEnds,
        observers: Observers,
        abort: &AbortFlag,
    ) -> Result<Self> {
        let stream = crate::wire::connect(addr, ends.timeout, abort)?;
        let mut hello = Hello::new(Role::Data, ends.src.0, ends.dst.0)?;
        hello.link_mac = integrity == LinkIntegrity::Mac;
        let done = client_handshake(
            stream,
            format!("stage {} at {addr}", ends.dst.0),
            key,
            hello,
            abort.clone(),
            ends.timeout,
        )?;
        Ok(Self {
            ends,
            kind: TransportKind::Tcp,
            direct: false,
            path: SendPath::Tcp {
                conn: done.conn,
                frame: Vec::with_capacity(COALESCE + HEADER_LEN + MAC_LEN),
                mac: (integrity == LinkIntegrity::Mac).then_some(done.mac_key),
            },
            observers,
            next_seq: 0,
            stats: LinkStats::default(),
            clock: Some(done.clock),
        })
    }

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
        let mut transfer = Transfer {
            id: TransferId {
                link: self.ends.id,
                seq: self.next_seq,
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
            complete_ns: 0,
            transport: self.kind,
        };
        let payload = &src.bytes[range];
        let header = SlotHeader {
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
        match &mut self.path {
            SendPath::External(path) => path.send(&header.encode(), payload, &self.ends)?,
            SendPath::Ring { fabric, ring } => {
                let ring = fabric.ring(*ring);
                let cap = ring.capacity();
                // A receiver already waiting takes the bytes straight into its arena; otherwise
                // they queue in slots, in pieces of at most one slot.
                let pieces = if ring.try_direct(&header, payload, &mut self.direct) {
                    self.stats.direct += 1;
                    0
                } else {
                    len.div_ceil(cap).max(1)
                };
                for chunk in 0..pieces {
                    let (a, b) = (
                        (chunk * cap) as usize,
                        ((chunk + 1) * cap).min(len) as usize,
                    );
                    ring.send(self.ends.timeout, |slot| {
                        slot[..b - a].copy_from_slice(&payload[a..b]);
                        SlotHeader {
                            chunk: chunk as u32,
                            ..header
                        }
                    })
                    .map_err(|f| wait_error(&self.ends, f, "a free slot"))?;
                }
            }
            SendPath::Tcp { conn, frame, mac } => {
                let head = header.encode();
                if payload.len() <= COALESCE {
                    let tag = mac.as_ref().map(|k| transfer_mac(k, &head, payload));
                    frame.clear();
                    frame.extend_from_slice(&head);
                    frame.extend_from_slice(payload);
                    frame.extend_from_slice(tag.as_ref().map_or(&[][..], |t| t.as_bytes()));
                    conn.write_full(frame, self.ends.timeout)?;
                } else if let Some(key) = mac {
                    let mut h = blake3::Hasher::new_keyed(key);
                    h.update(&head);
                    conn.write_full(&head, self.ends.timeout)?;
                    for piece in payload.chunks(MAC_PIECE) {
                        conn.write_full(piece, self.ends.timeout)?;
                        h.update(piece);
                    }
                    conn.write_full(h.finalize().as_bytes(), self.ends.timeout)?;
                } else {
                    conn.write_full(&head, self.ends.timeout)?;
                    conn.write_full(payload, self.ends.timeout)?;
                }
            }
        }
        self.next_seq += 1;
        self.stats.add(len, post_ns);
        // Observed once the bytes have left: the sender's completion time is then known, and a
        // send that failed (timeout, broken link) is reported by its error, not as a transfer.
        transfer.complete_ns = monotonic_ns();
        self.observers.posted(&transfer, payload);
        Ok(transfer)
    }

    /// Numbers the next transfer `next_seq`: a stage resumed from a snapshot continues the
    /// link's numbering where the recorded run was (both ends must agree).
    pub(crate) fn resume_at(&mut self, next_seq: u64) {
        self.next_seq = next_seq;
    }

    /// Counters so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Who this link connects.
    pub fn ends(&self) -> LinkEnds {
        self.ends
    }

    /// Clock offset of the receiving end (its clock minus ours), measured at connection (TCP only).
    pub fn clock(&self) -> Option<ClockOffset> {
        self.clock
    }
}

fn check_ring(fabric: &Fabric, ring: usize) -> Result<()> {
    if ring >= fabric.layout().rings() {
        return Err(TransportError::Config(format!(
            "ring {ring} does not exist; the fabric has {}",
            fabric.layout().rings()
        )));
    }
    Ok(())
}

impl LinkReceiver {
    /// The receiving end of ring `ring` of `fabric`.
    pub fn over_fabric(
        fabric: Arc<Fabric>,
        ring: usize,
        ends: LinkEnds,
        kind: TransportKind,
        observers: Observers,
    ) -> Result<Self> {
        check_ring(&fabric, ring)?;
        Ok(Self {
            ends,
            kind,
            path: RecvPath::Ring { fabric, ring },
            observers,
            next_seq: 0,
            stats: LinkStats::default(),
            clock: None,
        })
    }

    /// The receiving end of a link whose bytes an [`ExternalRecv`] backend carries; `clock` is
    /// the sending end's clock minus ours, when the backend measured it.
    pub fn over_external(
        path: Box<dyn ExternalRecv>,
        ends: LinkEnds,
        kind: TransportKind,
        observers: Observers,
        clock: Option<ClockOffset>,
    ) -> Self {
        Self {
            ends,
            kind,
            path: RecvPath::External(path),
            observers,
            next_seq: 0,
            stats: LinkStats::default(),
            clock,
        }
    }

    /// Waits on `listener` for the sending stage of `ends`, refusing any caller that does not
    /// prove `key` (the run's link secret), is not that stage or protects transfers otherwise
    /// than `integrity`. Callers are handshaken side by side (at most 16 at once, the one
    /// waiting longest dropped for a newcomer, each for at most 10 s), so a stranger that connects first, resets or
    /// holds its socket silent cannot delay or break the link; each refusal is reported through
    /// `on_refused` and the wait goes on until `ends.timeout`.
    pub fn accept_tcp(
        listener: &TcpListener,
        key: &ClusterKey,
        integrity: LinkIntegrity,
        ends: LinkEnds,
        observers: Observers,
        abort: &AbortFlag,
        on_refused: &dyn Fn(&TransportError),
    ) -> Result<Self> {
        listener
            .set_nonblocking(true)
            .map_err(|e| TransportError::io("make listener non-blocking", e))?;
        let start = Instant::now();
        // Handshakes in progress, oldest first: the flag that ends each, and whether it ended.
        let mut waiting: std::collections::VecDeque<(AbortFlag, Arc<AtomicBool>, SocketAddr)> =
            std::collections::VecDeque::new();
        let pending = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = crossbeam_channel::unbounded();
        let outcome = loop {
            let mut admitted = None;
            while let Ok(done) = rx.try_recv() {
                match done {
                    Ok(done) => {
                        admitted = Some(done);
                        break;
                    }
                    // A dropped caller, already reported when it was dropped.
                    Err(TransportError::Aborted { .. }) => {}
                    Err(e) => on_refused(&e),
                }
            }
            if let Some(done) = admitted {
                break Ok(done);
            }
            if abort.raised() {
                break Err(TransportError::Aborted {
                    reason: format!(
                        "run aborted while waiting for link {} to connect",
                        ends.name()
                    ),
                });
            }
            if start.elapsed() >= ends.timeout {
                break Err(TransportError::Timeout {
                    link: ends.name(),
                    what: "connected",
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            if pending.load(Ordering::SeqCst) >= 2 * MAX_PENDING_LINKS {
                // Dropped callers' threads end within 50 ms; until then newcomers wait in the
                // listen backlog rather than being turned away.
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let (stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => {
                    break Err(TransportError::io(
                        format!("accept a connection for link {}", ends.name()),
                        e,
                    ));
                }
            };
            let refused = |reason: &str| TransportError::Refused {
                peer: peer.to_string(),
                reason: reason.to_string(),
            };
            waiting.retain(|(_, ended, _)| !ended.load(Ordering::SeqCst));
            if waiting.len() >= MAX_PENDING_LINKS
                && let Some((oldest, _, who)) = waiting.pop_front()
            {
                // The caller waiting longest goes: the real upstream stage finishes its
                // handshake in a few round trips, so strangers cannot keep it out.
                oldest.raise();
                on_refused(&TransportError::Refused {
                    peer: who.to_string(),
                    reason: format!(
                        "dropped: {MAX_PENDING_LINKS} callers were in their handshake and it \
                         had waited longest"
                    ),
                });
            }
            if let Err(e) = stream.set_nonblocking(false) {
                on_refused(&TransportError::io(
                    format!("configure connection from {peer}"),
                    e,
                ));
                continue;
            }
            pending.fetch_add(1, Ordering::SeqCst);
            let (flag, ended) = (AbortFlag::new(), Arc::new(AtomicBool::new(false)));
            waiting.push_back((flag.clone(), ended.clone(), peer));
            let (key, pending2, tx) = (key.clone(), pending.clone(), tx.clone());
            let wait = ends.timeout.min(HANDSHAKE_WAIT);
            let spawned = std::thread::Builder::new()
                .name("slug-link-handshake".into())
                .spawn(move || {
                    let done = link_handshake(stream, peer, &key, integrity, ends, flag, wait);
                    pending2.fetch_sub(1, Ordering::SeqCst);
                    ended.store(true, Ordering::SeqCst);
                    let _ = tx.send(done);
                });
            if let Err(e) = spawned {
                pending.fetch_sub(1, Ordering::SeqCst);
                waiting.pop_back();
                on_refused(&refused(&format!("no thread to handshake it: {e}")));
            }
        };
        // This wait is over: every handshake still running gives up.
        for (flag, _, _) in &waiting {
            flag.raise();
        }
        let mut done = outcome?;
        done.conn.abort = abort.clone();
        Ok(Self {
            ends,
            kind: TransportKind::Tcp,
            path: RecvPath::Tcp {
                conn: done.conn,
                pending: ReadAhead::new(),
                mac: (integrity == LinkIntegrity::Mac).then_some(done.mac_key),
            },
            observers,
            next_seq: 0,
            stats: LinkStats::default(),
            clock: Some(done.clock),
        })
    }

    /// Waits for the next transfer and places its bytes in `dst`, which must be the arena the
    /// sender addressed. Observers see the transfer once the bytes are in place.
    pub fn recv(&mut self, dst: &mut RegionMut<'_>) -> Result<Transfer> {
        let start = monotonic_ns();
        let header = match &mut self.path {
            RecvPath::External(path) => {
                let h = SlotHeader::decode(&path.recv_header(&self.ends)?);
                place(&self.ends, dst.arena, dst.bytes.len(), &h)?;
                let r = check_range(dst.arena, dst.bytes.len(), h.dst_off, h.len)?;
                path.recv_payload(&mut dst.bytes[r], &self.ends)?;
                h
            }
            RecvPath::Ring { fabric, ring } => {
                let ends = self.ends;
                let arena = dst.arena;
                let bytes = &mut *dst.bytes;
                let ring = fabric.ring(*ring);
                let cap = ring.capacity();
                let posted = ring
                    .post_and_wait(ends.timeout, arena.0, bytes)
                    .map_err(|f| wait_error(&self.ends, f, "received"))?;
                if let Some(h) = posted {
                    // The sender checked the range against the post; check the header too.
                    place(&ends, arena, bytes.len(), &h)?;
                    self.stats.direct += 1;
                    h
                } else {
                    let first = ring
                        .recv(ends.timeout, |h, piece| -> Result<SlotHeader> {
                            place(&ends, arena, bytes.len(), h)?;
                            let r = check_range(arena, bytes.len(), h.dst_off, h.len)?;
                            piece_in_order(&ends, h, h, 0)?;
                            bytes[r.start..r.start + piece.len()].copy_from_slice(piece);
                            Ok(*h)
                        })
                        .map_err(|f| wait_error(&self.ends, f, "received"))??;
                    for chunk in 1..first.len.div_ceil(cap).max(1) {
                        ring.recv(ends.timeout, |h, piece| -> Result<()> {
                            piece_in_order(&ends, h, &first, chunk)?;
                            let at = (first.dst_off + chunk * cap) as usize;
                            bytes[at..at + piece.len()].copy_from_slice(piece);
                            Ok(())
                        })
                        .map_err(|f| wait_error(&self.ends, f, "received"))??;
                    }
                    first
                }
            }
            RecvPath::Tcp { conn, pending, mac } => {
                pending.fill(conn, HEADER_LEN, self.ends.timeout)?;
                let mut raw = [0u8; HEADER_LEN];
                pending.drain_into(&mut raw);
                let h = SlotHeader::decode(&raw);
                place(&self.ends, dst.arena, dst.bytes.len(), &h)?;
                let r = check_range(dst.arena, dst.bytes.len(), h.dst_off, h.len)?;
                let out = &mut dst.bytes[r];
                let have = pending.drain_into(out);
                let mut hasher = mac.as_ref().map(|k| {
                    let mut h = blake3::Hasher::new_keyed(k);
                    h.update(&raw);
                    h.update(&out[..have]);
                    h
                });
                // The rest of a large payload goes straight from the socket into the arena.
                for piece in out[have..].chunks_mut(MAC_PIECE) {
                    conn.read_full(piece, self.ends.timeout)?;
                    if let Some(h) = hasher.as_mut() {
                        h.update(piece);
                    }
                }
                if let Some(mac) = hasher {
                    pending.fill(conn, MAC_LEN, self.ends.timeout)?;
                    let mut tag = [0u8; MAC_LEN];
                    pending.drain_into(&mut tag);
                    // blake3::Hash compares in constant time.
                    if mac.finalize() != tag {
                        return Err(TransportError::Protocol {
                            peer: self.ends.name(),
                            detail: format!(
                                "transfer {} failed its integrity check (keyed MAC): its bytes \
                                 were altered on the way; the run stops rather than use them",
                                h.seq
                            ),
                        });
                    }
                }
                h
            }
        };
        if header.seq != self.next_seq {
            return Err(TransportError::Protocol {
                peer: self.ends.name(),
                detail: format!(
                    "transfer {} arrived where {} was due; the link lost or reordered data",
                    header.seq, self.next_seq
                ),
            });
        }
        let transfer = Transfer {
            id: TransferId {
                link: self.ends.id,
                seq: header.seq,
            },
            tag: Tag {
                sequence: header.sequence,
                step: header.step,
                layer: header.layer,
            },
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
        let r = header.dst_off as usize..(header.dst_off + header.len) as usize;
        self.observers.completed(&transfer, &dst.bytes[r]);
        self.next_seq += 1;
        self.stats.add(header.len, start);
        Ok(transfer)
    }

    /// Numbers the next transfer `next_seq`: a stage resumed from a snapshot continues the
    /// link's numbering where the recorded run was (both ends must agree).
    pub(crate) fn resume_at(&mut self, next_seq: u64) {
        self.next_seq = next_seq;
    }

    /// Counters so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Who this link connects.
    pub fn ends(&self) -> LinkEnds {
        self.ends
    }

    /// Clock offset of the sending end (its clock minus ours), measured at connection (TCP only).
    pub fn clock(&self) -> Option<ClockOffset> {
        self.clock
    }
}

/// Checks that a ring slot holds piece `chunk` of transfer `seq`, as the protocol promises.
fn piece_in_order(ends: &LinkEnds, h: &SlotHeader, first: &SlotHeader, chunk: u64) -> Result<()> {
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

fn place(ends: &LinkEnds, arena: ArenaId, size: usize, h: &SlotHeader) -> Result<()> {
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

/// One data-link caller's handshake (run on its own thread by [`LinkReceiver::accept_tcp`]).
fn link_handshake(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    key: &ClusterKey,
    integrity: LinkIntegrity,
    ends: LinkEnds,
    over: AbortFlag,
    wait: Duration,
) -> Result<crate::auth::Handshaken> {
    let expect = (ends.src.0, ends.dst.0);
    server_handshake(
        stream,
        format!("stage {} from {peer}", ends.src.0),
        key,
        over,
        wait,
        |hello| {
            if hello.role != Role::Data {
                return Err("this port serves stage-to-stage data links only".into());
            }
            if (hello.from, hello.to) != expect {
                return Err(format!(
                    "wrong stage: this link carries stage {} -> stage {}, the caller is stage {} -> stage {}",
                    expect.0, expect.1, hello.from, hello.to
                ));
            }
            if hello.link_mac != (integrity == LinkIntegrity::Mac) {
                return Err(format!(
                    "link integrity mismatch: this end uses --link-integrity {integrity}, the \
                     caller the other; run every stage with the same setting"
                ));
            }
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fabric::{FabricLayout, RingSpec};
    use crate::transfer::{TransferObserver, content_hash};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Seen(Mutex<Vec<(bool, TransferId, u128)>>);

    impl TransferObserver for Seen {
        fn posted(&self, t: &Transfer, bytes: &[u8]) {
            self.0
                .lock()
                .expect("lock")
                .push((true, t.id, content_hash(bytes)));
        }
        fn completed(&self, t: &Transfer, bytes: &[u8]) {
            self.0
                .lock()
                .expect("lock")
                .push((false, t.id, content_hash(bytes)));
        }
    }

    fn ends() -> LinkEnds {
        LinkEnds {
            id: LinkId(0),
            src: EndpointId(0),
            dst: EndpointId(1),
            timeout: Duration::from_secs(10),
        }
    }

    fn tag(step: u32) -> Tag {
        Tag {
            sequence: 0,
            step,
            layer: 1,
        }
    }

    fn exchange(mut tx: LinkSender, mut rx: LinkReceiver) {
        let src: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut dst = vec![0u8; 2000];
        for step in 0..3u32 {
            let off = u64::from(step) * 10;
            let sent = tx
                .send(
                    Region {
                        arena: ArenaId(5),
                        bytes: &src,
                    },
                    off,
                    500,
                    ArenaId(9),
                    1000 + off,
                    tag(step),
                )
                .expect("send");
            let got = rx
                .recv(&mut RegionMut {
                    arena: ArenaId(9),
                    bytes: &mut dst,
                })
                .expect("recv");
            assert_eq!(sent.id, got.id);
            assert_eq!(got.id.seq, u64::from(step));
            assert_eq!(got.tag, tag(step));
            assert_eq!(got.src.arena, ArenaId(5));
            assert_eq!(got.src.offset, off);
            assert!(got.complete_ns >= got.post_ns);
            let (o, d) = (off as usize, 1000 + off as usize);
            assert_eq!(&dst[d..d + 500], &src[o..o + 500]);
        }
        assert_eq!(tx.stats().transfers, 3);
        assert_eq!(rx.stats().bytes, 1500);
        // A receiver offering a different arena than the sender addressed gets an error, not bytes.
        tx.send(
            Region {
                arena: ArenaId(5),
                bytes: &src,
            },
            0,
            4,
            ArenaId(9),
            0,
            tag(9),
        )
        .expect("send");
        let wrong = rx.recv(&mut RegionMut {
            arena: ArenaId(8),
            bytes: &mut dst,
        });
        assert!(
            matches!(wrong, Err(TransportError::Protocol { .. })),
            "{wrong:?}"
        );
        // A source range outside the arena is refused before anything moves.
        let oob = tx.send(
            Region {
                arena: ArenaId(5),
                bytes: &src,
            },
            900,
            200,
            ArenaId(9),
            0,
            tag(0),
        );
        assert!(matches!(oob, Err(TransportError::OutOfBounds { .. })));
    }

    #[test]
    fn ring_link_moves_bytes_by_offset_and_shows_both_ends_to_observers() {
        let layout = FabricLayout::new(&[RingSpec {
            slots: 2,
            capacity: 512,
        }])
        .expect("layout");
        let fabric = Arc::new(Fabric::heap(layout));
        let seen = Arc::new(Seen::default());
        let obs = Observers::none().with(seen.clone());
        let tx =
            LinkSender::over_fabric(fabric.clone(), 0, ends(), TransportKind::Local, obs.clone())
                .expect("tx");
        let rx =
            LinkReceiver::over_fabric(fabric, 0, ends(), TransportKind::Local, obs).expect("rx");
        exchange(tx, rx);
        let seen = seen.0.lock().expect("lock");
        // 3 exchanged transfers seen twice each, same hash on both ends, then the 4th's post.
        assert_eq!(seen.len(), 7);
        for pair in seen[..6].chunks(2) {
            assert!(pair[0].0 && !pair[1].0);
            assert_eq!(pair[0].1, pair[1].1);
            assert_eq!(pair[0].2, pair[1].2);
        }
    }

    #[test]
    fn transfers_larger_than_a_slot_travel_in_pieces_and_arrive_whole() {
        let layout = FabricLayout::new(&[RingSpec {
            slots: 2,
            capacity: 7,
        }])
        .expect("layout");
        let fabric = Arc::new(Fabric::heap(layout));
        let mut tx = LinkSender::over_fabric(
            fabric.clone(),
            0,
            ends(),
            TransportKind::Local,
            Observers::none(),
        )
        .expect("tx");
        let mut rx =
            LinkReceiver::over_fabric(fabric, 0, ends(), TransportKind::Local, Observers::none())
                .expect("rx");
        let src: Vec<u8> = (0..100u8).collect();
        let sender = std::thread::spawn(move || {
            for len in [0u64, 1, 7, 8, 100] {
                tx.send(
                    Region {
                        arena: ArenaId(0),
                        bytes: &src,
                    },
                    0,
                    len,
                    ArenaId(0),
                    3,
                    tag(0),
                )
                .expect("send");
            }
        });
        for len in [0usize, 1, 7, 8, 100] {
            let mut dst = vec![0xffu8; 110];
            let t = rx
                .recv(&mut RegionMut {
                    arena: ArenaId(0),
                    bytes: &mut dst,
                })
                .expect("recv");
            assert_eq!(t.len, len as u64);
            assert!(dst[..3].iter().all(|&b| b == 0xff));
            assert_eq!(&dst[3..3 + len], &(0..len as u8).collect::<Vec<_>>()[..]);
            assert!(dst[3 + len..].iter().all(|&b| b == 0xff));
        }
        sender.join().expect("sender");
    }

    #[test]
    fn a_waiting_receiver_gets_the_bytes_placed_directly() {
        let layout = FabricLayout::new(&[RingSpec {
            slots: 2,
            capacity: 16,
        }])
        .expect("layout");
        let fabric = Arc::new(Fabric::heap(layout));
        let mut tx = LinkSender::over_fabric(
            fabric.clone(),
            0,
            ends(),
            TransportKind::Local,
            Observers::none(),
        )
        .expect("tx");
        let mut rx =
            LinkReceiver::over_fabric(fabric, 0, ends(), TransportKind::Local, Observers::none())
                .expect("rx");
        let receiver = std::thread::spawn(move || {
            let mut got = Vec::new();
            for _ in 0..20 {
                let mut dst = vec![0u8; 300];
                let t = rx
                    .recv(&mut RegionMut {
                        arena: ArenaId(2),
                        bytes: &mut dst,
                    })
                    .expect("recv");
                got.push((t.len, dst));
            }
            (got, rx.stats())
        });
        let src: Vec<u8> = (0..200u8).collect();
        for i in 0..20u64 {
            // Give the receiver time to post: most of these go the direct way.
            std::thread::sleep(Duration::from_millis(2));
            tx.send(
                Region {
                    arena: ArenaId(1),
                    bytes: &src,
                },
                i,
                100,
                ArenaId(2),
                50 + i,
                tag(0),
            )
            .expect("send");
        }
        let (got, stats) = receiver.join().expect("receiver");
        for (i, (len, dst)) in got.iter().enumerate() {
            assert_eq!(*len, 100);
            assert_eq!(&dst[50 + i..150 + i], &src[i..i + 100]);
            assert!(dst[..50 + i].iter().all(|&b| b == 0));
        }
        assert!(
            stats.direct > 0,
            "no transfer took the direct path: {stats:?}"
        );
        assert_eq!(stats.direct, tx.stats().direct);
    }

    #[test]
    fn tcp_link_moves_bytes_and_refuses_the_wrong_stage_and_integrity() {
        for integrity in [LinkIntegrity::Mac, LinkIntegrity::None] {
            let key = ClusterKey::from_bytes(b"tcp-link-test-key-0123").expect("key");
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr").to_string();
            let abort = AbortFlag::new();
            let refusals = Arc::new(Mutex::new(Vec::new()));
            let (k2, a2, r2) = (key.clone(), abort.clone(), refusals.clone());
            let server = std::thread::spawn(move || {
                let log = |e: &TransportError| r2.lock().expect("lock").push(e.to_string());
                LinkReceiver::accept_tcp(
                    &listener,
                    &k2,
                    integrity,
                    ends(),
                    Observers::none(),
                    &a2,
                    &log,
                )
            });
            let mut wrong = ends();
            wrong.src = EndpointId(3);
            let refused =
                LinkSender::connect_tcp(&addr, &key, integrity, wrong, Observers::none(), &abort);
            match refused {
                Err(TransportError::Refused { reason, .. }) => {
                    assert!(reason.contains("wrong stage"), "{reason}")
                }
                other => panic!("expected refusal, got {other:?}"),
            }
            let other = match integrity {
                LinkIntegrity::Mac => LinkIntegrity::None,
                LinkIntegrity::None => LinkIntegrity::Mac,
            };
            let refused =
                LinkSender::connect_tcp(&addr, &key, other, ends(), Observers::none(), &abort);
            match refused {
                Err(TransportError::Refused { reason, .. }) => {
                    assert!(reason.contains("integrity mismatch"), "{reason}")
                }
                other => panic!("expected refusal, got {other:?}"),
            }
            let tx =
                LinkSender::connect_tcp(&addr, &key, integrity, ends(), Observers::none(), &abort)
                    .expect("tx");
            let rx = server.join().expect("server").expect("rx");
            assert_eq!(refusals.lock().expect("lock").len(), 2);
            assert!(tx.clock().is_some() && rx.clock().is_some());
            exchange(tx, rx);
        }
    }
}
