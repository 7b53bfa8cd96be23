//! One rank's part of an MPI run: rank r runs stage r over MPI links; rank 0 measures every
//! rank's clock offset and assembles the run's report from what the ranks send it.

use std::time::{Duration, Instant};

use slug_transport::clock::{ClockOffset, ClockSample, monotonic_ns};
use slug_transport::link::{LinkEnds, LinkReceiver, LinkSender, StageLinks};
use slug_transport::mpi_wire::link_ranks;
use slug_transport::pipeline::{
    ObserverFactory, PipelineConfig, RunReport, StageContext, StageReport, run_stage,
};
use slug_transport::transfer::{EndpointId, LinkId, TransportKind};
use slug_transport::{Result, TransportError};

use crate::MpiWorld;
use crate::link::{MpiRecv, MpiSend, barrier, recv_from, recv_vec_from, send_to};

/// Tags of the control messages; link tags are below `2 * MAX_STAGES`.
const TAG_CLOCK: i32 = 30_000;
const TAG_REPORT: i32 = 30_001;
const TAG_HOST: i32 = 30_007;
const TAG_HOSTS: i32 = 30_008;
const TAG_CONFIG: i32 = 30_009;
/// Largest stage report rank 0 accepts.
const MAX_REPORT: usize = 64 << 20;
/// Longest host name rank 0 accepts.
const MAX_HOST: usize = 1024;
/// Largest configuration a rank accepts from rank 0.
const MAX_CONFIG: usize = 64 << 20;
/// Ping-pongs per rank for its clock offset (the minimum-RTT one is kept).
const CLOCK_ROUNDS: usize = 8;

/// Checks that this MPI job can run `cfg`: transport `mpi` and one rank per stage.
pub fn check_world(mpi: &MpiWorld, cfg: &PipelineConfig) -> Result<()> {
    if cfg.transport != TransportKind::Mpi {
        return Err(TransportError::Config(format!(
            "run_rank runs an mpi pipeline, not {}",
            cfg.transport
        )));
    }
    if mpi.size() != cfg.stages {
        return Err(TransportError::Config(format!(
            "--stages {} but this MPI job has {} rank(s): start one rank per stage, e.g. \
             `mpirun -np {} slug run --transport mpi --stages {}`",
            cfg.stages,
            mpi.size(),
            cfg.stages,
            cfg.stages
        )));
    }
    Ok(())
}

/// Link `link` of a ring of `stages` stages: stage `link` to stage `link + 1`, wrapping to 0.
fn link_ends(cfg: &PipelineConfig, link: usize) -> LinkEnds {
    LinkEnds {
        id: LinkId(link as u32),
        src: EndpointId(link as u32),
        dst: EndpointId(((link + 1) % cfg.stages) as u32),
        timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
    }
}

/// Runs this rank's stage of `cfg` (rank r runs stage r) with `factory`'s observers built in
/// this process. Rank 0 returns the run's report (every stage's, with each rank's host and
/// clock offset from rank 0, measured over MPI); the other ranks return `None` once they have
/// sent theirs. On error the caller should print it and [`MpiWorld::abort`]: the other ranks
/// may be waiting on this one.
pub fn run_rank(
    mpi: &MpiWorld,
    cfg: &PipelineConfig,
    factory: &dyn ObserverFactory,
) -> Result<Option<RunReport>> {
    run_rank_collecting(mpi, cfg, factory, None)
}

/// [`run_rank`], then the files each rank's `factory` recorded for its stage (its
/// [`ObserverFactory::collected_files`]) are gathered over MPI into `collect_into` on rank 0
/// (see [`crate::gather`]); other ranks pass `None`.
pub fn run_rank_collecting(
    mpi: &MpiWorld,
    cfg: &PipelineConfig,
    factory: &dyn ObserverFactory,
    collect_into: Option<&std::path::Path>,
) -> Result<Option<RunReport>> {
    check_world(mpi, cfg)?;
    let s = mpi.rank();
    let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
    let hosts = share_hosts(mpi, timeout)?;
    let clocks = measure_clocks(mpi, &hosts, timeout)?;
    let n = cfg.stages;
    let mut connect = |obs: &slug_transport::transfer::Observers| {
        if n < 2 {
            return Ok(StageLinks::default());
        }
        // Link l joins the ranks `link_ranks` names (the manifest's mpi table says the same).
        let up = (s + n - 1) % n;
        let (from, _) = link_ranks(n as u32, up as u32);
        let (_, to) = link_ranks(n as u32, s as u32);
        Ok(StageLinks {
            inbound: Some(LinkReceiver::new(
                link_ends(cfg, up),
                Box::new(MpiRecv::new(from as usize, up as u32)),
                obs.clone(),
            )),
            outbound: Some(LinkSender::new(
                link_ends(cfg, s),
                Box::new(MpiSend::new(to as usize, s as u32)),
                obs.clone(),
            )),
        })
    };
    let mut start = None;
    let mut ready = || {
        barrier(timeout)?;
        start = Some(Instant::now());
        Ok(())
    };
    let report = run_stage(cfg, s, mpi.host(), factory, &mut connect, &mut ready)?;
    let started = start.unwrap_or_else(Instant::now);
    // The stage's observers are gone (run_stage dropped them): its files are complete.
    let ctx = StageContext {
        stage: s,
        endpoint: s as u32,
        host: mpi.host(),
        config: cfg,
    };
    let files = factory.collected_files(&ctx);
    if s != 0 {
        fault_stop(s, "report");
        let bytes = serde_json::to_vec(&report)
            .map_err(|e| TransportError::Config(format!("encode the report of stage {s}: {e}")))?;
        let zero = rank_on(&hosts, 0);
        send_to(
            &bytes,
            0,
            TAG_REPORT,
            timeout,
            &zero,
            "this rank's stage report",
        )?;
        fault_stop(s, "files");
        crate::gather::send_files(files.as_deref(), &zero, timeout)?;
        return Ok(None);
    }
    let mut reports = vec![report];
    for r in 1..n {
        let peer = rank_on(&hosts, r);
        let bytes = recv_vec_from(
            r,
            TAG_REPORT,
            MAX_REPORT,
            timeout,
            &peer,
            "its stage report",
        )?;
        let rep: StageReport =
            serde_json::from_slice(&bytes).map_err(|e| TransportError::Protocol {
                peer: rank_on(&hosts, r),
                detail: format!("its stage report does not decode: {e}"),
            })?;
        reports.push(rep);
    }
    let wall = started.elapsed();
    crate::gather::collect_files(mpi, files.as_deref(), collect_into, &hosts, timeout)?;
    for rep in &mut reports {
        rep.clock = clocks.get(rep.stage).copied().flatten();
    }
    Ok(Some(RunReport::assemble(cfg, reports, wall)))
}

/// `rank R on HOST` for errors on rank 0 (`hosts` from [`share_hosts`]).
pub fn rank_on(hosts: &[String], r: usize) -> String {
    match hosts.get(r) {
        Some(h) => format!("rank {r} on {h}"),
        None => format!("rank {r}"),
    }
}

/// Every rank sends rank 0 its host name and rank 0 sends every rank the list, so that every
/// rank can name the others (`rank R on HOST`) in its errors; returns the hosts by rank. Done
/// once per process (later calls return the list at once); every wait is bounded by `timeout`.
pub fn share_hosts(mpi: &MpiWorld, timeout: Duration) -> Result<Vec<String>> {
    if let Some(hosts) = mpi.hosts() {
        return Ok(hosts.to_vec());
    }
    let what = "the list of every rank's host";
    let hosts = if mpi.rank() != 0 {
        // Rank 0's host is only known once it answers.
        let zero = "rank 0 (host not known yet)";
        send_to(
            mpi.host().as_bytes(),
            0,
            TAG_HOST,
            timeout,
            zero,
            "this rank's host name",
        )?;
        let raw = recv_vec_from(0, TAG_HOSTS, MAX_HOST * mpi.size(), timeout, zero, what)?;
        let hosts: Vec<String> =
            serde_json::from_slice(&raw).map_err(|e| TransportError::Protocol {
                peer: "rank 0".into(),
                detail: format!("{what} does not decode: {e}"),
            })?;
        if hosts.len() != mpi.size() {
            return Err(TransportError::Protocol {
                peer: "rank 0".into(),
                detail: format!("{what} names {} ranks, not {}", hosts.len(), mpi.size()),
            });
        }
        hosts
    } else {
        let mut hosts = vec![mpi.host().to_string()];
        for r in 1..mpi.size() {
            let raw = recv_vec_from(
                r,
                TAG_HOST,
                MAX_HOST,
                timeout,
                &format!("rank {r}"),
                "its host name",
            )?;
            hosts.push(String::from_utf8_lossy(&raw).escape_debug().to_string());
        }
        let list = serde_json::to_vec(&hosts)
            .map_err(|e| TransportError::Config(format!("encode {what}: {e}")))?;
        for r in 1..mpi.size() {
            send_to(&list, r, TAG_HOSTS, timeout, &rank_on(&hosts, r), what)?;
        }
        hosts
    };
    mpi.set_hosts(hosts.clone());
    Ok(hosts)
}

/// Fault injection (documented in the README): with `SLUG_FAULT_MPI_STOP=R:PHASE` in its
/// environment, rank R stops itself (SIGSTOP: alive, silent) before `PHASE`: on a rank other
/// than 0, once its stage has run, before it sends its report (`report`) or its recorded files
/// (`files`); on rank 0, before the clock ping-pongs (`clock`), before it sends the run's
/// configuration (`config`, `slug record` and `slug replay`) or before it asks a rank for its
/// recorded files (`gather`). It shows that the waits on that rank end within `--timeout-ms`
/// with an error naming it; the stopped process is ended by mpirun (SIGKILL) when the waiting
/// rank aborts the job.
pub(crate) fn fault_stop(rank: usize, phase: &str) {
    let Ok(spec) = std::env::var("SLUG_FAULT_MPI_STOP") else {
        return;
    };
    let rank_s = rank.to_string();
    if spec.split_once(':') != Some((rank_s.as_str(), phase)) {
        return;
    }
    eprintln!("slug: rank {rank}: stopping itself before its {phase} (SLUG_FAULT_MPI_STOP={spec})");
    // SAFETY: raise(2) with a valid signal number.
    unsafe { libc::raise(libc::SIGSTOP) };
}

/// Rank 0 ping-pongs every other rank [`CLOCK_ROUNDS`] times (NTP-style, `CLOCK_MONOTONIC`
/// on both ends) and returns, per rank, its clock minus rank 0's; other ranks answer and get
/// an empty list.
pub fn measure_clocks(
    mpi: &MpiWorld,
    hosts: &[String],
    timeout: Duration,
) -> Result<Vec<Option<ClockOffset>>> {
    if mpi.rank() != 0 {
        let zero = rank_on(hosts, 0);
        for _ in 0..CLOCK_ROUNDS {
            let mut ping = [0u8; 8];
            recv_from(&mut ping, 0, TAG_CLOCK, timeout, &zero, "a clock ping")?;
            let t1 = monotonic_ns();
            let mut pong = [0u8; 16];
            pong[..8].copy_from_slice(&t1.to_le_bytes());
            pong[8..].copy_from_slice(&monotonic_ns().to_le_bytes());
            send_to(
                &pong,
                0,
                TAG_CLOCK,
                timeout,
                &zero,
                "this rank's clock pong",
            )?;
        }
        return Ok(Vec::new());
    }
    fault_stop(0, "clock");
    let mut out = vec![None; mpi.size()];
    for (r, slot) in out.iter_mut().enumerate().skip(1) {
        let peer = rank_on(hosts, r);
        let mut samples = Vec::with_capacity(CLOCK_ROUNDS);
        for _ in 0..CLOCK_ROUNDS {
            let t0 = monotonic_ns();
            send_to(
                &t0.to_le_bytes(),
                r,
                TAG_CLOCK,
                timeout,
                &peer,
                "a clock ping",
            )?;
            let mut pong = [0u8; 16];
            recv_from(&mut pong, r, TAG_CLOCK, timeout, &peer, "its clock pong")?;
            let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
            samples.push(ClockSample {
                t0,
                t1: word(&pong[..8]),
                t2: word(&pong[8..]),
                t3: monotonic_ns(),
            });
        }
        *slot = ClockOffset::from_samples(&samples);
    }
    Ok(out)
}

/// Rank 0 sends `cfg` to every rank (`Some` on rank 0); every rank returns it. How ranks of
/// `slug record` and `slug replay` run the configuration rank 0 prepared (with its recorder
/// settings). Starts with [`share_hosts`]; every wait is bounded by `timeout` (on ranks other
/// than 0 it includes rank 0's preparation: loading a trace, creating the output).
pub fn share_config(
    mpi: &MpiWorld,
    cfg: Option<&PipelineConfig>,
    timeout: Duration,
) -> Result<PipelineConfig> {
    let hosts = share_hosts(mpi, timeout)?;
    let what = "the run's configuration";
    if mpi.rank() == 0 {
        let c = cfg.ok_or_else(|| TransportError::Config(format!("rank 0 has no {what}")))?;
        let bytes = serde_json::to_vec(c)
            .map_err(|e| TransportError::Config(format!("encode {what}: {e}")))?;
        fault_stop(0, "config");
        for r in 1..mpi.size() {
            send_to(&bytes, r, TAG_CONFIG, timeout, &rank_on(&hosts, r), what)?;
        }
        // Fields that do not travel (launcher, key file) stay as rank 0 has them.
        return Ok(c.clone());
    }
    let bytes = recv_vec_from(
        0,
        TAG_CONFIG,
        MAX_CONFIG,
        timeout,
        &rank_on(&hosts, 0),
        what,
    )?;
    serde_json::from_slice(&bytes).map_err(|e| TransportError::Protocol {
        peer: rank_on(&hosts, 0),
        detail: format!("{what} does not decode: {e}"),
    })
}
