//! The `--out` directory of a recording: checked before the run, and, under `--force`, an old
//! trace there replaced. `--force` replaces only what is recognisably a slug trace and removes
//! only the trace's own files; anything else is refused, naming the path.

use std::path::{Path, PathBuf};

use slug_schema::{ENDPOINTS_DIR, MANIFEST_FILE, PAYLOADS_DIR, SNAPSHOTS_DIR, Trace};

use crate::error::{RecorderError, Result};
use crate::observe::NODE_REPORTS_DIR;

/// The probe file that checks `--out` is writable.
const WRITE_PROBE: &str = ".slug-write-test";

/// Directories a trace holds (besides the manifest).
const TRACE_DIRS: [&str; 4] = [ENDPOINTS_DIR, SNAPSHOTS_DIR, PAYLOADS_DIR, NODE_REPORTS_DIR];

/// Space a recording needs up front: preallocated files (flight rings) and why.
#[derive(Debug, Clone)]
pub(crate) struct SpaceNeeded {
    /// Bytes.
    pub bytes: u64,
    /// What they are for, e.g. "2 endpoints × a flight ring of 8.0 MiB".
    pub what: String,
    /// Room kept for the first writes of the logs and journals besides.
    pub headroom: u64,
}

/// Checks `out` before anything runs: its parent must be a directory, `out` must be absent or
/// empty, or, with `force`, a slug trace (which is then emptied of its own files), and its file
/// system must have room for what the recording preallocates.
pub(crate) fn prepare_out(out: &Path, force: bool, space: Option<&SpaceNeeded>) -> Result<()> {
    let bad = |problem: String| RecorderError::OutputDir {
        path: out.to_path_buf(),
        problem,
    };
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        // Name the first ancestor that exists if it is a file: `afile/x` is not "missing".
        let file = parent
            .ancestors()
            .find(|a| !a.as_os_str().is_empty() && a.exists())
            .filter(|a| !a.is_dir());
        return Err(bad(match file {
            Some(f) => format!(
                "{} is a file, not a directory; choose an --out inside a directory",
                f.display()
            ),
            None => format!(
                "the parent directory {} does not exist; create it first",
                parent.display()
            ),
        }));
    }
    if out.exists() {
        if !out.is_dir() {
            return Err(bad(
                "exists and is not a directory; choose another --out".into()
            ));
        }
        let mut entries = std::fs::read_dir(out).map_err(|e| RecorderError::io(out, e))?;
        if entries.next().is_some() {
            if !force {
                return Err(bad(
                    "exists and is not empty; choose another --out or pass --force to replace \
                     the slug trace there"
                        .into(),
                ));
            }
            replace_trace(out)?;
        }
    }
    if let Some(space) = space {
        let at = if out.exists() { out } else { parent.as_path() };
        let free = free_bytes(at).map_err(|e| RecorderError::io(at, e))?;
        if free < space.bytes + space.headroom {
            return Err(bad(format!(
                "its file system has {} free, but recording needs {} before the run starts: {} \
                 (preallocated, so a full disk shows now and not mid-run) and room for the logs' \
                 first writes; free some space or choose another --out",
                human_bytes(free),
                human_bytes(space.bytes + space.headroom),
                space.what
            )));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| RecorderError::io(out, e))?;
    // Writable? Fail now, not after the model is built.
    let probe_file = out.join(WRITE_PROBE);
    std::fs::write(&probe_file, b"").map_err(|e| {
        bad(format!(
            "cannot write there ({e}); check permissions or choose another --out"
        ))
    })?;
    let _ = std::fs::remove_file(&probe_file);
    Ok(())
}

/// `--force` on a non-empty `out`: checks that it is a slug trace that may be replaced, every
/// entry of it included, and only then removes the trace's files (never following a link).
fn replace_trace(out: &Path) -> Result<()> {
    let refuse = |problem: String| RecorderError::OutputDir {
        path: out.to_path_buf(),
        problem: format!("--force refused: {problem}"),
    };
    let canon = out.canonicalize().map_err(|e| RecorderError::io(out, e))?;
    if canon.parent().is_none() {
        return Err(refuse("it is the root directory".into()));
    }
    let home = std::env::var_os("HOME").and_then(|h| Path::new(&h).canonicalize().ok());
    if home.as_deref() == Some(canon.as_path()) {
        return Err(refuse("it is your home directory".into()));
    }
    if let Ok(cwd) = std::env::current_dir().and_then(|c| c.canonicalize())
        && cwd.starts_with(&canon)
    {
        return Err(refuse(format!(
            "it is the current directory or one of its ancestors ({}); choose another --out",
            canon.display()
        )));
    }
    if let Err(e) = Trace::open(out) {
        return Err(refuse(format!(
            "it is not a slug trace ({e}); --force only replaces a trace slug wrote: remove it \
             yourself or choose another --out"
        )));
    }
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(out).map_err(|e| RecorderError::io(out, e))? {
        let entry = entry.map_err(|e| RecorderError::io(out, e))?;
        let path = entry.path();
        let ty = entry.file_type().map_err(|e| RecorderError::io(&path, e))?;
        let name = entry.file_name();
        let name = name.to_str().unwrap_or("");
        if ty.is_dir() && TRACE_DIRS.contains(&name) {
            check_tree(&path, &refuse)?;
            dirs.push(path);
        } else if ty.is_file()
            && [MANIFEST_FILE, &format!("{MANIFEST_FILE}.tmp"), WRITE_PROBE].contains(&name)
        {
            files.push(path);
        } else {
            return Err(refuse(format!(
                "{} is not part of a slug trace; move it away or choose another --out",
                path.display()
            )));
        }
    }
    for dir in dirs {
        // Holds only regular files and directories (checked above); std does not follow links.
        std::fs::remove_dir_all(&dir).map_err(|e| RecorderError::io(&dir, e))?;
    }
    // The manifest last: an interrupted replacement is still recognisably a trace.
    files.sort_by_key(|p| p.ends_with(MANIFEST_FILE));
    for file in files {
        std::fs::remove_file(&file).map_err(|e| RecorderError::io(&file, e))?;
    }
    Ok(())
}

/// Checks that `dir` holds only regular files and directories (a trace never holds links).
fn check_tree(dir: &Path, refuse: &dyn Fn(String) -> RecorderError) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| RecorderError::io(dir, e))? {
        let entry = entry.map_err(|e| RecorderError::io(dir, e))?;
        let path = entry.path();
        let ty = entry.file_type().map_err(|e| RecorderError::io(&path, e))?;
        if ty.is_dir() {
            check_tree(&path, refuse)?;
        } else if !ty.is_file() {
            return Err(refuse(format!(
                "{} is a link or special file, which slug never writes into a trace; remove it \
                 yourself or choose another --out",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Bytes an unprivileged process may still write on the file system holding `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path; `buf` is written by the call before it is read.
    let mut buf: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut buf) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(buf.f_bavail.saturating_mul(buf.f_frsize))
}

/// Bytes in KiB or MiB with one decimal.
pub(crate) fn human_bytes(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    }
}
