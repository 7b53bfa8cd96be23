//! The node side of process transports: `slug node --listen ADDR` accepts coordinators that
//! prove the cluster key, builds the stage it is assigned, connects its data links and runs it,
//! heartbeating progress and reporting the outcome; strangers are refused and logged.

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::cluster::{Cause, FILE_PIECE, HEARTBEAT, RecordedFile, ToCoordinator, ToNode};
use super::config::PipelineConfig;
use super::failover;
use super::migrate;
use super::observe::{Observed, ObserverFactory, StageContext, stage_observers};
use super::progress::RunProgress;
use super::stage::{build_stage, drive_stage, link_ends};
use crate::auth::{ClusterKey, Role, server_handshake};
use crate::error::{Result, TransportError};
use crate::link::select::prepare_node_links;
use crate::link::{NodeLinkPlan, StageLinks};
use crate::transfer::StageMove;
use crate::wire::{AbortFlag, Conn, kind, printable, shown};

pub use super::cluster::LISTENING_PREFIX;

/// How long a caller may take to finish the handshake and a coordinator to send its assignment.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most callers in their handshake at once: a newcomer beyond it drops the one waiting longest
/// (logged), so strangers holding idle connections cost a bounded number of threads and
/// sockets and cannot keep a real coordinator, whose handshake takes a round trip, out.
pub const MAX_PENDING_HANDSHAKES: usize = 32;
/// Longest log line a node prints (peer-supplied parts are escaped and cut before this).
const LOG_LINE: usize = 2000;

/// How a node serves.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Address to listen on, e.g. `0.0.0.0:7070` or `127.0.0.1:0`.
    pub listen: String,
    /// The cluster key coordinators must prove.
    pub key: ClusterKey,
    /// Serve one accepted coordinator session, then return (refused callers do not count).
    pub once: bool,
    /// Raised to make [`serve`] return between sessions (noticed within 10 ms).
    pub stop: AbortFlag,
}

/// Listens and serves coordinator sessions, each on its own thread; callers are handshaken side
/// by side (at most [`MAX_PENDING_HANDSHAKES`] at once, the longest-waiting dropped for a
/// newcomer, each for at most 10 s), so strangers holding connections neither block nor starve
/// a real coordinator, and a thread that cannot be started refuses its caller instead of
/// failing the node.
/// `on_listening` gets the bound address (print it: launchers read [`LISTENING_PREFIX`] lines),
/// `log` every refusal and session end, one line each with peer-supplied text escaped. Returns
/// after one admitted session with `once` (its error, if it failed), otherwise when `opts.stop`
/// is raised (after running sessions end) or the listener fails.
pub fn serve(
    opts: &NodeOptions,
    factory: &dyn ObserverFactory,
    on_listening: &dyn Fn(SocketAddr),
    log: &(dyn Fn(&str) + Sync),
) -> Result<()> {
    let listener = TcpListener::bind(&opts.listen)
        .map_err(|e| TransportError::io(format!("listen on {}", opts.listen), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| TransportError::io("read the listening address", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| TransportError::io(format!("make {addr} non-blocking"), e))?;
    on_listening(addr);
    let log = &|msg: &str| log(&printable(msg, LOG_LINE));
    // Callers in their handshake, oldest first, each with the flag that makes it give up.
    let pending = Mutex::new(Pending::default());
    let admitted = AtomicBool::new(false);
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Result<()>>();
    let result = std::thread::scope(|scope| {
        loop {
            // Only a `once` node returns with a session's outcome; others serve on.
            if let Ok(outcome) = done_rx.try_recv() {
                return outcome;
            }
            let (stream, peer) = match accept_caller(&listener, addr, opts, &pending)? {
                Accepted::Caller(stream, peer) => (stream, peer),
                Accepted::Idle => continue,
                Accepted::Stop => return Ok(()),
            };
            if opts.once && admitted.load(Ordering::SeqCst) {
                log(&format!(
                    "refused {peer}: this node serves one session and has it"
                ));
                continue;
            }
            let (id, flag) = admit(&pending, peer, log);
            let caller = Caller { peer, id, flag };
            if let Err(e) = stream.set_nonblocking(false) {
                finished(&pending, id);
                log(&format!("refused {peer}: cannot configure its socket: {e}"));
                continue;
            }
            let (pending, admitted, done_tx) = (&pending, &admitted, done_tx.clone());
            let spawned = std::thread::Builder::new()
                .name("slug-node-session".into())
                .spawn_scoped(scope, move || {
                    let outcome =
                        serve_caller(stream, &caller, opts, pending, admitted, factory, log);
                    if let (true, Some(outcome)) = (opts.once, outcome) {
                        let _ = done_tx.send(outcome);
                    }
                });
            if let Err(e) = spawned {
                finished(pending, id);
                log(&format!(
                    "refused {peer}: no thread to serve it ({e}); closed"
                ));
            }
        }
    });
    // Handshakes still running give up at once.
    for (_, flag, _) in &pending.lock().unwrap_or_else(|e| e.into_inner()).waiting {
        flag.raise();
    }
    result
}

/// What one look at the listener found.
enum Accepted {
    Caller(TcpStream, SocketAddr),
    /// Nobody called (or too many handshakes are running): look again.
    Idle,
    /// `opts.stop` was raised.
    Stop,
}

/// Accepts the next caller, waiting up to 10 ms; while [`MAX_PENDING_HANDSHAKES`] twice over
/// are still running, newcomers wait in the listen backlog instead.
fn accept_caller(
    listener: &TcpListener,
    addr: SocketAddr,
    opts: &NodeOptions,
    pending: &Mutex<Pending>,
) -> Result<Accepted> {
    let idle = || {
        if opts.stop.raised() {
            return Accepted::Stop;
        }
        std::thread::sleep(Duration::from_millis(10));
        Accepted::Idle
    };
    if pending.lock().unwrap_or_else(|e| e.into_inner()).live >= 2 * MAX_PENDING_HANDSHAKES {
        // Dropped callers' threads end within 50 ms; until then newcomers wait in the listen
        // backlog rather than being turned away.
        return Ok(idle());
    }
    match listener.accept() {
        Ok((stream, peer)) => Ok(Accepted::Caller(stream, peer)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(idle()),
        Err(e) => Err(TransportError::io(format!("accept on {addr}"), e)),
    }
}

/// Enters a caller into the pending handshakes, dropping the one waiting longest when they are
/// full; returns the caller's id and the flag that ends its handshake.
fn admit(pending: &Mutex<Pending>, peer: SocketAddr, log: &dyn Fn(&str)) -> (u64, AbortFlag) {
    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
    if p.waiting.len() >= MAX_PENDING_HANDSHAKES {
        // Full: the caller waiting longest goes (a real coordinator finishes its handshake in
        // a round trip or two, so it is never the oldest for long).
        if let Some((_, oldest, who)) = p.waiting.pop_front() {
            oldest.raise();
            drop(p);
            log(&format!(
                "dropped {who}: {MAX_PENDING_HANDSHAKES} callers were in their handshake and it \
                 had waited longest; closed unheard"
            ));
            p = pending.lock().unwrap_or_else(|e| e.into_inner());
        }
    }
    p.next += 1;
    p.live += 1;
    let (id, flag) = (p.next, AbortFlag::new());
    p.waiting.push_back((id, flag.clone(), peer));
    (id, flag)
}

/// One accepted caller in its handshake.
struct Caller {
    peer: SocketAddr,
    /// Its id among the pending handshakes.
    id: u64,
    /// Ends its handshake.
    flag: AbortFlag,
}

/// Takes caller `id` out of the pending handshakes (its handshake ended or never started).
fn finished(pending: &Mutex<Pending>, id: u64) {
    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
    p.live -= 1;
    p.waiting.retain(|w| w.0 != id);
}

/// Handshakes a caller and, if it is an admitted coordinator, serves its session; returns the
/// session's outcome (`None`: the caller was refused).
fn serve_caller(
    stream: TcpStream,
    caller: &Caller,
    opts: &NodeOptions,
    pending: &Mutex<Pending>,
    admitted: &AtomicBool,
    factory: &dyn ObserverFactory,
    log: &(dyn Fn(&str) + Sync),
) -> Option<Result<()>> {
    let peer = caller.peer;
    let hs = handshake(stream, peer, opts, caller.flag.clone());
    finished(pending, caller.id);
    let hs = match hs {
        Ok(hs) => hs,
        Err(e) => {
            log(&format!("refused {peer}: {e}"));
            return None;
        }
    };
    if opts.once && admitted.swap(true, Ordering::SeqCst) {
        hs.conn.shutdown();
        log(&format!(
            "refused {peer}: this node serves one session and has it"
        ));
        return None;
    }
    let outcome = session(hs, factory, log);
    match &outcome {
        Ok(stage) => log(&format!("stage {stage} for coordinator {peer} finished")),
        Err(e) => log(&format!("session with coordinator {peer} failed: {e}")),
    }
    Some(outcome.map(|_| ()))
}

/// Callers in their handshake.
#[derive(Default)]
struct Pending {
    /// Oldest first: id, the flag that ends its handshake, its address.
    waiting: std::collections::VecDeque<(u64, AbortFlag, SocketAddr)>,
    /// Handshake threads not yet ended (a dropped caller's thread ends within 50 ms).
    live: usize,
    next: u64,
}

/// The handshake of one caller: only coordinators (control connections) are admitted here.
fn handshake(
    stream: TcpStream,
    peer: SocketAddr,
    opts: &NodeOptions,
    quit: AbortFlag,
) -> Result<crate::auth::Handshaken> {
    server_handshake(
        stream,
        format!("coordinator {peer}"),
        &opts.key,
        quit,
        HANDSHAKE_TIMEOUT,
        |hello| match hello.role {
            Role::Control => Ok(()),
            Role::Data => Err(
                "this is a node's control port; data links connect to the port the node announces"
                    .into(),
            ),
        },
    )
}

/// One admitted coordinator session; returns the stage it ran.
fn session(
    hs: crate::auth::Handshaken,
    factory: &dyn ObserverFactory,
    log: &(dyn Fn(&str) + Sync),
) -> Result<usize> {
    let abort = AbortFlag::new();
    let mut conn = hs.conn;
    conn.abort = abort.clone();
    let assignment = conn
        .recv_json::<ToNode>(HANDSHAKE_TIMEOUT)
        .and_then(|a| match a {
            ToNode::Assign {
                stage,
                config,
                fabric,
                link_secret,
                incoming,
            } => Ok((
                stage,
                *config,
                fabric,
                ClusterKey::from_bytes(link_secret.as_bytes())?,
                incoming,
            )),
            other => Err(TransportError::Protocol {
                peer: conn.peer.clone(),
                detail: format!("expected an assignment, got {}", shown(&other)),
            }),
        });
    let (stage, mut cfg, fabric, link_key, incoming) = match assignment {
        Ok(a) => a,
        Err(e) => {
            // Tell the coordinator why (a sealed frame that failed to open, say), so its error
            // names the cause rather than a closed connection.
            let msg = ToCoordinator::Failed {
                at: "startup".into(),
                error: format!("the node refused its assignment: {e}"),
                cause: Cause::Stage,
            };
            let _ = conn.send_json(&msg, Duration::from_secs(2));
            return Err(e);
        }
    };
    // This node's own counters: its recorder adds events to them, its heartbeats carry them.
    cfg.progress = Some(RunProgress::for_config(&cfg));
    let host = conn
        .stream
        .local_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let writer = Arc::new(Mutex::new(conn.try_clone()?));
    let assigned = Assigned {
        s: stage,
        cfg: &cfg,
        fabric_path: fabric,
        host: &host,
        link_key: &link_key,
        incoming,
    };
    let outcome = run_assigned(&mut conn, &writer, assigned, factory, &abort, log);
    match outcome {
        Ok(()) => Ok(stage),
        Err((at, e)) => {
            let msg = ToCoordinator::Failed {
                at: at.clone(),
                error: e.to_string(),
                cause: Cause::of(&e),
            };
            if let Ok(mut w) = writer.lock() {
                let _ = w.send_json(&msg, Duration::from_secs(2));
            }
            Err(TransportError::StageFailed {
                stage,
                host,
                step: at,
                detail: e.to_string(),
            })
        }
    }
}

/// What a coordinator assigned this node.
struct Assigned<'a> {
    s: usize,
    cfg: &'a PipelineConfig,
    fabric_path: Option<PathBuf>,
    host: &'a str,
    link_key: &'a ClusterKey,
    /// The move that brings the stage here (its state arrives before it runs).
    incoming: Option<usize>,
}

/// Why a node's stage failed: the phase it was in (`startup`, a step, `report`) and the error.
type Failure = (String, TransportError);

fn startup(e: TransportError) -> Failure {
    ("startup".to_string(), e)
}

/// The stage a node built for its assignment, with its observers and prepared links, before
/// the coordinator starts it.
struct Built<'a> {
    stage: slug_kernels::Stage,
    plan: slug_kernels::LayerPlan,
    pool: slug_kernels::ThreadPool,
    ctx: StageContext<'a>,
    hooks: Box<dyn slug_kernels::Hooks + Send>,
    transfers: crate::transfer::Observers,
    digests: Option<Arc<super::observe::DigestObserver>>,
    state: Option<Box<dyn super::state::StageStateObserver>>,
    links: Option<Box<dyn crate::link::LinkSetup>>,
    /// The weights' hash, when a move may involve this stage (source and target compare it).
    weights: Option<String>,
}

/// Runs the stage a coordinator assigned: builds it, reports ready, waits to be started (or
/// receives the moved stage's state first), runs it with its control threads, and sends the
/// recorded files when the coordinator collects them.
fn run_assigned(
    conn: &mut Conn,
    writer: &Arc<Mutex<Conn>>,
    assigned: Assigned<'_>,
    factory: &dyn ObserverFactory,
    abort: &AbortFlag,
    log: &(dyn Fn(&str) + Sync),
) -> std::result::Result<(), Failure> {
    let (s, cfg, incoming) = (assigned.s, assigned.cfg, assigned.incoming);
    let mut built = build_assigned(&assigned, factory)?;
    let timeout = cfg.timeout();
    let data_addr = match &built.links {
        Some(l) => l.address().map_err(startup)?,
        None => None,
    };
    let ready = ToCoordinator::Ready {
        data_addr,
        pid: std::process::id(),
        host: assigned.host.to_string(),
        weights: built.weights.take(),
    };
    send(writer, &ready, timeout).map_err(startup)?;
    let gate = Arc::new(migrate::Gate::new(cfg.migrations.len()));
    let Some(next) = await_start(conn, writer, &mut built.stage, cfg, incoming, &gate)? else {
        // A dismissed target: what it recorded belongs to no move (its log closes as the
        // observers drop), so a scratch directory of it goes.
        let ctx = built.ctx;
        drop(built);
        if let Some(dir) = factory.collected_files(&ctx) {
            let _ = std::fs::remove_dir_all(&dir);
        }
        return Ok(());
    };
    if let Some(index) = incoming {
        // Every earlier move is final by now (moves commit in order): the stage came from the
        // node of the last one that committed, or from its first node.
        let committed = |i| matches!(gate.now(i), Some(migrate::Verdict::Commit { .. }));
        built.transfers.stage_moved(&StageMove {
            stage: s as u32,
            at_step: cfg.migrations[index].at_step,
            index: index as u32,
            arrived: true,
            peer: migrate::endpoint_before(cfg, s, index, committed),
        });
    }
    let ctx = built.ctx;
    let run = Started {
        next,
        gate,
        link_key: assigned.link_key,
        incoming,
    };
    let files = run_started(conn, writer, built, run, factory, abort, log).inspect_err(|_| {
        if let Some(dir) = factory.collected_files(&ctx) {
            log(&format!(
                "stage {s} failed; what it recorded stays in {}",
                dir.display()
            ));
        }
    })?;
    // The control reader has stopped: the connection is this thread's alone again.
    match files {
        Some((dir, fetch_wait)) => {
            send_recorded_files(conn, &dir, fetch_wait, timeout).map_err(|e| (COLLECTING.into(), e))
        }
        None => Ok(()),
    }
}

/// Checks the assignment and builds its stage, observers and links (a one-stage pipeline has
/// none).
fn build_assigned<'a>(
    assigned: &Assigned<'a>,
    factory: &dyn ObserverFactory,
) -> std::result::Result<Built<'a>, Failure> {
    let &Assigned {
        s,
        cfg,
        ref fabric_path,
        host,
        link_key,
        incoming,
    } = assigned;
    cfg.validate().map_err(startup)?;
    if s >= cfg.stages {
        return Err(startup(TransportError::Config(format!(
            "assigned stage {s} of a {}-stage pipeline",
            cfg.stages
        ))));
    }
    let plan = cfg.plan().map_err(startup)?;
    let pool = slug_kernels::ThreadPool::new(cfg.threads).map_err(|e| startup(e.into()))?;
    let ctx = StageContext {
        stage: s,
        endpoint: incoming.map_or(s as u32, |i| migrate::continuation_endpoint(cfg.stages, i)),
        host,
        config: cfg,
    };
    let stage = build_stage(cfg, &plan, &pool, factory, &ctx).map_err(startup)?;
    if let Some(index) = incoming
        && cfg.migrations.get(index).is_none_or(|m| m.stage != s)
    {
        return Err(startup(TransportError::Config(format!(
            "assigned to take stage {s} over by move {index}, which the config does not hold"
        ))));
    }
    let moving = incoming.is_some()
        || cfg.live_moves
        || cfg.migrations.iter().any(|m| m.stage == s)
        || !cfg.spares.is_empty();
    let weights = moving.then(|| migrate::weights_hash(&stage));
    let (obs, digests) = stage_observers(factory, &ctx).map_err(startup)?;
    let state = factory.state_observer(&ctx).map_err(startup)?;
    let links = if cfg.stages > 1 {
        let n = cfg.stages;
        Some(
            prepare_node_links(NodeLinkPlan {
                kind: cfg.transport,
                inbound: link_ends(n, (s + n - 1) % n, cfg.timeout()),
                outbound: link_ends(n, s, cfg.timeout()),
                ring_specs: cfg.ring_specs(),
                fabric: fabric_path.clone(),
                host: host.to_string(),
                key: link_key.clone(),
                integrity: cfg.link_integrity,
            })
            .map_err(startup)?,
        )
    } else {
        None
    };
    Ok(Built {
        stage,
        plan,
        pool,
        ctx,
        hooks: obs.hooks,
        transfers: obs.transfers,
        digests,
        state,
        links,
        weights,
    })
}

/// Waits for the coordinator's start: the downstream stage's data address, or `None` when a
/// move's target is dismissed. The target of a move first receives the stage's state.
fn await_start(
    conn: &mut Conn,
    writer: &Arc<Mutex<Conn>>,
    stage: &mut slug_kernels::Stage,
    cfg: &PipelineConfig,
    incoming: Option<usize>,
    gate: &migrate::Gate,
) -> std::result::Result<Option<Option<String>>, Failure> {
    if let Some(index) = incoming {
        let arrival = |e: TransportError| ("receiving the moved stage".to_string(), e);
        return receive_stage(conn, writer, stage, cfg, index, gate).map_err(arrival);
    }
    match conn.recv_json::<ToNode>(cfg.timeout()).map_err(startup)? {
        ToNode::Start { next } => Ok(Some(next)),
        ToNode::Abort { reason } => Err(startup(TransportError::Aborted { reason })),
        other => Err(startup(TransportError::Protocol {
            peer: conn.peer.clone(),
            detail: format!("expected start, got {}", shown(&other)),
        })),
    }
}

/// What the coordinator's start gave a built stage.
struct Started<'a> {
    /// The downstream stage's data address.
    next: Option<String>,
    gate: Arc<migrate::Gate>,
    link_key: &'a ClusterKey,
    /// The move that brought the stage here.
    incoming: Option<usize>,
}

/// Recorded files to send the coordinator: their directory, and how long the coordinator may
/// take to ask for them (it collects when the run ends, long after a stage moved away).
type ToCollect = Option<(PathBuf, Duration)>;

/// Runs a started stage beside its control reader, move shipper and heartbeat threads, and
/// reports its outcome; returns the directory of recorded files to send, if any.
fn run_started(
    conn: &mut Conn,
    writer: &Arc<Mutex<Conn>>,
    mut built: Built<'_>,
    run: Started<'_>,
    factory: &dyn ObserverFactory,
    abort: &AbortFlag,
    log: &(dyn Fn(&str) + Sync),
) -> std::result::Result<ToCollect, Failure> {
    let cfg = built.ctx.config;
    let s = built.ctx.stage;
    let timeout = cfg.timeout();
    let progress = Arc::new(AtomicU64::new(0));
    let stop = AbortFlag::new();
    // The links outlive the threads below: the control reader aborts them.
    let links = built.links.take();
    let links = links.as_deref();
    // With `--spares`: checkpoints out, and what the coordinator says of a lost neighbour in.
    let mut failover = failover::Guard::for_stage(
        cfg,
        s,
        built.stage.cursor().step,
        writer.clone(),
        built.digests.clone(),
        links.and_then(|l| l.data_listener()),
        run.link_key,
        abort,
    );
    let ears = failover.as_ref().map(failover::Guard::ears);
    std::thread::scope(|scope| {
        let no_thread =
            |e: std::io::Error| startup(TransportError::io("start a control thread", e));
        spawn_control_reader(scope, conn, links, &run.gate, ears, abort, &stop).map_err(startup)?;
        // The stage thread's move messages (arena chunks, notes) go out in order through here.
        let (ship_tx, ship_rx) = crossbeam_channel::unbounded::<migrate::Outgoing>();
        let shipper = spawn_shipper(scope, writer.clone(), ship_rx, timeout).map_err(no_thread)?;
        let (beat_tx, beat_rx) = crossbeam_channel::bounded::<()>(0);
        let heartbeat = {
            let (writer, progress) = (writer.clone(), progress.clone());
            std::thread::Builder::new()
                .name("slug-node-heartbeat".into())
                .spawn_scoped(scope, move || {
                    heartbeats(&writer, &beat_rx, || {
                        heartbeat_of(cfg, s, progress.load(Ordering::Relaxed))
                    });
                })
        };
        if let Err(e) = heartbeat {
            stop.raise();
            return Err(no_thread(e));
        }
        let result = drive_and_report(
            writer,
            built,
            links,
            &run,
            failover.as_mut(),
            factory,
            abort,
            log,
            &progress,
            ship_tx,
            shipper,
        );
        // The reader polls `stop`, the heartbeat ends as its channel closes; the socket stays
        // open for the final Done/Failed message.
        stop.raise();
        drop(beat_tx);
        result
    })
}

/// The control reader: an abort message or a lost coordinator stops the stage at once; move
/// verdicts and plans go to the gate, failover notes to the stage's failover guard.
fn spawn_control_reader<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    conn: &Conn,
    links: Option<&'scope dyn crate::link::LinkSetup>,
    gate: &Arc<migrate::Gate>,
    ears: Option<Arc<failover::Shared>>,
    abort: &AbortFlag,
    stop: &AbortFlag,
) -> Result<()> {
    let mut reader = conn.try_clone()?;
    reader.abort = stop.clone();
    let (abort, stop, gate) = (abort.clone(), stop.clone(), gate.clone());
    std::thread::Builder::new()
        .name("slug-node-control".into())
        .spawn_scoped(scope, move || {
            loop {
                match reader.recv_json::<ToNode>(Duration::from_secs(24 * 3600)) {
                    Ok(ToNode::Abort { .. }) | Err(_) => {
                        if !stop.raised() {
                            abort.raise();
                            if let Some(l) = links {
                                l.abort();
                            }
                        }
                        return;
                    }
                    Ok(ToNode::Move { index, verdict }) => gate.set(index, verdict),
                    Ok(ToNode::Plan { index, migration }) => gate.plan(index, migration),
                    Ok(ToNode::Failover(note)) => {
                        if let Some(ears) = &ears {
                            ears.heard(note);
                        }
                    }
                    Ok(_) => {}
                }
            }
        })
        .map_err(|e| TransportError::io("start a control thread", e))?;
    Ok(())
}

/// The thread that sends the stage thread's move messages, in order, on the control link.
fn spawn_shipper<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    writer: Arc<Mutex<Conn>>,
    outgoing: crossbeam_channel::Receiver<migrate::Outgoing>,
    timeout: Duration,
) -> std::io::Result<std::thread::ScopedJoinHandle<'scope, ()>> {
    std::thread::Builder::new()
        .name("slug-node-moves".into())
        .spawn_scoped(scope, move || {
            for out in outgoing {
                let Ok(mut w) = writer.lock() else {
                    return;
                };
                let sent = match out {
                    migrate::Outgoing::Chunk(body) => w.send_frame(kind::ARENA, &body, timeout),
                    migrate::Outgoing::Message(note) => {
                        w.send_json(&ToCoordinator::Move(note), timeout)
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
        })
}

/// Connects the stage's links, runs it to the end of the schedule (or until it moves away),
/// and sends the coordinator its report; returns the directory of recorded files to send.
#[allow(clippy::too_many_arguments)]
fn drive_and_report(
    writer: &Arc<Mutex<Conn>>,
    built: Built<'_>,
    links: Option<&dyn crate::link::LinkSetup>,
    run: &Started<'_>,
    failover: Option<&mut failover::Guard>,
    factory: &dyn ObserverFactory,
    abort: &AbortFlag,
    log: &(dyn Fn(&str) + Sync),
    progress: &AtomicU64,
    ship_tx: crossbeam_channel::Sender<migrate::Outgoing>,
    shipper: std::thread::ScopedJoinHandle<'_, ()>,
) -> std::result::Result<ToCollect, Failure> {
    let Built {
        stage,
        plan,
        pool,
        ctx,
        hooks,
        transfers,
        digests,
        state,
        ..
    } = built;
    let (cfg, s, host) = (ctx.config, ctx.stage, ctx.host);
    let timeout = cfg.timeout();
    let mut io = match links {
        Some(l) => l
            .connect(run.next.as_deref(), &transfers, abort, log)
            .map_err(startup)?,
        None => StageLinks::default(),
    };
    let moves = stage_moves(cfg, s, &stage, links, run, &mut io, &ship_tx, abort);
    let outcome = drive_stage(
        cfg,
        &plan,
        s,
        &pool,
        stage,
        io,
        moves,
        failover,
        Observed { hooks, state },
        &|step, seq| progress.store((u64::from(step) << 32) | u64::from(seq), Ordering::Relaxed),
    )?;
    let handed_off = outcome.handed_off;
    let report = Box::new(outcome.into_report(&plan, s, host, &digests));
    // Every move message the stage queued goes out before its report.
    drop(ship_tx);
    let _ = shipper.join();
    if let Some((index, at_step)) = handed_off {
        transfers.stage_moved(&StageMove {
            stage: s as u32,
            at_step,
            index: index as u32,
            arrived: false,
            peer: migrate::continuation_endpoint(cfg.stages, index),
        });
        // The stage's log ends here, closed before the coordinator hears that it moved.
        drop(transfers);
        let files = factory.collected_files(&ctx);
        let moved = ToCoordinator::Migrated {
            report,
            collect: files.is_some(),
        };
        send(writer, &moved, timeout).map_err(|e| ("report".to_string(), e))?;
        log(&format!("stage {s} moved to another node"));
        return Ok(files.map(|dir| (dir, RUN_LENGTH)));
    }
    // The last reference to the stage's recorder: dropping it closes the endpoint log, so the
    // files to collect are complete before the coordinator hears of them.
    drop(transfers);
    let files = factory.collected_files(&ctx);
    // The final counts (events the closing recorder wrote last), ahead of the report.
    let last = heartbeat_of(cfg, s, progress.load(Ordering::Relaxed));
    send(writer, &last, timeout).map_err(|e| ("report".to_string(), e))?;
    let done = ToCoordinator::Done {
        report,
        collect: files.is_some(),
    };
    send(writer, &done, timeout).map_err(|e| ("report".to_string(), e))?;
    Ok(files.map(|dir| (dir, timeout)))
}

/// The stage's part in the run's moves (`None` when the run has none): tcp links re-point
/// through the node's data listener, and a stage that arrived by a move continues both links'
/// numbering where its old node left them.
#[allow(clippy::too_many_arguments)]
fn stage_moves(
    cfg: &PipelineConfig,
    s: usize,
    stage: &slug_kernels::Stage,
    links: Option<&dyn crate::link::LinkSetup>,
    run: &Started<'_>,
    io: &mut StageLinks,
    ship_tx: &crossbeam_channel::Sender<migrate::Outgoing>,
    abort: &AbortFlag,
) -> Option<migrate::Moves> {
    if cfg.migrations.is_empty() && !cfg.live_moves {
        return None;
    }
    let timeout = cfg.timeout();
    let n = cfg.stages;
    let relink = match links.and_then(|l| l.data_listener()) {
        Some(listener) if cfg.transport == crate::transfer::TransportKind::Tcp => {
            Some(migrate::Relink {
                listener: Some(listener),
                key: run.link_key.clone(),
                integrity: cfg.link_integrity,
                abort: abort.clone(),
                inbound: link_ends(n, (s + n - 1) % n, timeout),
                outbound: link_ends(n, s, timeout),
            })
        }
        _ => None,
    };
    let mut moves = migrate::Moves::new(
        cfg,
        s,
        stage.cursor().step,
        run.gate.clone(),
        relink,
        ship_tx.clone(),
        abort.clone(),
        run.incoming,
    );
    if let Some(index) = run.incoming {
        // Continue both links where the stage's old node left them.
        let at = cfg.migrations[index].at_step;
        if let Some(i) = io.inbound.as_mut() {
            i.resume_at(migrate::inbound_switch(cfg, s, at));
        }
        if let Some(o) = io.outbound.as_mut() {
            o.resume_at(migrate::outbound_switch(cfg, s, at));
        }
        moves.links_resumed = true;
    }
    Some(moves)
}

/// The target of move `index`: heartbeats while the stage's state arrives in arena chunks,
/// takes the cursor, confirms, and returns the downstream address from [`ToNode::Start`]
/// (`None`: the move was cancelled and this node is dismissed).
fn receive_stage(
    conn: &mut Conn,
    writer: &Arc<Mutex<Conn>>,
    stage: &mut slug_kernels::Stage,
    cfg: &PipelineConfig,
    index: usize,
    gate: &migrate::Gate,
) -> Result<Option<Option<String>>> {
    let at_step = cfg.migrations[index].at_step;
    let timeout = cfg.timeout();
    let (waiting, beat_rx) = crossbeam_channel::bounded::<()>(0);
    std::thread::scope(|scope| {
        let writer2 = writer.clone();
        scope.spawn(move || {
            heartbeats(&writer2, &beat_rx, || ToCoordinator::Progress {
                step: 0,
                seq: 0,
                done: 0,
                events: 0,
                bytes: 0,
            });
        });
        let received = (|| {
            loop {
                // The move's step may be far off: wait as long as the coordinator is there.
                let (k, body) = conn.recv_frame(Duration::from_secs(24 * 3600))?;
                if k == kind::ARENA {
                    let (i, offset, bytes) = migrate::parse_chunk(&body)?;
                    if i != index {
                        return Err(TransportError::Protocol {
                            peer: conn.peer.clone(),
                            detail: format!(
                                "a chunk of move {i} came to the target of move {index}"
                            ),
                        });
                    }
                    migrate::apply_chunk(stage, offset, bytes)?;
                    continue;
                }
                if k != kind::JSON {
                    return Err(TransportError::Protocol {
                        peer: conn.peer.clone(),
                        detail: format!("unexpected frame kind {k} while receiving a stage"),
                    });
                }
                match conn.decode_json::<ToNode>(&body)? {
                    ToNode::Move { index, verdict } => gate.set(index, verdict),
                    ToNode::Plan { index, migration } => gate.plan(index, migration),
                    ToNode::Restore { index: i, cursor } if i == index => {
                        if cursor.step != at_step {
                            return Err(TransportError::Config(format!(
                                "move {index} is at step {at_step}, but the cursor says {}",
                                cursor.step
                            )));
                        }
                        stage.set_cursor(cursor)?;
                        let note = migrate::MoveNote::Restored { index };
                        send(writer, &ToCoordinator::Move(note), timeout)?;
                    }
                    ToNode::Start { next } => return Ok(Some(next)),
                    ToNode::Dismiss { .. } => return Ok(None),
                    ToNode::Abort { reason } => return Err(TransportError::Aborted { reason }),
                    other => {
                        return Err(TransportError::Protocol {
                            peer: conn.peer.clone(),
                            detail: format!("unexpected {} while receiving a stage", shown(&other)),
                        });
                    }
                }
            }
        })();
        // Ends the heartbeat now, not at its next beat: the stage's first step waits on it.
        drop(waiting);
        received
    })
}

/// How long a node whose stage moved away waits for the coordinator to collect its files: as
/// long as the rest of the run may take (a closed connection ends the wait at once).
const RUN_LENGTH: Duration = Duration::from_secs(24 * 3600);

/// Where a failing file transfer is reported as having reached.
const COLLECTING: &str = "sending recorded files";

/// Every file under `dir`, as paths relative to it with `/` separators, sorted.
pub fn list_recorded_files(dir: &Path) -> Result<Vec<RecordedFile>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| {
            TransportError::io(format!("list recorded files in {}", d.display()), e)
        })?;
        for entry in entries {
            let entry = entry.map_err(|e| {
                TransportError::io(format!("list recorded files in {}", d.display()), e)
            })?;
            let path = entry.path();
            let meta = entry
                .metadata()
                .map_err(|e| TransportError::io(format!("stat {}", path.display()), e))?;
            if meta.is_dir() {
                pending.push(path);
                continue;
            }
            let rel = path.strip_prefix(dir).unwrap_or(&path);
            let rel: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            files.push(RecordedFile {
                path: rel.join("/"),
                len: meta.len(),
                digest: file_digest(&path)?,
            });
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// BLAKE3 of a recorded file, hex: the coordinator checks every fetched file against it.
fn file_digest(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| TransportError::io(format!("open {}", path.display()), e))?;
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut file, &mut hasher)
        .map_err(|e| TransportError::io(format!("read {}", path.display()), e))?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Lists the stage's recorded files, sends those the coordinator asks for in pieces, removes
/// `dir` once the coordinator confirms it has everything, and confirms the removal (so the
/// coordinator's success means no scratch is left behind).
fn send_recorded_files(
    conn: &mut Conn,
    dir: &Path,
    fetch_wait: Duration,
    timeout: Duration,
) -> Result<()> {
    let files = list_recorded_files(dir)?;
    let lens: HashMap<String, u64> = files.iter().map(|f| (f.path.clone(), f.len)).collect();
    conn.send_json(&ToCoordinator::Files { files }, timeout)?;
    let unexpected = |conn: &Conn, got: ToNode| TransportError::Protocol {
        peer: conn.peer.clone(),
        detail: format!(
            "expected the coordinator to fetch recorded files, got {}",
            shown(&got)
        ),
    };
    let paths = match conn.recv_json::<ToNode>(fetch_wait)? {
        ToNode::Fetch { paths } => paths,
        ToNode::Abort { reason } => return Err(TransportError::Aborted { reason }),
        other => return Err(unexpected(conn, other)),
    };
    let mut buf = vec![0u8; FILE_PIECE];
    for p in paths {
        let Some(&len) = lens.get(&p) else {
            return Err(TransportError::Protocol {
                peer: conn.peer.clone(),
                detail: format!("asked for {p:?}, which this node did not list"),
            });
        };
        let path = dir.join(&p);
        let mut file = std::fs::File::open(&path)
            .map_err(|e| TransportError::io(format!("open {}", path.display()), e))?;
        let mut left = len;
        while left > 0 {
            let n = left.min(FILE_PIECE as u64) as usize;
            file.read_exact(&mut buf[..n])
                .map_err(|e| TransportError::io(format!("read {}", path.display()), e))?;
            conn.send_frame(kind::FILE, &buf[..n], timeout)?;
            left -= n as u64;
        }
    }
    match conn.recv_json::<ToNode>(timeout)? {
        ToNode::Collected => {
            std::fs::remove_dir_all(dir).map_err(|e| {
                TransportError::io(
                    format!("remove the collected files in {}", dir.display()),
                    e,
                )
            })?;
            conn.send_json(&ToCoordinator::Cleaned, timeout)
        }
        ToNode::Abort { reason } => Err(TransportError::Aborted { reason }),
        other => Err(unexpected(conn, other)),
    }
}

/// Sends `msg()` to the coordinator every [`HEARTBEAT`] until `stop`'s sender is dropped (it
/// returns at once then, not at the next beat) or a send fails.
fn heartbeats(
    writer: &Arc<Mutex<Conn>>,
    stop: &crossbeam_channel::Receiver<()>,
    msg: impl Fn() -> ToCoordinator,
) {
    loop {
        if send(writer, &msg(), HEARTBEAT * 4).is_err() {
            return;
        }
        if !matches!(
            stop.recv_timeout(HEARTBEAT),
            Err(crossbeam_channel::RecvTimeoutError::Timeout)
        ) {
            return;
        }
    }
}

fn send(writer: &Arc<Mutex<Conn>>, msg: &ToCoordinator, timeout: Duration) -> Result<()> {
    let mut w = writer.lock().map_err(|_| TransportError::Aborted {
        reason: "control writer poisoned by a panicked thread".into(),
    })?;
    w.send_json(msg, timeout)
}

/// A heartbeat: where stage `s` is (`at`: step in the high half, sequence in the low) and its
/// counters so far.
fn heartbeat_of(cfg: &PipelineConfig, s: usize, at: u64) -> ToCoordinator {
    let (done, events, bytes) =
        cfg.progress
            .as_ref()
            .and_then(|p| p.stage(s))
            .map_or((0, 0, 0), |p| {
                (
                    p.steps.load(Ordering::Relaxed),
                    p.events.load(Ordering::Relaxed),
                    p.bytes.load(Ordering::Relaxed),
                )
            });
    ToCoordinator::Progress {
        step: (at >> 32) as u32,
        seq: at as u32,
        done,
        events,
        bytes,
    }
}
