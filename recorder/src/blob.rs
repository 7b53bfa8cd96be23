//! Content-addressed blob store: transfer payloads and Intel PT chunks as zstd files named by
//! the xxh3-128 of their bytes, each stored once however often it recurs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use xxhash_rust::xxh3::xxh3_128;

use crate::error::{RecorderError, Result};

/// A directory of `<h2>/<h32>.zst` blobs (`<trace>/payloads/`).
#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    zstd_level: i32,
    known: Mutex<HashSet<u128>>,
}

impl BlobStore {
    /// Creates the store directory if needed.
    pub fn open(dir: impl AsRef<Path>, zstd_level: i32) -> Result<BlobStore> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| RecorderError::io(&dir, e))?;
        Ok(BlobStore {
            dir,
            zstd_level,
            known: Mutex::new(HashSet::new()),
        })
    }

    /// The file of blob `hash`.
    pub fn path(&self, hash: u128) -> PathBuf {
        let hex = format!("{hash:032x}");
        self.dir.join(&hex[..2]).join(format!("{hex}.zst"))
    }

    /// Whether `hash` was stored through this handle (a cheap check before copying bytes).
    pub fn contains(&self, hash: u128) -> bool {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&hash)
    }

    /// Stores `bytes` (known to hash to `hash`) unless already stored; returns compressed bytes written.
    pub fn put(&self, hash: u128, bytes: &[u8]) -> Result<u64> {
        if !self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hash)
        {
            return Ok(0);
        }
        let path = self.path(hash);
        if path.exists() {
            return Ok(0);
        }
        let compressed = zstd::bulk::compress(bytes, self.zstd_level)
            .map_err(|e| RecorderError::io(&path, e))?;
        let parent = path.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(parent).map_err(|e| RecorderError::io(parent, e))?;
        // Temporary name + rename: a crash never leaves a partial file under a content name.
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let written = std::fs::write(&tmp, &compressed).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            self.known
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&hash);
            return Err(RecorderError::io(&path, e));
        }
        Ok(compressed.len() as u64)
    }

    /// Reads blob `hash` back, checking its content hash.
    pub fn get(&self, hash: u128) -> Result<Vec<u8>> {
        let path = self.path(hash);
        let compressed = match std::fs::read(&path) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RecorderError::MissingChunk { path });
            }
            Err(e) => return Err(RecorderError::io(&path, e)),
        };
        let bytes = zstd::stream::decode_all(compressed.as_slice()).map_err(|e| {
            RecorderError::CorruptChunk {
                path: path.clone(),
                problem: format!("zstd: {e}"),
            }
        })?;
        if xxh3_128(&bytes) != hash {
            return Err(RecorderError::CorruptChunk {
                path,
                problem: "content hash mismatch".into(),
            });
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip_once_and_are_verified() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path(), 1).unwrap();
        let bytes = vec![7u8; 10_000];
        let h = xxh3_128(&bytes);
        assert!(s.put(h, &bytes).unwrap() > 0);
        assert_eq!(s.put(h, &bytes).unwrap(), 0, "stored once");
        assert!(s.contains(h));
        assert_eq!(s.get(h).unwrap(), bytes);
        std::fs::write(s.path(h), zstd::bulk::compress(b"other", 1).unwrap()).unwrap();
        assert!(matches!(s.get(h), Err(RecorderError::CorruptChunk { .. })));
        assert!(matches!(s.get(1), Err(RecorderError::MissingChunk { .. })));
    }
}
