//! Live progress of `run`, `record` and `replay` on stderr: steps done of total, tokens/s,
//! events recorded and bytes sent, from every stage (nodes send theirs with each heartbeat).
//! A bar on a terminal, a plain line every few seconds otherwise, nothing when asked for none.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use slug_transport::pipeline::{ProgressReading, RunProgress};

use crate::info::{bytes, thousands};

/// How often a plain progress line is printed when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(2);
/// How often the bar on a terminal is redrawn.
const BAR_EVERY: Duration = Duration::from_millis(100);

/// What the rate counts: generated tokens (a pipeline), or steps (one stage replayed alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// Tokens the last stage generated per second.
    Tokens,
    /// Steps of the one replayed stage per second.
    Steps,
}

/// How a command shows its progress.
#[derive(Debug, Clone)]
pub struct Display {
    /// What is going on: `running`, `recording`, `replaying stage 2`.
    pub what: String,
    /// What the rate counts.
    pub rate: Rate,
    /// Whether events are being recorded (so their count means something).
    pub events: bool,
}

/// Runs `work` while showing `progress` (if any) on stderr, then clears the bar, or (not on a
/// terminal) prints one last line with the final counts when the work succeeded.
pub fn show<T, E>(
    progress: Option<&Arc<RunProgress>>,
    display: &Display,
    work: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let Some(progress) = progress else {
        return work();
    };
    let terminal = std::io::stderr().is_terminal();
    let start = Instant::now();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let watcher = scope.spawn(move || {
            if terminal {
                draw_bar(progress, display, start, &done_rx);
            } else {
                loop {
                    match done_rx.recv_timeout(PLAIN_EVERY) {
                        Err(RecvTimeoutError::Timeout) => {
                            eprintln!("slug: {}", line(&progress.read(), display, start.elapsed()));
                        }
                        _ => return,
                    }
                }
            }
        });
        let out = work();
        drop(done_tx);
        let _ = watcher.join();
        if !terminal && out.is_ok() {
            eprintln!(
                "slug: {} (finished)",
                line(&progress.read(), display, start.elapsed())
            );
        }
        out
    })
}

fn draw_bar(progress: &RunProgress, display: &Display, start: Instant, done: &mpsc::Receiver<()>) {
    let first = progress.read();
    let bar = ProgressBar::with_draw_target(Some(first.total()), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} {prefix} [{bar:24}] {pos}/{len} steps {msg} [{elapsed_precise}]",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(display.what.clone());
    loop {
        let r = progress.read();
        bar.set_position(r.steps());
        bar.set_message(details(&r, display, start.elapsed()));
        if !matches!(done.recv_timeout(BAR_EVERY), Err(RecvTimeoutError::Timeout)) {
            break;
        }
    }
    bar.finish_and_clear();
}

/// One plain line: `recording: 120/384 steps, 45.2 tokens/s, 12,345 events, 3.4 MiB sent;
/// per stage 32 30 29 29`.
pub fn line(r: &ProgressReading, display: &Display, elapsed: Duration) -> String {
    format!(
        "{}: {}/{} steps{}",
        display.what,
        thousands(r.steps()),
        thousands(r.total()),
        details(r, display, elapsed)
    )
}

fn details(r: &ProgressReading, display: &Display, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let mut out = match display.rate {
        Rate::Tokens => format!(", {:.1} tokens/s", r.tokens() as f64 / secs),
        Rate::Steps => format!(", {:.1} steps/s", r.steps() as f64 / secs),
    };
    if display.events {
        out.push_str(&format!(", {} events", thousands(r.events)));
    }
    out.push_str(&format!(", {} sent", bytes(r.bytes)));
    if r.stage_steps.len() > 1 {
        let each: Vec<String> = r.stage_steps.iter().map(u64::to_string).collect();
        out.push_str(&format!("; per stage {}", each.join(" ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_names_steps_rate_events_bytes_and_each_stage() {
        let p = RunProgress::new(2, 10);
        p.set(0, 10, 40, 2048);
        p.set(1, 5, 20, 0);
        let display = Display {
            what: "recording".into(),
            rate: Rate::Tokens,
            events: true,
        };
        assert_eq!(
            line(&p.read(), &display, Duration::from_secs(2)),
            "recording: 15/20 steps, 2.5 tokens/s, 60 events, 2.0 KiB sent; per stage 10 5"
        );
        let display = Display {
            what: "replaying stage 1".into(),
            rate: Rate::Steps,
            events: false,
        };
        let p = RunProgress::new(1, 8);
        p.set(0, 4, 0, 0);
        assert_eq!(
            line(&p.read(), &display, Duration::from_secs(1)),
            "replaying stage 1: 4/8 steps, 4.0 steps/s, 0 B sent"
        );
    }
}
