//! Test traces: recorded by `slug_recorder::record`, then given what the recorder does not
//! write yet — step snapshots (through its snapshot store) and per-kernel output hashes (the
//! logs rewritten with each kernel span's hash, from a run of the same configuration).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use slug_kernels::{Hooks, KernelCall, ModelConfig, Stage};
use slug_recorder::observe::PayloadPolicy;
use slug_recorder::perf::{PerfConfig, PerfRequest};
use slug_recorder::{RecordConfig, record};
use slug_schema::snapshot::SnapshotStore;
use slug_schema::{Event, EventKind, KindSet, LogHeader, LogWriter, TimeRange, Trace};
use slug_transport::TransportError;
use slug_transport::pipeline::{
    ObserverFactory, PipelineConfig, StageContext, StageObservers, StageStateObserver,
    prompt_tokens, run,
};
use slug_transport::transfer::Observers;
use xxhash_rust::xxh3::xxh3_128;

/// Three stages of two layers each, two sequences in flight, 4 tokens: 8 steps per stage.
pub fn pipeline() -> PipelineConfig {
    let mut m = ModelConfig::preset("tiny").expect("tiny preset");
    m.layers = 6;
    m.seed = 21;
    let mut cfg = PipelineConfig::new(m, "x", 1, 4);
    cfg.prompts = ["The slug", "went"]
        .iter()
        .map(|p| prompt_tokens(p))
        .collect();
    cfg.stages = 3;
    cfg.microbatches = 2;
    cfg.timeout_ms = 20_000;
    cfg
}

/// Records `cfg` into `out` with `payloads`, snapshots every `every` steps, and (when
/// `kernel_hashes`) per-kernel output hashes.
pub fn record_trace(
    out: &Path,
    cfg: &PipelineConfig,
    payloads: PayloadPolicy,
    every: u64,
    kernel_hashes: bool,
) {
    let rc = RecordConfig {
        payloads,
        perf: PerfConfig {
            request: PerfRequest::None,
            ..PerfConfig::default()
        },
        ..RecordConfig::new(out)
    };
    record(&rc, cfg).expect("record");
    let hashes = Arc::new(Mutex::new(HashMap::new()));
    let store = Arc::new(SnapshotStore::open(out.join("snapshots")).expect("snapshot store"));
    let factory = Extras {
        store,
        every,
        hashes: hashes.clone(),
    };
    run(cfg, &factory).expect("snapshot run");
    if kernel_hashes {
        let hashes = hashes.lock().expect("hashes").clone();
        add_kernel_hashes(out, &hashes);
    }
}

type Hashes = Arc<Mutex<HashMap<(u32, u64, u8, Option<u32>), u128>>>;

/// Snapshots every stage through the recorder's store and hashes every kernel output.
struct Extras {
    store: Arc<SnapshotStore>,
    every: u64,
    hashes: Hashes,
}

struct Snap(Arc<SnapshotStore>, u32, u64);

impl StageStateObserver for Snap {
    fn at_step_boundary(&mut self, stage: &Stage) -> Result<(), TransportError> {
        let step = stage.cursor().step;
        if self.2 == 0 && step > 0 || self.2 > 0 && !step.is_multiple_of(self.2) {
            return Ok(());
        }
        let cursor = serde_json::to_vec(stage.cursor()).expect("cursor json");
        let pending = self
            .0
            .capture(self.1, step, stage.arena().bytes(), &cursor)
            .expect("capture");
        self.0.persist(pending).expect("persist");
        Ok(())
    }
}

struct HashHooks(Hashes, u32);

impl Hooks for HashHooks {
    fn timing(&self) -> bool {
        false
    }

    fn kernel(&mut self, call: &KernelCall, output: &mut [f32]) {
        let bytes: Vec<u8> = output.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.0.lock().expect("hashes").insert(
            (self.1, call.step, call.kernel.index(), call.layer),
            xxh3_128(&bytes),
        );
    }

    fn step_boundary(&mut self, _: u64, _: u32) {}
}

impl ObserverFactory for Extras {
    fn stage_observers(&self, ctx: &StageContext<'_>) -> Result<StageObservers, TransportError> {
        Ok(StageObservers {
            transfers: Observers::none(),
            hooks: Box::new(HashHooks(self.hashes.clone(), ctx.stage as u32)),
        })
    }

    fn state_observer(
        &self,
        ctx: &StageContext<'_>,
    ) -> Result<Option<Box<dyn StageStateObserver>>, TransportError> {
        Ok(Some(Box::new(Snap(
            self.store.clone(),
            ctx.stage as u32,
            self.every,
        ))))
    }
}

/// Rewrites every endpoint log with each kernel span's output hash filled in.
fn add_kernel_hashes(out: &Path, hashes: &HashMap<(u32, u64, u8, Option<u32>), u128>) {
    let trace = Trace::open(out).expect("trace");
    for ep in &trace.manifest().endpoints {
        let path = trace.endpoint_log_path(ep.id).expect("log path");
        let events: Vec<Event>;
        let strings: Vec<String>;
        {
            let log = trace.endpoint_log(ep.id).expect("log");
            strings = (0..log.string_count() as u32)
                .map(|i| log.string(i).unwrap_or("").to_string())
                .collect();
            events = log
                .events_in(TimeRange::ALL, KindSet::of(&EventKind::ALL))
                .map(|e| e.expect("event"))
                .collect();
        }
        let tmp = path.with_extension("rewrite");
        let mut w = LogWriter::create(
            &tmp,
            LogHeader::new(ep.id, slug_schema::Clock::Monotonic, 0),
        )
        .expect("writer");
        for s in &strings {
            w.intern(s);
        }
        for mut e in events {
            if let Event::KernelSpan(k) = &mut e {
                let layer = k.layer;
                k.output_hash = hashes
                    .get(&(ep.stage, k.step, k.kernel as u8, layer))
                    .copied();
                assert!(k.output_hash.is_some(), "no hash for {k:?}");
            }
            w.append(&e);
        }
        w.close().expect("close");
        std::fs::rename(&tmp, &path).expect("replace log");
    }
}
