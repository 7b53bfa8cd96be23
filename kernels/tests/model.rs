//! End-to-end determinism of the decoder: the same tokens for every instruction set, thread
//! count, stage split, prefill chunking and snapshot/restore.

use slug_kernels::{
    Arith, Error, Hooks, Isa, KernelCall, KernelId, LayerPlan, ModelConfig, NoHooks, Stage,
    ThreadPool, generate,
};

const PROMPT: &[u8] = b"The quick brown fox";

fn tiny() -> ModelConfig {
    let mut c = ModelConfig::preset("tiny").unwrap();
    c.seed = 7;
    c
}

fn build(config: &ModelConfig, stages: usize, pool: &ThreadPool, arith: Arith) -> Vec<Stage> {
    let plan = LayerPlan::even(config.layers, stages).unwrap();
    (0..stages)
        .map(|s| Stage::with_arith(config, &plan, s, 1, pool, arith).unwrap())
        .collect()
}

fn run(config: &ModelConfig, stages: usize, threads: usize, arith: Arith, n: usize) -> Vec<u32> {
    let pool = ThreadPool::new(threads).unwrap();
    let mut st = build(config, stages, &pool, arith);
    let prompt: Vec<u32> = PROMPT.iter().map(|&b| b as u32).collect();
    generate(&mut st, &pool, &mut NoHooks, 0, &prompt, n)
        .unwrap()
        .tokens
}

#[test]
fn tokens_are_identical_for_every_isa_thread_count_and_stage_split() {
    for fma in [false, true] {
        let mut config = tiny();
        config.fma = fma;
        config.layers = 3;
        let reference = run(&config, 1, 1, Arith::scalar(fma), 12);
        assert_eq!(reference.len(), 12);
        for isa in Isa::ALL {
            let Ok(arith) = Arith::new(isa, fma) else {
                eprintln!(
                    "skipping {isa} (fma = {fma}): {:?}",
                    isa.unavailable_reason()
                );
                continue;
            };
            for threads in [1, 2, 3] {
                for stages in [1, 2, 3] {
                    let got = run(&config, stages, threads, arith, 12);
                    assert_eq!(
                        got, reference,
                        "{isa} fma={fma} threads={threads} stages={stages}"
                    );
                }
            }
        }
    }
}

#[test]
fn fma_and_seed_change_the_output() {
    let a = run(&tiny(), 1, 1, Arith::scalar(false), 16);
    let mut other = tiny();
    other.seed = 8;
    let b = run(&other, 1, 1, Arith::scalar(false), 16);
    assert_ne!(a, b, "a different seed must give different weights");
    // The model is not degenerate: it does not emit a single token forever.
    let mut distinct = a.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() > 1, "{a:?}");
}

/// Records every kernel output bit for bit, and can flip a bit of one call.
#[derive(Default)]
struct Probe {
    calls: Vec<(KernelCall, Vec<u32>)>,
    steps: Vec<(u64, u32)>,
    flip: Option<(KernelId, u64)>,
}

impl Hooks for Probe {
    fn kernel(&mut self, call: &KernelCall, output: &mut [f32]) {
        if self.flip == Some((call.kernel, call.step)) {
            output[0] = f32::from_bits(output[0].to_bits() ^ (1 << 22));
        }
        assert!(call.end_ns >= call.start_ns);
        self.calls
            .push((*call, output.iter().map(|v| v.to_bits()).collect()));
    }
    fn step_boundary(&mut self, step: u64, seq: u32) {
        self.steps.push((step, seq));
    }
}

#[test]
fn prefill_in_one_step_equals_feeding_the_prompt_token_by_token() {
    let config = tiny();
    let pool = ThreadPool::new(2).unwrap();
    let plan = LayerPlan::even(config.layers, 1).unwrap();
    let mut a = Stage::new(&config, &plan, 0, 1, &pool).unwrap();
    let mut b = Stage::new(&config, &plan, 0, 1, &pool).unwrap();
    let prompt: Vec<u32> = PROMPT.iter().map(|&b| b as u32).collect();
    a.inbox_tokens_mut(0).unwrap()[..prompt.len()].copy_from_slice(&prompt);
    a.forward(&pool, &mut NoHooks, 0, prompt.len()).unwrap();
    for &t in &prompt {
        b.inbox_tokens_mut(0).unwrap()[0] = t;
        b.forward(&pool, &mut NoHooks, 0, 1).unwrap();
    }
    assert_eq!(a.outbox_token(0).unwrap(), b.outbox_token(0).unwrap());
    let kv = a.layout().kv.byte_range();
    assert!(
        a.arena().bytes()[kv.clone()] == b.arena().bytes()[kv],
        "KV caches differ between prefill and token-by-token"
    );
}

#[test]
fn snapshot_and_restore_are_byte_copies() {
    let config = tiny();
    let pool = ThreadPool::new(1).unwrap();
    let plan = LayerPlan::even(config.layers, 1).unwrap();
    let mut stage = Stage::new(&config, &plan, 0, 2, &pool).unwrap();
    let step = |stage: &mut Stage, seq: usize, tok: u32| {
        stage.inbox_tokens_mut(seq).unwrap()[0] = tok;
        stage.forward(&pool, &mut NoHooks, seq, 1).unwrap();
        stage.outbox_token(seq).unwrap()
    };
    let mut t = 65;
    for _ in 0..5 {
        t = step(&mut stage, 1, t);
    }
    let bytes = stage.arena().bytes().to_vec();
    let cursor = stage.cursor().clone();
    let mut expected = Vec::new();
    let mut u = t;
    for _ in 0..6 {
        u = step(&mut stage, 1, u);
        expected.push(u);
    }
    let mut fresh = Stage::new(&config, &plan, 0, 2, &pool).unwrap();
    fresh.restore(&bytes, cursor).unwrap();
    let mut got = Vec::new();
    let mut u = t;
    for _ in 0..6 {
        u = step(&mut fresh, 1, u);
        got.push(u);
    }
    assert_eq!(got, expected);
    assert!(matches!(
        fresh.restore(&bytes[1..], fresh.cursor().clone()),
        Err(Error::RestoreMismatch { .. })
    ));
}

#[test]
fn hooks_see_every_kernel_call_and_a_fault_changes_what_follows() {
    let config = tiny();
    let pool = ThreadPool::new(2).unwrap();
    let prompt: Vec<u32> = PROMPT.iter().map(|&b| b as u32).collect();
    let mut clean = Probe::default();
    let mut st = build(&config, 2, &pool, Arith::best(false).unwrap());
    let tokens = generate(&mut st, &pool, &mut clean, 0, &prompt, 4)
        .unwrap()
        .tokens;
    // Per step: embed, 15 calls per layer, final norm + head + argmax.
    let per_step = 1 + 15 * config.layers + 3;
    assert_eq!(clean.calls.len(), 4 * per_step);
    assert_eq!(clean.steps.len(), 4 * 2, "one boundary per stage per step");
    let argmax: Vec<u32> = clean
        .calls
        .iter()
        .filter(|(c, _)| c.kernel == KernelId::Argmax)
        .map(|(_, out)| out[0])
        .collect();
    assert_eq!(argmax, tokens, "argmax output is the token id");

    // Same run again is bit-identical in every kernel output.
    let mut again = Probe::default();
    let mut st = build(&config, 2, &pool, Arith::scalar(false));
    generate(&mut st, &pool, &mut again, 0, &prompt, 4).unwrap();
    let outputs = |p: &Probe| p.calls.iter().map(|(_, o)| o.clone()).collect::<Vec<_>>();
    assert_eq!(outputs(&clean), outputs(&again));

    // A flipped bit in the first attention output of step 0 changes later outputs.
    let mut faulty = Probe {
        flip: Some((KernelId::Attention, 0)),
        ..Probe::default()
    };
    let mut st = build(&config, 2, &pool, Arith::scalar(false));
    generate(&mut st, &pool, &mut faulty, 0, &prompt, 4).unwrap();
    let first_diff = outputs(&clean)
        .iter()
        .zip(outputs(&faulty))
        .position(|(a, b)| *a != b)
        .unwrap();
    assert_eq!(clean.calls[first_diff].0.kernel, KernelId::Attention);
}

#[test]
fn bad_requests_are_refused_before_work() {
    let config = tiny();
    let pool = ThreadPool::new(1).unwrap();
    let mut st = build(&config, 1, &pool, Arith::scalar(false));
    let long = vec![1u32; config.max_seq];
    assert!(matches!(
        generate(&mut st, &pool, &mut NoHooks, 0, &long, 2),
        Err(Error::ContextFull { .. })
    ));
    assert!(matches!(
        generate(&mut st, &pool, &mut NoHooks, 0, &[999], 2),
        Err(Error::TokenOutOfRange { .. })
    ));
    assert!(matches!(
        st[0].forward(&pool, &mut NoHooks, 3, 1),
        Err(Error::NoSuchSequence { .. })
    ));
    assert!(matches!(
        st[0].inbox_hidden_mut(0),
        Err(Error::WrongPayload { .. })
    ));
    let big = ThreadPool::new(2).unwrap();
    assert!(matches!(
        st[0].forward(&big, &mut NoHooks, 0, 1),
        Err(Error::TooManyThreads { .. })
    ));
    let mut huge = tiny();
    huge.dim = 1 << 20;
    huge.heads = 1 << 10;
    huge.kv_heads = 1 << 10;
    let plan = LayerPlan::even(huge.layers, 1).unwrap();
    assert!(matches!(
        Stage::new(&huge, &plan, 0, 1, &pool),
        Err(Error::ArenaTooLarge { .. } | Error::SizeOverflow { .. })
    ));
}

/// Dirty tracking never misses a write: after forward steps of either sequence, every byte that
/// changed lies in a page marked written since the checkpoint, and the weights are untouched.
#[test]
fn every_byte_a_step_changes_is_in_a_page_marked_dirty() {
    use slug_kernels::Section;
    let config = tiny();
    let pool = ThreadPool::new(2).unwrap();
    let plan = LayerPlan::even(config.layers, 2).unwrap();
    for index in 0..2 {
        let mut stage = Stage::new(&config, &plan, index, 2, &pool).unwrap();
        let dim = config.dim;
        for round in 0..3 {
            let checkpoint = stage.dirty().checkpoint();
            let before = stage.arena().bytes().to_vec();
            for seq in [round % 2, 1] {
                if index == 0 {
                    stage.inbox_tokens_mut(seq).unwrap()[0] = 65 + round as u32;
                } else {
                    let x = stage.inbox_hidden_mut(seq).unwrap();
                    x[..dim]
                        .iter_mut()
                        .for_each(|v| *v = round as f32 * 0.5 + 0.25);
                }
                stage.forward(&pool, &mut NoHooks, seq, 1).unwrap();
            }
            let after = stage.arena().bytes();
            let changed: Vec<usize> = (0..after.len())
                .filter(|&i| before[i] != after[i])
                .collect();
            assert!(!changed.is_empty());
            for &i in &changed {
                assert!(
                    stage.dirty().written_since(checkpoint, i..i + 1),
                    "stage {index} round {round}: byte {i} changed in a clean page"
                );
            }
            let (w, wlen) = stage.layout().section(Section::Weights);
            let dirty_weight_pages = stage
                .dirty()
                .ranges_since(checkpoint)
                .filter(|r| r.start >= w && r.end <= w + wlen)
                .count();
            assert_eq!(dirty_weight_pages, 0, "weights pages are never dirty");
        }
    }
}
