//! Terminal timeline viewer over a trace (`slug view`), and export to Perfetto / Chrome JSON
//! (`slug export`).
//!
//! `state` holds the model (events, sources, timeline windows, statistics, app state) and `view`
//! draws it; `run` drives the terminal loop; `export` writes the two exchange formats.

#![forbid(unsafe_code)]

pub mod error;
pub mod export;
pub mod run;
pub mod state;
pub mod trace_dir;
pub mod view;

pub use error::{Result, ViewerError};
pub use trace_dir::TraceDirSource;
