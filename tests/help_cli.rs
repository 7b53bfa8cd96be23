//! `--help` of every subcommand: examples everywhere, the viewer's keys, what uses nodes, and
//! one `--hosts` syntax (a comma list or the flag repeated) for run, record and replay.

#[path = "support/cli.rs"]
mod cli;

use cli::{run, text};

fn help(args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.push("--help");
    let o = run(&all);
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn every_subcommand_has_examples() {
    for cmd in [
        "run", "record", "replay", "view", "info", "export", "recover", "demo", "node", "keygen",
    ] {
        let h = help(&[cmd]);
        assert!(
            h.contains("Example"),
            "slug {cmd} --help has no examples:\n{h}"
        );
        assert!(h.contains(&format!("slug {cmd} ")), "{cmd}: {h}");
    }
    let top = help(&[]);
    assert!(top.contains("slug demo") && top.contains("--help"), "{top}");
    let demo = help(&["demo"]);
    assert!(
        demo.contains("injected") || demo.contains("one bit"),
        "{demo}"
    );
}

#[test]
fn view_lists_its_keys_and_node_names_its_users() {
    let view = help(&["view"]);
    for key in [
        "zoom in",
        "pan back",
        "track cursor",
        "filter",
        "statistics",
        "quit",
    ] {
        assert!(view.contains(key), "slug view --help lacks {key}:\n{view}");
    }
    assert!(view.contains("kernel:down"), "{view}");
    let node = help(&["node"]);
    for user in [
        "slug run --model",
        "slug record --out",
        "slug replay run1 --hosts",
        "--transport shm|tcp",
        "slug demo",
    ] {
        assert!(
            node.contains(user),
            "slug node --help does not name {user}:\n{node}"
        );
    }
}

#[test]
fn hosts_take_a_comma_list_or_the_flag_repeated() {
    for hosts in [
        vec!["--hosts", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"],
        vec![
            "--hosts",
            "127.0.0.1:1",
            "--hosts",
            "127.0.0.1:2,127.0.0.1:3",
        ],
    ] {
        let mut args = vec!["run", "--stages", "2", "--transport", "tcp"];
        args.extend(&hosts);
        let o = run(&args);
        assert!(
            text(&o).contains("--hosts names 3 node(s) but --stages is 2"),
            "{hosts:?}: {}",
            text(&o)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    for cmd in ["replay", "record"] {
        let h = help(&[cmd]);
        assert!(
            h.contains("--hosts <HOST:PORT,...>"),
            "slug {cmd} --help: {h}"
        );
        assert!(h.contains("comma list"), "{h}");
    }
    // Replay reads the same two forms (refused here for want of a trace, after parsing).
    let missing = dir.path().join("none");
    let o = run(&[
        "replay",
        missing.to_str().unwrap(),
        "--hosts",
        "127.0.0.1:1",
        "--hosts",
        "127.0.0.1:2,127.0.0.1:3",
    ]);
    assert!(text(&o).contains("no such directory"), "{}", text(&o));
}
