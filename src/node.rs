//! `slug node`: serve pipeline stages to a remote `slug run --hosts` coordinator.

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Args;

/// Arguments of `slug node`.
#[derive(Debug, Args)]
pub struct NodeArgs {}

/// Runs `slug node`.
pub fn execute(_args: NodeArgs) -> Result<ExitCode> {
    bail!("`slug node` is not built yet in this version of slug")
}
