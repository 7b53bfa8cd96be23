//! The interactive state of `slug view`: the `App` (visible range, mode, selection, filter,
//! prompt) and how keys and mouse events change it. Drawing lives in `crate::view`.

use ratatui::crossterm::event::{
    Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers, MouseEvent, MouseEventKind,
};

use crate::error::Result;
use crate::state::divergence::Divergence;
use crate::state::event::{EndpointIx, Nanos, TimeRange, TraceEvent, format_time, parse_time};
use crate::state::filter::Filter;
use crate::state::stats::TraceStats;
use crate::state::timeline::{Timeline, Window};

/// Narrowest visible range, so zooming in always leaves something to see.
const MIN_SPAN_NS: Nanos = 1_000;

/// What the keyboard currently drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Navigating the timeline.
    Timeline,
    /// Typing into the prompt at the bottom.
    Prompt(PromptKind),
    /// The `?` overlay.
    Help,
    /// The `L` legend overlay.
    Legend,
    /// The whole-trace statistics view.
    Stats,
}

/// What the prompt is asking for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptKind {
    /// A `/` filter.
    Filter,
    /// A time to jump to (from trace start).
    JumpTime,
    /// A step number to jump to.
    JumpStep,
}

impl PromptKind {
    /// The prompt's label.
    pub fn label(self) -> &'static str {
        match self {
            PromptKind::Filter => "filter (kind:K kernel:K ep:E words)",
            PromptKind::JumpTime => "jump to time (e.g. 12.5ms)",
            PromptKind::JumpStep => "jump to step",
        }
    }
}

/// The event picked in the timeline.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    /// Endpoint whose track holds it.
    pub endpoint: EndpointIx,
    /// The event.
    pub event: TraceEvent,
}

/// Where the divergence of a `--divergence` report sits in the trace.
#[derive(Clone, Debug, PartialEq)]
pub struct DivergenceMark {
    /// The report.
    pub report: Divergence,
    /// Its banner line.
    pub summary: String,
    /// Endpoint and time to highlight, when they could be found in the trace.
    pub at: Option<(EndpointIx, Nanos)>,
}

/// Screen geometry the last draw used, so mouse positions map back to tracks and times.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HitMap {
    /// First column of the time axis.
    pub x: u16,
    /// Width of the time axis in columns.
    pub width: u16,
    /// Screen row → index into the window's tracks.
    pub rows: Vec<(u16, usize)>,
}

/// Everything `slug view` knows between two frames.
#[derive(Debug)]
pub struct App {
    /// The trace.
    pub timeline: Timeline,
    /// Title shown in the top bar (the trace path).
    pub title: String,
    /// The visible time range.
    pub view: TimeRange,
    /// Current mode.
    pub mode: Mode,
    /// Text typed into the prompt.
    pub input: String,
    /// Active filter.
    pub filter: Filter,
    /// Index into the window's tracks of the track the cursor is on.
    pub cursor: usize,
    /// Selected event.
    pub selection: Option<Selection>,
    /// One-line message for the status bar (errors of the last action, hints).
    pub message: Option<String>,
    /// Whole-trace statistics, computed when the stats view is first opened.
    pub stats: Option<TraceStats>,
    /// Lines of the stats view scrolled past (up/down, page keys).
    pub stats_scroll: u16,
    /// The divergence to highlight, when a report was given.
    pub divergence: Option<DivergenceMark>,
    /// The window for the current view, rebuilt when the view, width or filter change.
    pub window: Option<Window>,
    /// Mouse geometry of the last draw.
    pub hits: HitMap,
    /// Set when the user asked to quit.
    pub quit: bool,
}

impl App {
    /// Opens the viewer state on a timeline, showing the whole trace.
    pub fn new(timeline: Timeline, title: impl Into<String>) -> Self {
        let view = timeline.extent();
        // Damaged logs are said up front; what was recovered is still shown.
        let notes: Vec<String> = timeline
            .endpoints()
            .iter()
            .enumerate()
            .filter_map(|(ep, info)| {
                let h = timeline.health(ep);
                (!h.note.is_empty()).then(|| format!("{}: {}", info.name, h.note))
            })
            .collect();
        let message = (!notes.is_empty()).then(|| notes.join(" | "));
        Self {
            timeline,
            title: title.into(),
            view,
            mode: Mode::Timeline,
            input: String::new(),
            filter: Filter::default(),
            cursor: 0,
            selection: None,
            message,
            stats: None,
            stats_scroll: 0,
            divergence: None,
            window: None,
            hits: HitMap::default(),
            quit: false,
        }
    }

    /// Places a replay's first divergence: the step boundary of its step on its endpoint, or
    /// the differing transfer when the report names one; zooms to that step and selects it.
    pub fn set_divergence(&mut self, report: Divergence) -> Result<()> {
        let endpoints = self.timeline.endpoints();
        let ep = report.endpoint_index(endpoints);
        let name = ep.map_or_else(
            || format!("{:?}", report.endpoint),
            |i| endpoints[i].name.clone(),
        );
        let mut summary = report.summary(&name);
        let mut at = None;
        if let Some(ep) = ep {
            if let Some(start) = self.timeline.step_start(ep, report.step)? {
                let end = self
                    .timeline
                    .step_start(ep, report.step + 1)?
                    .unwrap_or(start + self.view.len() / 50 + MIN_SPAN_NS);
                let step_range = TimeRange::new(start, end.max(start + MIN_SPAN_NS));
                at = Some((ep, start));
                if let Some(id) = report.transfer_id {
                    let hit = self
                        .timeline
                        .events_in(ep, step_range, &Filter::default())?
                        .into_iter()
                        .find(|e| matches!(e, TraceEvent::Transfer(x) if x.id() == id));
                    if let Some(event) = hit {
                        at = Some((ep, event.start()));
                        self.selection = Some(Selection {
                            endpoint: ep,
                            event,
                        });
                    }
                }
                let pad = step_range.len() / 4;
                self.set_view(
                    step_range.start_ns.saturating_sub(pad),
                    step_range.len() + 2 * pad,
                );
            } else {
                summary.push_str(" (step not found in the trace)");
            }
        } else {
            summary.push_str(" (endpoint not in this trace)");
        }
        self.divergence = Some(DivergenceMark {
            report,
            summary,
            at,
        });
        Ok(())
    }

    /// Rebuilds the window for `columns` columns when the view, width or filter changed.
    pub fn refresh(&mut self, columns: usize) -> Result<()> {
        let stale = self
            .window
            .as_ref()
            .is_none_or(|w| w.range != self.view || w.columns != columns);
        if stale {
            let highlight = self.divergence.as_ref().and_then(|d| d.at);
            let window = self
                .timeline
                .window(self.view, columns, &self.filter, highlight)?;
            self.cursor = self.cursor.min(window.tracks.len().saturating_sub(1));
            self.window = Some(window);
            let problems = self.timeline.take_problems();
            if !problems.is_empty() {
                self.message = Some(format!("skipped unreadable data: {}", problems.join(" | ")));
            }
        }
        Ok(())
    }

    fn invalidate(&mut self) {
        self.window = None;
    }

    /// Sets the view to `len` ns starting at `start`, kept inside the trace.
    pub fn set_view(&mut self, start: Nanos, len: Nanos) {
        let extent = self.timeline.extent();
        let len = len.clamp(MIN_SPAN_NS.min(extent.len().max(1)), extent.len().max(1));
        let start = start.clamp(
            extent.start_ns,
            extent.end_ns.saturating_sub(len).max(extent.start_ns),
        );
        self.view = TimeRange::new(start, start + len);
    }

    /// Zooms by `factor` (< 1 zooms in) keeping the time at `anchor` (0..=1 of the view) fixed.
    pub fn zoom(&mut self, factor: f64, anchor: f64) {
        let len = self.view.len() as f64;
        let at = self.view.start_ns as f64 + len * anchor;
        let new_len = (len * factor).max(MIN_SPAN_NS as f64);
        let start = (at - new_len * anchor).max(0.0);
        self.set_view(start as Nanos, new_len as Nanos);
    }

    /// Pans by `fraction` of the view (negative goes back in time).
    pub fn pan(&mut self, fraction: f64) {
        let shift = (self.view.len() as f64 * fraction) as i128;
        let start = (i128::from(self.view.start_ns) + shift).max(0) as Nanos;
        self.set_view(start, self.view.len());
    }

    /// Centres the view on `t`, keeping the zoom.
    pub fn center_on(&mut self, t: Nanos) {
        let len = self.view.len();
        self.set_view(t.saturating_sub(len / 2), len);
    }

    /// Handles one terminal event.
    ///
    /// An action that fails (a frame that cannot be decoded while jumping, say) is reported in
    /// the status bar; the viewer keeps running on what it can read.
    pub fn handle(&mut self, event: &Event) {
        let done = match event {
            Event::Key(key) if key.kind != KeyEventKind::Release => self.on_key(*key),
            Event::Mouse(mouse) => self.on_mouse(*mouse),
            Event::Resize(..) => {
                self.invalidate();
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(e) = done {
            self.message = Some(e.to_string());
        }
    }

    /// Handles one key press.
    pub fn on_key(&mut self, key: KeyEvent) -> Result<()> {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            self.quit = true;
            return Ok(());
        }
        match self.mode {
            Mode::Help | Mode::Legend => self.mode = Mode::Timeline,
            Mode::Stats => match key.code {
                KeyCode::Char('q') => self.quit = true,
                KeyCode::Esc | KeyCode::Char('t') | KeyCode::Tab => self.mode = Mode::Timeline,
                KeyCode::Char('?') => self.mode = Mode::Help,
                KeyCode::Char('L') => self.mode = Mode::Legend,
                KeyCode::Down | KeyCode::Char('j') => {
                    self.stats_scroll = self.stats_scroll.saturating_add(1);
                }
                KeyCode::Up | KeyCode::Char('k') => {
                    self.stats_scroll = self.stats_scroll.saturating_sub(1);
                }
                KeyCode::PageDown | KeyCode::Char(' ') => {
                    self.stats_scroll = self.stats_scroll.saturating_add(10);
                }
                KeyCode::PageUp => self.stats_scroll = self.stats_scroll.saturating_sub(10),
                KeyCode::Home | KeyCode::Char('0') => self.stats_scroll = 0,
                _ => {}
            },
            Mode::Prompt(kind) => match key.code {
                KeyCode::Esc => {
                    self.mode = Mode::Timeline;
                    self.input.clear();
                }
                KeyCode::Enter => {
                    self.mode = Mode::Timeline;
                    let text = std::mem::take(&mut self.input);
                    self.apply_prompt(kind, &text)?;
                }
                KeyCode::Backspace => {
                    self.input.pop();
                }
                KeyCode::Char(c) => self.input.push(c),
                _ => {}
            },
            Mode::Timeline => self.on_timeline_key(key)?,
        }
        Ok(())
    }

    fn on_timeline_key(&mut self, key: KeyEvent) -> Result<()> {
        self.message = None;
        let anchor = self.anchor();
        match key.code {
            KeyCode::Char('q') => self.quit = true,
            KeyCode::Esc if self.selection.is_some() => self.selection = None,
            KeyCode::Esc if !self.filter.is_empty() => {
                self.filter = Filter::default();
                self.invalidate();
            }
            KeyCode::Char('w' | '+' | '=') => self.zoom(0.5, anchor),
            KeyCode::Char('s' | '-' | '_') => self.zoom(2.0, anchor),
            KeyCode::Char('a') | KeyCode::Left => self.pan(-0.25),
            KeyCode::Char('d') | KeyCode::Right => self.pan(0.25),
            KeyCode::Up | KeyCode::Char('k') => self.cursor = self.cursor.saturating_sub(1),
            KeyCode::Down | KeyCode::Char('j') => {
                let tracks = self.window.as_ref().map_or(0, |w| w.tracks.len());
                self.cursor = (self.cursor + 1).min(tracks.saturating_sub(1));
            }
            KeyCode::Char('0') | KeyCode::Home => {
                let e = self.timeline.extent();
                self.set_view(e.start_ns, e.len());
            }
            KeyCode::Char('n') | KeyCode::Tab => self.step_selection(true)?,
            KeyCode::Char('p') | KeyCode::BackTab => self.step_selection(false)?,
            KeyCode::Enter => self.select_near(self.view.start_ns + self.view.len() / 2),
            KeyCode::Char('/') => self.open_prompt(PromptKind::Filter),
            KeyCode::Char('g') => self.open_prompt(PromptKind::JumpTime),
            KeyCode::Char(':' | 'G') => self.open_prompt(PromptKind::JumpStep),
            KeyCode::Char('?') => self.mode = Mode::Help,
            KeyCode::Char('L') => self.mode = Mode::Legend,
            KeyCode::Char('t') => self.mode = Mode::Stats,
            _ => {}
        }
        Ok(())
    }

    /// Zoom anchor: the selected event when it is in view, else the centre.
    fn anchor(&self) -> f64 {
        match &self.selection {
            Some(sel) if self.view.touches(sel.event.start(), sel.event.start()) => {
                (sel.event.start() - self.view.start_ns) as f64 / self.view.len().max(1) as f64
            }
            _ => 0.5,
        }
    }

    fn open_prompt(&mut self, kind: PromptKind) {
        self.input = if kind == PromptKind::Filter {
            self.filter.text().to_string()
        } else {
            String::new()
        };
        self.mode = Mode::Prompt(kind);
    }

    /// Computes the statistics the stats view is waiting for. The loop calls this after drawing,
    /// so the screen says what is happening during the one whole-trace read the viewer does.
    /// Returns whether it computed anything (and the screen should be drawn again).
    pub fn compute_pending(&mut self) -> Result<bool> {
        if self.mode != Mode::Stats || self.stats.is_some() {
            return Ok(false);
        }
        self.stats = Some(TraceStats::compute(self.timeline.source())?);
        Ok(true)
    }

    /// Whether any event of the trace passes the filter: searched from the start of each
    /// endpoint, stopping at the first match (a filter that matches nothing reads everything
    /// once, which is when saying so helps).
    fn any_match(&mut self) -> Result<bool> {
        let start = self.timeline.extent().start_ns;
        for ep in 0..self.timeline.source().endpoints().len() {
            if !self
                .filter
                .shows_endpoint(&self.timeline.source().endpoints()[ep])
            {
                continue;
            }
            if self
                .timeline
                .neighbour(ep, start.saturating_sub(1), true, &self.filter)?
                .is_some()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn apply_prompt(&mut self, kind: PromptKind, text: &str) -> Result<()> {
        match kind {
            PromptKind::Filter => match Filter::parse(text) {
                Ok(f) => {
                    self.filter = f;
                    self.selection = None;
                    self.invalidate();
                    if !self.filter.is_empty() && !self.any_match()? {
                        self.message = Some(format!(
                            "0 matches for `{text}` in the whole trace (kernels are named like \
                             q_proj, attention, gate, down, head; see the stats view, t)"
                        ));
                    }
                }
                Err(e) => self.message = Some(e),
            },
            PromptKind::JumpTime => match parse_time(text) {
                Some(t) => self.center_on(self.timeline.extent().start_ns + t),
                None => {
                    self.message = Some(format!("`{text}` is not a time; try 12.5ms, 300us or 2s"))
                }
            },
            PromptKind::JumpStep => match text.trim().parse::<u64>() {
                Ok(step) => self.jump_to_step(step)?,
                Err(_) => self.message = Some(format!("`{text}` is not a step number")),
            },
        }
        Ok(())
    }

    /// The endpoint of the track under the cursor.
    pub fn cursor_endpoint(&self) -> Option<EndpointIx> {
        self.window
            .as_ref()?
            .tracks
            .get(self.cursor)
            .map(|t| t.endpoint)
    }

    fn jump_to_step(&mut self, step: u64) -> Result<()> {
        let ep = self.cursor_endpoint().unwrap_or(0);
        if ep >= self.timeline.endpoints().len() {
            self.message = Some("the trace has no endpoints".to_string());
            return Ok(());
        }
        match self.timeline.step_start(ep, step)? {
            Some(t) => {
                let len = match self.timeline.step_start(ep, step + 1)? {
                    Some(next) if next > t => (next - t) * 3 / 2,
                    _ => self.view.len(),
                };
                self.set_view(t.saturating_sub(len / 6), len);
                self.message = Some(format!(
                    "step {step} on {} starts at {}",
                    self.timeline.endpoints()[ep].name,
                    format_time(t - self.timeline.extent().start_ns)
                ));
            }
            None => {
                self.message = Some(format!(
                    "step {step} not found on {}",
                    self.timeline.endpoints()[ep].name
                ));
            }
        }
        Ok(())
    }

    /// Selects the next (or previous) event on the cursor track, panning to keep it in view;
    /// past the edge of the view it searches the rest of the trace (through the index, so only
    /// frames that can hold a match are decoded).
    fn step_selection(&mut self, forward: bool) -> Result<()> {
        let Some(window) = &self.window else {
            return Ok(());
        };
        if !window.detail {
            self.message =
                Some("zoom in (w) to select events; this view is drawn from the index".to_string());
            return Ok(());
        }
        let Some(track) = window.tracks.get(self.cursor) else {
            return Ok(());
        };
        let endpoint = track.endpoint;
        // Time order is (start, position in the log); events are kept in log order, so the
        // neighbour is found by one scan instead of sorting every window.
        let key = |i: usize, e: &TraceEvent| (e.start(), i);
        let current = self
            .selection
            .as_ref()
            .filter(|s| s.endpoint == track.endpoint)
            .and_then(|s| track.events.iter().position(|e| *e == s.event))
            .and_then(|i| Some(key(i, track.events.get(i)?)));
        let keyed = track.events.iter().enumerate().map(|(i, e)| (key(i, e), i));
        let next = match (current, forward) {
            (Some(cur), true) => keyed.filter(|(k, _)| *k > cur).min(),
            (Some(cur), false) => keyed.filter(|(k, _)| *k < cur).max(),
            (None, true) => keyed.min(),
            (None, false) => keyed.max(),
        }
        .map(|(_, i)| i);
        let found = match next.and_then(|i| track.events.get(i).cloned()) {
            Some(event) => Some(event),
            None => {
                let from = match (&self.selection, forward) {
                    (Some(s), _) if s.endpoint == endpoint => s.event.start(),
                    (_, true) => self.view.end_ns,
                    (_, false) => self.view.start_ns,
                };
                self.timeline
                    .neighbour(endpoint, from, forward, &self.filter)?
            }
        };
        match found {
            Some(event) => {
                let t = event.start();
                self.selection = Some(Selection { endpoint, event });
                if !self.view.touches(t, t)
                    || t >= self.view.end_ns.saturating_sub(self.view.len() / 10)
                {
                    self.center_on(t);
                }
            }
            None => self.message = Some("no more matching events on this track".to_string()),
        }
        Ok(())
    }

    /// Selects the event on the cursor track nearest to `t`.
    pub fn select_near(&mut self, t: Nanos) {
        let Some(window) = &self.window else { return };
        if !window.detail {
            self.message =
                Some("zoom in (w) to select events; this view is drawn from the index".to_string());
            return;
        }
        let Some(track) = window.tracks.get(self.cursor) else {
            return;
        };
        let distance = |e: &TraceEvent| {
            if e.start() <= t && t <= e.end() {
                0
            } else {
                e.start().abs_diff(t).min(e.end().abs_diff(t))
            }
        };
        if let Some(event) = track.events.iter().min_by_key(|e| (distance(e), e.kind())) {
            self.selection = Some(Selection {
                endpoint: track.endpoint,
                event: event.clone(),
            });
        }
    }

    fn on_mouse(&mut self, mouse: MouseEvent) -> Result<()> {
        if self.mode != Mode::Timeline || self.hits.width == 0 {
            return Ok(());
        }
        let in_axis = mouse.column >= self.hits.x && mouse.column < self.hits.x + self.hits.width;
        let frac = if in_axis {
            f64::from(mouse.column - self.hits.x) / f64::from(self.hits.width)
        } else {
            0.5
        };
        match mouse.kind {
            MouseEventKind::ScrollUp => self.zoom(0.8, frac),
            MouseEventKind::ScrollDown => self.zoom(1.25, frac),
            MouseEventKind::Down(_) if in_axis => {
                if let Some(&(_, track)) = self.hits.rows.iter().find(|(y, _)| *y == mouse.row) {
                    self.cursor = track;
                    let t = self.view.start_ns + (self.view.len() as f64 * frac) as Nanos;
                    self.select_near(t);
                }
            }
            _ => {}
        }
        Ok(())
    }
}
