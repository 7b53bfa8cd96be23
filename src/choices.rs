//! The closed sets of values the command line offers (`--transport`, `--model`, `--payloads`,
//! `--verify`) as clap `ValueEnum`s, each mapped onto the library type it selects.
//!
//! clap then lists the values in `--help`, completes them, and refuses a misspelling before any
//! work starts, naming the flag and the values it takes.

use clap::ValueEnum;
use slug_recorder::observe::PayloadPolicy;
use slug_replayer::Verify;
use slug_transport::transfer::TransportKind;

/// How stages exchange activations (the transports the `slug` binary can start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// Threads of this process.
    Local,
    /// One process per stage over a shared-memory fabric file.
    Shm,
    /// One process per stage over sockets.
    Tcp,
    /// One MPI rank per stage, started by `mpirun -np S` (build with `--features mpi`).
    Mpi,
    /// One process per stage over RDMA verbs queue pairs (build with `--features rdma`).
    Rdma,
}

impl From<Transport> for TransportKind {
    fn from(t: Transport) -> TransportKind {
        match t {
            Transport::Local => TransportKind::Local,
            Transport::Shm => TransportKind::Shm,
            Transport::Tcp => TransportKind::Tcp,
            Transport::Mpi => TransportKind::Mpi,
            Transport::Rdma => TransportKind::Rdma,
        }
    }
}

/// A model preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Model {
    /// For tests.
    Tiny,
    /// About 10M parameters.
    Small,
    /// About 115M parameters.
    Base,
}

impl Model {
    /// The preset's name, as `slug_kernels::ModelConfig::preset` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Model::Tiny => "tiny",
            Model::Small => "small",
            Model::Base => "base",
        }
    }
}

/// Which transfer payloads a recording stores (hashes are always stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Payloads {
    /// None: the pipeline replays from snapshots and the prompt.
    None,
    /// The tokens the last stage sends back to stage 0.
    Boundary,
    /// Every transfer: any stage can be replayed alone.
    All,
}

impl From<Payloads> for PayloadPolicy {
    fn from(p: Payloads) -> PayloadPolicy {
        match p {
            Payloads::None => PayloadPolicy::None,
            Payloads::Boundary => PayloadPolicy::Boundary,
            Payloads::All => PayloadPolicy::All,
        }
    }
}

/// How deep a replay verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VerifyDepth {
    /// Every transfer's content hash.
    Transfer,
    /// Also every kernel output (needs `slug record --hash-kernels`).
    Kernel,
}

impl From<VerifyDepth> for Verify {
    fn from(v: VerifyDepth) -> Verify {
        match v {
            VerifyDepth::Transfer => Verify::Transfer,
            VerifyDepth::Kernel => Verify::Kernel,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command line spells each value as the library does.
    #[test]
    fn values_are_spelled_as_the_libraries_spell_them() {
        for t in Transport::value_variants() {
            let name = t.to_possible_value().unwrap().get_name().to_owned();
            assert_eq!(TransportKind::from(*t).name(), name);
        }
        for p in Payloads::value_variants() {
            let name = p.to_possible_value().unwrap().get_name().to_owned();
            assert_eq!(name.parse::<PayloadPolicy>(), Ok(PayloadPolicy::from(*p)));
        }
        for v in VerifyDepth::value_variants() {
            let name = v.to_possible_value().unwrap().get_name().to_owned();
            assert_eq!(name.parse::<Verify>().ok(), Some(Verify::from(*v)));
        }
        for m in Model::value_variants() {
            let name = m.to_possible_value().unwrap().get_name().to_owned();
            assert_eq!(m.name(), name);
            assert!(slug_kernels::ModelConfig::preset(&name).is_ok());
        }
    }
}
