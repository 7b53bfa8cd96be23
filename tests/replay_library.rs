//! Replays of recorded traces: bit-exact on other transports and thread counts, single stages
//! from snapshots and recorded payloads, and divergence reports that point at exactly the
//! injected fault — whether the fault is in the replay or in the recording.

#[path = "support/recorded.rs"]
mod recorded;

use std::sync::Arc;

use slug_recorder::observe::PayloadPolicy;
use slug_replayer::{
    RecordedRun, ReplayError, ReplayOptions, Verify, npy, place_of, replay_pipeline, replay_stage,
    send_tags,
};
use slug_transport::inject::Injection;
use slug_transport::transfer::TransportKind;

use recorded::{pipeline, record_trace};

const FAULT: &str = "stage=1,layer=3,kernel=down,step=5,element=7";

fn open(dir: &std::path::Path) -> Arc<RecordedRun> {
    Arc::new(RecordedRun::open(dir).expect("open trace"))
}

fn inject() -> Option<Injection> {
    Some(FAULT.parse().expect("fault spec"))
}

/// The trace id stage 1 gave its step-5 transfer (schedule: step 5 is decode step 2 of
/// sequence 1, so it is link 1's sixth transfer).
fn stage1_step5_id() -> u64 {
    let tags = send_tags(&pipeline());
    let n = tags[1]
        .iter()
        .position(|t| t.step == 2 && t.sequence == 1)
        .expect("tag") as u64;
    assert_eq!(n, 5);
    slug_schema::TransferKey { link: 1, seq: n }.pack()
}

#[test]
fn a_clean_trace_replays_bit_exact_on_other_transports_and_thread_counts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace");
    record_trace(&out, &pipeline(), PayloadPolicy::None, 0, false);
    let rec = open(&out);
    // 3 stages x 8 steps; the last stage sends back all but each sequence's last token.
    assert_eq!(rec.sent_count(), 8 + 8 + 6);
    for (transport, threads) in [(None, None), (Some(TransportKind::Tcp), Some(2))] {
        let opts = ReplayOptions {
            transport,
            threads,
            ..ReplayOptions::default()
        };
        let r = replay_pipeline(rec.clone(), &opts).expect("replay");
        assert!(r.bit_exact, "{r:?}");
        assert_eq!(r.counts.transfers_checked, 22);
        assert_eq!(r.first, None);
    }
    // Steps 2..=4 only: every stage stops after step 4. Stages 0 and 1 send at steps 2, 3
    // and 4; the last stage sends back only the step-2 token, the others would feed steps 5
    // and 6, which do not run.
    let part = ReplayOptions {
        from_step: Some(2),
        to_step: Some(4),
        transport: Some(TransportKind::Shm),
        ..ReplayOptions::default()
    };
    let r = replay_pipeline(rec.clone(), &part).expect("partial replay");
    assert!(r.bit_exact, "{r:?}");
    assert_eq!(r.checked_steps, (2, 4));
    assert_eq!(r.counts.transfers_checked, 3 + 3 + 1);
}

#[test]
fn replaying_a_clean_trace_under_injection_names_the_injected_place() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace");
    record_trace(&out, &pipeline(), PayloadPolicy::All, 4, true);
    let rec = open(&out);
    for (verify, from_step) in [
        (Verify::Transfer, None),
        (Verify::Kernel, None),
        (Verify::Kernel, Some(5)),
    ] {
        let opts = ReplayOptions {
            verify,
            from_step,
            inject: inject(),
            ..ReplayOptions::default()
        };
        let r = replay_pipeline(rec.clone(), &opts).expect("replay");
        assert!(!r.bit_exact);
        // Resumed at the step-4 snapshots when asked to check from step 5.
        let start = if from_step.is_some() { 4 } else { 0 };
        assert_eq!(r.started_at, vec![start; 3]);
        let d = r.first.expect("a divergence");
        assert_eq!((d.endpoint, d.step), (1, 5), "{d:?}");
        let place = place_of(rec.config(), d.step).expect("place");
        assert_eq!((place.decode_step, place.seq), (2, 1));
        assert_eq!(d.transfer_id, Some(stage1_step5_id()));
        // Layer 3 is stage 1's last: the flipped element reaches its outbox unchanged.
        assert_eq!(d.offset, Some(7));
        assert_ne!(d.expected, d.got);
        // Stage 2 still picks the same tokens, so nothing after this transfer differs.
        assert_eq!(d.later_differing, r.counts.transfers_differing - 1);
        assert_eq!(r.counts.transfers_differing, 1);
        match verify {
            Verify::Kernel => {
                assert_eq!((d.layer, d.kernel.as_deref()), (Some(3), Some("down")));
            }
            Verify::Transfer => assert_eq!((d.layer, d.kernel.as_deref()), (None, None)),
        }
    }
}

#[test]
fn a_trace_recorded_under_injection_replays_cleanly_to_the_injected_place() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace");
    let mut faulty = pipeline();
    faulty.inject = inject();
    record_trace(&out, &faulty, PayloadPolicy::All, 0, true);
    let rec = open(&out);
    // The recorded configuration names the fault; a replay of what should have happened
    // runs without it.
    assert!(rec.config().inject.is_some());
    let opts = ReplayOptions {
        verify: Verify::Kernel,
        inject: None,
        ..ReplayOptions::default()
    };
    let r = replay_pipeline(rec.clone(), &opts).expect("replay");
    let d = r.first.expect("a divergence");
    assert_eq!(
        (d.endpoint, d.step, d.layer, d.kernel.as_deref()),
        (1, 5, Some(3), Some("down"))
    );
    assert_eq!(
        (d.transfer_id, d.offset),
        (Some(stage1_step5_id()), Some(7))
    );
    // One stage alone finds the same place from its recorded inputs.
    let s = replay_stage(rec, 1, &opts).expect("stage replay");
    let d2 = s.report.first.expect("stage divergence");
    assert_eq!(d2, d);
}

#[test]
fn one_stage_replays_from_a_snapshot_and_recorded_payloads_and_dumps_its_kv_cache() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace");
    record_trace(&out, &pipeline(), PayloadPolicy::All, 4, false);
    let rec = open(&out);
    for s in 0..3 {
        let opts = ReplayOptions {
            from_step: Some(5),
            threads: Some(2),
            ..ReplayOptions::default()
        };
        let r = replay_stage(rec.clone(), s, &opts).expect("stage replay");
        assert!(r.report.bit_exact, "stage {s}: {:?}", r.report);
        assert_eq!(r.report.started_at, vec![4]);
        assert_eq!(r.report.checked_steps, (5, 7));
    }
    // The whole pipeline resumes at the step-4 snapshots of all stages: stages 0 and 1 send
    // at steps 5, 6, 7; the last stage sends back only step 5's token (6 and 7 are last steps).
    let whole = ReplayOptions {
        from_step: Some(5),
        transport: Some(TransportKind::Tcp),
        ..ReplayOptions::default()
    };
    let r = replay_pipeline(rec.clone(), &whole).expect("resumed pipeline replay");
    assert!(r.bit_exact, "{r:?}");
    assert_eq!(r.started_at, vec![4, 4, 4]);
    assert_eq!(r.counts.transfers_checked, 3 + 3 + 1);
    // The KV cache after step 3 is the one the step-4 snapshot holds.
    let opts = ReplayOptions {
        to_step: Some(3),
        ..ReplayOptions::default()
    };
    let r = replay_stage(rec.clone(), 2, &opts).expect("stage replay to step 3");
    let t = npy::tensor(&r.stage, "k.layer.4.seq.1").expect("tensor");
    let kvd = rec.config().model.kv_dim();
    // Sequence 1 has its 4-token prompt and one decode step in the cache.
    assert_eq!(t.shape, vec![5, kvd]);
    let snap = rec.snapshot_state(2, 4).expect("snapshot");
    let span = r.stage.layout().k_cache(0, 1).prefix(5 * kvd);
    assert_eq!(t.bytes, snap.arena[span.byte_range()]);
    let file = dir.path().join("k.npy");
    npy::write_npy(&t, &file).expect("write npy");
    let bytes = std::fs::read(&file).expect("read npy");
    assert!(bytes.ends_with(&t.bytes));
}

#[test]
fn refusals_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace");
    record_trace(&out, &pipeline(), PayloadPolicy::None, 0, false);
    let rec = open(&out);
    let err = replay_stage(rec.clone(), 1, &ReplayOptions::default()).expect_err("no payloads");
    let msg = err.to_string();
    assert!(
        msg.contains("--payloads none") && msg.contains("drop --stage"),
        "{msg}"
    );
    let kernel = ReplayOptions {
        verify: Verify::Kernel,
        ..ReplayOptions::default()
    };
    let msg = replay_pipeline(rec.clone(), &kernel)
        .expect_err("no hashes")
        .to_string();
    assert!(msg.contains("--hash-kernels"), "{msg}");
    let range = ReplayOptions {
        to_step: Some(99),
        ..ReplayOptions::default()
    };
    let msg = replay_pipeline(rec, &range).expect_err("range").to_string();
    assert!(msg.contains("0..=7"), "{msg}");
    // A trace from a newer slug.
    let manifest = out.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["format_version"] = 99.into();
    std::fs::write(&manifest, v.to_string()).unwrap();
    let err = RecordedRun::open(&out).expect_err("newer format");
    assert!(matches!(err, ReplayError::Trace { .. }));
    assert!(err.to_string().contains("upgrade"), "{err}");
}

#[test]
fn stages_on_remote_nodes_restore_from_their_own_trace_copy() {
    use slug_replayer::NodeReplayFactory;
    use slug_transport::auth::ClusterKey;
    use slug_transport::node::{NodeOptions, serve};
    use slug_transport::pipeline::NoObservers;

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace");
    record_trace(&out, &pipeline(), PayloadPolicy::None, 0, true);
    // The node's copy: the coordinator's trace is not where the node looks. The node needs its
    // manifest (the trace id) and snapshots.
    let node_copy = dir.path().join("on-node");
    std::fs::create_dir_all(&node_copy).unwrap();
    let status = std::process::Command::new("cp")
        .args(["-r"])
        .arg(out.join("snapshots"))
        .arg(&node_copy)
        .status()
        .expect("cp");
    assert!(status.success());
    std::fs::copy(out.join("manifest.json"), node_copy.join("manifest.json")).unwrap();
    // Another recording: the same files under another trace id.
    let other = dir.path().join("other");
    let status = std::process::Command::new("cp")
        .args(["-r"])
        .arg(&node_copy)
        .arg(&other)
        .status()
        .expect("cp");
    assert!(status.success());
    let text = std::fs::read_to_string(other.join("manifest.json")).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["trace_id"] = "00000000000000000000000000000000".into();
    std::fs::write(other.join("manifest.json"), m.to_string()).unwrap();
    let secret = b"replay-test-cluster-key-0123456789";
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, secret).unwrap();
    // Key files must be private: they are refused when other users can read them.
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let stop = slug_transport::AbortFlag::new();
    let opts = NodeOptions {
        listen: "127.0.0.1:0".into(),
        key: ClusterKey::from_bytes(secret).unwrap(),
        once: false,
        stop: stop.clone(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        serve(
            &opts,
            &NodeReplayFactory(NoObservers),
            &|addr| {
                let _ = tx.send(addr.to_string());
            },
            &|_| {},
        )
    });
    let addr = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("node address");
    let rec = open(&out);
    let remote = |inject| ReplayOptions {
        hosts: vec![addr.clone(); 3],
        node_trace: Some(node_copy.clone()),
        key_file: Some(key_file.clone()),
        inject,
        ..ReplayOptions::default()
    };
    let clean = replay_pipeline(rec.clone(), &remote(None)).expect("remote replay");
    assert!(clean.bit_exact, "{clean:?}");
    assert_eq!(clean.counts.transfers_checked, 22);
    // The last stage's logits come back as digests: 8 steps, one head call each.
    assert_eq!(clean.counts.kernels_checked, 8, "{clean:?}");
    // --verify kernel: every kernel output of every node comes back as a digest.
    let kernel = |inject| ReplayOptions {
        verify: Verify::Kernel,
        ..remote(inject)
    };
    let all = replay_pipeline(rec.clone(), &kernel(None)).expect("remote kernel replay");
    assert!(all.bit_exact, "{all:?}");
    assert_eq!(all.counts.kernels_checked, all.kernels_expected);
    assert!(all.counts.kernels_checked > 100, "{all:?}");
    let faulty = replay_pipeline(rec.clone(), &kernel(inject())).expect("remote kernel replay");
    let d = faulty.first.expect("divergence");
    assert_eq!((d.endpoint, d.step), (1, 5), "{d:?}");
    assert_eq!(
        (d.kernel.as_deref(), d.layer),
        (Some("down"), Some(3)),
        "{d:?}"
    );
    let faulty = replay_pipeline(rec.clone(), &remote(inject())).expect("remote replay");
    let d = faulty.first.expect("divergence");
    assert_eq!(
        (d.endpoint, d.step, d.transfer_id),
        (1, 5, Some(stage1_step5_id()))
    );
    // A node with another trace refuses it before running.
    let mut wrong = remote(None);
    wrong.node_trace = Some(other.clone());
    let msg = replay_pipeline(rec.clone(), &wrong)
        .expect_err("another trace")
        .to_string();
    assert!(
        msg.contains("wrong trace") && msg.contains("00000000000000000000000000000000"),
        "{msg}"
    );
    // A node without the trace says where it looked.
    let mut lost = remote(None);
    lost.node_trace = Some(dir.path().join("nowhere"));
    let msg = replay_pipeline(rec, &lost)
        .expect_err("no trace there")
        .to_string();
    assert!(
        msg.contains("nowhere") && msg.contains("--node-trace"),
        "{msg}"
    );
    stop.raise();
    server.join().expect("server").expect("server ends");
}
