//! Drawing: turns the `App` state into a ratatui frame. Nothing here changes the model except the
//! mouse hit map the timeline records while drawing.

pub mod detail;
pub mod help;
pub mod lanes;
pub mod legend;
pub mod links;
pub mod stats;
pub mod style;
#[cfg(test)]
mod tests;
pub mod timeline;

use ratatui::Frame;
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Widget, Wrap};

use crate::state::app::{App, Mode};
use crate::state::event::{EventKind, format_duration, format_time};
use crate::state::timeline::{KernelCell, Window};

/// Smallest terminal the viewer draws into; below it a message says so instead.
pub const MIN_WIDTH: u16 = 60;
/// See [`MIN_WIDTH`].
pub const MIN_HEIGHT: u16 = 16;
/// Width of the label column left of every time axis.
pub const LABEL_WIDTH: u16 = 16;
/// Width of the detail pane when an event is selected.
const DETAIL_WIDTH: u16 = 40;

/// Columns of the time axis for a terminal `width` wide (what `App::refresh` needs before drawing).
pub fn axis_columns(app: &App, width: u16) -> usize {
    let detail = if app.selection.is_some() && width >= MIN_WIDTH + DETAIL_WIDTH / 2 {
        DETAIL_WIDTH
    } else {
        0
    };
    usize::from(width.saturating_sub(LABEL_WIDTH + detail))
}

/// Draws the whole screen. `app.refresh(axis_columns(..))` must have run for this size.
pub fn draw(frame: &mut Frame<'_>, app: &mut App) {
    let area = frame.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        too_small(area, frame.buffer_mut());
        return;
    }
    let [top, body, bottom] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(area);
    title_bar(app, top, frame.buffer_mut());
    status_bar(app, bottom, frame.buffer_mut());
    let mut body = body;
    if let Some(d) = &app.divergence {
        let [banner, rest] =
            Layout::vertical([Constraint::Length(1), Constraint::Min(1)]).areas(body);
        Paragraph::new(d.summary.as_str())
            .style(style::DIVERGENCE)
            .render(banner, frame.buffer_mut());
        body = rest;
    }
    if app.mode == Mode::Stats {
        match &app.stats {
            Some(stats) => {
                let view = stats::StatsView::new(stats, app.timeline.endpoints());
                // Never scroll the last line above the bottom of the screen.
                let max = (view.lines().len() as u16).saturating_sub(body.height);
                app.stats_scroll = app.stats_scroll.min(max);
                Paragraph::new(view.lines())
                    .scroll((app.stats_scroll, 0))
                    .render(body, frame.buffer_mut());
            }
            None => {
                let events = app.timeline.source().total_counts().total();
                Paragraph::new(format!(
                    "computing statistics: reading all {events} events of the trace once..."
                ))
                .render(body, frame.buffer_mut());
            }
        }
        return;
    }
    let main = if let Some(sel) = &app.selection
        && usize::from(body.width.saturating_sub(LABEL_WIDTH)) > axis_columns(app, body.width)
    {
        let [main, side] =
            Layout::horizontal([Constraint::Min(1), Constraint::Length(DETAIL_WIDTH)]).areas(body);
        detail::DetailView::new(
            sel,
            app.timeline.endpoints(),
            app.timeline.source().names(),
            app.timeline.extent().start_ns,
        )
        .with_mpi(app.timeline.source().mpi())
        .render(side, frame.buffer_mut());
        main
    } else {
        body
    };
    if let Some(window) = app.window.take() {
        body_panels(app, &window, main, frame.buffer_mut());
        app.window = Some(window);
    }
    let kernels = || kernels_in_view(app.window.as_ref());
    match app.mode {
        Mode::Help => help::HelpView {
            kernels: &kernels(),
        }
        .render(area, frame.buffer_mut()),
        Mode::Legend => (&legend::LegendView {
            kernels: &kernels(),
        })
            .render(area, frame.buffer_mut()),
        _ => {}
    }
}

/// Distinct kernel names drawn in the window, sorted (the legend's colour groups).
fn kernels_in_view(window: Option<&Window>) -> Vec<String> {
    let mut names: Vec<String> = window
        .into_iter()
        .flat_map(|w| &w.tracks)
        .flat_map(|t| &t.kernels)
        .filter_map(|c| match c {
            KernelCell::Span { kernel, .. } => Some(kernel.to_string()),
            _ => None,
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

fn body_panels(app: &mut App, window: &Window, area: Rect, buf: &mut Buffer) {
    let totals = app.timeline.source().total_counts();
    let lanes = lanes::LaneSet {
        samples: totals.get(EventKind::PerfSample) > 0,
        faults: totals.get(EventKind::Ebpf) + totals.get(EventKind::PerfSoftware) > 0,
        pt: totals.get(EventKind::PtChunk) > 0,
        off_cpu: totals.get(EventKind::Ebpf) > 0,
    };
    let timeline_rows = 1 + 2 * window.tracks.len() as u16;
    let link_rows = if window.detail {
        1 + window.links.len().max(1) as u16
    } else {
        1
    };
    let lane_rows = lanes.rows(window) as u16;
    let [t_area, l_area, p_area] = Layout::vertical([
        Constraint::Length(timeline_rows),
        Constraint::Length(link_rows),
        Constraint::Max(lane_rows),
    ])
    .areas(area);
    let view = timeline::TimelineView {
        window,
        endpoints: app.timeline.endpoints(),
        extent_start: app.timeline.extent().start_ns,
        cursor: app.cursor,
        selection: app.selection.as_ref(),
    };
    app.hits = view.hit_map(t_area);
    view.render(t_area, buf);
    links::LinksView {
        window,
        endpoints: app.timeline.endpoints(),
    }
    .render(l_area, buf);
    lanes::LanesView {
        window,
        endpoints: app.timeline.endpoints(),
        lanes,
    }
    .render(p_area, buf);
}

fn too_small(area: Rect, buf: &mut Buffer) {
    let text = format!(
        "terminal too small: {}x{}, slug view needs {}x{} — enlarge the window or press q",
        area.width, area.height, MIN_WIDTH, MIN_HEIGHT
    );
    Paragraph::new(text)
        .wrap(Wrap { trim: true })
        .render(area, buf);
}

fn title_bar(app: &App, area: Rect, buf: &mut Buffer) {
    let origin = app.timeline.extent().start_ns;
    let mut spans = vec![
        Span::styled(" slug view ", style::TITLE),
        Span::raw(format!(" {} ", app.title)),
    ];
    if !app.filter.is_empty() {
        spans.push(Span::styled(
            format!(" filter: {} ", app.filter.text()),
            style::FILTER,
        ));
    }
    spans.extend([Span::raw(format!(
        " {}..{} ({}) ",
        format_time(app.view.start_ns - origin),
        format_time(app.view.end_ns - origin),
        format_duration(app.view.len())
    ))]);
    if let Some(w) = &app.window {
        let lod = match (w.detail, app.filter.needs_events()) {
            (true, _) => "events",
            (false, false) => "overview from index",
            (false, true) => "overview from index, name filters apply when zoomed in",
        };
        spans.push(Span::styled(
            format!(" {lod}: {} in view ", w.events_in_view),
            style::DIM,
        ));
    }
    Line::from(spans).render(area, buf);
}

fn status_bar(app: &App, area: Rect, buf: &mut Buffer) {
    let line = match app.mode {
        Mode::Prompt(kind) => Line::from(vec![
            Span::styled(format!("{}: ", kind.label()), style::TITLE),
            Span::raw(app.input.as_str()),
            Span::styled(" ", Style::default().add_modifier(Modifier::REVERSED)),
        ]),
        _ => match &app.message {
            Some(m) => Line::styled(m.as_str(), style::MESSAGE),
            None => Line::styled(
                match app.mode {
                    Mode::Stats => {
                        "t/esc back to timeline  up/down pgup/pgdn scroll  ? help  q quit"
                    }
                    _ => {
                        "q quit  ? help  L legend  w/s zoom  a/d pan  up/down track  n/p event  / filter  g time  : step  t stats"
                    }
                },
                style::DIM,
            ),
        },
    };
    line.render(area, buf);
}
