//! Per-endpoint recorder: event rings, background writer, perf streams, eBPF probes and snapshots.
