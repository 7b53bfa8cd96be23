//! The `tcp` backend: one socket per link between stage processes on any hosts. A connection
//! proves the run's link secret with the Noise handshake of [`crate::auth`] (which also
//! estimates the clock offset), names the link's stages and its [`LinkIntegrity`]; afterwards a
//! transfer is its 64-byte [`TransferHeader`], its payload and, with [`LinkIntegrity::Mac`], a
//! keyed BLAKE3 MAC over both.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{
    Cutter, Delivery, LinkBackend, LinkEnds, LinkIntegrity, LinkReceiver, LinkSender, LinkSetup,
    NodeLinkPlan, RecvBackend, RegionMut, SendBackend, StageLinks, check_place, check_range,
};
use crate::auth::{ClusterKey, Handshaken, Hello, Role, client_handshake, server_handshake};
use crate::clock::ClockOffset;
use crate::error::{Result, TransportError};
use crate::transfer::{Observers, TransferHeader, TransportKind};
use crate::wire::{AbortFlag, Conn};

const HEADER_LEN: usize = TransferHeader::LEN;

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

/// The sending end of a tcp link.
pub struct TcpSend {
    conn: Conn,
    /// Header, payload and MAC of a small transfer, gathered for one write.
    frame: Vec<u8>,
    mac: Option<[u8; 32]>,
    clock: ClockOffset,
}

/// The receiving end of a tcp link.
pub struct TcpRecv {
    conn: Conn,
    pending: ReadAhead,
    mac: Option<[u8; 32]>,
    clock: ClockOffset,
}

impl std::fmt::Debug for TcpSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpSend")
            .field("peer", &self.conn.peer)
            .field("mac", &self.mac.is_some())
            .finish()
    }
}

impl std::fmt::Debug for TcpRecv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpRecv")
            .field("peer", &self.conn.peer)
            .field("mac", &self.mac.is_some())
            .finish()
    }
}

impl TcpSend {
    /// Connects to the receiving stage listening at `addr`, proving `key` (the run's link
    /// secret); the node checks that this is the stage it expects to hear from (`ends`) and
    /// that both ends protect transfers the same way (`integrity`).
    pub fn connect(
        addr: &str,
        key: &ClusterKey,
        integrity: LinkIntegrity,
        ends: &LinkEnds,
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
            conn: done.conn,
            frame: Vec::with_capacity(COALESCE + HEADER_LEN + MAC_LEN),
            mac: (integrity == LinkIntegrity::Mac).then_some(done.mac_key),
            clock: done.clock,
        })
    }
}

impl LinkBackend for TcpSend {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn clock(&self) -> Option<ClockOffset> {
        Some(self.clock)
    }

    fn cutter(&self) -> Option<Cutter> {
        Cutter::of(&self.conn.stream)
    }
}

impl SendBackend for TcpSend {
    fn send(
        &mut self,
        ends: &LinkEnds,
        header: &TransferHeader,
        payload: &[u8],
    ) -> Result<Delivery> {
        let Self {
            conn, frame, mac, ..
        } = self;
        let head = header.encode();
        if payload.len() <= COALESCE {
            let tag = mac.as_ref().map(|k| transfer_mac(k, &head, payload));
            frame.clear();
            frame.extend_from_slice(&head);
            frame.extend_from_slice(payload);
            frame.extend_from_slice(tag.as_ref().map_or(&[][..], |t| t.as_bytes()));
            conn.write_full(frame, ends.timeout)?;
        } else if let Some(key) = mac {
            let mut h = blake3::Hasher::new_keyed(key);
            h.update(&head);
            conn.write_full(&head, ends.timeout)?;
            for piece in payload.chunks(MAC_PIECE) {
                conn.write_full(piece, ends.timeout)?;
                h.update(piece);
            }
            conn.write_full(h.finalize().as_bytes(), ends.timeout)?;
        } else {
            conn.write_full(&head, ends.timeout)?;
            conn.write_full(payload, ends.timeout)?;
        }
        Ok(Delivery::Staged)
    }

    /// Nothing to wait for: a send returns once every byte is written to the socket, which
    /// delivers them in order to whoever reads this connection.
    fn flush(&mut self, _ends: &LinkEnds) -> Result<()> {
        Ok(())
    }
}

impl TcpRecv {
    /// Waits on `listener` for the sending stage of `ends`, refusing any caller that does not
    /// prove `key` (the run's link secret), is not that stage or protects transfers otherwise
    /// than `integrity`. Callers are handshaken side by side (at most 16 at once, the one
    /// waiting longest dropped for a newcomer, each for at most 10 s), so a stranger that
    /// connects first, resets or holds its socket silent cannot delay or break the link; each
    /// refusal is reported through `on_refused` and the wait goes on until `ends.timeout`.
    pub fn accept(
        listener: &TcpListener,
        key: &ClusterKey,
        integrity: LinkIntegrity,
        ends: &LinkEnds,
        abort: &AbortFlag,
        on_refused: &dyn Fn(&TransportError),
    ) -> Result<Self> {
        let mut done = admit(listener, key, integrity, *ends, abort, on_refused)?;
        done.conn.abort = abort.clone();
        Ok(Self {
            conn: done.conn,
            pending: ReadAhead::new(),
            mac: (integrity == LinkIntegrity::Mac).then_some(done.mac_key),
            clock: done.clock,
        })
    }
}

impl LinkBackend for TcpRecv {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn clock(&self) -> Option<ClockOffset> {
        Some(self.clock)
    }

    fn cutter(&self) -> Option<Cutter> {
        Cutter::of(&self.conn.stream)
    }
}

impl RecvBackend for TcpRecv {
    fn recv(
        &mut self,
        ends: &LinkEnds,
        dst: &mut RegionMut<'_>,
    ) -> Result<(TransferHeader, Delivery)> {
        let Self {
            conn, pending, mac, ..
        } = self;
        pending.fill(conn, HEADER_LEN, ends.timeout)?;
        let mut raw = [0u8; HEADER_LEN];
        pending.drain_into(&mut raw);
        let h = TransferHeader::decode(&raw);
        check_place(ends, dst.arena, dst.bytes.len(), &h)?;
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
            conn.read_full(piece, ends.timeout)?;
            if let Some(h) = hasher.as_mut() {
                h.update(piece);
            }
        }
        if let Some(mac) = hasher {
            pending.fill(conn, MAC_LEN, ends.timeout)?;
            let mut tag = [0u8; MAC_LEN];
            pending.drain_into(&mut tag);
            // blake3::Hash compares in constant time.
            if mac.finalize() != tag {
                return Err(TransportError::Protocol {
                    peer: ends.name(),
                    detail: format!(
                        "transfer {} failed its integrity check (keyed MAC): its bytes \
                         were altered on the way; the run stops rather than use them",
                        h.seq
                    ),
                });
            }
        }
        Ok((h, Delivery::Staged))
    }
}

impl LinkSender {
    /// A tcp link's sending end: [`TcpSend::connect`], observed by `observers`.
    pub fn connect_tcp(
        addr: &str,
        key: &ClusterKey,
        integrity: LinkIntegrity,
        ends: LinkEnds,
        observers: Observers,
        abort: &AbortFlag,
    ) -> Result<Self> {
        let backend = TcpSend::connect(addr, key, integrity, &ends, abort)?;
        Ok(Self::new(ends, Box::new(backend), observers))
    }
}

impl LinkReceiver {
    /// A tcp link's receiving end: [`TcpRecv::accept`], observed by `observers`.
    pub fn accept_tcp(
        listener: &TcpListener,
        key: &ClusterKey,
        integrity: LinkIntegrity,
        ends: LinkEnds,
        observers: Observers,
        abort: &AbortFlag,
        on_refused: &dyn Fn(&TransportError),
    ) -> Result<Self> {
        let backend = TcpRecv::accept(listener, key, integrity, &ends, abort, on_refused)?;
        Ok(Self::new(ends, Box::new(backend), observers))
    }
}

/// A node's stage listening for its upstream neighbour's data link.
#[derive(Debug)]
pub(super) struct TcpSetup {
    listener: TcpListener,
    plan: NodeLinkPlan,
}

impl TcpSetup {
    pub(super) fn listen(plan: NodeLinkPlan) -> Result<Self> {
        let listener = TcpListener::bind((plan.host.as_str(), 0)).map_err(|e| {
            TransportError::io(format!("listen for data links on {}", plan.host), e)
        })?;
        Ok(Self { listener, plan })
    }
}

impl LinkSetup for TcpSetup {
    fn data_listener(&self) -> Option<TcpListener> {
        self.listener.try_clone().ok()
    }

    fn address(&self) -> Result<Option<String>> {
        let addr = self
            .listener
            .local_addr()
            .map_err(|e| TransportError::io("read the data listener's address", e))?;
        Ok(Some(addr.to_string()))
    }

    /// Accepts the inbound link and connects the outbound one side by side: every stage does
    /// both at once, so no order of stages can deadlock.
    fn connect(
        &self,
        next: Option<&str>,
        observers: &Observers,
        abort: &AbortFlag,
        log: &(dyn Fn(&str) + Sync),
    ) -> Result<StageLinks> {
        let next =
            next.ok_or_else(|| TransportError::Config("no address for the next stage".into()))?;
        let plan = &self.plan;
        StageLinks::accept_and_connect(
            "slug-link-accept",
            abort,
            || {
                LinkReceiver::accept_tcp(
                    &self.listener,
                    &plan.key,
                    plan.integrity,
                    plan.inbound,
                    observers.clone(),
                    abort,
                    &|e| log(&format!("refused a data-link caller: {e}")),
                )
            },
            || {
                LinkSender::connect_tcp(
                    next,
                    &plan.key,
                    plan.integrity,
                    plan.outbound,
                    observers.clone(),
                    abort,
                )
            },
        )
    }

    /// Nothing beyond the abort flag: the acceptor and every socket wait poll it.
    fn abort(&self) {}
}

/// Admits the one caller on `listener` that completes the data-link handshake for `ends`.
fn admit(
    listener: &TcpListener,
    key: &ClusterKey,
    integrity: LinkIntegrity,
    ends: LinkEnds,
    abort: &AbortFlag,
    on_refused: &dyn Fn(&TransportError),
) -> Result<Handshaken> {
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
    outcome
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
