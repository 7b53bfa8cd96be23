//! `slug recover`: the explicit step that rebuilds the logs of a killed recording and removes
//! what interrupted writes left behind; reading commands only ever point at it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use slug_recorder::{Leftovers, Outcome, RecoveryReport};
use slug_schema::Trace;

const EXAMPLES: &str = "\
Examples:
  slug recover run1
      After `slug record --out run1` was killed: rebuild each endpoint log from its journal and
      flight rings, check it, put it in place, then remove the journals, rings and temporary files.
  slug recover run1 --json
      The same, reporting per endpoint where its events came from as one JSON object.

Reading commands (info, view, export, replay) never write into a trace: `slug info` shows a killed
recording's logs rebuilt in memory, and `slug replay` refuses one until it is recovered.";

/// Arguments of `slug recover`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct RecoverArgs {
    /// Trace directory of a killed recording.
    pub trace: PathBuf,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Runs `slug recover`: exit 0 when every endpoint has a log at least as complete as before,
/// 1 when one could not be rebuilt (its files are then left as they were).
pub fn execute(args: RecoverArgs) -> Result<ExitCode> {
    // Only a slug trace: its own clear error otherwise, before anything is touched.
    Trace::open(&args.trace)?;
    let report = slug_recorder::recover(&args.trace)?;
    if args.json {
        let text = serde_json::to_string_pretty(&report).context("serializing the report")?;
        println!("{text}");
    } else {
        print_report(&args.trace, &report);
    }
    Ok(if report.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_report(dir: &Path, r: &RecoveryReport) {
    if r.endpoints.is_empty() && r.removed.is_empty() {
        println!(
            "{}: nothing to recover (every log was closed cleanly)",
            dir.display()
        );
    }
    for e in &r.endpoints {
        match &e.outcome {
            Outcome::Rebuilt => println!(
                "endpoint {}: rebuilt with {} events ({} from its journal, {} from its old log, \
                 {} from its flight rings; {} dropped by full rings before the kill); the old \
                 log held {}",
                e.endpoint,
                e.events,
                e.from_journal,
                e.from_log,
                e.from_rings,
                e.ring_lost,
                e.old_events
            ),
            Outcome::AlreadyClosed => println!(
                "endpoint {}: its log was closed cleanly; removed the leftovers next to it",
                e.endpoint
            ),
            Outcome::KeptLog => println!(
                "endpoint {}: kept its log ({} events): the rebuild held only {}; its journal \
                 and rings are left in place",
                e.endpoint, e.old_events, e.events
            ),
            Outcome::Failed(why) => eprintln!(
                "slug: error: endpoint {}: not recovered ({why}); its files are left as they were",
                e.endpoint
            ),
        }
        for d in &e.damage {
            eprintln!("slug: warning: endpoint {}: {d}", e.endpoint);
        }
    }
    if !r.removed.is_empty() {
        println!("removed {} leftover file(s):", r.removed.len());
        for p in &r.removed {
            println!("  {}", p.display());
        }
    }
    for p in &r.ignored {
        eprintln!(
            "slug: warning: {}: not a regular file or a real directory (a link?), or of no \
             endpoint in the manifest; left alone, nothing behind it read or removed",
            p.display()
        );
    }
}

/// For reading commands: one line saying what a killed or interrupted recording left in `dir`
/// and that `slug recover` fixes it; `None` when nothing was (or the trace cannot be scanned).
pub fn notice(dir: &Path) -> Option<String> {
    Leftovers::scan(dir).ok()?.notice(dir)
}

/// For commands that must not work on a partial trace: `Some(line)` when a recorder was killed.
pub fn killed(dir: &Path) -> Option<String> {
    let leftovers = Leftovers::scan(dir).ok()?;
    if leftovers.killed().is_empty() {
        None
    } else {
        leftovers.notice(dir)
    }
}
