//! `slug run`: run the decoder pipeline in this process without recording, print the generated
//! tokens and tokens/s (or the arena layout with `--layout`).

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use slug_kernels::{
    Arith, Isa, LayerPlan, ModelConfig, NoHooks, Stage, StageLayout, ThreadPool, check_fits,
    generate,
};

const EXAMPLES: &str = "\
Examples:
  slug run --model tiny --tokens 32 --seed 7 --prompt \"Hello\"
      Generate 32 tokens with the tiny model on every core; prints token ids and tokens/s.
  slug run --model small --stages 2 --threads 2 --json
      Split the layers into 2 stages (run one after another in this process); one JSON object.
  slug run --model tiny --dim 128 --heads 8 --kv-heads 2 --layers 4 --fma
      Override any dimension of a preset; --fma fuses multiply-adds (changes the results).
  slug run --model base --stages 4 --layout
      Print each stage's arena layout (section, region, offset, bytes, alignment) and exit.

The same --model, dimensions, --seed, --fma and --prompt give the same tokens for every
--threads, --stages and --isa: kernels reduce in one fixed order on every instruction set.
Prompt bytes are token ids (byte-level tokenizer); generated ids below 256 print as bytes.";

/// Arguments of `slug run`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct RunArgs {
    /// Pipeline stages the layers are split into (at most the number of layers).
    #[arg(long, default_value_t = 1)]
    stages: usize,
    /// Tokens to generate (the first comes from the prompt's prefill step).
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Prompt text; its UTF-8 bytes are the prompt's token ids.
    #[arg(long, default_value = "Hello, slug!")]
    prompt: String,
    /// Threads splitting each kernel call (default: all available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Instruction set: scalar, avx2, avx512 or neon (default: the best this CPU has).
    #[arg(long)]
    isa: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Print the arena layout of every stage and exit without running.
    #[arg(long)]
    layout: bool,
    /// The model: preset, dimension overrides, seed, FMA (boxed: it is the bulk of the flags).
    #[command(flatten)]
    model: Box<ModelArgs>,
}

/// Which model to run: a preset plus overrides.
#[derive(Debug, Args)]
#[command(next_help_heading = "Model")]
struct ModelArgs {
    /// Model preset: tiny (tests), small (~10M parameters) or base (~115M parameters).
    #[arg(long, default_value = "tiny", value_parser = ["tiny", "small", "base"])]
    model: String,
    /// Seed the weights are generated from.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Fuse multiply-adds (one rounding): faster, different bits, needs an FMA unit.
    #[arg(long)]
    fma: bool,
    /// Override: decoder layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Override: model width.
    #[arg(long)]
    dim: Option<usize>,
    /// Override: attention heads (must divide --dim).
    #[arg(long)]
    heads: Option<usize>,
    /// Override: key/value heads (must divide --heads; fewer = grouped-query attention).
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Override: SwiGLU hidden width.
    #[arg(long)]
    ffn: Option<usize>,
    /// Override: vocabulary size (at least 256).
    #[arg(long)]
    vocab: Option<usize>,
    /// Override: context length of the KV cache.
    #[arg(long)]
    max_seq: Option<usize>,
}

impl ModelArgs {
    /// The preset with overrides applied, validated.
    fn config(&self) -> Result<ModelConfig> {
        let mut c = ModelConfig::preset(&self.model)?;
        let overrides = [
            (&mut c.layers, self.layers),
            (&mut c.dim, self.dim),
            (&mut c.heads, self.heads),
            (&mut c.kv_heads, self.kv_heads),
            (&mut c.ffn, self.ffn),
            (&mut c.vocab, self.vocab),
            (&mut c.max_seq, self.max_seq),
        ];
        let custom = overrides.iter().any(|(_, v)| v.is_some());
        for (field, value) in overrides {
            if let Some(v) = value {
                *field = v;
            }
        }
        if custom {
            c.name = format!("{}-custom", self.model);
        }
        c.seed = self.seed;
        c.fma = self.fma;
        c.validate()?;
        Ok(c)
    }
}

/// Runs `slug run`.
pub fn execute(args: RunArgs) -> Result<ExitCode> {
    let config = args.model.config()?;
    let threads = match args.threads {
        Some(0) => bail!("--threads 0: at least one thread is needed"),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let plan = LayerPlan::even(config.layers, args.stages)?;
    let layouts = (0..plan.stages())
        .map(|s| StageLayout::new(&config, &plan, s, 1, threads))
        .collect::<Result<Vec<_>, _>>()?;
    if args.layout {
        print_layout(&layouts, args.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.tokens == 0 {
        bail!("--tokens 0: ask for at least one token");
    }
    let prompt: Vec<u32> = args.prompt.bytes().map(u32::from).collect();
    if prompt.is_empty() {
        bail!("--prompt is empty: give at least one byte of prompt");
    }
    let needed = prompt.len() + args.tokens - 1;
    if needed > config.max_seq {
        bail!(
            "prompt ({} tokens) plus --tokens {} needs {needed} positions but max-seq = {}: \
             shorten the prompt, ask for fewer tokens, or raise --max-seq",
            prompt.len(),
            args.tokens,
            config.max_seq
        );
    }
    let total: u64 = layouts.iter().map(|l| l.total_bytes as u64).sum();
    check_fits(total)?;
    let arith = match &args.isa {
        Some(name) => {
            let isa = Isa::from_name(name).with_context(|| {
                format!("--isa {name}: unknown instruction set; use scalar, avx2, avx512 or neon")
            })?;
            Arith::new(isa, config.fma)?
        }
        None => Arith::best(config.fma)?,
    };

    let pool = ThreadPool::new(threads)?;
    let init_start = std::time::Instant::now();
    let mut stages = (0..plan.stages())
        .map(|s| Stage::with_arith(&config, &plan, s, 1, &pool, arith))
        .collect::<Result<Vec<_>, _>>()?;
    let init_ms = init_start.elapsed().as_secs_f64() * 1e3;
    let out = generate(&mut stages, &pool, &mut NoHooks, 0, &prompt, args.tokens)?;

    let prefill_s = out.prefill_ns as f64 / 1e9;
    let decode_s = out.decode_ns as f64 / 1e9;
    let decoded = out.tokens.len().saturating_sub(1);
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    let tokens_per_s = rate(out.tokens.len(), prefill_s + decode_s);
    let text = render(&out.tokens);
    if args.json {
        let value = json!({
            "model": config.name,
            "config": config,
            "parameters": config.parameters(),
            "stages": plan.stages(),
            "threads": threads,
            "isa": arith.isa().name(),
            "fma": config.fma,
            "seed": config.seed,
            "prompt_tokens": out.prompt_tokens,
            "tokens": out.tokens,
            "text": text,
            "tokens_per_s": tokens_per_s,
            "init_ms": init_ms,
            "prefill_ms": prefill_s * 1e3,
            "prefill_tokens_per_s": rate(out.prompt_tokens, prefill_s),
            "decode_ms": decode_s * 1e3,
            "decode_tokens": decoded,
            "decode_tokens_per_s": rate(decoded, decode_s),
            "arena_bytes": total,
        });
        println!("{value}");
    } else {
        println!(
            "model {} ({} layers, dim {}, {:.1}M parameters), {} stage(s), {} thread(s), {}, fma {}, seed {}",
            config.name,
            config.layers,
            config.dim,
            config.parameters() as f64 / 1e6,
            plan.stages(),
            threads,
            arith.isa(),
            if config.fma { "on" } else { "off" },
            config.seed
        );
        let ids: Vec<String> = out.tokens.iter().map(u32::to_string).collect();
        println!("tokens:  {}", ids.join(" "));
        println!("text:    {text:?}");
        println!(
            "prefill: {} tokens in {:.2} ms ({:.0} tokens/s)",
            out.prompt_tokens,
            prefill_s * 1e3,
            rate(out.prompt_tokens, prefill_s)
        );
        println!(
            "decode:  {decoded} tokens in {:.2} ms ({:.1} tokens/s)",
            decode_s * 1e3,
            rate(decoded, decode_s)
        );
        println!(
            "total:   {} tokens in {:.2} ms: {tokens_per_s:.1} tokens/s (weights generated in {init_ms:.1} ms)",
            out.tokens.len(),
            (prefill_s + decode_s) * 1e3
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
