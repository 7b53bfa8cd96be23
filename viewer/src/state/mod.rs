//! The viewer's model, kept apart from drawing: events (the schema's, on the trace-global
//! clock) and what eBPF records mean, sources, the timeline window, filters, statistics, the
//! divergence report, and the interactive state of the app.

pub mod app;
pub mod divergence;
pub mod event;
pub mod filter;
#[cfg(test)]
pub(crate) mod fixture;
pub mod source;
pub mod stats;
pub mod system;
pub mod timeline;
