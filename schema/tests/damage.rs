//! Damaged logs: truncation at every byte, bit flips, random bytes, bad magic, newer versions.
//! Nothing may panic; what survives must be exactly a prefix of what was written.

mod common;

use proptest::prelude::*;
use slug_schema::*;

fn small_log(dir: &std::path::Path) -> (std::path::PathBuf, Vec<Event>, Vec<u8>) {
    let path = dir.join("small.slog");
    let events: Vec<Event> = (0..40u64)
        .map(|i| {
            if i % 3 == 0 {
                Event::Marker(Marker {
                    text: 0,
                    ns: 1_000 + i,
                })
            } else {
                Event::Counter(Counter {
                    name: 1,
                    value: i * i,
                    ns: 1_000 + i,
                })
            }
        })
        .collect();
    common::write_log(&path, &["mark".into(), "count".into()], &events, 8);
    let bytes = std::fs::read(&path).unwrap();
    (path, events, bytes)
}

#[test]
fn truncation_at_every_byte_keeps_a_prefix_and_counts_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (_, events, bytes) = small_log(dir.path());
    let cut = dir.path().join("cut.slog");
    for len in 0..bytes.len() {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let reader = match LogReader::open(&cut) {
            Ok(r) => r,
            Err(e) => {
                assert!(len < FILE_HEADER_LEN, "len {len}: {e}");
                assert!(
                    e.to_string().contains("cut.slog"),
                    "error must name the file: {e}"
                );
                continue;
            }
        };
        let rec = *reader.recovery();
        assert_ne!(rec.footer, FooterState::Valid, "len {len}");
        assert_eq!(rec.corrupt_frames, 0, "len {len}: {rec:?}");
        let got: Vec<Event> = reader.frames().flat_map(|f| f.unwrap().events).collect();
        assert_eq!(&events[..got.len()], &got[..], "len {len}: not a prefix");
        let whole: u64 =
            reader.index().iter().map(FrameInfo::len).sum::<u64>() + FILE_HEADER_LEN as u64;
        assert_eq!(
            whole + rec.truncated_bytes,
            len as u64,
            "len {len}: every byte accounted for ({rec:?})"
        );
        if got.len() == events.len() {
            assert_eq!(rec.partial_frames, 0, "len {len}: {rec:?}");
        } else if rec.truncated_bytes > 2 {
            assert_eq!(rec.partial_frames, 1, "len {len}: {rec:?}");
        }
    }
}

#[test]
fn corrupt_frame_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (path, events, mut bytes) = small_log(dir.path());
    let reader = LogReader::open(&path).unwrap();
    let victim = reader.index()[2];
    drop(reader);
    let at = victim.offset as usize + FRAME_HEADER_LEN + 3;
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let reader = LogReader::open(&path).unwrap();
    let rec = *reader.recovery();
    assert_eq!(rec.corrupt_frames, 1, "{rec:?}");
    assert_eq!(rec.corrupt_bytes, victim.len());
    let got: Vec<Event> = reader.frames().flat_map(|f| f.unwrap().events).collect();
    assert_eq!(got.len(), events.len() - victim.events as usize);

    // Without the footer the scan must find the same damage and resynchronise after it.
    let last = reader.index().last().unwrap();
    let frames_end = (last.offset + last.len()) as usize;
    std::fs::write(&path, &bytes[..frames_end]).unwrap();
    let reader = LogReader::open(&path).unwrap();
    assert_eq!(reader.recovery().footer, FooterState::Missing);
    assert_eq!(reader.recovery().corrupt_frames, 1);
    assert_eq!(reader.recovery().truncated_bytes, 0);
    assert_eq!(
        reader.frames().flat_map(|f| f.unwrap().events).count(),
        got.len()
    );
}

#[test]
fn wrong_magic_and_newer_version_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, mut bytes) = small_log(dir.path());
    let mut other = bytes.clone();
    other[0] = b'X';
    std::fs::write(&path, &other).unwrap();
    let err = LogReader::open(&path).unwrap_err();
    assert!(matches!(err, SchemaError::NotALog { .. }), "{err}");
    assert!(err.to_string().contains("small.slog"), "{err}");

    bytes[8] = 9;
    std::fs::write(&path, &bytes).unwrap();
    let err = LogReader::open(&path).unwrap_err();
    assert!(
        matches!(
            err,
            SchemaError::UnsupportedVersion {
                found: 9,
                supported: FORMAT_VERSION,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade slug"), "{err}");

    let err = LogReader::open(dir.path().join("missing.slog")).unwrap_err();
    assert!(err.to_string().contains("missing.slog"), "{err}");
}

#[test]
fn huge_declared_sizes_are_refused_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, bytes) = small_log(dir.path());
    // A frame header claiming 4 GiB of payload cannot pass its limits, checksum or not.
    let mut b = bytes.clone();
    let first = FILE_HEADER_LEN;
    b[first + 8..first + 12].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    let reader = LogReader::open(&path).unwrap();
    assert_eq!(reader.recovery().corrupt_frames, 1);

    // A zstd bomb: a valid-looking frame whose payload inflates far past its declared raw length.
    let bomb = zstd::bulk::compress(&vec![0u8; 32 << 20], 3).unwrap();
    let mut enc_out = Vec::new();
    let mut enc = FrameEncoder::new(3).unwrap();
    let info = enc
        .encode(
            &[RawRecord::from_event(&Event::Marker(Marker {
                text: 0,
                ns: 5,
            }))],
            0,
            &[],
            &mut enc_out,
        )
        .unwrap();
    assert_eq!(info.events, 1);
    let mut frame = enc_out[..FRAME_HEADER_LEN].to_vec();
    frame[8..12].copy_from_slice(&(bomb.len() as u32).to_le_bytes());
    frame[104..112].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(&bomb).to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&frame[..112]);
    frame[112..120].copy_from_slice(&sum.to_le_bytes());
    frame.extend_from_slice(&bomb);
    let mut file = bytes[..FILE_HEADER_LEN].to_vec();
    file.extend_from_slice(&frame);
    std::fs::write(&path, &file).unwrap();
    let reader = LogReader::open(&path).unwrap();
    assert_eq!(reader.index().len(), 1, "{:?}", reader.recovery());
    let err = reader.frames().next().unwrap().unwrap_err();
    assert!(matches!(err, SchemaError::CorruptFrame { .. }), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn bit_flips_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..6)) {
        let dir = tempfile::tempdir().unwrap();
        let (path, events, mut bytes) = small_log(dir.path());
        for (i, bit) in flips {
            let at = i.index(bytes.len());
            bytes[at] ^= 1 << bit;
        }
        std::fs::write(&path, &bytes).unwrap();
        if let Some((got, _errors)) = common::read_everything(&path) {
            // Checksums stop damaged frames; whatever decodes is a subset of what was written.
            prop_assert!(got.iter().all(|e| events.contains(e)));
        }
    }

    #[test]
    fn random_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..4096), keep_header in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let (path, _, bytes) = small_log(dir.path());
        let mut file = if keep_header { bytes[..FILE_HEADER_LEN].to_vec() } else { Vec::new() };
        file.extend_from_slice(&body);
        std::fs::write(&path, &file).unwrap();
        let _ = common::read_everything(&path);
    }

    #[test]
    fn spliced_frames_never_panic(cut in any::<prop::sample::Index>(), len in 1usize..300, junk in prop::collection::vec(any::<u8>(), 0..64)) {
        let dir = tempfile::tempdir().unwrap();
        let (path, _, bytes) = small_log(dir.path());
        let at = FILE_HEADER_LEN + cut.index(bytes.len() - FILE_HEADER_LEN);
        let end = (at + len).min(bytes.len());
        let mut file = bytes[..at].to_vec();
        file.extend_from_slice(&junk);
        file.extend_from_slice(&bytes[end..]);
        std::fs::write(&path, &file).unwrap();
        let _ = common::read_everything(&path);
    }
}

/// Rewrites frame `victim`'s payload with garbage of the same length and fixes both checksums,
/// so the frame passes every checksum but its batch does not decode.
fn garbage_frame(bytes: &mut [u8], victim: FrameInfo) {
    use xxhash_rust::xxh3::xxh3_64;
    let start = victim.offset as usize;
    let payload = start + FRAME_HEADER_LEN..start + victim.len() as usize;
    for (i, b) in bytes[payload.clone()].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(7);
    }
    let sum = xxh3_64(&bytes[payload]);
    bytes[start + 104..start + 112].copy_from_slice(&sum.to_le_bytes());
    let head = xxh3_64(&bytes[start..start + 112]);
    bytes[start + 112..start + 120].copy_from_slice(&head.to_le_bytes());
}

#[test]
fn a_checksum_valid_frame_that_does_not_decode_counts_as_corrupt_not_as_events() {
    let dir = tempfile::tempdir().unwrap();
    let (path, events, mut bytes) = small_log(dir.path());
    let reader = LogReader::open(&path).unwrap();
    let victim = *reader.index().iter().rfind(|f| !f.is_empty()).unwrap();
    drop(reader);
    garbage_frame(&mut bytes, victim);
    std::fs::write(&path, &bytes).unwrap();
    let reader = LogReader::open(&path).unwrap();
    assert_eq!(reader.recovery().corrupt_frames, 0, "checksums pass");
    let s = LogSummary::of(&reader);
    let survivors = events.len() as u64 - u64::from(victim.events);
    assert_eq!(
        s.events, survivors,
        "counts come from decoded events: {s:?}"
    );
    assert_eq!(s.counts.values().sum::<u64>(), survivors);
    assert_eq!(s.undecodable_frames, 1);
    assert_eq!(s.recovery.corrupt_frames, 1, "{s:?}");
    assert_eq!(s.recovery.corrupt_bytes, victim.len());
    let last = events[..survivors as usize].last().unwrap().ns();
    assert_eq!(
        s.time_span.unwrap().end_ns,
        last,
        "times from decoded events"
    );
}
