//! Verification of a replay against its trace: transfer and kernel-output checks, the first
//! divergence (in the JSON shape `slug view --divergence` reads) and how many differ after it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use slug_kernels::{KernelCall, KernelId};
use slug_schema::Transfer;
use slug_transport::pipeline::{PipelineConfig, schedule_slot};
use slug_transport::transfer::{Tag, kernel_output_hash};
use xxhash_rust::xxh3::xxh3_128;

use crate::recorded::RecordedRun;

/// The first divergence, field for field what `slug view --divergence FILE` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Divergence {
    /// Endpoint (manifest id; the recorder gives stage `s` id `s`) whose output differed.
    pub endpoint: u32,
    /// The stage's step counter, as in the trace's step boundaries and kernel spans.
    pub step: u64,
    /// Decoder layer, when the difference was seen inside one (kernel level).
    pub layer: Option<u32>,
    /// Kernel call site (kernel level).
    pub kernel: Option<String>,
    /// Trace id of the first differing transfer.
    pub transfer_id: Option<u64>,
    /// Index of the first differing 4-byte element of `transfer_id` (needs its recorded
    /// payload); `None` when only its hash was compared.
    pub offset: Option<u64>,
    /// What `expected` and `got` are: `values` (elements of a recorded payload) or `hashes`
    /// (the trace holds only content hashes: kernel outputs always, transfers without
    /// payloads), so nothing finer than "it differs" is known.
    #[serde(default = "hashes")]
    pub known: String,
    /// The recorded value (or content hash when no payload was recorded).
    pub expected: serde_json::Value,
    /// The replayed value (or content hash).
    pub got: serde_json::Value,
    /// How many later transfers also differed.
    pub later_differing: u64,
    /// At kernel level, when the differing kernel's stage step also sent a differing transfer
    /// with a recorded payload: that transfer's recorded element at `offset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_expected: Option<serde_json::Value>,
    /// The replayed element of that transfer at `offset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_got: Option<serde_json::Value>,
}

/// Where in the schedule a stage step falls, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepPlace {
    /// Decode step (0 is the prompt).
    pub decode_step: u32,
    /// Sequence.
    pub seq: u32,
}

/// One difference found, with the order that decides which came first.
#[derive(Debug, Clone)]
struct Found {
    /// (stage step, stage, kernel call index within the step): causal order of the schedule.
    order: (u64, u32, u32),
    divergence: Divergence,
}

/// What verification has seen so far; shared by every stage's observers.
#[derive(Debug, Default)]
struct Tally {
    transfers_checked: u64,
    transfers_differing: u64,
    transfers_unrecorded: u64,
    first_transfer: Option<Found>,
    kernels_checked: u64,
    kernels_differing: u64,
    kernels_unrecorded: u64,
    first_kernel: Option<Found>,
}

/// Counts of one verification.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Transfers whose content was compared with the trace.
    pub transfers_checked: u64,
    /// Of those, how many differed.
    pub transfers_differing: u64,
    /// Transfers the replay sent that the trace has no record of (lost events).
    pub transfers_unrecorded: u64,
    /// Kernel outputs compared (`--verify kernel`).
    pub kernels_checked: u64,
    /// Of those, how many differed.
    pub kernels_differing: u64,
    /// Kernel calls without a recorded hash.
    pub kernels_unrecorded: u64,
}

/// Compares replayed transfers and kernel outputs with the trace; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Checker {
    rec: Arc<RecordedRun>,
    tally: Arc<Mutex<Tally>>,
    from: u64,
    to: u64,
    /// Stage step of each (decode step, sequence) of the recorded schedule.
    steps: Arc<HashMap<(u32, u32), u64>>,
    layers: u32,
}

impl Checker {
    /// Checks stage steps `from..=to` of `rec`'s run.
    pub fn new(rec: Arc<RecordedRun>, from: u64, to: u64) -> Checker {
        let cfg = rec.config();
        let steps = (0u64..)
            .map_while(|f| schedule_slot(cfg, f).map(|s| ((s.step, s.seq), f)))
            .collect();
        let layers = cfg.model.layers as u32;
        Checker {
            rec,
            tally: Arc::default(),
            from,
            to,
            steps: Arc::new(steps),
            layers,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tally> {
        // Counters only: a panic elsewhere cannot leave them inconsistent.
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stage step that sent `tag` (the token sent back to stage 0 belongs to the step that
    /// chose it).
    pub fn stage_step(&self, tag: Tag) -> Option<u64> {
        self.steps.get(&(tag.step, tag.sequence)).copied()
    }

    fn in_range(&self, step: u64) -> bool {
        (self.from..=self.to).contains(&step)
    }

    /// Checks the bytes stage `src` sent with `tag` against the trace.
    pub fn transfer(&self, src: u32, tag: Tag, bytes: &[u8]) {
        self.check(src, tag, bytes.len() as u64, xxh3_128(bytes), Some(bytes));
    }

    /// Checks a transfer known only by its length and content hash (a remote node's digest):
    /// a divergence found this way names no element.
    pub fn transfer_digest(&self, src: u32, tag: Tag, len: u64, hash: u128) {
        self.check(src, tag, len, hash, None);
    }

    fn check(&self, src: u32, tag: Tag, len: u64, hash: u128, bytes: Option<&[u8]>) {
        let Some(step) = self.stage_step(tag) else {
            return;
        };
        if !self.in_range(step) {
            return;
        }
        let Some(recorded) = self.rec.sent(src, tag) else {
            self.lock().transfers_unrecorded += 1;
            return;
        };
        let same = recorded.len == len && recorded.hash == hash;
        let order = (step, src, u32::MAX);
        let mut t = self.lock();
        t.transfers_checked += 1;
        if same {
            return;
        }
        t.transfers_differing += 1;
        if t.first_transfer.as_ref().is_some_and(|f| f.order <= order) {
            return;
        }
        let divergence = self.transfer_divergence(src, step, tag, recorded, bytes, hash);
        t.first_transfer = Some(Found { order, divergence });
    }

    fn transfer_divergence(
        &self,
        src: u32,
        step: u64,
        tag: Tag,
        recorded: &Transfer,
        bytes: Option<&[u8]>,
        hash: u128,
    ) -> Divergence {
        let tokens = tag.layer == self.layers;
        let mut d = Divergence {
            endpoint: src,
            step,
            layer: None,
            kernel: None,
            transfer_id: Some(recorded.id),
            offset: None,
            known: hashes(),
            expected: format!("xxh3:{:032x}", recorded.hash).into(),
            got: format!("xxh3:{hash:032x}").into(),
            later_differing: 0,
            transfer_expected: None,
            transfer_got: None,
        };
        // With the recorded payload the report names the element and both values; a payload
        // that cannot be read leaves the hashes, which still prove the difference.
        if let (Some(bytes), Ok(Some(want))) = (bytes, self.rec.payload(recorded)) {
            let pairs = want.chunks_exact(4).zip(bytes.chunks_exact(4));
            if let Some((i, (w, g))) = pairs.enumerate().find(|(_, (w, g))| w != g) {
                d.offset = Some(i as u64);
                d.known = "values".into();
                d.expected = element_value(w, tokens);
                d.got = element_value(g, tokens);
            } else if want.len() != bytes.len() {
                d.offset = Some(want.len().min(bytes.len()) as u64 / 4);
                d.known = "values".into();
                d.expected = format!("{} bytes", want.len()).into();
                d.got = format!("{} bytes", bytes.len()).into();
            }
        }
        d
    }

    /// Checks one kernel call's output of stage `stage` against the trace's kernel hash.
    /// `index` is the call's position within its step (for ordering).
    pub fn kernel(&self, stage: u32, call: &KernelCall, index: u32, output: &[f32]) {
        if !self.in_range(call.step) {
            return;
        }
        let got = kernel_output_hash(output);
        self.kernel_digest(stage, call.step, call.kernel, call.layer, index, got);
    }

    /// Checks a kernel output known only by its hash `got` (a remote node's digest, or one
    /// hashed here): call site `kernel` of `layer` at `step` of `stage`, `index`-th of its step.
    pub fn kernel_digest(
        &self,
        stage: u32,
        step: u64,
        kernel: KernelId,
        layer: Option<u32>,
        index: u32,
        got: u128,
    ) {
        if !self.in_range(step) {
            return;
        }
        let Some(want) = self.rec.kernel_hash(&(stage, step, kernel, layer)) else {
            self.lock().kernels_unrecorded += 1;
            return;
        };
        let mut t = self.lock();
        t.kernels_checked += 1;
        if got == want {
            return;
        }
        t.kernels_differing += 1;
        let order = (step, stage, index);
        if t.first_kernel.as_ref().is_some_and(|f| f.order <= order) {
            return;
        }
        t.first_kernel = Some(Found {
            order,
            divergence: Divergence {
                endpoint: stage,
                step,
                layer,
                kernel: Some(kernel.name().to_string()),
                transfer_id: None,
                offset: None,
                known: hashes(),
                expected: format!("xxh3:{want:032x}").into(),
                got: format!("xxh3:{got:032x}").into(),
                later_differing: 0,
                transfer_expected: None,
                transfer_got: None,
            },
        });
    }

    /// The counts so far.
    pub fn counts(&self) -> Counts {
        let t = self.lock();
        Counts {
            transfers_checked: t.transfers_checked,
            transfers_differing: t.transfers_differing,
            transfers_unrecorded: t.transfers_unrecorded,
            kernels_checked: t.kernels_checked,
            kernels_differing: t.kernels_differing,
            kernels_unrecorded: t.kernels_unrecorded,
        }
    }

    /// The first divergence: the earliest differing kernel output when kernels were checked
    /// (with the first differing transfer's details when it is that stage's output of the same
    /// step), else the earliest differing transfer.
    pub fn first(&self) -> Option<Divergence> {
        let t = self.lock();
        let transfer = t.first_transfer.clone();
        let later_transfers = |counted: bool| t.transfers_differing - u64::from(counted);
        // At the default level only the last stage's logits are kernel-checked: a transfer that
        // differed earlier in the schedule (an upstream stage) is the first divergence.
        let kernel = t
            .first_kernel
            .clone()
            .filter(|k| transfer.as_ref().is_none_or(|f| k.order < f.order));
        match (kernel, transfer) {
            (Some(k), tr) => {
                let mut d = k.divergence;
                let same_place = tr
                    .as_ref()
                    .filter(|f| f.divergence.endpoint == d.endpoint && f.divergence.step == d.step);
                // The transfer that carried this step's output onward, with its first
                // differing element when its payload was recorded: `expected`/`got` stay the
                // kernel output's hashes, the element's values go beside them.
                if let Some(f) = same_place {
                    d.transfer_id = f.divergence.transfer_id;
                    d.offset = f.divergence.offset;
                    if f.divergence.known == "values" {
                        d.transfer_expected = Some(f.divergence.expected.clone());
                        d.transfer_got = Some(f.divergence.got.clone());
                    }
                }
                d.later_differing = later_transfers(same_place.is_some());
                Some(d)
            }
            (None, Some(f)) => {
                let mut d = f.divergence;
                d.later_differing = later_transfers(true);
                Some(d)
            }
            (None, None) => None,
        }
    }
}

fn hashes() -> String {
    "hashes".into()
}

/// Where stage step `step` falls in `cfg`'s schedule.
pub fn place_of(cfg: &PipelineConfig, step: u64) -> Option<StepPlace> {
    schedule_slot(cfg, step).map(|s| StepPlace {
        decode_step: s.step,
        seq: s.seq,
    })
}

/// A 4-byte element as a JSON string: token id, or float with its bits.
fn element_value(b: &[u8], token: bool) -> serde_json::Value {
    let bits = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if token {
        format!("token {bits}").into()
    } else {
        format!("{:e} (0x{bits:08x})", f32::from_bits(bits)).into()
    }
}

/// Kernel hooks that check every output against the trace (and then nothing else).
#[derive(Debug)]
pub struct KernelCheck {
    checker: Checker,
    stage: u32,
    step: u64,
    index: u32,
    only: Option<KernelId>,
}

impl KernelCheck {
    /// Checks stage `stage`'s kernel outputs with `checker`.
    pub fn new(checker: Checker, stage: u32) -> KernelCheck {
        KernelCheck {
            checker,
            stage,
            step: u64::MAX,
            index: 0,
            only: None,
        }
    }

    /// Checks only the outputs of call site `kernel` (the last stage's `head` at the default
    /// level: its logits are the stage's output activations).
    pub fn only(checker: Checker, stage: u32, kernel: KernelId) -> KernelCheck {
        KernelCheck {
            only: Some(kernel),
            ..KernelCheck::new(checker, stage)
        }
    }
}

impl slug_kernels::Hooks for KernelCheck {
    fn timing(&self) -> bool {
        false
    }

    fn kernel(&mut self, call: &KernelCall, output: &mut [f32]) {
        if call.step != self.step {
            self.step = call.step;
            self.index = 0;
        }
        if self.only.is_none_or(|k| k == call.kernel) {
            self.checker.kernel(self.stage, call, self.index, output);
        }
        self.index += 1;
    }

    fn step_boundary(&mut self, _step: u64, _seq: u32) {}
}
