//! `slug export`: export a trace for Perfetto or chrome://tracing.

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Args;

/// Arguments of `slug export`.
#[derive(Debug, Args)]
pub struct ExportArgs {}

/// Runs `slug export`.
pub fn execute(_args: ExportArgs) -> Result<ExitCode> {
    bail!("`slug export` is not built yet in this version of slug")
}
