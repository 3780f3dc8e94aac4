//! The fuzz targets' checked-in seeds (`fuzz/seeds/<target>/`) through the same functions the
//! targets call (`portico_config::fuzz`), on every `cargo test`: a short, fixed-input smoke run
//! of the fuzzing harness, and a check that the seeds still reach what they were written for.

use std::path::PathBuf;

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../../fuzz/seeds/{target}"));
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.expect("dir entry").path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("seed"))
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

#[test]
fn openapi_seeds() {
    for (name, data) in seeds("openapi") {
        let converted = portico_config::fuzz::openapi(&data);
        // `broken.yaml` is the Service Management tests' invalid spec, `alias_bomb.yaml` ten
        // nested levels of ten aliases (refused by the alias budget) and
        // `openapi3_malformed.yaml` one OpenAPI 3.x problem of each kind; the others convert
        // (`openapi3_*`: OpenAPI 3.0 and 3.1 with Google's 3.x extensions).
        let refused = matches!(
            name.as_str(),
            "broken.yaml" | "alias_bomb.yaml" | "openapi3_malformed.yaml"
        );
        assert_eq!(converted, !refused, "{name}");
    }
}

#[test]
fn path_template_seeds() {
    let matched: Vec<(String, usize)> = seeds("path_template")
        .into_iter()
        .map(|(name, data)| {
            let n = portico_config::fuzz::path_template(&data);
            (name, n)
        })
        .collect();
    for (name, n) in &matched {
        if name != "invalid" {
            assert!(*n > 0, "{name}: no lookup matched");
        }
    }
}
