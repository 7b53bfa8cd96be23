//! The link panel: one row per link with traffic in view, bandwidth over time as a sparkline and
//! the bandwidth achieved while the link was busy: bytes moved over the time a transfer was in
//! flight, both inside the view (the stats view applies the same definition to the whole trace,
//! the detail pane to one transfer).

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::widgets::Widget;

use crate::state::event::format_bandwidth;
use crate::state::source::EndpointInfo;
use crate::state::timeline::Window;
use crate::view::{LABEL_WIDTH, style};

/// The link panel for one window.
#[derive(Debug)]
pub struct LinksView<'a> {
    /// What to draw.
    pub window: &'a Window,
    /// Endpoint names.
    pub endpoints: &'a [EndpointInfo],
}

/// The part of an endpoint name after its node (`n0/s1` → `s1`).
pub fn stage_name(endpoints: &[EndpointInfo], ep: usize) -> &str {
    let name = endpoints.get(ep).map_or("?", |e| e.name.as_str());
    name.rsplit('/').next().unwrap_or(name)
}

impl Widget for &LinksView<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        if area.height == 0 {
            return;
        }
        let header = if !self.window.detail {
            "links: zoom in (w) to see transfers"
        } else if self.window.links.is_empty() {
            "links: no transfers in view"
        } else {
            "links: bytes over time; achieved = bytes / time in flight, in view"
        };
        buf.set_stringn(area.x, area.y, header, usize::from(area.width), style::DIM);
        let x0 = area.x + LABEL_WIDTH;
        let columns = usize::from(area.width.saturating_sub(LABEL_WIDTH));
        let max = self
            .window
            .links
            .iter()
            .flat_map(|l| l.bytes.iter().copied())
            .fold(0.0, f64::max);
        for (i, link) in self.window.links.iter().enumerate() {
            let y = area.y + 1 + i as u16;
            if y >= area.bottom() {
                break;
            }
            let label = format!(
                "{}>{} {}",
                stage_name(self.endpoints, link.src),
                stage_name(self.endpoints, link.dst),
                // Both terms clipped to the view: the bytes spread over the columns (a transfer
                // half in view counts half its bytes) over the in-flight time inside the view.
                format_bandwidth(link.bytes.iter().sum::<f64>().round() as u64, link.busy)
            );
            buf.set_stringn(area.x, y, label, usize::from(LABEL_WIDTH) - 1, Style::new());
            for (c, bytes) in link.bytes.iter().take(columns).enumerate() {
                let ch = style::bar(*bytes, max);
                if ch != ' ' {
                    buf[(x0 + c as u16, y)]
                        .set_char(ch)
                        .set_style(Style::new().fg(Color::LightBlue));
                }
            }
        }
    }
}
