//! Command-line surface of `slug`: argument definitions and dispatch to the modules that do the work.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::{
    demo, export, info, keygen, ladder, migrate, node, record, recover, replay, run, view,
};

/// slug — record and replay for distributed CPU AI pipelines.
///
/// Runs a small decoder-only transformer split into pipeline stages (threads, processes over
/// shared memory or TCP, or `slug node`s on other hosts), records every endpoint and every
/// link into a compact trace, replays any stage or the whole pipeline elsewhere bit for bit,
/// points at the first divergence, and shows the timelines.
#[derive(Debug, Parser)]
#[command(
    name = "slug",
    version,
    propagate_version = true,
    max_term_width = 100,
    after_help = "\
Start here:
  slug demo                                  record, replay, verify, find an injected fault
  slug record --out run1 -- --model small --stages 4
  slug info run1 && slug replay run1 && slug view run1

Every command has --help with examples; README.md walks through all of them."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a pipeline without recording (prints generated tokens and tokens/s).
    Run(run::RunArgs),
    /// Record a pipeline run into a trace directory.
    Record(record::RecordArgs),
    /// Re-run a recorded stage or pipeline and verify it bit for bit.
    Replay(replay::ReplayArgs),
    /// Inspect a trace's timelines in a terminal UI.
    View(view::ViewArgs),
    /// Summarise a trace: endpoints, events per kind, sizes, losses, capabilities.
    Info(info::InfoArgs),
    /// Rebuild the logs of a killed recording and remove leftovers of interrupted writes.
    Recover(recover::RecoverArgs),
    /// Export a trace for Perfetto (protobuf) or chrome://tracing (JSON).
    Export(export::ExportArgs),
    /// Record a 4-stage pipeline, replay it bit for bit, and find an injected fault
    /// (`--synthetic`: tour the trace format instead).
    Demo(demo::DemoArgs),
    /// Serve pipeline stages to `slug run|record|replay --hosts` (and to shm/tcp runs here).
    Node(node::NodeArgs),
    /// Write a new random cluster key file (mode 0600) for `slug node` and `--hosts` runs.
    Keygen(keygen::KeygenArgs),
    /// Move a stage of a running pipeline (`--control`) to another `slug node` now.
    Migrate(migrate::MigrateArgs),
    /// Measure raw fabric vs slug's link vs the pipeline's achieved link throughput, per
    /// transport, and say which layer is the bottleneck.
    Ladder(ladder::LadderArgs),
}

/// Runs the chosen subcommand and returns the process exit code.
pub fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::execute(args),
        Command::Record(args) => record::execute(args),
        Command::Replay(args) => replay::execute(args),
        Command::View(args) => view::execute(args),
        Command::Info(args) => info::execute(args),
        Command::Recover(args) => recover::execute(args),
        Command::Export(args) => export::execute(args),
        Command::Demo(args) => demo::execute(args),
        Command::Node(args) => node::execute(args),
        Command::Keygen(args) => keygen::execute(args),
        Command::Migrate(args) => migrate::execute(args),
        Command::Ladder(args) => ladder::execute(args),
    }
}
