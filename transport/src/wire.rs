//! Framed messages over TCP with bounded, abortable blocking: the byte level under handshakes,
//! control messages and TCP data links. After the handshake every frame is sealed: split into
//! Noise transport messages (ChaCha20-Poly1305 under per-direction counter nonces), so a frame
//! that was altered, replayed, dropped or reordered fails to open and ends the connection.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Result, TransportError};

/// How often a blocked socket operation wakes to check the abort flag and its deadline.
const POLL_SLICE: Duration = Duration::from_millis(50);
/// Largest control frame accepted from an authenticated peer; data payloads do not use frames.
pub(crate) const MAX_FRAME: usize = 64 << 20;
/// Largest frame accepted before the peer proved the cluster key, so strangers cannot make a
/// node allocate much.
const HANDSHAKE_FRAME: usize = 4 << 10;

/// Frame kinds.
pub(crate) mod kind {
    pub const HELLO: u8 = 1;
    // 2..=4 were the challenge, proof and accept of protocol version 1.
    pub const REFUSE: u8 = 5;
    pub const PING: u8 = 6;
    pub const PONG: u8 = 7;
    pub const CLOCK: u8 = 8;
    pub const JSON: u8 = 9;
    /// Raw bytes of a file a node sends its coordinator (recorded files on hosts).
    pub const FILE: u8 = 10;
    /// A Noise handshake message.
    pub const NOISE: u8 = 11;
    /// A chunk of a migrating stage's arena (move index, offset, bytes), relayed by the
    /// coordinator from the stage's old node to its new one.
    pub const ARENA: u8 = 12;
}

/// Largest Noise message (the protocol's limit) and its authentication tag.
const NOISE_MAX: usize = 65535;
const NOISE_TAG: usize = 16;
/// Header of a sealed frame's first message: kind byte and body length.
const SEALED_HEAD: usize = 5;

/// The keys of a sealed connection and the next nonce of each direction, shared by every clone
/// of the connection (one thread reads, one writes, at any time).
struct Seal {
    keys: snow::StatelessTransportState,
    send: AtomicU64,
    recv: AtomicU64,
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seal")
            .field("sent", &self.send.load(Ordering::Relaxed))
            .field("received", &self.recv.load(Ordering::Relaxed))
            .finish()
    }
}

/// Peer-supplied text made safe to print on one line: control characters (newlines, terminal
/// escapes) are shown escaped and the text is cut to `max` characters.
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 8);
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push_str("...(cut)");
            break;
        }
        if c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Longest peer-supplied text printed in a log line or error.
pub(crate) const PEER_TEXT: usize = 400;

/// A peer's message, as it may appear in an error: its `Debug` form, escaped and bounded.
pub(crate) fn shown<T: std::fmt::Debug>(message: &T) -> String {
    printable(&format!("{message:?}"), PEER_TEXT)
}

/// A shared flag that tells every blocked operation of a process to give up.
#[derive(Debug, Clone, Default)]
pub struct AbortFlag(Arc<AtomicBool>);

impl AbortFlag {
    /// A flag that is not raised.
    pub fn new() -> Self {
        Self::default()
    }
    /// Raises the flag.
    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// True once raised.
    pub fn raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Outcome of a blocked read or write that did not finish.
fn is_retry(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// A TCP connection to a named peer, with deadlines and an abort flag on every blocking call.
#[derive(Debug)]
pub(crate) struct Conn {
    pub stream: TcpStream,
    pub peer: String,
    pub abort: AbortFlag,
    max_frame: usize,
    seal: Option<Arc<Seal>>,
}

impl Conn {
    pub fn new(stream: TcpStream, peer: String, abort: AbortFlag) -> Result<Self> {
        stream
            .set_nodelay(true)
            .and_then(|()| stream.set_read_timeout(Some(POLL_SLICE)))
            .and_then(|()| stream.set_write_timeout(Some(POLL_SLICE)))
            .map_err(|e| TransportError::io(format!("configure socket to {peer}"), e))?;
        Ok(Self {
            stream,
            peer,
            abort,
            max_frame: HANDSHAKE_FRAME,
            seal: None,
        })
    }

    /// The handshake finished: seal every frame from now on and accept full-size control frames
    /// (the peer proved the cluster key).
    pub fn seal(&mut self, keys: snow::StatelessTransportState) {
        self.seal = Some(Arc::new(Seal {
            keys,
            send: AtomicU64::new(0),
            recv: AtomicU64::new(0),
        }));
        self.max_frame = MAX_FRAME;
    }

    fn broken(&self, detail: impl Into<String>) -> TransportError {
        TransportError::LinkBroken {
            link: self.peer.clone(),
            detail: detail.into(),
        }
    }

    /// Reads exactly `buf.len()` bytes, or fails on EOF, error, abort or `timeout`.
    pub fn read_full(&mut self, buf: &mut [u8], timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut done = 0;
        while done < buf.len() {
            match self.stream.read(&mut buf[done..]) {
                Ok(0) => return Err(self.broken("peer closed the connection")),
                Ok(n) => done += n,
                Err(e) if is_retry(&e) => self.check(start, timeout, "received")?,
                Err(e) => return Err(self.broken(e.to_string())),
            }
        }
        Ok(())
    }

    /// Reads at least `min` bytes into `buf` (as many as one read returns beyond that, up to
    /// its length), or fails on EOF, error, abort or `timeout`. Returns the count.
    pub fn read_at_least(
        &mut self,
        buf: &mut [u8],
        min: usize,
        timeout: Duration,
    ) -> Result<usize> {
        let start = Instant::now();
        let mut done = 0;
        while done < min {
            match self.stream.read(&mut buf[done..]) {
                Ok(0) => return Err(self.broken("peer closed the connection")),
                Ok(n) => done += n,
                Err(e) if is_retry(&e) => self.check(start, timeout, "received")?,
                Err(e) => return Err(self.broken(e.to_string())),
            }
        }
        Ok(done)
    }

    /// Writes all of `buf`, or fails on error, abort or `timeout`.
    pub fn write_full(&mut self, buf: &[u8], timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut done = 0;
        while done < buf.len() {
            match self.stream.write(&buf[done..]) {
                Ok(0) => return Err(self.broken("connection accepts no more bytes")),
                Ok(n) => done += n,
                Err(e) if is_retry(&e) => self.check(start, timeout, "sent")?,
                Err(e) => return Err(self.broken(e.to_string())),
            }
        }
        Ok(())
    }

    fn check(&self, start: Instant, timeout: Duration, what: &'static str) -> Result<()> {
        if self.abort.raised() {
            return Err(TransportError::Aborted {
                reason: format!("run aborted while waiting on {}", self.peer),
            });
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(TransportError::Timeout {
                link: self.peer.clone(),
                what,
                waited_ms: waited.as_millis() as u64,
            });
        }
        Ok(())
    }

    /// Sends one frame: length (u32 LE, kind byte + body), kind, body; sealed once the
    /// handshake is done.
    pub fn send_frame(&mut self, kind: u8, body: &[u8], timeout: Duration) -> Result<()> {
        if let Some(seal) = self.seal.clone() {
            return self.send_sealed(&seal, kind, body, timeout);
        }
        let mut buf = Vec::with_capacity(5 + body.len());
        buf.extend_from_slice(&((body.len() + 1) as u32).to_le_bytes());
        buf.push(kind);
        buf.extend_from_slice(body);
        self.write_full(&buf, timeout)
    }

    /// A sealed frame: Noise messages, each preceded by its length (u32 LE); the first carries
    /// the kind and the body's length, then as much body as fits, the rest follow.
    fn send_sealed(&mut self, seal: &Seal, kind: u8, body: &[u8], timeout: Duration) -> Result<()> {
        let room = NOISE_MAX - NOISE_TAG;
        let mut plain = Vec::with_capacity(room.min(SEALED_HEAD + body.len()));
        plain.push(kind);
        plain.extend_from_slice(&(body.len() as u32).to_le_bytes());
        let first = body.len().min(room - SEALED_HEAD);
        plain.extend_from_slice(&body[..first]);
        let mut rest = &body[first..];
        let mut wire = Vec::with_capacity(4 + NOISE_MAX);
        loop {
            let nonce = seal.send.fetch_add(1, Ordering::SeqCst);
            wire.clear();
            wire.resize(4 + plain.len() + NOISE_TAG, 0);
            let n = seal
                .keys
                .write_message(nonce, &plain, &mut wire[4..])
                .map_err(|e| self.broken(format!("cannot seal a frame: {e}")))?;
            wire[..4].copy_from_slice(&(n as u32).to_le_bytes());
            wire.truncate(4 + n);
            self.write_full(&wire, timeout)?;
            if rest.is_empty() {
                return Ok(());
            }
            let take = rest.len().min(room);
            plain.clear();
            plain.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
        }
    }

    /// Reads and opens one sealed Noise message into `plain`.
    fn open_message(
        &mut self,
        seal: &Seal,
        wire: &mut Vec<u8>,
        plain: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<()> {
        let mut len = [0u8; 4];
        self.read_full(&mut len, timeout)?;
        let len = u32::from_le_bytes(len) as usize;
        if !(NOISE_TAG..=NOISE_MAX).contains(&len) {
            return Err(TransportError::Protocol {
                peer: self.peer.clone(),
                detail: format!("sealed message length {len} outside {NOISE_TAG}..={NOISE_MAX}"),
            });
        }
        wire.resize(len, 0);
        self.read_full(wire, timeout)?;
        plain.resize(len, 0);
        let nonce = seal.recv.fetch_add(1, Ordering::SeqCst);
        let n =
            seal.keys
                .read_message(nonce, wire, plain)
                .map_err(|_| TransportError::Protocol {
                    peer: self.peer.clone(),
                    detail: "a sealed frame failed its integrity check: it was altered, replayed, \
                         dropped or reordered on the way (is something between us and the peer?)"
                        .into(),
                })?;
        plain.truncate(n);
        Ok(())
    }

    fn recv_sealed(&mut self, seal: &Seal, timeout: Duration) -> Result<(u8, Vec<u8>)> {
        let mut wire = Vec::new();
        let mut plain = Vec::new();
        self.open_message(seal, &mut wire, &mut plain, timeout)?;
        if plain.len() < SEALED_HEAD {
            return Err(TransportError::Protocol {
                peer: self.peer.clone(),
                detail: "sealed frame too short for its header".into(),
            });
        }
        let kind = plain[0];
        let len = u32::from_le_bytes([plain[1], plain[2], plain[3], plain[4]]) as usize;
        if len > self.max_frame || plain.len() - SEALED_HEAD > len {
            return Err(TransportError::Protocol {
                peer: self.peer.clone(),
                detail: format!(
                    "sealed frame length {len} over the {} limit",
                    self.max_frame
                ),
            });
        }
        let mut body = Vec::with_capacity(len);
        body.extend_from_slice(&plain[SEALED_HEAD..]);
        while body.len() < len {
            self.open_message(seal, &mut wire, &mut plain, timeout)?;
            if plain.is_empty() || body.len() + plain.len() > len {
                return Err(TransportError::Protocol {
                    peer: self.peer.clone(),
                    detail: "a sealed frame's pieces do not add up to its length".into(),
                });
            }
            body.extend_from_slice(&plain);
        }
        Ok((kind, body))
    }

    /// Receives one frame and returns its kind and body.
    pub fn recv_frame(&mut self, timeout: Duration) -> Result<(u8, Vec<u8>)> {
        if let Some(seal) = self.seal.clone() {
            return self.recv_sealed(&seal, timeout);
        }
        let mut len = [0u8; 4];
        self.read_full(&mut len, timeout)?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > self.max_frame {
            return Err(TransportError::Protocol {
                peer: self.peer.clone(),
                detail: format!(
                    "frame length {len} outside 1..={}; not a slug peer?",
                    self.max_frame
                ),
            });
        }
        let mut body = vec![0u8; len];
        self.read_full(&mut body, timeout)?;
        let kind = body.remove(0);
        Ok((kind, body))
    }

    /// Receives a frame that must be of `want` kind; a REFUSE frame becomes [`TransportError::Refused`].
    pub fn expect_frame(&mut self, want: u8, timeout: Duration) -> Result<Vec<u8>> {
        let (kind, body) = self.recv_frame(timeout)?;
        if kind == want {
            return Ok(body);
        }
        if kind == kind::REFUSE {
            // Said by a peer that may not have proven anything yet: escaped and bounded.
            return Err(TransportError::Refused {
                peer: self.peer.clone(),
                reason: printable(&String::from_utf8_lossy(&body), PEER_TEXT),
            });
        }
        Err(TransportError::Protocol {
            peer: self.peer.clone(),
            detail: format!("expected frame kind {want}, got {kind}"),
        })
    }

    /// Sends a JSON control message.
    pub fn send_json<T: serde::Serialize>(&mut self, msg: &T, timeout: Duration) -> Result<()> {
        let body = serde_json::to_vec(msg).map_err(|e| TransportError::Protocol {
            peer: self.peer.clone(),
            detail: format!("cannot encode control message: {e}"),
        })?;
        self.send_frame(kind::JSON, &body, timeout)
    }

    /// Receives a JSON control message.
    pub fn recv_json<T: serde::de::DeserializeOwned>(&mut self, timeout: Duration) -> Result<T> {
        let body = self.expect_frame(kind::JSON, timeout)?;
        self.decode_json(&body)
    }

    /// Decodes the body of a JSON frame received from this peer.
    pub fn decode_json<T: serde::de::DeserializeOwned>(&self, body: &[u8]) -> Result<T> {
        serde_json::from_slice(body).map_err(|e| TransportError::Protocol {
            peer: self.peer.clone(),
            detail: format!(
                "bad control message: {}",
                printable(&e.to_string(), PEER_TEXT)
            ),
        })
    }

    /// Closes both directions so a blocked peer notices at once.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    pub fn try_clone(&self) -> Result<Self> {
        let stream = self
            .stream
            .try_clone()
            .map_err(|e| TransportError::io(format!("clone socket to {}", self.peer), e))?;
        Ok(Self {
            stream,
            peer: self.peer.clone(),
            abort: self.abort.clone(),
            max_frame: self.max_frame,
            seal: self.seal.clone(),
        })
    }
}

/// Connects to `addr`, retrying refused connections until `timeout` (a node may still be starting).
pub(crate) fn connect(addr: &str, timeout: Duration, abort: &AbortFlag) -> Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let start = Instant::now();
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| TransportError::io(format!("resolve {addr}"), e))?
        .collect();
    let first = addrs
        .first()
        .copied()
        .ok_or_else(|| TransportError::Config(format!("{addr} resolves to no address")))?;
    loop {
        match TcpStream::connect_timeout(&first, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if abort.raised() {
                    return Err(TransportError::Aborted {
                        reason: format!("run aborted while connecting to {addr}"),
                    });
                }
                if start.elapsed() >= timeout {
                    return Err(TransportError::io(
                        format!("connect to {addr} (tried for {} ms)", timeout.as_millis()),
                        e,
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_control_characters_and_bounds_length() {
        let evil = "ok\nslug node: forged\r\x1b[2J\x07\u{202e}";
        let shown = printable(evil, 100);
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
        assert!(
            shown.contains("\\n") && shown.contains("\\u{1b}"),
            "{shown}"
        );
        assert!(!shown.contains('\u{202e}'), "bidi override shown raw");
        let long = "a".repeat(10_000);
        assert_eq!(
            printable(&long, 400).chars().count(),
            400 + "...(cut)".len()
        );
    }
}
