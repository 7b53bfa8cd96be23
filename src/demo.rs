//! `slug demo`: the main job on an embedded default — record a 4-stage pipeline, replay and verify
//! it on another transport, replay one stage alone, prove a divergence report points at an
//! injected fault, and summarise the trace. `--synthetic` instead tours the trace format on a
//! labelled synthetic trace of any size.
//!
//! The recorded demo drives the real subcommands through the same argument parser a user's
//! command line goes through, so what it shows is exactly what `slug record` / `slug replay` do.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Parser};
use slug_schema::synth::{self, EndpointStream, SynthConfig};
use slug_schema::{EventKind, KindSet, TimeRange, Trace, TraceSummary};

use crate::cli::{Cli, dispatch};
use crate::info::{bytes, duration, render, thousands};

/// Arguments of `slug demo`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  slug demo
      Record a 4-stage `small` pipeline (4 sequences, 2 in flight) on local threads, replay it
      over tcp, replay stage 2 alone, inject a one-bit fault and check the report finds it.
  slug demo --transport shm --out run1
      The same with one process per stage over a shared-memory fabric, kept in ./run1.
  slug demo --synthetic --events 10000000
      Write and read back a labelled synthetic 10M-event trace (a tour of the format).")]
pub struct DemoArgs {
    /// Directory to write the trace into (must not exist or be empty) [default: a new directory
    /// under the system temp dir, printed and kept].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Model preset of the recorded demo: tiny, small or base.
    #[arg(long, default_value = "small", value_parser = ["tiny", "small", "base"])]
    pub model: String,
    /// Decoder layers (default: the preset's; at least 4 for the 4 stages).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Transport the demo records on: local, shm or tcp (the replay uses another one).
    #[arg(long, default_value = "local", value_parser = ["local", "shm", "tcp"])]
    pub transport: String,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 24)]
    pub tokens: usize,
    /// Write and read back a labelled synthetic trace instead of recording a pipeline.
    #[arg(long)]
    pub synthetic: bool,
    /// With --synthetic: about how many events to generate, over all endpoints.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub events: u64,
}

/// Runs `slug demo`.
pub fn execute(args: DemoArgs) -> Result<ExitCode> {
    let dir = match &args.out {
        Some(dir) => dir.clone(),
        None => {
            let stamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            std::env::temp_dir().join(format!("slug-demo-{}-{stamp}", std::process::id()))
        }
    };
    if args.synthetic {
        synthetic_tour(dir, args.events)
    } else {
        recorded_demo(&dir, &args)
    }
}

/// Runs one `slug` subcommand as if typed (`words` after `slug`), returning its exit code.
fn slug(words: &[&str]) -> Result<ExitCode> {
    println!("\n$ slug {}", words.join(" "));
    let cli = Cli::try_parse_from(std::iter::once("slug").chain(words.iter().copied()))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    dispatch(cli)
}

/// Record, replay, replay one stage, find an injected fault, summarise.
fn recorded_demo(dir: &Path, args: &DemoArgs) -> Result<ExitCode> {
    let out = dir
        .to_str()
        .with_context(|| format!("{}: the demo needs a UTF-8 path; pass --out", dir.display()))?;
    let replay_transport = if args.transport == "tcp" {
        "local"
    } else {
        "tcp"
    };
    let tokens = args.tokens.to_string();
    let mut pipeline = vec!["--model", args.model.as_str()];
    let layers = args.layers.map(|l| l.to_string());
    if let Some(l) = &layers {
        pipeline.extend(["--layers", l]);
    }
    pipeline.extend(["--stages", "4", "--sequences", "4", "--microbatches", "2"]);
    pipeline.extend(["--tokens", &tokens, "--transport", &args.transport]);
    pipeline.extend(["--prompt", "The quick brown fox"]);

    println!(
        "slug demo: record a 4-stage `{}` pipeline on {}, replay it on {replay_transport}, replay \
         stage 2 alone, and find an injected fault",
        args.model, args.transport
    );
    let mut record = vec![
        "record",
        "--out",
        out,
        "--payloads",
        "all",
        "--hash-kernels",
    ];
    record.push("--");
    record.extend(pipeline.iter().copied());
    ensure!(slug(&record)? == ExitCode::SUCCESS, "recording failed");

    let whole = [
        "replay",
        out,
        "--transport",
        replay_transport,
        "--threads",
        "1",
    ];
    ensure!(
        slug(&whole)? == ExitCode::SUCCESS,
        "the whole-pipeline replay was not bit-exact (see above)"
    );
    let stage = ["replay", out, "--stage", "2", "--verify", "kernel"];
    ensure!(
        slug(&stage)? == ExitCode::SUCCESS,
        "the single-stage replay was not bit-exact (see above)"
    );

    // A one-bit fault in stage 1's first layer at stage step 5: the replay must name that place.
    let preset = slug_kernels::ModelConfig::preset(&args.model)?;
    let plan = slug_kernels::LayerPlan::even(args.layers.unwrap_or(preset.layers), 4)?;
    let layer = plan.layers_of(1).start;
    let fault = format!("stage=1,layer={layer},kernel=down,step=5");
    let report = dir.join("demo-divergence.json");
    let report_arg = report.to_str().context("report path is not UTF-8")?;
    let injected = [
        "replay", out, "--verify", "kernel", "--inject", &fault, "--report", report_arg,
    ];
    ensure!(
        slug(&injected)? != ExitCode::SUCCESS,
        "the injected fault went unnoticed: the replay claimed to be bit-exact"
    );
    let found: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&report).with_context(|| format!("reading {}", report.display()))?,
    )?;
    let (endpoint, step) = (&found["endpoint"], &found["step"]);
    let (at_layer, kernel) = (&found["layer"], &found["kernel"]);
    ensure!(
        endpoint == 1 && step == 5 && at_layer == layer && kernel == "down",
        "the report points at endpoint {endpoint}, step {step}, layer {at_layer}, kernel \
         {kernel}; the fault was injected at stage 1, step 5, layer {layer}, kernel down"
    );
    println!(
        "\nthe report points at the injected fault: endpoint {endpoint}, step {step}, layer \
         {at_layer}, kernel {}",
        kernel.as_str().unwrap_or_default()
    );

    ensure!(
        slug(&["info", out])? == ExitCode::SUCCESS,
        "slug info failed"
    );
    println!(
        "\ntrace kept in {out}; look at it with `slug view {out}` or `slug view {out} --divergence {report_arg}`"
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes a labelled synthetic trace, reads it back event by event, and summarises it.
fn synthetic_tour(dir: PathBuf, events: u64) -> Result<ExitCode> {
    if events == 0 || events > 1_000_000_000 {
        bail!(
            "--events {} is out of range; pick 1 to 1,000,000,000",
            events
        );
    }
    let cfg = SynthConfig::with_events(events);
    println!(
        "slug demo: a synthetic {}-stage pipeline ({} steps x {} microbatches, {} layers and {} threads per stage)",
        cfg.stages, cfg.steps, cfg.microbatches, cfg.layers_per_stage, cfg.threads
    );
    println!("writing     {}", dir.display());

    let t = Instant::now();
    let written = synth::write_trace(&dir, &cfg)
        .with_context(|| format!("writing the demo trace to {}", dir.display()))?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "  wrote     {} events in {:.2} s ({:.1} M events/s), {} on disk, {:.2} B/event",
        thousands(written.events),
        secs,
        written.events as f64 / secs / 1e6,
        bytes(written.bytes),
        written.bytes as f64 / written.events.max(1) as f64
    );

    let t = Instant::now();
    let trace = Trace::open(&dir)?;
    let mut checked = 0u64;
    for ep in &trace.manifest().endpoints {
        let log = trace.endpoint_log(ep.id)?;
        for (i, name) in synth::STRINGS.iter().enumerate() {
            if log.string(i as u32) != Some(name) {
                bail!(
                    "{}: string {i} should be {name:?}, reads {:?}",
                    log.path().display(),
                    log.string(i as u32)
                );
            }
        }
        let mut expected = EndpointStream::new(&cfg, ep.id);
        for frame in log.frames() {
            for event in frame?.events {
                let want = expected.next();
                if want != Some(event) {
                    bail!(
                        "{}: event {checked} differs after the round trip\n  wrote {want:?}\n  read  {event:?}",
                        log.path().display()
                    );
                }
                checked += 1;
            }
        }
        if let Some(missing) = expected.next() {
            bail!(
                "{}: log ends early; next expected event {missing:?}",
                log.path().display()
            );
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "  read back {} events in {:.2} s ({:.1} M events/s): every event identical to what was written",
        thousands(checked),
        secs,
        checked as f64 / secs / 1e6
    );

    if let Some(ep) = trace
        .manifest()
        .endpoints
        .get(1)
        .or(trace.manifest().endpoints.first())
    {
        let log = trace.endpoint_log(ep.id)?;
        if let Some(span) = log.time_span() {
            let mid = span.start_ns + (span.end_ns - span.start_ns) / 2;
            let window = TimeRange::new(mid, mid + 1_000_000);
            let kinds = KindSet::of(&[EventKind::Transfer]);
            let t = Instant::now();
            let found = log
                .events_in(window, kinds)
                .collect::<Result<Vec<_>, _>>()?;
            let touched = log
                .index()
                .iter()
                .filter(|f| f.count(EventKind::Transfer) > 0 && window.overlaps(f.t_min, f.t_max))
                .count();
            println!(
                "  seek      endpoint {}: {} transfers in the middle 1 ms of {}, from {touched} of {} frames, in {}",
                ep.id,
                found.len(),
                duration(span.end_ns - span.start_ns),
                log.index().len(),
                duration(t.elapsed().as_nanos() as u64)
            );
        }
    }

    println!();
    print!("{}", render(&TraceSummary::of(&trace)));
    println!(
        "\nnext: slug info {0}   (--json for machine-readable output)\n      slug view {0}   (timelines in the terminal)",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
