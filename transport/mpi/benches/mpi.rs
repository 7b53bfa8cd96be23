//! slug's MPI link vs raw MPI send/recv of the same sizes (4 KiB .. 4 MiB), ping-pong between
//! two ranks in the same job, raw and link batches interleaved in pairs (target: median
//! link/raw >= 0.9x), then pipeline tokens/s of
//! `small`, 4 stages, on mpi (one rank per stage) vs tcp and shm (node threads in rank 0's
//! process, same sockets and fabric file) in the same run.
//!
//! `cargo bench -p slug-mpi --features mpi --bench mpi` starts itself under `mpirun
//! --oversubscribe` (as root with `--allow-run-as-root`): `-np 2` for the ping-pongs, `-np 4`
//! for the pipeline.

use std::time::Duration;

use slug_kernels::ModelConfig;
use slug_mpi::MpiWorld;
use slug_mpi::pingpong::{self, PingPong};
use slug_transport::pipeline::{Launch, NoObservers, PipelineConfig, run};
use slug_transport::transfer::{Observers, TransportKind};

const RANKS: usize = 4;
/// Raw/link batch pairs per message size.
const PAIRS: usize = 25;
/// Bytes each batch moves one way (at least [`MIN_ROUNDS`] round trips).
const BATCH_BYTES: usize = 4 << 20;
const MIN_ROUNDS: usize = 10;

fn main() {
    let phase = std::env::args().nth(1);
    if std::env::var_os("OMPI_COMM_WORLD_SIZE").is_none() && std::env::var_os("PMI_SIZE").is_none()
    {
        // The ping-pongs run in a job of their own with exactly two ranks, so that no third
        // rank polls for its turn on the same cores while they are timed.
        for (ranks, phase) in [(2, "pingpong"), (RANKS, "pipeline")] {
            let code = mpirun(ranks, phase);
            if code != 0 {
                std::process::exit(code);
            }
        }
        return;
    }
    let world = MpiWorld::init().expect("MPI");
    match phase.as_deref() {
        Some("pingpong") => pingpongs(&world),
        _ => pipeline(&world),
    }
}

/// Runs this bench's `phase` under `mpirun -np ranks` and returns its exit code.
fn mpirun(ranks: usize, phase: &str) -> i32 {
    let me = std::env::current_exe().expect("the bench's own path");
    let mut mpirun = std::process::Command::new("mpirun");
    if std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    {
        mpirun.arg("--allow-run-as-root");
    }
    mpirun
        .args(["--oversubscribe", "-np", &ranks.to_string()])
        .arg(me)
        .arg(phase)
        .status()
        .expect("run mpirun (Debian: openmpi-bin)")
        .code()
        .unwrap_or(1)
}

/// slug's link vs raw MPI, per size: [`PAIRS`] pairs of batches, raw and link back to back
/// (which goes first alternates), so both halves of a pair see the same load on a shared
/// machine; the ratio is the median of the pairs' ratios, with their quartiles and extremes.
fn pingpongs(world: &MpiWorld) {
    let zero = world.rank() == 0;
    if zero {
        println!(
            "slug MPI link vs raw MPI send/recv (ping-pong between 2 ranks; {PAIRS} interleaved \
             raw/link batch pairs per size; link/raw = median of the pairs' ratios \
             [quartiles] (extremes); inline transfers up to {} B):",
            slug_mpi::link::INLINE
        );
    }
    let mut worst = f64::INFINITY;
    for size in [
        1usize << 10,
        4 << 10,
        16 << 10,
        64 << 10,
        256 << 10,
        1 << 20,
        4 << 20,
    ] {
        let rounds = (BATCH_BYTES / size).max(MIN_ROUNDS) as u32;
        let (mut raw, mut link): (Option<PingPong>, Option<PingPong>) = (None, None);
        let mut ratios = Vec::with_capacity(PAIRS);
        for pair in 0..PAIRS {
            let raw_batch = || pingpong::raw(world, size, rounds);
            let link_batch = || {
                pingpong::link(
                    world,
                    size,
                    rounds,
                    Duration::from_secs(60),
                    &Observers::none(),
                )
                .expect("link ping-pong")
            };
            let (r, l) = if pair % 2 == 0 {
                let r = raw_batch();
                (r, link_batch())
            } else {
                let l = link_batch();
                (raw_batch(), l)
            };
            if let (Some(r), Some(l)) = (r, l) {
                ratios.push(l.bytes_per_s() / r.bytes_per_s());
            }
            raw = best(raw, r);
            link = best(link, l);
        }
        if let (Some(r), Some(l)) = (raw, link) {
            ratios.sort_by(f64::total_cmp);
            let at = |q: usize| ratios[(ratios.len() - 1) * q / 4];
            if size >= 4 << 10 {
                worst = worst.min(at(2));
            }
            println!(
                "  {:>8} B: raw {:>7.3} GB/s ({:>7.2} us)  link {:>7.3} GB/s ({:>7.2} us)  (best)  link/raw {:.2}x [{:.2}..{:.2}] ({:.2}..{:.2})",
                size,
                r.bytes_per_s() / 1e9,
                r.one_way_us(),
                l.bytes_per_s() / 1e9,
                l.one_way_us(),
                at(2),
                at(1),
                at(3),
                at(0),
                at(4)
            );
        }
    }
    if zero {
        println!(
            "  worst median link/raw from 4 KiB on {worst:.2}x (target >= 0.90x: {})",
            if worst >= 0.9 { "met" } else { "NOT met" }
        );
    }
}

/// Pipeline tokens/s of `small`, [`RANKS`] stages: mpi (one rank per stage), then tcp and shm
/// (node threads in rank 0's process) in the same run.
fn pipeline(world: &MpiWorld) {
    let mut cfg = PipelineConfig::new(
        ModelConfig::preset("small").expect("small"),
        "Hello, slug!",
        4,
        16,
    );
    cfg.stages = RANKS;
    cfg.transport = TransportKind::Mpi;
    let mpi = slug_mpi::rank::run_rank(world, &cfg, &NoObservers).expect("mpi pipeline");
    let Some(mpi) = mpi else {
        return;
    };
    println!("pipeline small, {RANKS} stages, 4 sequences x 16 tokens:");
    println!("  mpi {:>8.1} tokens/s", mpi.tokens_per_s);
    for kind in [TransportKind::Tcp, TransportKind::Shm] {
        let mut c = cfg.clone();
        c.transport = kind;
        c.launch = Launch::Threads;
        let r = run(&c, &NoObservers).expect("pipeline");
        assert_eq!(
            r.tokens, mpi.tokens,
            "{kind} generated other tokens than mpi"
        );
        println!(
            "  {kind} {:>8.1} tokens/s   mpi/{kind} {:.2}x",
            r.tokens_per_s,
            mpi.tokens_per_s / r.tokens_per_s
        );
    }
}

/// The faster of two measurements (rank 0 only has them).
fn best(a: Option<PingPong>, b: Option<PingPong>) -> Option<PingPong> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.seconds < a.seconds { b } else { a }),
        (a, b) => a.or(b),
    }
}
