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
            if pending.lock().unwrap_or_else(|e| e.into_inner()).live >= 2 * MAX_PENDING_HANDSHAKES
            {
                // Dropped callers' threads end within 50 ms; until then newcomers wait in the
                // listen backlog rather than being turned away.
                if opts.stop.raised() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let (stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if opts.stop.raised() {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => return Err(TransportError::io(format!("accept on {addr}"), e)),
            };
            if opts.once && admitted.load(Ordering::SeqCst) {
                log(&format!(
                    "refused {peer}: this node serves one session and has it"
                ));
                continue;
            }
            let (id, flag) = {
                let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                if p.waiting.len() >= MAX_PENDING_HANDSHAKES {
                    // Full: the caller waiting longest goes (a real coordinator finishes its
                    // handshake in a round trip or two, so it is never the oldest for long).
                    if let Some((_, oldest, who)) = p.waiting.pop_front() {
                        oldest.raise();
                        drop(p);
                        log(&format!(
                            "dropped {who}: {MAX_PENDING_HANDSHAKES} callers were in their \
                             handshake and it had waited longest; closed unheard"
                        ));
                        p = pending.lock().unwrap_or_else(|e| e.into_inner());
                    }
                }
                p.next += 1;
                p.live += 1;
                let (id, flag) = (p.next, AbortFlag::new());
                p.waiting.push_back((id, flag.clone(), peer));
                (id, flag)
            };
            let finished = move |pending: &Mutex<Pending>| {
                let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                p.live -= 1;
                p.waiting.retain(|w| w.0 != id);
            };
            if let Err(e) = stream.set_nonblocking(false) {
                finished(&pending);
                log(&format!("refused {peer}: cannot configure its socket: {e}"));
                continue;
            }
            let (pending, admitted, done_tx) = (&pending, &admitted, done_tx.clone());
            let spawned = std::thread::Builder::new()
                .name("slug-node-session".into())
                .spawn_scoped(scope, move || {
                    let hs = handshake(stream, peer, opts, flag);
                    finished(pending);
                    let hs = match hs {
                        Ok(hs) => hs,
                        Err(e) => return log(&format!("refused {peer}: {e}")),
                    };
                    if opts.once && admitted.swap(true, Ordering::SeqCst) {
                        hs.conn.shutdown();
                        return log(&format!(
                            "refused {peer}: this node serves one session and has it"
                        ));
                    }
                    let outcome = session(hs, factory, log);
                    match &outcome {
                        Ok(stage) => log(&format!("stage {stage} for coordinator {peer} finished")),
                        Err(e) => log(&format!("session with coordinator {peer} failed: {e}")),
                    }
                    if opts.once {
                        let _ = done_tx.send(outcome.map(|_| ()));
                    }
                });
            if let Err(e) = spawned {
                finished(pending);
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

fn run_assigned(
    conn: &mut Conn,
    writer: &Arc<Mutex<Conn>>,
    assigned: Assigned<'_>,
    factory: &dyn ObserverFactory,
    abort: &AbortFlag,
    log: &(dyn Fn(&str) + Sync),
) -> std::result::Result<(), (String, TransportError)> {
    let Assigned {
        s,
        cfg,
        fabric_path,
        host,
        link_key,
        incoming,
    } = assigned;
    let startup = |e: TransportError| ("startup".to_string(), e);
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
        host,
        config: cfg,
    };
    let mut stage = build_stage(cfg, &plan, &pool, factory, &ctx).map_err(startup)?;
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
    let transfers = obs.transfers;
    let state = factory.state_observer(&ctx).map_err(startup)?;
    // Links only join stages: a one-stage pipeline has none to prepare.
    let links = if cfg.stages > 1 {
        let n = cfg.stages;
        Some(
            prepare_node_links(NodeLinkPlan {
                kind: cfg.transport,
                inbound: link_ends(n, (s + n - 1) % n, cfg.timeout()),
                outbound: link_ends(n, s, cfg.timeout()),
                ring_specs: cfg.ring_specs(),
                fabric: fabric_path,
                host: host.to_string(),
                key: link_key.clone(),
                integrity: cfg.link_integrity,
            })
            .map_err(startup)?,
        )
    } else {
        None
    };
    let data_addr = match &links {
        Some(l) => l.address().map_err(startup)?,
        None => None,
    };
    let timeout = cfg.timeout();
    let ready = ToCoordinator::Ready {
        data_addr,
        pid: std::process::id(),
        host: host.to_string(),
        weights,
    };
    send(writer, &ready, timeout).map_err(startup)?;
    let gate = Arc::new(migrate::Gate::new(cfg.migrations.len()));
    let next = match incoming {
        Some(index) => {
            let arrival = |e: TransportError| ("receiving the moved stage".to_string(), e);
            match receive_stage(conn, writer, &mut stage, cfg, index, &gate).map_err(arrival)? {
                Some(next) => next,
                None => return Ok(()),
            }
        }
        None => match conn.recv_json::<ToNode>(timeout).map_err(startup)? {
            ToNode::Start { next } => next,
            ToNode::Abort { reason } => return Err(startup(TransportError::Aborted { reason })),
            other => {
                return Err(startup(TransportError::Protocol {
                    peer: conn.peer.clone(),
                    detail: format!("expected start, got {}", shown(&other)),
                }));
            }
        },
    };
    let resume_step = stage.cursor().step;
    let mut failover = failover::Guard::for_stage(
        cfg,
        s,
        resume_step,
        writer.clone(),
        digests.clone(),
        links.as_ref().and_then(|l| l.data_listener()),
        link_key,
        abort,
    );
    let ears = failover.as_ref().map(failover::Guard::ears);
    let progress = Arc::new(AtomicU64::new(0));
    let stop = AbortFlag::new();
    let files = std::thread::scope(|scope| {
        // Control reader: an abort message or a lost coordinator stops this stage at once.
        let mut reader = conn.try_clone().map_err(startup)?;
        reader.abort = stop.clone();
        let (abort2, links2, stop2) = (abort.clone(), links.as_deref(), stop.clone());
        let gate2 = gate.clone();
        let no_thread =
            |e: std::io::Error| startup(TransportError::io("start a control thread", e));
        std::thread::Builder::new()
            .name("slug-node-control".into())
            .spawn_scoped(scope, move || {
                loop {
                    match reader.recv_json::<ToNode>(Duration::from_secs(24 * 3600)) {
                        Ok(ToNode::Abort { .. }) | Err(_) => {
                            if !stop2.raised() {
                                abort2.raise();
                                if let Some(l) = links2 {
                                    l.abort();
                                }
                            }
                            return;
                        }
                        Ok(ToNode::Move { index, verdict }) => gate2.set(index, verdict),
                        Ok(ToNode::Plan { index, migration }) => gate2.plan(index, migration),
                        Ok(ToNode::Failover(note)) => {
                            if let Some(ears) = &ears {
                                ears.heard(note);
                            }
                        }
                        Ok(_) => {}
                    }
                }
            })
            .map_err(no_thread)?;
        // The stage thread's move messages (arena chunks, notes) go out in order through here.
        let (ship_tx, ship_rx) = crossbeam_channel::unbounded::<migrate::Outgoing>();
        let writer4 = writer.clone();
        let shipper = std::thread::Builder::new()
            .name("slug-node-moves".into())
            .spawn_scoped(scope, move || {
                for out in ship_rx {
                    let mut w = match writer4.lock() {
                        Ok(w) => w,
                        Err(_) => return,
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
            .map_err(no_thread)?;
        let (writer2, progress2, stop3) = (writer.clone(), progress.clone(), stop.clone());
        let heartbeat = std::thread::Builder::new()
            .name("slug-node-heartbeat".into())
            .spawn_scoped(scope, move || {
                while !stop3.raised() {
                    let msg = heartbeat_of(cfg, s, progress2.load(Ordering::Relaxed));
                    if send(&writer2, &msg, HEARTBEAT * 4).is_err() {
                        return;
                    }
                    std::thread::sleep(HEARTBEAT);
                }
            });
        if let Err(e) = heartbeat {
            stop.raise();
            return Err(no_thread(e));
        }
        let result = (|| {
            let mut moves_here = None;
            let mut io = match &links {
                Some(l) => l
                    .connect(next.as_deref(), &transfers, abort, log)
                    .map_err(startup)?,
                None => StageLinks::default(),
            };
            if !cfg.migrations.is_empty() || cfg.live_moves {
                let listener = links.as_ref().and_then(|l| l.data_listener());
                let relink = match listener {
                    Some(l) if cfg.transport == crate::transfer::TransportKind::Tcp => {
                        Some(migrate::Relink {
                            listener: Some(l),
                            key: link_key.clone(),
                            integrity: cfg.link_integrity,
                            abort: abort.clone(),
                            inbound: link_ends(
                                cfg.stages,
                                (s + cfg.stages - 1) % cfg.stages,
                                timeout,
                            ),
                            outbound: link_ends(cfg.stages, s, timeout),
                        })
                    }
                    _ => None,
                };
                let mut moves = migrate::Moves::new(
                    cfg,
                    s,
                    resume_step,
                    gate.clone(),
                    relink,
                    ship_tx.clone(),
                    abort.clone(),
                    incoming,
                );
                if let Some(index) = incoming {
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
                moves_here = Some(moves);
            }
            let observed = Observed {
                hooks: obs.hooks,
                state,
            };
            let outcome = drive_stage(
                cfg,
                &plan,
                s,
                &pool,
                stage,
                io,
                moves_here,
                failover.as_mut(),
                observed,
                &|step, seq| {
                    progress.store((u64::from(step) << 32) | u64::from(seq), Ordering::Relaxed)
                },
            )?;
            let handed_off = outcome.handed_off;
            let report = Box::new(outcome.into_report(&plan, s, host, &digests));
            // Every move message the stage queued goes out before its report.
            drop(ship_tx);
            let _ = shipper.join();
            if handed_off {
                send(writer, &ToCoordinator::Migrated { report }, timeout)
                    .map_err(|e| ("report".to_string(), e))?;
                log(&format!("stage {s} moved to another node"));
                return Ok(None);
            }
            // The last reference to the stage's recorder: dropping it closes the endpoint log,
            // so the files to collect are complete before the coordinator hears of them.
            drop(transfers);
            let files = factory.collected_files(&ctx);
            // The final counts (events the closing recorder wrote last), ahead of the report.
            let last = heartbeat_of(cfg, s, progress.load(Ordering::Relaxed));
            send(writer, &last, timeout).map_err(|e| ("report".to_string(), e))?;
            send(
                writer,
                &ToCoordinator::Done {
                    report,
                    collect: files.is_some(),
                },
                timeout,
            )
            .map_err(|e| ("report".to_string(), e))?;
            Ok(files)
        })();
        // The reader and heartbeat threads poll `stop`; the socket stays open for the final
        // Done/Failed message.
        stop.raise();
        result
    });
    let files = files.inspect_err(|_| {
        if let Some(dir) = factory.collected_files(&ctx) {
            log(&format!(
                "stage {s} failed; what it recorded stays in {}",
                dir.display()
            ));
        }
    })?;
    // The control reader has stopped: the connection is this thread's alone again.
    match files {
        Some(dir) => send_recorded_files(conn, &dir, timeout).map_err(|e| (COLLECTING.into(), e)),
        None => Ok(()),
    }
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
    let waiting = AbortFlag::new();
    std::thread::scope(|scope| {
        let (writer2, waiting2) = (writer.clone(), waiting.clone());
        scope.spawn(move || {
            while !waiting2.raised() {
                let msg = ToCoordinator::Progress {
                    step: 0,
                    seq: 0,
                    done: 0,
                    events: 0,
                    bytes: 0,
                };
                if send(&writer2, &msg, HEARTBEAT * 4).is_err() {
                    return;
                }
                std::thread::sleep(HEARTBEAT);
            }
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
        waiting.raise();
        received
    })
}

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
fn send_recorded_files(conn: &mut Conn, dir: &Path, timeout: Duration) -> Result<()> {
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
    let paths = match conn.recv_json::<ToNode>(timeout)? {
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
