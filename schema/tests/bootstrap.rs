//! The committed `trace.capnp.bin` (the CodeGeneratorRequest build.rs generates Rust from) must
//! match `trace.capnp`. Needs the `capnp` compiler; without it the test says so and passes.
//!
//! With the same capnp release that made the committed request, the bytes must be identical (so
//! even a changed doc comment is caught). Requests from other releases differ in their version
//! stamp and may lay out source info differently, so then the test compares what build.rs uses:
//! the Rust that capnpc generates from each, minus the version comment line.

use std::path::Path;
use std::process::Command;

fn generate(request: &[u8], out: &Path) -> String {
    capnpc::codegen::CodeGenerationCommand::new()
        .output_directory(out)
        .run(request)
        .expect("capnpc codegen");
    let text =
        std::fs::read_to_string(out.join("trace_capnp.rs")).expect("generated trace_capnp.rs");
    text.lines()
        .filter(|l| !l.starts_with("// capnp binary version"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn capnp_version(request: &[u8]) -> String {
    let message =
        capnp::serialize::read_message_from_flat_slice(&mut &request[..], Default::default())
            .expect("request is a capnp message");
    let root = message
        .get_root::<capnp::schema_capnp::code_generator_request::Reader>()
        .expect("request root");
    let v = root.get_capnp_version().expect("capnp version");
    format!("{}.{}.{}", v.get_major(), v.get_minor(), v.get_micro())
}

#[test]
fn committed_code_generator_request_matches_schema() {
    let schema_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fresh = match Command::new("capnp")
        .args(["compile", "-o-", "trace.capnp"])
        .current_dir(schema_dir)
        .output()
    {
        Ok(out) if out.status.success() => out.stdout,
        Ok(out) => panic!(
            "capnp compile trace.capnp failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => {
            eprintln!(
                "skipped: `capnp` is not on PATH, so trace.capnp.bin cannot be checked (apt-get install capnproto)"
            );
            return;
        }
    };
    let committed =
        std::fs::read(schema_dir.join("trace.capnp.bin")).expect("read trace.capnp.bin");
    if fresh == committed {
        return;
    }
    let (made_by, installed) = (capnp_version(&committed), capnp_version(&fresh));
    assert!(
        made_by != installed,
        "schema/trace.capnp.bin is stale: run `cd schema && capnp compile -o- trace.capnp > trace.capnp.bin` and commit it"
    );
    eprintln!(
        "note: trace.capnp.bin was made by capnp {made_by}, this is {installed}: comparing generated Rust only"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b) = (dir.path().join("committed"), dir.path().join("fresh"));
    assert!(
        generate(&committed, &a) == generate(&fresh, &b),
        "schema/trace.capnp.bin is stale: run `cd schema && capnp compile -o- trace.capnp > trace.capnp.bin` and commit it"
    );
}
