//! Generates the Rust bindings of `trace.capnp` from the committed CodeGeneratorRequest
//! (`trace.capnp.bin`), so building slug never needs the `capnp` compiler installed.
//! `tests/bootstrap.rs` checks that the committed request matches `trace.capnp`.

use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let request = manifest_dir.join("trace.capnp.bin");
    println!("cargo::rerun-if-changed={}", request.display());
    let file = std::fs::File::open(&request)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}; regenerate it with `cd schema && capnp compile -o- trace.capnp > trace.capnp.bin`", request.display()));
    capnpc::codegen::CodeGenerationCommand::new()
        .output_directory(&out_dir)
        .run(std::io::BufReader::new(file))
        .unwrap_or_else(|e| panic!("generating Rust from {}: {e}", request.display()));
}
