//! The single-process reference driver: runs a plan's stages one after another for one
//! sequence (prefill, then greedy decode). A pipelined runtime must produce the same tokens.

use std::time::Instant;

use crate::error::Error;
use crate::hooks::Hooks;
use crate::pool::ThreadPool;
use crate::stage::Stage;

/// What [`generate`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// Generated token ids (the first comes from the prefill step).
    pub tokens: Vec<u32>,
    /// Prompt tokens fed in the prefill step.
    pub prompt_tokens: usize,
    /// Wall time of the prefill step (all stages), nanoseconds.
    pub prefill_ns: u64,
    /// Wall time of all decode steps (all stages), nanoseconds.
    pub decode_ns: u64,
}

/// Prefills `prompt` into sequence `seq` and greedily decodes until `new_tokens` tokens exist,
/// running `stages` (stage 0 first) one after another on `pool`, moving each step's
/// activations from one stage's outbox to the next one's inbox by copying bytes.
///
/// Refuses, before any work, an empty prompt, an empty stage list, or a prompt plus
/// generation longer than the context.
pub fn generate<H: Hooks + ?Sized>(
    stages: &mut [Stage],
    pool: &ThreadPool,
    hooks: &mut H,
    seq: usize,
    prompt: &[u32],
    new_tokens: usize,
) -> Result<Generation, Error> {
    let Some(first) = stages.first() else {
        return Err(Error::InvalidPlan {
            reason: "no stages to run".into(),
        });
    };
    let config = first.config().clone();
    if prompt.is_empty() {
        return Err(Error::NoTokens);
    }
    // The last generated token is never fed back, so the cache needs prompt + new - 1 slots.
    let needed = prompt.len() + new_tokens.saturating_sub(1);
    let position = first.cursor().positions.get(seq).copied().unwrap_or(0);
    if position + needed > config.max_seq {
        return Err(Error::ContextFull {
            seq,
            position,
            n_tokens: needed,
            max_seq: config.max_seq,
        });
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= config.vocab) {
        return Err(Error::TokenOutOfRange {
            token: bad,
            vocab: config.vocab,
        });
    }
    let mut out = Generation {
        tokens: Vec::with_capacity(new_tokens),
        prompt_tokens: prompt.len(),
        prefill_ns: 0,
        decode_ns: 0,
    };
    if new_tokens == 0 {
        return Ok(out);
    }
    let start = Instant::now();
    let mut token = step(stages, pool, hooks, seq, prompt)?;
    out.prefill_ns = start.elapsed().as_nanos() as u64;
    out.tokens.push(token);
    let start = Instant::now();
    while out.tokens.len() < new_tokens {
        token = step(stages, pool, hooks, seq, &[token])?;
        out.tokens.push(token);
    }
    out.decode_ns = start.elapsed().as_nanos() as u64;
    Ok(out)
}

/// One step of every stage for `tokens`; returns the next token.
fn step<H: Hooks + ?Sized>(
    stages: &mut [Stage],
    pool: &ThreadPool,
    hooks: &mut H,
    seq: usize,
    tokens: &[u32],
) -> Result<u32, Error> {
    let n = tokens.len();
    stages[0].inbox_tokens_mut(seq)?[..n].copy_from_slice(tokens);
    for s in 0..stages.len() {
        stages[s].forward(pool, hooks, seq, n)?;
        if s + 1 < stages.len() {
            let (done, rest) = stages.split_at_mut(s + 1);
            let dim = done[s].config().dim;
            let src = &done[s].outbox_hidden(seq)?[..n * dim];
            rest[0].inbox_hidden_mut(seq)?[..n * dim].copy_from_slice(src);
        }
    }
    stages[stages.len() - 1].outbox_token(seq)
}
