//! Whole-trace statistics for the stats view: where each endpoint's time went, what each link
//! achieved, how long steps took, and which stage is the pipeline's bottleneck.
//!
//! Computed in one pass over every frame (the only whole-trace read the viewer does, and only
//! when the stats view is opened).

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::error::Result;
use crate::state::event::{EbpfKind, EndpointIx, EventKind, Nanos, TraceEvent};
use crate::state::source::TraceSource;
use crate::state::system::{syscall_name, waited_on};

/// Where one endpoint's time went: its setup (from its first event to its first pipeline work,
/// the earliest kernel span, transfer or step boundary: weight generation, warm-up), then its
/// steady state (from there to its last event), which every share, table and total below
/// describes, so they are the pipeline's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndpointStats {
    /// Which endpoint.
    pub endpoint: EndpointIx,
    /// Time from the endpoint's first event to its first pipeline work (0 when it has none).
    pub setup: Nanos,
    /// Steady-state time: from the first pipeline work (else the first event) to the last event.
    pub active: Nanos,
    /// Time inside at least one kernel.
    pub compute: Nanos,
    /// Time with a transfer to or from the endpoint in flight and no kernel running.
    pub waiting: Nanos,
    /// The rest of `active`.
    pub idle: Nanos,
    /// Kernel spans seen.
    pub kernels: u64,
    /// Distinct steps it marked (a step's microbatches each log a boundary; they count once).
    pub steps: u64,
    /// Time and calls per kernel name, most time first.
    pub kernel_totals: Vec<KernelTotal>,
    /// What its threads waited on off the CPU (eBPF), most time first.
    pub waits: Vec<WaitTotal>,
    /// Its threads' syscalls by name (eBPF), most time first.
    pub syscalls: Vec<SyscallTotal>,
    /// Times a thread of it moved CPU (eBPF).
    pub migrations: u64,
    /// Of those, moves to another NUMA node.
    pub numa_migrations: u64,
    /// TCP retransmits on its threads' sockets (eBPF).
    pub tcp_retransmits: u64,
    /// Packets of its threads' sockets the kernel dropped (eBPF).
    pub tcp_drops: u64,
}

/// One kernel's spans on one endpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelTotal {
    /// Kernel name (`q_proj`, `gate`, `down`, ...).
    pub name: String,
    /// Spans of it.
    pub calls: u64,
    /// Their total length.
    pub total: Nanos,
}

impl EndpointStats {
    /// The endpoint's busy time: the sum of its kernel spans over all its threads (more than
    /// `compute`, the wall time with any kernel running, when threads run kernels in parallel).
    pub fn kernel_time(&self) -> Nanos {
        self.kernel_totals
            .iter()
            .fold(0, |sum: Nanos, k| sum.saturating_add(k.total))
    }

    /// Share of the endpoint's busy time ([`EndpointStats::kernel_time`]) spent in `k`, 0..=1.
    pub fn busy_share(&self, k: &KernelTotal) -> f64 {
        match self.kernel_time() {
            0 => 0.0,
            busy => k.total as f64 / busy as f64,
        }
    }
}

/// Off-CPU time of one endpoint's threads for one reason.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WaitTotal {
    /// `preempted`, `blocked`, or the syscall it blocked in (`futex`, `recvmsg`, ...).
    pub on: String,
    /// Off-CPU intervals.
    pub intervals: u64,
    /// Their total length.
    pub total: Nanos,
}

/// One syscall's calls by an endpoint's threads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SyscallTotal {
    /// Syscall name.
    pub name: String,
    /// Calls (exact above the recorder's threshold, histogram counts below it).
    pub calls: u64,
    /// Time in it: exact for slow calls, the log2 bucket's midpoint for histogram counts.
    pub approx_total: Nanos,
}

impl EndpointStats {
    /// Share of steady-state time in `part`, 0..=1.
    pub fn share(&self, part: Nanos) -> f64 {
        if self.active == 0 {
            0.0
        } else {
            part as f64 / self.active as f64
        }
    }
}

/// What one link (src → dst) carried.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkStats {
    /// Sender.
    pub src: EndpointIx,
    /// Receiver.
    pub dst: EndpointIx,
    /// Distinct transfers.
    pub transfers: u64,
    /// Bytes carried.
    pub bytes: u64,
    /// Time with at least one transfer in flight.
    pub busy: Nanos,
    /// Sum of post→complete latencies.
    pub latency_sum: Nanos,
}

/// Distribution of step times. A step is a distinct step number; its time runs from its earliest
/// boundary on any endpoint to the earliest boundary of the next step, so the last step has none.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepTimes {
    /// Distinct steps in the trace.
    pub steps: u64,
    /// Step durations, sorted ascending (one per step but the last).
    pub sorted: Vec<Nanos>,
}

impl StepTimes {
    /// The q-quantile (0..=1) of step time, nearest rank.
    pub fn quantile(&self, q: f64) -> Option<Nanos> {
        if self.sorted.is_empty() {
            return None;
        }
        let rank = ((self.sorted.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        self.sorted.get(rank).copied()
    }

    /// Counts of steps in `buckets` equal-width bins between the fastest and slowest step.
    pub fn histogram(&self, buckets: usize) -> Vec<u64> {
        let mut out = vec![0; buckets.max(1)];
        let (Some(&lo), Some(&hi)) = (self.sorted.first(), self.sorted.last()) else {
            return out;
        };
        let width = (hi - lo).max(1) as f64 / out.len() as f64;
        for &d in &self.sorted {
            let b = (((d - lo) as f64) / width) as usize;
            let last = out.len() - 1;
            out[b.min(last)] += 1;
        }
        out
    }
}

/// Stages whose compute time is within this fraction of the busiest one's are tied with it.
pub const TIE_TOLERANCE: f64 = 0.05;

/// Which stage sets the pipeline's pace.
#[derive(Clone, Debug, PartialEq)]
pub enum Bottleneck<'a> {
    /// No kernel spans in the trace.
    None,
    /// One stage computes more than every other by over [`TIE_TOLERANCE`].
    One(&'a EndpointStats),
    /// The busiest stages, within [`TIE_TOLERANCE`] of each other, busiest first.
    Tied(Vec<&'a EndpointStats>),
}

/// The stats view's model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TraceStats {
    /// One entry per endpoint, manifest order.
    pub endpoints: Vec<EndpointStats>,
    /// Links with traffic, sorted by (src, dst).
    pub links: Vec<LinkStats>,
    /// Step-time distribution.
    pub steps: StepTimes,
    /// Frames that could not be decoded and were left out.
    pub unreadable_frames: u64,
}

impl TraceStats {
    /// The endpoint with the most compute time: the stage the pipeline waits on. When others
    /// compute within [`TIE_TOLERANCE`] of it, no single stage sets the pace: `Tied` names them.
    pub fn bottleneck(&self) -> Bottleneck<'_> {
        let mut busy: Vec<&EndpointStats> =
            self.endpoints.iter().filter(|e| e.compute > 0).collect();
        busy.sort_by_key(|e| (std::cmp::Reverse(e.compute), e.endpoint));
        let Some(top) = busy.first() else {
            return Bottleneck::None;
        };
        let floor = top.compute as f64 * (1.0 - TIE_TOLERANCE);
        let tied: Vec<&EndpointStats> = busy
            .iter()
            .copied()
            .filter(|e| e.compute as f64 >= floor)
            .collect();
        if tied.len() > 1 {
            Bottleneck::Tied(tied)
        } else {
            Bottleneck::One(top)
        }
    }

    /// Reads every frame of `source` once and computes the statistics.
    pub fn compute(source: &dyn TraceSource) -> Result<Self> {
        let n = source.endpoints().len();
        let mut out = TraceStats::default();
        let mut seen_transfers: HashSet<u64> = HashSet::new();
        let mut link_busy: HashMap<(EndpointIx, EndpointIx), IntervalSet> = HashMap::new();
        let mut link_stats: HashMap<(EndpointIx, EndpointIx), LinkStats> = HashMap::new();
        let mut waits: Vec<IntervalSet> = (0..n).map(|_| IntervalSet::default()).collect();
        let mut computes: Vec<IntervalSet> = (0..n).map(|_| IntervalSet::default()).collect();
        let mut step_starts: BTreeMap<u64, Nanos> = BTreeMap::new();
        let mut steady_starts: Vec<Nanos> = Vec::with_capacity(n);
        for (ep, compute) in computes.iter_mut().enumerate() {
            let mut st = EndpointStats {
                endpoint: ep,
                ..EndpointStats::default()
            };
            let mut waits_by: HashMap<String, (u64, Nanos)> = HashMap::new();
            let mut calls_by: HashMap<String, (u64, Nanos)> = HashMap::new();
            let mut kernels_by: HashMap<u32, (u64, Nanos)> = HashMap::new();
            let mut steps_seen: HashSet<u64> = HashSet::new();
            let frames = source.frames(ep);
            let first = frames.iter().map(|f| f.range.start_ns).min().unwrap_or(0);
            let last = frames.iter().map(|f| f.range.end_ns).max().unwrap_or(0);
            let steady = first_pipeline_work(source, ep)
                .unwrap_or(first)
                .clamp(first, last.max(first));
            st.setup = steady - first;
            st.active = last.saturating_sub(steady);
            steady_starts.push(steady);
            for (i, f) in frames.iter().enumerate() {
                let wanted = [
                    EventKind::KernelSpan,
                    EventKind::Transfer,
                    EventKind::StepBoundary,
                    EventKind::Ebpf,
                ];
                if wanted.iter().all(|k| f.counts.get(*k) == 0) {
                    continue;
                }
                let Ok(events) = source.frame_events(ep, i) else {
                    out.unreadable_frames += 1;
                    continue;
                };
                for e in events {
                    match e {
                        TraceEvent::KernelSpan(k) => {
                            st.kernels += 1;
                            compute.push(k.start_ns, k.end_ns);
                            let t = kernels_by.entry(k.kernel).or_default();
                            t.0 += 1;
                            t.1 = t.1.saturating_add(k.end_ns.saturating_sub(k.start_ns));
                        }
                        TraceEvent::StepBoundary(s) => {
                            st.steps += u64::from(steps_seen.insert(s.step));
                            let slot = step_starts.entry(s.step).or_insert(s.ns);
                            *slot = (*slot).min(s.ns);
                        }
                        TraceEvent::Transfer(x) => {
                            let (a, b) = (x.post(), x.complete().max(x.post()));
                            for side in [x.src, x.dst] {
                                if let Some(w) = waits.get_mut(side) {
                                    w.push(a, b);
                                }
                            }
                            if seen_transfers.insert(x.id()) {
                                let l =
                                    link_stats
                                        .entry((x.src, x.dst))
                                        .or_insert_with(|| LinkStats {
                                            src: x.src,
                                            dst: x.dst,
                                            ..LinkStats::default()
                                        });
                                l.transfers += 1;
                                l.bytes += x.bytes();
                                l.latency_sum += b - a;
                                link_busy.entry((x.src, x.dst)).or_default().push(a, b);
                            }
                        }
                        // What threads did during setup would skew the steady-state tables.
                        TraceEvent::Ebpf(s) if s.ns < steady => {}
                        TraceEvent::Ebpf(s) => match s.kind {
                            EbpfKind::OffCpu => {
                                let w = waits_by
                                    .entry(waited_on(&s).unwrap_or_default())
                                    .or_default();
                                w.0 += 1;
                                w.1 = w.1.saturating_add(s.arg0);
                            }
                            EbpfKind::Syscall => {
                                let c = calls_by.entry(syscall_name(s.arg0)).or_default();
                                c.0 += 1;
                                c.1 = c.1.saturating_add(s.arg2);
                            }
                            EbpfKind::SyscallHistogram => {
                                let c = calls_by.entry(syscall_name(s.arg0)).or_default();
                                c.0 = c.0.saturating_add(s.arg2);
                                let mid = 3u64 << (s.arg1 & 0xff).min(61) >> 1;
                                c.1 = c.1.saturating_add(s.arg2.saturating_mul(mid));
                            }
                            EbpfKind::TcpRetransmit => st.tcp_retransmits += 1,
                            EbpfKind::TcpDrop => st.tcp_drops += 1,
                            EbpfKind::Migration => {
                                st.migrations += 1;
                                st.numa_migrations += u64::from(s.arg2 == 1);
                            }
                            _ => {}
                        },
                        _ => {}
                    }
                }
                // Fold each frame's intervals in so memory holds unions, not raw events.
                compute.flush();
                waits.iter_mut().for_each(IntervalSet::flush);
                link_busy.values_mut().for_each(IntervalSet::flush);
            }
            st.waits = waits_by
                .into_iter()
                .map(|(on, (intervals, total))| WaitTotal {
                    on,
                    intervals,
                    total,
                })
                .collect();
            st.waits
                .sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.on.cmp(&b.on)));
            st.kernel_totals = kernels_by
                .into_iter()
                .map(|(id, (calls, total))| KernelTotal {
                    name: source.names().get(id).to_string(),
                    calls,
                    total,
                })
                .collect();
            st.kernel_totals
                .sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.name.cmp(&b.name)));
            st.syscalls = calls_by
                .into_iter()
                .map(|(name, (calls, approx_total))| SyscallTotal {
                    name,
                    calls,
                    approx_total,
                })
                .collect();
            st.syscalls.sort_by(|a, b| {
                b.approx_total
                    .cmp(&a.approx_total)
                    .then_with(|| a.name.cmp(&b.name))
            });
            out.endpoints.push(st);
        }
        for ((st, steady), (compute, wait)) in out
            .endpoints
            .iter_mut()
            .zip(steady_starts)
            .zip(computes.iter_mut().zip(&mut waits))
        {
            let (compute, wait) = (clip(compute.spans(), steady), clip(wait.spans(), steady));
            st.compute = total(&compute);
            st.waiting = total(&wait) - overlap_total(&compute, &wait);
            st.idle = st.active.saturating_sub(st.compute + st.waiting);
        }
        for (key, mut l) in link_stats {
            l.busy = link_busy.get_mut(&key).map_or(0, |set| total(set.spans()));
            out.links.push(l);
        }
        out.links.sort_by_key(|l| (l.src, l.dst));
        let starts: Vec<Nanos> = step_starts.values().copied().collect();
        let mut durations: Vec<Nanos> = starts
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]))
            .collect();
        durations.sort_unstable();
        out.steps = StepTimes {
            steps: step_starts.len() as u64,
            sorted: durations,
        };
        Ok(out)
    }
}

/// When `ep`'s pipeline work began: the earliest kernel span, transfer or step boundary of the
/// first frame holding any (frames are in time order); `None` when it logged none or that frame
/// cannot be read. Weight generation and warm-up before it log only system events.
fn first_pipeline_work(source: &dyn TraceSource, ep: EndpointIx) -> Option<Nanos> {
    let work = [
        EventKind::KernelSpan,
        EventKind::Transfer,
        EventKind::StepBoundary,
    ];
    let frame = source
        .frames(ep)
        .iter()
        .position(|f| work.iter().any(|k| f.counts.get(*k) > 0))?;
    source
        .frame_events(ep, frame)
        .ok()?
        .iter()
        .filter(|e| work.contains(&e.kind()))
        .map(TraceEvent::start)
        .min()
}

/// The parts of sorted, disjoint `spans` from `from` on.
fn clip(spans: &[(Nanos, Nanos)], from: Nanos) -> Vec<(Nanos, Nanos)> {
    spans
        .iter()
        .filter(|(_, b)| *b > from)
        .map(|&(a, b)| (a.max(from), b))
        .collect()
}

/// A union of disjoint, sorted intervals, fed in batches that mostly arrive in time order.
#[derive(Debug, Default)]
struct IntervalSet {
    spans: Vec<(Nanos, Nanos)>,
    pending: Vec<(Nanos, Nanos)>,
}

impl IntervalSet {
    fn push(&mut self, a: Nanos, b: Nanos) {
        if b > a {
            self.pending.push((a, b));
        }
    }

    /// Merges the pending intervals in; only the tail of the set they can touch is re-merged.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let batch = union(std::mem::take(&mut self.pending));
        let first = batch[0].0;
        let cut = self.spans.partition_point(|s| s.1 < first);
        let mut tail = self.spans.split_off(cut);
        tail.extend(batch);
        self.spans.extend(union(tail));
    }

    fn spans(&mut self) -> &[(Nanos, Nanos)] {
        self.flush();
        &self.spans
    }
}

fn union(mut list: Vec<(Nanos, Nanos)>) -> Vec<(Nanos, Nanos)> {
    list.sort_unstable();
    let mut out: Vec<(Nanos, Nanos)> = Vec::with_capacity(list.len());
    for (a, b) in list {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn total(list: &[(Nanos, Nanos)]) -> Nanos {
    list.iter().map(|(a, b)| b - a).sum()
}

/// Total time shared by two sorted, disjoint interval lists.
fn overlap_total(x: &[(Nanos, Nanos)], y: &[(Nanos, Nanos)]) -> Nanos {
    let (mut i, mut j, mut sum) = (0, 0, 0);
    while i < x.len() && j < y.len() {
        let a = x[i].0.max(y[j].0);
        let b = x[i].1.min(y[j].1);
        if b > a {
            sum += b - a;
        }
        if x[i].1 < y[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_set_merges_batches_in_any_order() {
        let mut set = IntervalSet::default();
        set.push(10, 20);
        set.push(0, 5);
        set.flush();
        set.push(18, 30);
        set.push(40, 50);
        set.flush();
        set.push(3, 12);
        assert_eq!(set.spans(), &[(0, 30), (40, 50)]);
    }

    #[test]
    fn fixture_shares_and_bottleneck() {
        let src = crate::state::fixture::pipeline(3, 5, 16);
        let stats = TraceStats::compute(&src).expect("computes");
        let s1 = &stats.endpoints[1];
        // Stage 1 computes 250us per 1ms step (its gemm is 150us), waits 20us per transfer.
        assert_eq!(s1.kernels, 20);
        assert_eq!(s1.compute, 5 * 250_000);
        assert_eq!(s1.waiting, 2 * 5 * 20_000);
        assert!(matches!(stats.bottleneck(), Bottleneck::One(b) if b.endpoint == 1));
        assert_eq!(s1.steps, 5);
        assert_eq!(stats.steps.steps, 5);
        assert_eq!(stats.links.len(), 2);
        assert_eq!(stats.links[0].transfers, 5);
        assert_eq!(stats.links[0].busy, 5 * 20_000);
        assert_eq!(stats.steps.sorted, vec![1_000_000; 4]);
        // Per kernel: stage 1's gemm is 150us x 5 steps, 60% of its 250us busy time per step.
        let gemm = &s1.kernel_totals[0];
        assert_eq!(
            (gemm.name.as_str(), gemm.calls, gemm.total),
            ("gemm", 5, 750_000)
        );
        assert!((s1.busy_share(gemm) - 0.6).abs() < 1e-9);
        assert_eq!(s1.kernel_totals.len(), 4);
        let shares: f64 = s1.kernel_totals.iter().map(|k| s1.busy_share(k)).sum();
        assert!(
            (shares - 1.0).abs() < 1e-9,
            "kernels do not overlap in the fixture"
        );
    }

    #[test]
    fn setup_before_the_first_step_is_apart_from_the_steady_state() {
        use crate::state::event::{EbpfEvent, KernelSpan, TraceEvent};
        use slug_schema::StepBoundary;
        const MS: Nanos = 1_000_000;
        let kernel = |start: Nanos, end: Nanos, step| {
            TraceEvent::KernelSpan(KernelSpan {
                kernel: 0,
                layer: Some(0),
                step,
                seq: 0,
                rows: 1,
                start_ns: start,
                end_ns: end,
                output_hash: None,
            })
        };
        let off_cpu = |ns: Nanos, len: Nanos| {
            TraceEvent::Ebpf(EbpfEvent {
                kind: EbpfKind::OffCpu,
                pid: 1,
                tid: 1,
                cpu: 0,
                arg0: len,
                arg1: 1,
                arg2: 0,
                ns,
            })
        };
        let boundary = |ns, step| TraceEvent::StepBoundary(StepBoundary { ns, step, seq: 0 });
        // 100 ms of weight generation (blocked 60 ms of it), then two 100 ms steps computing
        // 50 ms each.
        let events = vec![
            off_cpu(0, 10 * MS),
            off_cpu(20 * MS, 60 * MS),
            boundary(100 * MS, 0),
            kernel(100 * MS, 150 * MS, 0),
            off_cpu(150 * MS, 10 * MS),
            boundary(200 * MS, 1),
            kernel(200 * MS, 250 * MS, 1),
            boundary(300 * MS, 2),
        ];
        let src = crate::state::source::MemorySource::new(
            crate::state::fixture::endpoints(1),
            vec![events],
            3,
        );
        let stats = TraceStats::compute(&src).expect("computes");
        let e = &stats.endpoints[0];
        assert_eq!(e.setup, 100 * MS);
        assert_eq!(e.active, 200 * MS);
        assert_eq!(e.compute, 100 * MS);
        assert!(
            (e.share(e.compute) - 0.5).abs() < 1e-9,
            "half of the steady state"
        );
        assert_eq!(e.kernels, 2);
        assert_eq!(e.kernel_totals[0].total, 100 * MS);
        assert_eq!(e.waits.len(), 1);
        assert_eq!(e.waits[0].total, 10 * MS, "the setup's blocks are left out");
    }

    #[test]
    fn tied_stages_name_no_bottleneck() {
        let ep = |endpoint, compute| EndpointStats {
            endpoint,
            compute,
            ..EndpointStats::default()
        };
        let mut stats = TraceStats {
            endpoints: vec![ep(0, 1_000), ep(1, 980), ep(2, 960), ep(3, 500)],
            ..TraceStats::default()
        };
        match stats.bottleneck() {
            Bottleneck::Tied(t) => {
                assert_eq!(t.iter().map(|e| e.endpoint).collect::<Vec<_>>(), [0, 1, 2]);
            }
            other => panic!("{other:?}"),
        }
        // 5% and a bit apart: one stage is the bottleneck.
        stats.endpoints[1].compute = 949;
        stats.endpoints[2].compute = 900;
        assert!(matches!(stats.bottleneck(), Bottleneck::One(b) if b.endpoint == 0));
        stats.endpoints.iter_mut().for_each(|e| e.compute = 0);
        assert_eq!(stats.bottleneck(), Bottleneck::None);
    }

    #[test]
    fn microbatch_boundaries_count_one_step() {
        use crate::state::event::TraceEvent;
        use slug_schema::StepBoundary;
        // Two stages, 3 steps of 4 microbatches each: every microbatch logs a boundary.
        let mut events = crate::state::fixture::pipeline_events(2, 3);
        for (ep, evs) in events.iter_mut().enumerate() {
            for step in 0..3u64 {
                for seq in 1..4u32 {
                    evs.push(TraceEvent::StepBoundary(StepBoundary {
                        ns: step * 1_000_000 + ep as u64 * 1_000 + u64::from(seq) * 10,
                        step,
                        seq,
                    }));
                }
            }
        }
        let src = crate::state::source::MemorySource::new(
            crate::state::fixture::endpoints(2),
            events,
            16,
        );
        let stats = TraceStats::compute(&src).expect("computes");
        assert_eq!(stats.endpoints[0].steps, 3, "12 boundaries, 3 steps");
        assert_eq!(stats.steps.steps, 3);
        assert_eq!(stats.steps.sorted, vec![1_000_000; 2]);
    }

    #[test]
    fn interval_algebra() {
        let u = union(vec![(5, 10), (0, 3), (2, 6), (20, 25)]);
        assert_eq!(u, vec![(0, 10), (20, 25)]);
        assert_eq!(total(&u), 15);
        assert_eq!(overlap_total(&u, &[(8, 22)]), 4);
    }

    #[test]
    fn step_quantiles_and_histogram() {
        let s = StepTimes {
            steps: 6,
            sorted: vec![10, 10, 10, 20, 100],
        };
        assert_eq!(s.quantile(0.5), Some(10));
        assert_eq!(s.quantile(1.0), Some(100));
        assert_eq!(s.histogram(3), vec![4, 0, 1]);
    }
}
