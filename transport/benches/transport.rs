//! Transport benchmarks against raw baselines measured in the same run: bandwidth of >= 1 MiB
//! transfers (local and shm rings vs memcpy, tcp links with `--link-integrity mac` (default)
//! and `none` vs a plain loopback socket pair),
//! small-transfer round trips, and pipeline tokens/s of the `small` model at 1, 2 and 4 stages.
//! After the criterion groups a summary prints every ratio. `SLUG_TRANSPORT_ONLY=bandwidth,
//! latency,pipeline` (any of them, comma-separated) runs only those parts of the summary and
//! skips the criterion groups.

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use slug_kernels::ModelConfig;
use slug_transport::AbortFlag;
use slug_transport::auth::ClusterKey;
use slug_transport::fabric::{Fabric, FabricLayout, RingSpec};
use slug_transport::link::ring::{RingRecv, RingSend};
use slug_transport::link::{
    LinkEnds, LinkIntegrity, LinkReceiver, LinkSender, LinkStats, Region, RegionMut,
};
use slug_transport::pipeline::{Launch, NoObservers, PipelineConfig, run};
use slug_transport::transfer::{ArenaId, EndpointId, LinkId, Observers, Tag, TransportKind};

const BIG: usize = 1 << 20;
const SMALL: usize = 64;
/// Ring shape as the pipeline builds it for one in-flight 1 MiB message: 64 KiB pieces.
const SLOT_BYTES: usize = 64 << 10;
const A: ArenaId = ArenaId(0);

fn ends(id: u32) -> LinkEnds {
    LinkEnds {
        id: LinkId(id),
        src: EndpointId(id),
        dst: EndpointId(1 - id),
        timeout: Duration::from_secs(30),
    }
}

fn tag(i: u64) -> Tag {
    Tag {
        sequence: 0,
        step: i as u32,
        layer: 0,
    }
}

fn memcpy(iters: u64, size: usize) -> Duration {
    let src = vec![7u8; size];
    let mut dst = vec![0u8; size];
    let start = Instant::now();
    for _ in 0..iters {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    }
    start.elapsed()
}

/// The two sides of one link of the backend under test: (sender, receiver) for link `id`.
type Pair = (LinkSender, LinkReceiver);

/// The fabric of two rings shaped for `size`-byte transfers.
fn ring_layout(size: usize) -> FabricLayout {
    let capacity = size.min(SLOT_BYTES);
    let spec = RingSpec {
        slots: size.div_ceil(capacity).max(2) as u32,
        capacity: capacity as u64,
    };
    FabricLayout::new(&[spec, spec]).expect("layout")
}

/// A fresh fabric file's path, in /dev/shm where there is one (as shm runs place it).
fn shm_path(what: &str) -> PathBuf {
    let name = format!("slug-bench-{what}-{}", std::process::id());
    let dir = Path::new("/dev/shm");
    if dir.is_dir() {
        dir.join(name)
    } else {
        std::env::temp_dir().join(name)
    }
}

/// Ring links of `kind` (`Local`: heap fabric; `Shm`: a /dev/shm file mapped twice, as two
/// processes would). Returns link 0 (a -> b) and link 1 (b -> a).
fn ring_links(kind: TransportKind, size: usize) -> (Pair, Pair) {
    let layout = ring_layout(size);
    let (tx_side, rx_side) = match kind {
        TransportKind::Shm => {
            let path = shm_path("threads");
            let a = Arc::new(Fabric::create(&path, layout.clone()).expect("create fabric"));
            let b = Arc::new(Fabric::open(&path, layout).expect("open fabric"));
            let _ = std::fs::remove_file(&path);
            (a, b)
        }
        _ => {
            let f = Arc::new(Fabric::heap(layout));
            (f.clone(), f)
        }
    };
    let link = |id: u32, tx: &Arc<Fabric>, rx: &Arc<Fabric>| {
        let send = RingSend::new(tx.clone(), id as usize, kind).expect("sender");
        let recv = RingRecv::new(rx.clone(), id as usize, kind).expect("receiver");
        (
            LinkSender::new(ends(id), Box::new(send), Observers::none()),
            LinkReceiver::new(ends(id), Box::new(recv), Observers::none()),
        )
    };
    (link(0, &tx_side, &rx_side), link(1, &rx_side, &tx_side))
}

fn tcp_links(integrity: LinkIntegrity) -> (Pair, Pair) {
    let key = ClusterKey::from_bytes(b"benchmark-cluster-key").expect("key");
    let abort = AbortFlag::new();
    let pair = |id: u32| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (k, a) = (key.clone(), abort.clone());
        let rx = std::thread::spawn(move || {
            let none = Observers::none();
            LinkReceiver::accept_tcp(&listener, &k, integrity, ends(id), none, &a, &|_| {})
                .expect("accept")
        });
        let none = Observers::none();
        let tx = LinkSender::connect_tcp(&addr, &key, integrity, ends(id), none, &abort)
            .expect("connect");
        (tx, rx.join().expect("acceptor"))
    };
    (pair(0), pair(1))
}

fn raw_tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (b, _) = listener.accept().expect("accept");
    a.set_nodelay(true).expect("nodelay");
    b.set_nodelay(true).expect("nodelay");
    (a, b)
}

/// A backend under test: a ring transport, or tcp with one integrity mode.
#[derive(Clone, Copy)]
enum Backend {
    Ring(TransportKind),
    Tcp(LinkIntegrity),
}

impl Backend {
    const ALL: [Backend; 4] = [
        Backend::Ring(TransportKind::Local),
        Backend::Ring(TransportKind::Shm),
        Backend::Tcp(LinkIntegrity::Mac),
        Backend::Tcp(LinkIntegrity::None),
    ];

    fn name(self) -> String {
        match self {
            Backend::Ring(kind) => kind.name().to_string(),
            Backend::Tcp(integrity) => format!("tcp_{integrity}"),
        }
    }
}

fn links(backend: Backend, size: usize) -> (Pair, Pair) {
    match backend {
        Backend::Tcp(integrity) => tcp_links(integrity),
        Backend::Ring(kind) => ring_links(kind, size),
    }
}

/// Streams `iters` transfers of `size` bytes from a sender thread; times until the last arrives.
fn stream(kind: Backend, iters: u64, size: usize) -> Duration {
    let ((mut tx, mut rx), _) = links(kind, size);
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let sender = std::thread::spawn(move || {
        let src = vec![3u8; size];
        go2.wait();
        for i in 0..iters {
            tx.send(
                Region {
                    arena: A,
                    bytes: &src,
                },
                0,
                size as u64,
                A,
                0,
                tag(i),
            )
            .expect("send");
        }
    });
    let mut dst = vec![0u8; size];
    go.wait();
    let start = Instant::now();
    for _ in 0..iters {
        rx.recv(&mut RegionMut {
            arena: A,
            bytes: &mut dst,
        })
        .expect("recv");
    }
    let t = start.elapsed();
    sender.join().expect("sender");
    count_direct(&rx.stats());
    t
}

/// Transfers taken straight into the receiver's arena, and all transfers, by `stream` since
/// the last [`direct_share`].
static DIRECT: AtomicU64 = AtomicU64::new(0);
static RECEIVED: AtomicU64 = AtomicU64::new(0);

fn count_direct(stats: &LinkStats) {
    DIRECT.fetch_add(stats.direct, Ordering::Relaxed);
    RECEIVED.fetch_add(stats.transfers, Ordering::Relaxed);
}

/// Percent of the transfers counted since the last call that were copied once (direct).
fn direct_share() -> f64 {
    let direct = DIRECT.swap(0, Ordering::Relaxed) as f64;
    100.0 * direct / RECEIVED.swap(0, Ordering::Relaxed).max(1) as f64
}

/// Set in the receiving child of [`stream_processes`]: the fabric file and how many to receive.
const CHILD: &str = "SLUG_TRANSPORT_BENCH_CHILD";

/// [`stream`] over shm with the receiver in another process, as in an shm run: a child (this
/// bench run again) maps the fabric file, takes one transfer to start, then times `iters`
/// more and prints the nanoseconds and its direct count.
fn stream_processes(iters: u64, size: usize) -> Duration {
    let path = shm_path("processes");
    let fabric = Arc::new(Fabric::create(&path, ring_layout(size)).expect("create fabric"));
    let child = std::process::Command::new(std::env::current_exe().expect("bench binary"))
        .env(CHILD, format!("{iters}:{size}:{}", path.display()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the receiving process");
    let send = RingSend::new(fabric, 0, TransportKind::Shm).expect("sender");
    let mut tx = LinkSender::new(ends(0), Box::new(send), Observers::none());
    let src = vec![3u8; size];
    for i in 0..=iters {
        let region = Region {
            arena: A,
            bytes: &src,
        };
        tx.send(region, 0, size as u64, A, 0, tag(i)).expect("send");
    }
    let out = child.wait_with_output().expect("receiving process");
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text
        .split_whitespace()
        .map(|w| w.parse::<u64>().expect("number"));
    let (ns, direct) = (words.next().expect("time"), words.next().expect("direct"));
    count_direct(&LinkStats {
        transfers: iters,
        direct,
        ..LinkStats::default()
    });
    Duration::from_nanos(ns)
}

/// The receiving child of [`stream_processes`]; exits the process.
fn receive_in_child(spec: &str) -> ! {
    let mut parts = spec.splitn(3, ':');
    let mut number = || {
        parts
            .next()
            .and_then(|p| p.parse::<u64>().ok())
            .expect(CHILD)
    };
    let (iters, size) = (number(), number() as usize);
    let path = PathBuf::from(spec.splitn(3, ':').nth(2).expect(CHILD));
    let fabric = Arc::new(Fabric::open(&path, ring_layout(size)).expect("open fabric"));
    let recv = RingRecv::new(fabric, 0, TransportKind::Shm).expect("receiver");
    let mut rx = LinkReceiver::new(ends(0), Box::new(recv), Observers::none());
    let mut dst = vec![0u8; size];
    let mut take = |rx: &mut LinkReceiver| {
        rx.recv(&mut RegionMut {
            arena: A,
            bytes: &mut dst,
        })
        .expect("recv");
    };
    take(&mut rx);
    let first = rx.stats().direct;
    let start = Instant::now();
    for _ in 0..iters {
        take(&mut rx);
    }
    let ns = start.elapsed().as_nanos();
    println!("{ns} {}", rx.stats().direct - first);
    std::process::exit(0)
}

fn raw_stream(iters: u64, size: usize) -> Duration {
    let (mut a, mut b) = raw_tcp_pair();
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let sender = std::thread::spawn(move || {
        let src = vec![3u8; size];
        go2.wait();
        for _ in 0..iters {
            a.write_all(&src).expect("write");
        }
    });
    let mut dst = vec![0u8; size];
    go.wait();
    let start = Instant::now();
    for _ in 0..iters {
        b.read_exact(&mut dst).expect("read");
    }
    let t = start.elapsed();
    sender.join().expect("sender");
    t
}

/// `iters` round trips of `size` bytes: a -> b on link 0, echoed back on link 1.
fn ping_pong(kind: Backend, iters: u64, size: usize) -> Duration {
    let ((mut tx0, mut rx0), (mut tx1, mut rx1)) = links(kind, size.max(64));
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; size];
        for i in 0..iters {
            rx0.recv(&mut RegionMut {
                arena: A,
                bytes: &mut buf,
            })
            .expect("recv");
            tx1.send(
                Region {
                    arena: A,
                    bytes: &buf,
                },
                0,
                size as u64,
                A,
                0,
                tag(i),
            )
            .expect("send");
        }
    });
    let mut buf = vec![1u8; size];
    let start = Instant::now();
    for i in 0..iters {
        tx0.send(
            Region {
                arena: A,
                bytes: &buf,
            },
            0,
            size as u64,
            A,
            0,
            tag(i),
        )
        .expect("send");
        rx1.recv(&mut RegionMut {
            arena: A,
            bytes: &mut buf,
        })
        .expect("recv");
    }
    let t = start.elapsed();
    echo.join().expect("echo");
    t
}

fn raw_ping_pong(iters: u64, size: usize) -> Duration {
    let (mut a, mut b) = raw_tcp_pair();
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; size];
        for _ in 0..iters {
            b.read_exact(&mut buf).expect("read");
            b.write_all(&buf).expect("write");
        }
    });
    let mut buf = vec![1u8; size];
    let start = Instant::now();
    for _ in 0..iters {
        a.write_all(&buf).expect("write");
        a.read_exact(&mut buf).expect("read");
    }
    let t = start.elapsed();
    echo.join().expect("echo");
    t
}

/// Best of `trials` timings of `iters` iterations, per iteration.
fn best(trials: usize, iters: u64, f: impl Fn(u64) -> Duration) -> Duration {
    (0..trials)
        .map(|_| f(iters) / iters as u32)
        .min()
        .unwrap_or_default()
}

fn bandwidth(c: &mut Criterion) {
    let mut g = c.benchmark_group("bandwidth_1MiB");
    g.throughput(Throughput::Bytes(BIG as u64));
    g.bench_function("memcpy", |b| b.iter_custom(|n| memcpy(n, BIG)));
    g.bench_function("raw_tcp", |b| b.iter_custom(|n| raw_stream(n, BIG)));
    for kind in Backend::ALL {
        g.bench_function(kind.name(), |b| b.iter_custom(|n| stream(kind, n, BIG)));
    }
    g.finish();
}

fn latency(c: &mut Criterion) {
    let mut g = c.benchmark_group("round_trip_64B");
    g.bench_function("memcpy", |b| b.iter_custom(|n| memcpy(n, SMALL)));
    g.bench_function("raw_tcp", |b| b.iter_custom(|n| raw_ping_pong(n, SMALL)));
    for kind in Backend::ALL {
        g.bench_function(kind.name(), |b| {
            b.iter_custom(|n| ping_pong(kind, n, SMALL))
        });
    }
    g.finish();
}

fn pipeline_config(stages: usize) -> PipelineConfig {
    let model = ModelConfig::preset("small").expect("small preset");
    let mut cfg = PipelineConfig::new(model, "The quick brown fox", 4, 8);
    cfg.stages = stages;
    cfg
}

fn pipeline(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipeline_small_local");
    g.sample_size(10);
    for stages in [1, 2, 4] {
        let cfg = pipeline_config(stages);
        g.bench_function(format!("{stages}_stages"), |b| {
            b.iter_custom(|n| {
                (0..n)
                    .map(|_| Duration::from_nanos(run(&cfg, &NoObservers).expect("run").wall_ns))
                    .sum()
            })
        });
    }
    g.finish();
}

/// Whether `SLUG_TRANSPORT_ONLY` (unset: everything) names `part`.
fn wanted(part: &str) -> bool {
    std::env::var("SLUG_TRANSPORT_ONLY")
        .map_or(true, |only| only.split(',').any(|p| p.trim() == part))
}

/// Runs the criterion groups unless `SLUG_TRANSPORT_ONLY` picks parts of the summary.
fn groups(c: &mut Criterion) {
    if let Ok(spec) = std::env::var(CHILD) {
        receive_in_child(&spec);
    }
    if std::env::var_os("SLUG_TRANSPORT_ONLY").is_none() {
        bandwidth(c);
        latency(c);
        pipeline(c);
    }
}

/// Measures every backend and its baseline again, back to back, and prints the ratios.
fn summary(_c: &mut Criterion) {
    if wanted("bandwidth") {
        summary_bandwidth();
    }
    if wanted("latency") {
        summary_latency();
    }
    if wanted("pipeline") {
        summary_pipeline();
    }
}

fn summary_bandwidth() {
    let gib = |d: Duration| BIG as f64 / d.as_secs_f64() / f64::from(1u32 << 30);
    let memcpy_bw = best(5, 200, |n| memcpy(n, BIG));
    let raw_bw = best(5, 200, |n| raw_stream(n, BIG));
    eprintln!("\n== transport summary (bandwidth of 1 MiB transfers, best of 5) ==");
    eprintln!("memcpy   {:7.2} GiB/s", gib(memcpy_bw));
    eprintln!("raw tcp  {:7.2} GiB/s", gib(raw_bw));
    for kind in Backend::ALL {
        let t = best(5, 200, |n| stream(kind, n, BIG));
        // Raw socket measured again right after: the ratio compares like with like.
        let (base, name) = match kind {
            Backend::Tcp(_) => (best(5, 200, |n| raw_stream(n, BIG)).min(raw_bw), "raw tcp"),
            Backend::Ring(_) => (memcpy_bw, "memcpy"),
        };
        let share = direct_share();
        let direct = match kind {
            Backend::Ring(_) => format!(" ({share:.0}% copied once, straight into the receiver)"),
            Backend::Tcp(_) => String::new(),
        };
        eprintln!(
            "{:<8} {:7.2} GiB/s  = {:.2}x {name}{direct}",
            kind.name(),
            gib(t),
            base.as_secs_f64() / t.as_secs_f64()
        );
    }
    // As an shm run moves activations: the receiver is another process, and the one copy is
    // `process_vm_writev` into its arena. memcpy measured again right after.
    let t = best(5, 200, |n| stream_processes(n, BIG));
    let base = best(5, 200, |n| memcpy(n, BIG)).min(memcpy_bw);
    eprintln!(
        "shm, receiver in another process {:7.2} GiB/s  = {:.2}x memcpy ({:.0}% copied once)",
        gib(t),
        base.as_secs_f64() / t.as_secs_f64(),
        direct_share()
    );
    let mac = best(5, 200, |n| {
        let (key, src) = ([7u8; 32], vec![3u8; BIG]);
        let start = Instant::now();
        for _ in 0..n {
            black_box(blake3::keyed_hash(&key, black_box(&src)));
        }
        start.elapsed()
    });
    eprintln!(
        "blake3 keyed MAC alone {:7.2} GiB/s (each end of a tcp_mac link hashes every byte once, \
         on the thread that moves it; target: tcp_mac >= 0.80x raw tcp)",
        gib(mac)
    );
}

fn summary_latency() {
    let memcpy_small = best(5, 100_000, |n| memcpy(n, SMALL));
    let raw_rtt = best(5, 5_000, |n| raw_ping_pong(n, SMALL));
    eprintln!("== round trip of 64 B transfers ==");
    eprintln!("memcpy   {:9.0} ns (one copy)", memcpy_small.as_nanos());
    eprintln!("raw tcp  {:9.0} ns", raw_rtt.as_nanos());
    for kind in Backend::ALL {
        let t = best(5, 5_000, |n| ping_pong(kind, n, SMALL));
        let (base, name) = match kind {
            Backend::Tcp(_) => (raw_rtt, "raw tcp"),
            Backend::Ring(_) => (memcpy_small, "memcpy"),
        };
        eprintln!(
            "{:<8} {:9.0} ns  = {:.2}x the {name} time",
            kind.name(),
            t.as_nanos(),
            t.as_secs_f64() / base.as_secs_f64()
        );
    }
}

fn summary_pipeline() {
    eprintln!("== pipeline, small model, 4 sequences in flight, 8 tokens each (local) ==");
    let mut one = 0.0;
    for stages in [1, 2, 4] {
        let tps = (0..2)
            .map(|_| {
                run(&pipeline_config(stages), &NoObservers)
                    .expect("run")
                    .tokens_per_s
            })
            .fold(0.0, f64::max);
        if stages == 1 {
            one = tps;
        }
        eprintln!(
            "{stages} stages {tps:9.1} tokens/s = {:.2}x one stage",
            tps / one
        );
    }
    eprintln!(
        "== the same at 4 stages over shm and tcp (node threads, real fabric file / sockets) =="
    );
    for transport in [TransportKind::Shm, TransportKind::Tcp] {
        let mut cfg = pipeline_config(4);
        cfg.transport = transport;
        cfg.launch = Launch::Threads;
        let tps = (0..2)
            .map(|_| run(&cfg, &NoObservers).expect("run").tokens_per_s)
            .fold(0.0, f64::max);
        eprintln!(
            "{transport:<5} {tps:9.1} tokens/s = {:.2}x one local stage",
            tps / one
        );
    }
}

criterion_group!(benches, groups, summary);
criterion_main!(benches);
