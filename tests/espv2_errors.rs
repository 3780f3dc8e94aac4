//! End to end: every error `portico espv2` writes itself, through real processes, asserted
//! byte for byte in ESPv2's shape `{"code":<HTTP status>,"message":"<text>"}` with ESPv2's
//! status and text (docs/espv2.md has the catalogue; crates/proxy/src/dialect.rs the code).
//!
//! The proxy is the real `portico espv2` binary, started with ESPv2's own flags and a service
//! config file. Its peers are doubles on loopback ports chosen at run time, each a few lines of
//! raw HTTP/1.1 so they can also misbehave: a backend (answers, stalls, hangs up), a Service
//! Control (answers `:check` by API key, refuses quota, fails with 500/503, stalls) and a
//! JWKS server (one key set, one 503). A second proxy points at a Service Control port where
//! nothing listens. One table row per situation; the gRPC row also shows that the one listener
//! speaks HTTP/2 without TLS.

mod common;

use common::espv2;
use common::free_port;
use common::peer::{self, Action, Request};
use serde_json::json;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SERVICE: &str = "espv2-errors.endpoints.e2e-proj.cloud.goog";
const ISSUER: &str = "https://issuer.example";
const ISSUER2: &str = "https://issuer2.example";
const AUDIENCE: &str = "e2e-audience";
const KID: &str = "e2e-kid";

/// Service Control: `:check` by the API key in the request, quota refused for `quota`.
fn service_control(req: &Request) -> Action {
    if req.path.ends_with(":report") {
        return Action::Respond(200, "{}".into());
    }
    if req.path.ends_with(":allocateQuota") {
        return Action::Respond(
            200,
            json!({"operationId": "q", "allocateErrors": [
                {"code": "RESOURCE_EXHAUSTED", "description": "Insufficient tokens for quota group reads"}
            ]})
            .to_string(),
        );
    }
    if !req.path.ends_with(":check") || req.method != "POST" {
        return Action::Respond(404, "{}".into());
    }
    let key = req
        .body
        .split("api_key:")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("");
    let refuse = |code: &str| {
        Action::Respond(
            200,
            json!({"operationId": "c", "checkErrors": [{"code": code}]}).to_string(),
        )
    };
    match key {
        "invalid" => refuse("API_KEY_INVALID"),
        "expired" => refuse("API_KEY_EXPIRED"),
        "notfound" => refuse("API_KEY_NOT_FOUND"),
        "notenabled" => refuse("SERVICE_NOT_ACTIVATED"),
        "blocked" => refuse("API_TARGET_BLOCKED"),
        "projectinvalid" => refuse("PROJECT_INVALID"),
        "projectnotfound" => refuse("NOT_FOUND"),
        "ipblocked" => refuse("IP_ADDRESS_BLOCKED"),
        "billing" => refuse("BILLING_DISABLED"),
        "checkquota" => refuse("RESOURCE_EXHAUSTED"),
        "unsupported" => refuse("SECURITY_POLICY_VIOLATED"),
        "depdown" => refuse("SERVICE_STATUS_UNAVAILABLE"),
        "http500" => Action::Respond(500, "boom".into()),
        "http429" => Action::Respond(429, "busy".into()),
        "http503" => Action::Respond(503, "down".into()),
        "slow" => Action::Stall(Duration::from_secs(5)),
        _ => Action::Respond(200, json!({"operationId": "c"}).to_string()),
    }
}

fn backend(req: &Request) -> Action {
    match req.path.split('?').next().unwrap_or("") {
        "/slow" | "/hold" => Action::Stall(Duration::from_secs(10)),
        "/reset" => Action::HangUp,
        _ => Action::Respond(200, r#"{"ok":true}"#.into()),
    }
}

/// A listener whose accept queue is full: connections to it never complete their handshake.
/// Returns it with the connections that fill it (both must stay open).
fn full_backlog() -> (
    tokio::net::TcpListener,
    Vec<std::net::TcpStream>,
    SocketAddr,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let listener = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().expect("socket");
        s.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        s.listen(0).expect("listen")
    });
    let addr = listener.local_addr().expect("addr");
    let mut held = Vec::new();
    for _ in 0..64 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => held.push(s),
            Err(_) => return (listener, held, addr),
        }
    }
    panic!("a listener with backlog 0 kept accepting handshakes");
}

// ---------------------------------------------------------------------------------------------
// Keys and tokens.

use common::espv2::Signer;

fn signer() -> Signer {
    common::espv2::signer(KID)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn token(s: &Signer, kid: &str, claims: serde_json::Value) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some(kid.to_string());
    jsonwebtoken::encode(&h, &claims, &s.key).expect("sign")
}

fn claims(iss: &str, aud: &str) -> serde_json::Value {
    json!({"iss": iss, "sub": "user", "aud": aud, "iat": now(), "exp": now() + 3600})
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

// ---------------------------------------------------------------------------------------------
// The service config and the proxy.

fn service_config(jwks: SocketAddr, dead: u16, stuck: SocketAddr) -> serde_json::Value {
    let rule = |name: &str, verb: &str, path: &str| json!({"selector": format!("e2e.Api.{name}"), verb: path});
    let open =
        |name: &str| json!({"selector": format!("e2e.Api.{name}"), "allowUnregisteredCalls": true});
    json!({
        "name": SERVICE,
        "id": "2024-01-01r0",
        "apis": [{"name": "e2e.Api", "version": "v1"}],
        "http": {"rules": [
            rule("Echo", "post", "/echo"),
            rule("Open", "post", "/open"),
            rule("Shelf", "get", "/v1/shelves/{shelf}"),
            rule("Jwt", "get", "/jwt"),
            rule("JwtBroken", "get", "/jwtbroken"),
            rule("Quota", "get", "/quota"),
            rule("Slow", "get", "/slow"),
            rule("Hold", "get", "/hold"),
            rule("Down", "get", "/down"),
            rule("Unresolved", "get", "/unresolved"),
            rule("Stuck", "get", "/stuck"),
            rule("Reset", "get", "/reset"),
            rule("IdToken", "get", "/idtoken"),
            rule("Upload", "post", "/upload"),
        ]},
        "usage": {"rules": [
            open("Open"), open("Shelf"), open("Jwt"), open("JwtBroken"), open("Slow"), open("Hold"),
            open("Down"), open("Reset"), open("IdToken"), open("Upload"), open("Unresolved"),
            open("Stuck"),
        ]},
        "authentication": {
            "providers": [
                {"id": "p1", "issuer": ISSUER, "jwksUri": format!("http://{jwks}/jwks"), "audiences": AUDIENCE},
                {"id": "p2", "issuer": ISSUER2, "jwksUri": format!("http://{jwks}/broken"), "audiences": AUDIENCE},
            ],
            "rules": [
                {"selector": "e2e.Api.Jwt", "requirements": [{"providerId": "p1"}]},
                {"selector": "e2e.Api.JwtBroken", "requirements": [{"providerId": "p2"}]},
            ],
        },
        "quota": {"metricRules": [{"selector": "e2e.Api.Quota", "metricCosts": {"reads": "1"}}]},
        "backend": {"rules": [
            {"selector": "e2e.Api.Slow", "deadline": 0.5},
            {"selector": "e2e.Api.Hold", "deadline": 5.0},
            {"selector": "e2e.Api.Down", "address": format!("http://127.0.0.1:{dead}/down")},
            // `.invalid` never resolves (RFC 6761).
            {"selector": "e2e.Api.Unresolved", "address": "http://backend.nowhere.invalid/x"},
            {"selector": "e2e.Api.Stuck", "address": format!("http://{stuck}/x")},
            {"selector": "e2e.Api.IdToken", "address": format!("http://127.0.0.1:{dead}/x"),
             "jwtAudience": "https://aud.example"},
        ]},
    })
}

/// A row of the table: the request and the exact answer expected.
struct Row {
    what: &'static str,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Option<String>,
    status: u16,
    message: String,
}

fn row(what: &'static str, method: &'static str, path: &str, status: u16, message: &str) -> Row {
    Row {
        what,
        method,
        path: path.to_string(),
        headers: Vec::new(),
        body: None,
        status,
        message: message.to_string(),
    }
}

impl Row {
    fn header(mut self, name: &'static str, value: impl Into<String>) -> Row {
        self.headers.push((name, value.into()));
        self
    }
    fn body(mut self, body: impl Into<String>) -> Row {
        self.body = Some(body.into());
        self
    }
    fn bearer(self, token: &str) -> Row {
        self.header("authorization", format!("Bearer {token}"))
    }
}

fn send(client: &reqwest::blocking::Client, port: u16, r: &Row) -> (u16, String, String) {
    let url = format!("http://127.0.0.1:{port}{}", r.path);
    let method = reqwest::Method::from_bytes(r.method.as_bytes()).expect("method");
    let mut req = client.request(method, &url);
    for (k, v) in &r.headers {
        req = req.header(*k, v);
    }
    if let Some(b) = &r.body {
        req = req.body(b.clone());
    }
    let resp = req.send().unwrap_or_else(|e| panic!("{}: {e}", r.what));
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, ct, resp.text().expect("body"))
}

fn check(client: &reqwest::blocking::Client, port: u16, r: &Row, log: &dyn Fn() -> String) {
    let (status, ct, body) = send(client, port, r);
    assert_eq!(
        (status, body.as_str()),
        (r.status, espv2::body(r.status, &r.message).as_str()),
        "{}: {} {}\nproxy log:\n{}",
        r.what,
        r.method,
        r.path,
        log()
    );
    assert_eq!(ct, "application/json", "{}", r.what);
}

#[test]
fn every_error_the_proxy_writes_is_espv2s() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let good = signer();
    let impostor = signer();
    let jwks_doc = json!({"keys": [good.jwk.clone()]}).to_string();
    let jwks = peer::start(
        &rt,
        Arc::new(move |r: &Request| match r.path.as_str() {
            "/jwks" => Action::Respond(200, jwks_doc.clone()),
            _ => Action::Respond(503, "unavailable".into()),
        }),
    );
    let sc = peer::start(&rt, Arc::new(service_control));
    let backend_addr = peer::start(&rt, Arc::new(backend));
    // Bound and dropped: nothing listens there while the test runs.
    let dead = free_port();
    let (_stuck_listener, _stuck_held, stuck) = full_backlog();

    let config = dir.path().join("service.json");
    std::fs::write(&config, service_config(jwks, dead, stuck).to_string()).expect("config");
    // The proxy's identity: Service Control calls are signed with it; its token endpoint is
    // the dead port, so no ID token for a backend can be had.
    let g = portico_credentials::generate_rsa_key().expect("keygen");
    let key_file = dir.path().join("key.json");
    let mut f = std::fs::File::create(&key_file).expect("key file");
    f.write_all(
        json!({
            "type": "service_account", "project_id": "e2e-proj", "private_key_id": g.key_id,
            "private_key": g.private_pkcs8_pem, "client_email": "proxy@e2e-proj.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": format!("http://127.0.0.1:{dead}/token"),
        })
        .to_string()
        .as_bytes(),
    )
    .expect("write key");

    // ESPv2's default (GCP) mode with a metadata server nobody answers at, not --non_gcp:
    // under --non_gcp ESPv2 does no backend authentication at all, and the ID token row below
    // needs it. The key file still signs every call (a key wins over the metadata server).
    // ALWAYS_INIT, as ESPv2's own tests of failing token fetches run: by default the proxy
    // would not listen until the ID token could be had, and the row that asserts its error
    // could never be sent.
    let common_flags = |sc_url: String| {
        vec![
            "--dependency_error_behavior=ALWAYS_INIT".to_string(),
            format!("--service_json_path={}", config.display()),
            format!("--backend=http://{backend_addr}"),
            format!("--metadata_url=http://127.0.0.1:{dead}"),
            format!("--service_account_key={}", key_file.display()),
            format!("--service_control_url={sc_url}"),
            "--service_control_network_fail_policy=close".to_string(),
            "--service_control_check_timeout_ms=300".to_string(),
            "--service_control_check_retries=0".to_string(),
            "--cors_preset=basic".to_string(),
            "--client_max_body_size=1k".to_string(),
            "--cluster_connect_timeout=500ms".to_string(),
        ]
    };
    let (proxy, port) = espv2::start(dir.path(), "espv2", &common_flags(format!("http://{sc}")));
    let mut sc_down_flags = common_flags(format!("http://127.0.0.1:{dead}"));
    sc_down_flags.push("--backend_retry_num=0".to_string());
    let (proxy_sc_down, port_sc_down) = espv2::start(dir.path(), "espv2-sc-down", &sc_down_flags);
    let mut max1_flags = common_flags(format!("http://{sc}"));
    max1_flags.push("--backend_cluster_maximum_requests=1".to_string());
    let (proxy_max1, port_max1) = espv2::start(dir.path(), "espv2-max1", &max1_flags);
    let mut open_flags = common_flags(format!("http://{sc}"));
    open_flags.push("--service_control_network_fail_policy=open".to_string());
    let (proxy_open, port_open) = espv2::start(dir.path(), "espv2-open", &open_flags);
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");

    // Sanity: the proxy forwards what it should before refusing what it should not.
    let (s, _, body) = send(&client, port, &row("ok", "POST", "/echo?key=good", 200, ""));
    assert_eq!(
        (s, body.as_str()),
        (200, r#"{"ok":true}"#),
        "{}",
        proxy.log()
    );

    let t = |kid: &str, c: serde_json::Value| token(&good, kid, c);
    let svc = SERVICE;
    let unreg = "UNAUTHENTICATED: Method doesn't allow unregistered callers (callers without \
                 established identity). Please use API Key or other form of API consumer \
                 identity to call this API.";
    let reset = "upstream connect error or disconnect/reset before headers. reset reason: ";
    let rows = vec![
        // Routing.
        row("unknown path", "GET", "/nowhere", 404, "The current request is not defined by this API."),
        // Under --cors_preset every OPTIONS that is not a valid preflight is refused, whatever
        // its path.
        row("OPTIONS on an unknown path, no preflight headers", "OPTIONS", "/nowhere", 400,
            "The CORS preflight request is missing one (or more) of the following required headers [Origin, Access-Control-Request-Method] or has an unmatched Origin header."),
        row("known path, undefined method", "DELETE", "/v1/shelves/7", 405,
            "The current request is matched to the defined url template \"/v1/shelves/{shelf}\" but its http method is not allowed"),
        row("method override to an undefined method", "POST", "/open", 405,
            "The current request is matched to the defined url template \"/open\" but its http method is not allowed")
            .header("x-http-method-override", "DELETE"),
        row("CORS preflight without Access-Control-Request-Method", "OPTIONS", "/open", 400,
            "The CORS preflight request is missing one (or more) of the following required headers [Origin, Access-Control-Request-Method] or has an unmatched Origin header.")
            .header("origin", "https://app.example"),
        // API keys and :check.
        row("no API key", "POST", "/echo", 401, unreg),
        row("API key invalid", "POST", "/echo?key=invalid", 400,
            "INVALID_ARGUMENT: API key not valid. Please pass a valid API key."),
        row("API key far too long", "POST", &format!("/echo?key={}", "k".repeat(200)), 400,
            "INVALID_ARGUMENT: API key not valid. Please pass a valid API key."),
        row("API key expired", "POST", "/echo?key=expired", 400,
            "INVALID_ARGUMENT: API key expired. Please renew the API key."),
        row("API key not found", "POST", "/echo?key=notfound", 400,
            "INVALID_ARGUMENT: API key not found. Please pass a valid API key."),
        row("API not enabled", "POST", "/echo?key=notenabled", 403,
            &format!("PERMISSION_DENIED: API {svc} is not enabled for the project.")),
        row("API target blocked", "POST", "/echo?key=blocked", 403,
            "PERMISSION_DENIED:  The API targeted by this request is invalid for the given API key."),
        row("client project invalid", "POST", "/echo?key=projectinvalid", 400,
            "INVALID_ARGUMENT: Client project not valid. Please pass a valid project."),
        row("client project not found", "POST", "/echo?key=projectnotfound", 400,
            "INVALID_ARGUMENT: Client project not found. Please pass a valid project."),
        row("IP address blocked", "POST", "/echo?key=ipblocked", 403, "PERMISSION_DENIED: IP address blocked."),
        row("billing disabled", "POST", "/echo?key=billing", 403,
            &format!("PERMISSION_DENIED: API {svc} has billing disabled. Please enable it.")),
        row("check quota exhausted", "POST", "/echo?key=checkquota", 429, "RESOURCE_EXHAUSTED: Quota check failed."),
        row("unsupported check error", "POST", "/echo?key=unsupported", 500,
            "INTERNAL: Request blocked due to unsupported error code in Google Service Control Check response: 121"),
        // A dependency of Service Control down: under the closed policy, refused.
        row("check error SERVICE_STATUS_UNAVAILABLE", "POST", "/echo?key=depdown", 503,
            "UNAVAILABLE: One or more Google Service Control backends are unavailable."),
        row("Service Control answers 429", "POST", "/echo?key=http429", 503,
            "UNAVAILABLE: Calling Google Service Control API failed with: 429 and body: busy"),
        row("Service Control answers 500", "POST", "/echo?key=http500", 500,
            "INTERNAL: Calling Google Service Control API failed with: 500 and body: boom"),
        row("Service Control answers 503", "POST", "/echo?key=http503", 503,
            "UNAVAILABLE: Calling Google Service Control API failed with: 503 and body: down"),
        row("Service Control does not answer in time", "POST", "/echo?key=slow", 503,
            "UNAVAILABLE: Calling Google Service Control API failed with: 504 and body: upstream request timeout"),
        // JWT.
        row("JWT missing", "GET", "/jwt", 401, "Jwt is missing"),
        row("JWT not three sections", "GET", "/jwt", 401,
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections").bearer("abc"),
        row("JWT with four sections", "GET", "/jwt", 401,
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")
            .bearer(&format!("{}.x", t(KID, claims(ISSUER, AUDIENCE)))),
        row("JWT header not base64", "GET", "/jwt", 401, "Jwt header is an invalid Base64url encoded")
            .bearer("!!.e30.c2ln"),
        row("JWT alg none", "GET", "/jwt", 401, "Jwt header [alg] is not supported")
            .bearer(&format!("{}.{}.c2ln", b64(r#"{"alg":"none"}"#), b64(r#"{"iss":"x"}"#))),
        row("JWT payload not JSON", "GET", "/jwt", 401, "Jwt payload is an invalid JSON")
            .bearer(&format!("{}.{}.c2ln", b64(r#"{"alg":"RS256"}"#), b64("{nope"))),
        row("JWT expired", "GET", "/jwt", 401, "Jwt is expired").bearer(&t(KID,
            json!({"iss": ISSUER, "aud": AUDIENCE, "exp": now() - 3600}))),
        row("JWT not yet valid", "GET", "/jwt", 401, "Jwt not yet valid").bearer(&t(KID,
            json!({"iss": ISSUER, "aud": AUDIENCE, "nbf": now() + 3600, "exp": now() + 7200}))),
        row("JWT issuer unknown, and expired", "GET", "/jwt", 401, "Jwt issuer is not configured")
            .bearer(&t(KID, json!({"iss": "https://stranger.example", "aud": AUDIENCE, "exp": now() - 3600}))),
        row("JWT audience not allowed", "GET", "/jwt", 403, "Audiences in Jwt are not allowed")
            .bearer(&t(KID, claims(ISSUER, "someone-else"))),
        row("JWT signed by another key", "GET", "/jwt", 401, "Jwt verification fails")
            .bearer(&token(&impostor, KID, claims(ISSUER, AUDIENCE))),
        row("JWT kid unknown", "GET", "/jwt", 401, "Jwks doesn't have key to match kid or alg from Jwt")
            .bearer(&t("other-kid", claims(ISSUER, AUDIENCE))),
        row("JWKS fetch fails", "GET", "/jwtbroken", 401, "Jwks remote fetch is failed")
            .bearer(&t(KID, claims(ISSUER2, AUDIENCE))),
        // Backends.
        row("backend deadline", "GET", "/slow", 504, "upstream request timeout"),
        // ESPv2's default: one more attempt on a connect failure, and its text says so.
        row("backend down", "GET", "/down", 503,
            "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: remote connection failure, transport failure reason: delayed connect error: 111"),
        // ESPv2's default retries a reset once too.
        row("backend hangs up", "GET", "/reset", 503,
            "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: connection termination"),
        row("backend name not resolved", "GET", "/unresolved", 503, "no healthy upstream"),
        // --cluster_connect_timeout, and ESPv2's default retry of a connect failure.
        row("backend never completes the handshake", "GET", "/stuck", 503,
            "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: connection timeout"),
        row("no ID token for the backend", "GET", "/idtoken", 500,
            "Token not found for audience: https://aud.example"),
        row("body too large", "POST", "/upload", 413, "Payload Too Large").body("x".repeat(2048)),
        // Refusals ESPv2 has no words of its own for keep Portico's, in ESPv2's shape.
        row("encoded NUL in the path", "GET", "/open%00", 400,
            "The request path holds an encoded NUL (%00)."),
    ];
    let log = || proxy.log();
    for r in &rows {
        check(&client, port, r, &log);
    }

    // WWW-Authenticate: only on JWT refusals, naming the request's URI (the query too) as
    // realm; never on the other 401s and 403s.
    let challenge = |path: &str, bearer: Option<&str>| {
        let mut r = client.get(format!("http://127.0.0.1:{port}{path}"));
        if let Some(b) = bearer {
            r = r.bearer_auth(b);
        }
        let resp = r.send().expect("request");
        (
            resp.status().as_u16(),
            resp.headers()
                .get("www-authenticate")
                .map(|v| v.to_str().expect("ascii").to_string()),
        )
    };
    assert_eq!(
        challenge("/jwt?x=1", None),
        (
            401,
            Some(format!("Bearer realm=\"http://127.0.0.1:{port}/jwt?x=1\""))
        )
    );
    assert_eq!(
        challenge("/jwt", Some("abc")),
        (
            401,
            Some(format!(
                "Bearer realm=\"http://127.0.0.1:{port}/jwt\", error=\"invalid_token\""
            ))
        )
    );
    let long = format!("/jwt?{}", "a".repeat(400));
    let (status, value) = challenge(&long, Some(&t(KID, claims(ISSUER, "someone-else"))));
    assert_eq!(status, 403);
    assert_eq!(
        value,
        Some(format!(
            "Bearer realm=\"http://127.0.0.1:{port}{}\", error=\"invalid_token\"",
            &long[..256]
        ))
    );
    let resp = client
        .post(format!("http://127.0.0.1:{port}/echo"))
        .send()
        .expect("request");
    assert_eq!(resp.status().as_u16(), 401);
    assert!(resp.headers().get("www-authenticate").is_none());
    let resp = client
        .post(format!("http://127.0.0.1:{port}/echo?key=notenabled"))
        .send()
        .expect("request");
    assert_eq!(resp.status().as_u16(), 403);
    assert!(resp.headers().get("www-authenticate").is_none());

    // Quota: allocations run beside requests; a refusal applies to the next request.
    let quota = row(
        "quota exhausted",
        "GET",
        "/quota?key=quota",
        429,
        "RESOURCE_EXHAUSTED: Insufficient tokens for quota group reads",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, _) = send(&client, port, &quota);
        if status == 429 {
            break;
        }
        assert_eq!(status, 200, "before the refusal the request goes through");
        assert!(
            Instant::now() < deadline,
            "quota never refused; log:\n{}",
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    check(&client, port, &quota, &log);

    // Service Control down, network fail policy close.
    let down = row("Service Control unreachable", "POST", "/echo?key=good", 503,
        &format!("UNAVAILABLE: Calling Google Service Control API failed with: 503 and body: {reset}remote connection failure, transport failure reason: delayed connect error: 111"));
    check(&client, port_sc_down, &down, &|| proxy_sc_down.log());
    // With --backend_retry_num=0 the backend's connect failure is not retried.
    let down = row("backend down, no retries", "GET", "/down", 503,
        &format!("{reset}remote connection failure, transport failure reason: delayed connect error: 111"));
    check(&client, port_sc_down, &down, &|| proxy_sc_down.log());
    let hangs_up = row(
        "backend hangs up, no retries",
        "GET",
        "/reset",
        503,
        &format!("{reset}connection termination"),
    );
    check(&client, port_sc_down, &hangs_up, &|| proxy_sc_down.log());

    // The open policy forgives what Envoy calls unavailable (429, 502-504, a dependency down),
    // never a 500.
    for (key, status) in [
        ("depdown", 200),
        ("http503", 200),
        ("http429", 200),
        ("good", 200),
    ] {
        let (got, _, body) = send(
            &client,
            port_open,
            &row("open", "POST", &format!("/echo?key={key}"), status, ""),
        );
        assert_eq!(got, status, "fail-open {key}: {body}\n{}", proxy_open.log());
    }
    let refused = row(
        "Service Control answers 500, policy open",
        "POST",
        "/echo?key=http500",
        500,
        "INTERNAL: Calling Google Service Control API failed with: 500 and body: boom",
    );
    check(&client, port_open, &refused, &|| proxy_open.log());

    // The backend's circuit breaker: one request holds --backend's only place for its 5 s
    // deadline; another meanwhile is refused at once.
    let holder = std::thread::spawn(move || {
        reqwest::blocking::Client::new()
            .get(format!("http://127.0.0.1:{port_max1}/hold"))
            .send()
            .map(|r| r.status().as_u16())
    });
    std::thread::sleep(Duration::from_millis(500));
    let overflow = row(
        "backend overflow",
        "POST",
        "/open",
        503,
        "upstream connect error or disconnect/reset before headers. reset reason: overflow",
    );
    check(&client, port_max1, &overflow, &|| proxy_max1.log());
    assert_eq!(holder.join().expect("holder").ok(), Some(504));

    // gRPC over the same listener (h2c): the error as trailers-only, Envoy's code for 404.
    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("h2 client");
    let resp = h2
        .post(format!("http://127.0.0.1:{port}/nowhere"))
        .header("content-type", "application/grpc")
        .body(vec![0u8, 0, 0, 0, 0])
        .send()
        .expect("h2c request");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "12");
    assert_eq!(
        resp.headers()["grpc-message"],
        "{\"code\":404,\"message\":\"The current request is not defined by this API.\"}"
    );
    drop(rt);
}
