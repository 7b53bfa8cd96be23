//! Where the bytes of a log go: every frame of each given `.slog` (or every log of a trace
//! directory) is re-encoded and each column compressed on its own (zstd level 3, the writer's
//! default), then summed over the frames and printed per column in bytes per event of its kind.
//!
//! It also re-encodes every frame with this build's encoder (same frame boundaries, same zstd
//! level) and prints what the file would weigh, so a recording made by an older format version
//! measures an encoding change on exactly the same events.
//!
//! `cargo run --release -p slug-schema --example columns -- TRACE_OR_SLOG...`

use std::collections::BTreeMap;
use std::path::PathBuf;

use slug_schema::{EventKind, FrameEncoder, LogReader, RawRecord, column_sizes};

fn logs(arg: &str) -> Vec<PathBuf> {
    let p = PathBuf::from(arg);
    if p.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(p.join("endpoints"))
            .expect("endpoints dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "slog"))
            .collect();
        v.sort();
        v
    } else {
        vec![p]
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: columns TRACE_OR_SLOG...");
        std::process::exit(2);
    }
    let mut sums: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut counts = [0u64; EventKind::COUNT];
    let mut file_bytes = 0u64;
    // Payload bytes of event frames as written, and as this build encodes the same events.
    let (mut old_payload, mut new_payload) = (0u64, 0u64);
    let mut encoder = FrameEncoder::new(3).expect("zstd level");
    let mut frame_bytes = Vec::new();
    for path in args.iter().flat_map(|a| logs(a)) {
        let log = LogReader::open(&path).expect("open log");
        file_bytes += log.file_len();
        for frame in log.frames() {
            let frame = frame.expect("frame");
            if !frame.events.is_empty() {
                let records: Vec<RawRecord> =
                    frame.events.iter().map(RawRecord::from_event).collect();
                let info = encoder
                    .encode(&records, 0, &[], &mut frame_bytes)
                    .expect("encode");
                old_payload += u64::from(frame.info.payload_len);
                new_payload += u64::from(info.payload_len);
            }
            for e in &frame.events {
                counts[e.kind() as usize] += 1;
            }
            for c in column_sizes(&frame.events, 3) {
                let s = sums.entry(c.name).or_default();
                s.0 += c.raw;
                s.1 += c.compressed;
            }
        }
    }
    let total: u64 = counts.iter().sum();
    println!(
        "{total} events, {file_bytes} bytes on disk: {:.2} B/event",
        file_bytes as f64 / total.max(1) as f64
    );
    let reencoded = file_bytes - old_payload + new_payload;
    println!(
        "re-encoded by this build (format {}): {reencoded} bytes: {:.2} B/event",
        slug_schema::FORMAT_VERSION,
        reencoded as f64 / total.max(1) as f64
    );
    for k in EventKind::ALL {
        if counts[k as usize] > 0 {
            println!("  {:>14}: {}", k.name(), counts[k as usize]);
        }
    }
    println!(
        "{:<32} {:>10} {:>10} {:>12}",
        "column", "raw", "zstd", "B/event(kind)"
    );
    let mut sum = 0;
    for (name, (raw, z)) in &sums {
        let group = name.split('.').next().unwrap_or("");
        let kind_count = match name.strip_prefix("times.") {
            Some(kind) => EventKind::ALL.iter().find(|k| k.name() == kind).copied(),
            None => EventKind::ALL.iter().find(|k| k.name() == group).copied(),
        }
        .map_or(total, |k| counts[k as usize]);
        sum += z;
        println!(
            "{name:<32} {raw:>10} {z:>10} {:>12.3}",
            *z as f64 / kind_count.max(1) as f64
        );
    }
    println!(
        "sum of columns compressed alone: {sum} bytes ({:.2} B/event)",
        sum as f64 / total.max(1) as f64
    );
}
