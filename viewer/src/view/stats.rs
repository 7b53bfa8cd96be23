//! The stats view: per endpoint its setup time (before its first step) apart from its steady
//! state, and the steady state's compute / waiting / idle shares, per-link achieved bandwidth, the
//! step-time distribution, the bottleneck stage, and per stage each kernel's time, calls and
//! share of the stage's busy time.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::text::Line;
use ratatui::widgets::{Paragraph, Widget};

use crate::state::event::{format_bandwidth, format_bytes, format_duration};
use crate::state::source::EndpointInfo;
use crate::state::stats::{Bottleneck, TIE_TOLERANCE, TraceStats};
use crate::view::style;

/// The stats view.
#[derive(Debug)]
pub struct StatsView<'a> {
    stats: &'a TraceStats,
    endpoints: &'a [EndpointInfo],
}

impl<'a> StatsView<'a> {
    /// A view of `stats` naming endpoints from `endpoints`.
    pub fn new(stats: &'a TraceStats, endpoints: &'a [EndpointInfo]) -> Self {
        Self { stats, endpoints }
    }

    fn name(&self, ep: usize) -> &str {
        self.endpoints.get(ep).map_or("?", |e| e.name.as_str())
    }

    /// The view's text, one line per row.
    pub fn lines(&self) -> Vec<Line<'static>> {
        let s = self.stats;
        let mut out = vec![
            Line::styled(
                "steady state (first kernel, transfer or step on); setup before it apart",
                style::DIM,
            ),
            Line::styled(
                "endpoint          setup   steady  compute  waiting     idle  kernels  steps",
                style::DIM,
            ),
        ];
        for e in &s.endpoints {
            out.push(Line::raw(format!(
                "{:<14} {:>8} {:>8} {:>7.1}% {:>7.1}% {:>7.1}% {:>8} {:>6}",
                self.name(e.endpoint),
                format_duration(e.setup),
                format_duration(e.active),
                100.0 * e.share(e.compute),
                100.0 * e.share(e.waiting),
                100.0 * e.share(e.idle),
                e.kernels,
                e.steps
            )));
        }
        out.push(Line::raw(""));
        out.extend(self.wait_lines());
        out.push(Line::raw(""));
        out.push(Line::styled(
            "link            transfers      bytes   achieved  mean latency",
            style::DIM,
        ));
        for l in &s.links {
            out.push(Line::raw(format!(
                "{:<14} {:>10} {:>10} {:>10} {:>12}",
                format!("{}>{}", self.name(l.src), self.name(l.dst)),
                l.transfers,
                format_bytes(l.bytes),
                format_bandwidth(l.bytes, l.busy),
                format_duration(l.latency_sum / l.transfers.max(1)),
            )));
        }
        if s.links.is_empty() {
            out.push(Line::raw("(no transfers)"));
        }
        out.push(Line::raw(""));
        let q = |x| {
            s.steps
                .quantile(x)
                .map_or_else(|| "-".to_string(), format_duration)
        };
        out.push(Line::raw(format!(
            "step time over {} steps, {} measured (start of a step to start of the next):",
            s.steps.steps,
            s.steps.sorted.len(),
        )));
        out.push(Line::raw(format!(
            "  min {}  p50 {}  p90 {}  p99 {}  max {}",
            q(0.0),
            q(0.5),
            q(0.9),
            q(0.99),
            q(1.0)
        )));
        let hist = s.steps.histogram(24);
        let max = hist.iter().copied().max().unwrap_or(0) as f64;
        let bars: String = hist.iter().map(|n| style::bar(*n as f64, max)).collect();
        out.push(Line::raw(format!("distribution  [{bars}]")));
        out.push(Line::raw(""));
        out.push(match s.bottleneck() {
            Bottleneck::One(b) => Line::raw(format!(
                "bottleneck: {} (computes {:.1}% of its time; the pipeline runs at its pace)",
                self.name(b.endpoint),
                100.0 * b.share(b.compute)
            )),
            Bottleneck::Tied(tied) => Line::raw(format!(
                "bottleneck: no single bottleneck (stages within {:.0}%: {})",
                100.0 * TIE_TOLERANCE,
                tied.iter()
                    .map(|e| self.name(e.endpoint))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Bottleneck::None => Line::raw("bottleneck: none (no kernel spans in the trace)"),
        });
        if s.unreadable_frames > 0 {
            out.push(Line::styled(
                format!(
                    "{} frames could not be decoded and are left out",
                    s.unreadable_frames
                ),
                style::MESSAGE,
            ));
        }
        out.push(Line::raw(""));
        out.extend(self.kernel_lines());
        out
    }
}

impl StatsView<'_> {
    /// Per stage, each kernel's total time, calls and share of the stage's busy time.
    fn kernel_lines(&self) -> Vec<Line<'static>> {
        let mut out = vec![Line::styled(
            "kernel              time     calls  share of the stage's busy time",
            style::DIM,
        )];
        for e in &self.stats.endpoints {
            if e.kernel_totals.is_empty() {
                continue;
            }
            out.push(Line::raw(format!(
                "{} (busy {} over its threads; {} wall time with a kernel running)",
                self.name(e.endpoint),
                format_duration(e.kernel_time()),
                format_duration(e.compute)
            )));
            for k in &e.kernel_totals {
                out.push(Line::raw(format!(
                    "  {:<14} {:>8} {:>9} {:>6.1}%",
                    k.name,
                    format_duration(k.total),
                    k.calls,
                    100.0 * e.busy_share(k)
                )));
            }
        }
        if out.len() == 1 {
            out.push(Line::raw("(no kernel spans)"));
        }
        out
    }

    /// Where each endpoint waited and on what (eBPF off-CPU intervals), its busiest syscalls
    /// and its migrations.
    fn wait_lines(&self) -> Vec<Line<'static>> {
        let s = self.stats;
        let any = s.endpoints.iter().any(|e| {
            !e.waits.is_empty()
                || !e.syscalls.is_empty()
                || e.migrations + e.tcp_retransmits + e.tcp_drops > 0
        });
        if !any {
            return vec![Line::raw(
                "where stages waited: no eBPF events in this trace (record as root with --ebpf auto)",
            )];
        }
        let mut out = vec![Line::styled(
            "where each stage waited, off the CPU (eBPF), most time first",
            style::DIM,
        )];
        for e in &s.endpoints {
            let waits: Vec<String> = e
                .waits
                .iter()
                .take(4)
                .map(|w| format!("{} {} ({}x)", w.on, format_duration(w.total), w.intervals))
                .collect();
            out.push(Line::raw(format!(
                "{:<14} {}",
                self.name(e.endpoint),
                if waits.is_empty() {
                    "-".to_string()
                } else {
                    waits.join(", ")
                }
            )));
            if !e.syscalls.is_empty() {
                let calls: Vec<String> = e
                    .syscalls
                    .iter()
                    .take(4)
                    .map(|c| {
                        format!(
                            "{} {}x ~{}",
                            c.name,
                            c.calls,
                            format_duration(c.approx_total)
                        )
                    })
                    .collect();
                out.push(Line::raw(format!(
                    "{:<14} syscalls: {}",
                    "",
                    calls.join(", ")
                )));
            }
            if e.tcp_retransmits + e.tcp_drops > 0 {
                out.push(Line::raw(format!(
                    "{:<14} tcp: {} retransmits, {} drops",
                    "", e.tcp_retransmits, e.tcp_drops
                )));
            }
            if e.migrations > 0 {
                out.push(Line::raw(format!(
                    "{:<14} migrations: {} ({} to another NUMA node)",
                    "", e.migrations, e.numa_migrations
                )));
            }
        }
        out
    }
}

impl Widget for StatsView<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        Paragraph::new(self.lines()).render(area, buf);
    }
}
