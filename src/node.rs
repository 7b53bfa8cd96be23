//! `slug node`: serve pipeline stages to a remote `slug run --hosts` coordinator.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use slug_recorder::observe::NodeRecorderFactory;
use slug_replayer::NodeReplayFactory;
use slug_transport::AbortFlag;
use slug_transport::auth::ClusterKey;
use slug_transport::node::{LISTENING_PREFIX, NodeOptions, serve};

/// Arguments of `slug node`.
///
/// The node serves only coordinators that prove the shared cluster key (from `--key-file` or
/// the `SLUG_CLUSTER_KEY` environment variable); everyone else is refused and logged.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Address to listen on for coordinators, e.g. `0.0.0.0:7070` (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// File holding the cluster key (default: the SLUG_CLUSTER_KEY environment variable).
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// Serve a single coordinator session, then exit (used when `slug run` launches stages).
    #[arg(long)]
    pub once: bool,
}

/// Runs `slug node`.
pub fn execute(args: NodeArgs) -> Result<ExitCode> {
    let key =
        ClusterKey::resolve(args.key_file.as_deref()).context("slug node needs a cluster key")?;
    let opts = NodeOptions {
        listen: args.listen,
        key,
        once: args.once,
        // Serves until killed: nothing raises it.
        stop: AbortFlag::new(),
    };
    let on_listening = |addr| {
        // Launchers read this line to learn the port; flush so they see it at once.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{LISTENING_PREFIX}{addr}");
        let _ = out.flush();
    };
    let log = |msg: &str| eprintln!("slug node: {msg}");
    // Records its stage when a `slug record` coordinator asks, restores it from a trace copy
    // when a `slug replay --hosts` coordinator asks, and otherwise just runs it.
    let factory = NodeReplayFactory(NodeRecorderFactory::default());
    serve(&opts, &factory, &on_listening, &log)?;
    Ok(ExitCode::SUCCESS)
}
