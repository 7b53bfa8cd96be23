//! The `?` overlay: every key the viewer understands, then the legend.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Widget};

use crate::view::legend;

/// Key bindings, as shown in the overlay.
pub const KEYS: [(&str, &str); 19] = [
    ("w + =", "zoom in"),
    ("s - _", "zoom out"),
    ("a left", "pan back"),
    ("d right", "pan forward"),
    ("up/down j/k", "move the track cursor"),
    ("0 home", "show the whole trace"),
    ("n tab", "next matching event on the track"),
    ("p shift-tab", "previous matching event"),
    ("enter", "select the event at the centre"),
    ("mouse click", "select the event under the pointer"),
    ("mouse wheel", "zoom around the pointer"),
    ("g", "jump to a time (12.5ms, 300us, 2s)"),
    (": G", "jump to step N on the cursor's endpoint"),
    ("/", "filter: kind:K kernel:K ep:E words"),
    ("esc", "clear selection, then filter"),
    ("t", "statistics view (up/down scroll it)"),
    ("L", "legend: marks, lanes, kernel colours"),
    ("?", "this help and the legend (any key closes)"),
    ("q ctrl-c", "quit"),
];

/// The help overlay, centred over whatever is drawn: the keys, then the legend.
#[derive(Debug, Clone, Copy)]
pub struct HelpView<'a> {
    /// Kernel names for the legend's colour groups.
    pub kernels: &'a [String],
}

impl Widget for HelpView<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let legend = legend::lines(self.kernels);
        let width = 78.min(area.width);
        let height = ((KEYS.len() + 1 + legend.len()) as u16 + 2).min(area.height);
        let [row] = Layout::vertical([Constraint::Length(height)])
            .flex(Flex::Center)
            .areas(area);
        let [popup] = Layout::horizontal([Constraint::Length(width)])
            .flex(Flex::Center)
            .areas(row);
        Clear.render(popup, buf);
        let mut text: Vec<Line<'static>> = KEYS
            .iter()
            .map(|(k, what)| Line::raw(format!("{k:>12}  {what}")))
            .collect();
        text.push(Line::raw(""));
        text.extend(legend);
        Paragraph::new(text)
            .block(Block::default().borders(Borders::ALL).title(" keys "))
            .render(popup, buf);
    }
}
