//! The MPI link backend: a transfer is its header message, then its payload message(s), both
//! non-blocking point-to-point calls on `MPI_COMM_WORLD`, straight from and into the arenas.
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

/// MPI tag of link `link`'s headers; its payloads use the next tag.
pub fn header_tag(link: u32) -> i32 {
    2 * link as i32
}

/// MPI tag of link `link`'s payloads.
pub fn payload_tag(link: u32) -> i32 {
    header_tag(link) + 1
}

/// The sending end of a link: to rank `dest` on `MPI_COMM_WORLD`.
#[derive(Debug)]
pub struct MpiSend {
    dest: i32,
    link: u32,
}

/// The receiving end of a link: from rank `source` on `MPI_COMM_WORLD`.
#[derive(Debug)]
pub struct MpiRecv {
    source: i32,
    link: u32,
}

impl MpiSend {
    /// Sends link `link`'s transfers to rank `dest`.
    pub fn new(dest: usize, link: u32) -> Self {
        Self {
            dest: dest as i32,
            link,
        }
    }
}

impl MpiRecv {
    /// Receives link `link`'s transfers from rank `source`.
    pub fn new(source: usize, link: u32) -> Self {
        Self {
            source: source as i32,
            link,
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

/// A posted non-blocking call.
struct Request(ffi::MPI_Request);

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
        Self(req)
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
        Self(req)
    }

    fn test(&mut self) -> bool {
        let mut flag: c_int = 0;
        // SAFETY: a request MPI gave us, not yet completed (MPI_Test sets it to null when done).
        unsafe { ffi::MPI_Test(&mut self.0, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
        flag != 0
    }

    /// Waits until the call completes or `timeout` passes (see [`poll`]).
    fn wait(&mut self, timeout: Duration) -> std::result::Result<(), Waited> {
        poll(timeout, || self.test())
    }

    /// Waits for the call; past `timeout` cancels it and returns the error. A call that cannot
    /// be cancelled either still owns our buffer, so the job is aborted (after saying why)
    /// rather than let MPI write into memory we give back.
    fn finish(self, ends: &LinkEnds, what: &'static str) -> Result<()> {
        self.finish_named(&ends.name(), ends.timeout, what)
    }

    /// [`Request::finish`] for a call named `link` in errors.
    fn finish_named(mut self, link: &str, timeout: Duration, what: &'static str) -> Result<()> {
        let waited = match self.wait(timeout) {
            Ok(()) => return Ok(()),
            Err(Waited::Out(waited)) => waited,
            Err(Waited::Ending) => {
                // mpirun kills this process within about a second: no time to cancel, and
                // nothing outlives the process, so the pending call is left to it.
                let detail = format!(
                    "mpirun is ending the job (SIGTERM) while this rank waited until {what}: \
                     another rank failed or died (mpirun names it below)"
                );
                return Err(TransportError::LinkBroken {
                    link: link.to_string(),
                    detail,
                });
            }
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
        let header = header.encode();
        let head = Request::isend(&header, self.dest, header_tag(self.link));
        let mut pieces = payload.chunks(PIECE);
        // The header and the (first) payload message are in flight together. An empty
        // payload is still one (empty) message: the receiver posts one.
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
        let mut raw = [0u8; TransferHeader::LEN];
        Request::irecv(&mut raw, self.source, header_tag(self.link))
            .finish(ends, "received (MPI header)")?;
        let header = TransferHeader::decode(&raw);
        // The payload is received straight into its place, so check the place first.
        check_place(ends, dst.arena, dst.bytes.len(), &header)?;
        let range = check_range(dst.arena, dst.bytes.len(), header.dst_off, header.len)?;
        let out = &mut dst.bytes[range];
        if out.is_empty() {
            Request::irecv(out, self.source, payload_tag(self.link))
                .finish(ends, "received (MPI payload)")?;
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
    Request(req).finish_named("(every rank)", timeout, "reached the start barrier")
}

/// Sends `buf` to rank `dest` with `tag` and waits, like [`barrier`] (small control messages).
pub fn send_to(buf: &[u8], dest: usize, tag: i32, timeout: Duration) -> Result<()> {
    Request::isend(buf, dest as i32, tag).finish_named(
        &format!("(control, to rank {dest})"),
        timeout,
        "sent",
    )
}

/// Receives exactly `buf.len()` bytes from rank `source` with `tag`, like [`send_to`].
pub fn recv_from(buf: &mut [u8], source: usize, tag: i32, timeout: Duration) -> Result<()> {
    Request::irecv(buf, source as i32, tag).finish_named(
        &format!("(control, from rank {source})"),
        timeout,
        "received",
    )
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
                    "mpirun is ending the job (SIGTERM) while rank 0 awaited {awaited}: another \
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
    Request::irecv(&mut buf, source as i32, tag).finish_named(
        &format!("(control, from {peer})"),
        timeout,
        "received",
    )?;
    Ok(buf)
}
