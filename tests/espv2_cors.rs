//! End to end: `portico espv2 --cors_preset=...` answers CORS as ESPv2 does (Envoy's CORS
//! filter behind ESPv2's CORS routes), through real processes:
//! - a preflight (`OPTIONS` with an allowed `Origin` and `Access-Control-Request-Method`), at
//!   any path, is answered 200 with the allowed methods and headers, `--cors_max_age` in
//!   seconds, the expose headers and credentials, and the request's own `Origin`;
//! - any other `OPTIONS` the API has no rule for is 400 with ESPv2's message and no
//!   `Access-Control-*` header; an `OPTIONS` rule of the API still gets its requests;
//! - a request whose `Origin` is allowed gets `Access-Control-Allow-Origin` (its own origin),
//!   `-Expose-Headers` and `-Allow-Credentials` on the answer of a method of the API (the
//!   backend's or the proxy's error), none on ESPv2's 404 and 405; other requests get none;
//! - `basic` compares the origin exactly, `cors_with_regex` matches it whole, case-sensitively.
//!
//! Attacker's inputs: origins that differ in case or only contain an allowed one, a duplicated
//! `Origin`, a `null` origin, a very long origin against a regex that backtracking engines take
//! exponential time on.

mod common;

use common::espv2;
use common::peer::{self, Action, Request};
use common::{free_port, Proc};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const SERVICE: &str = "espv2-cors.endpoints.e2e-proj.cloud.goog";
const BAD_PREFLIGHT: &str = "{\"code\":400,\"message\":\"The CORS preflight request is missing \
     one (or more) of the following required headers [Origin, Access-Control-Request-Method] or \
     has an unmatched Origin header.\"}\n";

fn service_config() -> serde_json::Value {
    let rule = |name: &str, verb: &str, path: &str| json!({"selector": format!("e2e.Api.{name}"), verb: path});
    let open =
        |name: &str| json!({"selector": format!("e2e.Api.{name}"), "allowUnregisteredCalls": true});
    json!({
        "name": SERVICE,
        "id": "2024-01-01r0",
        "apis": [{"name": "e2e.Api", "version": "v1"}],
        "http": {"rules": [
            rule("Echo", "post", "/echo"),
            rule("Keyed", "get", "/keyed"),
            rule("Shelf", "get", "/v1/shelves/{shelf}"),
            {"selector": "e2e.Api.Own", "custom": {"kind": "OPTIONS", "path": "/own"}},
        ]},
        "usage": {"rules": [open("Echo"), open("Shelf"), open("Own")]},
    })
}

struct Env {
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    base_flags: Vec<String>,
    dir: std::path::PathBuf,
}

fn env() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let backend = peer::start(
        &rt,
        Arc::new(|r: &Request| {
            Action::Respond(200, json!({"method": r.method, "uri": r.path}).to_string())
        }),
    );
    let sc = peer::start(
        &rt,
        Arc::new(|_: &Request| Action::Respond(200, "{}".into())),
    );
    let config = dir.path().join("service.json");
    std::fs::write(&config, service_config().to_string()).expect("config");
    let key = espv2::service_account_key(dir.path());
    Env {
        base_flags: vec![
            format!("--service_json_path={}", config.display()),
            format!("--backend=http://{backend}"),
            "--non_gcp".to_string(),
            format!("--service_account_key={}", key.display()),
            format!("--service_control_url=http://{sc}"),
        ],
        dir: dir.path().to_path_buf(),
        _rt: rt,
        _dir: dir,
    }
}

fn start(env: &Env, name: &str, flags: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let mut args = vec!["espv2".to_string(), format!("--listener_port={port}")];
    args.extend(env.base_flags.iter().cloned());
    args.extend(flags.iter().map(|s| s.to_string()));
    let mut p = Proc::spawn(&args, &env.dir.join(format!("{name}.log")));
    p.wait_for_port(port, name);
    (p, port)
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn h(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().expect("ascii"))
    }
    /// The `Access-Control-*` headers, sorted.
    fn cors(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .headers
            .iter()
            .filter(|(k, _)| k.as_str().starts_with("access-control-"))
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
            .collect();
        v.sort();
        v
    }
}

fn call(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let mut req = client.request(
        reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
        format!("http://127.0.0.1:{port}{path}"),
    );
    for (k, v) in headers {
        // Appends: a name given twice is sent twice.
        req = req.header(*k, *v);
    }
    let resp = req
        .send()
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    Answer {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.text().expect("body"),
    }
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = p
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    v.sort();
    v
}

const ORIGIN: &str = "http://cloud.google.com";
const METHODS: &str = "GET, PATCH, DELETE, OPTIONS";
const HEADERS: &str = "DNT,User-Agent,Cache-Control,Content-Type,Authorization, X-PINGOTHER";
const EXPOSE: &str = "Content-Length,Content-Range";

#[test]
fn basic_preset_with_one_origin() {
    let env = env();
    let (proxy, port) = start(
        &env,
        "basic",
        &[
            "--cors_preset=basic",
            &format!("--cors_allow_origin={ORIGIN}"),
            &format!("--cors_allow_methods={METHODS}"),
            &format!("--cors_allow_headers={HEADERS}"),
            &format!("--cors_expose_headers={EXPOSE}"),
            "--cors_allow_credentials",
            "--cors_max_age=2h",
        ],
    );
    let log = || proxy.log();
    let preflight = |origin: &str| {
        vec![
            ("origin", origin.to_string()),
            ("access-control-request-method", "PATCH".to_string()),
            ("access-control-request-headers", "X-PINGOTHER".to_string()),
        ]
    };
    let send = |method: &str, path: &str, h: &[(&'static str, String)]| {
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        call(port, method, path, &h)
    };

    // A valid preflight, at a path of the API or not: 200, every header.
    let full = pairs(&[
        ("access-control-allow-origin", ORIGIN),
        ("access-control-allow-methods", METHODS),
        ("access-control-allow-headers", HEADERS),
        ("access-control-expose-headers", EXPOSE),
        ("access-control-allow-credentials", "true"),
        ("access-control-max-age", "7200"),
    ]);
    for path in ["/echo", "/nowhere/at/all"] {
        let a = send("OPTIONS", path, &preflight(ORIGIN));
        assert_eq!((a.status, a.body.as_str()), (200, ""), "{path}\n{}", log());
        assert_eq!(a.cors(), full, "{path}");
    }

    // Not a valid preflight: 400, ESPv2's body, no CORS header. The origin is compared exactly.
    let mut bad: Vec<(&str, Vec<(&'static str, String)>)> = vec![
        (
            "unknown origin",
            preflight("https://some.unknown.origin.com"),
        ),
        (
            "origin in another case",
            preflight("http://Cloud.google.com"),
        ),
        (
            "origin with a suffix",
            preflight("http://cloud.google.com.evil.example"),
        ),
        ("null origin", preflight("null")),
        (
            "huge origin",
            preflight(&format!("http://{}.example", "a".repeat(6000))),
        ),
        (
            "no origin",
            vec![("access-control-request-method", "PATCH".into())],
        ),
        ("empty origin", preflight("")),
        ("no request method", vec![("origin", ORIGIN.into())]),
        (
            "empty request method",
            vec![
                ("origin", ORIGIN.into()),
                ("access-control-request-method", "".into()),
            ],
        ),
    ];
    // Two Origin headers, each allowed alone: not one origin.
    let mut twice = preflight(ORIGIN);
    twice.push(("origin", ORIGIN.into()));
    bad.push(("duplicated origin", twice));
    for (what, h) in &bad {
        for path in ["/echo", "/nowhere"] {
            let a = send("OPTIONS", path, h);
            assert_eq!(
                (a.status, a.body.as_str()),
                (400, BAD_PREFLIGHT),
                "{what} {path}\n{}",
                log()
            );
            assert_eq!(a.cors(), vec![], "{what} {path}");
        }
    }
    // The API's own OPTIONS rule still gets the requests that are not valid preflights.
    let a = send("OPTIONS", "/own", &[("origin", ORIGIN.into())]);
    assert_eq!(a.status, 200, "{}", log());
    assert!(a.body.contains("\"method\":\"OPTIONS\""), "{}", a.body);

    // Simple requests: the allowed origin gets its own origin, expose headers, credentials.
    let simple = pairs(&[
        ("access-control-allow-origin", ORIGIN),
        ("access-control-expose-headers", EXPOSE),
        ("access-control-allow-credentials", "true"),
    ]);
    let a = send("POST", "/echo", &[("origin", ORIGIN.into())]);
    assert_eq!(a.status, 200, "{}", log());
    assert_eq!(a.cors(), simple);
    // An error of a method of the API too (no API key: 401).
    let a = send("GET", "/keyed", &[("origin", ORIGIN.into())]);
    assert_eq!(a.status, 401, "{}", a.body);
    assert_eq!(a.cors(), simple);
    // ESPv2's 404 and 405 come from routes without CORS: no headers.
    let a = send("GET", "/nowhere", &[("origin", ORIGIN.into())]);
    assert_eq!(a.status, 404);
    assert_eq!(a.cors(), vec![]);
    let a = send("DELETE", "/v1/shelves/1", &[("origin", ORIGIN.into())]);
    assert_eq!(a.status, 405);
    assert_eq!(a.cors(), vec![]);
    // Origins not allowed, absent or doubled: no headers.
    for h in [
        vec![("origin", "https://some.unknown.origin.com".to_string())],
        vec![("origin", "HTTP://CLOUD.GOOGLE.COM".to_string())],
        vec![],
        vec![("origin", ORIGIN.into()), ("origin", ORIGIN.into())],
    ] {
        let a = send("POST", "/echo", &h);
        assert_eq!(a.status, 200, "{h:?}");
        assert_eq!(a.cors(), vec![], "{h:?}");
    }
    assert_eq!(
        send("GET", "/v1/shelves/1", &[]).h("access-control-allow-origin"),
        None
    );
}

#[test]
fn regex_preset_matches_the_whole_origin() {
    let env = env();
    // No anchors: Envoy matches the whole origin anyway.
    let (proxy, port) = start(
        &env,
        "regex",
        &[
            "--cors_preset=cors_with_regex",
            r"--cors_allow_origin_regex=https?://[a-z.]+\.google\.com",
        ],
    );
    let pre = |origin: &str| {
        call(
            port,
            "OPTIONS",
            "/echo",
            &[("origin", origin), ("access-control-request-method", "GET")],
        )
    };
    let a = pre("http://gcpproxy.cloud.google.com");
    assert_eq!(a.status, 200, "{}", proxy.log());
    // ESPv2's defaults: every method, its header list, 480h.
    assert_eq!(
        a.cors(),
        pairs(&[
            ("access-control-allow-origin", "http://gcpproxy.cloud.google.com"),
            ("access-control-allow-methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS"),
            (
                "access-control-allow-headers",
                "DNT,User-Agent,X-User-Agent,X-Requested-With,If-Modified-Since,Cache-Control,Content-Type,Range,Authorization"
            ),
            ("access-control-expose-headers", "Content-Length,Content-Range"),
            ("access-control-max-age", "1728000"),
        ])
    );
    for origin in [
        "http://x.google.com.evil.example",
        "evil://http://x.google.com",
        "HTTP://X.GOOGLE.COM",
        "null",
    ] {
        let a = pre(origin);
        assert_eq!(
            (a.status, a.body.as_str()),
            (400, BAD_PREFLIGHT),
            "{origin}"
        );
        assert_eq!(a.cors(), vec![], "{origin}");
        let a = call(port, "POST", "/echo", &[("origin", origin)]);
        assert_eq!(a.cors(), vec![], "{origin}");
    }
    let a = call(port, "POST", "/echo", &[("origin", "https://a.google.com")]);
    assert_eq!(
        a.h("access-control-allow-origin"),
        Some("https://a.google.com")
    );
    assert_eq!(a.h("access-control-allow-methods"), None);
    assert_eq!(a.h("access-control-allow-credentials"), None);
}

#[test]
fn catastrophic_regex_and_wildcard_origin() {
    let env = env();
    // Exponential for a backtracking engine on a long run of 'x' without the final 'y'.
    let (proxy, port) = start(
        &env,
        "redos",
        &[
            "--cors_preset=cors_with_regex",
            "--cors_allow_origin_regex=(x+x+)+y",
        ],
    );
    let origin = "x".repeat(6000);
    let a = call(
        port,
        "OPTIONS",
        "/echo",
        &[
            ("origin", &origin),
            ("access-control-request-method", "GET"),
        ],
    );
    assert_eq!(
        (a.status, a.body.as_str()),
        (400, BAD_PREFLIGHT),
        "{}",
        proxy.log()
    );
    let matching = format!("{origin}y");
    let a = call(port, "POST", "/echo", &[("origin", &matching)]);
    assert_eq!(a.h("access-control-allow-origin"), Some(matching.as_str()));

    // `basic` with `*` (the default) allows every origin and echoes it, `null` included, with
    // credentials when asked, as ESPv2 does; requests without an Origin get nothing.
    let (proxy, port) = start(
        &env,
        "any",
        &["--cors_preset=basic", "--cors_allow_credentials"],
    );
    for origin in ["null", "https://anyone.example"] {
        let a = call(port, "POST", "/echo", &[("origin", origin)]);
        assert_eq!(
            a.h("access-control-allow-origin"),
            Some(origin),
            "{}",
            proxy.log()
        );
        assert_eq!(a.h("access-control-allow-credentials"), Some("true"));
    }
    assert_eq!(call(port, "POST", "/echo", &[]).cors(), vec![]);
    assert!(
        proxy.log().contains("every origin"),
        "no start-up warning:\n{}",
        proxy.log()
    );
}

#[test]
fn bad_cors_flags_stop_the_start() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--cors_preset=everything"],
            "cors_preset must be either \"basic\" or \"cors_with_regex\"",
        ),
        (
            &["--cors_preset=basic", "--cors_allow_origin="],
            "--cors_allow_origin cannot be empty",
        ),
        (
            &["--cors_preset=cors_with_regex"],
            "--cors_allow_origin_regex cannot be empty",
        ),
        (
            &[
                "--cors_preset=cors_with_regex",
                "--cors_allow_origin_regex=(a",
            ],
            "invalid --cors_allow_origin_regex",
        ),
        (
            &[
                "--cors_preset=cors_with_regex",
                "--cors_allow_origin_regex=((a{1000}){1000}){1000}",
            ],
            "too big",
        ),
        (
            &["--cors_preset=basic", "--cors_max_age=10"],
            "invalid --cors_max_age",
        ),
        (
            &["--cors_preset=basic", "--cors_max_age=-1h"],
            "invalid --cors_max_age",
        ),
    ];
    for (flags, want) in cases {
        let mut args = vec![
            "espv2",
            "--service=s.example",
            "--version=1",
            "--non_gcp",
            "--service_account_key=/nonexistent/key.json",
        ];
        args.extend(flags.iter());
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portico"))
            .args(&args)
            .output()
            .expect("run portico");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {err}");
        assert!(err.contains(want), "{flags:?}: {err}");
    }
}
