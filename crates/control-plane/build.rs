//! Generates the Cloud Trace v2 gRPC types and the tonic service (server for the control plane,
//! client for its tests) from proto/ with the pure-Rust compiler protox: no protoc binary.

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let dir = root.join("proto");
    for f in [
        "google/devtools/cloudtrace/v2/trace.proto",
        "google/devtools/cloudtrace/v2/tracing.proto",
        "google/rpc/status.proto",
    ] {
        println!("cargo:rerun-if-changed={}", dir.join(f).display());
    }
    let mut compiler = match protox::Compiler::new([&dir]) {
        Ok(c) => c,
        Err(e) => panic!("protox: {e:?}"),
    };
    compiler.include_imports(true);
    if let Err(e) = compiler.open_files(["google/devtools/cloudtrace/v2/tracing.proto"]) {
        panic!("proto/google/devtools/cloudtrace/v2/tracing.proto does not compile: {e:?}");
    }
    if let Err(e) = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .compile_fds(compiler.file_descriptor_set())
    {
        panic!("generating the Cloud Trace gRPC code failed: {e}");
    }
}
