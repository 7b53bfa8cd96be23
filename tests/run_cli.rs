//! `slug run` end to end: JSON output, identical tokens for every thread count, stage split and
//! instruction set, the layout report, and refusals of impossible configurations.

use std::process::{Command, Output};

fn slug(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(args)
        .output()
        .expect("the slug binary runs")
}

fn run_json(extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["run", "--model", "tiny", "--prompt", "Hello", "--json"];
    if !extra.contains(&"--seed") {
        args.extend(["--seed", "7"]);
    }
    args.extend_from_slice(extra);
    let out = slug(&args);
    assert!(
        out.status.success(),
        "slug {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn tokens(v: &serde_json::Value) -> Vec<u64> {
    v["tokens"]
        .as_array()
        .expect("tokens array")
        .iter()
        .map(|t| t.as_u64().expect("token id"))
        .collect()
}

#[test]
fn json_output_has_the_documented_fields() {
    let v = run_json(&["--tokens", "32", "--threads", "1"]);
    assert_eq!(tokens(&v).len(), 32);
    assert_eq!(v["model"], "tiny");
    assert_eq!(v["stages"], 1);
    assert_eq!(v["threads"], 1);
    assert_eq!(v["prompt_tokens"], 5);
    assert_eq!(v["transport"], "local");
    for field in ["tokens_per_s", "wall_ms"] {
        assert!(v[field].as_f64().is_some_and(|x| x > 0.0), "{field}: {v}");
    }
    let stage = &v["stage_reports"][0];
    assert_eq!(stage["steps"], 32, "one step per generated token: {v}");
    assert!(stage["forward_ms"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    assert!(tokens(&v).iter().all(|&t| t < 256));
}

#[test]
fn tokens_do_not_depend_on_threads_stages_transport_or_isa() {
    let reference = tokens(&run_json(&[
        "--tokens",
        "12",
        "--threads",
        "1",
        "--isa",
        "scalar",
    ]));
    for extra in [
        &["--threads", "2"][..],
        &["--threads", "3", "--stages", "2"][..],
        &["--stages", "2", "--isa", "scalar", "--threads", "2"][..],
        &["--stages", "2", "--transport", "shm", "--sequences", "2"][..],
        &[
            "--stages",
            "2",
            "--transport",
            "tcp",
            "--sequences",
            "3",
            "--microbatches",
            "2",
        ][..],
    ] {
        let mut args = vec!["--tokens", "12"];
        args.extend_from_slice(extra);
        assert_eq!(tokens(&run_json(&args)), reference, "{extra:?}");
    }
    let other_seed = tokens(&run_json(&["--tokens", "12", "--seed", "8"]));
    assert_ne!(other_seed, reference);
}

#[test]
fn overrides_and_fma_run() {
    let v = run_json(&[
        "--tokens",
        "4",
        "--layers",
        "3",
        "--dim",
        "32",
        "--heads",
        "4",
        "--kv-heads",
        "1",
        "--ffn",
        "40",
        "--vocab",
        "300",
        "--max-seq",
        "16",
        "--stages",
        "3",
    ]);
    assert_eq!(tokens(&v).len(), 4);
    assert_eq!(v["config"]["kv_heads"], 1);
    let fma = slug(&["run", "--tokens", "4", "--fma", "--json"]);
    // Either the CPU has FMA and the run works, or it is refused with a message saying so.
    if !fma.status.success() {
        assert!(String::from_utf8_lossy(&fma.stderr).contains("fused multiply-add"));
    }
}

#[test]
fn layout_report_lists_sections_and_boxes() {
    let out = slug(&["run", "--model", "tiny", "--stages", "2", "--layout"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "weights",
        "kv_cache",
        "activations",
        "workspace",
        "inbox.seq.0",
        "head",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let out = slug(&["run", "--layout", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["stages"][0]["regions"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
    );
}

#[test]
fn impossible_configs_are_refused_with_the_value_and_why() {
    let cases: [(&[&str], &str); 8] = [
        (&["--dim", "0"], "dim = 0"),
        (&["--heads", "5"], "heads = 5"),
        (&["--kv-heads", "3"], "kv-heads = 3"),
        (&["--stages", "3"], "stages = 3"),
        (&["--vocab", "100"], "vocab = 100"),
        (&["--threads", "0"], "--threads 0"),
        (&["--tokens", "500"], "max-seq = 128"),
        (
            &["--max-seq", "100000000", "--dim", "4096", "--heads", "32"],
            "MemAvailable",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["run", "--model", "tiny"];
        args.extend_from_slice(extra);
        let out = slug(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(err.contains(needle), "{extra:?}: {err}");
    }
}

#[test]
fn help_teaches_with_examples() {
    let out = slug(&["run", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Examples:") && text.contains("--layout") && text.contains("--kv-heads"));
}

/// `--transport`, `--model`, `--payloads` and `--verify` take a closed set of values: a
/// misspelling is refused before any work starts, naming the flag and the values it takes.
#[test]
fn closed_value_flags_list_their_values_when_misspelled() {
    for (args, values) in [
        (
            &["run", "--transport", "bogus"][..],
            "local, shm, tcp, mpi, rdma",
        ),
        (&["run", "--model", "huge"][..], "tiny, small, base"),
        (
            &["record", "--out", "unused", "--payloads", "some"][..],
            "none, boundary, all",
        ),
        (
            &["replay", "unused", "--verify", "deep"][..],
            "transfer, kernel",
        ),
        (
            &["demo", "--transport", "carrier-pigeon"][..],
            "local, shm, tcp, mpi, rdma",
        ),
    ] {
        let out = slug(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("[possible values: {values}]")),
            "{args:?}: {err}"
        );
        assert!(!std::path::Path::new("unused").exists());
    }
}
