//! `slug replay` says "bit-exact" only when it checked everything the run produced: a damaged
//! endpoint log, a manifest entry pointing at another endpoint's log or a changed stage number
//! make it exit 3 with "incomplete: N of M checked, because ...", naming the endpoint.

use std::path::Path;

#[path = "support/cli.rs"]
mod cli;
use cli::{run, text};

/// A 4-stage tiny recording with kernel hashes.
fn record(out: &Path) {
    let o = run(&[
        "record",
        "--out",
        out.to_str().expect("utf-8 path"),
        "--hash-kernels",
        "--perf",
        "none",
        "--",
        "--model",
        "tiny",
        "--layers",
        "4",
        "--stages",
        "4",
        "--tokens",
        "4",
        "--sequences",
        "2",
    ]);
    assert!(o.status.success(), "record failed: {}", text(&o));
}

fn replay(trace: &Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["replay", trace.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = run(&args);
    (o.status.code().unwrap_or(-1), text(&o))
}

fn edit_manifest(trace: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = trace.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut m);
    std::fs::write(&path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
}

#[test]
fn a_clean_trace_is_bit_exact_with_every_transfer_and_kernel_output_counted() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    record(&t);
    let (code, out) = replay(&t, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("bit-exact") && !out.contains("incomplete"),
        "{out}"
    );
    // 2 sequences x 4 tokens: stages 0-2 send 8 each, the last stage sends 2 x 3 tokens back.
    assert!(out.contains("transfers: 30 of 30 checked"), "{out}");
    let (code, out) = replay(&t, &["--verify", "kernel"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("bit-exact"), "{out}");
}

#[test]
fn one_flipped_byte_in_endpoint_2s_log_makes_replay_incomplete_not_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    record(&t);
    let log = t.join("endpoints/2.slog");
    let mut bytes = std::fs::read(&log).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&log, &bytes).unwrap();
    for verify in ["transfer", "kernel"] {
        let (code, out) = replay(&t, &["--verify", verify]);
        assert_eq!(code, 3, "--verify {verify}: {out}");
        assert!(!out.contains("bit-exact"), "--verify {verify}: {out}");
        assert!(
            out.contains("incomplete: ") && out.contains("endpoint 2 (endpoints/2.slog)"),
            "--verify {verify}: {out}"
        );
        let what = if verify == "kernel" {
            "kernel outputs checked"
        } else {
            "of 30 transfers checked"
        };
        assert!(out.contains(what), "--verify {verify}: {out}");
    }
    let o = run(&["replay", t.to_str().unwrap(), "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["bit_exact"], false);
    assert_eq!(json["transfers_expected"], 30);
    assert!(
        json["incomplete"]
            .as_str()
            .unwrap()
            .contains("corrupt frame")
    );
}

#[test]
fn swapped_manifest_entries_are_caught_by_the_logs_own_endpoint_id() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    record(&t);
    edit_manifest(&t, |m| {
        let eps = m["endpoints"].as_array_mut().unwrap();
        let a = eps[1]["log"].clone();
        eps[1]["log"] = eps[2]["log"].clone();
        eps[2]["log"] = a;
    });
    let (code, out) = replay(&t, &[]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("the log belongs to endpoint 2, not to the endpoint the manifest lists"),
        "{out}"
    );
    let info = run(&["info", t.to_str().unwrap()]);
    assert!(
        text(&info)
            .contains("the log belongs to endpoint 2 but the manifest lists it as endpoint 1"),
        "{}",
        text(&info)
    );
}

#[test]
fn a_changed_stage_number_makes_replay_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    record(&t);
    edit_manifest(&t, |m| m["endpoints"][2]["stage"] = 1.into());
    let (code, out) = replay(&t, &[]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("a second endpoint for stage 1"), "{out}");
    assert!(
        out.contains("stage 2: the manifest lists no endpoint for it"),
        "{out}"
    );
}

#[test]
fn a_fault_in_the_last_stage_that_keeps_the_token_is_still_a_divergence_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    record(&t);
    // The lowest mantissa bit of logit 5: far too small to change the argmax token.
    let o = run(&[
        "replay",
        t.to_str().unwrap(),
        "--inject",
        "stage=3,kernel=head,step=3,element=5,bit=0",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["bit_exact"], false);
    assert_eq!(json["verify"], "transfer");
    assert_eq!(
        json["counts"]["transfers_differing"], 0,
        "the token is unchanged"
    );
    assert_eq!(json["first"]["endpoint"], 3);
    assert_eq!(json["first"]["step"], 3);
    assert_eq!(json["first"]["kernel"], "head");
}
