//! Opening a file a trace names, safely: the path must stay inside the trace directory (no
//! absolute path, no `..`, no symlink on the way), the file must be a regular file (not a
//! device, FIFO or socket), and it is read only up to a stated bound.
//!
//! A trace may come from someone else, so every path it names is untrusted input.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Result, SchemaError};

/// Largest `manifest.json` a reader accepts (a real one is a few hundred KiB).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// Checks that `rel` is a relative path of plain names (no root, no `..`, no `.` tricks).
fn check_relative(dir: &Path, rel: &Path) -> Result<()> {
    let refuse = |reason: &str| SchemaError::UnsafePath {
        dir: dir.to_path_buf(),
        path: rel.to_path_buf(),
        reason: reason.to_owned(),
    };
    if rel.as_os_str().is_empty() {
        return Err(refuse("it is empty"));
    }
    for c in rel.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(refuse("it climbs out with `..`")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse(
                    "it is absolute; a trace names files relative to itself",
                ));
            }
        }
    }
    Ok(())
}

/// Opens `dir/rel` for reading when `rel` stays inside `dir`: every component below `dir` is
/// checked not to be a symlink, the file is opened with `O_NOFOLLOW | O_NONBLOCK` (a FIFO
/// cannot block the open) and must then be a regular file of at most `max_len` bytes.
/// Returns the file and its length.
pub fn open_in(dir: &Path, rel: &Path, max_len: u64) -> Result<(File, u64)> {
    check_relative(dir, rel)?;
    let refuse = |reason: String| SchemaError::UnsafePath {
        dir: dir.to_path_buf(),
        path: rel.to_path_buf(),
        reason,
    };
    let mut at = dir.to_path_buf();
    for c in rel.components() {
        let Component::Normal(name) = c else {
            continue;
        };
        at.push(name);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(refuse(format!(
                    "{} is a symbolic link; a trace's files must lie inside it",
                    at.display()
                )));
            }
            Ok(_) => {}
            Err(e) => return Err(SchemaError::io(&at, e)),
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&at)
        .map_err(|e| SchemaError::io(&at, e))?;
    let meta = file.metadata().map_err(|e| SchemaError::io(&at, e))?;
    if !meta.is_file() {
        return Err(refuse(format!(
            "{} is not a regular file (a directory, device, FIFO or socket?)",
            at.display()
        )));
    }
    if meta.len() > max_len {
        return Err(refuse(format!(
            "{} is {} bytes, more than the {max_len} bytes allowed for it",
            at.display(),
            meta.len()
        )));
    }
    Ok((file, meta.len()))
}

/// Reads `dir/rel` whole under the rules of [`open_in`]; a file that grows past `max_len`
/// while being read is refused too.
pub fn read_in(dir: &Path, rel: &Path, max_len: u64) -> Result<Vec<u8>> {
    let (file, len) = open_in(dir, rel, max_len)?;
    let path = dir.join(rel);
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max_len.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| SchemaError::io(&path, e))?;
    if bytes.len() as u64 > max_len {
        return Err(SchemaError::UnsafePath {
            dir: dir.to_path_buf(),
            path: rel.to_path_buf(),
            reason: format!("it grew past the {max_len} bytes allowed while being read"),
        });
    }
    Ok(bytes)
}

/// `dir/rel` after [`check_relative`]: the path a trace names, for messages and callers that
/// open it themselves through [`open_in`].
pub fn join_in(dir: &Path, rel: &Path) -> Result<PathBuf> {
    check_relative(dir, rel)?;
    Ok(dir.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("ok"), b"yes").unwrap();
        assert_eq!(read_in(d, Path::new("ok"), 10).unwrap(), b"yes");
        for bad in ["../../etc/passwd", "/etc/passwd", ""] {
            let e = read_in(d, Path::new(bad), 10).unwrap_err().to_string();
            assert!(e.contains("outside") || e.contains("refused"), "{bad}: {e}");
        }
        std::os::unix::fs::symlink("/etc/passwd", d.join("link")).unwrap();
        let e = read_in(d, Path::new("link"), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("symbolic link"), "{e}");
        std::fs::create_dir(d.join("sub")).unwrap();
        std::os::unix::fs::symlink("/dev", d.join("sub/dev")).unwrap();
        let e = read_in(d, Path::new("sub/dev/zero"), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let e = read_in(d, Path::new("ok"), 2).unwrap_err().to_string();
        assert!(e.contains("more than the 2 bytes"), "{e}");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_in(dir.path(), Path::new("fifo"), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
