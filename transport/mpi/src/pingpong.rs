//! Ping-pong between ranks 0 and 1: raw MPI (`MPI_Send`/`MPI_Recv` of the bytes) and the same
//! bytes through slug's link over MPI (header, payload by offset, sequence check), so `slug
//! ladder` and the benchmark compare the two in the same job. Other ranks take no part.

use std::time::{Duration, Instant};

use mpi::point_to_point::{Destination, Source};
use mpi::topology::Communicator;
use slug_transport::Result;
use slug_transport::link::{LinkEnds, LinkReceiver, LinkSender, Region, RegionMut};
use slug_transport::transfer::{ArenaId, EndpointId, LinkId, Observers, Tag};

use crate::MpiWorld;
use crate::link::{MpiRecv, MpiSend};

/// Tag of the raw ping-pong's messages (the link's use their link tags).
const TAG_RAW: i32 = 30_010;

/// One measured ping-pong: `iters` round trips of `bytes` each way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PingPong {
    /// Bytes per message.
    pub bytes: usize,
    /// Round trips timed (after warm-up).
    pub iters: u32,
    /// Wall time of the timed round trips.
    pub seconds: f64,
}

impl PingPong {
    /// Bytes moved per second, both directions counted.
    pub fn bytes_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            2.0 * self.bytes as f64 * f64::from(self.iters) / self.seconds
        } else {
            0.0
        }
    }

    /// Half a round trip, in microseconds.
    pub fn one_way_us(&self) -> f64 {
        self.seconds * 1e6 / (2.0 * f64::from(self.iters.max(1)))
    }
}

/// Round trips before timing starts.
const WARM_UP: u32 = 8;

/// Raw MPI ping-pong of `bytes` between ranks 0 and 1, `iters` times; rank 0 gets the result.
pub fn raw(mpi: &MpiWorld, bytes: usize, iters: u32) -> Option<PingPong> {
    let world = mpi.world();
    let rank = mpi.rank();
    if rank > 1 || mpi.size() < 2 {
        return None;
    }
    let mut buf = vec![(rank as u8).wrapping_add(1); bytes];
    let peer = world.process_at_rank(1 - rank as i32);
    let round = |buf: &mut Vec<u8>| {
        if rank == 0 {
            peer.send_with_tag(&buf[..], TAG_RAW);
            peer.receive_into_with_tag(&mut buf[..], TAG_RAW);
        } else {
            peer.receive_into_with_tag(&mut buf[..], TAG_RAW);
            peer.send_with_tag(&buf[..], TAG_RAW);
        }
    };
    for _ in 0..WARM_UP {
        round(&mut buf);
    }
    let start = Instant::now();
    for _ in 0..iters {
        round(&mut buf);
    }
    let seconds = start.elapsed().as_secs_f64();
    (rank == 0).then_some(PingPong {
        bytes,
        iters,
        seconds,
    })
}

/// The same ping-pong through slug's links over MPI (link 0: rank 0 to 1, link 1: back), from
/// and into an arena by offset, with `observers` on both ends; rank 0 gets the result.
pub fn link(
    mpi: &MpiWorld,
    bytes: usize,
    iters: u32,
    timeout: Duration,
    observers: &Observers,
) -> Result<Option<PingPong>> {
    let rank = mpi.rank();
    if rank > 1 || mpi.size() < 2 {
        return Ok(None);
    }
    let ends = |link: u32| LinkEnds {
        id: LinkId(link),
        src: EndpointId(link),
        dst: EndpointId(1 - link),
        timeout,
    };
    let (out_link, in_link) = (rank as u32, 1 - rank as u32);
    let mut tx = LinkSender::new(
        ends(out_link),
        Box::new(MpiSend::new(1 - rank, out_link)),
        observers.clone(),
    );
    let mut rx = LinkReceiver::new(
        ends(in_link),
        Box::new(MpiRecv::new(1 - rank, in_link)),
        observers.clone(),
    );
    // One arena: the outgoing bytes in its first half, the incoming in its second.
    let mut arena = vec![(rank as u8).wrapping_add(1); 2 * bytes];
    let arena_id = ArenaId(0);
    let tag = Tag {
        sequence: 0,
        step: 0,
        layer: 0,
    };
    let send = |arena: &[u8], tx: &mut LinkSender| {
        tx.send(
            Region {
                arena: arena_id,
                bytes: arena,
            },
            0,
            bytes as u64,
            arena_id,
            bytes as u64,
            tag,
        )
        .map(|_| ())
    };
    let recv = |arena: &mut [u8], rx: &mut LinkReceiver| {
        rx.recv(&mut RegionMut {
            arena: arena_id,
            bytes: arena,
        })
        .map(|_| ())
    };
    let mut round = |arena: &mut Vec<u8>| -> Result<()> {
        if rank == 0 {
            send(arena, &mut tx)?;
            recv(arena, &mut rx)
        } else {
            recv(arena, &mut rx)?;
            send(arena, &mut tx)
        }
    };
    for _ in 0..WARM_UP {
        round(&mut arena)?;
    }
    let start = Instant::now();
    for _ in 0..iters {
        round(&mut arena)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok((rank == 0).then_some(PingPong {
        bytes,
        iters,
        seconds,
    }))
}
