//! The bump arena of one stage: a single anonymous memory map holding everything the stage
//! needs, and the check that it fits in this machine's available memory.

use memmap2::{MmapMut, MmapOptions};

use crate::error::Error;

/// One stage's memory: a single anonymous map, laid out once by
/// [`StageLayout`](crate::StageLayout) into weights | KV cache | activations | workspace.
///
/// The arena plus a [`StageCursor`](crate::StageCursor) is the whole state of a stage, so a
/// snapshot is a copy of [`bytes`](StageArena::bytes) and a restore is a copy into
/// [`bytes_mut`](StageArena::bytes_mut). The map is page-aligned; transports may register it
/// (shared memory, RDMA) through [`as_mut_ptr`](StageArena::as_mut_ptr).
#[derive(Debug)]
pub struct StageArena {
    map: MmapMut,
    huge_pages: bool,
}

impl StageArena {
    /// Maps `bytes` of zeroed anonymous memory, refusing sizes above `MemAvailable`, and advises
    /// transparent huge pages where the kernel supports them.
    pub fn new(bytes: usize) -> Result<StageArena, Error> {
        check_fits(bytes as u64)?;
        let len = bytes.max(1);
        let map = MmapOptions::new()
            .len(len)
            .map_anon()
            .map_err(|source| Error::Map { bytes: len, source })?;
        #[cfg(target_os = "linux")]
        let huge_pages = map.advise(memmap2::Advice::HugePage).is_ok();
        #[cfg(not(target_os = "linux"))]
        let huge_pages = false;
        Ok(StageArena { map, huge_pages })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the arena is empty (never, since at least one byte is mapped).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether the kernel accepted the transparent-huge-page advice.
    pub fn huge_pages(&self) -> bool {
        self.huge_pages
    }

    /// The whole arena: a snapshot is a copy of these bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The whole arena, writable: a restore copies a snapshot into it.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }

    /// Base address, for transports that register the memory.
    pub fn as_ptr(&self) -> *const u8 {
        self.map.as_ptr()
    }

    /// Base address, writable, for transports that register the memory.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.map.as_mut_ptr()
    }
}

/// `MemAvailable` from `/proc/meminfo`, in bytes, where the system reports it.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Refuses `bytes` above `MemAvailable` (allowed when the system does not report it).
pub fn check_fits(bytes: u64) -> Result<(), Error> {
    match mem_available() {
        Some(available) if bytes > available => Err(Error::ArenaTooLarge {
            needed: bytes,
            needed_mib: bytes >> 20,
            available,
            available_mib: available >> 20,
        }),
        _ => Ok(()),
    }
}
