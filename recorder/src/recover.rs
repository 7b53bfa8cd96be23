//! Recovery of a trace whose recorder was killed: each endpoint log is rebuilt from its journal
//! and what its flight rings still hold, and closed cleanly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use slug_schema::{
    Clock, ENDPOINTS_DIR, Event, LogHeader, LogReader, LogWriter, LostEvents, RawRecord,
    WriterOptions,
};

use crate::endpoint::{fixed_strings, ring_files};
use crate::error::{RecorderError, Result};
use crate::flight::recover_ring;
use crate::journal::read_journal;

/// What recovery did for one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveredEndpoint {
    /// Endpoint id.
    pub endpoint: u32,
    /// Events read from the journal (or, without one, the log's whole frames).
    pub from_log: u64,
    /// Events recovered from flight rings.
    pub from_rings: u64,
    /// Events the rings had dropped (full) before the kill.
    pub ring_lost: u64,
}

/// Rebuilds the endpoint log of every endpoint that left a journal or rings behind (its
/// recorder was killed), from the journal (everything drained) plus the rings (everything
/// appended but not drained), and removes them. A cleanly closed trace is left untouched.
pub fn recover(dir: impl AsRef<Path>) -> Result<Vec<RecoveredEndpoint>> {
    let endpoints = dir.as_ref().join(ENDPOINTS_DIR);
    let mut by_endpoint: BTreeMap<u32, Vec<(PathBuf, Vec<RawRecord>, u64)>> = BTreeMap::new();
    for path in ring_files(&endpoints)? {
        let ring = recover_ring(&path)?;
        by_endpoint
            .entry(ring.endpoint)
            .or_default()
            .push((path, ring.records, ring.lost));
    }
    for path in journal_files(&endpoints)? {
        let id = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u32>().ok());
        if let Some(id) = id {
            by_endpoint.entry(id).or_default();
        }
    }
    let mut out = Vec::new();
    for (endpoint, rings) in by_endpoint {
        out.push(recover_endpoint(&endpoints, endpoint, &rings)?);
        for (path, _, _) in rings {
            std::fs::remove_file(&path).map_err(|e| RecorderError::io(&path, e))?;
        }
        let journal = endpoints.join(format!("{endpoint}.journal"));
        if journal.exists() {
            std::fs::remove_file(&journal).map_err(|e| RecorderError::io(&journal, e))?;
        }
    }
    Ok(out)
}

fn journal_files(endpoints: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(endpoints) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(RecorderError::io(endpoints, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| RecorderError::io(endpoints, e))?.path();
        if path.extension().is_some_and(|e| e == "journal") {
            out.push(path);
        }
    }
    Ok(out)
}

fn recover_endpoint(
    endpoints: &Path,
    endpoint: u32,
    rings: &[(PathBuf, Vec<RawRecord>, u64)],
) -> Result<RecoveredEndpoint> {
    let schema = |e| RecorderError::Schema(Box::new(e));
    let log_path = endpoints.join(format!("{endpoint}.slog"));
    let journal_path = endpoints.join(format!("{endpoint}.journal"));
    let old = match LogReader::open(&log_path) {
        Ok(r) => Some(r),
        // Killed before the log's buffered header reached the disk: the journal has it all.
        Err(_) if journal_path.exists() => None,
        Err(_) if std::fs::metadata(&log_path).map_or(0, |m| m.len()) == 0 => None,
        Err(e) => return Err(schema(e)),
    };
    let header = old.as_ref().map_or_else(
        || LogHeader::new(endpoint, Clock::Monotonic, 0),
        |r| *r.header(),
    );
    let tmp = endpoints.join(format!("{endpoint}.slog.recovering"));
    let mut w = LogWriter::create_with(&tmp, header, WriterOptions::default()).map_err(schema)?;
    // Ids in recovered records refer to the strings every endpoint log interns first.
    let fixed = fixed_strings().count() as u32;
    for name in fixed_strings() {
        w.intern(name);
    }
    if let Some(r) = &old {
        for id in fixed..r.string_count() as u32 {
            w.intern(r.string(id).unwrap_or(""));
        }
    }
    // The journal holds everything the writer drained (a superset of the log's frames); without
    // one, the log's whole frames are what survived.
    let mut from_log = 0;
    if journal_path.exists() {
        for r in read_journal(&journal_path)? {
            w.append_raw(r);
            from_log += 1;
        }
    } else if let Some(r) = &old {
        // A frame that does not decode stays lost (the reader already counts it).
        for frame in r.frames().flatten() {
            for e in &frame.events {
                w.append(e);
                from_log += 1;
            }
        }
    }
    let mut from_rings = 0;
    let mut ring_lost = 0;
    for (_, records, lost) in rings {
        for r in records {
            w.append_raw(*r);
            from_rings += 1;
        }
        ring_lost += lost;
    }
    if ring_lost > 0 {
        let reason = w.intern("flight ring full");
        w.append(&Event::LostEvents(LostEvents {
            count: ring_lost,
            reason,
            from_ns: 0,
            to_ns: 0,
        }));
    }
    w.close().map_err(schema)?;
    std::fs::rename(&tmp, &log_path).map_err(|e| RecorderError::io(&log_path, e))?;
    Ok(RecoveredEndpoint {
        endpoint,
        from_log,
        from_rings,
        ring_lost,
    })
}
