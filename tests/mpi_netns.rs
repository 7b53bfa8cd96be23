//! `mpirun` across network namespaces (feature `mpi`): two namespaces on a private bridge
//! (10.81.0.0/24) stand for two hosts. Open MPI starts its daemon in each through a
//! `plm_rsh_agent` script that runs the command with `ip netns exec` (no ssh), and its
//! out-of-band and MPI traffic are restricted to the bridge's subnet (`btl tcp,self`: no shared
//! memory between the "hosts"). The run gives local's tokens and transfer hashes; a recording
//! gathered over MPI replays bit for bit. Needs root, `ip` and `mpirun`; otherwise it says why
//! it skipped. A guard tears down everything it creates. Each namespace gets its own Open MPI
//! session directory, as a host has its own /tmp (shared, the daemons raced on it and crashed),
//! and a launch that still hangs fails after [`DEADLINE`] saying what was left running.
#![cfg(feature = "mpi")]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "support/netns.rs"]
mod netns;

use netns::{Testbed, skip_reason};

const RANKS: usize = 2;
const SUBNET: &str = "10.81.0";
/// Seconds mpirun waits for its daemons to report in (`orte_startup_timeout`).
const STARTUP_TIMEOUT_S: u64 = 60;
/// Longest one mpirun of this test may take before the test ends it and fails, saying where
/// the launch was: generous on a loaded 2-core machine, where a run takes a few seconds.
const DEADLINE: Duration = Duration::from_secs(150);

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
    // and every launch (and how it ended) is logged so the test can tell both namespaces were
    // used, and say what happened when a launch fails.
    let log = dir.path().join("launches");
    let mut script = String::from("#!/bin/sh\nhost=\"$1\"; shift\ncase \"$host\" in\n");
    for (addr, ns) in addrs.iter().zip(bed.namespaces()) {
        script.push_str(&format!("  {addr}) ns={ns} ;;\n"));
    }
    // Each "host" gets its own Open MPI session directory, as separate machines have their
    // own /tmp: the namespaces share the file system and the host name, so by default mpirun
    // and both daemons use one session tree, race creating its directories ("mkdir ...: File
    // exists", orte_init fails) and write one shared topology file (hwloc.sm) at once (a
    // daemon segfaults in hwloc_shmem_topology_write).
    let sessions = dir.path().join("sessions");
    script.push_str(&format!(
        "  *) echo \"no namespace for $host\" >&2; exit 1 ;;\nesac\n\
         mkdir -p {sessions}/$ns || exit 1\n\
         export OMPI_MCA_orte_tmpdir_base={sessions}/$ns\n\
         echo \"$ns\" >> {log}\nip netns exec \"$ns\" sh -c \"$*\"\nrc=$?\n\
         echo \"$ns: daemon exited with status $rc\" >> {log}\nexit $rc\n",
        log = log.display(),
        sessions = sessions.display()
    ));
    let agent = dir.path().join("agent.sh");
    std::fs::write(&agent, script).expect("agent script");
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let hostfile = dir.path().join("hosts");
    let hosts: String = addrs.iter().map(|a| format!("{a} slots=1\n")).collect();
    std::fs::write(&hostfile, hosts).expect("hostfile");
    let subnet = format!("{SUBNET}.0/24");
    let mpirun = |args: &[&str]| -> Output {
        let mut cmd = Command::new("mpirun");
        cmd.args(["--allow-run-as-root", "--hostfile"])
            .arg(&hostfile)
            .args(["-np", &RANKS.to_string(), "--mca", "plm_rsh_agent"])
            .arg(&agent)
            .args(["--mca", "plm_rsh_no_tree_spawn", "1"])
            // Without it, plm_rsh_no_tree_spawn makes each daemon daemonize: the agent returns
            // at once and a daemon that then dies (or never calls back) is waited for forever.
            // Attached, a daemon's end is its agent's exit, which mpirun reports.
            .arg("--leave-session-attached")
            // A daemon that runs but never reports in fails the launch instead of hanging it.
            .args([
                "--mca",
                "orte_startup_timeout",
                &STARTUP_TIMEOUT_S.to_string(),
            ])
            .args(["--mca", "oob_tcp_if_include", &subnet])
            .args(["--mca", "btl", "tcp,self"])
            .args(["--mca", "btl_tcp_if_include", &subnet])
            .arg(slug())
            .args(args);
        bounded(cmd, dir.path(), &bed, &log)
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

/// Runs `cmd` (an mpirun) in its own process group with its output in files under `dir` (not
/// pipes, which a daemon left behind would hold open), for at most [`DEADLINE`]. Past it, the
/// test says what was still running and what the agent logged, ends the process group and
/// every process in the namespaces, and fails: a hung launch is a bounded failure.
fn bounded(mut cmd: Command, dir: &Path, bed: &Testbed, log: &Path) -> Output {
    let (out, err) = (dir.join("mpirun.stdout"), dir.join("mpirun.stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .process_group(0)
        .spawn()
        .expect("start mpirun (Debian: openmpi-bin)");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for mpirun") {
            break Some(status);
        }
        if start.elapsed() > DEADLINE {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |p: &Path| std::fs::read(p).unwrap_or_default();
    if let Some(status) = status {
        return Output {
            status,
            stdout: read(&out),
            stderr: read(&err),
        };
    }
    let left = bed.processes();
    let launches = std::fs::read_to_string(log).unwrap_or_default();
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .status();
    bed.kill_processes();
    let _ = child.wait();
    panic!(
        "mpirun did not finish within {} s: ended it and everything in the namespaces\n\
         agent log:\n{launches}\nstill running in the namespaces:\n{left}\nmpirun said:\n{}{}",
        DEADLINE.as_secs(),
        String::from_utf8_lossy(&read(&out)),
        String::from_utf8_lossy(&read(&err))
    );
}
