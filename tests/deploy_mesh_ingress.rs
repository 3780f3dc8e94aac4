//! Portico's proxy behind a mesh ingress (deploy/istio/): a small hyper forwarder stands in for
//! the Istio ingress gateway (Envoy) and adds what Envoy adds at the edge — `X-Forwarded-For`
//! with the downstream address, `X-Forwarded-Proto`, `x-request-id`, B3 and W3C trace headers,
//! `x-envoy-external-address`. Through it:
//! - the API key flow behaves as without it (401 code 16 without a key, the backend's answer with);
//! - the caller IP the proxy uses is the client's, taken from X-Forwarded-For: a key restricted
//!   to a server IP range admits a client inside it and refuses one outside;
//! - the backend sees the original client in X-Forwarded-For and the trace headers intact.
//!
//! Everything runs under `portico up --openapi ... --backend ...` on ports chosen at run time.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// The header a test request uses to tell the fake gateway which client address to pretend.
const SIMULATED_PEER: &str = "x-test-simulated-peer";
const TRACE_ID: &str = "463ac35c9f6413ad48485a3953bb6124";
const SPAN_ID: &str = "a2fb4a1d1a96d312";

const OPENAPI: &str = r#"swagger: "2.0"
info:
  title: "Mesh ingress test"
  version: "1.0.0"
host: "mesh-echo.endpoints.mesh-proj.cloud.goog"
paths:
  "/echo":
    post:
      operationId: "echo"
      responses:
        200:
          description: "ok"
      security:
        - api_key: []
securityDefinitions:
  api_key:
    type: "apiKey"
    name: "key"
    in: "query"
"#;

struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(self.0.id() as libc::pid_t, libc::SIGINT);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `portico up` and returns it with its summary (stdout up to "Press Ctrl-C").
fn start_up(dir: &Path, backend: SocketAddr) -> (Up, String) {
    let openapi = dir.join("openapi.yaml");
    std::fs::write(&openapi, OPENAPI).expect("write openapi");
    let mut child = Command::new(env!("CARGO_BIN_EXE_portico"))
        .current_dir(dir)
        .args(["up", "--project", "mesh-proj", "--openapi"])
        .arg(&openapi)
        .args(["--backend", &backend.to_string()])
        .args([
            "--port",
            "0",
            "--status-port",
            "0",
            "--control-plane-port",
            "0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portico up");
    let out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let up = Up(child);
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                text.push_str(&line);
                text.push('\n');
                if line.contains("Press Ctrl-C") {
                    return (up, text);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    drop(up);
    let log = std::fs::read_to_string(dir.join(".portico/logs/esp.log")).unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    panic!("portico up did not get ready:\n{text}\nstderr:\n{stderr}\nesp.log:\n{log}");
}

fn field<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(prefix))
        .map(|rest| rest.split_whitespace().next().unwrap_or_default())
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{text}"))
}

type Body = Full<Bytes>;

/// The backend: answers with the request headers it received, as JSON.
async fn header_echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let mut headers = serde_json::Map::new();
                    for (name, value) in req.headers() {
                        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
                        headers
                            .entry(name.as_str().to_string())
                            .and_modify(|e| {
                                if let Value::String(s) = e {
                                    s.push_str(", ");
                                    s.push_str(&v);
                                }
                            })
                            .or_insert(Value::String(v));
                    }
                    let body = json!({"path": req.uri().to_string(), "headers": headers});
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Body::from(body.to_string()))
                            .expect("response"),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// The fake ingress gateway: forwards to `upstream` adding Envoy's edge headers.
async fn fake_gateway(upstream: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind gateway");
    let addr = listener.local_addr().expect("addr");
    let client: Client<_, Body> = Client::builder(TokioExecutor::new()).build_http();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            let client = client.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let client = client.clone();
                    async move {
                        let (mut parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        // Envoy at the edge (use_remote_address) sets XFF to the downstream peer.
                        let downstream = parts
                            .headers
                            .remove(SIMULATED_PEER)
                            .and_then(|v| v.to_str().ok().map(str::to_string))
                            .unwrap_or_else(|| peer.ip().to_string());
                        let h = &mut parts.headers;
                        let set = |h: &mut hyper::HeaderMap, k: &'static str, v: &str| {
                            h.insert(k, v.parse().expect("header value"));
                        };
                        set(h, "x-forwarded-for", &downstream);
                        set(h, "x-envoy-external-address", &downstream);
                        set(h, "x-forwarded-proto", "https");
                        set(h, "x-request-id", "5b0c8a4e-8c1f-4b8e-9b47-1f6d2b3c4d5e");
                        set(h, "x-b3-traceid", TRACE_ID);
                        set(h, "x-b3-spanid", SPAN_ID);
                        set(h, "x-b3-sampled", "1");
                        set(h, "traceparent", &format!("00-{TRACE_ID}-{SPAN_ID}-01"));
                        let path = parts
                            .uri
                            .path_and_query()
                            .map(|p| p.as_str().to_string())
                            .unwrap_or_else(|| "/".into());
                        parts.uri = format!("http://{upstream}{path}").parse().expect("uri");
                        let resp = client
                            .request(Request::from_parts(parts, Body::from(body)))
                            .await;
                        let resp = match resp {
                            Ok(r) => {
                                let (p, b) = r.into_parts();
                                let b = b.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                                Response::from_parts(p, Body::from(b))
                            }
                            Err(e) => Response::builder()
                                .status(502)
                                .body(Body::from(format!("gateway: {e}")))
                                .expect("response"),
                        };
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn post(gateway: SocketAddr, query: &str, peer: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("http://{gateway}/echo{query}"))
        .header(SIMULATED_PEER, peer)
        .header("content-type", "application/json")
        .body(r#"{"message":"hello world"}"#)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("request through the gateway");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_behind_a_mesh_ingress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = header_echo_backend().await;
    let d = dir.path().to_path_buf();
    let (_up, summary) = tokio::task::spawn_blocking(move || start_up(&d, backend))
        .await
        .expect("start up");
    let proxy: SocketAddr = field(&summary, "proxy")
        .trim_start_matches("http://")
        .parse()
        .expect("proxy address");
    let control_plane = field(&summary, "control plane").to_string();
    let key = field(&summary, "API key:").to_string();
    let gateway = fake_gateway(proxy).await;

    // 1. The API key flow is unchanged behind the gateway.
    let (status, body) = post(gateway, "", "203.0.113.7").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], 16);

    let (status, body) = post(gateway, &format!("?key={key}"), "203.0.113.7").await;
    assert_eq!(status, 200, "{body}");
    let headers = &body["headers"];
    // 2. The backend sees the client in X-Forwarded-For. Like ESP's nginx (realip module), the
    //    proxy believes the header from the gateway (a loopback peer, trusted by default), resolves
    //    the client address from it and appends that, not the gateway's socket address.
    let xff = headers["x-forwarded-for"]
        .as_str()
        .expect("x-forwarded-for");
    let hops: Vec<&str> = xff.split(',').map(str::trim).collect();
    assert_eq!(hops, ["203.0.113.7", "203.0.113.7"], "{xff}");
    // 3. Trace and request-id headers pass through untouched; so does the scheme.
    assert_eq!(
        headers["x-request-id"],
        "5b0c8a4e-8c1f-4b8e-9b47-1f6d2b3c4d5e"
    );
    assert_eq!(headers["x-b3-traceid"], TRACE_ID);
    assert_eq!(headers["x-b3-spanid"], SPAN_ID);
    assert_eq!(
        headers["traceparent"],
        format!("00-{TRACE_ID}-{SPAN_ID}-01")
    );
    assert_eq!(headers["x-forwarded-proto"], "https");

    // 4. The caller IP comes from X-Forwarded-For: a key restricted to 203.0.113.0/24.
    let token = std::fs::read_to_string(dir.path().join(".portico/admin-token"))
        .expect("admin token")
        .trim()
        .to_string();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut op: Value = http
        .post(format!("{control_plane}/v2/projects/mesh-proj/locations/global/keys"))
        .bearer_auth(&token)
        .json(&json!({"displayName": "gateway clients only",
                       "restrictions": {"serverKeyRestrictions": {"allowedIps": ["203.0.113.0/24"]}}}))
        .send()
        .await
        .expect("create key")
        .json()
        .await
        .expect("operation JSON");
    let deadline = Instant::now() + Duration::from_secs(30);
    while op["done"] != true {
        assert!(
            Instant::now() < deadline,
            "key creation did not finish: {op}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let name = op["name"].as_str().expect("operation name");
        op = http
            .get(format!("{control_plane}/v2/{name}"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("poll")
            .json()
            .await
            .expect("operation JSON");
    }
    let restricted = op["response"]["keyString"]
        .as_str()
        .expect("keyString")
        .to_string();

    // Outside the range first, so a cached positive check cannot hide the restriction.
    let (status, body) = post(gateway, &format!("?key={restricted}"), "198.51.100.9").await;
    assert_eq!(
        status, 403,
        "a client outside allowedIps was let through: {body}"
    );
    assert_eq!(body["code"], 7, "{body}");
    let (status, body) = post(gateway, &format!("?key={restricted}"), "203.0.113.99").await;
    assert_eq!(
        status, 200,
        "a client inside allowedIps was refused: {body}"
    );
    let (status, _) = post(gateway, &format!("?key={restricted}"), "198.51.100.10").await;
    assert_eq!(status, 403, "the positive check of another IP was reused");
}
