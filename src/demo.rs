//! `slug demo`: write a synthetic trace and read it back (the default demo).

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Args;

/// Arguments of `slug demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {}

/// Runs `slug demo`.
pub fn execute(_args: DemoArgs) -> Result<ExitCode> {
    bail!("`slug demo` is not built yet in this version of slug")
}
