//! The legend (`L`, and under the keys in `?`): what each mark, line and lane letter means, and
//! which kernels share each colour.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Widget};

use crate::state::timeline::Mark;
use crate::view::style;

/// Marks drawn in a track's mark row, in the order the legend lists them.
const MARKS: [(Mark, &str); 10] = [
    (Mark::Snapshot, "snapshot"),
    (Mark::FlowIn, "transfer arrived from another stage"),
    (Mark::FlowOut, "transfer left (bytes follow)"),
    (Mark::Step, "step boundary"),
    (Mark::Divergence, "replay's first divergence"),
    (Mark::Lost, "events lost here"),
    (Mark::Moved, "stage moved between nodes (migration)"),
    (Mark::Marker, "user marker"),
    (Mark::SlowSyscall, "slow syscall (eBPF)"),
    (Mark::NumaMigration, "moved to another NUMA node (eBPF)"),
];

/// The legend's lines: marks, the flow line, lane glyphs, then one line per kernel colour with
/// the kernels in `kernels` that have it.
pub fn lines(kernels: &[String]) -> Vec<Line<'static>> {
    let mut out = Vec::new();
    for (mark, what) in MARKS {
        let (glyph, st) = style::mark_glyph(mark);
        out.push(Line::from(vec![
            Span::styled(format!("{glyph}"), st),
            Span::raw(format!("  {what}")),
        ]));
    }
    out.push(Line::from(vec![
        Span::styled("┊", style::DIM),
        Span::raw("  transfer between stages that are not neighbours"),
    ]));
    out.push(Line::raw("░▒▓█  share of the column in kernels / density"));
    out.push(Line::raw(
        "off-cpu lane: p preempted f futex i io s sleep y syscall b blocked (eBPF)",
    ));
    let mut groups: Vec<(Color, Vec<&str>)> = Vec::new();
    for k in kernels {
        let c = style::kernel_color(k);
        match groups.iter_mut().find(|(g, _)| *g == c) {
            Some((_, names)) => names.push(k),
            None => groups.push((c, vec![k])),
        }
    }
    if groups.is_empty() {
        out.push(Line::raw("kernel colours: no kernels in view"));
    }
    for (c, names) in groups {
        out.push(Line::from(vec![
            Span::styled("█", Style::new().fg(c)),
            Span::raw(format!("  {}", names.join(" "))),
        ]));
    }
    out
}

/// The legend overlay, centred over whatever is drawn.
#[derive(Debug, Clone)]
pub struct LegendView<'a> {
    /// Kernel names to group by colour, sorted.
    pub kernels: &'a [String],
}

impl Widget for &LegendView<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let text = lines(self.kernels);
        let width = 78.min(area.width);
        let height = (text.len() as u16 + 2).min(area.height);
        let [row] = Layout::vertical([Constraint::Length(height)])
            .flex(Flex::Center)
            .areas(area);
        let [popup] = Layout::horizontal([Constraint::Length(width)])
            .flex(Flex::Center)
            .areas(row);
        Clear.render(popup, buf);
        Paragraph::new(text)
            .block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(" legend (any key closes) "),
            )
            .render(popup, buf);
    }
}
