//! `slug record --ebpf` end to end: as root the trace holds eBPF probe output (kind `ebpf`) and
//! no perf software records (the probes record the same switches and faults), `--ebpf none`
//! holds no eBPF events and perf's records under their own kind (`perf_software`), and a recording
//! made without root says in one line which probes are missing and why, and the manifest says so
//! too. The tests that need root print why they skipped without it.

use std::path::Path;
use std::process::{Command, Output};

fn slug(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(args)
        .output()
        .expect("the slug binary runs")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn capability<'a>(manifest: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    manifest["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no capability {name} in {manifest}"))
}

fn kind_count(info: &serde_json::Value, kind: &str) -> u64 {
    info["counts"][kind].as_u64().unwrap_or(0)
}

#[test]
fn as_root_the_probes_record_off_cpu_intervals_apart_from_perf_records() {
    if !is_root() {
        println!("skipped: loading eBPF probes needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (ebpf, expect) in [("auto", true), ("none", false)] {
        let out = dir.path().join(format!("trace-{ebpf}"));
        let o = slug(&[
            "record",
            "--out",
            out.to_str().unwrap(),
            "--ebpf",
            ebpf,
            "--stages",
            "2",
            "--tokens",
            "8",
        ]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        let manifest = json(&out.join("manifest.json"));
        let off_cpu = capability(&manifest, "ebpf_off_cpu");
        assert_eq!(off_cpu["captured"], expect, "{off_cpu}");
        let info = slug(&["info", out.to_str().unwrap(), "--json"]);
        assert!(info.status.success());
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        let ebpf_events = kind_count(&info, "ebpf");
        if expect {
            assert!(ebpf_events > 0, "no ebpf events: {info}");
            // A single probe the kernel lacks (page_fault_user is x86-only) may be named; the
            // probes as a whole must load.
            assert!(!stderr.contains("no eBPF probes:"), "{stderr}");
        } else {
            assert_eq!(ebpf_events, 0, "--ebpf none recorded eBPF events: {info}");
        }
        // perf's context switches and page faults are their own kind, never eBPF events; with
        // the probes on, perf does not record them again.
        let perf_software = kind_count(&info, "perf_software");
        assert_eq!(perf_software > 0, !expect, "{info}");
    }
    let export = dir.path().join("t.json");
    let o = slug(&[
        "export",
        dir.path().join("trace-auto").to_str().unwrap(),
        "--format",
        "chrome",
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let doc = json(&export);
    let off_cpu = doc["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["cat"] == "ebpf,off-cpu")
        .count();
    assert!(off_cpu > 0, "the export has no off-CPU slices");
}

#[test]
fn without_root_the_recording_says_which_probes_are_missing() {
    if !is_root() {
        println!("skipped: this test drops from root to nobody; run it as root");
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        println!("skipped: setpriv (util-linux) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // nobody must be able to create the trace directory.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let out = dir.path().join("trace");
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_slug"))
        .args(["record", "--out", out.to_str().unwrap(), "--tokens", "3"])
        .output()
        .expect("setpriv runs");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("eBPF")).collect();
    assert_eq!(lines.len(), 1, "one line about eBPF: {stderr}");
    assert!(
        lines[0].contains("needs root or CAP_BPF") && lines[0].contains("instead"),
        "{}",
        lines[0]
    );
    let manifest = json(&out.join("manifest.json"));
    for name in [
        "ebpf_off_cpu",
        "ebpf_syscalls",
        "ebpf_page_faults",
        "ebpf_migrations",
        "ebpf_tcp",
    ] {
        let c = capability(&manifest, name);
        assert_eq!(c["requested"], true, "{c}");
        assert_eq!(c["captured"], false, "{c}");
        assert!(c["reason"].as_str().unwrap().contains("CAP_BPF"), "{c}");
    }
}

#[test]
fn as_root_a_recording_holds_syscall_histograms_per_step() {
    use slug_schema::{EbpfKind, Event, EventKind, KindSet, TimeRange, Trace};
    if !is_root() {
        println!("skipped: eBPF probes need root (or CAP_BPF + CAP_PERFMON)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace");
    let o = slug(&[
        "record",
        "--out",
        out.to_str().unwrap(),
        "--ebpf",
        "syscalls",
        "--",
        "--stages",
        "2",
        "--tokens",
        "8",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest = json(&out.join("manifest.json"));
    if capability(&manifest, "ebpf_syscalls")["captured"] != true {
        println!("skipped: the syscall probes did not attach here: {manifest}");
        return;
    }
    let trace = Trace::open(&out).unwrap();
    let mut per_step = 0;
    for endpoint in 0..2 {
        let log = trace.endpoint_log(endpoint).unwrap();
        let kinds = KindSet::of(&[EventKind::StepBoundary, EventKind::Ebpf]);
        let mut steps = std::collections::BTreeSet::new();
        let mut histogram_steps = std::collections::BTreeSet::new();
        for e in log.events_in(TimeRange::ALL, kinds) {
            match e.unwrap() {
                Event::StepBoundary(b) => {
                    steps.insert(b.step);
                }
                Event::Ebpf(b) if b.kind == EbpfKind::SyscallHistogram && b.arg1 >> 8 != 0 => {
                    assert_eq!(b.tid, 0, "a per-step histogram covers the stage: {b:?}");
                    assert!(b.arg2 > 0, "an empty histogram bucket was written: {b:?}");
                    histogram_steps.insert((b.arg1 >> 8) - 1);
                    per_step += 1;
                }
                _ => {}
            }
        }
        // Syscalls before the first step boundary count in step 0.
        steps.insert(0);
        assert!(
            histogram_steps.is_subset(&steps),
            "endpoint {endpoint}: histograms of steps {histogram_steps:?}, steps {steps:?}"
        );
    }
    assert!(per_step > 0, "no per-step syscall histogram in the trace");
}
