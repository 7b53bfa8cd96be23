//! `slug view`: inspect a trace's timelines in a terminal UI.

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Args;

/// Arguments of `slug view`.
#[derive(Debug, Args)]
pub struct ViewArgs {}

/// Runs `slug view`.
pub fn execute(_args: ViewArgs) -> Result<ExitCode> {
    bail!("`slug view` is not built yet in this version of slug")
}
