//! `slug replay` end to end: record a trace with `slug record`, replay it bit-exact, replay it
//! under an injected fault (exit status 1, a report `slug view --divergence` reads that points
//! at the fault), dump a tensor as `.npy`, and refuse a trace from a newer slug.

use std::path::Path;

#[path = "support/cli.rs"]
mod cli;
use cli::{run, text};

fn record(out: &Path) {
    let o = run(&[
        "record",
        "--out",
        out.to_str().expect("utf-8 path"),
        "--payloads",
        "all",
        "--perf",
        "none",
        "--stages",
        "2",
        "--tokens",
        "4",
        "--sequences",
        "2",
    ]);
    assert!(o.status.success(), "record failed: {}", text(&o));
}

#[test]
fn replay_is_bit_exact_and_an_injected_fault_is_reported_where_it_was_injected() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace");
    record(&trace);
    let t = trace.to_str().unwrap();
    let clean = run(&["replay", t, "--transport", "tcp", "--threads", "2"]);
    assert_eq!(clean.status.code(), Some(0), "{}", text(&clean));
    assert!(text(&clean).contains("bit-exact"), "{}", text(&clean));

    let report = dir.path().join("div.json");
    // Stage 0 owns layer 0 (its last): the flipped element 5 of the MLP output reaches the
    // outbox unchanged. Step 3 is decode step 1 of sequence 1.
    let faulty = run(&[
        "replay",
        t,
        "--inject",
        "stage=0,layer=0,kernel=down,step=3,element=5",
        "--report",
        report.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(faulty.status.code(), Some(1), "{}", text(&faulty));
    let json: serde_json::Value = serde_json::from_slice(&faulty.stdout).expect("one JSON object");
    assert_eq!(json["bit_exact"], false);
    assert_eq!(json["first_place"]["decode_step"], 1);
    assert_eq!(json["first_place"]["seq"], 1);
    let div: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report written"))
            .expect("report is JSON");
    assert_eq!(div["endpoint"], 0);
    assert_eq!(div["step"], 3);
    assert_eq!(div["transfer_id"], 3);
    assert_eq!(div["offset"], 5);
    assert_ne!(div["expected"], div["got"]);
    for field in ["layer", "kernel", "later_differing"] {
        assert!(div.get(field).is_some(), "{field} missing: {div}");
    }
    // The viewer reads it as written.
    let seen = slug_viewer::state::divergence::Divergence::read(&report).expect("viewer parses");
    let line = seen.summary("n0/s0");
    assert!(line.contains("step 3 transfer #3 @5"), "{line}");
}

#[test]
fn a_stage_replay_dumps_a_tensor_as_npy_and_a_newer_trace_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace");
    record(&trace);
    let t = trace.to_str().unwrap();
    let npy = dir.path().join("kv.npy");
    let o = run(&[
        "replay",
        t,
        "--stage",
        "1",
        "--to-step",
        "2",
        "--dump",
        "kv.layer.1",
        "--out",
        npy.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let bytes = std::fs::read(&npy).expect("npy written");
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).expect("ascii header");
    // tiny: 2 sequences, max_seq 128, kv_dim 32; K and V.
    assert!(header.contains("'shape': (2, 2, 128, 32)"), "{header}");
    assert!(header.contains("'descr': '<f4'"), "{header}");
    assert_eq!(bytes.len() - 10 - hlen, 2 * 2 * 128 * 32 * 4);

    let manifest = trace.join("manifest.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    v["format_version"] = 99.into();
    std::fs::write(&manifest, v.to_string()).unwrap();
    let o = run(&["replay", t]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("upgrade"), "{}", text(&o));
}
