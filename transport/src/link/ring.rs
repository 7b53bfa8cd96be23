//! The fabric-ring backend of `local` and `shm` links: one single-producer single-consumer slot
//! ring per link in a [`Fabric`], on the heap (`local`, stages are threads) or in a
//! memory-mapped file (`shm`, stages are processes).
//!
//! A receiver that is already waiting posts its arena in the ring header and the sender copies
//! straight into it (one copy: `memcpy` between threads, `process_vm_writev` between processes).
//! A sender that finds no post waits for one about as long as staging the transfer would take
//! (a rendezvous, as MPI does for large messages), then, or where the kernel refuses
//! cross-process copies, the bytes queue in slots (two copies) in pieces of at most one slot.

use std::sync::Arc;
use std::time::Duration;

use super::{
    Delivery, LinkBackend, LinkEnds, LinkReceiver, LinkSender, RecvBackend, RegionMut, SendBackend,
    StageLinks, check_piece, check_place, check_range,
};
use crate::error::{Result, TransportError};
use crate::fabric::{Fabric, WaitFailure};
use crate::transfer::{Observers, TransferHeader, TransportKind};

/// The sending end of one fabric ring.
#[derive(Debug)]
pub struct RingSend {
    fabric: Arc<Fabric>,
    ring: usize,
    kind: TransportKind,
    /// Whether to try direct placement into a waiting receiver's arena (turned off for good
    /// where the kernel refuses cross-process copies).
    direct: bool,
    /// Longest wait for a receiver to post before staging ([`RingSend::wait_for_receiver`]);
    /// `None`: about the time staging the transfer would take ([`rendezvous_budget`]).
    wait: Option<Duration>,
}

/// The receiving end of one fabric ring.
#[derive(Debug)]
pub struct RingRecv {
    fabric: Arc<Fabric>,
    ring: usize,
    kind: TransportKind,
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

impl RingSend {
    /// The sending end of ring `ring` of `fabric`; `kind` is `Local` for a heap fabric, `Shm`
    /// for a mapped one.
    pub fn new(fabric: Arc<Fabric>, ring: usize, kind: TransportKind) -> Result<Self> {
        check_ring(&fabric, ring)?;
        Ok(Self {
            fabric,
            ring,
            kind,
            direct: true,
            wait: None,
        })
    }

    /// Waits up to `up_to` (never past the link's timeout) for the receiver to post its arena
    /// before staging a transfer, instead of about the time staging it would take.
    pub fn wait_for_receiver(mut self, up_to: Duration) -> Self {
        self.wait = Some(up_to);
        self
    }
}

impl RingRecv {
    /// The receiving end of ring `ring` of `fabric`.
    pub fn new(fabric: Arc<Fabric>, ring: usize, kind: TransportKind) -> Result<Self> {
        check_ring(&fabric, ring)?;
        Ok(Self { fabric, ring, kind })
    }
}

impl LinkBackend for RingSend {
    fn kind(&self) -> TransportKind {
        self.kind
    }
}

impl SendBackend for RingSend {
    fn send(
        &mut self,
        ends: &LinkEnds,
        header: &TransferHeader,
        payload: &[u8],
    ) -> Result<Delivery> {
        let ring = self.fabric.ring(self.ring);
        let cap = ring.capacity();
        let len = header.len;
        // A receiver already waiting, or one that comes within the time staging would take,
        // gets the bytes straight into its arena (one copy); otherwise they queue in slots, in
        // pieces of at most one slot (a copy in, and one out on the receiving side).
        if self.direct {
            let budget = self.wait.unwrap_or_else(|| rendezvous_budget(len));
            ring.await_post(budget.min(ends.timeout));
        }
        if ring.try_direct(header, payload, &mut self.direct) {
            return Ok(Delivery::Direct);
        }
        for chunk in 0..len.div_ceil(cap).max(1) {
            let (a, b) = (
                (chunk * cap) as usize,
                ((chunk + 1) * cap).min(len) as usize,
            );
            ring.send(ends.timeout, |slot| {
                slot[..b - a].copy_from_slice(&payload[a..b]);
                TransferHeader {
                    chunk: chunk as u32,
                    ..*header
                }
            })
            .map_err(|f| wait_error(ends, f, "a free slot"))?;
        }
        Ok(Delivery::Staged)
    }

    /// Nothing to wait for: a send returns once its last piece is in the ring, where the
    /// receiver takes it.
    fn flush(&mut self, _ends: &LinkEnds) -> Result<()> {
        Ok(())
    }
}

impl LinkBackend for RingRecv {
    fn kind(&self) -> TransportKind {
        self.kind
    }
}

impl RecvBackend for RingRecv {
    fn recv(
        &mut self,
        ends: &LinkEnds,
        dst: &mut RegionMut<'_>,
    ) -> Result<(TransferHeader, Delivery)> {
        let arena = dst.arena;
        let bytes = &mut *dst.bytes;
        let ring = self.fabric.ring(self.ring);
        let cap = ring.capacity();
        let posted = ring
            .post_and_wait(ends.timeout, arena.0, bytes)
            .map_err(|f| wait_error(ends, f, "received"))?;
        if let Some(h) = posted {
            // The sender checked the range against the post; check the header too.
            check_place(ends, arena, bytes.len(), &h)?;
            return Ok((h, Delivery::Direct));
        }
        let first = ring
            .recv(ends.timeout, |h, piece| -> Result<TransferHeader> {
                check_place(ends, arena, bytes.len(), h)?;
                let r = check_range(arena, bytes.len(), h.dst_off, h.len)?;
                check_piece(ends, h, h, 0)?;
                bytes[r.start..r.start + piece.len()].copy_from_slice(piece);
                Ok(*h)
            })
            .map_err(|f| wait_error(ends, f, "received"))??;
        for chunk in 1..first.len.div_ceil(cap).max(1) {
            ring.recv(ends.timeout, |h, piece| -> Result<()> {
                check_piece(ends, h, &first, chunk)?;
                let at = (first.dst_off + chunk * cap) as usize;
                bytes[at..at + piece.len()].copy_from_slice(piece);
                Ok(())
            })
            .map_err(|f| wait_error(ends, f, "received"))??;
        }
        Ok((first, Delivery::Staged))
    }
}

/// Copy bandwidth assumed when weighing a wait for the receiver against staging: 8 GiB/s,
/// below what a memcpy of a large transfer reaches here, so the budget is generous.
const STAGING_BYTES_PER_US: u64 = 8 << 10;

/// How long a sender waits for the receiver to post before it stages `len` bytes: about the
/// time staging them would take (`len` at [`STAGING_BYTES_PER_US`]). Waiting no longer than the
/// alternative costs bounds the loss when no receiver comes to twice the best choice, and a
/// receiver that does come saves the sender's copy into slots and its own copy out of them.
fn rendezvous_budget(len: u64) -> Duration {
    Duration::from_nanos(len.saturating_mul(1000) / STAGING_BYTES_PER_US)
}

/// A stage's two ends of the rings of `fabric`: the ring of link `inbound.id` to receive, the
/// ring of link `outbound.id` to send.
pub fn stage_links(
    fabric: &Arc<Fabric>,
    inbound: LinkEnds,
    outbound: LinkEnds,
    kind: TransportKind,
    observers: &Observers,
) -> Result<StageLinks> {
    let recv = RingRecv::new(fabric.clone(), inbound.id.0 as usize, kind)?;
    let send = RingSend::new(fabric.clone(), outbound.id.0 as usize, kind)?;
    Ok(StageLinks {
        inbound: Some(LinkReceiver::new(
            inbound,
            Box::new(recv),
            observers.clone(),
        )),
        outbound: Some(LinkSender::new(outbound, Box::new(send), observers.clone())),
    })
}
