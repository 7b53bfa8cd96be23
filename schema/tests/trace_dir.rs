//! Trace directories and the synthetic generator: manifest, logs, matching transfers, clear errors.

use std::collections::HashMap;

use slug_schema::synth::{EndpointStream, SynthConfig, write_trace};
use slug_schema::*;

fn small() -> SynthConfig {
    SynthConfig {
        steps: 6,
        layers_per_stage: 2,
        threads: 2,
        ..SynthConfig::default()
    }
}

#[test]
fn synthetic_trace_round_trips_and_transfers_match_across_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("t");
    let cfg = small();
    let summary = write_trace(&root, &cfg).unwrap();
    let trace = Trace::open(&root).unwrap();
    let m = trace.manifest();
    assert_eq!(m.format_version, TRACE_FORMAT_VERSION);
    assert_eq!(m.endpoints.len(), 4);
    assert_eq!(m.run["synthetic"], true);
    assert_eq!(m.clocks.len(), 2);
    assert!(root.join(SNAPSHOTS_DIR).is_dir());

    let mut sends = HashMap::new();
    let mut recvs = HashMap::new();
    let mut total = 0;
    for ep in &m.endpoints {
        let log = trace.endpoint_log(ep.id).unwrap();
        assert!(log.recovery().is_clean());
        assert_eq!(log.header().endpoint, ep.id);
        let got: Vec<Event> = log.frames().flat_map(|f| f.unwrap().events).collect();
        let want: Vec<Event> = EndpointStream::new(&cfg, ep.id).collect();
        assert_eq!(got, want, "endpoint {}", ep.id);
        assert_eq!(log.string(3), Some("attention"));
        // Every kind but `migration`: the synthetic pipeline's stages never move.
        for kind in EventKind::ALL
            .into_iter()
            .filter(|&k| k != EventKind::Migration)
        {
            assert!(
                log.counts()[kind as usize] > 0,
                "endpoint {} has no {}",
                ep.id,
                kind.name()
            );
        }
        for e in got.iter() {
            if let Event::Transfer(t) = e {
                let map = if t.direction == Direction::Send {
                    &mut sends
                } else {
                    &mut recvs
                };
                assert!(
                    map.insert(t.id, *t).is_none(),
                    "duplicate transfer id {}",
                    t.id
                );
            }
        }
        total += got.len() as u64;
    }
    assert_eq!(total, summary.events);
    assert_eq!(sends.len(), recvs.len());
    for (id, s) in &sends {
        let r = recvs
            .get(id)
            .unwrap_or_else(|| panic!("transfer {id} has no receiving end"));
        assert_eq!(
            (s.hash, s.len, s.src_endpoint, s.dst_endpoint),
            (r.hash, r.len, r.src_endpoint, r.dst_endpoint)
        );
    }
}

#[test]
fn with_events_lands_near_the_target() {
    let cfg = SynthConfig::with_events(100_000);
    let n: usize = (0..cfg.stages)
        .map(|e| EndpointStream::new(&cfg, e).count())
        .sum();
    assert!((90_000..=110_000).contains(&n), "{n}");
}

#[test]
fn trace_errors_name_the_path_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("stray"), "x").unwrap();
    let err = Trace::create(dir.path(), Manifest::new(serde_json::Value::Null)).unwrap_err();
    assert!(matches!(err, SchemaError::TraceExists { .. }), "{err}");

    let err = Trace::open(dir.path()).unwrap_err();
    assert!(matches!(err, SchemaError::NotATrace { .. }), "{err}");
    assert!(err.to_string().contains("slug demo"), "{err}");

    std::fs::write(dir.path().join(MANIFEST_FILE), "{\"format_version\": 99}").unwrap();
    let err = Trace::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, SchemaError::UnsupportedTraceVersion { found: 99, .. }),
        "{err}"
    );

    std::fs::write(dir.path().join(MANIFEST_FILE), "{not json").unwrap();
    let err = Trace::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("manifest.json"), "{err}");

    let root = dir.path().join("fresh");
    let trace = Trace::create(&root, Manifest::new(serde_json::json!({"k": 1}))).unwrap();
    let err = trace.endpoint_log(3).unwrap_err();
    assert!(
        matches!(err, SchemaError::UnknownEndpoint { id: 3, .. }),
        "{err}"
    );
    assert_eq!(Trace::open(&root).unwrap().manifest(), trace.manifest());
}

#[test]
fn synth_rejects_bad_configs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        stages: 0,
        ..SynthConfig::default()
    };
    assert!(matches!(
        write_trace(dir.path().join("x"), &cfg),
        Err(SchemaError::Synth(_))
    ));
}

/// Rewrites `root`'s manifest.json with `edit` applied to its JSON.
fn edit_manifest(root: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = root.join(MANIFEST_FILE);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn a_manifest_without_an_mpi_table_reads_and_a_hostile_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("t");
    write_trace(&root, &small()).unwrap();
    // Written before the table existed (and by every non-MPI recording): no "mpi" key at all.
    edit_manifest(&root, |v| {
        v.as_object_mut().unwrap().remove("mpi");
    });
    let text = std::fs::read_to_string(root.join(MANIFEST_FILE)).unwrap();
    assert!(!text.contains("\"mpi\""), "{text}");
    assert_eq!(Trace::open(&root).unwrap().manifest().mpi, None);

    let ranks: Vec<u32> = Trace::open(&root)
        .unwrap()
        .manifest()
        .endpoints
        .iter()
        .map(|e| e.rank)
        .collect();
    let (a, b) = (ranks[0], *ranks.iter().find(|&&r| r != ranks[0]).unwrap());
    let good = serde_json::json!({
        "communicator": "MPI_COMM_WORLD",
        "inline_limit": 4096,
        "links": [{"link": 0, "source_rank": a, "dest_rank": b, "header_tag": 0, "payload_tag": 1}],
    });
    edit_manifest(&root, |v| v["mpi"] = good.clone());
    let table = Trace::open(&root).unwrap().manifest().mpi.clone().unwrap();
    assert_eq!(table.transfer(0, 5000).unwrap().payload_tag, Some(1));

    let hostile = [
        ("/links/0/dest_rank", serde_json::json!(9999), "rank 9999"),
        ("/links/0/payload_tag", serde_json::json!(0), "tag 0"),
        (
            "/links/0/header_tag",
            serde_json::json!(4_000_000_000u64),
            "not an MPI tag",
        ),
        (
            "/communicator",
            serde_json::json!("x".repeat(100_000)),
            "communicator",
        ),
        (
            "/links",
            serde_json::json!(vec![good["links"][0].clone(); 5000]),
            "more than",
        ),
        (
            "/links/0/link",
            serde_json::json!(-1),
            "not a slug manifest",
        ),
    ];
    for (at, value, says) in hostile {
        edit_manifest(&root, |v| {
            v["mpi"] = good.clone();
            *v["mpi"].pointer_mut(at).unwrap() = value;
        });
        let err = Trace::open(&root).unwrap_err().to_string();
        assert!(err.contains(says), "{at}: {err}");
        assert!(err.contains("manifest.json"), "{at}: {err}");
    }
}
