//! `TraceSummary`: what `slug info` reports about a trace, computed from indexes (not event data).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::Event;
use crate::event::{EventKind, KindSet};
use crate::frame::Clock;
use crate::raw::RawRecord;
use crate::reader::{LogReader, Recovery, TimeRange};
use crate::trace::{Capability, Trace};

/// Summary of one endpoint log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointSummary {
    /// Endpoint id.
    pub id: u32,
    /// Node it ran on.
    pub node: String,
    /// Pipeline stage.
    pub stage: u32,
    /// Process rank.
    pub rank: u32,
    /// Log file.
    pub log: PathBuf,
    /// Why the log could not be opened; the other fields are then zero.
    pub error: Option<String>,
    /// Events in readable frames.
    pub events: u64,
    /// Events per kind, by [`EventKind::name`].
    pub counts: BTreeMap<String, u64>,
    /// First and last timestamps, on the endpoint node's clock.
    pub time_span: Option<TimeRange>,
    /// File size.
    pub bytes: u64,
    /// The same events as raw 128-byte records.
    pub raw_bytes: u64,
    /// Readable frames.
    pub frames: u64,
    /// Damage found while opening (footer, corrupt frames, truncation).
    pub recovery: Option<Recovery>,
    /// Events the recorder itself reported lost (sum of lost-events records).
    pub lost_events: u64,
    /// Frames that passed their checksum but failed to decode.
    pub undecodable_frames: u64,
}

/// Summary of a whole trace directory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceSummary {
    /// The trace directory.
    pub dir: PathBuf,
    /// Trace format version.
    pub format_version: u32,
    /// Whether the manifest marks the trace as synthetic.
    pub synthetic: bool,
    /// Distinct nodes.
    pub nodes: usize,
    /// Per endpoint, in manifest order.
    pub endpoints: Vec<EndpointSummary>,
    /// Events in all logs.
    pub events: u64,
    /// Events per kind over all logs, by [`EventKind::name`].
    pub counts: BTreeMap<String, u64>,
    /// First and last timestamps over all logs, on the reference clock (node offsets applied).
    pub time_span: Option<TimeRange>,
    /// Bytes of all logs on disk.
    pub bytes: u64,
    /// The same events as raw 128-byte records.
    pub raw_bytes: u64,
    /// Frames skipped as corrupt, over all logs.
    pub corrupt_frames: u64,
    /// Bytes lost to truncation, over all logs.
    pub truncated_bytes: u64,
    /// Events recorded as lost, over all logs.
    pub lost_events: u64,
    /// Capabilities from the manifest.
    pub capabilities: Vec<Capability>,
}

impl TraceSummary {
    /// Summarises `trace`. A log that cannot be opened is reported in its endpoint's `error`.
    pub fn of(trace: &Trace) -> TraceSummary {
        TraceSummary::of_with_logs(trace, &BTreeMap::new())
    }

    /// [`TraceSummary::of`], reading endpoint `id`'s log from `logs[id]` where given (a log
    /// rebuilt outside the trace, e.g. of a killed recording); the summary still names the
    /// trace's own log path.
    pub fn of_with_logs(trace: &Trace, logs: &BTreeMap<u32, PathBuf>) -> TraceSummary {
        let m = trace.manifest();
        let mut totals = [0u64; EventKind::COUNT];
        let mut span: Option<TimeRange> = None;
        let mut endpoints = Vec::new();
        for ep in &m.endpoints {
            let offset = m
                .clocks
                .iter()
                .find(|c| c.node == ep.node)
                .map_or(0, |c| c.offset_ns);
            let mut s = EndpointSummary {
                id: ep.id,
                node: ep.node.clone(),
                stage: ep.stage,
                rank: ep.rank,
                log: trace.dir().join(&ep.log),
                error: None,
                events: 0,
                counts: BTreeMap::new(),
                time_span: None,
                bytes: 0,
                raw_bytes: 0,
                frames: 0,
                recovery: None,
                lost_events: 0,
                undecodable_frames: 0,
            };
            match LogReader::open(logs.get(&ep.id).unwrap_or(&s.log)) {
                Err(e) => s.error = Some(e.to_string()),
                Ok(log) => {
                    let l = LogSummary::of(&log);
                    for (t, c) in totals.iter_mut().zip(log.counts()) {
                        *t += c;
                    }
                    s.counts = l.counts;
                    s.events = l.events;
                    s.time_span = l.time_span;
                    s.bytes = l.bytes;
                    s.raw_bytes = l.raw_bytes;
                    s.frames = l.frames;
                    s.recovery = Some(l.recovery);
                    s.lost_events = l.lost_events;
                    s.undecodable_frames = l.undecodable_frames;
                    if let Some(r) = s.time_span {
                        let shift = |ns: u64| ns.saturating_add_signed(offset);
                        let r = TimeRange::new(shift(r.start_ns), shift(r.end_ns));
                        span = Some(span.map_or(r, |a| {
                            TimeRange::new(a.start_ns.min(r.start_ns), a.end_ns.max(r.end_ns))
                        }));
                    }
                }
            }
            endpoints.push(s);
        }
        let mut nodes: Vec<&str> = m.endpoints.iter().map(|e| e.node.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let sum = |f: fn(&EndpointSummary) -> u64| endpoints.iter().map(f).sum::<u64>();
        TraceSummary {
            dir: trace.dir().to_path_buf(),
            format_version: m.format_version,
            synthetic: m
                .run
                .get("synthetic")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
            nodes: nodes.len(),
            events: totals.iter().sum(),
            counts: named(&totals),
            time_span: span,
            bytes: sum(|e| e.bytes),
            raw_bytes: sum(|e| e.raw_bytes),
            corrupt_frames: sum(|e| e.recovery.map_or(0, |r| r.corrupt_frames)),
            truncated_bytes: sum(|e| e.recovery.map_or(0, |r| r.truncated_bytes)),
            lost_events: sum(|e| e.lost_events),
            capabilities: m.capabilities.clone(),
            endpoints,
        }
    }

    /// Whether every log opened (damage inside a log is reported, not an error).
    pub fn all_logs_readable(&self) -> bool {
        self.endpoints.iter().all(|e| e.error.is_none())
    }
}

/// Summary of one `.slog` file on its own (no manifest).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogSummary {
    /// The file.
    pub path: PathBuf,
    /// Endpoint id from the header.
    pub endpoint: u32,
    /// Clock from the header.
    pub clock: Clock,
    /// Creation time from the header (Unix ns).
    pub created_unix_ns: u64,
    /// Events in readable frames.
    pub events: u64,
    /// Events per kind, by [`EventKind::name`].
    pub counts: BTreeMap<String, u64>,
    /// First and last timestamps on the log's clock.
    pub time_span: Option<TimeRange>,
    /// File size.
    pub bytes: u64,
    /// The same events as raw 128-byte records.
    pub raw_bytes: u64,
    /// Readable frames.
    pub frames: u64,
    /// Interned strings that survived.
    pub strings: u64,
    /// Damage found while opening.
    pub recovery: Recovery,
    /// Events the recorder itself reported lost (sum of lost-events records).
    pub lost_events: u64,
    /// Frames that passed their checksum but failed to decode.
    pub undecodable_frames: u64,
}

impl LogSummary {
    /// Summarises an open log (decodes only frames holding lost-events records).
    pub fn of(log: &LogReader) -> LogSummary {
        let counts = log.counts();
        let events = counts.iter().sum();
        let mut lost_events = 0;
        let mut undecodable_frames = 0;
        for e in log.events_in(TimeRange::ALL, KindSet::of(&[EventKind::LostEvents])) {
            match e {
                Ok(Event::LostEvents(l)) => lost_events += l.count,
                Ok(_) => {}
                Err(_) => undecodable_frames += 1,
            }
        }
        LogSummary {
            path: log.path().to_path_buf(),
            endpoint: log.header().endpoint,
            clock: log.header().clock,
            created_unix_ns: log.header().created_unix_ns,
            events,
            counts: named(&counts),
            time_span: log.time_span(),
            bytes: log.file_len(),
            raw_bytes: events * RawRecord::SIZE as u64,
            frames: log.index().len() as u64,
            strings: log.string_count() as u64,
            recovery: *log.recovery(),
            lost_events,
            undecodable_frames,
        }
    }
}

fn named(counts: &[u64; EventKind::COUNT]) -> BTreeMap<String, u64> {
    EventKind::ALL
        .iter()
        .map(|k| (k.name().to_owned(), counts[*k as usize]))
        .collect()
}
