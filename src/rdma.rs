//! `--transport rdma`: the RDMA verbs backend (`slug-rdma`). Built only with the `rdma` cargo
//! feature; without it every rdma path says how to get it.

use anyhow::Result;

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
