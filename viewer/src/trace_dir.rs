//! The trace-directory source: `slug_schema::Trace` and its endpoint logs seen through the
//! viewer's `TraceSource`, with node clock offsets applied and interned strings merged into one
//! table for the trace.

use std::collections::HashMap;
use std::path::Path;

use slug_schema::{Event, FooterState, FrameInfo, LogReader, StringId, Trace};

use crate::error::{Result, ViewerError};
use crate::state::event::{
    EndpointIx, EventKind, KindCounts, Migration, Names, Nanos, TimeRange, TraceEvent, Transfer,
};
use crate::state::source::{EndpointInfo, FrameSummary, LogHealth, TraceSource};

/// One endpoint log, opened.
#[derive(Debug)]
struct EndpointLog {
    reader: LogReader,
    /// Index entries of the frames that hold events, aligned with `summaries`.
    infos: Vec<FrameInfo>,
    summaries: Vec<FrameSummary>,
    /// Offset from the node's clock to the trace-global clock.
    offset_ns: i64,
    /// The log's string ids → the trace's ([`Names`]).
    string_ids: HashMap<StringId, StringId>,
}

/// A trace directory opened for viewing or export.
#[derive(Debug)]
pub struct TraceDirSource {
    endpoints: Vec<EndpointInfo>,
    logs: Vec<EndpointLog>,
    /// Endpoint id (as in transfers) → index in `endpoints`.
    index_of: HashMap<u32, EndpointIx>,
    names: Names,
    mpi: Option<slug_schema::MpiTable>,
}

impl TraceDirSource {
    /// Opens the trace in `dir`: its manifest and every endpoint log's index (no event is decoded).
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.exists() {
            return Err(ViewerError::TraceMissing {
                path: dir.to_path_buf(),
            });
        }
        let unreadable = |path: &Path, e: slug_schema::SchemaError| ViewerError::TraceUnreadable {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let trace = Trace::open(dir).map_err(|e| unreadable(dir, e))?;
        let manifest = trace.manifest();
        let clock_of: HashMap<&str, i64> = manifest
            .clocks
            .iter()
            .map(|c| (c.node.as_str(), c.offset_ns))
            .collect();
        let mut endpoints = Vec::new();
        let mut logs = Vec::new();
        let mut index_of = HashMap::new();
        let mut names = Names::default();
        for (i, ep) in manifest.endpoints.iter().enumerate() {
            let path = dir.join(&ep.log);
            // Through the trace: the path must stay inside it and be a regular file.
            let reader = trace.log_of(ep).map_err(|e| unreadable(&path, e))?;
            let offset_ns = clock_of.get(ep.node.as_str()).copied().unwrap_or(0);
            let infos: Vec<FrameInfo> = reader
                .index()
                .iter()
                .filter(|f| !f.is_empty())
                .copied()
                .collect();
            let summaries = infos
                .iter()
                .map(|f| {
                    let mut counts = KindCounts::default();
                    for kind in EventKind::ALL {
                        counts.add(kind, u64::from(f.count(kind)));
                    }
                    FrameSummary {
                        range: TimeRange::new(shift(f.t_min, offset_ns), shift(f.t_max, offset_ns)),
                        counts,
                    }
                })
                .collect();
            index_of.insert(ep.id, i);
            endpoints.push(EndpointInfo {
                id: ep.id,
                name: format!("{}/s{}", ep.node, ep.stage),
                node: ep.node.clone(),
                stage: ep.stage,
                rank: ep.rank,
            });
            let string_ids = reader
                .strings()
                .into_iter()
                .map(|(id, s)| (id, names.intern(s)))
                .collect();
            logs.push(EndpointLog {
                reader,
                infos,
                summaries,
                offset_ns,
                string_ids,
            });
        }
        Ok(Self {
            endpoints,
            logs,
            index_of,
            names,
            mpi: trace.manifest().mpi.clone(),
        })
    }

    fn endpoint_ix(&self, id: u32) -> EndpointIx {
        // An id the manifest does not list still gets a distinct index past the known ones, so
        // flows to it stay paired; views name it `?`.
        self.index_of
            .get(&id)
            .copied()
            .unwrap_or(self.endpoints.len() + id as usize)
    }

    /// The event on the trace-global clock, its strings in the trace's [`Names`] (an id the
    /// log never defined becomes one no name has, shown as `?`).
    fn convert(&self, log: &EndpointLog, e: &Event) -> TraceEvent {
        let t = |ns: u64| shift(ns, log.offset_ns);
        let name = |id: StringId| log.string_ids.get(&id).copied().unwrap_or(StringId::MAX);
        match *e {
            Event::KernelSpan(k) => TraceEvent::KernelSpan(slug_schema::KernelSpan {
                kernel: name(k.kernel),
                start_ns: t(k.start_ns),
                end_ns: t(k.end_ns),
                ..k
            }),
            Event::Transfer(x) => TraceEvent::Transfer(Box::new(Transfer {
                record: slug_schema::Transfer {
                    post_ns: t(x.post_ns),
                    complete_ns: t(x.complete_ns),
                    ..x
                },
                src: self.endpoint_ix(x.src_endpoint),
                dst: self.endpoint_ix(x.dst_endpoint),
            })),
            Event::StepBoundary(s) => {
                TraceEvent::StepBoundary(slug_schema::StepBoundary { ns: t(s.ns), ..s })
            }
            Event::Snapshot(s) => {
                TraceEvent::Snapshot(Box::new(slug_schema::SnapshotEvent { ns: t(s.ns), ..s }))
            }
            Event::PerfSample(p) => {
                TraceEvent::PerfSample(slug_schema::PerfSample { ns: t(p.ns), ..p })
            }
            Event::PtChunk(p) => {
                TraceEvent::PtChunk(Box::new(slug_schema::PtChunk { ns: t(p.ns), ..p }))
            }
            Event::Ebpf(b) => TraceEvent::Ebpf(slug_schema::EbpfEvent { ns: t(b.ns), ..b }),
            Event::PerfSoftware(b) => {
                TraceEvent::PerfSoftware(slug_schema::SoftwareRecord { ns: t(b.ns), ..b })
            }
            Event::LostEvents(l) => TraceEvent::LostEvents(slug_schema::LostEvents {
                from_ns: t(l.from_ns),
                to_ns: t(l.to_ns),
                reason: name(l.reason),
                ..l
            }),
            Event::Marker(m) => TraceEvent::Marker(slug_schema::Marker {
                ns: t(m.ns),
                text: name(m.text),
            }),
            Event::Counter(c) => TraceEvent::Counter(slug_schema::Counter {
                ns: t(c.ns),
                name: name(c.name),
                ..c
            }),
            Event::Migration(m) => TraceEvent::Migration(Migration {
                record: slug_schema::MigrationEvent { ns: t(m.ns), ..m },
                peer: self.endpoint_ix(m.peer),
            }),
        }
    }
}

/// A node-clock time on the trace-global clock (clamped at 0 rather than wrapping).
fn shift(ns: u64, offset: i64) -> Nanos {
    (i128::from(ns) + i128::from(offset)).clamp(0, i128::from(u64::MAX)) as Nanos
}

impl TraceSource for TraceDirSource {
    fn endpoints(&self) -> &[EndpointInfo] {
        &self.endpoints
    }

    fn mpi(&self) -> Option<&slug_schema::MpiTable> {
        self.mpi.as_ref()
    }

    fn frames(&self, endpoint: EndpointIx) -> &[FrameSummary] {
        self.logs
            .get(endpoint)
            .map_or(&[], |l| l.summaries.as_slice())
    }

    fn frame_events(&self, endpoint: EndpointIx, frame: usize) -> Result<Vec<TraceEvent>> {
        let Some((log, info)) = self
            .logs
            .get(endpoint)
            .and_then(|l| Some((l, l.infos.get(frame)?)))
        else {
            return Ok(Vec::new());
        };
        let decoded = log
            .reader
            .decode_frame(info)
            .map_err(|e| ViewerError::FrameUnreadable {
                endpoint: self.endpoints[endpoint].name.clone(),
                frame,
                reason: e.to_string(),
            })?;
        Ok(decoded
            .events
            .iter()
            .map(|e| self.convert(log, e))
            .collect())
    }

    fn health(&self, endpoint: EndpointIx) -> LogHealth {
        let Some(log) = self.logs.get(endpoint) else {
            return LogHealth::default();
        };
        let r = log.reader.recovery();
        let mut notes = Vec::new();
        match r.footer {
            FooterState::Valid => {}
            FooterState::Missing => notes.push("log not closed (no index footer)".to_string()),
            FooterState::Corrupt => notes.push("index footer damaged".to_string()),
        }
        if r.corrupt_frames > 0 {
            notes.push(format!(
                "{} corrupt frames skipped ({} bytes)",
                r.corrupt_frames, r.corrupt_bytes
            ));
        }
        if r.truncated_bytes > 0 {
            notes.push(format!(
                "{} bytes cut short, about {} events lost",
                r.truncated_bytes, r.events_in_partial_frame
            ));
        }
        LogHealth {
            lost_events: r.events_in_partial_frame,
            truncated_bytes: r.truncated_bytes,
            note: notes.join("; "),
        }
    }

    fn names(&self) -> &Names {
        &self.names
    }
}
