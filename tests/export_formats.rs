//! `slug export` end to end: a synthetic trace exported to Perfetto protobuf and Chrome JSON,
//! decoded back and checked against the trace's own logs.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;

use slug_schema::synth::{SynthConfig, write_trace};
use slug_schema::{Event, Trace};

fn small_trace(dir: &Path) {
    let cfg = SynthConfig {
        stages: 3,
        steps: 6,
        microbatches: 2,
        layers_per_stage: 2,
        threads: 2,
        ..SynthConfig::default()
    };
    write_trace(dir, &cfg).expect("synthetic trace written");
}

/// A transfer as (id, sender name, receiver name).
type Flow = (u64, String, String);

/// Kernel spans per endpoint name, and every transfer.
fn ground_truth(dir: &Path) -> (HashMap<String, u64>, BTreeSet<Flow>) {
    let trace = Trace::open(dir).expect("trace opens");
    let m = trace.manifest();
    let name_of = |id: u32| {
        let e = m
            .endpoints
            .iter()
            .find(|e| e.id == id)
            .expect("endpoint in manifest");
        format!("{}/s{}", e.node, e.stage)
    };
    let mut kernels = HashMap::new();
    let mut transfers = BTreeSet::new();
    for ep in &m.endpoints {
        let log = trace.endpoint_log(ep.id).expect("log opens");
        for frame in log.frames() {
            for e in frame.expect("frame decodes").events {
                match e {
                    Event::KernelSpan(_) => *kernels.entry(name_of(ep.id)).or_insert(0) += 1,
                    Event::Transfer(x) => {
                        transfers.insert((x.id, name_of(x.src_endpoint), name_of(x.dst_endpoint)));
                    }
                    _ => {}
                }
            }
        }
    }
    (kernels, transfers)
}

fn slug(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(args)
        .output()
        .expect("slug runs")
}

/// Writes a small trace under `tmp`, exports it as `format` to `tmp/<file>` and checks the
/// export succeeded; returns the trace directory, the output path and what `slug` printed.
fn exported(
    tmp: &std::path::Path,
    format: &str,
    file: &str,
) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let dir = tmp.join("trace");
    small_trace(&dir);
    let out = tmp.join(file);
    let run = slug(&[
        "export",
        dir.to_str().unwrap(),
        "--format",
        format,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    (dir, out, String::from_utf8_lossy(&run.stdout).into_owned())
}

#[test]
fn perfetto_export_has_a_track_per_endpoint_kernel_slices_and_paired_flows() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dir, out, printed) = exported(tmp.path(), "perfetto", "t.perfetto-trace");
    assert!(printed.starts_with("wrote "));

    let (kernels, transfers) = ground_truth(&dir);
    let data = std::fs::read(&out).expect("export written");
    let c = slug_viewer::export::perfetto::read(&data).expect("decodes as a Perfetto trace");
    assert!(c.well_formed);
    let track_name = |uuid: u64| {
        c.tracks
            .get(&uuid)
            .map(|t| t.name.clone())
            .unwrap_or_default()
    };
    let endpoint_tracks: BTreeSet<String> = c
        .tracks
        .values()
        .filter(|t| t.parent == 0 && t.name.contains("/s"))
        .map(|t| t.name.clone())
        .collect();
    assert_eq!(
        endpoint_tracks,
        kernels.keys().cloned().collect::<BTreeSet<_>>()
    );
    assert!(c.well_formed && c.balanced);
    // Kernel slices sit on each endpoint's kernels tracks (one per overlapping worker thread),
    // transfers on its transfers tracks, off-CPU intervals on OS thread tracks.
    let mut slices_per_endpoint: HashMap<String, u64> = HashMap::new();
    let (mut off_cpu_slices, mut transfer_slices) = (0, 0);
    for (uuid, n) in &c.slices {
        let name = track_name(*uuid);
        match name.split_once(" kernels") {
            Some((ep, _)) => *slices_per_endpoint.entry(ep.to_string()).or_default() += n,
            None if name.starts_with("transfers") => transfer_slices += n,
            None => {
                assert!(name.contains(" thread "), "a slice on track {name}");
                off_cpu_slices += n;
            }
        }
    }
    assert_eq!(slices_per_endpoint, kernels);
    assert_eq!(transfer_slices, 2 * transfers.len() as u64);
    assert!(
        off_cpu_slices > 0,
        "the synthetic trace's off-CPU intervals are exported"
    );
    // Every transfer is one flow from the sender's transfers track to the receiver's.
    let endpoint_of = |track: u64| track_name(c.tracks[&track].parent);
    let starts: BTreeSet<Flow> = c
        .flow_starts
        .iter()
        .map(|(flow, track)| {
            let end = c.flow_ends.get(flow).expect("every flow is terminated");
            (flow - 1, endpoint_of(*track), endpoint_of(*end))
        })
        .collect();
    assert_eq!(starts, transfers);
    assert_eq!(c.flow_ends.len(), transfers.len());
    assert!(
        c.tracks.values().any(|t| t.counter && t.name == "samples"),
        "perf lane counters present"
    );
}

#[test]
fn chrome_export_gzips_and_matches_the_trace() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dir, out, _) = exported(tmp.path(), "chrome", "t.json.gz");
    let raw = std::fs::read(&out).expect("written");
    assert_eq!(&raw[..2], &[0x1f, 0x8b], "gzip magic");

    let (kernels, transfers) = ground_truth(&dir);
    let events = slug_viewer::export::chrome::read_events(&out).expect("valid gzip JSON");
    let mut process_names = HashMap::new();
    for e in &events {
        if e["ph"] == "M" && e["name"] == "process_name" {
            process_names.insert(
                e["pid"].as_u64().unwrap(),
                e["args"]["name"].as_str().unwrap().to_string(),
            );
        }
    }
    let mut slices: HashMap<String, u64> = HashMap::new();
    let mut starts = HashMap::new();
    let mut ends = HashMap::new();
    for e in &events {
        let pid = e["pid"].as_u64().unwrap_or(0);
        match e["ph"].as_str() {
            Some("X") if e["cat"] == "kernel_span" => {
                *slices.entry(process_names[&pid].clone()).or_default() += 1
            }
            Some("s") => {
                starts.insert(e["id"].as_u64().unwrap(), process_names[&pid].clone());
            }
            Some("f") => {
                ends.insert(e["id"].as_u64().unwrap(), process_names[&pid].clone());
            }
            _ => {}
        }
    }
    assert_eq!(slices, kernels);
    let flows: BTreeSet<Flow> = starts
        .iter()
        .map(|(id, src)| (*id, src.clone(), ends[id].clone()))
        .collect();
    assert_eq!(flows, transfers);
    assert_eq!(ends.len(), transfers.len());
}

#[test]
fn export_of_a_missing_trace_says_so() {
    let run = slug(&[
        "export",
        "/nonexistent/slug-trace",
        "--format",
        "chrome",
        "--out",
        "/tmp/never.json",
    ]);
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("no trace at /nonexistent/slug-trace"), "{err}");
}

#[test]
fn export_of_a_cut_short_log_warns_and_keeps_what_survived() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("trace");
    let cfg = SynthConfig {
        stages: 2,
        steps: 6,
        microbatches: 2,
        layers_per_stage: 2,
        threads: 2,
        writer: slug_schema::WriterOptions {
            events_per_frame: 64,
            ..slug_schema::WriterOptions::default()
        },
        ..SynthConfig::default()
    };
    write_trace(&dir, &cfg).expect("synthetic trace written");
    // A killed writer: no footer, last frame cut in half.
    let log = dir.join("endpoints/1.slog");
    let len = std::fs::metadata(&log).expect("log exists").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .expect("open log");
    file.set_len(len * 2 / 3).expect("truncate");
    let out = tmp.path().join("t.json");
    let run = slug(&[
        "export",
        dir.to_str().unwrap(),
        "--format",
        "chrome",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("slug: warning: node0/s1: log not closed (no index footer)"),
        "{err}"
    );
    let events = slug_viewer::export::chrome::read_events(&out).expect("valid JSON");
    assert!(
        events
            .iter()
            .any(|e| e["cat"] == "kernel_span" && e["pid"] == 2),
        "node0/s1 kept its surviving spans"
    );
}

/// A recorded run has kernels outside every layer (embedding, final norm, head, argmax): the
/// exports leave their `layer` out instead of printing the log's `u32::MAX` sentinel.
#[test]
fn exports_of_a_recorded_run_never_carry_the_no_layer_sentinel() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("trace");
    let rec = slug(&[
        "record",
        "--out",
        dir.to_str().unwrap(),
        "--stages",
        "2",
        "--tokens",
        "3",
    ]);
    assert!(
        rec.status.success(),
        "{}",
        String::from_utf8_lossy(&rec.stderr)
    );
    let json = tmp.path().join("t.json");
    let pftrace = tmp.path().join("t.pftrace");
    for (format, out) in [("chrome", &json), ("perfetto", &pftrace)] {
        let run = slug(&[
            "export",
            dir.to_str().unwrap(),
            "--format",
            format,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    let text = std::fs::read_to_string(&json).unwrap();
    assert!(
        !text.contains("4294967295"),
        "the sentinel leaked into the Chrome export"
    );
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let kernels: Vec<_> = doc["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["cat"] == "kernel_span")
        .collect();
    assert!(kernels.iter().any(|k| k["args"]["layer"].is_u64()));
    assert!(
        kernels.iter().any(|k| k["args"].get("layer").is_none()),
        "the embedding and head kernels have no layer"
    );
    let bytes = slug_viewer::export::perfetto::inflate(&std::fs::read(&pftrace).unwrap()).unwrap();
    let sentinel = u64::from(u32::MAX);
    // Perfetto's debug annotations are varints: u32::MAX encodes as ff ff ff ff 0f.
    let mut varint = Vec::new();
    let mut v = sentinel;
    while v >= 0x80 {
        varint.push((v as u8) | 0x80);
        v >>= 7;
    }
    varint.push(v as u8);
    assert!(
        !bytes.windows(varint.len()).any(|w| w == varint.as_slice()),
        "the sentinel leaked into the Perfetto export"
    );
}
