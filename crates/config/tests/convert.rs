//! OpenAPI → service config: the getting-started spec, a spec using every supported extension,
//! and the CLI entry point. Malformed specs are in `malformed.rs`.

use base64::Engine;
use portico_config::{convert, Severity, SourceFile};
use serde_json::{json, Value};

const GETTING_STARTED: &str = include_str!("fixtures/getting-started.yaml");
const ALL_EXTENSIONS: &str = include_str!("fixtures/all-extensions.yaml");

fn to_json(name: &str, text: &str) -> (Value, Vec<String>) {
    let conv = convert(&[SourceFile::new(name, text)]).unwrap_or_else(|e| panic!("{e}"));
    let warnings = conv.warnings.iter().map(|w| w.to_string()).collect();
    (
        serde_json::to_value(&conv.service).expect("serialises"),
        warnings,
    )
}

fn rule<'a>(list: &'a Value, selector: &str) -> &'a Value {
    list.as_array()
        .and_then(|a| a.iter().find(|r| r["selector"] == selector))
        .unwrap_or_else(|| panic!("no rule for {selector} in {list}"))
}

#[test]
fn getting_started_converts_like_google() {
    let (svc, warnings) = to_json("openapi.yaml", GETTING_STARTED);
    let api = "1.echo_api_endpoints_YOUR_PROJECT_ID_cloud_goog";
    assert_eq!(svc["name"], "echo-api.endpoints.YOUR-PROJECT-ID.cloud.goog");
    assert_eq!(svc["title"], "Echo example");
    assert_eq!(svc["configVersion"], 3);
    assert_eq!(svc["apis"][0]["name"], api);
    assert_eq!(svc["apis"][0]["version"], "1.0.0");
    assert_eq!(svc["apis"][0]["sourceContext"]["fileName"], "openapi.yaml");
    let methods: Vec<&str> = svc["apis"][0]["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        methods,
        [
            "Echo",
            "Auth_info_google_jwt",
            "AuthInfoGoogleIdToken",
            "AuthInfoFirebase"
        ]
    );

    let http = &svc["http"]["rules"];
    assert_eq!(
        rule(http, &format!("{api}.Echo")),
        &json!({"selector": format!("{api}.Echo"), "post": "/echo", "body": "message"})
    );
    assert_eq!(
        rule(http, &format!("{api}.Auth_info_google_jwt"))["get"],
        "/auth/info/googlejwt"
    );
    assert_eq!(
        rule(http, &format!("{api}.AuthInfoFirebase"))["get"],
        "/auth/info/firebase"
    );

    let usage = &svc["usage"]["rules"];
    assert_eq!(
        rule(usage, &format!("{api}.Echo")).get("allowUnregisteredCalls"),
        None,
        "the echo method needs an API key"
    );
    for m in [
        "Auth_info_google_jwt",
        "AuthInfoGoogleIdToken",
        "AuthInfoFirebase",
    ] {
        assert_eq!(
            rule(usage, &format!("{api}.{m}"))["allowUnregisteredCalls"],
            true
        );
    }

    let auth = &svc["authentication"];
    let jwt_rule = rule(&auth["rules"], &format!("{api}.Auth_info_google_jwt"));
    assert_eq!(
        jwt_rule["requirements"],
        json!([{"providerId": "google_jwt"}, {"providerId": "gae_default_service_account"},
               {"providerId": "google_service_account"}])
    );
    assert_eq!(auth["providers"].as_array().unwrap().len(), 5);
    assert_eq!(
        auth["providers"][3],
        json!({"id": "google_id_token", "issuer": "https://accounts.google.com",
               "jwksUri": "https://www.googleapis.com/oauth2/v3/certs", "audiences": "YOUR-CLIENT-ID"})
    );

    assert_eq!(
        svc["endpoints"],
        json!([{"name": "echo-api.endpoints.YOUR-PROJECT-ID.cloud.goog"}])
    );
    assert_eq!(
        svc["control"]["environment"],
        "servicecontrol.googleapis.com"
    );
    assert_eq!(
        svc["documentation"]["summary"],
        "Echoes messages back and reports the caller's authentication details."
    );
    assert_eq!(svc["logs"], json!([{"name": "endpoints_log"}]));
    assert_eq!(
        svc["logging"]["producerDestinations"][0],
        json!({"monitoredResource": "api", "logs": ["endpoints_log"]})
    );
    assert_eq!(svc["monitoredResources"][0]["type"], "api");
    let metric_names: Vec<&str> = svc["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert!(metric_names.contains(&"serviceruntime.googleapis.com/api/consumer/request_count"));
    assert!(metric_names.contains(&"serviceruntime.googleapis.com/api/producer/total_latencies"));
    assert!(metric_names
        .contains(&"serviceruntime.googleapis.com/api/producer/by_consumer/request_count"));
    // ESP's byte totals, in the producer and consumer forms only (as Google's generator).
    for side in ["producer", "consumer"] {
        for m in ["request_bytes", "response_bytes"] {
            let name = format!("serviceruntime.googleapis.com/api/{side}/{m}");
            assert!(metric_names.contains(&name.as_str()), "{name}");
        }
    }
    assert!(!metric_names
        .iter()
        .any(|m| m.contains("by_consumer/request_bytes")));
    assert_eq!(metric_names.len(), 25);
    assert_eq!(
        svc["monitoring"]["producerDestinations"][0]["metrics"]
            .as_array()
            .unwrap()
            .len(),
        16
    );
    assert!(svc["monitoring"]["consumerDestinations"][0]["metrics"]
        .as_array()
        .unwrap()
        .contains(&json!(
            "serviceruntime.googleapis.com/api/consumer/request_count"
        )));

    let src = &svc["sourceInfo"]["sourceFiles"][0];
    assert_eq!(
        src["@type"],
        "type.googleapis.com/google.api.servicemanagement.v1.ConfigFile"
    );
    assert_eq!(src["filePath"], "openapi.yaml");
    assert_eq!(src["fileType"], "OPEN_API_YAML");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(src["fileContents"].as_str().unwrap())
        .unwrap();
    assert_eq!(decoded, GETTING_STARTED.as_bytes());
    assert!(
        svc.get("systemParameters").is_none(),
        "?key= is a default location"
    );
    // What the converter emits loads back into the model unchanged (the proxy reads it so).
    let back: portico_config::Service = serde_json::from_value(svc.clone()).unwrap();
    assert_eq!(serde_json::to_value(&back).unwrap(), svc);
    assert!(svc.get("backend").is_none());
    assert!(svc.get("quota").is_none());

    // One warning per operation without an API key, in Google's words, at the operation.
    assert_eq!(warnings.len(), 3, "{warnings:#?}");
    assert_eq!(
        warnings[0],
        "openapi.yaml:39:5: Operation 'get' in path '/auth/info/googlejwt': Operation does not require an API key; callers may invoke the method without specifying an associated API-consuming project. To enable API key all the SecurityRequirement Objects (https://github.com/OAI/OpenAPI-Specification/blob/master/versions/2.0.md#security-requirement-object) inside security definition must reference at least one SecurityDefinition of type : 'apiKey'."
    );
}

#[test]
fn the_shipped_example_is_the_fixture() {
    let example = include_str!("../../../examples/echo/openapi.yaml");
    assert_eq!(
        example, GETTING_STARTED,
        "keep the fixture a copy of examples/echo/openapi.yaml"
    );
}

#[test]
fn json_input_is_accepted_and_typed_as_json() {
    let text = r#"{"swagger": "2.0", "info": {"title": "T", "version": "v1"},
        "host": "j.example.com",
        "paths": {"/a": {"get": {"operationId": "a", "responses": {"200": {"description": "ok"}}}}}}"#;
    let (svc, _) = to_json("api.json", text);
    assert_eq!(svc["apis"][0]["name"], "v1.j_example_com");
    assert_eq!(
        svc["sourceInfo"]["sourceFiles"][0]["fileType"],
        "OPEN_API_JSON"
    );
    assert_eq!(svc["http"]["rules"][0]["get"], "/a");
}

#[test]
fn every_extension_lands_in_the_config() {
    let (svc, warnings) = to_json("library.yaml", ALL_EXTENSIONS);
    let api = "2.library";
    let sel = |m: &str| format!("{api}.{m}");
    assert_eq!(svc["name"], "library.endpoints.demo-proj.cloud.goog");
    assert_eq!(svc["apis"][0]["name"], api);

    // basePath, snake_case path variables, custom methods, x-google-allow.
    let http = &svc["http"]["rules"];
    assert_eq!(rule(http, &sel("ListShelves"))["get"], "/v2/shelves");
    assert_eq!(
        rule(http, &sel("HeadShelves"))["custom"],
        json!({"kind": "HEAD", "path": "/v2/shelves"})
    );
    assert_eq!(
        rule(http, &sel("GetShelf"))["get"],
        "/v2/shelves/{shelf_id}"
    );
    assert_eq!(
        rule(http, &sel("BooksPreflight"))["custom"],
        json!({"kind": "OPTIONS", "path": "/v2/books"})
    );
    assert_eq!(
        rule(http, &sel("Google_Autogenerated_Unrecognized_Method_Call"))["custom"],
        json!({"kind": "*", "path": "/**"})
    );

    // Usage: an API key everywhere except `security: []` and the JWT-only delete.
    let usage = &svc["usage"]["rules"];
    let allow = |m: &str| rule(usage, &sel(m)).get("allowUnregisteredCalls").cloned();
    assert_eq!(allow("ListShelves"), None);
    assert_eq!(
        allow("GetShelf"),
        None,
        "JWT AND API key still needs the key"
    );
    assert_eq!(allow("BooksPreflight"), None);
    assert_eq!(allow("HeadShelves"), Some(json!(true)));
    assert_eq!(allow("DeleteShelf"), Some(json!(true)));
    assert_eq!(
        allow("Google_Autogenerated_Unrecognized_Method_Call"),
        Some(json!(true))
    );

    // Custom API key locations → system parameters.
    let sp = &svc["systemParameters"]["rules"];
    assert_eq!(
        rule(sp, &sel("GetShelf"))["parameters"],
        json!([{"name": "api_key", "httpHeader": "X-Library-Key"}])
    );
    assert_eq!(
        rule(sp, &sel("BooksPreflight"))["parameters"],
        json!([{"name": "api_key", "urlQueryParameter": "apikey"}])
    );
    assert_eq!(
        sp.as_array().unwrap().len(),
        2,
        "?key= needs no system parameter"
    );

    // Authentication: AND with the key on get, OR of two providers on delete.
    let auth = &svc["authentication"];
    assert_eq!(
        rule(&auth["rules"], &sel("GetShelf"))["requirements"],
        json!([{"providerId": "google_jwt"}])
    );
    assert_eq!(
        rule(&auth["rules"], &sel("DeleteShelf"))["requirements"],
        json!([{"providerId": "google_jwt"}, {"providerId": "auth0"}])
    );
    assert_eq!(
        auth["providers"][0],
        json!({
            "id": "google_jwt",
            "issuer": "sa@demo-proj.iam.gserviceaccount.com",
            "jwksUri": "https://www.googleapis.com/robot/v1/metadata/x509/sa@demo-proj.iam.gserviceaccount.com",
            "audiences": "library-client,library-admin",
            "jwtLocations": [{"header": "X-Library-Token", "valuePrefix": "Bearer "}, {"query": "jwt"}]
        })
    );
    assert_eq!(
        auth["providers"][1]["authorizationUrl"],
        "https://example.auth0.com/authorize"
    );

    // Request types for operations with parameters.
    let get_shelf = svc["apis"][0]["methods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "GetShelf")
        .unwrap();
    assert_eq!(
        get_shelf["requestTypeUrl"],
        "type.googleapis.com/namespace.types.GetShelfRequest"
    );
    assert_eq!(
        svc["types"],
        json!([
            {"name": "namespace.types.GetShelfRequest", "sourceContext": {"fileName": "namespace.types"},
             "fields": [{"kind": "TYPE_STRING", "cardinality": "CARDINALITY_OPTIONAL", "number": 1,
                         "name": "shelf_id", "jsonName": "shelfId"}]},
            {"name": "namespace.types.DeleteShelfRequest", "sourceContext": {"fileName": "namespace.types"},
             "fields": [{"kind": "TYPE_STRING", "cardinality": "CARDINALITY_OPTIONAL", "number": 1,
                         "name": "shelf_id", "jsonName": "shelfId"}]}
        ])
    );

    // Quota.
    assert_eq!(
        svc["quota"]["limits"],
        json!([{"name": "read-limit", "metric": "read-requests", "unit": "1/min/{project}",
                "values": {"STANDARD": "1000"}}])
    );
    assert_eq!(
        svc["quota"]["metricRules"],
        json!([{"selector": sel("ListShelves"), "metricCosts": {"read-requests": "2"}}])
    );
    let metrics = svc["metrics"].as_array().unwrap();
    assert!(
        metrics.contains(&json!({"name": "read-requests", "metricKind": "DELTA",
                                      "valueType": "INT64", "displayName": "Read requests"}))
    );

    // Endpoints.
    assert_eq!(
        svc["endpoints"],
        json!([{"name": "library.endpoints.demo-proj.cloud.goog", "target": "10.0.0.7", "allowCors": true}])
    );

    // Backends: the top-level default appends the path; per-operation ones default to a
    // constant address unless they say otherwise.
    let backend = &svc["backend"]["rules"];
    assert_eq!(
        rule(backend, &sel("ListShelves")),
        &json!({"selector": sel("ListShelves"), "address": "https://backend.example.com/api",
                "deadline": 30.0, "pathTranslation": "APPEND_PATH_TO_ADDRESS",
                "jwtAudience": "https://backend.example.com"})
    );
    assert_eq!(
        rule(backend, &sel("GetShelf")),
        &json!({"selector": sel("GetShelf"), "address": "grpc://10.1.2.3:8081",
                "pathTranslation": "CONSTANT_ADDRESS", "disableAuth": true, "protocol": "h2"})
    );
    assert_eq!(
        rule(backend, &sel("DeleteShelf"))["pathTranslation"],
        "APPEND_PATH_TO_ADDRESS"
    );
    assert_eq!(
        rule(
            backend,
            &sel("Google_Autogenerated_Unrecognized_Method_Call")
        )["address"],
        "https://backend.example.com/api"
    );
    assert_eq!(backend.as_array().unwrap().len(), 6);

    // Only the operations without an API key are warned about.
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    assert!(warnings[0].starts_with("library.yaml:43:5: Operation 'head' in path '/shelves': Operation does not require an API key"));
    assert!(warnings[1].starts_with("library.yaml:67:5: Operation 'delete' in path '/shelves/{shelfId}': Operation does not require an API key"));
}

#[test]
fn several_files_make_several_apis_of_one_service() {
    let v1 = "swagger: '2.0'\ninfo: {title: T, version: 1.0.0}\nhost: multi.example.com\nx-google-api-name: pub\npaths:\n  /v1/p:\n    post: {operationId: publish, responses: {200: {description: ok}}}\n";
    let v2 = v1.replace("1.0.0", "2.0.0").replace("/v1/p", "/v2/p");
    let conv = convert(&[
        SourceFile::new("v1.yaml", v1),
        SourceFile::new("v2.yaml", v2),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = conv.service.apis.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["1.pub", "2.pub"]);
    let rules: Vec<(&str, Option<(&str, &str)>)> = conv
        .service
        .http
        .as_ref()
        .unwrap()
        .rules
        .iter()
        .map(|r| (r.selector.as_str(), r.method_and_path()))
        .collect();
    assert_eq!(
        rules,
        [
            ("1.pub.Publish", Some(("POST", "/v1/p"))),
            ("2.pub.Publish", Some(("POST", "/v2/p")))
        ]
    );
    assert_eq!(conv.service.source_info.unwrap().source_files.len(), 2);
}

#[test]
fn generated_names_when_operation_id_is_missing() {
    let text = "swagger: '2.0'\ninfo: {title: T, version: v1}\nhost: gen.example.com\npaths:\n  /shelves/{shelf}:\n    get:\n      parameters: [{name: shelf, in: path, required: true, type: string}]\n      responses: {200: {description: ok}}\n";
    let conv = convert(&[SourceFile::new("g.yaml", text)]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(conv.service.apis[0].methods[0].name, "GetShelvesShelf");
    let w: Vec<String> = conv
        .warnings
        .iter()
        .filter(|w| w.severity == Severity::Warning)
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        w[0],
        "g.yaml:6:5: Operation 'get' in path '/shelves/{shelf}': no operationId; the method is named \"GetShelvesShelf\" (set operationId to choose the name)"
    );
}

#[test]
fn converted_rules_feed_the_path_matcher() {
    let conv = convert(&[SourceFile::new("library.yaml", ALL_EXTENSIONS)])
        .unwrap_or_else(|e| panic!("{e}"));
    let mut b = portico_config::PathMatcherBuilder::new();
    for r in &conv.service.http.as_ref().unwrap().rules {
        let (m, p) = r.method_and_path().unwrap();
        b.register(m, p, r.selector.clone()).unwrap();
    }
    let m = b.build();
    assert_eq!(
        m.lookup("GET", "/v2/shelves/7?key=k").map(String::as_str),
        Some("2.library.GetShelf")
    );
    assert_eq!(
        m.lookup("HEAD", "/v2/shelves").map(String::as_str),
        Some("2.library.HeadShelves")
    );
    // Binding names map back to the parameter names through the generated request type.
    assert_eq!(
        conv.service
            .request_field_json_name("2.library.GetShelf", "shelf_id"),
        Some("shelfId")
    );
    assert_eq!(
        conv.service
            .request_field_json_name("2.library.GetShelf", "nope"),
        None
    );
    assert_eq!(
        conv.service
            .request_field_json_name("2.library.ListShelves", "shelf_id"),
        None,
        "no parameters, no request type"
    );
    // Anything else falls through to x-google-allow: all.
    assert_eq!(
        m.lookup("PATCH", "/v2/shelves/7").map(String::as_str),
        Some("2.library.Google_Autogenerated_Unrecognized_Method_Call")
    );
    let (_, bindings) = m.lookup_with_bindings("GET", "/v2/shelves/a%20b").unwrap();
    assert_eq!(bindings[0].field_path, ["shelf_id"]);
    assert_eq!(bindings[0].value, "a b");
}

#[test]
fn request_type_names_stay_unique_across_apis() {
    let v1 = "swagger: '2.0'\ninfo: {title: T, version: 1.0.0}\nhost: multi.example.com\npaths:\n  /v1/items/{itemId}:\n    get:\n      operationId: getItem\n      parameters: [{name: itemId, in: path, required: true, type: integer, format: int32}]\n      responses: {200: {description: ok}}\n";
    let v2 = v1.replace("1.0.0", "2.0.0").replace("/v1/", "/v2/");
    let conv = convert(&[
        SourceFile::new("v1.yaml", v1),
        SourceFile::new("v2.yaml", v2),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let s = &conv.service;
    let urls: Vec<&str> = s
        .apis
        .iter()
        .map(|a| a.methods[0].request_type_url.as_str())
        .collect();
    assert_eq!(
        urls,
        [
            "type.googleapis.com/namespace.types.GetItemRequest",
            "type.googleapis.com/namespace.types.GetItemRequest2"
        ]
    );
    assert_eq!(s.types[1]["name"], "namespace.types.GetItemRequest2");
    assert_eq!(s.types[1]["fields"][0]["kind"], "TYPE_INT32");
    assert_eq!(
        s.request_field_json_name("2.multi_example_com.GetItem", "item_id"),
        Some("itemId")
    );
    assert_eq!(
        s.http.as_ref().unwrap().rules[1].get.as_deref(),
        Some("/v2/items/{item_id}")
    );
}

#[test]
fn an_empty_security_alternative_makes_the_jwt_optional() {
    let text = "swagger: '2.0'\ninfo: {title: T, version: v1}\nhost: opt.example.com\nsecurityDefinitions:\n  jwt: {type: oauth2, flow: implicit, authorizationUrl: '', x-google-issuer: https://issuer.example.com}\npaths:\n  /maybe:\n    get:\n      operationId: maybe\n      security:\n        - jwt: []\n        - {}\n      responses: {200: {description: ok}}\n";
    let (svc, _) = to_json("opt.yaml", text);
    assert_eq!(
        svc["authentication"]["rules"][0],
        json!({"selector": "v1.opt_example_com.Maybe", "allowWithoutCredential": true,
               "requirements": [{"providerId": "jwt"}]})
    );
    assert_eq!(svc["usage"]["rules"][0]["allowUnregisteredCalls"], true);
}

/// Google's converter compares the x-google-endpoints name with the host without regard to
/// case. The config keeps the host's spelling: the proxy turns allowCors on only for the
/// endpoint named exactly as the service.
#[test]
fn the_endpoints_name_may_differ_from_the_host_in_case() {
    let text = "swagger: '2.0'\ninfo: {title: T, version: v1}\nhost: cors.example.com\nx-google-endpoints:\n  - name: CORS.Example.com\n    allowCors: true\npaths: {}\n";
    let (svc, _) = to_json("cors.yaml", text);
    assert_eq!(
        svc["endpoints"],
        json!([{"name": "cors.example.com", "allowCors": true}])
    );
}

#[test]
fn yaml_flow_style_is_not_mistaken_for_json() {
    let text = "{swagger: '2.0', info: {title: T, version: v1}, host: f.example.com, paths: {/a: {get: {operationId: a, responses: {200: {description: ok}}}}}}";
    let (svc, _) = to_json("flow.yaml", text);
    assert_eq!(svc["http"]["rules"][0]["get"], "/a");
    // Without a .json name, JSON content is still recorded as JSON.
    let (svc, _) = to_json(
        "spec",
        r#"{"swagger": "2.0", "info": {"title": "T", "version": "v1"}, "host": "f.example.com", "paths": {}}"#,
    );
    assert_eq!(
        svc["sourceInfo"]["sourceFiles"][0]["fileType"],
        "OPEN_API_JSON"
    );
}

/// A conversion stops, with a plain error, once its deadline has passed or
/// its caller has cancelled it; the control plane relies on this to stop abandoned work.
#[test]
fn conversions_stop_at_their_deadline_or_when_cancelled() {
    use portico_config::{convert_with, ConvertOptions, Interrupted};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let mut text = String::from(
        "swagger: \"2.0\"\ninfo: {title: T, version: 1.0.0}\nhost: api.example.com\npaths:\n",
    );
    for i in 0..2000 {
        text.push_str(&format!(
            "  /p{i}:\n    get:\n      operationId: op{i}\n      responses: {{200: {{description: ok}}}}\n"
        ));
    }
    let files = [SourceFile::new("big.yaml", text.as_bytes())];

    let past = ConvertOptions {
        deadline: Some(Instant::now()),
        cancel: None,
    };
    let err = convert_with(&files, &past).unwrap_err();
    assert_eq!(err.interrupted, Some(Interrupted::DeadlineExceeded));
    assert_eq!(
        err.to_string(),
        "the conversion took longer than the time allowed and was stopped"
    );

    let cancelled = ConvertOptions {
        deadline: None,
        cancel: Some(Arc::new(AtomicBool::new(true))),
    };
    let err = convert_with(&files, &cancelled).unwrap_err();
    assert_eq!(err.interrupted, Some(Interrupted::Cancelled));

    // A small file with a deadline already passed is refused too: the clock is read at once.
    let small = [SourceFile::new(
        "small.yaml",
        "swagger: \"2.0\"\ninfo: {title: T, version: 1.0.0}\nhost: api.example.com\npaths: {}\n",
    )];
    assert_eq!(
        convert_with(&small, &past).unwrap_err().interrupted,
        Some(Interrupted::DeadlineExceeded)
    );

    let generous = ConvertOptions {
        deadline: Some(Instant::now() + Duration::from_secs(3600)),
        cancel: Some(Arc::new(AtomicBool::new(false))),
    };
    let conv = convert_with(&files, &generous).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(conv.service.apis[0].methods.len(), 2000);
}
