//! What the recorder keeps of each transfer: the payload policy and the transfer observer
//! that logs every transfer of an endpoint with its content hash (and payload, by policy).

use std::str::FromStr;
use std::sync::Arc;

use slug_schema::{
    Direction, Event, MigrationEvent, MoveRole, Transfer as TransferEvent, TransferKey, Transport,
};
use slug_transport::transfer::{StageMove, Transfer, TransferObserver, TransportKind};
use xxhash_rust::xxh3::xxh3_128;

use crate::endpoint::{EndpointRecorder, EndpointShared};

/// Which transfer payloads a recording stores (hashes are always recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PayloadPolicy {
    /// None: the pipeline replays from snapshots and the prompt.
    #[default]
    None,
    /// Only what crosses the pipeline's boundary: the tokens the last stage sends back to
    /// stage 0 (its output), enough to check a replay's result without re-running it.
    Boundary,
    /// Every transfer: any single stage can be replayed alone from its recorded inputs.
    All,
}

impl FromStr for PayloadPolicy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<PayloadPolicy, String> {
        match s {
            "none" => Ok(PayloadPolicy::None),
            "boundary" => Ok(PayloadPolicy::Boundary),
            "all" => Ok(PayloadPolicy::All),
            other => Err(format!(
                "unknown payload policy `{other}`; use none, boundary or all"
            )),
        }
    }
}

impl std::fmt::Display for PayloadPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PayloadPolicy::None => "none",
            PayloadPolicy::Boundary => "boundary",
            PayloadPolicy::All => "all",
        })
    }
}

/// The transfer id the trace stores for `t` ([`TransferKey::pack`]).
pub(super) fn trace_transfer_id(t: &Transfer) -> u64 {
    TransferKey {
        link: t.id.link.0,
        seq: t.id.seq,
    }
    .pack()
}

pub(super) fn transport(kind: TransportKind) -> Transport {
    match kind {
        TransportKind::Local => Transport::Local,
        TransportKind::Shm => Transport::Shm,
        TransportKind::Tcp => Transport::Tcp,
        TransportKind::Mpi => Transport::Mpi,
        TransportKind::Rdma => Transport::Rdma,
    }
}

/// Logs every transfer of one endpoint with its content hash (and payload, by policy).
#[derive(Debug)]
pub struct TransferRecorder {
    pub(super) shared: Arc<EndpointShared>,
    /// On a node the observers own the recorder: the log closes when the stage drops them.
    pub(super) _recorder: Option<Arc<EndpointRecorder>>,
    pub(super) policy: PayloadPolicy,
    /// Tag layer of the token link (the model's layer count).
    pub(super) token_layer: u32,
}

impl TransferRecorder {
    fn record(&self, t: &Transfer, bytes: &[u8], direction: Direction) {
        let hash = xxh3_128(bytes);
        let wanted = match self.policy {
            PayloadPolicy::None => false,
            PayloadPolicy::Boundary => t.tag.layer == self.token_layer,
            PayloadPolicy::All => true,
        };
        let payload = (wanted && self.shared.store_payload(hash, bytes)).then_some(hash);
        self.shared.append(&Event::Transfer(TransferEvent {
            id: trace_transfer_id(t),
            src_endpoint: t.src.endpoint.0,
            dst_endpoint: t.dst.endpoint.0,
            src_arena: t.src.arena.0,
            dst_arena: t.dst.arena.0,
            src_offset: t.src.offset,
            dst_offset: t.dst.offset,
            len: t.len,
            hash,
            post_ns: t.post_ns,
            complete_ns: t.complete_ns,
            transport: transport(t.transport),
            direction,
            payload,
        }));
    }
}

impl TransferObserver for TransferRecorder {
    fn posted(&self, transfer: &Transfer, bytes: &[u8]) {
        self.record(transfer, bytes, Direction::Send);
    }

    fn completed(&self, transfer: &Transfer, bytes: &[u8]) {
        self.record(transfer, bytes, Direction::Recv);
    }

    fn stage_moved(&self, mark: &StageMove) {
        self.shared.append(&Event::Migration(MigrationEvent {
            stage: mark.stage,
            step: mark.at_step,
            index: mark.index,
            role: if mark.arrived {
                MoveRole::Arrived
            } else {
                MoveRole::Left
            },
            peer: mark.peer,
            ns: crate::perf::monotonic_ns(),
        }));
    }
}
