//! `RawRecord`: the fixed-size, copyable form of an event that the hot path appends.
//!
//! Appending an event must cost one small copy, so every kind packs into the same 128-byte
//! record (a kind byte, a flags byte and fifteen 64-bit words). Flight-recorder rings can hold
//! these records as plain bytes ([`RawRecord::to_bytes`] / [`RawRecord::from_bytes`]); the
//! [`crate::FrameEncoder`] turns a run of them into a compressed columnar frame.

use crate::event::{
    Counter, Direction, EbpfKind, Event, EventKind, KernelSpan, LostEvents, Marker, MigrationEvent,
    MoveRole, PerfSample, PerfSampleKind, PtChunk, SnapshotEvent, SoftwareKind, StepBoundary,
    SystemRecord, Transfer, Transport,
};

/// Words of payload in a record.
const WORDS: usize = 15;

/// Flag bit: a kernel span's output hash / a transfer's payload is present.
const FLAG_OPTION: u8 = 1;

/// One event as a fixed-size 128-byte record: plain old data (no padding, any bit pattern is a
/// record), so it converts to and from bytes as one copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(8))]
pub struct RawRecord {
    kind: u8,
    flags: u8,
    small: [u8; 6],
    words: [u64; WORDS],
}

const _: () = assert!(std::mem::size_of::<RawRecord>() == RawRecord::SIZE);

fn pack(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | u64::from(hi) << 32
}

fn lo32(word: u64) -> u32 {
    word as u32
}

fn hi32(word: u64) -> u32 {
    (word >> 32) as u32
}

fn lo_hi(value: u128) -> (u64, u64) {
    (value as u64, (value >> 64) as u64)
}

fn join(lo: u64, hi: u64) -> u128 {
    u128::from(lo) | u128::from(hi) << 64
}

impl RawRecord {
    /// Size of a record in bytes.
    pub const SIZE: usize = 128;

    /// An all-zero record (a zero-filled kernel span), to fill buffers with.
    pub(crate) const EMPTY: RawRecord = RawRecord {
        kind: 0,
        flags: 0,
        small: [0; 6],
        words: [0; WORDS],
    };

    /// The event kind byte as stored (valid kinds are `0..EventKind::COUNT`).
    pub fn kind_byte(&self) -> u8 {
        self.kind
    }

    /// The record's bytes (native endianness: records never leave the machine that made them).
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        bytemuck::cast(*self)
    }

    /// A record from bytes made by [`RawRecord::to_bytes`]; [`RawRecord::to_event`] validates it.
    pub fn from_bytes(bytes: &[u8; Self::SIZE]) -> RawRecord {
        // The byte array has no alignment promise; an unaligned read copies it out.
        bytemuck::pod_read_unaligned(bytes)
    }

    /// Packs an event. Inlined: this is the hot path's only work besides the buffer push.
    #[inline]
    pub fn from_event(event: &Event) -> RawRecord {
        let mut r = RawRecord {
            kind: event.kind() as u8,
            flags: 0,
            small: [0; 6],
            words: [0; WORDS],
        };
        let w = &mut r.words;
        match *event {
            Event::KernelSpan(e) => {
                w[0] = pack(e.kernel, crate::event::layer_wire::encode(e.layer));
                w[1] = e.step;
                // The high half of w[2] and the low half of w[3] are the first row and the
                // thread, which the log keeps as zero columns (see `KernelSpan`).
                w[2] = u64::from(e.seq);
                w[3] = pack(0, e.rows);
                w[4] = e.start_ns;
                w[5] = e.end_ns;
                if let Some(h) = e.output_hash {
                    r.flags = FLAG_OPTION;
                    (w[6], w[7]) = lo_hi(h);
                }
            }
            Event::Transfer(e) => {
                w[0] = e.id;
                w[1] = pack(e.src_endpoint, e.dst_endpoint);
                w[2] = pack(e.src_arena, e.dst_arena);
                w[3] = e.src_offset;
                w[4] = e.dst_offset;
                w[5] = e.len;
                (w[6], w[7]) = lo_hi(e.hash);
                w[8] = e.post_ns;
                w[9] = e.complete_ns;
                r.small[0] = e.transport as u8;
                r.small[1] = e.direction as u8;
                if let Some(p) = e.payload {
                    r.flags = FLAG_OPTION;
                    (w[10], w[11]) = lo_hi(p);
                }
            }
            Event::StepBoundary(e) => {
                w[0] = e.step;
                w[1] = u64::from(e.seq);
                w[2] = e.ns;
            }
            Event::Snapshot(e) => {
                w[0] = u64::from(e.stage);
                w[1] = e.step;
                (w[2], w[3]) = lo_hi(e.id);
                w[4] = e.bytes;
                w[5] = e.new_bytes;
                w[6] = u64::from(e.chunks);
                w[7] = e.ns;
            }
            Event::PerfSample(e) => {
                r.small[0] = e.kind as u8;
                w[0] = e.ip;
                w[1] = e.addr;
                w[2] = e.weight;
                w[3] = e.data_source;
                w[4] = pack(e.tid, e.cpu);
                w[5] = e.ns;
            }
            Event::PtChunk(e) => {
                w[0] = u64::from(e.cpu);
                w[1] = e.aux_offset;
                w[2] = e.size;
                (w[3], w[4]) = lo_hi(e.payload);
                w[5] = e.ns;
            }
            Event::PerfSoftware(e) => r.put_system(e.kind as u8, &e),
            Event::Ebpf(e) => r.put_system(e.kind as u8, &e),
            Event::LostEvents(e) => {
                w[0] = e.count;
                w[1] = u64::from(e.reason);
                w[2] = e.from_ns;
                w[3] = e.to_ns;
            }
            Event::Marker(e) => {
                w[0] = u64::from(e.text);
                w[1] = e.ns;
            }
            Event::Counter(e) => {
                w[0] = u64::from(e.name);
                w[1] = e.value;
                w[2] = e.ns;
            }
            Event::Migration(e) => {
                r.small[0] = e.role as u8;
                w[0] = pack(e.stage, e.index);
                w[1] = e.step;
                w[2] = u64::from(e.peer);
                w[3] = e.ns;
            }
        }
        r
    }

    /// Unpacks the event, or `None` when the record holds an unknown kind or enum value.
    pub fn to_event(&self) -> Option<Event> {
        let w = &self.words;
        let has_option = self.flags & FLAG_OPTION != 0;
        Some(match EventKind::from_u8(self.kind)? {
            EventKind::KernelSpan => Event::KernelSpan(KernelSpan {
                kernel: lo32(w[0]),
                layer: crate::event::layer_wire::decode(hi32(w[0])),
                step: w[1],
                seq: lo32(w[2]),
                rows: hi32(w[3]).wrapping_sub(lo32(w[3])),
                start_ns: w[4],
                end_ns: w[5],
                output_hash: has_option.then(|| join(w[6], w[7])),
            }),
            EventKind::Transfer => Event::Transfer(Transfer {
                id: w[0],
                src_endpoint: lo32(w[1]),
                dst_endpoint: hi32(w[1]),
                src_arena: lo32(w[2]),
                dst_arena: hi32(w[2]),
                src_offset: w[3],
                dst_offset: w[4],
                len: w[5],
                hash: join(w[6], w[7]),
                post_ns: w[8],
                complete_ns: w[9],
                transport: Transport::from_u8(self.small[0])?,
                direction: match self.small[1] {
                    0 => Direction::Send,
                    1 => Direction::Recv,
                    _ => return None,
                },
                payload: has_option.then(|| join(w[10], w[11])),
            }),
            EventKind::StepBoundary => Event::StepBoundary(StepBoundary {
                step: w[0],
                seq: w[1] as u32,
                ns: w[2],
            }),
            EventKind::Snapshot => Event::Snapshot(SnapshotEvent {
                stage: w[0] as u32,
                step: w[1],
                id: join(w[2], w[3]),
                bytes: w[4],
                new_bytes: w[5],
                chunks: w[6] as u32,
                ns: w[7],
            }),
            EventKind::PerfSample => Event::PerfSample(PerfSample {
                kind: PerfSampleKind::from_u8(self.small[0])?,
                ip: w[0],
                addr: w[1],
                weight: w[2],
                data_source: w[3],
                tid: lo32(w[4]),
                cpu: hi32(w[4]),
                ns: w[5],
            }),
            EventKind::PtChunk => Event::PtChunk(PtChunk {
                cpu: w[0] as u32,
                aux_offset: w[1],
                size: w[2],
                payload: join(w[3], w[4]),
                ns: w[5],
            }),
            EventKind::Ebpf => Event::Ebpf(self.system(EbpfKind::from_u8(self.small[0])?)),
            EventKind::PerfSoftware => {
                Event::PerfSoftware(self.system(SoftwareKind::from_u8(self.small[0])?))
            }
            EventKind::LostEvents => Event::LostEvents(LostEvents {
                count: w[0],
                reason: w[1] as u32,
                from_ns: w[2],
                to_ns: w[3],
            }),
            EventKind::Marker => Event::Marker(Marker {
                text: w[0] as u32,
                ns: w[1],
            }),
            EventKind::Counter => Event::Counter(Counter {
                name: w[0] as u32,
                value: w[1],
                ns: w[2],
            }),
            EventKind::Migration => Event::Migration(MigrationEvent {
                stage: lo32(w[0]),
                index: hi32(w[0]),
                step: w[1],
                role: MoveRole::from_u8(self.small[0])?,
                peer: w[2] as u32,
                ns: w[3],
            }),
        })
    }
}

impl RawRecord {
    /// Packs an eBPF event or perf software record (the same layout for both).
    #[inline]
    fn put_system<K>(&mut self, kind: u8, e: &SystemRecord<K>) {
        self.small[0] = kind;
        let w = &mut self.words;
        w[0] = u64::from(e.pid);
        w[1] = pack(e.tid, e.cpu);
        (w[2], w[3], w[4]) = (e.arg0, e.arg1, e.arg2);
        w[5] = e.ns;
    }

    /// Unpacks what [`RawRecord::put_system`] packed, with its kind already checked.
    fn system<K>(&self, kind: K) -> SystemRecord<K> {
        let w = &self.words;
        SystemRecord {
            kind,
            pid: w[0] as u32,
            tid: lo32(w[1]),
            cpu: hi32(w[1]),
            arg0: w[2],
            arg1: w[3],
            arg2: w[4],
            ns: w[5],
        }
    }
}

impl From<&Event> for RawRecord {
    fn from(event: &Event) -> RawRecord {
        RawRecord::from_event(event)
    }
}
