//! Every event kind survives record → log → reader unchanged, and filters return exactly what they should.

mod common;

use proptest::prelude::*;
use slug_schema::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn raw_record_round_trips(e in common::event()) {
        let r = RawRecord::from_event(&e);
        prop_assert_eq!(r.to_event(), Some(e));
        prop_assert_eq!(RawRecord::from_bytes(&r.to_bytes()), r);
    }

    #[test]
    fn log_round_trips(events in prop::collection::vec(common::event(), 0..200), per_frame in 1usize..64) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.slog");
        let strings: Vec<String> = vec!["a".into(), "ünïcode".into(), String::new()];
        let stats = common::write_log(&path, &strings, &events, per_frame);
        prop_assert_eq!(stats.events, events.len() as u64);
        let reader = LogReader::open(&path).unwrap();
        prop_assert!(reader.recovery().is_clean(), "{:?}", reader.recovery());
        let mut back = Vec::new();
        for f in reader.frames() {
            back.extend(f.unwrap().events);
        }
        prop_assert_eq!(&back, &events);
        for (i, s) in strings.iter().enumerate() {
            prop_assert_eq!(reader.string(i as u32), Some(s.as_str()));
        }
        let expected: Vec<u64> = EventKind::ALL.iter().map(|&k| events.iter().filter(|e| e.kind() == k).count() as u64).collect();
        prop_assert_eq!(reader.counts().to_vec(), expected);
    }

    #[test]
    fn events_in_filters_by_kind_and_time(
        events in prop::collection::vec(common::event(), 1..150),
        a in any::<u64>(), b in any::<u64>(), mask in 0u16..1024,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.slog");
        common::write_log(&path, &[], &events, 16);
        let reader = LogReader::open(&path).unwrap();
        let range = TimeRange::new(a.min(b), a.max(b));
        let kinds = EventKind::ALL.iter().filter(|&&k| mask & (1 << k as u16) != 0).fold(KindSet::NONE, |s, &k| s.with(k));
        let got: Vec<Event> = reader.events_in(range, kinds).map(Result::unwrap).collect();
        let want: Vec<Event> = events
            .iter()
            .filter(|e| kinds.contains(e.kind()) && range.touches(e.ns(), e.end_ns().max(e.ns())))
            .copied()
            .collect();
        prop_assert_eq!(got, want);
    }
}

#[test]
fn header_and_index_are_readable_without_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("i.slog");
    let events: Vec<Event> = (0..1000u64)
        .map(|i| {
            Event::Marker(Marker {
                text: 0,
                ns: 1_000 + i * 10,
            })
        })
        .collect();
    let stats = common::write_log(&path, &["m".into()], &events, 100);
    let reader = LogReader::open(&path).unwrap();
    assert_eq!(reader.header().endpoint, 7);
    assert_eq!(reader.header().clock, Clock::Synthetic);
    // One string frame, then ten event frames.
    assert_eq!(reader.index().len(), 11);
    assert_eq!(stats.frames, 11);
    assert_eq!(reader.index()[1].t_min, 1_000);
    assert_eq!(reader.index()[1].t_max, 1_990);
    assert_eq!(reader.index()[1].count(EventKind::Marker), 100);
    assert_eq!(reader.time_span(), Some(TimeRange::new(1_000, 10_990)));
    assert_eq!(reader.file_len(), stats.bytes);
    let mid: Vec<_> = reader
        .events_in(TimeRange::new(5_000, 5_020), KindSet::ALL)
        .map(Result::unwrap)
        .collect();
    assert_eq!(mid.len(), 2, "the range is half-open: 5000 and 5010");
}

/// A hook given after some events runs only once the frame holding them is in the file (read
/// back from it while the writer is still open), in order, and never before.
#[test]
fn after_written_hooks_run_once_their_events_are_in_the_file() {
    use std::sync::mpsc;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.slog");
    let options = WriterOptions {
        events_per_frame: 100,
        zstd_level: 1,
    };
    let mut w =
        LogWriter::create_with(&path, LogHeader::new(0, Clock::Monotonic, 0), options).unwrap();
    let (tx, rx) = mpsc::channel();
    for i in 0..150u64 {
        w.append(&Event::Marker(Marker { text: 0, ns: i }));
        if i == 49 || i == 149 {
            let (tx, path) = (tx.clone(), path.clone());
            w.after_written(move || {
                // Runs on the encoder thread: the events are readable from the file right now.
                let events: u64 = LogReader::open(&path)
                    .unwrap()
                    .frames()
                    .flatten()
                    .map(|f| f.events.len() as u64)
                    .sum();
                tx.send((i, events)).unwrap();
            });
        }
    }
    assert_eq!(w.appended(), 150);
    assert_eq!(w.buffered(), 50);
    // The first 100 events filled a frame, which carried the first hook.
    let first = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    assert_eq!(first, (49, 100));
    assert!(
        rx.try_recv().is_err(),
        "the second hook waits for its frame"
    );
    w.cut_frame();
    let second = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    assert_eq!(second, (149, 150));
    w.close().unwrap();
}

#[test]
fn writer_rejects_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    let header = LogHeader::new(0, Clock::Monotonic, 0);
    let bad = WriterOptions {
        events_per_frame: 0,
        zstd_level: 3,
    };
    assert!(matches!(
        LogWriter::create_with(dir.path().join("x"), header, bad),
        Err(SchemaError::Options(_))
    ));
    let bad = WriterOptions {
        events_per_frame: 10,
        zstd_level: 99,
    };
    assert!(matches!(
        LogWriter::create_with(dir.path().join("y"), header, bad),
        Err(SchemaError::Options(_))
    ));
}

#[test]
fn encoder_rejects_invalid_raw_records() {
    let mut bytes = RawRecord::from_event(&Event::Marker(Marker { text: 1, ns: 2 })).to_bytes();
    bytes[0] = 200;
    let mut enc = FrameEncoder::new(3).unwrap();
    let err = enc
        .encode(&[RawRecord::from_bytes(&bytes)], 0, &[], &mut Vec::new())
        .unwrap_err();
    assert!(
        matches!(
            err,
            SchemaError::InvalidRecord {
                index: 0,
                kind: 200
            }
        ),
        "{err}"
    );
}
