//! Lost-events columns, encode and decode side by side.

use super::{BatchError, Col, put_svar, put_uvar};
use crate::event::LostEvents;
use crate::trace_capnp::lost_events_columns;

super::columns!(
    /// The `lostEvents` group of a batch.
    LostEventsColumns {
        count,
        reason,
        /// `to_ns` as a zigzag delta from `from_ns` (the event's time).
        duration,
    }
);

impl LostEventsColumns {
    pub(super) fn push(&mut self, e: &LostEvents) {
        put_uvar(&mut self.count, e.count);
        put_uvar(&mut self.reason, e.reason.into());
        put_svar(&mut self.duration, e.to_ns, e.from_ns);
    }

    pub(super) fn write(&self, mut g: lost_events_columns::Builder<'_>) {
        g.set_count(&self.count);
        g.set_reason(&self.reason);
        g.set_duration(&self.duration);
    }
}

/// Reads the `lostEvents` group back.
pub(super) struct LostEventsReader<'a> {
    count: Col<'a>,
    reason: Col<'a>,
    duration: Col<'a>,
}

impl<'a> LostEventsReader<'a> {
    pub(super) fn new(r: lost_events_columns::Reader<'a>) -> Result<Self, BatchError> {
        Ok(LostEventsReader {
            count: Col::new(r.get_count()?, "lostEvents.count"),
            reason: Col::new(r.get_reason()?, "lostEvents.reason"),
            duration: Col::new(r.get_duration()?, "lostEvents.duration"),
        })
    }

    pub(super) fn next(&mut self, ns: u64) -> Result<LostEvents, BatchError> {
        Ok(LostEvents {
            count: self.count.uvar()?,
            reason: self.reason.u32()?,
            from_ns: ns,
            to_ns: self.duration.svar(ns)?,
        })
    }

    pub(super) fn finish(&self) -> Result<(), BatchError> {
        for c in [&self.count, &self.reason, &self.duration] {
            c.finish()?;
        }
        Ok(())
    }
}
