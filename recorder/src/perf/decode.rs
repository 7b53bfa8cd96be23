//! Decoding of raw perf ring-buffer records (samples, lost counts, switches, PT sideband).
//!
//! The `perf-event-open` crate hands each record over as its exact bytes (reassembled when it
//! wrapped around the ring's end); this module reads them by the `sample_type` the stream was
//! opened with. Decoding ourselves keeps `data_src` as the kernel's raw word, which is what the
//! trace stores, and costs no allocation per sample.

use super::{PerfRecord, SampleRecord, StreamKind};

// Record types and sample bits from include/uapi/linux/perf_event.h.
const PERF_RECORD_MMAP: u32 = 1;
const PERF_RECORD_LOST: u32 = 2;
const PERF_RECORD_COMM: u32 = 3;
const PERF_RECORD_SAMPLE: u32 = 9;
const PERF_RECORD_MMAP2: u32 = 10;
const PERF_RECORD_AUX: u32 = 11;
const PERF_RECORD_ITRACE_START: u32 = 12;
const PERF_RECORD_LOST_SAMPLES: u32 = 13;
const PERF_RECORD_SWITCH: u32 = 14;
const PERF_RECORD_SWITCH_CPU_WIDE: u32 = 15;

const PERF_RECORD_MISC_SWITCH_OUT: u16 = 1 << 13;
const PERF_RECORD_MISC_SWITCH_OUT_PREEMPT: u16 = 1 << 14;

pub(crate) const SAMPLE_IP: u64 = 1 << 0;
pub(crate) const SAMPLE_TID: u64 = 1 << 1;
pub(crate) const SAMPLE_TIME: u64 = 1 << 2;
pub(crate) const SAMPLE_ADDR: u64 = 1 << 3;
const SAMPLE_READ: u64 = 1 << 4;
const SAMPLE_CALLCHAIN: u64 = 1 << 5;
const SAMPLE_ID: u64 = 1 << 6;
pub(crate) const SAMPLE_CPU: u64 = 1 << 7;
pub(crate) const SAMPLE_PERIOD: u64 = 1 << 8;
const SAMPLE_STREAM_ID: u64 = 1 << 9;
const SAMPLE_RAW: u64 = 1 << 10;
const SAMPLE_BRANCH_STACK: u64 = 1 << 11;
const SAMPLE_REGS_USER: u64 = 1 << 12;
const SAMPLE_STACK_USER: u64 = 1 << 13;
pub(crate) const SAMPLE_WEIGHT: u64 = 1 << 14;
pub(crate) const SAMPLE_DATA_SRC: u64 = 1 << 15;
const SAMPLE_IDENTIFIER: u64 = 1 << 16;
const SAMPLE_WEIGHT_STRUCT: u64 = 1 << 24;

/// Fields whose variable length would sit before `weight`/`data_src`; the recorder never asks
/// for them, so a stream that has them is not decoded here.
const UNSUPPORTED_BEFORE_WEIGHT: u64 = SAMPLE_READ
    | SAMPLE_CALLCHAIN
    | SAMPLE_RAW
    | SAMPLE_BRANCH_STACK
    | SAMPLE_REGS_USER
    | SAMPLE_STACK_USER;

/// Reads native-endian words front to back; a short record reads as `None`.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8], at: usize) -> Cursor<'a> {
        Cursor { bytes, at }
    }

    fn u64(&mut self) -> Option<u64> {
        let b = self.bytes.get(self.at..self.at + 8)?;
        self.at += 8;
        Some(u64::from_ne_bytes(b.try_into().ok()?))
    }

    fn two_u32(&mut self) -> Option<(u32, u32)> {
        let b = self.bytes.get(self.at..self.at + 8)?;
        self.at += 8;
        Some((
            u32::from_ne_bytes(b[..4].try_into().ok()?),
            u32::from_ne_bytes(b[4..].try_into().ok()?),
        ))
    }
}

/// The `sample_id` trailer every non-sample record carries when `sample_id_all` is set.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SampleId {
    pid: u32,
    tid: u32,
    ns: u64,
    cpu: u32,
}

fn trailer_len(sample_type: u64) -> usize {
    [
        SAMPLE_TID,
        SAMPLE_TIME,
        SAMPLE_ID,
        SAMPLE_STREAM_ID,
        SAMPLE_CPU,
        SAMPLE_IDENTIFIER,
    ]
    .iter()
    .filter(|&&bit| sample_type & bit != 0)
    .count()
        * 8
}

fn sample_id(bytes: &[u8], sample_type: u64, sample_id_all: bool) -> SampleId {
    let mut id = SampleId::default();
    if !sample_id_all {
        return id;
    }
    let Some(start) = bytes.len().checked_sub(trailer_len(sample_type)) else {
        return id;
    };
    let mut c = Cursor::new(bytes, start);
    if sample_type & SAMPLE_TID != 0 {
        (id.pid, id.tid) = c.two_u32().unwrap_or_default();
    }
    if sample_type & SAMPLE_TIME != 0 {
        id.ns = c.u64().unwrap_or_default();
    }
    for bit in [SAMPLE_ID, SAMPLE_STREAM_ID] {
        if sample_type & bit != 0 {
            c.u64();
        }
    }
    if sample_type & SAMPLE_CPU != 0 {
        id.cpu = c.two_u32().unwrap_or_default().0;
    }
    id
}

/// Decodes a `PERF_RECORD_SAMPLE` body laid out by `sample_type`.
fn decode_sample(stream: StreamKind, bytes: &[u8], sample_type: u64) -> Option<SampleRecord> {
    if sample_type & UNSUPPORTED_BEFORE_WEIGHT != 0 {
        return None;
    }
    let mut c = Cursor::new(bytes, 8);
    let mut s = SampleRecord {
        stream,
        ..SampleRecord::default()
    };
    let has = |bit: u64| sample_type & bit != 0;
    if has(SAMPLE_IDENTIFIER) {
        c.u64()?;
    }
    if has(SAMPLE_IP) {
        s.ip = c.u64()?;
    }
    if has(SAMPLE_TID) {
        (s.pid, s.tid) = c.two_u32()?;
    }
    if has(SAMPLE_TIME) {
        s.ns = c.u64()?;
    }
    if has(SAMPLE_ADDR) {
        s.addr = c.u64()?;
    }
    if has(SAMPLE_ID) {
        c.u64()?;
    }
    if has(SAMPLE_STREAM_ID) {
        c.u64()?;
    }
    if has(SAMPLE_CPU) {
        s.cpu = c.two_u32()?.0;
    }
    if has(SAMPLE_PERIOD) {
        s.period = c.u64()?;
    }
    if has(SAMPLE_WEIGHT) {
        s.weight = c.u64()?;
    } else if has(SAMPLE_WEIGHT_STRUCT) {
        // var1_dw (the low 32 bits, little-endian layout) is the load latency.
        s.weight = c.u64()? & 0xffff_ffff;
    }
    if has(SAMPLE_DATA_SRC) {
        s.data_source = c.u64()?;
    }
    Some(s)
}

/// Decodes one whole record (header included) from `stream`. Records the recorder does not
/// use (throttle, fork, exit, ...) decode to `None`.
pub(crate) fn decode_record(
    stream: StreamKind,
    sample_type: u64,
    sample_id_all: bool,
    bytes: &[u8],
) -> Option<PerfRecord> {
    let mut header = Cursor::new(bytes, 0);
    let (ty, misc_size) = header.two_u32()?;
    let misc = misc_size as u16;
    match ty {
        PERF_RECORD_SAMPLE => decode_sample(stream, bytes, sample_type).map(PerfRecord::Sample),
        PERF_RECORD_LOST => {
            let mut c = Cursor::new(bytes, 16);
            let count = c.u64()?;
            let id = sample_id(bytes, sample_type, sample_id_all);
            Some(PerfRecord::Lost {
                stream,
                count,
                ns: id.ns,
            })
        }
        PERF_RECORD_LOST_SAMPLES => {
            let count = Cursor::new(bytes, 8).u64()?;
            let id = sample_id(bytes, sample_type, sample_id_all);
            Some(PerfRecord::Lost {
                stream,
                count,
                ns: id.ns,
            })
        }
        // The PT stream keeps its switches as sideband: a decoder needs them in stream order.
        PERF_RECORD_SWITCH | PERF_RECORD_SWITCH_CPU_WIDE if stream != StreamKind::IntelPt => {
            let id = sample_id(bytes, sample_type, sample_id_all);
            Some(PerfRecord::ContextSwitch {
                pid: id.pid,
                tid: id.tid,
                cpu: id.cpu,
                ns: id.ns,
                out: misc & PERF_RECORD_MISC_SWITCH_OUT != 0,
                preempted: misc & PERF_RECORD_MISC_SWITCH_OUT_PREEMPT != 0,
            })
        }
        PERF_RECORD_MMAP
        | PERF_RECORD_MMAP2
        | PERF_RECORD_COMM
        | PERF_RECORD_AUX
        | PERF_RECORD_ITRACE_START
        | PERF_RECORD_SWITCH
        | PERF_RECORD_SWITCH_CPU_WIDE => Some(PerfRecord::Sideband {
            stream,
            bytes: bytes.to_vec(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ty: u32, misc: u16, words: &[u64]) -> Vec<u8> {
        let size = 8 + words.len() * 8;
        let mut b = Vec::with_capacity(size);
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(&misc.to_ne_bytes());
        b.extend_from_slice(&(size as u16).to_ne_bytes());
        for w in words {
            b.extend_from_slice(&w.to_ne_bytes());
        }
        b
    }

    fn pid_tid(pid: u32, tid: u32) -> u64 {
        u64::from_ne_bytes(
            [pid.to_ne_bytes(), tid.to_ne_bytes()]
                .concat()
                .try_into()
                .unwrap(),
        )
    }

    fn cpu(n: u32) -> u64 {
        u64::from_ne_bytes([n.to_ne_bytes(), [0; 4]].concat().try_into().unwrap())
    }

    #[test]
    fn memory_sample_fields_are_read_in_kernel_order() {
        let ty = SAMPLE_IP
            | SAMPLE_TID
            | SAMPLE_TIME
            | SAMPLE_ADDR
            | SAMPLE_CPU
            | SAMPLE_PERIOD
            | SAMPLE_WEIGHT
            | SAMPLE_DATA_SRC;
        let bytes = record(
            PERF_RECORD_SAMPLE,
            0,
            &[
                0x401000,
                pid_tid(7, 8),
                123,
                0xdead_b000,
                cpu(1),
                1000,
                250,
                0x6810_0142,
            ],
        );
        let Some(PerfRecord::Sample(s)) = decode_record(StreamKind::MemLoads, ty, true, &bytes)
        else {
            panic!("not a sample");
        };
        assert_eq!(
            (
                s.ip,
                s.pid,
                s.tid,
                s.ns,
                s.addr,
                s.cpu,
                s.period,
                s.weight,
                s.data_source
            ),
            (0x401000, 7, 8, 123, 0xdead_b000, 1, 1000, 250, 0x6810_0142)
        );
    }

    #[test]
    fn short_or_unsupported_samples_are_skipped() {
        let ty = SAMPLE_IP | SAMPLE_TID | SAMPLE_TIME;
        let bytes = record(PERF_RECORD_SAMPLE, 0, &[1, pid_tid(1, 1)]);
        assert_eq!(decode_record(StreamKind::CpuClock, ty, true, &bytes), None);
        let bytes = record(PERF_RECORD_SAMPLE, 0, &[1, 2, 3, 4]);
        let with_callchain = ty | SAMPLE_CALLCHAIN;
        assert_eq!(
            decode_record(StreamKind::CpuClock, with_callchain, true, &bytes),
            None
        );
        assert_eq!(decode_record(StreamKind::CpuClock, ty, true, &[1, 2]), None);
    }

    #[test]
    fn lost_and_switch_records_use_the_sample_id_trailer() {
        let ty = SAMPLE_IP | SAMPLE_TID | SAMPLE_TIME | SAMPLE_CPU;
        let lost = record(PERF_RECORD_LOST, 0, &[99, 42, pid_tid(3, 4), 555, cpu(1)]);
        assert_eq!(
            decode_record(StreamKind::PageFaults, ty, true, &lost),
            Some(PerfRecord::Lost {
                stream: StreamKind::PageFaults,
                count: 42,
                ns: 555
            })
        );
        let misc = PERF_RECORD_MISC_SWITCH_OUT | PERF_RECORD_MISC_SWITCH_OUT_PREEMPT;
        let switch = record(PERF_RECORD_SWITCH, misc, &[pid_tid(3, 4), 777, cpu(1)]);
        assert_eq!(
            decode_record(StreamKind::ContextSwitches, ty, true, &switch),
            Some(PerfRecord::ContextSwitch {
                pid: 3,
                tid: 4,
                cpu: 1,
                ns: 777,
                out: true,
                preempted: true
            })
        );
        // On the PT stream the same record is sideband for the decoder.
        assert!(matches!(
            decode_record(StreamKind::IntelPt, ty, true, &switch),
            Some(PerfRecord::Sideband { .. })
        ));
    }
}
