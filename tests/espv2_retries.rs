//! End to end: `portico espv2` retries backend calls as ESPv2 (Envoy's router) does, through
//! real processes: `--backend_retry_ons` (Envoy's conditions), `--backend_retry_num`,
//! `--backend_retry_on_status_codes`, `--backend_per_try_timeout`; the answer after retries is
//! the last attempt's (ESPv2's `retried and the latest reset reason` text when the backend gave
//! none). Cases follow ESPv2's `backend_retry_test`.
//!
//! The backend double counts attempts per request target and misbehaves as the target's query
//! asks: `fail=N` makes the first N attempts fail (answer `status`, hang up, or stall), then it
//! answers 200 with the attempt number and the body it got. Each proxy runs with one set of
//! retry flags. No timing is asserted: only statuses, bodies and attempt counts.

mod common;

use common::espv2;
use common::peer::{self, Action, Request};
use common::{free_port, Proc};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SERVICE: &str = "espv2-retries.endpoints.e2e-proj.cloud.goog";

type Attempts = Arc<Mutex<HashMap<String, u32>>>;

fn query(path: &str, name: &str) -> Option<String> {
    let q = path.split_once('?')?.1;
    q.split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// The misbehaving backend; `attempts` counts requests per target.
fn backend(attempts: Attempts) -> peer::Handler {
    Arc::new(move |r: &Request| {
        let n = {
            let mut a = attempts.lock().expect("attempts");
            let n = a.entry(r.path.clone()).or_insert(0);
            *n += 1;
            *n
        };
        if r.path.starts_with("/held") {
            // The first attempt fails; a retry is held long enough for every other request's
            // first attempt to have been answered.
            return if n == 1 {
                Action::Respond(503, "{}".into())
            } else {
                Action::Stall(Duration::from_secs(5))
            };
        }
        let fail: u32 = query(&r.path, "fail")
            .and_then(|f| f.parse().ok())
            .unwrap_or(0);
        if n <= fail {
            let route = r.path.split('?').next().unwrap_or("");
            return match route {
                "/reset" => Action::HangUp,
                "/sleepy" | "/short" => Action::Stall(Duration::from_secs(30)),
                _ => {
                    let status = query(&r.path, "status")
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(503);
                    Action::Respond(status, json!({"failed": n}).to_string())
                }
            };
        }
        Action::Respond(200, json!({"attempt": n, "body": r.body}).to_string())
    })
}

fn service_config() -> Value {
    let rule = |name: &str, verb: &str, path: &str| json!({"selector": format!("e2e.Api.{name}"), verb: path});
    let names = [
        "GetFlaky",
        "PostFlaky",
        "GetReset",
        "PostReset",
        "Sleepy",
        "Short",
        "Held",
    ];
    let usage: Vec<_> = names
        .iter()
        .map(|n| json!({"selector": format!("e2e.Api.{n}"), "allowUnregisteredCalls": true}))
        .collect();
    json!({
        "name": SERVICE,
        "id": "2024-01-01r0",
        "apis": [{"name": "e2e.Api", "version": "v1"}],
        "http": {"rules": [
            rule("GetFlaky", "get", "/flaky"),
            rule("PostFlaky", "post", "/flaky"),
            rule("GetReset", "get", "/reset"),
            rule("PostReset", "post", "/reset"),
            rule("Sleepy", "get", "/sleepy"),
            rule("Short", "get", "/short"),
            rule("Held", "get", "/held"),
        ]},
        "usage": {"rules": usage},
        // The deadline spans every attempt.
        "backend": {"rules": [{"selector": "e2e.Api.Short", "deadline": 1.0}]},
    })
}

struct Env {
    _rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    flags: Vec<String>,
    attempts: Attempts,
}

fn env() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let attempts: Attempts = Arc::default();
    let backend_addr = peer::start(&rt, backend(attempts.clone()));
    let sc = peer::start(
        &rt,
        Arc::new(|_: &Request| Action::Respond(200, "{}".into())),
    );
    let config = dir.path().join("service.json");
    std::fs::write(&config, service_config().to_string()).expect("config");
    let key = espv2::service_account_key(dir.path());
    Env {
        flags: vec![
            format!("--service_json_path={}", config.display()),
            format!("--backend=http://{backend_addr}"),
            "--non_gcp".to_string(),
            format!("--service_account_key={}", key.display()),
            format!("--service_control_url=http://{sc}"),
        ],
        _rt: rt,
        dir,
        attempts,
    }
}

impl Env {
    fn proxy(&self, name: &str, flags: &[&str]) -> (Proc, u16) {
        let port = free_port();
        let mut args = vec!["espv2".to_string(), format!("--listener_port={port}")];
        args.extend(self.flags.iter().cloned());
        args.extend(flags.iter().map(|f| f.to_string()));
        let mut p = Proc::spawn(&args, &self.dir.path().join(format!("{name}.log")));
        p.wait_for_port(port, name);
        (p, port)
    }

    fn attempts(&self, target: &str) -> u32 {
        self.attempts
            .lock()
            .expect("attempts")
            .get(target)
            .copied()
            .unwrap_or(0)
    }
}

fn call(port: u16, method: &str, target: &str, body: Option<String>) -> (u16, String) {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let mut req = client.request(
        reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
        format!("http://127.0.0.1:{port}{target}"),
    );
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req
        .send()
        .unwrap_or_else(|e| panic!("{method} {target}: {e}"));
    (resp.status().as_u16(), resp.text().expect("body"))
}

const RESET: &str = "upstream connect error or disconnect/reset before headers. reset reason: \
                     connection termination";
const RETRIED_RESET: &str = "upstream connect error or disconnect/reset before headers. retried \
                             and the latest reset reason: connection termination";

/// One case: the request, the answer expected, and how many attempts the backend saw.
struct Case {
    method: &'static str,
    target: &'static str,
    body: Option<String>,
    status: u16,
    /// The exact body expected, or `None` to check only the status.
    answer: Option<String>,
    attempts: u32,
}

fn case(method: &'static str, target: &'static str, status: u16, attempts: u32) -> Case {
    Case {
        method,
        target,
        body: None,
        status,
        answer: None,
        attempts,
    }
}

impl Case {
    fn body(mut self, b: impl Into<String>) -> Case {
        self.body = Some(b.into());
        self
    }
    fn answer(mut self, a: impl Into<String>) -> Case {
        self.answer = Some(a.into());
        self
    }
}

fn run(env: &Env, name: &str, flags: &[&str], cases: Vec<Case>) {
    let (proxy, port) = env.proxy(name, flags);
    for c in cases {
        let (status, body) = call(port, c.method, c.target, c.body.clone());
        let what = format!("{name}: {} {}", c.method, c.target);
        assert_eq!(status, c.status, "{what}: {body}\nlog:\n{}", proxy.log());
        if let Some(a) = &c.answer {
            assert_eq!(&body, a, "{what}");
        }
        assert_eq!(env.attempts(c.target), c.attempts, "{what}: attempts");
    }
}

#[test]
fn retries_follow_the_flags() {
    let env = env();
    let ok = |attempt: u32, body: &str| json!({"attempt": attempt, "body": body}).to_string();
    let big = "b".repeat(40 * 1024);

    // ESPv2's defaults: reset,connect-failure,refused-stream, once.
    run(
        &env,
        "defaults",
        &[],
        vec![
            case("GET", "/reset?t=d1&fail=1", 200, 2).answer(ok(2, "")),
            case("GET", "/reset?t=d2&fail=5", 503, 2).answer(espv2::body(503, RETRIED_RESET)),
            // A small body is kept and sent again as it was.
            case("POST", "/reset?t=d3&fail=1", 200, 2)
                .body("hello")
                .answer(ok(2, "hello")),
            // One too large to keep is sent once, and the text says so.
            case("POST", "/reset?t=d4&fail=1", 503, 1)
                .body(big.clone())
                .answer(espv2::body(503, RESET)),
            // An answer is not a reset: 503 goes back as the backend wrote it.
            case("GET", "/flaky?t=d5&fail=1&status=503", 503, 1)
                .answer(json!({"failed": 1}).to_string()),
        ],
    );
    // Retrying nothing (ESPv2: an empty --backend_retry_ons).
    run(
        &env,
        "none",
        &["--backend_retry_ons="],
        vec![case("GET", "/reset?t=n1&fail=1", 503, 1).answer(espv2::body(503, RESET))],
    );
    run(
        &env,
        "zero",
        &["--backend_retry_num=0"],
        vec![case("GET", "/reset?t=z1&fail=1", 503, 1).answer(espv2::body(503, RESET))],
    );
    // 5xx: answers 500-599 and resets.
    run(
        &env,
        "5xx",
        &["--backend_retry_ons=5xx", "--backend_retry_num=2"],
        vec![
            case("GET", "/flaky?t=f1&fail=2&status=503", 200, 3).answer(ok(3, "")),
            // Not enough retries: the last answer, as the backend wrote it.
            case("GET", "/flaky?t=f2&fail=3&status=503", 503, 3)
                .answer(json!({"failed": 3}).to_string()),
            case("GET", "/flaky?t=f3&fail=2&status=403", 403, 1),
            case("POST", "/flaky?t=f4&fail=1&status=500", 200, 2)
                .body("again")
                .answer(ok(2, "again")),
            case("GET", "/reset?t=f5&fail=1", 200, 2),
        ],
    );
    // Status codes are retried whatever --backend_retry_ons says.
    run(
        &env,
        "codes",
        &[
            "--backend_retry_on_status_codes=500, 503",
            "--backend_retry_num=2",
        ],
        vec![
            case("GET", "/flaky?t=c1&fail=2&status=500", 200, 3),
            case("GET", "/flaky?t=c2&fail=1&status=502", 502, 1),
        ],
    );
    run(
        &env,
        "4xx",
        &[
            "--backend_retry_ons=retriable-4xx,gateway-error",
            "--backend_retry_num=3",
        ],
        vec![
            case("GET", "/flaky?t=g1&fail=1&status=409", 200, 2),
            case("GET", "/flaky?t=g2&fail=1&status=500", 500, 1),
            case("GET", "/flaky?t=g3&fail=3&status=504", 200, 4),
        ],
    );
    // A per-try timeout ends an attempt that got no answer; reset retries it.
    run(
        &env,
        "per-try",
        &["--backend_per_try_timeout=300ms", "--backend_retry_num=2"],
        vec![case("GET", "/sleepy?t=p1&fail=2", 200, 3).answer(ok(3, ""))],
    );
    run(
        &env,
        "per-try-1",
        &["--backend_per_try_timeout=300ms"],
        vec![
            case("GET", "/sleepy?t=q1&fail=2", 504, 2)
                .answer(espv2::body(504, "upstream request timeout")),
            // The deadline (1 s here) spans every attempt: a per-try timeout past it retries
            // nothing.
            case("GET", "/short?t=q2&fail=0", 200, 1),
        ],
    );
    run(
        &env,
        "per-try-long",
        &["--backend_per_try_timeout=5s", "--backend_retry_num=3"],
        vec![case("GET", "/short?t=l1&fail=1", 504, 1)
            .answer(espv2::body(504, "upstream request timeout"))],
    );
}

#[test]
fn retries_in_flight_are_capped_per_backend() {
    // Eight requests at once, each first attempt refused with 503 and each retry held: three
    // retries are in flight (Envoy's default cap, for the backend, across serving threads), so
    // the five other requests get their 503 without a retry.
    let env = env();
    let (proxy, port) = env.proxy("cap", &["--backend_retry_ons=5xx", "--backend_retry_num=5"]);
    let handles: Vec<_> = (0..8)
        .map(|i| std::thread::spawn(move || call(port, "GET", &format!("/held?t={i}"), None)))
        .collect();
    let mut answered = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, _) = h.join().expect("thread");
        answered.push((status, env.attempts(&format!("/held?t={i}"))));
    }
    answered.sort();
    assert_eq!(
        answered,
        [vec![(200, 2); 3], vec![(503, 1); 5]].concat(),
        "log:\n{}",
        proxy.log()
    );
}

/// An HTTP/2 (h2c) backend: the first attempt at each target has its stream reset, later ones
/// are answered 200 with the request body; `attempts` counts them and keeps the bodies.
fn h2_backend(
    rt: &tokio::runtime::Runtime,
    attempts: Attempts,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
) -> std::net::SocketAddr {
    use http_body_util::BodyExt;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    rt.spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let attempts = attempts.clone();
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let attempts = attempts.clone();
                        let bodies = bodies.clone();
                        async move {
                            let target = req
                                .uri()
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map_err(|e| std::io::Error::other(e.to_string()))?
                                .to_bytes();
                            let n = {
                                let mut a = attempts.lock().expect("attempts");
                                let n = a.entry(target).or_insert(0);
                                *n += 1;
                                *n
                            };
                            bodies.lock().expect("bodies").push(body.to_vec());
                            if n == 1 {
                                // hyper resets the stream of a request its service fails.
                                return Err(std::io::Error::other("reset"));
                            }
                            Ok::<_, std::io::Error>(
                                hyper::Response::builder()
                                    .header("content-type", "application/grpc")
                                    .header("grpc-status", "0")
                                    .body(http_body_util::Full::new(body))
                                    .expect("response"),
                            )
                        }
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
            });
        }
    });
    addr
}

#[test]
fn streamed_bodies_are_kept_for_http2_backends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let attempts: Attempts = Arc::default();
    let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let backend = h2_backend(&rt, attempts.clone(), bodies.clone());
    let sc = peer::start(
        &rt,
        Arc::new(|_: &Request| Action::Respond(200, "{}".into())),
    );
    let config = dir.path().join("service.json");
    let svc = json!({
        "name": SERVICE, "id": "2024-01-01r0",
        "apis": [{"name": "e2e.Api", "version": "v1"}],
        "http": {"rules": [{"selector": "e2e.Api.Unary", "post": "/e2e.Api/Unary"}]},
        "usage": {"rules": [{"selector": "e2e.Api.Unary", "allowUnregisteredCalls": true}]},
    });
    std::fs::write(&config, svc.to_string()).expect("config");
    let key = espv2::service_account_key(dir.path());
    let port = free_port();
    let mut proxy = Proc::spawn(
        &[
            "espv2".to_string(),
            format!("--listener_port={port}"),
            format!("--service_json_path={}", config.display()),
            format!("--backend=grpc://{backend}"),
            "--non_gcp".to_string(),
            format!("--service_account_key={}", key.display()),
            format!("--service_control_url=http://{sc}"),
        ],
        &dir.path().join("proxy.log"),
    );
    proxy.wait_for_port(port, "portico espv2");
    let client = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let grpc = |target: &str, body: Vec<u8>| {
        client
            .post(format!("http://127.0.0.1:{port}{target}"))
            .header("content-type", "application/grpc")
            .body(body)
            .send()
            .unwrap_or_else(|e| panic!("{target}: {e}"))
    };
    // A unary call: its body streams to the backend and is kept; the reset attempt is made
    // again with the same body.
    let message = vec![0u8, 0, 0, 0, 5, 1, 2, 3, 4, 5];
    let resp = grpc("/e2e.Api/Unary?t=small", message.clone());
    assert_eq!(resp.status(), 200, "{}", proxy.log());
    assert_eq!(resp.headers()["grpc-status"], "0", "{}", proxy.log());
    assert_eq!(resp.bytes().expect("body").to_vec(), message);
    assert_eq!(
        attempts.lock().expect("attempts")["/e2e.Api/Unary?t=small"],
        2
    );
    assert_eq!(
        bodies.lock().expect("bodies").clone(),
        vec![message.clone(), message]
    );
    // A body too large to keep goes once: the client gets ESPv2's 503 as gRPC's 14, its JSON
    // local reply as the message (Envoy's sendLocalReply to a gRPC caller).
    let large = vec![7u8; 40 * 1024];
    let resp = grpc("/e2e.Api/Unary?t=large", large);
    assert_eq!(resp.headers()["grpc-status"], "14", "{}", proxy.log());
    assert_eq!(
        resp.headers()["grpc-message"],
        "{\"code\":503,\"message\":\"upstream connect error or disconnect/reset before headers. \
         reset reason: connection termination\"}"
    );
    assert_eq!(
        attempts.lock().expect("attempts")["/e2e.Api/Unary?t=large"],
        1
    );
    drop(rt);
}
