//! The trace-directory source: `slug_schema::Trace` and its endpoint logs seen through the
//! viewer's `TraceSource`, with node clock offsets applied and interned strings resolved.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use slug_schema::{
    EbpfKind, Event, FooterState, FrameInfo, LogReader, SoftwareKind, StringId, Trace,
};

use crate::error::{Result, ViewerError};
use crate::state::event::{
    CounterReading, EndpointIx, EventKind, KernelSpan, KindCounts, LostEvents, Nanos, PerfSample,
    PtChunk, SnapshotEvent, StepBoundary, SystemEvent, SystemKind, SystemSource, TimeRange,
    TraceEvent, Transfer, UserMarker,
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
    /// Resolved strings, shared by every event that names them.
    strings: Mutex<HashMap<StringId, Arc<str>>>,
}

/// A trace directory opened for viewing or export.
#[derive(Debug)]
pub struct TraceDirSource {
    endpoints: Vec<EndpointInfo>,
    logs: Vec<EndpointLog>,
    /// Endpoint id (as in transfers) → index in `endpoints`.
    index_of: HashMap<u32, EndpointIx>,
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
            logs.push(EndpointLog {
                reader,
                infos,
                summaries,
                offset_ns,
                strings: Mutex::new(HashMap::new()),
            });
        }
        Ok(Self {
            endpoints,
            logs,
            index_of,
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

    fn convert(&self, log: &EndpointLog, e: &Event) -> TraceEvent {
        let t = |ns: u64| shift(ns, log.offset_ns);
        let string = |id: StringId| -> Arc<str> {
            let mut cache = log.strings.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(
                cache
                    .entry(id)
                    .or_insert_with(|| match log.reader.string(id) {
                        Some(s) => Arc::from(s),
                        None => Arc::from(format!("string#{id}").as_str()),
                    }),
            )
        };
        match e {
            Event::KernelSpan(k) => TraceEvent::Kernel(KernelSpan {
                start: t(k.start_ns),
                end: t(k.end_ns),
                kernel: string(k.kernel),
                step: k.step,
                layer: k.layer,
                thread: k.thread,
                seq: k.seq,
                rows: (k.row_start, k.row_end),
                output_hash: k.output_hash.map(Box::new),
            }),
            Event::Transfer(x) => TraceEvent::Transfer(Box::new(Transfer {
                record: slug_schema::Transfer {
                    post_ns: t(x.post_ns),
                    complete_ns: t(x.complete_ns),
                    ..*x
                },
                src: self.endpoint_ix(x.src_endpoint),
                dst: self.endpoint_ix(x.dst_endpoint),
            })),
            Event::StepBoundary(s) => TraceEvent::Step(StepBoundary { ns: t(s.ns), ..*s }),
            Event::Snapshot(s) => {
                TraceEvent::Snapshot(Box::new(SnapshotEvent { ns: t(s.ns), ..*s }))
            }
            Event::PerfSample(p) => TraceEvent::Perf(PerfSample { ns: t(p.ns), ..*p }),
            Event::PtChunk(p) => TraceEvent::Pt(Box::new(PtChunk { ns: t(p.ns), ..*p })),
            Event::Ebpf(b) => TraceEvent::System(SystemEvent {
                t: t(b.ns),
                kind: match b.kind {
                    EbpfKind::Syscall => SystemKind::Syscall,
                    EbpfKind::OffCpu => SystemKind::OffCpu,
                    EbpfKind::PageFault => SystemKind::PageFault,
                    EbpfKind::Migration => SystemKind::Migration,
                    EbpfKind::SyscallHistogram => SystemKind::SyscallHistogram,
                    EbpfKind::TcpRetransmit => SystemKind::TcpRetransmit,
                    EbpfKind::TcpDrop => SystemKind::TcpDrop,
                },
                source: SystemSource::Ebpf,
                args: [b.arg0, b.arg1, b.arg2],
                pid: b.pid,
                tid: b.tid,
                cpu: b.cpu,
            }),
            Event::PerfSoftware(b) => TraceEvent::System(SystemEvent {
                t: t(b.ns),
                kind: match b.kind {
                    SoftwareKind::ContextSwitch => SystemKind::ContextSwitch,
                    SoftwareKind::PageFault => SystemKind::PageFault,
                },
                source: SystemSource::Perf,
                args: [b.arg0, b.arg1, b.arg2],
                pid: b.pid,
                tid: b.tid,
                cpu: b.cpu,
            }),
            Event::LostEvents(l) => TraceEvent::Lost(LostEvents {
                t: t(l.from_ns),
                to: t(l.to_ns),
                count: l.count,
                reason: string(l.reason),
            }),
            Event::Marker(m) => TraceEvent::Marker(UserMarker {
                t: t(m.ns),
                text: string(m.text),
            }),
            Event::Counter(c) => TraceEvent::Counter(CounterReading {
                t: t(c.ns),
                name: string(c.name),
                value: c.value,
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
}
