//! The detail pane: every field of the selected event.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Widget, Wrap};

use crate::state::app::Selection;
use crate::state::event::{Names, Nanos};
use crate::state::source::EndpointInfo;
use crate::view::style;

/// The detail pane for one selection.
#[derive(Debug)]
pub struct DetailView<'a> {
    selection: &'a Selection,
    endpoints: &'a [EndpointInfo],
    names: &'a Names,
    origin: Nanos,
}

impl<'a> DetailView<'a> {
    /// A pane for `selection`, naming endpoints from `endpoints`, strings from `names`, times
    /// from `origin`.
    pub fn new(
        selection: &'a Selection,
        endpoints: &'a [EndpointInfo],
        names: &'a Names,
        origin: Nanos,
    ) -> Self {
        Self {
            selection,
            endpoints,
            names,
            origin,
        }
    }
}

impl Widget for DetailView<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let name = |ep: usize| {
            self.endpoints
                .get(ep)
                .map_or_else(|| format!("#{ep}"), |e| e.name.clone())
        };
        let mut lines = vec![Line::from(vec![
            Span::styled("endpoint ", style::DIM),
            Span::raw(name(self.selection.endpoint)),
        ])];
        for (field, value) in self.selection.event.fields(self.origin, self.names, &name) {
            lines.push(Line::from(vec![
                Span::styled(format!("{field} "), style::DIM),
                Span::raw(value),
            ]));
        }
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(
                Block::default()
                    .borders(Borders::LEFT)
                    .title(" event (esc clears) ")
                    .border_style(Style::new()),
            )
            .render(area, buf);
    }
}
