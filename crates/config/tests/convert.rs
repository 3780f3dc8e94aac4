//! OpenAPI → service config: the getting-started spec, a spec using every supported extension,
//! the CLI entry point, and OpenAPI 3.x (at the end). Malformed specs are in `malformed.rs`.

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

// OpenAPI 3.0.x / 3.1.x with Google's 3.x extensions: each extension and each security scheme
// type lands in the config, the 3.x echo example converts to the same service as the 2.0 one,
// several files, and none of them panics when cut short. Malformed 3.x documents are in
// `malformed.rs`.

const ECHO_V3: &str = include_str!("../../../examples/echo/openapi3.yaml");

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
    let (v2, _) = to_json("openapi.yaml", GETTING_STARTED);
    let (v3, warnings) = to_json("openapi3.yaml", ECHO_V3);
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

/// Every 3.x extension at once (the reference's inventory example, extended); also a fuzz seed.
const INVENTORY: &str = include_str!("../../../fuzz/seeds/openapi/openapi3_inventory.yaml");

#[test]
fn every_3x_extension_lands_in_the_config() {
    let (svc, warnings) = to_json("inventory.yaml", INVENTORY);
    let api = "2.inventory";
    let sel = |m: &str| format!("{api}.{m}");
    // x-google-endpoint: the marked server's host is the service, its path the base path.
    assert_eq!(svc["name"], "inventory.endpoints.example-proj.cloud.goog");
    assert_eq!(
        svc["endpoints"],
        json!([{"name": "inventory.endpoints.example-proj.cloud.goog"}])
    );
    // apiName.
    assert_eq!(svc["apis"][0]["name"], api);
    let http = &svc["http"]["rules"];
    assert_eq!(
        rule(http, &sel("GetItem")),
        &json!({"selector": sel("GetItem"), "get": "/v2/items/{item_id}"})
    );
    assert_eq!(
        rule(http, &sel("DeleteItem"))["delete"],
        "/v2/items/{item_id}"
    );
    assert_eq!(rule(http, &sel("Healthz"))["get"], "/v2/healthz");
    // schema.type/format of a parameter type the request field.
    let fields = &svc["types"][0]["fields"][0];
    assert_eq!(fields["kind"], "TYPE_INT32", "{}", svc["types"]);
    assert_eq!(fields["jsonName"], "itemId");

    // Named backends: root default, operation override, path-item placement.
    let backends = &svc["backend"]["rules"];
    assert_eq!(
        rule(backends, &sel("GetItem")),
        &json!({"selector": sel("GetItem"), "address": "https://inventory-main-abc123-uc.a.run.app",
                "deadline": 20.0, "pathTranslation": "APPEND_PATH_TO_ADDRESS", "protocol": "h2"})
    );
    assert_eq!(
        rule(backends, &sel("DeleteItem")),
        &json!({"selector": sel("DeleteItem"), "address": "https://legacy.example.com/api/item",
                "pathTranslation": "CONSTANT_ADDRESS", "disableAuth": true})
    );
    assert_eq!(
        rule(backends, &sel("Admin")),
        &json!({"selector": sel("Admin"), "address": "https://iap.example.com",
                "pathTranslation": "APPEND_PATH_TO_ADDRESS",
                "jwtAudience": "client-id.apps.googleusercontent.com"})
    );

    // Metrics and quota (map forms), x-google-quota in both shapes.
    let metrics: Vec<&Value> = svc["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| !m["name"].as_str().unwrap().contains('/'))
        .collect();
    assert_eq!(
        metrics,
        [
            &json!({"name": "read-requests", "displayName": "Read requests", "metricKind": "DELTA", "valueType": "INT64"}),
            &json!({"name": "write-requests", "metricKind": "DELTA", "valueType": "INT64"})
        ]
    );
    let limits = &svc["quota"]["limits"];
    assert_eq!(limits[0]["name"], "read-requests-limit");
    assert_eq!(limits[0]["metric"], "read-requests");
    assert_eq!(limits[0]["values"], json!({"STANDARD": "600"}));
    assert_eq!(limits[0]["unit"], "1/min/{project}");
    let costs = &svc["quota"]["metricRules"];
    assert_eq!(
        rule(costs, &sel("GetItem"))["metricCosts"],
        json!({"read-requests": "1"})
    );
    assert_eq!(
        rule(costs, &sel("DeleteItem"))["metricCosts"],
        json!({"write-requests": "2"})
    );

    // x-google-auth → provider; API key AND JWT; security: [] → anonymous.
    let providers = &svc["authentication"]["providers"];
    assert_eq!(
        providers,
        &json!([{"id": "partner_jwt", "issuer": "https://issuer.example.com",
            "jwksUri": "https://issuer.example.com/.well-known/jwks.json",
            "audiences": "inventory-clients,inventory-admin",
            "jwtLocations": [{"header": "X-Partner-Token", "valuePrefix": "Token "},
                             {"query": "access_token"}]}])
    );
    let auth = &svc["authentication"]["rules"];
    assert_eq!(
        rule(auth, &sel("GetItem"))["requirements"],
        json!([{"providerId": "partner_jwt"}])
    );
    assert_eq!(
        rule(auth, &sel("Healthz")),
        &json!({"selector": sel("Healthz")})
    );
    let usage = &svc["usage"]["rules"];
    assert_eq!(
        rule(usage, &sel("GetItem")).get("allowUnregisteredCalls"),
        None
    );
    assert_eq!(rule(usage, &sel("Healthz"))["allowUnregisteredCalls"], true);
    // An API key in a header other than x-api-key becomes a system parameter.
    assert_eq!(
        rule(&svc["systemParameters"]["rules"], &sel("GetItem"))["parameters"],
        json!([{"name": "api_key", "httpHeader": "x-inventory-key"}])
    );
    // Only healthz lacks a key requirement.
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("Operation 'get' in path '/healthz'"),
        "{warnings:?}"
    );
}

fn doc(security_schemes: &str, rest: &str) -> String {
    format!(
        "openapi: 3.1.0\ninfo: {{title: T, version: v1}}\nservers:\n  - url: https://a.example.com\n    x-google-endpoint: {{}}\ncomponents:\n  securitySchemes:\n{security_schemes}{rest}"
    )
}

const ONE_OP: &str =
    "paths:\n  /a:\n    get:\n      operationId: a\n      responses: {'200': {description: ok}}\n";

#[test]
fn every_security_scheme_type_maps_to_a_key_or_a_jwt_provider() {
    let schemes = "    qkey: {type: apiKey, in: query, name: k}\n    hkey: {type: apiKey, in: header, name: x-api-key}\n    oauth:\n      type: oauth2\n      flows: {implicit: {authorizationUrl: '', scopes: {}}}\n      x-google-auth: {issuer: https://o.example.com, jwksUri: https://o.example.com/jwks}\n    oidc:\n      type: openIdConnect\n      openIdConnectUrl: https://d.example.com/.well-known/openid-configuration\n      x-google-auth: {issuer: https://d.example.com, jwks_uri: https://d.example.com/jwks, audiences: aud1}\n    bearer:\n      type: http\n      scheme: bearer\n      bearerFormat: JWT\n      x-google-auth: {issuer: https://b.example.com, jwksUri: https://b.example.com/jwks, audiences: [aud2]}\n";
    let rest = "security:\n  - qkey: []\n    oauth: []\n  - qkey: []\n    oidc: []\n  - qkey: []\n    bearer: []\n".to_string() + ONE_OP;
    let (svc, _) = to_json("s.yaml", &doc(schemes, &rest));
    let providers: Vec<(&str, &str, &str)> = svc["authentication"]["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap(),
                p["issuer"].as_str().unwrap(),
                p["audiences"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        providers,
        [
            ("oauth", "https://o.example.com", ""),
            ("oidc", "https://d.example.com", "aud1"),
            ("bearer", "https://b.example.com", "aud2")
        ]
    );
    let sel = "v1.a_example_com.A";
    assert_eq!(
        rule(&svc["authentication"]["rules"], sel)["requirements"],
        json!([{"providerId": "oauth"}, {"providerId": "oidc"}, {"providerId": "bearer"}])
    );
    // The query key "k" is not one ESP reads by default: a system parameter.
    assert_eq!(
        rule(&svc["systemParameters"]["rules"], sel)["parameters"],
        json!([{"name": "api_key", "urlQueryParameter": "k"}])
    );
    assert_eq!(
        rule(&svc["usage"]["rules"], sel).get("allowUnregisteredCalls"),
        None
    );

    // The header key alone: required, read from x-api-key (ESP's default: no system parameter).
    let (svc, _) = to_json(
        "s.yaml",
        &doc(schemes, &("security: [{hkey: []}]\n".to_string() + ONE_OP)),
    );
    assert_eq!(
        rule(&svc["usage"]["rules"], sel).get("allowUnregisteredCalls"),
        None
    );
}

#[test]
fn quota_limits_may_be_grouped_and_paths_may_take_several_segments() {
    let text = include_str!("../../../fuzz/seeds/openapi/openapi3_1_files.yaml");
    let (svc, warnings) = to_json("files.yaml", text);
    assert_eq!(svc["name"], "files.endpoints.example-proj.cloud.goog");
    assert_eq!(
        svc["endpoints"],
        json!([{"name": "files.endpoints.example-proj.cloud.goog", "allowCors": true}])
    );
    let http = &svc["http"]["rules"];
    assert_eq!(http[0]["get"], "/files/{path=**}");
    assert_eq!(http[1]["get"], "/tree/{rest=**}");
    assert_eq!(
        svc["quota"]["limits"][0]["values"],
        json!({"STANDARD": "10"})
    );
    assert_eq!(
        svc["backend"]["rules"][0]["pathTranslation"],
        "APPEND_PATH_TO_ADDRESS"
    );
    assert!(
        warnings.iter().any(|w| w
            == "files.yaml:4:10: the port :8443 of the server url is not part of the service name and is ignored"),
        "{warnings:#?}"
    );
}

#[test]
fn json_3x_is_told_apart_by_content() {
    let text = r#"{"openapi": "3.0.0", "info": {"title": "T", "version": "v1"},
      "servers": [{"url": "https://j.example.com", "x-google-endpoint": {"allowCors": false}}],
      "x-google-api-management": {"allowCors": true},
      "paths": {"/a": {"get": {"operationId": "a", "responses": {"200": {"description": "ok"}}}}}}"#;
    // gcloud uploads it as OPEN_API_YAML under any name; the content says 3.x.
    let (svc, _) = to_json("api.yaml", text);
    assert_eq!(svc["name"], "j.example.com");
    assert_eq!(svc["http"]["rules"][0]["get"], "/a");
    // x-google-api-management.allowCors, the documented place, wins over x-google-endpoint's.
    assert_eq!(
        svc["endpoints"],
        json!([{"name": "j.example.com", "allowCors": true}])
    );
}

#[test]
fn several_3x_files_make_one_service_and_cannot_mix_with_2_0() {
    let a = "openapi: 3.0.0\ninfo: {title: A, version: v1}\nservers: [{url: 'https://m.example.com/a', x-google-endpoint: {}}]\nx-google-api-management: {apiName: first}\npaths:\n  /x:\n    get: {operationId: x, responses: {'200': {description: ok}}}\n";
    let b = "openapi: 3.1.0\ninfo: {title: B, version: v2}\nservers: [{url: 'https://m.example.com/b', x-google-endpoint: {}}]\nx-google-api-management: {apiName: second}\npaths:\n  /x:\n    get: {operationId: x, responses: {'200': {description: ok}}}\n";
    let conv = convert(&[SourceFile::new("a.yaml", a), SourceFile::new("b.yaml", b)])
        .unwrap_or_else(|e| panic!("{e}"));
    let svc = serde_json::to_value(&conv.service).unwrap();
    assert_eq!(svc["apis"][0]["name"], "v1.first");
    assert_eq!(svc["apis"][1]["name"], "v2.second");
    assert_eq!(svc["http"]["rules"][1]["get"], "/b/x");

    // Components in another 3.x file of the submission, by $ref: parameters (with their
    // schema types) and schemas; that file needs no server of its own.
    let api = "openapi: 3.0.0\ninfo: {title: A, version: v1}\nservers: [{url: 'https://m.example.com', x-google-endpoint: {}}]\npaths:\n  /pets/{petId}:\n    get:\n      operationId: getPet\n      parameters: [{$ref: './common.yaml#/components/parameters/petId'}]\n      responses: {'200': {description: ok, content: {application/json: {schema: {$ref: './common.yaml#/components/schemas/Pet'}}}}}\n";
    let common = "openapi: 3.0.0\ninfo: {title: C, version: v1}\ncomponents:\n  parameters:\n    petId: {name: petId, in: path, required: true, schema: {type: integer}}\n  schemas:\n    Pet: {type: object}\n";
    let conv = convert(&[
        SourceFile::new("api.yaml", api),
        SourceFile::new("common.yaml", common),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let svc = serde_json::to_value(&conv.service).unwrap();
    assert_eq!(svc["http"]["rules"][0]["get"], "/pets/{pet_id}");
    assert_eq!(svc["types"][0]["fields"][0]["kind"], "TYPE_INT64");
    let broken = api.replace("schemas/Pet", "schemas/Cat");
    let err = convert(&[
        SourceFile::new("api.yaml", broken),
        SourceFile::new("common.yaml", common),
    ])
    .expect_err("missing schema");
    assert_eq!(
        err.to_string(),
        "api.yaml:9:88: reference \"./common.yaml#/components/schemas/Cat\" cannot be resolved: common.yaml has no \"Cat\" under \"/components/schemas\""
    );

    let v2 = "swagger: '2.0'\ninfo: {title: C, version: v1}\nhost: m.example.com\npaths: {}\n";
    let err =
        convert(&[SourceFile::new("a.yaml", a), SourceFile::new("c.yaml", v2)]).expect_err("mixed");
    assert_eq!(
        err.to_string(),
        "a.yaml:1:10: this file is OpenAPI 3.0.0 but c.yaml is OpenAPI 2.0 (swagger: \"2.0\"); one deployment cannot mix OpenAPI 2.0 and 3.x files"
    );
}

/// A small deterministic stand-in for the fuzzer over the 3.x paths: every prefix of the 3.x
/// documents, and each with one line left out, is converted or refused without a panic.
#[test]
fn cut_and_gapped_3x_documents_never_panic() {
    let malformed = include_str!("../../../fuzz/seeds/openapi/openapi3_malformed.yaml");
    for text in [INVENTORY, malformed, ECHO_V3] {
        for end in (0..text.len()).filter(|&i| text.is_char_boundary(i)) {
            let _ = portico_config::fuzz::openapi(&text.as_bytes()[..end]);
        }
        let lines: Vec<&str> = text.lines().collect();
        for skip in 0..lines.len() {
            let gapped: Vec<&str> = lines
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, l)| *l)
                .collect();
            let _ = portico_config::fuzz::openapi(gapped.join("\n").as_bytes());
        }
    }
}
