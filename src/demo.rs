//! `slug demo`: write a synthetic trace and read it back (the default demo).
//!
//! A tour of the trace format until `record` exists: it generates a labelled synthetic pipeline
//! trace, reads every log back and checks each event against the generator, shows a time-range
//! seek through the index, and prints what `slug info` says about the result.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Args;
use slug_schema::synth::{self, EndpointStream, SynthConfig};
use slug_schema::{EventKind, KindSet, TimeRange, Trace, TraceSummary};

use crate::info::{bytes, duration, render, thousands};

/// Arguments of `slug demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Directory to write the trace into (must not exist or be empty) [default: a new directory
    /// under the system temp dir, printed and kept].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// About how many events to generate, over all endpoints.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub events: u64,
}

/// Runs `slug demo`.
pub fn execute(args: DemoArgs) -> Result<ExitCode> {
    if args.events == 0 || args.events > 1_000_000_000 {
        bail!(
            "--events {} is out of range; pick 1 to 1,000,000,000",
            args.events
        );
    }
    let dir = match args.out {
        Some(dir) => dir,
        None => {
            let stamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            std::env::temp_dir().join(format!("slug-demo-{}-{stamp}", std::process::id()))
        }
    };
    let cfg = SynthConfig::with_events(args.events);
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
