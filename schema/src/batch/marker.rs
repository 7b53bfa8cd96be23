//! Marker columns, encode and decode side by side.

use super::{BatchError, Col, put_uvar};
use crate::event::Marker;
use crate::trace_capnp::marker_columns;

super::columns!(
    /// The `markers` group of a batch.
    MarkerColumns { text }
);

impl MarkerColumns {
    pub(super) fn push(&mut self, e: &Marker) {
        put_uvar(&mut self.text, e.text.into());
    }

    pub(super) fn write(&self, mut g: marker_columns::Builder<'_>) {
        g.set_text(&self.text);
    }
}

/// Reads the `markers` group back.
pub(super) struct MarkerReader<'a> {
    text: Col<'a>,
}

impl<'a> MarkerReader<'a> {
    pub(super) fn new(r: marker_columns::Reader<'a>) -> Result<Self, BatchError> {
        Ok(MarkerReader {
            text: Col::new(r.get_text()?, "markers.text"),
        })
    }

    pub(super) fn next(&mut self, ns: u64) -> Result<Marker, BatchError> {
        Ok(Marker {
            text: self.text.u32()?,
            ns,
        })
    }

    pub(super) fn finish(&self) -> Result<(), BatchError> {
        self.text.finish()
    }
}
