//! `slug node`: serve pipeline stages to a remote `slug run --hosts` coordinator.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use slug_recorder::observe::NodeRecorderFactory;
use slug_replayer::NodeReplayFactory;
use slug_transport::AbortFlag;
use slug_transport::auth::ClusterKey;
use slug_transport::node::{LISTENING_PREFIX, NodeOptions, serve};
use slug_transport::pipeline::{NodeCommand, NodeLauncher};

/// Arguments of `slug node`.
///
/// The node serves only coordinators that prove the shared cluster key (from `--key-file` or
/// the `SLUG_CLUSTER_KEY` environment variable); everyone else is refused and logged. Every
/// control message is sealed with keys fresh for the session (Noise NNpsk0 with the cluster
/// key as pre-shared key), and data links prove a per-run secret.
///
/// Make a key with `slug keygen PATH` (a 0600 file); the node refuses a key file other users
/// can read (`chmod 600 PATH` fixes it). Prefer --key-file to SLUG_CLUSTER_KEY: a process's
/// environment is visible to `ps e` and /proc.
#[derive(Debug, Args)]
#[command(after_help = "\
What uses nodes: `slug run`, `slug record` and `slug replay` with --hosts (stage s on the s-th
node, on other machines), and the stage processes that `slug run|record|replay --transport
shm|tcp|rdma` and `slug demo --transport shm|tcp` start on this machine (`slug node --listen
127.0.0.1:0 --once --key-file -`). A recording node records its stage and sends the files
back; a replaying node restores its stage from its copy of the trace (--node-trace).

Examples:
  slug keygen cluster.key                      # once; copy it to every host (scp -p)
  slug node --listen 0.0.0.0:7070 --key-file cluster.key
      Serve stages until killed; each coordinator session runs one stage.
  slug run --model small --stages 2 --transport tcp --hosts h1:7070,h2:7070 --key-file cluster.key
  slug record --out run1 -- --model small --stages 2 --transport tcp --hosts h1:7070,h2:7070 \\
      --key-file cluster.key
  slug replay run1 --hosts h1:7070,h2:7070 --node-trace /data/run1 --key-file cluster.key
      What uses the nodes: stage s runs on the s-th address.")]
pub struct NodeArgs {
    /// Address to listen on for coordinators, e.g. `0.0.0.0:7070` (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// File holding the cluster key, mode 0600 (`slug keygen PATH` makes one; `-` reads it
    /// from stdin). Default: the SLUG_CLUSTER_KEY environment variable.
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// Serve a single coordinator session, then exit (used when `slug run` launches stages).
    #[arg(long)]
    pub once: bool,
}

/// Runs `slug node`.
pub fn execute(args: NodeArgs) -> Result<ExitCode> {
    warn_if_key_in_env(args.key_file.as_deref());
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
    // serve() escapes peer-supplied text and keeps each message on one line.
    let log = |msg: &str| eprintln!("slug node: {msg}");
    // Records its stage when a `slug record` coordinator asks, restores it from a trace copy
    // when a `slug replay --hosts` coordinator asks, and otherwise just runs it.
    let factory = NodeReplayFactory(NodeRecorderFactory::default());
    serve(&opts, &factory, &on_listening, &log)?;
    Ok(ExitCode::SUCCESS)
}

/// How `slug run` / `slug record` start this machine's stage processes: this executable as
/// `slug node --listen 127.0.0.1:0 --once --key-file -` (the key arrives on stdin).
pub fn launcher() -> Result<Arc<dyn NodeLauncher>> {
    let exe = std::env::current_exe().context("find the slug binary to launch stages")?;
    Ok(Arc::new(NodeCommand::new(
        exe,
        [
            "node",
            "--listen",
            "127.0.0.1:0",
            "--once",
            "--key-file",
            "-",
        ],
    )))
}

/// Warns (one line) when the cluster key comes from the environment, where `ps e` shows it.
pub fn warn_if_key_in_env(key_file: Option<&Path>) {
    if key_file.is_none() && std::env::var_os(slug_transport::auth::KEY_ENV).is_some() {
        eprintln!(
            "slug: warning: the cluster key comes from {}, which other users may read with `ps e` \
             or /proc; prefer --key-file (make one with `slug keygen PATH`)",
            slug_transport::auth::KEY_ENV
        );
    }
}
