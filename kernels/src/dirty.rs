//! Which pages of a stage arena were written since a moment a reader chose: a snapshot (or a
//! migration's pre-copy round) then reads and hashes only what changed since its last pass.
//!
//! Every page keeps the generation of its last write; a reader takes a [`DirtyPages::checkpoint`]
//! when it reads the arena and later asks what was written after it. Readers do not disturb one
//! another (each keeps its own checkpoint), and a write costs one store per page it touches.
//! The stage marks what its own methods write ([`crate::Stage::forward`]: the sequence's inbox,
//! KV rows, outbox and the workspace); a writer through [`crate::Stage::arena_mut`] must say
//! what it wrote with [`crate::Stage::mark_written`].

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes per tracked page. Snapshot chunks are whole multiples of it (256 KiB by default).
pub const DIRTY_PAGE: usize = 64 * 1024;

/// The last-write generation of every page of an arena.
#[derive(Debug)]
pub struct DirtyPages {
    written: Vec<u64>,
    len: usize,
    /// The generation writes get now; a checkpoint returns it and moves it on.
    clock: AtomicU64,
}

impl DirtyPages {
    /// Tracking for a freshly mapped (all-zero) arena of `len` bytes: no page written yet
    /// (generation 0), writes get generation 1 until the first checkpoint.
    pub fn new(len: usize) -> DirtyPages {
        DirtyPages {
            written: vec![0; len.div_ceil(DIRTY_PAGE)],
            len,
            clock: AtomicU64::new(1),
        }
    }

    /// Whether no byte of `range` was ever written since the arena was mapped: it still holds
    /// zeros, so a reader need not read (or fault in) those pages to know their content.
    pub fn never_written(&self, range: Range<usize>) -> bool {
        if range.start >= range.end {
            return true;
        }
        let last = (range.end.min(self.len).max(1) - 1) / DIRTY_PAGE;
        self.written
            .get(range.start / DIRTY_PAGE..=last)
            .is_some_and(|pages| pages.iter().all(|&g| g == 0))
    }

    /// A mark for a reader that is about to read the arena: pages written after this call are
    /// [`DirtyPages::written_since`] it, pages written before are not.
    pub fn checkpoint(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Records a write of the arena's bytes `range`.
    pub fn mark(&mut self, range: Range<usize>) {
        if range.start >= range.end {
            return;
        }
        let now = *self.clock.get_mut();
        let last = (range.end.min(self.len).max(1) - 1) / DIRTY_PAGE;
        for page in range.start / DIRTY_PAGE..=last.min(self.written.len().saturating_sub(1)) {
            self.written[page] = now;
        }
    }

    /// Records a write of the whole arena.
    pub fn mark_all(&mut self) {
        let now = *self.clock.get_mut();
        self.written.fill(now);
    }

    /// Whether any byte of `range` may have been written after `checkpoint` was taken.
    pub fn written_since(&self, checkpoint: u64, range: Range<usize>) -> bool {
        if range.start >= range.end {
            return false;
        }
        let last = (range.end.min(self.len).max(1) - 1) / DIRTY_PAGE;
        self.written
            .get(range.start / DIRTY_PAGE..=last)
            .is_none_or(|pages| pages.iter().any(|&g| g > checkpoint))
    }

    /// The byte ranges written after `checkpoint`, whole pages, adjacent pages joined.
    pub fn ranges_since(&self, checkpoint: u64) -> impl Iterator<Item = Range<usize>> + '_ {
        let mut page = 0;
        std::iter::from_fn(move || {
            while page < self.written.len() && self.written[page] <= checkpoint {
                page += 1;
            }
            if page == self.written.len() {
                return None;
            }
            let start = page;
            while page < self.written.len() && self.written[page] > checkpoint {
                page += 1;
            }
            Some(start * DIRTY_PAGE..(page * DIRTY_PAGE).min(self.len))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_see_what_was_written_after_their_checkpoint() {
        let mut d = DirtyPages::new(10 * DIRTY_PAGE + 5);
        assert!(
            d.never_written(0..d.len) && !d.written_since(0, 0..1),
            "fresh: zeros"
        );
        d.mark_all();
        assert!(!d.never_written(0..1) && d.written_since(0, 0..1));
        let a = d.checkpoint();
        assert!(!d.written_since(a, 0..d.len));
        d.mark(DIRTY_PAGE + 3..DIRTY_PAGE + 4);
        let b = d.checkpoint();
        d.mark(10 * DIRTY_PAGE..10 * DIRTY_PAGE + 5);
        assert!(d.written_since(a, DIRTY_PAGE..2 * DIRTY_PAGE));
        assert!(
            !d.written_since(b, DIRTY_PAGE..2 * DIRTY_PAGE),
            "b came after"
        );
        assert!(!d.written_since(a, 0..DIRTY_PAGE));
        assert!(d.written_since(b, 10 * DIRTY_PAGE..10 * DIRTY_PAGE + 1));
        let ranges: Vec<_> = d.ranges_since(a).collect();
        assert_eq!(
            ranges,
            [
                DIRTY_PAGE..2 * DIRTY_PAGE,
                10 * DIRTY_PAGE..10 * DIRTY_PAGE + 5
            ]
        );
        d.mark(2 * DIRTY_PAGE - 1..2 * DIRTY_PAGE + 1);
        assert_eq!(
            d.ranges_since(b).next(),
            Some(DIRTY_PAGE..3 * DIRTY_PAGE),
            "a write across a page edge dirties both, joined"
        );
        d.mark_all();
        assert!(d.written_since(d.checkpoint() - 1, 0..1));
    }
}
