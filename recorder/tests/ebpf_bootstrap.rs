//! The committed probe object (`src/ebpf/probes.bpf.o`) must be what `probes.bpf.c` compiles to,
//! so that building slug needs no clang. When the clang that built it is installed, this test
//! rebuilds the object the same way (`-ffile-prefix-map` and `llvm-strip -g` make the bytes
//! independent of the directory) and fails on any difference. Another clang version would emit
//! other (equally valid) bytes, so then the test says so and skips.

use std::path::{Path, PathBuf};
use std::process::Command;

fn ebpf_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/ebpf")
}

/// The commands that build `probes.bpf.o` in `dir` (which holds `probes.bpf.c`).
fn build(dir: &Path) -> Result<(), String> {
    let include = format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let prefix_map = format!("-ffile-prefix-map={}=.", dir.display());
    let steps: [(&str, Vec<&str>); 2] = [
        (
            "clang",
            vec![
                "-target",
                "bpf",
                "-O2",
                "-g",
                &prefix_map,
                &include,
                "-c",
                "probes.bpf.c",
                "-o",
                "probes.bpf.o",
            ],
        ),
        ("llvm-strip", vec!["-g", "probes.bpf.o"]),
    ];
    for (program, args) in steps {
        let out = Command::new(program)
            .args(&args)
            .current_dir(dir)
            .output()
            .map_err(|e| format!("{program}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

#[test]
fn committed_probe_object_matches_its_source() {
    let version = match Command::new("clang").arg("--version").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
        _ => {
            println!(
                "skipped: clang is not installed (Debian: apt-get install clang llvm libbpf-dev)"
            );
            return;
        }
    };
    let pinned = std::fs::read_to_string(ebpf_dir().join("probes.bpf.clang-version"))
        .expect("probes.bpf.clang-version is committed");
    if version.trim() != pinned.trim() {
        println!(
            "skipped: the probe object was built by `{}`, this is `{}`; rebuild it with that clang to compare",
            pinned.trim(),
            version.trim()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        ebpf_dir().join("probes.bpf.c"),
        dir.path().join("probes.bpf.c"),
    )
    .unwrap();
    build(dir.path()).expect("the probes compile");
    let built = std::fs::read(dir.path().join("probes.bpf.o")).unwrap();
    let committed = std::fs::read(ebpf_dir().join("probes.bpf.o")).unwrap();
    if std::env::var_os("SLUG_WRITE_PROBES").is_some() && built != committed {
        std::fs::write(ebpf_dir().join("probes.bpf.o"), &built).unwrap();
        return;
    }
    assert!(
        built == committed,
        "recorder/src/ebpf/probes.bpf.o is not what probes.bpf.c compiles to; rebuild it with \
         `SLUG_WRITE_PROBES=1 cargo test -p slug-recorder --test ebpf_bootstrap` and commit it"
    );
}
