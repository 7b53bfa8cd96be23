//! Recovery of a trace whose recorder was killed: finding what it left behind (journals, flight
//! rings, temporary files) without writing anything, rebuilding endpoint logs from them, and,
//! only in [`recover()`] (`slug recover`), putting the rebuilt logs in place and cleaning up.
//!
//! Rules (the trace may come from anyone): every file is read only if it is a regular file (a
//! link is never followed), one damaged file costs only what it held, a rebuilt log is written
//! under a new name created with `O_EXCL | O_NOFOLLOW`, read back and checked before it replaces
//! anything, and a log is never replaced by one with fewer events.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::Serialize;
use slug_schema::{
    Clock, ENDPOINTS_DIR, Event, FooterState, LogHeader, LogReader, LogWriter, LostEvents,
    MANIFEST_FILE, PAYLOADS_DIR, SNAPSHOTS_DIR, Trace, WriterOptions,
};

use crate::endpoint::fixed_strings;
use crate::error::{RecorderError, Result};
use crate::flight::recover_ring;
use crate::journal::read_journal;
use slug_schema::snapshot::CHUNKS_DIR;

/// Opens `path` for reading only if it is a regular file: a symbolic link is not followed and a
/// FIFO or device is refused without blocking.
pub(crate) fn open_regular(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| RecorderError::io(path, e))?;
    let meta = file.metadata().map_err(|e| RecorderError::io(path, e))?;
    if !meta.is_file() {
        return Err(RecorderError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file; slug reads only the regular files it wrote",
            ),
        ));
    }
    Ok(file)
}

/// What a killed recorder left for one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EndpointLeftovers {
    /// `endpoints/<id>.journal`: everything the writer drained.
    pub journal: Option<PathBuf>,
    /// `endpoints/<id>.t<thread>.ring`: what the threads appended and the writer had not drained.
    pub rings: Vec<PathBuf>,
    /// The endpoint's log was closed cleanly (valid footer): the leftovers hold nothing more
    /// (the writer drains every ring before it closes the log) and only need removing.
    pub log_closed: bool,
}

/// Everything a killed recording (or a killed `slug recover`) left in a trace, found without
/// writing anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Leftovers {
    /// Per endpoint id.
    pub endpoints: BTreeMap<u32, EndpointLeftovers>,
    /// Temporary files of interrupted writes: `manifest.json.tmp`,
    /// `snapshots/chunks/<xx>/<hash>.tmp.<pid>.<n>`, `snapshots/stage-<s>/step-<n>.tmp.<pid>.<n>`,
    /// `payloads/<xx>/<hash>.tmp.<pid>` and `endpoints/<id>.slog.recovering.<pid>`. Readers
    /// never open them.
    pub temporary: Vec<PathBuf>,
    /// Files named like leftovers that are not regular files (links, FIFOs...) or belong to no
    /// endpoint of the manifest: never read, never removed.
    pub ignored: Vec<PathBuf>,
}

impl Leftovers {
    /// Finds the leftovers in trace `dir`; reads directory listings and log headers only.
    pub fn scan(dir: impl AsRef<Path>) -> Result<Leftovers> {
        let dir = dir.as_ref();
        let mut out = Leftovers::default();
        // Only the manifest's endpoints are recovered: a trace cannot make recovery rebuild
        // (and allocate for) endpoints it does not have.
        let known: BTreeSet<u32> = Trace::open(dir)
            .map(|t| t.manifest().endpoints.iter().map(|e| e.id).collect())
            .unwrap_or_default();
        let endpoints = dir.join(ENDPOINTS_DIR);
        for (path, name, entry) in out.listing_of_subdir(&endpoints)? {
            let kind = if let Some(id) = name.strip_suffix(".journal").and_then(number) {
                Some((Some(id), true))
            } else if let Some((id, thread)) =
                name.strip_suffix(".ring").and_then(|n| n.split_once(".t"))
            {
                number(id)
                    .filter(|_| number(thread).is_some())
                    .map(|id| (Some(id), false))
            } else if name
                .split_once(".slog.recovering.")
                .is_some_and(|(id, pid)| number(id).is_some() && number(pid).is_some())
            {
                Some((None, false))
            } else {
                None
            };
            let Some((id, journal)) = kind else {
                continue;
            };
            if entry != Kind::File || id.is_some_and(|id| !known.contains(&id)) {
                out.ignored.push(path);
                continue;
            }
            match id {
                None => out.temporary.push(path),
                Some(id) => {
                    let e = out.endpoints.entry(id).or_default();
                    if journal {
                        e.journal = Some(path);
                    } else {
                        e.rings.push(path);
                    }
                }
            }
        }
        for (id, e) in &mut out.endpoints {
            e.rings.sort();
            e.log_closed = closed_log(&endpoints.join(format!("{id}.slog")));
        }
        let manifest_tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
        if let Ok(meta) = std::fs::symlink_metadata(&manifest_tmp) {
            if meta.is_file() {
                out.temporary.push(manifest_tmp);
            } else {
                out.ignored.push(manifest_tmp);
            }
        }
        let snapshots = dir.join(SNAPSHOTS_DIR);
        for (sub, name, kind) in out.listing_of_subdir(&snapshots)? {
            if name == CHUNKS_DIR && kind == Kind::Dir {
                for (fan, _, kind) in listing(&sub)? {
                    if kind == Kind::Dir {
                        out.temporary_in(&fan, |n| tmp_of(n, is_hash, 2))?;
                    }
                }
            } else if name.starts_with("stage-") && kind == Kind::Dir {
                out.temporary_in(&sub, |n| {
                    tmp_of(n, |s| s.strip_prefix("step-").and_then(number).is_some(), 2)
                })?;
            }
        }
        for (fan, _, kind) in out.listing_of_subdir(&dir.join(PAYLOADS_DIR))? {
            if kind == Kind::Dir {
                out.temporary_in(&fan, |n| tmp_of(n, is_hash, 1))?;
            }
        }
        out.temporary.sort();
        Ok(out)
    }

    /// The entries of a trace's own subdirectory; one that is a link (or not a directory) is
    /// reported and not listed, so nothing outside the trace is ever read or removed.
    fn listing_of_subdir(&mut self, dir: &Path) -> Result<Vec<(PathBuf, String, Kind)>> {
        match std::fs::symlink_metadata(dir) {
            Ok(m) if m.is_dir() => listing(dir),
            Ok(_) => {
                self.ignored.push(dir.to_path_buf());
                Ok(Vec::new())
            }
            Err(_) => Ok(Vec::new()),
        }
    }

    fn temporary_in(&mut self, dir: &Path, matches: impl Fn(&str) -> bool) -> Result<()> {
        for (path, name, kind) in listing(dir)? {
            if matches(&name) {
                if kind == Kind::File {
                    self.temporary.push(path);
                } else {
                    self.ignored.push(path);
                }
            }
        }
        Ok(())
    }

    /// Endpoints whose recorder was killed: leftovers and no cleanly closed log.
    pub fn killed(&self) -> Vec<u32> {
        self.endpoints
            .iter()
            .filter(|(_, e)| !e.log_closed)
            .map(|(id, _)| *id)
            .collect()
    }

    /// One line for a reading command: what was left behind and that `slug recover` fixes it;
    /// `None` when nothing was.
    pub fn notice(&self, dir: &Path) -> Option<String> {
        let killed = self.killed();
        if !killed.is_empty() {
            let ids: Vec<String> = killed.iter().map(u32::to_string).collect();
            return Some(format!(
                "this recording was killed: endpoint{} {} left a journal or flight rings instead \
                 of a closed log; run `slug recover {}` to rebuild {} for good",
                if ids.len() == 1 { "" } else { "s" },
                ids.join(", "),
                dir.display(),
                if ids.len() == 1 { "it" } else { "them" },
            ));
        }
        let files = self.temporary.len()
            + self
                .endpoints
                .values()
                .map(|e| e.rings.len() + usize::from(e.journal.is_some()))
                .sum::<usize>();
        (files > 0).then(|| {
            format!(
                "{files} leftover file{} of an interrupted write (ignored); `slug recover {}` \
                 removes {}",
                if files == 1 { "" } else { "s" },
                dir.display(),
                if files == 1 { "it" } else { "them" },
            )
        })
    }
}

/// What a directory entry is, by its own type: a link is never followed, so it is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Other,
}

/// Entries of `dir` as (path, UTF-8 name, kind). A missing `dir` has none.
fn listing(dir: &Path) -> Result<Vec<(PathBuf, String, Kind)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(RecorderError::io(dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| RecorderError::io(dir, e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let ty = entry.file_type().map_err(|e| RecorderError::io(dir, e))?;
        let kind = if ty.is_file() {
            Kind::File
        } else if ty.is_dir() {
            Kind::Dir
        } else {
            Kind::Other
        };
        out.push((entry.path(), name, kind));
    }
    Ok(out)
}

fn number(s: &str) -> Option<u32> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

fn is_hash(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `name` is `<stem>.tmp.<n1>[.<n2>...]` with `numbers` numbers and `stem_ok(stem)`.
fn tmp_of(name: &str, stem_ok: impl Fn(&str) -> bool, numbers: usize) -> bool {
    let Some((stem, rest)) = name.split_once(".tmp.") else {
        return false;
    };
    let parts: Vec<&str> = rest.split('.').collect();
    stem_ok(stem) && parts.len() == numbers && parts.iter().all(|p| number(p).is_some())
}

/// Whether `log` is a regular file holding a log with a valid footer.
fn closed_log(log: &Path) -> bool {
    std::fs::symlink_metadata(log).is_ok_and(|m| m.is_file())
        && LogReader::open(log).is_ok_and(|r| r.recovery().footer == FooterState::Valid)
}

/// What happened to one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Its log was rebuilt (and, in `slug recover`, put in place).
    Rebuilt,
    /// Its log was already closed cleanly; the leftovers were redundant.
    AlreadyClosed,
    /// The existing log held more events than the rebuild: it was kept.
    KeptLog,
    /// Nothing could be done; the reason.
    Failed(String),
}

/// What recovery did (or, for a reading command, would do) for one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveredEndpoint {
    /// Endpoint id.
    pub endpoint: u32,
    /// What happened.
    pub outcome: Outcome,
    /// Events taken from the journal.
    pub from_journal: u64,
    /// Events taken from the old log's whole frames (no usable journal, or it held fewer).
    pub from_log: u64,
    /// Events recovered from flight rings.
    pub from_rings: u64,
    /// Events the rings had dropped (full) before the kill.
    pub ring_lost: u64,
    /// Events the endpoint's log held before.
    pub old_events: u64,
    /// Events in the rebuilt log (including one lost-events record when rings had dropped some).
    pub events: u64,
    /// Files that could not be read, and what that cost.
    pub damage: Vec<String>,
}

/// What [`recover()`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RecoveryReport {
    /// Per endpoint that had leftovers.
    pub endpoints: Vec<RecoveredEndpoint>,
    /// Leftover files removed (journals and rings now in a log, temporary files).
    pub removed: Vec<PathBuf>,
    /// Files named like leftovers that are not regular files: left alone.
    pub ignored: Vec<PathBuf>,
}

impl RecoveryReport {
    /// Whether every endpoint came out with a log at least as complete as before.
    pub fn succeeded(&self) -> bool {
        self.endpoints
            .iter()
            .all(|e| !matches!(e.outcome, Outcome::Failed(_)))
    }
}

/// The logs of a killed recording rebuilt into a private temporary directory (outside the
/// trace, removed when this is dropped), so reading commands can show them without writing
/// into the trace.
#[derive(Debug)]
pub struct Preview {
    _dir: tempfile::TempDir,
    /// Rebuilt log per endpoint id (only the killed endpoints).
    pub logs: BTreeMap<u32, PathBuf>,
    /// What each rebuild found.
    pub endpoints: Vec<RecoveredEndpoint>,
    /// What the scan found.
    pub leftovers: Leftovers,
}

/// Rebuilds, without touching trace `dir`, the log of every endpoint whose recorder was killed.
pub fn preview(dir: impl AsRef<Path>) -> Result<Preview> {
    let dir = dir.as_ref();
    let leftovers = Leftovers::scan(dir)?;
    let tmp = tempfile::Builder::new()
        .prefix("slug-preview-")
        .tempdir()
        .map_err(|e| RecorderError::io(std::env::temp_dir(), e))?;
    let mut logs = BTreeMap::new();
    let mut endpoints = Vec::new();
    for id in leftovers.killed() {
        let out = tmp.path().join(format!("{id}.slog"));
        // One endpoint that cannot be rebuilt costs only that endpoint.
        let e = rebuild(dir, id, &leftovers.endpoints[&id], &out).unwrap_or_else(|err| {
            RecoveredEndpoint {
                outcome: Outcome::Failed(err.to_string()),
                ..RecoveredEndpoint::new(id)
            }
        });
        if e.outcome == Outcome::Rebuilt {
            logs.insert(id, out);
        }
        endpoints.push(e);
    }
    Ok(Preview {
        _dir: tmp,
        logs,
        endpoints,
        leftovers,
    })
}

/// `slug recover`: rebuilds the log of every endpoint whose recorder was killed from its journal
/// (or its log's whole frames, whichever holds more) plus what its flight rings still hold, puts
/// each rebuilt log in place once it reads back whole and holds at least as many events as the
/// log it replaces, then removes the leftovers it used and the temporary files of interrupted
/// writes (regular files with slug's own names only). A cleanly closed trace is left untouched.
pub fn recover(dir: impl AsRef<Path>) -> Result<RecoveryReport> {
    let dir = dir.as_ref();
    let leftovers = Leftovers::scan(dir)?;
    let endpoints_dir = dir.join(ENDPOINTS_DIR);
    let mut report = RecoveryReport {
        ignored: leftovers.ignored.clone(),
        ..RecoveryReport::default()
    };
    let mut remove = leftovers.temporary.clone();
    for (&id, left) in &leftovers.endpoints {
        let used = left.journal.iter().chain(&left.rings).cloned();
        if left.log_closed {
            remove.extend(used);
            report.endpoints.push(RecoveredEndpoint {
                outcome: Outcome::AlreadyClosed,
                ..RecoveredEndpoint::new(id)
            });
            continue;
        }
        let tmp = endpoints_dir.join(format!("{id}.slog.recovering.{}", std::process::id()));
        let log = endpoints_dir.join(format!("{id}.slog"));
        let e = match rebuild(dir, id, left, &tmp) {
            Ok(e) => e,
            Err(err) => RecoveredEndpoint {
                outcome: Outcome::Failed(err.to_string()),
                ..RecoveredEndpoint::new(id)
            },
        };
        match e.outcome {
            Outcome::Rebuilt => {
                if let Err(err) = std::fs::rename(&tmp, &log) {
                    report.endpoints.push(RecoveredEndpoint {
                        outcome: Outcome::Failed(RecorderError::io(&log, err).to_string()),
                        ..e
                    });
                    continue;
                }
                remove.extend(used);
            }
            // The rebuild never replaced anything: only the file it created goes.
            Outcome::KeptLog => remove.push(tmp),
            Outcome::AlreadyClosed | Outcome::Failed(_) => {}
        }
        report.endpoints.push(e);
    }
    for path in remove {
        // Each was a regular file when scanned; removing a name never follows a link.
        match std::fs::remove_file(&path) {
            Ok(()) => report.removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(RecorderError::io(&path, e)),
        }
    }
    Ok(report)
}

impl RecoveredEndpoint {
    fn new(endpoint: u32) -> RecoveredEndpoint {
        RecoveredEndpoint {
            endpoint,
            outcome: Outcome::Rebuilt,
            from_journal: 0,
            from_log: 0,
            from_rings: 0,
            ring_lost: 0,
            old_events: 0,
            events: 0,
            damage: Vec::new(),
        }
    }
}

/// Rebuilds endpoint `id`'s log of trace `dir` into the new file `out` (created with
/// `O_EXCL | O_NOFOLLOW`; on failure it is removed again), reads it back and checks it.
fn rebuild(dir: &Path, id: u32, left: &EndpointLeftovers, out: &Path) -> Result<RecoveredEndpoint> {
    let schema = |e| RecorderError::Schema(Box::new(e));
    let mut rec = RecoveredEndpoint::new(id);
    let log_path = dir.join(ENDPOINTS_DIR).join(format!("{id}.slog"));
    let old = match std::fs::symlink_metadata(&log_path) {
        Err(_) => None,
        Ok(m) if !m.is_file() => {
            rec.damage.push(format!(
                "{}: not a regular file; not read",
                log_path.display()
            ));
            None
        }
        Ok(_) => match LogReader::open(&log_path) {
            Ok(r) => Some(r),
            // Killed before the log's buffered header reached the disk: nothing to read there.
            Err(_) if std::fs::metadata(&log_path).is_ok_and(|m| m.len() == 0) => None,
            Err(e) => {
                rec.damage.push(format!("{e}; its frames are not used"));
                None
            }
        },
    };
    rec.old_events = old.as_ref().map_or(0, |r| {
        r.frames().flatten().map(|f| f.events.len() as u64).sum()
    });
    let journal_events = match &left.journal {
        None => None,
        Some(j) => match read_journal(j, |_| {}) {
            Ok(n) => Some(n),
            Err(e) => {
                rec.damage.push(format!("{e}; the journal is not used"));
                None
            }
        },
    };
    let header = old
        .as_ref()
        .map_or_else(|| LogHeader::new(id, Clock::Monotonic, 0), |r| *r.header());
    let mut w =
        LogWriter::create_new_with(out, header, WriterOptions::default()).map_err(schema)?;
    let written = (|| {
        // Ids in recovered records refer to the strings every endpoint log interns first.
        let fixed = fixed_strings().count() as u32;
        for name in fixed_strings() {
            w.intern(name);
        }
        if let Some(r) = &old {
            for s in fixed..r.string_count() as u32 {
                w.intern(r.string(s).unwrap_or(""));
            }
        }
        // The journal holds everything the writer drained (a superset of the log's frames),
        // unless it is damaged: then the log's whole frames are the better source.
        match journal_events {
            Some(n) if n >= rec.old_events => {
                rec.from_journal = read_journal(left.journal.as_ref().expect("read above"), |r| {
                    w.append_raw(r);
                })?;
            }
            _ => {
                if let Some(r) = &old {
                    // A frame that does not decode stays lost (the reader counts it).
                    for frame in r.frames().flatten() {
                        for e in &frame.events {
                            w.append(e);
                            rec.from_log += 1;
                        }
                    }
                }
            }
        }
        // One ring in memory at a time (each is bounded by MAX_RING_RECORDS).
        for path in &left.rings {
            match recover_ring(path) {
                Ok(ring) if ring.endpoint == id => {
                    for r in &ring.records {
                        w.append_raw(*r);
                        rec.from_rings += 1;
                    }
                    rec.ring_lost += ring.lost;
                }
                Ok(ring) => rec.damage.push(format!(
                    "{}: a ring of endpoint {}, not {id}; not used",
                    path.display(),
                    ring.endpoint
                )),
                Err(e) => rec.damage.push(format!(
                    "{e}; the events its thread had not handed to the writer are lost"
                )),
            }
        }
        if rec.ring_lost > 0 {
            let reason = w.intern("flight ring full");
            w.append(&Event::LostEvents(LostEvents {
                count: rec.ring_lost,
                reason,
                from_ns: 0,
                to_ns: 0,
            }));
        }
        let stats = w.close().map_err(schema)?;
        // Read it back: only a log that opens whole, with every event decoding, may replace one.
        let back = LogReader::open(out).map_err(schema)?;
        let decoded: u64 = back
            .frames()
            .map(|f| f.map(|f| f.events.len() as u64))
            .sum::<std::result::Result<u64, _>>()
            .map_err(schema)?;
        if back.recovery().footer != FooterState::Valid || decoded != stats.events {
            return Err(RecorderError::io(
                out,
                std::io::Error::other(format!(
                    "the rebuilt log does not read back whole ({decoded} of {} events); the \
                     original files are kept",
                    stats.events
                )),
            ));
        }
        Ok(stats.events)
    })();
    match written {
        Ok(events) => {
            rec.events = events;
            if events < rec.old_events {
                rec.outcome = Outcome::KeptLog;
            }
            Ok(rec)
        }
        Err(e) => {
            // `out` was created above by this call (create_new), so it is ours to remove.
            let _ = std::fs::remove_file(out);
            Err(e)
        }
    }
}
