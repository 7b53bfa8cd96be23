//! The perf lanes: per endpoint, sample density, page-fault (first-touch) activity and PT volume,
//! each only when the trace holds that kind of event.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::widgets::Widget;

use crate::state::source::EndpointInfo;
use crate::state::timeline::{TrackBins, Window};
use crate::view::links::stage_name;
use crate::view::{LABEL_WIDTH, style};

/// One lane kind: its name, where its values live in a track, its colour.
type Lane = (&'static str, fn(&TrackBins) -> &[f64], Color);

/// Which lanes the trace has data for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaneSet {
    /// Perf samples.
    pub samples: bool,
    /// Page faults (eBPF).
    pub faults: bool,
    /// Intel PT.
    pub pt: bool,
}

impl LaneSet {
    /// Number of lanes per endpoint.
    pub fn count(self) -> usize {
        usize::from(self.samples) + usize::from(self.faults) + usize::from(self.pt)
    }

    fn lanes(self) -> Vec<Lane> {
        let mut out: Vec<Lane> = Vec::new();
        if self.samples {
            out.push(("samples", |t| &t.samples, Color::LightMagenta));
        }
        if self.faults {
            out.push(("faults", |t| &t.faults, Color::LightRed));
        }
        if self.pt {
            out.push(("pt", |t| &t.pt, Color::LightYellow));
        }
        out
    }
}

/// The perf lanes for one window.
#[derive(Debug)]
pub struct LanesView<'a> {
    /// What to draw.
    pub window: &'a Window,
    /// Endpoint names.
    pub endpoints: &'a [EndpointInfo],
    /// Which lanes to draw.
    pub lanes: LaneSet,
}

impl Widget for &LanesView<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        if area.height == 0 || self.lanes.count() == 0 {
            return;
        }
        buf.set_stringn(
            area.x,
            area.y,
            "perf lanes: density per column",
            usize::from(area.width),
            style::DIM,
        );
        let x0 = area.x + LABEL_WIDTH;
        let columns = usize::from(area.width.saturating_sub(LABEL_WIDTH));
        let mut y = area.y + 1;
        for (name, values, color) in self.lanes.lanes() {
            // One scale per lane kind across endpoints, so endpoints compare at a glance.
            let max = self
                .window
                .tracks
                .iter()
                .flat_map(|t| values(t).iter().copied())
                .fold(0.0, f64::max);
            for track in &self.window.tracks {
                if y >= area.bottom() {
                    return;
                }
                let label = format!("{} {name}", stage_name(self.endpoints, track.endpoint));
                buf.set_stringn(area.x, y, label, usize::from(LABEL_WIDTH) - 1, Style::new());
                for (c, v) in values(track).iter().take(columns).enumerate() {
                    let ch = style::bar(*v, max);
                    if ch != ' ' {
                        buf[(x0 + c as u16, y)]
                            .set_char(ch)
                            .set_style(Style::new().fg(color));
                    }
                }
                y += 1;
            }
        }
    }
}
