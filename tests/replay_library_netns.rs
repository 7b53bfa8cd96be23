//! Replay on another host: a recorded trace directory is copied, the original deleted, and the
//! copy replayed inside a network namespace this test creates (its own loopback only, so the
//! tcp replay's sockets live there too). Needs root and `ip`; otherwise it says why it skipped.
//! The namespace is removed by a guard, even on failure.

#[path = "support/netns.rs"]
#[allow(dead_code)]
mod netns;
#[path = "support/recorded.rs"]
mod recorded;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use slug_recorder::observe::PayloadPolicy;
use slug_replayer::{RecordedRun, ReplayOptions, replay_pipeline, replay_stage};
use slug_transport::transfer::TransportKind;

use netns::ip;
use recorded::{pipeline, record_trace};

/// Where the child half finds the copied trace.
const TRACE_ENV: &str = "SLUG_REPLAY_NETNS_TRACE";

/// A network namespace of this test; deleted on drop.
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = ip(&["netns", "delete", &self.0]);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy");
    for entry in std::fs::read_dir(from).expect("read trace dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

#[test]
fn a_copied_trace_replays_bit_exact_inside_another_network_namespace() {
    // The namespace has its loopback only: no subnet of the host is used.
    if let Some(why) = netns::skip_reason("10.251.77") {
        eprintln!("netns replay test skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("recorded");
    record_trace(&original, &pipeline(), PayloadPolicy::All, 4, false);
    let copy = dir.path().join("shipped");
    copy_dir(&original, &copy);
    std::fs::remove_dir_all(&original).expect("remove the original");
    let ns = Namespace(format!("slugrp{}", std::process::id() % 100_000));
    if let Err(e) = ip(&["netns", "add", &ns.0]) {
        eprintln!("netns replay test skipped: cannot create a namespace: {e}");
        return;
    }
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]).expect("loopback up");
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(&exe)
        .args([
            "--exact",
            "replay_half_run_inside_the_namespace",
            "--ignored",
            "--nocapture",
        ])
        .env(TRACE_ENV, &copy)
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    let own = std::fs::read_link("/proc/self/ns/net").expect("own namespace");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("child namespace: "))
        .expect("the child names its namespace");
    assert_ne!(
        line,
        own.display().to_string(),
        "the child ran in another namespace"
    );
    assert!(stdout.contains("pipeline bit-exact over tcp"), "{stdout}");
    assert!(stdout.contains("stage 1 bit-exact"), "{stdout}");
}

/// The half that runs inside the namespace (started by the test above; does nothing alone).
#[test]
#[ignore = "started by a_copied_trace_replays_bit_exact_inside_another_network_namespace"]
fn replay_half_run_inside_the_namespace() {
    let Some(trace) = std::env::var_os(TRACE_ENV) else {
        return;
    };
    let ns = std::fs::read_link("/proc/self/ns/net").expect("namespace");
    println!("child namespace: {}", ns.display());
    let rec = Arc::new(RecordedRun::open(&trace).expect("open the copied trace"));
    let opts = ReplayOptions {
        transport: Some(TransportKind::Tcp),
        threads: Some(2),
        ..ReplayOptions::default()
    };
    let r = replay_pipeline(rec.clone(), &opts).expect("pipeline replay");
    assert!(r.bit_exact, "{r:?}");
    println!(
        "pipeline bit-exact over tcp: {} transfers",
        r.counts.transfers_checked
    );
    let s = replay_stage(rec, 1, &ReplayOptions::default()).expect("stage replay");
    assert!(s.report.bit_exact, "{:?}", s.report);
    println!(
        "stage 1 bit-exact: {} transfers",
        s.report.counts.transfers_checked
    );
}
