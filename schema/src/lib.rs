//! The slug trace format: `trace.capnp` events, the `.slog` endpoint log container and the trace directory.
