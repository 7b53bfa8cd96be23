//! `slug info`: summarise a trace: endpoints, events per kind, sizes, losses, capabilities.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use slug_schema::{
    EndpointSummary, EventKind, FooterState, LogReader, LogSummary, Recovery, Trace, TraceSummary,
};

/// Every event kind's one name, as `slug info`, the viewer's `/kind:` filter and the exports'
/// categories use it, comma-separated.
pub fn kind_names() -> String {
    EventKind::ALL.map(EventKind::name).join(", ")
}

const EXAMPLES: &str = "\
Examples:
  slug info run1
      Endpoints, events per kind, the time span, what each part takes on disk (logs,
      snapshots, payloads), every loss with its reason and what to change, capabilities.
  slug info run1 --json
      The same as one JSON object (`disk` holds the parts, `losses` the reasons and fixes).
  slug info run1/endpoints/1.slog
      One endpoint log on its own.

On a killed recording it shows the logs as `slug recover` would rebuild them, without writing
into the trace.";

fn examples() -> String {
    format!(
        "{EXAMPLES}\n\nEvents per kind are counted under these names: {}.",
        kind_names()
    )
}

/// Arguments of `slug info`.
#[derive(Debug, Args)]
#[command(after_help = examples())]
pub struct InfoArgs {
    /// Trace directory (written by `slug record` or `slug demo`), or one endpoint log (`.slog`).
    pub trace: PathBuf,
    /// Print the summary as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Runs `slug info`. Exits 1 when a log cannot be opened at all; damage inside logs is reported.
pub fn execute(args: InfoArgs) -> Result<ExitCode> {
    if args.trace.is_file() {
        let summary = LogSummary::of(&LogReader::open(&args.trace)?);
        if args.json {
            let text = serde_json::to_string_pretty(&summary).context("serializing the summary")?;
            emit(&(text + "\n"))?;
        } else {
            emit(&render_log(&summary))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Validates the directory first, so a wrong path gets the trace's own clear error.
    let trace = Trace::open(&args.trace)?;
    let preview = rebuild_killed_recording(&args.trace);
    let logs = preview.as_ref().map(|p| p.logs.clone()).unwrap_or_default();
    let summary = TraceSummary::of_with_logs(&trace, &logs);
    let disk = DiskUsage::of(&args.trace);
    if args.json {
        let mut value = serde_json::to_value(&summary).context("serializing the summary")?;
        if let Some(o) = value.as_object_mut() {
            o.insert("disk".into(), serde_json::to_value(&disk)?);
            o.insert("losses".into(), serde_json::to_value(losses(&summary))?);
        }
        let text = serde_json::to_string_pretty(&value).context("serializing the summary")?;
        emit(&(text + "\n"))?;
    } else {
        emit(&render_with_disk(&summary, Some(&disk)))?;
    }
    Ok(if summary.all_logs_readable() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Writes `text` to stdout. A reader that went away (`slug info T | head`) is not an error:
/// the rest of the output is simply not wanted.
fn emit(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing the summary to stdout")
        }
        _ => Ok(()),
    }
}

/// The human-readable summary: a header block, then endpoint, kind and capability tables.
pub fn render(s: &TraceSummary) -> String {
    render_with_disk(s, Some(&DiskUsage::of(&s.dir)))
}

/// [`render`] with the directory's sizes measured by the caller (`None`: logs only).
fn render_with_disk(s: &TraceSummary, disk: Option<&DiskUsage>) -> String {
    let mut out = String::new();
    let span = s.time_span.map_or("-".to_owned(), |r| duration(r.len()));
    let kind = if s.synthetic { ", synthetic" } else { "" };
    let _ = writeln!(
        out,
        "trace       {}  (format {}{kind})",
        s.dir.display(),
        s.format_version
    );
    let _ = writeln!(
        out,
        "endpoints   {} on {} node{}",
        s.endpoints.len(),
        s.nodes,
        plural(s.nodes as u64)
    );
    let _ = writeln!(out, "time span   {span}  (reference clock)");
    let frames: u64 = s.endpoints.iter().map(|e| e.frames).sum();
    let _ = writeln!(
        out,
        "events      {} in {} frames",
        thousands(s.events),
        thousands(frames)
    );
    if let Some(d) = disk {
        let _ = writeln!(
            out,
            "on disk     {} in all: logs {}, snapshots {}, payloads {}, other {}{}",
            bytes(d.total),
            bytes(d.logs),
            bytes(d.snapshots),
            bytes(d.payloads),
            bytes(d.other),
            if d.complete {
                ""
            } else {
                " (not all counted: see --json's disk.note)"
            }
        );
    }
    on_disk(&mut out, "logs", s.bytes, s.raw_bytes, s.events);
    let _ = writeln!(
        out,
        "losses      {} event{} recorded lost, {} corrupt frame{} skipped, {} lost to truncation",
        thousands(s.lost_events),
        plural(s.lost_events),
        thousands(s.corrupt_frames),
        plural(s.corrupt_frames),
        bytes(s.truncated_bytes)
    );
    for l in losses(s) {
        let _ = writeln!(
            out,
            "  endpoint {}: {} lost: {}; {}",
            l.endpoint,
            thousands(l.events),
            l.reason,
            l.fix
        );
    }

    out.push_str("\nendpoints\n");
    let mut t = Table::new(&[
        "id", "node", "stage", "events", "span", "on disk", "B/event", "frames", "lost", "damage",
    ]);
    for e in &s.endpoints {
        t.row(vec![
            e.id.to_string(),
            e.node.clone(),
            e.stage.to_string(),
            thousands(e.events),
            e.time_span.map_or("-".to_owned(), |r| duration(r.len())),
            bytes(e.bytes),
            per_event(e.bytes, e.events),
            thousands(e.frames),
            thousands(e.lost_events),
            damage(e),
        ]);
    }
    out.push_str(&t.render(&[0, 2, 3, 4, 5, 6, 7, 8]));
    out.push_str(&moves(s));
    out.push_str(&mpi_links(s));

    out.push_str("\nevents per kind\n");
    out.push_str(&kind_table(&s.counts, s.events));

    out.push_str("\ncapabilities\n");
    if s.capabilities.is_empty() {
        out.push_str("  (none recorded)\n");
    } else {
        let yes = |b: bool| if b { "yes" } else { "no" }.to_owned();
        let mut t = Table::new(&["name", "requested", "available", "captured", "note"]);
        for c in &s.capabilities {
            t.row(vec![
                c.name.clone(),
                yes(c.requested),
                yes(c.available),
                yes(c.captured),
                c.reason.clone().unwrap_or_default(),
            ]);
        }
        out.push_str(&t.render(&[]));
    }
    out
}

/// The `on disk` line: bytes, bytes per event, and the size the same events take as raw records.
fn on_disk(out: &mut String, label: &str, on_disk: u64, raw_bytes: u64, events: u64) {
    let _ = writeln!(
        out,
        "{label:<12}{}  ({} B/event; raw 128-byte records: {}, {} smaller)",
        bytes(on_disk),
        per_event(on_disk, events),
        bytes(raw_bytes),
        ratio(raw_bytes, on_disk)
    );
}

/// The human-readable summary of a single endpoint log.
fn render_log(s: &LogSummary) -> String {
    let mut out = String::new();
    let span = s.time_span.map_or("-".to_owned(), |r| duration(r.len()));
    let _ = writeln!(out, "log         {}", s.path.display());
    let _ = writeln!(
        out,
        "endpoint    {}  (clock {})",
        s.endpoint,
        s.clock.name()
    );
    let _ = writeln!(out, "time span   {span}");
    let _ = writeln!(
        out,
        "events      {} in {} frames, {} strings",
        thousands(s.events),
        thousands(s.frames),
        thousands(s.strings)
    );
    on_disk(&mut out, "on disk", s.bytes, s.raw_bytes, s.events);
    let _ = writeln!(
        out,
        "lost        {} events recorded lost",
        thousands(s.lost_events)
    );
    let _ = writeln!(
        out,
        "damage      {}",
        damage_of(&s.recovery, s.undecodable_frames)
    );
    out.push_str("\nevents per kind\n");
    out.push_str(&kind_table(&s.counts, s.events));
    out
}

/// One line per stage that moved between nodes: the endpoint (and node) that ran each span of
/// its steps, in order; empty when no stage moved.
fn moves(s: &TraceSummary) -> String {
    let mut out = String::new();
    let mut stages: Vec<u32> = s
        .endpoints
        .iter()
        .filter(|e| e.continues.is_some())
        .map(|e| e.stage)
        .collect();
    stages.sort_unstable();
    stages.dedup();
    if stages.is_empty() {
        return out;
    }
    out.push_str("\nmoves (a moved stage's log continues in its new node's endpoint)\n");
    for stage in stages {
        let mut parts: Vec<&EndpointSummary> =
            s.endpoints.iter().filter(|e| e.stage == stage).collect();
        parts.sort_by_key(|e| e.steps.map_or(0, |r| r[0]));
        let spans: Vec<String> = parts
            .iter()
            .map(|e| {
                let steps = e
                    .steps
                    .map_or("all steps".to_string(), |[a, b]| format!("steps {a}..{b}"));
                format!("endpoint {} on {} {steps}", e.id, e.node)
            })
            .collect();
        out.push_str(&format!("  stage {stage}: {}\n", spans.join(", then ")));
    }
    out
}

/// The MPI table of a `--transport mpi` recording: the communicator, and per link its ranks
/// and tags, which every transfer event on the link used; empty for other recordings.
fn mpi_links(s: &TraceSummary) -> String {
    let Some(m) = &s.mpi else {
        return String::new();
    };
    let mut out = format!(
        "\nmpi links (communicator {})\n  a transfer of at most {} is one message with its \
         link's tag;\n  a larger one is a header with that tag, then its payload with the \
         payload tag\n  (`slug export` puts each transfer's communicator, ranks and tags on its \
         slices)\n",
        m.communicator,
        bytes(m.inline_limit)
    );
    let mut t = Table::new(&["link", "source rank", "dest rank", "tag", "payload tag"]);
    for l in &m.links {
        t.row(vec![
            l.link.to_string(),
            l.source_rank.to_string(),
            l.dest_rank.to_string(),
            l.header_tag.to_string(),
            l.payload_tag.to_string(),
        ]);
    }
    out.push_str(&t.render(&[0, 1, 2, 3, 4]));
    out
}

fn damage(e: &EndpointSummary) -> String {
    if let Some(err) = &e.error {
        return format!("UNREADABLE: {err}");
    }
    let log = e
        .recovery
        .map_or("-".into(), |r| damage_of(&r, e.undecodable_frames));
    if e.problems.is_empty() {
        return log;
    }
    let problems = e.problems.join("; ");
    if log == "none" {
        problems
    } else {
        format!("{log}; {problems}")
    }
}

fn damage_of(r: &Recovery, undecodable_frames: u64) -> String {
    let mut parts = Vec::new();
    match r.footer {
        FooterState::Valid => {}
        FooterState::Missing => parts.push("no footer (not closed)".to_owned()),
        FooterState::Corrupt => parts.push("footer corrupt".to_owned()),
    }
    if r.partial_frames > 0 {
        let events = if r.events_in_partial_frame > 0 {
            format!(" of {} events", thousands(r.events_in_partial_frame))
        } else {
            String::new()
        };
        parts.push(format!(
            "truncated: {} lost, 1 partial frame{events}",
            bytes(r.truncated_bytes)
        ));
    } else if r.truncated_bytes > 0 {
        parts.push(format!("torn footer: {}", bytes(r.truncated_bytes)));
    }
    if r.corrupt_frames > 0 {
        let undecodable = if undecodable_frames > 0 {
            format!(", {undecodable_frames} of them checksum-valid but undecodable")
        } else {
            String::new()
        };
        parts.push(format!(
            "{} corrupt frame{} ({}{undecodable})",
            r.corrupt_frames,
            plural(r.corrupt_frames),
            bytes(r.corrupt_bytes)
        ));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join("; ")
    }
}

fn kind_table(counts: &std::collections::BTreeMap<String, u64>, events: u64) -> String {
    let mut t = Table::new(&["kind", "events", "share"]);
    for k in EventKind::ALL {
        let n = counts.get(k.name()).copied().unwrap_or(0);
        let share = if events == 0 {
            0.0
        } else {
            n as f64 * 100.0 / events as f64
        };
        t.row(vec![
            k.name().to_owned(),
            thousands(n),
            format!("{share:.1}%"),
        ]);
    }
    t.render(&[1, 2])
}

/// A plain aligned text table.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders with two-space indent; columns listed in `right` are right-aligned.
    fn render(&self, right: &[usize]) -> String {
        let cols = self.rows[0].len();
        let width: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::from(" ");
            for (c, cell) in row.iter().enumerate() {
                let pad = width[c] - cell.chars().count();
                line.push(' ');
                if right.contains(&c) {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    if c + 1 < cols {
                        line.push_str(&" ".repeat(pad));
                    }
                }
                line.push(' ');
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Bytes with a binary unit.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Nanoseconds with a readable unit.
pub fn duration(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns} ns"),
        1_000..1_000_000 => format!("{:.1} µs", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} ms", ns as f64 / 1e6),
        _ => format!("{:.3} s", ns as f64 / 1e9),
    }
}

fn per_event(bytes: u64, events: u64) -> String {
    if events == 0 {
        "-".into()
    } else {
        format!("{:.2}", bytes as f64 / events as f64)
    }
}

fn ratio(raw: u64, disk: u64) -> String {
    if disk == 0 || raw == 0 {
        "-".into()
    } else {
        format!("{:.1}x", raw as f64 / disk as f64)
    }
}

/// What a trace directory holds on disk, by part. Files are counted by `lstat`: links are
/// never followed, and the walk is bounded (a hostile trace cannot make it endless).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DiskUsage {
    /// Endpoint logs (`endpoints/*.slog`).
    pub logs: u64,
    /// Snapshot indexes and chunks (`snapshots/`).
    pub snapshots: u64,
    /// Stored transfer payloads (`payloads/`).
    pub payloads: u64,
    /// Everything else: the manifest, node reports, a killed recording's journals and rings.
    pub other: u64,
    /// All of it.
    pub total: u64,
    /// False when the walk stopped at its bounds or could not read a directory (see `note`).
    pub complete: bool,
    /// Why not everything was counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Entries the size walk visits at most, and how deep it goes.
const MAX_WALK_ENTRIES: usize = 4_000_000;
const MAX_WALK_DEPTH: usize = 8;

impl DiskUsage {
    /// Measures `dir`.
    pub fn of(dir: &Path) -> DiskUsage {
        let mut d = DiskUsage {
            complete: true,
            ..DiskUsage::default()
        };
        let mut visited = 0usize;
        let mut stack = vec![(dir.to_path_buf(), 0usize)];
        while let Some((at, depth)) = stack.pop() {
            let entries = match std::fs::read_dir(&at) {
                Ok(e) => e,
                Err(e) => {
                    d.incomplete(format!("cannot read {}: {e}", at.display()));
                    continue;
                }
            };
            for entry in entries.flatten() {
                visited += 1;
                if visited > MAX_WALK_ENTRIES {
                    d.incomplete(format!("stopped after {MAX_WALK_ENTRIES} files"));
                    return d;
                }
                let path = entry.path();
                let Ok(meta) = std::fs::symlink_metadata(&path) else {
                    continue;
                };
                if meta.is_dir() {
                    if depth + 1 < MAX_WALK_DEPTH {
                        stack.push((path, depth + 1));
                    } else {
                        d.incomplete(format!("{} is nested too deep", path.display()));
                    }
                    continue;
                }
                if !meta.is_file() {
                    continue;
                }
                let len = meta.len();
                let top = path
                    .strip_prefix(dir)
                    .ok()
                    .and_then(|p| p.components().next())
                    .and_then(|c| c.as_os_str().to_str())
                    .unwrap_or("");
                let part = match top {
                    slug_schema::ENDPOINTS_DIR if path.extension().is_some_and(|e| e == "slog") => {
                        &mut d.logs
                    }
                    slug_schema::SNAPSHOTS_DIR => &mut d.snapshots,
                    slug_schema::PAYLOADS_DIR => &mut d.payloads,
                    _ => &mut d.other,
                };
                *part = part.saturating_add(len);
                d.total = d.total.saturating_add(len);
            }
        }
        d
    }

    fn incomplete(&mut self, why: String) {
        self.complete = false;
        self.note.get_or_insert(why);
    }
}

/// Events an endpoint lost for one reason, and what to change so it does not happen again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LossNote {
    /// The endpoint.
    pub endpoint: u32,
    /// Events lost for this reason.
    pub events: u64,
    /// The reason its lost-events records give.
    pub reason: String,
    /// What to change.
    pub fix: String,
}

/// Every loss of `s`, endpoint by endpoint, each with its reason and fix.
pub fn losses(s: &TraceSummary) -> Vec<LossNote> {
    s.endpoints
        .iter()
        .flat_map(|e| {
            e.lost_by_reason.iter().map(|(reason, n)| LossNote {
                endpoint: e.id,
                events: *n,
                reason: reason.clone(),
                fix: fix_for(reason).to_owned(),
            })
        })
        .collect()
}

/// What to change for a loss reason the recorder writes.
fn fix_for(reason: &str) -> &'static str {
    match reason {
        "perf ring full" => {
            "the kernel dropped perf samples its buffer could not hold before the recorder \
             drained it: record at a lower --perf-freq (default 1000 Hz) or with a larger \
             --perf-ring-pages (default 32)"
        }
        "flight ring full" => {
            "events came faster than the writer drained the endpoint's flight ring: record with a \
             larger --ring-records (default 262144), or fewer events (--perf none, --ebpf none)"
        }
        "payload write failed" => {
            "payloads could not be stored (`slug record` named the error): free space on the \
             trace's file system, or record with --payloads boundary or none"
        }
        r if r.starts_with("ebpf") => {
            "the eBPF probes produced more than their buffers hold: record fewer probes (--ebpf \
             with a list, e.g. off-cpu,syscalls) or at a lower --perf-freq"
        }
        _ => "no known fix for this reason: it comes from the recorder that wrote the trace",
    }
}

/// A recording whose process was killed leaves journals and flight rings instead of closed logs:
/// rebuild those logs into a private temporary directory (the trace is never written) and say
/// so, and that `slug recover` makes it permanent. `None` on a cleanly closed trace.
fn rebuild_killed_recording(dir: &Path) -> Option<slug_recorder::Preview> {
    let preview = match slug_recorder::preview(dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "warning: {}: cannot rebuild the logs of a killed recording ({e}); summarising \
                 what is readable",
                dir.display()
            );
            return None;
        }
    };
    if let Some(line) = preview.leftovers.notice(dir) {
        eprintln!("note: {line}");
    }
    for r in &preview.endpoints {
        if let slug_recorder::Outcome::Failed(why) = &r.outcome {
            eprintln!(
                "warning: endpoint {}: cannot be rebuilt ({why}); showing its log as it is",
                r.endpoint
            );
            continue;
        }
        eprintln!(
            "note: endpoint {}: shown as rebuilt in memory: {} events from its journal, {} from \
             its log, {} from its flight rings ({} dropped by full rings before the kill)",
            r.endpoint, r.from_journal, r.from_log, r.from_rings, r.ring_lost
        );
        for d in &r.damage {
            eprintln!("warning: endpoint {}: {d}", r.endpoint);
        }
    }
    Some(preview)
}
