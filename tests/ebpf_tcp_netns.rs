//! The eBPF TCP probe sees real retransmits: a tcp-transport recording runs inside a network
//! namespace of its own whose loopback drops one in four arriving data segments (nftables
//! `numgen`; this kernel has neither netem nor tc's gact), and the stages' logs must hold
//! `tcp_retransmit` events on their sockets. Only the namespace this test creates is touched; it is removed on
//! drop, also when the test fails. Needs root and `ip` and `nft` (Debian `iproute2 nftables`);
//! otherwise it prints why it skipped.

use std::process::{Command, Output};

use slug_schema::{EbpfKind, Event, EventKind, KindSet, TimeRange, Trace};

/// A network namespace with only its loopback, removed on drop.
struct Namespace(String);

impl Namespace {
    fn create() -> Result<Self, String> {
        let name = format!("slugebtcp{}", std::process::id() % 100_000);
        run("ip", &["netns", "add", &name])?;
        let ns = Namespace(name);
        run("ip", &["-n", &ns.0, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn exec(&self, program: &str, args: &[&str]) -> Result<Output, String> {
        Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .output()
            .map_err(|e| format!("cannot run ip netns exec: {e}"))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn skip_reason() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if !root {
        return Some("not root: network namespaces and eBPF probes need root".into());
    }
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!(
                "`{tool}` is not installed (Debian package {package})"
            ));
        }
    }
    None
}

#[test]
fn dropped_segments_on_a_tcp_pipeline_are_seen_as_retransmits_on_its_sockets() {
    if let Some(why) = skip_reason() {
        println!("skipped: {why}");
        return;
    }
    let ns = Namespace::create().expect("a network namespace");
    // Drop one in four data segments of over 200 bytes (never SYN/FIN/RST or a bare ACK, so
    // connections still open and close, and every drop must be retransmitted) arriving on the
    // namespace's loopback. With ~60 activation messages, no drop at all has odds ~1e-8. On input, not output: a segment netfilter drops on
    // output fails its send and TCP simply sends it later, never retransmitting it.
    let drop_rule = [
        ("add", vec!["table", "inet", "slugdrop"]),
        (
            "add",
            vec![
                "chain",
                "inet",
                "slugdrop",
                "in",
                "{ type filter hook input priority 0; }",
            ],
        ),
        (
            "add",
            vec![
                "rule",
                "inet",
                "slugdrop",
                "in",
                "iifname",
                "lo",
                "tcp",
                "flags",
                "&",
                "(syn|fin|rst)",
                "==",
                "0",
                "meta",
                "length",
                ">",
                "200",
                "numgen",
                "random",
                "mod",
                "4",
                "==",
                "0",
                "drop",
            ],
        ),
    ];
    for (verb, args) in &drop_rule {
        let mut all = vec![*verb];
        all.extend(args.iter().copied());
        let o = ns.exec("nft", &all).unwrap();
        if !o.status.success() {
            println!(
                "skipped: nftables refused the drop rule here: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace");
    let o = ns
        .exec(
            env!("CARGO_BIN_EXE_slug"),
            &[
                "record",
                "--out",
                out.to_str().unwrap(),
                "--ebpf",
                "tcp",
                "--",
                "--stages",
                "2",
                "--transport",
                "tcp",
                "--tokens",
                "32",
            ],
        )
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let captured = manifest["capabilities"]
        .as_array()
        .and_then(|caps| caps.iter().find(|c| c["name"] == "ebpf_tcp"))
        .map(|c| c["captured"] == true);
    if captured != Some(true) {
        println!("skipped: the TCP probes did not attach here: {stderr}");
        return;
    }
    let trace = Trace::open(&out).unwrap();
    let mut retransmits = 0;
    let mut seen = Vec::new();
    for endpoint in 0..2 {
        let log = trace.endpoint_log(endpoint).unwrap();
        let kinds = KindSet::of(&[EventKind::Ebpf]);
        for e in log.events_in(TimeRange::ALL, kinds) {
            let Event::Ebpf(b) = e.unwrap() else {
                continue;
            };
            seen.push(b.kind);
            if b.kind == EbpfKind::TcpRetransmit {
                let (local, remote) = ((b.arg0 >> 16) & 0xffff, b.arg0 & 0xffff);
                assert!(
                    local != 0 && remote != 0,
                    "a retransmit on a connected socket names both ports: {b:?}"
                );
                assert_ne!(b.tid, 0, "a retransmit names the stage thread: {b:?}");
                retransmits += 1;
            }
        }
    }
    println!("one in four data segments dropped: {retransmits} retransmits recorded");
    assert!(
        retransmits > 0,
        "no tcp_retransmit event although a quarter of the data segments were dropped; ebpf events: {seen:?}"
    );
}
