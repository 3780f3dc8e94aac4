//! How conversion time grows with the number of paths.
//! Run: `cargo run --release -p portico-config --example convert_scale -- 3000 6000 12000 60000`
//!
//! Each path is one `GET /items{i}/{id}` operation with an operationId, a path parameter, a
//! response and an API-key requirement: about 200 bytes of YAML per path, the shape of a large
//! generated spec.

use portico_config::{convert, SourceFile};
use std::fmt::Write;
use std::time::Instant;

fn spec(paths: usize) -> String {
    let mut s = String::from(
        "swagger: \"2.0\"\ninfo:\n  title: Scale\n  version: 1.0.0\nhost: scale.endpoints.p.cloud.goog\n\
         securityDefinitions:\n  api_key:\n    type: apiKey\n    name: key\n    in: query\npaths:\n",
    );
    for i in 0..paths {
        let _ = write!(
            s,
            "  /items{i}/{{id}}:\n    get:\n      operationId: getItem{i}\n      parameters:\n\
             \x20       - name: id\n          in: path\n          required: true\n          type: string\n\
             \x20     responses:\n        '200':\n          description: OK\n      security:\n\
             \x20       - api_key: []\n"
        );
    }
    s
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![3_000, 6_000, 12_000]
    } else {
        sizes
    };
    for n in sizes {
        let text = spec(n);
        let files = [SourceFile::new("openapi.yaml", text.as_bytes())];
        let start = Instant::now();
        match convert(std::hint::black_box(&files)) {
            Ok(c) => println!(
                "{n} paths ({} bytes): {:.3} s, {} methods",
                text.len(),
                start.elapsed().as_secs_f64(),
                c.service.apis[0].methods.len()
            ),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
}
