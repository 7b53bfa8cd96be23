//! Byte layouts of the `.slog` container: file header, frames, index footer; and `FrameEncoder`.
//!
//! All integers are little-endian. Layouts are documented field by field in docs/FORMAT.md;
//! the constants here are the single source of the offsets.

use xxhash_rust::xxh3::xxh3_64;

use crate::batch::{Columns, MAX_FRAME_EVENTS};
use crate::error::{Result, SchemaError};
use crate::event::{Event, EventKind};
use crate::raw::RawRecord;

/// Magic at byte 0 of every log.
pub const LOG_MAGIC: [u8; 8] = *b"SLUGLOG\0";
/// Newest log format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 4;
/// Bytes in the file header.
pub const FILE_HEADER_LEN: usize = 64;
/// Magic at byte 0 of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"SLFR";
/// Bytes in a frame header (the payload follows).
pub const FRAME_HEADER_LEN: usize = 120;
/// Per-kind count slots in frame headers and index entries (kinds beyond `EventKind::COUNT` are 0).
pub const KIND_SLOTS: usize = 16;
/// Magic at the start of the index footer.
pub const FOOTER_MAGIC: [u8; 8] = *b"SLUGIDX\0";
/// Bytes in one index footer entry.
pub const INDEX_ENTRY_LEN: usize = 104;
/// Bytes in the trailer that ends a cleanly closed log.
pub const TRAILER_LEN: usize = 32;
/// Magic at the end of the trailer.
pub const TRAILER_MAGIC: [u8; 8] = *b"SLUGEND\0";
/// Largest compressed payload a reader accepts.
pub const MAX_PAYLOAD_LEN: u32 = 64 << 20;
/// Largest decompressed payload a reader accepts (bounds zstd bombs).
pub const MAX_RAW_LEN: u32 = 64 << 20;

/// Payload codec byte.
pub(crate) const CODEC_ZSTD: u8 = 1;
/// Payload codec byte: stored uncompressed.
pub(crate) const CODEC_NONE: u8 = 0;

/// Which clock an endpoint's timestamps come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Clock {
    /// CLOCK_MONOTONIC of the endpoint's node (the manifest holds each node's offset).
    Monotonic = 0,
    /// CLOCK_MONOTONIC_RAW.
    MonotonicRaw = 1,
    /// CLOCK_REALTIME.
    Realtime = 2,
    /// A generated clock (synthetic traces, tests).
    Synthetic = 3,
}

impl Clock {
    fn from_u8(v: u8) -> Option<Clock> {
        [
            Clock::Monotonic,
            Clock::MonotonicRaw,
            Clock::Realtime,
            Clock::Synthetic,
        ]
        .get(usize::from(v))
        .copied()
    }

    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Clock::Monotonic => "monotonic",
            Clock::MonotonicRaw => "monotonic_raw",
            Clock::Realtime => "realtime",
            Clock::Synthetic => "synthetic",
        }
    }
}

/// The file header of a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogHeader {
    /// Endpoint this log belongs to.
    pub endpoint: u32,
    /// Clock of every timestamp in the log.
    pub clock: Clock,
    /// Wall-clock time the log was created (Unix ns).
    pub created_unix_ns: u64,
    /// Reading of `clock` at the same moment, to place the log's times on the wall clock.
    pub clock_at_create_ns: u64,
}

impl LogHeader {
    /// A header for `endpoint` on `clock`, stamped with the current wall-clock time.
    pub fn new(endpoint: u32, clock: Clock, clock_at_create_ns: u64) -> LogHeader {
        let created_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        LogHeader {
            endpoint,
            clock,
            created_unix_ns,
            clock_at_create_ns,
        }
    }

    pub(crate) fn to_bytes(self) -> [u8; FILE_HEADER_LEN] {
        let mut b = [0u8; FILE_HEADER_LEN];
        b[0..8].copy_from_slice(&LOG_MAGIC);
        b[8..10].copy_from_slice(&(FORMAT_VERSION as u16).to_le_bytes());
        b[10..12].copy_from_slice(&(FILE_HEADER_LEN as u16).to_le_bytes());
        b[12..16].copy_from_slice(&self.endpoint.to_le_bytes());
        b[16] = self.clock as u8;
        b[24..32].copy_from_slice(&self.created_unix_ns.to_le_bytes());
        b[32..40].copy_from_slice(&self.clock_at_create_ns.to_le_bytes());
        let sum = xxh3_64(&b[..56]);
        b[56..64].copy_from_slice(&sum.to_le_bytes());
        b
    }

    pub(crate) fn parse(bytes: &[u8], path: &std::path::Path) -> Result<LogHeader> {
        let bad = |problem| SchemaError::BadHeader {
            path: path.to_path_buf(),
            problem,
        };
        if bytes.len() < LOG_MAGIC.len() || bytes[..8] != LOG_MAGIC {
            return Err(if bytes.len() < 8 && LOG_MAGIC.starts_with(bytes) {
                bad("truncated")
            } else {
                SchemaError::NotALog {
                    path: path.to_path_buf(),
                }
            });
        }
        if bytes.len() < 10 {
            return Err(bad("truncated"));
        }
        let version = u32::from(u16_at(bytes, 8));
        if version > FORMAT_VERSION {
            return Err(SchemaError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if bytes.len() < FILE_HEADER_LEN {
            return Err(bad("truncated"));
        }
        if version == 0
            || usize::from(u16_at(bytes, 10)) != FILE_HEADER_LEN
            || u64_at(bytes, 56) != xxh3_64(&bytes[..56])
        {
            return Err(bad("corrupt"));
        }
        Ok(LogHeader {
            endpoint: u32_at(bytes, 12),
            clock: Clock::from_u8(bytes[16]).ok_or_else(|| bad("corrupt"))?,
            created_unix_ns: u64_at(bytes, 24),
            clock_at_create_ns: u64_at(bytes, 32),
        })
    }
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// What the index knows about one frame, without decompressing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    /// Byte offset of the frame header in the file.
    pub offset: u64,
    /// Compressed payload bytes (the frame occupies `FRAME_HEADER_LEN + payload_len` bytes).
    pub payload_len: u32,
    /// Decompressed payload bytes.
    pub raw_len: u32,
    /// Events in the frame.
    pub events: u32,
    /// Strings the frame defines.
    pub strings: u32,
    /// Earliest primary timestamp of an event in the frame (0 when it has none).
    pub t_min: u64,
    /// Latest end timestamp of an event in the frame (0 when it has none).
    pub t_max: u64,
    /// Events per kind, indexed by `EventKind as usize`.
    pub counts: [u32; KIND_SLOTS],
}

impl FrameInfo {
    /// Moves the `ebpf` count of a version 1-2 frame to `perf_software`: before version 3 no
    /// eBPF probe existed and that kind held perf software records (see `batch::decode`).
    pub(crate) fn count_ebpf_as_perf_software(&mut self) {
        let ebpf = std::mem::take(&mut self.counts[EventKind::Ebpf as usize]);
        self.counts[EventKind::PerfSoftware as usize] += ebpf;
    }

    /// Events of `kind` in the frame.
    pub fn count(&self, kind: EventKind) -> u32 {
        self.counts[kind as usize]
    }

    /// Total bytes the frame occupies in the file.
    pub fn len(&self) -> u64 {
        FRAME_HEADER_LEN as u64 + u64::from(self.payload_len)
    }

    /// Whether the frame holds no events (it only defines strings).
    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// Index entry bytes (see docs/FORMAT.md).
    pub(crate) fn entry_bytes(&self) -> [u8; INDEX_ENTRY_LEN] {
        let mut b = [0u8; INDEX_ENTRY_LEN];
        b[0..8].copy_from_slice(&self.offset.to_le_bytes());
        self.write_common(&mut b[8..]);
        b
    }

    /// The 96 bytes shared by frame headers (at 8) and index entries (at 8).
    fn write_common(&self, b: &mut [u8]) {
        b[0..4].copy_from_slice(&self.payload_len.to_le_bytes());
        b[4..8].copy_from_slice(&self.raw_len.to_le_bytes());
        b[8..12].copy_from_slice(&self.events.to_le_bytes());
        b[12..16].copy_from_slice(&self.strings.to_le_bytes());
        b[16..24].copy_from_slice(&self.t_min.to_le_bytes());
        b[24..32].copy_from_slice(&self.t_max.to_le_bytes());
        for (i, c) in self.counts.iter().enumerate() {
            b[32 + i * 4..36 + i * 4].copy_from_slice(&c.to_le_bytes());
        }
    }

    fn read_common(offset: u64, b: &[u8]) -> FrameInfo {
        let mut counts = [0u32; KIND_SLOTS];
        for (i, c) in counts.iter_mut().enumerate() {
            *c = u32_at(b, 32 + i * 4);
        }
        FrameInfo {
            offset,
            payload_len: u32_at(b, 0),
            raw_len: u32_at(b, 4),
            events: u32_at(b, 8),
            strings: u32_at(b, 12),
            t_min: u64_at(b, 16),
            t_max: u64_at(b, 24),
            counts,
        }
    }

    pub(crate) fn from_entry(b: &[u8]) -> FrameInfo {
        FrameInfo::read_common(u64_at(b, 0), &b[8..])
    }

    /// Whether the fields are ones a writer could have produced (limits, counts add up).
    pub(crate) fn is_plausible(&self) -> bool {
        let sum: u64 = self.counts.iter().map(|&c| u64::from(c)).sum();
        self.payload_len <= MAX_PAYLOAD_LEN
            && self.raw_len <= MAX_RAW_LEN
            && self.events <= MAX_FRAME_EVENTS
            && sum == u64::from(self.events)
            && self.counts[EventKind::COUNT..].iter().all(|&c| c == 0)
            && (self.events == 0 || self.t_min <= self.t_max)
    }
}

/// Frame header layout:
/// `magic[4] codec u8 flags u8 header_len u16 | common 96 bytes | payload_xxh3 u64 | header_xxh3 u64`.
pub(crate) fn frame_header(info: &FrameInfo, codec: u8, payload: &[u8]) -> [u8; FRAME_HEADER_LEN] {
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[0..4].copy_from_slice(&FRAME_MAGIC);
    h[4] = codec;
    h[6..8].copy_from_slice(&(FRAME_HEADER_LEN as u16).to_le_bytes());
    info.write_common(&mut h[8..104]);
    h[104..112].copy_from_slice(&xxh3_64(payload).to_le_bytes());
    let sum = xxh3_64(&h[..112]);
    h[112..120].copy_from_slice(&sum.to_le_bytes());
    h
}

/// A frame header that passed its own checksum.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ParsedHeader {
    pub(crate) info: FrameInfo,
    pub(crate) codec: u8,
    pub(crate) payload_sum: u64,
}

/// Parses the frame header at `offset` of `file`; `None` unless magic, checksum and limits hold.
/// Only the header is checked: the payload may still be missing (truncation) or corrupt.
pub(crate) fn parse_frame_header(file: &[u8], offset: usize) -> Option<ParsedHeader> {
    let h = file.get(offset..offset.checked_add(FRAME_HEADER_LEN)?)?;
    if h[0..4] != FRAME_MAGIC || u64_at(h, 112) != xxh3_64(&h[..112]) {
        return None;
    }
    let codec = h[4];
    if (codec != CODEC_ZSTD && codec != CODEC_NONE)
        || h[5] != 0
        || usize::from(u16_at(h, 6)) != FRAME_HEADER_LEN
    {
        return None;
    }
    let info = FrameInfo::read_common(offset as u64, &h[8..104]);
    info.is_plausible().then_some(ParsedHeader {
        info,
        codec,
        payload_sum: u64_at(h, 104),
    })
}

/// Builds the index footer and trailer for `frames`, footer starting at `footer_offset`.
pub(crate) fn footer_bytes(frames: &[FrameInfo], footer_offset: u64) -> Vec<u8> {
    let mut f = Vec::with_capacity(16 + frames.len() * INDEX_ENTRY_LEN + TRAILER_LEN);
    f.extend_from_slice(&FOOTER_MAGIC);
    f.extend_from_slice(&(frames.len() as u64).to_le_bytes());
    for info in frames {
        f.extend_from_slice(&info.entry_bytes());
    }
    let footer_len = f.len() as u64;
    let sum = xxh3_64(&f);
    f.extend_from_slice(&footer_offset.to_le_bytes());
    f.extend_from_slice(&footer_len.to_le_bytes());
    f.extend_from_slice(&sum.to_le_bytes());
    f.extend_from_slice(&TRAILER_MAGIC);
    f
}

/// Turns runs of [`RawRecord`]s into complete frames (header + zstd-compressed columnar batch).
///
/// The log writer runs one on its background thread; the recorder's flight-recorder rings can
/// feed one directly. It keeps its column buffers and zstd context between frames.
pub struct FrameEncoder {
    columns: Columns,
    events: Vec<Event>,
    batch: Vec<u8>,
    compressor: zstd::bulk::Compressor<'static>,
}

impl std::fmt::Debug for FrameEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameEncoder").finish_non_exhaustive()
    }
}

impl FrameEncoder {
    /// An encoder compressing at zstd `level` (1..=22; 3 is the writer's default).
    pub fn new(level: i32) -> Result<FrameEncoder> {
        if !(1..=22).contains(&level) {
            return Err(SchemaError::Options(format!(
                "zstd level {level} is outside 1..=22"
            )));
        }
        let compressor = zstd::bulk::Compressor::new(level)
            .map_err(|e| SchemaError::Options(format!("zstd level {level}: {e}")))?;
        Ok(FrameEncoder {
            columns: Columns::default(),
            events: Vec::new(),
            batch: Vec::new(),
            compressor,
        })
    }

    /// Encodes `records` (and the strings `first_string..` they introduce) into one frame,
    /// appended to `out`. Returns the frame's index info with `offset` 0: the caller places it.
    pub fn encode(
        &mut self,
        records: &[RawRecord],
        first_string: u32,
        strings: &[String],
        out: &mut Vec<u8>,
    ) -> Result<FrameInfo> {
        if records.len() > MAX_FRAME_EVENTS as usize {
            return Err(SchemaError::Options(format!(
                "{} records in one frame; the limit is {MAX_FRAME_EVENTS}",
                records.len()
            )));
        }
        let mut counts = [0u32; KIND_SLOTS];
        let (mut t_min, mut t_max) = (u64::MAX, 0u64);
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        for (index, r) in records.iter().enumerate() {
            let e = r.to_event().ok_or(SchemaError::InvalidRecord {
                index,
                kind: r.kind_byte(),
            })?;
            counts[e.kind() as usize] += 1;
            t_min = t_min.min(e.ns());
            t_max = t_max.max(e.end_ns()).max(e.ns());
            events.push(e);
        }
        if records.is_empty() {
            t_min = 0;
        }
        let info = self.encode_events(
            events.iter().copied(),
            counts,
            (t_min, t_max),
            first_string,
            strings,
            out,
        );
        self.events = events;
        info
    }

    fn encode_events(
        &mut self,
        events: impl Iterator<Item = Event>,
        counts: [u32; KIND_SLOTS],
        (t_min, t_max): (u64, u64),
        first_string: u32,
        strings: &[String],
        out: &mut Vec<u8>,
    ) -> Result<FrameInfo> {
        let count = self
            .columns
            .encode(events, first_string, strings, &mut self.batch);
        let raw_len = u32::try_from(self.batch.len())
            .ok()
            .filter(|&n| n <= MAX_RAW_LEN)
            .ok_or_else(|| {
                SchemaError::Options(format!(
                    "batch of {} bytes exceeds {MAX_RAW_LEN}",
                    self.batch.len()
                ))
            })?;
        let compressed = self
            .compressor
            .compress(&self.batch)
            .map_err(|e| SchemaError::Options(format!("zstd compression failed: {e}")))?;
        let info = FrameInfo {
            offset: 0,
            payload_len: compressed.len() as u32,
            raw_len,
            events: count,
            strings: strings.len() as u32,
            t_min,
            t_max,
            counts,
        };
        out.extend_from_slice(&frame_header(&info, CODEC_ZSTD, &compressed));
        out.extend_from_slice(&compressed);
        Ok(info)
    }
}
