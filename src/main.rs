//! The `slug` command line: record, replay, inspect and move CPU AI pipelines.

mod cli;
mod demo;
mod export;
mod info;
mod keygen;
mod node;
mod pipeline_args;
mod record;
mod replay;
mod run;
mod view;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::dispatch(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("slug: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
