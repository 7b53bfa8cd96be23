//! `--transport mpi`: the process model under `mpirun`/`srun` (rank r runs stage r, rank 0
//! reports). Built only with the `mpi` cargo feature; without it every MPI path says how to
//! get it.

use anyhow::Result;
use std::sync::Arc;

use slug_recorder::{RecordConfig, RecordSummary};
use slug_replayer::{RecordedRun, ReplayOptions, ReplayReport};
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

/// `slug record` under mpirun: every rank records its stage into a scratch directory of its
/// own (as a `slug node` on --hosts does) with the configuration rank 0 prepared and sent it;
/// rank 0 gathers the files into `cfg.out` over MPI and returns the summary.
#[cfg(feature = "mpi")]
pub fn record_pipeline(
    cfg: &RecordConfig,
    pipeline: &PipelineConfig,
) -> Result<Option<RecordSummary>> {
    use slug_mpi::rank::{check_world, run_rank_collecting, share_config};
    let world = slug_mpi::MpiWorld::init()?;
    if let Err(e) = check_world(&world, pipeline) {
        return if world.rank() == 0 {
            Err(e.into())
        } else {
            Ok(None)
        };
    }
    let factory = slug_recorder::observe::NodeRecorderFactory::default();
    if world.rank() != 0 {
        let shared = share_config(&world, None, pipeline.timeout())
            .and_then(|p| run_rank_collecting(&world, &p, &factory, None));
        return match shared {
            Ok(_) => Ok(None),
            Err(e) => abort(&world, &e),
        };
    }
    let mut run_stages = |p: &PipelineConfig| {
        share_config(&world, Some(p), p.timeout())?;
        run_rank_collecting(&world, p, &factory, Some(&cfg.out))?
            .ok_or_else(|| slug_transport::TransportError::Config("rank 0 got no report".into()))
    };
    match slug_recorder::record_with(cfg, pipeline, Some(&mut run_stages)) {
        Ok(summary) => Ok(Some(summary)),
        Err(e) => abort(&world, &e),
    }
}

/// Without the `mpi` feature: says how to build slug with MPI.
#[cfg(not(feature = "mpi"))]
pub fn record_pipeline(
    _cfg: &RecordConfig,
    _pipeline: &PipelineConfig,
) -> Result<Option<RecordSummary>> {
    anyhow::bail!("--transport mpi: {NOT_BUILT}")
}

/// `slug replay DIR --transport mpi` under mpirun: rank r restores stage r from its own copy
/// of the trace at DIR (the same path on every host) and reports the digests of what it
/// received; rank 0 checks them against the trace and returns the report.
#[cfg(feature = "mpi")]
pub fn replay_pipeline(
    rec: Arc<RecordedRun>,
    opts: &ReplayOptions,
) -> Result<Option<ReplayReport>> {
    use slug_mpi::rank::{check_world, run_rank, share_config};
    let world = slug_mpi::MpiWorld::init()?;
    let factory =
        slug_replayer::NodeReplayFactory(slug_recorder::observe::NodeRecorderFactory::default());
    if world.rank() != 0 {
        // The configuration comes from rank 0, which checks it first; until then this rank
        // waits as long as the replay would.
        let ms = opts.timeout_ms.unwrap_or(rec.config().timeout_ms);
        let timeout = std::time::Duration::from_millis(ms.max(1));
        let shared =
            share_config(&world, None, timeout).and_then(|p| run_rank(&world, &p, &factory));
        return match shared {
            Ok(_) => Ok(None),
            Err(e) => abort(&world, &e),
        };
    }
    let mut run_stages = |p: &PipelineConfig| {
        check_world(&world, p)?;
        share_config(&world, Some(p), p.timeout())?;
        run_rank(&world, p, &factory)?
            .ok_or_else(|| slug_transport::TransportError::Config("rank 0 got no report".into()))
    };
    match slug_replayer::replay_pipeline_with(rec, opts, Some(&mut run_stages)) {
        Ok(report) => Ok(Some(report)),
        Err(e) => abort(&world, &e),
    }
}

/// Without the `mpi` feature: says how to build slug with MPI.
#[cfg(not(feature = "mpi"))]
pub fn replay_pipeline(
    _rec: Arc<RecordedRun>,
    _opts: &ReplayOptions,
) -> Result<Option<ReplayReport>> {
    anyhow::bail!("--transport mpi: {NOT_BUILT}")
}

/// The `mpi` rung of `slug ladder` under mpirun: raw MPI send/recv and slug's MPI link
/// ping-pong between ranks 0 and 1 at each size, then (for [`crate::ladder::PipelineRow::Run`])
/// the pipeline with one rank per stage. Rank 0 returns the ladder; the other ranks `None`.
#[cfg(feature = "mpi")]
pub fn ladder_row(
    cfg: &PipelineConfig,
    sizes: &[usize],
    row: crate::ladder::PipelineRow,
) -> Result<Option<crate::ladder::Ladder>> {
    use crate::ladder::{PipelineRow, Rung, achieved_by, assemble, iterations};
    use slug_mpi::pingpong;
    use std::time::Duration;
    let world = slug_mpi::MpiWorld::init()?;
    let zero = world.rank() == 0;
    if world.size() < 2 {
        anyhow::bail!(
            "--transport mpi: the ladder's mpi rung needs at least 2 ranks; run it under \
             `mpirun -np {} slug ladder --transport mpi --stages {}`",
            cfg.stages.max(2),
            cfg.stages.max(2)
        );
    }
    let run_too = matches!(row, PipelineRow::Run);
    if run_too && let Err(e) = slug_mpi::rank::check_world(&world, cfg) {
        return if zero { Err(e.into()) } else { Ok(None) };
    }
    let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
    let measured = (|| -> slug_transport::Result<_> {
        let (mut raw, mut link) = (Vec::new(), Vec::new());
        for &size in sizes {
            let rounds = (iterations(size) / 2).max(1) as u32;
            let r = pingpong::raw(&world, size, rounds);
            let none = slug_transport::transfer::Observers::none();
            let l = pingpong::link(&world, size, rounds, timeout, &none)?;
            if let (Some(r), Some(l)) = (r, l) {
                let messages = 2 * u64::from(rounds);
                raw.push(Rung::new(
                    size,
                    messages,
                    Duration::from_secs_f64(r.seconds),
                ));
                link.push(Rung::new(
                    size,
                    messages,
                    Duration::from_secs_f64(l.seconds),
                ));
            }
        }
        let achieved = match row {
            PipelineRow::Run => {
                slug_mpi::rank::run_rank(&world, cfg, &slug_transport::pipeline::NoObservers)?
                    .map(|r| achieved_by(&r))
            }
            PipelineRow::Given(a) => Some(a),
            PipelineRow::None => None,
        };
        Ok((raw, link, achieved))
    })();
    match measured {
        Ok((raw, link, achieved)) if zero => {
            Ok(Some(assemble("mpi", "MPI send/recv", raw, link, achieved)))
        }
        Ok(_) => Ok(None),
        Err(e) => abort(&world, &e),
    }
}

/// Without the `mpi` feature: says how to build slug with MPI.
#[cfg(not(feature = "mpi"))]
pub fn ladder_row(
    _cfg: &PipelineConfig,
    _sizes: &[usize],
    _row: crate::ladder::PipelineRow,
) -> Result<Option<crate::ladder::Ladder>> {
    anyhow::bail!("--transport mpi: {NOT_BUILT}")
}
