//! `LogWriter`: appends events to a `.slog` file; encoding and compression run on a worker thread.
//!
//! The calling thread only copies each event into a fixed-size [`RawRecord`] in a preallocated
//! buffer. A full buffer travels over a bounded channel to the encoder thread, which turns it into
//! a frame, writes it, and hands the emptied buffer back for reuse. A bounded channel means a
//! writer faster than the disk waits instead of growing memory without limit.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use crate::batch::MAX_FRAME_EVENTS;
use crate::error::{Result, SchemaError};
use crate::event::{Event, EventKind, StringId};
use crate::frame::{FILE_HEADER_LEN, FrameEncoder, FrameInfo, LogHeader, footer_bytes};
use crate::raw::RawRecord;

/// Tuning of a [`LogWriter`]. Memory: a fixed pool of three buffers of `events_per_frame`
/// 128-byte records (24 MiB at the default), allocated when the writer is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    /// Events per frame (1..=1048576). Bigger frames compress better; smaller ones seek finer.
    pub events_per_frame: usize,
    /// zstd level, 1..=22.
    pub zstd_level: i32,
}

impl Default for WriterOptions {
    fn default() -> Self {
        // 64 Ki events per frame: zstd then codes whole columns with their own statistics
        // (16 Ki-event frames cost ~10% more bytes per event), and a frame still decodes in ms.
        WriterOptions {
            events_per_frame: 64 * 1024,
            zstd_level: 3,
        }
    }
}

/// What a closed log holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogStats {
    /// Events written.
    pub events: u64,
    /// Events per kind, indexed by `EventKind as usize`.
    pub counts: [u64; EventKind::COUNT],
    /// Frames written (including string-only frames).
    pub frames: u64,
    /// Strings interned.
    pub strings: u64,
    /// File size in bytes, header and footer included.
    pub bytes: u64,
    /// Size of the same events as raw records (`events * RawRecord::SIZE`).
    pub raw_bytes: u64,
}

/// Record buffers per writer: one filling, the others queued, encoding or spare.
const BUFFERS: usize = 3;

fn prefaulted(capacity: usize) -> Vec<RawRecord> {
    let mut v = vec![RawRecord::EMPTY; capacity];
    v.clear();
    v
}

/// Runs on the encoder thread once the events appended before it are in the file.
type WrittenHook = Box<dyn FnOnce() + Send>;

enum Chunk {
    Strings {
        first: u32,
        strings: Vec<String>,
    },
    /// Records to encode as one frame, then the callbacks to run once everything before them
    /// is in the file.
    Events(Vec<RawRecord>, Vec<WrittenHook>),
    /// Write out everything so far, then signal.
    Sync(Sender<()>),
}

/// Appends events to one endpoint log.
pub struct LogWriter {
    path: PathBuf,
    buf: Vec<RawRecord>,
    events_per_frame: usize,
    interned: HashMap<Box<str>, StringId>,
    new_strings: Vec<String>,
    first_new_string: u32,
    to_encoder: Option<Sender<Chunk>>,
    spare: Receiver<Vec<RawRecord>>,
    encoder: Option<JoinHandle<Result<LogStats>>>,
    /// Callbacks waiting for the events buffered now to reach the file.
    hooks: Vec<WrittenHook>,
    /// Events appended so far (buffered ones included).
    appended: u64,
}

impl std::fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter")
            .field("path", &self.path)
            .field("buffered", &self.buf.len())
            .field("appended", &self.appended)
            .field("hooks", &self.hooks.len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Chunk::Strings { first, strings } => write!(f, "Strings({first}, {})", strings.len()),
            Chunk::Events(v, hooks) => write!(f, "Events({}, {} hooks)", v.len(), hooks.len()),
            Chunk::Sync(_) => write!(f, "Sync"),
        }
    }
}

/// Refuses options no reader could read back, before any file is touched.
fn check_options(options: WriterOptions) -> Result<()> {
    if options.events_per_frame == 0 || options.events_per_frame > MAX_FRAME_EVENTS as usize {
        return Err(SchemaError::Options(format!(
            "events_per_frame {} is outside 1..={MAX_FRAME_EVENTS}",
            options.events_per_frame
        )));
    }
    Ok(())
}

impl LogWriter {
    /// Creates (or truncates) the log at `path` with default options and writes its header.
    pub fn create(path: impl AsRef<Path>, header: LogHeader) -> Result<LogWriter> {
        LogWriter::create_with(path, header, WriterOptions::default())
    }

    /// Creates the log at `path` with `options`.
    pub fn create_with(
        path: impl AsRef<Path>,
        header: LogHeader,
        options: WriterOptions,
    ) -> Result<LogWriter> {
        let path = path.as_ref().to_path_buf();
        check_options(options)?;
        let file = File::create(&path).map_err(|e| SchemaError::io(&path, e))?;
        LogWriter::start(path, file, header, options)
    }

    /// Creates a new log at `path` with `options`, failing if anything exists there (a file,
    /// or a symbolic link, which is never followed): for writing into a directory slug does
    /// not trust, such as a trace being recovered.
    pub fn create_new_with(
        path: impl AsRef<Path>,
        header: LogHeader,
        options: WriterOptions,
    ) -> Result<LogWriter> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = path.as_ref().to_path_buf();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| SchemaError::io(&path, e))?;
        LogWriter::start(path, file, header, options)
    }

    fn start(
        path: PathBuf,
        file: File,
        header: LogHeader,
        options: WriterOptions,
    ) -> Result<LogWriter> {
        check_options(options)?;
        let encoder = FrameEncoder::new(options.zstd_level)?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        file.write_all(&header.to_bytes())
            .map_err(|e| SchemaError::io(&path, e))?;
        let (to_encoder, chunks) = crossbeam_channel::bounded::<Chunk>(2);
        // A fixed pool of record buffers, faulted in now so the hot path never touches fresh pages.
        let (give_back, spare) = crossbeam_channel::bounded(BUFFERS);
        for _ in 1..BUFFERS {
            let _ = give_back.send(prefaulted(options.events_per_frame));
        }
        let thread_path = path.clone();
        let encoder = std::thread::Builder::new()
            .name(format!("slog-encoder-{}", header.endpoint))
            .spawn(move || encode_loop(thread_path, file, encoder, chunks, give_back))
            .map_err(|e| SchemaError::io(&path, e))?;
        Ok(LogWriter {
            path,
            buf: prefaulted(options.events_per_frame),
            events_per_frame: options.events_per_frame,
            interned: HashMap::new(),
            new_strings: Vec::new(),
            first_new_string: 0,
            to_encoder: Some(to_encoder),
            spare,
            encoder: Some(encoder),
            hooks: Vec::new(),
            appended: 0,
        })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id of `s` in this log, interning it on first use. Intern names once, outside hot loops.
    pub fn intern(&mut self, s: &str) -> StringId {
        if let Some(&id) = self.interned.get(s) {
            return id;
        }
        let id = self.first_new_string + self.new_strings.len() as u32;
        self.interned.insert(s.into(), id);
        self.new_strings.push(s.to_owned());
        id
    }

    /// Appends one event: one fixed-size copy into the current buffer (the hot path).
    ///
    /// Never fails: if the encoder thread has died, events are dropped and [`LogWriter::close`]
    /// reports the encoder's error.
    #[inline]
    pub fn append(&mut self, event: &Event) {
        self.append_raw(RawRecord::from_event(event));
    }

    /// Appends a record already in raw form (as a flight-recorder ring holds them).
    #[inline]
    pub fn append_raw(&mut self, record: RawRecord) {
        self.buf.push(record);
        self.appended += 1;
        if self.buf.len() >= self.events_per_frame {
            self.ship();
        }
    }

    /// Events appended so far, including those still buffered.
    pub fn appended(&self) -> u64 {
        self.appended
    }

    /// Events appended and not yet handed to the encoder (the frame being filled).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Runs `hook` on the encoder thread once every event appended before this call is written
    /// to the file (handed to the kernel: it survives the process being killed). Hooks run in
    /// the order they were given; if the log cannot be written they never run. This is how a
    /// flight recorder keeps its ring slots until the frame holding their events is on disk.
    pub fn after_written(&mut self, hook: impl FnOnce() + Send + 'static) {
        self.hooks.push(Box::new(hook));
        if self.buf.is_empty() {
            // Everything appended is already on its way to the encoder: the hook follows it
            // rather than waiting for the next frame.
            self.ship();
        }
    }

    /// Ends the current frame early and hands it to the encoder without waiting for it: for a
    /// caller whose buffers (flight rings) fill before a frame does. Smaller frames compress
    /// less well, so this is the exception, not the cadence.
    pub fn cut_frame(&mut self) {
        self.ship();
    }

    /// Hands the buffered events (and any new strings) to the encoder and waits until they are
    /// in the file. Errors surface at [`LogWriter::close`].
    pub fn flush(&mut self) {
        self.ship();
        if let Some(tx) = &self.to_encoder {
            let (done, written) = crossbeam_channel::bounded(1);
            if tx.send(Chunk::Sync(done)).is_ok() {
                let _ = written.recv();
            }
        }
    }

    #[cold]
    fn ship(&mut self) {
        let Some(tx) = &self.to_encoder else { return };
        if !self.new_strings.is_empty() {
            let strings = std::mem::take(&mut self.new_strings);
            let first = self.first_new_string;
            self.first_new_string += strings.len() as u32;
            // A send error means the encoder stopped; close() reports why.
            let _ = tx.send(Chunk::Strings { first, strings });
        }
        if self.buf.is_empty() {
            if !self.hooks.is_empty() {
                let _ = tx.send(Chunk::Events(Vec::new(), std::mem::take(&mut self.hooks)));
            }
            return;
        }
        // Waits while every other buffer is queued or encoding: back-pressure, bounded memory.
        match self.spare.recv() {
            Ok(fresh) => {
                let full = std::mem::replace(&mut self.buf, fresh);
                let _ = tx.send(Chunk::Events(full, std::mem::take(&mut self.hooks)));
            }
            // The encoder stopped and will not return buffers; close() reports why.
            Err(_) => {
                self.buf.clear();
                self.hooks.clear();
            }
        }
    }

    /// Flushes everything, writes the index footer and returns what the log holds.
    pub fn close(mut self) -> Result<LogStats> {
        self.ship();
        self.to_encoder = None;
        let handle = self.encoder.take().ok_or_else(|| SchemaError::Writer {
            path: self.path.clone(),
            reason: "already closed".into(),
        })?;
        handle.join().map_err(|_| SchemaError::Writer {
            path: self.path.clone(),
            reason: "encoder thread panicked".into(),
        })?
    }
}

impl Drop for LogWriter {
    /// A writer dropped without `close` still flushes and writes its footer, ignoring errors.
    fn drop(&mut self) {
        if self.encoder.is_some() {
            self.ship();
            self.to_encoder = None;
            if let Some(handle) = self.encoder.take() {
                let _ = handle.join();
            }
        }
    }
}

fn encode_loop(
    path: PathBuf,
    mut file: BufWriter<File>,
    mut encoder: FrameEncoder,
    chunks: Receiver<Chunk>,
    give_back: Sender<Vec<RawRecord>>,
) -> Result<LogStats> {
    let mut frames: Vec<FrameInfo> = Vec::new();
    let mut offset = FILE_HEADER_LEN as u64;
    let mut stats = LogStats::default();
    let mut out = Vec::new();
    let mut written: Vec<WrittenHook> = Vec::new();
    let io = |e| SchemaError::io(&path, e);
    for chunk in chunks {
        out.clear();
        let mut info = match chunk {
            Chunk::Strings { first, strings } => {
                stats.strings += strings.len() as u64;
                encoder.encode(&[], first, &strings, &mut out)?
            }
            Chunk::Events(records, hooks) if records.is_empty() => {
                file.flush().map_err(io)?;
                hooks.into_iter().for_each(|h| h());
                continue;
            }
            Chunk::Events(mut records, hooks) => {
                let info = encoder.encode(&records, 0, &[], &mut out)?;
                records.clear();
                let _ = give_back.try_send(records);
                written = hooks;
                info
            }
            Chunk::Sync(done) => {
                file.flush().map_err(io)?;
                let _ = done.send(());
                continue;
            }
        };
        info.offset = offset;
        file.write_all(&out).map_err(io)?;
        offset += out.len() as u64;
        if !written.is_empty() {
            // The frame must be in the file, not in this process's buffer, before the hooks
            // let go of anything that still holds its events.
            file.flush().map_err(io)?;
            written.drain(..).for_each(|h| h());
        }
        stats.events += u64::from(info.events);
        for (total, &c) in stats.counts.iter_mut().zip(&info.counts) {
            *total += u64::from(c);
        }
        frames.push(info);
    }
    let footer = footer_bytes(&frames, offset);
    file.write_all(&footer).map_err(io)?;
    file.flush().map_err(io)?;
    stats.frames = frames.len() as u64;
    stats.bytes = offset + footer.len() as u64;
    stats.raw_bytes = stats.events * RawRecord::SIZE as u64;
    Ok(stats)
}
