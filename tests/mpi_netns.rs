//! `mpirun` across network namespaces (feature `mpi`): two namespaces on a private bridge
//! (10.81.0.0/24) stand for two hosts. Open MPI starts its daemon in each through a
//! `plm_rsh_agent` script that runs the command with `ip netns exec` (no ssh), and its
//! out-of-band and MPI traffic are restricted to the bridge's subnet (`btl tcp,self`: no shared
//! memory between the "hosts"). The run gives local's tokens and transfer hashes; a recording
//! gathered over MPI replays bit for bit. Needs root, `ip` and `mpirun`; otherwise it says why
//! it skipped. A guard tears down everything it creates.
#![cfg(feature = "mpi")]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

#[path = "support/netns.rs"]
mod netns;

use netns::{Testbed, skip_reason};

const RANKS: usize = 2;
const SUBNET: &str = "10.81.0";

fn slug() -> &'static str {
    env!("CARGO_BIN_EXE_slug")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
#[ignore = "about 1 run in 3 mpirun hangs before any rank prints (Open MPI's launch across \
            namespaces; cause not found yet): run with --ignored"]
fn mpirun_across_namespaces_runs_records_and_replays_bit_for_bit() {
    if let Some(why) = skip_reason(SUBNET) {
        eprintln!("mpi netns test skipped: {why}");
        return;
    }
    if Command::new("mpirun").arg("--version").output().is_err() {
        eprintln!("mpi netns test skipped: no mpirun (Debian: openmpi-bin libopenmpi-dev)");
        return;
    }
    let mut bed = Testbed::new("sm", SUBNET, RANKS);
    let addrs = match bed.build() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mpi netns test skipped: cannot build the test network: {e}");
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    // The "remote shell": the namespace that owns the host address runs the daemon's command,
    // and every launch is logged so the test can tell both namespaces were used.
    let log = dir.path().join("launches");
    let mut script = String::from("#!/bin/sh\nhost=\"$1\"; shift\ncase \"$host\" in\n");
    for (addr, ns) in addrs.iter().zip(bed.namespaces()) {
        script.push_str(&format!("  {addr}) ns={ns} ;;\n"));
    }
    script.push_str(&format!(
        "  *) echo \"no namespace for $host\" >&2; exit 1 ;;\nesac\n\
         echo \"$ns\" >> {}\nexec ip netns exec \"$ns\" sh -c \"$*\"\n",
        log.display()
    ));
    let agent = dir.path().join("agent.sh");
    std::fs::write(&agent, script).expect("agent script");
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let hostfile = dir.path().join("hosts");
    let hosts: String = addrs.iter().map(|a| format!("{a} slots=1\n")).collect();
    std::fs::write(&hostfile, hosts).expect("hostfile");
    let subnet = format!("{SUBNET}.0/24");
    let mpirun = |args: &[&str]| -> Output {
        Command::new("timeout")
            .arg("120")
            .arg("mpirun")
            .args(["--allow-run-as-root", "--hostfile"])
            .arg(&hostfile)
            .args(["-np", &RANKS.to_string(), "--mca", "plm_rsh_agent"])
            .arg(&agent)
            .args(["--mca", "plm_rsh_no_tree_spawn", "1"])
            .args(["--mca", "oob_tcp_if_include", &subnet])
            .args(["--mca", "btl", "tcp,self"])
            .args(["--mca", "btl_tcp_if_include", &subnet])
            .arg(slug())
            .args(args)
            .output()
            .expect("mpirun")
    };
    let pipeline = [
        "--model",
        "tiny",
        "--stages",
        "2",
        "--sequences",
        "2",
        "--tokens",
        "5",
    ];
    let run = mpirun(
        &[
            &["run", "--transport", "mpi", "--json", "--digests"][..],
            &pipeline,
        ]
        .concat(),
    );
    assert!(run.status.success(), "{}", text(&run));
    let launched = std::fs::read_to_string(&log).expect("launch log");
    for ns in bed.namespaces() {
        assert!(
            launched.lines().any(|l| l == ns),
            "{ns} not used: {launched}"
        );
    }
    let local = Command::new(slug())
        .args([&["run", "--json", "--digests"][..], &pipeline].concat())
        .output()
        .expect("local run");
    assert!(local.status.success(), "{}", text(&local));
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_slice(&run.stdout).expect("json"),
        serde_json::from_slice(&local.stdout).expect("json"),
    );
    assert_eq!(a["sequence_tokens"], b["sequence_tokens"]);
    assert_eq!(a["transfer_digests"], b["transfer_digests"]);

    let trace = dir.path().join("trace");
    let t = trace.to_str().expect("utf-8");
    let rec = mpirun(
        &[
            &[
                "record",
                "--out",
                t,
                "--payloads",
                "all",
                "--perf",
                "none",
                "--ebpf",
                "none",
            ][..],
            &["--", "--transport", "mpi"],
            &pipeline,
        ]
        .concat(),
    );
    assert!(rec.status.success(), "{}", text(&rec));
    let replay = Command::new(slug())
        .args(["replay", t, "--transport", "tcp"])
        .output()
        .expect("replay");
    assert_eq!(replay.status.code(), Some(0), "{}", text(&replay));
    assert!(text(&replay).contains("bit-exact"), "{}", text(&replay));
}
