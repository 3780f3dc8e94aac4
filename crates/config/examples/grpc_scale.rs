//! How gRPC conversion time grows with the number of methods.
//! Run: `cargo run --release -p portico-config --example grpc_scale -- 2000 10000`
//!
//! One service of N methods, each with a `google.api.http` option and a path variable, compiled
//! with protox; the api_config.yaml has a `*` usage rule and an exact rule for every other
//! method, so selector expansion does its largest amount of work per rule.

use portico_config::grpc::{convert, FileType, GrpcSource};
use std::fmt::Write;
use std::time::Instant;

fn main() {
    let include =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bookstore-grpc");
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    for n in if sizes.is_empty() { vec![2000] } else { sizes } {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut proto = String::from(
            "syntax = \"proto3\";\npackage big.v1;\nimport \"google/api/annotations.proto\";\nservice Big {\n",
        );
        for i in 0..n {
            let _ = writeln!(
                proto,
                "  rpc M{i}(R) returns (R) {{ option (google.api.http) = {{ get: \"/v1/m{i}/{{q}}\" }}; }}"
            );
        }
        proto.push_str("}\nmessage R { string q = 1; }\n");
        std::fs::write(dir.path().join("big.proto"), proto).expect("write proto");
        let mut c =
            protox::Compiler::new([dir.path().to_path_buf(), include.clone()]).expect("protox");
        c.include_imports(true).include_source_info(true);
        c.open_files(["big.proto"]).expect("compile");
        let set = c.encode_file_descriptor_set();
        let mut yaml = String::from(
            "type: google.api.Service\nconfig_version: 3\nname: big.example.com\napis:\n- name: big.v1.Big\nusage:\n  rules:\n  - selector: \"*\"\n    allow_unregistered_calls: true\n",
        );
        for i in (0..n).step_by(2) {
            let _ = writeln!(
                yaml,
                "  - selector: big.v1.Big.M{i}\n    allow_unregistered_calls: false"
            );
        }
        let started = Instant::now();
        let c = convert(&[
            GrpcSource::new(
                FileType::FileDescriptorSetProto,
                "api_descriptor.pb",
                set.clone(),
            ),
            GrpcSource::new(
                FileType::ServiceConfigYaml,
                "api_config.yaml",
                yaml.into_bytes(),
            ),
        ])
        .expect("convert");
        println!(
            "{n} methods, descriptor {} bytes: {:?} ({} http rules, {} usage rules)",
            set.len(),
            started.elapsed(),
            c.service.http.map_or(0, |h| h.rules.len()),
            c.service.usage.map_or(0, |u| u.rules.len()),
        );
    }
}
