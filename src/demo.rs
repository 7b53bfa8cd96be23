//! `slug demo`: the main job on an embedded default — record a 4-stage pipeline, replay and verify
//! it on another transport, replay one stage alone, prove a divergence report points at an
//! injected fault, and summarise the trace. `--synthetic` instead tours the trace format on a
//! labelled synthetic trace of any size.
//!
//! The recorded demo calls the libraries `slug record` and `slug replay` call (`slug_recorder::
//! record`, `slug_replayer::replay_pipeline` / `replay_stage`) and prints their results with the
//! same printers those commands use.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use slug_kernels::{LayerPlan, ModelConfig};
use slug_recorder::observe::PayloadPolicy;
use slug_recorder::{RecordConfig, record};
use slug_replayer::{RecordedRun, ReplayOptions, Verify, replay_pipeline, replay_stage};
use slug_schema::synth::{self, EndpointStream, SynthConfig};
use slug_schema::{EventKind, KindSet, TimeRange, Trace, TraceSummary};
use slug_transport::inject::Injection;
use slug_transport::pipeline::PipelineConfig;
use slug_transport::transfer::TransportKind;

use crate::choices::{Model, Transport};
use crate::info::{bytes, duration, render, thousands};
use crate::record::print_summary as print_record_summary;
use crate::replay::print_text as print_replay_report;

/// Arguments of `slug demo`.
///
/// Records a 4-stage `small` pipeline (4 sequences, 2 in flight, every payload, every kernel
/// output's hash), then: replays the whole pipeline on another transport and checks every
/// transfer bit for bit; replays stage 2 alone from its recorded inputs and checks every
/// kernel output; replays with one bit flipped in stage 1's MLP down projection at step 5 and
/// checks that the report points at exactly that endpoint, step, layer and kernel; prints
/// `slug info` of the trace. Exits non-zero if any of these does not hold.
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
    /// Model preset of the recorded demo.
    #[arg(long, value_enum, default_value_t = Model::Small)]
    pub model: Model,
    /// Decoder layers (default: the preset's; at least 4 for the 4 stages).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Transport the demo records on (the replay uses another one).
    #[arg(long, value_enum, default_value_t = Transport::Local)]
    pub transport: Transport,
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

/// The prompt of the recorded demo.
const PROMPT: &str = "The quick brown fox";

/// `text` as one POSIX shell word: as is when it is made of safe characters only, otherwise in
/// single quotes (a quote inside becomes `'\''`), so a printed command can be pasted.
fn shell_quote(text: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c);
    if !text.is_empty() && text.chars().all(safe) {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// Record, replay, replay one stage, find an injected fault, summarise.
fn recorded_demo(dir: &Path, args: &DemoArgs) -> Result<ExitCode> {
    let replay_transport = match args.transport {
        Transport::Tcp => TransportKind::Local,
        Transport::Local | Transport::Shm => TransportKind::Tcp,
        Transport::Mpi => anyhow::bail!(
            "slug demo records on local, shm or tcp; for MPI use `mpirun -np 4 slug record \
             --out DIR --transport mpi -- --stages 4` (a build with --features mpi)"
        ),
        Transport::Rdma => anyhow::bail!(
            "slug demo records on local, shm or tcp; for RDMA use `slug record --out DIR -- \
             --stages 4 --transport rdma` (a build with --features rdma, on a host with an \
             RDMA device)"
        ),
    };
    let mut model = ModelConfig::preset(args.model.name())?;
    if let Some(layers) = args.layers {
        model.layers = layers;
        model.name = format!("{}-custom", args.model.name());
    }
    model.validate()?;
    let layers = model.layers;
    let mut pipeline = PipelineConfig::new(model, PROMPT, 4, args.tokens);
    pipeline.stages = 4;
    pipeline.microbatches = 2;
    pipeline.transport = args.transport.into();
    if pipeline.transport != TransportKind::Local {
        // shm and tcp run one `slug node` process per stage, started by this binary.
        pipeline.launcher = Some(crate::node::launcher()?);
    }
    pipeline.threads = (std::thread::available_parallelism().map_or(1, |n| n.get()) / 4).max(1);

    println!(
        "slug demo: record a 4-stage `{}` pipeline on {}, replay it on {replay_transport}, replay \
         stage 2 alone, and find an injected fault",
        args.model.name(),
        pipeline.transport
    );
    println!(
        "\n# record (every payload, every kernel output's hash) into {}",
        dir.display()
    );
    let layers_flag = args
        .layers
        .map_or(String::new(), |l| format!(" --layers {l}"));
    println!(
        "# the same as: slug record --out {} --payloads all --hash-kernels -- --model {}{layers_flag} \
         --stages 4 --transport {} --sequences 4 --microbatches 2 --tokens {} --threads {} \
         --prompt {}",
        shell_quote(&dir.display().to_string()),
        args.model.name(),
        pipeline.transport,
        args.tokens,
        pipeline.threads,
        shell_quote(PROMPT)
    );
    let config = RecordConfig {
        payloads: PayloadPolicy::All,
        hash_kernels: true,
        ..RecordConfig::new(dir)
    };
    let recorded = record(&config, &pipeline)?;
    print_record_summary(&recorded);
    ensure!(
        recorded.losses.is_empty(),
        "the recording is incomplete; it lost: {}",
        recorded
            .losses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    );

    let rec = Arc::new(RecordedRun::open(dir)?);
    println!("\n# replay the whole pipeline on {replay_transport}, one thread per stage");
    let whole = ReplayOptions {
        transport: Some(replay_transport),
        threads: Some(1),
        ..ReplayOptions::default()
    };
    let report = replay_pipeline(Arc::clone(&rec), &whole)?;
    print_replay_report(&report);
    ensure!(
        report.bit_exact,
        "the whole-pipeline replay was not bit-exact (see above)"
    );

    println!("\n# replay stage 2 alone from its recorded inputs, checking every kernel output");
    let kernel_level = ReplayOptions {
        verify: Verify::Kernel,
        ..ReplayOptions::default()
    };
    let report = replay_stage(Arc::clone(&rec), 2, &kernel_level)?.report;
    print_replay_report(&report);
    ensure!(
        report.bit_exact,
        "the single-stage replay was not bit-exact (see above)"
    );

    // A one-bit fault in stage 1's first layer at stage step 5: the replay must name that place.
    let layer = LayerPlan::even(layers, 4)?.layers_of(1).start;
    let fault = format!("stage=1,layer={layer},kernel=down,step=5");
    println!("\n# replay with one bit flipped ({fault}): the report must point there");
    let injected = ReplayOptions {
        inject: Some(fault.parse::<Injection>()?),
        ..kernel_level
    };
    let report = replay_pipeline(rec, &injected)?;
    print_replay_report(&report);
    let Some(found) = &report.first else {
        bail!("the injected fault went unnoticed: the replay found no divergence");
    };
    let report_path = dir.join("demo-divergence.json");
    std::fs::write(&report_path, serde_json::to_string_pretty(found)? + "\n")
        .with_context(|| format!("writing {}", report_path.display()))?;
    let kernel = found.kernel.as_deref().unwrap_or("-");
    ensure!(
        found.endpoint == 1
            && found.step == 5
            && found.layer == Some(layer as u32)
            && kernel == "down",
        "the report points at endpoint {}, step {}, layer {:?}, kernel {kernel}; the fault was \
         injected at stage 1, step 5, layer {layer}, kernel down",
        found.endpoint,
        found.step,
        found.layer
    );
    println!(
        "\nthe report points at the injected fault: endpoint {}, step {}, layer {layer}, kernel \
         {kernel}",
        found.endpoint, found.step
    );

    println!();
    print!("{}", render(&TraceSummary::of(&Trace::open(dir)?)));
    println!(
        "\ntrace kept in {0}; look at it with `slug view {0}` or `slug view {0} --divergence {1}`",
        dir.display(),
        report_path.display()
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
            let mid = span.start_ns + span.len() / 2;
            let window = TimeRange::new(mid, mid + 1_000_000);
            let kinds = KindSet::of(&[EventKind::Transfer]);
            let t = Instant::now();
            let found = log
                .events_in(window, kinds)
                .collect::<Result<Vec<_>, _>>()?;
            let touched = log
                .index()
                .iter()
                .filter(|f| f.count(EventKind::Transfer) > 0 && window.touches(f.t_min, f.t_max))
                .count();
            println!(
                "  seek      endpoint {}: {} transfers in the middle 1 ms of {}, from {touched} of {} frames, in {}",
                ep.id,
                found.len(),
                duration(span.len()),
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

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn printed_words_paste_back_as_one_shell_word() {
        assert_eq!(shell_quote("run1"), "run1");
        assert_eq!(shell_quote("/tmp/slug-demo-1"), "/tmp/slug-demo-1");
        assert_eq!(shell_quote("The quick brown fox"), "'The quick brown fox'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
