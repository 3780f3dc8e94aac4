//! `--backend_cluster_maximum_requests` in the forwarder: a backend address's count of
//! requests in flight is shared by every client built for it through one `BackendNet`, a
//! request over it is refused at once with Envoy's `overflow`, and a request keeps its place
//! until its response body ends or is dropped, or until the call itself is abandoned. The
//! backend is a raw HTTP/1.1 socket server so that a response body can be left half-sent.

use http::Request;
use http_body_util::BodyExt;
use portico_proxy::backend_net::{BackendNet, BackendNetSettings};
use portico_proxy::error::NetworkFailure;
use portico_proxy::forward::{BackendProtocol, ForwardError, Forwarder, LimitedBody};
use portico_proxy::settings::{BackendAddr, BackendScheme};
use portico_proxy::upstream::PoolLimits;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// `/half`: the head and a first chunk, then nothing for 30 s; `/stall`: nothing for 30 s;
/// anything else: a whole small body.
async fn backend() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                match path.as_str() {
                    "/half" => {
                        let _ = sock
                            .write_all(
                                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
                            )
                            .await;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    "/stall" => tokio::time::sleep(Duration::from_secs(30)).await,
                    _ => {
                        let _ = sock
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                        // Keep-alive: serve no more on this connection, but leave it open.
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                }
            });
        }
    });
    port
}

fn net(max: usize) -> Arc<BackendNet> {
    BackendNet::new(BackendNetSettings {
        max_requests: Some(max),
        ..Default::default()
    })
}

fn forwarder(port: u16, net: &Arc<BackendNet>) -> Forwarder {
    Forwarder::with_net(
        &BackendAddr {
            scheme: BackendScheme::Http,
            host: "127.0.0.1".into(),
            port,
        },
        BackendProtocol::Unset,
        Duration::from_secs(10),
        None,
        PoolLimits::default(),
        net,
    )
    .expect("forwarder")
}

fn get(fwd: &Forwarder, path: &str) -> Request<LimitedBody> {
    Request::builder()
        .uri(fwd.upstream_uri(path).expect("uri"))
        .header(http::header::HOST, "127.0.0.1")
        .body(LimitedBody::empty())
        .expect("request")
}

fn is_overflow(
    r: &Result<http::Response<portico_proxy::upstream::UpstreamBody>, ForwardError>,
) -> bool {
    matches!(r, Err(ForwardError::Connect(NetworkFailure::Overflow, _)))
}

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("the test hung");
}

#[tokio::test]
async fn a_response_body_holds_its_place_until_dropped() {
    bounded(async {
        let port = backend().await;
        let net = net(1);
        let fwd = forwarder(port, &net);
        // Another client for the same address (another serving thread, a rule's client)
        // counts in the same place.
        let other = forwarder(port, &net);

        let first = fwd.send(get(&fwd, "/half")).await.expect("first answered");
        let refused = other.send(get(&other, "/ok")).await;
        assert!(is_overflow(&refused), "{:?}", refused.err());

        // The body still streaming holds the place; dropped half-way, it frees it.
        let mut body = first.into_body();
        let frame = body.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().expect("data"), "hello");
        assert!(is_overflow(&other.send(get(&other, "/ok")).await));
        drop(body);

        // A body read to the end frees it too.
        let resp = other
            .send(get(&other, "/ok"))
            .await
            .expect("after the drop");
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(bytes, "ok");
        let resp = fwd.send(get(&fwd, "/ok")).await.expect("after the end");
        drop(resp);
    })
    .await;
}

#[tokio::test]
async fn an_abandoned_call_frees_its_place_and_addresses_count_apart() {
    bounded(async {
        let port = backend().await;
        let port2 = backend().await;
        let net = net(1);
        let fwd = forwarder(port, &net);
        // The client gave up before any answer (its deadline, or it left).
        let waited =
            tokio::time::timeout(Duration::from_millis(200), fwd.send(get(&fwd, "/stall"))).await;
        assert!(waited.is_err(), "the stalling backend answered");
        let resp = fwd
            .send(get(&fwd, "/half"))
            .await
            .expect("the place is free");

        // Another address has its own count.
        let elsewhere = forwarder(port2, &net);
        let r = elsewhere.send(get(&elsewhere, "/ok")).await;
        assert!(r.is_ok(), "{:?}", r.err());
        drop(resp);

        // Without a limit nothing is counted.
        let unlimited = forwarder(port, &BackendNet::system());
        let a = unlimited.send(get(&unlimited, "/half")).await.expect("a");
        let b = unlimited.send(get(&unlimited, "/half")).await.expect("b");
        drop((a, b));
    })
    .await;
}
