//! The proxy's own access tokens, and the ID tokens of backend rules with `jwt_audience`, from
//! a metadata server (`--metadata`, no key file), through
//! the whole proxy: `cli::parse`, `server::metadata_tokens_for` and `service_control_for` (what
//! `portico esp` runs), a real backend, a TEST DOUBLE of Service Control that records each
//! call's `Authorization`, and a TEST DOUBLE metadata server on loopback that counts fetches
//! and can fail, be slow, or answer garbage.

mod auth_common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use auth_common::*;
use portico_config::service::Service;
use portico_proxy::config_source::{Rollout, RolloutNotifier};
use portico_proxy::pipeline::ControlApi;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SVC: &str = "meta.endpoints.demo-proj.cloud.goog";
const TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";
const IDENTITY_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/identity";
/// An audience that needs encoding in a query string.
const AUDIENCE: &str = "https://private.test/a b?x=1&y";

/// (path or method, a header's value) per request a double saw.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// Answers one request, given its head (request line and headers) and body: status, body,
/// and how long to wait before answering.
type Handler = Arc<dyn Fn(&str, &[u8]) -> (u16, Vec<u8>, Duration) + Send + Sync>;

/// A minimal HTTP/1.1 server: every request goes to `handler`; answers after its delay.
struct Double {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Double {
    async fn start(handler: Handler) -> Double {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let handler = handler.clone();
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
                        let len: usize = header(&head, "content-length")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        while buf.len() < end + len {
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let (status, body, delay) = handler(&head, &buf[end..end + len]);
                        buf.drain(..end + len);
                        tokio::time::sleep(delay).await;
                        let mut resp = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        resp.extend_from_slice(&body);
                        if sock.write_all(&resp).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Double { addr, task }
    }
}

impl Drop for Double {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
}

/// What the metadata double answers next.
#[derive(Clone)]
enum Answer {
    /// `{"access_token": "tok-<fetch number>", "expires_in": secs}`.
    Token {
        expires_in: u64,
    },
    Status(u16),
    Raw(Vec<u8>),
}

struct Metadata {
    double: Double,
    answer: Arc<Mutex<Answer>>,
    /// What the identity endpoint answers: `Token` is a JWT naming the audience asked for.
    identity: Arc<Mutex<Answer>>,
    delay: Arc<Mutex<Duration>>,
    /// Each fetch's path and `Metadata-Flavor`.
    fetches: Seen,
}

impl Metadata {
    async fn start(answer: Answer) -> Metadata {
        let answer = Arc::new(Mutex::new(answer));
        let identity = Arc::new(Mutex::new(Answer::Token { expires_in: 3600 }));
        let delay = Arc::new(Mutex::new(Duration::ZERO));
        let fetches: Seen = Arc::default();
        let (a, d, f, i) = (
            answer.clone(),
            delay.clone(),
            fetches.clone(),
            identity.clone(),
        );
        let double = Double::start(Arc::new(move |head: &str, _body: &[u8]| {
            let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
            let n = {
                let mut f = f.lock().unwrap();
                f.push((path.clone(), header(head, "metadata-flavor")));
                f.len()
            };
            let delay = *d.lock().unwrap();
            if let Some(query) = path
                .strip_prefix(IDENTITY_PATH)
                .and_then(|q| q.strip_prefix('?'))
            {
                if header(head, "metadata-flavor").as_deref() != Some("Google") {
                    return (404, b"{}".to_vec(), delay);
                }
                let params: std::collections::HashMap<String, String> =
                    reqwest::Url::parse(&format!("http://m/?{query}"))
                        .map(|u| u.query_pairs().into_owned().collect())
                        .unwrap_or_default();
                if params.get("format").map(String::as_str) != Some("full") {
                    return (400, b"format".to_vec(), delay);
                }
                let audience = params.get("audience").cloned().unwrap_or_default();
                return match i.lock().unwrap().clone() {
                    Answer::Token { expires_in } => (
                        200,
                        fake_id_token(&audience, n, expires_in).into_bytes(),
                        delay,
                    ),
                    Answer::Status(s) => (s, b"no identity".to_vec(), delay),
                    Answer::Raw(b) => (200, b, delay),
                };
            }
            if path != TOKEN_PATH || header(head, "metadata-flavor").as_deref() != Some("Google") {
                return (404, b"{}".to_vec(), delay);
            }
            match a.lock().unwrap().clone() {
                Answer::Token { expires_in } => (
                    200,
                    json!({"access_token": format!("tok-{n}"), "expires_in": expires_in,
                           "token_type": "Bearer"})
                    .to_string()
                    .into_bytes(),
                    delay,
                ),
                Answer::Status(s) => (s, b"oops".to_vec(), delay),
                Answer::Raw(b) => (200, b, delay),
            }
        }))
        .await;
        Metadata {
            double,
            answer,
            identity,
            delay,
            fetches,
        }
    }

    fn count(&self) -> usize {
        self.fetches.lock().unwrap().len()
    }

    fn set(&self, a: Answer) {
        *self.answer.lock().unwrap() = a;
    }
}

/// A JWT-shaped token (unsigned: the proxy does not verify its own issuer's tokens) whose
/// payload names the audience, the fetch number and an `exp`.
fn fake_id_token(audience: &str, n: usize, expires_in: u64) -> String {
    use base64::Engine as _;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    format!(
        "{}.{}.c2ln",
        b64(json!({"alg": "RS256", "typ": "JWT"})),
        b64(json!({"aud": audience, "n": n, "exp": now + expires_in}))
    )
}

/// Service Control double: every `:check` valid; records (method, Authorization).
struct Sc {
    double: Double,
    calls: Seen,
}

impl Sc {
    async fn start() -> Sc {
        let calls: Seen = Arc::default();
        let c = calls.clone();
        let double = Double::start(Arc::new(move |head: &str, body: &[u8]| {
            let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
            let method = path.rsplit(':').next().unwrap_or("").to_string();
            c.lock()
                .unwrap()
                .push((method.clone(), header(head, "authorization")));
            let body: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            let reply = if method == "check" {
                json!({"operationId": body["operation"]["operationId"],
                       "checkInfo": {"consumerInfo": {"projectNumber": "123456"}}})
            } else {
                json!({})
            };
            (200, reply.to_string().into_bytes(), Duration::ZERO)
        }))
        .await;
        Sc { double, calls }
    }

    fn checks(&self) -> Vec<Option<String>> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _)| m == "check")
            .map(|(_, a)| a.clone())
            .collect()
    }
}

fn service() -> Service {
    serde_json::from_value(json!({
        "name": SVC,
        "id": "2026-12-01r0",
        "producerProjectId": "demo-proj",
        "control": {"environment": "servicecontrol.example"},
        "http": {"rules": [
            {"selector": "s.Keyed", "get": "/keyed/{x}"},
            {"selector": "s.Private", "get": "/private/{x}"},
        ]},
        "usage": {"rules": [{"selector": "s.Private", "allowUnregisteredCalls": true}]},
        "backend": {"rules": [{"selector": "s.Private", "jwtAudience": AUDIENCE}]},
    }))
    .unwrap()
}

struct Env {
    meta: Metadata,
    sc: Sc,
    backend: RecordingBackend,
    proxy: portico_proxy::server::ProxyHandle,
    control: Option<portico_proxy::service_control::ServiceControl>,
    client: reqwest::Client,
}

impl Env {
    async fn start(answer: Answer) -> Env {
        let meta = Metadata::start(answer).await;
        let sc = Sc::start().await;
        let backend = RecordingBackend::start().await;
        let args: Vec<std::ffi::OsString> = vec![
            "esp".into(),
            format!("--service={SVC}").into(),
            "--http_port=0".into(),
            "--status_port=0".into(),
            "--worker_threads=1".into(),
            "--access_log=off".into(),
            format!("--backend=http://{}", backend.addr).into(),
            format!("--service_control_url_override=http://{}", sc.double.addr).into(),
            format!("--metadata=http://{}", meta.double.addr).into(),
            // A token failure must not be hidden by fail-open.
            "--service_control_network_fail_policy=open".into(),
        ];
        let settings = Arc::new(portico_proxy::cli::parse(args).expect("flags"));
        let metadata =
            portico_proxy::server::metadata_tokens_for(&settings, false).expect("metadata url");
        assert!(metadata.is_some());
        let rollout = Arc::new(Rollout {
            rollout_id: "2026-12-01r0".into(),
            configs: vec![(Arc::new(service()), 100)],
        });
        let (_tx, rx) = tokio::sync::watch::channel(rollout);
        let control = portico_proxy::server::service_control_for(
            &settings,
            rx.clone(),
            None,
            metadata,
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
            meta,
            sc,
            backend,
            proxy,
            control,
            client,
        }
    }

    /// A request with a key of its own, so its `:check` is never answered from the cache.
    async fn get(&self, key: &str) -> (u16, serde_json::Value) {
        let resp = self
            .client
            .get(format!(
                "http://{}/keyed/1?key={key}",
                self.proxy.http_addr.unwrap()
            ))
            .send()
            .await
            .expect("proxy answers");
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        (status, serde_json::from_str(&body).unwrap_or(json!(body)))
    }

    async fn finish(self) {
        self.proxy.shutdown(Duration::from_secs(2)).await;
        if let Some(c) = &self.control {
            c.shutdown().await;
        }
    }
}

fn assert_token_failure(answer: &(u16, serde_json::Value), message: &str) {
    assert_eq!(answer.0, 500, "{answer:?}");
    assert_eq!(answer.1["code"], 13, "{answer:?}");
    assert_eq!(answer.1["message"], message, "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_carry_the_metadata_token_fetched_once_and_refreshed_before_expiry() {
    // 62 s of life: replaced 60 s before expiry, so 2 s after the fetch.
    let env = Env::start(Answer::Token { expires_in: 62 }).await;
    *env.meta.delay.lock().unwrap() = Duration::from_millis(400);
    let base = format!("http://{}/keyed/1", env.proxy.http_addr.unwrap());
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (client, url) = (env.client.clone(), format!("{base}?key=k{i}"));
            tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().expect("proxy answers"), 200);
    }
    assert_eq!(env.meta.count(), 1, "8 concurrent requests share one fetch");
    let (path, flavor) = env.meta.fetches.lock().unwrap()[0].clone();
    assert_eq!(path, TOKEN_PATH);
    assert_eq!(flavor.as_deref(), Some("Google"));
    let checks = env.sc.checks();
    assert_eq!(checks.len(), 8);
    assert!(
        checks.iter().all(|a| a.as_deref() == Some("Bearer tok-1")),
        "{checks:?}"
    );
    // Still fresh: no new fetch.
    *env.meta.delay.lock().unwrap() = Duration::ZERO;
    assert_eq!(env.get("fresh").await.0, 200);
    assert_eq!(env.meta.count(), 1);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_eq!(env.get("after-refresh").await.0, 200);
    assert_eq!(env.meta.count(), 2);
    assert_eq!(
        env.sc.checks().last().cloned().flatten().as_deref(),
        Some("Bearer tok-2")
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_metadata_server_answers_500_for_the_window_then_is_asked_again() {
    let env = Env::start(Answer::Status(503)).await;
    let first = env.get("a").await;
    assert_token_failure(&first, "Failed to fetch service account token");
    assert_eq!(env.meta.count(), 4, "one try and three retries");
    assert!(env.sc.checks().is_empty(), "no :check without a token");
    // Inside the window: the failure is answered without asking again.
    env.meta.set(Answer::Token { expires_in: 3600 });
    let again = env.get("b").await;
    assert_token_failure(&again, "Failed to fetch service account token");
    assert_eq!(env.meta.count(), 4);
    tokio::time::sleep(Duration::from_millis(5200)).await;
    assert_eq!(env.get("c").await.0, 200);
    assert_eq!(env.meta.count(), 5);
    assert_eq!(env.sc.checks(), vec![Some("Bearer tok-5".to_string())]);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_metadata_answers_are_refused_without_retries() {
    let cases: Vec<(Answer, &str)> = vec![
        (
            Answer::Raw(b"<html>not json".to_vec()),
            "Failed to parse access token response",
        ),
        (
            Answer::Raw(br#"{"access_token":"a\r\nx-injected: 1","expires_in":3600}"#.to_vec()),
            "Failed to parse access token response",
        ),
        (
            Answer::Raw(br#"{"access_token":"","expires_in":3600}"#.to_vec()),
            "Failed to parse access token response",
        ),
        (
            Answer::Raw(br#"{"access_token":"x"}"#.to_vec()),
            "Failed to parse access token response",
        ),
        (
            Answer::Raw({
                let mut b = br#"{"access_token":""#.to_vec();
                b.extend(std::iter::repeat_n(b'a', 4 << 20));
                b.extend_from_slice(br#"","expires_in":3600}"#);
                b
            }),
            "Failed to parse access token response",
        ),
        (Answer::Status(403), "Failed to fetch service account token"),
    ];
    for (answer, message) in cases {
        let env = Env::start(answer).await;
        let got = env.get("a").await;
        assert_token_failure(&got, message);
        assert_eq!(
            env.meta.count(),
            1,
            "{message}: no retry for a final answer"
        );
        assert!(env.sc.checks().is_empty());
        env.finish().await;
    }
}

#[test]
fn a_bad_metadata_url_is_a_precise_startup_error() {
    for (url, needle) in [
        ("metadata.google.internal", "relative URL without a base"),
        (
            "ftp://169.254.169.254",
            "expected an http:// or https:// URL",
        ),
        (
            "http://169.254.169.254/?recursive=true",
            "no query or fragment",
        ),
    ] {
        let err = portico_proxy::cli::parse(vec![
            "esp".into(),
            format!("--service={SVC}").into(),
            "--backend=http://127.0.0.1:1".into(),
            format!("--metadata={url}").into(),
        ])
        .err()
        .unwrap_or_else(|| panic!("{url} accepted"));
        assert!(
            err.message
                .starts_with("invalid --metadata: invalid metadata server URL")
                && err.message.contains(needle),
            "{url}: {}",
            err.message
        );
    }
    let err = portico_proxy::cli::parse(vec![
        "esp".into(),
        format!("--service={SVC}").into(),
        "--backend=http://127.0.0.1:1".into(),
        "--non_gcp".into(),
        "--service_json_path=/dev/null".into(),
        "--metadata=http://127.0.0.1:1".into(),
    ]);
    let Err(err) = err else {
        panic!("--metadata with --non_gcp accepted");
    };
    assert!(err.message.contains("--non_gcp"), "{}", err.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_answered_from_the_cache_needs_no_token() {
    // Refreshed 1 s after the fetch; by then the metadata server is down.
    let env = Env::start(Answer::Token { expires_in: 61 }).await;
    assert_eq!(env.get("cached").await.0, 200);
    assert_eq!(env.sc.checks().len(), 1);
    env.meta.set(Answer::Status(503));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        env.get("cached").await.0,
        200,
        "the cached verdict still answers"
    );
    assert_token_failure(
        &env.get("new").await,
        "Failed to fetch service account token",
    );
    assert_eq!(
        env.sc.checks().len(),
        1,
        "no :check was made without a token"
    );
    assert!(
        env.meta.count() >= 2,
        "the stale token was replaced, or tried to be"
    );
    env.finish().await;
}

impl Env {
    /// A request to the `jwt_audience` method, with the client's own credentials.
    async fn get_private(&self) -> u16 {
        self.client
            .get(format!(
                "http://{}/private/1",
                self.proxy.http_addr.unwrap()
            ))
            .header("authorization", "Bearer client-token")
            .header("x-forwarded-authorization", "Bearer forged")
            .send()
            .await
            .expect("proxy answers")
            .status()
            .as_u16()
    }

    fn identity_fetches(&self) -> Vec<(String, Option<String>)> {
        self.meta
            .fetches
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.starts_with(IDENTITY_PATH))
            .cloned()
            .collect()
    }
}

fn payload_of(bearer: &str) -> serde_json::Value {
    use base64::Engine as _;
    let token = bearer.strip_prefix("Bearer ").expect("a bearer token");
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64url"),
    )
    .expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_audience_rules_get_id_tokens_from_the_metadata_identity_endpoint() {
    let env = Env::start(Answer::Token { expires_in: 3600 }).await;
    assert_eq!(env.get_private().await, 200);
    let fetches = env.identity_fetches();
    assert_eq!(fetches.len(), 1, "{fetches:?}");
    assert_eq!(fetches[0].1.as_deref(), Some("Google"));
    let auth = env.backend.last_header_values("authorization");
    assert_eq!(auth.len(), 1, "{auth:?}");
    let claims = payload_of(&auth[0]);
    assert_eq!(
        claims["aud"], AUDIENCE,
        "the audience survives the query string"
    );
    assert_eq!(
        env.backend.last_header_values("x-forwarded-authorization"),
        vec!["Bearer client-token".to_string()],
        "the client's header moves; the forged one is dropped"
    );
    // Cached: a second call asks nothing.
    assert_eq!(env.get_private().await, 200);
    assert_eq!(env.identity_fetches().len(), 1);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_token_near_expiry_is_fetched_again() {
    let env = Env::start(Answer::Token { expires_in: 3600 }).await;
    // Inside the five-minute refresh margin from the start: every request fetches anew.
    *env.meta.identity.lock().unwrap() = Answer::Token { expires_in: 200 };
    assert_eq!(env.get_private().await, 200);
    assert_eq!(env.get_private().await, 200);
    assert_eq!(env.identity_fetches().len(), 2);
    // `n` numbers every metadata fetch (access tokens too: a traced request, and ESP's
    // auto-sampler traces the first, fetches the access token first, as ESP does).
    let last_identity = env
        .meta
        .fetches
        .lock()
        .unwrap()
        .iter()
        .rposition(|(p, _)| p.starts_with(IDENTITY_PATH))
        .map(|i| i + 1);
    let n = payload_of(&env.backend.last_header_values("authorization")[0])["n"].clone();
    assert_eq!(
        n,
        json!(last_identity),
        "the second request carries the second token"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_identity_answers_are_500_and_the_backend_is_not_called() {
    let cases: Vec<Answer> = vec![
        Answer::Status(404),
        Answer::Status(503),
        Answer::Raw(b"".to_vec()),
        Answer::Raw(b"not-a-jwt".to_vec()),
        Answer::Raw(b"a.b.c\r\nx-injected: 1".to_vec()),
        Answer::Raw(b"a.b.c\nx-injected: 1".to_vec()),
        Answer::Raw(vec![b'a'; 100 << 10]),
        Answer::Raw(vec![0xff, 0xfe, b'.', b'.']),
    ];
    for answer in cases {
        let env = Env::start(Answer::Token { expires_in: 3600 }).await;
        *env.meta.identity.lock().unwrap() = answer.clone();
        let resp = env
            .client
            .get(format!("http://{}/private/1", env.proxy.http_addr.unwrap()))
            .send()
            .await
            .expect("proxy answers");
        assert_eq!(resp.status().as_u16(), 500);
        let body: serde_json::Value = resp.json().await.expect("JSON error body");
        assert_eq!(body["code"], 13, "{body}");
        assert_eq!(
            body["message"],
            "Failed to fetch an identity token for backend authentication"
        );
        assert!(
            env.backend.heads().is_empty(),
            "the backend was called without a token"
        );
        assert_eq!(env.identity_fetches().len(), 1, "asked once, not retried");
        env.finish().await;
    }
}
