//! The `?` overlay: every key the viewer understands.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Widget};

/// Key bindings, as shown in the overlay.
pub const KEYS: [(&str, &str); 18] = [
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
    ("t", "statistics view"),
    ("?", "this help (any key closes)"),
    ("q ctrl-c", "quit"),
];

/// The help overlay, centred over whatever is drawn.
#[derive(Debug, Clone, Copy)]
pub struct HelpView;

impl Widget for HelpView {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let width = 56.min(area.width);
        let height = (KEYS.len() as u16 + 2).min(area.height);
        let [row] = Layout::vertical([Constraint::Length(height)])
            .flex(Flex::Center)
            .areas(area);
        let [popup] = Layout::horizontal([Constraint::Length(width)])
            .flex(Flex::Center)
            .areas(row);
        Clear.render(popup, buf);
        let text: Vec<String> = KEYS
            .iter()
            .map(|(k, what)| format!("{k:>12}  {what}"))
            .collect();
        Paragraph::new(text.join("\n"))
            .block(Block::default().borders(Borders::ALL).title(" keys "))
            .render(popup, buf);
    }
}
