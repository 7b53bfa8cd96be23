//! Pipeline flags shared by `slug run` and `slug record`: the model, and where and how its stages run.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use slug_kernels::{Isa, ModelConfig};
use slug_transport::inject::Injection;
use slug_transport::pipeline::{PipelineConfig, prompt_tokens};
use slug_transport::transfer::TransportKind;

use crate::choices::{Model, Transport};

/// The pipeline to run: model, placement, transport, sequences.
#[derive(Debug, Args)]
#[command(next_help_heading = "Pipeline")]
pub struct PipelineArgs {
    /// Pipeline stages the layers are split into (at most the number of layers).
    #[arg(long, default_value_t = 1)]
    pub stages: usize,
    /// How stages exchange activations.
    #[arg(long, value_enum, default_value_t = Transport::Local)]
    pub transport: Transport,
    /// Run stage s on the `slug node --listen` at the s-th address (tcp; a comma list, or the
    /// flag once per stage).
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT,...")]
    pub hosts: Vec<String>,
    /// Cluster key file shared with the `slug node`s of --hosts (default: $SLUG_CLUSTER_KEY).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// How tcp data links protect activation bytes: mac (a keyed BLAKE3 MAC on every
    /// transfer, fresh key per connection) or none (only on a fabric you trust).
    #[arg(long, default_value = "mac", value_parser = ["mac", "none"])]
    pub link_integrity: String,
    /// Threads of each stage's pool splitting every kernel call (default: all cores / stages).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Sequences to generate (copies of the prompt).
    #[arg(long, default_value_t = 1)]
    pub sequences: usize,
    /// Sequences in flight at once, so stages overlap (default: all of them).
    #[arg(long)]
    pub microbatches: Option<usize>,
    /// Tokens to generate per sequence (the first comes from the prompt's prefill step).
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Prompt text; its UTF-8 bytes are the prompt's token ids.
    #[arg(long, default_value = "Hello, slug!")]
    pub prompt: String,
    /// Instruction set: scalar, avx2, avx512 or neon (default: the best each node's CPU has).
    #[arg(long)]
    pub isa: Option<String>,
    /// Flip one bit of one kernel output, e.g. stage=1,layer=0,kernel=gemm,step=3 (testing
    /// divergence reports; optional element=N,bit=B).
    #[arg(long, value_name = "SPEC")]
    pub inject: Option<String>,
    /// Move a stage to another `slug node` mid-run (repeatable; shm or tcp):
    /// stage=S,to=HOST:PORT,at-step=N[,rounds=R]. The node needs the cluster key (--key-file).
    #[arg(long = "migrate", value_name = "SPEC")]
    pub migrate: Vec<String>,
    /// Take `slug migrate` requests on this address while the run goes on (shm or tcp;
    /// callers must hold the cluster key, --key-file).
    #[arg(long, value_name = "HOST:PORT")]
    pub control: Option<String>,
    /// `slug node`s that take over a stage whose node dies (tcp; a comma list, used in order;
    /// they need the cluster key, --key-file). Stages then checkpoint every --checkpoint-every
    /// steps to the coordinator's memory.
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT,...")]
    pub spares: Vec<String>,
    /// Forward steps between a stage's checkpoints when there are --spares (default 16): a
    /// dead stage is restored from its latest one and re-runs at most this many steps.
    #[arg(long, value_name = "K")]
    pub checkpoint_every: Option<u64>,
    /// Longest any single wait on a link or a node may take before the run is failed, in ms.
    #[arg(long, default_value_t = 60_000, value_name = "MS")]
    pub timeout_ms: u64,
    /// The model: preset, dimension overrides, seed, FMA.
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Which model to run: a preset plus overrides.
#[derive(Debug, Args)]
#[command(next_help_heading = "Model")]
pub struct ModelArgs {
    /// Model preset: tiny (tests), small (~10M parameters) or base (~115M parameters).
    #[arg(long, value_enum, default_value_t = Model::Tiny)]
    pub model: Model,
    /// Seed the weights are generated from.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Fuse multiply-adds (one rounding): faster, different bits, needs an FMA unit.
    #[arg(long)]
    pub fma: bool,
    /// Override: decoder layers.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Override: model width.
    #[arg(long)]
    pub dim: Option<usize>,
    /// Override: attention heads (must divide --dim).
    #[arg(long)]
    pub heads: Option<usize>,
    /// Override: key/value heads (must divide --heads; fewer = grouped-query attention).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Override: SwiGLU hidden width.
    #[arg(long)]
    pub ffn: Option<usize>,
    /// Override: vocabulary size (at least 256).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Override: context length of the KV cache.
    #[arg(long)]
    pub max_seq: Option<usize>,
}

impl ModelArgs {
    /// The preset with overrides applied, validated.
    pub fn config(&self) -> Result<ModelConfig> {
        let mut c = ModelConfig::preset(self.model.name())?;
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
            c.name = format!("{}-custom", self.model.name());
        }
        c.seed = self.seed;
        c.fma = self.fma;
        c.validate()?;
        Ok(c)
    }
}

impl PipelineArgs {
    /// Threads per stage: as given, or the cores shared out among the stages of this machine.
    pub fn threads(&self) -> Result<usize> {
        match self.threads {
            Some(0) => bail!("--threads 0: at least one thread is needed"),
            Some(n) => Ok(n),
            None => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                let local_stages = if self.hosts.is_empty() {
                    self.stages
                } else {
                    1
                };
                Ok((cores / local_stages.max(1)).max(1))
            }
        }
    }

    /// The runtime configuration these flags describe, refused (naming the flag) if it cannot run.
    pub fn config(&self) -> Result<PipelineConfig> {
        let model = self.model.config()?;
        if self.tokens == 0 {
            bail!("--tokens 0: ask for at least one token");
        }
        if self.sequences == 0 {
            bail!("--sequences 0: run at least one sequence");
        }
        let prompt = prompt_tokens(&self.prompt);
        if prompt.is_empty() {
            bail!("--prompt is empty: give at least one byte of prompt");
        }
        let needed = prompt.len() + self.tokens - 1;
        if needed > model.max_seq {
            bail!(
                "prompt ({} tokens) plus --tokens {} needs {needed} positions but max-seq = {}: \
                 shorten the prompt, ask for fewer tokens, or raise --max-seq",
                prompt.len(),
                self.tokens,
                model.max_seq
            );
        }
        let transport = TransportKind::from(self.transport);
        if !self.hosts.is_empty() {
            if !matches!(transport, TransportKind::Tcp | TransportKind::Rdma) {
                bail!(
                    "--hosts runs stages on remote nodes over tcp or rdma: add --transport tcp \
                     (or rdma)"
                );
            }
            crate::node::warn_if_key_in_env(self.key_file.as_deref());
            if self.hosts.len() != self.stages {
                bail!(
                    "--hosts names {} node(s) but --stages is {}: give one `slug node --listen` \
                     address per stage",
                    self.hosts.len(),
                    self.stages
                );
            }
        }
        if let Some(name) = &self.isa {
            let isa = Isa::from_name(name).with_context(|| {
                format!("--isa {name}: unknown instruction set; use scalar, avx2, avx512 or neon")
            })?;
            if self.hosts.is_empty() && !isa.is_available() {
                bail!(
                    "--isa {name}: this CPU cannot run {name}; leave --isa out to use the best it has"
                );
            }
        }
        // Stages started here need a device here; `--hosts` nodes check their own.
        if transport == TransportKind::Rdma && self.hosts.is_empty() {
            crate::rdma::check()?;
        }
        let mut cfg = PipelineConfig::new(model, &self.prompt, self.sequences, self.tokens);
        cfg.stages = self.stages;
        cfg.transport = transport;
        cfg.threads = self.threads()?;
        cfg.microbatches = match self.microbatches {
            Some(0) => bail!("--microbatches 0: keep at least one sequence in flight"),
            Some(m) => m.min(self.sequences),
            None => self.sequences,
        };
        cfg.hosts = self.hosts.clone();
        if self.hosts.is_empty() && !matches!(transport, TransportKind::Local | TransportKind::Mpi)
        {
            cfg.launcher = Some(crate::node::launcher()?);
        }
        cfg.key_file = self.key_file.clone();
        cfg.link_integrity = self
            .link_integrity
            .parse()
            .map_err(|e| anyhow::anyhow!("--link-integrity {}: {e}", self.link_integrity))?;
        cfg.timeout_ms = self.timeout_ms;
        cfg.isa = self.isa.clone();
        cfg.inject = match &self.inject {
            Some(spec) => Some(spec.parse::<Injection>()?),
            None => None,
        };
        cfg.migrations = self
            .migrate
            .iter()
            .map(|spec| spec.parse())
            .collect::<Result<_, _>>()?;
        cfg.control = self.control.clone();
        cfg.live_moves = self.control.is_some();
        cfg.spares = self.spares.clone();
        cfg.checkpoint_every = self.checkpoint_every;
        if !cfg.spares.is_empty() && (!cfg.migrations.is_empty() || cfg.control.is_some()) {
            bail!(
                "--spares cannot be combined with --migrate or --control yet: a stage moved \
                 while another one fails over would need both protocols at once; leave one out"
            );
        }
        if (!cfg.migrations.is_empty() || cfg.control.is_some() || !cfg.spares.is_empty())
            && self.hosts.is_empty()
        {
            crate::node::warn_if_key_in_env(self.key_file.as_deref());
        }
        cfg.validate()?;
        Ok(cfg)
    }
}
