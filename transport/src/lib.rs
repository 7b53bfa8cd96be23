//! Registered arenas, the `Transport` trait and its backends, and the pipeline runtime.

pub mod auth;
pub mod clock;
pub mod error;
pub mod fabric;
pub mod link;
pub mod node;
pub mod pipeline;
pub mod transfer;
mod wire;

pub use error::{Result, TransportError};
pub use wire::AbortFlag;
