//! The timeline model: a trace source, a cache of decoded frames, and the binned `Window` the
//! screen draws for a time range.
//!
//! Two levels of detail. When the frames touching the visible range hold at most
//! [`DETAIL_LIMIT`] events the window is built from decoded events (spans coloured by kernel,
//! flows, bandwidth). Above that it is built from the log index alone (event density per column),
//! which is what makes the first frame of a huge trace cheap.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::error::Result;
use crate::state::event::{
    EbpfKind, EndpointIx, EventKind, Names, Nanos, SoftwareKind, TimeRange, TraceEvent, Transfer,
};
use crate::state::filter::Filter;
use crate::state::source::{EndpointInfo, FrameSummary, LogHealth, TraceSource};

/// Estimated events in view above which the window is drawn from the index instead of events.
pub const DETAIL_LIMIT: u64 = 200_000;

/// Decoded events the frame cache keeps before evicting the least recently used frames: about
/// 80 MB at 80 bytes an event, enough for the frames of a detail window and of the window one
/// pan away, so panning back and forth does not decode again.
const CACHE_BUDGET: usize = 1_000_000;

/// What one column of a track's kernel row shows.
#[derive(Clone, Debug, PartialEq)]
pub enum KernelCell {
    /// No kernel ran in this column.
    Idle,
    /// Kernels ran; `kernel` covered the most time, `busy` is the share of the column in kernels.
    Span {
        /// The kernel that covered the most of the column.
        kernel: Arc<str>,
        /// Fraction of the column's time spent in any kernel, 0..=1.
        busy: f32,
    },
    /// Overview: kernel events per column relative to the busiest column, 0..=1.
    Density(f32),
}

/// An instant drawn in a track's mark row; later variants win when several share a column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mark {
    /// Nothing.
    None,
    /// A user marker.
    Marker,
    /// A transfer arrived from another endpoint.
    FlowIn,
    /// A transfer left for another endpoint.
    FlowOut,
    /// A syscall that took at least the recorder's threshold (eBPF).
    SlowSyscall,
    /// A thread moved to a CPU on another NUMA node (eBPF).
    NumaMigration,
    /// A step boundary.
    Step,
    /// A snapshot.
    Snapshot,
    /// Events were lost here.
    Lost,
    /// The stage moved between nodes here (its log ends or starts).
    Moved,
    /// The replay's first divergence.
    Divergence,
}

/// The decoded events of one track in view: references into cached frames, so building a
/// window clones no event and dropping one frees no event.
#[derive(Clone, Debug, Default)]
pub struct TrackEvents {
    frames: Vec<Arc<[TraceEvent]>>,
    /// (index into `frames`, index in that frame), in log order. Not sorted by time: sorting
    /// would dominate a redraw, and only stepping through events needs time order.
    refs: Vec<(u32, u32)>,
}

impl TrackEvents {
    /// Number of events.
    pub fn len(&self) -> usize {
        self.refs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }

    /// The `i`-th event in log order.
    pub fn get(&self, i: usize) -> Option<&TraceEvent> {
        let (f, e) = *self.refs.get(i)?;
        self.frames.get(f as usize)?.get(e as usize)
    }

    /// Events in log order.
    pub fn iter(&self) -> impl Iterator<Item = &TraceEvent> {
        self.refs
            .iter()
            .map(|&(f, e)| &self.frames[f as usize][e as usize])
    }
}

impl PartialEq for TrackEvents {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

/// One endpoint's row data for the visible range.
#[derive(Clone, Debug, PartialEq)]
pub struct TrackBins {
    /// Which endpoint.
    pub endpoint: EndpointIx,
    /// Kernel row, one cell per column.
    pub kernels: Vec<KernelCell>,
    /// Mark row, one mark per column.
    pub marks: Vec<Mark>,
    /// Bytes of outgoing transfers posted in each column (labels next to flow marks).
    pub flow_bytes: Vec<u64>,
    /// Perf samples per column.
    pub samples: Vec<f64>,
    /// Page faults per column (overview: all eBPF events, the index does not split them).
    pub faults: Vec<f64>,
    /// PT bytes per column (overview: PT chunks).
    pub pt: Vec<f64>,
    /// Per thread with eBPF off-CPU intervals in view (by tid), per column the reason it spent
    /// most of that column waiting on, if any (empty in overview).
    pub off_cpu: Vec<(u32, Vec<Option<WaitClass>>)>,
    /// Decoded, filtered events in view, in log order (empty in overview).
    pub events: TrackEvents,
}

/// Bytes a link carried per column of the visible range.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkBins {
    /// Sending endpoint.
    pub src: EndpointIx,
    /// Receiving endpoint.
    pub dst: EndpointIx,
    /// Bytes in flight attributed to each column (spread over post..complete).
    pub bytes: Vec<f64>,
    /// Transfers on this link in view.
    pub transfers: u64,
    /// Total bytes on this link in view.
    pub total_bytes: u64,
    /// Time with at least one transfer in flight on this link, inside the view.
    pub busy: Nanos,
}

/// Everything the timeline screen draws for one time range and width.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    /// The visible range.
    pub range: TimeRange,
    /// Columns the range is split into.
    pub columns: usize,
    /// Whether it was built from decoded events (true) or from the index (false).
    pub detail: bool,
    /// Events the index expects in the range (for shown endpoints and kinds), prorating each
    /// frame's counts by how much of its time range is visible.
    pub events_in_view: u64,
    /// Tracks of the endpoints the filter shows, in manifest order.
    pub tracks: Vec<TrackBins>,
    /// Links with traffic in view, sorted by (src, dst).
    pub links: Vec<LinkBins>,
    /// Transfers posted in view, as (sender, receiver, column of the post), in post order.
    pub flows: Vec<(EndpointIx, EndpointIx, usize)>,
}

impl Window {
    /// Start time of column `c`.
    pub fn column_start(&self, c: usize) -> Nanos {
        column_start(self.range, self.columns, c)
    }

    /// Column holding time `t`, clamped to the window.
    pub fn column_of(&self, t: Nanos) -> usize {
        column_of(self.range, self.columns, t)
    }
}

fn column_start(range: TimeRange, columns: usize, c: usize) -> Nanos {
    range.start_ns + (u128::from(range.len()) * c as u128 / columns.max(1) as u128) as Nanos
}

fn column_of(range: TimeRange, columns: usize, t: Nanos) -> usize {
    if t <= range.start_ns || range.is_empty() {
        return 0;
    }
    let c = (u128::from(t - range.start_ns) * columns as u128 / u128::from(range.len())) as usize;
    c.min(columns.saturating_sub(1))
}

/// Column boundaries of a window, computed once so binning an event costs a float multiply
/// and a comparison or two instead of 128-bit divisions.
struct Grid {
    range: TimeRange,
    /// `bounds[c]` is the start of column `c`; `bounds[columns]` is the range end.
    bounds: Vec<Nanos>,
    scale: f64,
}

impl Grid {
    fn new(range: TimeRange, columns: usize) -> Self {
        let bounds = (0..=columns)
            .map(|c| column_start(range, columns, c))
            .collect();
        Self {
            range,
            bounds,
            scale: columns as f64 / range.len().max(1) as f64,
        }
    }

    fn columns(&self) -> usize {
        self.bounds.len() - 1
    }

    fn start(&self, c: usize) -> Nanos {
        self.bounds[c.min(self.columns())]
    }

    /// Column holding `t`, clamped; agrees exactly with [`column_of`].
    fn of(&self, t: Nanos) -> usize {
        let last = self.columns().saturating_sub(1);
        if t <= self.range.start_ns {
            return 0;
        }
        let mut c = (((t - self.range.start_ns) as f64 * self.scale) as usize).min(last);
        while c < last && t >= self.bounds[c + 1] {
            c += 1;
        }
        while c > 0 && t < self.bounds[c] {
            c -= 1;
        }
        c
    }

    /// Calls `f(column, overlap_ns)` for every column `[start, end)` overlaps; an instant gets
    /// its own column with overlap 0.
    fn each(&self, start: Nanos, end: Nanos, mut f: impl FnMut(usize, Nanos)) {
        if self.columns() == 0 || !self.range.touches(start, end) {
            return;
        }
        let c0 = self.of(start);
        if end <= start {
            f(c0, 0);
            return;
        }
        let c1 = self.of(end.saturating_sub(1));
        for c in c0..=c1 {
            f(
                c,
                TimeRange::new(self.bounds[c], self.bounds[c + 1]).overlap(start, end),
            );
        }
    }
}

/// A decoded frame with the cache clock at its last use.
type CachedFrame = (u64, Arc<[TraceEvent]>);

/// Least-recently-used cache of decoded frames, bounded by the number of events it holds.
#[derive(Debug, Default)]
struct FrameCache {
    frames: HashMap<(EndpointIx, usize), CachedFrame>,
    clock: u64,
    held: usize,
    decoded: u64,
}

impl FrameCache {
    fn get(
        &mut self,
        source: &dyn TraceSource,
        ep: EndpointIx,
        frame: usize,
    ) -> Result<Arc<[TraceEvent]>> {
        self.clock += 1;
        if let Some((used, events)) = self.frames.get_mut(&(ep, frame)) {
            *used = self.clock;
            return Ok(Arc::clone(events));
        }
        let events: Arc<[TraceEvent]> = Arc::from(source.frame_events(ep, frame)?);
        self.decoded += 1;
        self.held += events.len();
        self.frames
            .insert((ep, frame), (self.clock, Arc::clone(&events)));
        while self.held > CACHE_BUDGET && self.frames.len() > 1 {
            let oldest = self
                .frames
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(key, _)| *key);
            let Some(key) = oldest else { break };
            if let Some((_, gone)) = self.frames.remove(&key) {
                self.held -= gone.len();
            }
        }
        Ok(events)
    }
}

/// A trace opened for viewing.
pub struct Timeline {
    source: Box<dyn TraceSource>,
    extent: TimeRange,
    cache: FrameCache,
    detail_limit: u64,
    /// Frames that failed to decode: skipped when drawing, reported once each.
    unreadable: HashSet<(EndpointIx, usize)>,
    /// Messages about them not yet shown.
    problems: Vec<String>,
}

impl std::fmt::Debug for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timeline")
            .field("endpoints", &self.source.endpoints().len())
            .field("extent", &self.extent)
            .finish_non_exhaustive()
    }
}

impl Timeline {
    /// Opens a source; reads only its index.
    pub fn new(source: Box<dyn TraceSource>) -> Self {
        let extent = source.extent();
        Self {
            source,
            extent,
            cache: FrameCache::default(),
            detail_limit: DETAIL_LIMIT,
            unreadable: HashSet::new(),
            problems: Vec::new(),
        }
    }

    /// Changes the level-of-detail threshold (events in view above which the index is drawn).
    pub fn with_detail_limit(mut self, limit: u64) -> Self {
        self.detail_limit = limit;
        self
    }

    /// The underlying source.
    pub fn source(&self) -> &dyn TraceSource {
        self.source.as_ref()
    }

    /// Endpoints in manifest order.
    pub fn endpoints(&self) -> &[EndpointInfo] {
        self.source.endpoints()
    }

    /// Whole-trace time range.
    pub fn extent(&self) -> TimeRange {
        self.extent
    }

    /// A frame's events, or `None` (recorded as a problem) when it cannot be decoded: one bad
    /// frame must not take the whole view down.
    fn frame_or_skip(&mut self, ep: EndpointIx, frame: usize) -> Option<Arc<[TraceEvent]>> {
        if self.unreadable.contains(&(ep, frame)) {
            return None;
        }
        match self.cache.get(self.source.as_ref(), ep, frame) {
            Ok(events) => Some(events),
            Err(e) => {
                self.problems.push(e.to_string());
                self.unreadable.insert((ep, frame));
                None
            }
        }
    }

    /// Problems met since the last call (frames that could not be decoded and were skipped).
    pub fn take_problems(&mut self) -> Vec<String> {
        std::mem::take(&mut self.problems)
    }

    /// Frames decoded so far (cache misses), for benchmarks and diagnostics.
    pub fn frames_decoded(&self) -> u64 {
        self.cache.decoded
    }

    /// How each endpoint's log ended.
    pub fn health(&self, ep: EndpointIx) -> LogHealth {
        self.source.health(ep)
    }

    fn touching(
        frames: &[FrameSummary],
        range: TimeRange,
    ) -> impl Iterator<Item = (usize, &FrameSummary)> {
        frames
            .iter()
            .enumerate()
            .filter(move |(_, f)| range.touches(f.range.start_ns, f.range.end_ns))
    }

    fn counted(filter: &Filter, f: &FrameSummary) -> u64 {
        EventKind::ALL
            .iter()
            .filter(|k| filter.shows_kind(**k))
            .map(|k| f.counts.get(*k))
            .sum()
    }

    /// Events of a frame expected inside `range`, assuming they are spread evenly over the
    /// frame's time range (frames can hold a million events, far more than a narrow view).
    fn expected_in(filter: &Filter, f: &FrameSummary, range: TimeRange) -> u64 {
        let n = Self::counted(filter, f);
        if f.range.is_empty() {
            return n;
        }
        let share = range.overlap(f.range.start_ns, f.range.end_ns) as f64 / f.range.len() as f64;
        (n as f64 * share).ceil() as u64
    }

    /// Decoded events of one endpoint touching `range` that pass `filter`, sorted by start.
    pub fn events_in(
        &mut self,
        ep: EndpointIx,
        range: TimeRange,
        filter: &Filter,
    ) -> Result<Vec<TraceEvent>> {
        Ok(self
            .track_events(ep, range, filter)?
            .iter()
            .cloned()
            .collect())
    }

    /// Like [`Timeline::events_in`], as references into the frame cache.
    pub fn track_events(
        &mut self,
        ep: EndpointIx,
        range: TimeRange,
        filter: &Filter,
    ) -> Result<TrackEvents> {
        let info = self.source.endpoints()[ep].clone();
        let wanted: Vec<usize> = Self::touching(self.source.frames(ep), range)
            .filter(|(_, f)| Self::counted(filter, f) > 0)
            .map(|(i, _)| i)
            .collect();
        let mut out = TrackEvents::default();
        for frame in wanted {
            let Some(events) = self.frame_or_skip(ep, frame) else {
                continue;
            };
            let f = out.frames.len() as u32;
            out.refs.extend(
                events
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| {
                        range.touches(e.start(), e.end())
                            && filter.shows_event(&info, self.source.names(), e)
                    })
                    .map(|(i, _)| (f, i as u32)),
            );
            out.frames.push(events);
        }
        Ok(out)
    }

    /// The first event of `ep` passing `filter` that starts after `t` (or the last one before
    /// it, going back), reading frames in time order from `t` and stopping as soon as no later
    /// frame can hold a nearer event.
    pub fn neighbour(
        &mut self,
        ep: EndpointIx,
        t: Nanos,
        forward: bool,
        filter: &Filter,
    ) -> Result<Option<TraceEvent>> {
        let Some(info) = self.source.endpoints().get(ep).cloned() else {
            return Ok(None);
        };
        let mut frames: Vec<(usize, TimeRange)> = self
            .source
            .frames(ep)
            .iter()
            .enumerate()
            .filter(|(_, f)| {
                Self::counted(filter, f) > 0
                    && if forward {
                        f.range.end_ns > t
                    } else {
                        f.range.start_ns < t
                    }
            })
            .map(|(i, f)| (i, f.range))
            .collect();
        if !forward {
            frames.reverse();
        }
        let mut best: Option<TraceEvent> = None;
        for (frame, range) in frames {
            if let Some(b) = &best {
                let beyond = if forward {
                    range.start_ns > b.start()
                } else {
                    range.end_ns < b.start()
                };
                if beyond {
                    break;
                }
            }
            let Some(events) = self.frame_or_skip(ep, frame) else {
                continue;
            };
            let names = self.source.names();
            for e in events
                .iter()
                .filter(|e| filter.shows_event(&info, names, e))
            {
                let s = e.start();
                let better = if forward {
                    s > t && best.as_ref().is_none_or(|b| s < b.start())
                } else {
                    s < t && best.as_ref().is_none_or(|b| s > b.start())
                };
                if better {
                    best = Some(e.clone());
                }
            }
        }
        Ok(best)
    }

    /// Start of step `step` on endpoint `ep` (its earliest step-boundary event). Steps grow
    /// with time, so this binary-searches the frames the index says hold step boundaries for
    /// the first whose largest step reaches `step`, decoding a few frames rather than all.
    pub fn step_start(&mut self, ep: EndpointIx, step: u64) -> Result<Option<Nanos>> {
        let mut candidates: Vec<usize> = self
            .source
            .frames(ep)
            .iter()
            .enumerate()
            .filter(|(_, f)| f.counts.get(EventKind::StepBoundary) > 0)
            .map(|(i, _)| i)
            .collect();
        let steps_of = |events: &[TraceEvent]| {
            events
                .iter()
                .filter_map(|e| match e {
                    TraceEvent::StepBoundary(s) => Some((s.step, s.ns)),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let (mut lo, mut hi) = (0, candidates.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let Some(events) = self.frame_or_skip(ep, candidates[mid]) else {
                // An unreadable frame says nothing about its steps: search without it.
                candidates.remove(mid);
                hi -= 1;
                continue;
            };
            let max = steps_of(&events).iter().map(|(s, _)| *s).max().unwrap_or(0);
            if max < step {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let Some(&frame) = candidates.get(lo) else {
            return Ok(None);
        };
        let Some(events) = self.frame_or_skip(ep, frame) else {
            return Ok(None);
        };
        Ok(steps_of(&events)
            .into_iter()
            .filter(|(s, _)| *s == step)
            .map(|(_, t)| t)
            .min())
    }

    /// The binned window for `range` split into `columns`, under `filter`; `highlight` puts a
    /// divergence mark on one endpoint at one time.
    pub fn window(
        &mut self,
        range: TimeRange,
        columns: usize,
        filter: &Filter,
        highlight: Option<(EndpointIx, Nanos)>,
    ) -> Result<Window> {
        let columns = columns.max(1);
        let shown: Vec<EndpointIx> = (0..self.source.endpoints().len())
            .filter(|ep| filter.shows_endpoint(&self.source.endpoints()[*ep]))
            .collect();
        let events_in_view: u64 = shown
            .iter()
            .flat_map(|ep| Self::touching(self.source.frames(*ep), range))
            .map(|(_, f)| Self::expected_in(filter, f, range))
            .sum();
        let detail = events_in_view <= self.detail_limit;
        let mut window = Window {
            range,
            columns,
            detail,
            events_in_view,
            tracks: Vec::with_capacity(shown.len()),
            links: Vec::new(),
            flows: Vec::new(),
        };
        let mut transfers: HashMap<u64, Transfer> = HashMap::new();
        let grid = Grid::new(range, columns);
        for ep in shown {
            let track = if detail {
                let events = self.track_events(ep, range, filter)?;
                for e in events.iter() {
                    if let TraceEvent::Transfer(x) = e {
                        // Both ends log a transfer; the receiver's completion is the arrival.
                        let merged = transfers.entry(x.id()).or_insert_with(|| (**x).clone());
                        merged.record.post_ns = merged.post().min(x.post());
                        merged.record.complete_ns = merged.complete().max(x.complete());
                    }
                }
                detail_track(ep, &grid, events, self.source.names())
            } else {
                overview_track(ep, &grid, self.source.frames(ep))
            };
            window.tracks.push(track);
        }
        if detail {
            add_flows(&mut window, &grid, transfers.into_values().collect());
        }
        if let Some((ep, t)) = highlight
            && range.touches(t, t)
        {
            let c = window.column_of(t);
            if let Some(track) = window.tracks.iter_mut().find(|tr| tr.endpoint == ep) {
                put_mark(&mut track.marks, c, Mark::Divergence);
            }
        }
        Ok(window)
    }
}

fn empty_track(ep: EndpointIx, columns: usize) -> TrackBins {
    TrackBins {
        endpoint: ep,
        kernels: vec![KernelCell::Idle; columns],
        marks: vec![Mark::None; columns],
        flow_bytes: vec![0; columns],
        samples: vec![0.0; columns],
        faults: vec![0.0; columns],
        pt: vec![0.0; columns],
        off_cpu: Vec::new(),
        events: TrackEvents::default(),
    }
}

/// Why a thread was off the CPU, in the classes the off-CPU lane draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WaitClass {
    /// Preempted while runnable: it wanted the CPU.
    Preempted,
    /// Blocked in futex (a lock, a condition, a pool barrier).
    Futex,
    /// Blocked in a socket or pipe syscall (read, write, send, recv, poll, ...).
    Io,
    /// Sleeping (nanosleep, clock_nanosleep).
    Sleep,
    /// Blocked in another syscall.
    OtherSyscall,
    /// Blocked outside any syscall (a page fault, ...).
    Blocked,
}

impl WaitClass {
    /// The class of an off-CPU interval (`reason` as `EbpfKind::OffCpu` arg1 stores it).
    pub fn of(reason: u64) -> WaitClass {
        if reason as u32 == 0 {
            return WaitClass::Preempted;
        }
        match reason >> 32 {
            0 => WaitClass::Blocked,
            n => match n - 1 {
                202 => WaitClass::Futex,
                35 | 230 => WaitClass::Sleep,
                0 | 1 | 7 | 19 | 20 | 23 | 44..=47 | 232 | 270 | 271 | 281 | 310 | 311 => {
                    WaitClass::Io
                }
                _ => WaitClass::OtherSyscall,
            },
        }
    }

    /// One letter for the lane.
    pub fn letter(self) -> char {
        match self {
            WaitClass::Preempted => 'p',
            WaitClass::Futex => 'f',
            WaitClass::Io => 'i',
            WaitClass::Sleep => 's',
            WaitClass::OtherSyscall => 'y',
            WaitClass::Blocked => 'b',
        }
    }
}

fn put_mark(marks: &mut [Mark], c: usize, m: Mark) {
    if let Some(slot) = marks.get_mut(c)
        && m > *slot
    {
        *slot = m;
    }
}

fn detail_track(ep: EndpointIx, grid: &Grid, events: TrackEvents, names: &Names) -> TrackBins {
    let (range, columns) = (grid.range, grid.columns());
    let mut t = empty_track(ep, columns);
    // Per column: the event index of the kernel with the largest overlap so far, and the total
    // busy time.
    let mut best: Vec<(Nanos, Option<usize>)> = vec![(0, None); columns];
    let mut busy: Vec<Nanos> = vec![0; columns];
    // Per thread, per column: nanoseconds off the CPU per wait class.
    let mut waits: std::collections::BTreeMap<u32, Vec<[Nanos; 6]>> = Default::default();
    for (i, e) in events.iter().enumerate() {
        match e {
            TraceEvent::KernelSpan(k) => grid.each(k.start_ns, k.end_ns, |c, ov| {
                busy[c] += ov;
                if best[c].1.is_none() || ov > best[c].0 {
                    best[c] = (ov, Some(i));
                }
            }),
            TraceEvent::StepBoundary(s) => put_mark(&mut t.marks, grid.of(s.ns), Mark::Step),
            TraceEvent::Snapshot(s) => put_mark(&mut t.marks, grid.of(s.ns), Mark::Snapshot),
            TraceEvent::LostEvents(l) => put_mark(&mut t.marks, grid.of(l.from_ns), Mark::Lost),
            TraceEvent::Marker(m) => put_mark(&mut t.marks, grid.of(m.ns), Mark::Marker),
            TraceEvent::Migration(m) => {
                put_mark(&mut t.marks, grid.of(m.record.ns), Mark::Moved);
            }
            TraceEvent::PerfSample(p) => {
                if range.touches(p.ns, p.ns) {
                    t.samples[grid.of(p.ns)] += 1.0;
                }
            }
            TraceEvent::PerfSoftware(s) => {
                if s.kind == SoftwareKind::PageFault && range.touches(s.ns, s.ns) {
                    t.faults[grid.of(s.ns)] += 1.0;
                }
            }
            TraceEvent::Ebpf(s) => match s.kind {
                EbpfKind::PageFault if range.touches(s.ns, s.ns) => {
                    t.faults[grid.of(s.ns)] += 1.0;
                }
                EbpfKind::OffCpu => {
                    let class = WaitClass::of(s.arg1) as usize;
                    let row = waits.entry(s.tid).or_insert_with(|| vec![[0; 6]; columns]);
                    grid.each(s.ns, s.end_ns(), |c, ov| row[c][class] += ov);
                }
                EbpfKind::Syscall if range.touches(s.ns, s.ns) => {
                    put_mark(&mut t.marks, grid.of(s.ns), Mark::SlowSyscall);
                }
                EbpfKind::Migration if s.arg2 == 1 && range.touches(s.ns, s.ns) => {
                    put_mark(&mut t.marks, grid.of(s.ns), Mark::NumaMigration);
                }
                _ => {}
            },
            TraceEvent::PtChunk(p) => {
                if range.touches(p.ns, p.ns) {
                    t.pt[grid.of(p.ns)] += p.size as f64;
                }
            }
            // Transfers are drawn once for the whole window, from both endpoints' logs; counters
            // have no lane of their own and show in the detail pane.
            TraceEvent::Transfer(_) | TraceEvent::Counter(_) => {}
        }
    }
    for c in 0..columns {
        if let (_, Some(i)) = best[c]
            && let Some(TraceEvent::KernelSpan(k)) = events.get(i)
        {
            let width = grid.start(c + 1) - grid.start(c);
            let share = if width == 0 {
                1.0
            } else {
                busy[c] as f32 / width as f32
            };
            t.kernels[c] = KernelCell::Span {
                kernel: names.shared(k.kernel),
                busy: share.clamp(0.0, 1.0),
            };
        }
    }
    const CLASSES: [WaitClass; 6] = [
        WaitClass::Preempted,
        WaitClass::Futex,
        WaitClass::Io,
        WaitClass::Sleep,
        WaitClass::OtherSyscall,
        WaitClass::Blocked,
    ];
    t.off_cpu = waits
        .into_iter()
        .map(|(tid, row)| {
            let cells = row
                .iter()
                .map(|w| {
                    let (i, ns) = w.iter().enumerate().max_by_key(|(_, ns)| **ns)?;
                    (*ns > 0).then_some(CLASSES[i])
                })
                .collect();
            (tid, cells)
        })
        .collect();
    t.events = events;
    t
}

fn overview_track(ep: EndpointIx, grid: &Grid, frames: &[FrameSummary]) -> TrackBins {
    let (range, columns) = (grid.range, grid.columns());
    let mut t = empty_track(ep, columns);
    let mut kernels = vec![0.0f64; columns];
    for f in frames
        .iter()
        .filter(|f| range.touches(f.range.start_ns, f.range.end_ns))
    {
        let len = f.range.len().max(1) as f64;
        let instant = f.range.is_empty();
        grid.each(f.range.start_ns, f.range.end_ns, |c, ov| {
            let share = if instant { 1.0 } else { ov as f64 / len };
            kernels[c] += f.counts.get(EventKind::KernelSpan) as f64 * share;
            t.samples[c] += f.counts.get(EventKind::PerfSample) as f64 * share;
            t.faults[c] += (f.counts.get(EventKind::Ebpf) + f.counts.get(EventKind::PerfSoftware))
                as f64
                * share;
            t.pt[c] += f.counts.get(EventKind::PtChunk) as f64 * share;
        });
        let at = grid.of(f.range.start_ns.max(range.start_ns));
        if f.counts.get(EventKind::Snapshot) > 0 {
            put_mark(&mut t.marks, at, Mark::Snapshot);
        }
        if f.counts.get(EventKind::LostEvents) > 0 {
            put_mark(&mut t.marks, at, Mark::Lost);
        }
    }
    let max = kernels.iter().copied().fold(0.0, f64::max);
    for (cell, k) in t.kernels.iter_mut().zip(kernels) {
        if k > 0.0 && max > 0.0 {
            *cell = KernelCell::Density((k / max) as f32);
        }
    }
    t
}

fn add_flows(window: &mut Window, grid: &Grid, mut transfers: Vec<Transfer>) {
    transfers.sort_by_key(|x| (x.post(), x.id()));
    let (range, columns) = (grid.range, grid.columns());
    let mut links: HashMap<(EndpointIx, EndpointIx), (LinkBins, Nanos)> = HashMap::new();
    for x in &transfers {
        if let Some(src) = window.tracks.iter_mut().find(|t| t.endpoint == x.src)
            && range.touches(x.post(), x.post())
        {
            let c = grid.of(x.post());
            put_mark(&mut src.marks, c, Mark::FlowOut);
            src.flow_bytes[c] += x.bytes();
            window.flows.push((x.src, x.dst, c));
        }
        if let Some(dst) = window.tracks.iter_mut().find(|t| t.endpoint == x.dst)
            && range.touches(x.complete(), x.complete())
        {
            put_mark(&mut dst.marks, grid.of(x.complete()), Mark::FlowIn);
        }
        let (link, covered_to) = links.entry((x.src, x.dst)).or_insert_with(|| {
            (
                LinkBins {
                    src: x.src,
                    dst: x.dst,
                    bytes: vec![0.0; columns],
                    transfers: 0,
                    total_bytes: 0,
                    busy: 0,
                },
                range.start_ns,
            )
        });
        link.transfers += 1;
        link.total_bytes += x.bytes();
        let (start, end) = (x.post(), x.complete().max(x.post()));
        let len = (end - start).max(1) as f64;
        grid.each(start, end, |c, ov| {
            let share = if end == start { 1.0 } else { ov as f64 / len };
            link.bytes[c] += x.bytes() as f64 * share;
        });
        // Busy time is the union of in-flight intervals; transfers are sorted by post time.
        let s = start.max(*covered_to).max(range.start_ns);
        let e = end.min(range.end_ns);
        if e > s {
            link.busy += e - s;
        }
        *covered_to = (*covered_to).max(e);
    }
    let mut links: Vec<LinkBins> = links.into_values().map(|(l, _)| l).collect();
    links.sort_by_key(|l| (l.src, l.dst));
    window.links = links;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixture;

    fn timeline(stages: usize, steps: u64, frame_len: usize) -> Timeline {
        Timeline::new(Box::new(fixture::pipeline(stages, steps, frame_len)))
    }

    #[test]
    fn step_start_binary_search_finds_every_step() {
        let mut t = timeline(2, 20, 8);
        for step in 0..20 {
            assert_eq!(
                t.step_start(0, step).expect("reads"),
                Some(step * fixture::STEP_NS)
            );
            assert_eq!(
                t.step_start(1, step).expect("reads"),
                Some(step * fixture::STEP_NS + fixture::STAGE_NS)
            );
        }
        assert_eq!(t.step_start(0, 20).expect("reads"), None);
    }

    #[test]
    fn detail_window_pairs_flows_and_links() {
        let mut t = timeline(3, 4, 16);
        let w = t
            .window(t.extent(), 100, &Filter::default(), None)
            .expect("window");
        assert!(w.detail);
        let outs: usize = w
            .tracks
            .iter()
            .map(|tr| tr.marks.iter().filter(|m| **m == Mark::FlowOut).count())
            .sum();
        // 2 links x 4 steps, each transfer posted in its own column.
        assert_eq!(outs, 8);
        assert_eq!(w.links.len(), 2);
        assert!(
            w.links
                .iter()
                .all(|l| l.transfers == 4 && l.total_bytes == 4 * fixture::XFER_BYTES)
        );
        // Both ends logged each transfer; the link is busy 20us per transfer.
        assert!(w.links.iter().all(|l| l.busy == 4 * 20_000));
    }

    #[test]
    fn overview_window_reads_no_frames() {
        let mut t = timeline(3, 4, 16).with_detail_limit(5);
        let w = t
            .window(t.extent(), 50, &Filter::default(), None)
            .expect("window");
        assert!(!w.detail);
        assert!(
            t.cache.frames.is_empty(),
            "the overview is drawn from the index alone"
        );
        assert!(w.tracks.iter().all(|tr| tr.events.is_empty()));
        assert!(
            w.tracks[0]
                .kernels
                .iter()
                .any(|c| matches!(c, KernelCell::Density(d) if *d > 0.0))
        );
    }

    #[test]
    fn narrow_views_prorate_big_frames() {
        // One frame per endpoint; a view of a tenth of the trace expects about a tenth of it.
        let mut t = timeline(2, 10, 1_000_000);
        let e = t.extent();
        let total = t
            .window(e, 40, &Filter::default(), None)
            .expect("window")
            .events_in_view;
        let narrow = TimeRange::new(e.start_ns, e.start_ns + e.len() / 10);
        let part = t
            .window(narrow, 40, &Filter::default(), None)
            .expect("window")
            .events_in_view;
        assert!(part * 8 < total && part * 12 > total, "{part} of {total}");
    }
}
