//! `slug ladder`: the measurement ladder. For each transport and the model's real activation
//! sizes: (1) the raw fabric (memcpy for shm, a plain loopback socket for tcp, raw MPI
//! send/recv for mpi), (2) slug's link over it, (3) the link throughput the real pipeline
//! achieved (a short run, or a recorded trace), with the ratios and a one-line verdict of
//! which layer is the bottleneck.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use slug_schema::{Direction, Event, EventKind, KindSet, TimeRange, Trace};
use slug_transport::AbortFlag;
use slug_transport::auth::ClusterKey;
use slug_transport::fabric::{Fabric, FabricLayout, RingSpec};
use slug_transport::link::ring::{RingRecv, RingSend};
use slug_transport::link::{LinkEnds, LinkIntegrity, LinkReceiver, LinkSender, Region, RegionMut};
use slug_transport::pipeline::{self, NoObservers, PipelineConfig, RunReport};
use slug_transport::transfer::{ArenaId, EndpointId, LinkId, Observers, Tag, TransportKind};

use crate::pipeline_args::ModelArgs;

const EXAMPLES: &str = "\
Examples:
  slug ladder --model small --stages 4
      shm and tcp: memcpy / raw socket vs slug's link vs a 4-stage small pipeline, with verdicts.
  mpirun -np 4 slug ladder --transport mpi,shm,tcp --model small --stages 4
      Adds the mpi row: raw MPI send/recv vs slug's MPI link between ranks 0 and 1, and the
      pipeline run with one rank per stage (a build with --features mpi).
  slug ladder --trace run1 --json
      The pipeline row from a recorded trace (its transport, model and stages) instead of a
      new run; one JSON object.
  slug ladder --transport rdma --model small --stages 2
      RDMA verbs (a build with --features rdma): raw RDMA writes with immediate between two
      queue pairs vs slug's rdma link vs the pipeline over rdma. On Soft-RoCE (rxe) the raw
      row says \"software emulation\": those numbers measure the kernel's emulation, not RDMA.

Throughputs count payload bytes one way. The raw and link rows are ping-pongs of each
activation size the pipeline sends (prefill: prompt x dim x 4 bytes; decode: dim x 4); the
pipeline row divides the bytes its links moved by the run's wall time.";

/// Arguments of `slug ladder`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct LadderArgs {
    /// Transports to measure, in order (shm, tcp, mpi, rdma; mpi under mpirun only, rdma in a
    /// build with `--features rdma` on a host with an RDMA device).
    #[arg(long, value_delimiter = ',', default_value = "shm,tcp")]
    transport: Vec<String>,
    /// Pipeline stages of the pipeline row (at most the model's layers; tiny has 2).
    #[arg(long, default_value_t = 2)]
    stages: usize,
    /// Tokens per sequence of the pipeline row's run.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Sequences (all in flight) of the pipeline row's run.
    #[arg(long, default_value_t = 4)]
    sequences: usize,
    /// Prompt of the pipeline row's run (its length sets the prefill activation size).
    #[arg(long, default_value = "Hello, slug!")]
    prompt: String,
    /// Messages per raw and link rung of the shm, tcp and rdma rows (default: enough for
    /// about 50 ms at a few GB/s, at least 200); fewer for slow fabrics such as emulated RDMA.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(2..))]
    messages: Option<u64>,
    /// Take the pipeline row from this recorded trace (its own transport, model and stages).
    #[arg(long, value_name = "DIR")]
    trace: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: ModelArgs,
}

/// Where a ladder's pipeline row comes from.
#[derive(Debug)]
// Only the mpi rung (feature `mpi`) reads a given row this way.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub enum PipelineRow {
    /// A short run of the pipeline on the transport.
    Run,
    /// A recorded trace of this transport.
    Given(Achieved),
    /// None: the trace given was recorded on another transport.
    None,
}

/// One measured rung: bytes per second at one message size.
#[derive(Debug, Clone, Serialize)]
pub struct Rung {
    /// Message size in bytes.
    pub bytes: usize,
    /// Payload bytes per second (one way).
    pub bytes_per_s: f64,
    /// Time per message, microseconds.
    pub us_per_message: f64,
}

impl Rung {
    /// `messages` of `bytes` each in `took`.
    pub fn new(bytes: usize, messages: u64, took: Duration) -> Self {
        let secs = took.as_secs_f64().max(1e-9);
        Rung {
            bytes,
            bytes_per_s: bytes as f64 * messages as f64 / secs,
            us_per_message: secs * 1e6 / messages.max(1) as f64,
        }
    }
}

/// What the pipeline achieved on its links.
#[derive(Debug, Clone, Serialize)]
pub struct Achieved {
    /// Where it comes from: "run" or the trace directory.
    pub source: String,
    /// Payload bytes every link moved together.
    pub bytes: u64,
    /// Transfers.
    pub transfers: u64,
    /// Wall time they took, seconds.
    pub seconds: f64,
    /// `bytes / seconds`.
    pub bytes_per_s: f64,
    /// Tokens per second of the run (0 for a trace).
    pub tokens_per_s: f64,
}

/// A transport's measured rows before their ratios: what the raw row measures, the raw rungs
/// and slug's link rungs.
pub type Rows = (String, Result<Vec<Rung>>, Result<Vec<Rung>>);

/// One transport's ladder.
#[derive(Debug, Clone, Serialize)]
pub struct Ladder {
    /// The transport.
    pub transport: String,
    /// What the raw row measures.
    pub raw_kind: String,
    /// Raw fabric, per activation size.
    pub raw: Vec<Rung>,
    /// slug's link, per activation size.
    pub link: Vec<Rung>,
    /// The real pipeline.
    pub pipeline: Option<Achieved>,
    /// link / raw at each size.
    pub link_vs_raw: Vec<f64>,
    /// pipeline / link at the size most of its transfers have (decode).
    pub pipeline_vs_link: Option<f64>,
    /// Which layer is the bottleneck, in one line.
    pub verdict: String,
}

/// Runs `slug ladder`.
pub fn execute(args: LadderArgs) -> Result<ExitCode> {
    let mut transports = Vec::new();
    for t in &args.transport {
        let kind: TransportKind = t.parse().with_context(|| format!("--transport {t}"))?;
        if kind == TransportKind::Local {
            bail!(
                "--transport local: the ladder measures fabrics between stages: shm, tcp, mpi or \
                 rdma"
            );
        }
        if kind == TransportKind::Rdma {
            crate::rdma::check()?;
        }
        if !transports.contains(&kind) {
            transports.push(kind);
        }
    }
    let (cfg, trace) = match &args.trace {
        Some(dir) => {
            let (cfg, achieved) = from_trace(dir)?;
            (cfg, Some(achieved))
        }
        None => {
            let mut cfg = PipelineConfig::new(
                args.model.config()?,
                &args.prompt,
                args.sequences,
                args.tokens,
            );
            cfg.stages = args.stages;
            cfg.validate()?;
            (cfg, None)
        }
    };
    let dim_bytes = cfg.model.dim * 4;
    let prompt = cfg.prompts.iter().map(Vec::len).max().unwrap_or(1);
    let mut sizes = vec![dim_bytes, prompt * dim_bytes];
    sizes.dedup();
    let mut ladders = Vec::new();
    // MPI first: ranks other than 0 take part in it, then leave rank 0 to the rest.
    if transports.contains(&TransportKind::Mpi) {
        let mut mpi_cfg = cfg.clone();
        mpi_cfg.transport = TransportKind::Mpi;
        let row = match &trace {
            None => PipelineRow::Run,
            Some((TransportKind::Mpi, a)) => PipelineRow::Given(a.clone()),
            Some(_) => PipelineRow::None,
        };
        match crate::mpi::ladder_row(&mpi_cfg, &sizes, row)? {
            Some(l) => ladders.push(l),
            None => return Ok(ExitCode::SUCCESS),
        }
    }
    for kind in transports {
        if kind == TransportKind::Mpi {
            continue;
        }
        let (raw_kind, raw, link) = match kind {
            TransportKind::Shm => (
                "memcpy".to_string(),
                rungs(&sizes, args.messages, memcpy),
                rungs(&sizes, args.messages, shm_link),
            ),
            TransportKind::Rdma => crate::rdma::ladder_rungs(&sizes, args.messages)?,
            _ => (
                "loopback socket".to_string(),
                rungs(&sizes, args.messages, raw_socket),
                rungs(&sizes, args.messages, tcp_link),
            ),
        };
        let achieved = match &trace {
            Some((k, a)) if *k == kind => Some(a.clone()),
            Some(_) => None,
            None => {
                let mut c = cfg.clone();
                c.transport = kind;
                c.launcher = Some(crate::node::launcher()?);
                Some(achieved_by(&pipeline::run(&c, &NoObservers)?))
            }
        };
        ladders.push(assemble(kind.name(), &raw_kind, raw?, link?, achieved));
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": cfg.model.name,
                "stages": cfg.stages,
                "activation_bytes": sizes,
                "ladders": ladders,
            })
        );
    } else {
        print_text(&cfg, &ladders);
    }
    Ok(ExitCode::SUCCESS)
}

/// The ratios and verdict of one transport's measurements.
pub fn assemble(
    transport: &str,
    raw_kind: &str,
    raw: Vec<Rung>,
    link: Vec<Rung>,
    pipeline: Option<Achieved>,
) -> Ladder {
    let link_vs_raw: Vec<f64> = raw
        .iter()
        .zip(&link)
        .map(|(r, l)| l.bytes_per_s / r.bytes_per_s.max(1e-9))
        .collect();
    // Most of a pipeline's transfers are decode-step activations: the first size.
    let pipeline_vs_link = pipeline
        .as_ref()
        .zip(link.first())
        .map(|(p, l)| p.bytes_per_s / l.bytes_per_s.max(1e-9));
    let worst_link = link_vs_raw.iter().copied().fold(f64::INFINITY, f64::min);
    let link_note = if worst_link < 0.5 {
        format!(
            "slug's link reaches only {:.0}% of the raw {raw_kind} at some size: look at the \
             link first",
            worst_link * 100.0
        )
    } else {
        format!(
            "slug's link reaches {:.0}% or more of the raw {raw_kind}",
            worst_link.min(9.99) * 100.0
        )
    };
    let verdict = match pipeline_vs_link {
        Some(p) if p >= 0.5 => format!(
            "the link is the bottleneck: the pipeline moves {:.0}% of what slug's link can; \
             {link_note}",
            p * 100.0
        ),
        Some(p) => format!(
            "compute is the bottleneck: the pipeline uses {:.2}% of what slug's link can move; \
             {transport} is probably not the problem ({link_note})",
            p * 100.0
        ),
        None => format!("no pipeline row for {transport}; {link_note}"),
    };
    Ladder {
        transport: transport.to_string(),
        raw_kind: raw_kind.to_string(),
        raw,
        link,
        pipeline,
        link_vs_raw,
        pipeline_vs_link,
        verdict,
    }
}

/// What a run's links moved over its wall time.
pub fn achieved_by(report: &RunReport) -> Achieved {
    let (bytes, transfers) = report
        .stage_reports
        .iter()
        .filter_map(|r| r.inbound)
        .fold((0, 0), |(b, t), l| (b + l.bytes, t + l.transfers));
    let seconds = report.wall_ns as f64 / 1e9;
    Achieved {
        source: "run".into(),
        bytes,
        transfers,
        seconds,
        bytes_per_s: bytes as f64 / seconds.max(1e-9),
        tokens_per_s: report.tokens_per_s,
    }
}

/// The recorded pipeline and what its links moved: every received transfer's bytes over the
/// longest span from an endpoint's first post to its last completion.
fn from_trace(dir: &std::path::Path) -> Result<(PipelineConfig, (TransportKind, Achieved))> {
    let trace = Trace::open(dir).with_context(|| format!("open trace {}", dir.display()))?;
    let manifest = trace.manifest();
    let cfg: PipelineConfig = serde_json::from_value(manifest.run["pipeline"].clone())
        .with_context(|| format!("{}: the manifest holds no pipeline", dir.display()))?;
    let (mut bytes, mut transfers, mut span) = (0u64, 0u64, 0u64);
    for ep in &manifest.endpoints {
        let log = trace.endpoint_log(ep.id)?;
        let (mut first, mut last) = (u64::MAX, 0u64);
        for event in log.events_in(TimeRange::ALL, KindSet::of(&[EventKind::Transfer])) {
            let Ok(Event::Transfer(t)) = event else {
                continue;
            };
            if t.direction != Direction::Recv {
                continue;
            }
            bytes += t.len;
            transfers += 1;
            first = first.min(t.post_ns);
            last = last.max(t.complete_ns);
        }
        span = span.max(last.saturating_sub(first));
    }
    let seconds = span as f64 / 1e9;
    let achieved = Achieved {
        source: dir.display().to_string(),
        bytes,
        transfers,
        seconds,
        bytes_per_s: bytes as f64 / seconds.max(1e-9),
        tokens_per_s: 0.0,
    };
    Ok((cfg.clone(), (cfg.transport, achieved)))
}

fn print_text(cfg: &PipelineConfig, ladders: &[Ladder]) {
    println!(
        "ladder: model {} ({} layers, dim {}), {} stages",
        cfg.model.name, cfg.model.layers, cfg.model.dim, cfg.stages
    );
    let rate = |b: f64| {
        if b >= 1e9 {
            format!("{:.2} GB/s", b / 1e9)
        } else {
            format!("{:.1} MB/s", b / 1e6)
        }
    };
    for l in ladders {
        println!("{}:", l.transport);
        for ((r, k), ratio) in l.raw.iter().zip(&l.link).zip(&l.link_vs_raw) {
            println!(
                "  {:>9} B  raw {:<16} {:>11} ({:>7.2} us)   slug link {:>11} ({:>7.2} us)   \
                 link/raw {:.2}x",
                r.bytes,
                l.raw_kind,
                rate(r.bytes_per_s),
                r.us_per_message,
                rate(k.bytes_per_s),
                k.us_per_message,
                ratio
            );
        }
        if let Some(p) = &l.pipeline {
            let tokens = if p.tokens_per_s > 0.0 {
                format!(", {:.1} tokens/s", p.tokens_per_s)
            } else {
                String::new()
            };
            println!(
                "  pipeline ({}): {} transfers, {} bytes in {:.3} s: {}{tokens}; pipeline/link {:.4}x",
                p.source,
                p.transfers,
                p.bytes,
                p.seconds,
                rate(p.bytes_per_s),
                l.pipeline_vs_link.unwrap_or(0.0)
            );
        }
        println!("  verdict: {}", l.verdict);
    }
}

/// Messages per measurement: enough to take about 50 ms at a few GB/s, at least 200.
pub fn iterations(size: usize) -> u64 {
    ((256 << 20) / size.max(1)).clamp(200, 20_000) as u64
}

/// One rung per size, each `measure(size, messages)` (by default [`iterations`]).
pub fn rungs(
    sizes: &[usize],
    messages: Option<u64>,
    mut measure: impl FnMut(usize, u64) -> Result<Duration>,
) -> Result<Vec<Rung>> {
    sizes
        .iter()
        .map(|&s| {
            let n = messages.unwrap_or_else(|| iterations(s));
            Ok(Rung::new(s, n, measure(s, n)?))
        })
        .collect()
}

fn memcpy(size: usize, n: u64) -> Result<Duration> {
    let src = vec![7u8; size];
    let mut dst = vec![0u8; size];
    let start = Instant::now();
    for _ in 0..n {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    Ok(start.elapsed())
}

/// `n` messages as ping-pong round trips (n / 2 each way) between two threads.
pub fn ping_pong<A: Send + 'static>(
    n: u64,
    a: A,
    b: A,
    step: fn(&mut A, bool) -> Result<()>,
) -> Result<Duration> {
    let rounds = n.div_ceil(2);
    let other = std::thread::spawn(move || -> Result<()> {
        let mut b = b;
        for _ in 0..rounds {
            step(&mut b, false)?;
        }
        Ok(())
    });
    let mut a = a;
    let start = Instant::now();
    for _ in 0..rounds {
        step(&mut a, true)?;
    }
    let took = start.elapsed();
    other
        .join()
        .map_err(|_| anyhow::anyhow!("the ping-pong thread panicked"))??;
    Ok(took)
}

fn raw_socket(size: usize, n: u64) -> Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let a = TcpStream::connect(listener.local_addr()?)?;
    let (b, _) = listener.accept()?;
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    let step = |(s, buf): &mut (TcpStream, Vec<u8>), first: bool| -> Result<()> {
        if first {
            s.write_all(buf)?;
            s.read_exact(buf)?;
        } else {
            s.read_exact(buf)?;
            s.write_all(buf)?;
        }
        Ok(())
    };
    ping_pong(n, (a, vec![1u8; size]), (b, vec![2u8; size]), step)
}

/// Link `id` of the ladder's two links between endpoints 0 and 1.
pub fn ends(id: u32) -> LinkEnds {
    LinkEnds {
        id: LinkId(id),
        src: EndpointId(id),
        dst: EndpointId(1 - id),
        timeout: Duration::from_secs(30),
    }
}

/// One side of a ping-pong over slug's links: its sender, receiver and arena.
pub type LinkSide = (LinkSender, LinkReceiver, Vec<u8>);

/// One ping-pong step over slug's links: the first side sends then receives, the other the
/// reverse.
pub fn link_step(side: &mut LinkSide, first: bool) -> Result<()> {
    let (tx, rx, arena) = side;
    let len = arena.len() as u64 / 2;
    let tag = Tag {
        sequence: 0,
        step: 0,
        layer: 0,
    };
    let mut send = |arena: &[u8]| {
        tx.send(
            Region {
                arena: ArenaId(0),
                bytes: arena,
            },
            0,
            len,
            ArenaId(0),
            len,
            tag,
        )
    };
    if first {
        send(arena)?;
    }
    rx.recv(&mut RegionMut {
        arena: ArenaId(0),
        bytes: arena,
    })?;
    if !first {
        send(arena)?;
    }
    Ok(())
}

/// The ring a link row uses for messages of `size` bytes: slots of at most 64 KiB, room for
/// one whole message.
pub fn link_spec(size: usize) -> RingSpec {
    let capacity = size.min(64 << 10);
    RingSpec {
        slots: size.div_ceil(capacity).max(2) as u32,
        capacity: capacity as u64,
    }
}

fn shm_link(size: usize, n: u64) -> Result<Duration> {
    let spec = link_spec(size);
    let layout = FabricLayout::new(&[spec, spec])?;
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    // A new file of our own (create refuses an existing one), mapped twice as two stage
    // processes would, and unlinked at once.
    let path = dir.join(format!("slug-ladder-{}-{size}", std::process::id()));
    let a = Arc::new(Fabric::create(&path, layout.clone())?);
    let b = Fabric::open(&path, layout);
    let _ = std::fs::remove_file(&path);
    let b = Arc::new(b?);
    let kind = TransportKind::Shm;
    let side = |tx: &Arc<Fabric>, out: u32, rx: &Arc<Fabric>| -> Result<LinkSide> {
        Ok((
            LinkSender::new(
                ends(out),
                Box::new(RingSend::new(tx.clone(), out as usize, kind)?),
                Observers::none(),
            ),
            LinkReceiver::new(
                ends(1 - out),
                Box::new(RingRecv::new(rx.clone(), 1 - out as usize, kind)?),
                Observers::none(),
            ),
            vec![0u8; 2 * size],
        ))
    };
    ping_pong(n, side(&a, 0, &a)?, side(&b, 1, &b)?, link_step)
}

fn tcp_link(size: usize, n: u64) -> Result<Duration> {
    let key = ClusterKey::random()?;
    let abort = AbortFlag::new();
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for id in 0..2u32 {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let (k, a) = (key.clone(), abort.clone());
        let acceptor = std::thread::spawn(move || {
            LinkReceiver::accept_tcp(
                &listener,
                &k,
                LinkIntegrity::Mac,
                ends(id),
                Observers::none(),
                &a,
                &|_| {},
            )
        });
        let tx = LinkSender::connect_tcp(
            &addr,
            &key,
            LinkIntegrity::Mac,
            ends(id),
            Observers::none(),
            &abort,
        )?;
        let rx = acceptor
            .join()
            .map_err(|_| anyhow::anyhow!("the accepting thread panicked"))??;
        senders.push(tx);
        receivers.push(rx);
    }
    let (rx1, rx0) = (receivers.pop(), receivers.pop());
    let (tx1, tx0) = (senders.pop(), senders.pop());
    let (Some(tx0), Some(tx1), Some(rx0), Some(rx1)) = (tx0, tx1, rx0, rx1) else {
        bail!("tcp links were not connected");
    };
    // Side a sends on link 0 and receives on link 1; side b the reverse.
    ping_pong(
        n,
        (tx0, rx1, vec![0u8; 2 * size]),
        (tx1, rx0, vec![0u8; 2 * size]),
        link_step,
    )
}
