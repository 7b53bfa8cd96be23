//! The seam where recorders and replayers plug into a running stage: the observer factory,
//! each stage's observers, and the digest collector the runtime adds for verification.

use std::sync::{Arc, Mutex};

use slug_kernels::{Hooks, NoHooks};

use crate::error::Result;
use crate::transfer::{Observers, Transfer, TransferObserver, content_hash};

use super::config::{KernelDigests, PipelineConfig};
use super::report::{HexHash, KernelDigest, TransferDigest};
use super::state::{StageState, StageStateObserver};

/// Where a stage runs, for observers and reports.
#[derive(Debug, Clone, Copy)]
pub struct StageContext<'a> {
    /// Stage index.
    pub stage: usize,
    /// The endpoint the stage records as: its stage index, or, on a node a move brought the
    /// stage to, [`continuation_endpoint`](super::continuation_endpoint) of that move.
    pub endpoint: u32,
    /// Host the stage runs on ("local" for threads).
    pub host: &'a str,
    /// The run's configuration.
    pub config: &'a PipelineConfig,
}

/// The observers of one stage: its transfer observers and its kernel hooks.
pub struct StageObservers {
    /// Called for every transfer the stage posts or completes.
    pub transfers: Observers,
    /// Called for every kernel call and step boundary of the stage.
    pub hooks: Box<dyn Hooks + Send>,
}

impl std::fmt::Debug for StageObservers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageObservers")
            .field("transfers", &self.transfers)
            .finish_non_exhaustive()
    }
}

impl StageObservers {
    /// No transfer observers, no kernel hooks.
    pub fn none() -> Self {
        Self {
            transfers: Observers::none(),
            hooks: Box::new(NoHooks),
        }
    }
}

/// Builds each stage's observers, in the process where the stage runs.
pub trait ObserverFactory: Send + Sync {
    /// Observers for the stage described by `ctx`.
    fn stage_observers(&self, ctx: &StageContext<'_>) -> Result<StageObservers>;

    /// The state the stage starts from (a restored snapshot) instead of weights generated from
    /// the seed; `None` (the default): generate. Called after the stage is built.
    fn initial_state(&self, _ctx: &StageContext<'_>) -> Result<Option<StageState>> {
        Ok(None)
    }

    /// An observer of the stage's arena and cursor at every step boundary (snapshots), run on
    /// the stage's own thread; `None` (the default): nobody looks.
    fn state_observer(
        &self,
        _ctx: &StageContext<'_>,
    ) -> Result<Option<Box<dyn StageStateObserver>>> {
        Ok(None)
    }

    /// A directory of files this factory wrote for the stage on a node that the coordinator
    /// must collect (a recording on hosts without a shared file system); `None` (the default):
    /// nothing to collect. Asked after the stage's observers were dropped, so the files are
    /// complete; the node removes the directory once the coordinator confirms it has them.
    fn collected_files(&self, _ctx: &StageContext<'_>) -> Option<std::path::PathBuf> {
        None
    }
}

/// The factory that observes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObservers;

impl ObserverFactory for NoObservers {
    fn stage_observers(&self, _ctx: &StageContext<'_>) -> Result<StageObservers> {
        Ok(StageObservers::none())
    }
}

/// Collects a [`TransferDigest`] of every transfer a stage receives and, through
/// [`DigestHooks`], a [`KernelDigest`] of the kernel outputs asked for.
#[derive(Debug, Default)]
pub(crate) struct DigestObserver(Mutex<Vec<TransferDigest>>, Mutex<Vec<KernelDigest>>);

/// Kernel hooks that record a [`KernelDigest`] of each selected output, then call the stage's
/// own hooks. They sit inside the fault injector, so they see what the next kernel reads.
struct DigestHooks {
    inner: Box<dyn Hooks + Send>,
    sink: Arc<DigestObserver>,
    which: KernelDigests,
    step: u64,
    index: u32,
}

impl Hooks for DigestHooks {
    fn timing(&self) -> bool {
        self.inner.timing()
    }

    fn kernel(&mut self, call: &slug_kernels::KernelCall, output: &mut [f32]) {
        if call.step != self.step {
            self.step = call.step;
            self.index = 0;
        }
        let wanted = match self.which {
            KernelDigests::None => false,
            KernelDigests::Head => call.kernel == slug_kernels::KernelId::Head,
            KernelDigests::All => true,
        };
        if wanted && let Ok(mut v) = self.sink.1.lock() {
            v.push(KernelDigest {
                step: call.step,
                kernel: call.kernel,
                layer: call.layer,
                index: self.index,
                hash: HexHash(crate::transfer::kernel_output_hash(output)),
            });
        }
        self.index += 1;
        self.inner.kernel(call, output);
    }

    fn step_boundary(&mut self, step: u64, seq: u32) {
        self.inner.step_boundary(step, seq);
    }
}

impl TransferObserver for DigestObserver {
    fn posted(&self, _transfer: &Transfer, _bytes: &[u8]) {}

    fn completed(&self, t: &Transfer, bytes: &[u8]) {
        let d = TransferDigest {
            tag: t.tag,
            src: t.src.endpoint.0,
            dst: t.dst.endpoint.0,
            len: t.len,
            hash: HexHash(content_hash(bytes)),
        };
        if let Ok(mut v) = self.0.lock() {
            v.push(d);
        }
    }
}

impl DigestObserver {
    pub(crate) fn take(&self) -> Vec<TransferDigest> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    /// Copies of the transfer digests from index `transfers` on and the kernel digests from
    /// `kernels` on (what a failover checkpoint adds since the previous one).
    pub(crate) fn since(
        &self,
        transfers: usize,
        kernels: usize,
    ) -> (Vec<TransferDigest>, Vec<KernelDigest>) {
        (
            self.0
                .lock()
                .map(|v| v.get(transfers..).unwrap_or_default().to_vec())
                .unwrap_or_default(),
            self.1
                .lock()
                .map(|v| v.get(kernels..).unwrap_or_default().to_vec())
                .unwrap_or_default(),
        )
    }

    pub(crate) fn take_kernels(&self) -> Vec<KernelDigest> {
        self.1
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// What watches a running stage: its kernel hooks and its state observer.
pub(crate) struct Observed {
    pub hooks: Box<dyn Hooks + Send>,
    pub state: Option<Box<dyn StageStateObserver>>,
}

/// The factory's observers for a stage, plus the digest collector when the config asks for it;
/// the hooks of the stage named by `--inject` are wrapped in the fault injector.
pub(crate) fn stage_observers(
    factory: &dyn ObserverFactory,
    ctx: &StageContext<'_>,
) -> Result<(StageObservers, Option<Arc<DigestObserver>>)> {
    let mut obs = factory.stage_observers(ctx)?;
    let which = ctx.config.kernel_digests;
    let sink = (ctx.config.digests || which != KernelDigests::None)
        .then(|| Arc::new(DigestObserver::default()));
    if let Some(sink) = sink.as_ref().filter(|_| which != KernelDigests::None) {
        obs.hooks = Box::new(DigestHooks {
            inner: obs.hooks,
            sink: sink.clone(),
            which,
            step: u64::MAX,
            index: 0,
        });
    }
    if let Some(inject) = ctx.config.inject.as_ref().filter(|i| i.stage == ctx.stage) {
        obs.hooks = Box::new(crate::inject::FaultInjector::new(inject.clone(), obs.hooks));
    }
    if let Some(sink) = sink.as_ref().filter(|_| ctx.config.digests) {
        obs.transfers = obs.transfers.with(sink.clone());
    }
    Ok((obs, sink))
}
