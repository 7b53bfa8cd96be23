//! The MPI link backend: a transfer is one or two non-blocking point-to-point messages on
//! `MPI_COMM_WORLD`. A small transfer (at most [`INLINE`] bytes) is one message: its header
//! and its bytes together, so the receiver needs no second message to learn where the bytes
//! go (at the cost of one copy of at most [`INLINE`] bytes on each side). A larger
//! one is its header message, then its payload message(s) straight from the sender's arena
//! into the receiver's at the offset the header named.
//!
//! MPI keeps messages between two ranks with the same tag in order, so the k-th header and
//! the k-th payload on a link always belong together. Calls go through `mpi::ffi` rather than
//! rsmpi's scoped requests because a request that runs past the run's timeout must be
//! cancelled and released by us (rsmpi's scope panics on an unfinished request).

use std::os::raw::{c_int, c_void};
use std::time::{Duration, Instant};

use mpi::ffi;
use slug_transport::link::{
    Delivery, LinkBackend, LinkEnds, RecvBackend, RegionMut, SendBackend, check_place, check_range,
};
use slug_transport::transfer::{TransferHeader, TransportKind};
use slug_transport::{Result, TransportError};

/// MPI counts are `int`: larger payloads travel as consecutive messages of at most this size.
const PIECE: usize = 1 << 30;

pub use slug_transport::mpi_wire::{INLINE, header_tag, payload_tag};

/// The sending end of a link: to rank `dest` on `MPI_COMM_WORLD`.
#[derive(Debug)]
pub struct MpiSend {
    dest: i32,
    link: u32,
    /// Header and bytes of an inline transfer, as they travel.
    outbox: Vec<u8>,
}

/// The receiving end of a link: from rank `source` on `MPI_COMM_WORLD`.
#[derive(Debug)]
pub struct MpiRecv {
    source: i32,
    link: u32,
    /// Where a header message lands: the header, then an inline transfer's bytes.
    inbox: Vec<u8>,
}

impl MpiSend {
    /// Sends link `link`'s transfers to rank `dest`.
    pub fn new(dest: usize, link: u32) -> Self {
        Self {
            dest: dest as i32,
            link,
            outbox: Vec::with_capacity(TransferHeader::LEN + INLINE),
        }
    }
}

impl MpiRecv {
    /// Receives link `link`'s transfers from rank `source`.
    pub fn new(source: usize, link: u32) -> Self {
        Self {
            source: source as i32,
            link,
            inbox: vec![0; TransferHeader::LEN + INLINE],
        }
    }
}

/// Why a wait ended without the call completing.
enum Waited {
    /// The run's timeout passed.
    Out(Duration),
    /// mpirun is ending the job.
    Ending,
}

/// Polls `done` until it says yes or `timeout` passes: spins first (a neighbour's message is
/// usually microseconds away), then yields, then sleeps in short slices; stops at once when
/// mpirun ends the job.
fn poll(timeout: Duration, mut done: impl FnMut() -> bool) -> std::result::Result<(), Waited> {
    let start = Instant::now();
    let mut polls = 0u32;
    loop {
        if done() {
            return Ok(());
        }
        if crate::world::ending() {
            return Err(Waited::Ending);
        }
        polls = polls.saturating_add(1);
        if polls < 4096 {
            std::hint::spin_loop();
            continue;
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(Waited::Out(waited));
        }
        if polls < 8192 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

/// A posted non-blocking call, and its status once it completed.
struct Request(ffi::MPI_Request, ffi::MPI_Status);

impl Request {
    fn isend(buf: &[u8], dest: i32, tag: i32) -> Self {
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: `buf` outlives the request: every caller waits for it (or cancels it and
        // waits, or aborts the job) before returning; the count fits an int (pieces <= 1 GiB).
        unsafe {
            ffi::MPI_Isend(
                buf.as_ptr().cast::<c_void>(),
                buf.len() as c_int,
                ffi::RSMPI_UINT8_T,
                dest,
                tag,
                ffi::RSMPI_COMM_WORLD,
                &mut req,
            );
        }
        Self::posted(req)
    }

    /// A request MPI gave us, with an empty status.
    fn posted(req: ffi::MPI_Request) -> Self {
        // SAFETY: MPI_Status is plain data; MPI fills it when the call completes.
        Self(req, unsafe { std::mem::zeroed() })
    }

    fn irecv(buf: &mut [u8], source: i32, tag: i32) -> Self {
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: as for `isend`; MPI writes at most `buf.len()` bytes (a longer message is an
        // MPI_ERR_TRUNCATE error, which aborts the job under MPI's default error handler).
        unsafe {
            ffi::MPI_Irecv(
                buf.as_mut_ptr().cast::<c_void>(),
                buf.len() as c_int,
                ffi::RSMPI_UINT8_T,
                source,
                tag,
                ffi::RSMPI_COMM_WORLD,
                &mut req,
            );
        }
        Self::posted(req)
    }

    fn test(&mut self) -> bool {
        let mut flag: c_int = 0;
        // SAFETY: a request MPI gave us, not yet completed (MPI_Test sets it to null when done)
        // and our own status.
        unsafe { ffi::MPI_Test(&mut self.0, &mut flag, &mut self.1) };
        flag != 0
    }

    /// Bytes a completed receive got.
    fn received(&self) -> usize {
        let mut count: c_int = 0;
        // SAFETY: the status MPI_Test filled in for a byte message.
        unsafe { ffi::MPI_Get_count(&self.1, ffi::RSMPI_UINT8_T, &mut count) };
        usize::try_from(count).unwrap_or(usize::MAX)
    }

    /// Waits until the call completes or `timeout` passes (see [`poll`]).
    fn wait(&mut self, timeout: Duration) -> std::result::Result<(), Waited> {
        poll(timeout, || self.test())
    }

    /// Waits for the call; past `timeout` cancels it and returns the error. A call that cannot
    /// be cancelled either still owns our buffer, so the job is aborted (after saying why)
    /// rather than let MPI write into memory we give back.
    fn finish(self, ends: &LinkEnds, what: &'static str) -> Result<Self> {
        self.finish_named(&ends.name(), ends.timeout, what)
    }

    /// [`Request::finish`] for a call named `link` in errors.
    fn finish_named(mut self, link: &str, timeout: Duration, what: &'static str) -> Result<Self> {
        let Some(waited) = self.wait_named(link, timeout, what)? else {
            return Ok(self);
        };
        // SAFETY: a pending request of ours.
        unsafe { ffi::MPI_Cancel(&mut self.0) };
        if self.wait(Duration::from_secs(1)).is_err() {
            eprintln!(
                "slug: link {}: nothing {what} within {} ms, and the MPI call could not be cancelled; \
                 aborting the MPI job",
                link,
                waited.as_millis()
            );
            // SAFETY: plain MPI_Abort on the world communicator.
            unsafe { ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, 1) };
        }
        Err(TransportError::Timeout {
            link: link.to_string(),
            what,
            waited_ms: waited.as_millis() as u64,
        })
    }

    /// Waits for the call: `None` once it completed, how long it waited past `timeout`, or
    /// the error when mpirun is ending the job.
    fn wait_named(
        &mut self,
        link: &str,
        timeout: Duration,
        what: &'static str,
    ) -> Result<Option<Duration>> {
        match self.wait(timeout) {
            Ok(()) => Ok(None),
            Err(Waited::Out(waited)) => Ok(Some(waited)),
            // mpirun kills this process within about a second: no time to cancel, and
            // nothing outlives the process, so the pending call is left to it.
            Err(Waited::Ending) => Err(TransportError::LinkBroken {
                link: link.to_string(),
                detail: format!(
                    "mpirun is ending the job (SIGTERM) while this rank waited until {what}: \
                     another rank failed or died (mpirun names it below)"
                ),
            }),
        }
    }
}

impl LinkBackend for MpiSend {
    fn kind(&self) -> TransportKind {
        TransportKind::Mpi
    }
}

impl SendBackend for MpiSend {
    fn send(
        &mut self,
        ends: &LinkEnds,
        header: &TransferHeader,
        payload: &[u8],
    ) -> Result<Delivery> {
        let encoded = header.encode();
        if payload.len() <= INLINE {
            self.outbox.clear();
            self.outbox.extend_from_slice(&encoded);
            self.outbox.extend_from_slice(payload);
            Request::isend(&self.outbox, self.dest, header_tag(self.link))
                .finish(ends, "sent (MPI header with the transfer's bytes)")?;
            return Ok(Delivery::Staged);
        }
        let head = Request::isend(&encoded, self.dest, header_tag(self.link));
        let mut pieces = payload.chunks(PIECE);
        // The header and the first payload message are in flight together.
        let first = pieces.next().unwrap_or(&[]);
        let sent = Request::isend(first, self.dest, payload_tag(self.link))
            .finish(ends, "sent (MPI payload)");
        let head = head.finish(ends, "sent (MPI header)");
        sent?;
        head?;
        for piece in pieces {
            Request::isend(piece, self.dest, payload_tag(self.link))
                .finish(ends, "sent (MPI payload)")?;
        }
        // From the sender's arena into the receiver's, through no buffer of ours.
        Ok(Delivery::Direct)
    }

    fn flush(&mut self, _ends: &LinkEnds) -> Result<()> {
        // `send` returns only once its calls completed.
        Ok(())
    }
}

impl LinkBackend for MpiRecv {
    fn kind(&self) -> TransportKind {
        TransportKind::Mpi
    }
}

impl RecvBackend for MpiRecv {
    fn recv(
        &mut self,
        ends: &LinkEnds,
        dst: &mut RegionMut<'_>,
    ) -> Result<(TransferHeader, Delivery)> {
        let got = Request::irecv(&mut self.inbox, self.source, header_tag(self.link))
            .finish(ends, "received (MPI header)")?
            .received();
        let mut raw = [0u8; TransferHeader::LEN];
        raw.copy_from_slice(&self.inbox[..TransferHeader::LEN]);
        let header = TransferHeader::decode(&raw);
        // The bytes are written straight into their place, so check the place first.
        check_place(ends, dst.arena, dst.bytes.len(), &header)?;
        let range = check_range(dst.arena, dst.bytes.len(), header.dst_off, header.len)?;
        let out = &mut dst.bytes[range];
        let inline = out.len() <= INLINE;
        let due = TransferHeader::LEN + if inline { out.len() } else { 0 };
        if got != due {
            return Err(TransportError::Protocol {
                peer: ends.name(),
                detail: format!(
                    "transfer {} of {} bytes came in a header message of {got} bytes, where \
                     {due} were due",
                    header.seq, header.len
                ),
            });
        }
        if inline {
            out.copy_from_slice(&self.inbox[TransferHeader::LEN..due]);
            return Ok((header, Delivery::Staged));
        }
        for piece in out.chunks_mut(PIECE) {
            Request::irecv(piece, self.source, payload_tag(self.link))
                .finish(ends, "received (MPI payload)")?;
        }
        Ok((header, Delivery::Direct))
    }
}

/// Waits for every rank, like `MPI_Barrier`, but fails after `timeout` or as soon as mpirun
/// ends the job (a rank that died while the others were starting).
pub fn barrier(timeout: Duration) -> Result<()> {
    let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
    // SAFETY: a barrier on the world communicator; no buffer.
    unsafe { ffi::MPI_Ibarrier(ffi::RSMPI_COMM_WORLD, &mut req) };
    let link = "(every rank)";
    let what = "reached the start barrier";
    match Request::posted(req).wait_named(link, timeout, what)? {
        None => Ok(()),
        // A collective call cannot be cancelled, and this one holds no buffer of ours: it is
        // left pending for the job's end, which the caller brings about on this error.
        Some(waited) => Err(TransportError::Timeout {
            link: link.into(),
            what,
            waited_ms: waited.as_millis() as u64,
        }),
    }
}

/// Sends `buf` to rank `dest` with `tag` and waits, like [`barrier`] (small control messages).
/// A send `dest` does not take within `timeout` is [`TransportError::Silent`] naming `peer`
/// (`rank R on HOST`) and `what` was sent.
pub fn send_to(
    buf: &[u8],
    dest: usize,
    tag: i32,
    timeout: Duration,
    peer: &str,
    what: &str,
) -> Result<()> {
    let sent = Request::isend(buf, dest as i32, tag).finish_named(
        &format!("(control, to {peer})"),
        timeout,
        "sent",
    );
    silent(sent, peer, || format!("its receipt of {what}"))
}

/// Receives exactly `buf.len()` bytes from rank `source` with `tag`, like [`send_to`]; a
/// silent `peer` is [`TransportError::Silent`] naming `awaited`.
pub fn recv_from(
    buf: &mut [u8],
    source: usize,
    tag: i32,
    timeout: Duration,
    peer: &str,
    awaited: &str,
) -> Result<()> {
    let got = Request::irecv(buf, source as i32, tag).finish_named(
        &format!("(control, from {peer})"),
        timeout,
        "received",
    );
    silent(got, peer, || awaited.to_string())
}

/// A control call's timeout as the silence of `peer` while `awaited` was awaited.
fn silent(done: Result<Request>, peer: &str, awaited: impl FnOnce() -> String) -> Result<()> {
    match done {
        Ok(_) => Ok(()),
        Err(TransportError::Timeout { waited_ms, .. }) => Err(TransportError::Silent {
            peer: peer.to_string(),
            awaited: awaited(),
            waited_ms,
        }),
        Err(e) => Err(e),
    }
}

/// Receives one whole message of at most `max` bytes from rank `source` with `tag` into a new
/// vector (its length is the message's). Probes with `MPI_Iprobe` until the message is there,
/// at most `timeout` (then [`TransportError::Silent`] naming `peer` and `awaited`) and no
/// longer than mpirun's SIGTERM, then receives it like [`recv_from`]. A larger message is a
/// protocol error (it is not received).
pub fn recv_vec_from(
    source: usize,
    tag: i32,
    max: usize,
    timeout: Duration,
    peer: &str,
    awaited: &str,
) -> Result<Vec<u8>> {
    // SAFETY: MPI_Status is plain data; MPI_Iprobe fills it when it finds the message.
    let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
    let probed = poll(timeout, || {
        let mut flag: c_int = 0;
        // SAFETY: a probe on the world communicator with our own flag and status.
        unsafe {
            ffi::MPI_Iprobe(
                source as c_int,
                tag,
                ffi::RSMPI_COMM_WORLD,
                &mut flag,
                &mut status,
            )
        };
        flag != 0
    });
    match probed {
        Ok(()) => {}
        Err(Waited::Out(waited)) => {
            return Err(TransportError::Silent {
                peer: peer.to_string(),
                awaited: awaited.to_string(),
                waited_ms: waited.as_millis() as u64,
            });
        }
        Err(Waited::Ending) => {
            return Err(TransportError::LinkBroken {
                link: format!("(control, from {peer})"),
                detail: format!(
                    "mpirun is ending the job (SIGTERM) while {awaited} was awaited: another \
                     rank failed or died (mpirun names it below)"
                ),
            });
        }
    }
    let mut count: c_int = 0;
    // SAFETY: the status MPI_Iprobe filled in for a byte message.
    unsafe { ffi::MPI_Get_count(&status, ffi::RSMPI_UINT8_T, &mut count) };
    let len = usize::try_from(count).unwrap_or(usize::MAX);
    if len > max {
        return Err(TransportError::Protocol {
            peer: peer.to_string(),
            detail: format!(
                "{awaited} arrives as a message of {count} bytes, more than the {max} accepted"
            ),
        });
    }
    let mut buf = vec![0u8; len];
    recv_from(&mut buf, source, tag, timeout, peer, awaited)?;
    Ok(buf)
}
