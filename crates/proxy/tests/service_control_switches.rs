//! Service Control's and JWT authentication's command-line switches through the whole proxy:
//! the proxy built from `cli::parse` and `server::service_control_for` (what `portico esp`
//! runs), a real backend, and a TEST DOUBLE of the Service Control *server* on loopback that
//! counts every call and can be told to hang.
//!
//! * `--service_control_{check,quota,report}_{timeout_ms,retries}`: a hung Service Control
//!   releases a fail-closed request after timeout × (retries + 1), no sooner, not much later.
//! * `--skip_service_control_filter` / `--skip_jwt_authn_filter`: ESP's `service_control off`
//!   and `api_authentication off` — no calls, no checks, requests pass.

mod auth_common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use auth_common::*;
use portico_config::service::Service;
use portico_proxy::config_source::{Rollout, RolloutNotifier};
use portico_proxy::pipeline::ControlApi;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SVC: &str = "switches.endpoints.demo-proj.cloud.goog";
const ISS: &str = "issuer.example";
const AUD: &str = "switches-aud";

/// TEST DOUBLE of the Service Control server: counts each call by method (`check`, `report`,
/// `allocateQuota`) and keeps each `:report` body; answers a key `refuse-CODE` with check error
/// CODE (its project, 123456, still named, as Google does) and every other key as valid; when
/// `hang` is set, reads the request and never answers.
struct ScDouble {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<String>>>,
    reports: Arc<Mutex<Vec<serde_json::Value>>>,
    hang: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl ScDouble {
    async fn start() -> ScDouble {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls: Arc<Mutex<Vec<String>>> = Arc::default();
        let hang = Arc::new(AtomicBool::new(false));
        let reports: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let (c, h, rep) = (calls.clone(), hang.clone(), reports.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (c, h, rep) = (c.clone(), h.clone(), rep.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    loop {
                        let end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        let len: usize = head
                            .lines()
                            .filter_map(|l| l.split_once(':'))
                            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                            .and_then(|(_, v)| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < end + len {
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let body: serde_json::Value =
                            serde_json::from_slice(&buf[end..end + len]).unwrap_or_default();
                        buf.drain(..end + len);
                        let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                        let method = path.rsplit(':').next().unwrap_or("").to_string();
                        c.lock().unwrap().push(method.clone());
                        if h.load(Ordering::SeqCst) {
                            // Hold the connection open and silent until the caller gives up.
                            let _ = sock.read(&mut chunk).await;
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            return;
                        }
                        let key = body["operation"]["consumerId"]
                            .as_str()
                            .unwrap_or("")
                            .trim_start_matches("api_key:");
                        let reply = if let Some(code) = key.strip_prefix("refuse-") {
                            json!({"operationId": body["operation"]["operationId"],
                                   "checkErrors": [{"code": code}],
                                   "checkInfo": {"consumerInfo": {"projectNumber": "123456"}}})
                        } else if method == "check" {
                            json!({"operationId": body["operation"]["operationId"],
                                   "checkInfo": {"consumerInfo": {"projectNumber": "123456"}}})
                        } else {
                            if method == "report" {
                                rep.lock().unwrap().push(body);
                            }
                            json!({})
                        }
                        .to_string();
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                            reply.len()
                        );
                        if sock.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        ScDouble {
            addr,
            calls,
            reports,
            hang,
            task,
        }
    }

    fn count(&self, method: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|m| *m == method)
            .count()
    }

    fn total(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

impl Drop for ScDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A config with Service Control; `/keyed/{x}` needs an API key, `/open` does not, `/jwt`
/// needs a JWT from the key server's `/jwk` (and no key).
fn service(jwks_uri: &str) -> Service {
    serde_json::from_value(json!({
        "name": SVC,
        "id": "2026-12-01r0",
        "producerProjectId": "demo-proj",
        "control": {"environment": "servicecontrol.example"},
        "monitoring": {
            "producerDestinations": [{"monitoredResource": "api",
                "metrics": ["serviceruntime.googleapis.com/api/producer/request_count",
                    "serviceruntime.googleapis.com/api/producer/by_consumer/request_count"]}],
            "consumerDestinations": [{"monitoredResource": "api",
                "metrics": ["serviceruntime.googleapis.com/api/consumer/request_count"]}],
        },
        "http": {"rules": [
            {"selector": "s.Keyed", "get": "/keyed/{x}"},
            {"selector": "s.Open", "get": "/open"},
            {"selector": "s.Jwt", "get": "/jwt"},
        ]},
        "usage": {"rules": [
            {"selector": "s.Open", "allowUnregisteredCalls": true},
            {"selector": "s.Jwt", "allowUnregisteredCalls": true},
        ]},
        "authentication": {
            "providers": [{"id": "p", "issuer": ISS, "jwksUri": jwks_uri, "audiences": AUD}],
            "rules": [{"selector": "s.Jwt", "requirements": [{"providerId": "p"}]}],
        },
    }))
    .unwrap()
}

struct Env {
    sc: ScDouble,
    keys: KeyServer,
    key: TestKey,
    backend: RecordingBackend,
    proxy: portico_proxy::server::ProxyHandle,
    control: Option<portico_proxy::service_control::ServiceControl>,
    client: reqwest::Client,
}

impl Env {
    async fn start(flags: &[&str]) -> Env {
        let sc = ScDouble::start().await;
        let keys = KeyServer::start().await;
        let key = TestKey::rsa("k1");
        keys.set("/jwk", 200, jwks(&[&key]));
        let backend = RecordingBackend::start().await;
        let mut args: Vec<std::ffi::OsString> = vec![
            "esp".into(),
            format!("--service={SVC}").into(),
            "--http_port=0".into(),
            "--status_port=0".into(),
            "--worker_threads=1".into(),
            "--access_log=off".into(),
            format!("--backend=http://{}", backend.addr).into(),
            format!("--service_control_url_override=http://{}", sc.addr).into(),
        ];
        args.extend(flags.iter().map(|f| f.into()));
        let settings = Arc::new(portico_proxy::cli::parse(args).expect("flags"));
        let rollout = Arc::new(Rollout {
            rollout_id: "2026-12-01r0".into(),
            configs: vec![(Arc::new(service(&keys.url("/jwk"))), 100)],
        });
        let (_tx, rx) = tokio::sync::watch::channel(rollout);
        let control = portico_proxy::server::service_control_for(
            &settings,
            rx.clone(),
            None,
            None,
            RolloutNotifier::new(),
        )
        .expect("client");
        let metrics = Arc::new(portico_proxy::metrics::Metrics::new());
        let proxy = portico_proxy::server::start_with_metrics(
            settings,
            rx,
            control.clone().map(|c| Arc::new(c) as Arc<dyn ControlApi>),
            metrics,
        )
        .await
        .expect("proxy starts");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .no_proxy()
            .build()
            .unwrap();
        Env {
            sc,
            keys,
            key,
            backend,
            proxy,
            control,
            client,
        }
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let mut req = self
            .client
            .get(format!("http://{}{}", self.proxy.http_addr.unwrap(), path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("proxy answers");
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    /// Flushes reports (the client sends them once a second) and stops the proxy.
    async fn finish(self) -> (ScDouble, KeyServer, RecordingBackend) {
        self.proxy.shutdown(Duration::from_secs(2)).await;
        if let Some(c) = &self.control {
            c.shutdown().await;
        }
        (self.sc, self.keys, self.backend)
    }
}

/// Runs one fail-closed request against a Service Control that never answers and returns
/// (status, elapsed, `:check` attempts seen).
async fn hung_check(timeout_ms: u64, retries: u32) -> (u16, Duration, usize) {
    let env = Env::start(&[
        "--service_control_network_fail_policy=close",
        &format!("--service_control_check_timeout_ms={timeout_ms}"),
        &format!("--service_control_check_retries={retries}"),
        // Nothing but the check under measurement may reach the double.
        "--service_control_report_retries=0",
    ])
    .await;
    env.sc.hang.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let (status, _) = env.get("/keyed/1?key=some-key", &[]).await;
    let elapsed = t0.elapsed();
    let checks = env.sc.count("check");
    drop(env.control);
    (status, elapsed, checks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_service_control_releases_a_fail_closed_request_after_its_tries() {
    // 3 attempts of 300 ms: at least 900 ms, and well under the 6 s the fixed policy took.
    let (status, elapsed, checks) = hung_check(300, 2).await;
    assert_eq!(status, 503);
    assert_eq!(checks, 3, "one attempt plus two retries");
    assert!(
        elapsed >= Duration::from_millis(880) && elapsed < Duration::from_millis(2400),
        "{elapsed:?}"
    );
    // No retries: one attempt, one timeout.
    let (status, elapsed, checks) = hung_check(400, 0).await;
    assert_eq!(status, 503);
    assert_eq!(checks, 1);
    assert!(
        elapsed >= Duration::from_millis(390) && elapsed < Duration::from_millis(1900),
        "{elapsed:?}"
    );
}

fn token(key: &TestKey) -> String {
    key.sign(&json!({"iss": ISS, "sub": "client-1", "aud": AUD, "iat": now(), "exp": now() + 600}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_switches_service_control_and_jwt_are_enforced() {
    let env = Env::start(&[]).await;
    assert_eq!(env.get("/keyed/1", &[]).await.0, 401);
    assert_eq!(env.get("/keyed/1?key=k", &[]).await.0, 200);
    assert_eq!(env.get("/jwt", &[]).await.0, 401);
    let bearer = format!("Bearer {}", token(&env.key));
    assert_eq!(env.get("/jwt", &[("authorization", &bearer)]).await.0, 200);
    assert_eq!(
        env.backend
            .last_header_values("x-endpoint-api-userinfo")
            .len(),
        1
    );
    let (sc, keys, _) = env.finish().await;
    assert_eq!(sc.count("check"), 1);
    assert!(sc.count("report") >= 1, "reports sent");
    assert!(keys.total_hits() >= 1, "JWKS fetched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_service_control_filter_makes_no_call_and_lets_requests_pass() {
    let env = Env::start(&["--skip_service_control_filter"]).await;
    assert!(env.control.is_none(), "no Service Control client is built");
    // No key needed, and a key given is neither checked nor refused.
    assert_eq!(env.get("/keyed/1", &[]).await.0, 200);
    assert_eq!(env.get("/keyed/2?key=k", &[]).await.0, 200);
    assert_eq!(env.get("/keyed/3?key=", &[]).await.0, 200);
    let long = format!("/keyed/4?key={}", "k".repeat(4096));
    assert_eq!(env.get(&long, &[]).await.0, 200);
    assert_eq!(env.get("/open", &[("x-api-key", "k")]).await.0, 200);
    // Methods are still matched, as in ESP (its check phase answers 404 before asking
    // whether Service Control is on) ...
    let (status, body) = env.get("/nope", &[]).await;
    assert_eq!(status, 404);
    assert!(body.contains("Method does not exist."), "{body}");
    // ... and JWT authentication still applies.
    assert_eq!(env.get("/jwt", &[]).await.0, 401);
    // The backend is not told about a consumer project nobody looked up.
    assert!(env
        .backend
        .heads()
        .iter()
        .all(|h| !h.to_ascii_lowercase().contains("x-endpoint-api-project-id")));
    let (sc, _, backend) = env.finish().await;
    assert_eq!(backend.heads().len(), 5);
    assert_eq!(sc.total(), 0, "no Service Control call at all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_jwt_authn_filter_checks_no_token() {
    let env = Env::start(&["--skip_jwt_authn_filter"]).await;
    assert_eq!(env.get("/jwt", &[]).await.0, 200);
    for auth in [
        "Bearer nonsense".to_string(),
        "Bearer a.b.c".to_string(),
        format!("Bearer {}", token(&env.key)),
        format!("Bearer {}", "x".repeat(6000)),
        "bEaReR lower".to_string(),
    ] {
        assert_eq!(
            env.get("/jwt", &[("authorization", &auth)]).await.0,
            200,
            "{auth:.40}"
        );
        // Passed through untouched, with no identity derived from it.
        assert_eq!(env.backend.last_header_values("authorization"), vec![auth]);
        assert!(env
            .backend
            .last_header_values("x-endpoint-api-userinfo")
            .is_empty());
    }
    // A client cannot supply the identity header itself either.
    assert_eq!(
        env.get(
            "/jwt",
            &[("x-endpoint-api-userinfo", "eyJzdWIiOiJhZG1pbiJ9")]
        )
        .await
        .0,
        200
    );
    assert!(env
        .backend
        .last_header_values("x-endpoint-api-userinfo")
        .is_empty());
    // Service Control is untouched by the switch.
    assert_eq!(env.get("/keyed/1", &[]).await.0, 401);
    assert_eq!(env.get("/keyed/1?key=k", &[]).await.0, 200);
    let (sc, keys, _) = env.finish().await;
    assert_eq!(keys.total_hits(), 0, "no JWKS fetched");
    assert_eq!(sc.count("check"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_switches_pass_everything_through() {
    // With neither Service Control nor authentication, ESP's module declines and nginx
    // proxies every request, unknown paths included.
    let env = Env::start(&["--skip_service_control_filter", "--skip_jwt_authn_filter"]).await;
    for path in ["/nope", "/keyed/1", "/jwt", "/open?key=k"] {
        assert_eq!(env.get(path, &[]).await.0, 200, "{path}");
    }
    let (sc, keys, backend) = env.finish().await;
    assert_eq!(backend.heads().len(), 4);
    assert_eq!((sc.total(), keys.total_hits()), (0, 0));
}

/// The producer operation reported for `key`, and whether a by-consumer copy was sent.
fn reported_for(sc: &ScDouble, key: &str) -> (serde_json::Value, bool) {
    let ops: Vec<serde_json::Value> = sc
        .reports
        .lock()
        .unwrap()
        .iter()
        .flat_map(|r| r["operations"].as_array().cloned().unwrap_or_default())
        .filter(|op| op["labels"]["/credential_id"] == format!("apikey:{key}"))
        .collect();
    let producer = ops
        .iter()
        .find(|op| {
            op["labels"]
                .get("serviceruntime.googleapis.com/consumer_project")
                .is_none()
        })
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no producer operation for {key}: {:?}",
                sc.reports.lock().unwrap().first()
            )
        });
    let by_consumer = ops.iter().any(|op| {
        op["labels"]
            .get("serviceruntime.googleapis.com/consumer_project")
            .is_some()
    });
    (producer, by_consumer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_key_refused_for_another_reason_keeps_its_consumer_in_the_report() {
    // (check error, status, key valid as ESP's check_response handling sees it)
    let cases = [
        ("API_TARGET_BLOCKED", 403, true),
        ("PROJECT_INVALID", 400, true),
        ("IP_ADDRESS_BLOCKED", 403, true),
        ("REFERER_BLOCKED", 403, true),
        ("BILLING_DISABLED", 403, true),
        ("PERMISSION_DENIED", 403, true),
        ("NOT_FOUND", 400, true),
        ("API_KEY_INVALID", 400, false),
        ("API_KEY_EXPIRED", 400, false),
        ("API_KEY_NOT_FOUND", 400, false),
        ("SERVICE_NOT_ACTIVATED", 403, false),
    ];
    let env = Env::start(&[]).await;
    for (code, status, _) in cases {
        let path = format!("/keyed/{code}?key=refuse-{code}");
        assert_eq!(env.get(&path, &[]).await.0, status, "{code}");
        // A second request is answered from the check cache and must report the same.
        assert_eq!(env.get(&path, &[]).await.0, status, "{code} cached");
    }
    let (sc, _, _) = env.finish().await;
    for (code, _, valid) in cases {
        let key = format!("refuse-{code}");
        let (op, by_consumer) = reported_for(&sc, &key);
        if valid {
            assert_eq!(op["consumerId"], format!("api_key:{key}"), "{code}: {op}");
            assert_eq!(
                op["labels"]["/credential_id"],
                format!("apikey:{key}"),
                "{code}"
            );
            assert!(by_consumer, "{code}: by-consumer metrics sent");
        } else {
            assert!(op.get("consumerId").is_none(), "{code}: {op}");
            assert!(!by_consumer, "{code}: no by-consumer metrics");
        }
        let count = |name: &str| {
            op["metricValueSets"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["metricName"] == format!("serviceruntime.googleapis.com/api/{name}"))
                .map(|m| m["metricValues"][0]["int64Value"].clone())
        };
        assert_eq!(
            count("producer/request_count"),
            Some(json!("2")),
            "{code}: {op}"
        );
        let consumer = count("consumer/request_count");
        assert_eq!(consumer, valid.then(|| json!("2")), "{code}: {op}");
    }
}
