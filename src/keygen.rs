//! `slug keygen`: make a cluster key file that only its owner can read.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

/// Arguments of `slug keygen`.
///
/// Writes 32 random bytes (from /dev/urandom) as 64 hex characters to PATH, created with mode
/// 0600; an existing file is never replaced. Copy the file to every node (e.g. `scp -p`) and
/// pass it with `--key-file` to `slug node` and to `slug run|record|replay --hosts`.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  slug keygen ~/.config/slug/cluster.key\n  \
    slug node --listen 0.0.0.0:7070 --key-file ~/.config/slug/cluster.key")]
pub struct KeygenArgs {
    /// Where to write the key (must not exist yet).
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
}

/// Runs `slug keygen`.
pub fn execute(args: KeygenArgs) -> Result<ExitCode> {
    slug_transport::auth::write_new_key(&args.path)?;
    println!(
        "wrote a new cluster key to {} (mode 0600); give the same file to every node with --key-file",
        args.path.display()
    );
    Ok(ExitCode::SUCCESS)
}
