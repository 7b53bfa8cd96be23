//! Where everything of one stage lives in its arena: sections, tensors, KV cache, inboxes and
//! outboxes, workspace — decided once, before any memory is mapped.

use std::fmt::Write as _;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::Error;
use crate::kernels::attention_work_size;
use crate::plan::LayerPlan;

/// Alignment of every region (a cache line, and a full AVX-512 vector).
pub const REGION_ALIGN: usize = 64;
/// Alignment of every section (a page).
pub const SECTION_ALIGN: usize = 4096;

/// The four sections of a stage arena, in address order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Section {
    /// The stage's own weights and RoPE tables; written once at start.
    Weights,
    /// Keys and values of every owned layer for every sequence.
    KvCache,
    /// Per-sequence inbox and outbox at fixed offsets, for transports.
    Activations,
    /// Scratch of one forward step; dead between steps.
    Workspace,
}

impl Section {
    /// Every section, in address order.
    pub const ALL: [Section; 4] = [
        Section::Weights,
        Section::KvCache,
        Section::Activations,
        Section::Workspace,
    ];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Section::Weights => "weights",
            Section::KvCache => "kv_cache",
            Section::Activations => "activations",
            Section::Workspace => "workspace",
        }
    }
}

/// A run of 4-byte elements (f32 or u32) in the arena.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Span {
    /// Byte offset from the arena base (a multiple of [`REGION_ALIGN`]).
    pub offset: usize,
    /// Number of 4-byte elements.
    pub len: usize,
}

impl Span {
    /// Size in bytes.
    pub fn bytes(self) -> usize {
        self.len * 4
    }

    /// Byte range in the arena.
    pub fn byte_range(self) -> Range<usize> {
        self.offset..self.offset + self.bytes()
    }

    /// The first `len` elements (clamped to the span).
    pub fn prefix(self, len: usize) -> Span {
        Span {
            offset: self.offset,
            len: len.min(self.len),
        }
    }

    /// Elements `range` of the span, clamped to it.
    pub fn slice(self, range: Range<usize>) -> Span {
        let start = range.start.min(self.len);
        let end = range.end.clamp(start, self.len);
        Span {
            offset: self.offset + start * 4,
            len: end - start,
        }
    }
}

/// One line of the layout report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Section the region belongs to.
    pub section: Section,
    /// What it holds (`layer.3.wq`, `kv.layer.3`, `inbox.seq.0`, ...).
    pub name: String,
    /// Byte offset from the arena base.
    pub offset: usize,
    /// Size in bytes.
    pub bytes: usize,
    /// Alignment of `offset` in bytes.
    pub align: usize,
}

/// What an inbox or outbox holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// Token ids, u32 (stage 0's inbox, the last stage's outbox).
    Tokens,
    /// Hidden states, f32 `[n_tokens x dim]`.
    Hidden,
}

/// Weights of one decoder layer; matrices are `[in x out]` row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerWeights {
    /// Global index of the layer.
    pub layer: usize,
    /// Attention RMSNorm weight `[dim]`.
    pub attn_norm: Span,
    /// Query projection `[dim x dim]`.
    pub wq: Span,
    /// Key projection `[dim x kv_dim]`.
    pub wk: Span,
    /// Value projection `[dim x kv_dim]`.
    pub wv: Span,
    /// Attention output projection `[dim x dim]`.
    pub wo: Span,
    /// MLP RMSNorm weight `[dim]`.
    pub ffn_norm: Span,
    /// SwiGLU gate projection `[dim x ffn]`.
    pub w_gate: Span,
    /// SwiGLU up projection `[dim x ffn]`.
    pub w_up: Span,
    /// SwiGLU down projection `[ffn x dim]`.
    pub w_down: Span,
}

/// Scratch buffers of one forward step (workspace section).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workspace {
    /// Residual stream `[max_seq x dim]`.
    pub x: Span,
    /// Normalised activations `[max_seq x dim]`.
    pub xb: Span,
    /// Queries `[max_seq x dim]`.
    pub q: Span,
    /// Attention output `[max_seq x dim]`.
    pub att: Span,
    /// Output of the attention or MLP down projection `[max_seq x dim]`.
    pub proj: Span,
    /// SwiGLU gate, then the activation `[max_seq x ffn]`.
    pub gate: Span,
    /// SwiGLU up projection `[max_seq x ffn]`.
    pub up: Span,
    /// Logits of the last token `[vocab]` (last stage only; empty otherwise).
    pub logits: Span,
    /// Attention scores, one `[max_seq]` slice per thread, each [`REGION_ALIGN`]-aligned.
    pub scores: Span,
    /// Distance in elements between two threads' score slices.
    pub scores_stride: usize,
}

/// The complete layout of one stage's arena.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageLayout {
    /// Stage index in the plan.
    pub stage: usize,
    /// Global layers this stage owns.
    pub layers: Range<usize>,
    /// Sequences (microbatches) the KV cache and boxes hold.
    pub sequences: usize,
    /// Threads the workspace has score slices for.
    pub max_threads: usize,
    /// Context length per sequence.
    pub max_seq: usize,
    /// Embedding table `[vocab x dim]` (stage 0 only).
    pub embed: Option<Span>,
    /// RoPE cosines `[max_seq x head_dim / 2]`.
    pub rope_cos: Span,
    /// RoPE sines `[max_seq x head_dim / 2]`.
    pub rope_sin: Span,
    /// Weights of each owned layer, in order.
    pub layer_weights: Vec<LayerWeights>,
    /// Final RMSNorm weight `[dim]` (last stage only).
    pub final_norm: Option<Span>,
    /// Output head `[dim x vocab]` (last stage only).
    pub head: Option<Span>,
    /// The KV cache: for owned layer `l` (local index) and sequence `s`, keys at block
    /// `2 * (l * sequences + s)` and values at the next block, each `[max_seq x kv_dim]`.
    pub kv: Span,
    /// Elements of one K or V block.
    pub kv_block: usize,
    /// What inboxes hold.
    pub inbox_payload: Payload,
    /// What outboxes hold.
    pub outbox_payload: Payload,
    /// Inbox of each sequence.
    pub inboxes: Vec<Span>,
    /// Outbox of each sequence.
    pub outboxes: Vec<Span>,
    /// Scratch buffers.
    pub work: Workspace,
    /// Every region, for the layout report.
    pub regions: Vec<Region>,
    /// `(offset, bytes)` of each section, in [`Section::ALL`] order.
    pub sections: [(usize, usize); 4],
    /// Total arena size in bytes.
    pub total_bytes: usize,
}

/// Bump allocator over offsets, recording regions as it goes.
struct Bump {
    at: usize,
    regions: Vec<Region>,
    section: Section,
    section_start: usize,
    sections: [(usize, usize); 4],
}

impl Bump {
    fn new() -> Bump {
        Bump {
            at: 0,
            regions: Vec::new(),
            section: Section::Weights,
            section_start: 0,
            sections: [(0, 0); 4],
        }
    }

    fn align(&mut self, align: usize, what: &'static str) -> Result<(), Error> {
        self.at = self
            .at
            .checked_next_multiple_of(align)
            .ok_or(Error::SizeOverflow { what })?;
        Ok(())
    }

    fn section(&mut self, section: Section) -> Result<(), Error> {
        self.close_section();
        self.align(SECTION_ALIGN, section.name())?;
        self.section = section;
        self.section_start = self.at;
        Ok(())
    }

    fn close_section(&mut self) {
        let index = Section::ALL
            .iter()
            .position(|s| *s == self.section)
            .unwrap_or(0);
        self.sections[index] = (self.section_start, self.at - self.section_start);
    }

    /// Reserves `elems` 4-byte elements named `name`.
    fn take(&mut self, name: String, elems: usize, what: &'static str) -> Result<Span, Error> {
        self.align(REGION_ALIGN, what)?;
        let bytes = elems.checked_mul(4).ok_or(Error::SizeOverflow { what })?;
        let span = Span {
            offset: self.at,
            len: elems,
        };
        self.at = self
            .at
            .checked_add(bytes)
            .ok_or(Error::SizeOverflow { what })?;
        self.regions.push(Region {
            section: self.section,
            name,
            offset: span.offset,
            bytes,
            align: REGION_ALIGN,
        });
        Ok(span)
    }
}

fn prod(what: &'static str, factors: &[usize]) -> Result<usize, Error> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .ok_or(Error::SizeOverflow { what })
}

impl StageLayout {
    /// Lays out stage `stage` of `plan` for `sequences` sequences and up to `max_threads`
    /// threads. Refuses an invalid config, a plan that does not match it, or a stage out of
    /// range; does not map any memory.
    pub fn new(
        config: &ModelConfig,
        plan: &LayerPlan,
        stage: usize,
        sequences: usize,
        max_threads: usize,
    ) -> Result<StageLayout, Error> {
        config.validate()?;
        if plan.layers() != config.layers {
            return Err(Error::InvalidPlan {
                reason: format!(
                    "the plan covers {} layers but the model has layers = {}",
                    plan.layers(),
                    config.layers
                ),
            });
        }
        if stage >= plan.stages() {
            return Err(Error::InvalidPlan {
                reason: format!(
                    "stage {stage} does not exist: the plan has {} stages",
                    plan.stages()
                ),
            });
        }
        if sequences == 0 {
            return Err(Error::InvalidConfig {
                field: "sequences",
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        if max_threads == 0 {
            return Err(Error::InvalidConfig {
                field: "threads",
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        let (d, kvd, f, v, t) = (
            config.dim,
            config.kv_dim(),
            config.ffn,
            config.vocab,
            config.max_seq,
        );
        let first = plan.is_first(stage);
        let last = plan.is_last(stage);
        let layers = plan.layers_of(stage);
        let mut b = Bump::new();

        b.section(Section::Weights)?;
        let embed = if first {
            Some(b.take("embed".into(), prod("embed", &[v, d])?, "embed")?)
        } else {
            None
        };
        let rope_len = prod("rope", &[t, config.head_dim() / 2])?;
        let rope_cos = b.take("rope.cos".into(), rope_len, "rope")?;
        let rope_sin = b.take("rope.sin".into(), rope_len, "rope")?;
        let mut layer_weights = Vec::with_capacity(layers.len());
        for layer in layers.clone() {
            let mut w = |name: &str, elems: usize| {
                b.take(format!("layer.{layer}.{name}"), elems, "layer weights")
            };
            let dd = prod("layer weights", &[d, d])?;
            let dkv = prod("layer weights", &[d, kvd])?;
            let df = prod("layer weights", &[d, f])?;
            layer_weights.push(LayerWeights {
                layer,
                attn_norm: w("attn_norm", d)?,
                wq: w("wq", dd)?,
                wk: w("wk", dkv)?,
                wv: w("wv", dkv)?,
                wo: w("wo", dd)?,
                ffn_norm: w("ffn_norm", d)?,
                w_gate: w("w_gate", df)?,
                w_up: w("w_up", df)?,
                w_down: w("w_down", df)?,
            });
        }
        let (final_norm, head) = if last {
            (
                Some(b.take("final_norm".into(), d, "final norm")?),
                Some(b.take("head".into(), prod("head", &[d, v])?, "head")?),
            )
        } else {
            (None, None)
        };

        b.section(Section::KvCache)?;
        let kv_block = prod("kv cache", &[t, kvd])?;
        let kv_start = b.at;
        for layer in layers.clone() {
            b.take(
                format!("kv.layer.{layer} ({sequences} seq x K,V)"),
                prod("kv cache", &[2, sequences, kv_block])?,
                "kv cache",
            )?;
        }
        let kv = Span {
            offset: kv_start,
            len: prod("kv cache", &[2, sequences, kv_block, layers.len()])?,
        };

        b.section(Section::Activations)?;
        let inbox_payload = if first {
            Payload::Tokens
        } else {
            Payload::Hidden
        };
        let outbox_payload = if last {
            Payload::Tokens
        } else {
            Payload::Hidden
        };
        let box_len = |p: Payload| match p {
            Payload::Tokens => Ok(t),
            Payload::Hidden => prod("boxes", &[t, d]),
        };
        let (in_len, out_len) = (box_len(inbox_payload)?, box_len(outbox_payload)?);
        let mut inboxes = Vec::with_capacity(sequences);
        let mut outboxes = Vec::with_capacity(sequences);
        for s in 0..sequences {
            inboxes.push(b.take(format!("inbox.seq.{s}"), in_len, "inbox")?);
            outboxes.push(b.take(format!("outbox.seq.{s}"), out_len, "outbox")?);
        }

        b.section(Section::Workspace)?;
        let td = prod("workspace", &[t, d])?;
        let tf = prod("workspace", &[t, f])?;
        let x = b.take("x".into(), td, "workspace")?;
        let xb = b.take("xb".into(), td, "workspace")?;
        let q = b.take("q".into(), td, "workspace")?;
        let att = b.take("att".into(), td, "workspace")?;
        let proj = b.take("proj".into(), td, "workspace")?;
        let gate = b.take("gate".into(), tf, "workspace")?;
        let up = b.take("up".into(), tf, "workspace")?;
        let logits = b.take("logits".into(), if last { v } else { 0 }, "workspace")?;
        let scores_stride = attention_work_size(t)
            .checked_next_multiple_of(REGION_ALIGN / 4)
            .ok_or(Error::SizeOverflow { what: "scores" })?;
        let scores = b.take(
            format!("scores ({max_threads} threads)"),
            prod("scores", &[scores_stride, max_threads])?,
            "scores",
        )?;
        b.close_section();
        let total_bytes =
            b.at.checked_next_multiple_of(SECTION_ALIGN)
                .ok_or(Error::SizeOverflow { what: "arena" })?;

        Ok(StageLayout {
            stage,
            layers,
            sequences,
            max_threads,
            max_seq: t,
            embed,
            rope_cos,
            rope_sin,
            layer_weights,
            final_norm,
            head,
            kv,
            kv_block,
            inbox_payload,
            outbox_payload,
            inboxes,
            outboxes,
            work: Workspace {
                x,
                xb,
                q,
                att,
                proj,
                gate,
                up,
                logits,
                scores,
                scores_stride,
            },
            regions: b.regions,
            sections: b.sections,
            total_bytes,
        })
    }

    /// Keys of owned layer `local` (0-based within the stage) for sequence `seq`:
    /// `[max_seq x kv_dim]`.
    pub fn k_cache(&self, local: usize, seq: usize) -> Span {
        self.kv_span(2 * (local * self.sequences + seq))
    }

    /// Values of owned layer `local` for sequence `seq`: `[max_seq x kv_dim]`.
    pub fn v_cache(&self, local: usize, seq: usize) -> Span {
        self.kv_span(2 * (local * self.sequences + seq) + 1)
    }

    fn kv_span(&self, block: usize) -> Span {
        Span {
            offset: self.kv.offset + block * self.kv_block * 4,
            len: self.kv_block,
        }
    }

    /// Inbox of `seq` (token ids for stage 0, hidden states otherwise), `None` when out of range.
    pub fn inbox(&self, seq: usize) -> Option<Span> {
        self.inboxes.get(seq).copied()
    }

    /// Outbox of `seq` (next token id for the last stage, hidden states otherwise).
    pub fn outbox(&self, seq: usize) -> Option<Span> {
        self.outboxes.get(seq).copied()
    }

    /// `(offset, bytes)` of a section.
    pub fn section(&self, section: Section) -> (usize, usize) {
        let i = Section::ALL.iter().position(|s| *s == section).unwrap_or(0);
        self.sections[i]
    }

    /// The layout report: one line per section, then one per region.
    pub fn report(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "stage {} (layers {}..{}, {} sequences, {} threads): {} bytes",
            self.stage,
            self.layers.start,
            self.layers.end,
            self.sequences,
            self.max_threads,
            self.total_bytes
        );
        let _ = writeln!(
            out,
            "{:<12} {:<36} {:>14} {:>14} {:>6}",
            "section", "region", "offset", "bytes", "align"
        );
        for (section, (offset, bytes)) in Section::ALL.iter().zip(self.sections) {
            let _ = writeln!(
                out,
                "{:<12} {:<36} {:>14} {:>14} {:>6}",
                section.name(),
                "(section)",
                offset,
                bytes,
                SECTION_ALIGN
            );
        }
        for r in &self.regions {
            let _ = writeln!(
                out,
                "{:<12} {:<36} {:>14} {:>14} {:>6}",
                r.section.name(),
                r.name,
                r.offset,
                r.bytes,
                r.align
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_aligned_disjoint_and_in_section_order() {
        let config = ModelConfig::preset("tiny").unwrap();
        let plan = LayerPlan::even(config.layers, 2).unwrap();
        for stage in 0..2 {
            let l = StageLayout::new(&config, &plan, stage, 3, 2).unwrap();
            let mut end = 0;
            for r in &l.regions {
                assert_eq!(r.offset % r.align, 0, "{}", r.name);
                assert!(r.offset >= end, "{} overlaps", r.name);
                end = r.offset + r.bytes;
            }
            assert!(end <= l.total_bytes);
            let starts: Vec<usize> = l.sections.iter().map(|s| s.0).collect();
            assert!(starts.windows(2).all(|w| w[0] <= w[1]));
            assert_eq!(l.embed.is_some(), stage == 0);
            assert_eq!(l.head.is_some(), stage == 1);
            assert!(l.v_cache(0, 2).byte_range().end <= l.kv.byte_range().end);
            assert!(l.report().contains("inbox.seq.2"));
        }
    }
}
