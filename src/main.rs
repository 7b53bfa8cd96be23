//! The `slug` command line: record, replay, inspect and move CPU AI pipelines.

#![forbid(unsafe_code)]

mod choices;
mod cli;
mod demo;
mod export;
mod info;
mod keygen;
mod ladder;
mod migrate;
mod mpi;
mod node;
mod pipeline_args;
mod progress;
mod rdma;
mod record;
mod recover;
mod replay;
mod run;
mod view;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    rdma::install();
    match cli::dispatch(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("slug: error: {}", message(&err));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes joined by ": ", each said once: many errors already include their
/// source in their own text (`{path}: {source}`), and `{:#}` would print it again.
fn message(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
