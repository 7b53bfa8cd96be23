//! Journals left by older recorders: every record their writer drained, in zstd blocks written
//! before the rings released them. Recorders now keep ring slots until the log frame holding
//! their records is written (the ring is the journal, and each event is compressed once), so
//! they write no journal; [`crate::recover()`] still reads one that a killed older recorder
//! left next to its log.
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

/// An open journal being appended to: the format older recorders wrote. The recorder no longer
/// writes one; this stays so that tests and fuzzing of [`read_journal`] can make journals.
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

/// The most records one block may claim: a writer drains at most every ring's capacity at
/// once, far below this; a larger claim is damage, not a reason to allocate.
const MAX_BLOCK_RECORDS: usize = 1 << 20;

/// Passes every record of every whole block of the journal at `path` to `sink`, in order, and
/// returns how many; a torn or damaged block ends it. Memory is bounded by one block. The file
/// must be a regular file (a link is not followed).
pub fn read_journal(path: impl AsRef<Path>, mut sink: impl FnMut(RawRecord)) -> Result<u64> {
    use std::io::Read;
    let path = path.as_ref();
    let file = crate::recover::open_regular(path)?;
    let mut file = std::io::BufReader::new(file);
    let mut n = 0;
    let mut body = Vec::new();
    loop {
        let mut head = [0u8; BLOCK_HEADER];
        if file.read_exact(&mut head).is_err() {
            break;
        }
        let word = |o: usize| u32::from_le_bytes([head[o], head[o + 1], head[o + 2], head[o + 3]]);
        let (len, count) = (word(0) as usize, word(4) as usize);
        let mut sum = [0u8; 8];
        sum.copy_from_slice(&head[8..16]);
        if count > MAX_BLOCK_RECORDS || len > count * (RawRecord::SIZE + 1) + 1024 {
            break;
        }
        body.resize(len, 0);
        if file.read_exact(&mut body).is_err() || xxh3_64(&body) != u64::from_le_bytes(sum) {
            break;
        }
        let Ok(raw) = zstd::bulk::decompress(&body, count * RawRecord::SIZE) else {
            break;
        };
        if raw.len() != count * RawRecord::SIZE {
            break;
        }
        for chunk in raw.chunks_exact(RawRecord::SIZE) {
            let mut b = [0u8; RawRecord::SIZE];
            b.copy_from_slice(chunk);
            sink(RawRecord::from_bytes(&b));
            n += 1;
        }
    }
    Ok(n)
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
        let mut all = Vec::new();
        assert_eq!(read_journal(&path, |r| all.push(r)).unwrap(), 150);
        assert_eq!(all, (0..150).map(rec).collect::<Vec<_>>());
        // Cut the last block short: the first block still reads.
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap();
        assert_eq!(read_journal(&path, |_| {}).unwrap(), 100);
    }
}
