//! Shared proptest strategies: arbitrary events of every kind.

#![allow(dead_code)]

use proptest::prelude::*;
use slug_schema::*;

pub fn transport() -> impl Strategy<Value = Transport> {
    (0u8..5).prop_map(|v| Transport::from_u8(v).expect("0..5 are transports"))
}

pub fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (any::<[u32; 4]>(), any::<[u64; 3]>(), any::<Option<u128>>()).prop_map(|(a, b, h)| {
            Event::KernelSpan(KernelSpan {
                kernel: a[0],
                layer: a[1].checked_sub(1), // never u32::MAX: the wire keeps that value for no layer
                step: b[0],
                seq: a[2],
                rows: a[3],
                start_ns: b[1],
                end_ns: b[2],
                output_hash: h,
            })
        }),
        (
            any::<[u32; 4]>(),
            any::<[u64; 6]>(),
            any::<u128>(),
            transport(),
            any::<bool>(),
            any::<Option<u128>>()
        )
            .prop_map(|(a, b, hash, transport, recv, payload)| {
                Event::Transfer(Transfer {
                    id: b[0],
                    src_endpoint: a[0],
                    dst_endpoint: a[1],
                    src_arena: a[2],
                    dst_arena: a[3],
                    src_offset: b[1],
                    dst_offset: b[2],
                    len: b[3],
                    hash,
                    post_ns: b[4],
                    complete_ns: b[5],
                    transport,
                    direction: if recv {
                        Direction::Recv
                    } else {
                        Direction::Send
                    },
                    payload,
                })
            }),
        (any::<u64>(), any::<u32>(), any::<u64>())
            .prop_map(|(step, seq, ns)| Event::StepBoundary(StepBoundary { step, seq, ns })),
        (any::<[u32; 2]>(), any::<[u64; 4]>(), any::<u128>()).prop_map(|(a, b, id)| {
            Event::Snapshot(SnapshotEvent {
                stage: a[0],
                step: b[0],
                id,
                bytes: b[1],
                new_bytes: b[2],
                chunks: a[1],
                ns: b[3],
            })
        }),
        (0u8..8, any::<[u64; 5]>(), any::<[u32; 2]>()).prop_map(|(k, b, a)| {
            Event::PerfSample(PerfSample {
                kind: PerfSampleKind::from_u8(k).expect("0..8 are sample kinds"),
                ip: b[0],
                addr: b[1],
                weight: b[2],
                data_source: b[3],
                tid: a[0],
                cpu: a[1],
                ns: b[4],
            })
        }),
        (any::<u32>(), any::<[u64; 3]>(), any::<u128>()).prop_map(|(cpu, b, payload)| {
            Event::PtChunk(PtChunk {
                cpu,
                aux_offset: b[0],
                size: b[1],
                payload,
                ns: b[2],
            })
        }),
        (1u8..3, any::<[u32; 3]>(), any::<[u64; 4]>()).prop_map(|(k, a, b)| {
            Event::PerfSoftware(SoftwareRecord {
                kind: SoftwareKind::from_u8(k).expect("1..3 are software record kinds"),
                pid: a[0],
                tid: a[1],
                cpu: a[2],
                arg0: b[0],
                arg1: b[1],
                arg2: b[2],
                ns: b[3],
            })
        }),
        (0u8..7, any::<[u32; 3]>(), any::<[u64; 4]>()).prop_map(|(k, a, b)| {
            Event::Ebpf(EbpfEvent {
                kind: EbpfKind::from_u8(k).expect("0..7 are probe kinds"),
                pid: a[0],
                tid: a[1],
                cpu: a[2],
                arg0: b[0],
                arg1: b[1],
                arg2: b[2],
                ns: b[3],
            })
        }),
        (any::<u64>(), any::<u32>(), any::<[u64; 2]>()).prop_map(|(count, reason, b)| {
            Event::LostEvents(LostEvents {
                count,
                reason,
                from_ns: b[0],
                to_ns: b[1],
            })
        }),
        (any::<u32>(), any::<u64>()).prop_map(|(text, ns)| Event::Marker(Marker { text, ns })),
        (any::<u32>(), any::<u64>(), any::<u64>())
            .prop_map(|(name, value, ns)| Event::Counter(Counter { name, value, ns })),
    ]
}

/// Writes `events` (and `strings`) to a fresh log at `path` with small frames.
pub fn write_log(
    path: &std::path::Path,
    strings: &[String],
    events: &[Event],
    per_frame: usize,
) -> LogStats {
    let header = LogHeader::new(7, Clock::Synthetic, 0);
    let options = WriterOptions {
        events_per_frame: per_frame,
        zstd_level: 3,
    };
    let mut w = LogWriter::create_with(path, header, options).expect("create log");
    for s in strings {
        w.intern(s);
    }
    for e in events {
        w.append(e);
    }
    w.close().expect("close log")
}

/// Reads every event, every error, and every string of a log; must never panic.
pub fn read_everything(path: &std::path::Path) -> Option<(Vec<Event>, usize)> {
    let reader = LogReader::open(path).ok()?;
    let mut events = Vec::new();
    let mut errors = 0;
    for frame in reader.frames() {
        match frame {
            Ok(f) => events.extend(f.events),
            Err(_) => errors += 1,
        }
    }
    for e in reader.events_in(
        TimeRange::new(100, 1 << 40),
        KindSet::of(&[EventKind::Transfer]),
    ) {
        if e.is_err() {
            errors += 1;
        }
    }
    for id in 0..4 {
        let _ = reader.string(id);
    }
    Some((events, errors))
}
