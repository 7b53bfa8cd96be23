//! The `rdma` link backend: each link end owns one queue pair and one buffer registered once.
//!
//! The receiving end's buffer is an inbox of `slots` slots (the link's ring shape); a transfer
//! is one RDMA WRITE WITH IMMEDIATE of its 64-byte [`TransferHeader`] and payload from the
//! sender's registered buffer into slot `seq % slots` of the inbox, the immediate carrying the
//! transfer's number. The receiver checks the header against its arena ([`check_place`]),
//! copies the payload out and returns the slot as a credit: an empty SEND WITH IMMEDIATE
//! carrying how many transfers it has taken. A sender never has more transfers in the inbox
//! than it holds credits, so a slow receiver is never overwritten.
//!
//! Connecting: the receiving stage publishes its queue pair, GID, rkey, inbox address and
//! shape, plus a tcp listener, as its [`LinkSetup::address`], which the coordinator forwards
//! over the authenticated node protocol. The sender connects its queue pair to that, then
//! proves the run's link secret on the tcp link (the same handshake as `--transport tcp`) and
//! sends its own queue pair and GID over it; the receiver connects its queue pair and grants
//! the first credits, and the tcp link is closed.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ibverbs_sys::ibv_wc_opcode;
use serde::{Deserialize, Serialize};
use slug_transport::fabric::RingSpec;
use slug_transport::link::tcp::{TcpRecv, TcpSend};
use slug_transport::link::{
    Delivery, LinkBackend, LinkEnds, LinkReceiver, LinkSender, LinkSetup, NodeLinkPlan,
    RecvBackend, RegionMut, SendBackend, StageLinks, check_piece, check_place,
};
use slug_transport::transfer::{ArenaId, Observers, TransferHeader, TransportKind};
use slug_transport::{AbortFlag, Result, TransportError};

use crate::verbs::{Buffer, Completion, Device, QpInfo, Queue};

const HEADER_LEN: usize = TransferHeader::LEN;

/// Largest queue-pair message a stage accepts on its bootstrap tcp link.
const BOOT_MAX: usize = 512;

/// Work-request ids of the receiving end's credit sends (its writes have none).
const CREDIT_WR: u64 = 1 << 63;

/// What a receiving stage publishes so that its upstream stage can write into its inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Inbox {
    /// The receiving queue pair.
    qp: QpInfo,
    /// Key of the inbox.
    rkey: u32,
    /// Address of the inbox's first slot.
    base: u64,
    /// Slots in the inbox (the credits a sender starts with).
    slots: u32,
    /// Bytes per slot: a header and the largest payload, rounded up to 64.
    slot_bytes: u64,
}

/// The [`LinkSetup::address`] of an rdma stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Address {
    /// Where the sender proves the run's secret and sends its queue pair.
    tcp: String,
    /// The inbox.
    inbox: Inbox,
}

fn slot_bytes(spec: RingSpec) -> u64 {
    (HEADER_LEN as u64 + spec.capacity).div_ceil(64) * 64
}

fn protocol(ends: &LinkEnds, detail: String) -> TransportError {
    TransportError::Protocol {
        peer: ends.name(),
        detail,
    }
}

/// The sending end of an rdma link.
#[derive(Debug)]
pub struct RdmaSend {
    queue: Queue,
    /// One slot per inbox slot: header and payload of the piece written into that slot, kept
    /// until its credit returns (so the device has long finished reading it).
    staging: Buffer,
    inbox: Inbox,
    /// Pieces written (wrapping, as on the wire).
    sent: u32,
    /// Writes posted whose completion has not been polled.
    writes_out: u32,
    send_depth: u32,
    ends: LinkEnds,
    /// Transfers the receiver reported taken, once it granted the first credits.
    taken: Option<u32>,
    recv_depth: u32,
    abort: AbortFlag,
    done: Vec<Completion>,
}

impl RdmaSend {
    fn connect(
        dev: &Arc<Device>,
        to: &Address,
        plan: &NodeLinkPlan,
        abort: &AbortFlag,
    ) -> Result<Self> {
        let ends = plan.outbound;
        let inbox = to.inbox;
        let capacity = plan
            .ring_specs
            .get(ends.id.0 as usize)
            .map(|s| slot_bytes(*s))
            .ok_or_else(|| {
                TransportError::Config(format!("no ring shape for link {}", ends.name()))
            })?;
        if inbox.slots == 0 || inbox.slot_bytes != capacity {
            return Err(protocol(
                &ends,
                format!(
                    "the receiver's inbox has {} slots of {} bytes, this run's link needs slots \
                     of {capacity} bytes: both stages must run the same configuration",
                    inbox.slots, inbox.slot_bytes
                ),
            ));
        }
        let me = Self::open(dev, inbox, ends, abort)?;
        let mut boot = TcpSend::connect(&to.tcp, &plan.key, plan.integrity, &ends, abort)?;
        let info = serde_json::to_vec(&me.queue.info())
            .map_err(|e| TransportError::Config(format!("encode this end's queue pair: {e}")))?;
        let header = TransferHeader {
            seq: 0,
            sequence: 0,
            step: 0,
            layer: 0,
            src_arena: 0,
            dst_arena: 0,
            chunk: 0,
            src_off: 0,
            dst_off: 0,
            len: info.len() as u64,
            post_ns: 0,
        };
        boot.send(&ends, &header, &info)?;
        Ok(me)
    }

    /// A sending end connected to the queue pair of `inbox`, before the receiver knows it.
    fn open(dev: &Arc<Device>, inbox: Inbox, ends: LinkEnds, abort: &AbortFlag) -> Result<Self> {
        // Credit messages the receiver may send before this end takes them: one per slot, and
        // the first grant.
        let recv_depth = inbox.slots + 1;
        let send_depth = inbox.slots + 1;
        let mut queue = Queue::create(dev, send_depth, recv_depth)?;
        for i in 0..recv_depth {
            queue.post_recv(u64::from(i))?;
        }
        queue.connect(&inbox.qp)?;
        let staging = Buffer::register(
            dev,
            (u64::from(inbox.slots) * inbox.slot_bytes) as usize,
            false,
        )?;
        Ok(Self {
            queue,
            staging,
            inbox,
            sent: 0,
            writes_out: 0,
            send_depth,
            ends,
            taken: None,
            recv_depth,
            abort: abort.clone(),
            done: Vec::new(),
        })
    }

    /// Takes in the completions in `self.done`: credits and finished writes.
    fn absorb(&mut self, ends: &LinkEnds) -> Result<()> {
        for c in std::mem::take(&mut self.done) {
            match c.opcode {
                ibv_wc_opcode::IBV_WC_RECV => {
                    let taken = c.imm.ok_or_else(|| {
                        protocol(ends, "a credit message without its count".into())
                    })?;
                    // The receiver cannot have taken more than was sent, nor fewer than it
                    // reported before.
                    let before = self.taken.unwrap_or(taken);
                    if self.sent.wrapping_sub(taken) > self.sent.wrapping_sub(before) {
                        return Err(protocol(
                            ends,
                            format!(
                                "credit count {taken} goes back from {before} (or past the \
                                 {} transfers sent)",
                                self.sent
                            ),
                        ));
                    }
                    self.taken = Some(taken);
                    self.queue.post_recv(c.wr_id % u64::from(self.recv_depth))?;
                }
                ibv_wc_opcode::IBV_WC_RDMA_WRITE => {
                    self.writes_out = self.writes_out.saturating_sub(1);
                }
                other => {
                    return Err(protocol(
                        ends,
                        format!("unexpected completion (opcode {other}) on the sending end"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Waits (from `start`, at most the link's timeout) until `ready` holds, taking in
    /// completions meanwhile.
    fn wait_until(
        &mut self,
        ends: &LinkEnds,
        what: &'static str,
        start: Instant,
        ready: fn(&Self) -> bool,
    ) -> Result<()> {
        self.queue.poll(ends, &mut self.done)?;
        self.absorb(ends)?;
        while !ready(self) {
            self.queue
                .wait(ends, what, start, &self.abort, &mut self.done)?;
            self.absorb(ends)?;
        }
        Ok(())
    }

    fn credits(&self) -> u32 {
        match self.taken {
            Some(taken) => self.inbox.slots - self.sent.wrapping_sub(taken),
            None => 0,
        }
    }
}

impl LinkBackend for RdmaSend {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }
}

impl RdmaSend {
    /// Writes one piece (header and bytes) into the receiver's next slot once a credit allows;
    /// returns once the write is posted (the piece was copied into the staging slot).
    fn write_piece(
        &mut self,
        ends: &LinkEnds,
        header: &TransferHeader,
        piece: &[u8],
        start: Instant,
    ) -> Result<()> {
        self.wait_until(ends, "credited by the receiver", start, |s| {
            s.credits() > 0 && s.writes_out < s.send_depth
        })?;
        let slot = u64::from(self.sent % self.inbox.slots);
        let at = (slot * self.inbox.slot_bytes) as usize;
        self.staging.write(at, &header.encode());
        self.staging.write(at + HEADER_LEN, piece);
        self.queue.post_write_imm(
            u64::from(self.sent),
            &self.staging,
            at,
            HEADER_LEN + piece.len(),
            self.inbox.base + slot * self.inbox.slot_bytes,
            self.inbox.rkey,
            self.sent,
        )?;
        self.sent = self.sent.wrapping_add(1);
        self.writes_out += 1;
        Ok(())
    }
}

impl SendBackend for RdmaSend {
    /// Writes the transfer in pieces of at most one inbox slot, as the shm ring does.
    fn send(
        &mut self,
        ends: &LinkEnds,
        header: &TransferHeader,
        payload: &[u8],
    ) -> Result<Delivery> {
        let start = Instant::now();
        let cap = self.inbox.slot_bytes as usize - HEADER_LEN;
        for (chunk, piece) in payload.chunks(cap).enumerate() {
            let h = TransferHeader {
                chunk: chunk as u32,
                ..*header
            };
            self.write_piece(ends, &h, piece, start)?;
        }
        if payload.is_empty() {
            self.write_piece(ends, header, &[], start)?;
        }
        Ok(Delivery::Staged)
    }

    /// Waits until every write posted has completed: its bytes are in the receiver's inbox.
    fn flush(&mut self, ends: &LinkEnds) -> Result<()> {
        self.wait_until(ends, "written to the receiver", Instant::now(), |s| {
            s.writes_out == 0
        })
    }
}

impl Drop for RdmaSend {
    /// Destroying the queue pair would drop writes still on their way: the last transfers of
    /// a run are let out first (bounded by the link's timeout; a gone peer ends it sooner).
    fn drop(&mut self) {
        let ends = self.ends;
        let _ = self.flush(&ends);
    }
}

/// The receiving end of an rdma link.
#[derive(Debug)]
pub struct RdmaRecv {
    queue: Queue,
    inbox_buf: Buffer,
    inbox: Inbox,
    /// Transfers taken (wrapping, as on the wire).
    taken: u32,
    /// Credit sends posted and not yet completed.
    credits_out: u32,
    send_depth: u32,
    /// Writes arrived and not yet taken, oldest first.
    arrived: std::collections::VecDeque<Completion>,
    abort: AbortFlag,
    done: Vec<Completion>,
}

/// A receiving end prepared before its stage reports ready: its queue pair and inbox exist,
/// so that their numbers can be published.
#[derive(Debug)]
struct Prepared {
    queue: Queue,
    inbox_buf: Buffer,
    inbox: Inbox,
}

impl Prepared {
    fn new(dev: &Arc<Device>, spec: RingSpec) -> Result<Self> {
        let slots = spec.slots.max(1);
        let slot = slot_bytes(spec);
        // One receive per slot: the sender never has more writes outstanding.
        let mut queue = Queue::create(dev, slots + 2, slots)?;
        for i in 0..slots {
            queue.post_recv(u64::from(i))?;
        }
        let inbox_buf = Buffer::register(dev, (u64::from(slots) * slot) as usize, true)?;
        let inbox = Inbox {
            qp: queue.info(),
            rkey: inbox_buf.rkey(),
            base: inbox_buf.addr(),
            slots,
            slot_bytes: slot,
        };
        Ok(Self {
            queue,
            inbox_buf,
            inbox,
        })
    }

    /// Connects to the sender `peer` and grants it the inbox's slots.
    fn connect(self, peer: &QpInfo, abort: &AbortFlag) -> Result<RdmaRecv> {
        let Self {
            mut queue,
            inbox_buf,
            inbox,
        } = self;
        queue.connect(peer)?;
        queue.post_send_imm(CREDIT_WR, 0)?;
        Ok(RdmaRecv {
            queue,
            inbox_buf,
            inbox,
            taken: 0,
            credits_out: 1,
            send_depth: inbox.slots + 2,
            arrived: std::collections::VecDeque::new(),
            abort: abort.clone(),
            done: Vec::new(),
        })
    }
}

impl RdmaRecv {
    fn absorb(&mut self, ends: &LinkEnds) -> Result<()> {
        for c in std::mem::take(&mut self.done) {
            match c.opcode {
                ibv_wc_opcode::IBV_WC_SEND => self.credits_out -= 1,
                ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => self.arrived.push_back(c),
                other => {
                    return Err(protocol(
                        ends,
                        format!("unexpected completion (opcode {other}) on the receiving end"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl LinkBackend for RdmaRecv {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }
}

impl RdmaRecv {
    /// Waits for the next piece's write and returns where its slot starts and its header.
    fn next_piece(&mut self, ends: &LinkEnds, start: Instant) -> Result<(usize, TransferHeader)> {
        self.queue.poll(ends, &mut self.done)?;
        self.absorb(ends)?;
        let c = loop {
            if let Some(c) = self.arrived.pop_front() {
                break c;
            }
            self.queue
                .wait(ends, "received", start, &self.abort, &mut self.done)?;
            self.absorb(ends)?;
        };
        if c.imm != Some(self.taken) {
            return Err(protocol(
                ends,
                format!(
                    "write numbered {:?} arrived where {} was due",
                    c.imm, self.taken
                ),
            ));
        }
        let slot = (u64::from(self.taken % self.inbox.slots) * self.inbox.slot_bytes) as usize;
        let mut raw = [0u8; HEADER_LEN];
        self.inbox_buf.read(slot, &mut raw);
        let h = TransferHeader::decode(&raw);
        let cap = self.inbox.slot_bytes - HEADER_LEN as u64;
        let piece = h.len.saturating_sub(u64::from(h.chunk) * cap).min(cap);
        if c.len as u64 != HEADER_LEN as u64 + piece {
            return Err(protocol(
                ends,
                format!(
                    "piece {} of transfer {} ({} bytes) should carry {piece} bytes, its write \
                     carried {}",
                    h.chunk,
                    h.seq,
                    h.len,
                    c.len.saturating_sub(HEADER_LEN)
                ),
            ));
        }
        self.queue.post_recv(c.wr_id)?;
        Ok((slot, h))
    }

    /// Returns the slot just read to the sender as a credit.
    fn release(&mut self, ends: &LinkEnds, start: Instant) -> Result<()> {
        self.taken = self.taken.wrapping_add(1);
        while self.credits_out >= self.send_depth {
            self.queue
                .wait(ends, "credit sent", start, &self.abort, &mut self.done)?;
            self.absorb(ends)?;
        }
        self.queue.post_send_imm(CREDIT_WR, self.taken)?;
        self.credits_out += 1;
        Ok(())
    }
}

impl RecvBackend for RdmaRecv {
    fn recv(
        &mut self,
        ends: &LinkEnds,
        dst: &mut RegionMut<'_>,
    ) -> Result<(TransferHeader, Delivery)> {
        let start = Instant::now();
        let cap = self.inbox.slot_bytes - HEADER_LEN as u64;
        let (slot, first) = self.next_piece(ends, start)?;
        check_place(ends, dst.arena, dst.bytes.len(), &first)?;
        check_piece(ends, &first, &first, 0)?;
        for chunk in 0..first.len.div_ceil(cap).max(1) {
            let slot = if chunk == 0 {
                slot
            } else {
                let (slot, h) = self.next_piece(ends, start)?;
                check_piece(ends, &h, &first, chunk)?;
                slot
            };
            let at = (first.dst_off + chunk * cap) as usize;
            let n = (first.len - chunk * cap).min(cap) as usize;
            self.inbox_buf
                .read(slot + HEADER_LEN, &mut dst.bytes[at..at + n]);
            self.release(ends, start)?;
        }
        Ok((first, Delivery::Staged))
    }
}

/// A node's stage with its device open, its inbox registered and a tcp listener for the
/// upstream stage's bootstrap link.
#[derive(Debug)]
pub struct RdmaSetup {
    dev: Arc<Device>,
    listener: TcpListener,
    inbound: Mutex<Option<Prepared>>,
    plan: NodeLinkPlan,
}

impl RdmaSetup {
    /// The device this stage's links use.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    /// Opens the device and prepares the inbound end of `plan`'s stage.
    pub fn open(plan: NodeLinkPlan) -> Result<Self> {
        let dev = Device::open()?;
        let spec = plan
            .ring_specs
            .get(plan.inbound.id.0 as usize)
            .copied()
            .ok_or_else(|| {
                TransportError::Config(format!("no ring shape for link {}", plan.inbound.name()))
            })?;
        let inbound = Prepared::new(&dev, spec)?;
        let listener = TcpListener::bind((plan.host.as_str(), 0)).map_err(|e| {
            TransportError::io(format!("listen for rdma link setup on {}", plan.host), e)
        })?;
        Ok(Self {
            dev,
            listener,
            inbound: Mutex::new(Some(inbound)),
            plan,
        })
    }

    fn accept(
        &self,
        observers: &Observers,
        abort: &AbortFlag,
        log: &(dyn Fn(&str) + Sync),
    ) -> Result<LinkReceiver> {
        let plan = &self.plan;
        let ends = plan.inbound;
        let prepared = self
            .inbound
            .lock()
            .ok()
            .and_then(|mut p| p.take())
            .ok_or_else(|| {
                TransportError::Config(format!("link {} is connected already", ends.name()))
            })?;
        let mut boot = TcpRecv::accept(
            &self.listener,
            &plan.key,
            plan.integrity,
            &ends,
            abort,
            &|e| log(&format!("refused an rdma link-setup caller: {e}")),
        )?;
        let mut buf = [0u8; BOOT_MAX];
        let mut region = RegionMut {
            arena: ArenaId(0),
            bytes: &mut buf,
        };
        let (h, _) = boot.recv(&ends, &mut region)?;
        let peer: QpInfo = serde_json::from_slice(&buf[..h.len as usize]).map_err(|e| {
            protocol(
                &ends,
                format!("the sender's queue pair is not readable: {e}"),
            )
        })?;
        let recv = prepared.connect(&peer, abort)?;
        Ok(LinkReceiver::new(ends, Box::new(recv), observers.clone()))
    }
}

impl LinkSetup for RdmaSetup {
    fn address(&self) -> Result<Option<String>> {
        let tcp = self
            .listener
            .local_addr()
            .map_err(|e| TransportError::io("read the rdma setup listener's address", e))?
            .to_string();
        let inbox = self
            .inbound
            .lock()
            .ok()
            .and_then(|p| p.as_ref().map(|p| p.inbox))
            .ok_or_else(|| {
                TransportError::Config("the inbound rdma link is connected already".into())
            })?;
        serde_json::to_string(&Address { tcp, inbox })
            .map(Some)
            .map_err(|e| TransportError::Config(format!("encode the rdma address: {e}")))
    }

    /// Accepts the inbound link and connects the outbound one side by side, so no order of
    /// stages can deadlock (as tcp does).
    fn connect(
        &self,
        next: Option<&str>,
        observers: &Observers,
        abort: &AbortFlag,
        log: &(dyn Fn(&str) + Sync),
    ) -> Result<StageLinks> {
        let next =
            next.ok_or_else(|| TransportError::Config("no address for the next stage".into()))?;
        let to: Address = serde_json::from_str(next).map_err(|e| {
            protocol(
                &self.plan.outbound,
                format!("the next stage's rdma address is not readable: {e}"),
            )
        })?;
        log(&format!("rdma links on {}", self.dev.describe()));
        StageLinks::accept_and_connect(
            "slug-rdma-accept",
            abort,
            || self.accept(observers, abort, log),
            || {
                RdmaSend::connect(&self.dev, &to, &self.plan, abort)
                    .map(|s| LinkSender::new(self.plan.outbound, Box::new(s), observers.clone()))
            },
        )
    }

    /// Nothing beyond the abort flag: every completion wait polls it.
    fn abort(&self) {}
}

/// Both ends of a link whose sender and receiver are in this process on `dev` (the ladder's
/// link row): the same queue pairs, inbox and credits as between two stages, connected
/// without the tcp bootstrap.
pub fn loopback(
    dev: &Arc<Device>,
    ends: LinkEnds,
    spec: RingSpec,
) -> Result<(LinkSender, LinkReceiver)> {
    let abort = AbortFlag::new();
    let prepared = Prepared::new(dev, spec)?;
    let send = RdmaSend::open(dev, prepared.inbox, ends, &abort)?;
    let recv = prepared.connect(&send.queue.info(), &abort)?;
    Ok((
        LinkSender::new(ends, Box::new(send), Observers::none()),
        LinkReceiver::new(ends, Box::new(recv), Observers::none()),
    ))
}
