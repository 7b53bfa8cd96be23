//! MPI's process-wide state: initialised once, finalised when the [`MpiWorld`] is dropped.

use std::sync::atomic::{AtomicBool, Ordering};

use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use slug_transport::{Result, TransportError};

/// This process's place in `MPI_COMM_WORLD`. MPI calls are made from the thread that created
/// it only (MPI is initialised `Funneled`: the stage's pool threads never call MPI).
pub struct MpiWorld {
    universe: Option<Universe>,
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    host: String,
    /// Every rank's host, by rank, once [`crate::rank::share_hosts`] exchanged them.
    hosts: std::sync::OnceLock<Vec<String>>,
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

impl Drop for MpiWorld {
    fn drop(&mut self) {
        // MPI_Finalize.
        drop(self.universe.take());
        // Open MPI 4.x's mpirun can see a rank exit before it has processed the rank's
        // finalize and then fails the whole job ("exiting improperly", open-mpi/ompi#7833;
        // about 1 run in 12 here on 2 busy cores): give it a moment first.
        std::thread::sleep(std::time::Duration::from_millis(100));
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
        catch_sigterm();
        Ok(Self {
            universe: Some(universe),
            world,
            rank,
            size,
            host,
            hosts: std::sync::OnceLock::new(),
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

    /// Every rank's host by rank, once exchanged.
    pub(crate) fn hosts(&self) -> Option<&[String]> {
        self.hosts.get().map(Vec::as_slice)
    }

    pub(crate) fn set_hosts(&self, hosts: Vec<String>) {
        let _ = self.hosts.set(hosts);
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
}

/// Set when this process got SIGTERM: mpirun's way of ending the job when a rank died (it
/// sends SIGKILL about a second later). Waits on links see it and fail at once, so the
/// surviving ranks say where they were before MPI's own report.
static ENDING: AtomicBool = AtomicBool::new(false);

/// Whether mpirun (or anyone) asked this rank to end.
pub(crate) fn ending() -> bool {
    ENDING.load(Ordering::Relaxed)
}

extern "C" fn on_sigterm(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    ENDING.store(true, Ordering::Relaxed);
}

fn catch_sigterm() {
    // SAFETY: installs a handler that only stores to an atomic; sigaction is given a zeroed,
    // then filled struct.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigterm as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
    }
}
