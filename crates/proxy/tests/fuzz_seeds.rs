//! The fuzz targets' checked-in seeds (`fuzz/seeds/<target>/`) through the same functions the
//! targets call (`portico_proxy::fuzz`), on every `cargo test`: a short, fixed-input smoke run
//! of the fuzzing harness, and a check that the seeds still mean what they were made to mean.

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
fn jwt_seeds() {
    // `padded`: a padded signature is accepted, as ESP accepted it; `no_sub`: `sub` is optional,
    // as in ESP since 1.37.
    let valid = [
        "rs256",
        "es256",
        "eddsa",
        "hs256",
        "no_kid",
        "no_exp",
        "unicode_claims",
        "padded",
        "no_sub",
    ];
    for (name, data) in seeds("jwt") {
        let outcome = portico_proxy::fuzz::jwt(&data);
        if valid.contains(&name.as_str()) {
            assert!(outcome.is_ok(), "{name}: {outcome:?}");
        } else {
            assert!(outcome.is_err(), "{name} verified: {outcome:?}");
        }
    }
}

#[test]
fn request_head_seeds() {
    // What each seed settles to with the default flags: `METHOD target`, or refused.
    let expected: &[(&str, Option<&str>)] = &[
        ("absolute_form", Some("GET /secret?api_key=k")),
        ("backslash", Some("GET /secret")),
        ("connect", None),
        ("double_slash", Some("GET /secret/a")),
        ("encoded_dotdot_slash", None),
        ("encoded_dots_query", Some("GET /secret?key=abc&q=/../x")),
        ("encoded_nul", None),
        ("encoded_unreserved", Some("GET /secret")),
        ("identity_headers", Some("GET /items/1")),
        ("lowercase_method", None),
        ("override_get", Some("GET /items/1")),
        ("plain_encoded_slash", Some("GET /public/a%2Fb")),
    ];
    let seeds = seeds("request_head");
    assert_eq!(seeds.len(), expected.len(), "a seed without an expectation");
    for ((name, data), (want_name, want)) in seeds.iter().zip(expected) {
        assert_eq!(name, want_name);
        let got = portico_proxy::fuzz::request_head(data)
            .unwrap_or_else(|| panic!("{name}: not a request head"));
        match want {
            Some(w) => assert_eq!(got.as_deref(), Ok(*w), "{name}"),
            None => assert!(got.is_err(), "{name} settled: {got:?}"),
        }
    }
}
