//! Rough cost of converting the getting-started spec.
//! Run: `cargo run --release -p portico-config --example convert_bench`

use portico_config::{convert, SourceFile};
use std::time::Instant;

fn main() {
    let spec = include_str!("../../../examples/echo/openapi.yaml");
    let files = [SourceFile::new("openapi.yaml", spec)];
    let iters = 2_000u32;
    let start = Instant::now();
    let mut methods = 0;
    for _ in 0..iters {
        match convert(std::hint::black_box(&files)) {
            Ok(c) => methods += c.service.apis[0].methods.len(),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / f64::from(iters);
    println!(
        "convert(examples/echo/openapi.yaml, {} bytes): {us:.1} µs per conversion ({methods} methods total)",
        spec.len()
    );
}
