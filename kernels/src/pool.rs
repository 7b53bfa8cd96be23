//! The persistent thread pool an orchestrator uses to split one kernel call by rows.
//!
//! Kernels never see threads: the pool hands each part a disjoint row range and the matching
//! slice of the output, and every kernel gives the same bits for any split, so results do not
//! depend on the thread count. Dispatch allocates nothing.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::error::Error;

type Job = dyn Fn(usize) + Sync;

/// A job pointer whose lifetime was erased; valid while `ThreadPool::broadcast` waits.
#[derive(Clone, Copy)]
struct JobPtr(*const Job);

// SAFETY: the pointee is `Sync`, and `broadcast` keeps it alive until every worker is done.
unsafe impl Send for JobPtr {}

struct State {
    generation: u64,
    job: Option<JobPtr>,
    pending: usize,
    panicked: bool,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    start: Condvar,
    done: Condvar,
    /// Mirrors of `generation` and `pending`, read without the lock so that threads can spin
    /// briefly before sleeping: a kernel call lasts microseconds, a condvar wake-up about as
    /// long. The mutex-protected fields stay the source of truth.
    generation_hint: AtomicU64,
    pending_hint: AtomicUsize,
}

/// Waiting rounds before a thread sleeps on a condvar: the first `SPIN_PAUSE` are CPU pause
/// hints, the rest yield the CPU (so an oversubscribed machine runs the thread doing the work).
const SPIN: u32 = 200;
const SPIN_PAUSE: u32 = 64;

/// One waiting round.
fn spin_round(round: u32) {
    if round < SPIN_PAUSE {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A fixed set of worker threads plus the calling thread.
pub struct ThreadPool {
    threads: usize,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises `broadcast` calls from different threads sharing one pool.
    busy: Mutex<()>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("threads", &self.threads)
            .finish()
    }
}

impl ThreadPool {
    /// A pool of `threads` threads in all (the caller counts as one, so `threads - 1` workers
    /// are started). `threads = 0` is treated as 1.
    pub fn new(threads: usize) -> Result<ThreadPool, Error> {
        let threads = threads.max(1);
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let limit = (4 * cpus).max(64);
        if threads > limit {
            return Err(Error::ThreadLimit {
                asked: threads,
                limit,
                cpus,
            });
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                generation: 0,
                job: None,
                pending: 0,
                panicked: false,
                shutdown: false,
            }),
            start: Condvar::new(),
            done: Condvar::new(),
            generation_hint: AtomicU64::new(0),
            pending_hint: AtomicUsize::new(0),
        });
        let mut workers = Vec::with_capacity(threads - 1);
        for index in 1..threads {
            let shared = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("slug-pool-{index}"))
                .spawn(move || worker(&shared, index))
                .map_err(|source| Error::ThreadSpawn { index, source })?;
            workers.push(handle);
        }
        Ok(ThreadPool {
            threads,
            shared,
            workers,
            busy: Mutex::new(()),
        })
    }

    /// Threads in the pool, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `job(part)` for every `part` in `0..threads()`, part 0 on the calling thread, and
    /// returns when all are done. A panic in any part is re-raised here after all finish.
    pub fn broadcast(&self, job: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 {
            job(0);
            return;
        }
        let _busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        // SAFETY: only the lifetime is erased; this function does not return before every
        // worker has finished with the job (the wait below runs even if part 0 panics).
        let raw: *const (dyn Fn(usize) + Sync + '_) = job;
        let ptr = JobPtr(unsafe {
            std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const Job>(raw)
        });
        {
            let mut state = self.shared.lock();
            state.job = Some(ptr);
            state.pending = self.threads - 1;
            state.panicked = false;
            state.generation = state.generation.wrapping_add(1);
            self.shared
                .pending_hint
                .store(self.threads - 1, Ordering::Release);
            self.shared
                .generation_hint
                .store(state.generation, Ordering::Release);
        }
        self.shared.start.notify_all();
        let mine = catch_unwind(AssertUnwindSafe(|| job(0)));
        let mut spins = 0;
        while self.shared.pending_hint.load(Ordering::Acquire) > 0 && spins < SPIN {
            spin_round(spins);
            spins += 1;
        }
        let mut state = self.shared.lock();
        while state.pending > 0 {
            state = self
                .shared
                .done
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.job = None;
        let theirs = state.panicked;
        drop(state);
        if let Err(payload) = mine {
            resume_unwind(payload);
        }
        if theirs {
            panic!("a thread pool worker panicked while running a job");
        }
    }

    /// The rows of part `part` when `n_rows` rows are split into `parts` parts: contiguous,
    /// in order, sizes differing by at most one.
    pub fn partition(n_rows: usize, parts: usize, part: usize) -> Range<usize> {
        let parts = parts.max(1);
        (part * n_rows / parts)..((part + 1) * n_rows / parts)
    }

    /// Splits rows `0..n_rows` over the pool: `f(rows, out_rows)` gets each part's row range
    /// and the matching `row_len`-element rows of `out`. Returns the first error of any part.
    ///
    /// # Panics
    /// If `out` is shorter than `n_rows * row_len` (a caller bug, not bad input).
    pub fn split_rows<T, E, F>(
        &self,
        n_rows: usize,
        row_len: usize,
        out: &mut [T],
        f: F,
    ) -> Result<(), E>
    where
        T: Send,
        E: Send,
        F: Fn(Range<usize>, &mut [T]) -> Result<(), E> + Sync,
    {
        let mut no_work: [u8; 0] = [];
        self.split_rows_with_work(n_rows, row_len, out, &mut no_work, 0, |rows, out, _| {
            f(rows, out)
        })
    }

    /// Like [`split_rows`](Self::split_rows), and each part also gets its own
    /// `work_per_part`-element slice of `work` (part `p` gets `work[p * work_per_part..]`).
    ///
    /// # Panics
    /// If `out` is shorter than `n_rows * row_len` or `work` shorter than
    /// `threads() * work_per_part` (caller bugs, not bad input).
    pub fn split_rows_with_work<T, W, E, F>(
        &self,
        n_rows: usize,
        row_len: usize,
        out: &mut [T],
        work: &mut [W],
        work_per_part: usize,
        f: F,
    ) -> Result<(), E>
    where
        T: Send,
        W: Send,
        E: Send,
        F: Fn(Range<usize>, &mut [T], &mut [W]) -> Result<(), E> + Sync,
    {
        let parts = self.threads.min(n_rows).max(1);
        assert!(
            out.len() >= n_rows * row_len,
            "split_rows: output has {} elements, {n_rows} rows of {row_len} need more",
            out.len()
        );
        assert!(
            work.len() >= parts * work_per_part,
            "split_rows: work has {} elements, {parts} parts of {work_per_part} need more",
            work.len()
        );
        if parts == 1 {
            return f(
                0..n_rows,
                &mut out[..n_rows * row_len],
                &mut work[..work_per_part],
            );
        }
        let out_ptr = SendPtr(out.as_mut_ptr());
        let work_ptr = SendPtr(work.as_mut_ptr());
        let first_error: Mutex<Option<E>> = Mutex::new(None);
        self.broadcast(&|part| {
            if part >= parts {
                return;
            }
            let rows = ThreadPool::partition(n_rows, parts, part);
            // SAFETY: parts have disjoint row ranges inside `out` and disjoint work slices
            // inside `work` (both checked above), and both borrows outlive `broadcast`.
            let (o, w) = unsafe {
                (
                    std::slice::from_raw_parts_mut(
                        out_ptr.get().add(rows.start * row_len),
                        rows.len() * row_len,
                    ),
                    std::slice::from_raw_parts_mut(
                        work_ptr.get().add(part * work_per_part),
                        work_per_part,
                    ),
                )
            };
            if let Err(e) = f(rows, o, w) {
                let mut slot = first_error.lock().unwrap_or_else(PoisonError::into_inner);
                slot.get_or_insert(e);
            }
        });
        match first_error
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl ThreadPool {
    /// Splits the columns of a row-major `[n_rows x n_cols]` matrix over the pool: part `p`
    /// gets columns `partition(n_cols, parts, p)` of every row, the same parts
    /// [`split_rows`](Self::split_rows) gives a one-row call (decode's `gemv`), so writing a
    /// matrix this way places each page on the thread that later reads it (first touch).
    /// `f(row, cols, out)` gets one row's column range and its elements.
    ///
    /// # Panics
    /// If `out` is shorter than `n_rows * n_cols` (a caller bug, not bad input).
    pub fn split_columns<T, F>(&self, n_rows: usize, n_cols: usize, out: &mut [T], f: F)
    where
        T: Send,
        F: Fn(usize, Range<usize>, &mut [T]) + Sync,
    {
        assert!(
            out.len() >= n_rows * n_cols,
            "split_columns: output has {} elements, {n_rows} x {n_cols} need more",
            out.len()
        );
        let parts = self.threads.min(n_cols).max(1);
        let ptr = SendPtr(out.as_mut_ptr());
        self.broadcast(&|part| {
            if part >= parts {
                return;
            }
            let cols = ThreadPool::partition(n_cols, parts, part);
            for row in 0..n_rows {
                // SAFETY: parts own disjoint column ranges of each row, inside `out`, which
                // outlives `broadcast`.
                let slice = unsafe {
                    std::slice::from_raw_parts_mut(
                        ptr.get().add(row * n_cols + cols.start),
                        cols.len(),
                    )
                };
                f(row, cols.clone(), slice);
            }
        });
    }
}

/// A raw pointer that may cross threads; each part touches a disjoint range.
struct SendPtr<T>(*mut T);

impl<T> SendPtr<T> {
    /// Going through a method makes closures capture the whole wrapper, not the bare pointer.
    fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: used only to hand disjoint ranges of one borrowed slice to the pool's parts.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above; the pointer itself is only read.
unsafe impl<T: Send> Sync for SendPtr<T> {}

fn worker(shared: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0;
        while shared.generation_hint.load(Ordering::Acquire) == seen && spins < SPIN {
            spin_round(spins);
            spins += 1;
        }
        let job = {
            let mut state = shared.lock();
            while state.generation == seen && !state.shutdown {
                state = shared
                    .start
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.shutdown {
                return;
            }
            seen = state.generation;
            state.job
        };
        let Some(JobPtr(job)) = job else { continue };
        // SAFETY: `broadcast` keeps the job alive until `pending` reaches zero below.
        let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(index) }));
        let mut state = shared.lock();
        if result.is_err() {
            state.panicked = true;
        }
        state.pending -= 1;
        shared.pending_hint.store(state.pending, Ordering::Release);
        if state.pending == 0 {
            shared.done.notify_all();
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.start.notify_all();
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_visited_once_for_any_thread_count() {
        for threads in 1..=4 {
            let pool = ThreadPool::new(threads).unwrap();
            for n_rows in [0, 1, 3, 7, 64] {
                let mut out = vec![0u32; n_rows * 2];
                pool.split_rows(n_rows, 2, &mut out, |rows, chunk| {
                    for (r, c) in rows.zip(chunk.chunks_exact_mut(2)) {
                        c[0] += r as u32 + 1;
                        c[1] += 1;
                    }
                    Ok::<(), ()>(())
                })
                .unwrap();
                let want: Vec<u32> = (0..n_rows as u32).flat_map(|r| [r + 1, 1]).collect();
                assert_eq!(out, want, "threads {threads} rows {n_rows}");
            }
        }
    }

    #[test]
    fn column_split_writes_every_element_once() {
        for threads in 1..=3 {
            let pool = ThreadPool::new(threads).unwrap();
            let (rows, cols) = (4, 7);
            let mut out = vec![0usize; rows * cols];
            pool.split_columns(rows, cols, &mut out, |r, cs, chunk| {
                for (c, o) in cs.zip(chunk) {
                    *o += r * cols + c + 1;
                }
            });
            assert_eq!(out, (1..=rows * cols).collect::<Vec<_>>());
        }
    }

    #[test]
    fn errors_and_panics_come_back_to_the_caller() {
        let pool = ThreadPool::new(3).unwrap();
        let mut out = vec![0u8; 9];
        let err = pool.split_rows(9, 1, &mut out, |rows, _| {
            if rows.start >= 3 {
                Err(rows.start)
            } else {
                Ok(())
            }
        });
        assert!(matches!(err, Err(3) | Err(6)));
        let caught = catch_unwind(AssertUnwindSafe(|| {
            pool.broadcast(&|part| assert_ne!(part, 2, "boom"));
        }));
        assert!(caught.is_err());
        // The pool still works after a panic.
        let mut out = vec![0u8; 3];
        pool.split_rows(3, 1, &mut out, |_, c| {
            c.fill(1);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(out, [1, 1, 1]);
    }
}
