//! The perf lanes: per endpoint, sample density, page-fault (first-touch) activity and PT volume,
//! each only when the trace holds that kind of event; then, in detail, one off-CPU lane per
//! thread with eBPF off-CPU intervals, a letter per column saying what it waited on most.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::widgets::Widget;

use crate::state::source::EndpointInfo;
use crate::state::timeline::{TrackBins, WaitClass, Window};
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
    /// eBPF off-CPU lanes (one per thread, in detail).
    pub off_cpu: bool,
}

impl LaneSet {
    /// Number of density lanes per endpoint.
    pub fn count(self) -> usize {
        usize::from(self.samples) + usize::from(self.faults) + usize::from(self.pt)
    }

    /// Rows the lanes take for `window`, with their title row.
    pub fn rows(self, window: &Window) -> usize {
        let threads: usize = if self.off_cpu {
            window.tracks.iter().map(|t| t.off_cpu.len()).sum()
        } else {
            0
        };
        let rows = self.count() * window.tracks.len() + threads;
        if rows == 0 { 0 } else { rows + 1 }
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
        if area.height == 0 || self.lanes.rows(self.window) == 0 {
            return;
        }
        buf.set_stringn(
            area.x,
            area.y,
            "lanes: density per column; off-cpu p preempted f futex i io s sleep y syscall b blocked",
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
        if !self.lanes.off_cpu {
            return;
        }
        for track in &self.window.tracks {
            for (tid, cells) in &track.off_cpu {
                if y >= area.bottom() {
                    return;
                }
                let label = format!("{} t{tid}", stage_name(self.endpoints, track.endpoint));
                buf.set_stringn(area.x, y, label, usize::from(LABEL_WIDTH) - 1, Style::new());
                for (c, cell) in cells.iter().take(columns).enumerate() {
                    if let Some(class) = cell {
                        buf[(x0 + c as u16, y)]
                            .set_char(class.letter())
                            .set_style(Style::new().fg(wait_color(*class)));
                    }
                }
                y += 1;
            }
        }
    }
}

fn wait_color(class: WaitClass) -> Color {
    match class {
        WaitClass::Preempted => Color::LightYellow,
        WaitClass::Futex => Color::LightRed,
        WaitClass::Io => Color::LightBlue,
        WaitClass::Sleep => Color::Gray,
        WaitClass::OtherSyscall => Color::LightMagenta,
        WaitClass::Blocked => Color::White,
    }
}
