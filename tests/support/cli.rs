//! Running the `slug` binary from an end-to-end test and reading what it printed.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `slug` binary cargo built for this test.
pub fn slug() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_slug"))
}

/// Runs `slug ARGS` to completion.
pub fn run(args: &[&str]) -> Output {
    Command::new(slug()).args(args).output().expect("run slug")
}

/// Its stdout then its stderr, for assertions and failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
