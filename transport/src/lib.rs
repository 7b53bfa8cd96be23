//! Registered arenas, the `Transport` trait and its backends, and the pipeline runtime.
