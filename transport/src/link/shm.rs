//! The `shm` backend's fabric file: the coordinator creates one memory-mapped [`Fabric`] per run
//! (in `/dev/shm` where it exists) and every stage process maps it; each link is then a
//! [`ring`] in it, as `local` links are rings in a heap fabric.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{LinkSetup, NodeLinkPlan, StageLinks, ring};
use crate::error::{Result, TransportError};
use crate::fabric::{Fabric, FabricLayout};
use crate::transfer::{Observers, TransportKind};
use crate::wire::AbortFlag;

/// The fabric file of one shm run, created by the coordinator and removed when dropped.
#[derive(Debug)]
pub struct FabricFile {
    fabric: Arc<Fabric>,
    path: PathBuf,
}

impl FabricFile {
    /// Creates a fabric file for `layout` under `/dev/shm` (the temp dir where there is none),
    /// named after this process and the time so that runs never share one.
    pub fn create(layout: FabricLayout) -> Result<Self> {
        let dir = Path::new("/dev/shm");
        let dir = if dir.is_dir() {
            dir.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!(
            "slug-fabric-{}-{}",
            std::process::id(),
            crate::clock::monotonic_ns()
        ));
        let fabric = Arc::new(Fabric::create(&path, layout)?);
        Ok(Self { fabric, path })
    }

    /// Where the nodes map it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The coordinator's own mapping (to abort every wait in it).
    pub fn fabric(&self) -> &Arc<Fabric> {
        &self.fabric
    }

    /// Removes the file's name once every node has mapped it, so that nothing is left in
    /// `/dev/shm` even if this process is killed; the mappings stay valid.
    pub fn unlink(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for FabricFile {
    fn drop(&mut self) {
        self.unlink();
    }
}

/// A node's stage mapped into the run's fabric file.
#[derive(Debug)]
pub(super) struct ShmSetup {
    fabric: Arc<Fabric>,
    plan: NodeLinkPlan,
}

impl ShmSetup {
    pub(super) fn open(plan: NodeLinkPlan) -> Result<Self> {
        let path = plan
            .fabric
            .as_deref()
            .ok_or_else(|| TransportError::Config("shm run without a fabric file".into()))?;
        let fabric = Arc::new(Fabric::open(path, FabricLayout::new(&plan.ring_specs)?)?);
        Ok(Self { fabric, plan })
    }
}

impl LinkSetup for ShmSetup {
    fn address(&self) -> Result<Option<String>> {
        Ok(None)
    }

    fn connect(
        &self,
        _next: Option<&str>,
        observers: &Observers,
        _abort: &AbortFlag,
        _log: &(dyn Fn(&str) + Sync),
    ) -> Result<StageLinks> {
        ring::stage_links(
            &self.fabric,
            self.plan.inbound,
            self.plan.outbound,
            TransportKind::Shm,
            observers,
        )
    }

    fn abort(&self) {
        self.fabric.abort();
    }
}
