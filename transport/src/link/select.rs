//! The one place a node-run backend is chosen by its [`TransportKind`]: add a backend's arm here.

use super::shm::ShmSetup;
use super::tcp::TcpSetup;
use super::{LinkSetup, NodeLinkPlan};
use crate::error::{Result, TransportError};
use crate::transfer::TransportKind;

/// Readies a node's stage for its links: the one place a node-run backend is chosen.
pub fn prepare_node_links(plan: NodeLinkPlan) -> Result<Box<dyn LinkSetup>> {
    match plan.kind {
        TransportKind::Shm => Ok(Box::new(ShmSetup::open(plan)?)),
        TransportKind::Tcp => Ok(Box::new(TcpSetup::listen(plan)?)),
        TransportKind::Local => Err(TransportError::Config(
            "local links join threads of one process; a node serves shm and tcp runs".into(),
        )),
        TransportKind::Mpi => Err(TransportError::Config(
            "mpi links join MPI ranks started by mpirun, which connect their own (slug-mpi); \
             a node serves shm and tcp runs"
                .into(),
        )),
    }
}
