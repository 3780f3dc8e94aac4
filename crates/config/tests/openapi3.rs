//! OpenAPI 3.0.x / 3.1.x input with Google's 3.x extensions: each extension and each security
//! scheme type lands in the config, the 3.x echo example converts to the same service as the
//! 2.0 one, and malformed 3.x documents are refused with every problem at its `file:line:col`.

use portico_config::{convert, Severity, SourceFile};
use serde_json::{json, Value};

const ECHO_V2: &str = include_str!("../../../examples/echo/openapi.yaml");
const ECHO_V3: &str = include_str!("../../../examples/echo/openapi3.yaml");

fn service(name: &str, text: &str) -> (Value, Vec<String>) {
    let conv = convert(&[SourceFile::new(name, text)]).unwrap_or_else(|e| panic!("{e}"));
    let warnings = conv.warnings.iter().map(ToString::to_string).collect();
    (
        serde_json::to_value(&conv.service).expect("serialises"),
        warnings,
    )
}

fn errors(name: &str, text: &str) -> Vec<String> {
    match convert(&[SourceFile::new(name, text)]) {
        Ok(_) => panic!("{name} was accepted"),
        Err(e) => e
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .map(ToString::to_string)
            .collect(),
    }
}

fn rule<'a>(list: &'a Value, selector: &str) -> &'a Value {
    list.as_array()
        .and_then(|a| a.iter().find(|r| r["selector"] == selector))
        .unwrap_or_else(|| panic!("no rule for {selector} in {list}"))
}

/// The config without what names the input file (its name, type and bytes).
fn without_sources(mut svc: Value) -> Value {
    svc.as_object_mut().unwrap().remove("sourceInfo");
    for api in svc["apis"].as_array_mut().unwrap() {
        api.as_object_mut().unwrap().remove("sourceContext");
    }
    svc
}

#[test]
fn echo_3x_converts_to_the_same_service_as_echo_2x() {
    let (v2, _) = service("openapi.yaml", ECHO_V2);
    let (v3, warnings) = service("openapi3.yaml", ECHO_V3);
    // Both files say the same thing (the 2.0 one is the reference).
    let (v2, v3s) = (without_sources(v2), without_sources(v3.clone()));
    for (k, want) in v2.as_object().unwrap() {
        assert_eq!(&v3s[k], want, "{k} differs");
    }
    assert_eq!(v2, v3s);
    assert_eq!(
        v3["sourceInfo"]["sourceFiles"][0]["filePath"],
        "openapi3.yaml"
    );
    assert_eq!(
        v3["sourceInfo"]["sourceFiles"][0]["fileType"],
        "OPEN_API_YAML"
    );
    assert!(
        warnings
            .iter()
            .all(|w| w.contains("does not require an API key")),
        "{warnings:?}"
    );
}
