//! The endpoint journal: every record the writer drained, in zstd blocks written with plain
//! `write` calls before the rings release them, so a killed recorder loses nothing it drained.
//!
//! The schema's log writer buffers frames in process memory before they reach the file; the
//! journal closes that window. A clean close deletes it; [`crate::recover()`] rebuilds a log
//! from it (plus the rings' leftovers) after a kill.
//!
//! Block: `u32 compressed length`, `u32 record count`, `u64 xxh3-64 of the compressed bytes`,
//! then zstd of the records' bytes. A torn last block fails its checksum and is ignored.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use slug_schema::RawRecord;
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{RecorderError, Result};

const BLOCK_HEADER: usize = 16;

/// An open journal being appended to.
pub struct Journal {
    path: PathBuf,
    file: File,
    raw: Vec<u8>,
    /// Reused: a zstd context costs more to set up than a small block costs to compress.
    compressor: zstd::bulk::Compressor<'static>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Creates (truncating) the journal at `path`.
    pub fn create(path: impl AsRef<Path>) -> Result<Journal> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).map_err(|e| RecorderError::io(&path, e))?;
        let compressor = zstd::bulk::Compressor::new(1).map_err(|e| RecorderError::io(&path, e))?;
        Ok(Journal {
            path,
            file,
            raw: Vec::new(),
            compressor,
        })
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `records` as one block; when this returns they are in the file (page cache).
    pub fn append(&mut self, records: &[RawRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        self.raw.clear();
        for r in records {
            self.raw.extend_from_slice(&r.to_bytes());
        }
        let compressed = self
            .compressor
            .compress(&self.raw)
            .map_err(|e| RecorderError::io(&self.path, e))?;
        let mut block = Vec::with_capacity(BLOCK_HEADER + compressed.len());
        block.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
        block.extend_from_slice(&(records.len() as u32).to_le_bytes());
        block.extend_from_slice(&xxh3_64(&compressed).to_le_bytes());
        block.extend_from_slice(&compressed);
        self.file
            .write_all(&block)
            .map_err(|e| RecorderError::io(&self.path, e))
    }
}

/// Reads every whole block of the journal at `path`, in order; a torn or damaged tail ends it.
pub fn read_journal(path: impl AsRef<Path>) -> Result<Vec<RawRecord>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| RecorderError::io(path, e))?;
    let mut out = Vec::new();
    let mut at = 0;
    while at + BLOCK_HEADER <= bytes.len() {
        let word = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
        let (len, count) = (word(at) as usize, word(at + 4) as usize);
        let sum = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap_or([0; 8]));
        let Some(body) = bytes.get(at + BLOCK_HEADER..at + BLOCK_HEADER + len) else {
            break;
        };
        if xxh3_64(body) != sum {
            break;
        }
        let Ok(raw) = zstd::bulk::decompress(body, count * RawRecord::SIZE) else {
            break;
        };
        if raw.len() != count * RawRecord::SIZE {
            break;
        }
        for chunk in raw.chunks_exact(RawRecord::SIZE) {
            let mut b = [0u8; RawRecord::SIZE];
            b.copy_from_slice(chunk);
            out.push(RawRecord::from_bytes(&b));
        }
        at += BLOCK_HEADER + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use slug_schema::{Event, StepBoundary};

    fn rec(n: u64) -> RawRecord {
        RawRecord::from_event(&Event::StepBoundary(StepBoundary {
            step: n,
            seq: 1,
            ns: n,
        }))
    }

    #[test]
    fn blocks_round_trip_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.journal");
        let mut j = Journal::create(&path).unwrap();
        j.append(&(0..100).map(rec).collect::<Vec<_>>()).unwrap();
        j.append(&[]).unwrap();
        j.append(&(100..150).map(rec).collect::<Vec<_>>()).unwrap();
        let all = read_journal(&path).unwrap();
        assert_eq!(all, (0..150).map(rec).collect::<Vec<_>>());
        // Cut the last block short: the first block still reads.
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap();
        assert_eq!(read_journal(&path).unwrap().len(), 100);
    }
}
