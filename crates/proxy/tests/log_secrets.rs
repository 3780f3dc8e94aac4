//! Credentials in request URLs never reach the proxy's access log or what it reports: the
//! proxy started in-process on loopback ports chosen at run time, a real backend (a small hyper
//! server in this file), the real Service Control client sending to `FakePeer` (the TEST DOUBLE
//! of the control plane in `control_support`), requests written byte for byte on raw sockets.
//!
//! The report may carry the key where Service Control needs it (`consumerId`, the
//! `/credential_id` label, the payload's `api_key`), as ESP's does; everything else — `url`, `log_message`, `referer`, the error
//! message — is masked with the service's own parameter names too.

mod control_support;

use bytes::Bytes;
use control_support::FakePeer;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portico_config::Service;
use portico_proxy::config_source::Rollout;
use portico_proxy::pipeline::ControlApi;
use portico_proxy::server;
use portico_proxy::service_control::{ServiceControl, ServiceControlOptions};
use serde_json::Value;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// The bookstore fixture with a custom API-key parameter (`mykey`, for `Echo`), a provider
/// reading JWTs from `jwt_q`, and the `endpoints_log` destination so reports carry log entries.
fn service() -> Arc<Service> {
    let path = format!(
        "{}/tests/fixtures/bookstore_sc.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["systemParameters"] = serde_json::json!({"rules": [{"selector": "1.bookstore.Echo",
        "parameters": [{"name": "api_key", "urlQueryParameter": "mykey"}]}]});
    v["authentication"] = serde_json::json!({"providers": [{"id": "p", "issuer": "i",
        "jwtLocations": [{"query": "jwt_q"}]}]});
    v["logging"] = serde_json::json!({"producerDestinations": [
        {"monitoredResource": "api", "logs": ["endpoints_log"]}]});
    Arc::new(serde_json::from_value(v).unwrap())
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
                let svc = service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Writes one request and reads the whole answer (the request says `Connection: close`).
async fn send_raw(addr: SocketAddr, head: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A report without the fields that must carry the key for Service Control.
fn without_consumer_fields(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("consumerId");
            m.remove("api_key");
            m.remove("/credential_id");
            m.values_mut().for_each(without_consumer_fields);
        }
        Value::Array(a) => a.iter_mut().for_each(without_consumer_fields),
        _ => {}
    }
}

#[tokio::test]
async fn no_secret_in_the_access_log_or_the_reported_logs() {
    let secret = |i: usize| format!("TOPSECRET{i:02}abcdefgh");
    // (request line target, extra header lines) — every spelling a client or backend may use.
    let targets: Vec<(String, String)> = vec![
        (format!("/shelves?key={}", secret(1)), String::new()),
        (format!("/shelves?KEY={}", secret(2)), String::new()),
        (format!("/shelves?Api_Key={}", secret(3)), String::new()),
        (
            format!("/shelves?access_token={}", secret(4)),
            String::new(),
        ),
        (format!("/shelves?%6Bey={}", secret(5)), String::new()),
        (format!("/shelves?x=1;key={}", secret(6)), String::new()),
        (
            format!("/shelves?key={}&key={}", secret(7), secret(8)),
            String::new(),
        ),
        (format!("/shelves?MyKey={}", secret(9)), String::new()),
        (format!("/shelves?jwt_q={}", secret(10)), String::new()),
        (format!("/nope?api.key={}", secret(11)), String::new()),
        (format!("/echo?mykey={}", secret(12)), String::new()),
        (format!("/echo?key={}", secret(13)), String::new()),
        (
            "/shelves".to_string(),
            format!("Referer: https://app.example/page?key={}\r\n", secret(14)),
        ),
    ];

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let backend = start_backend().await;
    let settings = portico_proxy::cli::parse(
        [
            "portico esp".to_string(),
            "--service=test".into(),
            "--http_port=0".into(),
            "--status_port=0".into(),
            "--worker_threads=2".into(),
            format!("--backend=127.0.0.1:{}", backend.port()),
            format!("--access_log={}", log.display()),
        ]
        .into_iter()
        .map(Into::into)
        .collect(),
    )
    .unwrap();
    let peer = FakePeer::start(|_| (200, "{}".to_string())).await;
    let mut opts = ServiceControlOptions::new(peer.url());
    opts.check_cache_entries = 0;
    opts.report_cache_entries = 0;
    let sc = ServiceControl::new(opts).unwrap();
    let svc = service();
    let (_tx, rx) = watch::channel(Arc::new(Rollout {
        rollout_id: svc.id.clone(),
        configs: vec![(svc, 100)],
    }));
    let metrics = Arc::new(portico_proxy::metrics::Metrics::new());
    let proxy = server::start_with_metrics(
        Arc::new(settings),
        rx,
        Some(Arc::new(sc) as Arc<dyn ControlApi>),
        metrics,
    )
    .await
    .unwrap();
    let addr = proxy.http_addr.unwrap();

    for (target, extra) in &targets {
        let method = if target.starts_with("/echo") {
            "POST"
        } else {
            "GET"
        };
        let resp = send_raw(
            addr,
            &format!(
                "{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n{extra}Connection: close\r\n\r\n"
            ),
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 "), "{target}: {resp:?}");
    }

    // Both sinks are written after the response: wait (bounded) for one line / entry each.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (access, reports) = loop {
        let access = std::fs::read_to_string(&log).unwrap_or_default();
        let reports: Vec<Value> = peer
            .requests_to(":report")
            .iter()
            .map(|r| r.json())
            .collect();
        let entries = reports
            .iter()
            .flat_map(|r| r["operations"].as_array().cloned().unwrap_or_default())
            .map(|o| o["logEntries"].as_array().map_or(0, Vec::len))
            .sum::<usize>();
        if (access.lines().count() >= targets.len() && entries >= targets.len())
            || tokio::time::Instant::now() > deadline
        {
            break (access, reports);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(access.lines().count(), targets.len(), "{access}");
    let mut reported = Value::Array(reports);
    let urls: Vec<String> = reported
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["operations"].as_array().cloned().unwrap_or_default())
        .flat_map(|o| o["logEntries"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["structPayload"]["url"].as_str().map(str::to_string))
        .collect();
    assert_eq!(urls.len(), targets.len(), "{reported}");
    without_consumer_fields(&mut reported);
    let reported = reported.to_string();
    for i in 1..=14 {
        let s = format!("TOPSECRET{i:02}");
        assert!(!access.contains(&s), "{s} in the access log:\n{access}");
        assert!(!reported.contains(&s), "{s} reported:\n{reported}");
    }
    // What stays: the names, and the last four characters of each value.
    assert!(access.contains("/shelves?MyKey=…efgh"), "{access}");
    assert!(
        urls.iter().any(|u| u == "/shelves?x=1;key=…efgh"),
        "{urls:?}"
    );
    proxy.shutdown(Duration::from_secs(5)).await;
}
