//! Viewer scale benchmark on a synthetic 10-million-event trace (generated once, kept under the
//! target dir): time to first frame, redraw after a key, and peak memory, each printed as a ratio
//! against its target and against baselines measured in the same run — a plain sequential decode
//! of every frame (what a viewer without the index would do before its first frame) and of the
//! frames the zoomed window needs (what a redraw without the frame cache would cost).
//!
//! The whole-trace paths (statistics, Perfetto export) are timed once against the full decode.
//!
//! `SLUG_VIEWER_BENCH_EVENTS` changes the trace size (default 10,000,000).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent};
use slug_schema::synth::{SynthConfig, write_trace};
use slug_schema::{LogReader, Trace};
use slug_viewer::TraceDirSource;
use slug_viewer::export::{Format, export};
use slug_viewer::run::draw_frame;
use slug_viewer::state::app::App;
use slug_viewer::state::stats::TraceStats;
use slug_viewer::state::timeline::Timeline;

const FIRST_FRAME_TARGET: Duration = Duration::from_millis(500);
const REDRAW_TARGET: Duration = Duration::from_millis(30);
const MEMORY_TARGET_BYTES: u64 = 300 << 20;
const WIDTH: u16 = 160;
const HEIGHT: u16 = 50;

fn events_wanted() -> u64 {
    std::env::var("SLUG_VIEWER_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000)
}

/// Whether a kept trace still opens and decodes with this build's schema (its encoding may have
/// changed since the trace was generated).
fn readable(dir: &Path) -> bool {
    let Ok(trace) = Trace::open(dir) else {
        return false;
    };
    trace.manifest().endpoints.iter().all(|ep| {
        trace.endpoint_log(ep.id).is_ok_and(|log| {
            let frames: Vec<_> = log.index().iter().filter(|f| !f.is_empty()).collect();
            [frames.first(), frames.last()]
                .into_iter()
                .flatten()
                .all(|f| log.decode_frame(f).is_ok())
        })
    })
}

/// The benchmark trace, generated on first use.
fn trace_dir() -> PathBuf {
    let events = events_wanted();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("viewer-bench-{events}"));
    if !readable(&dir) {
        let _ = std::fs::remove_dir_all(&dir);
        let t = Instant::now();
        let summary =
            write_trace(&dir, &SynthConfig::with_events(events)).expect("benchmark trace written");
        eprintln!(
            "generated {} events ({} MiB) in {:.1}s at {}",
            summary.events,
            summary.bytes >> 20,
            t.elapsed().as_secs_f64(),
            dir.display()
        );
    }
    dir
}

fn open_and_draw(dir: &Path) -> (App, Terminal<TestBackend>) {
    let source = TraceDirSource::open(dir).expect("trace opens");
    let mut app = App::new(Timeline::new(Box::new(source)), "bench");
    let mut term = Terminal::new(TestBackend::new(WIDTH, HEIGHT)).expect("test backend");
    draw_frame(&mut term, &mut app).expect("first frame");
    (app, term)
}

/// An app zoomed in far enough to draw decoded events.
fn zoomed(dir: &Path) -> (App, Terminal<TestBackend>) {
    let (mut app, mut term) = open_and_draw(dir);
    while !app.window.as_ref().is_some_and(|w| w.detail) {
        app.on_key(KeyEvent::from(KeyCode::Char('w')))
            .expect("zoom");
        draw_frame(&mut term, &mut app).expect("draw");
    }
    (app, term)
}

/// Runs `f` `runs` times; returns the sorted durations.
fn sample(f: impl FnMut() -> Duration, runs: usize) -> Vec<Duration> {
    let mut v: Vec<Duration> = std::iter::repeat_with(f).take(runs).collect();
    v.sort();
    v
}

fn median(f: impl FnMut() -> Duration, runs: usize) -> Duration {
    let v = sample(f, runs);
    v[v.len() / 2]
}

fn decode_all(dir: &Path) -> u64 {
    let trace = Trace::open(dir).expect("trace opens");
    let mut n = 0;
    for ep in &trace.manifest().endpoints {
        let log = trace.endpoint_log(ep.id).expect("log opens");
        for f in log.frames() {
            n += f.expect("frame decodes").events.len() as u64;
        }
    }
    n
}

/// Decodes, without any cache, the frames the zoomed window touches.
fn decode_window(dir: &Path, app: &App) -> u64 {
    let src = app.timeline.source();
    let trace = Trace::open(dir).expect("trace opens");
    let mut n = 0;
    for (ep, info) in trace.manifest().endpoints.iter().enumerate() {
        let log: LogReader = trace.endpoint_log(info.id).expect("log opens");
        let nonempty: Vec<_> = log.index().iter().filter(|f| !f.is_empty()).collect();
        for (i, f) in src.frames(ep).iter().enumerate() {
            if app.view.touches(f.range.start_ns, f.range.end_ns) {
                n += log.decode_frame(nonempty[i]).expect("decodes").events.len() as u64;
            }
        }
    }
    n
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn bench(c: &mut Criterion) {
    let dir = trace_dir();
    // Reset the peak-RSS mark so generation does not count against the viewer.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = peak_rss_bytes();
    let (app, _) = open_and_draw(&dir);
    let events = app.timeline.source().total_counts().total();
    drop(app);
    let rss_first = peak_rss_bytes();

    let mut g = c.benchmark_group("viewer");
    g.sample_size(10);
    g.bench_function("first_frame", |b| b.iter(|| black_box(open_and_draw(&dir))));
    let (mut app, mut term) = zoomed(&dir);
    let mut right = true;
    g.bench_function("redraw_after_pan_key", |b| {
        b.iter(|| {
            let key = if right { 'd' } else { 'a' };
            right = !right;
            app.on_key(KeyEvent::from(KeyCode::Char(key))).expect("pan");
            draw_frame(&mut term, &mut app).expect("redraw");
        })
    });
    g.bench_function("baseline_decode_window_frames", |b| {
        b.iter(|| black_box(decode_window(&dir, &app)))
    });
    g.finish();

    // Summary, measured here so the ratios come from this run.
    let first = median(
        || {
            let t = Instant::now();
            black_box(open_and_draw(&dir));
            t.elapsed()
        },
        5,
    );
    let decoded_before = app.timeline.frames_decoded();
    let redraws = sample(
        || {
            let key = if right { 'd' } else { 'a' };
            right = !right;
            let t = Instant::now();
            app.on_key(KeyEvent::from(KeyCode::Char(key))).expect("pan");
            draw_frame(&mut term, &mut app).expect("redraw");
            t.elapsed()
        },
        41,
    );
    let rss_zoomed = peak_rss_bytes();
    let decoded_in_pans = app.timeline.frames_decoded() - decoded_before;
    let redraw = redraws[redraws.len() / 2];
    let redraw_p90 = redraws[redraws.len() * 9 / 10];
    let redraw_max = redraws[redraws.len() - 1];
    let window_decode = median(
        || {
            let t = Instant::now();
            black_box(decode_window(&dir, &app));
            t.elapsed()
        },
        5,
    );
    let t = Instant::now();
    let decoded = decode_all(&dir);
    let full_decode = t.elapsed();
    // The whole-trace paths, once each: statistics and a Perfetto export to nowhere.
    let t = Instant::now();
    let stats = TraceStats::compute(app.timeline.source()).expect("stats");
    let stats_time = t.elapsed();
    let rss_stats = peak_rss_bytes();
    let t = Instant::now();
    let exported = export(
        app.timeline.source(),
        Format::Perfetto,
        &mut std::io::sink(),
    )
    .expect("export");
    let export_time = t.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    if let Some(w) = &app.window {
        eprintln!(
            "zoomed window: {} events in the frames it touches, {} decoded events drawn",
            w.events_in_view,
            w.tracks.iter().map(|t| t.events.len()).sum::<usize>()
        );
        eprintln!(
            "frames decoded during the timed pans: {decoded_in_pans} (the rest came from the frame cache)"
        );
    }
    eprintln!(
        "\n== slug-viewer scale summary ({events} events in the index, {decoded} decoded by the baseline) =="
    );
    eprintln!(
        "first frame      {:>9.2} ms  = {:.3}x the 500 ms target; baseline full sequential decode {:.0} ms ({:.1}x slower than the first frame)",
        ms(first),
        first.as_secs_f64() / FIRST_FRAME_TARGET.as_secs_f64(),
        ms(full_decode),
        full_decode.as_secs_f64() / first.as_secs_f64()
    );
    eprintln!(
        "redraw after key {:>9.2} ms  = {:.3}x the 30 ms target (p90 {:.2} ms, max {:.2} ms over {} pans); baseline uncached decode of the window's frames {:.2} ms ({:.2}x the redraw)",
        ms(redraw),
        redraw.as_secs_f64() / REDRAW_TARGET.as_secs_f64(),
        ms(redraw_p90),
        ms(redraw_max),
        redraws.len(),
        ms(window_decode),
        window_decode.as_secs_f64() / redraw.as_secs_f64()
    );
    if let (Some(before), Some(after)) = (rss_before, rss_first) {
        eprintln!(
            "peak RSS at first frame {:.1} MiB (process before opening: {:.1} MiB) = {:.3}x the 300 MB target",
            after as f64 / (1 << 20) as f64,
            before as f64 / (1 << 20) as f64,
            after as f64 / MEMORY_TARGET_BYTES as f64
        );
    }
    if let Some(peak) = rss_zoomed {
        eprintln!(
            "peak RSS after the zoomed pans (frame cache full) {:.1} MiB = {:.3}x the 300 MB target",
            peak as f64 / (1 << 20) as f64,
            peak as f64 / MEMORY_TARGET_BYTES as f64
        );
    }
    eprintln!(
        "stats view       {:>9.0} ms over {} endpoints = {:.2}x the full decode baseline; peak RSS then {:.1} MiB",
        ms(stats_time),
        stats.endpoints.len(),
        stats_time.as_secs_f64() / full_decode.as_secs_f64(),
        rss_stats.unwrap_or(0) as f64 / (1 << 20) as f64
    );
    eprintln!(
        "perfetto export  {:>9.0} ms ({} slices, {} flows) = {:.2}x the full decode baseline",
        ms(export_time),
        exported.slices,
        exported.flows,
        export_time.as_secs_f64() / full_decode.as_secs_f64()
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
