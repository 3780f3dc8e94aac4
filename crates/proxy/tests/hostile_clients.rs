//! Clients that misbehave on purpose:
//! broken request bodies, over-long keys and headers, connections that send nothing, and a
//! public client that forges `X-Forwarded-For`. The proxy runs in-process on loopback ports
//! chosen at run time; clients are raw sockets where the bytes matter, reqwest elsewhere.
//!
//! Service Control is the TEST DOUBLE `FakePeer` (control_support), reached through the real
//! Service Control client: it records every `:check` and `:report`.

mod control_support;

use bytes::Bytes;
use control_support::{wait_until, FakePeer, Recorded};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use portico_config::Service;
use portico_proxy::config_source::Rollout;
use portico_proxy::pipeline::ControlApi;
use portico_proxy::server::{self, ProxyHandle};
use portico_proxy::service_control::{ServiceControl, ServiceControlOptions};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Every test here finishes well within this; a hang fails instead of blocking the run.
const BUDGET: Duration = Duration::from_secs(60);

async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(BUDGET, test)
        .await
        .expect("test exceeded its time budget");
}

fn fixture(name: &str) -> Arc<Service> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("fixture");
    Arc::new(serde_json::from_str(&text).expect("fixture JSON"))
}

fn rollout(svc: Arc<Service>) -> Arc<Rollout> {
    Arc::new(Rollout {
        rollout_id: svc.id.clone(),
        configs: vec![(svc, 100)],
    })
}

// ---------------------------------------------------------------------------------------------
// The backend: echoes what it received, numbering its connections, and counts closed ones.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Backend {
    /// Connections accepted.
    accepted: AtomicUsize,
    /// Connections that ended.
    closed: AtomicUsize,
    /// (connection number, method, path) of every request whose body was read whole.
    requests: Mutex<Vec<(usize, String, String)>>,
}

struct Closed(Arc<Backend>);

impl Drop for Closed {
    fn drop(&mut self) {
        self.0.closed.fetch_add(1, Ordering::SeqCst);
    }
}

async fn backend_handler(
    b: Arc<Backend>,
    conn: usize,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    if path == "/slow" {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        // A broken body: hyper closes this connection after the response.
        Err(_) => {
            let mut r = Response::new(Full::new(Bytes::from("broken body")));
            *r.status_mut() = hyper::StatusCode::BAD_REQUEST;
            return Ok(r);
        }
    };
    b.requests
        .lock()
        .expect("lock")
        .push((conn, method.clone(), path.clone()));
    let v =
        serde_json::json!({"conn": conn, "method": method, "path": path, "body_len": body.len()});
    Ok(Response::new(Full::new(Bytes::from(v.to_string()))))
}

async fn start_backend() -> (Arc<Backend>, SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let b = Arc::new(Backend::default());
    let st = b.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let n = st.accepted.fetch_add(1, Ordering::SeqCst) + 1;
            let st = st.clone();
            tokio::spawn(async move {
                let _closed = Closed(st.clone());
                let svc = service_fn(move |req| backend_handler(st.clone(), n, req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (b, addr)
}

// ---------------------------------------------------------------------------------------------
// Service Control double and the proxy.
// ---------------------------------------------------------------------------------------------

fn sc_responder(r: &Recorded) -> (u16, String) {
    if r.uri.ends_with(":check") {
        let v = r.json();
        let op = &v["operation"];
        (
            200,
            serde_json::json!({"operationId": op["operationId"],
                               "checkInfo": {"consumerInfo": {"projectNumber": "123456"}}})
            .to_string(),
        )
    } else {
        (200, "{}".into())
    }
}

struct Env {
    proxy: ProxyHandle,
    sc: FakePeer,
    _tx: watch::Sender<Arc<Rollout>>,
    base: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
    access_log: std::path::PathBuf,
}

impl Env {
    fn http(&self) -> SocketAddr {
        self.proxy.http_addr.expect("http port")
    }

    /// The access log's entries so far.
    fn access_log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn checks(&self) -> Vec<Recorded> {
        self.sc.requests_to(":check")
    }
}

/// The proxy with the check cache on (as in production) and the access log in a file.
async fn start_proxy(svc: Arc<Service>, backend: SocketAddr, extra: &[&str]) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let access_log = dir.path().join("access.log");
    let mut args: Vec<std::ffi::OsString> = vec![
        "portico esp".into(),
        "--service=test".into(),
        "--http_port=0".into(),
        "--status_port=0".into(),
        "--worker_threads=1".into(),
        format!("--backend=127.0.0.1:{}", backend.port()).into(),
        format!("--access_log={}", access_log.display()).into(),
    ];
    args.extend(extra.iter().map(Into::into));
    let settings = portico_proxy::cli::parse(args).expect("flags");
    let (tx, rx) = watch::channel(rollout(svc));
    let sc = FakePeer::start(sc_responder).await;
    let mut opts = ServiceControlOptions::new(sc.url());
    opts.report_cache_entries = 0;
    let control = ServiceControl::new(opts).expect("service control");
    let proxy = server::start(
        Arc::new(settings),
        rx,
        Some(Arc::new(control) as Arc<dyn ControlApi>),
    )
    .await
    .expect("proxy");
    let base = format!("http://{}", proxy.http_addr.expect("http port"));
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    Env {
        proxy,
        sc,
        _tx: tx,
        base,
        client,
        _dir: dir,
        access_log,
    }
}

/// Writes `bytes` on a fresh connection and reads until the proxy closes it (bounded).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn json_body(response: &str) -> serde_json::Value {
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {response:?}"))
}

// ---------------------------------------------------------------------------------------------
// Item 6: client body errors are the client's.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_request_bodies_are_the_clients_400_and_the_pool_stays_clean() {
    bounded(async {
        let (backend, addr) = start_backend().await;
        let env = start_proxy(fixture("bookstore_sc.json"), addr, &[]).await;
        // A pooled backend connection to start with.
        let r = env
            .client
            .get(format!("{}/shelves", env.base))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
        let head = "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        for (what, body) in [
            (
                "chunk size overflow",
                "FFFFFFFFFFFFFFFFF1\r\nx\r\n0\r\n\r\n",
            ),
            (
                "bare LF in a chunk extension",
                "5;a\nb\r\nhello\r\n0\r\n\r\n",
            ),
            (
                "garbage after a good chunk",
                "5\r\nhello\r\nZZ\r\nmore\r\n0\r\n\r\n",
            ),
        ] {
            let resp = raw_exchange(env.http(), format!("{head}{body}").as_bytes()).await;
            assert_eq!(status_of(&resp), 400, "{what}: {resp}");
            let v = json_body(&resp);
            assert_eq!(
                (v["code"].as_i64(), v["message"].as_str()),
                (Some(3), Some("BAD_REQUEST")),
                "{what}"
            );
            // The next request, on whatever connection the pool gives, is whole and fine.
            let r = env
                .client
                .post(format!("{}/upload", env.base))
                .body("after")
                .send()
                .await
                .expect("request");
            assert_eq!(r.status(), 200, "{what}: the request after");
            let v: serde_json::Value = r.json().await.expect("json");
            assert_eq!(v["body_len"], 5, "{what}");
        }
        // No broken body reached the backend as a request, and every backend connection that
        // carried a broken one was closed, not reused.
        let seen = backend.requests.lock().expect("lock").clone();
        assert_eq!(
            seen.iter()
                .filter(|(_, m, p)| m == "POST" && p == "/upload")
                .count(),
            3,
            "only the three good uploads were read whole: {seen:?}"
        );
        let accepted = backend.accepted.load(Ordering::SeqCst);
        assert!(
            wait_until(Duration::from_secs(5), || backend
                .closed
                .load(Ordering::SeqCst)
                >= accepted.saturating_sub(1))
            .await,
            "backend connections left open: accepted {accepted}, closed {}",
            backend.closed.load(Ordering::SeqCst)
        );
        // Reported and logged as the client's errors: 400s, never a 502.
        assert!(
            wait_until(Duration::from_secs(5), || {
                env.sc
                    .requests_to(":report")
                    .iter()
                    .filter(|r| r.body.contains(r#""/response_code":"400""#))
                    .count()
                    >= 3
            })
            .await,
            "the three 400s were not reported: {:?}",
            env.sc.requests_to(":report")
        );
        assert!(env
            .sc
            .requests_to(":report")
            .iter()
            .all(|r| !r.body.contains(r#""/response_code":"502""#)));
        let log = env.access_log();
        let statuses: Vec<i64> = log.iter().filter_map(|e| e["status"].as_i64()).collect();
        assert_eq!(
            statuses.iter().filter(|s| **s == 400).count(),
            3,
            "{statuses:?}"
        );
        assert!(!statuses.contains(&502), "{statuses:?}");
    })
    .await;
}

#[tokio::test]
async fn a_client_leaving_mid_body_is_499_not_a_backend_failure() {
    bounded(async {
        let (backend, addr) = start_backend().await;
        let env = start_proxy(fixture("bookstore_sc.json"), addr, &[]).await;
        let mut s = TcpStream::connect(env.http()).await.expect("connect");
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            .await
            .expect("write");
        // Let the proxy start forwarding, then vanish.
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(s);
        assert!(
            wait_until(Duration::from_secs(5), || !env.access_log().is_empty()).await,
            "no access log entry"
        );
        let log = env.access_log();
        assert_eq!(log.len(), 1, "{log:?}");
        assert_eq!(log[0]["status"], 499, "{log:?}");
        // The next request is fine, and the half-sent one never reached the backend whole.
        let r = env
            .client
            .post(format!("{}/upload", env.base))
            .body("after")
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
        let uploads = backend
            .requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, _, p)| p == "/upload")
            .count();
        assert_eq!(uploads, 1);
        // Not reported as a backend failure (nor at all: its backend never had the request).
        tokio::time::sleep(Duration::from_millis(300)).await;
        for r in env.sc.requests_to(":report") {
            assert!(!r.body.contains("\"502\""), "reported as 502: {}", r.body);
        }
    })
    .await;
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_the_clients_408_not_a_gateway_timeout() {
    bounded(async {
        let (_backend, addr) = start_backend().await;
        let env = start_proxy(
            fixture("bookstore_sc.json"),
            addr,
            &["--client_body_timeout=1s", "--http_request_timeout_s=30"],
        )
        .await;
        let mut s = TcpStream::connect(env.http()).await.expect("connect");
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            .await
            .expect("write");
        let started = Instant::now();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
        let resp = String::from_utf8_lossy(&out);
        assert_eq!(status_of(&resp), 408, "{resp}");
        assert_eq!(json_body(&resp)["message"], "REQUEST_TIMEOUT");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn the_backend_deadline_counts_from_the_end_of_the_body() {
    bounded(async {
        let (_backend, addr) = start_backend().await;
        let env = start_proxy(
            fixture("bookstore_sc.json"),
            addr,
            &["--http_request_timeout_s=1"],
        )
        .await;
        // An upload that takes longer than the deadline, never pausing long.
        let mut s = TcpStream::connect(env.http()).await.expect("connect");
        s.write_all(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("write");
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.write_all(b"x").await.expect("write");
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let resp = String::from_utf8_lossy(&out);
        assert_eq!(status_of(&resp), 200, "{resp}");
        // A backend slower than the deadline after the body is a 504, as before.
        let r = env
            .client
            .get(format!("{}/slow", env.base))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 504);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Slow request bodies and the backend pool (`--client_body_buffer_size`,
// `--client_body_min_rate`).
// ---------------------------------------------------------------------------------------------

/// Sends `head` and `first`, then one byte every `every` until `stop` is set or the proxy
/// closes the connection; returns what the proxy answered.
fn drip(
    addr: SocketAddr,
    head: &'static str,
    first: Vec<u8>,
    every: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(head.as_bytes()).await.expect("write head");
        s.write_all(&first).await.expect("write");
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::SeqCst) {
            tokio::select! {
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                },
                _ = tokio::time::sleep(every) => {
                    if s.write_all(b"x").await.is_err() {
                        break;
                    }
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
}

#[tokio::test]
async fn dripped_bodies_do_not_starve_the_backend_pool() {
    bounded(async {
        let (_backend, addr) = start_backend().await;
        let env = start_proxy(
            fixture("bookstore_sc.json"),
            addr,
            &["--backend_max_connections=2", "--http_request_timeout_s=5"],
        )
        .await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let head = "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n";
        let drips: Vec<_> = (0..2)
            .map(|_| {
                drip(
                    env.http(),
                    head,
                    Vec::new(),
                    Duration::from_secs(1),
                    stop.clone(),
                )
            })
            .collect();
        // Both drips are under way (each has sent its head and a byte or two).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for round in 0..2 {
            let r = env
                .client
                .get(format!("{}/shelves", env.base))
                .send()
                .await
                .expect("request");
            assert_eq!(
                r.status(),
                200,
                "round {round}: the pool is held by the drips"
            );
        }
        stop.store(true, Ordering::SeqCst);
        for d in drips {
            let _ = d.await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_small_body_is_buffered_before_the_backend_and_arrives_whole_once() {
    bounded(async {
        let (backend, addr) = start_backend().await;
        let env = start_proxy(fixture("bookstore_sc.json"), addr, &[]).await;
        let mut s = TcpStream::connect(env.http()).await.expect("connect");
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\n01234")
            .await
            .expect("write");
        // Half the body is in: no backend connection is taken for it yet.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            backend.accepted.load(Ordering::SeqCst),
            0,
            "a backend connection was taken before the body was buffered"
        );
        s.write_all(b"56789").await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let resp = String::from_utf8_lossy(&out);
        assert_eq!(status_of(&resp), 200, "{resp}");
        assert_eq!(json_body(&resp)["body_len"], 10, "{resp}");
        let uploads = backend
            .requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, _, p)| p == "/upload")
            .count();
        assert_eq!(uploads, 1);
        // A chunked body, with a trailer section, buffered the same way.
        let resp = raw_exchange(
            env.http(),
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
        )
        .await;
        assert_eq!(status_of(&resp), 200, "{resp}");
        assert_eq!(json_body(&resp)["body_len"], 7, "{resp}");
        // Thousands of one-byte chunks: held as one, forwarded whole.
        let mut req =
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                .to_vec();
        for _ in 0..5000 {
            req.extend_from_slice(b"1\r\nz\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        let resp = raw_exchange(env.http(), &req).await;
        assert_eq!(status_of(&resp), 200, "{resp}");
        assert_eq!(json_body(&resp)["body_len"], 5000, "{resp}");
    })
    .await;
}

#[tokio::test]
async fn a_body_larger_than_the_buffer_streams_and_a_drip_beyond_it_is_408() {
    bounded(async {
        let (backend, addr) = start_backend().await;
        let env = start_proxy(
            fixture("bookstore_sc.json"),
            addr,
            &[
                "--client_body_buffer_size=1k",
                "--client_body_min_rate=1000",
                "--http_request_timeout_s=30",
            ],
        )
        .await;
        // Larger than the buffer: streamed, the backend connection taken before the end.
        let mut s = TcpStream::connect(env.http()).await.expect("connect");
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        s.write_all(&[b'a'; 2048]).await.expect("write");
        assert!(
            wait_until(Duration::from_secs(5), || backend.accepted.load(Ordering::SeqCst) >= 1)
                .await,
            "a body past the buffer did not start streaming"
        );
        s.write_all(&[b'b'; 2048]).await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let resp = String::from_utf8_lossy(&out);
        assert_eq!(status_of(&resp), 200, "{resp}");
        assert_eq!(json_body(&resp)["body_len"], 4096, "{resp}");

        // Past the buffer, then one byte every half second: far below 1000 bytes/s, never
        // pausing as long as --client_body_timeout (60 s).
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = drip(
            env.http(),
            "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",
            vec![b'a'; 2048],
            Duration::from_millis(500),
            stop.clone(),
        );
        let resp = tokio::time::timeout(Duration::from_secs(25), d).await;
        stop.store(true, Ordering::SeqCst);
        let resp = resp.expect("the drip was not cut").expect("drip task");
        assert_eq!(status_of(&resp), 408, "{resp}");
        assert_eq!(json_body(&resp)["message"], "REQUEST_TIMEOUT");
    })
    .await;
}

#[tokio::test]
async fn grpc_request_bodies_are_streamed_not_buffered() {
    bounded(async {
        let (backend, addr) = start_backend().await;
        let env = start_proxy(fixture("bookstore_sc.json"), addr, &[]).await;
        let mut s = TcpStream::connect(env.http()).await.expect("connect");
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc\r\nContent-Length: 10\r\nConnection: close\r\n\r\n01234")
            .await
            .expect("write");
        // A streaming call's first message goes on at once, without waiting for a buffer.
        assert!(
            wait_until(Duration::from_secs(5), || backend.accepted.load(Ordering::SeqCst) >= 1)
                .await,
            "a gRPC request body was held back"
        );
        s.write_all(b"56789").await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let resp = String::from_utf8_lossy(&out);
        assert_eq!(status_of(&resp), 200, "{resp}");
        assert_eq!(json_body(&resp)["body_len"], 10, "{resp}");
    })
    .await;
}

#[tokio::test]
async fn a_client_leaving_mid_body_is_logged_with_the_bytes_it_sent() {
    bounded(async {
        let (_backend, addr) = start_backend().await;
        let env = start_proxy(fixture("bookstore_sc.json"), addr, &[]).await;
        let head = "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n";
        let mut s = TcpStream::connect(env.http()).await.expect("connect");
        s.write_all(format!("{head}0123456789").as_bytes())
            .await
            .expect("write");
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(s);
        assert!(
            wait_until(Duration::from_secs(5), || !env.access_log().is_empty()).await,
            "no access log entry"
        );
        let log = env.access_log();
        assert_eq!(log[0]["status"], 499, "{log:?}");
        // The head as sent plus the 10 bytes received, not the 100 declared.
        assert_eq!(log[0]["request_bytes"], head.len() + 10, "{log:?}");
        // A request answered without reading its body still counts its Content-Length.
        let r = env
            .client
            .post(format!("{}/upload", env.base))
            .body("0123456789")
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Item 7: keys and heads are bounded before anything is looked up.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_over_long_api_key_is_refused_without_a_check() {
    bounded(async {
        let (backend, addr) = start_backend().await;
        let env = start_proxy(fixture("bookstore_sc.json"), addr, &[]).await;
        let long = "A".repeat(129);
        let huge = "k".repeat(200_000);
        for (how, req) in [
            (
                "header",
                env.client
                    .get(format!("{}/shelves/1", env.base))
                    .header("x-api-key", long.as_str()),
            ),
            (
                "query",
                env.client.get(format!("{}/shelves/1?key={long}", env.base)),
            ),
            (
                "8 KiB header",
                env.client
                    .get(format!("{}/shelves/1", env.base))
                    .header("x-api-key", "B".repeat(8000)),
            ),
        ] {
            let r = req.send().await.expect("request");
            assert_eq!(r.status(), 400, "{how}");
            let v: serde_json::Value = r.json().await.expect("json");
            assert_eq!(
                (v["code"].as_i64(), v["message"].as_str()),
                (
                    Some(3),
                    Some("API key not valid. Please pass a valid API key.")
                ),
                "{how}"
            );
            assert_eq!(v["details"][0]["detail"], "service_control", "{how}");
        }
        // 200 kB (the issue's keys): over the head limit, refused before any parsing.
        let r = env
            .client
            .get(format!("{}/shelves/1", env.base))
            .header("x-api-key", huge.as_str())
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 431);
        assert!(env.checks().is_empty(), "no check for refused keys");
        assert!(backend.requests.lock().expect("lock").is_empty());
        // A key of the longest accepted length is checked as usual.
        let ok = "C".repeat(128);
        let r = env
            .client
            .get(format!("{}/shelves/1", env.base))
            .header("x-api-key", ok.as_str())
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
        let checks = env.checks();
        assert_eq!(checks.len(), 1);
        assert_eq!(
            checks[0].json()["operation"]["consumerId"],
            format!("api_key:{ok}")
        );
    })
    .await;
}

/// nginx's `large_client_header_buffers 4 8k`: a header line up to 8 KiB passes, a longer one,
/// or a head over 32 KiB, does not; and an over-long request line is 414.
async fn header_limits_over(client: reqwest::Client, env: &Env, backend: &Backend, h2: bool) {
    let name = "x-big";
    // `x-big: <value>` is exactly 8 KiB.
    let line_8k = "v".repeat(8192 - name.len() - 2);
    let r = client
        .get(format!("{}/shelves", env.base))
        .header(name, line_8k.as_str())
        .send()
        .await
        .expect("8 KiB header");
    assert_eq!(r.status(), 200, "h2={h2}: an 8 KiB header line passes");
    assert_eq!(
        r.version(),
        if h2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        }
    );
    let before = backend.requests.lock().expect("lock").len();
    // One byte over the line limit.
    let r = client
        .get(format!("{}/shelves", env.base))
        .header(name, format!("{line_8k}v"))
        .send()
        .await
        .expect("8 KiB + 1 header");
    assert_eq!(r.status(), 431, "h2={h2}");
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["message"], "REQUEST_HEADER_FIELDS_TOO_LARGE");
    // 40 KiB in one header: over the whole head's limit, refused while reading.
    let r = client
        .get(format!("{}/shelves", env.base))
        .header(name, "w".repeat(40 << 10))
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status(), 431, "h2={h2}: 40 KiB header"),
        // An HTTP/2 client may refuse to send what the server's SETTINGS forbid.
        Err(e) => assert!(h2, "h1: {e}"),
    }
    // Five 7 KiB headers: each line fits, the head (35 KiB) does not.
    let mut req = client.get(format!("{}/shelves", env.base));
    for i in 0..5 {
        req = req.header(format!("x-part-{i}"), "p".repeat(7 << 10));
    }
    match req.send().await {
        Ok(r) => assert_eq!(r.status(), 431, "h2={h2}: 35 KiB head"),
        Err(e) => assert!(h2, "h1: {e}"),
    }
    // A 9 KiB request target.
    let r = client
        .get(format!("{}/shelves?q={}", env.base, "q".repeat(9 << 10)))
        .send()
        .await
        .expect("long target");
    assert_eq!(r.status(), 414, "h2={h2}");
    assert_eq!(
        backend.requests.lock().expect("lock").len(),
        before,
        "h2={h2}: nothing refused reached the backend"
    );
}

#[tokio::test]
async fn header_limits_are_nginxs_over_http1_and_h2c() {
    bounded(async {
        let (backend, addr) = start_backend().await;
        let env = start_proxy(fixture("bookstore_sc.json"), addr, &[]).await;
        header_limits_over(env.client.clone(), &env, &backend, false).await;
        let h2 = reqwest::Client::builder()
            .no_proxy()
            .http2_prior_knowledge()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("h2c client");
        header_limits_over(h2, &env, &backend, true).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Item 8: idle connections are closed.
// ---------------------------------------------------------------------------------------------

/// Reads until EOF; how long that took, or `None` if the connection stayed open.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let res = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    res.ok().map(|()| started.elapsed())
}

#[tokio::test]
async fn idle_and_slow_connections_are_closed_on_the_serving_and_status_ports() {
    bounded(async {
        let (_backend, addr) = start_backend().await;
        let env = start_proxy(
            fixture("bookstore_sc.json"),
            addr,
            &["--client_header_timeout=1s", "--keepalive_timeout=2s"],
        )
        .await;
        let status = env.proxy.status_addr.expect("status port");
        // Silent connections: the header timeout (1 s) applies from accept.
        let mut silent = Vec::new();
        for a in [env.http(), status] {
            silent.push((a, TcpStream::connect(a).await.expect("connect")));
        }
        for (a, s) in &mut silent {
            let took = closed_within(s, Duration::from_secs(5)).await;
            let took = took.unwrap_or_else(|| panic!("{a}: a silent connection stayed open"));
            assert!(took < Duration::from_secs(4), "{a}: {took:?}");
        }
        // A head trickled one byte every 200 ms never completes: closed by the header timeout.
        let mut s = TcpStream::connect(env.http()).await.expect("connect");
        let started = Instant::now();
        let mut closed = false;
        for b in
            b"GET /shelves HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        {
            if s.write_all(&[*b]).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            closed
                || closed_within(&mut s, Duration::from_secs(3))
                    .await
                    .is_some(),
            "a trickled head stayed open"
        );
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{:?}",
            started.elapsed()
        );
        // Keep-alive: after a response, idle for the keep-alive timeout (2 s), then closed,
        // on both ports.
        for (a, path) in [(env.http(), "/shelves"), (status, "/healthz")] {
            let mut s = TcpStream::connect(a).await.expect("connect");
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .expect("write");
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).await.expect("response");
            assert!(
                String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
                "{a}"
            );
            let took = closed_within(&mut s, Duration::from_secs(6))
                .await
                .unwrap_or_else(|| panic!("{a}: an idle keep-alive connection stayed open"));
            assert!(
                took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
                "{a}: closed after {took:?}, keep-alive is 2 s"
            );
        }
        // An HTTP/2 connection that goes quiet is closed too.
        let mut s = TcpStream::connect(env.http()).await.expect("connect");
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .expect("preface");
        assert!(
            closed_within(&mut s, Duration::from_secs(8))
                .await
                .is_some(),
            "an idle h2c connection stayed open"
        );
        // A request in flight longer than both timeouts is not cut (the backend takes 3 s).
        let r = env
            .client
            .get(format!("{}/slow", env.base))
            .send()
            .await
            .expect("slow request");
        assert_eq!(r.status(), 200);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Default: X-Forwarded-For is believed from local peers only.
// ---------------------------------------------------------------------------------------------

/// The proxy's pipeline behind a test listener that presents every connection as coming from
/// `peer`: the only way to be a non-loopback client on a test machine without changing its
/// network. Everything else is the real pipeline with the default flags.
async fn pipeline_seen_from(peer: SocketAddr, sc: &FakePeer, backend: SocketAddr) -> SocketAddr {
    use portico_proxy::pipeline::{ConnInfo, Pipeline, ProxyState};
    let settings = Arc::new(
        portico_proxy::cli::parse(vec![
            "portico esp".into(),
            "--service=test".into(),
            format!("--backend=127.0.0.1:{}", backend.port()).into(),
        ])
        .expect("flags"),
    );
    let mut opts = ServiceControlOptions::new(sc.url());
    opts.check_cache_entries = 0;
    opts.report_cache_entries = 0;
    let control = ServiceControl::new(opts).expect("service control");
    let state = Arc::new(ProxyState::new(
        settings.clone(),
        portico_proxy::routing::RouteTable::new(String::new(), Vec::new()),
        Some(Arc::new(control) as Arc<dyn ControlApi>),
        Arc::new(portico_proxy::metrics::Metrics::new()),
        portico_proxy::access_log::AccessLog::from_flag(Some("off")).expect("access log"),
    ));
    state.swap_routes(server::compile(
        &rollout(fixture("bookstore_sc.json")),
        &portico_proxy::routing::RouteOptions::new(false),
    ));
    let forwarder = portico_proxy::forward::Forwarder::new(
        &settings.backend,
        settings.backend_timeout,
        None,
        portico_proxy::upstream::PoolLimits::default(),
    )
    .expect("forwarder");
    let pipeline = Arc::new(Pipeline::new(state, forwarder));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let p = pipeline.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let p = p.clone();
                    async move {
                        Ok::<_, Infallible>(
                            p.handle(
                                req,
                                ConnInfo {
                                    peer,
                                    local: None,
                                    tls: false,
                                },
                            )
                            .await,
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_public_clients_own_x_forwarded_for_is_ignored_by_default() {
    bounded(async {
        let (_backend, backend_addr) = start_backend().await;
        let sc = FakePeer::start(sc_responder).await;
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let caller_ips = |sc: &FakePeer| -> Vec<String> {
            sc.requests_to(":check")
                .iter()
                .map(|r| {
                    r.json()["operation"]["labels"]["servicecontrol.googleapis.com/caller_ip"]
                        .as_str()
                        .unwrap_or("")
                        .to_string()
                })
                .collect()
        };
        // A public client forging the header: the check sees its real address.
        let public = pipeline_seen_from(
            "203.0.113.9:40000".parse().expect("addr"),
            &sc,
            backend_addr,
        )
        .await;
        let r = client
            .get(format!("http://{public}/shelves/1?key=k"))
            .header("x-forwarded-for", "1.2.3.4")
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
        assert_eq!(caller_ips(&sc), vec!["203.0.113.9"]);
        // A load balancer on the private network passes the real client through.
        sc.clear();
        let lb =
            pipeline_seen_from("10.0.0.5:40000".parse().expect("addr"), &sc, backend_addr).await;
        let r = client
            .get(format!("http://{lb}/shelves/1?key=k"))
            .header("x-forwarded-for", "1.2.3.4, 198.51.100.7")
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
        assert_eq!(caller_ips(&sc), vec!["198.51.100.7"]);
    })
    .await;
}
