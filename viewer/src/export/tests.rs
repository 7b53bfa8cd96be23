//! Exports of the in-memory fixture decoded back: tracks, slice counts and flow pairs.

use std::collections::{BTreeSet, HashMap};

use crate::export::{Format, export};
use slug_schema::Direction;

use crate::export::perfetto::PerfettoContents;
use crate::state::event::{KernelSpan, TraceEvent};
use crate::state::fixture;
use crate::state::source::MemorySource;

#[test]
fn perfetto_fixture_round_trip() {
    let src = fixture::pipeline(3, 4, 16);
    let mut out = Vec::new();
    let summary = export(&src, Format::Perfetto, &mut out).expect("exports");
    let c = super::perfetto::read(&out).expect("decodes");
    assert!(
        c.well_formed,
        "every event resolves its sequence, clock and interned names"
    );
    assert!(c.balanced, "every track's slices nest");
    assert_eq!(c.primary_clock, Some(3), "timestamps are CLOCK_MONOTONIC");
    assert!(c.compressed_batches >= 1);
    assert!(summary.uncompressed_bytes > out.len() as u64);
    // 3 stages x 4 steps x 4 kernels.
    assert_eq!(summary.slices, 48);
    assert_eq!(c.slice_names["gemm"], 12);
    assert_eq!(c.slice_names["off-cpu futex 30.0us"], 12);
    assert_eq!(c.slice_names["send"], 8);
    assert_eq!(c.slice_names["recv"], 8);
    // Kernel slices carry step, seq and layer.
    assert_eq!(c.annotations["seq"], 48);
    assert_eq!(c.annotations["step"], 48);
    assert_eq!(c.annotations["layer"], 48);
    assert_eq!(c.slices.values().sum::<u64>(), 48 + 12 + 16);
    let thread_tracks = c
        .tracks
        .values()
        .filter(|t| t.name.ends_with("thread 7"))
        .count();
    assert_eq!(thread_tracks, 3, "one OS thread track per stage");
    // 12 off-CPU intervals, 3 page faults, 1 migration.
    assert_eq!(summary.system, 16);
    assert_eq!(c.categories["ebpf,page-fault"], 3);
    assert_eq!(c.categories["ebpf,migration"], 1);
    let roots: BTreeSet<&str> = c
        .tracks
        .values()
        .filter(|t| t.parent == 0)
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(roots, BTreeSet::from(["n0/s0", "n0/s1", "n1/s2"]));
    // 2 links x 4 steps; ids 0..12 step*3+stage; flow id = transfer id + 1.
    let ids: BTreeSet<u64> = c.flow_starts.keys().copied().collect();
    assert_eq!(ids, c.flow_ends.keys().copied().collect());
    assert_eq!(ids.len(), 8);
    assert_eq!(summary.flows, 8);
    let name = |ep: u64| format!("n{}/s{ep}", ep / 2);
    let parent = |track: u64| c.tracks[&c.tracks[&track].parent].name.clone();
    for (id, start) in &c.flow_starts {
        let src_ep = (id - 1) % 3;
        assert_eq!(parent(*start), name(src_ep));
        assert_eq!(parent(c.flow_ends[id]), name(src_ep + 1));
    }
    // Steps, snapshots and the one loss are instants on the endpoint tracks; the page faults
    // and the migration on the thread tracks.
    assert_eq!(summary.instants, 3 * 4 + 3 + 1);
    assert_eq!(c.instants.values().sum::<u64>(), 3 * 4 + 3 + 1 + 3 + 1);
    assert!(c.counters.values().sum::<u64>() > 0);
}

#[test]
fn perfetto_uncompressed_and_compressed_hold_the_same() {
    let src = fixture::pipeline(2, 3, 16);
    let mut packed = Vec::new();
    let mut plain = Vec::new();
    super::perfetto::write_with(&src, &mut packed, true).expect("exports");
    let summary = super::perfetto::write_with(&src, &mut plain, false).expect("exports");
    assert_eq!(summary.uncompressed_bytes, plain.len() as u64);
    let (a, b) = (
        super::perfetto::read(&packed).expect("decodes"),
        super::perfetto::read(&plain).expect("decodes"),
    );
    assert_eq!(b.compressed_batches, 0);
    assert_eq!(
        PerfettoContents {
            compressed_batches: 0,
            ..a
        },
        b
    );
}

#[test]
fn overlapping_kernel_spans_spread_over_lanes_that_nest() {
    // Four worker threads' spans of one kernel, side by side, as the synthetic trace has them.
    let spans: Vec<TraceEvent> = (0..4u64)
        .flat_map(|step| {
            (0..4u64).map(move |th| {
                TraceEvent::KernelSpan(KernelSpan {
                    kernel: 0,
                    layer: Some(0),
                    step,
                    seq: th as u32,
                    rows: 16,
                    start_ns: step * 1_000 + th * 10,
                    end_ns: step * 1_000 + 500 + th * 37,
                    output_hash: None,
                })
            })
        })
        .collect();
    let src = MemorySource::new(fixture::endpoints(1), vec![spans], 5);
    let mut out = Vec::new();
    export(&src, Format::Perfetto, &mut out).expect("exports");
    let c = super::perfetto::read(&out).expect("decodes");
    assert!(c.balanced);
    let lanes: BTreeSet<String> = c.slices.keys().map(|t| c.tracks[t].name.clone()).collect();
    assert_eq!(
        lanes,
        BTreeSet::from(
            [
                "n0/s0 kernels",
                "n0/s0 kernels 2",
                "n0/s0 kernels 3",
                "n0/s0 kernels 4"
            ]
            .map(String::from)
        )
    );
    let mut json = Vec::new();
    export(&src, Format::Chrome, &mut json).expect("exports");
    let doc: serde_json::Value = serde_json::from_slice(&json).expect("valid JSON");
    let tids: BTreeSet<u64> = doc["traceEvents"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["ph"] == "X")
        .map(|e| e["tid"].as_u64().expect("tid"))
        .collect();
    assert_eq!(tids, BTreeSet::from([1, 2, 3, 4]));
}

#[test]
fn chrome_fixture_round_trip() {
    let src = fixture::pipeline(2, 3, 16);
    let mut out = Vec::new();
    let summary = export(&src, Format::Chrome, &mut out).expect("exports");
    let doc: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
    let events = doc["traceEvents"].as_array().expect("traceEvents");
    let count = |ph: &str| events.iter().filter(|e| e["ph"] == ph).count();
    assert_eq!(
        events
            .iter()
            .filter(|e| e["ph"] == "X" && e["cat"] == "kernel_span")
            .count(),
        24
    );
    let off_cpu: Vec<_> = events
        .iter()
        .filter(|e| e["ph"] == "X" && e["cat"] == "ebpf,off-cpu")
        .collect();
    assert_eq!(off_cpu.len(), 6, "2 stages x 3 steps");
    assert_eq!(off_cpu[0]["dur"], 30.0, "microseconds");
    assert_eq!(off_cpu[0]["args"]["waited on"], "futex");
    assert_eq!(off_cpu[0]["args"]["woken by tid"], "8");
    assert_eq!(summary.slices, 24);
    assert_eq!(count("s"), 3);
    assert_eq!(count("f"), 3);
    // Each transfer: a send slice and a recv slice, the flow events at their starts.
    let sends: Vec<_> = events
        .iter()
        .filter(|e| e["ph"] == "X" && e["name"] == "send")
        .collect();
    assert_eq!(sends.len(), 3);
    assert!(sends[0]["dur"].as_f64().expect("dur") > 0.0);
    assert_eq!(sends[0]["args"]["transfer"], "link 0 #0");
    let recv = events
        .iter()
        .filter(|e| e["ph"] == "X" && e["name"] == "recv")
        .count();
    assert_eq!(recv, 3);
    // 6 off-CPU intervals, 2 page faults and 1 migration.
    assert_eq!(summary.system, 9);
    assert_eq!(
        events
            .iter()
            .filter(|e| e["ph"] == "i" && e["cat"] == "ebpf,page-fault")
            .count(),
        2
    );
    let gemm = events
        .iter()
        .find(|e| e["name"] == "gemm")
        .expect("a gemm slice");
    assert_eq!(gemm["dur"], 100.0, "microseconds");
    assert_eq!(gemm["args"]["seq"], 0);
    assert_eq!(gemm["args"]["step"], 0);
    // One name per kind: every category list starts with the kind's name.
    for e in events.iter().filter(|e| e.get("cat").is_some()) {
        let cat = e["cat"].as_str().expect("categories are a string");
        let kind = cat.split(',').next().unwrap_or_default();
        assert!(
            slug_schema::EventKind::from_name(kind).is_some(),
            "category {cat} does not start with a kind name"
        );
    }
}

#[test]
fn a_transfer_only_the_sender_logged_still_gets_both_ends() {
    let x = fixture::transfer(41, (0, 1), 64, (1_000, 3_000), Direction::Send);
    let src = MemorySource::new(
        fixture::endpoints(2),
        vec![vec![TraceEvent::Transfer(Box::new(x))], vec![]],
        4,
    );
    let mut out = Vec::new();
    export(&src, Format::Perfetto, &mut out).expect("exports");
    let c = super::perfetto::read(&out).expect("decodes");
    let names: HashMap<u64, String> = c
        .tracks
        .iter()
        .map(|(u, t)| {
            (
                *u,
                c.tracks
                    .get(&t.parent)
                    .map(|p| p.name.clone())
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(names[&c.flow_starts[&42]], "n0/s0");
    assert_eq!(names[&c.flow_ends[&42]], "n0/s1");
}

#[test]
fn exports_skip_an_undecodable_frame_and_count_it() {
    let src = fixture::FailingSource {
        inner: fixture::pipeline(2, 4, 8),
        bad: (0, 0),
    };
    for format in [Format::Perfetto, Format::Chrome] {
        let summary = export(&src, format, &mut std::io::sink()).expect("exports the rest");
        assert_eq!(summary.unreadable_frames, 1);
        assert!(summary.slices > 0 && summary.slices < 32, "{summary:?}");
    }
}

#[test]
fn gz_export_compresses_on_a_thread_and_reports_a_full_disk() {
    let src = fixture::pipeline(2, 3, 16);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.json.gz");
    let summary = super::export_to_path(&src, Format::Chrome, &path).expect("exports");
    let events = super::chrome::read_events(&path).expect("gzip JSON");
    let kernels = events.iter().filter(|e| e["cat"] == "kernel_span").count();
    assert_eq!(kernels as u64, summary.slices);
    // A write that fails on the compressing thread is the export's error, naming the file.
    if let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") {
        let err = super::gzip_on_a_thread(full, std::path::Path::new("/dev/full"), |out| {
            export(&src, Format::Chrome, out)
        })
        .expect_err("no space left on /dev/full");
        assert!(err.to_string().contains("/dev/full"), "{err}");
    }
}

/// Transfers of an MPI recording carry the communicator, ranks and tags the manifest's table
/// gives their link (the payload's tag only past the inline limit); other transfers, and MPI
/// ones of a trace without the table, carry their transport only.
#[test]
fn mpi_transfers_carry_their_communicator_ranks_and_tags() {
    let mpi_events = |limit: Option<u64>| {
        let mut events = fixture::pipeline_events(3, 2);
        for e in events.iter_mut().flatten() {
            if let TraceEvent::Transfer(x) = e {
                x.record.transport = slug_schema::Transport::Mpi;
                // Link 1 (stage 1 to 2) keeps its own id's link: 1 << 40 | seq.
                if x.src == 1 {
                    x.record.id |= 1 << 40;
                }
                if limit == Some(0) && x.src == 0 {
                    x.record.transport = slug_schema::Transport::Tcp;
                }
            }
        }
        let src = MemorySource::new(fixture::endpoints(3), events, 16).with_names(fixture::names());
        match limit {
            Some(inline_limit) => src.with_mpi(slug_schema::MpiTable {
                communicator: "MPI_COMM_WORLD".into(),
                inline_limit,
                links: (0..2)
                    .map(|l| slug_schema::MpiLink {
                        link: l,
                        source_rank: l,
                        dest_rank: l + 1,
                        header_tag: 2 * l,
                        payload_tag: 2 * l + 1,
                    })
                    .collect(),
            }),
            None => src,
        }
    };
    let chrome = |src: &MemorySource| {
        let mut out = Vec::new();
        export(src, Format::Chrome, &mut out).expect("exports");
        let doc: serde_json::Value = serde_json::from_slice(&out).expect("json");
        doc["traceEvents"]
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["cat"] == "transfer" && e["ph"] == "X")
            .map(|e| e["args"].clone())
            .collect::<Vec<_>>()
    };
    // Every transfer inline: no payload tag.
    let args = chrome(&mpi_events(Some(u64::MAX)));
    assert_eq!(args.len(), 2 * 2 * 2, "2 links x 2 steps, send and recv");
    for a in &args {
        let link = a["id"].as_u64().unwrap() >> 40;
        assert_eq!(a["transport"], "mpi", "{a}");
        assert_eq!(a["communicator"], "MPI_COMM_WORLD", "{a}");
        assert_eq!(a["source_rank"], link, "{a}");
        assert_eq!(a["dest_rank"], link + 1, "{a}");
        assert_eq!(a["tag"], 2 * link, "{a}");
        assert!(a.get("payload_tag").is_none(), "{a}");
    }
    // Link 0's transfers as tcp, link 1's past the inline limit: header and payload tags.
    for a in chrome(&mpi_events(Some(0))) {
        if a["id"].as_u64().unwrap() >> 40 == 0 {
            assert_eq!(a["transport"], "tcp", "{a}");
            assert!(a.get("communicator").is_none(), "{a}");
        } else {
            assert_eq!(
                (&a["tag"], &a["payload_tag"]),
                (&2.into(), &3.into()),
                "{a}"
            );
        }
    }
    // No table (an MPI trace from before it): the transport only.
    for a in chrome(&mpi_events(None)) {
        assert_eq!(a["transport"], "mpi", "{a}");
        assert!(
            a.get("communicator").is_none() && a.get("tag").is_none(),
            "{a}"
        );
    }
    let mut out = Vec::new();
    export(&mpi_events(Some(0)), Format::Perfetto, &mut out).expect("exports");
    let c = super::perfetto::read(&out).expect("decodes");
    assert_eq!(c.annotations["transport"], 8);
    assert_eq!(c.annotations["communicator"], 4);
    assert_eq!(c.annotations["tag"], 4);
    assert_eq!(c.annotations["payload_tag"], 4);
}
