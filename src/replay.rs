//! `slug replay`: re-runs a recorded pipeline (or one stage) from its snapshots, checks every
//! transfer (and kernel output) against the trace, and reports the first divergence.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use slug_replayer::{
    RecordedRun, ReplayOptions, ReplayReport, Verify, npy, replay_pipeline, replay_stage,
};
use slug_transport::inject::Injection;
use slug_transport::pipeline::RunProgress;
use slug_transport::transfer::TransportKind;

use crate::choices::{Transport, VerifyDepth};
use crate::progress::{self, Display, Rate};

const EXAMPLES: &str = "\
Examples:
  slug replay run1/
      Restore every stage from its step-0 snapshot, re-run the pipeline as recorded and check
      every transfer's content hash and the last stage's logits; exit status 0 only when
      bit-exact and complete, 1 on a divergence, 3 when something the run produced could not
      be checked (incomplete: N of M checked, because ...).
  slug replay run1/ --from-step 400 --to-step 420
      Resume every stage at its latest snapshot at or before step 400, stop after step 420.
  slug replay run1/ --transport tcp --threads 4 --report div.json
      The same on another transport and thread count; write the first divergence for
      `slug view run1/ --divergence div.json`.
  slug replay run1/ --verify kernel
      Also check every kernel output (trace recorded with `slug record --hash-kernels`).
  slug replay run1/ --stage 2 --from-step 40
      Stage 2 alone from its latest snapshot at or before step 40, fed the inputs the trace
      recorded (needs `slug record --payloads all`), its outbound transfers checked.
  slug replay run1/ --stage 1 --to-step 12 --dump k.layer.3.seq.0 --out k.npy
      Replay stage 1 through step 12 and write layer 3's keys of sequence 0 as NumPy .npy.
  slug replay run1/ --hosts 10.0.0.1:7070,10.0.0.2:7070 --node-trace /data/run1
      Stage s on the s-th `slug node` (which restores it from its copy of the trace).
  mpirun -np 4 slug replay run1/ --transport mpi
      Rank r restores stage r from its copy of run1/ (the same path on every host); rank 0
      checks every transfer (a build with --features mpi). Without --transport, a trace
      recorded over MPI replays on local threads.
  slug replay run1/ --inject stage=1,layer=3,kernel=down,step=5
      Flip one bit of that kernel output during the replay: the report must point there.

Steps are a stage's step counter (one forward pass of one sequence), as in the trace's step
boundaries and kernel spans; the report also names the decode step and sequence.";

/// Arguments of `slug replay`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct ReplayArgs {
    /// The trace directory (as written by `slug record --out`).
    trace: PathBuf,
    /// Transport of the replay (default: the recorded one).
    #[arg(long, value_enum)]
    transport: Option<Transport>,
    /// Threads per stage (default: the recorded count).
    #[arg(long)]
    threads: Option<usize>,
    /// Replay only this stage, fed its recorded inbound payloads.
    #[arg(long)]
    stage: Option<usize>,
    /// First step to check; the replay resumes at the latest snapshot at or before it.
    #[arg(long)]
    from_step: Option<u64>,
    /// Last step to check; every replayed stage stops after it.
    #[arg(long)]
    to_step: Option<u64>,
    /// Verification level.
    #[arg(long, value_enum, default_value_t = VerifyDepth::Transfer)]
    verify: VerifyDepth,
    /// Flip one bit of one kernel output: stage=S,layer=L,kernel=K,step=N[,element=E][,bit=B].
    #[arg(long)]
    inject: Option<String>,
    /// Write the first divergence as JSON (the shape `slug view --divergence` reads).
    #[arg(long)]
    report: Option<PathBuf>,
    /// With --stage: write this arena tensor after the last replayed step (see --out).
    #[arg(long, requires = "out", requires = "stage")]
    dump: Option<String>,
    /// File the --dump tensor is written to, as NumPy .npy.
    #[arg(long, requires = "dump")]
    out: Option<PathBuf>,
    /// Longest wait on a link, in milliseconds (default: the recorded limit).
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Run stage s on the `slug node --listen` at the s-th address (tcp; a comma list, or the
    /// flag once per stage); each node restores its stage from its own copy of the trace.
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT,...")]
    hosts: Vec<String>,
    /// Where the trace lies on the --hosts nodes (default: the same path as here).
    #[arg(long, requires = "hosts")]
    node_trace: Option<PathBuf>,
    /// Cluster key file for --hosts (default: the SLUG_CLUSTER_KEY environment variable).
    #[arg(long, requires = "hosts")]
    key_file: Option<PathBuf>,
    /// Print one JSON object instead of text (and show no progress).
    #[arg(long)]
    json: bool,
    /// Show no progress on stderr.
    #[arg(long, short)]
    quiet: bool,
}

/// Runs `slug replay`; exit status 0 only when the replay was bit-exact and complete (1 when
/// it diverged, 3 when it matched but not every recorded transfer or kernel output was checked).
pub fn execute(args: ReplayArgs) -> Result<ExitCode> {
    if let Some(line) = crate::recover::killed(&args.trace) {
        bail!("{line}; a replay checks against complete logs only");
    }
    let rec = Arc::new(RecordedRun::open(&args.trace)?);
    let transport = args.transport.map(TransportKind::from);
    let inject = args
        .inject
        .as_deref()
        .map(str::parse::<Injection>)
        .transpose()?;
    if !args.hosts.is_empty() {
        crate::node::warn_if_key_in_env(args.key_file.as_deref());
    }
    if transport.unwrap_or(rec.config().transport) == TransportKind::Rdma
        && args.hosts.is_empty()
        && args.stage.is_none()
    {
        crate::rdma::check()?;
    }
    let opts = ReplayOptions {
        transport,
        threads: args.threads,
        from_step: args.from_step,
        to_step: args.to_step,
        verify: args.verify.into(),
        inject,
        timeout_ms: args.timeout_ms,
        hosts: args.hosts.clone(),
        node_trace: args.node_trace.clone(),
        key_file: args.key_file.clone(),
        progress: None,
    };
    let show = !(args.json || args.quiet);
    let cfg = rec.config();
    let last = (cfg.tokens * cfg.prompts.len()) as u64;
    // Counted as the runtime counts: a stage's steps of the schedule up to --to-step.
    let steps = args.to_step.map_or(last, |t| t.saturating_add(1).min(last));
    let (stages, display) = match args.stage {
        Some(s) => (
            1,
            Display {
                what: format!("replaying stage {s}"),
                rate: Rate::Steps,
                events: false,
            },
        ),
        None => (
            cfg.stages,
            Display {
                what: "replaying".into(),
                rate: Rate::Tokens,
                events: false,
            },
        ),
    };
    let opts = ReplayOptions {
        progress: show.then(|| RunProgress::new(stages, steps)),
        ..opts
    };
    let report = match args.stage {
        Some(s) => {
            if transport.is_some() || !args.hosts.is_empty() {
                bail!(
                    "--transport and --hosts have no effect with --stage: a single stage replays \
                     without a network"
                );
            }
            let replayed = progress::show(opts.progress.as_ref(), &display, || {
                replay_stage(rec.clone(), s, &opts)
            })?;
            if let (Some(name), Some(out)) = (&args.dump, &args.out) {
                let t = npy::tensor(&replayed.stage, name)?;
                npy::write_npy(&t, out)?;
                if !args.json {
                    println!(
                        "wrote {name} of stage {s} ({:?} {}) to {}",
                        t.shape,
                        match t.dtype {
                            npy::Dtype::F32 => "float32",
                            npy::Dtype::U32 => "uint32",
                        },
                        out.display()
                    );
                }
            }
            replayed.report
        }
        None if transport == Some(TransportKind::Mpi) => {
            // Under mpirun: rank 0 checks and prints; the other ranks only run their stage.
            match crate::mpi::replay_pipeline(rec.clone(), &opts)? {
                Some(report) => report,
                None => return Ok(ExitCode::SUCCESS),
            }
        }
        None => progress::show(opts.progress.as_ref(), &display, || {
            replay_pipeline(rec.clone(), &opts)
        })?,
    };
    match (&args.report, &report.first) {
        (Some(path), Some(first)) => {
            let text = serde_json::to_string_pretty(first)?;
            std::fs::write(path, text + "\n")
                .with_context(|| format!("cannot write the report {}", path.display()))?;
        }
        (Some(path), None) if !args.json => {
            println!("no divergence: {} not written", path.display());
        }
        _ => {}
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_text(&report);
    }
    Ok(if report.bit_exact {
        ExitCode::SUCCESS
    } else if report.first.is_none() && report.incomplete.is_some() {
        ExitCode::from(3)
    } else {
        ExitCode::from(1)
    })
}

pub(crate) fn print_text(r: &ReplayReport) {
    let what = match r.stage {
        Some(s) => format!("stage {s} alone"),
        None => format!("{} on {}", "pipeline", r.transport),
    };
    println!(
        "replayed {what}, {} threads, checked steps {}..={} at --verify {}",
        r.threads,
        r.checked_steps.0,
        r.checked_steps.1,
        match r.verify {
            Verify::Transfer => "transfer",
            Verify::Kernel => "kernel",
        }
    );
    let c = &r.counts;
    let of = |n: u64| {
        if n > 0 {
            format!(" of {n}")
        } else {
            String::new()
        }
    };
    println!(
        "  transfers: {}{} checked, {} differ; kernel outputs: {}{} checked, {} differ",
        c.transfers_checked,
        of(r.transfers_expected),
        c.transfers_differing,
        c.kernels_checked,
        of(r.kernels_expected),
        c.kernels_differing
    );
    if let Some(rec) = r.recorded_ns.filter(|n| *n > 0 && r.wall_ns > 0) {
        println!(
            "  time: {:.2} ms replayed vs {:.2} ms recorded ({:.2}x)",
            r.wall_ns as f64 / 1e6,
            rec as f64 / 1e6,
            rec as f64 / r.wall_ns as f64
        );
    }
    for n in &r.notes {
        println!("  note: {n}");
    }
    if let Some(why) = &r.incomplete {
        println!("incomplete: {why}");
    }
    match &r.first {
        None if r.bit_exact => println!("bit-exact"),
        None if r.incomplete.is_some() => {
            println!("not verified: what was checked matched, but not everything was checked");
        }
        None => println!("nothing to compare: not verified"),
        Some(d) => {
            let mut at = format!("endpoint {} step {}", d.endpoint, d.step);
            if let Some(p) = r.first_place {
                at.push_str(&format!(
                    " (decode step {}, sequence {})",
                    p.decode_step, p.seq
                ));
            }
            if let Some(l) = d.layer {
                at.push_str(&format!(" layer {l}"));
            }
            if let Some(k) = &d.kernel {
                at.push_str(&format!(" kernel {k}"));
            }
            if let Some(t) = d.transfer_id {
                at.push_str(&format!(
                    " transfer {}",
                    slug_schema::TransferKey::unpack(t)
                ));
            }
            println!("DIVERGED at {at}");
            let shown = |v: &serde_json::Value| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let transfer = d.transfer_id.map(slug_schema::TransferKey::unpack);
            match (&d.kernel, d.known.as_str(), d.offset) {
                (Some(k), _, _) => println!(
                    "  kernel {k}'s output differs; the trace holds only its hash: expected {}, \
                     got {}",
                    shown(&d.expected),
                    shown(&d.got)
                ),
                (None, "values", Some(o)) => println!(
                    "  transfer {} differs first at element {o}: expected {}, got {}",
                    transfer.map_or("-".into(), |t| t.to_string()),
                    shown(&d.expected),
                    shown(&d.got)
                ),
                _ => println!(
                    "  transfer {} differs; without its payload (record with --payloads all) only \
                     the content hashes are known: expected {}, got {}",
                    transfer.map_or("-".into(), |t| t.to_string()),
                    shown(&d.expected),
                    shown(&d.got)
                ),
            }
            if d.kernel.is_some()
                && let (Some(t), Some(o), Some(want), Some(got)) =
                    (transfer, d.offset, &d.transfer_expected, &d.transfer_got)
            {
                println!(
                    "  the step's transfer {t} differs first at element {o}: expected {}, got {}",
                    shown(want),
                    shown(got)
                );
            }
            println!("  {} later transfers also differ", d.later_differing);
        }
    }
}
