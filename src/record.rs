//! `slug record`: runs a pipeline with every endpoint, transfer and perf stream recorded into a
//! trace directory, then prints what was captured (and what could not be, and why).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use slug_kernels::ModelConfig;
use slug_recorder::observe::PayloadPolicy;
use slug_recorder::perf::{PerfConfig, PerfRequest};
use slug_recorder::{RecordConfig, RecordSummary, record};
use slug_transport::pipeline::{PipelineConfig, prompt_tokens};
use slug_transport::transfer::TransportKind;

/// Arguments of `slug record`.
#[derive(Debug, Args)]
pub struct RecordArgs {
    /// Trace directory to create (its parent must exist).
    #[arg(long)]
    out: PathBuf,
    /// Replace the contents of a non-empty --out directory.
    #[arg(long)]
    force: bool,
    /// Transfer payloads to store: none, boundary (the tokens sent back to stage 0) or all.
    #[arg(long, default_value = "none")]
    payloads: String,
    /// Snapshot every stage's arena every K steps (not available yet: refused with a reason).
    #[arg(long)]
    snapshot_every: Option<u64>,
    /// Perf streams: auto, none, or a list like cpu-clock,page-faults,context-switches.
    #[arg(long, default_value = "auto")]
    perf: String,
    /// Sampling frequency of cpu-clock and memory samples, Hz.
    #[arg(long, default_value_t = 1000)]
    perf_freq: u64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// Pipeline stages the layers are split into.
    #[arg(long, default_value_t = 1)]
    stages: usize,
    /// Transport between stages: local (threads), shm or tcp (one recording `slug node` per stage).
    #[arg(long, default_value = "local")]
    transport: String,
    /// Tokens to generate per sequence.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Prompt text; its bytes are the prompt's token ids.
    #[arg(long, default_value = "Hello, slug!")]
    prompt: String,
    /// Sequences to generate (copies of the prompt).
    #[arg(long, default_value_t = 1)]
    sequences: usize,
    /// Sequences in flight at once (default: all).
    #[arg(long)]
    microbatches: Option<usize>,
    /// Threads per stage.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Model preset: tiny, small or base.
    #[arg(long, default_value = "tiny", value_parser = ["tiny", "small", "base"])]
    model: String,
    /// Seed the weights are generated from.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

impl RecordArgs {
    fn pipeline(&self) -> Result<PipelineConfig> {
        let mut model = ModelConfig::preset(&self.model)?;
        model.seed = self.seed;
        let mut cfg = PipelineConfig::new(model, &self.prompt, self.sequences, self.tokens);
        cfg.stages = self.stages;
        cfg.threads = self.threads;
        cfg.microbatches = self.microbatches.unwrap_or(self.sequences.max(1));
        cfg.prompts = vec![prompt_tokens(&self.prompt); self.sequences.max(1)];
        cfg.transport = self
            .transport
            .parse::<TransportKind>()
            .map_err(|e| anyhow::anyhow!("--transport {}: {e}", self.transport))?;
        Ok(cfg)
    }
}

/// Runs `slug record`.
pub fn execute(args: RecordArgs) -> Result<ExitCode> {
    if let Some(k) = args.snapshot_every {
        bail!(
            "--snapshot-every {k}: snapshots are not available yet (the pipeline runtime does not \
             hand stage arenas to the recorder at step boundaries); record without it"
        );
    }
    let payloads: PayloadPolicy = args
        .payloads
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--payloads: {e}"))?;
    let request: PerfRequest = args.perf.parse().context("--perf")?;
    if args.perf_freq == 0 {
        bail!("--perf-freq 0: give a sampling frequency in Hz, e.g. 1000");
    }
    let config = RecordConfig {
        force: args.force,
        payloads,
        perf: PerfConfig {
            request,
            freq_hz: args.perf_freq,
            ..PerfConfig::default()
        },
        ..RecordConfig::new(&args.out)
    };
    let pipeline = args.pipeline()?;
    let progress = Arc::new(AtomicU64::new(0));
    let config = RecordConfig {
        progress: Some(Arc::clone(&progress)),
        ..config
    };
    let done = Arc::new(AtomicBool::new(false));
    let ticker = std::io::stderr()
        .is_terminal()
        .then(|| spawn_progress(Arc::clone(&progress), Arc::clone(&done)));
    let summary = record(&config, &pipeline);
    done.store(true, Ordering::Release);
    if let Some(t) = ticker {
        let _ = t.join();
    }
    let summary = summary?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(ExitCode::SUCCESS)
}

/// A one-line live count on a terminal: events written so far and elapsed time.
fn spawn_progress(events: Arc<AtomicU64>, done: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let start = Instant::now();
        while !done.load(Ordering::Acquire) {
            eprint!(
                "\rrecording: {} events, {:.1} s",
                events.load(Ordering::Relaxed),
                start.elapsed().as_secs_f64()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprint!("\r\x1b[2K");
    })
}

fn print_summary(s: &RecordSummary) {
    for line in &s.notices {
        eprintln!("slug: {line}");
    }
    println!("recorded {} events into {}", s.events(), s.trace.display());
    println!(
        "tokens/s {:.1}; compression {:.1}x",
        s.tokens_per_s,
        s.compression_ratio()
    );
    for e in &s.endpoints {
        let kinds: Vec<String> = e.counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!(
            "  endpoint {}: {} events ({}), {} bytes, {} lost{}",
            e.endpoint,
            e.events,
            kinds.join(", "),
            e.bytes,
            e.lost,
            if e.payloads > 0 {
                format!(", {} payloads ({} bytes)", e.payloads, e.payload_bytes)
            } else {
                String::new()
            }
        );
        for w in &e.warnings {
            eprintln!("slug: warning: endpoint {}: {w}", e.endpoint);
        }
    }
    for w in &s.warnings {
        eprintln!("slug: warning: {w}");
    }
    println!("captured: {}", s.captured.join(", "));
    if !s.not_captured.is_empty() {
        println!("not captured: {}", s.not_captured.join(", "));
    }
}
