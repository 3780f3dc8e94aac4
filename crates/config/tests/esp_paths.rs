//! Path templates and configs that ESP and Google's Service Management accept: the root path,
//! custom verbs followed by `/`, invalid top-level templates, `**` followed by more segments.

use portico_config::{convert, PathMatcherBuilder, SourceFile};

const HEAD: &str = "swagger: \"2.0\"\ninfo:\n  title: T\n  version: 1.0.0\nhost: api.example.com\n";
const OK_RESPONSES: &str = "      responses:\n        200:\n          description: ok\n";

fn converted_rules(text: &str) -> Vec<(String, String, String)> {
    let conv = convert(&[SourceFile::new("openapi.yaml", text)]).unwrap_or_else(|e| panic!("{e}"));
    conv.service
        .http
        .as_ref()
        .map(|h| {
            h.rules
                .iter()
                .filter_map(|r| {
                    let (m, p) = r.method_and_path()?;
                    Some((r.selector.clone(), m.to_string(), p.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn root_path_is_an_api_method() {
    let text = format!(
        "{HEAD}paths:\n  /:\n    get:\n      operationId: root\n{OK_RESPONSES}  /a:\n    get:\n      operationId: a\n{OK_RESPONSES}"
    );
    let rules = converted_rules(&text);
    assert!(
        rules.contains(&("1.api_example_com.Root".into(), "GET".into(), "/".into())),
        "{rules:?}"
    );
    let mut b = PathMatcherBuilder::new();
    for (sel, m, p) in &rules {
        b.register(m, p, sel.clone()).unwrap();
    }
    let m = b.build();
    let root = Some(&"1.api_example_com.Root".to_string());
    assert_eq!(m.lookup("GET", "/"), root);
    assert_eq!(m.lookup("GET", "/?x=1"), root);
    assert_eq!(m.lookup("HEAD", "/"), root);
    assert_eq!(m.lookup("POST", "/"), None);
    assert_eq!(m.lookup("GET", "/b"), None);
    assert_eq!(
        m.lookup("GET", "/a").map(String::as_str),
        Some("1.api_example_com.A")
    );
    let (_, bindings) = m.lookup_with_bindings("GET", "/").unwrap();
    assert!(bindings.is_empty());
}

#[test]
fn root_path_with_a_base_path_is_the_base_path() {
    let text = format!(
        "{HEAD}basePath: /v1\npaths:\n  /:\n    get:\n      operationId: root\n{OK_RESPONSES}"
    );
    let rules = converted_rules(&text);
    assert_eq!(rules[0].2, "/v1");
}

#[test]
fn root_path_is_registered_once_per_method() {
    let mut b = PathMatcherBuilder::new();
    b.register("GET", "/", 1).unwrap();
    assert!(
        b.register("GET", "/", 2).is_err(),
        "duplicate root accepted"
    );
    b.register("*", "/**", 3).unwrap();
    let m = b.build();
    assert_eq!(m.lookup("GET", "/"), Some(&1));
    assert_eq!(m.lookup("POST", "/"), Some(&3));
    assert_eq!(m.lookup("GET", "/x"), Some(&3));
    // Still refused: a verb on the root, empty segments.
    let mut b = PathMatcherBuilder::<u8>::new();
    for t in ["/:verb", "//", "///"] {
        assert!(b.register("GET", t, 0).is_err(), "{t:?} accepted");
    }
}

/// ESP's `CustomVerbMatches` cases that need no `**` in the middle: a `/` after the verb makes it
/// part of an ordinary segment (ESP only splits a verb off the text after the last `/`).
#[test]
fn trailing_slash_after_a_custom_verb_is_not_a_verb() {
    let mut b = PathMatcherBuilder::new();
    for (t, v) in [
        ("/some/const:verb", "some_const_verb"),
        ("/some/*:verb", "some__verb"),
        ("/some/*/foo:verb", "some__foo_verb"),
        ("/other/**:verb", "other__verb"),
    ] {
        b.register("GET", t, v).unwrap();
    }
    let m = b.build();
    assert_eq!(
        m.lookup("GET", "/some/const:verb"),
        Some(&"some_const_verb")
    );
    assert_eq!(m.lookup("GET", "/some/other:verb"), Some(&"some__verb"));
    assert_eq!(m.lookup("GET", "/some/other:verb/"), None);
    assert_eq!(m.lookup("GET", "/some/other:verb//"), None);
    assert_eq!(m.lookup("GET", "/some/other:verb/?q=1"), None);
    assert_eq!(m.lookup("GET", "/some/const:verb/"), None);
    assert_eq!(
        m.lookup("GET", "/some/bar/foo:verb"),
        Some(&"some__foo_verb")
    );
    assert_eq!(m.lookup("GET", "/some/foo1/foo2/foo:verb"), None);
    assert_eq!(m.lookup("GET", "/some/foo/bar:verb"), None);
    assert_eq!(m.lookup("GET", "/other/bar/foo:verb"), Some(&"other__verb"));
    // `**` takes the colon text as an ordinary segment once the verb is not split off.
    assert_eq!(m.lookup("GET", "/other/bar/foo:verb/"), None);

    // Without a verb rule the colon text is an ordinary segment, trailing slash or not.
    let mut b = PathMatcherBuilder::new();
    b.register("GET", "/foo/*", "star").unwrap();
    b.register("GET", "/foo/*/hello", "hello").unwrap();
    b.register("POST", "/foo/{x}:verb", "verb").unwrap();
    let m = b.build();
    assert_eq!(m.lookup("GET", "/foo/other:verb/"), Some(&"star"));
    assert_eq!(m.lookup("GET", "/foo/other:verb/hello"), Some(&"hello"));
    assert_eq!(m.lookup("POST", "/foo/other:verb"), Some(&"verb"));
    assert_eq!(m.lookup("POST", "/foo/other:verb/"), None);
    // An empty segment before the verb stays a segment (ESP splits `/foo/:verb` into
    // `foo`, `` and the verb).
    assert_eq!(m.lookup("POST", "/foo/:verb"), Some(&"verb"));
    let mut b = PathMatcherBuilder::new();
    b.register("POST", "/foo:verb", "v").unwrap();
    let m = b.build();
    assert_eq!(m.lookup("POST", "/foo:verb"), Some(&"v"));
    assert_eq!(m.lookup("POST", "/foo/:verb"), None);
}

/// Google's proto JSON parser takes a field under its proto name or its JSON name, and Google's
/// own samples write `x-google-management` in snake_case.
#[test]
fn management_fields_in_either_json_spelling() {
    let snake = format!(
        "{HEAD}x-google-management:\n  metrics:\n    - name: read-requests\n      display_name: Read requests\n      value_type: INT64\n      metric_kind: DELTA\n  quota:\n    limits:\n      - name: read-limit\n        metric: read-requests\n        unit: 1/min/{{project}}\n        values: {{STANDARD: 5}}\n        display_name: Reads\n        default_limit: 7\n        max_limit: 9\n        free_tier: 1\npaths:\n  /a:\n    get:\n      operationId: a\n      x-google-quota:\n        metric_costs: {{read-requests: 2}}\n{OK_RESPONSES}"
    );
    let camel = snake
        .replace("display_name", "displayName")
        .replace("value_type", "valueType")
        .replace("metric_kind", "metricKind")
        .replace("default_limit", "defaultLimit")
        .replace("max_limit", "maxLimit")
        .replace("free_tier", "freeTier")
        .replace("metric_costs", "metricCosts");
    let json = |text: &str| {
        let conv =
            convert(&[SourceFile::new("openapi.yaml", text)]).unwrap_or_else(|e| panic!("{e}"));
        serde_json::to_value(&conv.service).unwrap()
    };
    let (s, c) = (json(&snake), json(&camel));
    assert_eq!(s["metrics"], c["metrics"]);
    assert_eq!(s["quota"], c["quota"]);
    let m = s["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "read-requests")
        .unwrap();
    assert_eq!(
        (&m["displayName"], &m["valueType"], &m["metricKind"]),
        (&"Read requests".into(), &"INT64".into(), &"DELTA".into())
    );
    let l = &s["quota"]["limits"][0];
    assert_eq!(l["displayName"], "Reads");
    assert_eq!(l["defaultLimit"], "7");
    assert_eq!(l["maxLimit"], "9");
    assert_eq!(l["freeTier"], "1");
    assert_eq!(
        s["quota"]["metricRules"][0]["metricCosts"]["read-requests"],
        "2"
    );

    // A value that is wrong is still wrong in the other spelling.
    let bad = snake.replace("value_type: INT64", "value_type: DOUBLE");
    let err = convert(&[SourceFile::new("openapi.yaml", bad.as_str())]).unwrap_err();
    assert!(
        err.to_string().contains("has valueType \"DOUBLE\""),
        "{err}"
    );
    // Both spellings of one field: refused, like a field given twice.
    let both = snake.replace(
        "value_type: INT64",
        "value_type: INT64\n      valueType: INT64",
    );
    let err = convert(&[SourceFile::new("openapi.yaml", both.as_str())]).unwrap_err();
    assert!(
        err.to_string()
            .contains("\"valueType\" and \"value_type\" are the same field"),
        "{err}"
    );
    // Other spellings are not proto names and stay unknown.
    for wrong in ["valuetype", "VALUE_TYPE", "value-type", "Value_Type"] {
        let t = snake.replace("value_type", wrong);
        let err = convert(&[SourceFile::new("openapi.yaml", t.as_str())]).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("unknown field \"{wrong}\"")),
            "{err}"
        );
    }
}

/// ESPv2's sidecar deployments give `x-google-backend` settings without an address: they apply
/// to the proxy's own backend.
#[test]
fn backend_without_address_is_accepted() {
    let text = format!(
        "{HEAD}x-google-backend:\n  deadline: 30\npaths:\n  /a:\n    get:\n      operationId: a\n{OK_RESPONSES}  /b:\n    get:\n      operationId: b\n      x-google-backend:\n        protocol: h2\n        deadline: 0.5\n{OK_RESPONSES}  /c:\n    get:\n      operationId: c\n      x-google-backend:\n        address: https://c.example.com\n{OK_RESPONSES}"
    );
    let conv = convert(&[SourceFile::new("openapi.yaml", text.as_str())])
        .unwrap_or_else(|e| panic!("{e}"));
    let svc = serde_json::to_value(&conv.service).unwrap();
    let rules = svc["backend"]["rules"].as_array().unwrap();
    let by = |m: &str| {
        rules
            .iter()
            .find(|r| r["selector"] == format!("1.api_example_com.{m}"))
            .unwrap_or_else(|| panic!("no rule for {m}: {rules:?}"))
    };
    assert_eq!(
        by("A"),
        &serde_json::json!({"selector": "1.api_example_com.A", "deadline": 30.0})
    );
    assert_eq!(
        by("B"),
        &serde_json::json!({"selector": "1.api_example_com.B", "deadline": 0.5, "protocol": "h2"})
    );
    assert_eq!(by("C")["address"], "https://c.example.com");
    assert_eq!(by("C")["pathTranslation"], "CONSTANT_ADDRESS");
    // The other fields are still checked.
    for bad in ["deadline: -1", "protocol: h3", "addres: https://x"] {
        let t = format!(
            "{HEAD}x-google-backend:\n  {bad}\npaths:\n  /a:\n    get:\n      operationId: a\n{OK_RESPONSES}"
        );
        assert!(
            convert(&[SourceFile::new("openapi.yaml", t.as_str())]).is_err(),
            "{bad}"
        );
    }
}

/// `protocol` is compared without regard to case, as ESPv2 does (`H2` is HTTP/2); the value is
/// kept as written. Anything else is refused with its place and the values that work.
#[test]
fn backend_protocol_in_any_case_is_accepted_and_unknown_ones_refused() {
    for (written, address) in [
        ("H2", ""),
        ("Http/1.1", "\n        address: http://b.example.com"),
        ("GRPC", "\n        address: https://b.example.com"),
    ] {
        let text = format!(
            "{HEAD}paths:\n  /a:\n    get:\n      operationId: a\n      x-google-backend:\n        protocol: {written}{address}\n{OK_RESPONSES}"
        );
        let conv = convert(&[SourceFile::new("openapi.yaml", text.as_str())])
            .unwrap_or_else(|e| panic!("{written}: {e}"));
        let rules = &conv.service.backend.as_ref().unwrap().rules;
        assert_eq!(rules[0].protocol, written);
    }
    // At the top level it applies to every operation without one of its own.
    let text = format!(
        "{HEAD}x-google-backend:\n  protocol: H2\npaths:\n  /a:\n    get:\n      operationId: a\n{OK_RESPONSES}  /b:\n    get:\n      operationId: b\n{OK_RESPONSES}"
    );
    let conv = convert(&[SourceFile::new("openapi.yaml", text.as_str())])
        .unwrap_or_else(|e| panic!("{e}"));
    let rules = &conv.service.backend.as_ref().unwrap().rules;
    assert_eq!(rules.len(), 2);
    assert!(rules.iter().all(|r| r.protocol == "H2"), "{rules:?}");
    for (bad, message) in [
        ("h3", "protocol \"h3\" is not supported"),
        ("\"h2 \"", "protocol \"h2 \" is not supported"),
        ("http/2", "protocol \"http/2\" is not supported"),
        ("2", "protocol must be a string"),
    ] {
        let text = format!(
            "{HEAD}paths:\n  /a:\n    get:\n      operationId: a\n      x-google-backend:\n        protocol: {bad}\n{OK_RESPONSES}"
        );
        let err = convert(&[SourceFile::new("openapi.yaml", text.as_str())])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("openapi.yaml:11:19: x-google-backend {message}")),
            "{bad}: {err}"
        );
    }
}

fn esp_matcher(rules: &[(&str, &'static str)]) -> portico_config::PathMatcher<&'static str> {
    let mut b = PathMatcherBuilder::new();
    for (t, v) in rules {
        b.register("GET", t, *v)
            .unwrap_or_else(|e| panic!("{t}: {e}"));
    }
    b.build()
}

fn bound(
    m: &portico_config::PathMatcher<&'static str>,
    target: &str,
) -> (&'static str, Vec<(String, String)>) {
    let (v, b) = m
        .lookup_with_bindings("GET", target)
        .unwrap_or_else(|| panic!("{target} did not match"));
    (
        *v,
        b.into_iter()
            .map(|b| (b.field_path.join("."), b.value))
            .collect(),
    )
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// ESP's path_matcher_test `CustomVerbMatches`, including `**` followed by a literal.
#[test]
fn esp_custom_verb_matches() {
    let m = esp_matcher(&[
        ("/some/const:verb", "some_const_verb"),
        ("/some/*:verb", "some__verb"),
        ("/some/*/foo:verb", "some__foo_verb"),
        ("/other/**:verb", "other__verb"),
        ("/other/**/const:verb", "other__const_verb"),
    ]);
    assert_eq!(
        m.lookup("GET", "/some/const:verb"),
        Some(&"some_const_verb")
    );
    assert_eq!(m.lookup("GET", "/some/other:verb"), Some(&"some__verb"));
    assert_eq!(m.lookup("GET", "/some/other:verb/"), None);
    assert_eq!(
        m.lookup("GET", "/some/bar/foo:verb"),
        Some(&"some__foo_verb")
    );
    assert_eq!(m.lookup("GET", "/some/foo1/foo2/foo:verb"), None);
    assert_eq!(m.lookup("GET", "/some/foo/bar:verb"), None);
    assert_eq!(m.lookup("GET", "/other/bar/foo:verb"), Some(&"other__verb"));
    assert_eq!(
        m.lookup("GET", "/other/bar/foo/const:verb"),
        Some(&"other__const_verb")
    );
    assert_eq!(
        m.lookup("GET", "/other/const/const:verb"),
        Some(&"other__const_verb")
    );
    assert_eq!(m.lookup("GET", "/other/const:verb"), Some(&"other__verb"));
}

/// ESP's `VariableBindings` and `ConstantSuffixesWithVariable` cases.
#[test]
fn esp_double_star_followed_by_literals_binds_like_esp() {
    let m = esp_matcher(&[
        ("/a/{x}/c/d/e", "a_cde"),
        ("/{x=a/*}/b/{y=*}/c", "a_b_c"),
        ("/a/{x=b/*}/{y=d/**}", "ab_d__"),
        ("/alpha/{x=*}/beta/{y=**}/gamma", "alpha_beta__gamma"),
        ("/{x=*}/a", "_a"),
        ("/{x=**}/a/b", "__ab"),
        ("/a/b/{x=*}", "ab_"),
        ("/a/b/c/{x=**}", "abc__"),
        ("/{x=*}/d/e/f/{y=**}", "_def__"),
    ]);
    assert_eq!(
        bound(&m, "/a/book/c/d/e"),
        ("a_cde", pairs(&[("x", "book")]))
    );
    assert_eq!(
        bound(&m, "/a/hello/b/world/c"),
        ("a_b_c", pairs(&[("x", "a/hello"), ("y", "world")]))
    );
    assert_eq!(
        bound(&m, "/a/b/zoo/d/animal/tiger"),
        ("ab_d__", pairs(&[("x", "b/zoo"), ("y", "d/animal/tiger")]))
    );
    assert_eq!(
        bound(&m, "/alpha/dog/beta/eat/bones/gamma"),
        (
            "alpha_beta__gamma",
            pairs(&[("x", "dog"), ("y", "eat/bones")])
        )
    );
    assert_eq!(bound(&m, "/foo/a"), ("_a", pairs(&[("x", "foo")])));
    assert_eq!(
        bound(&m, "/foo/bar/a/b"),
        ("__ab", pairs(&[("x", "foo/bar")]))
    );
    assert_eq!(bound(&m, "/a/b/foo"), ("ab_", pairs(&[("x", "foo")])));
    assert_eq!(
        bound(&m, "/a/b/c/foo/bar/baz"),
        ("abc__", pairs(&[("x", "foo/bar/baz")]))
    );
    assert_eq!(
        bound(&m, "/foo/d/e/f/bar/baz"),
        ("_def__", pairs(&[("x", "foo"), ("y", "bar/baz")]))
    );

    let m = esp_matcher(&[
        ("/a/{x=b/**}", "ab__"),
        ("/a/{x=b/**}/z", "ab__z"),
        ("/a/{x=b/**}/y/z", "ab__yz"),
        ("/a/{x=b/**}:verb", "ab__verb"),
        ("/a/{x=**}", "a__"),
        ("/c/{x=*}/{y=d/**}/e", "c_d__e"),
        ("/c/{x=*}/{y=d/**}/e:verb", "c_d__everb"),
        ("/f/{x=*}/{y=**}/g", "f___g"),
        ("/f/{x=*}/{y=**}/g:verb", "f___gverb"),
        ("/a/{x=b/*/y/z/**}/foo", "ab_yz__foo"),
        ("/a/{x=b/*/**/y/z}/foo", "ab___yzfoo"),
    ]);
    assert_eq!(
        bound(&m, "/a/b/hello/world/c"),
        ("ab__", pairs(&[("x", "b/hello/world/c")]))
    );
    assert_eq!(
        bound(&m, "/a/b/world/c/z"),
        ("ab__z", pairs(&[("x", "b/world/c")]))
    );
    assert_eq!(
        bound(&m, "/a/b/world/c/y/z"),
        ("ab__yz", pairs(&[("x", "b/world/c")]))
    );
    assert_eq!(
        bound(&m, "/a/b/world/c:verb"),
        ("ab__verb", pairs(&[("x", "b/world/c")]))
    );
    assert_eq!(
        bound(&m, "/a/hello/b/world/c"),
        ("a__", pairs(&[("x", "hello/b/world/c")]))
    );
    assert_eq!(
        bound(&m, "/c/hello/d/esp/world/e"),
        ("c_d__e", pairs(&[("x", "hello"), ("y", "d/esp/world")]))
    );
    assert_eq!(
        bound(&m, "/c/hola/d/esp/mundo/e:verb"),
        ("c_d__everb", pairs(&[("x", "hola"), ("y", "d/esp/mundo")]))
    );
    assert_eq!(
        bound(&m, "/f/foo/bar/baz/g"),
        ("f___g", pairs(&[("x", "foo"), ("y", "bar/baz")]))
    );
    assert_eq!(
        bound(&m, "/f/foo/bar/baz/g:verb"),
        ("f___gverb", pairs(&[("x", "foo"), ("y", "bar/baz")]))
    );
    assert_eq!(
        bound(&m, "/a/b/foo/y/z/bar/baz/foo"),
        ("ab_yz__foo", pairs(&[("x", "b/foo/y/z/bar/baz")]))
    );
    assert_eq!(
        bound(&m, "/a/b/foo/bar/baz/y/z/foo"),
        ("ab___yzfoo", pairs(&[("x", "b/foo/bar/baz/y/z")]))
    );
}

/// `{x=**}` keeps reserved escapes (ESP's `PercentEscapesNotUnescapedForMultiSegment2` and
/// `OnlyUnreservedCharsAreUnescapedForMultiSegmentMatch`); `{x}` decodes everything.
#[test]
fn esp_double_star_in_the_middle_decodes_like_esp() {
    let m = esp_matcher(&[
        ("/a/{x=**}/c", "a__c"),
        ("/files/{path=**}/meta", "meta"),
        ("/s/{x}/c", "single"),
    ]);
    assert_eq!(
        bound(&m, "/a/p/foo%20foo/q/bar%2Fbar/c"),
        ("a__c", pairs(&[("x", "p/foo foo/q/bar%2Fbar")]))
    );
    assert_eq!(
        bound(
            &m,
            "/a/%21%23%24%26%27%28%29%2A%2B%2C%2F%3A%3B%3D%3F%40%5B%5D/c"
        ),
        (
            "a__c",
            pairs(&[(
                "x",
                "%21%23%24%26%27%28%29%2A%2B%2C%2F%3A%3B%3D%3F%40%5B%5D"
            )])
        )
    );
    // One segment through `**` is still a multi-segment binding.
    assert_eq!(bound(&m, "/a/b%2Fc/c"), ("a__c", pairs(&[("x", "b%2Fc")])));
    assert_eq!(bound(&m, "/s/b%2Fc/c"), ("single", pairs(&[("x", "b/c")])));
    assert_eq!(
        bound(&m, "/files/d/e/meta?x=1"),
        ("meta", pairs(&[("path", "d/e")]))
    );
    assert_eq!(
        bound(&m, "/files/meta/meta"),
        ("meta", pairs(&[("path", "meta")]))
    );
    // `**` followed by literals takes at least one segment, as in ESP.
    assert_eq!(m.lookup("GET", "/a/c"), None);
    assert_eq!(m.lookup("GET", "/files/meta"), None);
    assert_eq!(m.lookup("GET", "/files/a/metadata"), None);
    assert_eq!(m.lookup("GET", "/a/x/c/d"), None);
}

/// ESP's `WildCardMatchesManyWithoutStackOverflow`, and hostile shapes: many candidate literals.
#[test]
fn double_star_scans_long_paths_without_deep_recursion() {
    let m = esp_matcher(&[("/a/**/x", "a"), ("/b/**/x/x/x/y", "b")]);
    let slashes = "/".repeat(64_000);
    assert_eq!(m.lookup("GET", &format!("/a/{slashes}/x")), Some(&"a"));
    assert_eq!(m.lookup("GET", &format!("/a/{slashes}/y")), None);
    let xs = "x/".repeat(20_000);
    let started = std::time::Instant::now();
    assert_eq!(m.lookup("GET", &format!("/b/{xs}x")), None);
    assert_eq!(m.lookup("GET", &format!("/b/{xs}y")), Some(&"b"));
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn only_wildcards_after_double_star_are_refused_in_specs() {
    let text = format!(
        "{HEAD}paths:\n  /files/{{path}}/meta:\n    get:\n      operationId: a\n      parameters: [{{name: path, in: path, required: true, type: string}}]\n{OK_RESPONSES}  /x/**/y:\n    get:\n      operationId: b\n{OK_RESPONSES}"
    );
    let rules = converted_rules(&text);
    assert!(rules.iter().any(|r| r.2 == "/x/**/y"), "{rules:?}");
    let bad = format!("{HEAD}paths:\n  /x/**/*:\n    get:\n      operationId: b\n{OK_RESPONSES}");
    let err = convert(&[SourceFile::new("openapi.yaml", bad.as_str())]).unwrap_err();
    assert!(
        err.to_string()
            .contains("only literal segments may follow \"**\""),
        "{err}"
    );
}
