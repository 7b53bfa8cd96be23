//! Timestamps (CLOCK_MONOTONIC nanoseconds) and NTP-style clock-offset estimates between nodes.

use serde::{Deserialize, Serialize};

/// Nanoseconds of this node's CLOCK_MONOTONIC, the time base of every post/complete time.
pub use slug_kernels::monotonic_ns;

/// One ping-pong: client send (t0), server receive (t1), server send (t2), client receive (t3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockSample {
    /// Client clock when the ping left.
    pub t0: u64,
    /// Server clock when the ping arrived.
    pub t1: u64,
    /// Server clock when the pong left.
    pub t2: u64,
    /// Client clock when the pong arrived.
    pub t3: u64,
}

impl ClockSample {
    /// Round-trip time without the server's turnaround.
    pub fn rtt_ns(&self) -> i64 {
        (self.t3 as i64 - self.t0 as i64) - (self.t2 as i64 - self.t1 as i64)
    }

    /// Server clock minus client clock, assuming symmetric one-way delays.
    pub fn offset_ns(&self) -> i64 {
        ((self.t1 as i64 - self.t0 as i64) + (self.t2 as i64 - self.t3 as i64)) / 2
    }
}

/// The offset of a peer's monotonic clock from ours, from the minimum-RTT sample of several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockOffset {
    /// Peer clock minus local clock, in nanoseconds: `peer_time - offset_ns` is local time.
    pub offset_ns: i64,
    /// Round-trip time of the sample used; the offset is uncertain by about half of it.
    pub rtt_ns: i64,
    /// How many ping-pongs were taken.
    pub samples: u32,
}

impl ClockOffset {
    /// Picks the minimum-RTT sample: the one least disturbed by queueing.
    pub fn from_samples(samples: &[ClockSample]) -> Option<Self> {
        let best = samples.iter().min_by_key(|s| s.rtt_ns())?;
        Some(Self {
            offset_ns: best.offset_ns(),
            rtt_ns: best.rtt_ns(),
            samples: samples.len() as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_rtt_sample_wins_and_offset_is_symmetric_estimate() {
        // Server is 1000 ns ahead; the second sample had 400 ns of extra queueing on the way back.
        let good = ClockSample {
            t0: 100,
            t1: 1150,
            t2: 1160,
            t3: 220,
        };
        let queued = ClockSample {
            t0: 300,
            t1: 1350,
            t2: 1360,
            t3: 820,
        };
        let off = ClockOffset::from_samples(&[queued, good]).expect("two samples");
        assert_eq!(off.rtt_ns, 110);
        assert_eq!(off.offset_ns, 995);
        assert_eq!(off.samples, 2);
        assert!(ClockOffset::from_samples(&[]).is_none());
    }

    #[test]
    fn monotonic_clock_does_not_go_back() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a);
    }
}
