//! `slug view` in a real terminal: runs the binary inside tmux, sends keys, reads the screen with
//! `capture-pane`. Skipped, with the reason printed, where tmux is not installed.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use slug_schema::synth::{SynthConfig, write_trace};

struct Tmux {
    socket: String,
}

impl Tmux {
    fn available() -> bool {
        Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux runs")
    }

    fn start(name: &str, width: u16, height: u16, command: &str) -> Tmux {
        let t = Tmux {
            socket: format!("slug-view-test-{}-{name}", std::process::id()),
        };
        let o = t.run(&[
            "new-session",
            "-d",
            "-s",
            "view",
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
            command,
        ]);
        assert!(
            o.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // Keep the pane after the command exits so its last screen can still be read.
        t.run(&["set-option", "-t", "view", "remain-on-exit", "on"]);
        t
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "view"]).stdout)
            .into_owned()
    }

    /// Waits until the screen contains `text`.
    fn wait_for(&self, text: &str) {
        self.wait_for_all(&[text]);
    }

    /// Waits until the screen contains every one of `texts` at once (a frame can reach the
    /// pane in more than one write).
    fn wait_for_all(&self, texts: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.screen();
            if texts.iter().all(|t| s.contains(t)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {texts:?}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "view"];
        args.extend_from_slice(keys);
        assert!(self.run(&args).status.success());
    }

    fn pane_dead(&self) -> bool {
        let o = self.run(&["display-message", "-p", "-t", "view", "#{pane_dead}"]);
        String::from_utf8_lossy(&o.stdout).trim() == "1"
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn trace(dir: &Path) {
    let cfg = SynthConfig {
        stages: 3,
        steps: 8,
        microbatches: 2,
        layers_per_stage: 2,
        threads: 2,
        ..SynthConfig::default()
    };
    write_trace(dir, &cfg).expect("synthetic trace written");
}

#[test]
fn view_in_tmux_navigates_and_quits() {
    if !Tmux::available() {
        eprintln!(
            "skipping view_in_tmux_navigates_and_quits: tmux is not installed (apt-get install tmux)"
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("trace");
    trace(&dir);
    let cmd = format!("{} view {}", env!("CARGO_BIN_EXE_slug"), dir.display());
    let t = Tmux::start("nav", 110, 34, &cmd);
    // Every track, the link panel and the key hints: the whole first frame.
    t.wait_for_all(&[
        "slug view",
        "node0/s0",
        "node0/s1",
        "node1/s2",
        "links:",
        "q quit",
    ]);
    t.keys(&["?"]);
    t.wait_for("jump to step N");
    t.keys(&["Escape"]);
    t.keys(&["w", "w", "w"]);
    t.keys(&["n"]);
    t.wait_for_all(&["event (esc clears)", "kind "]);
    t.keys(&["Escape", "t"]);
    t.wait_for_all(&["bottleneck:", "compute  waiting"]);
    t.keys(&["t", ":"]);
    t.wait_for("jump to step:");
    t.keys(&["3", "Enter"]);
    t.wait_for("step 3 on node0/s0 starts at");
    t.keys(&["q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.pane_dead() {
        assert!(
            Instant::now() < deadline,
            "slug view did not exit on q:\n{}",
            t.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn view_in_a_tiny_terminal_says_so() {
    if !Tmux::available() {
        eprintln!(
            "skipping view_in_a_tiny_terminal_says_so: tmux is not installed (apt-get install tmux)"
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("trace");
    trace(&dir);
    let cmd = format!("{} view {}", env!("CARGO_BIN_EXE_slug"), dir.display());
    let t = Tmux::start("tiny", 40, 8, &cmd);
    t.wait_for_all(&["terminal too small", "needs 60x16"]);
    t.keys(&["q"]);
}

#[test]
fn view_highlights_a_replay_divergence() {
    if !Tmux::available() {
        eprintln!(
            "skipping view_highlights_a_replay_divergence: tmux is not installed (apt-get install tmux)"
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("trace");
    trace(&dir);
    let report = tmp.path().join("report.json");
    std::fs::write(
        &report,
        r#"{"endpoint": 1, "step": 2, "layer": 0, "kernel": "gemm_qkv", "transfer_id": null,
            "offset": 5, "expected": 1.5, "got": 1.25, "later_differing": 9}"#,
    )
    .expect("write report");
    let cmd = format!(
        "{} view {} --divergence {}",
        env!("CARGO_BIN_EXE_slug"),
        dir.display(),
        report.display()
    );
    let t = Tmux::start("div", 110, 34, &cmd);
    // The banner, and the mark on the track (`!` appears nowhere else on this screen).
    t.wait_for_all(&[
        "first divergence: node0/s1 step 2 layer 0 kernel gemm_qkv @5: expected 1.5 got 1.25 (9 later differ)",
        "!",
    ]);
    t.keys(&["q"]);
}
