//! `--transport mpi` from the binary. Without the `mpi` feature: the flag says how to get it.
//! With it (`cargo test --features mpi --test mpi_cli`, Open MPI's `mpirun` on the PATH):
//! `mpirun -np S slug run|record|replay --transport mpi` gives the same tokens and transfer
//! hashes as local/shm/tcp, records a trace that replays bit-exact on threads and on MPI, and a
//! rank that dies ends the job with our message first. Run as root, so `mpirun` gets
//! `--allow-run-as-root`; `--oversubscribe` lets 3 ranks share 2 cores.

#[path = "support/cli.rs"]
mod cli;

#[cfg(not(feature = "mpi"))]
#[test]
fn without_the_feature_transport_mpi_says_how_to_build_it() {
    for args in [
        &["run", "--transport", "mpi", "--stages", "2"][..],
        &[
            "record",
            "--out",
            "/nonexistent/x",
            "--",
            "--transport",
            "mpi",
        ][..],
    ] {
        let out = cli::run(args);
        let t = cli::text(&out);
        assert_eq!(out.status.code(), Some(2), "{t}");
        assert!(t.contains("--features mpi"), "{t}");
        assert!(t.contains("libopenmpi-dev"), "{t}");
    }
}

#[test]
fn ladder_measures_raw_link_and_pipeline_rows_with_a_verdict() {
    let out = cli::run(&[
        "ladder",
        "--transport",
        "tcp",
        "--model",
        "tiny",
        "--stages",
        "2",
        "--tokens",
        "4",
        "--sequences",
        "1",
        "--json",
    ]);
    let t = cli::text(&out);
    assert!(out.status.success(), "{t}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let l = &v["ladders"][0];
    assert_eq!(l["transport"], "tcp", "{v}");
    // tiny: dim 64, the default prompt is 12 bytes: decode and prefill activations.
    assert_eq!(
        v["activation_bytes"],
        serde_json::json!([256, 12 * 256]),
        "{v}"
    );
    for row in ["raw", "link"] {
        for rung in l[row].as_array().expect("rungs") {
            assert!(rung["bytes_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
        }
    }
    // 2 stages, 4 tokens: 4 activations one way, 3 tokens back.
    assert_eq!(l["pipeline"]["transfers"], 7, "{v}");
    assert!(
        l["verdict"].as_str().unwrap_or("").contains("bottleneck"),
        "{v}"
    );
}

#[cfg(not(feature = "mpi"))]
#[test]
fn ladder_without_the_feature_says_how_to_get_the_mpi_rung() {
    let out = cli::run(&["ladder", "--transport", "mpi"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(cli::text(&out).contains("--features mpi"));
}

#[cfg(feature = "mpi")]
mod with_mpi {
    use super::cli::{run, slug, text};
    use std::path::Path;
    use std::process::{Command, Output, Stdio};
    use std::time::{Duration, Instant};

    /// One MPI job at a time: several 3-rank jobs at once on 2 cores would only measure the
    /// scheduler.
    static ONE_JOB: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Why this machine cannot run MPI jobs, if it cannot.
    fn skip_reason() -> Option<String> {
        match Command::new("mpirun").arg("--version").output() {
            Ok(o) if o.status.success() => None,
            _ => Some("no `mpirun` on the PATH (Debian: openmpi-bin libopenmpi-dev)".into()),
        }
    }

    /// The right to run one MPI job now, or `None` (saying why) where this machine cannot run
    /// MPI jobs.
    fn one_job() -> Option<std::sync::MutexGuard<'static, ()>> {
        let one = ONE_JOB.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return None;
        }
        Some(one)
    }

    /// `mpirun -np N slug ARGS`.
    fn mpirun(n: usize, args: &[&str]) -> Command {
        let mut c = Command::new("mpirun");
        c.args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &n.to_string(),
        ])
        .arg(slug())
        .args(args);
        c
    }

    fn json(out: &Output) -> serde_json::Value {
        assert!(out.status.success(), "{}", text(out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
    }

    const PIPELINE: [&str; 12] = [
        "--model",
        "tiny",
        "--layers",
        "3",
        "--stages",
        "3",
        "--sequences",
        "2",
        "--tokens",
        "6",
        "--prompt",
        // 41 bytes: the prefill's activations (41 x 256 B) are larger than the 4 KiB an MPI
        // link sends inline with the header, the decode steps' smaller, so both paths run.
        "mpi links move small and large transfers.",
    ];

    #[test]
    fn tokens_and_every_transfer_hash_match_local_shm_and_tcp() {
        let Some(_one) = one_job() else { return };
        let mut args: Vec<&str> = vec!["run", "--json", "--digests"];
        args.extend(PIPELINE);
        let mpi = json(
            &mpirun(3, &[&args[..], &["--transport", "mpi"]].concat())
                .output()
                .expect("mpirun"),
        );
        assert_eq!(mpi["transport"], "mpi");
        let hosts: Vec<_> = mpi["stage_reports"]
            .as_array()
            .expect("stages")
            .iter()
            .map(|s| s["host"].as_str().expect("host").to_string())
            .collect();
        assert_eq!(hosts.len(), 3);
        let digests = mpi["transfer_digests"].as_array().expect("digests");
        // 2 sequences x 6 steps over 2 activation links, tokens back for 5 steps.
        assert_eq!(digests.len(), 2 * 6 * 2 + 2 * 5, "{mpi}");
        let lens: Vec<u64> = digests.iter().filter_map(|d| d["len"].as_u64()).collect();
        assert!(
            lens.iter().any(|&n| n > 4096),
            "no transfer past 4 KiB: {lens:?}"
        );
        assert!(
            lens.iter().any(|&n| n <= 4096),
            "no inline transfer: {lens:?}"
        );
        for transport in ["local", "shm", "tcp"] {
            let other = json(&run(&[&args[..], &["--transport", transport]].concat()));
            assert_eq!(
                other["sequence_tokens"], mpi["sequence_tokens"],
                "{transport}"
            );
            assert_eq!(
                other["transfer_digests"], mpi["transfer_digests"],
                "{transport}"
            );
        }
    }

    #[test]
    fn a_recording_under_mpirun_replays_bit_exact_on_threads_and_on_mpi() {
        let Some(_one) = one_job() else { return };
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("trace");
        let trace = out.to_str().expect("utf-8 path");
        let mut args = vec![
            "record",
            "--out",
            trace,
            "--payloads",
            "all",
            "--hash-kernels",
            "--perf",
            "none",
            "--ebpf",
            "none",
            "--json",
            "--",
            "--transport",
            "mpi",
        ];
        args.extend(PIPELINE);
        let summary = json(&mpirun(3, &args).output().expect("mpirun"));
        assert_eq!(summary["endpoints"].as_array().map(Vec::len), Some(3));
        // Every rank's files were gathered and its scratch copy removed.
        for s in 0..3 {
            assert!(out.join(format!("endpoints/{s}.slog")).is_file());
        }
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).expect("manifest"))
                .expect("manifest json");
        for (s, ep) in manifest["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .enumerate()
        {
            assert_eq!(ep["rank"], s, "{ep}");
            assert!(!ep["host"].as_str().unwrap_or("").is_empty(), "{ep}");
        }
        let clocks = manifest["clocks"].as_array().expect("clocks");
        assert_eq!(clocks.len(), 3, "{manifest}");
        assert!(
            clocks[1]["node"]
                .as_str()
                .unwrap_or("")
                .starts_with("rank 1 on ")
        );
        assert_eq!(manifest["run"]["pipeline"]["transport"], "mpi");
        let threads = run(&["replay", trace, "--verify", "kernel"]);
        assert_eq!(threads.status.code(), Some(0), "{}", text(&threads));
        assert!(text(&threads).contains("bit-exact"), "{}", text(&threads));
        let on_mpi = mpirun(
            3,
            &["replay", trace, "--transport", "mpi", "--verify", "kernel"],
        )
        .output()
        .expect("mpirun replay");
        assert_eq!(on_mpi.status.code(), Some(0), "{}", text(&on_mpi));
        let t = text(&on_mpi);
        assert!(
            t.contains("pipeline on mpi") && t.contains("bit-exact"),
            "{t}"
        );
        // A fault injected into the MPI replay is found where it was put.
        let fault = mpirun(
            3,
            &[
                "replay",
                trace,
                "--transport",
                "mpi",
                "--verify",
                "kernel",
                "--inject",
                "stage=1,layer=1,kernel=down,step=3",
                "--json",
            ],
        )
        .output()
        .expect("mpirun replay");
        assert_eq!(fault.status.code(), Some(1), "{}", text(&fault));
        let report: serde_json::Value = serde_json::from_slice(&fault.stdout).expect("json");
        assert_eq!(report["first"]["endpoint"], 1, "{report}");
        assert_eq!(report["first"]["kernel"], "down", "{report}");
    }

    /// The manifest's mpi table as `slug info` and both exports show it: the communicator,
    /// and per transfer event its ranks and tags, which must be what the link backend used
    /// (ranks of the ring, tags from `slug_transport::mpi_wire`).
    #[test]
    fn a_recording_under_mpirun_names_each_transfer_s_communicator_tag_and_ranks() {
        use slug_transport::mpi_wire::{COMMUNICATOR, INLINE, header_tag, payload_tag};
        let Some(_one) = one_job() else { return };
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("trace");
        let trace = out.to_str().expect("utf-8 path");
        let mut args = vec![
            "record",
            "--out",
            trace,
            "--perf",
            "none",
            "--ebpf",
            "none",
            "--",
            "--transport",
            "mpi",
        ];
        args.extend(PIPELINE);
        let rec = mpirun(3, &args).output().expect("mpirun");
        assert!(rec.status.success(), "{}", text(&rec));

        let info = run(&["info", trace, "--json"]);
        let info = json(&info);
        let mpi = &info["mpi"];
        assert_eq!(mpi["communicator"], COMMUNICATOR, "{info}");
        assert_eq!(mpi["inline_limit"], INLINE as u64, "{info}");
        let links = mpi["links"].as_array().expect("links");
        assert_eq!(links.len(), 3, "{mpi}");
        for (l, link) in links.iter().enumerate() {
            assert_eq!(link["link"], l, "{link}");
            assert_eq!(link["source_rank"], l, "{link}");
            assert_eq!(link["dest_rank"], (l + 1) % 3, "{link}");
            assert_eq!(link["header_tag"], header_tag(l as u32), "{link}");
            assert_eq!(link["payload_tag"], payload_tag(l as u32), "{link}");
        }
        let shown = text(&run(&["info", trace]));
        assert!(
            shown.contains("mpi links (communicator MPI_COMM_WORLD)"),
            "{shown}"
        );

        let chrome = dir.path().join("t.json");
        let exported = run(&[
            "export",
            trace,
            "--format",
            "chrome",
            "--out",
            chrome.to_str().expect("utf-8"),
        ]);
        assert!(exported.status.success(), "{}", text(&exported));
        let events = slug_viewer::export::chrome::read_events(&chrome).expect("chrome json");
        let (mut slices, mut inline, mut two_messages) = (0, 0, 0);
        for e in events
            .iter()
            .filter(|e| e["cat"] == "transfer" && e["ph"] == "X")
        {
            let a = &e["args"];
            let link = (a["id"].as_u64().expect("id") >> 40) as u32;
            assert_eq!(a["transport"], "mpi", "{e}");
            assert_eq!(a["communicator"], COMMUNICATOR, "{e}");
            assert_eq!(a["source_rank"], link, "{e}");
            assert_eq!(a["dest_rank"], (link + 1) % 3, "{e}");
            assert_eq!(a["tag"], header_tag(link), "{e}");
            if a["bytes"].as_u64().expect("bytes") > INLINE as u64 {
                assert_eq!(a["payload_tag"], payload_tag(link), "{e}");
                two_messages += 1;
            } else {
                assert!(a.get("payload_tag").is_none(), "{e}");
                inline += 1;
            }
            slices += 1;
        }
        // A send and a recv slice per transfer: 2 x (2 x 6 x 2 + 2 x 5).
        assert_eq!(slices, 2 * (2 * 6 * 2 + 2 * 5), "{slices} transfer slices");
        assert!(
            inline > 0 && two_messages > 0,
            "{inline} inline, {two_messages} not"
        );

        let perfetto = dir.path().join("t.perfetto-trace");
        let exported = run(&["export", trace, "--out", perfetto.to_str().expect("utf-8")]);
        assert!(exported.status.success(), "{}", text(&exported));
        let data = std::fs::read(&perfetto).expect("perfetto file");
        let c = slug_viewer::export::perfetto::read(&data).expect("perfetto");
        for name in [
            "transport",
            "communicator",
            "source_rank",
            "dest_rank",
            "tag",
        ] {
            assert_eq!(c.annotations.get(name), Some(&slices), "{name}");
        }
        assert_eq!(c.annotations.get("payload_tag"), Some(&two_messages));
    }

    #[test]
    fn a_rank_that_dies_ends_the_job_with_our_message_first() {
        let Some(_one) = one_job() else { return };
        // A run far longer than the test waits: it only ends by the failure.
        let mut child = mpirun(
            3,
            &[
                "run",
                "--model",
                "tiny",
                "--layers",
                "3",
                "--stages",
                "3",
                "--transport",
                "mpi",
                "--max-seq",
                "16384",
                "--tokens",
                "16000",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun");
        let rank2 = wait_for_rank(child.id(), 2, Duration::from_secs(30))
            .expect("rank 2 did not start within 30 s");
        // Let the ranks connect and run a few steps.
        std::thread::sleep(Duration::from_millis(3000));
        assert!(
            child.try_wait().expect("wait").is_none(),
            "ended before the kill"
        );
        let killed = Instant::now();
        Command::new("kill")
            .args(["-9", &rank2.to_string()])
            .status()
            .expect("kill");
        let out = child.wait_with_output().expect("mpirun output");
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "took {:?}",
            killed.elapsed()
        );
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        let ours = err
            .find("slug: error: rank ")
            .unwrap_or_else(|| panic!("{err}"));
        let theirs = err
            .find("process rank 2")
            .unwrap_or_else(|| panic!("mpirun did not name rank 2: {err}"));
        assert!(ours < theirs, "{err}");
        // Ours names a surviving rank, its host and where it was (a step; on a machine so
        // loaded that the ranks were still starting after 3 s, startup).
        let line = &err[ours..];
        let line = &line[..line.find('\n').unwrap_or(line.len())];
        assert!(line.contains(" on "), "{line}");
        assert!(
            line.contains("at step ") || line.contains("at startup"),
            "{line}"
        );
    }

    /// Runs `mpirun -np 2 slug ARGS` with rank 1 stopping itself (SIGSTOP, through the
    /// documented `SLUG_FAULT_MPI_STOP`) once its stage has run, before `phase`; returns rank
    /// 0's error line (see [`silent_rank`]).
    fn silent_rank_1(phase: &str, args: &[&str]) -> String {
        silent_rank(1, phase, args)
    }

    /// Runs `mpirun -np 2 slug ARGS` with rank `stopped` stopping itself before `phase`;
    /// returns the other rank's error line, after checking the job ended on its own (the other
    /// rank's bounded wait, then its abort) and SIGKILLing the stopped rank should anything be
    /// left of it.
    fn silent_rank(stopped: usize, phase: &str, args: &[&str]) -> String {
        let waiter = 1 - stopped;
        let mut child = mpirun(2, args)
            .env("SLUG_FAULT_MPI_STOP", format!("{stopped}:{phase}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mpirun");
        let stopped_pid = wait_for_rank(child.id(), stopped, Duration::from_secs(30));
        // Generous: the wait is 1 s; the rest is start-up and mpirun's teardown on 2 busy
        // cores. Only a hang reaches it.
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut ended = None;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("wait") {
                ended = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if ended.is_none() {
            let _ = child.kill();
        }
        if let Some(pid) = stopped_pid {
            // Never left behind, even if the job hung.
            let _ = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let out = child.wait_with_output().expect("mpirun output");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let status =
            ended.unwrap_or_else(|| panic!("rank {waiter} hung on a silent rank {stopped}: {err}"));
        assert!(!status.success(), "{err}");
        assert!(
            err.contains(&format!(
                "rank {stopped}: stopping itself before its {phase}"
            )),
            "rank {stopped} did not stop where asked: {err}"
        );
        let ours = err
            .find(&format!("slug: error: rank {waiter} "))
            .unwrap_or_else(|| panic!("no error from rank {waiter}: {err}"));
        let line = &err[ours..];
        line[..line.find('\n').unwrap_or(line.len())].to_string()
    }

    #[test]
    fn rank_0_waiting_on_a_silent_rank_s_report_fails_within_the_timeout() {
        let Some(_one) = one_job() else { return };
        let mut args = vec!["run"];
        args.extend(TWO_STAGES);
        let line = silent_rank_1("report", &args);
        assert!(line.contains("rank 1 on "), "{line}");
        assert!(line.contains("its stage report was awaited"), "{line}");
        assert!(line.contains("raise --timeout-ms"), "{line}");
    }

    #[test]
    fn rank_0_gathering_a_silent_rank_s_recording_fails_within_the_timeout() {
        let Some(_one) = one_job() else { return };
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("trace");
        let line = silent_rank_1("files", &record_args(out.to_str().expect("utf-8 path")));
        assert!(line.contains("rank 1 on "), "{line}");
        assert!(
            line.contains("its list of recorded files was awaited"),
            "{line}"
        );
        assert!(line.contains("raise --timeout-ms"), "{line}");
    }

    /// `slug record ... --transport mpi --timeout-ms 1000` on 2 ranks of `tiny`.
    fn record_args(trace: &str) -> Vec<&str> {
        let mut args = vec![
            "record", "--out", trace, "--perf", "none", "--ebpf", "none", "--",
        ];
        args.extend(TWO_STAGES);
        args
    }

    /// A two-stage `tiny` pipeline over MPI whose waits last at most 1 s.
    const TWO_STAGES: [&str; 12] = [
        "--model",
        "tiny",
        "--layers",
        "2",
        "--stages",
        "2",
        "--tokens",
        "2",
        "--transport",
        "mpi",
        "--timeout-ms",
        "1000",
    ];

    /// Checks that rank 1's error names rank 0, its host, and `awaited`.
    fn names_rank_0(line: &str, awaited: &str) {
        assert!(line.starts_with("slug: error: rank 1 of 2 on "), "{line}");
        assert!(line.contains("rank 0 on "), "no host of rank 0: {line}");
        assert!(
            line.contains(&format!("{awaited} was awaited")),
            "not what was awaited: {line}"
        );
        assert!(line.contains("raise --timeout-ms"), "{line}");
    }

    #[test]
    fn a_rank_waiting_on_a_silent_rank_0_s_clock_ping_fails_within_the_timeout() {
        let Some(_one) = one_job() else { return };
        let mut args = vec!["run"];
        args.extend(TWO_STAGES);
        let line = silent_rank(0, "clock", &args);
        names_rank_0(&line, "a clock ping");
    }

    #[test]
    fn a_rank_waiting_on_a_silent_rank_0_s_configuration_fails_within_the_timeout() {
        let Some(_one) = one_job() else { return };
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("trace");
        let line = silent_rank(0, "config", &record_args(out.to_str().expect("utf-8")));
        names_rank_0(&line, "the run's configuration");
    }

    #[test]
    fn a_rank_waiting_on_a_silent_rank_0_while_gathering_fails_within_the_timeout() {
        let Some(_one) = one_job() else { return };
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("trace");
        let line = silent_rank(0, "gather", &record_args(out.to_str().expect("utf-8")));
        names_rank_0(&line, "the list of files it wants from this rank");
    }

    /// The pid of rank `rank` among `mpirun`'s children, once it exists.
    fn wait_for_rank(mpirun: u32, rank: usize, within: Duration) -> Option<u32> {
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        let start = Instant::now();
        while start.elapsed() < within {
            for entry in std::fs::read_dir("/proc").ok()?.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let dir = Path::new("/proc").join(pid.to_string());
                let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
                // Field 4 of stat is the parent pid (after the parenthesised command name).
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                if ppid != Some(mpirun) {
                    continue;
                }
                let env = std::fs::read(dir.join("environ")).unwrap_or_default();
                if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
                    return Some(pid);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    #[test]
    fn the_ladder_measures_mpi_between_ranks_and_runs_the_pipeline_on_them() {
        let Some(_one) = one_job() else { return };
        let out = mpirun(
            2,
            &[
                "ladder",
                "--transport",
                "mpi",
                "--model",
                "tiny",
                "--stages",
                "2",
                "--tokens",
                "4",
                "--sequences",
                "1",
                "--json",
            ],
        )
        .output()
        .expect("mpirun");
        let v = json(&out);
        let l = &v["ladders"][0];
        assert_eq!(l["transport"], "mpi", "{v}");
        assert_eq!(l["raw"].as_array().map(Vec::len), Some(2), "{v}");
        assert_eq!(l["link"].as_array().map(Vec::len), Some(2), "{v}");
        assert_eq!(l["pipeline"]["transfers"], 7, "{v}");
        assert!(
            l["verdict"].as_str().unwrap_or("").contains("bottleneck"),
            "{v}"
        );
    }

    #[test]
    fn a_job_with_the_wrong_number_of_ranks_is_refused_by_rank_0() {
        let Some(_one) = one_job() else { return };
        let out = mpirun(
            2,
            &[
                "run",
                "--model",
                "tiny",
                "--stages",
                "1",
                "--transport",
                "mpi",
            ],
        )
        .output()
        .expect("mpirun");
        assert!(!out.status.success());
        let t = text(&out);
        assert!(t.contains("mpirun -np 1"), "{t}");
        assert_eq!(t.matches("this MPI job has 2 rank(s)").count(), 1, "{t}");
    }
}
