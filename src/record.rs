//! `slug record`: runs a pipeline with every endpoint, transfer and perf stream recorded into a
//! trace directory, then prints what was captured (and what could not be, and why).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser};
use slug_recorder::ebpf::EbpfRequest;
use slug_recorder::observe::PayloadPolicy;
use slug_recorder::perf::{PerfConfig, PerfRequest};
use slug_recorder::{RecordConfig, RecordSummary, record};
use slug_transport::pipeline::{PipelineConfig, RunProgress};
use slug_transport::transfer::TransportKind;

use crate::choices::Payloads;
use crate::pipeline_args::PipelineArgs;
use crate::progress::{self, Display, Rate};

const EXAMPLES: &str = "\
Examples:
  slug record --out run1 --payloads all --hash-kernels -- --model small --stages 4 --sequences 4
      Record four stage threads with every payload and kernel-output hash; then `slug info run1`.
  slug record --out run2 --snapshot-every 8 -- --stages 4 --transport shm
      One recording `slug node` process per stage on this machine, snapshots every 8 steps.
  slug record --out run3 -- --stages 2 --transport tcp --hosts 10.0.0.1:7070,10.0.0.2:7070 \\
      --key-file cluster.key
      Each `slug node --listen` records its stage locally; the files are fetched into run3 over
      the node connections when the run ends (the same cluster key file on every host).
  slug record --out run4 --perf-freq 250 --ring-records 262144 -- --model base --stages 4
      Fewer perf samples and larger flight rings, when `slug info` reports losses.
  slug record --out run6 -- --layers 3 --stages 3 --tokens 8 --transport tcp \\
      --key-file cluster.key --migrate stage=1,to=127.0.0.1:7070,at-step=6
      Move stage 1 to the `slug node` at 127.0.0.1:7070 while recording (--control for live
      `slug migrate` requests): the node it moved to records it as endpoint 3, which the
      manifest joins to endpoint 1; both hold a `migration` event and the trace replays whole.
  mpirun -np 4 slug record --out run5 -- --stages 4 --transport mpi
      Rank r records stage r on its own host; rank 0 gathers the files into run5 over MPI
      (needs a build with --features mpi).

Progress (steps, tokens/s, events, bytes sent, from every stage or node) goes to stderr: a bar
on a terminal, a line every 2 s otherwise; --quiet or --json turn it off.";

/// Arguments of `slug record`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct RecordArgs {
    /// Trace directory to create (its parent must exist).
    #[arg(long)]
    out: PathBuf,
    /// Replace the slug trace in a non-empty --out directory (only a trace: anything else, the
    /// current directory, its ancestors and $HOME are refused).
    #[arg(long)]
    force: bool,
    /// Transfer payloads to store (content hashes are always stored).
    #[arg(long, value_enum, default_value_t = Payloads::None)]
    payloads: Payloads,
    /// Snapshot every stage's arena and cursor every K stage steps, besides step 0 (default: step
    /// 0 only). Chunks are content-addressed: unchanged weights are stored once.
    #[arg(long, value_name = "K", conflicts_with = "no_snapshots")]
    snapshot_every: Option<u64>,
    /// Take no snapshots at all (a replay then rebuilds stages from the recorded seed).
    #[arg(long)]
    no_snapshots: bool,
    /// Hash every kernel output into its span, so `slug replay --verify kernel` names the exact
    /// kernel of a divergence.
    #[arg(long)]
    hash_kernels: bool,
    /// Perf streams: auto, none, or a list like cpu-clock,page-faults,context-switches.
    #[arg(long, default_value = "auto")]
    perf: String,
    /// Sampling frequency of cpu-clock and memory samples, Hz.
    #[arg(long, default_value_t = 1000)]
    perf_freq: u64,
    /// Pages of each perf stream's kernel buffer (a power of two): more hold more samples
    /// between two drains (`slug info` says when the kernel dropped some: "perf ring full").
    #[arg(long, default_value_t = 32, value_name = "PAGES")]
    perf_ring_pages: u32,
    /// 64-byte slots of each endpoint thread's flight ring (a power of two; a kernel span takes
    /// one, any other event two): more absorb longer bursts before events are dropped ("flight
    /// ring full").
    #[arg(long, default_value_t = slug_recorder::flight::DEFAULT_RING_RECORDS, value_name = "RECORDS")]
    ring_records: usize,
    /// eBPF endpoint probes (need root or CAP_BPF + CAP_PERFMON): auto, none, or a list of
    /// off-cpu, syscalls, page-faults, migrations, tcp.
    #[arg(long, default_value = "auto")]
    ebpf: String,
    /// Print the summary as one JSON object (and show no progress).
    #[arg(long)]
    json: bool,
    /// Show no progress on stderr.
    #[arg(long, short)]
    quiet: bool,
    /// The pipeline to record: the same flags as `slug run`.
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// `slug run` arguments given after `--` (they replace the pipeline flags above).
    #[arg(last = true, value_name = "RUN ARGS")]
    run_args: Vec<String>,
}

/// Parses `slug run`-style pipeline flags given after `--`.
#[derive(Debug, clap::Parser)]
#[command(name = "slug record --out DIR --", no_binary_name = false)]
struct RunArgsAfterDashes {
    #[command(flatten)]
    pipeline: PipelineArgs,
}

impl RecordArgs {
    fn pipeline(&self) -> Result<PipelineConfig> {
        if self.run_args.is_empty() {
            return self.pipeline.config();
        }
        let argv = std::iter::once("slug record --out DIR --".to_string())
            .chain(self.run_args.iter().cloned());
        match RunArgsAfterDashes::try_parse_from(argv) {
            Ok(parsed) => parsed.pipeline.config(),
            Err(e) => bail!("the `slug run` arguments after `--`: {e}"),
        }
    }
}

/// Runs `slug record`.
pub fn execute(args: RecordArgs) -> Result<ExitCode> {
    let payloads = PayloadPolicy::from(args.payloads);
    let request: PerfRequest = args.perf.parse().context("--perf")?;
    let ebpf: EbpfRequest = args.ebpf.parse().context("--ebpf")?;
    if args.perf_freq == 0 {
        bail!("--perf-freq 0: give a sampling frequency in Hz, e.g. 1000");
    }
    if !args.perf_ring_pages.is_power_of_two() || args.perf_ring_pages > 1 << 16 {
        bail!(
            "--perf-ring-pages {}: give a power of two from 1 to 65536, e.g. 32 or 128",
            args.perf_ring_pages
        );
    }
    let max_ring = slug_recorder::flight::MAX_RING_RECORDS as usize;
    if !args.ring_records.is_power_of_two() || !(1024..=max_ring).contains(&args.ring_records) {
        bail!(
            "--ring-records {}: give a power of two from 1024 to {max_ring}, e.g. 65536 or 262144",
            args.ring_records
        );
    }
    let config = RecordConfig {
        force: args.force,
        payloads,
        perf: PerfConfig {
            request,
            freq_hz: args.perf_freq,
            ring_pages_exp: args.perf_ring_pages.trailing_zeros() as u8,
            ..PerfConfig::default()
        },
        snapshot_every: if args.no_snapshots {
            None
        } else {
            Some(args.snapshot_every.unwrap_or(0))
        },
        hash_kernels: args.hash_kernels,
        ebpf,
        ring_records: args.ring_records,
        ..RecordConfig::new(&args.out)
    };
    let mut pipeline = args.pipeline()?;
    let config = RecordConfig {
        // `pipeline()` checked the device already: this names it for the manifest.
        rdma_device: (pipeline.transport == TransportKind::Rdma && pipeline.hosts.is_empty())
            .then(crate::rdma::check)
            .transpose()?,
        ..config
    };
    if !pipeline.spares.is_empty() {
        anyhow::bail!(
            "--spares is not supported while recording yet: a spare would have to continue the \
             dead stage's endpoint log from the trace's snapshot, with the takeover as an event \
             on its timeline, which slug does not write yet; use `slug run --spares ...` (same \
             tokens and transfers as a run without the failure), or record without --spares"
        );
    }
    if pipeline.transport == TransportKind::Mpi {
        // Under mpirun: rank 0 prints the summary; the other ranks only record their stage.
        return match crate::mpi::record_pipeline(&config, &pipeline)? {
            Some(summary) => finish(&summary, args.json),
            None => Ok(ExitCode::SUCCESS),
        };
    }
    if !(args.json || args.quiet) {
        // Every stage's recorder counts its events into these, here or on its node.
        pipeline.progress = Some(RunProgress::for_config(&pipeline));
    }
    let display = Display {
        what: "recording".into(),
        rate: Rate::Tokens,
        events: true,
    };
    let summary = progress::show(pipeline.progress.as_ref(), &display, || {
        record(&config, &pipeline)
    })?;
    finish(&summary, args.json)
}

/// Prints the summary; exit status 1 if the recording lost anything.
fn finish(summary: &RecordSummary, json: bool) -> Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(summary);
    }
    if summary.losses.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    // What was recorded stays in the trace, but it is not the complete recording asked for.
    eprintln!(
        "slug: error: the recording in {} is incomplete; it lost:",
        summary.trace.display()
    );
    for loss in &summary.losses {
        eprintln!("  {loss}");
    }
    Ok(ExitCode::from(1))
}

pub(crate) fn print_summary(s: &RecordSummary) {
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
    if s.endpoints.iter().any(|e| e.lost > 0) {
        // Why each loss happened and what to change, as `slug info` says it.
        match slug_schema::Trace::open(&s.trace) {
            Ok(trace) => {
                for l in crate::info::losses(&slug_schema::TraceSummary::of(&trace)) {
                    eprintln!(
                        "slug: endpoint {} lost {} events: {}; {}",
                        l.endpoint, l.events, l.reason, l.fix
                    );
                }
            }
            Err(e) => eprintln!("slug: warning: cannot read back the losses' reasons: {e}"),
        }
    }
    if s.captured.is_empty() {
        println!("captured: transfers, kernel spans and step boundaries only (no perf streams)");
    } else {
        println!("captured: {}", s.captured.join(", "));
    }
    if !s.not_captured.is_empty() {
        println!("not captured: {}", s.not_captured.join(", "));
    }
}
