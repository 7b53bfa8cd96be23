//! Committed logs of every format version this build reads (`tests/fixtures/v<N>-every-kind.slog`,
//! the same events written by the writer of version N) must keep decoding to those events: this
//! guards readers against accidental format changes. Set SLUG_WRITE_FIXTURE=1 to (re)write the
//! fixture of the current version, only when the format version changes on purpose; older
//! fixtures are never rewritten (this build cannot write them). The v3 fixture was rewritten
//! once within version 3, when kernel spans lost their always-zero first row and thread from
//! the API: its `rowStart` and `thread` columns are zero now, as every v3 recording's are, and
//! the v1-v2 fixtures still show that logs filling them read back.

use std::path::PathBuf;

use slug_schema::*;

fn fixture(version: u32) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/v{version}-every-kind.slog"))
}

/// One or more events of every kind, with the optional fields both present and absent, as a
/// reader of format `version` returns them. Versions 1-2 wrote the context switch below under
/// `ebpf` (no probe existed yet) and read back as `perf_software`; version 3 adds real eBPF events.
fn events(version: u32) -> Vec<Event> {
    let mut v = Vec::new();
    for i in 0..6u64 {
        let t = 1_000_000 + i * 10_000;
        v.push(Event::StepBoundary(StepBoundary {
            step: i,
            seq: 1,
            ns: t,
        }));
        // Two spans a step: versions 1-2 wrote them as two threads' halves of 128 rows
        // (rowStart 0 and 64, thread 0 and 1), which read back as 64 rows each.
        for half in 0..2u64 {
            v.push(Event::KernelSpan(KernelSpan {
                kernel: (i % 2) as u32,
                layer: Some(3),
                step: i,
                seq: 1,
                rows: 64,
                start_ns: t + 100 + half * 7,
                end_ns: t + 4_100 + half * 13,
                output_hash: (i == 2).then_some(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210),
            }));
        }
        v.push(Event::Transfer(Transfer {
            id: 40 + i,
            src_endpoint: 1,
            dst_endpoint: 2,
            src_arena: 1,
            dst_arena: 2,
            src_offset: 4096,
            dst_offset: 8192,
            len: 16384,
            hash: u128::from(i) << 64 | 0xdead_beef,
            post_ns: t + 5_000,
            complete_ns: t + 6_500,
            transport: if i % 2 == 0 {
                Transport::Shm
            } else {
                Transport::Tcp
            },
            direction: Direction::Send,
            payload: (i == 3).then_some(77),
        }));
    }
    v.push(Event::Snapshot(SnapshotEvent {
        stage: 1,
        step: 0,
        id: 9,
        bytes: 1 << 20,
        new_bytes: 1 << 19,
        chunks: 16,
        ns: 999_000,
    }));
    v.push(Event::PerfSample(PerfSample {
        kind: PerfSampleKind::MemLoad,
        ip: 0x5555_0000_1234,
        addr: 0x7f00_0000_0040,
        weight: 87,
        data_source: 0x6a10_0142,
        tid: 1001,
        cpu: 3,
        ns: 1_003_000,
    }));
    v.push(Event::PtChunk(PtChunk {
        cpu: 3,
        aux_offset: 65536,
        size: 65536,
        payload: 5,
        ns: 1_004_000,
    }));
    v.push(Event::PerfSoftware(SoftwareRecord {
        kind: SoftwareKind::ContextSwitch,
        pid: 42,
        tid: 1001,
        cpu: 3,
        arg0: 1001,
        arg1: 0,
        arg2: 1,
        ns: 1_005_000,
    }));
    if version >= 3 {
        v.push(Event::Ebpf(EbpfEvent {
            kind: EbpfKind::OffCpu,
            pid: 42,
            tid: 1001,
            cpu: 3,
            arg0: 250_000,
            arg1: (203 << 32) | 1,
            arg2: 1002,
            ns: 1_005_100,
        }));
        v.push(Event::Ebpf(EbpfEvent {
            kind: EbpfKind::SyscallHistogram,
            pid: 42,
            tid: 1001,
            cpu: 0,
            arg0: 202,
            arg1: 12,
            arg2: 31,
            ns: 1_005_200,
        }));
    }
    v.push(Event::LostEvents(LostEvents {
        count: 17,
        reason: 2,
        from_ns: 1_006_000,
        to_ns: 1_007_000,
    }));
    v.push(Event::Marker(Marker {
        text: 3,
        ns: 1_008_000,
    }));
    v.push(Event::Counter(Counter {
        name: 4,
        value: 123_456,
        ns: 1_009_000,
    }));
    if version >= 4 {
        for (role, peer) in [(MoveRole::Left, 5), (MoveRole::Arrived, 1)] {
            v.push(Event::Migration(MigrationEvent {
                stage: 1,
                step: 24,
                index: 2,
                role,
                peer,
                ns: 1_010_000 + role as u64 * 500,
            }));
        }
    }
    v
}

const STRINGS: [&str; 5] = [
    "gemm",
    "rmsnorm",
    "ring overflow",
    "hello marker",
    "task-clock",
];

#[test]
fn committed_v1_log_still_decodes() {
    check(fixture(1), 1);
}

#[test]
fn committed_v2_log_still_decodes() {
    check(fixture(2), 2);
}

#[test]
fn committed_v3_log_still_decodes() {
    check(fixture(3), 3);
}

#[test]
fn committed_v4_log_still_decodes() {
    assert_eq!(FORMAT_VERSION, 4, "write a fixture for the new version");
    let path = fixture(4);
    if std::env::var_os("SLUG_WRITE_FIXTURE").is_some() {
        write_v4(&path);
    }
    check(path, 4);
}

/// Writes the version-4 fixture's events the way the fixture was written.
fn write_v4(path: &std::path::Path) {
    let header = LogHeader {
        endpoint: 1,
        clock: Clock::Monotonic,
        created_unix_ns: 1_700_000_000_000_000_000,
        clock_at_create_ns: 999_000,
    };
    let mut w = LogWriter::create_with(
        path,
        header,
        WriterOptions {
            events_per_frame: 16,
            zstd_level: 3,
        },
    )
    .unwrap();
    for s in STRINGS {
        w.intern(s);
    }
    for e in events(4) {
        w.append(&e);
    }
    w.close().unwrap();
}

/// The encoder is pinned: the same events written today give the committed file byte for byte,
/// so a change to how batches are laid out cannot slip by as "still decodes".
#[test]
fn a_new_log_of_the_fixture_events_is_byte_identical_to_the_committed_one() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("fresh.slog");
    write_v4(&fresh);
    let want = std::fs::read(fixture(4)).expect("fixture reads");
    let got = std::fs::read(&fresh).expect("fresh log reads");
    assert_eq!(got.len(), want.len(), "log size changed");
    let first = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first, None, "first differing byte");
}

fn check(path: PathBuf, version: u16) {
    let bytes = std::fs::read(&path).expect("fixture reads");
    assert_eq!(
        u16::from_le_bytes([bytes[8], bytes[9]]),
        version,
        "{} is a version-{version} log",
        path.display()
    );
    let reader = LogReader::open(&path).expect("fixture opens");
    assert!(reader.recovery().is_clean(), "{:?}", reader.recovery());
    assert_eq!(reader.header().endpoint, 1);
    assert_eq!(reader.header().clock, Clock::Monotonic);
    assert_eq!(reader.header().created_unix_ns, 1_700_000_000_000_000_000);
    for (i, s) in STRINGS.iter().enumerate() {
        assert_eq!(reader.string(i as u32), Some(*s));
    }
    let got: Vec<Event> = reader
        .frames()
        .flat_map(|f| f.expect("frame decodes").events)
        .collect();
    assert_eq!(got, events(version.into()));
    for kind in EventKind::ALL {
        if version < 3 && kind == EventKind::Ebpf || version < 4 && kind == EventKind::Migration {
            assert_eq!(
                reader.counts()[kind as usize],
                0,
                "no {} before this version",
                kind.name()
            );
            continue;
        }
        assert!(
            reader.counts()[kind as usize] > 0,
            "fixture lacks {}",
            kind.name()
        );
    }
}
