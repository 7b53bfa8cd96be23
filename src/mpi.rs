//! `--transport mpi`: the process model under `mpirun`/`srun` (rank r runs stage r, rank 0
//! reports). Built only with the `mpi` cargo feature; without it every MPI path says how to
//! get it.

use anyhow::Result;
use slug_transport::pipeline::{ObserverFactory, PipelineConfig, RunReport};

/// What to do when this binary was built without MPI.
#[cfg(not(feature = "mpi"))]
pub const NOT_BUILT: &str = "this slug was built without MPI: install an MPI library and \
     libclang (Debian: `apt-get install openmpi-bin libopenmpi-dev libclang-dev`), build with \
     `cargo build --release --features mpi`, then start one rank per stage: \
     `mpirun -np S target/release/slug run --transport mpi --stages S`";

/// Runs this rank's stage of `cfg` with `factory`'s observers. Rank 0 returns the run's
/// report; other ranks return `None`. A failure is printed here, naming the rank, its host and
/// the step, and ends the whole MPI job (`MPI_Abort`), since the other ranks wait on this one.
#[cfg(feature = "mpi")]
pub fn run_pipeline(
    cfg: &PipelineConfig,
    factory: &dyn ObserverFactory,
) -> Result<Option<RunReport>> {
    let world = slug_mpi::MpiWorld::init()?;
    if let Err(e) = slug_mpi::rank::check_world(&world, cfg) {
        // Every rank finds the same mistake: rank 0 says it, all end without MPI_Abort.
        return if world.rank() == 0 {
            Err(e.into())
        } else {
            Ok(None)
        };
    }
    match slug_mpi::rank::run_rank(&world, cfg, factory) {
        Ok(report) => Ok(report),
        Err(e) => abort(&world, &e),
    }
}

/// Prints `err` as this rank's failure and ends every rank of the job.
#[cfg(feature = "mpi")]
pub fn abort(world: &slug_mpi::MpiWorld, err: &dyn std::fmt::Display) -> ! {
    eprintln!(
        "slug: error: rank {} of {} on {}: {err}; ending the MPI job",
        world.rank(),
        world.size(),
        world.host()
    );
    world.abort(1)
}

/// Without the `mpi` feature: says how to build slug with MPI.
#[cfg(not(feature = "mpi"))]
pub fn run_pipeline(
    _cfg: &PipelineConfig,
    _factory: &dyn ObserverFactory,
) -> Result<Option<RunReport>> {
    anyhow::bail!("--transport mpi: {NOT_BUILT}")
}
