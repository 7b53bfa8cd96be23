//! `slug view`: inspect a trace's timelines in a terminal UI.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Args;
use slug_viewer::TraceDirSource;
use slug_viewer::state::app::App;
use slug_viewer::state::divergence::Divergence;
use slug_viewer::state::timeline::Timeline;

fn examples() -> String {
    format!(
        "Examples:\n  slug view run1\n  \
         slug view run1 --divergence div.json   # a report from `slug replay run1 --report div.json`\n\n\
         In the viewer `?` lists the keys, and `/` filters with kind:NAME kernel:TEXT ep:TEXT or\n\
         plain words, e.g. `/kind:kernel_span kernel:gemm ep:s1`. Kinds: {}.",
        crate::info::kind_names()
    )
}

/// Arguments of `slug view`.
#[derive(Debug, Args)]
#[command(after_help = examples())]
pub struct ViewArgs {
    /// Trace directory (written by `slug record` or `slug demo`).
    pub trace: PathBuf,
    /// Highlight the first divergence of a replay: the JSON report `slug replay` writes.
    #[arg(long, value_name = "REPORT.json")]
    pub divergence: Option<PathBuf>,
}

/// Runs `slug view`.
pub fn execute(args: ViewArgs) -> Result<ExitCode> {
    // Before opening: a killed recording's logs may not open at all.
    if let Some(line) = crate::recover::notice(&args.trace) {
        eprintln!("slug: warning: {line}");
    }
    let source = TraceDirSource::open(&args.trace)?;
    let divergence = args
        .divergence
        .as_deref()
        .map(Divergence::read)
        .transpose()?;
    if !std::io::stdout().is_terminal() {
        bail!(
            "slug view draws on a terminal and stdout is not one; use `slug export` or `slug info` in scripts"
        );
    }
    let mut app = App::new(
        Timeline::new(Box::new(source)),
        args.trace.display().to_string(),
    );
    if let Some(report) = divergence {
        app.set_divergence(report)?;
    }
    slug_viewer::run::run_terminal(app)?;
    Ok(ExitCode::SUCCESS)
}
