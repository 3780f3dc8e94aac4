//! End-to-end tests of the request path: a real backend (a small hyper server in this file),
//! the proxy started in-process on loopback ports chosen at run time, real HTTP clients.
//!
//! Service Control is represented by `RecordingControl`, a TEST DOUBLE of the Service Control
//! client that records every check and answers from a canned rule; it exists only here.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use portico_config::Service;
use portico_proxy::config_source::Rollout;
use portico_proxy::error::EspError;
use portico_proxy::pipeline::ControlApi;
use portico_proxy::server::{self, ProxyHandle};
use portico_proxy::service_control::{ServiceControl, ServiceControlOptions};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

const SEED_401: &str = r#"{ "code": 16, "message": "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.", "details": [ { "@type": "type.googleapis.com/google.rpc.DebugInfo", "stackEntries": [], "detail": "service_control" } ] }"#;

const BAD_GATEWAY: &str = "{\n \"code\": 13,\n \"message\": \"BAD_GATEWAY\",\n \"details\": [\n  {\n   \"@type\": \"type.googleapis.com/google.rpc.DebugInfo\",\n   \"stackEntries\": [],\n   \"detail\": \"application\"\n  }\n ]\n}\n";

fn fixture(name: &str) -> Arc<Service> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    Arc::new(serde_json::from_str(&text).unwrap())
}

fn rollout(svc: Arc<Service>) -> Arc<Rollout> {
    Arc::new(Rollout {
        rollout_id: svc.id.clone(),
        configs: vec![(svc, 100)],
    })
}

// ----------------------------------------------------------------------------------------------
// The backend: echoes what it received as JSON; a few paths misbehave on purpose.
// ----------------------------------------------------------------------------------------------

async fn backend_handler(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    if let Some(code) = path.strip_prefix("/status/") {
        let code: u16 = code.parse().unwrap_or(500);
        let mut r = Response::new(Full::new(Bytes::from(format!("backend says {code}"))));
        *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
        r.headers_mut()
            .insert("content-type", "text/x-backend".parse().unwrap());
        return Ok(r);
    }
    if path == "/ws" && req.headers().contains_key("upgrade") {
        // Accept the upgrade and echo whatever arrives on the raw connection.
        let on = hyper::upgrade::on(req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        r.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        return Ok(r);
    }
    if path == "/slow" {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let v = serde_json::json!({
        "method": method, "uri": uri, "headers": headers, "body_len": body.len(),
    });
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    Ok(r)
}

async fn start_backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), service_fn(backend_handler))
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// A loopback port with nothing listening.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

// ----------------------------------------------------------------------------------------------
// TEST DOUBLE of the Service Control *server* (the network peer): answers `:check` with canned
// JSON (key `bad-key` is invalid, every other key belongs to project 123456), accepts
// `:report` and `:allocateQuota`, and records what it was sent. The proxy talks to it through
// the real Service Control client.
// ----------------------------------------------------------------------------------------------

#[derive(Default)]
struct ScDouble {
    /// (operation name, api key) of every `:check`.
    checks: Mutex<Vec<(String, String)>>,
    /// `servicecontrol.googleapis.com/caller_ip` of every `:check`.
    caller_ips: Mutex<Vec<String>>,
    /// One entry per reported (producer) operation.
    reports: Mutex<Vec<Reported>>,
    /// Every reported operation as sent, by-consumer copies included.
    operations: Mutex<Vec<serde_json::Value>>,
}

#[derive(Debug, Clone)]
struct Reported {
    operation_name: String,
    consumer_id: Option<String>,
    response_code: String,
}

async fn sc_handler(
    double: Arc<ScDouble>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let reply = if path.ends_with(":check") {
        let op = &v["operation"];
        double.caller_ips.lock().unwrap().push(
            op["labels"]["servicecontrol.googleapis.com/caller_ip"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
        let key = op["consumerId"]
            .as_str()
            .unwrap_or("")
            .trim_start_matches("api_key:")
            .to_string();
        double.checks.lock().unwrap().push((
            op["operationName"].as_str().unwrap_or("").to_string(),
            key.clone(),
        ));
        if key == "bad-key" {
            serde_json::json!({"operationId": op["operationId"], "checkErrors": [{"code": "API_KEY_INVALID"}]})
        } else {
            serde_json::json!({"operationId": op["operationId"],
                               "checkInfo": {"consumerInfo": {"projectNumber": "123456"}}})
        }
    } else if path.ends_with(":report") {
        for op in v["operations"].as_array().cloned().unwrap_or_default() {
            double.operations.lock().unwrap().push(op.clone());
            let labels = &op["labels"];
            if labels
                .get("serviceruntime.googleapis.com/consumer_project")
                .is_some()
            {
                continue; // the by-consumer copy
            }
            double.reports.lock().unwrap().push(Reported {
                operation_name: op["operationName"].as_str().unwrap_or("").to_string(),
                consumer_id: op["consumerId"].as_str().map(str::to_string),
                response_code: labels["/response_code"].as_str().unwrap_or("").to_string(),
            });
        }
        serde_json::json!({})
    } else {
        serde_json::json!({})
    };
    let mut r = Response::new(Full::new(Bytes::from(reply.to_string())));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    Ok(r)
}

async fn start_sc_double() -> (Arc<ScDouble>, SocketAddr) {
    let double = Arc::new(ScDouble::default());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let d = double.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let d = d.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| sc_handler(d.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (double, addr)
}

impl ScDouble {
    /// Reports arrive asynchronously: wait (bounded) until `n` have been received.
    async fn wait_reports(&self, n: usize) -> Vec<Reported> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let r = self.reports.lock().unwrap().clone();
            if r.len() >= n || tokio::time::Instant::now() > deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

struct Env {
    proxy: ProxyHandle,
    control: Arc<ScDouble>,
    tx: watch::Sender<Arc<Rollout>>,
    base: String,
    client: reqwest::Client,
}

async fn start_proxy(svc: Arc<Service>, backend: SocketAddr, extra: &[&str]) -> Env {
    let backend_arg = format!("--backend=127.0.0.1:{}", backend.port());
    let mut args: Vec<std::ffi::OsString> = vec![
        "portico esp".into(),
        "--service=test".into(),
        "--http_port=0".into(),
        "--status_port=0".into(),
        "--worker_threads=2".into(),
    ];
    if !extra.iter().any(|a| a.starts_with("--access_log")) {
        args.push("--access_log=off".into());
    }
    if !extra.iter().any(|a| a.starts_with("--backend")) {
        args.push(backend_arg.into());
    }
    args.extend(extra.iter().map(Into::into));
    let settings = portico_proxy::cli::parse(args).unwrap();
    let (tx, rx) = watch::channel(rollout(svc));
    let (control, sc_addr) = start_sc_double().await;
    let mut opts = ServiceControlOptions::new(format!("http://{sc_addr}"));
    // Deterministic tests: every check goes to the server, every report is sent at once.
    opts.check_cache_entries = 0;
    opts.report_cache_entries = 0;
    let sc = ServiceControl::new(opts).unwrap();
    let metrics = Arc::new(portico_proxy::metrics::Metrics::new());
    metrics.with_registry(|r| sc.register_metrics(r));
    let proxy = server::start_with_metrics(
        Arc::new(settings),
        rx,
        Some(Arc::new(sc) as Arc<dyn ControlApi>),
        metrics,
    )
    .await
    .unwrap();
    let base = format!("http://{}", proxy.http_addr.unwrap());
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    Env {
        proxy,
        control,
        tx,
        base,
        client,
    }
}

async fn json_of(r: reqwest::Response) -> serde_json::Value {
    let t = r.text().await.unwrap();
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t:?}"))
}

fn backend_header<'a>(v: &'a serde_json::Value, name: &str) -> Vec<&'a str> {
    v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p[0] == name)
        .map(|p| p[1].as_str().unwrap())
        .collect()
}

// ----------------------------------------------------------------------------------------------
// §2.3 catalogue rows.
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_path_is_404_code_5() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let r = env
        .client
        .get(format!("{}/nope", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert!(r.headers().get("www-authenticate").is_none());
    assert_eq!(
        r.text().await.unwrap(),
        EspError::method_does_not_exist().body()
    );
    // Wrong method on a known path is also "does not exist".
    let r = env
        .client
        .delete(format!("{}/shelves", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Matching is case-sensitive.
    let r = env
        .client
        .get(format!("{}/Shelves", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn unmatched_options_is_403_code_7_with_www_authenticate() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let r = env
        .client
        .request(reqwest::Method::OPTIONS, format!("{}/shelves", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let v = json_of(r).await;
    assert_eq!(v["code"], 7);
    assert_eq!(v["message"], "The service does not allow CORS traffic.");
}

#[tokio::test]
async fn missing_api_key_is_the_seed_401() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let r = env
        .client
        .post(format!("{}/echo", env.base))
        .header("content-type", "application/json")
        .body(r#"{"message":"hello world"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_eq!(r.headers()["content-type"], "application/json");
    let text = r.text().await.unwrap();
    assert_eq!(text, EspError::unregistered_caller().body());
    let seed: serde_json::Value = serde_json::from_str(SEED_401).unwrap();
    let got: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(got, seed);
    assert!(env.control.checks.lock().unwrap().is_empty());
    // The rejected request is still reported, as ESP does.
    let reports = env.control.wait_reports(1).await;
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].response_code, "401");
    assert_eq!(reports[0].operation_name, "1.bookstore.Echo");
}

#[tokio::test]
async fn with_a_key_the_request_is_checked_and_forwarded() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let r = env
        .client
        .post(format!("{}/echo?key=good-key", env.base))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = json_of(r).await;
    assert_eq!(
        v["uri"], "/echo?key=good-key",
        "the key stays in the forwarded URL"
    );
    assert_eq!(
        backend_header(&v, "x-endpoint-api-project-id"),
        vec!["123456"]
    );
    assert_eq!(
        env.control.checks.lock().unwrap().clone(),
        vec![("1.bookstore.Echo".to_string(), "good-key".to_string())]
    );
    let r = env
        .client
        .post(format!("{}/echo?key=bad-key", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v = json_of(r).await;
    assert_eq!(v["code"], 3);
}

#[tokio::test]
async fn unreachable_backend_is_502_exact_body() {
    let backend: SocketAddr = format!("127.0.0.1:{}", dead_port()).parse().unwrap();
    let env = start_proxy(fixture("bookstore_sc.json"), backend, &[]).await;
    let r = env
        .client
        .get(format!("{}/shelves", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.text().await.unwrap(), BAD_GATEWAY);
}

#[tokio::test]
async fn slow_backend_is_504() {
    let env = start_proxy(
        fixture("bookstore_sc.json"),
        start_backend().await,
        &["--http_request_timeout_s=0.5"],
    )
    .await;
    let r = env
        .client
        .get(format!("{}/slow", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let v = json_of(r).await;
    assert_eq!(
        (v["code"].as_i64(), v["message"].as_str()),
        (Some(4), Some("GATEWAY_TIMEOUT"))
    );
    assert_eq!(v["details"][0]["detail"], "application");
}

#[tokio::test]
async fn body_over_limit_is_413_by_length_and_by_chunks() {
    let env = start_proxy(
        fixture("bookstore_sc.json"),
        start_backend().await,
        &["--client_max_body_size=1k"],
    )
    .await;
    let r = env
        .client
        .post(format!("{}/upload", env.base))
        .body(vec![b'x'; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["content-type"], "application/json");
    // Under the limit passes.
    let r = env
        .client
        .post(format!("{}/upload", env.base))
        .body(vec![b'x'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["body_len"], 1000);

    // Chunked: no Content-Length, the limit is enforced as the body streams.
    let addr = env.proxy.http_addr.unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..3 {
        req.extend_from_slice(b"400\r\n");
        req.extend_from_slice(&[b'y'; 1024]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}

#[tokio::test]
async fn backend_errors_pass_through_untouched() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    for code in [400u16, 403, 404, 500, 503] {
        let r = env
            .client
            .get(format!("{}/status/{code}", env.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), code);
        assert_eq!(r.headers()["content-type"], "text/x-backend");
        assert!(r.headers().get("www-authenticate").is_none());
        assert_eq!(r.text().await.unwrap(), format!("backend says {code}"));
    }
}

// ----------------------------------------------------------------------------------------------
// §2.4 API keys.
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn api_key_default_locations_and_order() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let get = |q: &str, h: Option<&str>| {
        let mut b = env.client.get(format!("{}/shelves/1{q}", env.base));
        if let Some(h) = h {
            b = b.header("x-api-key", h);
        }
        b.send()
    };
    assert_eq!(
        get("?api_key=A&key=B", Some("H")).await.unwrap().status(),
        200
    );
    assert_eq!(get("?api_key=A", Some("H")).await.unwrap().status(), 200);
    assert_eq!(get("", Some("H")).await.unwrap().status(), 200);
    assert_eq!(get("?key=", Some("")).await.unwrap().status(), 401);
    assert_eq!(get("?KEY=a%2Bb", None).await.unwrap().status(), 200);
    let keys: Vec<String> = env
        .control
        .checks
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.1.clone())
        .collect();
    assert_eq!(keys, vec!["B", "A", "H", "a%2Bb"]);
}

#[tokio::test]
async fn api_key_custom_locations_replace_defaults() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let r = env
        .client
        .get(format!("{}/custom?key=default&ck=Q", env.base))
        .header("x-custom-key", "HDR")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = env
        .client
        .get(format!("{}/custom?key=default", env.base))
        .header("x-custom-key", "HDR")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Only default locations given: the custom method does not see them.
    let r = env
        .client
        .get(format!("{}/custom?key=default", env.base))
        .header("x-api-key", "default2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let keys: Vec<String> = env
        .control
        .checks
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.1.clone())
        .collect();
    assert_eq!(keys, vec!["Q", "HDR"]);
}

#[tokio::test]
async fn allow_unregistered_ignores_the_key() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let r = env
        .client
        .get(format!("{}/shelves?key=whatever", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(env.control.checks.lock().unwrap().is_empty());
    let reports = env.control.wait_reports(1).await;
    assert_eq!(reports.len(), 1);
    assert_eq!(
        reports[0].consumer_id, None,
        "no consumer on an allow-unregistered method"
    );
}

// ----------------------------------------------------------------------------------------------
// Matching details, headers.
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn head_falls_back_to_get_and_has_no_body() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let r = env
        .client
        .head(format!("{}/shelves", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().is_empty());
    let r = env
        .client
        .head(format!("{}/nope", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert!(r.bytes().await.unwrap().is_empty());
}

/// Sends `request` on a fresh connection and returns the raw response (the proxy closes it).
async fn raw_exchange(addr: &str, request: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("response within 10 s")
        .unwrap();
    out
}

fn int_metric_of(op: &serde_json::Value, name: &str) -> Option<i64> {
    op["metricValueSets"]
        .as_array()?
        .iter()
        .find(|m| m["metricName"] == name)
        .and_then(|m| m["metricValues"][0]["int64Value"].as_str())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn report_carries_request_and_response_bytes_as_esp_sends_them() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let addr = env.base.trim_start_matches("http://").to_string();
    let body = "{\"hello\":\"bytes\"}";
    let request = format!(
        "POST /echo?key=good-key HTTP/1.1\r\nhost: a\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let response = raw_exchange(&addr, request.as_bytes()).await;
    let text = String::from_utf8_lossy(&response).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let (head, response_body) = text.split_once("\r\n\r\n").expect("a response head");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    assert!(!response_body.is_empty());

    let reported = |op: &serde_json::Value| {
        op["labels"]["serviceruntime.googleapis.com/api_method"] == "1.bookstore.Echo"
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let ops = loop {
        let ops: Vec<_> = env
            .control
            .operations
            .lock()
            .unwrap()
            .iter()
            .filter(|op| reported(op))
            .cloned()
            .collect();
        if ops.len() >= 2 || tokio::time::Instant::now() > deadline {
            break ops;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(ops.len(), 2, "main + by-consumer: {ops:?}");
    let (main, by_consumer) = (&ops[0], &ops[1]);
    assert_eq!(main["consumerId"], "api_key:good-key");
    for side in ["producer", "consumer"] {
        assert_eq!(
            int_metric_of(
                main,
                &format!("serviceruntime.googleapis.com/api/{side}/request_bytes")
            ),
            Some(request.len() as i64),
            "{side}: every byte of the request as received"
        );
        assert_eq!(
            int_metric_of(
                main,
                &format!("serviceruntime.googleapis.com/api/{side}/response_bytes")
            ),
            Some((response.len() - "connection: close\r\n".len()) as i64),
            "{side}: every byte of the response (head and body) but the connection's own header, as ESP counts what it sent: {head}"
        );
    }
    assert!(
        !by_consumer.to_string().contains("_bytes\""),
        "ESP has no by-consumer request_bytes/response_bytes: {by_consumer}"
    );

    // A response without a body still sent its head: ESP's response_bytes counts it.
    let request = "HEAD /shelves?key=good-key HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n";
    let response = raw_exchange(&addr, request.as_bytes()).await;
    assert!(response.starts_with(b"HTTP/1.1 200"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let main = loop {
        let found = env
            .control
            .operations
            .lock()
            .unwrap()
            .iter()
            .find(|op| {
                op["labels"]["serviceruntime.googleapis.com/api_method"]
                    == "1.bookstore.ListShelves"
                    && op["labels"]
                        .get("serviceruntime.googleapis.com/consumer_project")
                        .is_none()
            })
            .cloned();
        if let Some(op) = found {
            break op;
        }
        assert!(tokio::time::Instant::now() < deadline, "no report for HEAD");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        int_metric_of(
            &main,
            "serviceruntime.googleapis.com/api/producer/request_bytes"
        ),
        Some(request.len() as i64)
    );
    assert_eq!(
        int_metric_of(
            &main,
            "serviceruntime.googleapis.com/api/producer/response_bytes"
        ),
        Some((response.len() - "connection: close\r\n".len()) as i64),
        "{}",
        String::from_utf8_lossy(&response)
    );
    assert_eq!(
        int_metric_of(
            &main,
            "serviceruntime.googleapis.com/api/consumer/response_bytes"
        ),
        None,
        "no consumer forms without a known consumer"
    );
}

#[tokio::test]
async fn method_override_is_the_method_matched_and_forwarded() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    // PUT /shelves has no rule; overridden to GET it matches ListShelves, and the backend runs
    // what was matched: GET, without the override header.
    let r = env
        .client
        .put(format!("{}/shelves", env.base))
        .header("x-http-method-override", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = json_of(r).await;
    assert_eq!(v["method"], "GET");
    assert!(backend_header(&v, "x-http-method-override").is_empty());
}

#[tokio::test]
async fn trailing_slash_is_ignored() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let r = env
        .client
        .get(format!("{}/shelves/", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["uri"], "/shelves/");
}

#[tokio::test]
async fn forwarding_headers_as_esp_sets_them() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let r = env
        .client
        .get(format!("{}/shelves", env.base))
        .header("x-forwarded-for", "1.2.3.4")
        .header("x-endpoint-api-userinfo", "spoofed")
        .header(
            "x-cloud-trace-context",
            "105445aa7843bc8bf206b12000100000/1;o=1",
        )
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .header("host", "API.Example.com:8082")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = json_of(r).await;
    // Default trust list: the left-most X-Forwarded-For entry is the client.
    assert_eq!(backend_header(&v, "x-real-ip"), vec!["1.2.3.4"]);
    assert_eq!(backend_header(&v, "x-google-real-ip"), vec!["1.2.3.4"]);
    assert_eq!(
        backend_header(&v, "x-forwarded-for"),
        vec!["1.2.3.4, 1.2.3.4"]
    );
    // The client's copy is removed, not forwarded blank.
    assert!(backend_header(&v, "x-endpoint-api-userinfo").is_empty());
    assert_eq!(backend_header(&v, "host"), vec!["api.example.com"]);
    assert_eq!(backend_header(&v, "x-cloud-trace-context").len(), 1);
    assert_eq!(backend_header(&v, "traceparent").len(), 1);
    assert!(backend_header(&v, "x-hop").is_empty());

    let r = env
        .client
        .get(format!("{}/shelves", env.base))
        .send()
        .await
        .unwrap();
    let v = json_of(r).await;
    assert_eq!(backend_header(&v, "x-forwarded-for"), vec!["127.0.0.1"]);
}

#[tokio::test]
async fn without_control_or_auth_everything_is_proxied() {
    let env = start_proxy(fixture("passthrough.json"), start_backend().await, &[]).await;
    let r = env
        .client
        .get(format!("{}/not/in/config", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["uri"], "/not/in/config");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        env.control.reports.lock().unwrap().is_empty(),
        "declined requests are not reported"
    );
}

#[tokio::test]
async fn rewrite_applies_before_matching() {
    let env = start_proxy(
        fixture("bookstore_sc.json"),
        start_backend().await,
        &["--rewrite=^/api/v1/(.*)$ /$1"],
    )
    .await;
    let r = env
        .client
        .get(format!("{}/api/v1/shelves?x=1", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["uri"], "/shelves?x=1");
}

// ----------------------------------------------------------------------------------------------
// CORS.
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn cors_preset_basic_preflight_and_headers_everywhere() {
    let env = start_proxy(
        fixture("bookstore_sc.json"),
        start_backend().await,
        &["--cors_preset=basic", "--enable_strict_transport_security"],
    )
    .await;
    let r = env
        .client
        .request(reqwest::Method::OPTIONS, format!("{}/anything", env.base))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    assert_eq!(h["access-control-max-age"], "1728000");
    assert_eq!(
        h["access-control-allow-methods"],
        "GET, POST, PUT, PATCH, DELETE, OPTIONS"
    );
    assert_eq!(h["content-type"], "text/plain; charset=utf-8");
    assert!(h.contains_key("strict-transport-security"));
    // Proxy errors carry the CORS headers too.
    let r = env
        .client
        .get(format!("{}/nope", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert_eq!(
        r.headers()["access-control-expose-headers"],
        "Content-Length,Content-Range"
    );
    let r = env
        .client
        .get(format!("{}/shelves", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert_eq!(
        r.headers()["strict-transport-security"],
        "max-age=31536000; includeSubdomains;"
    );
    env.control.wait_reports(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        env.control.reports.lock().unwrap().len(),
        2,
        "the preflight is neither checked nor reported"
    );
}

#[tokio::test]
async fn cors_regex_preset_only_for_matching_origins() {
    let env = start_proxy(
        fixture("bookstore_sc.json"),
        start_backend().await,
        &[
            "--cors_preset=cors_with_regex",
            r"--cors_allow_origin_regex=^https://(www\.)?good\.example$",
        ],
    )
    .await;
    let r = env
        .client
        .request(reqwest::Method::OPTIONS, format!("{}/shelves", env.base))
        .header("origin", "https://WWW.good.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://WWW.good.example"
    );
    let r = env
        .client
        .request(reqwest::Method::OPTIONS, format!("{}/shelves", env.base))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        403,
        "no CORS for this origin: ESP's unmatched OPTIONS"
    );
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn allow_cors_endpoint_proxies_preflights_without_check() {
    let env = start_proxy(fixture("cors_allow.json"), start_backend().await, &[]).await;
    let r = env
        .client
        .request(reqwest::Method::OPTIONS, format!("{}/items", env.base))
        .header("origin", "https://x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["method"], "OPTIONS");
    // An explicit OPTIONS rule keeps its own settings: it needs an API key.
    let r = env
        .client
        .request(reqwest::Method::OPTIONS, format!("{}/explicit", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(env.control.checks.lock().unwrap().is_empty());
    let reports = env.control.wait_reports(2).await;
    assert!(
        reports.iter().any(|r| r.operation_name == "CORS"),
        "{reports:?}"
    );
}

// ----------------------------------------------------------------------------------------------
// Status port, healthz, config swaps.
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn status_port_endpoints() {
    let env = start_proxy(
        fixture("bookstore_sc.json"),
        start_backend().await,
        &["--healthz=hz"],
    )
    .await;
    let st = format!("http://{}", env.proxy.status_addr.expect("status port"));
    let _ = env
        .client
        .get(format!("{}/shelves", env.base))
        .send()
        .await
        .unwrap();
    let _ = env
        .client
        .get(format!("{}/shelves/1?key=k1", env.base))
        .send()
        .await
        .unwrap();
    let r = env
        .client
        .get(format!("{st}/endpoints_status"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v = json_of(r).await;
    assert!(v["server"]["serverVersion"]
        .as_str()
        .unwrap()
        .starts_with("ESP/"));
    let esp = &v["processes"][0]["espStatus"][0];
    assert_eq!(
        esp["serviceName"],
        "bookstore.endpoints.demo-proj.cloud.goog"
    );
    assert_eq!(esp["serviceConfigRollouts"]["rolloutId"], "2026-11-23r0");
    assert_eq!(
        esp["serviceConfigRollouts"]["percentages"]["2026-11-23r0"],
        "100"
    );
    assert_ne!(v["processes"][0]["memoryUsage"], "0");
    assert_eq!(esp["serviceControlStatistics"]["totalCalledChecks"], "1");
    // One keep-alive connection carried both requests and is idle now.
    assert_eq!(v["server"]["connections"]["accepted"], "1", "{v}");
    assert_eq!(v["server"]["connections"]["waiting"], "1", "{v}");
    let text = env
        .client
        .get(format!("{st}/nginx_status"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        text,
        "Active connections: 1 \nserver accepts handled requests\n 1 1 4 \nReading: 0 Writing: 0 Waiting: 1 \n"
    );
    let r = env
        .client
        .post(format!("{st}/endpoints_status"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = env
        .client
        .get(format!("{st}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = env.client.get(format!("{st}/other")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = env
        .client
        .get(format!("{st}/metrics"))
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(
        text.contains("portico_proxy_requests_total{method=\"GET\",code=\"200\"} 2"),
        "{text}"
    );
    assert!(text.contains("config_id=\"2026-11-23r0\""), "{text}");
    assert!(
        text.contains("portico_proxy_service_control_checks_total 1"),
        "{text}"
    );
    // --healthz on the serving port: 200 without matching or checking.
    let r = env
        .client
        .get(format!("{}/hz", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn endpoints_status_has_esps_shape_and_counts_itself() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let st = format!("http://{}", env.proxy.status_addr.expect("status port"));
    for _ in 0..2 {
        let r = env
            .client
            .get(format!("{}/shelves", env.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let status = || async {
        json_of(
            env.client
                .get(format!("{st}/endpoints_status"))
                .send()
                .await
                .unwrap(),
        )
        .await
    };
    let v = status().await;
    let server = &v["server"];
    assert_eq!(server["serverVersion"], "ESP/1.60.0", "{v}");
    assert_eq!(server["porticoVersion"], env!("CARGO_PKG_VERSION"), "{v}");
    assert!(
        server["builtBy"]
            .as_str()
            .is_some_and(|b| b.starts_with("rustc ")),
        "{v}"
    );
    assert_eq!(
        v["processes"][0]["processId"],
        std::process::id().to_string(),
        "uint64 as a JSON string, as proto3 JSON prints it"
    );
    // nginx counts every request it handled, the status request itself included.
    assert_eq!(server["requests"], "3", "{v}");
    assert_eq!(status().await["server"]["requests"], "4");
    // Any request on the status port counts, whatever its answer.
    for path in ["healthz", "nope"] {
        let _ = env.client.get(format!("{st}/{path}")).send().await.unwrap();
    }
    let v = status().await;
    assert_eq!(v["server"]["requests"], "7", "{v}");
    for field in [
        "active", "accepted", "handled", "reading", "writing", "waiting",
    ] {
        assert!(
            v["server"]["connections"][field].is_string(),
            "{field} as a string: {v}"
        );
    }
}

#[tokio::test]
async fn config_swap_under_load_loses_no_request() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut loops = Vec::new();
    for _ in 0..4 {
        let (client, base, stop, ok, failed) = (
            env.client.clone(),
            env.base.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
        );
        loops.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.get(format!("{base}/shelves")).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failed
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    // Alternate between two configs (same routes, different ids) many times.
    let base_svc = fixture("bookstore_sc.json");
    for i in 0..40 {
        let mut s = (*base_svc).clone();
        s.id = format!("2026-11-23r{}", i + 1);
        let mut s2 = s.clone();
        s2.id = format!("2026-11-23r{}b", i + 1);
        env.tx
            .send(Arc::new(Rollout {
                rollout_id: format!("rollout-{i}"),
                configs: vec![(Arc::new(s), 50), (Arc::new(s2), 50)],
            }))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    assert!(
        failed.lock().unwrap().is_empty(),
        "{:?}",
        failed.lock().unwrap()
    );
    assert!(ok.load(Ordering::Relaxed) > 50, "load loop barely ran");
    // The last rollout is the one serving, and a route only it has now works.
    let mut s = (*base_svc).clone();
    s.id = "final".into();
    if let Some(h) = s.http.as_mut() {
        h.rules.push(portico_config::service::HttpRule {
            selector: "1.bookstore.New".into(),
            get: Some("/brand-new".into()),
            ..Default::default()
        });
    }
    s.usage
        .as_mut()
        .unwrap()
        .rules
        .push(portico_config::service::UsageRule {
            selector: "1.bookstore.New".into(),
            allow_unregistered_calls: true,
            skip_service_control: false,
        });
    env.tx.send(rollout(Arc::new(s))).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = env
            .client
            .get(format!("{}/brand-new", env.base))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new rollout never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(env.proxy.state.routes.load().rollout_id, "final");
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let (client, base) = (env.client.clone(), env.base.clone());
    let slow = tokio::spawn(async move { client.get(format!("{base}/slow")).send().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let Env { proxy, .. } = env;
    proxy.shutdown(Duration::from_secs(10)).await;
    let r = slow.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
}

// ----------------------------------------------------------------------------------------------
// Protocols: h2c and TLS downstream, h2c (grpc://) upstream, WebSocket pass-through.
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn h2c_prior_knowledge_on_the_http_port_and_http2_port() {
    let env = start_proxy(
        fixture("bookstore_sc.json"),
        start_backend().await,
        &["--http2_port=0"],
    )
    .await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for addr in [env.proxy.http_addr.unwrap(), env.proxy.http2_addr.unwrap()] {
        let r = h2
            .get(format!("http://{addr}/shelves"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 200);
        let v = json_of(r).await;
        // Upstream is HTTP/1.1 with the client's :authority as Host.
        assert_eq!(backend_header(&v, "host"), vec!["127.0.0.1"]);
        let r = h2.get(format!("http://{addr}/nope")).send().await.unwrap();
        assert_eq!(r.status(), 404);
    }
}

#[tokio::test]
async fn tls_port_with_self_signed_cert_speaks_h2_and_http1() {
    let env = start_proxy(
        fixture("bookstore_sc.json"),
        start_backend().await,
        &["--ssl_port=0", "--generate_self_signed_cert"],
    )
    .await;
    let addr = env.proxy.ssl_addr.unwrap();
    let url = format!("https://localhost:{}/shelves", addr.port());
    let tls = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .resolve("localhost", addr)
        .build()
        .unwrap();
    let r = tls.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN offers h2");
    let tls1 = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .http1_only()
        .resolve("localhost", addr)
        .build()
        .unwrap();
    let r = tls1.get(&url).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 200);
    let reports = env.control.wait_reports(2).await;
    assert_eq!(reports.len(), 2);
}

#[tokio::test]
async fn grpc_backend_is_reached_over_h2c() {
    // An HTTP/2-only backend: a plain HTTP/1.1 upstream request would fail here.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(
                            TokioIo::new(s),
                            service_fn(|req: Request<Incoming>| async move {
                                let body = format!("{:?} {}", req.version(), req.uri().path());
                                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                            }),
                        )
                        .await;
            });
        }
    });
    let env = start_proxy(
        fixture("bookstore_sc.json"),
        backend,
        &[&format!("--backend=grpc://127.0.0.1:{}", backend.port())],
    )
    .await;
    let r = env
        .client
        .get(format!("{}/shelves", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "HTTP/2.0 /shelves");
}

async fn websocket_handshake(addr: SocketAddr) -> (tokio::net::TcpStream, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("response head in time")
            .unwrap();
        if n == 0 {
            break;
        }
        head.push(byte[0]);
    }
    (s, String::from_utf8_lossy(&head).to_string())
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled_when_enabled() {
    let env = start_proxy(
        fixture("bookstore_sc.json"),
        start_backend().await,
        &["--enable_websocket"],
    )
    .await;
    let (mut s, head) = websocket_handshake(env.proxy.http_addr.unwrap()).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping over the tunnel").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"ping over the tunnel");
}

#[tokio::test]
async fn websocket_upgrade_is_not_forwarded_by_default() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let (_s, head) = websocket_handshake(env.proxy.http_addr.unwrap()).await;
    // Without --enable_websocket the Upgrade header is hop-by-hop and dropped: a plain GET.
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test]
async fn grpc_clients_get_errors_as_grpc_status() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .post(format!("{}/echo", env.base))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(vec![0u8, 0, 0, 0, 0])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["grpc-status"], "16");
    assert_eq!(r.headers()["content-type"], "application/grpc");
    let r = h2
        .post(format!("{}/nope", env.base))
        .header("content-type", "application/grpc+proto")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["grpc-status"], "5");
    assert_eq!(r.headers()["grpc-message"], "Method does not exist.");
}

#[tokio::test]
async fn access_log_has_one_json_line_per_request_with_streamed_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let flag = format!("--access_log={}", log.display());
    let env = start_proxy(
        fixture("bookstore_sc.json"),
        start_backend().await,
        &[&flag],
    )
    .await;
    let r = env
        .client
        .get(format!("{}/nope?key=secret", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // A chunked upload: no Content-Length, the size is counted as it streams.
    let addr = env.proxy.http_addr.unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    req.extend_from_slice(b"7d0\r\n");
    req.extend_from_slice(&[b'z'; 2000]);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= 2 || tokio::time::Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["status"], 404);
    assert_eq!(lines[0]["method"], "GET");
    assert_eq!(
        lines[0]["uri"], "/nope?key=…",
        "API keys never reach the log"
    );
    assert_eq!(lines[0]["config_id"], "2026-11-23r0");
    assert!(lines[0]["response_bytes"].as_u64().unwrap() > 0);
    assert_eq!(lines[1]["api_method"], "1.bookstore.Upload");
    assert!(
        lines[1]["request_bytes"].as_u64().unwrap() >= 2000,
        "{}",
        lines[1]
    );
    assert!(lines[1]["backend_latency_ms"].as_f64().is_some());
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_tls_requests() {
    let env = start_proxy(
        fixture("bookstore_sc.json"),
        start_backend().await,
        &["--ssl_port=0", "--generate_self_signed_cert"],
    )
    .await;
    let addr = env.proxy.ssl_addr.unwrap();
    let tls = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .resolve("localhost", addr)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/slow", addr.port());
    let slow = tokio::spawn(async move { tls.get(url).send().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let Env { proxy, .. } = env;
    let started = std::time::Instant::now();
    proxy.shutdown(Duration::from_secs(10)).await;
    let r = slow.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "drain waited for the timeout"
    );
    // Nothing accepts any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// An HTTPS backend with a fresh self-signed certificate for `localhost`; returns its address
/// and the certificate PEM.
async fn start_tls_backend() -> (SocketAddr, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = ck.cert.pem();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.key_pair.serialize_der()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service_fn(backend_handler))
                    .await;
            });
        }
    });
    (addr, cert_pem)
}

#[tokio::test]
async fn https_backend_is_verified_against_the_configured_ca() {
    let (backend, cert_pem) = start_tls_backend().await;
    let backend_flag = format!("--backend=https://localhost:{}", backend.port());
    // Untrusted certificate: the proxy refuses the backend.
    let env = start_proxy(fixture("bookstore_sc.json"), backend, &[&backend_flag]).await;
    let r = env
        .client
        .get(format!("{}/shelves", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    // With the certificate as a trusted CA it goes through.
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("backend.pem");
    std::fs::write(&ca, cert_pem).unwrap();
    let ca_flag = format!("--backend_ca_cert_path={}", ca.display());
    let env = start_proxy(
        fixture("bookstore_sc.json"),
        backend,
        &[&backend_flag, &ca_flag],
    )
    .await;
    let r = env
        .client
        .get(format!("{}/shelves?x=1", env.base))
        .header("host", "api.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = json_of(r).await;
    assert_eq!(v["uri"], "/shelves?x=1");
    assert_eq!(backend_header(&v, "host"), vec!["api.example"]);
}

#[tokio::test]
async fn http10_request_without_host_gets_the_backends_name() {
    let backend = start_backend().await;
    let env = start_proxy(fixture("bookstore_sc.json"), backend, &[]).await;
    let mut s = tokio::net::TcpStream::connect(env.proxy.http_addr.unwrap())
        .await
        .unwrap();
    s.write_all(b"GET /shelves HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        backend_header(&v, "host"),
        vec![format!("127.0.0.1:{}", backend.port()).as_str()]
    );
}

#[tokio::test]
async fn backend_host_header_override() {
    let env = start_proxy(
        fixture("bookstore_sc.json"),
        start_backend().await,
        &["--experimental_proxy_backend_host_header=internal.backend"],
    )
    .await;
    let r = env
        .client
        .get(format!("{}/shelves", env.base))
        .header("host", "public.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        backend_header(&json_of(r).await, "host"),
        vec!["internal.backend"]
    );
}

#[tokio::test]
async fn client_abort_is_counted_as_499() {
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let mut s = tokio::net::TcpStream::connect(env.proxy.http_addr.unwrap())
        .await
        .unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    let st = format!(
        "http://{}/metrics",
        env.proxy.status_addr.expect("status port")
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = env
            .client
            .get(&st)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("portico_proxy_requests_total{method=\"GET\",code=\"499\"} 1") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn backend_routing_follows_backend_rules() {
    let backend = start_backend().await;
    let mut svc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{}/tests/fixtures/bookstore_sc.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    )
    .unwrap();
    let addr = format!("http://127.0.0.1:{}", backend.port());
    svc["backend"] = serde_json::json!({"rules": [
        {"selector": "1.bookstore.GetShelf", "address": format!("{addr}/getShelf"),
         "pathTranslation": "CONSTANT_ADDRESS"},
        {"selector": "1.bookstore.ListShelves", "address": format!("{addr}/api/"),
         "pathTranslation": "APPEND_PATH_TO_ADDRESS"},
        {"selector": "1.bookstore.Slow", "address": addr.clone(),
         "pathTranslation": "APPEND_PATH_TO_ADDRESS", "deadline": 0.3},
    ]});
    let svc: Service = serde_json::from_value(svc).unwrap();
    // --backend points nowhere: every answer below comes through a backend rule.
    let dead = format!("--backend=127.0.0.1:{}", dead_port());
    let env = start_proxy(Arc::new(svc), backend, &[&dead, "--enable_backend_routing"]).await;
    let r = env
        .client
        .get(format!("{}/shelves/123?key=K&timezone=EST", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = json_of(r).await;
    assert_eq!(v["uri"], "/getShelf?shelf=123&timezone=EST");
    assert_eq!(backend_header(&v, "host"), vec!["127.0.0.1"]);
    let r = env
        .client
        .get(format!("{}/shelves?x=1", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await["uri"], "/api/shelves?x=1");
    // A method without an address: ESP's 500.
    let r = env
        .client
        .post(format!("{}/echo?key=K", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let v = json_of(r).await;
    assert_eq!(
        (v["code"].as_i64(), v["message"].as_str()),
        (Some(13), Some("INTERNAL_SERVER_ERROR"))
    );
    // The rule's deadline bounds the wait.
    let r = env
        .client
        .get(format!("{}/slow", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
}

#[test]
fn constant_address_maps_bindings_to_json_names_and_drops_system_params() {
    use portico_proxy::routing::{ConfigRoutes, RouteOptions};
    let svc: Service = serde_json::from_value(serde_json::json!({
        "name": "s", "apis": [{"name": "1.s", "methods": [{"name": "GetBook", "requestTypeUrl": "type.googleapis.com/GetBookRequest"}]}],
        "types": [{"name": "GetBookRequest", "fields": [{"name": "s_h_e_l_f", "jsonName": "SHELF"}, {"name": "b_o_o_k", "jsonName": "BOOK"}]}],
        "http": {"rules": [{"selector": "1.s.GetBook", "get": "/shelves/{s_h_e_l_f}/books/info/{b_o_o_k}"}]},
        "backend": {"rules": [{"selector": "1.s.GetBook", "address": "http://127.0.0.1:1/getBookInfo", "pathTranslation": "CONSTANT_ADDRESS"}]},
        "control": {"environment": "x"}
    }))
    .unwrap();
    let mut opts = RouteOptions::new(false);
    opts.backend_routing = true;
    let svc = Arc::new(svc);
    let routes = ConfigRoutes::build(svc.clone(), &opts);
    let upstream = |target: &str, keep_query: bool| {
        let m = routes.matcher.matched("GET", target).unwrap();
        let mi = m.value();
        mi.backend.as_ref().unwrap().upstream_target(
            &svc,
            &mi.selector,
            target,
            &m.escaped_bindings(),
            &mi.api_key_locations.query,
            keep_query,
        )
    };
    // ESP v1 (backend_routing_constant_address.t): bindings first, then the parameters that
    // are not the API key's, all as sent; a parameter without a value is dropped, as ESP does.
    let target = "/shelves/123/books/info/1234?key=K&api_key=A&site=space%20plus&flag&=x";
    assert_eq!(
        upstream(target, false),
        "/getBookInfo?SHELF=123&BOOK=1234&site=space%20plus"
    );
    // Binding values as the path spelled them, not re-encoded (ESP's keep_binding_escaped).
    assert_eq!(
        upstream("/shelves/us-west1/books/info/a%20b~c", false),
        "/getBookInfo?SHELF=us-west1&BOOK=a%20b~c"
    );
    // ESPv2: the query whole, then the bindings.
    assert_eq!(
        upstream(target, true),
        "/getBookInfo?key=K&api_key=A&site=space%20plus&flag&=x&SHELF=123&BOOK=1234"
    );
    assert_eq!(
        upstream("/shelves/1/books/info/2?", true),
        "/getBookInfo?&SHELF=1&BOOK=2"
    );
    // A '&' in a path segment cannot add a parameter, in either dialect.
    for keep in [false, true] {
        assert_eq!(
            upstream("/shelves/1&key=stolen/books/info/2", keep),
            "/getBookInfo?SHELF=1%26key=stolen&BOOK=2"
        );
    }
}

#[tokio::test]
async fn caller_ip_for_checks_follows_real_ip_and_client_ip_header() {
    // Default: the peer (loopback) is trusted, so the right-most X-Forwarded-For entry that
    // is not itself a trusted (local) address is the client, as nginx's recursive real_ip.
    let env = start_proxy(fixture("bookstore_sc.json"), start_backend().await, &[]).await;
    let r = env
        .client
        .get(format!("{}/shelves/1?key=k", env.base))
        .header("x-forwarded-for", "1.1.1.1, 2.2.2.2, 3.3.3.3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        env.control.caller_ips.lock().unwrap().clone(),
        vec!["3.3.3.3"]
    );
    // ESP's default (every peer trusted): the left-most entry.
    let env = start_proxy(
        fixture("bookstore_sc.json"),
        start_backend().await,
        &["--xff_trusted_proxy_list=0.0.0.0/0,::/0"],
    )
    .await;
    let r = env
        .client
        .get(format!("{}/shelves/1?key=k", env.base))
        .header("x-forwarded-for", "1.1.1.1, 2.2.2.2, 3.3.3.3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        env.control.caller_ips.lock().unwrap().clone(),
        vec!["1.1.1.1"]
    );
    // --client_ip_header/--client_ip_position pick the caller IP for Service Control.
    let env = start_proxy(
        fixture("bookstore_sc.json"),
        start_backend().await,
        &[
            "--client_ip_header=X-Forwarded-For",
            "--client_ip_position=-2",
        ],
    )
    .await;
    let r = env
        .client
        .get(format!("{}/shelves/1?key=k", env.base))
        .header("x-forwarded-for", "1.1.1.1, 2.2.2.2, 3.3.3.3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        env.control.caller_ips.lock().unwrap().clone(),
        vec!["2.2.2.2"]
    );
    // Only trusted proxies' X-Forwarded-For counts.
    let env = start_proxy(
        fixture("bookstore_sc.json"),
        start_backend().await,
        &["--xff_trusted_proxy_list=10.0.0.0/8"],
    )
    .await;
    let r = env
        .client
        .get(format!("{}/shelves/1?key=k", env.base))
        .header("x-forwarded-for", "1.1.1.1")
        .send()
        .await
        .unwrap();
    let v = json_of(r).await;
    assert_eq!(
        env.control.caller_ips.lock().unwrap().clone(),
        vec!["127.0.0.1"]
    );
    assert_eq!(backend_header(&v, "x-real-ip"), vec!["127.0.0.1"]);
}

/// The bookstore config with extra HTTP rules (all allowing unregistered calls).
fn bookstore_with_rules(rules: serde_json::Value) -> Arc<Service> {
    let mut svc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{}/tests/fixtures/bookstore_sc.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    )
    .unwrap();
    for r in rules.as_array().unwrap() {
        svc["http"]["rules"].as_array_mut().unwrap().push(r.clone());
        svc["usage"]["rules"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"selector": r["selector"], "allowUnregisteredCalls": true}));
    }
    Arc::new(serde_json::from_value(svc).unwrap())
}

#[tokio::test]
async fn root_path_is_an_api_method_on_the_wire() {
    let svc = bookstore_with_rules(serde_json::json!([
        {"selector": "1.bookstore.Root", "get": "/"}
    ]));
    let env = start_proxy(svc, start_backend().await, &[]).await;
    for target in ["/", "/?x=1"] {
        let r = env
            .client
            .get(format!("{}{target}", env.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{target}");
        assert_eq!(json_of(r).await["uri"], target);
    }
    let r = env
        .client
        .post(format!("{}/", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let reports = env.control.wait_reports(3).await;
    assert!(
        reports
            .iter()
            .filter(|r| r.operation_name == "1.bookstore.Root")
            .count()
            == 2,
        "{reports:?}"
    );
}

#[tokio::test]
async fn a_slash_after_a_custom_verb_makes_it_ordinary_path_text() {
    let svc = bookstore_with_rules(serde_json::json!([
        {"selector": "1.bookstore.Verb", "get": "/some/*:verb"}
    ]));
    let env = start_proxy(svc, start_backend().await, &[]).await;
    let get = |t: &str| env.client.get(format!("{}{t}", env.base)).send();
    let r = get("/some/other:verb").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["uri"], "/some/other:verb");
    for t in ["/some/other:verb/", "/some/other:verb/?x=1"] {
        let r = get(t).await.unwrap();
        assert_eq!(r.status(), 404, "{t}");
        assert_eq!(
            r.text().await.unwrap(),
            EspError::method_does_not_exist().body()
        );
    }
}

/// `x-google-backend` without an address (ESPv2's sidecar form): the rule's deadline bounds the
/// call to `--backend`, and with backend routing such methods go to `--backend` instead of
/// ESP's 500 for a method without an address.
#[tokio::test]
async fn backend_rule_without_address_applies_to_the_local_backend() {
    let mut svc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{}/tests/fixtures/bookstore_sc.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    )
    .unwrap();
    svc["backend"] = serde_json::json!({"rules": [
        {"selector": "1.bookstore.Slow", "deadline": 0.3},
        {"selector": "1.bookstore.ListShelves", "deadline": 10.0, "protocol": "http/1.1"},
    ]});
    let svc: Arc<Service> = Arc::new(serde_json::from_value(svc).unwrap());
    let backend = start_backend().await;
    for extra in [&[][..], &["--enable_backend_routing"][..]] {
        let env = start_proxy(svc.clone(), backend, extra).await;
        let started = std::time::Instant::now();
        let r = env
            .client
            .get(format!("{}/slow", env.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 504, "{extra:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "{extra:?}");
        let r = env
            .client
            .get(format!("{}/shelves?x=1", env.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{extra:?}");
        assert_eq!(json_of(r).await["uri"], "/shelves?x=1");
        // A method with no backend rule at all: --backend without routing, ESP's 500 with it.
        let r = env
            .client
            .post(format!("{}/echo?key=K", env.base))
            .send()
            .await
            .unwrap();
        let want = if extra.is_empty() { 200 } else { 500 };
        assert_eq!(r.status(), want, "{extra:?}");
    }
}

#[tokio::test]
async fn double_star_followed_by_literals_routes_most_specific_first() {
    let svc = bookstore_with_rules(serde_json::json!([
        {"selector": "1.bookstore.Meta", "get": "/files/{path=**}/meta"},
        {"selector": "1.bookstore.Files", "get": "/files/**"},
        {"selector": "1.bookstore.ConstVerb", "get": "/other/**/const:verb"},
        {"selector": "1.bookstore.AnyVerb", "get": "/other/**:verb"},
    ]));
    let env = start_proxy(svc, start_backend().await, &[]).await;
    for (t, selector) in [
        ("/files/a/b/meta", "1.bookstore.Meta"),
        ("/files/a%2Fb/meta?x=1", "1.bookstore.Meta"),
        ("/files/a/b/metadata", "1.bookstore.Files"),
        ("/other/bar/foo/const:verb", "1.bookstore.ConstVerb"),
        ("/other/bar/foo:verb", "1.bookstore.AnyVerb"),
    ] {
        let r = env
            .client
            .get(format!("{}{t}", env.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{t}");
        assert_eq!(json_of(r).await["uri"], t);
        let reports = env.control.wait_reports(1).await;
        assert_eq!(reports.last().unwrap().operation_name, selector, "{t}");
        env.control.reports.lock().unwrap().clear();
    }
    let r = env
        .client
        .get(format!("{}/other/bar/foo", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// A backend that speaks only HTTP/2 (h2c with prior knowledge, or `h2` over TLS when
/// `tls` is given: its ALPN list is `h2` alone). Each answer is
/// `<version> <path?query> alpn=<negotiated>`; `served` counts the connections that carried
/// at least one request.
struct H2Backend {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
}

async fn start_h2_backend(tls: Option<Arc<rustls::ServerConfig>>) -> H2Backend {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let count = count.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
                let serve = move |alpn: String| {
                    service_fn(move |req: Request<Incoming>| {
                        if first.swap(false, Ordering::SeqCst) {
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        let body = format!(
                            "{:?} {} alpn={alpn}",
                            req.version(),
                            req.uri().path_and_query().map_or("", |p| p.as_str())
                        );
                        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                    })
                };
                let h2 =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                match tls {
                    None => {
                        let _ = h2
                            .serve_connection(TokioIo::new(s), serve("none".into()))
                            .await;
                    }
                    Some(cfg) => {
                        let Ok(tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(s).await else {
                            return;
                        };
                        let alpn = tls
                            .get_ref()
                            .1
                            .alpn_protocol()
                            .map_or("none".into(), |p| String::from_utf8_lossy(p).into_owned());
                        let _ = h2.serve_connection(TokioIo::new(tls), serve(alpn)).await;
                    }
                }
            });
        }
    });
    H2Backend { addr, served }
}

impl H2Backend {
    fn connections(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

/// The bookstore config with these backend rules.
fn bookstore_with_backend(rules: serde_json::Value) -> Arc<Service> {
    let mut svc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{}/tests/fixtures/bookstore_sc.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    )
    .unwrap();
    svc["backend"] = serde_json::json!({ "rules": rules });
    Arc::new(serde_json::from_value(svc).unwrap())
}

/// `x-google-backend` without an address but with `protocol: h2` (ESPv2's sidecar form): that
/// method calls `--backend` over HTTP/2 (h2c), whatever the case of the value, while methods
/// without it keep `--backend`'s own protocol (HTTP/1.1 for a plain `host:port`). Against an
/// HTTP/2-only backend only the h2 methods get through; against an HTTP/1.1-only one only the
/// others do. The h2 methods share one client: one connection serves them all.
#[tokio::test]
async fn backend_rule_protocol_h2_without_address_calls_the_local_backend_over_h2c() {
    let h2 = start_h2_backend(None).await;
    let h1 = start_backend().await;
    let svc = bookstore_with_backend(serde_json::json!([
        {"selector": "1.bookstore.ListShelves", "protocol": "h2"},
        {"selector": "1.bookstore.Status", "protocol": "H2", "deadline": 10.0},
        {"selector": "1.bookstore.Upload", "protocol": "http/1.1"},
        // With backend routing, an HTTP/1.1-only backend at an address of its own.
        {"selector": "1.bookstore.Slow", "address": format!("http://127.0.0.1:{}/api", h1.port()),
         "pathTranslation": "APPEND_PATH_TO_ADDRESS"},
    ]));
    for extra in [&[][..], &["--enable_backend_routing"][..]] {
        let routing = !extra.is_empty();
        // --backend speaks HTTP/2 only.
        let env = start_proxy(svc.clone(), h2.addr, extra).await;
        let get = |t: &str| env.client.get(format!("{}{t}", env.base)).send();
        let before = h2.connections();
        for _ in 0..2 {
            let r = get("/shelves?x=1").await.unwrap();
            assert_eq!(r.status(), 200, "{extra:?}");
            assert_eq!(r.text().await.unwrap(), "HTTP/2.0 /shelves?x=1 alpn=none");
            let r = get("/status/204").await.unwrap();
            assert_eq!(r.status(), 200, "{extra:?}");
            assert_eq!(r.text().await.unwrap(), "HTTP/2.0 /status/204 alpn=none");
        }
        assert_eq!(
            h2.connections() - before,
            1,
            "{extra:?}: one shared h2 client"
        );
        // `http/1.1` and no rule at all: HTTP/1.1, which this backend does not speak.
        let r = env
            .client
            .post(format!("{}/upload", env.base))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502, "{extra:?}");
        let r = env
            .client
            .post(format!("{}/echo?key=K", env.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), if routing { 500 } else { 502 }, "{extra:?}");
        if routing {
            let r = get("/slow").await.unwrap();
            assert_eq!(r.status(), 200, "{extra:?}");
            assert_eq!(json_of(r).await["uri"], "/api/slow");
        }

        // --backend speaks HTTP/1.1 only: the other way round.
        let env = start_proxy(svc.clone(), h1, extra).await;
        let get = |t: &str| env.client.get(format!("{}{t}", env.base)).send();
        assert_eq!(get("/shelves").await.unwrap().status(), 502, "{extra:?}");
        assert_eq!(get("/status/204").await.unwrap().status(), 502, "{extra:?}");
        let r = env
            .client
            .post(format!("{}/upload", env.base))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{extra:?}");
        assert_eq!(json_of(r).await["uri"], "/upload");
        if !routing {
            let r = env
                .client
                .post(format!("{}/echo?key=K", env.base))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
}

/// A rule with an `http://` address and `protocol: h2` calls it with HTTP/2 prior knowledge;
/// rules for the same host and port with the same protocol (`grpc` is HTTP/2 too) share one
/// client, whatever their paths; the same address without `protocol` is HTTP/1.1.
#[tokio::test]
async fn backend_rule_protocol_h2_with_an_http_address_speaks_h2c() {
    let h2 = start_h2_backend(None).await;
    let h1 = start_backend().await;
    let a = format!("http://127.0.0.1:{}", h2.addr.port());
    let svc = bookstore_with_backend(serde_json::json!([
        {"selector": "1.bookstore.ListShelves", "address": format!("{a}/api"), "protocol": "h2",
         "pathTranslation": "APPEND_PATH_TO_ADDRESS"},
        {"selector": "1.bookstore.Status", "address": format!("{a}/other/"), "protocol": "GRPC",
         "pathTranslation": "APPEND_PATH_TO_ADDRESS"},
        {"selector": "1.bookstore.GetShelf", "address": a.clone(),
         "pathTranslation": "APPEND_PATH_TO_ADDRESS"},
        {"selector": "1.bookstore.Slow", "address": format!("http://127.0.0.1:{}/h1", h1.port()),
         "protocol": "http/1.1", "pathTranslation": "APPEND_PATH_TO_ADDRESS"},
    ]));
    let dead = format!("--backend=127.0.0.1:{}", dead_port());
    let env = start_proxy(svc, h2.addr, &[&dead, "--enable_backend_routing"]).await;
    let get = |t: &str| env.client.get(format!("{}{t}", env.base)).send();
    for _ in 0..2 {
        let r = get("/shelves?x=1").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.text().await.unwrap(),
            "HTTP/2.0 /api/shelves?x=1 alpn=none"
        );
        let r = get("/status/200").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.text().await.unwrap(),
            "HTTP/2.0 /other/status/200 alpn=none"
        );
    }
    assert_eq!(
        h2.connections(),
        1,
        "one client for one address and protocol"
    );
    assert_eq!(get("/shelves/7?key=K").await.unwrap().status(), 502);
    let r = get("/slow").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["uri"], "/h1/slow");
}

/// Over `https://`, `protocol: h2` offers only `h2` by ALPN and speaks HTTP/2, for a rule's
/// address and for `--backend`; without it the proxy offers `http/1.1`, which an h2-only
/// server refuses.
#[tokio::test]
async fn backend_rule_protocol_h2_over_https_negotiates_h2_by_alpn() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.key_pair.serialize_der()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let h2 = start_h2_backend(Some(Arc::new(cfg))).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("backend.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let https = format!("https://localhost:{}", h2.addr.port());
    let svc = bookstore_with_backend(serde_json::json!([
        {"selector": "1.bookstore.ListShelves", "address": format!("{https}/api"), "protocol": "h2",
         "pathTranslation": "APPEND_PATH_TO_ADDRESS"},
        {"selector": "1.bookstore.Status", "protocol": "h2"},
        {"selector": "1.bookstore.GetShelf", "address": https.clone(),
         "pathTranslation": "APPEND_PATH_TO_ADDRESS"},
        {"selector": "1.bookstore.Upload", "deadline": 10.0},
    ]));
    let env = start_proxy(
        svc,
        h2.addr,
        &[
            &format!("--backend={https}"),
            &format!("--backend_ca_cert_path={}", ca.display()),
            "--enable_backend_routing",
        ],
    )
    .await;
    let get = |t: &str| env.client.get(format!("{}{t}", env.base)).send();
    let r = get("/shelves").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "HTTP/2.0 /api/shelves alpn=h2");
    let r = get("/status/200").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "HTTP/2.0 /status/200 alpn=h2");
    assert_eq!(get("/shelves/7?key=K").await.unwrap().status(), 502);
    let r = env
        .client
        .post(format!("{}/upload", env.base))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
}
