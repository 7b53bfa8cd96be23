//! The timeline panel: a time axis, then two rows per endpoint — kernel spans coloured by kernel,
//! and marks (step boundaries, snapshots, losses, flows with their bytes, the divergence).

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::widgets::Widget;

use crate::state::app::{HitMap, Selection};
use crate::state::event::{Nanos, format_bytes, format_duration};
use crate::state::source::EndpointInfo;
use crate::state::timeline::{KernelCell, Mark, Window};
use crate::view::LABEL_WIDTH;
use crate::view::style;

/// The timeline panel for one window.
#[derive(Debug)]
pub struct TimelineView<'a> {
    /// What to draw.
    pub window: &'a Window,
    /// Endpoint names.
    pub endpoints: &'a [EndpointInfo],
    /// Trace start, so the axis reads time since the start.
    pub extent_start: Nanos,
    /// Track under the cursor.
    pub cursor: usize,
    /// Selected event, highlighted.
    pub selection: Option<&'a Selection>,
}

impl TimelineView<'_> {
    /// Which screen rows belong to which track when drawn into `area`.
    pub fn hit_map(&self, area: Rect) -> HitMap {
        let mut rows = Vec::new();
        for (i, _) in self.window.tracks.iter().enumerate() {
            let y = area.y + 1 + 2 * i as u16;
            if y + 1 < area.bottom() {
                rows.push((y, i));
                rows.push((y + 1, i));
            }
        }
        HitMap {
            x: area.x + LABEL_WIDTH,
            width: area.width.saturating_sub(LABEL_WIDTH),
            rows,
        }
    }

    fn axis(&self, area: Rect, buf: &mut Buffer) {
        buf.set_stringn(area.x, area.y, "time", usize::from(LABEL_WIDTH), style::DIM);
        let x0 = area.x + LABEL_WIDTH;
        let width = area.width.saturating_sub(LABEL_WIDTH);
        let mut x = 0u16;
        while x < width {
            let t = self.window.column_start(usize::from(x)) - self.extent_start;
            let label = format!("|{}", format_duration(t));
            if x + label.len() as u16 > width {
                break;
            }
            buf.set_string(x0 + x, area.y, &label, style::DIM);
            x += (label.len() as u16 + 4).max(14);
        }
    }
}

fn short_label(name: &str, width: usize) -> String {
    let chars: Vec<char> = name.chars().collect();
    if chars.len() <= width {
        name.to_string()
    } else {
        chars[chars.len() - width..].iter().collect()
    }
}

impl TimelineView<'_> {
    /// Draws each transfer between tracks that are not neighbours as a dotted line in the
    /// column it was posted, through the rows between its sender's and receiver's tracks (only
    /// over blank cells, and only while flows are sparse enough to read).
    fn connectors(&self, area: Rect, buf: &mut Buffer) {
        let x0 = area.x + LABEL_WIDTH;
        let columns = usize::from(area.width - LABEL_WIDTH).min(self.window.columns);
        if self.window.flows.len() > columns / 3 {
            return;
        }
        let row_of = |ep| {
            self.window
                .tracks
                .iter()
                .position(|t| t.endpoint == ep)
                .map(|i| area.y + 1 + 2 * i as u16)
        };
        for &(src, dst, c) in &self.window.flows {
            let (Some(ys), Some(yd)) = (row_of(src), row_of(dst)) else {
                continue;
            };
            // Neighbours need no line: the sender's mark row sits right above the receiver.
            // Otherwise the line fills the rows strictly between the two mark rows.
            if ys.abs_diff(yd) <= 2 || c >= columns {
                continue;
            }
            let (top, bottom) = (ys.min(yd) + 2, ys.max(yd) + 1);
            for y in top..bottom.min(area.bottom()) {
                let cell = &mut buf[(x0 + c as u16, y)];
                if cell.symbol() == " " {
                    cell.set_char('┊').set_style(style::DIM);
                }
            }
        }
    }
}

impl Widget for &TimelineView<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        if area.height == 0 || area.width <= LABEL_WIDTH {
            return;
        }
        self.axis(area, buf);
        let x0 = area.x + LABEL_WIDTH;
        let columns = usize::from(area.width - LABEL_WIDTH).min(self.window.columns);
        let selected = self
            .selection
            .map(|s| (s.endpoint, s.event.start(), s.event.end()));
        for (i, track) in self.window.tracks.iter().enumerate() {
            let y = area.y + 1 + 2 * i as u16;
            if y >= area.bottom() {
                break;
            }
            let name = self
                .endpoints
                .get(track.endpoint)
                .map_or("?", |e| e.name.as_str());
            let label_style = if i == self.cursor {
                style::CURSOR
            } else {
                Style::new()
            };
            let label = short_label(name, usize::from(LABEL_WIDTH) - 2);
            buf.set_stringn(
                area.x,
                y,
                format!("{}{label}", if i == self.cursor { '>' } else { ' ' }),
                usize::from(LABEL_WIDTH) - 1,
                label_style,
            );
            for (c, cell) in track.kernels.iter().take(columns).enumerate() {
                let (ch, st) = match cell {
                    KernelCell::Idle => continue,
                    KernelCell::Span { kernel, busy } => (
                        style::shade(*busy),
                        Style::new().fg(style::kernel_color(kernel)),
                    ),
                    KernelCell::Density(d) => (style::shade(*d), Style::new().fg(Color::Gray)),
                };
                buf[(x0 + c as u16, y)].set_char(ch).set_style(st);
            }
            if y + 1 >= area.bottom() {
                continue;
            }
            let mut skip_until = 0;
            for (c, mark) in track.marks.iter().take(columns).enumerate() {
                if c < skip_until || *mark == Mark::None {
                    continue;
                }
                let (ch, st) = style::mark_glyph(*mark);
                buf[(x0 + c as u16, y + 1)].set_char(ch).set_style(st);
                // Label an outgoing flow with its bytes when the cells after it are free.
                if *mark == Mark::FlowOut {
                    let label = format_bytes(track.flow_bytes[c]);
                    let end = c + 1 + label.len();
                    if end < columns && track.marks[c + 1..=end].iter().all(|m| *m == Mark::None) {
                        buf.set_string(x0 + c as u16 + 1, y + 1, &label, style::DIM);
                        skip_until = end + 1;
                    }
                }
            }
            if let Some((ep, start, end)) = selected
                && ep == track.endpoint
                && self.window.range.touches(start, end)
            {
                let c0 = self.window.column_of(start.max(self.window.range.start_ns));
                let c1 = self
                    .window
                    .column_of(end.min(self.window.range.end_ns.saturating_sub(1)))
                    .max(c0);
                for c in c0..=c1.min(columns.saturating_sub(1)) {
                    buf[(x0 + c as u16, y)].set_style(style::SELECTED);
                    if c == c0 && buf[(x0 + c as u16, y)].symbol() == " " {
                        buf[(x0 + c as u16, y)].set_char('┃');
                    }
                }
            }
        }
        self.connectors(area, buf);
    }
}
