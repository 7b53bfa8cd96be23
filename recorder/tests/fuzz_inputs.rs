//! Bounded fuzzing (a fixed proptest case count, so it runs in every `cargo test`) of what
//! `slug info` and `slug replay` read from a trace someone else made: endpoint logs, the
//! manifest, flight rings, journals, snapshot indexes and payloads. Whatever the bytes, the
//! readers must return (an error or a result), never panic, and allocate only within bounds.

use std::path::Path;

use proptest::prelude::*;
use slug_recorder::flight::{FlightRing, recover_ring};
use slug_recorder::journal::{Journal, read_journal};
use slug_schema::blob::BlobStore;
use slug_schema::snapshot::{SnapshotIndex, WeightsRef};
use slug_schema::synth::{SynthConfig, write_trace};
use slug_schema::{
    Event, KernelSpan, LogReader, LogSummary, Marker, RawRecord, Trace, TraceSummary,
};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Event `n` of a ring: a marker every third, kernel spans between.
fn event(n: u64) -> Event {
    if n.is_multiple_of(3) {
        Event::Marker(Marker { text: 1, ns: n })
    } else {
        Event::KernelSpan(KernelSpan {
            kernel: n as u32,
            layer: Some(1),
            step: n,
            seq: 0,
            rows: 1,
            start_ns: n * 10,
            end_ns: n * 10 + 5,
            output_hash: Some(u128::from(n)),
        })
    }
}

/// A small synthetic trace (two stages, a few steps) as a template to damage.
fn template(dir: &Path) -> Vec<u8> {
    let cfg = SynthConfig {
        stages: 2,
        steps: 3,
        microbatches: 1,
        layers_per_stage: 1,
        threads: 1,
        hidden: 64,
        ..SynthConfig::default()
    };
    write_trace(dir, &cfg).expect("synthetic trace");
    std::fs::read(dir.join("endpoints/0.slog")).unwrap()
}

/// `(offset, xor)` edits applied to a byte string, offsets taken modulo its length.
fn apply(bytes: &mut [u8], edits: &[(usize, u8)]) {
    if bytes.is_empty() {
        return;
    }
    let n = bytes.len();
    for &(at, x) in edits {
        bytes[at % n] ^= x;
    }
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8)>> {
    prop::collection::vec((any::<usize>(), 1u8..), 1..12)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn damaged_endpoint_logs_never_panic(edits in edits(), cut in any::<usize>()) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = template(dir.path());
        apply(&mut bytes, &edits);
        bytes.truncate(64 + cut % bytes.len());
        let path = dir.path().join("endpoints/0.slog");
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(log) = LogReader::open(&path) {
            let s = LogSummary::of(&log);
            prop_assert!(s.events <= bytes.len() as u64 * 64);
        }
        let trace = Trace::open(dir.path()).unwrap();
        let _ = TraceSummary::of(&trace);
    }

    #[test]
    fn damaged_manifests_never_panic(edits in edits(), cut in any::<usize>()) {
        let dir = tempfile::tempdir().unwrap();
        template(dir.path());
        let path = dir.path().join("manifest.json");
        let mut bytes = std::fs::read(&path).unwrap();
        apply(&mut bytes, &edits);
        bytes.truncate(1 + cut % bytes.len());
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(trace) = Trace::open(dir.path()) {
            let _ = TraceSummary::of(&trace);
        }
    }

    #[test]
    fn manifests_with_hostile_values_never_panic(
        log in prop_oneof![
            Just("/dev/zero".to_owned()),
            Just("../../etc/passwd".to_owned()),
            Just("endpoints/../../x".to_owned()),
            Just(String::new()),
            "[a-z./]{0,12}",
        ],
        offset in any::<i64>(),
        id in any::<u32>(),
        stage in any::<u32>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        template(dir.path());
        let path = dir.path().join("manifest.json");
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        m["endpoints"][0]["log"] = log.into();
        m["endpoints"][1]["id"] = id.into();
        m["endpoints"][1]["stage"] = stage.into();
        let node = m["endpoints"][0]["node"].clone();
        m["clocks"] = serde_json::json!([{"node": node, "offset_ns": offset, "uncertainty_ns": 0}]);
        std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        let trace = Trace::open(dir.path()).unwrap();
        let s = TraceSummary::of(&trace);
        if let Some(r) = s.time_span {
            prop_assert!(r.start_ns <= r.end_ns);
        }
    }

    #[test]
    fn damaged_flight_rings_never_panic(
        edits in prop::collection::vec((0usize..1280, 1u8..), 0..8),
        capacity in prop_oneof![Just(1u64 << 57), Just(u64::MAX), Just(0u64), any::<u64>()],
        set_capacity in any::<bool>(),
        version in prop_oneof![Just(None), Just(Some(1u32)), Just(Some(2u32))],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.ring");
        {
            // 16 slots: compact spans (one slot) and markers (two), wrapping around the end.
            let ring = FlightRing::create(&path, 3, 1, 0, 16).unwrap();
            for n in 0..9 {
                ring.append_event(&event(n));
            }
            ring.drain(|_| {});
            for n in 9..20 {
                ring.append_event(&event(n));
            }
        }
        let mut bytes = std::fs::read(&path).unwrap();
        if set_capacity {
            bytes[16..24].copy_from_slice(&capacity.to_ne_bytes());
        }
        if let Some(v) = version {
            bytes[8..12].copy_from_slice(&v.to_ne_bytes());
        }
        apply(&mut bytes, &edits);
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(r) = recover_ring(&path) {
            prop_assert!(r.records.len() <= 16);
        }
    }

    #[test]
    fn damaged_journals_never_panic(edits in edits(), cut in any::<usize>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.journal");
        let records: Vec<RawRecord> = (0..40)
            .map(|n| RawRecord::from_event(&Event::Marker(Marker { text: 1, ns: n })))
            .collect();
        {
            let mut j = Journal::create(&path).unwrap();
            j.append(&records[..20]).unwrap();
            j.append(&records[20..]).unwrap();
        }
        let mut bytes = std::fs::read(&path).unwrap();
        apply(&mut bytes, &edits);
        bytes.truncate(cut % (bytes.len() + 1));
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(got) = read_journal(&path, |_| {}) {
            prop_assert!(got <= records.len() as u64);
        }
    }

    #[test]
    fn hostile_snapshot_indexes_never_panic(
        arena_len in prop_oneof![Just(1u64 << 40), Just(u64::MAX), any::<u64>()],
        chunk_size in any::<u32>(),
        count in 0usize..64,
        weights in prop::option::of((any::<u32>(), any::<u32>(), ".{0,8}")),
        edits in prop::collection::vec((any::<usize>(), 1u8..), 0..4),
    ) {
        let index = SnapshotIndex {
            stage: 0,
            step: 0,
            arena_len,
            chunk_size,
            cursor: b"{}".to_vec(),
            chunks: vec![7; count],
            weights: weights.map(|(first_chunk, chunks, source)| WeightsRef {
                first_chunk,
                chunks,
                hash: 9,
                source,
            }),
        };
        let mut bytes = index.encode();
        apply(&mut bytes, &edits);
        let _ = SnapshotIndex::decode(Path::new("step-0.idx"), &bytes);
    }

    #[test]
    fn hostile_payload_blobs_never_panic(
        body in prop::collection::vec(any::<u8>(), 0..2048),
        len in prop_oneof![Just(0u64), Just(1u64 << 40), Just(u64::MAX), 0u64..100_000],
        as_zstd in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 1).unwrap();
        let hash = 0xfeed_u128;
        let path = store.path(hash);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let file = if as_zstd { zstd::bulk::compress(&body, 1).unwrap() } else { body };
        std::fs::write(&path, file).unwrap();
        if let Ok(bytes) = store.get(hash, len) {
            prop_assert_eq!(bytes.len() as u64, len);
        }
    }
}

/// The ring header of the issue: a capacity of 2^57 slots (2^64 bytes) once overflowed the
/// size check and indexed past the file.
#[test]
fn a_ring_claiming_2_pow_57_slots_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.ring");
    {
        let ring = FlightRing::create(&path, 3, 1, 0, 8).unwrap();
        ring.append(&RawRecord::from_event(&Event::Marker(Marker {
            text: 1,
            ns: 1,
        })));
    }
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[16..24].copy_from_slice(&(1u64 << 57).to_ne_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = recover_ring(&path).unwrap_err().to_string();
    assert!(e.contains("capacity"), "{e}");
}
