//! Rank 0 gathers what every rank recorded into the trace directory over MPI (no shared file
//! system): each rank lists its scratch directory with BLAKE3 digests; rank 0 accepts only the
//! files that rank's stage produces ([`expected_file`]), asks only for those it lacks
//! (content-addressed chunks and payloads another rank or an earlier run already delivered
//! are skipped), writes each through a new partial file renamed only once its digest matches,
//! then tells the rank to remove its scratch copy and waits for it to confirm.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use slug_transport::pipeline::{
    FILE_PIECE, MAX_COLLECTED_FILE, MAX_COLLECTED_FILES, RecordedFile, expected_file,
    list_recorded_files,
};
use slug_transport::{Result, TransportError};

use crate::MpiWorld;
use crate::link::{recv_from, recv_vec_from, send_to};
use crate::rank::rank_on;

const TAG_LIST: i32 = 30_002;
const TAG_FETCH: i32 = 30_003;
const TAG_PIECE: i32 = 30_004;
const TAG_COLLECTED: i32 = 30_005;
const TAG_CLEANED: i32 = 30_006;
/// Largest file listing rank 0 accepts (MPI counts are `int`).
const MAX_LISTING: usize = 1 << 30;
/// Largest confirmation rank 0 accepts.
const MAX_CONFIRMATION: usize = 64 << 10;

/// A rank's listing: its files, none (nothing recorded), or why it could not list them.
type Listing = std::result::Result<Option<Vec<RecordedFile>>, String>;

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Plain data (strings, numbers, vectors) always serialises.
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<T: serde::de::DeserializeOwned>(rank: usize, what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| TransportError::Protocol {
        peer: format!("rank {rank}"),
        detail: format!("its {what} does not decode: {e}"),
    })
}

/// On a rank other than 0: sends the files recorded in `dir` (if any) to rank 0 (`zero`, as
/// errors name it), then removes `dir` once rank 0 has them all. Every wait on rank 0 is
/// bounded by `timeout`; rank 0 gathers the ranks one after another, so the wait for the
/// list of wanted files includes the gathering of the ranks before this one.
pub fn send_files(dir: Option<&Path>, zero: &str, timeout: Duration) -> Result<()> {
    let listing: Listing = match dir.map(list_recorded_files).transpose() {
        Ok(files) => Ok(files),
        Err(e) => Err(e.to_string()),
    };
    send_to(
        &encode(&listing),
        0,
        TAG_LIST,
        timeout,
        zero,
        "this rank's file listing",
    )?;
    let (Ok(Some(files)), Some(dir)) = (listing, dir) else {
        return Ok(());
    };
    let wanted = recv_vec_from(
        0,
        TAG_FETCH,
        MAX_LISTING,
        timeout,
        zero,
        "the list of files it wants from this rank",
    )?;
    let wanted: Vec<String> = decode(0, "list of wanted files", &wanted)?;
    let mut buf = vec![0u8; FILE_PIECE];
    for p in &wanted {
        let Some(f) = files.iter().find(|f| &f.path == p) else {
            return Err(TransportError::Protocol {
                peer: "rank 0".into(),
                detail: format!("asked for {p:?}, which this rank did not list"),
            });
        };
        let path = dir.join(p);
        let mut file = std::fs::File::open(&path)
            .map_err(|e| TransportError::io(format!("open {}", path.display()), e))?;
        let mut left = f.len;
        let what = format!("a piece of {p:?}");
        while left > 0 {
            let n = left.min(FILE_PIECE as u64) as usize;
            file.read_exact(&mut buf[..n])
                .map_err(|e| TransportError::io(format!("read {}", path.display()), e))?;
            send_to(&buf[..n], 0, TAG_PIECE, timeout, zero, &what)?;
            left -= n as u64;
        }
    }
    let mut done = [0u8; 1];
    recv_from(
        &mut done,
        0,
        TAG_COLLECTED,
        timeout,
        zero,
        "its word that it holds every file of this rank",
    )?;
    let cleaned: std::result::Result<(), String> =
        std::fs::remove_dir_all(dir).map_err(|e| format!("remove {}: {e}", dir.display()));
    send_to(
        &encode(&cleaned),
        0,
        TAG_CLEANED,
        timeout,
        zero,
        "this rank's cleanup confirmation",
    )?;
    cleaned.map_err(|e| TransportError::io(e, std::io::Error::other("scratch copy kept")))
}

/// On rank 0: places its own stage's files from `own` (its scratch directory) and every other
/// rank's from MPI into `into`; then removes `own`. Without `into` (a run that records
/// nothing) every rank must list nothing. Every wait for a rank is bounded by `timeout` (the
/// run's `--timeout-ms`): a rank that stays silent is an error naming it, its host (from
/// `hosts`, by rank) and what was awaited.
pub fn collect_files(
    mpi: &MpiWorld,
    own: Option<&Path>,
    into: Option<&Path>,
    hosts: &[String],
    timeout: Duration,
) -> Result<()> {
    let mut claimed = HashSet::new();
    let nowhere = |r: usize| TransportError::Protocol {
        peer: format!("rank {r}"),
        detail: "it recorded files, but rank 0 collects none (not a recording)".into(),
    };
    if let Some(dir) = own {
        let into = into.ok_or_else(|| nowhere(0))?;
        let files = list_recorded_files(dir)?;
        let wanted = accept(0, files, into, &mut claimed)?;
        for (f, dest) in &wanted {
            let path = dir.join(&f.path);
            let mut src = std::fs::File::open(&path)
                .map_err(|e| TransportError::io(format!("open {}", path.display()), e))?;
            place(0, f, dest, |out, left| {
                let mut buf = vec![0u8; left.min(FILE_PIECE as u64) as usize];
                src.read_exact(&mut buf)
                    .map_err(|e| TransportError::io(format!("read {}", path.display()), e))?;
                write_piece(out, dest, &buf)?;
                Ok(buf)
            })?;
        }
        std::fs::remove_dir_all(dir)
            .map_err(|e| TransportError::io(format!("remove {}", dir.display()), e))?;
    }
    for r in 1..mpi.size() {
        let name = rank_on(hosts, r);
        let listing = recv_vec_from(
            r,
            TAG_LIST,
            MAX_LISTING,
            timeout,
            &name,
            "its list of recorded files",
        )?;
        let files = match decode::<Listing>(r, "file listing", &listing)? {
            Ok(Some(files)) => files,
            Ok(None) => continue,
            Err(e) => {
                return Err(TransportError::Protocol {
                    peer: format!("rank {r}"),
                    detail: format!("could not list what it recorded: {e}"),
                });
            }
        };
        let into = into.ok_or_else(|| nowhere(r))?;
        let wanted = accept(r, files, into, &mut claimed)?;
        let paths: Vec<&str> = wanted.iter().map(|(f, _)| f.path.as_str()).collect();
        crate::rank::fault_stop(0, "gather");
        send_to(
            &encode(&paths),
            r,
            TAG_FETCH,
            timeout,
            &name,
            "the list of files wanted from it",
        )?;
        for (f, dest) in &wanted {
            let awaited = format!("the next piece of {:?}", f.path);
            place(r, f, dest, |out, left| {
                let piece = recv_vec_from(r, TAG_PIECE, FILE_PIECE, timeout, &name, &awaited)?;
                if piece.is_empty() || piece.len() as u64 > left {
                    return Err(TransportError::Protocol {
                        peer: name.clone(),
                        detail: format!(
                            "{}: a piece of {} bytes where at most {left} were due",
                            f.path,
                            piece.len()
                        ),
                    });
                }
                write_piece(out, dest, &piece)?;
                Ok(piece)
            })?;
        }
        send_to(
            &[1u8],
            r,
            TAG_COLLECTED,
            timeout,
            &name,
            "the word that all its files arrived",
        )?;
        let cleaned = recv_vec_from(
            r,
            TAG_CLEANED,
            MAX_CONFIRMATION,
            timeout,
            &name,
            "its confirmation that it removed its scratch copy",
        )?;
        if let Err(e) = decode::<std::result::Result<(), String>>(r, "confirmation", &cleaned)? {
            return Err(TransportError::Protocol {
                peer: format!("rank {r}"),
                detail: format!("could not remove its scratch copy: {e}"),
            });
        }
    }
    Ok(())
}

/// Checks rank `r`'s listing (only its stage's files, bounded, with digests, its log among
/// them) and returns the files to fetch with their destinations.
fn accept(
    r: usize,
    files: Vec<RecordedFile>,
    into: &Path,
    claimed: &mut HashSet<PathBuf>,
) -> Result<Vec<(RecordedFile, PathBuf)>> {
    let refuse = |detail: String| TransportError::Protocol {
        peer: format!("rank {r}"),
        detail,
    };
    if files.len() > MAX_COLLECTED_FILES {
        return Err(refuse(format!(
            "it lists {} recorded files, more than the {MAX_COLLECTED_FILES} accepted",
            files.len()
        )));
    }
    let mut wanted = Vec::new();
    let mut has_log = false;
    let mut listed = HashSet::new();
    for f in files {
        let (rel, content_addressed) = expected_file(r, &f.path).ok_or_else(|| {
            refuse(format!(
                "it listed {:?}, which the recording of stage {r} does not produce; nothing \
                 of it was accepted",
                f.path.escape_debug().to_string()
            ))
        })?;
        if !listed.insert(rel.clone()) {
            return Err(refuse(format!("it listed {:?} twice", f.path)));
        }
        if f.len > MAX_COLLECTED_FILE {
            return Err(refuse(format!(
                "{} is {} bytes, more than the {MAX_COLLECTED_FILE} accepted",
                f.path, f.len
            )));
        }
        if f.digest.len() != 64 || !f.digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(refuse(format!("{} comes without a BLAKE3 digest", f.path)));
        }
        has_log |= !content_addressed && f.path.starts_with("endpoints/");
        let dest = into.join(rel);
        let present = content_addressed
            && std::fs::symlink_metadata(&dest).is_ok_and(|m| m.is_file() && m.len() == f.len);
        if !present && claimed.insert(dest.clone()) {
            wanted.push((f, dest));
        }
    }
    if !has_log {
        return Err(refuse(format!(
            "it did not list endpoints/{r}.slog, the log of the stage it ran"
        )));
    }
    Ok(wanted)
}

/// Writes `f` to `dest` through a new partial file, `next` delivering it piece by piece, and
/// renames it only when its BLAKE3 digest matches the listing.
fn place(
    r: usize,
    f: &RecordedFile,
    dest: &Path,
    mut next: impl FnMut(&mut std::fs::File, u64) -> Result<Vec<u8>>,
) -> Result<()> {
    let failed = |detail: String| TransportError::Protocol {
        peer: format!("rank {r}"),
        detail: format!("{}: {detail}", f.path),
    };
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| TransportError::io(format!("create {}", parent.display()), e))?;
    }
    let mut partial = dest.as_os_str().to_owned();
    partial.push(format!(".partial-mpi-{}", std::process::id()));
    let partial = PathBuf::from(partial);
    // A new file, never through a link or over something already there.
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)
        .map_err(|e| TransportError::io(format!("create {}", partial.display()), e))?;
    let mut hasher = blake3::Hasher::new();
    let mut left = f.len;
    let received = (|| {
        while left > 0 {
            let piece = next(&mut out, left)?;
            hasher.update(&piece);
            left -= piece.len() as u64;
        }
        if hasher.finalize().to_hex().as_str() != f.digest {
            return Err(failed(
                "does not match the digest listed for it; not kept".to_string(),
            ));
        }
        Ok(())
    })();
    drop(out);
    if let Err(e) = received {
        // Half a file is no use to a reader and would only look like one.
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, dest)
        .map_err(|e| TransportError::io(format!("rename {}", partial.display()), e))
}

/// Appends `piece` to the partial file of `dest`.
fn write_piece(out: &mut std::fs::File, dest: &Path, piece: &[u8]) -> Result<()> {
    out.write_all(piece)
        .map_err(|e| TransportError::io(format!("write the partial file of {}", dest.display()), e))
}
