//! Registered arenas, the transfer hook, the link backends (local, shm, tcp) and the pipeline runtime.
//!
//! # Moving bytes
//! A transfer moves `len` bytes from an offset of a registered arena on one endpoint to an
//! offset of a registered arena on another: arenas are registered once (every pipeline stage
//! registers its whole [`slug_kernels::StageArena`] as [`pipeline::STAGE_ARENA`]) and transfers
//! name places by offset, so nothing is allocated per tensor. [`link::LinkEnd::send`] and
//! [`link::LinkEnd::recv`] are the only way bytes cross between endpoints; the backends behind
//! them ([`link::SendBackend`], [`link::RecvBackend`]) only move bytes, and the link end always
//! calls the endpoint's [`transfer::TransferObserver`]s (post on the sender, completion on the receiver, with the
//! bytes), so a recorder cannot miss a transfer. Ids are deterministic (link, sequence number);
//! post and complete times are `CLOCK_MONOTONIC` nanoseconds of the respective node.
//!
//! Backends (modules under [`link`]; the traits there are where a new one plugs in):
//! - `local` ([`link::ring`]): stages are threads; each link is a slot ring in a heap [`fabric::Fabric`].
//! - `shm` ([`link::ring`], [`link::shm`]): stages are processes; the rings live in one memory-mapped fabric file (pooled fabric
//!   memory); waits spin briefly, yield, then sleep on a futex in bounded slices.
//!
//! On both ring backends a receiver that is already waiting posts its arena in the ring header
//! and the sender copies straight into it (one copy: `memcpy` between threads,
//! `process_vm_writev` between processes); otherwise, or where the kernel refuses cross-process
//! copies, the bytes queue in slots (two copies) in pieces of at most 64 KiB.
//! - `tcp` ([`link::tcp`]): stages are processes on any hosts; every connection starts with a handshake
//!   ([`auth`]): protocol version and stage ids in a clear hello, then a Noise `NNpsk0` handshake
//!   (the cluster key, or for data links the run's secret, as pre-shared key; the key never
//!   crosses the wire) and an NTP-style clock-offset estimate. Control frames are sealed
//!   afterwards; data links carry a keyed BLAKE3 MAC per transfer unless
//!   [`link::LinkIntegrity::None`] is chosen.
//!
//! # Running the pipeline
//! [`pipeline::run`] runs a [`pipeline::PipelineConfig`] (model, stages, transport, threads,
//! microbatches, prompts, tokens, hosts) and returns a [`pipeline::RunReport`]. The runtime lives
//! here, not in the binary, because `slug run`, the recorder and the replayer all drive it; they
//! plug in through [`pipeline::ObserverFactory`] (transfer observers plus the kernels' hooks,
//! a stage's arena and cursor at every step boundary, and the state a stage starts from).
//! [`inject`] flips one bit of one kernel output on request (`--inject`), to test replays.
//! [`node::serve`] is the server behind `slug node --listen`.
//!
//! Errors are [`TransportError`]; a failing stage or link ends a run within bounded time with
//! [`TransportError::StageFailed`], naming the stage, its host and the step it reached.

pub mod auth;
pub mod clock;
pub mod error;
pub mod fabric;
pub mod inject;
pub mod link;
pub mod mpi_wire;
pub mod pipeline;
pub mod transfer;
mod wire;

pub use error::{Result, TransportError};
pub use pipeline::node;
pub use wire::AbortFlag;
