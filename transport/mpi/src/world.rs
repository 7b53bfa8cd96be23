//! MPI's process-wide state: initialised once, finalised when the [`MpiWorld`] is dropped.

use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use slug_transport::{Result, TransportError};

/// This process's place in `MPI_COMM_WORLD`. MPI calls are made from the thread that created
/// it only (MPI is initialised `Funneled`: the stage's pool threads never call MPI).
pub struct MpiWorld {
    _universe: Universe,
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    host: String,
}

impl std::fmt::Debug for MpiWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiWorld")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("host", &self.host)
            .finish()
    }
}

impl MpiWorld {
    /// Initialises MPI (`MPI_Init_thread`, funneled). Fails if MPI was initialised already.
    pub fn init() -> Result<Self> {
        let (universe, _threading) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| {
                TransportError::Config("MPI was already initialised in this process".into())
            })?;
        let world = universe.world();
        let rank = world.rank() as usize;
        let size = world.size() as usize;
        let host = mpi::environment::processor_name().unwrap_or_else(|_| "unknown-host".into());
        Ok(Self {
            _universe: universe,
            world,
            rank,
            size,
            host,
        })
    }

    /// This process's rank in `MPI_COMM_WORLD`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// This rank's host (`MPI_Get_processor_name`).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `MPI_COMM_WORLD`.
    pub fn world(&self) -> &SimpleCommunicator {
        &self.world
    }

    /// Ends every rank of the job (`MPI_Abort`): call it after printing why, so the message
    /// that names the failed rank comes before MPI's own.
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    /// Waits for every rank.
    pub fn barrier(&self) {
        self.world.barrier();
    }
}
