//! Entry points of the fuzz targets in `fuzz/` (cargo-fuzz, excluded from the workspace), kept
//! here so that `cargo test` runs the same code over the checked-in seeds
//! (`tests/fuzz_seeds.rs`). Each takes arbitrary bytes and must return without panicking; the
//! assertions are invariants that hold for every input.

use crate::matcher::{query_bindings, PathMatcherBuilder};
use crate::openapi::{convert, SourceFile};
use crate::template::Template;

/// An OpenAPI file through the converter, then every HTTP rule it produced into a path matcher
/// (as the proxy compiles a config) and looked up with its own template. Returns whether the
/// conversion succeeded.
pub fn openapi(data: &[u8]) -> bool {
    let Ok(conversion) = convert(&[SourceFile::new("openapi.yaml", data.to_vec())]) else {
        return false;
    };
    let service = &conversion.service;
    let rules: Vec<(&str, &str)> = service
        .http
        .iter()
        .flat_map(|h| h.rules.iter())
        .filter_map(|r| r.method_and_path())
        .collect();
    let mut builder = PathMatcherBuilder::new();
    for (i, (method, path)) in rules.iter().enumerate() {
        let _ = builder.register(method, path, i);
    }
    let matcher = builder.build();
    for (method, path) in &rules {
        if let Some(m) = matcher.matched(method, path) {
            let _ = m.bindings();
        }
    }
    let _ = serde_json::to_string(service);
    true
}

/// Lines of `METHOD TEMPLATE` registrations, an empty line, then lines of `METHOD TARGET`
/// lookups. Every template that parses must print (`Display`) as text that parses back to the
/// same template. Returns how many lookups matched.
pub fn path_template(data: &[u8]) -> usize {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let mut builder = PathMatcherBuilder::new();
    for (i, line) in lines.by_ref().enumerate() {
        if line.is_empty() {
            break;
        }
        let (method, template) = line.split_once(' ').unwrap_or(("GET", line));
        if let Ok(parsed) = Template::parse(template) {
            let printed = parsed.to_string();
            assert_eq!(
                Template::parse(&printed).as_ref(),
                Ok(&parsed),
                "{template:?} printed as {printed:?}"
            );
        }
        let _ = builder.register(method, template, i);
    }
    let matcher = builder.build();
    let mut matched = 0;
    for line in lines {
        let (method, target) = line.split_once(' ').unwrap_or(("GET", line));
        if let Some(m) = matcher.matched(method, target) {
            matched += 1;
            let value = *m.value();
            let _ = m.bindings();
            assert_eq!(matcher.lookup(method, target), Some(&value));
        }
        if let Some((_, query)) = target.split_once('?') {
            let _ = query_bindings(query, &["key", "api_key"], true);
            let _ = query_bindings(query, &[], false);
        }
    }
    matched
}
