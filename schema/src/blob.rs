//! Content-addressed blob store: transfer payloads and Intel PT chunks as zstd files named by
//! the xxh3-128 of their bytes, each stored once however often it recurs.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use xxhash_rust::xxh3::xxh3_128;

use crate::error::{Result, SchemaError};

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
        std::fs::create_dir_all(&dir).map_err(|e| SchemaError::io(&dir, e))?;
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
        let compressed =
            zstd::bulk::compress(bytes, self.zstd_level).map_err(|e| SchemaError::io(&path, e))?;
        let parent = path.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(parent).map_err(|e| SchemaError::io(parent, e))?;
        // Temporary name + rename: a crash never leaves a partial file under a content name.
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let written = std::fs::write(&tmp, &compressed).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            self.known
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&hash);
            return Err(SchemaError::io(&path, e));
        }
        Ok(compressed.len() as u64)
    }

    /// Reads blob `hash` back, checking its content hash. `len` is the size the trace says it
    /// has (a transfer's length): the compressed file may be at most zstd's bound for that size
    /// and decompression stops there, so a crafted blob (a zstd bomb) fails fast in bounded
    /// memory. The file must be a regular file inside the store (no symlink, FIFO or device).
    pub fn get(&self, hash: u128, len: u64) -> Result<Vec<u8>> {
        let path = self.path(hash);
        let hex = format!("{hash:032x}");
        let rel = Path::new(&hex[..2]).join(format!("{hex}.zst"));
        let corrupt = |problem: String| SchemaError::CorruptPayload {
            path: path.clone(),
            problem,
        };
        // zstd's worst case is `len + len / 256` plus a small constant; be generous.
        let max_compressed = len.saturating_add(len / 128).saturating_add(1024);
        let compressed = match crate::contained::read_in(&self.dir, &rel, max_compressed) {
            Ok(c) => c,
            Err(SchemaError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Err(SchemaError::MissingPayload { path });
            }
            Err(e) => return Err(corrupt(e.to_string())),
        };
        // Streamed, never pre-allocated from `len`: memory grows only with real output, and
        // stops one byte past what the trace claims.
        let mut bytes = Vec::new();
        zstd::stream::read::Decoder::new(compressed.as_slice())
            .and_then(|d| d.take(len.saturating_add(1)).read_to_end(&mut bytes))
            .map_err(|e| {
                corrupt(format!(
                    "zstd: {e} (the trace says the payload has {len} bytes)"
                ))
            })?;
        if bytes.len() as u64 != len {
            return Err(corrupt(format!(
                "decompressed to {} bytes, the trace says {len}",
                bytes.len()
            )));
        }
        if xxh3_128(&bytes) != hash {
            return Err(corrupt("content hash mismatch".into()));
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
        assert_eq!(s.get(h, 10_000).unwrap(), bytes);
        std::fs::write(s.path(h), zstd::bulk::compress(b"other", 1).unwrap()).unwrap();
        assert!(matches!(
            s.get(h, 10_000),
            Err(SchemaError::CorruptPayload { .. })
        ));
        let missing = s.get(1, 10).unwrap_err();
        assert!(matches!(missing, SchemaError::MissingPayload { .. }));
        assert!(missing.to_string().contains("payload"), "{missing}");
        assert!(!missing.to_string().contains("snapshot"), "{missing}");
    }

    #[test]
    fn a_zstd_bomb_stops_at_the_size_the_trace_gives() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path(), 1).unwrap();
        // 256 MiB of zeros compresses to a few KiB; the trace claims a 4 KiB transfer.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..256 {
            std::io::Write::write_all(&mut enc, &zeros).unwrap();
        }
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 200_000, "{}", bomb.len());
        let h = 0x1234_u128;
        let p = s.path(h);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &bomb).unwrap();
        // Refused by its file size: more than zstd could need for 4 KiB.
        let e = s.get(h, 4096).unwrap_err();
        assert!(matches!(e, SchemaError::CorruptPayload { .. }), "{e}");
        assert!(e.to_string().contains("more than the"), "{e}");
        // Small enough for a 1 MiB claim, but decompression stops at 1 MiB of output.
        let e = s.get(h, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("the trace says 1048576"), "{e}");
    }
}
