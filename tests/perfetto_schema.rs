//! `slug export --format perfetto` checked against Perfetto's own schema: `perfetto_check.py`
//! decodes the export with the compiled protos of the `perfetto` PyPI package and checks there
//! are no unknown fields, that interned data, sequence defaults and clocks resolve, that slices
//! balance on every track and that every flow has both ends. The counts it prints are compared
//! with the trace's own logs.
//!
//! Skips, saying why, when python3 or the package is missing (`python3 -m pip install perfetto`;
//! `.ci/run` installs it).

use std::path::Path;
use std::process::Command;

use slug_schema::synth::{SynthConfig, write_trace};
use slug_schema::{Event, Trace};

fn slug(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_slug"))
        .args(args)
        .output()
        .expect("slug runs")
}

/// Why the check cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    match Command::new("python3")
        .args([
            "-c",
            "import perfetto.protos.perfetto.trace.perfetto_trace_pb2",
        ])
        .output()
    {
        Err(e) => Some(format!("python3 does not run ({e})")),
        Ok(o) if !o.status.success() => Some(format!(
            "the perfetto PyPI package is not installed (python3 -m pip install perfetto): {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
        Ok(_) => None,
    }
}

/// Kernel spans and distinct transfers in the trace's logs.
fn ground_truth(dir: &Path) -> (u64, u64) {
    let trace = Trace::open(dir).expect("trace opens");
    let mut kernels = 0;
    let mut transfers = std::collections::BTreeSet::new();
    for ep in &trace.manifest().endpoints {
        let log = trace.endpoint_log(ep.id).expect("log opens");
        for frame in log.frames() {
            for e in frame.expect("frame decodes").events {
                match e {
                    Event::KernelSpan(_) => kernels += 1,
                    Event::Transfer(x) => {
                        transfers.insert(x.id);
                    }
                    _ => {}
                }
            }
        }
    }
    (kernels, transfers.len() as u64)
}

/// Exports `dir` to Perfetto, runs the schema check and returns what it printed.
fn checked_export(dir: &Path, out: &Path) -> serde_json::Value {
    let run = slug(&[
        "export",
        dir.to_str().unwrap(),
        "--format",
        "perfetto",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    println!("{}", String::from_utf8_lossy(&run.stdout).trim());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/perfetto_check.py");
    let check = Command::new("python3")
        .arg(&script)
        .arg(out)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&check.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "perfetto_check.py printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&check.stderr)
        )
    });
    assert!(
        check.status.success(),
        "Perfetto's schema check failed: {}",
        report["errors"]
    );
    assert_eq!(report["error_count"], 0);
    report
}

#[test]
fn synthetic_export_decodes_with_perfettos_protos_and_balances() {
    if let Some(why) = unavailable() {
        println!("skipped: {why}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("trace");
    // Every event kind: kernel spans of 2 overlapping worker threads, transfers, steps,
    // snapshots, a loss, markers, counters, perf samples, context switches, page faults, eBPF
    // off-CPU intervals and PT chunks.
    let cfg = SynthConfig {
        stages: 3,
        steps: 40,
        microbatches: 2,
        layers_per_stage: 2,
        threads: 2,
        ..SynthConfig::default()
    };
    write_trace(&dir, &cfg).expect("synthetic trace written");
    let report = checked_export(&dir, &tmp.path().join("t.perfetto-trace"));
    println!("{report}");
    let (kernels, transfers) = ground_truth(&dir);
    assert_eq!(report["kernel_slices"], kernels);
    assert_eq!(report["flows"], transfers);
    // A transfer is two slices (send, recv); the rest are kernels and off-CPU intervals.
    let off_cpu = report["category:ebpf,off-cpu"].as_u64().unwrap_or(0);
    assert!(off_cpu > 0, "off-CPU intervals exported");
    assert_eq!(report["slices"], kernels + 2 * transfers + off_cpu);
    assert_eq!(report["annotation:seq"], kernels, "kernel slices carry seq");
    assert!(report["category:perf_software,context-switch"].as_u64() > Some(0));
    assert!(report["category:perf_software,page-fault"].as_u64() > Some(0));
    assert_eq!(report["primary_clock"], serde_json::json!([3]));
    assert!(report["compressed_batches"].as_u64() >= Some(1));
}

/// A recorded run: real kernel names, layers and kernels outside every layer.
#[test]
fn recorded_export_decodes_with_perfettos_protos_and_balances() {
    if let Some(why) = unavailable() {
        println!("skipped: {why}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
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
    let report = checked_export(&dir, &tmp.path().join("t.perfetto-trace"));
    println!("{report}");
    let (kernels, transfers) = ground_truth(&dir);
    assert!(kernels > 0 && transfers > 0);
    assert_eq!(report["kernel_slices"], kernels);
    assert_eq!(report["flows"], transfers);
    assert_eq!(report["annotation:seq"], kernels, "kernel slices carry seq");
}
