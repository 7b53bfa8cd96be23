//! Time and iteration totals of one criterion benchmark, so a bench can print its ratio against
//! the baseline it measured in the same run.

use std::cell::Cell;
use std::time::Duration;

#[derive(Default)]
pub struct Tally {
    elapsed: Cell<Duration>,
    iters: Cell<u64>,
}

impl Tally {
    /// Adds one `iter_custom` measurement and returns it, for criterion.
    pub fn add(&self, d: Duration, iters: u64) -> Duration {
        self.elapsed.set(self.elapsed.get() + d);
        self.iters.set(self.iters.get() + iters);
        d
    }

    /// Whether criterion ran this benchmark at all (a filter may have skipped it).
    pub fn ran(&self) -> bool {
        self.iters.get() > 0
    }

    /// Mean nanoseconds per iteration over everything added.
    pub fn per_iter_ns(&self) -> f64 {
        self.elapsed.get().as_nanos() as f64 / self.iters.get().max(1) as f64
    }
}
