//! ESPv2's header, client-address and compression behaviour (issue 17, items 8 and 11), built
//! into the shared proxy as `Settings` fields, end to end: a real backend (a small hyper server
//! in this file), the proxy started in-process on loopback ports chosen at run time, real
//! clients (reqwest, hyper, raw TCP, and `curl` for compression).
//!
//! The proxy is configured as `portico esp`'s flags give it, then the ESPv2 settings are set
//! the way `portico espv2`'s flag parser sets them (`header_rules::from_espv2_flags`, ...).
//!
//! `RecordingControl` is a TEST DOUBLE of the Service Control client: it allows every key and
//! records the caller IP of each check; it exists only here.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use portico_config::Service;
use portico_proxy::compression::CompressionSettings;
use portico_proxy::config_source::Rollout;
use portico_proxy::error::EspError;
use portico_proxy::header_rules::{from_espv2_flags, Espv2HeaderFlags};
use portico_proxy::pipeline::{CheckInput, CheckOk, ControlApi, QuotaInput, RequestRecord};
use portico_proxy::server::{self, ProxyHandle};
use portico_proxy::settings::{Settings, XffHops};
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Notify};

// ----------------------------------------------------------------------------------------------
// The service: every method but /secret allows unregistered calls.
// ----------------------------------------------------------------------------------------------

fn service() -> Arc<Service> {
    let get = |sel: &str, path: &str| serde_json::json!({"selector": sel, "get": path});
    let v = serde_json::json!({
        "name": "hdr.endpoints.demo-proj.cloud.goog",
        "id": "2026-12-01r0",
        "producerProjectId": "demo-proj",
        "apis": [{"name": "1.hdr", "version": "1.0.0", "methods": [
            {"name": "Echo"}, {"name": "Kind"}, {"name": "Stream"}, {"name": "Forever"},
            {"name": "Secret"}]}],
        "http": {"rules": [
            get("1.hdr.Echo", "/echo"),
            get("1.hdr.Kind", "/kind"),
            get("1.hdr.Stream", "/stream/{id}"),
            get("1.hdr.Forever", "/forever"),
            get("1.hdr.Secret", "/secret"),
        ]},
        "usage": {"rules": [
            {"selector": "1.hdr.Echo", "allowUnregisteredCalls": true},
            {"selector": "1.hdr.Kind", "allowUnregisteredCalls": true},
            {"selector": "1.hdr.Stream", "allowUnregisteredCalls": true},
            {"selector": "1.hdr.Forever", "allowUnregisteredCalls": true},
        ]},
        "control": {"environment": "servicecontrol.test"}
    });
    Arc::new(serde_json::from_value(v).unwrap())
}

// ----------------------------------------------------------------------------------------------
// TEST DOUBLE of the Service Control client: every key is valid; checks' caller IPs recorded.
// ----------------------------------------------------------------------------------------------

#[derive(Default)]
struct RecordingControl {
    caller_ips: Mutex<Vec<IpAddr>>,
}

impl ControlApi for RecordingControl {
    fn check<'a>(
        &'a self,
        input: CheckInput<'a>,
    ) -> Pin<Box<dyn Future<Output = Result<CheckOk, EspError>> + Send + 'a>> {
        self.caller_ips.lock().unwrap().push(input.caller_ip);
        Box::pin(async {
            Ok(CheckOk {
                consumer_project_number: Some(123),
                api_key_valid: true,
                network_failure: false,
                api_key_uid: None,
            })
        })
    }
    fn allocate_quota(&self, _: QuotaInput<'_>) -> Result<(), EspError> {
        Ok(())
    }
    fn report(&self, _: RequestRecord) {}
}

// ----------------------------------------------------------------------------------------------
// The backend.
// ----------------------------------------------------------------------------------------------

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A body fed by a channel: frames go out as the test (or a task) sends them.
struct ChanBody(mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

#[derive(Default)]
struct Backend {
    hits: AtomicUsize,
    /// `/stream/{id}` waits on these between its two chunks.
    gates: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Backend {
    fn gate(&self, id: &str) -> Arc<Notify> {
        self.gates
            .lock()
            .unwrap()
            .entry(id.to_string())
            .or_default()
            .clone()
    }
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| {
            let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
            (k.to_string(), v.into_owned())
        })
        .collect()
}

/// `n` bytes of text that compresses well and is checkable.
fn text(n: usize) -> Vec<u8> {
    let pattern = b"The quick brown fox jumps over the lazy dog. ";
    pattern.iter().copied().cycle().take(n).collect()
}

async fn backend_handler(
    be: Arc<Backend>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    be.hits.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    if path == "/echo" {
        let headers: Vec<(String, String)> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let v = serde_json::json!({"uri": req.uri().to_string(), "headers": headers});
        let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r.headers_mut().insert("x-b", "backend".parse().unwrap());
        return Ok(r);
    }
    if path == "/kind" {
        // The response the query describes: n bytes of text, ct/ce/cc/etag/vary/status headers,
        // streamed without a length with chunked=1.
        let q = query(&req);
        let n: usize = q.get("n").and_then(|n| n.parse().ok()).unwrap_or(2000);
        let body = Bytes::from(text(n));
        let mut r = if q.contains_key("chunked") {
            let (tx, rx) = mpsc::channel(4);
            let half = n / 2;
            tokio::spawn(async move {
                let _ = tx.send(body.slice(..half)).await;
                let _ = tx.send(body.slice(half..)).await;
            });
            Response::new(ChanBody(rx).boxed())
        } else {
            Response::new(Full::new(body).boxed())
        };
        let h = r.headers_mut();
        h.insert(
            "content-type",
            q.get("ct").map_or("text/plain", |s| s).parse().unwrap(),
        );
        for (param, name) in [
            ("ce", "content-encoding"),
            ("cc", "cache-control"),
            ("etag", "etag"),
            ("vary", "vary"),
            ("cr", "content-range"),
        ] {
            if let Some(v) = q.get(param) {
                h.insert(name, v.parse().unwrap());
            }
        }
        if let Some(s) = q.get("status") {
            *r.status_mut() = hyper::StatusCode::from_u16(s.parse().unwrap()).unwrap();
        }
        return Ok(r);
    }
    if let Some(id) = path.strip_prefix("/stream/") {
        // First chunk at once; the second when the test opens the gate.
        let gate = be.gate(id);
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let _ = tx
                .send(Bytes::from_static(b"first chunk of the stream;"))
                .await;
            gate.notified().await;
            let _ = tx.send(Bytes::from_static(b" second chunk.")).await;
        });
        let mut r = Response::new(ChanBody(rx).boxed());
        r.headers_mut()
            .insert("content-type", "text/plain".parse().unwrap());
        return Ok(r);
    }
    if path == "/forever" {
        // Never ends: a line every few milliseconds until the proxy stops reading.
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            for i in 0u64.. {
                let line = format!("event {i}: {}\n", "data ".repeat(20));
                if tx.send(Bytes::from(line)).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        let mut r = Response::new(ChanBody(rx).boxed());
        r.headers_mut()
            .insert("content-type", "text/plain".parse().unwrap());
        return Ok(r);
    }
    Ok(Response::new(Full::new(Bytes::from_static(b"ok")).boxed()))
}

async fn start_backend() -> (SocketAddr, Arc<Backend>) {
    let be = Arc::new(Backend::default());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let b = be.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let b = b.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| backend_handler(b.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, be)
}

// ----------------------------------------------------------------------------------------------
// The proxy.
// ----------------------------------------------------------------------------------------------

struct Env {
    proxy: ProxyHandle,
    addr: SocketAddr,
    base: String,
    backend: Arc<Backend>,
    control: Arc<RecordingControl>,
    client: reqwest::Client,
    _rollouts: watch::Sender<Arc<Rollout>>,
}

/// `portico esp`'s settings from `extra` flags, then `espv2` applied to them.
async fn start(extra: &[&str], espv2: impl FnOnce(&mut Settings)) -> Env {
    let (backend_addr, backend) = start_backend().await;
    let mut args: Vec<std::ffi::OsString> = vec![
        "portico esp".into(),
        "--service=test".into(),
        "--http_port=0".into(),
        "--status_port=0".into(),
        "--worker_threads=2".into(),
        "--access_log=off".into(),
        format!("--backend=127.0.0.1:{}", backend_addr.port()).into(),
    ];
    args.extend(extra.iter().map(Into::into));
    let mut settings = portico_proxy::cli::parse(args).unwrap();
    espv2(&mut settings);
    let svc = service();
    let (tx, rx) = watch::channel(Arc::new(Rollout {
        rollout_id: svc.id.clone(),
        configs: vec![(svc, 100)],
    }));
    let control = Arc::new(RecordingControl::default());
    let proxy = server::start(
        Arc::new(settings),
        rx,
        Some(control.clone() as Arc<dyn ControlApi>),
    )
    .await
    .unwrap();
    let addr = proxy.http_addr.unwrap();
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    Env {
        proxy,
        addr,
        base: format!("http://{addr}"),
        backend,
        control,
        client,
        _rollouts: tx,
    }
}

fn header_flags(
    add_request: &[&str],
    append_request: &[&str],
    add_response: &[&str],
    append_response: &[&str],
) -> impl FnOnce(&mut Settings) {
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let flags = Espv2HeaderFlags {
        add_request_header: v(add_request),
        append_request_header: v(append_request),
        add_response_header: v(add_response),
        append_response_header: v(append_response),
    };
    move |s: &mut Settings| {
        let (rq, rs) = from_espv2_flags(&flags).unwrap();
        s.request_headers_to_add = rq;
        s.response_headers_to_add = rs;
    }
}

fn compression(s: &mut Settings) {
    s.response_compression = Some(CompressionSettings::default());
}

/// The values the backend received for `name`, in order.
fn backend_saw<'a>(v: &'a serde_json::Value, name: &str) -> Vec<&'a str> {
    v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p[0] == name)
        .map(|p| p[1].as_str().unwrap())
        .collect()
}

fn values(h: &reqwest::header::HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

/// One HTTP/1.1 exchange on a raw connection (so the client's own port is known); the whole
/// answer as text, read until the proxy closes.
async fn raw_get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {target} HTTP/1.1\r\nhost: api.example\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let local_port = s.local_addr().unwrap().port();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    (local_port, String::from_utf8_lossy(&out).into_owned())
}

fn json_body(raw: &str) -> serde_json::Value {
    let body = raw.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {raw}"))
}

// ----------------------------------------------------------------------------------------------
// Item 8: operator headers.
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn add_request_header_replaces_and_append_request_header_adds_a_value() {
    let env = start(
        &[],
        header_flags(
            &["x-a=new", "x-e=", "x-real-ip=10.1.2.3"],
            &["x-b=two"],
            &[],
            &[],
        ),
    )
    .await;
    let v: serde_json::Value = env
        .client
        .get(format!("{}/echo", env.base))
        .header("x-a", "old1")
        .header("x-a", "old2")
        .header("x-b", "one")
        .header("x-e", "kept")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(backend_saw(&v, "x-a"), ["new"]);
    assert_eq!(backend_saw(&v, "x-b"), ["one", "two"]);
    // An empty value adds nothing and removes nothing (Envoy's keep_empty_value: false).
    assert_eq!(backend_saw(&v, "x-e"), ["kept"]);
    // Applied last: over what the proxy itself sets.
    assert_eq!(backend_saw(&v, "x-real-ip"), ["10.1.2.3"]);
}

#[tokio::test]
async fn request_header_variables_render_the_connection_and_the_request() {
    let env = start(
        &[],
        header_flags(
            &[
                "x-client=%DOWNSTREAM_REMOTE_ADDRESS%",
                "x-peer-port=%DOWNSTREAM_DIRECT_REMOTE_PORT%",
                "x-local=%DOWNSTREAM_LOCAL_ADDRESS%",
                "x-proto=%PROTOCOL%",
                "x-copy=id:%REQ(x-id):4%;host:%REQ(:authority)%;100%%",
                "x-missing=%REQ(x-none)%",
            ],
            &[],
            &[],
            &[],
        ),
    )
    .await;
    let (port, raw) = raw_get(env.addr, "/echo", &[("x-id", "abcdefgh")]).await;
    let v = json_body(&raw);
    assert_eq!(backend_saw(&v, "x-client"), [format!("127.0.0.1:{port}")]);
    assert_eq!(backend_saw(&v, "x-peer-port"), [port.to_string()]);
    assert_eq!(backend_saw(&v, "x-local"), [env.addr.to_string()]);
    assert_eq!(backend_saw(&v, "x-proto"), ["HTTP/1.1"]);
    assert_eq!(backend_saw(&v, "x-copy"), ["id:abcd;host:api.example;100%"]);
    assert!(backend_saw(&v, "x-missing").is_empty());
}

#[tokio::test]
async fn response_headers_reach_every_response_the_proxys_own_errors_included() {
    let env = start(
        &[],
        header_flags(
            &[],
            &[],
            &["x-frame-options=DENY", "x-b=replaced"],
            &[
                "x-status=%RESPONSE_CODE%",
                "x-req=%REQ(x-id)%",
                "x-ct=%RESP(content-type)%",
            ],
        ),
    )
    .await;
    // A backend response, a 401 (no API key) and a 404 (unknown path): all carry them.
    for (path, status) in [("/echo", 200), ("/secret", 401), ("/nowhere", 404)] {
        let r = env
            .client
            .get(format!("{}{path}", env.base))
            .header("x-id", "r-17")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{path}");
        let h = r.headers();
        assert_eq!(values(h, "x-frame-options"), ["DENY"], "{path}");
        assert_eq!(values(h, "x-status"), [status.to_string()], "{path}");
        assert_eq!(values(h, "x-req"), ["r-17"], "{path}");
        assert_eq!(values(h, "x-ct"), ["application/json"], "{path}");
    }
    // `add` replaced the backend's own x-b.
    let r = env
        .client
        .get(format!("{}/echo", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(values(r.headers(), "x-b"), ["replaced"]);
}

#[tokio::test]
async fn append_response_header_keeps_the_backends_value() {
    let env = start(&[], header_flags(&[], &[], &[], &["x-b=proxy"])).await;
    let r = env
        .client
        .get(format!("{}/echo", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(values(r.headers(), "x-b"), ["backend", "proxy"]);
}

#[tokio::test]
async fn operation_name_header_names_the_method_and_replaces_a_forged_one() {
    let env = start(&["--underscores_in_headers"], |s: &mut Settings| {
        s.operation_name_header = Some(portico_proxy::settings::OPERATION_NAME_HEADER.clone());
    })
    .await;
    let v: serde_json::Value = env
        .client
        .get(format!("{}/echo", env.base))
        .header("X-Endpoint-API-Operation-Name", "1.hdr.Secret")
        .header("x_endpoint_api_operation_name", "1.hdr.Secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        backend_saw(&v, "x-endpoint-api-operation-name"),
        ["1.hdr.Echo"]
    );
    assert!(backend_saw(&v, "x_endpoint_api_operation_name").is_empty());

    // Without the flag the backend never sees one, even when the client sends it.
    let env = start(&[], |_: &mut Settings| {}).await;
    let v: serde_json::Value = env
        .client
        .get(format!("{}/echo", env.base))
        .header("X-Endpoint-API-Operation-Name", "1.hdr.Secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(backend_saw(&v, "x-endpoint-api-operation-name").is_empty());
}

// ----------------------------------------------------------------------------------------------
// Item 8: underscores, client addresses, client certificates.
// ----------------------------------------------------------------------------------------------

fn refuse_underscores(s: &mut Settings) {
    s.head.refuse_underscores = true;
}

#[tokio::test]
async fn a_header_name_with_an_underscore_is_refused_with_400_in_espv2s_way() {
    let env = start(&[], refuse_underscores).await;
    for client in [
        env.client.clone(),
        reqwest::Client::builder()
            .no_proxy()
            .http2_prior_knowledge()
            .build()
            .unwrap(),
    ] {
        let r = client
            .get(format!("{}/echo", env.base))
            .header("X_INTERNAL", "underscore-header")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["message"], "Bad Request", "{v}");
    }
    // Never forwarded.
    assert_eq!(env.backend.hits.load(Ordering::SeqCst), 0);
    // A request without one passes.
    let r = env
        .client
        .get(format!("{}/echo", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn underscores_in_headers_lets_them_through_and_esp_drops_them() {
    // --underscores_in_headers: forwarded, whatever the refusal setting.
    let env = start(&["--underscores_in_headers"], refuse_underscores).await;
    let v: serde_json::Value = env
        .client
        .get(format!("{}/echo", env.base))
        .header("X_INTERNAL", "underscore-header")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(backend_saw(&v, "x_internal"), ["underscore-header"]);
    // ESP (nginx): dropped, the request served.
    let env = start(&[], |_: &mut Settings| {}).await;
    let r = env
        .client
        .get(format!("{}/echo", env.base))
        .header("X_INTERNAL", "underscore-header")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(backend_saw(&v, "x_internal").is_empty());
}

/// The client address as the backend (`X-Real-IP`) and Service Control (the check's caller
/// IP) see it, and the `X-Forwarded-For` the backend receives.
async fn client_address(env: &Env, xff: &[&str]) -> (String, IpAddr, Vec<String>) {
    let mut req = env.client.get(format!("{}/secret?key=k1", env.base));
    for v in xff {
        req = req.header("x-forwarded-for", *v);
    }
    let _ = req.send().await.unwrap();
    let mut req = env.client.get(format!("{}/echo", env.base));
    for v in xff {
        req = req.header("x-forwarded-for", *v);
    }
    let v: serde_json::Value = req.send().await.unwrap().json().await.unwrap();
    let caller = *env.control.caller_ips.lock().unwrap().last().unwrap();
    (
        backend_saw(&v, "x-real-ip")[0].to_string(),
        caller,
        backend_saw(&v, "x-forwarded-for")
            .iter()
            .map(|s| s.to_string())
            .collect(),
    )
}

#[tokio::test]
async fn envoy_xff_hops_pick_the_client_by_position_and_leave_the_header_alone() {
    let env = start(&[], |s: &mut Settings| {
        s.xff_hops = Some(XffHops {
            trusted_hops: 2,
            use_remote_address: false,
        });
    })
    .await;
    // A load balancer and a mesh ingress in front: the third address from the right. What a
    // client prepends cannot reach that position.
    let (real_ip, caller, xff) =
        client_address(&env, &["6.6.6.6, 198.51.100.7", "130.211.0.5, 10.0.0.8"]).await;
    assert_eq!(real_ip, "198.51.100.7");
    assert_eq!(caller.to_string(), "198.51.100.7");
    // Forwarded as the client sent it: Envoy without use_remote_address appends nothing.
    assert_eq!(xff, ["6.6.6.6, 198.51.100.7", "130.211.0.5, 10.0.0.8"]);
    // Too short, or not an address at that position: the peer.
    for header in ["130.211.0.5, 10.0.0.8", "junk, 130.211.0.5, 10.0.0.8"] {
        let (real_ip, caller, _) = client_address(&env, &[header]).await;
        assert_eq!(
            (real_ip.as_str(), caller.to_string().as_str()),
            ("127.0.0.1", "127.0.0.1")
        );
    }
}

#[tokio::test]
async fn envoy_use_remote_address_counts_the_peer_as_a_hop_and_appends_it() {
    let env = start(&[], |s: &mut Settings| {
        s.xff_hops = Some(XffHops {
            trusted_hops: 1,
            use_remote_address: true,
        });
    })
    .await;
    let (real_ip, caller, xff) = client_address(&env, &["6.6.6.6, 198.51.100.7"]).await;
    assert_eq!(
        (real_ip.as_str(), caller.to_string().as_str()),
        ("198.51.100.7", "198.51.100.7")
    );
    assert_eq!(xff, ["6.6.6.6, 198.51.100.7, 127.0.0.1"]);
    // No trusted hop: the peer is the client whatever the header says.
    let env = start(&[], |s: &mut Settings| {
        s.xff_hops = Some(XffHops {
            trusted_hops: 0,
            use_remote_address: true,
        });
    })
    .await;
    let (real_ip, caller, _) = client_address(&env, &["198.51.100.7"]).await;
    assert_eq!(
        (real_ip.as_str(), caller.to_string().as_str()),
        ("127.0.0.1", "127.0.0.1")
    );
}

#[tokio::test]
async fn a_client_sent_forwarded_client_cert_is_removed_in_every_spelling() {
    let env = start(&["--underscores_in_headers"], |s: &mut Settings| {
        s.head.sanitize_client_cert = true;
    })
    .await;
    let v: serde_json::Value = env
        .client
        .get(format!("{}/echo", env.base))
        .header("X-Forwarded-Client-Cert", "By=spiffe://forged;Hash=00")
        .header("x_forwarded_client_cert", "By=spiffe://forged")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(backend_saw(&v, "x-forwarded-client-cert").is_empty());
    assert!(backend_saw(&v, "x_forwarded_client_cert").is_empty());
    // ESP without client certificates passes it on, as nginx does.
    let env = start(&[], |_: &mut Settings| {}).await;
    let v: serde_json::Value = env
        .client
        .get(format!("{}/echo", env.base))
        .header("X-Forwarded-Client-Cert", "By=spiffe://lb")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        backend_saw(&v, "x-forwarded-client-cert"),
        ["By=spiffe://lb"]
    );
}

// ----------------------------------------------------------------------------------------------
// Item 11: response compression, with curl.
// ----------------------------------------------------------------------------------------------

struct Curled {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Curled {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Runs curl (bounded in time); `args` before the URL.
async fn curl(url: &str, args: &[&str]) -> Curled {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    let body = dir.path().join("body");
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "15", "-D"])
            .arg(&head)
            .arg("-o")
            .arg(&body)
            .args(args)
            .arg(url)
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = std::fs::read_to_string(&head).unwrap();
    // The last response in the file (curl writes every one it saw).
    let last = head
        .split("\r\n\r\n")
        .filter(|b| b.starts_with("HTTP/"))
        .last()
        .unwrap()
        .to_string();
    let mut lines = last.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Curled {
        status,
        headers,
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

fn gunzip(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn unbrotli(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    brotli::Decompressor::new(b, 4096)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[tokio::test]
async fn curl_compressed_gets_gzip_over_http1_and_http2() {
    let env = start(&[], compression).await;
    let url = format!("{}/kind?n=5000", env.base);
    for proto in ["--http1.1", "--http2-prior-knowledge"] {
        let r = curl(&url, &[proto, "--compressed"]).await;
        assert_eq!(r.status, 200, "{proto}");
        // curl offers "deflate, gzip, br, zstd": gzip is the first Portico produces.
        assert_eq!(r.header("content-encoding"), ["gzip"], "{proto}");
        assert_eq!(r.header("vary"), ["Accept-Encoding"], "{proto}");
        assert!(r.header("content-length").is_empty(), "{proto}");
        assert_eq!(r.body, text(5000), "{proto}");
    }
}

#[tokio::test]
async fn brotli_when_the_client_prefers_it() {
    let env = start(&[], compression).await;
    let url = format!("{}/kind?n=5000&ct=application/json", env.base);
    let r = curl(&url, &["-H", "Accept-Encoding: gzip;q=0.1, br;q=0.9"]).await;
    assert_eq!(r.header("content-encoding"), ["br"]);
    assert!(r.body.len() < 1000, "{} bytes", r.body.len());
    assert_eq!(unbrotli(&r.body), text(5000));
}

#[tokio::test]
async fn accept_encoding_negotiation_with_hostile_values() {
    let env = start(&[], compression).await;
    let url = format!("{}/kind?n=3000", env.base);
    let huge = format!("{}br;q=0.2", "x-nothing;q=0.5, ".repeat(400));
    let cases: &[(&[&str], Option<&str>)] = &[
        (&["gzip"], Some("gzip")),
        (&["br, gzip"], Some("br")),
        (&["gzip;q=0"], None),
        (&["gzip;q=0, *"], Some("br")),
        (&["*"], Some("gzip")),
        (&["*;q=0"], None),
        (&["br;q=NaN"], None),
        (&["br;q=NaN, gzip;q=0.5"], Some("gzip")),
        (&["br;q=5, gzip;q=0.5"], Some("gzip")),
        (&["identity"], None),
        (&["GZIP"], Some("gzip")),
        (&["deflate", "br"], Some("br")),
        (&["br", "br;q=0"], None),
        (&[huge.as_str()], Some("br")),
        (&[""], None),
    ];
    for (accept, want) in cases {
        let mut args = Vec::new();
        for a in *accept {
            args.push("-H".to_string());
            args.push(format!("Accept-Encoding: {a}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = curl(&url, &args).await;
        let label = &accept[0][..accept[0].len().min(40)];
        assert_eq!(r.status, 200, "{label}");
        let got = r.header("content-encoding").first().map(|s| s.to_string());
        assert_eq!(got.as_deref(), *want, "{label}");
        let body = match want {
            Some("gzip") => gunzip(&r.body),
            Some("br") => unbrotli(&r.body),
            _ => r.body.clone(),
        };
        assert_eq!(body, text(3000), "{label}");
        // Compressible, so every answer tells caches it depends on Accept-Encoding.
        assert_eq!(r.header("vary"), ["Accept-Encoding"], "{label}");
    }
}

#[tokio::test]
async fn what_is_left_uncompressed() {
    let env = start(&[], compression).await;
    let gz = ["-H", "Accept-Encoding: gzip"];
    // (query, content-encoding sent, Vary: Accept-Encoding present)
    let cases: &[(&str, Option<&str>, bool)] = &[
        ("n=29", None, false),
        ("n=30", Some("gzip"), true),
        ("n=2000&ct=image/png", None, false),
        ("n=2000&ct=text/event-stream", None, false),
        ("n=2000&ct=application/grpc", None, false),
        ("n=2000&cc=public,%20no-transform", None, false),
        ("n=2000&status=206&cr=bytes%200-1999/4000", None, false),
        ("n=2000&chunked=1", Some("gzip"), true),
        (
            "n=2000&ct=application/json;%20charset=utf-8",
            Some("gzip"),
            true,
        ),
    ];
    for (q, want, vary) in cases {
        let r = curl(&format!("{}/kind?{q}", env.base), &gz).await;
        let got = r.header("content-encoding").first().map(|s| s.to_string());
        assert_eq!(got.as_deref(), *want, "{q}");
        assert_eq!(!r.header("vary").is_empty(), *vary, "{q}");
        let n: usize = q[2..].split('&').next().unwrap().parse().unwrap();
        let body = if want.is_some() {
            gunzip(&r.body)
        } else {
            r.body.clone()
        };
        assert_eq!(body, text(n), "{q}");
    }
    // Already encoded by the backend: passed on byte for byte, never encoded twice.
    let r = curl(&format!("{}/kind?n=2000&ce=gzip", env.base), &gz).await;
    assert_eq!(r.header("content-encoding"), ["gzip"]);
    assert_eq!(r.body, text(2000));
    // HEAD, 204 and 304 have no body to compress; HEAD keeps the length.
    let r = curl(
        &format!("{}/kind?n=2000", env.base),
        &["-I", "-H", "Accept-Encoding: gzip"],
    )
    .await;
    assert!(r.header("content-encoding").is_empty());
    assert_eq!(r.header("content-length"), ["2000"]);
    for status in [204, 304] {
        let r = curl(&format!("{}/kind?n=0&status={status}", env.base), &gz).await;
        assert_eq!(r.status, status);
        assert!(r.header("content-encoding").is_empty(), "{status}");
    }
    // Without Accept-Encoding: plain, and still Vary.
    let r = curl(&format!("{}/kind?n=2000", env.base), &[]).await;
    assert!(r.header("content-encoding").is_empty());
    assert_eq!(r.header("vary"), ["Accept-Encoding"]);
    assert_eq!(r.header("content-length"), ["2000"]);
}

#[tokio::test]
async fn vary_is_extended_and_a_strong_etag_dropped_when_compressing() {
    let env = start(&[], compression).await;
    let gz = ["-H", "Accept-Encoding: gzip"];
    let r = curl(
        &format!("{}/kind?n=2000&vary=Origin&etag=%22v1%22", env.base),
        &gz,
    )
    .await;
    assert_eq!(r.header("content-encoding"), ["gzip"]);
    let vary: Vec<&str> = r.header("vary");
    assert_eq!(vary.join(", "), "Origin, Accept-Encoding");
    assert!(r.header("etag").is_empty());
    let r = curl(&format!("{}/kind?n=2000&etag=W/%22v1%22", env.base), &gz).await;
    assert_eq!(r.header("etag"), ["W/\"v1\""]);
}

#[tokio::test]
async fn the_proxys_own_errors_are_compressed_too() {
    let env = start(&[], compression).await;
    let plain = curl(&format!("{}/secret", env.base), &[]).await;
    assert_eq!(plain.status, 401);
    let r = curl(
        &format!("{}/secret", env.base),
        &["-H", "Accept-Encoding: gzip"],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("content-encoding"), ["gzip"]);
    assert_eq!(gunzip(&r.body), plain.body);
}

#[tokio::test]
async fn an_operator_no_transform_header_keeps_responses_plain() {
    let env = start(&[], |s: &mut Settings| {
        compression(s);
        header_flags(&[], &[], &["cache-control=no-transform"], &[])(s);
    })
    .await;
    let r = curl(
        &format!("{}/kind?n=2000", env.base),
        &["-H", "Accept-Encoding: gzip"],
    )
    .await;
    assert!(r.header("content-encoding").is_empty());
    assert_eq!(r.body, text(2000));
}

// ----------------------------------------------------------------------------------------------
// Item 11: streaming and memory bounds.
// ----------------------------------------------------------------------------------------------

/// A streaming GET with `Accept-Encoding: <enc>` over one HTTP/1.1 connection: the response,
/// whose body the caller reads frame by frame.
async fn stream_get(addr: SocketAddr, target: &str, enc: &str) -> Response<Incoming> {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(target)
        .header("host", "api.example")
        .header("accept-encoding", enc)
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    send.send_request(req).await.unwrap()
}

/// Decodes what has arrived so far (the encoder flushes every frame, so it decodes whole).
struct Gunzip(flate2::write::GzDecoder<Vec<u8>>);

impl Gunzip {
    fn feed(&mut self, b: &[u8]) -> String {
        self.0.write_all(b).unwrap();
        self.0.flush().unwrap();
        String::from_utf8_lossy(self.0.get_ref()).into_owned()
    }
}

async fn next_data(body: &mut Incoming) -> Option<Bytes> {
    loop {
        let f = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("a frame in time")?
            .unwrap();
        if let Ok(d) = f.into_data() {
            return Some(d);
        }
    }
}

#[tokio::test]
async fn a_streamed_response_is_compressed_as_it_flows() {
    let env = start(&[], compression).await;
    let resp = stream_get(env.addr, "/stream/a", "gzip").await;
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let mut body = resp.into_body();
    let mut dec = Gunzip(flate2::write::GzDecoder::new(Vec::new()));
    // The first chunk decodes before the backend has sent the second one.
    let mut seen = String::new();
    while !seen.contains("first chunk of the stream;") {
        let d = next_data(&mut body).await.expect("the first chunk");
        seen = dec.feed(&d);
    }
    assert!(!seen.contains("second"));
    env.backend.gate("a").notify_one();
    while let Some(d) = next_data(&mut body).await {
        seen = dec.feed(&d);
    }
    assert_eq!(seen, "first chunk of the stream; second chunk.");
    // Ended as a gzip stream should (trailer checked).
    dec.0.try_finish().unwrap();
}

#[tokio::test]
async fn an_endless_stream_is_compressed_frame_by_frame_and_frees_its_encoder() {
    let env = start(&[], compression).await;
    let gate = env.proxy.state.compression.clone().unwrap();
    let resp = stream_get(env.addr, "/forever", "gzip").await;
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let mut body = resp.into_body();
    let mut dec = Gunzip(flate2::write::GzDecoder::new(Vec::new()));
    // Read until 300 events have come through, decoding as they arrive (how the bytes are cut
    // into frames on the way is the transport's business).
    let mut wire = 0usize;
    let mut plain = String::new();
    while !plain.contains("event 299: ") {
        let d = next_data(&mut body).await.expect("the stream goes on");
        wire += d.len();
        plain = dec.feed(&d);
    }
    assert!(plain.starts_with("event 0: data data "), "{}", &plain[..40]);
    assert!(
        wire < plain.len(),
        "{wire} wire bytes for {} plain",
        plain.len()
    );
    assert_eq!(gate.active(), 1);
    // The client leaves: the encoder and its place under the cap go with the response.
    drop(body);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gate.active() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "encoder still alive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn past_the_encoder_cap_responses_go_uncompressed() {
    let env = start(&[], |s: &mut Settings| {
        s.response_compression = Some(CompressionSettings {
            max_streams: 1,
            ..CompressionSettings::default()
        });
    })
    .await;
    let held = stream_get(env.addr, "/stream/cap", "gzip").await;
    assert_eq!(held.headers()["content-encoding"], "gzip");
    let r = curl(
        &format!("{}/kind?n=2000", env.base),
        &["-H", "Accept-Encoding: gzip"],
    )
    .await;
    assert!(r.header("content-encoding").is_empty());
    assert_eq!(r.header("vary"), ["Accept-Encoding"]);
    assert_eq!(r.body, text(2000));
    // The held stream ends: its place is free again.
    env.backend.gate("cap").notify_one();
    let mut body = held.into_body();
    while next_data(&mut body).await.is_some() {}
    let gate = env.proxy.state.compression.clone().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gate.active() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "encoder still alive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = curl(
        &format!("{}/kind?n=2000", env.base),
        &["-H", "Accept-Encoding: gzip"],
    )
    .await;
    assert_eq!(r.header("content-encoding"), ["gzip"]);
}
