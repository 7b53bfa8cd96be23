//! `--transport rdma` from the binary on a host without an RDMA device (this one; the
//! Soft-RoCE guest of `tests/rdma_guest.rs` has one). Without the `rdma` feature the flag says
//! how to build it; with it (`cargo test --features rdma --test rdma_cli`) run, record and
//! replay stop before any work with one line naming what verbs answered and the way out.

use std::path::Path;

#[path = "support/cli.rs"]
mod cli;

/// Whether this host has an RDMA device the kernel knows of (then the no-device line cannot
/// be seen here).
#[cfg(feature = "rdma")]
fn host_has_rdma() -> bool {
    std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some())
}

/// Runs each command line, which must fail at once (exit 2) with `expect` in its only line of
/// output, having created nothing.
fn refused_before_work(dir: &Path, expect: &[&str]) {
    let out_dir = dir.join("rec");
    let trace = dir.join("local-trace");
    let run = [
        "run",
        "--model",
        "tiny",
        "--stages",
        "2",
        "--transport",
        "rdma",
    ];
    let out = out_dir.to_str().unwrap();
    let record = [
        "record",
        "--out",
        out,
        "--",
        "--model",
        "tiny",
        "--stages",
        "2",
        "--transport",
        "rdma",
    ];
    let ladder = ["ladder", "--transport", "rdma", "--model", "tiny"];
    for args in [&run[..], &record[..], &ladder[..]] {
        let o = cli::run(args);
        let t = cli::text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {t}");
        assert_eq!(t.trim().lines().count(), 1, "{args:?}: one line: {t}");
        for e in expect {
            assert!(t.contains(e), "{args:?}: {e:?} in {t}");
        }
        assert!(!out_dir.exists(), "{args:?} created {}", out_dir.display());
    }
    // A trace recorded locally, replayed over rdma: refused before any stage starts.
    let trace = trace.to_str().unwrap();
    let o = cli::run(&[
        "record", "--out", trace, "--", "--model", "tiny", "--stages", "2", "--tokens", "2",
    ]);
    assert!(o.status.success(), "{}", cli::text(&o));
    let o = cli::run(&["replay", trace, "--transport", "rdma"]);
    let t = cli::text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert_eq!(t.trim().lines().count(), 1, "replay: one line: {t}");
    for e in expect {
        assert!(t.contains(e), "replay: {e:?} in {t}");
    }
}

#[cfg(not(feature = "rdma"))]
#[test]
fn without_the_feature_transport_rdma_says_how_to_build_it() {
    let dir = tempfile::tempdir().unwrap();
    refused_before_work(
        dir.path(),
        &[
            "built without RDMA verbs",
            "--features rdma",
            "libibverbs-dev",
        ],
    );
}

#[cfg(feature = "rdma")]
#[test]
fn without_a_device_transport_rdma_stops_before_any_work_naming_the_fix() {
    if host_has_rdma() {
        eprintln!("skipping: this host has an RDMA device (/sys/class/infiniband)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    refused_before_work(
        dir.path(),
        &[
            "slug: error: no RDMA device (ibv_get_device_list: ",
            "); use --transport tcp",
        ],
    );
}
