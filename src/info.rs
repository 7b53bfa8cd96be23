//! `slug info`: summarise a trace: endpoints, events per kind, sizes, losses, capabilities.

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Args;

/// Arguments of `slug info`.
#[derive(Debug, Args)]
pub struct InfoArgs {}

/// Runs `slug info`.
pub fn execute(_args: InfoArgs) -> Result<ExitCode> {
    bail!("`slug info` is not built yet in this version of slug")
}
