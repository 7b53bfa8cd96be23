//! Where events come from: the `TraceSource` trait the viewer reads through, and an in-memory source.
//!
//! A source exposes each endpoint log as a list of frames whose time range and per-kind counts are
//! known without decoding (the log index), and decodes one frame on demand. Everything the viewer
//! does — overview, detail, statistics, export — goes through these three calls, which is what lets
//! a 10-million-event trace open without reading it.

use std::sync::Arc;

use crate::error::Result;
use crate::state::event::{EndpointIx, EventKind, KindCounts, Names, Nanos, TimeRange, TraceEvent};

/// One endpoint (a pipeline stage on a node) as the trace manifest describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Endpoint id, as in the manifest and in transfers.
    pub id: u32,
    /// Display name: `<node>/s<stage>` (`node0/s1`).
    pub name: String,
    /// Node (host) the endpoint ran on.
    pub node: String,
    /// Pipeline stage index.
    pub stage: u32,
    /// Rank of the endpoint in the run.
    pub rank: u32,
}

/// What the log index says about one frame, known without decompressing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameSummary {
    /// Earliest start and latest end of the frame's events, on the trace-global clock.
    pub range: TimeRange,
    /// Number of events of each kind in the frame.
    pub counts: KindCounts,
}

/// How an endpoint log ended: cleanly, or cut short with events lost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogHealth {
    /// Events lost while reading the log (the partial frame of a killed writer). Losses the
    /// recorder itself noticed are lost-event records among the events.
    pub lost_events: u64,
    /// Bytes after the last whole frame that could not be read (a killed writer).
    pub truncated_bytes: u64,
    /// The reader's own words about the recovery, empty for a clean log.
    pub note: String,
}

/// A trace the viewer can draw: endpoints, each with an indexed list of frames.
pub trait TraceSource: Send {
    /// Endpoints in manifest order; [`EndpointIx`] indexes this list.
    fn endpoints(&self) -> &[EndpointInfo];

    /// The frames of one endpoint log, in log order.
    fn frames(&self, endpoint: EndpointIx) -> &[FrameSummary];

    /// Decodes one frame into events on the trace-global clock.
    fn frame_events(&self, endpoint: EndpointIx, frame: usize) -> Result<Vec<TraceEvent>>;

    /// How the endpoint's log ended.
    fn health(&self, endpoint: EndpointIx) -> LogHealth;

    /// The trace's strings, which events name by id (kernel names, marker texts, ...).
    fn names(&self) -> &Names;

    /// How an MPI recording's transfers travelled (the manifest's `mpi` table), if it has one.
    fn mpi(&self) -> Option<&slug_schema::MpiTable> {
        None
    }

    /// Whole-trace time range: the union of every frame's range.
    fn extent(&self) -> TimeRange {
        let mut start = Nanos::MAX;
        let mut end = 0;
        for ep in 0..self.endpoints().len() {
            for f in self.frames(ep) {
                start = start.min(f.range.start_ns);
                end = end.max(f.range.end_ns);
            }
        }
        if start > end {
            TimeRange::default()
        } else {
            TimeRange::new(start, end.max(start + 1))
        }
    }

    /// Events counted by the index, per kind, over the whole trace.
    fn total_counts(&self) -> KindCounts {
        let mut total = KindCounts::default();
        for ep in 0..self.endpoints().len() {
            for f in self.frames(ep) {
                for kind in EventKind::ALL {
                    total.add(kind, f.counts.get(kind));
                }
            }
        }
        total
    }
}

/// A trace held in memory: used by tests, benchmarks' baselines and traces built in code.
#[derive(Debug)]
pub struct MemorySource {
    endpoints: Vec<EndpointInfo>,
    frames: Vec<Vec<FrameSummary>>,
    events: Vec<Vec<Arc<[TraceEvent]>>>,
    health: Vec<LogHealth>,
    names: Names,
    mpi: Option<slug_schema::MpiTable>,
}

impl MemorySource {
    /// Builds a source from each endpoint's events, cut into frames of `frame_len` events.
    ///
    /// Events are sorted by start time first, as a recorder writes them.
    pub fn new(
        endpoints: Vec<EndpointInfo>,
        mut events: Vec<Vec<TraceEvent>>,
        frame_len: usize,
    ) -> Self {
        events.resize_with(endpoints.len(), Vec::new);
        let frame_len = frame_len.max(1);
        let mut frames = Vec::with_capacity(endpoints.len());
        let mut chunks = Vec::with_capacity(endpoints.len());
        let mut health = Vec::with_capacity(endpoints.len());
        for list in &mut events {
            list.sort_by_key(TraceEvent::start);
            let mut ep_frames = Vec::new();
            let mut ep_chunks = Vec::new();
            for chunk in list.chunks(frame_len) {
                let mut counts = KindCounts::default();
                let mut start = Nanos::MAX;
                let mut end = 0;
                for ev in chunk {
                    counts.add(ev.kind(), 1);
                    start = start.min(ev.start());
                    end = end.max(ev.end());
                }
                ep_frames.push(FrameSummary {
                    range: TimeRange::new(start, end),
                    counts,
                });
                ep_chunks.push(Arc::from(chunk.to_vec()));
            }
            frames.push(ep_frames);
            chunks.push(ep_chunks);
            health.push(LogHealth::default());
        }
        Self {
            endpoints,
            frames,
            events: chunks,
            health,
            names: Names::default(),
            mpi: None,
        }
    }

    /// The source with `mpi` as its recording's MPI table.
    pub fn with_mpi(mut self, mpi: slug_schema::MpiTable) -> Self {
        self.mpi = Some(mpi);
        self
    }

    /// The source with `names` as the strings its events name.
    pub fn with_names(mut self, names: Names) -> Self {
        self.names = names;
        self
    }

    /// Marks an endpoint's log as cut short, as a reader recovering a killed writer's log would.
    pub fn set_health(&mut self, endpoint: EndpointIx, health: LogHealth) {
        if let Some(slot) = self.health.get_mut(endpoint) {
            *slot = health;
        }
    }
}

impl TraceSource for MemorySource {
    fn endpoints(&self) -> &[EndpointInfo] {
        &self.endpoints
    }

    fn frames(&self, endpoint: EndpointIx) -> &[FrameSummary] {
        self.frames.get(endpoint).map_or(&[], Vec::as_slice)
    }

    fn frame_events(&self, endpoint: EndpointIx, frame: usize) -> Result<Vec<TraceEvent>> {
        Ok(self
            .events
            .get(endpoint)
            .and_then(|f| f.get(frame))
            .map_or_else(Vec::new, |chunk| chunk.to_vec()))
    }

    fn health(&self, endpoint: EndpointIx) -> LogHealth {
        self.health.get(endpoint).cloned().unwrap_or_default()
    }

    fn names(&self) -> &Names {
        &self.names
    }

    fn mpi(&self) -> Option<&slug_schema::MpiTable> {
        self.mpi.as_ref()
    }
}
