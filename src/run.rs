//! `slug run`: run the decoder pipeline on any placement and transport without recording, print the
//! generated tokens and tokens/s (or the arena layout with `--layout`).

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use slug_kernels::{Isa, LayerPlan, StageLayout, check_fits};
use slug_transport::link::LinkStats;
use slug_transport::pipeline::{self, NoObservers, RunProgress};
use slug_transport::transfer::TransportKind;

use crate::pipeline_args::PipelineArgs;
use crate::progress::{self, Display, Rate};

const EXAMPLES: &str = "\
Examples:
  slug run --model tiny --tokens 32 --seed 7 --prompt \"Hello\"
      Generate 32 tokens with the tiny model; prints token ids, text and tokens/s.
  slug run --model small --stages 4 --transport shm --sequences 4 --json
      Four stage processes over a shared-memory fabric, four sequences in flight; one JSON object.
  slug run --model small --stages 4 --transport tcp --key-file cluster.key \\
      --hosts 10.0.0.1:7070,10.0.0.2:7070,10.0.0.3:7070,10.0.0.4:7070
      One stage on each `slug node --listen` (the same cluster key file on every host); small
      has 8 layers, tiny (the default) only 2, so at most 2 stages.
  slug run --model tiny --dim 128 --heads 8 --kv-heads 2 --layers 4 --fma
      Override any dimension of a preset; --fma fuses multiply-adds (changes the results).
  slug run --model base --stages 4 --layout
      Print each stage's arena layout (section, region, offset, bytes, alignment) and exit.
  slug run --stages 4 --transport tcp --key-file cluster.key --transfer-digest \
      --migrate stage=2,to=10.0.0.5:7070,at-step=20 --migrate stage=0,to=10.0.0.6:7070,at-step=30
      Move stage 2 to the `slug node` at 10.0.0.5:7070 after its 20th forward step (3 pre-copy
      rounds of dirtied arena chunks first; add rounds=0 for stop-and-copy), then stage 0;
      prints each move's rounds, stall and step time. Tokens and transfers stay the same.
  slug run --stages 4 --layers 4 --transport tcp --key-file cluster.key --transfer-digest \\
      --hosts 10.0.0.1:7070,10.0.0.2:7070,10.0.0.3:7070,10.0.0.4:7070 \\
      --spares 10.0.0.5:7070,10.0.0.6:7070 --checkpoint-every 8
      Checkpoint every stage every 8 forward steps into the coordinator's memory; if a stage's
      node process dies (kill -9, a crash), the next spare takes the stage over from its
      latest checkpoint, its neighbours re-feed it and skip what it sends again, and the run
      goes on with the same tokens and transfers; prints detection and recovery times.
  mpirun -np 4 slug run --model small --stages 4 --transport mpi
      One MPI rank per stage (rank r runs stage r; rank 0 prints the report); needs a build
      with --features mpi. Across hosts: mpirun --hostfile hosts -np 4 ..., or srun -n 4 ....

Progress (steps, tokens/s, bytes sent, from every stage) goes to stderr: a bar on a terminal,
a line every 2 s otherwise; --quiet or --json turn it off.

The same --model, dimensions, --seed, --fma and --prompt give the same tokens for every
--threads, --stages, --transport, --microbatches and --isa: kernels reduce in one fixed order on
every instruction set. Prompt bytes are token ids; generated ids below 256 print as bytes.";

/// Arguments of `slug run`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct RunArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Print the arena layout of every stage and exit without running.
    #[arg(long)]
    layout: bool,
    /// Show no progress on stderr (none is shown with --json either).
    #[arg(long, short)]
    quiet: bool,
    /// Hash every transfer's bytes and print one digest of them all (two runs moved the same
    /// bytes if their digests match).
    #[arg(long)]
    transfer_digest: bool,
    /// With --json: add the xxh3-128 of every transfer (by sequence, step, layer and stages) as
    /// `transfer_digests`, to compare runs on different transports or placements byte for byte.
    #[arg(long, requires = "json")]
    digests: bool,
    #[command(flatten)]
    pipeline: PipelineArgs,
}

/// Runs `slug run`.
pub fn execute(args: RunArgs) -> Result<ExitCode> {
    if args.layout {
        let config = args.pipeline.model.config()?;
        let plan = LayerPlan::even(config.layers, args.pipeline.stages)?;
        let threads = args.pipeline.threads()?;
        let layouts = (0..plan.stages())
            .map(|s| StageLayout::new(&config, &plan, s, args.pipeline.sequences, threads))
            .collect::<Result<Vec<_>, _>>()?;
        print_layout(&layouts, args.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut cfg = args.pipeline.config()?;
    if !(args.json || args.quiet) {
        cfg.progress = Some(RunProgress::for_config(&cfg));
    }
    cfg.digests |= args.transfer_digest || args.digests;
    let plan = cfg.plan()?;
    let total: u64 = (0..plan.stages())
        .map(|s| StageLayout::new(&cfg.model, &plan, s, cfg.prompts.len(), cfg.threads))
        .map(|l| l.map(|l| l.total_bytes as u64))
        .sum::<Result<u64, _>>()?;
    // Under MPI each rank holds only its own stage (on its own host, maybe).
    if cfg.hosts.is_empty() && cfg.transport != TransportKind::Mpi {
        check_fits(total)?;
    }
    let isa = cfg
        .isa
        .clone()
        .unwrap_or_else(|| Isa::best().name().to_string());
    let display = Display {
        what: "running".into(),
        rate: Rate::Tokens,
        events: false,
    };
    let report = if cfg.transport == TransportKind::Mpi {
        match crate::mpi::run_pipeline(&cfg, &NoObservers)? {
            Some(report) => report,
            // Rank 0 prints the report; the other ranks' part is done.
            None => return Ok(ExitCode::SUCCESS),
        }
    } else {
        progress::show(cfg.progress.as_ref(), &display, || {
            pipeline::run(&cfg, &NoObservers)
        })?
    };
    let tokens = report.tokens.first().cloned().unwrap_or_default();
    let text = render(&tokens);
    let wall_ms = report.wall_ns as f64 / 1e6;
    let digests = report.digests();
    let transfer_digest = args.transfer_digest.then(|| {
        let bytes = serde_json::to_vec(&digests).unwrap_or_default();
        format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes))
    });
    if args.json {
        let stages: Vec<_> = report
            .stage_reports
            .iter()
            .map(|r| {
                json!({
                    "stage": r.stage,
                    "host": r.host,
                    "pid": r.pid,
                    "layers": [r.layers.0, r.layers.1],
                    "steps": r.steps,
                    "forward_ms": r.forward_ns as f64 / 1e6,
                    "inbound": r.inbound,
                    "outbound": r.outbound,
                    "clock_offset": r.clock,
                })
            })
            .collect();
        let value = json!({
            "model": cfg.model.name,
            "config": cfg.model,
            "parameters": cfg.model.parameters(),
            "stages": report.stages,
            "transport": report.transport.to_string(),
            "threads": report.threads,
            "sequences": cfg.prompts.len(),
            "microbatches": report.microbatches,
            "isa": isa,
            "fma": cfg.model.fma,
            "seed": cfg.model.seed,
            "prompt_tokens": cfg.prompts[0].len(),
            "tokens": tokens,
            "sequence_tokens": report.tokens,
            "text": text,
            "wall_ms": wall_ms,
            "tokens_per_s": report.tokens_per_s,
            "arena_bytes": total,
            "stage_reports": stages,
            "migrations": report.migrations,
            "failover": report.failover,
            "transfers": args.transfer_digest.then_some(digests.len()),
            "transfer_digest": transfer_digest,
        });
        let mut value = value;
        if args.digests {
            value["transfer_digests"] = json!(report.digests());
        }
        println!("{value}");
    } else {
        let m = &cfg.model;
        println!(
            "model {} ({} layers, dim {}, {:.1}M parameters), {} stage(s) over {}, {} thread(s) \
             per stage, {isa}, fma {}, seed {}",
            m.name,
            m.layers,
            m.dim,
            m.parameters() as f64 / 1e6,
            report.stages,
            report.transport,
            report.threads,
            if m.fma { "on" } else { "off" },
            m.seed
        );
        let ids: Vec<String> = tokens.iter().map(u32::to_string).collect();
        println!("tokens:  {}", ids.join(" "));
        println!("text:    {text:?}");
        if report.tokens.len() > 1 {
            let same = report.tokens.iter().all(|t| *t == tokens);
            println!(
                "         ({} sequences, {} in flight; {})",
                report.tokens.len(),
                report.microbatches,
                if same { "all identical" } else { "they differ" }
            );
        }
        for r in &report.stage_reports {
            let moved = |l: &Option<LinkStats>| {
                l.as_ref().map_or_else(
                    || "-".to_string(),
                    |l| {
                        format!(
                            "{} transfers, {:.1} KiB",
                            l.transfers,
                            l.bytes as f64 / 1024.0
                        )
                    },
                )
            };
            println!(
                "stage {} layers {}..{} on {} (pid {}): {} steps, {:.2} ms computing; in {}; out {}",
                r.stage,
                r.layers.0,
                r.layers.1,
                r.host,
                r.pid,
                r.steps,
                r.forward_ns as f64 / 1e6,
                moved(&r.inbound),
                moved(&r.outbound)
            );
        }
        for m in &report.migrations {
            println!("{}", m.describe());
        }
        if let Some(f) = &report.failover {
            println!("{}", f.describe());
            for r in &f.failovers {
                println!("{}", r.describe());
            }
        }
        if let Some(d) = &transfer_digest {
            println!("transfers: {} received, digest {d}", digests.len());
        }
        let generated: usize = report.tokens.iter().map(Vec::len).sum();
        println!(
            "total:   {generated} tokens in {wall_ms:.2} ms: {:.1} tokens/s",
            report.tokens_per_s
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Generated ids as text: ids below 256 are bytes (lossy UTF-8), others print as `<id>`.
fn render(tokens: &[u32]) -> String {
    let mut bytes = Vec::new();
    let mut text = String::new();
    for &t in tokens {
        if let Ok(b) = u8::try_from(t) {
            bytes.push(b);
        } else {
            text.push_str(&String::from_utf8_lossy(&bytes));
            bytes.clear();
            text.push_str(&format!("<{t}>"));
        }
    }
    text.push_str(&String::from_utf8_lossy(&bytes));
    text
}

fn print_layout(layouts: &[StageLayout], as_json: bool) -> Result<()> {
    if as_json {
        let stages: Vec<_> = layouts
            .iter()
            .map(|l| {
                json!({
                    "stage": l.stage,
                    "layers": [l.layers.start, l.layers.end],
                    "total_bytes": l.total_bytes,
                    "regions": l.regions,
                })
            })
            .collect();
        println!("{}", json!({ "stages": stages }));
    } else {
        for l in layouts {
            println!("{}", l.report());
        }
    }
    Ok(())
}
