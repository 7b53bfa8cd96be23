//! The detail pane: every field of the selected event.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Widget, Wrap};

use crate::export::walk::{mpi_numbers, mpi_of};
use crate::state::app::Selection;
use crate::state::event::{Names, Nanos, TraceEvent};
use crate::state::source::EndpointInfo;
use crate::view::style;

/// The detail pane for one selection.
#[derive(Debug)]
pub struct DetailView<'a> {
    selection: &'a Selection,
    endpoints: &'a [EndpointInfo],
    names: &'a Names,
    origin: Nanos,
    mpi: Option<&'a slug_schema::MpiTable>,
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
            mpi: None,
        }
    }

    /// The pane with the recording's MPI table, so an `mpi` transfer also shows its
    /// communicator, ranks and tags.
    pub fn with_mpi(mut self, mpi: Option<&'a slug_schema::MpiTable>) -> Self {
        self.mpi = mpi;
        self
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
        let mut fields = self.selection.event.fields(self.origin, self.names, &name);
        if let TraceEvent::Transfer(x) = &self.selection.event
            && let Some(m) = mpi_of(self.mpi, x)
        {
            fields.push(("communicator", m.communicator.to_string()));
            let (numbers, n) = mpi_numbers(&m);
            fields.extend(numbers[..n].iter().map(|&(k, v)| (k, v.to_string())));
        }
        for (field, value) in fields {
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
