//! Chrome JSON trace export (`{"traceEvents": [...]}`): one process per endpoint, a kernels
//! thread per endpoint (kernel slices as complete events), a transfers thread carrying flow
//! start/end events, counters for the perf lanes, instants for steps, snapshots, losses, markers,
//! and per OS thread with eBPF events a thread (tid `OS_TID_BASE + tid`) holding its off-CPU
//! intervals and slow syscalls as slices and its migrations as instants.
//! Times are microseconds, as the format requires.

use std::io::{Read, Write};
use std::path::Path;

use serde_json::{Value, json};

use crate::error::{Result, ViewerError};
use crate::export::ExportSummary;
use crate::export::walk::{Item, ebpf_track_shape, walk};
use crate::state::event::{
    EndpointIx, EventKind, Names, Nanos, TraceEvent, Transfer, format_bytes,
};
use crate::state::source::TraceSource;
use crate::state::system;

/// Thread id of the transfers pseudo-thread of each endpoint.
pub const TRANSFERS_TID: u64 = 0;
/// Thread id of the kernels pseudo-thread of each endpoint.
pub const KERNELS_TID: u64 = 1;
/// Added to an OS thread id to make the Chrome tid of its eBPF thread-state track.
pub const OS_TID_BASE: u64 = 1 << 32;

fn us(t: Nanos) -> f64 {
    t as f64 / 1_000.0
}

fn pid(ep: EndpointIx) -> u64 {
    ep as u64 + 1
}

struct Writer<'a> {
    out: &'a mut dyn Write,
    names: &'a Names,
    first: bool,
    summary: ExportSummary,
    named_threads: std::collections::HashSet<(EndpointIx, u64)>,
}

impl Writer<'_> {
    fn emit(&mut self, v: &Value) -> Result<()> {
        let io = |e| ViewerError::io("the Chrome JSON output", e);
        if !std::mem::take(&mut self.first) {
            self.out.write_all(b",\n").map_err(io)?;
        }
        serde_json::to_writer(&mut *self.out, v).map_err(|e| io(std::io::Error::other(e)))
    }

    fn thread(&mut self, ep: EndpointIx, tid: u64, name: String) -> Result<()> {
        if self.named_threads.insert((ep, tid)) {
            self.summary.tracks += 1;
            self.emit(&json!({"ph": "M", "name": "thread_name", "pid": pid(ep), "tid": tid, "args": {"name": name}}))?;
        }
        Ok(())
    }

    fn flow(&mut self, x: &Transfer, start: bool) -> Result<()> {
        let (ep, t, ph, verb) = if start {
            (x.src, x.post(), "s", "send")
        } else {
            (x.dst, x.complete().max(x.post()), "f", "recv")
        };
        self.thread(ep, TRANSFERS_TID, "transfers".to_string())?;
        let name = format!("{verb} #{} {}", x.id(), format_bytes(x.bytes()));
        // The flow binds to the instant slice on the same thread at the same time.
        self.emit(&json!({"ph": "X", "name": name, "cat": EventKind::Transfer.name(), "pid": pid(ep), "tid": TRANSFERS_TID,
            "ts": us(t), "dur": 0, "args": {"id": x.id(), "bytes": x.bytes()}}))?;
        let mut flow = json!({"ph": ph, "name": "transfer", "cat": EventKind::Transfer.name(), "id": x.id(), "pid": pid(ep),
            "tid": TRANSFERS_TID, "ts": us(t)});
        if !start {
            flow["bp"] = json!("e");
        } else {
            self.summary.flows += 1;
        }
        self.emit(&flow)
    }

    fn item(&mut self, item: Item<'_>) -> Result<()> {
        match item {
            Item::FlowStart(x) => self.flow(x, true),
            Item::FlowEnd(x) => self.flow(x, false),
            Item::Lane(ep, name, t, v) => {
                self.summary.counters += 1;
                self.emit(&json!({"ph": "C", "name": name, "pid": pid(ep), "ts": us(t), "args": {"value": v}}))
            }
            Item::Event(ep, e) => match e {
                TraceEvent::KernelSpan(k) => {
                    self.thread(ep, KERNELS_TID, "kernels".to_string())?;
                    self.summary.slices += 1;
                    let mut args = json!({"step": k.step, "seq": k.seq});
                    // A kernel outside every layer (embedding, head, argmax) has no `layer`.
                    if let Some(layer) = k.layer {
                        args["layer"] = json!(layer);
                    }
                    self.emit(&json!({"ph": "X", "name": self.names.get(k.kernel), "cat": EventKind::KernelSpan.name(),
                        "pid": pid(ep), "tid": KERNELS_TID, "ts": us(k.start_ns), "dur": us(k.end_ns.saturating_sub(k.start_ns)),
                        "args": args}))
                }
                TraceEvent::Counter(c) => {
                    self.summary.counters += 1;
                    self.emit(&json!({"ph": "C", "name": self.names.get(c.name), "pid": pid(ep), "ts": us(c.ns), "args": {"value": c.value}}))
                }
                TraceEvent::Ebpf(s) => {
                    let tid = OS_TID_BASE + u64::from(s.tid);
                    let Some((cat, instant)) = ebpf_track_shape(s.kind) else {
                        return Ok(());
                    };
                    self.thread(ep, tid, format!("thread {} (eBPF)", s.tid))?;
                    let mut args = serde_json::Map::new();
                    let mut fields = Vec::new();
                    system::describe_ebpf(s, &mut fields);
                    for (k, v) in fields {
                        args.insert(k.to_string(), Value::String(v));
                    }
                    let name = system::ebpf_label(s);
                    if instant {
                        self.summary.instants += 1;
                        self.emit(&json!({"ph": "i", "s": "t", "name": name, "cat": cat,
                            "pid": pid(ep), "tid": tid, "ts": us(s.ns), "args": args}))
                    } else {
                        self.summary.slices += 1;
                        self.emit(&json!({"ph": "X", "name": name, "cat": cat, "pid": pid(ep),
                            "tid": tid, "ts": us(s.ns), "dur": us(s.end_ns().saturating_sub(s.ns)), "args": args}))
                    }
                }
                TraceEvent::PerfSample(_)
                | TraceEvent::PtChunk(_)
                | TraceEvent::PerfSoftware(_)
                | TraceEvent::Transfer(_) => Ok(()),
                TraceEvent::Migration(m) => {
                    self.summary.instants += 1;
                    let r = &m.record;
                    self.emit(&json!({"ph": "i", "s": "p", "name": e.label(self.names), "cat": e.kind().name(),
                        "pid": pid(ep), "tid": TRANSFERS_TID, "ts": us(r.ns),
                        "args": {"stage": r.stage, "step": r.step, "move": r.index, "role": m.role(),
                            "peer_endpoint": r.peer}}))
                }
                TraceEvent::StepBoundary(_)
                | TraceEvent::Snapshot(_)
                | TraceEvent::LostEvents(_)
                | TraceEvent::Marker(_) => {
                    self.summary.instants += 1;
                    self.emit(
                        &json!({"ph": "i", "s": "p", "name": e.label(self.names), "cat": e.kind().name(),
                        "pid": pid(ep), "tid": TRANSFERS_TID, "ts": us(e.start())}),
                    )
                }
            },
        }
    }
}

/// Writes `source` as Chrome JSON.
pub fn write(source: &dyn TraceSource, out: &mut dyn Write) -> Result<ExportSummary> {
    let io = |e| ViewerError::io("the Chrome JSON output", e);
    out.write_all(b"{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n")
        .map_err(io)?;
    let mut w = Writer {
        out,
        names: source.names(),
        first: true,
        summary: ExportSummary::default(),
        named_threads: std::collections::HashSet::new(),
    };
    for (ep, info) in source.endpoints().iter().enumerate() {
        w.emit(&json!({"ph": "M", "name": "process_name", "pid": pid(ep), "args": {"name": info.name}}))?;
    }
    let unreadable = walk(source, |item| w.item(item))?;
    let summary = ExportSummary {
        unreadable_frames: unreadable,
        ..w.summary
    };
    out.write_all(b"\n]}\n").map_err(io)?;
    Ok(summary)
}

/// Reads the `traceEvents` of a Chrome JSON file (gunzipping when the name ends in `.gz`).
pub fn read_events(path: &Path) -> Result<Vec<Value>> {
    let io = |e| ViewerError::io(path.display().to_string(), e);
    let file = std::fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .map_err(io)?;
    } else {
        std::io::BufReader::new(file)
            .read_to_string(&mut text)
            .map_err(io)?;
    }
    let doc: Value = serde_json::from_str(&text).map_err(|e| ViewerError::MalformedExport {
        format: "Chrome JSON",
        offset: e.column(),
        reason: e.to_string(),
    })?;
    match doc.get("traceEvents") {
        Some(Value::Array(events)) => Ok(events.clone()),
        _ => Err(ViewerError::MalformedExport {
            format: "Chrome JSON",
            offset: 0,
            reason: "no traceEvents array".to_string(),
        }),
    }
}
