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
    let fds = match protox::compile(["bookstore.proto"], [&dir]) {
        Ok(fds) => fds,
        Err(e) => panic!("examples/bookstore-grpc/bookstore.proto does not compile: {e:?}"),
    };
    if let Err(e) = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .compile_fds(fds)
    {
        panic!("generating the Bookstore's Rust code failed: {e}");
    }
}
