//! Executable documentation: every `sh` / `console` command block of README.md runs, in order,
//! against the built `slug`, so an example can never rot.
//!
//! How a block is run, in a temporary directory that stands for the user's working directory:
//! - every `slug ...` line runs (a trailing `\` continues it; `sudo ` is dropped: the test
//!   runs as whoever runs it) and must exit 0, or with the status its comment names
//!   (`# exit status 1`);
//! - `slug node --listen ...` starts one node per host the README names (`h1`..`hN`), with the
//!   line's own flags but listening on a free loopback port; `hN:PORT` in later lines becomes
//!   node N's address. The nodes serve until the test ends;
//! - `scp [-p|-r] SRC hN:DST` copies SRC to DST here (every "host" is this machine);
//! - absolute paths under `/etc/slug` and `/data` are moved under the temporary directory;
//! - `slug view` needs a terminal: it must open the trace (and any `--divergence` report) and
//!   stop only at "stdout is not one" (tests/view_tmux.rs drives the real screen);
//! - any other line (`cargo ...`) is not a slug example and is left alone; a block preceded by
//!   `<!-- no-run: REASON -->` is skipped, and the reason must be given.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// One runnable line of the README, with where it came from.
#[derive(Debug)]
struct Example {
    line: usize,
    text: String,
    expect_status: i32,
}

/// The command blocks of `readme` (language `sh` or `console`), each as its lines joined at
/// `\` continuations; blocks after a `no-run` marker are left out (their reason is checked).
fn examples(readme: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let mut lines = readme.lines().enumerate().peekable();
    let mut skip_next = false;
    while let Some((n, line)) = lines.next() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("<!-- no-run:") {
            let reason = rest.trim_end_matches("-->").trim();
            assert!(
                reason.len() > 10,
                "README.md:{}: a no-run marker must say why",
                n + 1
            );
            skip_next = true;
            continue;
        }
        let Some(lang) = trimmed.strip_prefix("```") else {
            continue;
        };
        let runnable = matches!(lang, "sh" | "console") && !skip_next;
        skip_next = false;
        let mut pending: Option<(usize, String)> = None;
        for (m, body) in lines.by_ref() {
            if body.trim_start().starts_with("```") {
                break;
            }
            if !runnable {
                continue;
            }
            let body = body.strip_prefix("$ ").unwrap_or(body);
            let (start, mut text) = match pending.take() {
                Some((start, text)) => (start, text + " " + body.trim()),
                None => (m + 1, body.trim().to_string()),
            };
            if text.ends_with('\\') {
                text.pop();
                pending = Some((start, text.trim_end().to_string()));
                continue;
            }
            if !text.is_empty() {
                out.push(parse_line(start, &text));
            }
        }
    }
    out
}

/// Splits off a `  # comment` and reads an expected exit status from it.
fn parse_line(line: usize, text: &str) -> Example {
    let (command, comment) = match text.find(" #") {
        Some(i) => (&text[..i], &text[i + 2..]),
        None => (text, ""),
    };
    let expect_status = comment
        .split("exit status ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Example {
        line,
        text: command.trim().to_string(),
        expect_status,
    }
}

/// Shell words of a README line: plain words, '...' and "..." quoting. Anything needing a
/// real shell (pipes, redirections, `&&`, `;`, `&`, `$`) is refused, so examples stay simple.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == c {
                        break;
                    }
                    word.push(q);
                }
            }
            ' ' | '\t' => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '|' | '>' | '<' | ';' | '&' | '$' | '`' => {
                panic!("`{line}`: the README examples are single commands without `{c}`")
            }
            _ => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        out.push(word);
    }
    out
}

/// The README's machine, recreated under a temporary directory.
struct World {
    dir: PathBuf,
    /// `hN` -> `127.0.0.1:PORT` of the node standing in for it.
    hosts: BTreeMap<String, String>,
    nodes: Vec<Child>,
}

impl Drop for World {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.kill();
            let _ = n.wait();
        }
    }
}

impl World {
    /// A path of the README, as it lies here.
    fn path(&self, p: &str) -> String {
        for root in ["/etc/slug", "/data"] {
            if p == root || p.starts_with(&format!("{root}/")) {
                return self
                    .dir
                    .join(p.trim_start_matches('/'))
                    .display()
                    .to_string();
            }
        }
        p.to_string()
    }

    /// A word of a README line with hosts and paths replaced.
    fn word(&self, w: &str) -> String {
        let mapped: Vec<String> = w
            .split(',')
            .map(|part| match part.split_once(':') {
                Some((host, _port)) if self.hosts.contains_key(host) => self.hosts[host].clone(),
                _ => self.path(part),
            })
            .collect();
        mapped.join(",")
    }

    fn slug(&self, args: &[String]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_slug"));
        c.args(args)
            .current_dir(&self.dir)
            .env("TMPDIR", self.dir.join("tmp"))
            .env_remove("SLUG_CLUSTER_KEY");
        c
    }

    /// Starts a node per README host with the line's flags, on a free loopback port.
    fn start_nodes(&mut self, args: &[String], host_names: &[String]) {
        assert!(self.nodes.is_empty(), "the README starts its nodes once");
        let mut args: Vec<String> = args.iter().map(|a| self.word(a)).collect();
        let at = args
            .iter()
            .position(|a| a == "--listen")
            .expect("slug node --listen ADDR");
        args[at + 1] = "127.0.0.1:0".into();
        for name in host_names {
            let mut child = self
                .slug(&args)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("start slug node");
            let mut first = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut first)
                .unwrap();
            let addr = first
                .trim()
                .strip_prefix("slug node: listening on ")
                .unwrap_or_else(|| panic!("node printed {first:?}"))
                .to_string();
            self.nodes.push(child);
            self.hosts.insert(name.clone(), addr);
        }
    }

    /// `scp [-p|-r] SRC HOST:DST`: copies SRC to DST on this machine.
    fn scp(&self, args: &[String]) {
        let files: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
        let [src, dst] = files.as_slice() else {
            panic!("scp {args:?}: expected SRC HOST:DST");
        };
        let dst = dst.split_once(':').map_or(dst.as_str(), |(_, p)| p);
        let src = self.dir.join(self.path(src));
        let mut dst = self.dir.join(self.path(dst));
        if dst.is_dir() {
            dst = dst.join(src.file_name().unwrap());
        }
        if dst != src {
            copy(&src, &dst);
        }
    }
}

fn copy(src: &Path, dst: &Path) {
    if src.is_dir() {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            copy(&e.path(), &dst.join(e.file_name()));
        }
    } else {
        std::fs::copy(src, dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
    }
}

/// `h1`, `h2`, ... as the README names them in `--hosts` lists.
fn readme_hosts(examples: &[Example]) -> Vec<String> {
    let mut hosts = std::collections::BTreeSet::new();
    for e in examples {
        for w in words(&e.text) {
            for part in w.split(',') {
                if let Some((h, port)) = part.split_once(':')
                    && h.len() >= 2
                    && h.starts_with('h')
                    && h[1..].chars().all(|c| c.is_ascii_digit())
                    && port.chars().all(|c| c.is_ascii_digit())
                {
                    hosts.insert((h[1..].parse::<u32>().unwrap(), h.to_string()));
                }
            }
        }
    }
    hosts.into_iter().map(|(_, h)| h).collect()
}

#[test]
fn every_readme_command_block_runs_as_written() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let examples = examples(&readme);
    let slug_lines = examples
        .iter()
        .filter(|e| e.text.starts_with("slug ") || e.text.starts_with("sudo slug "))
        .count();
    assert!(slug_lines >= 20, "only {slug_lines} slug examples found");
    let host_names = readme_hosts(&examples);
    let tmp = tempfile::tempdir().unwrap();
    let mut world = World {
        dir: tmp.path().to_path_buf(),
        hosts: BTreeMap::new(),
        nodes: Vec::new(),
    };
    for d in ["tmp", "etc/slug", "data"] {
        std::fs::create_dir_all(world.dir.join(d)).unwrap();
    }
    let mut ran = 0;
    for e in &examples {
        let mut w = words(&e.text);
        if w.first().is_some_and(|s| s == "sudo") {
            w.remove(0);
        }
        let Some(program) = w.first().cloned() else {
            continue;
        };
        let args = &w[1..];
        match program.as_str() {
            "scp" => world.scp(args),
            "slug" if args.first().is_some_and(|a| a == "node") => {
                world.start_nodes(args, &host_names);
            }
            "slug" => {
                let args: Vec<String> = args.iter().map(|a| world.word(a)).collect();
                let out = world.slug(&args).output().expect("run slug");
                let status = out.status.code().unwrap_or(-1);
                let stderr = String::from_utf8_lossy(&out.stderr);
                let view_without_terminal = args.first().is_some_and(|a| a == "view")
                    && stderr.contains("stdout is not one");
                assert!(
                    status == e.expect_status || view_without_terminal,
                    "README.md:{}: `{}` exited {status}, the README expects {}\n{}{stderr}",
                    e.line,
                    e.text,
                    e.expect_status,
                    String::from_utf8_lossy(&out.stdout)
                );
                ran += 1;
            }
            _ => {}
        }
    }
    assert_eq!(
        ran + 1,
        slug_lines,
        "every slug line ran (the node line starts nodes)"
    );
}

#[test]
fn blocks_lines_and_markers_are_read_as_documented() {
    let readme = "intro\n\
        ```sh\n\
        slug run --model tiny \\\n    --tokens 3     # exit status 3\n\
        cargo test\n\
        ```\n\
        <!-- no-run: needs a recording killed mid-run -->\n\
        ```sh\n\
        slug record --out x &\n\
        ```\n\
        ```\n\
        slug not a command block\n\
        ```\n\
        ```console\n\
        $ slug info \"a b\"\n\
        ```\n";
    let e = examples(readme);
    let texts: Vec<&str> = e.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "slug run --model tiny --tokens 3",
            "cargo test",
            "slug info \"a b\""
        ]
    );
    assert_eq!((e[0].line, e[0].expect_status), (3, 3));
    assert_eq!(words(&e[2].text), ["slug", "info", "a b"]);
}
