//! `LogReader`: memory-maps a `.slog`, builds its frame index, recovers damaged logs, decodes lazily.
//!
//! The footer is a shortcut, never the truth: every frame it names is checked against its own
//! header and payload checksum, and a log without a usable footer (writer killed, torn tail) is
//! scanned frame by frame up to its last whole frame. Damage is counted in [`Recovery`], never
//! silently dropped, and no length read from the file is trusted before it is bounds-checked.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use xxhash_rust::xxh3::xxh3_64;

use crate::batch::{self, BatchError};
use crate::error::{Result, SchemaError};
use crate::event::{Event, EventKind, KindSet, StringId};
use crate::frame::{
    CODEC_NONE, FILE_HEADER_LEN, FOOTER_MAGIC, FRAME_HEADER_LEN, FRAME_MAGIC, FrameInfo,
    INDEX_ENTRY_LEN, LogHeader, TRAILER_LEN, TRAILER_MAGIC, parse_frame_header, u64_at,
};
use crate::time::TimeRange;

/// State of a log's index footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FooterState {
    /// Present and consistent with the frames; the index came from it.
    Valid,
    /// Absent (the writer did not close the log); the index came from a scan.
    Missing,
    /// Present but damaged or inconsistent; the index came from a scan.
    Corrupt,
}

/// What was lost or skipped while opening a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Recovery {
    /// How the index was obtained.
    pub footer: FooterState,
    /// Whole, verified frames in the index.
    pub frames: u64,
    /// Frames (or unparseable regions between frames) skipped for bad checksums or layout.
    pub corrupt_frames: u64,
    /// Bytes in those skipped regions.
    pub corrupt_bytes: u64,
    /// Bytes after the last whole frame that were cut short (a killed writer's partial frame).
    pub truncated_bytes: u64,
    /// Partial frames at the end (0 or 1).
    pub partial_frames: u64,
    /// Events the partial frame's header says it held (0 when not even its header survived).
    pub events_in_partial_frame: u64,
}

impl Recovery {
    /// Whether anything was lost or skipped.
    pub fn is_clean(&self) -> bool {
        self.corrupt_frames == 0 && self.truncated_bytes == 0 && self.footer == FooterState::Valid
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedFrame {
    /// Its index entry.
    pub info: FrameInfo,
    /// Its events, in append order.
    pub events: Vec<Event>,
}

/// A read-only view of one endpoint log.
#[derive(Debug)]
pub struct LogReader {
    path: PathBuf,
    map: Mmap,
    header: LogHeader,
    index: Vec<FrameInfo>,
    recovery: Recovery,
    strings: HashMap<StringId, Box<str>>,
}

impl LogReader {
    /// Opens and indexes the log at `path`, recovering what a damaged log still holds.
    pub fn open(path: impl AsRef<Path>) -> Result<LogReader> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| SchemaError::io(&path, e))?;
        LogReader::from_file(path, &file)
    }

    /// [`LogReader::open`] on a file already opened (as `path`); it must be a regular file.
    pub fn from_file(path: PathBuf, file: &File) -> Result<LogReader> {
        let meta = file.metadata().map_err(|e| SchemaError::io(&path, e))?;
        if !meta.is_file() {
            return Err(SchemaError::NotALog { path });
        }
        let len = meta.len();
        if len < FILE_HEADER_LEN as u64 {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(
                &mut std::io::Read::take(file, FILE_HEADER_LEN as u64),
                &mut bytes,
            )
            .map_err(|e| SchemaError::io(&path, e))?;
            LogHeader::parse(&bytes, &path)?;
        }
        // SAFETY: the map is read-only and every access is bounds-checked against its length.
        // A log is only appended to while mapped (a live writer), which leaves mapped bytes intact;
        // truncating a log that another process is reading is outside what slug supports.
        let map = unsafe { Mmap::map(file) }.map_err(|e| SchemaError::io(&path, e))?;
        let header = LogHeader::parse(&map, &path)?;
        let (mut index, recovery) = match read_footer(&map) {
            Some(Ok(entries)) => from_footer(&map, &entries),
            Some(Err(())) => scan(&map, FooterState::Corrupt),
            None => scan(&map, FooterState::Missing),
        };
        if crate::frame::u16_at(&map, 8) < 3 {
            index
                .iter_mut()
                .for_each(FrameInfo::count_ebpf_as_perf_software);
        }
        let mut reader = LogReader {
            path,
            map,
            header,
            index,
            recovery,
            strings: HashMap::new(),
        };
        reader.load_strings();
        Ok(reader)
    }

    /// Decodes the string-defining frames; one that fails to decode is dropped and counted.
    fn load_strings(&mut self) {
        let mut bad = Vec::new();
        for (i, info) in self.index.iter().enumerate() {
            if info.strings == 0 {
                continue;
            }
            match self.decode(info, |_| false) {
                Ok(b) => {
                    for (n, s) in b.strings.into_iter().enumerate() {
                        if let Some(id) = b.first_string.checked_add(n as u32) {
                            self.strings.insert(id, s.into_boxed_str());
                        }
                    }
                }
                Err(_) => bad.push(i),
            }
        }
        for &i in bad.iter().rev() {
            let info = self.index.remove(i);
            self.recovery.frames -= 1;
            self.recovery.corrupt_frames += 1;
            self.recovery.corrupt_bytes += info.len();
        }
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file header.
    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// Every readable frame, in file order, as known without decompressing any event data.
    pub fn index(&self) -> &[FrameInfo] {
        &self.index
    }

    /// What was lost or skipped while opening.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// File size in bytes.
    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }

    /// The interned string `id`, or `None` if its defining frame was lost.
    pub fn string(&self, id: StringId) -> Option<&str> {
        self.strings.get(&id).map(|s| &**s)
    }

    /// Every string the log defines (that survived), as (id, text), in id order.
    pub fn strings(&self) -> Vec<(StringId, &str)> {
        let mut all: Vec<(StringId, &str)> =
            self.strings.iter().map(|(&id, s)| (id, &**s)).collect();
        all.sort_unstable_by_key(|(id, _)| *id);
        all
    }

    /// Number of strings the log defines (that survived).
    pub fn string_count(&self) -> usize {
        self.strings.len()
    }

    /// Events per kind over the whole index, indexed by `EventKind as usize`.
    pub fn counts(&self) -> [u64; EventKind::COUNT] {
        let mut counts = [0u64; EventKind::COUNT];
        for info in &self.index {
            for (total, &c) in counts.iter_mut().zip(&info.counts) {
                *total += u64::from(c);
            }
        }
        counts
    }

    /// From the earliest event's start to the latest event's end, or `None` for a log without
    /// events.
    pub fn time_span(&self) -> Option<TimeRange> {
        self.index
            .iter()
            .filter(|f| !f.is_empty())
            .map(|f| TimeRange::new(f.t_min, f.t_max))
            .reduce(TimeRange::hull)
    }

    /// Decodes one frame of the index.
    pub fn decode_frame(&self, info: &FrameInfo) -> Result<DecodedFrame> {
        let events = self.decode(info, |_| true)?.events;
        Ok(DecodedFrame {
            info: *info,
            events,
        })
    }

    /// Every frame, decoded lazily one at a time, in file order (string-only frames skipped).
    pub fn frames(&self) -> impl Iterator<Item = Result<DecodedFrame>> + '_ {
        self.index
            .iter()
            .filter(|f| !f.is_empty())
            .map(|f| self.decode_frame(f))
    }

    /// Events of `kinds` overlapping `range`, decoding only frames whose index entry can match.
    /// A frame that fails to decode yields one `Err` and the iteration goes on.
    pub fn events_in(&self, range: TimeRange, kinds: KindSet) -> EventsIn<'_> {
        EventsIn {
            reader: self,
            range,
            kinds,
            next_frame: 0,
            current: Vec::new().into_iter(),
        }
    }

    fn decode(
        &self,
        info: &FrameInfo,
        want: impl Fn(EventKind) -> bool,
    ) -> Result<batch::DecodedBatch> {
        let corrupt = |reason: String| SchemaError::CorruptFrame {
            path: self.path.clone(),
            offset: info.offset,
            reason,
        };
        let h = parse_frame_header(&self.map, info.offset as usize)
            .filter(|h| {
                let mut i = h.info;
                if crate::frame::u16_at(&self.map, 8) < 3 {
                    i.count_ebpf_as_perf_software();
                }
                i == *info
            })
            .ok_or_else(|| corrupt("frame header does not match the index".into()))?;
        let start = info.offset as usize + FRAME_HEADER_LEN;
        let payload = self
            .map
            .get(start..start + info.payload_len as usize)
            .ok_or_else(|| corrupt("payload runs past the end of the file".into()))?;
        let raw;
        let bytes = if h.codec == CODEC_NONE {
            payload
        } else {
            // Capacity is the declared (already capped) size, so a zstd bomb stops there.
            raw = zstd::bulk::decompress(payload, info.raw_len as usize)
                .map_err(|e| corrupt(format!("zstd: {e}")))?;
            &raw[..]
        };
        if bytes.len() != info.raw_len as usize {
            return Err(corrupt(format!(
                "payload is {} bytes, header says {}",
                bytes.len(),
                info.raw_len
            )));
        }
        // The file header was validated at open: its version picks the batch predictors.
        let version = u32::from(crate::frame::u16_at(&self.map, 8));
        let decoded = batch::decode(bytes, want, version).map_err(|e| match e {
            BatchError::Capnp(e) => corrupt(format!("capnp: {e}")),
            BatchError::Columns(col) => corrupt(format!("column {col} is inconsistent")),
        })?;
        if decoded.strings.len() != info.strings as usize {
            return Err(corrupt("string count does not match the header".into()));
        }
        Ok(decoded)
    }
}

/// Iterator of [`LogReader::events_in`].
#[derive(Debug)]
pub struct EventsIn<'a> {
    reader: &'a LogReader,
    range: TimeRange,
    kinds: KindSet,
    next_frame: usize,
    current: std::vec::IntoIter<Event>,
}

impl Iterator for EventsIn<'_> {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Result<Event>> {
        loop {
            if let Some(e) = self.current.next() {
                return Some(Ok(e));
            }
            let info = self.reader.index.get(self.next_frame)?;
            self.next_frame += 1;
            let has_kind = EventKind::ALL
                .iter()
                .any(|&k| self.kinds.contains(k) && info.count(k) > 0);
            if info.is_empty() || !has_kind || !self.range.touches(info.t_min, info.t_max) {
                continue;
            }
            let (kinds, range) = (self.kinds, self.range);
            match self.reader.decode(info, |k| kinds.contains(k)) {
                Ok(b) => {
                    let mut events = b.events;
                    events.retain(|e| range.touches(e.ns(), e.end_ns().max(e.ns())));
                    self.current = events.into_iter();
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// The footer's entries: `None` when there is no trailer, `Err` when it is damaged.
fn read_footer(map: &[u8]) -> Option<Result<Vec<FrameInfo>, ()>> {
    let len = map.len();
    if len < FILE_HEADER_LEN + TRAILER_LEN || map[len - 8..] != TRAILER_MAGIC {
        return None;
    }
    let t = &map[len - TRAILER_LEN..];
    let (offset, footer_len, sum) = (u64_at(t, 0), u64_at(t, 8), u64_at(t, 16));
    let end = (len - TRAILER_LEN) as u64;
    let valid = offset >= FILE_HEADER_LEN as u64
        && offset.checked_add(footer_len) == Some(end)
        && footer_len >= 16;
    if !valid {
        return Some(Err(()));
    }
    let f = &map[offset as usize..end as usize];
    let n = u64_at(f, 8);
    if f[..8] != FOOTER_MAGIC
        || xxh3_64(f) != sum
        || n.checked_mul(INDEX_ENTRY_LEN as u64)
            .and_then(|b| b.checked_add(16))
            != Some(footer_len)
    {
        return Some(Err(()));
    }
    let entries: Vec<FrameInfo> = f[16..]
        .chunks_exact(INDEX_ENTRY_LEN)
        .map(FrameInfo::from_entry)
        .collect();
    // Frames must tile the file exactly from the header to the footer.
    let mut at = FILE_HEADER_LEN as u64;
    for e in &entries {
        if e.offset != at || !e.is_plausible() {
            return Some(Err(()));
        }
        at += e.len();
    }
    if at != offset {
        return Some(Err(()));
    }
    Some(Ok(entries))
}

fn payload_ok(map: &[u8], info: &FrameInfo, sum: u64) -> bool {
    let start = info.offset as usize + FRAME_HEADER_LEN;
    map.get(start..start + info.payload_len as usize)
        .is_some_and(|p| xxh3_64(p) == sum)
}

fn empty_recovery(footer: FooterState) -> Recovery {
    Recovery {
        footer,
        frames: 0,
        corrupt_frames: 0,
        corrupt_bytes: 0,
        truncated_bytes: 0,
        partial_frames: 0,
        events_in_partial_frame: 0,
    }
}

/// Index from a footer that passed its own checks; each frame is still verified.
fn from_footer(map: &[u8], entries: &[FrameInfo]) -> (Vec<FrameInfo>, Recovery) {
    let mut rec = empty_recovery(FooterState::Valid);
    let mut index = Vec::with_capacity(entries.len());
    for e in entries {
        match parse_frame_header(map, e.offset as usize) {
            Some(h) if h.info == *e && payload_ok(map, e, h.payload_sum) => index.push(*e),
            _ => {
                rec.corrupt_frames += 1;
                rec.corrupt_bytes += e.len();
            }
        }
    }
    rec.frames = index.len() as u64;
    (index, rec)
}

/// Offset of the next parseable frame header at or after `from`.
fn next_header(map: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while at + FRAME_HEADER_LEN <= map.len() {
        let rel = map[at..]
            .windows(FRAME_MAGIC.len())
            .position(|w| w == FRAME_MAGIC)?;
        at += rel;
        if parse_frame_header(map, at).is_some() {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// Index by walking frames from the header; resynchronises on the next valid frame header.
fn scan(map: &[u8], footer: FooterState) -> (Vec<FrameInfo>, Recovery) {
    let mut rec = empty_recovery(footer);
    let mut index = Vec::new();
    let end = map.len();
    let mut pos = FILE_HEADER_LEN;
    while pos < end {
        if let Some(h) = parse_frame_header(map, pos) {
            let frame_end = pos + h.info.len() as usize;
            if frame_end > end {
                rec.partial_frames = 1;
                rec.events_in_partial_frame = u64::from(h.info.events);
                rec.truncated_bytes = (end - pos) as u64;
                break;
            }
            if payload_ok(map, &h.info, h.payload_sum) {
                index.push(h.info);
            } else {
                rec.corrupt_frames += 1;
                rec.corrupt_bytes += (frame_end - pos) as u64;
            }
            pos = frame_end;
            continue;
        }
        if let Some(next) = next_header(map, pos + 1) {
            rec.corrupt_frames += 1;
            rec.corrupt_bytes += (next - pos) as u64;
            pos = next;
            continue;
        }
        let tail = &map[pos..];
        let is_prefix_of = |magic: &[u8]| {
            let n = tail.len().min(magic.len());
            tail[..n] == magic[..n]
        };
        // Both magics start with "SL": a tail of one or two bytes counts as a torn footer.
        if is_prefix_of(&FOOTER_MAGIC) {
            // A footer that was cut short or damaged: the index is rebuilt, no event is lost.
            if footer == FooterState::Missing {
                rec.truncated_bytes = tail.len() as u64;
            }
        } else if is_prefix_of(&FRAME_MAGIC) && tail.len() < FRAME_HEADER_LEN {
            // A frame header cut short: a writer killed mid-frame.
            rec.partial_frames = 1;
            rec.truncated_bytes = tail.len() as u64;
        } else {
            rec.corrupt_frames += 1;
            rec.corrupt_bytes += tail.len() as u64;
        }
        break;
    }
    rec.frames = index.len() as u64;
    (index, rec)
}
