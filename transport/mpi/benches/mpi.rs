//! slug's MPI link vs raw MPI send/recv of the same sizes (4 KiB .. 4 MiB), ping-pong between
//! ranks 0 and 1 in the same job, raw and link batches back to back in pairs (target: median
//! link/raw >= 0.9x), then pipeline tokens/s of
//! `small`, 4 stages, on mpi (one rank per stage) vs tcp and shm (node threads in rank 0's
//! process, same sockets and fabric file) in the same run.
//!
//! `cargo bench -p slug-mpi --features mpi --bench mpi` starts itself under
//! `mpirun -np 4 --oversubscribe` (as root with `--allow-run-as-root`).

use std::time::Duration;

use slug_kernels::ModelConfig;
use slug_mpi::MpiWorld;
use slug_mpi::pingpong::{self, PingPong};
use slug_transport::pipeline::{Launch, NoObservers, PipelineConfig, run};
use slug_transport::transfer::{Observers, TransportKind};

const RANKS: usize = 4;
/// Raw/link batch pairs per message size.
const PAIRS: usize = 7;

fn main() {
    if std::env::var_os("OMPI_COMM_WORLD_SIZE").is_none() && std::env::var_os("PMI_SIZE").is_none()
    {
        let me = std::env::current_exe().expect("the bench's own path");
        let mut mpirun = std::process::Command::new("mpirun");
        if std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        {
            mpirun.arg("--allow-run-as-root");
        }
        let status = mpirun
            .args(["--oversubscribe", "-np", &RANKS.to_string()])
            .arg(me)
            .status()
            .expect("run mpirun (Debian: openmpi-bin)");
        std::process::exit(status.code().unwrap_or(1));
    }
    let world = MpiWorld::init().expect("MPI");
    let zero = world.rank() == 0;
    if zero {
        println!(
            "slug MPI link vs raw MPI send/recv (ping-pong, ranks 0 and 1; {PAIRS} back-to-back \
             raw/link pairs per size, ratio = median of the pairs' ratios):"
        );
    }
    let mut worst = f64::INFINITY;
    for size in [
        4usize << 10,
        16 << 10,
        64 << 10,
        256 << 10,
        1 << 20,
        4 << 20,
    ] {
        let rounds = ((32usize << 20) / size).clamp(20, 2000) as u32;
        // Each raw batch is followed at once by its link batch, so both see the same load on
        // a shared machine; the median of the pairs' ratios ignores the pairs a burst of other
        // work hit.
        let (mut raw, mut link): (Option<PingPong>, Option<PingPong>) = (None, None);
        let mut ratios = Vec::with_capacity(PAIRS);
        for _ in 0..PAIRS {
            let r = pingpong::raw(&world, size, rounds);
            let l = pingpong::link(
                &world,
                size,
                rounds,
                Duration::from_secs(60),
                &Observers::none(),
            )
            .expect("link ping-pong");
            if let (Some(r), Some(l)) = (r, l) {
                ratios.push(l.bytes_per_s() / r.bytes_per_s());
            }
            raw = best(raw, r);
            link = best(link, l);
        }
        if let (Some(r), Some(l)) = (raw, link) {
            ratios.sort_by(f64::total_cmp);
            let ratio = ratios[ratios.len() / 2];
            worst = worst.min(ratio);
            println!(
                "  {:>8} B: raw {:>8.3} GB/s ({:>7.2} us)   link {:>8.3} GB/s ({:>7.2} us)   (best of {PAIRS})   link/raw {ratio:.2}x (pairs {:.2}..{:.2})",
                size,
                r.bytes_per_s() / 1e9,
                r.one_way_us(),
                l.bytes_per_s() / 1e9,
                l.one_way_us(),
                ratios[0],
                ratios[ratios.len() - 1]
            );
        }
    }
    if zero {
        println!(
            "  worst link/raw {worst:.2}x (target >= 0.90x: {})",
            if worst >= 0.9 { "met" } else { "NOT met" }
        );
    }
    let mut cfg = PipelineConfig::new(
        ModelConfig::preset("small").expect("small"),
        "Hello, slug!",
        4,
        16,
    );
    cfg.stages = RANKS;
    cfg.transport = TransportKind::Mpi;
    let mpi = slug_mpi::rank::run_rank(&world, &cfg, &NoObservers).expect("mpi pipeline");
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
