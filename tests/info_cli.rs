//! `slug info` end to end: the table, `--json`, a truncated log, a corrupt frame, bad paths.

use std::path::Path;
use std::process::{Command, Output};

use slug_schema::synth::{SynthConfig, write_trace};

fn slug(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(args)
        .output()
        .expect("run slug")
}

fn small_trace(dir: &Path) -> slug_schema::synth::SynthSummary {
    let cfg = SynthConfig {
        steps: 8,
        layers_per_stage: 2,
        threads: 2,
        writer: slug_schema::WriterOptions {
            events_per_frame: 256,
            zstd_level: 3,
        },
        ..SynthConfig::default()
    };
    write_trace(dir, &cfg).expect("synthetic trace")
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn table_lists_endpoints_kinds_sizes_and_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("trace");
    let written = small_trace(&root);
    let out = slug(&["info", root.to_str().unwrap()]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let format = format!("format {}, synthetic", slug_schema::TRACE_FORMAT_VERSION);
    assert!(t.contains(&format), "{t}");
    assert!(t.contains("4 on 2 nodes"), "{t}");
    let total = written.events.to_string();
    let grouped: String = total
        .chars()
        .rev()
        .collect::<Vec<_>>()
        .chunks(3)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join(",")
        .chars()
        .rev()
        .collect();
    assert!(t.contains(&format!("events      {grouped} in")), "{t}");
    for kind in ["kernel_span", "transfer", "lost_events", "counter"] {
        assert!(t.contains(kind), "missing {kind}: {t}");
    }
    assert!(t.contains("intel_pt"), "{t}");
    assert_eq!(
        t.matches(" none").count(),
        4,
        "four undamaged endpoints: {t}"
    );
}

#[test]
fn json_matches_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("trace");
    let written = small_trace(&root);
    let out = slug(&["info", "--json", root.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["events"], written.events);
    assert_eq!(v["bytes"], written.bytes);
    assert_eq!(v["endpoints"].as_array().unwrap().len(), 4);
    assert_eq!(v["endpoints"][0]["recovery"]["footer"], "valid");
    assert_eq!(v["lost_events"], 17 + 18 + 19 + 20);
    assert!(v["counts"]["kernel_span"].as_u64().unwrap() > 0);
}

#[test]
fn truncated_and_corrupt_logs_are_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("trace");
    small_trace(&root);
    // Endpoint 2: writer "killed" in the middle of a frame.
    let log2 = root.join("endpoints/2.slog");
    let bytes = std::fs::read(&log2).unwrap();
    let cut = bytes.len() / 2;
    std::fs::write(&log2, &bytes[..cut]).unwrap();
    // Endpoint 3: one flipped bit inside the first frame's payload.
    let log3 = root.join("endpoints/3.slog");
    let mut bytes = std::fs::read(&log3).unwrap();
    let at = slug_schema::FILE_HEADER_LEN + slug_schema::FRAME_HEADER_LEN + 5;
    bytes[at] ^= 1;
    std::fs::write(&log3, &bytes).unwrap();

    let out = slug(&["info", root.to_str().unwrap()]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("no footer (not closed)"), "{t}");
    assert!(t.contains("truncated:"), "{t}");
    assert!(t.contains("1 corrupt frame"), "{t}");

    let out = slug(&["info", "--json", root.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let r2 = &v["endpoints"][2]["recovery"];
    assert_eq!(r2["footer"], "missing");
    assert_eq!(r2["partial_frames"], 1);
    assert!(r2["truncated_bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["truncated_bytes"], r2["truncated_bytes"]);
    assert_eq!(v["endpoints"][3]["recovery"]["corrupt_frames"], 1);
    assert_eq!(v["corrupt_frames"], 1);
}

#[test]
fn unreadable_log_and_bad_paths_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = slug(&["info", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let t = text(&out);
    assert!(
        t.contains("no manifest.json") && t.contains(dir.path().to_str().unwrap()),
        "{t}"
    );

    let missing = dir.path().join("nope");
    let out = slug(&["info", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let t = text(&out);
    assert!(t.contains("nope") && t.contains("no such directory"), "{t}");

    let root = dir.path().join("trace");
    small_trace(&root);
    std::fs::write(
        root.join("endpoints/1.slog"),
        b"definitely not a log file, just text",
    )
    .unwrap();
    let out = slug(&["info", root.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("UNREADABLE") && t.contains("1.slog") && t.contains("wrong magic"),
        "{t}"
    );
}

#[test]
fn a_single_log_file_is_summarised_too() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("trace");
    let written = small_trace(&root);
    let log = root.join("endpoints/1.slog");
    let out = slug(&["info", log.to_str().unwrap()]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("endpoint    1  (clock synthetic)"), "{t}");
    assert!(t.contains("damage      none"), "{t}");
    let out = slug(&["info", "--json", log.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["events"], written.endpoints[1].events);
    assert_eq!(v["lost_events"], 18);
    assert_eq!(v["recovery"]["footer"], "valid");
}

#[test]
fn info_view_and_export_help_give_examples_and_every_kind_name() {
    for command in ["info", "view", "export"] {
        let out = slug(&[command, "--help"]);
        let t = text(&out);
        assert!(out.status.success(), "{t}");
        assert!(t.contains("Examples:"), "slug {command} --help: {t}");
        for kind in slug_schema::EventKind::ALL {
            assert!(
                t.contains(kind.name()),
                "slug {command} --help lacks {}: {t}",
                kind.name()
            );
        }
    }
}
