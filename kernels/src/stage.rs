//! One pipeline stage: its arena (weights, KV cache, boxes, workspace), its cursor, and the
//! forward step that reads a sequence's inbox and writes its outbox.

use serde::{Deserialize, Serialize};

use crate::arena::StageArena;
use crate::config::ModelConfig;
use crate::dirty::DirtyPages;
use crate::error::Error;
use crate::hooks::{Hooks, KernelCall, KernelId, monotonic_ns};
use crate::init::{self, Fill, LayerTensor, Tensor};
use crate::kernels::{self, AttentionShape};
use crate::layout::{Payload, Section, Span, StageLayout};
use crate::plan::LayerPlan;
use crate::pool::ThreadPool;
use crate::simd::Arith;

/// Everything besides the arena bytes that a stage needs to continue: a snapshot of a stage
/// is its arena bytes plus this.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageCursor {
    /// Forward steps run so far (all sequences together).
    pub step: u64,
    /// Next position of each sequence (tokens already in its KV cache).
    pub positions: Vec<usize>,
}

/// One pipeline stage of the decoder: owns layers `plan.layers_of(index)` and, for stage 0,
/// the embedding; for the last stage, the final norm and output head.
#[derive(Debug)]
pub struct Stage {
    config: ModelConfig,
    index: usize,
    layout: StageLayout,
    arena: StageArena,
    cursor: StageCursor,
    arith: Arith,
    dirty: DirtyPages,
}

impl Stage {
    /// Lays out, maps and fills stage `index` of `plan` for `sequences` sequences, using the
    /// best instruction set of this CPU. Weights are generated from `config.seed` directly into
    /// the arena by the pool's threads, each writing the columns it will read in decode (first
    /// touch), never copied. Refuses bad configs before mapping.
    pub fn new(
        config: &ModelConfig,
        plan: &LayerPlan,
        index: usize,
        sequences: usize,
        pool: &ThreadPool,
    ) -> Result<Stage, Error> {
        config.validate()?;
        let arith = Arith::best(config.fma)?;
        Stage::with_arith(config, plan, index, sequences, pool, arith)
    }

    /// Like [`Stage::new`] with an explicit instruction set (results are the same for every
    /// instruction set; this exists to prove it and to compare speeds).
    pub fn with_arith(
        config: &ModelConfig,
        plan: &LayerPlan,
        index: usize,
        sequences: usize,
        pool: &ThreadPool,
        arith: Arith,
    ) -> Result<Stage, Error> {
        if arith.fma() != config.fma {
            return Err(Error::InvalidConfig {
                field: "fma",
                value: arith.fma().to_string(),
                reason: format!(
                    "the arithmetic must match the model config (fma = {})",
                    config.fma
                ),
            });
        }
        let layout = StageLayout::new(config, plan, index, sequences, pool.threads())?;
        let arena = StageArena::new(layout.total_bytes)?;
        let layout_bytes = layout.total_bytes;
        let mut stage = Stage {
            config: config.clone(),
            index,
            layout,
            arena,
            cursor: StageCursor {
                step: 0,
                positions: vec![0; sequences],
            },
            arith,
            dirty: DirtyPages::new(layout_bytes),
        };
        stage.fill_weights(pool);
        // Everything but the KV cache and the workspace was written while building (weights,
        // RoPE tables) or may be by callers before the first step (boxes); the KV cache and
        // the workspace stay zero until a step writes them.
        for section in [Section::Weights, Section::Activations] {
            let (at, bytes) = stage.layout.section(section);
            stage.dirty.mark(at..at + bytes);
        }
        Ok(stage)
    }

    fn fill_weights(&mut self, pool: &ThreadPool) {
        let c = &self.config;
        let (d, kvd, f, v) = (c.dim, c.kv_dim(), c.ffn, c.vocab);
        let seed = c.seed;
        let base = self.arena.as_mut_ptr();
        let scale = |fan_in: usize| Fill::Uniform {
            scale: 1.0 / (fan_in as f32).sqrt(),
        };
        let mut jobs: Vec<(Span, Tensor, Fill, usize)> = Vec::new();
        if let Some(span) = self.layout.embed {
            jobs.push((span, Tensor::Embed, Fill::Uniform { scale: 1.0 }, d));
        }
        for w in &self.layout.layer_weights {
            let t = |kind| Tensor::Layer {
                layer: w.layer,
                kind,
            };
            jobs.extend([
                (w.attn_norm, t(LayerTensor::AttnNorm), Fill::NearOne, d),
                (w.wq, t(LayerTensor::Wq), scale(d), d),
                (w.wk, t(LayerTensor::Wk), scale(d), kvd),
                (w.wv, t(LayerTensor::Wv), scale(d), kvd),
                (w.wo, t(LayerTensor::Wo), scale(d), d),
                (w.ffn_norm, t(LayerTensor::FfnNorm), Fill::NearOne, d),
                (w.w_gate, t(LayerTensor::Gate), scale(d), f),
                (w.w_up, t(LayerTensor::Up), scale(d), f),
                (w.w_down, t(LayerTensor::Down), scale(f), d),
            ]);
        }
        if let (Some(norm), Some(head)) = (self.layout.final_norm, self.layout.head) {
            jobs.push((norm, Tensor::FinalNorm, Fill::NearOne, d));
            jobs.push((head, Tensor::Head, scale(d), v));
        }
        for (span, tensor, how, row_len) in jobs {
            // SAFETY: `span` is a region of this arena, not aliased while this runs.
            let out = unsafe { f32s_mut(base, span) };
            let rows = span.len / row_len.max(1);
            // Column parts match decode's gemv split, so each thread first-touches the pages
            // it will stream every token.
            pool.split_columns(rows, row_len, out, |r, cols, chunk| {
                init::fill(seed, tensor, how, r * row_len + cols.start, chunk);
            });
        }
        // SAFETY: the two tables are disjoint regions of this arena.
        let (cos, sin) = unsafe {
            (
                f32s_mut(base, self.layout.rope_cos),
                f32s_mut(base, self.layout.rope_sin),
            )
        };
        init::rope_tables(c.rope_theta, c.head_dim(), cos, sin);
    }

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Index of this stage in its plan.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Where everything lives in the arena.
    pub fn layout(&self) -> &StageLayout {
        &self.layout
    }

    /// The arithmetic (instruction set and FMA flag) kernels use.
    pub fn arith(&self) -> Arith {
        self.arith
    }

    /// The arena (weights, KV cache, boxes, workspace).
    pub fn arena(&self) -> &StageArena {
        &self.arena
    }

    /// The arena, writable: transports write inboxes and read outboxes by offset
    /// ([`StageLayout::inbox`], [`StageLayout::outbox`]). Writes through it are not tracked:
    /// [`Stage::forward`] marks the inbox of its sequence (transports fill it just before),
    /// anything else written here must be marked with [`Stage::mark_written`].
    pub fn arena_mut(&mut self) -> &mut StageArena {
        &mut self.arena
    }

    /// Which arena pages were written since a reader's checkpoint (see [`DirtyPages`]).
    pub fn dirty(&self) -> &DirtyPages {
        &self.dirty
    }

    /// Records a write of arena bytes `range` made through [`Stage::arena_mut`].
    pub fn mark_written(&mut self, range: std::ops::Range<usize>) {
        self.dirty.mark(range);
    }

    /// The cursor (step counter, positions).
    pub fn cursor(&self) -> &StageCursor {
        &self.cursor
    }

    /// Restores a snapshot: copies `bytes` over the arena and takes `cursor`. The snapshot must
    /// come from a stage built with the same config, plan, index and sequence count.
    pub fn restore(&mut self, bytes: &[u8], cursor: StageCursor) -> Result<(), Error> {
        if bytes.len() != self.arena.len() {
            return Err(Error::RestoreMismatch {
                what: "arena bytes",
                expected: self.arena.len(),
                got: bytes.len(),
            });
        }
        if cursor.positions.len() != self.layout.sequences {
            return Err(Error::RestoreMismatch {
                what: "sequence count",
                expected: self.layout.sequences,
                got: cursor.positions.len(),
            });
        }
        self.arena.bytes_mut().copy_from_slice(bytes);
        self.dirty.mark_all();
        self.cursor = cursor;
        Ok(())
    }

    /// Rewinds (or advances) sequence `seq` to `position`: the next step writes its keys and
    /// values there, and attention sees only positions below it. Used to reuse a sequence
    /// slot and by benchmarks that decode past the context length.
    pub fn set_position(&mut self, seq: usize, position: usize) -> Result<(), Error> {
        self.check_seq(seq)?;
        if position > self.config.max_seq {
            return Err(Error::ContextFull {
                seq,
                position,
                n_tokens: 0,
                max_seq: self.config.max_seq,
            });
        }
        self.cursor.positions[seq] = position;
        Ok(())
    }

    fn check_seq(&self, seq: usize) -> Result<(), Error> {
        if seq < self.layout.sequences {
            Ok(())
        } else {
            Err(Error::NoSuchSequence {
                seq,
                sequences: self.layout.sequences,
            })
        }
    }

    fn box_span(&self, seq: usize, inbox: bool, payload: Payload) -> Result<Span, Error> {
        self.check_seq(seq)?;
        let (span, have) = if inbox {
            (self.layout.inboxes[seq], self.layout.inbox_payload)
        } else {
            (self.layout.outboxes[seq], self.layout.outbox_payload)
        };
        let name = |p: Payload| match p {
            Payload::Tokens => "token ids",
            Payload::Hidden => "hidden states",
        };
        if have == payload {
            Ok(span)
        } else {
            Err(Error::WrongPayload {
                stage: self.index,
                which: if inbox { "inbox" } else { "outbox" },
                holds: name(have),
                asked: name(payload),
            })
        }
    }

    /// Stage 0's inbox of `seq`: write the step's token ids at the start.
    pub fn inbox_tokens_mut(&mut self, seq: usize) -> Result<&mut [u32], Error> {
        let span = self.box_span(seq, true, Payload::Tokens)?;
        self.dirty.mark(span.byte_range());
        // SAFETY: a region of this arena, borrowed through `&mut self`.
        Ok(unsafe { u32s_mut(self.arena.as_mut_ptr(), span) })
    }

    /// A later stage's inbox of `seq`: write the step's `[n_tokens x dim]` hidden states.
    pub fn inbox_hidden_mut(&mut self, seq: usize) -> Result<&mut [f32], Error> {
        let span = self.box_span(seq, true, Payload::Hidden)?;
        self.dirty.mark(span.byte_range());
        // SAFETY: a region of this arena, borrowed through `&mut self`.
        Ok(unsafe { f32s_mut(self.arena.as_mut_ptr(), span) })
    }

    /// A non-last stage's outbox of `seq`: the step's `[n_tokens x dim]` hidden states.
    pub fn outbox_hidden(&self, seq: usize) -> Result<&[f32], Error> {
        let span = self.box_span(seq, false, Payload::Hidden)?;
        // SAFETY: a region of this arena, borrowed through `&self`.
        Ok(unsafe {
            std::slice::from_raw_parts(self.arena.as_ptr().add(span.offset).cast(), span.len)
        })
    }

    /// The last stage's outbox of `seq`: the token chosen by the last step.
    pub fn outbox_token(&self, seq: usize) -> Result<u32, Error> {
        let span = self.box_span(seq, false, Payload::Tokens)?;
        // SAFETY: a region of this arena of at least one element.
        Ok(unsafe { self.arena.as_ptr().add(span.offset).cast::<u32>().read() })
    }

    /// Runs one step for sequence `seq` over `n_tokens` new tokens: reads the inbox (token ids
    /// or hidden states), runs the owned layers against the sequence's KV cache, writes the
    /// outbox (hidden states, or the next token of the last position), advances the cursor,
    /// and reports every kernel call and the step boundary to `hooks`.
    pub fn forward<H: Hooks + ?Sized>(
        &mut self,
        pool: &ThreadPool,
        hooks: &mut H,
        seq: usize,
        n_tokens: usize,
    ) -> Result<(), Error> {
        self.check_seq(seq)?;
        let c = &self.config;
        let l = &self.layout;
        let n = n_tokens;
        let pos0 = self.cursor.positions[seq];
        if n == 0 {
            return Err(Error::NoTokens);
        }
        if pos0 + n > c.max_seq {
            return Err(Error::ContextFull {
                seq,
                position: pos0,
                n_tokens: n,
                max_seq: c.max_seq,
            });
        }
        if pool.threads() > l.max_threads {
            return Err(Error::TooManyThreads {
                threads: pool.threads(),
                max_threads: l.max_threads,
            });
        }
        let arith = self.arith;
        let (d, kvd, f, v, hd) = (c.dim, c.kv_dim(), c.ffn, c.vocab, c.head_dim());
        // What this step writes (or, for the inbox, what the transport wrote for it), marked
        // before the writes so an error half-way leaves nothing unmarked.
        let (work, work_bytes) = l.section(Section::Workspace);
        self.dirty.mark(work..work + work_bytes);
        self.dirty.mark(l.inboxes[seq].byte_range());
        self.dirty.mark(l.outboxes[seq].byte_range());
        for local in 0..l.layer_weights.len() {
            for cache in [l.k_cache(local, seq), l.v_cache(local, seq)] {
                self.dirty
                    .mark(cache.slice(pos0 * kvd..(pos0 + n) * kvd).byte_range());
            }
        }
        let base = self.arena.as_mut_ptr();
        let mut run = Run {
            pool,
            hooks,
            timing: false,
            call: KernelCall {
                kernel: KernelId::Embed,
                layer: None,
                step: self.cursor.step,
                seq: seq as u32,
                rows: n as u32,
                start_ns: 0,
                end_ns: 0,
            },
        };
        run.timing = run.hooks.timing();
        let w = &l.work;
        // SAFETY (every `f32s`/`f32s_mut` below): spans are disjoint regions of this arena,
        // which `&mut self` borrows exclusively; no two live slices overlap.
        unsafe {
            let x = f32s_mut(base, w.x.prefix(n * d));
            if let Some(table) = l.embed {
                let tokens = u32s_mut(base, l.inboxes[seq].prefix(n));
                let table = f32s(base, table);
                run.rows(KernelId::Embed, None, n, d, x, |r, o| {
                    kernels::embed(tokens, table, o, v, d, r)
                })?;
            } else {
                x.copy_from_slice(f32s(base, l.inboxes[seq].prefix(n * d)));
            }
            let cos = f32s(base, l.rope_cos);
            let sin = f32s(base, l.rope_sin);
            let shape = AttentionShape {
                heads: c.heads,
                kv_heads: c.kv_heads,
                head_dim: hd,
            };
            for (local, lw) in l.layer_weights.iter().enumerate() {
                let layer = Some(lw.layer as u32);
                let xb = f32s_mut(base, w.xb.prefix(n * d));
                let norm = f32s(base, lw.attn_norm);
                run.rows(KernelId::AttnNorm, layer, n, d, xb, |r, o| {
                    kernels::rmsnorm(arith, x, norm, o, n, d, c.norm_eps, r)
                })?;
                let q = f32s_mut(base, w.q.prefix(n * d));
                run.linear(
                    arith,
                    KernelId::QProj,
                    layer,
                    xb,
                    f32s(base, lw.wq),
                    q,
                    n,
                    d,
                    d,
                )?;
                let kc = l.k_cache(local, seq);
                let vc = l.v_cache(local, seq);
                let k_new = f32s_mut(base, kc.slice(pos0 * kvd..(pos0 + n) * kvd));
                run.linear(
                    arith,
                    KernelId::KProj,
                    layer,
                    xb,
                    f32s(base, lw.wk),
                    k_new,
                    n,
                    d,
                    kvd,
                )?;
                let v_new = f32s_mut(base, vc.slice(pos0 * kvd..(pos0 + n) * kvd));
                run.linear(
                    arith,
                    KernelId::VProj,
                    layer,
                    xb,
                    f32s(base, lw.wv),
                    v_new,
                    n,
                    d,
                    kvd,
                )?;
                run.rows(KernelId::RopeQ, layer, n, d, q, |r, o| {
                    kernels::rope(o, n, c.heads, hd, cos, sin, pos0, r)
                })?;
                run.rows(KernelId::RopeK, layer, n, kvd, k_new, |r, o| {
                    kernels::rope(o, n, c.kv_heads, hd, cos, sin, pos0, r)
                })?;
                let att = f32s_mut(base, w.att.prefix(n * d));
                let scores = f32s_mut(base, w.scores);
                let (q, kc, vc) = (
                    &*q,
                    f32s(base, kc.prefix((pos0 + n) * kvd)),
                    f32s(base, vc.prefix((pos0 + n) * kvd)),
                );
                run.start(KernelId::Attention, layer);
                pool.split_rows_with_work(
                    n * c.heads,
                    hd,
                    att,
                    scores,
                    w.scores_stride,
                    |r, o, work| kernels::attention(arith, q, kc, vc, o, shape, n, pos0, r, work),
                )?;
                run.finish(att);
                let proj = f32s_mut(base, w.proj.prefix(n * d));
                run.linear(
                    arith,
                    KernelId::OProj,
                    layer,
                    att,
                    f32s(base, lw.wo),
                    proj,
                    n,
                    d,
                    d,
                )?;
                run.rows(KernelId::AttnResidual, layer, n, d, x, |r, o| {
                    kernels::add_assign(arith, o, proj, n, d, r)
                })?;
                let norm = f32s(base, lw.ffn_norm);
                run.rows(KernelId::FfnNorm, layer, n, d, xb, |r, o| {
                    kernels::rmsnorm(arith, x, norm, o, n, d, c.norm_eps, r)
                })?;
                let gate = f32s_mut(base, w.gate.prefix(n * f));
                let up = f32s_mut(base, w.up.prefix(n * f));
                run.linear(
                    arith,
                    KernelId::Gate,
                    layer,
                    xb,
                    f32s(base, lw.w_gate),
                    gate,
                    n,
                    d,
                    f,
                )?;
                run.linear(
                    arith,
                    KernelId::Up,
                    layer,
                    xb,
                    f32s(base, lw.w_up),
                    up,
                    n,
                    d,
                    f,
                )?;
                let up = &*up;
                run.rows(KernelId::SwiGlu, layer, n, f, gate, |r, o| {
                    kernels::swiglu(arith, o, up, n, f, r)
                })?;
                run.linear(
                    arith,
                    KernelId::Down,
                    layer,
                    gate,
                    f32s(base, lw.w_down),
                    proj,
                    n,
                    f,
                    d,
                )?;
                run.rows(KernelId::FfnResidual, layer, n, d, x, |r, o| {
                    kernels::add_assign(arith, o, proj, n, d, r)
                })?;
            }
            if let (Some(norm), Some(head)) = (l.final_norm, l.head) {
                let last = &x[(n - 1) * d..];
                let xb = f32s_mut(base, w.xb.prefix(d));
                let norm = f32s(base, norm);
                run.rows(KernelId::FinalNorm, None, 1, d, xb, |r, o| {
                    kernels::rmsnorm(arith, last, norm, o, 1, d, c.norm_eps, r)
                })?;
                let logits = f32s_mut(base, w.logits.prefix(v));
                run.linear(
                    arith,
                    KernelId::Head,
                    None,
                    xb,
                    f32s(base, head),
                    logits,
                    1,
                    d,
                    v,
                )?;
                let token = u32s_mut(base, l.outboxes[seq].prefix(1));
                run.start(KernelId::Argmax, None);
                kernels::argmax(logits, token, 1, v, 0..1)?;
                run.finish(f32s_mut(base, l.outboxes[seq].prefix(1)));
            } else {
                f32s_mut(base, l.outboxes[seq].prefix(n * d)).copy_from_slice(x);
            }
        }
        self.cursor.positions[seq] = pos0 + n;
        let step = self.cursor.step;
        self.cursor.step += 1;
        hooks.step_boundary(step, seq as u32);
        Ok(())
    }
}

/// Per-step dispatch state: the pool, the hooks, and the call record being filled.
struct Run<'p, 'h, H: Hooks + ?Sized> {
    pool: &'p ThreadPool,
    hooks: &'h mut H,
    timing: bool,
    call: KernelCall,
}

impl<H: Hooks + ?Sized> Run<'_, '_, H> {
    fn start(&mut self, kernel: KernelId, layer: Option<u32>) {
        self.call.kernel = kernel;
        self.call.layer = layer;
        if self.timing {
            self.call.start_ns = monotonic_ns();
        }
    }

    fn finish(&mut self, output: &mut [f32]) {
        if self.timing {
            self.call.end_ns = monotonic_ns();
        }
        self.hooks.kernel(&self.call, output);
    }

    /// One row-split kernel call over `n_rows` rows of `row_len` elements of `out`.
    fn rows<F>(
        &mut self,
        kernel: KernelId,
        layer: Option<u32>,
        n_rows: usize,
        row_len: usize,
        out: &mut [f32],
        f: F,
    ) -> Result<(), Error>
    where
        F: Fn(std::ops::Range<usize>, &mut [f32]) -> Result<(), Error> + Sync,
    {
        self.start(kernel, layer);
        self.pool.split_rows(n_rows, row_len, out, f)?;
        self.finish(out);
        Ok(())
    }

    /// `out[m x n] = input[m x k] · weight[k x n]`: split by output columns for one row
    /// (decode), by rows otherwise (prefill). Both give the same bits.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &mut self,
        arith: Arith,
        kernel: KernelId,
        layer: Option<u32>,
        input: &[f32],
        weight: &[f32],
        out: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<(), Error> {
        let input = &input[..m * k];
        if m == 1 {
            self.rows(kernel, layer, n, 1, out, |r, o| {
                kernels::gemv(arith, input, weight, o, k, n, r)
            })
        } else {
            self.rows(kernel, layer, m, n, out, |r, o| {
                kernels::gemm(arith, input, weight, o, m, k, n, r)
            })
        }
    }
}

/// The f32 elements of `span`.
///
/// # Safety
/// `span` must lie in the arena at `base`, and no `&mut` to it may be live.
unsafe fn f32s<'a>(base: *mut u8, span: Span) -> &'a [f32] {
    // SAFETY: forwarded; arena offsets are 64-byte aligned.
    unsafe { std::slice::from_raw_parts(base.add(span.offset).cast::<f32>(), span.len) }
}

/// The f32 elements of `span`, writable.
///
/// # Safety
/// `span` must lie in the arena at `base`, and no other reference to it may be live.
unsafe fn f32s_mut<'a>(base: *mut u8, span: Span) -> &'a mut [f32] {
    // SAFETY: forwarded; arena offsets are 64-byte aligned.
    unsafe { std::slice::from_raw_parts_mut(base.add(span.offset).cast::<f32>(), span.len) }
}

/// The u32 elements of `span`, writable.
///
/// # Safety
/// As [`f32s_mut`].
unsafe fn u32s_mut<'a>(base: *mut u8, span: Span) -> &'a mut [u32] {
    // SAFETY: forwarded; arena offsets are 64-byte aligned.
    unsafe { std::slice::from_raw_parts_mut(base.add(span.offset).cast::<u32>(), span.len) }
}
