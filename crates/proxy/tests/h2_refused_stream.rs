//! An HTTP/2 backend that refuses streams (`REFUSED_STREAM`, what a server at its stream limit
//! or shutting down sends): the `Forwarder` tells it apart from other resets, retries it under
//! `refused-stream` (ESPv2's default) and not under `connect-failure`, and fails with it as
//! the last failure when retries run out. The backend is the `h2` crate's server, so it can
//! refuse on purpose.

use bytes::Bytes;
use http::Request;
use portico_proxy::forward::{ForwardError, Forwarder, LimitedBody};
use portico_proxy::retry::{Retries, RetryOn, RetryPolicy};
use portico_proxy::settings::{BackendAddr, BackendScheme};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Refuses the first `refuse` streams it gets (over all connections), answers 200 after.
async fn backend(refuse: usize) -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let streams = Arc::new(AtomicUsize::new(0));
    let seen = streams.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
                    if n <= refuse {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let resp = http::Response::builder().status(200).body(()).unwrap();
                    if let Ok(mut body) = respond.send_response(resp, false) {
                        let _ = body.send_data(Bytes::from_static(b"ok"), true);
                    }
                }
            });
        }
    });
    (port, streams)
}

fn forwarder(port: u16, on: &str, retries: u32) -> Forwarder {
    Forwarder::new(
        &BackendAddr {
            scheme: BackendScheme::Grpc,
            host: "127.0.0.1".into(),
            port,
        },
        Duration::from_secs(10),
        None,
        Default::default(),
    )
    .unwrap()
    .with_retries(Some(Retries::new(RetryPolicy {
        retries,
        on: RetryOn::parse(on).unwrap(),
        status_codes: vec![],
        per_try_timeout: None,
    })))
}

fn get(f: &Forwarder) -> Request<LimitedBody> {
    Request::builder()
        .uri(f.upstream_uri("/e2e.Api/Get").unwrap())
        .body(LimitedBody::empty())
        .unwrap()
}

#[tokio::test]
async fn refused_streams_are_retried_under_refused_stream() {
    tokio::time::timeout(Duration::from_secs(20), async {
        // Retried, then answered.
        let (port, streams) = backend(1).await;
        let f = forwarder(port, "refused-stream", 1);
        let resp = f.send(get(&f)).await.expect("answered after a retry");
        assert_eq!(resp.status(), 200);
        assert_eq!(streams.load(Ordering::SeqCst), 2);

        // Not a condition that covers it: one attempt, told apart from other resets.
        let (port, streams) = backend(1).await;
        let f = forwarder(port, "connect-failure", 3);
        let e = f.send(get(&f)).await.err().expect("refused");
        assert!(matches!(e, ForwardError::RefusedStream(_)), "{e:?}");
        assert_eq!(streams.load(Ordering::SeqCst), 1);

        // Retries run out: the last failure, marked as retried.
        let (port, streams) = backend(10).await;
        let f = forwarder(port, "reset,connect-failure,refused-stream", 2);
        let e = f.send(get(&f)).await.err().expect("refused");
        assert!(
            matches!(&e, ForwardError::Retried(last) if matches!(**last, ForwardError::RefusedStream(_))),
            "{e:?}"
        );
        assert_eq!(streams.load(Ordering::SeqCst), 3);
    })
    .await
    .expect("test exceeded its time budget");
}
