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

const KEYS_AND_EXAMPLES: &str = "\
Keys (also `?` inside the viewer):
  w + =  zoom in          s - _  zoom out         a left   pan back      d right  pan forward
  up/down j/k  move the track cursor              0 home   the whole trace
  n tab / p shift-tab  next / previous event on the track that matches the filter
  enter  select the event at the centre           mouse: click selects, wheel zooms
  g  jump to a time (12.5ms, 300us, 2s)           : G  jump to step N on the cursor's endpoint
  /  filter: kind:NAME kernel:TEXT ep:TEXT words  esc  clear the selection, then the filter
  t  statistics view (per-kernel table at the end; up/down scroll)
  ?  help and legend                             q ctrl-c  quit
  L  legend: what S ^ v │ ┊ ! X * y n and the off-CPU letters mean, kernel colours

Examples:
  slug view run1
      The timelines of every endpoint of run1 (written by `slug record --out run1`).
  slug view run1 --divergence div.json
      Open at the first divergence a replay reported (`slug replay run1 --report div.json`).
  slug view run1, then /kind:kernel_span kernel:down ep:s1
      Only the MLP down projections of stage 1 (kernels: embed, attn_norm, q_proj, k_proj,
      v_proj, rope_q, rope_k, attention, o_proj, attn_residual, ffn_norm, gate, up, swiglu,
      down, ffn_residual, final_norm, head, argmax; `kernel:proj` matches every projection;
      kinds as in `slug info`).

It draws on a terminal; in scripts use `slug info` or `slug export`.";

fn keys_and_examples() -> String {
    format!(
        "{KEYS_AND_EXAMPLES}\n\nKinds (for /kind:NAME): {}.",
        crate::info::kind_names()
    )
}

/// Arguments of `slug view`.
#[derive(Debug, Args)]
#[command(after_help = keys_and_examples())]
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
