//! Malformed specs: each must be rejected with every problem listed, at the right
//! `file:line:column`, in a plain sentence.

use portico_config::{convert, Severity, SourceFile};

/// The error lines (`file:line:col: message`) a conversion of `text` produces.
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

/// A valid spec header; cases append `paths` and friends. Lines 1–4.
const HEAD: &str = "swagger: \"2.0\"\ninfo:\n  title: T\n  version: 1.0.0\nhost: api.example.com\n";

fn spec(rest: &str) -> String {
    format!("{HEAD}{rest}")
}

const OK_RESPONSES: &str = "      responses:\n        200:\n          description: ok\n";

#[test]
fn yaml_syntax_error() {
    assert_eq!(
        errors("openapi.yaml", "swagger: \"2.0\"\ninfo: [a, b\nhost: x\n"),
        ["openapi.yaml:3:5: invalid YAML: illegal placement of ':' indicator"]
    );
}

#[test]
fn json_syntax_error() {
    assert_eq!(
        errors("openapi.json", "{\n  \"swagger\": \"2.0\",\n  \"host\": \"a\n\"\n}\n"),
        ["openapi.json:3:12: invalid JSON: control character (\\u0000-\\u001F) found while parsing a string"]
    );
}

#[test]
fn openapi_versions_other_than_3_0_and_3_1_are_refused() {
    assert_eq!(
        errors(
            "openapi.yaml",
            "openapi: 3.2.0\ninfo: {title: T, version: v1}\nservers: [{url: 'https://a.example.com', x-google-endpoint: {}}]\npaths: {}\n"
        ),
        ["openapi.yaml:1:10: OpenAPI version \"3.2.0\" is not supported: Portico accepts swagger: \"2.0\", openapi: 3.0.x and openapi: 3.1.x"]
    );
}

#[test]
fn not_a_mapping_or_not_swagger() {
    assert_eq!(
        errors("openapi.yaml", "SOME RANDOM TEXT, NOT A SPEC\n"),
        ["openapi.yaml:1:1: an OpenAPI file must be a mapping (object) at the top level, not a string"]
    );
    assert_eq!(
        errors("openapi.yaml", "host: a.example.com\n"),
        ["openapi.yaml:1:1: missing required field \"swagger\": an OpenAPI 2.0 file must declare swagger: \"2.0\""]
    );
    assert_eq!(
        errors("api_config.yaml", "type: google.api.Service\nconfig_version: 3\nname: x.example.com\n"),
        ["api_config.yaml:1:7: this is a Google service configuration (type: google.api.Service, as used for gRPC APIs), not an OpenAPI file; only OpenAPI 2.0 files can be converted"]
    );
    assert_eq!(
        errors("openapi.yaml", "swagger: \"1.2\"\n"),
        ["openapi.yaml:1:10: swagger version \"1.2\" is not supported: only \"2.0\" is accepted"]
    );
}

#[test]
fn missing_host_info_and_paths_are_all_listed() {
    let e = errors("openapi.yaml", "swagger: \"2.0\"\n");
    assert_eq!(
        e,
        [
            "openapi.yaml:1:1: missing required field \"host\": the service name is taken from host (e.g. host: \"my-api.endpoints.my-project.cloud.goog\")",
            "openapi.yaml:1:1: missing required field \"info\": it must give the API's title and version",
            "openapi.yaml:1:1: missing required field \"paths\": the API has no operations",
        ]
    );
    // Display lists every problem, one per line.
    let err = convert(&[SourceFile::new("openapi.yaml", "swagger: \"2.0\"\n")]).unwrap_err();
    assert_eq!(err.to_string(), e.join("\n"));
}

#[test]
fn partial_segment_and_misplaced_double_wildcard() {
    let text = spec(&format!(
        "paths:\n  /items/overview.{{format}}:\n    get:\n      operationId: a\n{OK_RESPONSES}  /files/**/*:\n    get:\n      operationId: b\n{OK_RESPONSES}  /a//b:\n    get:\n      operationId: c\n{OK_RESPONSES}"
    ));
    assert_eq!(
        errors("openapi.yaml", &text),
        [
            "openapi.yaml:7:3: path \"/items/overview.{format}\" is not supported: variable \"{format}\" must be a whole path segment, but it is part of \"overview.{format}\"",
            "openapi.yaml:13:3: path \"/files/**/*\" is not supported: only literal segments may follow \"**\" (no \"*\", \"**\" or variable after it)",
            "openapi.yaml:19:3: path \"/a//b\" is not supported: segment 2 is empty (\"//\"); empty path segments are not allowed",
        ]
    );
}

#[test]
fn invalid_host_names() {
    for (host, why) in [
        ("https://api.example.com", "remove the scheme \"https://\""),
        (
            "api.example.com:8080",
            "a custom port in host is not allowed",
        ),
        (
            "api_example.com",
            "character '_' is not allowed (use letters, digits, '-' and '.')",
        ),
    ] {
        let text = format!(
            "swagger: \"2.0\"\ninfo: {{title: T, version: v1}}\nhost: \"{host}\"\npaths: {{}}\n"
        );
        assert_eq!(
            errors("openapi.yaml", &text),
            [format!(
                "openapi.yaml:3:7: host \"{host}\" is not a valid service name: {why}"
            )]
        );
    }
}

#[test]
fn duplicate_operation_ids() {
    let text = spec(&format!(
        "paths:\n  /a:\n    get:\n      operationId: list\n{OK_RESPONSES}  /b:\n    get:\n      operationId: list\n{OK_RESPONSES}    post:\n      operationId: \"list.\"\n{OK_RESPONSES}"
    ));
    assert_eq!(
        errors("openapi.yaml", &text),
        [
            "openapi.yaml:15:20: Operation 'get' in path '/b': operationId \"list\" is already used by get /a (line 9); operationIds must be unique",
            "openapi.yaml:20:20: Operation 'post' in path '/b': operation name \"list.\" becomes method \"List\", which get /a (line 9) already uses; make the operationIds unique",
        ]
    );
}

#[test]
fn undeclared_path_parameter() {
    let text = spec(&format!(
        "paths:\n  /shelves/{{shelf}}/books/{{book}}:\n    get:\n      operationId: getBook\n      parameters:\n        - name: shelf\n          in: path\n          required: true\n          type: string\n{OK_RESPONSES}"
    ));
    assert_eq!(
        errors("openapi.yaml", &text),
        ["openapi.yaml:8:5: Operation 'get' in path '/shelves/{shelf}/books/{book}': path parameter \"book\" is not declared; add a parameter with name: book and in: path"]
    );
}

#[test]
fn security_problems() {
    let text = spec(&format!(
        "securityDefinitions:
  api_key: {{type: apiKey, name: key, in: query}}
  jwt: {{type: oauth2, flow: implicit, authorizationUrl: \"\", x-google-issuer: a@b.c}}
  basic_auth: {{type: basic}}
paths:
  /undefined:
    get:
      operationId: undefinedScheme
      security:
        - nobody: []
{OK_RESPONSES}  /or:
    get:
      operationId: keyOrJwt
      security:
        - api_key: []
        - jwt: []
{OK_RESPONSES}"
    ));
    assert_eq!(
        errors("openapi.yaml", &text),
        [
            "openapi.yaml:9:22: securityDefinition \"basic_auth\" has type \"basic\", which is not supported; use apiKey, or oauth2 with x-google-issuer for JWTs",
            "openapi.yaml:15:11: Operation 'get' in path '/undefined': security requirement \"nobody\" is not defined in securityDefinitions",
            "openapi.yaml:23:9: Operation 'get' in path '/or': an API key cannot be OR'ed with another security scheme (alternatives: {api_key} OR {jwt}); require the API key in every alternative, or in none",
        ]
    );
}

#[test]
fn jwt_providers_cannot_be_anded() {
    let text = spec(&format!(
        "securityDefinitions:
  a: {{type: oauth2, flow: implicit, authorizationUrl: \"\", x-google-issuer: a}}
  b: {{type: oauth2, flow: implicit, authorizationUrl: \"\", x-google-issuer: b}}
paths:
  /both:
    get:
      operationId: both
      security:
        - a: []
          b: []
{OK_RESPONSES}"
    ));
    assert_eq!(
        errors("openapi.yaml", &text),
        ["openapi.yaml:14:11: Operation 'get' in path '/both': one security requirement ANDs the JWT providers \"a\", \"b\"; only one provider per requirement is supported, list them as separate requirements to accept a token from any of them"]
    );
}

#[test]
fn bad_backend() {
    let text = spec(&format!(
        "x-google-backend:
  address: \"${{BACKEND_URL}}\"
paths:
  /a:
    get:
      operationId: a
      x-google-backend:
        address: ftp://files.example.com
        path_translation: SOMETIMES
        jwt_audience: x
        disable_auth: true
        timeout: 3
{OK_RESPONSES}"
    ));
    assert_eq!(
        errors("openapi.yaml", &text),
        [
            "openapi.yaml:7:12: x-google-backend address \"${BACKEND_URL}\" is not valid: relative URL without a base; expected a URL such as https://backend.example.com",
            "openapi.yaml:13:18: x-google-backend address \"ftp://files.example.com\" is not valid: scheme \"ftp\" is not supported (use http, https, grpc or grpcs)",
            "openapi.yaml:14:27: path_translation must be APPEND_PATH_TO_ADDRESS or CONSTANT_ADDRESS",
            "openapi.yaml:16:23: x-google-backend cannot set both jwt_audience and disable_auth",
            "openapi.yaml:17:9: unknown field \"timeout\" in x-google-backend (allowed: address, jwt_audience, disable_auth, path_translation, deadline, protocol)",
        ]
    );
}

#[test]
fn bad_quota() {
    let text = spec(&format!(
        "x-google-management:
  metrics:
    - name: reads
      valueType: INT64
      metricKind: DELTA
  quota:
    limits:
      - name: read-limit
        metric: reads
        unit: \"1/{{project}}/{{region}}\"
        values: {{STANDARD: 100}}
      - name: write-limit
        metric: writes
        unit: \"1/min/{{project}}\"
        values: {{STANDARD: 10}}
paths:
  /a:
    get:
      operationId: a
      x-google-quota:
        metricCosts:
          reads: 1
          nonexistent: 1
{OK_RESPONSES}"
    ));
    assert_eq!(
        errors("openapi.yaml", &text),
        [
            "openapi.yaml:15:15: quota limit \"read-limit\" has unit \"1/{project}/{region}\"; only per-minute, per-project limits (unit: \"1/min/{project}\") are supported",
            "openapi.yaml:18:17: quota limit \"write-limit\" refers to metric \"writes\", which is not defined in x-google-management.metrics",
            "openapi.yaml:28:11: x-google-quota of method '1.api_example_com.A' refers to undefined metric(s) 'nonexistent'; define them under x-google-management.metrics",
        ]
    );
}

#[test]
fn wrong_quota_field_name() {
    let text = spec("x-google-management:\n  quota:\n    limit: []\npaths: {}\n");
    assert_eq!(
        errors("openapi.yaml", &text),
        ["openapi.yaml:8:5: unknown field \"limit\" in x-google-management.quota (allowed: limits)"]
    );
}

#[test]
fn invalid_x_google_allow_and_endpoints() {
    let text = spec(
        "x-google-allow: everything\nx-google-endpoints:\n  - name: other.example.com\n    allowCors: yes\npaths: {}\n",
    );
    assert_eq!(
        errors("openapi.yaml", &text),
        [
            "openapi.yaml:6:17: x-google-allow must be \"all\" or \"configured\", not \"everything\"",
            "openapi.yaml:8:11: x-google-endpoints name \"other.example.com\" must equal the host \"api.example.com\"",
        ]
    );
}

#[test]
fn broken_references() {
    let text = spec(&format!(
        "paths:\n  /a:\n    post:\n      operationId: a\n      parameters:\n        - in: body\n          name: b\n          schema:\n            $ref: \"#/definitions/Missing\"\n        - $ref: \"other.yaml#/parameters/p\"\n{OK_RESPONSES}"
    ));
    assert_eq!(
        errors("openapi.yaml", &text),
        [
            "openapi.yaml:14:19: reference \"#/definitions/Missing\" cannot be resolved: the file has no \"definitions\" section",
            "openapi.yaml:15:17: reference \"other.yaml#/parameters/p\" cannot be resolved: the submission has no file \"other.yaml\" (its files: openapi.yaml); add the file to the deployment",
        ]
    );
}

#[test]
fn duplicate_yaml_keys() {
    let text = spec("paths: {}\nhost: other.example.com\n");
    assert_eq!(
        errors("openapi.yaml", &text),
        ["openapi.yaml:7:1: duplicate key \"host\" (first defined at line 5, column 1)"]
    );
}

#[test]
fn multiple_files_must_share_the_host() {
    let a = spec("paths: {}\n");
    let b =
        "swagger: \"2.0\"\ninfo: {title: T, version: 2.0.0}\nhost: other.example.com\npaths: {}\n";
    let err = convert(&[SourceFile::new("a.yaml", a), SourceFile::new("b.yaml", b)]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "b.yaml:3:7: host \"other.example.com\" differs from host \"api.example.com\" in a.yaml; all files of one service must have the same host"
    );
    // A file without host says so, once (not also that its host differs).
    let d = "swagger: \"2.0\"\ninfo: {title: T, version: 2.0.0}\npaths: {}\n";
    let err = convert(&[
        SourceFile::new("d.yaml", d),
        SourceFile::new("a.yaml", spec("paths: {}\n")),
    ])
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "d.yaml:1:1: missing required field \"host\": the service name is taken from host (e.g. host: \"my-api.endpoints.my-project.cloud.goog\")"
    );
    let c = spec("paths: {}\n").replace("1.0.0", "1.2.0");
    let err = convert(&[
        SourceFile::new("a.yaml", spec("paths: {}\n")),
        SourceFile::new("c.yaml", c),
    ])
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "c.yaml:4:12: API \"1.api_example_com\" (info.version \"1.2.0\") is also defined by a.yaml (info.version \"1.0.0\"); files of one service need different major versions or x-google-api-name values"
    );
}

#[test]
fn unknown_google_extensions_are_warnings() {
    let text = spec("x-google-frobnicate: true\nx-vendor-thing: 1\npaths: {}\n");
    let conv = convert(&[SourceFile::new("openapi.yaml", text)]).unwrap_or_else(|e| panic!("{e}"));
    let w: Vec<String> = conv.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        w,
        ["openapi.yaml:6:1: unknown extension \"x-google-frobnicate\" is ignored"]
    );
    assert_eq!(conv.warnings[0].location(), "openapi.yaml:6:1");
}

#[test]
fn empty_input_list_and_non_utf8() {
    let err = convert(&[]).unwrap_err();
    assert_eq!(err.to_string(), "no OpenAPI file was given");
    let err = convert(&[SourceFile::new(
        "x.yaml",
        b"swagger: \"2.0\"\nhost: \xff\n".to_vec(),
    )])
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "x.yaml:2:1: the file is not valid UTF-8 text"
    );
}

#[test]
fn top_level_security_problems_are_reported_once() {
    let text = spec(&format!(
        "securityDefinitions:
  api_key: {{type: apiKey, name: key, in: query}}
  jwt: {{type: oauth2, flow: implicit, authorizationUrl: \"\", x-google-issuer: a}}
security:
  - api_key: []
  - jwt: []
  - ghost: []
paths:
  /a:
    get:
      operationId: a
{OK_RESPONSES}  /b:
    get:
      operationId: b
{OK_RESPONSES}"
    ));
    assert_eq!(
        errors("openapi.yaml", &text),
        [
            "openapi.yaml:10:3: Top-level security: an API key cannot be OR'ed with another security scheme (alternatives: {api_key} OR {jwt}); require the API key in every alternative, or in none",
            "openapi.yaml:12:5: Top-level security: security requirement \"ghost\" is not defined in securityDefinitions",
        ]
    );
}

mod never_panics {
    use super::*;
    use proptest::prelude::*;

    const GETTING_STARTED: &str = include_str!("fixtures/getting-started.yaml");
    const ALL_EXTENSIONS: &str = include_str!("fixtures/all-extensions.yaml");

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn on_arbitrary_text(text in "\\PC{0,200}") {
            let _ = convert(&[SourceFile::new("x.yaml", text.clone())]);
            let _ = convert(&[SourceFile::new("x.json", text)]);
        }

        /// Dropping lines from real specs produces every kind of structural damage.
        #[test]
        fn on_damaged_specs(drop in proptest::collection::vec(0usize..140, 1..6), which in 0usize..2) {
            let base = if which == 0 { GETTING_STARTED } else { ALL_EXTENSIONS };
            let text: String = base
                .lines()
                .enumerate()
                .filter(|(i, _)| !drop.contains(i))
                .map(|(_, l)| format!("{l}\n"))
                .collect();
            match convert(&[SourceFile::new("openapi.yaml", text)]) {
                Ok(c) => prop_assert!(!c.service.name.is_empty()),
                Err(e) => {
                    // Every error carries a position inside the file.
                    for d in e.errors() {
                        prop_assert!(d.line >= 1 && d.column >= 1, "{d}");
                    }
                    prop_assert!(e.errors().count() >= 1);
                }
            }
        }
    }
}

#[test]
fn operations_that_match_the_same_requests() {
    let param = |n: &str| {
        format!("      parameters: [{{name: {n}, in: path, required: true, type: string}}]\n")
    };
    let text = spec(&format!(
        "paths:\n  /a/{{x}}:\n    get:\n      operationId: byX\n{}{OK_RESPONSES}  /a/{{y}}:\n    get:\n      operationId: byY\n{}{OK_RESPONSES}    post:\n      operationId: postY\n{}{OK_RESPONSES}",
        param("x"),
        param("y"),
        param("y")
    ));
    assert_eq!(
        errors("openapi.yaml", &text),
        ["openapi.yaml:15:5: Operation 'get' in path '/a/{y}': GET /a/{y} matches exactly the same requests as get /a/{x}; one of them could never be called"]
    );
}

#[test]
fn incomplete_api_key_definitions() {
    let text = spec(
        "securityDefinitions:\n  no_name:\n    type: apiKey\n    in: query\n  cookie_key:\n    type: apiKey\n    name: k\n    in: cookie\npaths: {}\n",
    );
    assert_eq!(
        errors("openapi.yaml", &text),
        [
            "openapi.yaml:8:5: securityDefinition \"no_name\" (apiKey) must set name: the query parameter or header that carries the key",
            "openapi.yaml:13:9: securityDefinition \"cookie_key\" (apiKey) must set in: query or in: header, not \"cookie\"",
        ]
    );
}

#[test]
fn self_referential_definitions() {
    let text = spec(
        "paths: {}\ndefinitions:\n  Node:\n    type: object\n    properties:\n      next: {$ref: \"#/definitions/Node\"}\n  A:\n    type: array\n    items: {$ref: \"#/definitions/B\"}\n  B:\n    $ref: \"#/definitions/A\"\n",
    );
    assert_eq!(
        errors("openapi.yaml", &text),
        ["openapi.yaml:12:3: definition \"A\" refers back to itself only through $ref or array items (A → B → A), so no value can have this type"]
    );
}

#[test]
fn operations_need_responses() {
    let text = spec("paths:\n  /a:\n    get:\n      operationId: a\n");
    assert_eq!(
        errors("openapi.yaml", &text),
        ["openapi.yaml:8:5: Operation 'get' in path '/a': missing required field \"responses\" (OpenAPI 2.0 requires at least one, e.g. responses: {200: {description: OK}})"]
    );
}

/// A 600-byte file of nested YAML aliases under an `x-` key is refused at the
/// alias that crosses the budget, with the file and line, instead of expanding to 10^10 nodes.
#[test]
fn yaml_alias_bomb_is_refused_with_its_position() {
    let mut text = spec("x-bomb:\n  l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let refs = vec![format!("*l{}", i - 1); 10].join(", ");
        text.push_str(&format!("  l{i}: &l{i} [{refs}]\n"));
    }
    text.push_str(&format!("paths:\n  /a:\n    get:\n{OK_RESPONSES}"));
    let errs = errors("openapi.yaml", &text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    // Line 12 is l5: its ten aliases of l4 (111,111 nodes each) cross 10^6 copied nodes.
    assert!(errs[0].starts_with("openapi.yaml:12:"), "{}", errs[0]);
    assert!(
        errs[0].contains("YAML aliases expand this document beyond 1000000 copied nodes"),
        "{}",
        errs[0]
    );
}

#[test]
fn deep_nesting_is_refused_with_its_position() {
    let text = spec(&format!("x-deep:\n{}x\n", "- ".repeat(100_000)));
    let errs = errors("openapi.yaml", &text);
    assert_eq!(
        errs,
        ["openapi.yaml:7:255: lists and mappings are nested more than 128 levels deep"]
    );
}

/// Definitions that alias each other in a long chain, and a cycle at its end: found once, at
/// the first member of the cycle.
#[test]
fn long_alias_chains_between_definitions() {
    let mut text = spec(&format!(
        "paths:\n  /a:\n    get:\n{OK_RESPONSES}definitions:\n"
    ));
    let n = 3000;
    for i in 0..n {
        text.push_str(&format!("  D{i}:\n    $ref: '#/definitions/D{}'\n", i + 1));
    }
    text.push_str(&format!(
        "  D{n}:\n    type: array\n    items:\n      $ref: '#/definitions/D{}'\n",
        n - 1
    ));
    let errs = errors("openapi.yaml", &text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    let line = 13 + 2 * (n - 1);
    assert_eq!(
        errs[0],
        format!("openapi.yaml:{line}:3: definition \"D{}\" refers back to itself only through $ref or array items (D{} → D{n} → D{}), so no value can have this type", n - 1, n - 1, n - 1)
    );
}

/// Numbers the proxy turns into time spans and counts are refused at submit,
/// with file:line, when no proxy could use them (`deadline: 1e300` used to crash every proxy).
#[test]
fn out_of_range_numbers_are_refused() {
    let op = |path: &str, deadline: &str, cost: &str| {
        format!(
            "  {path}:\n    get:\n      operationId: op{}\n      x-google-backend:\n        address: https://b.example.com\n        deadline: {deadline}\n      x-google-quota:\n        metricCosts:\n          reads: {cost}\n{OK_RESPONSES}",
            path.trim_start_matches('/')
        )
    };
    let text = spec(&format!(
        "x-google-management:\n  metrics:\n    - name: reads\n  quota:\n    limits:\n      - name: r\n        metric: reads\n        unit: 1/min/{{project}}\n        values: {{STANDARD: 10}}\npaths:\n{}{}{}{}{}{}{}",
        op("/a", "1e300", "1"),
        op("/b", "-5", "1"),
        op("/c", ".nan", "1"),
        op("/d", ".inf", "1"),
        op("/e", "0.0000001", "1"),
        op("/f", "86401", "9223372036854775807"),
        op("/g", "86400", "1000000000"),
    ));
    let range = "is out of range: a deadline is a number of seconds from 0.001 to 86400 (one day)";
    assert_eq!(
        errors("openapi.yaml", &text),
        [
            format!("openapi.yaml:21:19: x-google-backend deadline 1e300 {range}"),
            "openapi.yaml:33:19: deadline must be a positive number of seconds".to_string(),
            "openapi.yaml:45:19: deadline must be a positive number of seconds".to_string(),
            "openapi.yaml:57:19: deadline must be a positive number of seconds".to_string(),
            format!("openapi.yaml:69:19: x-google-backend deadline 0.0000001 {range}"),
            format!("openapi.yaml:81:19: x-google-backend deadline 86401 {range}"),
            "openapi.yaml:84:18: Operation 'get' in path '/f': the cost 9223372036854775807 of metric \"reads\" is out of range: a cost is a number from 0 to 1000000000 per request".to_string(),
        ]
    );
}

/// OpenAPI 3.x: one document with a problem of each kind 3.x adds (also a fuzz seed): all are
/// listed, each at its place.
const MALFORMED: &str = include_str!("../../../fuzz/seeds/openapi/openapi3_malformed.yaml");

#[test]
fn malformed_3x_lists_every_problem_at_its_place() {
    let errs = errors("bad.yaml", MALFORMED);
    let want = [
        "bad.yaml:3:1: \"host\" is OpenAPI 2.0; in OpenAPI 3.x the service name and base path come from the url of the server marked with x-google-endpoint (servers: [{url: \"https://HOST/BASE\", x-google-endpoint: {}}])",
        "bad.yaml:8:5: only one server may carry x-google-endpoint (another does at line 6); it names the service",
        "bad.yaml:9:1: x-google-management is the OpenAPI 2.0 extension; in OpenAPI 3.x write x-google-api-management, with metrics and quota limits as mappings keyed by name",
        "bad.yaml:12:44: unknown field \"jwt_audiance\" in backend \"main\" (known: address, jwtAudience, disableAuth, pathTranslation, deadline, protocol)",
        "bad.yaml:15:20: quota limit \"l1\" refers to metric \"m\", which is not defined in x-google-api-management.metrics",
        "bad.yaml:15:31: quota limit values must be an integer (the most the metric may reach per minute), not a string",
        "bad.yaml:16:20: in OpenAPI 3.x x-google-backend is the name of a backend: define it under x-google-api-management.backends.<name> (address, pathTranslation, jwtAudience, ...) and write x-google-backend: <name>",
        "bad.yaml:19:33: security scheme \"basic\" (http) has scheme \"basic\"; only bearer, with x-google-auth, can be checked",
        "bad.yaml:21:13: security scheme \"jwt\" (oauth2) has no x-google-auth: JWTs are checked only for schemes with x-google-auth: {issuer, jwksUri, audiences}",
        "bad.yaml:22:7: security scheme \"jwt\": x-google-issuer is the OpenAPI 2.0 extension; in OpenAPI 3.x write x-google-auth: {issuer, jwksUri, audiences: [...], jwtLocations: [...]}",
        "bad.yaml:23:32: security scheme \"cookie\" (apiKey): API keys in a cookie are not supported; use in: query or in: header",
        "bad.yaml:26:23: x-google-auth of \"auth\" has no issuer; it must equal the tokens' iss claim",
        "bad.yaml:26:60: unknown field \"audience\" in x-google-auth of \"auth\" (known: issuer, jwksUri, audiences, jwtLocations)",
        "bad.yaml:28:3: path \"/a/{id=**}\": {name=...} is OpenAPI 2.0 syntax; in OpenAPI 3.x write {name} and give the path parameter x-google-parameter: {pattern: '**'} to match several segments",
        "bad.yaml:36:25: x-google-backend \"missing\" is not defined in x-google-api-management.backends (defined: main)",
    ];
    for (i, (got, want)) in errs.iter().zip(want).enumerate() {
        assert_eq!(got, want, "error {i}; all: {errs:#?}");
    }
    assert_eq!(errs.len(), want.len(), "{errs:#?}");
}

#[test]
fn servers_problems() {
    let head = "openapi: 3.0.0\ninfo: {title: T, version: v1}\n";
    let tail = "paths: {}\n";
    let cases = [
        ("", "x.yaml:1:1: missing \"servers\": one server must carry x-google-endpoint, and its url names the service (servers: [{url: \"https://my-api.endpoints.my-project.cloud.goog\", x-google-endpoint: {}}])"),
        ("servers: [{url: 'https://a.example.com'}]\n", "x.yaml:3:10: no server carries x-google-endpoint: mark the server whose url names the service, e.g. {url: \"https://my-api.endpoints.my-project.cloud.goog\", x-google-endpoint: {}}"),
        ("servers: [{x-google-endpoint: {}}]\n", "x.yaml:3:12: the server carrying x-google-endpoint has no url; its host names the service"),
        ("servers: [{url: 'ftp://a.example.com', x-google-endpoint: {}}]\n", "x.yaml:3:17: server url \"ftp://a.example.com\" cannot name the service: only http and https urls are accepted; write https://HOST[/basePath], e.g. https://my-api.endpoints.my-project.cloud.goog/v1"),
        ("servers: [{url: 'https://a.example.com', x-google-endpoint: []}]\n", "x.yaml:3:61: x-google-endpoint must be a mapping (usually {}), not a list"),
        ("servers: {url: x}\n", "x.yaml:3:11: servers must be a list of server objects"),
    ];
    for (servers, want) in cases {
        let errs = errors("x.yaml", &format!("{head}{servers}{tail}"));
        assert_eq!(
            errs.first().map(String::as_str),
            Some(want),
            "{servers}: {errs:#?}"
        );
    }
    // An invalid host is reported by the same check as 2.0's host, at the url.
    let errs = errors(
        "x.yaml",
        &format!(
            "{head}servers: [{{url: 'https://a_b.example.com', x-google-endpoint: {{}}}}]\n{tail}"
        ),
    );
    assert!(
        errs[0].starts_with("x.yaml:3:17: host \"a_b.example.com\" is not a valid service name"),
        "{errs:#?}"
    );
}

#[test]
fn the_2_0_security_rules_hold_for_3x() {
    let schemes = "    key: {type: apiKey, in: query, name: key}\n    j1:\n      type: oauth2\n      x-google-auth: {issuer: i1}\n    j2:\n      type: oauth2\n      x-google-auth: {issuer: i2}\n";
    // A key OR'ed with a JWT, two JWTs AND'ed, an undefined scheme: all refused, all listed.
    let rest = "paths:\n  /a:\n    get:\n      operationId: a\n      security: [{key: []}, {j1: []}]\n      responses: {'200': {description: ok}}\n  /b:\n    get:\n      operationId: b\n      security: [{j1: [], j2: []}]\n      responses: {'200': {description: ok}}\n  /c:\n    get:\n      operationId: c\n      security: [{nope: []}]\n      responses: {'200': {description: ok}}\n";
    let errs = errors(
        "s.yaml",
        &format!("openapi: 3.1.0\ninfo: {{title: T, version: v1}}\nservers:\n  - url: https://a.example.com\n    x-google-endpoint: {{}}\ncomponents:\n  securitySchemes:\n{schemes}{rest}"),
    );
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert_eq!(errs[0], "s.yaml:19:17: Operation 'get' in path '/a': an API key cannot be OR'ed with another security scheme (alternatives: {key} OR {j1}); require the API key in every alternative, or in none");
    assert_eq!(errs[1], "s.yaml:24:19: Operation 'get' in path '/b': one security requirement ANDs the JWT providers \"j1\", \"j2\"; only one provider per requirement is supported, list them as separate requirements to accept a token from any of them");
    assert!(errs[2].starts_with("s.yaml:29:"), "{errs:#?}");
    assert!(errs[2].contains("\"nope\""), "{errs:#?}");
}

/// A named backend is copied into every operation naming it: its fields must be small scalars
/// (a huge address would be copied once per operation).
#[test]
fn named_backends_hold_small_values_only() {
    let long = format!("https://a.example.com/{}", "x".repeat(3000));
    let text = format!(
        "openapi: 3.0.0\ninfo: {{title: T, version: v1}}\nservers: [{{url: 'https://a.example.com', x-google-endpoint: {{}}}}]\nx-google-api-management:\n  backends:\n    big: {{address: '{long}'}}\n    deep: {{address: [1, 2]}}\nx-google-backend: big\npaths:\n  /a:\n    get: {{operationId: a, responses: {{'200': {{description: ok}}}}}}\n"
    );
    assert_eq!(
        errors("b.yaml", &text),
        [
            "b.yaml:6:20: backend \"big\": address is longer than 2048 bytes",
            "b.yaml:7:21: backend \"deep\": address must be a single value, not a list",
        ]
    );
    // The same bound holds for 2.0's x-google-backend, and the message quotes 80 characters.
    let v2 = format!("{HEAD}x-google-backend: {{address: '{long}'}}\npaths: {{}}\n");
    let errs = errors("v2.yaml", &v2);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("v2.yaml:6:29: x-google-backend address \"https://a.example.com/xxx"),
        "{errs:?}"
    );
    assert!(
        errs[0].ends_with("...\" is not valid: it is longer than 2048 bytes"),
        "{errs:?}"
    );
    assert!(errs[0].len() < 300, "{errs:?}");
}

/// The other 2.0 spellings in a 3.x document, and what 3.x documents do not support yet.
#[test]
fn openapi_2_spellings_in_3x_name_the_3x_way() {
    let text = "openapi: 3.0.1
info: {title: T, version: v1}
servers: [{url: 'https://a.example.com', x-google-endpoint: {}}]
x-google-endpoints: [{name: a.example.com}]
x-google-api-name: a
x-google-allow: all
securityDefinitions: {}
paths:
  /a:
    $ref: './other.yaml#/paths/~1a'
  /b:
    trace:
      operationId: b
      responses: {'200': {description: ok}}
";
    assert_eq!(
        errors("o.yaml", text),
        [
            "o.yaml:4:1: x-google-endpoints is the OpenAPI 2.0 extension; in OpenAPI 3.x put x-google-endpoint: {} on the server whose url names the service, and x-google-api-management.allowCors for CORS",
            "o.yaml:5:1: x-google-api-name is the OpenAPI 2.0 extension; in OpenAPI 3.x write x-google-api-management.apiName",
            "o.yaml:6:1: x-google-allow is not supported in OpenAPI 3.x documents (Google's limitation); declare every path",
            "o.yaml:7:1: \"securityDefinitions\" is OpenAPI 2.0; in OpenAPI 3.x write components.securitySchemes",
            "o.yaml:10:5: path \"/a\": a path item $ref is not supported in OpenAPI 3.x documents; write the operations here",
            "o.yaml:12:5: path \"/b\": trace operations are not supported (get, put, post, delete, options, head, patch are)",
        ]
    );
}

/// Schemas that only alias each other describe no value: refused in components.schemas as in
/// 2.0's definitions.
#[test]
fn self_aliasing_3x_schemas() {
    let text = "openapi: 3.0.0
info: {title: T, version: v1}
servers: [{url: 'https://a.example.com', x-google-endpoint: {}}]
paths: {}
components:
  schemas:
    A: {$ref: '#/components/schemas/B'}
    B: {type: array, items: {$ref: '#/components/schemas/A'}}
";
    assert_eq!(
        errors("c.yaml", text),
        ["c.yaml:7:5: schema \"A\" refers back to itself only through $ref or array items (A → B → A), so no value can have this type"]
    );
}
