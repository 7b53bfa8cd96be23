//! Counter columns, encode and decode side by side.

use super::{BatchError, Col, put_uvar};
use crate::event::Counter;
use crate::trace_capnp::counter_columns;

super::columns!(
    /// The `counters` group of a batch.
    CounterColumns { name, value }
);

impl CounterColumns {
    pub(super) fn push(&mut self, e: &Counter) {
        put_uvar(&mut self.name, e.name.into());
        put_uvar(&mut self.value, e.value);
    }

    pub(super) fn write(&self, mut g: counter_columns::Builder<'_>) {
        g.set_name(&self.name);
        g.set_value(&self.value);
    }
}

/// Reads the `counters` group back.
pub(super) struct CounterReader<'a> {
    name: Col<'a>,
    value: Col<'a>,
}

impl<'a> CounterReader<'a> {
    pub(super) fn new(r: counter_columns::Reader<'a>) -> Result<Self, BatchError> {
        Ok(CounterReader {
            name: Col::new(r.get_name()?, "counters.name"),
            value: Col::new(r.get_value()?, "counters.value"),
        })
    }

    pub(super) fn next(&mut self, ns: u64) -> Result<Counter, BatchError> {
        Ok(Counter {
            name: self.name.u32()?,
            value: self.value.uvar()?,
            ns,
        })
    }

    pub(super) fn finish(&self) -> Result<(), BatchError> {
        self.name.finish()?;
        self.value.finish()
    }
}
