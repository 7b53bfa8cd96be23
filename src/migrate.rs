//! `slug migrate`: asks a running `slug run|record --control ADDR` coordinator to move a stage
//! to another `slug node` now, and prints what became of the move.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use slug_transport::auth::ClusterKey;
use slug_transport::pipeline::{DEFAULT_ROUNDS, request_migration};

const EXAMPLES: &str = "\
Examples:
  slug run --model small --stages 4 --transport tcp --tokens 480 \\
      --key-file cluster.key --control 127.0.0.1:7171 &
  slug node --listen 10.0.0.5:7070 --key-file cluster.key &
  slug migrate --control 127.0.0.1:7171 --stage 2 --to 10.0.0.5:7070 --key-file cluster.key
      Move stage 2 of the running pipeline to the node at 10.0.0.5:7070. The coordinator picks
      a step far enough ahead that every node hears of the move in time, the target rebuilds
      the weights from the seed (checked by hash), the stage's node ships its state in pre-copy
      rounds while it keeps running, pauses at that step, ships the last delta, and lets go
      once the target has restored it. Prints the rounds, the stall and the step time.
  slug migrate --control 127.0.0.1:7171 --stage 0 --to 10.0.0.6:7070 --rounds 0 --json
      Stop-and-copy (the whole state shipped while paused), one JSON object.

A move the coordinator or the target refuses (another move under way, a dead address, a node
with another key, the run about to end) leaves the stage where it was; the reason is printed and
the exit status is 1. MPI runs cannot migrate: their ranks are fixed by mpirun.";

/// Arguments of `slug migrate`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct MigrateArgs {
    /// The running coordinator's control endpoint (`slug run --control ADDR`).
    #[arg(long, value_name = "HOST:PORT")]
    control: String,
    /// The stage to move.
    #[arg(long)]
    stage: usize,
    /// The `slug node --listen` address that takes the stage over.
    #[arg(long, value_name = "HOST:PORT")]
    to: String,
    /// Pre-copy rounds while the stage keeps running (0: stop-and-copy).
    #[arg(long, default_value_t = DEFAULT_ROUNDS)]
    rounds: u32,
    /// Cluster key file, the same the coordinator and nodes hold (default: $SLUG_CLUSTER_KEY).
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Longest the connection and the request may take, in ms (the move itself may take longer).
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    timeout_ms: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs `slug migrate`.
pub fn execute(args: MigrateArgs) -> Result<ExitCode> {
    crate::node::warn_if_key_in_env(args.key_file.as_deref());
    let key = ClusterKey::resolve(args.key_file.as_deref())?;
    let report = request_migration(
        &args.control,
        &key,
        args.stage,
        &args.to,
        args.rounds,
        Duration::from_millis(args.timeout_ms.max(1)),
    )
    .with_context(|| format!("asking the coordinator at --control {}", args.control))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.describe());
    }
    Ok(if report.moved {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
