//! Cluster trust and the connection handshake: a Noise `NNpsk0` handshake (snow) with a key
//! derived from the shared cluster key as pre-shared key and the caller's hello (version, role,
//! stages, nonce) as prologue, so every session gets fresh keys bound to its own ephemeral keys
//! and purpose; afterwards every control frame is sealed (ChaCha20-Poly1305, counter nonces:
//! nothing can be altered, replayed, dropped or reordered unnoticed). The NTP-style clock-offset
//! estimate is taken over the sealed channel on every new connection.

use std::fmt;
use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use crate::clock::{ClockOffset, ClockSample, monotonic_ns};
use crate::error::{Result, TransportError};
use crate::wire::{AbortFlag, Conn, kind};

/// Version of the slug wire protocol (handshake, control messages, data frames).
pub const PROTOCOL_VERSION: u32 = 2;
/// Environment variable holding the cluster key.
pub const KEY_ENV: &str = "SLUG_CLUSTER_KEY";
/// The Noise protocol every slug connection speaks.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Ping-pongs per clock-offset estimate.
const CLOCK_SAMPLES: usize = 8;
const HELLO_MAGIC: &[u8; 8] = b"SLUGHELO";
const NONCE: usize = 32;
const HELLO_LEN: usize = 8 + 4 + 1 + 4 + 4 + 1 + NONCE;
/// Stage id meaning "the coordinator, not a stage".
pub const COORDINATOR: u32 = u32::MAX;
/// Hello flag: the data link carries a keyed MAC after every transfer.
const FLAG_LINK_MAC: u8 = 1;

/// The secret every node of a cluster shares (or, for data links, the per-run secret the
/// coordinator hands its nodes). Its `Debug` output never shows the key.
#[derive(Clone)]
pub struct ClusterKey(Vec<u8>);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey({} bytes)", self.0.len())
    }
}

impl ClusterKey {
    /// A key from raw secret bytes; at least 16 bytes so it cannot be guessed.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < 16 {
            return Err(TransportError::Key(format!(
                "key has {} bytes, at least 16 are required (make one with `slug keygen PATH`)",
                bytes.len()
            )));
        }
        Ok(Self(bytes.to_vec()))
    }

    /// Reads the key from a file (surrounding whitespace is ignored); `-` reads standard input.
    /// A file other users may read is refused, as ssh refuses such private keys.
    pub fn from_file(path: &Path) -> Result<Self> {
        if path == Path::new("-") {
            let mut text = Vec::new();
            std::io::stdin()
                .take(4096)
                .read_to_end(&mut text)
                .map_err(|e| TransportError::Key(format!("cannot read the key from stdin: {e}")))?;
            return Self::from_bytes(text.trim_ascii());
        }
        let mut file = std::fs::File::open(path).map_err(|e| {
            TransportError::Key(format!("cannot read key file {}: {e}", path.display()))
        })?;
        let meta = file.metadata().map_err(|e| {
            TransportError::Key(format!("cannot stat key file {}: {e}", path.display()))
        })?;
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(TransportError::Key(format!(
                    "key file {} is readable by other users (mode {mode:03o}); \
                     run `chmod 600 {}`",
                    path.display(),
                    path.display()
                )));
            }
        }
        let mut text = Vec::new();
        (&mut file).take(4096).read_to_end(&mut text).map_err(|e| {
            TransportError::Key(format!("cannot read key file {}: {e}", path.display()))
        })?;
        Self::from_bytes(text.trim_ascii())
    }

    /// Reads the key from [`KEY_ENV`].
    pub fn from_env() -> Result<Self> {
        match std::env::var_os(KEY_ENV) {
            Some(v) => Self::from_bytes(v.as_encoded_bytes().trim_ascii()),
            None => Err(TransportError::Key(format!("{KEY_ENV} is not set"))),
        }
    }

    /// The key file if given, else the environment variable.
    pub fn resolve(key_file: Option<&Path>) -> Result<Self> {
        match key_file {
            Some(p) => Self::from_file(p),
            None => Self::from_env(),
        }
    }

    /// A fresh random key (hex text, 64 characters): `slug keygen`, a run's data-link secret,
    /// or a single-machine run that launches its own nodes.
    pub fn random() -> Result<Self> {
        let raw = random_bytes::<32>()?;
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        Self::from_bytes(hex.as_bytes())
    }

    /// The key as text, for handing to child processes (on their stdin) or to a node (inside a
    /// sealed control message).
    pub fn as_env_value(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    /// The Noise pre-shared key: the cluster key hashed to 32 bytes under a slug-specific context.
    fn psk(&self) -> [u8; 32] {
        blake3::derive_key("slug 2026 noise psk v2", &self.0)
    }
}

/// Writes a fresh key to `path` with mode 0600, refusing to replace any existing file.
pub fn write_new_key(path: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = ClusterKey::random()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                TransportError::Key(format!(
                    "{} already exists; slug keygen never replaces a file: choose another path \
                     or remove it yourself",
                    path.display()
                ))
            } else {
                TransportError::Key(format!("cannot create key file {}: {e}", path.display()))
            }
        })?;
    writeln!(file, "{}", key.as_env_value())
        .and_then(|()| file.sync_all())
        .map_err(|e| TransportError::Key(format!("cannot write key file {}: {e}", path.display())))
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| TransportError::io("read /dev/urandom for a handshake nonce", e))?;
    Ok(buf)
}

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Coordinator to node: configuration, progress, reports.
    Control,
    /// Stage to stage: transfers of one link.
    Data,
}

/// The first message of every connection: who is calling, for what, speaking which version.
/// It travels in the clear and is bound into the Noise prologue, so a relay that alters any of
/// it makes the handshake fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version of the caller.
    pub version: u32,
    /// Purpose of the connection.
    pub role: Role,
    /// Calling stage ([`COORDINATOR`] for the coordinator).
    pub from: u32,
    /// Stage the caller wants to reach ([`COORDINATOR`] when addressing a node as a whole).
    pub to: u32,
    /// Whether the caller seals every data-link transfer with a keyed MAC.
    pub link_mac: bool,
    nonce: [u8; NONCE],
}

impl Hello {
    /// A hello with this build's protocol version and a fresh nonce.
    pub fn new(role: Role, from: u32, to: u32) -> Result<Self> {
        Ok(Self {
            version: PROTOCOL_VERSION,
            role,
            from,
            to,
            link_mac: false,
            nonce: random_bytes()?,
        })
    }

    fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(HELLO_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12] = match self.role {
            Role::Control => 0,
            Role::Data => 1,
        };
        b[13..17].copy_from_slice(&self.from.to_le_bytes());
        b[17..21].copy_from_slice(&self.to.to_le_bytes());
        b[21] = if self.link_mac { FLAG_LINK_MAC } else { 0 };
        b[22..].copy_from_slice(&self.nonce);
        b
    }

    fn decode(b: &[u8], peer: &str) -> Result<Self> {
        let bad = |detail: &str| TransportError::Protocol {
            peer: peer.to_string(),
            detail: detail.to_string(),
        };
        if b.len() < 12 || &b[..8] != HELLO_MAGIC {
            return Err(bad(
                "first message is not a slug hello; is this a slug node?",
            ));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if u32_at(8) != PROTOCOL_VERSION || b.len() != HELLO_LEN {
            // Decoded only as far as the version, so the refusal can name it.
            return Ok(Self {
                version: u32_at(8),
                role: Role::Control,
                from: 0,
                to: 0,
                link_mac: false,
                nonce: [0; NONCE],
            });
        }
        let role = match b[12] {
            0 => Role::Control,
            1 => Role::Data,
            _ => return Err(bad("unknown connection role")),
        };
        let mut nonce = [0u8; NONCE];
        nonce.copy_from_slice(&b[22..]);
        Ok(Self {
            version: u32_at(8),
            role,
            from: u32_at(13),
            to: u32_at(17),
            link_mac: b[21] & FLAG_LINK_MAC != 0,
            nonce,
        })
    }
}

/// An authenticated connection and what the handshake learnt.
#[derive(Debug)]
pub(crate) struct Handshaken {
    /// The connection; its frames are sealed from now on.
    pub conn: Conn,
    /// Peer clock minus our clock.
    pub clock: ClockOffset,
    /// Key of the keyed MAC over data-link transfers: the pre-shared key bound to this
    /// session's handshake hash, so it differs for every connection.
    pub mac_key: [u8; 32],
}

fn noise(key: &ClusterKey, prologue: &[u8], initiator: bool) -> Result<snow::HandshakeState> {
    let psk = key.psk();
    let params = NOISE_PARAMS
        .parse()
        .map_err(|e| TransportError::Config(format!("noise parameters {NOISE_PARAMS}: {e}")))?;
    let builder = snow::Builder::new(params)
        .psk(0, &psk)
        .and_then(|b| b.prologue(prologue));
    let built = builder.and_then(|b| {
        if initiator {
            b.build_initiator()
        } else {
            b.build_responder()
        }
    });
    built.map_err(|e| TransportError::Config(format!("noise handshake setup: {e}")))
}

fn prologue(hello_bytes: &[u8]) -> Vec<u8> {
    let mut p = b"slug handshake v2\0".to_vec();
    p.extend_from_slice(hello_bytes);
    p
}

fn mac_key(key: &ClusterKey, hs: &snow::HandshakeState) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(&key.psk());
    h.update(b"slug link mac v2\0");
    h.update(hs.get_handshake_hash());
    *h.finalize().as_bytes()
}

/// Caller side: sends `hello`, runs the Noise handshake (the node proves the key in its reply,
/// we prove it in our first message), then measures clocks over the sealed channel.
pub(crate) fn client_handshake(
    stream: TcpStream,
    peer: String,
    key: &ClusterKey,
    hello: Hello,
    abort: AbortFlag,
    timeout: Duration,
) -> Result<Handshaken> {
    let mut conn = Conn::new(stream, peer, abort)?;
    let hello_bytes = hello.encode();
    conn.send_frame(kind::HELLO, &hello_bytes, timeout)?;
    let mut hs = noise(key, &prologue(&hello_bytes), true)?;
    let mut msg = [0u8; 256];
    let n = hs
        .write_message(&[], &mut msg)
        .map_err(|e| TransportError::Config(format!("noise handshake: {e}")))?;
    conn.send_frame(kind::NOISE, &msg[..n], timeout)?;
    let reply = conn.expect_frame(kind::NOISE, timeout)?;
    let mut payload = [0u8; 256];
    if reply.len() > msg.len() || hs.read_message(&reply, &mut payload).is_err() {
        return Err(TransportError::Refused {
            peer: conn.peer.clone(),
            reason: "the node could not prove it holds our cluster key (different key, or \
                     someone between us altered the handshake)"
                .into(),
        });
    }
    let mac_key = mac_key(key, &hs);
    let transport = hs
        .into_stateless_transport_mode()
        .map_err(|e| TransportError::Config(format!("noise handshake: {e}")))?;
    conn.seal(transport);
    let mut samples = Vec::with_capacity(CLOCK_SAMPLES);
    for _ in 0..CLOCK_SAMPLES {
        let t0 = monotonic_ns();
        conn.send_frame(kind::PING, &t0.to_le_bytes(), timeout)?;
        let pong = conn.expect_frame(kind::PONG, timeout)?;
        let t3 = monotonic_ns();
        let [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p] = pong.as_slice() else {
            return Err(TransportError::Protocol {
                peer: conn.peer.clone(),
                detail: "malformed clock pong".into(),
            });
        };
        let t1 = u64::from_le_bytes([*a, *b, *c, *d, *e, *f, *g, *h]);
        let t2 = u64::from_le_bytes([*i, *j, *k, *l, *m, *n, *o, *p]);
        samples.push(ClockSample { t0, t1, t2, t3 });
    }
    let clock = ClockOffset::from_samples(&samples).unwrap_or(ClockOffset {
        offset_ns: 0,
        rtt_ns: 0,
        samples: 0,
    });
    let mut report = Vec::with_capacity(16);
    report.extend_from_slice(&clock.offset_ns.to_le_bytes());
    report.extend_from_slice(&clock.rtt_ns.to_le_bytes());
    conn.send_frame(kind::CLOCK, &report, timeout)?;
    Ok(Handshaken {
        conn,
        clock,
        mac_key,
    })
}

/// Node side: reads the hello, refuses other versions, checks the caller's Noise message (which
/// only a holder of the key can produce), lets `admit` refuse callers it does not expect (wrong
/// stage, wrong role), then answers and serves the clock pings. Every refusal is sent to the
/// caller and returned as [`TransportError::Refused`] for the node to log.
pub(crate) fn server_handshake(
    stream: TcpStream,
    peer: String,
    key: &ClusterKey,
    abort: AbortFlag,
    timeout: Duration,
    admit: impl FnOnce(&Hello) -> std::result::Result<(), String>,
) -> Result<Handshaken> {
    let mut conn = Conn::new(stream, peer, abort)?;
    let hello_bytes = conn.expect_frame(kind::HELLO, timeout)?;
    let hello = Hello::decode(&hello_bytes, &conn.peer)?;
    let refuse = |conn: &mut Conn, reason: String| -> TransportError {
        let _ = conn.send_frame(kind::REFUSE, reason.as_bytes(), timeout);
        conn.shutdown();
        TransportError::Refused {
            peer: conn.peer.clone(),
            reason,
        }
    };
    if hello.version != PROTOCOL_VERSION {
        let reason = format!(
            "protocol version mismatch: caller speaks version {}, this node speaks {PROTOCOL_VERSION}; \
             run the same slug build on every host",
            hello.version
        );
        return Err(refuse(&mut conn, reason));
    }
    let mut hs = noise(key, &prologue(&hello_bytes), false)?;
    let first = conn.expect_frame(kind::NOISE, timeout)?;
    let mut payload = [0u8; 256];
    if first.len() > 256 || hs.read_message(&first, &mut payload).is_err() {
        return Err(refuse(
            &mut conn,
            "cluster key proof failed: the caller does not hold this node's cluster key".into(),
        ));
    }
    if let Err(reason) = admit(&hello) {
        return Err(refuse(&mut conn, reason));
    }
    let mut msg = [0u8; 256];
    let n = hs
        .write_message(&[], &mut msg)
        .map_err(|e| TransportError::Config(format!("noise handshake: {e}")))?;
    conn.send_frame(kind::NOISE, &msg[..n], timeout)?;
    let mac_key = mac_key(key, &hs);
    let transport = hs
        .into_stateless_transport_mode()
        .map_err(|e| TransportError::Config(format!("noise handshake: {e}")))?;
    conn.seal(transport);
    for _ in 0..=CLOCK_SAMPLES {
        let (k, body) = conn.recv_frame(timeout)?;
        match k {
            kind::PING => {
                let t1 = monotonic_ns();
                let mut pong = Vec::with_capacity(16);
                pong.extend_from_slice(&t1.to_le_bytes());
                pong.extend_from_slice(&monotonic_ns().to_le_bytes());
                conn.send_frame(kind::PONG, &pong, timeout)?;
            }
            kind::CLOCK if body.len() == 16 => {
                let mut w = [0u8; 8];
                w.copy_from_slice(&body[..8]);
                let caller_view = i64::from_le_bytes(w);
                w.copy_from_slice(&body[8..]);
                let rtt_ns = i64::from_le_bytes(w);
                // The caller measured our clock minus theirs; ours minus theirs is its negation.
                let clock = ClockOffset {
                    offset_ns: caller_view.saturating_neg(),
                    rtt_ns,
                    samples: CLOCK_SAMPLES as u32,
                };
                return Ok(Handshaken {
                    conn,
                    clock,
                    mac_key,
                });
            }
            other => {
                return Err(TransportError::Protocol {
                    peer: conn.peer.clone(),
                    detail: format!("unexpected frame kind {other} during clock sync"),
                });
            }
        }
    }
    Err(TransportError::Protocol {
        peer: conn.peer.clone(),
        detail: format!("more than {CLOCK_SAMPLES} clock pings"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::fs::PermissionsExt;

    const T: Duration = Duration::from_secs(10);

    fn key(s: &str) -> ClusterKey {
        ClusterKey::from_bytes(s.as_bytes()).expect("key")
    }

    fn pair(
        server_key: ClusterKey,
        client_key: ClusterKey,
        hello: Hello,
        expect_from: u32,
    ) -> (Result<Handshaken>, Result<Handshaken>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().expect("accept");
            server_handshake(s, "caller".into(), &server_key, AbortFlag::new(), T, |h| {
                if h.from == expect_from {
                    Ok(())
                } else {
                    Err(format!(
                        "expected stage {expect_from}, got stage {}",
                        h.from
                    ))
                }
            })
        });
        let s = TcpStream::connect(addr).expect("connect");
        let c = client_handshake(s, "node".into(), &client_key, hello, AbortFlag::new(), T);
        (c, server.join().expect("server thread"))
    }

    #[test]
    fn same_key_is_accepted_and_clocks_agree_on_one_host() {
        let k = key("0123456789abcdef-secret");
        let hello = Hello::new(Role::Data, 1, 2).expect("hello");
        let (c, s) = pair(k.clone(), k, hello, 1);
        let (mut c, mut s) = (c.expect("client side"), s.expect("server side"));
        // Same machine, same CLOCK_MONOTONIC: the estimate is within its own RTT of zero.
        assert!(c.clock.offset_ns.abs() <= c.clock.rtt_ns.max(1_000_000));
        assert_eq!(s.clock.offset_ns, -c.clock.offset_ns);
        assert_eq!(
            c.mac_key, s.mac_key,
            "both ends derive the same link MAC key"
        );
        // Sealed frames of every size (several Noise messages) arrive intact both ways.
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        c.conn.send_frame(kind::JSON, &big, T).expect("send");
        assert_eq!(s.conn.expect_frame(kind::JSON, T).expect("recv"), big);
        s.conn.send_frame(kind::JSON, b"", T).expect("send empty");
        assert!(c.conn.expect_frame(kind::JSON, T).expect("recv").is_empty());
    }

    #[test]
    fn every_session_gets_its_own_keys() {
        let k = key("0123456789abcdef-secret");
        let one = pair(
            k.clone(),
            k.clone(),
            Hello::new(Role::Data, 1, 2).unwrap(),
            1,
        );
        let two = pair(k.clone(), k, Hello::new(Role::Data, 1, 2).unwrap(), 1);
        assert_ne!(one.0.unwrap().mac_key, two.0.unwrap().mac_key);
    }

    #[test]
    fn wrong_key_is_refused_on_both_sides() {
        let hello = Hello::new(Role::Data, 1, 2).expect("hello");
        let (c, s) = pair(
            key("node-key-0123456789"),
            key("other-key-0123456789"),
            hello,
            1,
        );
        assert!(matches!(c, Err(TransportError::Refused { .. })), "{c:?}");
        assert!(s.is_err());
    }

    #[test]
    fn wrong_stage_and_wrong_version_are_refused_with_reason() {
        let k = key("0123456789abcdef-secret");
        let hello = Hello::new(Role::Data, 3, 2).expect("hello");
        let (c, _) = pair(k.clone(), k.clone(), hello, 1);
        match c {
            Err(TransportError::Refused { reason, .. }) => {
                assert!(reason.contains("expected stage 1, got stage 3"), "{reason}")
            }
            other => panic!("expected refusal, got {other:?}"),
        }
        let mut old = Hello::new(Role::Data, 1, 2).expect("hello");
        old.version = PROTOCOL_VERSION + 1;
        let (c, _) = pair(k.clone(), k, old, 1);
        match c {
            Err(TransportError::Refused { reason, .. }) => {
                assert!(reason.contains("version mismatch"), "{reason}")
            }
            other => panic!("expected refusal, got {other:?}"),
        }
    }

    #[test]
    fn key_file_is_read_trimmed_and_env_is_the_fallback() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cluster.key");
        std::fs::write(&path, "  file-held-cluster-secret\n").expect("write key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let from_file = ClusterKey::resolve(Some(&path)).expect("key file");
        assert_eq!(from_file.psk(), key("file-held-cluster-secret").psk());
        let missing = ClusterKey::from_file(&dir.path().join("absent"));
        assert!(matches!(missing, Err(TransportError::Key(m)) if m.contains("absent")));
    }

    #[test]
    fn a_key_file_others_can_read_is_refused_with_the_chmod_to_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cluster.key");
        std::fs::write(&path, "file-held-cluster-secret\n").expect("write key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        match ClusterKey::from_file(&path) {
            Err(TransportError::Key(m)) => {
                assert!(m.contains(&format!("chmod 600 {}", path.display())), "{m}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn keygen_writes_a_private_key_and_never_replaces_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cluster.key");
        write_new_key(&path).expect("keygen");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let first = std::fs::read(&path).unwrap();
        ClusterKey::from_file(&path).expect("a generated key loads");
        let again = write_new_key(&path);
        assert!(matches!(again, Err(TransportError::Key(m)) if m.contains("already exists")));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            first,
            "the key was not replaced"
        );
    }

    #[test]
    fn short_keys_are_rejected_and_debug_hides_the_key() {
        assert!(ClusterKey::from_bytes(b"short").is_err());
        let k = key("a-very-secret-cluster-key");
        assert!(!format!("{k:?}").contains("secret"));
    }
}
