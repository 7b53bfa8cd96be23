//! `TimeRange`: the one half-open nanosecond interval every crate uses, for a log's own clock
//! (reading by time) and for the viewer's trace-global clock (what is on screen) alike.

/// A half-open time interval `[start_ns, end_ns)` in nanoseconds.
///
/// Events are tested against it as closed intervals `[start, end]` (an instant has `start ==
/// end`) with [`TimeRange::touches`]. `end_ns == u64::MAX` leaves the range open-ended, so
/// [`TimeRange::ALL`] holds every instant, `u64::MAX` included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct TimeRange {
    /// First nanosecond inside the range.
    pub start_ns: u64,
    /// First nanosecond after the range.
    pub end_ns: u64,
}

impl TimeRange {
    /// All of time.
    pub const ALL: TimeRange = TimeRange {
        start_ns: 0,
        end_ns: u64::MAX,
    };

    /// `[a, b)`, with the bounds swapped if they are reversed.
    pub fn new(a: u64, b: u64) -> TimeRange {
        TimeRange {
            start_ns: a.min(b),
            end_ns: a.max(b),
        }
    }

    /// Length in nanoseconds (0 for a range whose fields were set reversed).
    pub fn len(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }

    /// Whether the range holds no time at all.
    pub fn is_empty(&self) -> bool {
        self.end_ns <= self.start_ns
    }

    /// Whether an event `[start, end]` (possibly an instant) touches this range.
    pub fn touches(&self, start: u64, end: u64) -> bool {
        (start < self.end_ns || self.end_ns == u64::MAX) && end >= self.start_ns
    }

    /// Nanoseconds shared by this range and `[start, end)`.
    pub fn overlap(&self, start: u64, end: u64) -> u64 {
        end.min(self.end_ns)
            .saturating_sub(start.max(self.start_ns))
    }

    /// The smallest range holding both this one and `other`.
    pub fn hull(self, other: TimeRange) -> TimeRange {
        TimeRange {
            start_ns: self.start_ns.min(other.start_ns),
            end_ns: self.end_ns.max(other.end_ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TimeRange;

    #[test]
    fn ranges_are_half_open_and_measure_overlap() {
        let r = TimeRange::new(20, 10);
        assert_eq!((r.start_ns, r.end_ns, r.len()), (10, 20, 10));
        assert_eq!(r.overlap(5, 15), 5);
        assert_eq!(r.overlap(20, 30), 0);
        assert!(r.touches(15, 15));
        assert!(r.touches(5, 10), "an event ending at the start touches it");
        assert!(!r.touches(20, 25), "the end is outside");
        assert!(TimeRange::new(7, 7).is_empty());
        assert_eq!(r.hull(TimeRange::new(30, 40)), TimeRange::new(10, 40));
    }

    #[test]
    fn all_of_time_holds_every_instant() {
        assert!(TimeRange::ALL.touches(0, 0));
        assert!(TimeRange::ALL.touches(u64::MAX, u64::MAX));
    }
}
