//! The RDMA verbs link backend of slug (feature `rdma`): each link end registers one buffer
//! with the device once, activations move as RDMA writes with immediate into the receiving
//! stage's registered inbox, and credits keep a slow receiver from being overwritten
//! ([`link`](crate) documents the protocol).
//!
//! Without the `rdma` feature the crate is empty, so the default build needs no rdma-core.
//! A binary built with it calls [`install`] once at start, after which node agents serve
//! `--transport rdma` runs, and [`probe`] before any work, to fail at once on a host without
//! an RDMA device.

#[cfg(feature = "rdma")]
pub mod ladder;
#[cfg(feature = "rdma")]
mod link;
#[cfg(feature = "rdma")]
mod verbs;

#[cfg(feature = "rdma")]
pub use link::{RdmaRecv, RdmaSend, RdmaSetup};
#[cfg(feature = "rdma")]
pub use verbs::{DEVICE_ENV, GID_ENV};

/// Lets this program's node agents serve rdma runs.
#[cfg(feature = "rdma")]
pub fn install() {
    slug_transport::link::select::install_rdma(|plan| Ok(Box::new(RdmaSetup::open(plan)?)));
}

/// Opens the RDMA device a run would use and says which it is (`rxe0 (gid index 1)`), or
/// fails with "no RDMA device (...); use --transport tcp".
#[cfg(feature = "rdma")]
pub fn probe() -> slug_transport::Result<String> {
    verbs::Device::open().map(|d| d.describe())
}
