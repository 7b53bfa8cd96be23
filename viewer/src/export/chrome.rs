//! Chrome JSON trace export (`{"traceEvents": [...]}`): one process per endpoint; kernel slices
//! as complete (`X`) events on a `kernels` thread per endpoint (tid 1, then 2, 3, ... when spans
//! overlap, named `kernels 2`, ...), each with `step`, `seq` and (inside a layer) `layer`;
//! transfers as a `send` slice from post to the sender's completion on the sender's `transfers`
//! thread and a `recv` slice from post to arrival on the receiver's, joined by a flow (`s` / `f`
//! bound to the enclosing slice); counters for the perf lanes and recorded counters; instants for
//! steps, snapshots, losses and markers; and per OS thread with perf software records or eBPF
//! events a thread (tid `OS_TID_BASE + tid`) holding its off-CPU intervals and slow syscalls as
//! slices and the rest as instants.
//!
//! Times are microseconds with nanosecond decimals, as the format requires. The JSON is written
//! by hand into a reused buffer (no value tree per event), which is what makes a 10M-event
//! export fast.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::Path;

use serde_json::Value;

use crate::error::{Result, ViewerError};
use crate::export::ExportSummary;
use crate::export::walk::{
    Item, Lanes, ebpf_track_shape, mpi_numbers, mpi_of, software_categories, walk,
};
use crate::state::event::{EndpointIx, EventKind, Names, Nanos, TraceEvent, Transfer};
use crate::state::source::TraceSource;
use crate::state::system;

/// Thread id of the first transfers pseudo-thread of each endpoint.
pub const TRANSFERS_TID: u64 = 0;
/// Thread id of the first kernels pseudo-thread of each endpoint (lane n is `KERNELS_TID + n`).
pub const KERNELS_TID: u64 = 1;
/// Thread id of the second transfers pseudo-thread (lane n > 0 is `TRANSFER_LANES_TID + n`).
pub const TRANSFER_LANES_TID: u64 = 100;
/// Added to an OS thread id to make the Chrome tid of its thread track (lane n adds `n` times
/// more).
pub const OS_TID_BASE: u64 = 1 << 32;
/// Buffered JSON written to the output at once.
const FLUSH_BYTES: usize = 256 << 10;

fn pid(ep: EndpointIx) -> u64 {
    ep as u64 + 1
}

/// Appends `v` in decimal.
fn push_u64(buf: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// Appends nanoseconds as microseconds: `1234.567`.
fn push_us(buf: &mut Vec<u8>, ns: Nanos) {
    push_u64(buf, ns / 1_000);
    let frac = ns % 1_000;
    if frac != 0 {
        buf.push(b'.');
        buf.extend_from_slice(&[
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
    }
}

/// Appends `s` as a JSON string (quotes, backslashes and control characters escaped).
fn push_str(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    let mut from = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        buf.extend_from_slice(&s.as_bytes()[from..i]);
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            buf.extend_from_slice(b"\\u00");
            buf.push(HEX[usize::from(b >> 4)]);
            buf.push(HEX[usize::from(b & 0xf)]);
        } else {
            buf.extend_from_slice(esc);
        }
        from = i + 1;
    }
    buf.extend_from_slice(&s.as_bytes()[from..]);
    buf.push(b'"');
}

/// An argument value.
enum Arg<'a> {
    Uint(u64),
    Str(&'a str),
}

struct Writer<'a> {
    out: &'a mut dyn Write,
    buf: Vec<u8>,
    names: &'a Names,
    /// The manifest's MPI table, for the MPI arguments of transfers.
    mpi: Option<&'a slug_schema::MpiTable>,
    first: bool,
    summary: ExportSummary,
    named_threads: HashSet<(EndpointIx, u64)>,
    kernel_lanes: Vec<Lanes>,
    transfer_lanes: Vec<Lanes>,
    thread_lanes: std::collections::HashMap<(EndpointIx, u32), Lanes>,
}

impl Writer<'_> {
    /// Starts an event: the separator and `{"ph":PH,"pid":P`.
    fn open(&mut self, ph: &str, ep: EndpointIx) {
        if !std::mem::take(&mut self.first) {
            self.buf.extend_from_slice(b",\n");
        }
        self.buf.extend_from_slice(b"{\"ph\":\"");
        self.buf.extend_from_slice(ph.as_bytes());
        self.buf.extend_from_slice(b"\",\"pid\":");
        push_u64(&mut self.buf, pid(ep));
    }

    fn key(&mut self, k: &str) {
        self.buf.extend_from_slice(b",\"");
        self.buf.extend_from_slice(k.as_bytes());
        self.buf.extend_from_slice(b"\":");
    }

    fn str_field(&mut self, k: &str, v: &str) {
        self.key(k);
        push_str(&mut self.buf, v);
    }

    fn u64_field(&mut self, k: &str, v: u64) {
        self.key(k);
        push_u64(&mut self.buf, v);
    }

    fn us_field(&mut self, k: &str, ns: Nanos) {
        self.key(k);
        push_us(&mut self.buf, ns);
    }

    /// `,"args":{...}}`: closes the event.
    fn args_and_close(&mut self, args: &[(&str, Arg<'_>)]) -> Result<()> {
        if !args.is_empty() {
            self.key("args");
            self.buf.push(b'{');
            for (i, (k, v)) in args.iter().enumerate() {
                if i > 0 {
                    self.buf.push(b',');
                }
                push_str(&mut self.buf, k);
                self.buf.push(b':');
                match v {
                    Arg::Uint(n) => push_u64(&mut self.buf, *n),
                    Arg::Str(s) => push_str(&mut self.buf, s),
                }
            }
            self.buf.push(b'}');
        }
        self.buf.push(b'}');
        if self.buf.len() >= FLUSH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.out
            .write_all(&self.buf)
            .map_err(|e| ViewerError::io("the Chrome JSON output", e))?;
        self.buf.clear();
        Ok(())
    }

    fn thread(&mut self, ep: EndpointIx, tid: u64, name: impl FnOnce() -> String) -> Result<()> {
        if self.named_threads.insert((ep, tid)) {
            self.summary.tracks += 1;
            let name = name();
            self.open("M", ep);
            self.u64_field("tid", tid);
            self.str_field("name", "thread_name");
            self.args_and_close(&[("name", Arg::Str(&name))])?;
        }
        Ok(())
    }

    /// A complete (`X`) event.
    fn slice(
        &mut self,
        ep: EndpointIx,
        tid: u64,
        name: &str,
        cats: &str,
        (start, end): (Nanos, Nanos),
        args: &[(&str, Arg<'_>)],
    ) -> Result<()> {
        self.open("X", ep);
        self.u64_field("tid", tid);
        self.str_field("name", name);
        self.str_field("cat", cats);
        self.us_field("ts", start);
        self.us_field("dur", end.saturating_sub(start));
        self.args_and_close(args)
    }

    /// One end of a transfer: its slice and its flow event, bound to the slice.
    fn transfer(&mut self, x: &Transfer, send: bool) -> Result<()> {
        let ep = if send { x.src } else { x.dst };
        let (start, end) = (x.post(), x.complete().max(x.post()));
        let Some(lanes) = self.transfer_lanes.get_mut(ep) else {
            return Ok(());
        };
        let lane = lanes.place(start, end) as u64;
        let tid = if lane == 0 {
            TRANSFERS_TID
        } else {
            TRANSFER_LANES_TID + lane
        };
        self.thread(ep, tid, || {
            if lane == 0 {
                "transfers".to_string()
            } else {
                format!("transfers {}", lane + 1)
            }
        })?;
        if send {
            self.summary.flows += 1;
        }
        let key = slug_schema::TransferKey::unpack(x.id()).to_string();
        let cat = EventKind::Transfer.name();
        let mut args = Vec::with_capacity(9);
        args.extend([
            ("transfer", Arg::Str(&key)),
            ("id", Arg::Uint(x.id())),
            ("bytes", Arg::Uint(x.bytes())),
            ("transport", Arg::Str(x.record.transport.name())),
        ]);
        if let Some(m) = &mpi_of(self.mpi, x) {
            args.push(("communicator", Arg::Str(m.communicator)));
            let (numbers, n) = mpi_numbers(m);
            args.extend(numbers[..n].iter().map(|&(k, v)| (k, Arg::Uint(v))));
        }
        self.slice(
            ep,
            tid,
            if send { "send" } else { "recv" },
            cat,
            (start, end),
            &args,
        )?;
        self.open(if send { "s" } else { "f" }, ep);
        self.u64_field("tid", tid);
        self.str_field("name", "transfer");
        self.str_field("cat", cat);
        self.u64_field("id", x.id());
        self.us_field("ts", start);
        if !send {
            // Bound to the enclosing slice (the recv slice starting here), not the next one.
            self.str_field("bp", "e");
        }
        self.args_and_close(&[])
    }

    /// A perf software record or eBPF event on its OS thread's track.
    fn system(
        &mut self,
        ep: EndpointIx,
        tid: u32,
        (start, end, instant): (Nanos, Nanos, bool),
        cats: &str,
        name: &str,
        fields: &[(&'static str, String)],
    ) -> Result<()> {
        let lane = if instant {
            0
        } else {
            self.thread_lanes
                .entry((ep, tid))
                .or_default()
                .place(start, end) as u64
        };
        let chrome_tid = OS_TID_BASE * (1 + lane) + u64::from(tid);
        self.thread(ep, chrome_tid, || {
            if lane == 0 {
                format!("thread {tid}")
            } else {
                format!("thread {tid} ({})", lane + 1)
            }
        })?;
        self.summary.system += 1;
        let args: Vec<(&str, Arg<'_>)> = fields.iter().map(|(k, v)| (*k, Arg::Str(v))).collect();
        if instant {
            self.open("i", ep);
            self.u64_field("tid", chrome_tid);
            self.str_field("s", "t");
            self.str_field("name", name);
            self.str_field("cat", cats);
            self.us_field("ts", start);
            self.args_and_close(&args)
        } else {
            self.slice(ep, chrome_tid, name, cats, (start, end), &args)
        }
    }

    fn counter(&mut self, ep: EndpointIx, name: &str, ts: Nanos, value: f64) -> Result<()> {
        self.summary.counters += 1;
        self.open("C", ep);
        self.str_field("name", name);
        self.us_field("ts", ts);
        self.key("args");
        self.buf.extend_from_slice(b"{\"value\":");
        // serde_json writes a finite number as JSON does, and null for NaN and infinities.
        serde_json::to_writer(&mut self.buf, &value)
            .map_err(|e| ViewerError::io("the Chrome JSON output", std::io::Error::other(e)))?;
        self.buf.push(b'}');
        self.args_and_close(&[])
    }

    fn item(&mut self, item: Item<'_>) -> Result<()> {
        match item {
            Item::Send(x) => self.transfer(x, true),
            Item::Recv(x) => self.transfer(x, false),
            Item::Lane(ep, name, t, v) => self.counter(ep, name, t, v),
            Item::Event(ep, e) => match e {
                TraceEvent::KernelSpan(k) => {
                    let end = k.end_ns.max(k.start_ns);
                    let Some(lanes) = self.kernel_lanes.get_mut(ep) else {
                        return Ok(());
                    };
                    let lane = lanes.place(k.start_ns, end) as u64;
                    self.thread(ep, KERNELS_TID + lane, || {
                        if lane == 0 {
                            "kernels".to_string()
                        } else {
                            format!("kernels {}", lane + 1)
                        }
                    })?;
                    self.summary.slices += 1;
                    let mut args = [
                        ("step", Arg::Uint(k.step)),
                        ("seq", Arg::Uint(u64::from(k.seq))),
                        ("layer", Arg::Uint(0)),
                    ];
                    // A kernel outside every layer (embedding, head, argmax) has no `layer`.
                    let n = match k.layer {
                        Some(layer) => {
                            args[2].1 = Arg::Uint(u64::from(layer));
                            3
                        }
                        None => 2,
                    };
                    let names = self.names;
                    self.slice(
                        ep,
                        KERNELS_TID + lane,
                        names.get(k.kernel),
                        EventKind::KernelSpan.name(),
                        (k.start_ns, end),
                        &args[..n],
                    )
                }
                TraceEvent::Counter(c) => {
                    let names = self.names;
                    self.counter(ep, names.get(c.name), c.ns, c.value as f64)
                }
                TraceEvent::Ebpf(s) => {
                    let (cats, instant) = ebpf_track_shape(s.kind);
                    let mut fields = Vec::new();
                    system::describe_ebpf(s, &mut fields);
                    let label = system::ebpf_label(s);
                    self.system(
                        ep,
                        s.tid,
                        (s.ns, s.end_ns(), instant),
                        cats,
                        &label,
                        &fields,
                    )
                }
                TraceEvent::PerfSoftware(s) => {
                    let mut fields = Vec::new();
                    system::describe_software(s, &mut fields);
                    self.system(
                        ep,
                        s.tid,
                        (s.ns, s.ns, true),
                        software_categories(s.kind),
                        s.kind.name(),
                        &fields,
                    )
                }
                TraceEvent::PerfSample(_) | TraceEvent::PtChunk(_) | TraceEvent::Transfer(_) => {
                    Ok(())
                }
                TraceEvent::Migration(m) => {
                    self.summary.instants += 1;
                    let (r, label) = (&m.record, e.label(self.names));
                    self.open("i", ep);
                    self.u64_field("tid", TRANSFERS_TID);
                    self.str_field("s", "p");
                    self.str_field("name", &label);
                    self.str_field("cat", e.kind().name());
                    self.us_field("ts", r.ns);
                    self.args_and_close(&[
                        ("stage", Arg::Uint(u64::from(r.stage))),
                        ("step", Arg::Uint(r.step)),
                        ("move", Arg::Uint(u64::from(r.index))),
                        ("role", Arg::Str(m.role())),
                        ("peer_endpoint", Arg::Uint(u64::from(r.peer))),
                    ])
                }
                TraceEvent::StepBoundary(_)
                | TraceEvent::Snapshot(_)
                | TraceEvent::LostEvents(_)
                | TraceEvent::Marker(_) => {
                    self.summary.instants += 1;
                    let label = e.label(self.names);
                    self.open("i", ep);
                    self.u64_field("tid", TRANSFERS_TID);
                    self.str_field("s", "p");
                    self.str_field("name", &label);
                    self.str_field("cat", e.kind().name());
                    self.us_field("ts", e.start());
                    self.args_and_close(&[])
                }
            },
        }
    }
}

/// Writes `source` as Chrome JSON.
pub fn write(source: &dyn TraceSource, out: &mut dyn Write) -> Result<ExportSummary> {
    let endpoints = source.endpoints().len();
    let mut w = Writer {
        out,
        buf: Vec::with_capacity(FLUSH_BYTES + 4096),
        names: source.names(),
        mpi: source.mpi(),
        first: true,
        summary: ExportSummary::default(),
        named_threads: HashSet::new(),
        kernel_lanes: (0..endpoints).map(|_| Lanes::default()).collect(),
        transfer_lanes: (0..endpoints).map(|_| Lanes::default()).collect(),
        thread_lanes: std::collections::HashMap::new(),
    };
    w.buf
        .extend_from_slice(b"{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n");
    for (ep, info) in source.endpoints().iter().enumerate() {
        w.open("M", ep);
        w.str_field("name", "process_name");
        w.args_and_close(&[("name", Arg::Str(&info.name))])?;
    }
    let unreadable = walk(source, |item| w.item(item))?;
    w.buf.extend_from_slice(b"\n]}\n");
    w.flush()?;
    Ok(ExportSummary {
        unreadable_frames: unreadable,
        ..w.summary
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_written_json_matches_serde() {
        for s in ["gemm", "a\"b\\c", "tab\there\nnl", "\u{1}\u{1f}", "ünï €"] {
            let mut buf = Vec::new();
            push_str(&mut buf, s);
            let back: String = serde_json::from_slice(&buf).expect("valid JSON string");
            assert_eq!(back, s);
        }
        for (ns, text) in [
            (0, "0"),
            (1, "0.001"),
            (1_000, "1"),
            (1_234_567, "1234.567"),
        ] {
            let mut buf = Vec::new();
            push_us(&mut buf, ns);
            assert_eq!(String::from_utf8(buf).unwrap(), text);
        }
        let mut buf = Vec::new();
        push_u64(&mut buf, u64::MAX);
        assert_eq!(buf, u64::MAX.to_string().as_bytes());
    }
}
