//! `TraceSummary`: what `slug info` reports about a trace. Every count comes from decoded
//! events, never from frame headers alone: a frame whose checksum passes but whose batch does
//! not decode counts as corrupt, and its header's counts are not reported.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::Event;
use crate::event::EventKind;
use crate::frame::Clock;
use crate::raw::RawRecord;
use crate::reader::{LogReader, Recovery};
use crate::time::TimeRange;
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
    /// The endpoint whose log this one continues (the stage moved here from its node).
    pub continues: Option<u32>,
    /// The stage's forward steps this endpoint ran, `[first, end)` (set when the stage moved).
    pub steps: Option<[u64; 2]>,
    /// Log file.
    pub log: PathBuf,
    /// Why the log could not be opened; the other fields are then zero.
    pub error: Option<String>,
    /// Events in readable frames.
    pub events: u64,
    /// Events per kind, by [`EventKind::name`].
    pub counts: BTreeMap<String, u64>,
    /// From the earliest event's start to the latest event's end, on the endpoint node's clock.
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
    /// The same, per reason the lost-events records give ("perf ring full", ...).
    pub lost_by_reason: BTreeMap<String, u64>,
    /// Frames that passed their checksum but failed to decode (also in `recovery.corrupt_frames`).
    pub undecodable_frames: u64,
    /// Inconsistencies between the manifest and the log (wrong endpoint id, implausible clock
    /// offset), each a sentence.
    pub problems: Vec<String>,
}

/// Largest clock offset between two nodes believed: CLOCK_MONOTONIC counts from boot, and no
/// node has been up for ten years. Beyond it an offset is reported as damage and not applied.
pub const MAX_CLOCK_OFFSET_NS: u64 = 10 * 365 * 24 * 3600 * 1_000_000_000;

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
    /// The manifest's MPI table (a `--transport mpi` recording): communicator, per link its
    /// ranks and tags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mpi: Option<crate::MpiTable>,
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
            let mut problems = Vec::new();
            let offset = if offset.unsigned_abs() > MAX_CLOCK_OFFSET_NS {
                problems.push(format!(
                    "clock offset of node {} is implausible ({offset} ns, more than ten years); \
                     not applied",
                    ep.node
                ));
                None
            } else {
                Some(offset)
            };
            let mut s = EndpointSummary {
                id: ep.id,
                node: ep.node.clone(),
                stage: ep.stage,
                rank: ep.rank,
                continues: ep.continues,
                steps: ep.steps,
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
                lost_by_reason: BTreeMap::new(),
                undecodable_frames: 0,
                problems,
            };
            let opened = match logs.get(&ep.id) {
                // A log rebuilt in memory by a reader of a killed recording, outside the trace.
                Some(rebuilt) => LogReader::open(rebuilt),
                None => trace.log_of(ep),
            };
            match opened {
                Err(e) => s.error = Some(e.to_string()),
                Ok(log) => {
                    let l = LogSummary::of(&log);
                    if l.endpoint != ep.id {
                        s.problems.push(format!(
                            "the log belongs to endpoint {} but the manifest lists it as \
                             endpoint {}",
                            l.endpoint, ep.id
                        ));
                    }
                    for (t, c) in totals.iter_mut().zip(&l.by_kind) {
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
                    s.lost_by_reason = l.lost_by_reason;
                    s.undecodable_frames = l.undecodable_frames;
                    if let (Some(r), Some(offset)) = (s.time_span, offset) {
                        let shifted = r
                            .start_ns
                            .checked_add_signed(offset)
                            .zip(r.end_ns.checked_add_signed(offset));
                        match shifted {
                            Some((a, b)) => {
                                let r = TimeRange::new(a, b);
                                span = Some(span.map_or(r, |x| x.hull(r)));
                            }
                            None => s.problems.push(format!(
                                "clock offset of node {} ({offset} ns) moves its times out of \
                                 range; not applied",
                                ep.node
                            )),
                        }
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
            mpi: m.mpi.clone(),
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
    /// The same, per reason the lost-events records give (at most [`MAX_LOSS_REASONS`]
    /// reasons of at most 200 characters each; further ones count as `other reasons`).
    pub lost_by_reason: BTreeMap<String, u64>,
    /// Frames that passed their checksum but failed to decode (also in `recovery.corrupt_frames`).
    pub undecodable_frames: u64,
    #[serde(skip)]
    by_kind: [u64; EventKind::COUNT],
}

impl LogSummary {
    /// Summarises an open log, decoding every frame: counts and times are those of events that
    /// decode; a frame that does not decode is counted corrupt.
    pub fn of(log: &LogReader) -> LogSummary {
        let mut counts = [0u64; EventKind::COUNT];
        let mut lost_events = 0u64;
        let mut lost_by_reason = BTreeMap::new();
        let mut undecodable_frames = 0u64;
        let mut frames = 0u64;
        let mut span: Option<TimeRange> = None;
        let mut recovery = *log.recovery();
        for info in log.index() {
            if info.is_empty() {
                frames += 1;
                continue;
            }
            let Ok(frame) = log.decode_frame(info) else {
                undecodable_frames += 1;
                recovery.corrupt_frames += 1;
                recovery.corrupt_bytes += info.len();
                recovery.frames = recovery.frames.saturating_sub(1);
                continue;
            };
            frames += 1;
            for e in &frame.events {
                counts[e.kind() as usize] += 1;
                if let Event::LostEvents(l) = e {
                    lost_events = lost_events.saturating_add(l.count);
                    let reason = loss_reason(log.string(l.reason), &lost_by_reason);
                    let n: &mut u64 = lost_by_reason.entry(reason).or_default();
                    *n = n.saturating_add(l.count);
                }
                let r = TimeRange::new(e.ns(), e.end_ns().max(e.ns()));
                span = Some(span.map_or(r, |x| x.hull(r)));
            }
        }
        let events = counts.iter().sum();
        LogSummary {
            path: log.path().to_path_buf(),
            endpoint: log.header().endpoint,
            clock: log.header().clock,
            created_unix_ns: log.header().created_unix_ns,
            events,
            counts: named(&counts),
            time_span: span,
            bytes: log.file_len(),
            raw_bytes: events * RawRecord::SIZE as u64,
            frames,
            strings: log.string_count() as u64,
            recovery,
            lost_events,
            lost_by_reason,
            undecodable_frames,
            by_kind: counts,
        }
    }
}

/// Distinct loss reasons a summary keeps per log: a log's strings are untrusted input.
pub const MAX_LOSS_REASONS: usize = 32;

/// The key a lost-events record with interned reason `text` counts under.
fn loss_reason(text: Option<&str>, seen: &BTreeMap<String, u64>) -> String {
    let text = match text {
        Some(t) => t.chars().take(200).collect::<String>(),
        None => "unknown reason (its string is missing)".to_owned(),
    };
    if seen.contains_key(&text) || seen.len() < MAX_LOSS_REASONS - 1 {
        text
    } else {
        "other reasons".to_owned()
    }
}

fn named(counts: &[u64; EventKind::COUNT]) -> BTreeMap<String, u64> {
    EventKind::ALL
        .iter()
        .map(|k| (k.name().to_owned(), counts[*k as usize]))
        .collect()
}
