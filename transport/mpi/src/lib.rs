//! The MPI link backend of slug (feature `mpi`, rsmpi over the system's MPI library): under
//! `mpirun -np S` (or `srun`), rank r runs pipeline stage r in its own process and rank 0
//! assembles the run's report.
//!
//! - [`MpiWorld`] initialises MPI once per process and knows this rank, the world's size and
//!   the host (`MPI_Get_processor_name`).
//! - [`link`]: the link backend. Each transfer is two non-blocking point-to-point messages on
//!   `MPI_COMM_WORLD`: its 64-byte header (tag `2 * link`), then its payload straight from the
//!   sender's arena into the receiver's arena at the header's offset (tag `2 * link + 1`); no
//!   staging copy on either side. The [`slug_transport::link::LinkSender`] around it numbers,
//!   checks and observes every transfer (transport `mpi`), as for every other backend. Waits
//!   poll `MPI_Test` against the run's `--timeout-ms`, so a silent peer is an error, not a hang.
//! - [`rank::run_rank`]: one rank's part of a run: connect the links, measure the clock offset
//!   to rank 0 over MPI, run the stage, send the stage's report to rank 0.
//! - [`gather`]: rank 0 collects every rank's recorded files into the trace directory.
//! - [`pingpong`]: raw MPI ping-pong and ping-pong through slug's link, for `slug ladder` and
//!   the benchmark.
//!
//! Without the `mpi` feature this crate is empty, so the default build needs no MPI library.

#[cfg(feature = "mpi")]
pub mod gather;
#[cfg(feature = "mpi")]
pub mod link;
#[cfg(feature = "mpi")]
pub mod pingpong;
#[cfg(feature = "mpi")]
pub mod rank;
#[cfg(feature = "mpi")]
mod world;

#[cfg(feature = "mpi")]
pub use world::MpiWorld;
