//! `slug run`: run a pipeline without recording (prints generated tokens and tokens/s).

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Args;

/// Arguments of `slug run`.
#[derive(Debug, Args)]
pub struct RunArgs {}

/// Runs `slug run`.
pub fn execute(_args: RunArgs) -> Result<ExitCode> {
    bail!("`slug run` is not built yet in this version of slug")
}
