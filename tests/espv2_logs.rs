//! End to end, `portico espv2` with ESPv2's logging, header and routing flags (issue 17 item
//! 12): `--access_log_format` (Envoy's command operators, written to the `--access_log` file),
//! `--health_check_operation` and `--cors_operation_delimiter` (the generated operations'
//! names), `--generated_header_prefix`, `--client_ip_from_forwarded_header`,
//! `--disallow_colon_in_wildcard_path_segment` and `--enable_debug`.
//!
//! The proxy is the real binary with a service config file; the backend (echoing the headers it
//! received), the JWKS server and Service Control are doubles on loopback ports chosen at run
//! time.

mod common;

use common::espv2;
use common::free_port;
use common::peer::{self, Action, Request};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SERVICE: &str = "espv2-logs.endpoints.e2e-proj.cloud.goog";
const API_METHOD: &str =
    "%FILTER_STATE(com.google.espv2.filters.http.service_control.api_method):70%";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// The access-log lines once `n` are there (entries are written when a response ends).
fn lines(path: &std::path::Path, n: usize, log: &dyn Fn() -> String) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let v: Vec<String> = text.lines().map(str::to_string).collect();
        if v.len() >= n {
            assert!(text.ends_with('\n'), "{text:?}");
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} access-log lines: {text:?}\nproxy log:\n{}",
            v.len(),
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn access_log_format_writes_envoys_operators_and_the_generated_operations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let backend = peer::start(
        &rt,
        Arc::new(|req: &Request| {
            let mut a = espv2::echo_headers(req);
            if let Action::Respond(_, body) = &mut a {
                *body = format!("{body}\n");
            }
            a
        }),
    );
    let slow = peer::start(
        &rt,
        Arc::new(|_: &Request| Action::Stall(Duration::from_secs(30))),
    );
    let dead = free_port();
    let config = dir.path().join("service.json");
    let key = espv2::service_account_key(dir.path());
    std::fs::write(
        &config,
        json!({
            "name": SERVICE, "id": "2024-01-01r0",
            "apis": [{"name": "e2e.Api", "version": "v1"}],
            "http": {"rules": [
                {"selector": "e2e.Api.Slow", "get": "/slow"},
                {"selector": "e2e.Api.Echo", "get": "/echo"},
                {"selector": "e2e.Api.Down", "get": "/down"},
                {"selector": "e2e.Api.Post", "post": "/echo"},
            ]},
            "backend": {"rules": [
                {"selector": "e2e.Api.Down", "address": format!("http://127.0.0.1:{dead}")},
                {"selector": "e2e.Api.Slow", "address": format!("http://{slow}")},
            ]},
            "endpoints": [{"name": SERVICE, "allowCors": true}],
        })
        .to_string(),
    )
    .expect("config");
    let access = dir.path().join("access.log");
    let format = format!(
        "\"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% \
         %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %BYTES_RECEIVED% \"%REQ(USER-AGENT)%\" \
         \"%UPSTREAM_HOST%\" %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %REQ(x-long):5% \
         %RESP(content-type)% {API_METHOD} | %BYTES_SENT% %START_TIME(%Y-%m-%dT%H)% \
         %START_TIME% %DURATION% %REQUEST_DURATION% %RESPONSE_DURATION% \
         %UPSTREAM_TRANSPORT_FAILURE_REASON% %REQ(:AUTHORITY)%"
    );
    let (proxy, port) = espv2::start(
        dir.path(),
        "proxy",
        &[
            format!("--service_json_path={}", config.display()),
            format!("--backend=http://{backend}"),
            "--non_gcp".to_string(),
            format!("--service_account_key={}", key.display()),
            "--skip_service_control_filter".to_string(),
            "--healthz=/healthz".to_string(),
            "--health_check_operation=my_deployment".to_string(),
            "--cors_operation_delimiter=--CORS--".to_string(),
            "--enable_operation_name_header".to_string(),
            format!("--access_log={}", access.display()),
            format!("--access_log_format={format}"),
        ],
    );
    let log = || proxy.log();
    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    // 1. A method answered by the backend; the key in the query is masked; a client's
    //    backslash and non-UTF-8 byte cannot pass for an escape or break the line.
    let r = c
        .get(format!("{base}/echo?key=SECRETKEY"))
        .header("user-agent", &b"e2e\\x0a-\xff"[..])
        .header("x-long", "abcdefgh")
        .send()
        .expect("echo");
    assert_eq!(r.status(), 200, "{}", log());
    let sent = r.bytes().expect("body").len();
    let got = lines(&access, 1, &log);
    let (head, tail) = got[0].split_once(" | ").expect("separator");
    assert_eq!(
        head,
        format!(
            "\"GET /echo?key=\u{2026}TKEY HTTP/1.1\" 200 - via_upstream 0 \"e2e\\\\x0a-\u{fffd}\" \
             \"{backend}\" 127.0.0.1 abcde application/json \"e2e.Api.Echo\""
        ),
        "{got:?}"
    );
    let t: Vec<&str> = tail.split(' ').collect();
    assert_eq!(t.len(), 8, "{tail}");
    assert_eq!(t[0], sent.to_string());
    assert!(
        t[1].len() == 13 && t[1].as_bytes()[10] == b'T' && t[1][..4].parse::<u32>().is_ok(),
        "{tail}"
    );
    assert!(t[2].starts_with(&t[1][..10]), "{tail}");
    assert!(
        t[2].len() == 24 && t[2].ends_with('Z') && t[2].contains('T'),
        "{tail}"
    );
    assert!(t[3].parse::<u64>().is_ok(), "duration {tail}");
    assert_eq!(t[4], "0", "a bodiless request is whole at once: {tail}");
    assert!(t[5].parse::<u64>().is_ok(), "response duration {tail}");
    assert_eq!(t[6], "-");
    assert_eq!(t[7], format!("127.0.0.1:{port}"));
    assert!(!got[0].contains("SECRETKEY"));

    // 2. No method: ESPv2's operation for it, JSON-escaped as ESPv2 writes it.
    let r = c.get(format!("{base}/nope")).send().expect("nope");
    assert_eq!(r.status(), 404);
    let got = lines(&access, 2, &log);
    assert!(
        got[1].starts_with(
            "\"GET /nope HTTP/1.1\" 404 - direct_response 0 \"-\" \"-\" 127.0.0.1 - \
             application/json \"\\u003cUnknown Operation Name\\u003e\" | "
        ),
        "{got:?}"
    );

    // 3. The health check, named by --health_check_operation.
    let r = c.get(format!("{base}/healthz")).send().expect("healthz");
    assert_eq!(r.status(), 200);
    let got = lines(&access, 3, &log);
    assert!(
        got[2].starts_with(
            "\"GET /healthz HTTP/1.1\" 200 - direct_response 0 \"-\" \"-\" 127.0.0.1 - - \
             \"my_deployment.ESPv2_Autogenerated_HealthCheck\" | "
        ),
        "{got:?}"
    );

    // 4. An allowCors preflight: the generated operation, named with --cors_operation_delimiter,
    //    reaches the backend in the operation-name header too.
    let r = c
        .request(reqwest::Method::OPTIONS, format!("{base}/echo"))
        .header("origin", "https://web.example")
        .header("access-control-request-method", "GET")
        .send()
        .expect("preflight");
    assert_eq!(r.status(), 200, "{}", log());
    let seen: Value = r.json().expect("echo");
    assert_eq!(seen["x-endpoint-api-operation-name"], "e2e.Api--CORS--Echo");
    let got = lines(&access, 4, &log);
    assert!(
        got[3].starts_with(&format!(
            "\"OPTIONS /echo HTTP/1.1\" 200 - via_upstream 0 \"-\" \"{backend}\" 127.0.0.1 - \
             application/json \"e2e.Api--CORS--Echo\" | "
        )),
        "{got:?}"
    );

    // 5. A backend that cannot be reached: Envoy's flag, ESPv2's detail, the reason.
    let r = c.get(format!("{base}/down")).send().expect("down");
    assert_eq!(r.status(), 503);
    let got = lines(&access, 5, &log);
    assert!(
        got[4].starts_with(&format!(
            "\"GET /down HTTP/1.1\" 503 UF,URX \
             upstream_reset_before_response_started{{remote_connection_failure,delayed_connect_error:_111}} \
             0 \"-\" \"127.0.0.1:{dead}\" 127.0.0.1 - application/json \"e2e.Api.Down\" | "
        )),
        "{got:?}"
    );
    // ESPv2 retries a refused connection once (--backend_retry_ons), hence URX.
    assert!(
        got[4].ends_with(&format!(" delayed connect error: 111 127.0.0.1:{port}")),
        "{got:?}"
    );

    // 6. A body: its bytes, and the time until its last byte.
    let r = c
        .post(format!("{base}/echo"))
        .body("hello")
        .send()
        .expect("post");
    assert_eq!(r.status(), 200);
    let got = lines(&access, 6, &log);
    assert!(
        got[5].starts_with(&format!(
            "\"POST /echo HTTP/1.1\" 200 - via_upstream 5 \"-\" \"{backend}\" 127.0.0.1 - \
             application/json \"e2e.Api.Post\" | "
        )),
        "{got:?}"
    );
    let t: Vec<&str> = got[5].split(" | ").nth(1).unwrap().split(' ').collect();
    let (total, request) = (t[3].parse::<u64>(), t[4].parse::<u64>());
    assert!(
        matches!((&total, &request), (Ok(a), Ok(b)) if b <= a),
        "{got:?}"
    );

    // 7. HTTP/2: the protocol, and `:authority` from the target (there is no Host header).
    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("h2 client");
    let r = h2.get(format!("{base}/echo")).send().expect("h2");
    assert_eq!(r.status(), 200, "{}", log());
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    drop(r);
    let got = lines(&access, 7, &log);
    assert!(
        got[6].starts_with("\"GET /echo HTTP/2\" 200 - via_upstream 0 "),
        "{got:?}"
    );
    assert!(got[6].ends_with(&format!(" 127.0.0.1:{port}")), "{got:?}");

    // 8. A client that leaves before the response: Envoy's code 0 and flag DC.
    let impatient = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    assert!(impatient.get(format!("{base}/slow")).send().is_err());
    let got = lines(&access, 8, &log);
    assert!(
        got[7].starts_with(
            "\"GET /slow HTTP/1.1\" 0 DC downstream_remote_disconnect 0 \"-\" \"-\" 127.0.0.1 \
             - - - | "
        ),
        "{got:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&access)
            .unwrap()
            .matches('\n')
            .count(),
        8,
        "one line per request"
    );
}

#[test]
fn a_bad_access_log_format_stops_the_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portico"))
        .args([
            "espv2",
            "--service_json_path=/nonexistent.json",
            "--access_log=/dev/null",
            "--access_log_format=%START_TIME% %UPSTREAM_CLUSTER%",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "portico espv2: invalid --access_log_format: byte 13: %UPSTREAM_CLUSTER% is an Envoy \
         command operator that Portico does not support"
    );
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

#[test]
fn generated_header_prefix_names_the_generated_headers_and_strips_forged_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let g = portico_credentials::generate_rsa_key().expect("keygen");
    let mut jwk = serde_json::to_value(&g.public_jwk).expect("jwk");
    jwk["kid"] = "k1".into();
    let jwks_doc = json!({"keys": [jwk]}).to_string();
    let jwks = peer::start(
        &rt,
        Arc::new(move |_: &Request| Action::Respond(200, jwks_doc.clone())),
    );
    let backend = peer::start(&rt, Arc::new(espv2::echo_headers));
    let signing = jsonwebtoken::EncodingKey::from_rsa_pem(g.private_pkcs8_pem.as_bytes())
        .expect("encoding key");
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some("k1".to_string());
    let claims = json!({"iss": "https://issuer.example", "sub": "u1", "aud": "aud",
                        "iat": now(), "exp": now() + 600});
    let token = jsonwebtoken::encode(&h, &claims, &signing).expect("sign");
    let payload = token.split('.').nth(1).expect("payload").to_string();

    let config = dir.path().join("service.json");
    let key = espv2::service_account_key(dir.path());
    std::fs::write(
        &config,
        json!({
            "name": SERVICE, "id": "2024-01-01r0",
            "apis": [{"name": "e2e.Api", "version": "v1"}],
            "http": {"rules": [
                {"selector": "e2e.Api.Jwt", "get": "/jwt"},
                {"selector": "e2e.Api.Open", "get": "/open"},
            ]},
            "authentication": {
                "providers": [{"id": "p1", "issuer": "https://issuer.example",
                               "jwksUri": format!("http://{jwks}/jwks"), "audiences": "aud"}],
                "rules": [{"selector": "e2e.Api.Jwt", "requirements": [{"providerId": "p1"}]}],
            },
        })
        .to_string(),
    )
    .expect("config");
    let (proxy, port) = espv2::start(
        dir.path(),
        "proxy",
        &[
            format!("--service_json_path={}", config.display()),
            format!("--backend=http://{backend}"),
            "--non_gcp".to_string(),
            format!("--service_account_key={}", key.display()),
            "--skip_service_control_filter".to_string(),
            "--enable_operation_name_header".to_string(),
            "--underscores_in_headers".to_string(),
            "--generated_header_prefix=X-Apigateway-".to_string(),
        ],
    );
    let c = client();
    let forged = |rb: reqwest::blocking::RequestBuilder| {
        rb.header("X-Apigateway-API-UserInfo", "forged")
            .header("x_apigateway_api_userinfo", "forged")
            .header("X-APIGATEWAY-Api-Operation-Name", "forged")
            .header("x-apigateway-api-anything", "forged")
            .header("X-Endpoint-API-UserInfo", "forged")
            .header("x-apigateway-other", "kept")
    };
    let r = forged(c.get(format!("http://127.0.0.1:{port}/jwt")))
        .bearer_auth(&token)
        .send()
        .expect("jwt");
    assert_eq!(r.status(), 200, "{}", proxy.log());
    let seen: Value = r.json().expect("echo");
    assert_eq!(
        seen["x-apigateway-api-userinfo"],
        payload.as_str(),
        "{seen}"
    );
    assert_eq!(
        seen["x-apigateway-api-operation-name"], "e2e.Api.Jwt",
        "{seen}"
    );
    assert_eq!(seen["x-apigateway-other"], "kept");
    for gone in [
        "x_apigateway_api_userinfo",
        "x-apigateway-api-anything",
        "x-endpoint-api-userinfo",
        "x-endpoint-api-operation-name",
    ] {
        assert!(
            seen.get(gone).is_none(),
            "{gone} reached the backend: {seen}"
        );
    }

    // Without a JWT nothing generates the user info, and no forged copy takes its place.
    let r = forged(c.get(format!("http://127.0.0.1:{port}/open")))
        .send()
        .expect("open");
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().expect("echo");
    assert!(seen.get("x-apigateway-api-userinfo").is_none(), "{seen}");
    assert!(seen.get("x-endpoint-api-userinfo").is_none(), "{seen}");
    assert!(seen.get("x_apigateway_api_userinfo").is_none(), "{seen}");
    assert_eq!(seen["x-apigateway-api-operation-name"], "e2e.Api.Open");
}

/// What the Service Control double saw.
#[derive(Default)]
struct Seen {
    checks: Vec<String>,
    reports: Vec<String>,
}

#[test]
fn client_ip_from_forwarded_header_is_the_caller_ip_for_service_control() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let sc = {
        let seen = seen.clone();
        peer::start(
            &rt,
            Arc::new(move |req: &Request| {
                let mut s = seen.lock().unwrap();
                if req.path.ends_with(":check") {
                    s.checks.push(req.body.clone());
                    Action::Respond(
                        200,
                        json!({"operationId": "c",
                               "checkInfo": {"consumerInfo": {"projectNumber": "123456"}}})
                        .to_string(),
                    )
                } else {
                    s.reports.push(req.body.clone());
                    Action::Respond(200, "{}".into())
                }
            }),
        )
    };
    let backend = peer::start(&rt, Arc::new(espv2::echo_headers));
    let config = dir.path().join("service.json");
    let key = espv2::service_account_key(dir.path());
    std::fs::write(
        &config,
        json!({
            "name": SERVICE, "id": "2024-01-01r0", "producerProjectId": "e2e-proj",
            "control": {"environment": "servicecontrol.googleapis.com"},
            "apis": [{"name": "e2e.Api", "version": "v1"}],
            "http": {"rules": [{"selector": "e2e.Api.Echo", "get": "/echo"}]},
            "endpoints": [{"name": SERVICE, "allowCors": true}],
            "logging": {"producerDestinations": [
                {"monitoredResource": "api", "logs": ["endpoints_log"]}]},
        })
        .to_string(),
    )
    .expect("config");
    let start = |name: &str, extra: &[&str]| {
        let mut flags = vec![
            format!("--service_json_path={}", config.display()),
            format!("--backend=http://{backend}"),
            "--non_gcp".to_string(),
            format!("--service_account_key={}", key.display()),
            format!("--service_control_url=http://{sc}"),
        ];
        flags.extend(extra.iter().map(|s| s.to_string()));
        espv2::start(dir.path(), name, &flags)
    };
    let c = client();
    let call = |port: u16, key: &str, forwarded: &[&str]| {
        let mut rb = c.get(format!("http://127.0.0.1:{port}/echo?key={key}"));
        for f in forwarded {
            rb = rb.header("forwarded", *f);
        }
        let r = rb.send().expect("echo");
        assert_eq!(r.status(), 200);
    };
    // The check of `key` (each key is checked once), waiting for it.
    let check_of = |key: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = seen
                .lock()
                .unwrap()
                .checks
                .iter()
                .find(|c| c.contains(&format!("api_key:{key}")))
            {
                return c.clone();
            }
            assert!(Instant::now() < deadline, "no check for {key}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let caller_ip = |check: &str| -> String {
        let v: Value = serde_json::from_str(check).expect("check json");
        v["operation"]["labels"]["servicecontrol.googleapis.com/caller_ip"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };

    let (proxy, on) = start("on", &["--client_ip_from_forwarded_header"]);
    call(
        on,
        "k1",
        &["for=192.0.2.1, for=\"[2001:db8::17]:4711\";proto=http"],
    );
    assert_eq!(
        caller_ip(&check_of("k1")),
        "2001:db8::17",
        "{}",
        proxy.log()
    );
    call(on, "k2", &["for=192.0.2.1", "For=198.51.100.7:80"]);
    assert_eq!(caller_ip(&check_of("k2")), "198.51.100.7");
    // The last element names no address: not an earlier one, the connection's.
    call(on, "k3", &["for=192.0.2.1, for=unknown"]);
    assert_eq!(caller_ip(&check_of("k3")), "127.0.0.1");
    call(on, "k4", &["for=\"192.0.2.9"]);
    assert_eq!(caller_ip(&check_of("k4")), "127.0.0.1");
    // The report carries it too.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen
        .lock()
        .unwrap()
        .reports
        .iter()
        .any(|r| r.contains("\"remoteIp\":\"2001:db8::17\""))
    {
        assert!(
            Instant::now() < deadline,
            "no report with the address: {:?}",
            seen.lock().unwrap().reports
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A generated CORS operation is reported by its name (the default delimiter), with the
    // address from `Forwarded`.
    let r = c
        .request(
            reqwest::Method::OPTIONS,
            format!("http://127.0.0.1:{on}/echo"),
        )
        .header("origin", "https://web.example")
        .header("forwarded", "for=203.0.113.5")
        .send()
        .expect("preflight");
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.lock().unwrap().reports.iter().any(|r| {
        r.contains("\"operationName\":\"e2e.Api.ESPv2_Autogenerated_CORS_Echo\"")
            && r.contains("\"remoteIp\":\"203.0.113.5\"")
    }) {
        assert!(
            Instant::now() < deadline,
            "no report of the CORS operation: {:?}",
            seen.lock().unwrap().reports
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Without the flag the header is not read.
    let (_off_proxy, off) = start("off", &[]);
    call(off, "k5", &["for=192.0.2.1"]);
    assert_eq!(caller_ip(&check_of("k5")), "127.0.0.1");
}

#[test]
fn disallow_colon_in_wildcard_path_segment_keeps_colons_out_of_wildcards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let backend = peer::start(&rt, Arc::new(espv2::echo_headers));
    let config = dir.path().join("service.json");
    let key = espv2::service_account_key(dir.path());
    std::fs::write(
        &config,
        json!({
            "name": SERVICE, "id": "2024-01-01r0",
            "apis": [{"name": "e2e.Api", "version": "v1"}],
            "http": {"rules": [
                {"selector": "e2e.Api.Single", "post": "/v1/shelves/{shelf}/single/*"},
                {"selector": "e2e.Api.Double", "post": "/v1/shelves/{shelf}/double/**"},
                {"selector": "e2e.Api.Verb", "post": "/v1/shelves/{shelf}:registered"},
            ]},
        })
        .to_string(),
    )
    .expect("config");
    let c = client();
    let status = |port: u16, path: &str| -> (u16, String) {
        let r = c
            .post(format!("http://127.0.0.1:{port}{path}"))
            .send()
            .expect("call");
        (r.status().as_u16(), r.text().unwrap_or_default())
    };
    let flags = |extra: Option<&str>| {
        let mut v = vec![
            format!("--service_json_path={}", config.display()),
            format!("--backend=http://{backend}"),
            "--non_gcp".to_string(),
            format!("--service_account_key={}", key.display()),
            "--skip_service_control_filter".to_string(),
        ];
        v.extend(extra.map(str::to_string));
        v
    };
    let (_p1, off) = espv2::start(dir.path(), "off", &flags(None));
    let (_p2, on) = espv2::start(
        dir.path(),
        "on",
        &flags(Some("--disallow_colon_in_wildcard_path_segment")),
    );
    let not_defined = espv2::body(404, "The current request is not defined by this API.");
    for (path, off_status, on_status) in [
        ("/v1/shelves/1/single/random:registered", 200, 404),
        ("/v1/shelves/1/single/random:other", 200, 404),
        ("/v1/shelves/1/double/a/b:c", 200, 404),
        ("/v1/shelves/a:b/single/x", 200, 404),
        ("/v1/shelves/1/single/random", 200, 200),
        ("/v1/shelves/1/double/a/b", 200, 200),
        ("/v1/shelves/1:registered", 200, 200),
    ] {
        assert_eq!(status(off, path).0, off_status, "without the flag: {path}");
        let (s, body) = status(on, path);
        assert_eq!(s, on_status, "with the flag: {path}");
        if s == 404 {
            assert_eq!(body, not_defined);
        }
    }
}

#[test]
fn enable_debug_logs_at_debug_level_unless_rust_log_says_otherwise() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let backend = peer::start(&rt, Arc::new(espv2::echo_headers));
    let config = dir.path().join("service.json");
    let key = espv2::service_account_key(dir.path());
    std::fs::write(
        &config,
        json!({
            "name": SERVICE, "id": "2024-01-01r0",
            "apis": [{"name": "e2e.Api", "version": "v1"}],
            "http": {"rules": [{"selector": "e2e.Api.Echo", "get": "/echo"}]},
        })
        .to_string(),
    )
    .expect("config");
    let flags = |debug: bool| {
        let mut v = vec![
            format!("--service_json_path={}", config.display()),
            format!("--backend=http://{backend}"),
            "--non_gcp".to_string(),
            format!("--service_account_key={}", key.display()),
            "--skip_service_control_filter".to_string(),
        ];
        if debug {
            v.push("--enable_debug".to_string());
        }
        v
    };
    let c = client();
    // Returns the proxy's log once a request went through it.
    let run = |name: &str, debug: bool, rust_log: Option<&str>| -> String {
        let (p, port) = espv2::start_with_rust_log(dir.path(), name, &flags(debug), rust_log);
        let r = c
            .get(format!("http://127.0.0.1:{port}/echo?key=SECRET"))
            .send()
            .expect("echo");
        assert_eq!(r.status(), 200);
        drop(r);
        let deadline = Instant::now() + Duration::from_secs(10);
        while debug && rust_log.is_none() && !p.log().contains("request completed") {
            assert!(Instant::now() < deadline, "no debug line:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        // Long enough for a line that would come.
        std::thread::sleep(Duration::from_millis(300));
        p.log()
    };
    let on = run("debug", true, None);
    let line = on
        .lines()
        .find(|l| l.contains("request completed"))
        .expect("request line");
    assert!(line.contains("DEBUG"), "{line}");
    assert!(
        line.contains("e2e.Api.Echo") && line.contains("/echo"),
        "{line}"
    );
    assert!(!on.contains("SECRET"), "the query is not logged:\n{on}");
    assert!(!on.contains("accepted, not implemented yet"), "{on}");

    let off = run("default", false, None);
    assert!(!off.contains("DEBUG"), "{off}");
    let env_wins = run("rust-log", true, Some("info"));
    assert!(!env_wins.contains("DEBUG"), "{env_wins}");
}
