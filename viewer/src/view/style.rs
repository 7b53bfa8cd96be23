//! Colours and glyphs shared by the views: one kernel → one colour, one mark → one glyph.

use ratatui::style::{Color, Modifier, Style};

use crate::state::timeline::Mark;

/// The top bar's name tag and prompt labels.
pub const TITLE: Style = Style::new().fg(Color::Black).bg(Color::Cyan);
/// Secondary text.
pub const DIM: Style = Style::new().fg(Color::DarkGray);
/// The active filter in the top bar.
pub const FILTER: Style = Style::new().fg(Color::Black).bg(Color::Yellow);
/// Status-bar messages.
pub const MESSAGE: Style = Style::new().fg(Color::Yellow);
/// The divergence banner and mark.
pub const DIVERGENCE: Style = Style::new()
    .fg(Color::White)
    .bg(Color::Red)
    .add_modifier(Modifier::BOLD);
/// The selected event.
pub const SELECTED: Style = Style::new().add_modifier(Modifier::REVERSED);
/// The label of the track under the cursor.
pub const CURSOR: Style = Style::new().fg(Color::Black).bg(Color::White);

const PALETTE: [Color; 10] = [
    Color::Cyan,
    Color::Green,
    Color::Yellow,
    Color::Magenta,
    Color::Blue,
    Color::LightRed,
    Color::LightGreen,
    Color::LightCyan,
    Color::LightMagenta,
    Color::LightYellow,
];

/// The colour of a kernel: a stable hash of its name into a palette, so a kernel keeps its colour
/// across tracks, zoom levels and runs.
pub fn kernel_color(name: &str) -> Color {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    PALETTE[(hash % PALETTE.len() as u64) as usize]
}

/// Block glyph for a share 0..=1 (busy time in a column, or density).
pub fn shade(share: f32) -> char {
    match share {
        s if s <= 0.0 => ' ',
        s if s < 0.25 => '░',
        s if s < 0.5 => '▒',
        s if s < 0.75 => '▓',
        _ => '█',
    }
}

/// Eighth-block glyph for a value relative to a maximum (sparklines).
pub fn bar(value: f64, max: f64) -> char {
    const BARS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if value <= 0.0 || max <= 0.0 {
        return ' ';
    }
    let level = ((value / max) * 8.0).ceil().clamp(1.0, 8.0) as usize;
    BARS[level]
}

/// Glyph and style of a mark.
pub fn mark_glyph(mark: Mark) -> (char, Style) {
    match mark {
        Mark::None => (' ', Style::new()),
        Mark::Marker => ('*', Style::new().fg(Color::White)),
        Mark::FlowIn => ('^', Style::new().fg(Color::LightBlue)),
        Mark::FlowOut => ('v', Style::new().fg(Color::LightBlue)),
        Mark::Step => ('│', Style::new().fg(Color::Gray)),
        Mark::SlowSyscall => ('y', Style::new().fg(Color::LightRed)),
        Mark::NumaMigration => ('n', Style::new().fg(Color::LightRed)),
        Mark::Snapshot => (
            'S',
            Style::new()
                .fg(Color::LightGreen)
                .add_modifier(Modifier::BOLD),
        ),
        Mark::Lost => (
            'X',
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
        Mark::Moved => (
            'M',
            Style::new()
                .fg(Color::LightMagenta)
                .add_modifier(Modifier::BOLD),
        ),
        Mark::Divergence => ('!', DIVERGENCE),
    }
}
