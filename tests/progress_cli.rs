//! Live progress of `run`, `record` and `replay` when stderr is not a terminal: plain lines
//! whose last one carries every stage's final counts, from stage threads and from `slug node`
//! processes alike (they send theirs with their heartbeats); nothing with `--json` or `--quiet`.
//! Also: a recording on process stages counts each endpoint's stored payloads.

#[path = "support/cli.rs"]
mod cli;

use cli::{run, text};

/// The last `slug: WHAT: ... (finished)` line of stderr.
fn finished(stderr: &str, what: &str) -> String {
    let prefix = format!("slug: {what}: ");
    stderr
        .lines()
        .rev()
        .find(|l| l.starts_with(&prefix) && l.ends_with("(finished)"))
        .unwrap_or_else(|| panic!("no final `{prefix}` line in:\n{stderr}"))
        .to_owned()
}

/// The number before `word` in `line` (`1,234 events` -> 1234).
fn count_before(line: &str, word: &str) -> u64 {
    let words: Vec<&str> = line
        .split([' ', ',', ';'])
        .filter(|w| !w.is_empty())
        .collect();
    let at = words.iter().position(|w| *w == word).expect(word);
    let mut digits = String::new();
    // `1,234` was split at its comma: gather the groups before the word.
    for w in words[..at].iter().rev() {
        if w.chars().all(|c| c.is_ascii_digit()) && (digits.is_empty() || w.len() == 3) {
            digits.insert_str(0, w);
            if w.len() != 3 {
                break;
            }
        } else {
            break;
        }
    }
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no count before {word} in {line}"))
}

#[test]
fn process_stages_report_every_step_event_and_byte() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let o = run(&[
        "record",
        "--out",
        out.to_str().unwrap(),
        "--ebpf",
        "none",
        "--perf",
        "none",
        "--payloads",
        "all",
        "--",
        "--stages",
        "2",
        "--transport",
        "tcp",
        "--tokens",
        "6",
        "--sequences",
        "2",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let last = finished(&stderr, "recording");
    // 2 sequences x 6 tokens per stage, both stages done, each counted by its node.
    assert!(last.contains(" 24/24 steps"), "{last}");
    assert!(last.contains("per stage 12 12"), "{last}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let recorded = stdout
        .lines()
        .find_map(|l| l.strip_prefix("recorded "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no `recorded N events` in {stdout}"));
    assert_eq!(count_before(&last, "events"), recorded, "{last}");
    assert!(
        !last.contains(" 0 B sent"),
        "stage 0 sent activations: {last}"
    );
    // Each node stored its stage's payloads; the summary counts them per endpoint.
    let with_payloads = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("endpoint ") && l.contains(" payloads ("))
        .count();
    assert_eq!(with_payloads, 2, "{stdout}");

    let o = run(&["replay", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        finished(&stderr, "replaying").contains(" 24/24 steps"),
        "{stderr}"
    );
}

#[test]
fn local_and_shm_runs_count_tokens_and_quiet_shows_nothing() {
    for transport in ["local", "shm"] {
        let o = run(&[
            "run",
            "--stages",
            "2",
            "--transport",
            transport,
            "--tokens",
            "5",
        ]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        let last = finished(&stderr, "running");
        assert!(
            last.contains(" 10/10 steps") && last.contains("tokens/s"),
            "{last}"
        );
        assert!(!last.contains("events"), "nothing records: {last}");
    }
    for quiet in ["--quiet", "--json"] {
        let o = run(&["run", "--stages", "2", "--tokens", "3", quiet]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        assert!(!stderr.contains("running:"), "{quiet}: {stderr}");
    }
}
