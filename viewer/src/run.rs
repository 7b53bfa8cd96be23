//! The terminal loop of `slug view`: draw, wait for an event, update the state, repeat.

use std::io::stdout;
use std::time::Duration;

use ratatui::Terminal;
use ratatui::backend::Backend;
use ratatui::crossterm::event::{self, DisableMouseCapture, EnableMouseCapture};
use ratatui::crossterm::execute;

use crate::error::{Result, ViewerError};
use crate::state::app::App;
use crate::view;

/// Refreshes the window for the terminal's current size and draws one frame.
pub fn draw_frame<B: Backend>(terminal: &mut Terminal<B>, app: &mut App) -> Result<()> {
    let size = terminal
        .size()
        .map_err(|e| ViewerError::io("the terminal", std::io::Error::other(e.to_string())))?;
    if size.width >= view::MIN_WIDTH && size.height >= view::MIN_HEIGHT {
        app.refresh(view::axis_columns(app, size.width))?;
    }
    terminal
        .draw(|frame| view::draw(frame, app))
        .map_err(|e| ViewerError::io("the terminal", std::io::Error::other(e.to_string())))?;
    Ok(())
}

/// Runs the viewer on the real terminal until the user quits; restores the terminal on every
/// exit path, errors included.
pub fn run_terminal(mut app: App) -> Result<()> {
    let mut terminal =
        ratatui::try_init().map_err(|e| ViewerError::io("the terminal (is stdout a tty?)", e))?;
    let result = execute!(stdout(), EnableMouseCapture)
        .map_err(|e| ViewerError::io("the terminal", e))
        .and_then(|()| event_loop(&mut terminal, &mut app));
    let _ = execute!(stdout(), DisableMouseCapture);
    ratatui::restore();
    result
}

fn event_loop<B: Backend>(terminal: &mut Terminal<B>, app: &mut App) -> Result<()> {
    let tty = |e| ViewerError::io("the terminal", e);
    while !app.quit {
        draw_frame(terminal, app)?;
        if app.compute_pending()? {
            continue;
        }
        // Wait for one event, then drain whatever else is queued (wheel bursts, key repeat)
        // before drawing again, so a burst costs one redraw.
        let first = event::read().map_err(tty)?;
        app.handle(&first);
        while !app.quit && event::poll(Duration::ZERO).map_err(tty)? {
            app.handle(&event::read().map_err(tty)?);
        }
    }
    Ok(())
}
