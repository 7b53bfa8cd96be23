//! How a single-machine `shm` / `tcp` run starts its stage processes: the program that links
//! this library hands it a [`NodeLauncher`], so the library never spells a command line.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

/// Starts one local node process for a run that launches its own stages.
///
/// The process the command starts must serve a single coordinator session on a loopback port,
/// read the cluster key as one line of hex on stdin, and print [`super::node::LISTENING_PREFIX`] and
/// the address it listens on as the first line of its stdout (what [`crate::node::serve`] does
/// when its caller prints the announced address). The library sets stdin, stdout and the
/// environment; the launcher decides the program and its arguments.
pub trait NodeLauncher: Send + Sync + std::fmt::Debug {
    /// The command that starts the node for `stage`.
    fn node_command(&self, stage: usize) -> Command;
}

/// A [`NodeLauncher`] that runs one program with fixed arguments for every stage.
#[derive(Debug, Clone)]
pub struct NodeCommand {
    program: PathBuf,
    args: Vec<OsString>,
}

impl NodeCommand {
    /// Runs `program` with `args` for every stage.
    pub fn new(
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
    ) -> Self {
        Self {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }
}

impl NodeLauncher for NodeCommand {
    fn node_command(&self, _stage: usize) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        cmd
    }
}
