//! `--transport rdma`: the RDMA verbs backend (`slug-rdma`). Built only with the `rdma` cargo
//! feature; without it every rdma path says how to get it.

use anyhow::Result;

use crate::ladder::Rows;
#[cfg(feature = "rdma")]
use crate::ladder::{ends, link_spec, link_step, ping_pong, rungs};

/// What to do when this binary was built without RDMA verbs.
#[cfg(not(feature = "rdma"))]
pub const NOT_BUILT: &str = "this slug was built without RDMA verbs: install rdma-core and \
     libclang (Debian: `apt-get install libibverbs-dev rdma-core ibverbs-providers cmake \
     libclang-dev`) and build with `cargo build --release --features rdma`";

/// Lets this process's node agents serve rdma runs (a no-op without the feature).
pub fn install() {
    #[cfg(feature = "rdma")]
    slug_rdma::install();
}

/// Fails before any work when this process cannot run rdma links: no RDMA device (or no
/// active port) here, or a build without the feature. Returns the device it would use.
#[cfg(feature = "rdma")]
pub fn check() -> Result<String> {
    Ok(slug_rdma::probe()?)
}

/// Without the `rdma` feature: says how to build slug with RDMA verbs.
#[cfg(not(feature = "rdma"))]
pub fn check() -> Result<String> {
    anyhow::bail!("--transport rdma: {NOT_BUILT}")
}

/// The ladder's rdma rows on the device a run would use: what the raw row measures (saying
/// "software emulation" on Soft-RoCE), raw RDMA writes, and slug's rdma link, per size.
#[cfg(feature = "rdma")]
pub fn ladder_rungs(sizes: &[usize], messages: Option<u64>) -> Result<Rows> {
    let fabric = slug_rdma::ladder::RdmaFabric::open()?;
    let raw = rungs(sizes, messages, |size, n| {
        let (a, b) = fabric.raw_pair(size)?;
        ping_pong(n, a, b, |end, first| Ok(end.step(first)?))
    });
    let link = rungs(sizes, messages, |size, n| {
        let [(tx0, rx0), (tx1, rx1)] = fabric.links([ends(0), ends(1)], link_spec(size))?;
        // Side a sends on link 0 and receives on link 1; side b the reverse.
        ping_pong(
            n,
            (tx0, rx1, vec![0u8; 2 * size]),
            (tx1, rx0, vec![0u8; 2 * size]),
            link_step,
        )
    });
    Ok((fabric.raw_kind(), raw, link))
}

/// Without the `rdma` feature: says how to build slug with RDMA verbs.
#[cfg(not(feature = "rdma"))]
pub fn ladder_rungs(_sizes: &[usize], _messages: Option<u64>) -> Result<Rows> {
    anyhow::bail!("--transport rdma: {NOT_BUILT}")
}
