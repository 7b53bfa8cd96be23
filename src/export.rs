//! `slug export`: export a trace for Perfetto or chrome://tracing.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, ValueEnum};
use slug_viewer::TraceDirSource;
use slug_viewer::export::{Format, export_to_path};
use slug_viewer::state::source::TraceSource;

/// Output formats of `slug export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// Perfetto protobuf trace (open in ui.perfetto.dev).
    Perfetto,
    /// Chrome JSON trace events (chrome://tracing); gzip-compressed when --out ends in .gz.
    Chrome,
}

const EXAMPLES: &str = "\
Examples:
  slug export run1 --format perfetto --out run1.perfetto-trace
      A Perfetto protobuf trace: open it at https://ui.perfetto.dev (Open trace file).
  slug export run1 --format chrome --out run1.json.gz
      Chrome trace-event JSON, gzip-compressed because the name ends in .gz; open it in
      chrome://tracing or Perfetto.
  slug export run1
      Perfetto, written to ./trace.perfetto-trace.";

fn examples() -> String {
    format!(
        "{EXAMPLES}\n\nBoth formats hold kernel slices (with step, seq and layer), transfers as a send \
         and a recv slice joined by a flow, and perf and eBPF system events on one track per OS \
         thread. The Perfetto file's timestamps are CLOCK_MONOTONIC; its packets are interned \
         and deflated as Perfetto's own traces are. Each event's category is its kind's name: {}.",
        crate::info::kind_names()
    )
}

/// Arguments of `slug export`.
#[derive(Debug, Args)]
#[command(after_help = examples())]
pub struct ExportArgs {
    /// Trace directory.
    pub trace: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ExportFormat::Perfetto)]
    pub format: ExportFormat,
    /// Output file [default: trace.perfetto-trace or trace.json in the current directory].
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Runs `slug export`.
pub fn execute(args: ExportArgs) -> Result<ExitCode> {
    let format = match args.format {
        ExportFormat::Perfetto => Format::Perfetto,
        ExportFormat::Chrome => Format::Chrome,
    };
    // Before opening: a killed recording's logs may not open at all.
    if let Some(line) = crate::recover::notice(&args.trace) {
        eprintln!("slug: warning: {line}");
    }
    let source = TraceDirSource::open(&args.trace)?;
    // Damaged logs are exported as far as they could be read, and said so.
    for (ep, info) in source.endpoints().iter().enumerate() {
        let health = source.health(ep);
        if !health.note.is_empty() {
            eprintln!("slug: warning: {}: {}", info.name, health.note);
        }
    }
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from(format.default_file_name()));
    let s = export_to_path(&source, format, &out)?;
    if s.unreadable_frames > 0 {
        eprintln!(
            "slug: warning: {} frames could not be decoded and were left out",
            s.unreadable_frames
        );
    }
    let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    let packets = if s.uncompressed_bytes > 0 {
        format!(
            "; {} of packets deflated",
            slug_viewer::state::event::format_bytes(s.uncompressed_bytes)
        )
    } else {
        String::new()
    };
    println!(
        "wrote {} ({}{packets}): {} tracks, {} kernel slices, {} transfers (send and recv slices \
         joined by a flow), {} system events, {} counter values, {} instants",
        out.display(),
        slug_viewer::state::event::format_bytes(size),
        s.tracks,
        s.slices,
        s.flows,
        s.system,
        s.counters,
        s.instants
    );
    Ok(ExitCode::SUCCESS)
}
