//! Attacks by someone on the network (issue 11), each played by a small relay or stranger on
//! loopback: tampering with, dropping or replaying control messages after the handshake,
//! strangers at a data-link port, bytes flipped on a data link; and a node planting files.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slug_kernels::ModelConfig;
use slug_transport::auth::ClusterKey;
use slug_transport::link::{LinkEnds, LinkIntegrity, LinkReceiver, LinkSender, Region, RegionMut};
use slug_transport::node::{NodeOptions, serve};
use slug_transport::pipeline::{
    NoObservers, ObserverFactory, PipelineConfig, RunReport, StageContext, StageObservers,
    prompt_tokens, run_on_nodes, run_on_nodes_collecting,
};
use slug_transport::transfer::{ArenaId, EndpointId, LinkId, Observers, Tag, TransportKind};
use slug_transport::{AbortFlag, TransportError};

/// Which way a record travels through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Caller (coordinator) to node.
    ToNode,
    /// Node to caller.
    ToCaller,
}

/// What the relay does with one record.
enum Action {
    Forward,
    Drop,
    Twice,
    /// Held back and sent after the next record.
    After,
}

type Tamper = dyn Fn(Dir, usize, &mut Vec<u8>) -> Action + Send + Sync;

/// Copies length-prefixed records (u32 LE length, then that many bytes: plain frames during the
/// handshake and sealed messages after it both look so) from `from` to `to`, letting `tamper`
/// rewrite, drop or repeat each.
fn pump(mut from: TcpStream, mut to: TcpStream, dir: Dir, tamper: Arc<Tamper>) {
    let mut index = 0;
    let mut held: Option<Vec<u8>> = None;
    loop {
        let mut len = [0u8; 4];
        if from.read_exact(&mut len).is_err() {
            break;
        }
        let mut record = vec![0u8; u32::from_le_bytes(len) as usize];
        if from.read_exact(&mut record).is_err() {
            break;
        }
        let action = tamper(dir, index, &mut record);
        index += 1;
        let times = match action {
            Action::Forward => 1,
            Action::Drop => 0,
            Action::Twice => 2,
            Action::After => {
                held = Some(record);
                continue;
            }
        };
        let mut out = Vec::new();
        for _ in 0..times {
            out.extend_from_slice(&(record.len() as u32).to_le_bytes());
            out.extend_from_slice(&record);
        }
        if let Some(h) = held.take() {
            out.extend_from_slice(&(h.len() as u32).to_le_bytes());
            out.extend_from_slice(&h);
        }
        if to.write_all(&out).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// A relay in front of `target` for one connection; returns the address to call instead.
fn relay(target: String, tamper: Arc<Tamper>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let addr = listener.local_addr().expect("relay address").to_string();
    std::thread::spawn(move || {
        let Ok((caller, _)) = listener.accept() else {
            return;
        };
        let node = TcpStream::connect(&target).expect("relay connects to the node");
        let (c2, n2) = (
            caller.try_clone().expect("clone"),
            node.try_clone().expect("clone"),
        );
        let t2 = tamper.clone();
        std::thread::spawn(move || pump(c2, n2, Dir::ToNode, t2));
        pump(node, caller, Dir::ToCaller, tamper);
    });
    addr
}

fn key() -> ClusterKey {
    ClusterKey::from_bytes(b"attack-test-cluster-key-0123").expect("key")
}

fn config() -> PipelineConfig {
    let mut m = ModelConfig::preset("tiny").expect("tiny preset");
    m.seed = 7;
    let mut cfg = PipelineConfig::new(m, "x", 1, 4);
    cfg.prompts = vec![prompt_tokens("Once upon a time")];
    cfg.transport = TransportKind::Tcp;
    cfg.timeout_ms = 10_000;
    cfg
}

/// One in-process node serving one session.
fn node() -> String {
    let (tx, rx) = mpsc::channel();
    let opts = NodeOptions {
        listen: "127.0.0.1:0".into(),
        key: key(),
        once: true,
        stop: AbortFlag::new(),
    };
    std::thread::spawn(move || {
        let announce = |addr: SocketAddr| {
            let _ = tx.send(addr.to_string());
        };
        let _ = serve(&opts, &NoObservers, &announce, &|_| {});
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("node address")
}

fn honest_tokens() -> Vec<Vec<u32>> {
    run_on_nodes(&config(), &[node()], &key())
        .expect("untampered run")
        .tokens
}

fn through_relay(tamper: Arc<Tamper>) -> Result<RunReport, TransportError> {
    run_on_nodes(&config(), &[relay(node(), tamper)], &key())
}

fn replace(record: &mut Vec<u8>, from: &[u8], to: &[u8]) -> bool {
    match record.windows(from.len()).position(|w| w == from) {
        Some(at) => {
            record.splice(at..at + from.len(), to.iter().copied());
            true
        }
        None => false,
    }
}

/// Records of each direction before the first control message: the hello, one handshake
/// message, eight clock pings (pongs) and the clock report.
const HANDSHAKE_RECORDS: usize = 11;

#[test]
fn a_relay_rewriting_the_assignment_cannot_change_the_seed() {
    let tamper: Arc<Tamper> = Arc::new(|dir, i, record| {
        if dir == Dir::ToNode && i == HANDSHAKE_RECORDS {
            // Readable JSON (an unsealed channel): rewrite the seed as the relay did;
            // otherwise change one byte, which is all a relay without the keys can do.
            if !replace(record, b"\"seed\":7", b"\"seed\":1234") {
                let mid = record.len() / 2;
                record[mid] ^= 1;
            }
        }
        Action::Forward
    });
    match through_relay(tamper) {
        Err(e) => assert!(e.to_string().contains("integrity"), "{e}"),
        Ok(r) => panic!(
            "a tampered assignment ran (tokens {:?}, honest {:?})",
            r.tokens,
            honest_tokens()
        ),
    }
}

#[test]
fn a_relay_rewriting_the_report_cannot_forge_tokens() {
    let tamper: Arc<Tamper> = Arc::new(|dir, i, record| {
        // Readable JSON: forge a token; sealed: change one byte of every long record.
        if dir == Dir::ToCaller
            && i >= HANDSHAKE_RECORDS
            && !replace(record, b"\"tokens\":[[", b"\"tokens\":[[9,")
            && record.len() > 200
        {
            let mid = record.len() / 2;
            record[mid] ^= 1;
        }
        Action::Forward
    });
    match through_relay(tamper) {
        Err(e) => assert!(e.to_string().contains("integrity"), "{e}"),
        Ok(r) => panic!(
            "a forged report was accepted (tokens {:?}, honest {:?})",
            r.tokens,
            honest_tokens()
        ),
    }
}

#[test]
fn a_relay_dropping_replaying_or_reordering_control_messages_is_caught() {
    // Dropped: the node's first message after the handshake (its Ready or a heartbeat).
    let drop_one: Arc<Tamper> = Arc::new(|dir, i, _| match (dir, i) {
        (Dir::ToCaller, HANDSHAKE_RECORDS) => Action::Drop,
        _ => Action::Forward,
    });
    // Replayed: the coordinator's assignment arrives twice.
    let replay: Arc<Tamper> = Arc::new(|dir, i, _| match (dir, i) {
        (Dir::ToNode, HANDSHAKE_RECORDS) => Action::Twice,
        _ => Action::Forward,
    });
    // Reordered: a record held back and sent after the one that followed it.
    let swap: Arc<Tamper> = Arc::new(|dir, i, _| match (dir, i) {
        (Dir::ToCaller, HANDSHAKE_RECORDS) => Action::After,
        _ => Action::Forward,
    });
    for (name, tamper) in [("drop", drop_one), ("replay", replay), ("reorder", swap)] {
        match through_relay(tamper) {
            Err(e) => assert!(
                e.to_string().contains("integrity") || e.to_string().contains("broke"),
                "{name}: {e}"
            ),
            Ok(_) => panic!("{name}: the run ended as if nothing happened"),
        }
    }
}

fn ends() -> LinkEnds {
    LinkEnds {
        id: LinkId(0),
        src: EndpointId(0),
        dst: EndpointId(1),
        timeout: Duration::from_secs(20),
    }
}

fn tag() -> Tag {
    Tag {
        sequence: 0,
        step: 0,
        layer: 0,
    }
}

#[test]
fn strangers_at_a_link_port_are_refused_and_the_link_still_pairs() {
    let secret = ClusterKey::random().expect("run secret");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let refusals = Arc::new(Mutex::new(Vec::new()));
    let (s2, r2) = (secret.clone(), refusals.clone());
    let receiver = std::thread::spawn(move || {
        let log = |e: &TransportError| r2.lock().expect("lock").push(e.to_string());
        LinkReceiver::accept_tcp(
            &listener,
            &s2,
            LinkIntegrity::Mac,
            ends(),
            Observers::none(),
            &AbortFlag::new(),
            &log,
        )
    });
    // One holds its socket silent, one resets at once, one sends junk, one speaks slug but
    // holds the cluster key instead of this run's link secret.
    let _silent = TcpStream::connect(&addr).expect("silent stranger");
    let reset = TcpStream::connect(&addr).expect("resetting stranger");
    linger_zero(&reset);
    drop(reset);
    let mut junk = TcpStream::connect(&addr).expect("junk stranger");
    junk.write_all(&[0xff; 64]).expect("junk");
    let abort = AbortFlag::new();
    let wrong = LinkSender::connect_tcp(
        &addr,
        &key(),
        LinkIntegrity::Mac,
        ends(),
        Observers::none(),
        &abort,
    );
    assert!(
        matches!(wrong, Err(TransportError::Refused { .. })),
        "{wrong:?}"
    );
    // The receiver logs the refusal once its handshake thread reports back; wait for that
    // (the link pairs with the first admitted caller, and later reports are not read).
    let logged = || {
        refusals
            .lock()
            .expect("lock")
            .iter()
            .any(|r| r.contains("cluster key proof failed"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !logged() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // More silent strangers than the port handshakes at once: the oldest are dropped for
    // newcomers, so the real sender still gets its turn.
    let _crowd: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(&addr).expect("silent stranger"))
        .collect();
    let mut tx = LinkSender::connect_tcp(
        &addr,
        &secret,
        LinkIntegrity::Mac,
        ends(),
        Observers::none(),
        &abort,
    )
    .expect("the run's own sender connects");
    let mut rx = receiver
        .join()
        .expect("receiver thread")
        .expect("the link paired despite the strangers");
    let src = vec![5u8; 1000];
    let mut dst = vec![0u8; 1000];
    tx.send(
        Region {
            arena: ArenaId(0),
            bytes: &src,
        },
        0,
        1000,
        ArenaId(0),
        0,
        tag(),
    )
    .expect("send");
    rx.recv(&mut RegionMut {
        arena: ArenaId(0),
        bytes: &mut dst,
    })
    .expect("recv");
    assert_eq!(src, dst);
    assert!(logged(), "{:?}", refusals.lock().expect("lock"));
}

/// Makes closing `s` send a reset instead of a FIN, as a crashed or hostile peer might.
fn linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a correctly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt SO_LINGER");
}

/// A relay that forwards raw bytes between the two ends of a data link, flipping the byte at
/// `flip` (counted from the start of the sender's stream).
fn byte_relay(target: String, flip: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let addr = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        let Ok((mut caller, _)) = listener.accept() else {
            return;
        };
        let mut node = TcpStream::connect(&target).expect("relay connects");
        let (mut n2, mut c2) = (
            node.try_clone().expect("clone"),
            caller.try_clone().expect("clone"),
        );
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut n2, &mut c2);
            let _ = c2.shutdown(Shutdown::Both);
        });
        let mut buf = vec![0u8; 64 << 10];
        let mut seen = 0usize;
        loop {
            let n = match caller.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (seen..seen + n).contains(&flip) {
                buf[flip - seen] ^= 0x10;
            }
            seen += n;
            if node.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = node.shutdown(Shutdown::Both);
    });
    addr
}

#[test]
fn a_byte_flipped_on_a_data_link_is_caught_by_the_mac() {
    const LEN: usize = 256 << 10;
    for integrity in [LinkIntegrity::Mac, LinkIntegrity::None] {
        let secret = ClusterKey::random().expect("run secret");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        // Far past the handshake, inside the transfer's payload.
        let via = byte_relay(addr, 100_000);
        let s2 = secret.clone();
        let receiver = std::thread::spawn(move || {
            let mut rx = LinkReceiver::accept_tcp(
                &listener,
                &s2,
                integrity,
                ends(),
                Observers::none(),
                &AbortFlag::new(),
                &|_| {},
            )
            .expect("accept");
            let mut dst = vec![0u8; LEN];
            let got = rx.recv(&mut RegionMut {
                arena: ArenaId(0),
                bytes: &mut dst,
            });
            (got, dst)
        });
        let mut tx = LinkSender::connect_tcp(
            &via,
            &secret,
            integrity,
            ends(),
            Observers::none(),
            &AbortFlag::new(),
        )
        .expect("connect through the relay");
        let src: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        tx.send(
            Region {
                arena: ArenaId(0),
                bytes: &src,
            },
            0,
            LEN as u64,
            ArenaId(0),
            0,
            tag(),
        )
        .expect("send");
        let (got, dst) = receiver.join().expect("receiver");
        match integrity {
            LinkIntegrity::Mac => match got {
                Err(e) => assert!(e.to_string().contains("integrity check"), "{e}"),
                Ok(_) => panic!("a flipped byte went unnoticed under --link-integrity mac"),
            },
            // What `none` means: the bytes are not checked (only for trusted fabrics).
            LinkIntegrity::None => {
                got.expect("recv");
                assert_ne!(dst, src);
            }
        }
    }
}

/// A node that lists files its stage's recording never makes, as a malicious node (or one a
/// relay tampered with, on a channel that was not sealed) would.
struct PlantingNode(std::path::PathBuf);

impl ObserverFactory for PlantingNode {
    fn stage_observers(&self, _: &StageContext<'_>) -> Result<StageObservers, TransportError> {
        Ok(StageObservers::none())
    }

    fn collected_files(&self, _: &StageContext<'_>) -> Option<std::path::PathBuf> {
        Some(self.0.clone())
    }
}

#[test]
fn a_node_cannot_plant_files_its_stage_does_not_record() {
    let scratch = tempfile::tempdir().expect("scratch");
    std::fs::create_dir_all(scratch.path().join("endpoints")).expect("endpoints");
    std::fs::write(scratch.path().join("endpoints/0.slog"), b"log").expect("log");
    std::fs::write(scratch.path().join("endpoints/0.journal"), b"planted").expect("journal");
    std::fs::write(scratch.path().join("extra.txt"), b"planted").expect("extra");
    let (tx, rx) = mpsc::channel();
    let factory = PlantingNode(scratch.path().to_path_buf());
    std::thread::spawn(move || {
        let opts = NodeOptions {
            listen: "127.0.0.1:0".into(),
            key: key(),
            once: true,
            stop: AbortFlag::new(),
        };
        let announce = |addr: SocketAddr| {
            let _ = tx.send(addr.to_string());
        };
        let _ = serve(&opts, &factory, &announce, &|_| {});
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("node address");
    let trace = tempfile::tempdir().expect("trace");
    let got = run_on_nodes_collecting(&config(), &[addr], &key(), Some(trace.path()));
    match got {
        Err(e) => assert!(e.to_string().contains("does not produce"), "{e}"),
        Ok(_) => panic!("the coordinator accepted a node's planted files"),
    }
    assert!(!trace.path().join("endpoints/0.journal").exists());
    assert!(!trace.path().join("extra.txt").exists());
}
