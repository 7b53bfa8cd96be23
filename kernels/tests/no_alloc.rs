//! Every kernel, and a whole stage step, runs without a single heap allocation.
//!
//! Runs without the libtest harness (`harness = false`): the counter sees every thread, and the
//! harness's own threads allocate whenever they like (seen under load in CI), so the only threads
//! here are this one and the stage's pool.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use slug_kernels::kernels::{self, AttentionShape};
use slug_kernels::{Arith, Isa, LayerPlan, ModelConfig, NoHooks, Stage, ThreadPool};

/// Counts allocations made by any thread.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only adds a counter.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: forwarded.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    f();
    ALLOCATIONS.load(Ordering::SeqCst) - before
}

fn main() {
    kernels_and_stage_steps_do_not_allocate();
    println!("no_alloc: every kernel and stage step ran without allocating");
}

fn kernels_and_stage_steps_do_not_allocate() {
    // The counter itself works.
    assert!(allocations_during(|| drop(std::hint::black_box(vec![1u8; 3]))) >= 1);
    let (m, k, n) = (7, 65, 33);
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0.0f32; m * n];
    let w = vec![1.0f32; k];
    let mut x = vec![0.1f32; m * k];
    let up = vec![0.3f32; m * k];
    let shape = AttentionShape {
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
    };
    let (tok, ctx) = (3, 10);
    let q = vec![0.2f32; tok * 32];
    let kv = vec![0.1f32; ctx * 16];
    let mut att = vec![0.0f32; tok * 32];
    let mut work = vec![0.0f32; kernels::attention_work_size(ctx)];
    let cos = vec![1.0f32; ctx * 4];
    let sin = vec![0.0f32; ctx * 4];
    let tokens = [1u32, 2, 3];
    let table = vec![0.0f32; 256 * k];
    let mut ids = [0u32; 3];
    let paths: Vec<Arith> = Isa::available()
        .into_iter()
        .flat_map(|isa| [Arith::new(isa, false).ok(), Arith::new(isa, true).ok()])
        .flatten()
        .chain([Arith::scalar(true)])
        .collect();
    for arith in paths {
        let count = allocations_during(|| {
            kernels::gemm(arith, &a, &b, &mut c, m, k, n, 0..m).unwrap();
            kernels::gemv(arith, &a[..k], &b, &mut c[..n], k, n, 0..n).unwrap();
            kernels::rmsnorm(arith, &up, &w, &mut x, m, k, 1e-5, 0..m).unwrap();
            kernels::softmax(arith, &mut x, m, k, 0..m).unwrap();
            kernels::swiglu(arith, &mut x, &up, m, k, 0..m).unwrap();
            kernels::add_assign(arith, &mut x, &up, m, k, 0..m).unwrap();
            kernels::rope(&mut att, tok, 4, 8, &cos, &sin, 2, 0..tok).unwrap();
            kernels::attention(
                arith,
                &q,
                &kv,
                &kv,
                &mut att,
                shape,
                tok,
                ctx - tok,
                0..12,
                &mut work,
            )
            .unwrap();
            kernels::embed(&tokens, &table, &mut x[..3 * k], 256, k, 0..3).unwrap();
            kernels::argmax(&x[..3 * k], &mut ids, 3, k, 0..3).unwrap();
            // Errors are built without allocating too.
            assert!(kernels::gemm(arith, &a, &b, &mut c, m, k, n, 0..m + 1).is_err());
        });
        assert_eq!(count, 0, "{:?} allocated {count} times", arith);
    }

    let config = ModelConfig::preset("tiny").unwrap();
    let plan = LayerPlan::even(config.layers, 1).unwrap();
    for threads in [1, 2] {
        let pool = ThreadPool::new(threads).unwrap();
        let mut stage = Stage::new(&config, &plan, 0, 1, &pool).unwrap();
        stage.inbox_tokens_mut(0).unwrap()[..4].copy_from_slice(&[72, 101, 108, 108]);
        let count = allocations_during(|| {
            stage.forward(&pool, &mut NoHooks, 0, 4).unwrap();
            for _ in 0..3 {
                let t = stage.outbox_token(0).unwrap();
                stage.inbox_tokens_mut(0).unwrap()[0] = t;
                stage.forward(&pool, &mut NoHooks, 0, 1).unwrap();
            }
        });
        assert_eq!(
            count, 0,
            "stage steps with {threads} threads allocated {count} times"
        );
    }
}
