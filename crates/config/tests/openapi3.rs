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

/// Every 3.x extension at once (the reference's inventory example, extended).
const INVENTORY: &str = r#"openapi: 3.0.3
info: {title: Inventory API, version: 2.0.0}
servers:
  - url: https://inventory.endpoints.example-proj.cloud.goog/v2
    x-google-endpoint: {}
  - url: https://staging.example.com/v2
x-google-api-management:
  apiName: inventory
  metrics:
    read-requests: {displayName: Read requests}
    write-requests: {}
  quota:
    limits:
      read-requests-limit:
        metric: read-requests
        values: 600
  backends:
    main:
      address: https://inventory-main-abc123-uc.a.run.app
      pathTranslation: APPEND_PATH_TO_ADDRESS
      deadline: 20.0
      protocol: h2
    legacy:
      address: https://legacy.example.com/api/item
      pathTranslation: CONSTANT_ADDRESS
      disableAuth: true
    iap:
      address: https://iap.example.com
      jwtAudience: client-id.apps.googleusercontent.com
x-google-backend: main
components:
  securitySchemes:
    api_key: {type: apiKey, in: header, name: x-inventory-key}
    partner_jwt:
      type: oauth2
      flows:
        implicit:
          authorizationUrl: ""
          scopes: {}
      x-google-auth:
        issuer: https://issuer.example.com
        jwksUri: https://issuer.example.com/.well-known/jwks.json
        audiences: [inventory-clients, inventory-admin]
        jwtLocations:
          - header: X-Partner-Token
            valuePrefix: "Token "
          - query: access_token
security:
  - api_key: []
    partner_jwt: []
paths:
  /items/{itemId}:
    parameters:
      - {name: itemId, in: path, required: true, schema: {type: integer, format: int32}}
    get:
      operationId: getItem
      x-google-quota:
        read-requests: 1
      responses:
        '200': {description: The item}
    delete:
      operationId: deleteItem
      x-google-backend: legacy
      x-google-quota:
        metricCosts: {write-requests: 2}
      responses:
        '204': {description: Deleted}
  /admin:
    x-google-backend: iap
    get:
      operationId: admin
      responses:
        '200': {description: OK}
  /healthz:
    get:
      operationId: healthz
      security: []
      responses:
        '200': {description: OK}
"#;

#[test]
fn every_3x_extension_lands_in_the_config() {
    let (svc, warnings) = service("inventory.yaml", INVENTORY);
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
    let (svc, _) = service("s.yaml", &doc(schemes, &rest));
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
    let (svc, _) = service(
        "s.yaml",
        &doc(schemes, &("security: [{hkey: []}]\n".to_string() + ONE_OP)),
    );
    assert_eq!(
        rule(&svc["usage"]["rules"], sel).get("allowUnregisteredCalls"),
        None
    );
}

#[test]
fn the_2_0_security_rules_hold_for_3x() {
    let schemes = "    key: {type: apiKey, in: query, name: key}\n    j1:\n      type: oauth2\n      x-google-auth: {issuer: i1}\n    j2:\n      type: oauth2\n      x-google-auth: {issuer: i2}\n";
    // A key OR'ed with a JWT, two JWTs AND'ed, an undefined scheme: all refused, all listed.
    let rest = "paths:\n  /a:\n    get:\n      operationId: a\n      security: [{key: []}, {j1: []}]\n      responses: {'200': {description: ok}}\n  /b:\n    get:\n      operationId: b\n      security: [{j1: [], j2: []}]\n      responses: {'200': {description: ok}}\n  /c:\n    get:\n      operationId: c\n      security: [{nope: []}]\n      responses: {'200': {description: ok}}\n";
    let errs = errors("s.yaml", &doc(schemes, rest));
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert_eq!(errs[0], "s.yaml:19:17: Operation 'get' in path '/a': an API key cannot be OR'ed with another security scheme (alternatives: {key} OR {j1}); require the API key in every alternative, or in none");
    assert_eq!(errs[1], "s.yaml:24:19: Operation 'get' in path '/b': one security requirement ANDs the JWT providers \"j1\", \"j2\"; only one provider per requirement is supported, list them as separate requirements to accept a token from any of them");
    assert!(errs[2].starts_with("s.yaml:29:"), "{errs:#?}");
    assert!(errs[2].contains("\"nope\""), "{errs:#?}");
}

#[test]
fn quota_limits_may_be_grouped_and_paths_may_take_several_segments() {
    let text = r#"openapi: 3.1.0
info: {title: Files API, version: 1.0.0}
servers:
  - url: "https://{name}.endpoints.example-proj.cloud.goog:8443/"
    variables: {name: {default: files}}
    x-google-endpoint: {allowCors: true}
x-google-api-management:
  quota:
    default:
      limits:
        reads: {metric: reads, values: 10}
  metrics:
    reads: {}
  backends:
    store: {address: https://files-xyz-uc.a.run.app}
x-google-backend: store
components:
  parameters:
    rest:
      name: rest
      in: path
      required: true
      schema: {type: string}
      x-google-parameter: {pattern: '**'}
paths:
  /files/{path}:
    get:
      operationId: getFile
      parameters:
        - name: path
          in: path
          required: true
          schema: {type: string}
          x-google-parameter:
            pattern: '**'
      x-google-quota: {reads: 1}
      responses:
        '200': {description: File bytes}
  /tree/{rest}:
    get:
      operationId: tree
      parameters: [{$ref: '#/components/parameters/rest'}]
      responses:
        '200': {description: ok}
"#;
    let (svc, warnings) = service("files.yaml", text);
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
      "servers": [{"url": "https://j.example.com", "x-google-endpoint": {}}],
      "paths": {"/a": {"get": {"operationId": "a", "responses": {"200": {"description": "ok"}}}}}}"#;
    // gcloud uploads it as OPEN_API_YAML under any name; the content says 3.x.
    let (svc, _) = service("api.yaml", text);
    assert_eq!(svc["name"], "j.example.com");
    assert_eq!(svc["http"]["rules"][0]["get"], "/a");
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

/// One document with a problem of each kind 3.x adds: all are listed, each at its place.
const MALFORMED: &str = r#"openapi: 3.0.3
info: {title: T, version: v1}
host: a.example.com
servers:
  - url: https://a.example.com
    x-google-endpoint: {}
  - url: https://b.example.com
    x-google-endpoint: {}
x-google-management: {}
x-google-api-management:
  backends:
    main: {address: https://m.example.com, jwt_audiance: x}
  quota:
    limits:
      l1: {metric: m, values: many}
x-google-backend: {address: https://x.example.com}
components:
  securitySchemes:
    basic: {type: http, scheme: basic}
    jwt:
      type: oauth2
      x-google-issuer: i
    cookie: {type: apiKey, in: cookie, name: k}
    auth:
      type: openIdConnect
      x-google-auth: {jwksUri: https://x.example.com/jwks, audience: a}
paths:
  /a/{id=**}:
    get:
      operationId: a
      responses: {'200': {description: ok}}
  /b:
    get:
      operationId: b
      security: [{basic: []}, {cookie: []}]
      x-google-backend: missing
      responses: {'200': {description: ok}}
"#;

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

/// A small deterministic stand-in for the fuzzer over the 3.x paths: every prefix of the 3.x
/// documents, and each with one line left out, is converted or refused without a panic.
#[test]
fn cut_and_gapped_3x_documents_never_panic() {
    for text in [INVENTORY, MALFORMED, ECHO_V3] {
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
