//! The Bookstore server over real loopback connections: the generated tonic client for the
//! methods, and a raw HTTP/2 client (hyper) where the wire matters (status codes tonic cannot
//! represent, trailing metadata, TLS with ALPN).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portico_bookstore::proto::bookstore_client::BookstoreClient;
use portico_bookstore::proto::{
    Book, CreateShelfRequest, GetShelfRequest, ListBooksRequest, Shelf,
};
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(20);

struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(portico_bookstore::serve_with_shutdown(
        listener,
        tls,
        async {
            let _ = stopped.await;
        },
    ));
    Server {
        addr,
        stop: Some(stop),
    }
}

async fn client(addr: SocketAddr) -> BookstoreClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    BookstoreClient::new(channel)
}

fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    b.freeze()
}

fn unframe(mut data: Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    while data.len() >= 5 {
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        data.advance(5);
        out.push(data.split_to(len));
    }
    out
}

struct Raw {
    headers: http::HeaderMap,
    messages: Vec<Bytes>,
    trailers: http::HeaderMap,
}

impl Raw {
    /// grpc-status from the trailers, or from the headers of a trailers-only response.
    fn status(&self) -> (String, String) {
        let from = if self.trailers.contains_key("grpc-status") {
            &self.trailers
        } else {
            &self.headers
        };
        let get = |k: &str| {
            from.get(k)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        (get("grpc-status"), get("grpc-message"))
    }
}

async fn raw_call<S>(io: S, method: &str, msg: &[u8], meta: &[(&str, &str)]) -> Raw
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::post(format!(
        "http://localhost/endpoints.examples.bookstore.Bookstore/{method}"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers");
    for (k, v) in meta {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(frame(msg))).unwrap())
        .await
        .unwrap();
    let headers = resp.headers().clone();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    Raw {
        headers,
        messages: unframe(collected.to_bytes()),
        trailers,
    }
}

#[tokio::test]
async fn unary_methods_serve_the_seed_data_and_errors() {
    tokio::time::timeout(LIMIT, async {
        let s = start(None).await;
        let mut c = client(s.addr).await;
        let shelf = c
            .get_shelf(GetShelfRequest { shelf: 100 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((shelf.id, shelf.theme.as_str()), (100, "Kids"));
        let list = c.list_shelves(()).await.unwrap().into_inner();
        assert_eq!(list.shelves.len(), 2);
        let e = c
            .get_shelf(GetShelfRequest { shelf: -1 })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(e.message(), "Unable to find shelf -1");
        let created = c
            .create_shelf(CreateShelfRequest {
                shelf: Some(Shelf {
                    id: 123,
                    theme: "kids".into(),
                    any: None,
                }),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(created.id, 123);
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn control_metadata_fails_calls_and_echoes_metadata() {
    tokio::time::timeout(LIMIT, async {
        let s = start(None).await;
        let get100 = GetShelfRequest { shelf: 100 }.encode_to_vec();

        let r = raw_call(
            TcpStream::connect(s.addr).await.unwrap(),
            "ReturnBadStatus",
            &[],
            &[],
        )
        .await;
        assert_eq!(r.status(), ("74".into(), "bad status".into()));

        let r = raw_call(
            TcpStream::connect(s.addr).await.unwrap(),
            "GetShelf",
            &get100,
            &[("x-bookstore-fail", "10")],
        )
        .await;
        assert_eq!(r.status(), ("10".into(), "ABORTED".into()));
        assert!(r.messages.is_empty());

        let long = "x".repeat(2000);
        let r = raw_call(
            TcpStream::connect(s.addr).await.unwrap(),
            "GetShelf",
            &get100,
            &[
                ("x-bookstore-fail", "13"),
                ("x-bookstore-fail-message", &long),
            ],
        )
        .await;
        assert_eq!(r.status(), ("13".into(), long));

        let r = raw_call(
            TcpStream::connect(s.addr).await.unwrap(),
            "GetShelf",
            &get100,
            &[("x-bookstore-fail", "x")],
        )
        .await;
        assert_eq!(r.status().0, "3");
        assert!(
            r.status().1.contains("x-bookstore-fail must be"),
            "{:?}",
            r.status()
        );

        let r = raw_call(
            TcpStream::connect(s.addr).await.unwrap(),
            "GetShelf",
            &get100,
            &[
                ("x-bookstore-echo-metadata", "x-text, x-data-bin"),
                ("x-text", "hello"),
                ("x-data-bin", "AAEC"),
            ],
        )
        .await;
        assert_eq!(r.status(), ("0".into(), String::new()));
        assert_eq!(Shelf::decode(r.messages[0].clone()).unwrap().theme, "Kids");
        for m in [&r.headers, &r.trailers] {
            assert_eq!(m["x-text"], "hello", "{m:?}");
            assert_eq!(m["x-data-bin"], "AAEC", "{m:?}");
        }
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn streams_are_sent_message_by_message() {
    tokio::time::timeout(LIMIT, async {
        let s = start(None).await;
        let mut c = client(s.addr).await;
        for i in 0..3 {
            c.create_book(portico_bookstore::proto::CreateBookRequest {
                shelf: 100,
                book: Some(Book {
                    title: format!("t{i}"),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
        }
        let mut req = tonic::Request::new(ListBooksRequest { shelf: 100 });
        req.metadata_mut()
            .insert("x-bookstore-stream-delay-ms", "300".parse().unwrap());
        let t0 = Instant::now();
        let mut stream = c.stream_books(req).await.unwrap().into_inner();
        let first = stream.next().await.unwrap().unwrap();
        let first_at = t0.elapsed();
        assert_eq!(first.title, "t0");
        let mut rest = 0;
        while let Some(b) = stream.next().await {
            b.unwrap();
            rest += 1;
        }
        let end_at = t0.elapsed();
        assert_eq!(rest, 2);
        assert!(
            end_at >= first_at + Duration::from_millis(800),
            "first at {first_at:?}, end at {end_at:?}"
        );

        // Client streaming.
        let shelves = tokio_stream::iter((0..3).map(|i| CreateShelfRequest {
            shelf: Some(Shelf {
                theme: format!("s{i}"),
                ..Default::default()
            }),
        }));
        let made = c.bulk_create_shelf(shelves).await.unwrap().into_inner();
        assert_eq!(
            made.shelves.iter().map(|s| s.id).collect::<Vec<_>>(),
            [201, 202, 203]
        );

        // Bidirectional: each book comes back before the next is sent.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut replies = c
            .echo_books(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        for i in 0..5 {
            tx.send(Book {
                id: i,
                ..Default::default()
            })
            .await
            .unwrap();
            assert_eq!(replies.next().await.unwrap().unwrap().id, i);
        }
        drop(tx);
        assert!(replies.next().await.is_none());
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn tls_serves_h2_by_alpn() {
    tokio::time::timeout(LIMIT, async {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert_pem = ck.cert.pem();
        let key_pem = ck.key_pair.serialize_pem();
        let dir = std::env::temp_dir();
        let config = portico_bookstore::tls::server_config_from_pem(
            cert_pem.as_bytes(),
            key_pem.as_bytes(),
            &dir.join("cert.pem"),
            &dir.join("key.pem"),
        )
        .unwrap();
        let s = start(Some(config)).await;

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let mut cc = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cc.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(s.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cc))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let r = raw_call(
            tls,
            "GetShelf",
            &GetShelfRequest { shelf: 200 }.encode_to_vec(),
            &[],
        )
        .await;
        assert_eq!(r.status().0, "0");
        assert_eq!(
            Shelf::decode(r.messages[0].clone()).unwrap().theme,
            "Classic"
        );

        // A cleartext client gets nothing usable from the TLS port.
        let plain = tokio::time::timeout(
            Duration::from_secs(5),
            hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
                TokioExecutor::new(),
                TokioIo::new(TcpStream::connect(s.addr).await.unwrap()),
            ),
        )
        .await;
        if let Ok(Ok((mut sender, conn))) = plain {
            tokio::spawn(conn);
            let req = http::Request::post("http://localhost/x")
                .body(Full::new(Bytes::new()))
                .unwrap();
            assert!(sender.send_request(req).await.is_err());
        }
    })
    .await
    .expect("bounded");
}
