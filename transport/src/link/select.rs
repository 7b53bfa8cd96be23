//! The one place a node-run backend is chosen by its [`TransportKind`]: add a backend's arm here.
//!
//! Backends in crates above this one (RDMA verbs, `slug-rdma`) cannot be named here; the binary
//! that links them installs their setup once at start with [`install`], and their arm finds it.

use std::sync::OnceLock;

use super::shm::ShmSetup;
use super::tcp::TcpSetup;
use super::{LinkSetup, NodeLinkPlan};
use crate::error::{Result, TransportError};
use crate::transfer::TransportKind;

/// Readies a stage of a backend that lives in another crate.
pub type PrepareLinks = fn(NodeLinkPlan) -> Result<Box<dyn LinkSetup>>;

static RDMA: OnceLock<PrepareLinks> = OnceLock::new();

/// Installs the RDMA verbs backend's setup (called once by a binary built with it); a second
/// call keeps the first.
pub fn install_rdma(prepare: PrepareLinks) {
    let _ = RDMA.set(prepare);
}

/// Readies a node's stage for its links: the one place a node-run backend is chosen.
pub fn prepare_node_links(plan: NodeLinkPlan) -> Result<Box<dyn LinkSetup>> {
    match plan.kind {
        TransportKind::Shm => Ok(Box::new(ShmSetup::open(plan)?)),
        TransportKind::Tcp => Ok(Box::new(TcpSetup::listen(plan)?)),
        TransportKind::Rdma => match RDMA.get() {
            Some(prepare) => prepare(plan),
            None => Err(TransportError::Config(
                "rdma links need the RDMA verbs backend, which this program was built without \
                 (build slug with `--features rdma`)"
                    .into(),
            )),
        },
        TransportKind::Local => Err(TransportError::Config(
            "local links join threads of one process; a node serves shm, tcp and rdma runs".into(),
        )),
        TransportKind::Mpi => Err(TransportError::Config(
            "mpi links join MPI ranks started by mpirun, which connect their own (slug-mpi); \
             a node serves shm, tcp and rdma runs"
                .into(),
        )),
    }
}
