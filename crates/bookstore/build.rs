//! Generates the Bookstore's message types and the tonic service trait from
//! examples/bookstore-grpc/bookstore.proto at build time, with the pure-Rust compiler protox, so
//! building needs no protoc binary and the Rust types can never drift from the proto that
//! `gcloud endpoints services deploy` and the tests use.

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let dir = root.join("../../examples/bookstore-grpc");
    for f in [
        "bookstore.proto",
        "google/api/annotations.proto",
        "google/api/http.proto",
    ] {
        println!("cargo:rerun-if-changed={}", dir.join(f).display());
    }
    let mut compiler = match protox::Compiler::new([&dir]) {
        Ok(c) => c,
        Err(e) => panic!("protox: {e:?}"),
    };
    compiler.include_imports(true).include_source_info(true);
    if let Err(e) = compiler.open_files(["bookstore.proto"]) {
        panic!("examples/bookstore-grpc/bookstore.proto does not compile: {e:?}");
    }
    // The descriptor set `gcloud endpoints services deploy` takes (what `protoc
    // --include_imports --include_source_info --descriptor_set_out` writes), encoded by the
    // compiler itself: re-encoding through prost_types would drop the google.api.http options.
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    std::fs::write(
        out.join("bookstore_descriptor.pb"),
        compiler.encode_file_descriptor_set(),
    )
    .expect("write the descriptor set");
    let fds = compiler.file_descriptor_set();
    if let Err(e) = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .compile_fds(fds)
    {
        panic!("generating the Bookstore's Rust code failed: {e}");
    }
}
