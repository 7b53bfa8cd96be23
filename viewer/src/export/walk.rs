//! The streaming pass both exporters share: events frame by frame, transfers paired into flows
//! (each end taken from the log of that end when both logged it), perf lanes binned into counter
//! values, and [`Lanes`], which spreads overlapping slices over tracks so every track's slices
//! nest.

use std::collections::HashMap;

use slug_schema::{MpiTable, MpiTransfer};

use crate::error::Result;
use crate::state::event::{
    EbpfKind, EndpointIx, Nanos, SoftwareKind, TimeRange, TraceEvent, Transfer,
};
use crate::state::source::TraceSource;

/// Number of counter bins across the trace for the perf lanes.
const LANE_BINS: u64 = 2_000;

/// What the exporters are told, in log order per endpoint.
#[derive(Debug)]
pub enum Item<'a> {
    /// An event of `endpoint`'s log other than a transfer.
    Event(EndpointIx, &'a TraceEvent),
    /// The sending end of a transfer, as the sender logged it when it did: a slice from post to
    /// the sender's completion on the source endpoint, where the flow starts.
    Send(&'a Transfer),
    /// The receiving end, as the receiver logged it when it did: a slice from post to arrival on
    /// the destination endpoint, where the flow ends.
    Recv(&'a Transfer),
    /// A binned perf-lane value for `endpoint`: lane name, bin start, value.
    Lane(EndpointIx, &'static str, Nanos, f64),
}

/// How transfer `x` travelled over MPI, when it is an `mpi` transfer and `table` is the
/// recording's MPI table ([`TraceSource::mpi`]): both exports put this beside its slice.
pub fn mpi_of<'a>(table: Option<&'a MpiTable>, x: &Transfer) -> Option<MpiTransfer<'a>> {
    if x.record.transport != slug_schema::Transport::Mpi {
        return None;
    }
    let link = slug_schema::TransferKey::unpack(x.id()).link;
    table?.transfer(link, x.bytes())
}

/// The numeric arguments of an MPI transfer's slice (beside `communicator`): the ranks, the
/// header's tag and, for a transfer larger than the inline limit, the payload's; the first
/// `n` entries of the array count.
pub fn mpi_numbers(m: &MpiTransfer<'_>) -> ([(&'static str, u64); 4], usize) {
    let numbers = [
        ("source_rank", u64::from(m.source_rank)),
        ("dest_rank", u64::from(m.dest_rank)),
        ("tag", u64::from(m.tag)),
        ("payload_tag", u64::from(m.payload_tag.unwrap_or(0))),
    ];
    (numbers, if m.payload_tag.is_some() { 4 } else { 3 })
}

/// How an eBPF event shows on its thread's track in both exports: its categories (the kind's
/// name, then the probe's: `ebpf,off-cpu`) and whether it is an instant (else a slice from `ns`
/// to `end_ns()`). Off-CPU intervals and slow syscalls are slices; migrations, page faults,
/// syscall histograms and TCP retransmits and drops are instants.
pub fn ebpf_track_shape(kind: EbpfKind) -> (&'static str, bool) {
    let instant = !matches!(kind, EbpfKind::OffCpu | EbpfKind::Syscall);
    let cats = match kind {
        EbpfKind::Syscall => "ebpf,syscall",
        EbpfKind::OffCpu => "ebpf,off-cpu",
        EbpfKind::PageFault => "ebpf,page-fault",
        EbpfKind::Migration => "ebpf,migration",
        EbpfKind::SyscallHistogram => "ebpf,syscall-histogram",
        EbpfKind::TcpRetransmit => "ebpf,tcp-retransmit",
        EbpfKind::TcpDrop => "ebpf,tcp-drop",
    };
    (cats, instant)
}

/// The categories of a perf software record (an instant on its thread's track in both exports):
/// `perf_software,context-switch` or `perf_software,page-fault`.
pub fn software_categories(kind: SoftwareKind) -> &'static str {
    match kind {
        SoftwareKind::ContextSwitch => "perf_software,context-switch",
        SoftwareKind::PageFault => "perf_software,page-fault",
    }
}

/// Spreads slices over the fewest tracks ("lanes") on which none overlap, first fit in the
/// order they come: a lane's slices are disjoint and in time order, so its begin and end events
/// nest (Perfetto closes the last open slice of a track at each end) and its times never go
/// back. The synthetic trace's kernel spans (one per worker thread, side by side) and a stage's
/// overlapping sends and receives need this. At most [`Lanes::MAX`] lanes: past that (only a
/// pathological log), a slice joins the lane that frees first.
#[derive(Debug, Default)]
pub struct Lanes {
    ends: Vec<Nanos>,
}

impl Lanes {
    /// Most lanes one track group spreads over.
    pub const MAX: usize = 16;

    /// The lane for a slice from `start` to `end`.
    pub fn place(&mut self, start: Nanos, end: Nanos) -> usize {
        let end = end.max(start);
        if let Some(i) = self.ends.iter().position(|e| *e <= start) {
            self.ends[i] = end;
            return i;
        }
        if self.ends.len() < Self::MAX {
            self.ends.push(end);
            return self.ends.len() - 1;
        }
        let (i, _) = self
            .ends
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| **e)
            .unwrap_or((0, &0));
        self.ends[i] = self.ends[i].max(end);
        i
    }
}

#[derive(Debug, Default)]
struct Pending {
    transfer: Option<Transfer>,
    started: bool,
    ended: bool,
}

/// Walks every event of `source` once and calls `f` for each item; returns how many frames
/// could not be decoded (they are skipped, the rest is still exported).
pub fn walk(source: &dyn TraceSource, mut f: impl FnMut(Item<'_>) -> Result<()>) -> Result<u64> {
    let mut unreadable = 0;
    let extent: TimeRange = source.extent();
    let bin = (extent.len() / LANE_BINS).max(1_000);
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    for ep in 0..source.endpoints().len() {
        let mut lanes: [(&'static str, Vec<f64>); 3] = [
            ("samples", Vec::new()),
            ("page faults", Vec::new()),
            ("pt bytes", Vec::new()),
        ];
        for frame in 0..source.frames(ep).len() {
            let Ok(events) = source.frame_events(ep, frame) else {
                unreadable += 1;
                continue;
            };
            for e in events {
                let lane = match &e {
                    TraceEvent::PerfSample(p) => Some((0, p.ns, 1.0)),
                    TraceEvent::Ebpf(b) if b.kind == EbpfKind::PageFault => Some((1, b.ns, 1.0)),
                    TraceEvent::PerfSoftware(s) if s.kind == SoftwareKind::PageFault => {
                        Some((1, s.ns, 1.0))
                    }
                    TraceEvent::PtChunk(p) => Some((2, p.ns, p.size as f64)),
                    _ => None,
                };
                if let Some((i, t, v)) = lane {
                    let b = (t.saturating_sub(extent.start_ns) / bin) as usize;
                    let values = &mut lanes[i].1;
                    if values.len() <= b {
                        values.resize(b + 1, 0.0);
                    }
                    values[b] += v;
                }
                let TraceEvent::Transfer(x) = &e else {
                    f(Item::Event(ep, &e))?;
                    continue;
                };
                let p = pending.entry(x.id()).or_default();
                // Each end is taken from the log of the endpoint it happened on when that log has
                // it; a record from the other end only fills in at the end of the walk.
                if !p.started && !x.logged_by_receiver() {
                    p.started = true;
                    f(Item::Send(x))?;
                }
                if !p.ended && x.logged_by_receiver() {
                    p.ended = true;
                    f(Item::Recv(x))?;
                }
                if p.started && p.ended {
                    pending.remove(&x.id());
                } else if p.transfer.is_none() {
                    p.transfer = Some((**x).clone());
                }
            }
        }
        for (name, values) in &lanes {
            for (b, v) in values.iter().enumerate() {
                f(Item::Lane(ep, name, extent.start_ns + b as Nanos * bin, *v))?;
            }
        }
    }
    let mut rest: Vec<(u64, Pending)> = pending.into_iter().collect();
    rest.sort_by_key(|(id, _)| *id);
    for (_, p) in rest {
        if let Some(x) = &p.transfer {
            if !p.started {
                f(Item::Send(x))?;
            }
            if !p.ended {
                f(Item::Recv(x))?;
            }
        }
    }
    Ok(unreadable)
}

#[cfg(test)]
mod tests {
    use super::Lanes;

    #[test]
    fn lanes_keep_each_lane_disjoint_and_in_order() {
        let mut lanes = Lanes::default();
        // Four threads' spans side by side, then the next kernel after all of them.
        assert_eq!(lanes.place(10, 50), 0);
        assert_eq!(lanes.place(12, 40), 1);
        assert_eq!(lanes.place(11, 60), 2);
        assert_eq!(lanes.place(50, 70), 0, "lane 0 is free again at its end");
        assert_eq!(lanes.place(60, 80), 1);
        assert_eq!(
            lanes.place(5, 8),
            3,
            "a slice before every lane's end opens a lane"
        );
    }

    #[test]
    fn lanes_stop_at_the_cap() {
        let mut lanes = Lanes::default();
        for i in 0..Lanes::MAX as u64 {
            assert_eq!(lanes.place(i, 1_000 + i), i as usize);
        }
        assert_eq!(lanes.place(100, 200), 0, "the lane that frees first");
        assert!(lanes.ends.len() == Lanes::MAX);
    }
}
