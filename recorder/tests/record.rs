//! End-to-end recording of a tiny local pipeline: what the trace holds, payload policies, and
//! refusals of unusable output directories.

use slug_kernels::ModelConfig;
use slug_recorder::observe::PayloadPolicy;
use slug_recorder::perf::{PerfConfig, PerfRequest};
use slug_recorder::{RecordConfig, RecorderError, record};
use slug_schema::{Event, EventKind, KindSet, LogReader, TimeRange, Trace};
use slug_transport::pipeline::{NoObservers, PipelineConfig, run};

fn pipeline(stages: usize, tokens: usize) -> PipelineConfig {
    let mut cfg = PipelineConfig::new(ModelConfig::preset("tiny").unwrap(), "hi", 2, tokens);
    cfg.stages = stages;
    cfg
}

fn config(out: &std::path::Path) -> RecordConfig {
    RecordConfig {
        // Software streams only where perf works; the recording must not depend on them.
        perf: PerfConfig {
            request: PerfRequest::Auto,
            ..PerfConfig::default()
        },
        ..RecordConfig::new(out)
    }
}

fn events(trace: &Trace, endpoint: u32, kind: EventKind) -> Vec<Event> {
    let log: LogReader = trace.endpoint_log(endpoint).unwrap();
    assert!(log.recovery().is_clean(), "{:?}", log.recovery());
    log.events_in(TimeRange::new(0, u64::MAX), KindSet::of(&[kind]))
        .map(|e| e.unwrap())
        .collect()
}

#[test]
fn a_recorded_run_has_the_same_tokens_and_logs_every_transfer_and_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace");
    let p = pipeline(2, 4);
    let plain = run(&p, &NoObservers).unwrap();
    let summary = record(&config(&out), &p).unwrap();
    assert_eq!(summary.tokens, plain.tokens, "recording changed the tokens");
    for n in &summary.notices {
        eprintln!("{n}");
    }
    let trace = Trace::open(&out).unwrap();
    let m = trace.manifest();
    assert_eq!(m.endpoints.len(), 2);
    assert!(m.topology[0].cpus >= 1);
    assert!(m.capabilities.iter().any(|c| c.name == "intel_pt"));
    // Both ends log each transfer under the same id, with the same content hash.
    let sent = events(&trace, 0, EventKind::Transfer);
    let got = events(&trace, 1, EventKind::Transfer);
    assert!(!sent.is_empty() && !got.is_empty());
    let mut twins = 0;
    for e in &got {
        let Event::Transfer(r) = e else {
            unreachable!()
        };
        assert_eq!(r.payload, None, "--payloads none stores no payload");
        let twin = sent.iter().find_map(|s| match s {
            Event::Transfer(s) if s.id == r.id && s.direction != r.direction => Some(s),
            _ => None,
        });
        if let Some(s) = twin {
            assert_eq!((s.hash, s.len), (r.hash, r.len));
            twins += 1;
        }
    }
    // Stage 0 sends activations to stage 1: every one of them arrived with the same hash.
    assert!(twins >= 4, "{twins} transfers matched on both ends");
    let spans = events(&trace, 1, EventKind::KernelSpan);
    assert!(spans.len() > 10);
    assert!(!events(&trace, 0, EventKind::StepBoundary).is_empty());
    // The flight rings are gone after a clean close.
    let rings = slug_recorder::endpoint::ring_files(&out.join("endpoints")).unwrap();
    assert!(rings.is_empty(), "{rings:?}");
    assert!(summary.events() > 0 && summary.compression_ratio() > 1.0);
}

#[test]
fn payloads_all_stores_every_transfer_once_by_content() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace");
    let cfg = RecordConfig {
        payloads: PayloadPolicy::All,
        perf: PerfConfig {
            request: PerfRequest::None,
            ..PerfConfig::default()
        },
        ..RecordConfig::new(&out)
    };
    record(&cfg, &pipeline(2, 3)).unwrap();
    let trace = Trace::open(&out).unwrap();
    let store = slug_recorder::blob::BlobStore::open(out.join("payloads"), 1).unwrap();
    let recv = events(&trace, 1, EventKind::Transfer);
    assert!(!recv.is_empty());
    for e in recv {
        let Event::Transfer(t) = e else {
            unreachable!()
        };
        let hash = t.payload.expect("payload recorded");
        let bytes = store.get(hash).unwrap();
        assert_eq!(bytes.len() as u64, t.len);
        assert_eq!(xxhash_rust::xxh3::xxh3_128(&bytes), t.hash);
    }
}

#[test]
fn unusable_output_directories_are_refused_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(1, 2);
    let missing_parent = dir.path().join("no/such/trace");
    let err = record(&config(&missing_parent), &p).unwrap_err();
    assert!(matches!(err, RecorderError::OutputDir { .. }), "{err}");
    assert!(err.to_string().contains("does not exist"));
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep"), b"x").unwrap();
    let err = record(&config(&full), &p).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    assert!(full.join("keep").exists());
    let forced = RecordConfig {
        force: true,
        ..config(&full)
    };
    record(&forced, &p).unwrap();
    assert!(!full.join("keep").exists());
}
