//! The slug trace format: `trace.capnp` events, the `.slog` endpoint log container and the trace directory.
//!
//! - [`Event`] and its kinds are what endpoints record; [`RawRecord`] is their fixed-size hot-path form.
//! - [`LogWriter`] appends to a `.slog` (one per endpoint), encoding on a worker thread with
//!   [`FrameEncoder`]; [`LogReader`] maps one, indexes it, recovers damage and decodes lazily.
//! - [`Trace`] is the directory: [`Manifest`], `endpoints/<id>.slog`, `snapshots/`, `payloads/`;
//!   [`snapshot`] is the content-addressed snapshot store, [`blob`] the payload store, and
//!   [`TransferKey`] packs a transfer id (link, sequence) into the one `u64` logs hold.
//! - [`synth`] writes labelled synthetic pipeline traces for demos, tests and benchmarks.
//!
//! The byte-level format is in docs/FORMAT.md.

mod batch;
pub mod blob;
pub mod contained;
mod error;
mod event;
mod frame;
mod mpi_table;
mod raw;
mod reader;
pub mod snapshot;
mod summary;
pub mod synth;
mod time;
mod trace;
mod transfer_id;
mod writer;

/// Rust bindings generated from `trace.capnp` by build.rs (from the committed `trace.capnp.bin`).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations,
    unused_qualifications
)]
pub mod trace_capnp {
    include!(concat!(env!("OUT_DIR"), "/trace_capnp.rs"));
}

pub use batch::MAX_FRAME_EVENTS;
#[doc(hidden)]
pub use batch::{ColumnSize, column_sizes};
pub use error::{Result, SchemaError};
pub use event::{
    Counter, Direction, EbpfEvent, EbpfKind, Event, EventKind, KernelSpan, KindSet, LostEvents,
    Marker, MigrationEvent, MoveRole, PerfSample, PerfSampleKind, PtChunk, SnapshotEvent,
    SoftwareKind, SoftwareRecord, StepBoundary, StringId, SystemRecord, Transfer, Transport,
};
pub use frame::{
    Clock, FILE_HEADER_LEN, FORMAT_VERSION, FRAME_HEADER_LEN, FrameEncoder, FrameInfo, LogHeader,
    MAX_PAYLOAD_LEN, MAX_RAW_LEN,
};
pub use mpi_table::{MAX_COMMUNICATOR, MpiLink, MpiTable, MpiTransfer};
pub use raw::RawRecord;
pub use reader::{DecodedFrame, EventsIn, FooterState, LogReader, Recovery};
pub use summary::{EndpointSummary, LogSummary, TraceSummary};
pub use time::TimeRange;
pub use trace::{
    Cache, Capability, ENDPOINTS_DIR, EndpointInfo, HostTopology, HugePages, MANIFEST_FILE,
    Manifest, NodeClock, NumaNode, PAYLOADS_DIR, SNAPSHOTS_DIR, STAGE_OUTPUT_HASHES,
    TRACE_FORMAT_VERSION, Trace,
};
pub use transfer_id::TransferKey;
pub use writer::{LogStats, LogWriter, WriterOptions};
