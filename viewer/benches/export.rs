//! Export benchmark on the synthetic 10-million-event trace (generated once, kept under the
//! target dir): `slug export`'s two formats written to files, each timed once and printed with
//! its size as a ratio against the native trace, and against baselines measured in the same run:
//! a plain sequential decode of every frame (the least any export must do) and the Chrome
//! `.json.gz` at gzip's default level 6 on the writing thread (what the export did before it
//! chose level 2 on a thread of its own).
//!
//! Targets (issue 17): the Perfetto file at most 5x the native trace; the `.json.gz` in under
//! 30 s. A criterion group also times both exports of a small trace to a sink.
//!
//! `SLUG_EXPORT_BENCH_EVENTS` changes the large trace's size (default 10,000,000).

use std::hint::black_box;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use slug_schema::Trace;
use slug_schema::synth::{SynthConfig, write_trace};
use slug_viewer::TraceDirSource;
use slug_viewer::export::{Format, export, export_to_path};

const PERFETTO_SIZE_TARGET: f64 = 5.0;
const CHROME_GZ_TIME_TARGET: Duration = Duration::from_secs(30);

fn events_wanted() -> u64 {
    std::env::var("SLUG_EXPORT_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000)
}

/// A synthetic trace of about `events` events under the target dir, generated on first use.
fn trace_dir(events: u64) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("export-bench-{events}"));
    if Trace::open(&dir).is_err() {
        let _ = std::fs::remove_dir_all(&dir);
        write_trace(&dir, &SynthConfig::with_events(events)).expect("benchmark trace written");
    }
    dir
}

/// Bytes of the regular files under `dir` (the trace as it sits on disk).
fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => disk_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
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

fn bench(c: &mut Criterion) {
    let small = trace_dir(200_000);
    let source = TraceDirSource::open(&small).expect("trace opens");
    let mut g = c.benchmark_group("export_200k");
    g.sample_size(10);
    for (name, format) in [("perfetto", Format::Perfetto), ("chrome", Format::Chrome)] {
        g.bench_function(name, |b| {
            b.iter(|| black_box(export(&source, format, &mut std::io::sink()).expect("export")))
        });
    }
    g.finish();

    let events = events_wanted();
    let dir = trace_dir(events);
    let native = disk_bytes(&dir);
    let out = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let source = TraceDirSource::open(&dir).expect("trace opens");
    let t = Instant::now();
    let decoded = decode_all(&dir);
    let full_decode = t.elapsed();
    let timed = |format, name: &str| {
        let path = out.path().join(name);
        let t = Instant::now();
        let summary = export_to_path(&source, format, &path).expect("export");
        let took = t.elapsed();
        let size = std::fs::metadata(&path).map_or(0, |m| m.len());
        let _ = std::fs::remove_file(&path);
        (took, size, summary)
    };
    let (p_time, p_size, p) = timed(Format::Perfetto, "t.perfetto-trace");
    let (c_time, c_size, _) = timed(Format::Chrome, "t.json.gz");
    // Baseline: the same JSON through gzip's default level.
    let path = out.path().join("t6.json.gz");
    let t = Instant::now();
    {
        let file = std::fs::File::create(&path).expect("create");
        let mut gz = flate2::write::GzEncoder::new(
            std::io::BufWriter::with_capacity(1 << 20, file),
            flate2::Compression::default(),
        );
        export(&source, Format::Chrome, &mut gz).expect("export");
        gz.finish().expect("finish").flush().expect("flush");
    }
    let c6_time = t.elapsed();
    let c6_size = std::fs::metadata(&path).map_or(0, |m| m.len());
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let s = |d: Duration| d.as_secs_f64();
    eprintln!(
        "\n== slug export summary ({decoded} events, native trace {:.1} MiB on disk; full sequential decode {:.1} s) ==",
        mib(native),
        s(full_decode)
    );
    eprintln!(
        "perfetto         {:>7.1} MiB = {:.2}x native (target <= {PERFETTO_SIZE_TARGET}x: {:.2}x the target); {:.1} MiB of packets before deflate ({:.1}x native); {:.1} s = {:.2}x the full decode",
        mib(p_size),
        p_size as f64 / native as f64,
        p_size as f64 / native as f64 / PERFETTO_SIZE_TARGET,
        mib(p.uncompressed_bytes),
        p.uncompressed_bytes as f64 / native as f64,
        s(p_time),
        s(p_time) / s(full_decode)
    );
    eprintln!(
        "chrome .json.gz  {:>7.1} MiB = {:.2}x native; {:.1} s = {:.2}x the 30 s target, {:.2}x the full decode",
        mib(c_size),
        c_size as f64 / native as f64,
        s(c_time),
        s(c_time) / s(CHROME_GZ_TIME_TARGET),
        s(c_time) / s(full_decode)
    );
    eprintln!(
        "baseline gzip -6 {:>7.1} MiB = {:.2}x native; {:.1} s on one thread (the export, level 2 on its own thread, is {:.2}x faster at {:.2}x the size)",
        mib(c6_size),
        c6_size as f64 / native as f64,
        s(c6_time),
        s(c6_time) / s(c_time),
        c_size as f64 / c6_size as f64
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
