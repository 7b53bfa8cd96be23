//! Cluster trust and the connection handshake: a shared cluster key proven by HMAC-SHA256
//! challenge/response (the key never crosses the wire), protocol-version and stage-id checks,
//! and the NTP-style clock-offset estimate taken on every new connection.

use std::fmt;
use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::clock::{ClockOffset, ClockSample, monotonic_ns};
use crate::error::{Result, TransportError};
use crate::wire::{AbortFlag, Conn, kind};

/// Version of the slug wire protocol (handshake, control messages, data frames).
pub const PROTOCOL_VERSION: u32 = 1;
/// Environment variable holding the cluster key.
pub const KEY_ENV: &str = "SLUG_CLUSTER_KEY";
/// Ping-pongs per clock-offset estimate.
const CLOCK_SAMPLES: usize = 8;
const HELLO_MAGIC: &[u8; 8] = b"SLUGHELO";
const NONCE: usize = 32;
const HELLO_LEN: usize = 8 + 4 + 1 + 4 + 4 + NONCE;
/// Stage id meaning "the coordinator, not a stage".
pub const COORDINATOR: u32 = u32::MAX;

/// The secret every node of a cluster shares. Its `Debug` output never shows the key.
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
                "key has {} bytes, at least 16 are required",
                bytes.len()
            )));
        }
        Ok(Self(bytes.to_vec()))
    }

    /// Reads the key from a file (surrounding whitespace is ignored).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).map_err(|e| {
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

    /// A fresh random key (hex text, 64 characters) for a single-machine run that launches its own nodes.
    pub fn random() -> Result<Self> {
        let raw = random_bytes::<32>()?;
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        Self::from_bytes(hex.as_bytes())
    }

    /// The key as text, for handing to child processes through [`KEY_ENV`].
    pub fn as_env_value(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        // HMAC accepts keys of any length, so this cannot fail for a constructed key.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(label);
        for p in parts {
            mac.update(&(p.len() as u64).to_le_bytes());
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    fn verify(&self, label: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(label);
        for p in parts {
            mac.update(&(p.len() as u64).to_le_bytes());
            mac.update(p);
        }
        mac.verify_slice(tag).is_ok()
    }
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
        b[21..].copy_from_slice(&self.nonce);
        b
    }

    fn decode(b: &[u8], peer: &str) -> Result<Self> {
        let bad = |detail: &str| TransportError::Protocol {
            peer: peer.to_string(),
            detail: detail.to_string(),
        };
        if b.len() != HELLO_LEN || &b[..8] != HELLO_MAGIC {
            return Err(bad(
                "first message is not a slug hello; is this a slug node?",
            ));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let role = match b[12] {
            0 => Role::Control,
            1 => Role::Data,
            _ => return Err(bad("unknown connection role")),
        };
        let mut nonce = [0u8; NONCE];
        nonce.copy_from_slice(&b[21..]);
        Ok(Self {
            version: u32_at(8),
            role,
            from: u32_at(13),
            to: u32_at(17),
            nonce,
        })
    }
}

/// An authenticated connection and what the handshake learnt.
#[derive(Debug)]
pub(crate) struct Handshaken {
    pub conn: Conn,
    /// Peer clock minus our clock.
    pub clock: ClockOffset,
}

/// Caller side: sends `hello`, checks the node proves the key, proves it back, measures clocks.
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
    let challenge = conn.expect_frame(kind::CHALLENGE, timeout)?;
    if challenge.len() != 4 + NONCE + 32 {
        return Err(TransportError::Protocol {
            peer: conn.peer.clone(),
            detail: "malformed challenge".into(),
        });
    }
    let (nonce_s, mac_s) = challenge[4..].split_at(NONCE);
    if !key.verify(b"slug-node", &[&hello_bytes, nonce_s], mac_s) {
        // Tell the node why we hang up, so its log names the cause.
        let _ = conn.send_frame(
            kind::REFUSE,
            b"cluster key mismatch: the caller holds a different cluster key than this node",
            timeout,
        );
        return Err(TransportError::Refused {
            peer: conn.peer.clone(),
            reason: "the node could not prove it holds our cluster key (different key?)".into(),
        });
    }
    let proof = key.mac(b"slug-caller", &[&hello_bytes, nonce_s]);
    conn.send_frame(kind::PROOF, &proof, timeout)?;
    conn.expect_frame(kind::ACCEPT, timeout)?;
    let mut samples = Vec::with_capacity(CLOCK_SAMPLES);
    for _ in 0..CLOCK_SAMPLES {
        let t0 = monotonic_ns();
        conn.send_frame(kind::PING, &t0.to_le_bytes(), timeout)?;
        let pong = conn.expect_frame(kind::PONG, timeout)?;
        let t3 = monotonic_ns();
        let (t1, t2) = match pong.as_slice() {
            [a @ .., _, _, _, _, _, _, _, _] if a.len() == 8 => {
                let mut w1 = [0u8; 8];
                let mut w2 = [0u8; 8];
                w1.copy_from_slice(&pong[..8]);
                w2.copy_from_slice(&pong[8..]);
                (u64::from_le_bytes(w1), u64::from_le_bytes(w2))
            }
            _ => {
                return Err(TransportError::Protocol {
                    peer: conn.peer.clone(),
                    detail: "malformed clock pong".into(),
                });
            }
        };
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
    conn.authenticated();
    Ok(Handshaken { conn, clock })
}

/// Node side: reads the hello, refuses other versions, proves the key, checks the caller's proof,
/// then lets `admit` refuse callers it does not expect (wrong stage, wrong role). Every refusal is
/// sent to the caller and returned as [`TransportError::Refused`] for the node to log.
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
    let nonce_s: [u8; NONCE] = random_bytes()?;
    let mac_s = key.mac(b"slug-node", &[&hello_bytes, &nonce_s]);
    let mut challenge = Vec::with_capacity(4 + NONCE + 32);
    challenge.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    challenge.extend_from_slice(&nonce_s);
    challenge.extend_from_slice(&mac_s);
    conn.send_frame(kind::CHALLENGE, &challenge, timeout)?;
    let proof = conn.expect_frame(kind::PROOF, timeout)?;
    if !key.verify(b"slug-caller", &[&hello_bytes, &nonce_s], &proof) {
        return Err(refuse(
            &mut conn,
            "cluster key proof failed: the caller does not hold this node's cluster key".into(),
        ));
    }
    if let Err(reason) = admit(&hello) {
        return Err(refuse(&mut conn, reason));
    }
    conn.send_frame(kind::ACCEPT, &[], timeout)?;
    conn.authenticated();
    loop {
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
                    offset_ns: -caller_view,
                    rtt_ns,
                    samples: CLOCK_SAMPLES as u32,
                };
                return Ok(Handshaken { conn, clock });
            }
            other => {
                return Err(TransportError::Protocol {
                    peer: conn.peer.clone(),
                    detail: format!("unexpected frame kind {other} during clock sync"),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

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
        let (c, s) = (c.expect("client side"), s.expect("server side"));
        // Same machine, same CLOCK_MONOTONIC: the estimate is within its own RTT of zero.
        assert!(c.clock.offset_ns.abs() <= c.clock.rtt_ns.max(1_000_000));
        assert_eq!(s.clock.offset_ns, -c.clock.offset_ns);
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
        let from_file = ClusterKey::resolve(Some(&path)).expect("key file");
        assert!(from_file.verify(b"x", &[], &key("file-held-cluster-secret").mac(b"x", &[])));
        let missing = ClusterKey::from_file(&dir.path().join("absent"));
        assert!(matches!(missing, Err(TransportError::Key(m)) if m.contains("absent")));
    }

    #[test]
    fn short_keys_are_rejected_and_debug_hides_the_key() {
        assert!(ClusterKey::from_bytes(b"short").is_err());
        let k = key("a-very-secret-cluster-key");
        assert!(!format!("{k:?}").contains("secret"));
    }
}
