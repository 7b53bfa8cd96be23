//! The streaming pass both exporters share: events frame by frame, transfers paired into flows
//! (each end taken from the log of that end when both logged it), and perf lanes binned into
//! counter values.

use std::collections::HashMap;

use crate::error::Result;
use crate::state::event::{
    EbpfKind, EndpointIx, EventKind, Nanos, SoftwareKind, TimeRange, TraceEvent, Transfer,
};
use crate::state::source::TraceSource;

/// Number of counter bins across the trace for the perf lanes.
const LANE_BINS: u64 = 2_000;

/// What the exporters are told, in log order per endpoint.
#[derive(Debug)]
pub enum Item<'a> {
    /// An event of `endpoint`'s log other than a transfer.
    Event(EndpointIx, &'a TraceEvent),
    /// The sending end of a flow, at the post time on the source endpoint.
    FlowStart(&'a Transfer),
    /// The receiving end of a flow, at the completion time on the destination endpoint.
    FlowEnd(&'a Transfer),
    /// A binned perf-lane value for `endpoint`: lane name, bin start, value.
    Lane(EndpointIx, &'static str, Nanos, f64),
}

/// How an eBPF event shows on its thread's track in both exports: its categories (the kind's
/// name, then the probe's: `ebpf,off-cpu`) and whether it is an instant (else a slice from `ns`
/// to `end_ns()`); `None` for the probes only the lanes carry (page faults) or no export shows
/// (syscall histograms).
pub fn ebpf_track_shape(kind: EbpfKind) -> Option<(String, bool)> {
    let instant = match kind {
        EbpfKind::OffCpu | EbpfKind::Syscall => false,
        EbpfKind::Migration | EbpfKind::TcpRetransmit | EbpfKind::TcpDrop => true,
        EbpfKind::PageFault | EbpfKind::SyscallHistogram => return None,
    };
    Some((
        format!("{},{}", EventKind::Ebpf.name(), kind.name()),
        instant,
    ))
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
                    f(Item::FlowStart(x))?;
                }
                if !p.ended && x.logged_by_receiver() {
                    p.ended = true;
                    f(Item::FlowEnd(x))?;
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
                f(Item::FlowStart(x))?;
            }
            if !p.ended {
                f(Item::FlowEnd(x))?;
            }
        }
    }
    Ok(unreadable)
}
