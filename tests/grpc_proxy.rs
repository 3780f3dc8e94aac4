//! End to end: gRPC through the proxy (issue 18 item 2), with real processes and a real gRPC
//! client — Debian's python3-grpcio (tests/fixtures/grpc_client.py; messages as raw bytes,
//! encoded and decoded here with the Bookstore's prost types).
//!
//! Processes: `portico bookstore` (h2c, and TLS for `grpcs://`), the proxy in both dialects
//! (`portico esp --http2_port --backend grpc://...`, `portico espv2 --listener_port --backend
//! grpc[s]://...`), a Service Control double that records every check and report, and a JWKS
//! double. The service config is what the control plane stores for
//! examples/bookstore-grpc/bookstore.proto + a YAML with keys, JWT and a backend deadline
//! (converted here with `portico_config::grpc`, the converter `configs:submit` uses).
//!
//! One table of calls per dialect with the exact status code and message the reference
//! (shared/reference/grpc-endpoints.md §2.4, §5.3) gives for that dialect; then reports, streaming
//! timing, metadata round trips, the backend deadline and `grpcs://`.

mod common;

use base64::Engine as _;
use common::peer::{self, Action, Request};
use common::{free_port, Proc};
use portico_bookstore::proto::{Book, GetShelfRequest, ListBooksRequest, Shelf};
use portico_config::grpc::{convert, FileType, GrpcSource};
use prost::Message;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SERVICE: &str = "grpc-e2e.endpoints.e2e-proj.cloud.goog";
const PKG: &str = "endpoints.examples.bookstore.Bookstore";
const ISSUER: &str = "https://issuer.example";
const AUDIENCE: &str = "e2e-audience";
const KID: &str = "e2e-kid";
const KEY: &str = "api-key";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

// ---------------------------------------------------------------------------------------------
// The gRPC client.

/// Debian's Python with grpcio, or `None` after a loud skip (a failure on CI).
fn grpc_python(test: &str) -> Option<&'static str> {
    let python = "/usr/bin/python3";
    let ok = Command::new(python)
        .args(["-c", "import grpc"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: /usr/bin/python3 with grpcio (python3-grpcio) is required on CI");
    }
    eprintln!(
        "SKIPPED: {test}: /usr/bin/python3 with grpcio (apt-get install python3-grpcio) is absent"
    );
    None
}

/// One gRPC call for the Python client.
#[derive(Clone)]
struct Call {
    method: String,
    shape: &'static str,
    requests: Vec<Vec<u8>>,
    metadata: Vec<(String, String)>,
    gap_ms: u64,
    timeout_s: u64,
}

fn call(method: &str, request: impl Message) -> Call {
    Call {
        method: format!("/{PKG}/{method}"),
        shape: "unary",
        requests: vec![request.encode_to_vec()],
        metadata: Vec::new(),
        gap_ms: 0,
        timeout_s: 20,
    }
}

impl Call {
    fn meta(mut self, k: &str, v: &str) -> Call {
        self.metadata.push((k.to_string(), v.to_string()));
        self
    }
    fn key(self) -> Call {
        self.meta("x-api-key", KEY)
    }
    fn shape(mut self, shape: &'static str) -> Call {
        self.shape = shape;
        self
    }
}

/// What the client saw.
#[derive(Debug)]
struct Outcome {
    code: i64,
    details: String,
    initial: Vec<(String, String)>,
    trailing: Vec<(String, String)>,
    responses: Vec<Vec<u8>>,
    times: Vec<f64>,
    end: f64,
}

fn pairs(v: &Value) -> Vec<(String, String)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p[0].as_str().unwrap_or_default().to_string(),
                        p[1].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn run_calls(python: &str, port: u16, calls: &[Call]) -> Vec<Outcome> {
    let spec = json!({
        "target": format!("127.0.0.1:{port}"),
        "calls": calls.iter().map(|c| json!({
            "method": c.method,
            "shape": c.shape,
            "requests": c.requests.iter().map(|r| B64.encode(r)).collect::<Vec<_>>(),
            "metadata": c.metadata.iter().map(|(k, v)| [k, v]).collect::<Vec<_>>(),
            "gap_ms": c.gap_ms,
            "timeout": c.timeout_s,
        })).collect::<Vec<_>>(),
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/grpc_client.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(spec.to_string().as_bytes())
            .expect("write spec");
    }
    let out = child.wait_with_output().expect("python output");
    assert!(
        out.status.success(),
        "grpc client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let outcomes: Vec<Outcome> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("client json");
            Outcome {
                code: v["code"].as_i64().expect("code"),
                details: v["details"].as_str().unwrap_or_default().to_string(),
                initial: pairs(&v["initial"]),
                trailing: pairs(&v["trailing"]),
                responses: v["responses"]
                    .as_array()
                    .expect("responses")
                    .iter()
                    .map(|r| B64.decode(r.as_str().expect("b64")).expect("b64"))
                    .collect(),
                times: v["times"]
                    .as_array()
                    .expect("times")
                    .iter()
                    .map(|t| t.as_f64().expect("time"))
                    .collect(),
                end: v["end"].as_f64().expect("end"),
            }
        })
        .collect();
    assert_eq!(outcomes.len(), calls.len(), "{text}");
    outcomes
}

/// One unary call over a raw HTTP/2 connection: (status, message) from the trailers or, for a
/// trailers-only response, the headers (message percent-decoded).
fn raw_call(rt: &tokio::runtime::Runtime, port: u16, c: &Call) -> (i64, String) {
    use http_body_util::BodyExt as _;
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(conn);
        let msg = &c.requests[0];
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        framed.extend_from_slice(msg);
        let mut req = hyper::Request::post(format!("http://127.0.0.1:{port}{}", c.method))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in &c.metadata {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::from(framed)))
            .expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
            .await
            .expect("in time")
            .expect("response");
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body");
        let trailers = body.trailers().cloned().unwrap_or_default();
        let from = if trailers.contains_key("grpc-status") {
            &trailers
        } else {
            &headers
        };
        let get = |k: &str| from.get(k).and_then(|v| v.to_str().ok()).unwrap_or("");
        let message = percent_encoding::percent_decode_str(get("grpc-message"))
            .decode_utf8_lossy()
            .into_owned();
        (get("grpc-status").parse().expect("grpc-status"), message)
    })
}

// ---------------------------------------------------------------------------------------------
// Peers: Service Control and JWKS doubles, the Bookstore, the proxy.

#[derive(Default)]
struct Seen {
    checks: Vec<Value>,
    reports: Vec<Value>,
}

type Shared = Arc<Mutex<Seen>>;

fn service_control(seen: Shared) -> peer::Handler {
    Arc::new(move |req: &Request| {
        let body: Value = serde_json::from_str(&req.body).unwrap_or(Value::Null);
        if req.path.ends_with(":report") {
            seen.lock().unwrap().reports.push(body);
            return Action::Respond(200, "{}".into());
        }
        if req.path.ends_with(":allocateQuota") {
            return Action::Respond(200, json!({"operationId": "q"}).to_string());
        }
        if !req.path.ends_with(":check") {
            return Action::Respond(404, "{}".into());
        }
        let consumer = body["operation"]["consumerId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        seen.lock().unwrap().checks.push(body);
        if consumer == "api_key:invalid" {
            return Action::Respond(
                200,
                json!({"operationId": "c", "checkErrors": [{"code": "API_KEY_INVALID"}]})
                    .to_string(),
            );
        }
        Action::Respond(200, json!({"operationId": "c"}).to_string())
    })
}

use common::espv2::Signer;

fn signer() -> Signer {
    common::espv2::signer(KID)
}

fn token(s: &Signer, aud: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some(KID.to_string());
    let claims = json!({"iss": ISSUER, "sub": "reader", "aud": aud, "iat": now, "exp": now + 3600});
    jsonwebtoken::encode(&h, &claims, &s.key).expect("sign")
}

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bookstore-grpc")
}

/// The stored service config for the Bookstore with keys on every method, a JWT on
/// ListShelves and a 1 s backend deadline.
fn service_config(jwks: SocketAddr) -> Value {
    service_config_with_backend(jwks, None)
}

/// [`service_config`] whose backend rule also names an address.
fn service_config_with_backend(jwks: SocketAddr, address: Option<&str>) -> Value {
    let address = address.map_or(String::new(), |a| format!("\n    address: {a}"));
    let mut c = protox::Compiler::new([example_dir()]).expect("compiler");
    c.include_imports(true).include_source_info(true);
    c.open_files(["bookstore.proto"]).expect("compile");
    let set = c.encode_file_descriptor_set();
    let yaml = format!(
        "type: google.api.Service
config_version: 3
name: {SERVICE}
title: Bookstore through the proxy
apis:
- name: {PKG}
backend:
  rules:
  - selector: '*'
    deadline: 1{address}
authentication:
  providers:
  - id: e2e
    issuer: {ISSUER}
    jwks_uri: http://{jwks}/jwks
    audiences: {AUDIENCE}
  rules:
  - selector: {PKG}.ListShelves
    requirements:
    - provider_id: e2e
usage:
  rules:
  - selector: {PKG}.ListShelves
    allow_unregistered_calls: true
"
    );
    let conv = convert(&[
        GrpcSource::new(FileType::FileDescriptorSetProto, "api_descriptor.pb", set),
        GrpcSource::new(FileType::ServiceConfigYaml, "api_config.yaml", yaml),
    ])
    .expect("convert");
    let mut v = serde_json::to_value(&conv.service).expect("service json");
    v["id"] = "2026-12-06r0".into();
    v
}

/// `portico bookstore` on a free port (TLS when given a cert and key).
fn bookstore(dir: &Path, name: &str, tls: Option<(&Path, &Path)>) -> (Proc, u16) {
    let port = free_port();
    let mut args = vec!["bookstore".to_string(), format!("--port={port}")];
    if let Some((cert, key)) = tls {
        args.push(format!("--tls-cert={}", cert.display()));
        args.push(format!("--tls-key={}", key.display()));
    }
    let mut p = Proc::spawn(&args, &dir.join(format!("{name}.log")));
    p.wait_for_port(port, name);
    (p, port)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Dialect {
    Esp,
    Espv2,
}

fn proxy(
    dialect: Dialect,
    dir: &Path,
    name: &str,
    config: &Path,
    backend: &str,
    sc: SocketAddr,
    extra: &[String],
) -> (Proc, u16) {
    let port = free_port();
    let key = common::espv2::service_account_key(dir);
    let mut args: Vec<String> = match dialect {
        Dialect::Esp => vec![
            "esp".into(),
            format!("--http_port={}", free_port()),
            format!("--http2_port={port}"),
            format!("--status_port={}", free_port()),
            format!("--service_control_url_override=http://{sc}"),
        ],
        Dialect::Espv2 => vec![
            "espv2".into(),
            format!("--listener_port={port}"),
            format!("--service_control_url=http://{sc}"),
        ],
    };
    args.extend([
        format!("--service_json_path={}", config.display()),
        format!("--backend={backend}"),
        "--non_gcp".into(),
        format!("--service_account_key={}", key.display()),
    ]);
    args.extend(extra.iter().cloned());
    let mut p = Proc::spawn(&args, &dir.join(format!("{name}.log")));
    p.wait_for_port(port, name);
    (p, port)
}

// ---------------------------------------------------------------------------------------------
// The table.

fn shelf(o: &Outcome) -> Shelf {
    Shelf::decode(&o.responses[0][..]).expect("a Shelf")
}

/// Percent-decodes nothing: grpcio hands `details` over decoded already.
fn espv2_json(status: u16, message: &str) -> String {
    json!({"code": status, "message": message}).to_string()
}

struct Row {
    what: &'static str,
    /// Sent with the raw HTTP/2 client instead of grpcio: grpcio reports a status code it does
    /// not know as UNKNOWN without the number.
    raw: bool,
    call: Call,
    esp: (i64, String),
    espv2: (i64, String),
}

fn rows(good_token: &str, wrong_aud_token: &str) -> Vec<Row> {
    let unregistered = "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.";
    let long = "m".repeat(3000);
    vec![
        Row {
            raw: false,
            what: "case 1: GetShelf with a key",
            call: call("GetShelf", GetShelfRequest { shelf: 100 }).key(),
            esp: (0, String::new()),
            espv2: (0, String::new()),
        },
        Row {
            raw: false,
            what: "the API key in the query of the gRPC path",
            call: Call {
                method: format!("/{PKG}/GetShelf?key={KEY}"),
                ..call("GetShelf", GetShelfRequest { shelf: 100 })
            },
            esp: (0, String::new()),
            espv2: (0, String::new()),
        },
        Row {
            raw: false,
            what: "case 4: the backend's NotFound passes through",
            call: call("GetShelf", GetShelfRequest { shelf: -1 }).key(),
            esp: (5, "Unable to find shelf -1".into()),
            espv2: (5, "Unable to find shelf -1".into()),
        },
        Row {
            raw: true,
            what: "case 5: a non-canonical code passes through",
            call: call("ReturnBadStatus", ()).key(),
            esp: (74, "bad status".into()),
            espv2: (74, "bad status".into()),
        },
        Row {
            raw: false,
            what: "a long backend message passes through whole",
            call: call("GetShelf", GetShelfRequest { shelf: 100 })
                .key()
                .meta("x-bookstore-fail", "13")
                .meta("x-bookstore-fail-message", &long),
            esp: (13, long.clone()),
            espv2: (13, long.clone()),
        },
        Row {
            raw: false,
            what: "no API key",
            call: call("GetShelf", GetShelfRequest { shelf: 100 }),
            esp: (16, unregistered.into()),
            espv2: (
                16,
                espv2_json(401, &format!("UNAUTHENTICATED: {unregistered}")),
            ),
        },
        Row {
            raw: false,
            what: "an invalid API key",
            call: call("GetShelf", GetShelfRequest { shelf: 100 }).meta("x-api-key", "invalid"),
            esp: (3, "API key not valid. Please pass a valid API key.".into()),
            espv2: (
                13,
                espv2_json(
                    400,
                    "INVALID_ARGUMENT: API key not valid. Please pass a valid API key.",
                ),
            ),
        },
        Row {
            raw: false,
            what: "case 6: no JWT",
            call: call("ListShelves", ()),
            esp: (
                16,
                "JWT validation failed: Missing or invalid credentials".into(),
            ),
            espv2: (16, espv2_json(401, "Jwt is missing")),
        },
        Row {
            raw: false,
            what: "case 7: a JWT for another audience",
            call: call("ListShelves", ())
                .meta("authorization", &format!("Bearer {wrong_aud_token}")),
            esp: (7, "JWT validation failed: Audience not allowed".into()),
            espv2: (7, espv2_json(403, "Audiences in Jwt are not allowed")),
        },
        Row {
            raw: false,
            what: "a good JWT",
            call: call("ListShelves", ()).meta("authorization", &format!("Bearer {good_token}")),
            esp: (0, String::new()),
            espv2: (0, String::new()),
        },
        Row {
            raw: false,
            what: "a method the service does not have",
            call: Call {
                method: format!("/{PKG}/NoSuchMethod"),
                ..call("GetShelf", GetShelfRequest { shelf: 100 }).key()
            },
            esp: (5, "Method does not exist.".into()),
            espv2: (
                12,
                espv2_json(404, "The current request is not defined by this API."),
            ),
        },
    ]
}

#[test]
fn grpc_through_both_dialects() {
    let Some(Harness {
        python,
        dir,
        rt,
        seen,
        sc,
        ..
    }) = harness("grpc_through_both_dialects")
    else {
        return;
    };
    let signer = signer();
    let jwks_doc = json!({"keys": [signer.jwk.clone()]}).to_string();
    let jwks = peer::start(
        &rt,
        Arc::new(move |r: &Request| match r.path.as_str() {
            "/jwks" => Action::Respond(200, jwks_doc.clone()),
            _ => Action::Respond(404, "{}".into()),
        }),
    );
    let config = dir.path().join("service.json");
    std::fs::write(&config, service_config(jwks).to_string()).expect("config");
    let (books, books_port) = bookstore(dir.path(), "bookstore", None);
    let backend = format!("grpc://127.0.0.1:{books_port}");

    let good = token(&signer, AUDIENCE);
    let wrong = token(&signer, "someone-else");
    for dialect in [Dialect::Esp, Dialect::Espv2] {
        let name = format!("{dialect:?}").to_lowercase();
        let (p, port) = proxy(dialect, dir.path(), &name, &config, &backend, sc, &[]);
        let table = rows(&good, &wrong);
        let calls: Vec<Call> = table.iter().map(|r| r.call.clone()).collect();
        let got = run_calls(python, port, &calls);
        for (row, o) in table.iter().zip(&got) {
            let want = match dialect {
                Dialect::Esp => &row.esp,
                Dialect::Espv2 => &row.espv2,
            };
            let seen = if row.raw {
                raw_call(&rt, port, &row.call)
            } else {
                (o.code, o.details.clone())
            };
            assert_eq!(
                (seen.0, &seen.1),
                (want.0, &want.1),
                "{dialect:?}: {}\nproxy log:\n{}\nbookstore log:\n{}",
                row.what,
                p.log(),
                books.log()
            );
        }
        assert_eq!(shelf(&got[0]).theme, "Kids");

        streams_metadata_and_reports(python, dialect, port, &seen, &p, &good);
        drop(p);
    }

    // grpcs://: the Bookstore on TLS with a certificate made now, trusted by the proxy.
    let (cert, key) = localhost_cert(dir.path());
    let (tls_books, tls_port) = bookstore(dir.path(), "bookstore-tls", Some((&cert, &key)));
    espv2_over_tls(
        python,
        dir.path(),
        "espv2-grpcs",
        &config,
        &format!("grpcs://localhost:{tls_port}"),
        sc,
        &cert,
    );
    drop(tls_books);
    drop(books);
}

/// `portico espv2` trusting `cert` answers GetShelf from the TLS Bookstore (a shelf, then
/// NotFound passed through); one without that trust fails the call with 14, never sending it
/// in plain text.
fn espv2_over_tls(
    python: &str,
    dir: &Path,
    name: &str,
    config: &Path,
    backend: &str,
    sc: SocketAddr,
    cert: &Path,
) {
    let calls = [
        call("GetShelf", GetShelfRequest { shelf: 200 }).key(),
        call("GetShelf", GetShelfRequest { shelf: -1 }).key(),
    ];
    let trust = format!("--ssl_backend_client_root_certs_file={}", cert.display());
    let (p, port) = proxy(Dialect::Espv2, dir, name, config, backend, sc, &[trust]);
    let got = run_calls(python, port, &calls);
    assert_eq!(got[0].code, 0, "{:?}\n{}", got[0], p.log());
    assert_eq!(shelf(&got[0]).theme, "Classic");
    assert_eq!(
        (got[1].code, got[1].details.as_str()),
        (5, "Unable to find shelf -1")
    );
    let untrusted = format!("{name}-untrusted");
    let (untrusting, port2) = proxy(Dialect::Espv2, dir, &untrusted, config, backend, sc, &[]);
    let got = run_calls(python, port2, &calls[..1]);
    assert_eq!(got[0].code, 14, "{:?}\n{}", got[0], untrusting.log());
}

// ---------------------------------------------------------------------------------------------
// Streams, metadata and reports.

fn book(id: i64, title: &str) -> Book {
    Book {
        id,
        title: title.to_string(),
        ..Default::default()
    }
}

/// Every operation of every report so far.
fn report_ops(seen: &Shared) -> Vec<Value> {
    seen.lock()
        .unwrap()
        .reports
        .iter()
        .flat_map(|r| r["operations"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// The reported operations of `method`, waiting up to 20 s for `n` of them.
fn wait_ops(seen: &Shared, method: &str, n: usize, log: &dyn Fn() -> String) -> Vec<Value> {
    let name = format!("{PKG}.{method}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ops: Vec<Value> = report_ops(seen)
            .into_iter()
            .filter(|o| o["operationName"] == name.as_str())
            .collect();
        if ops.len() >= n {
            return ops;
        }
        assert!(
            Instant::now() < deadline,
            "no report of {name}: {:?}\n{}",
            report_ops(seen),
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metric<'v>(op: &'v Value, name: &str) -> Option<&'v Value> {
    op["metricValueSets"]
        .as_array()?
        .iter()
        .find(|m| m["metricName"] == name)
        .map(|m| &m["metricValues"][0])
}

fn log_field<'v>(op: &'v Value, dialect: Dialect, field: &str) -> &'v Value {
    let entry = &op["logEntries"][0];
    match (dialect, field) {
        (Dialect::Espv2, "url") => &entry["httpRequest"]["requestUrl"],
        (Dialect::Espv2, "http_method") => &entry["httpRequest"]["requestMethod"],
        _ => &entry["structPayload"][field],
    }
}

fn streams_metadata_and_reports(
    python: &str,
    dialect: Dialect,
    port: u16,
    seen: &Shared,
    proxy: &Proc,
    good_token: &str,
) {
    let log = || proxy.log();
    let creates: Vec<Call> = (0..3)
        .map(|i| {
            call(
                "CreateBook",
                portico_bookstore::proto::CreateBookRequest {
                    shelf: 100,
                    book: Some(book(0, &format!("s{i}"))),
                },
            )
            .key()
        })
        .collect();
    let mut calls = creates;
    // Server streaming, 400 ms between messages: the first must arrive long before the end.
    calls.push(
        call("StreamBooks", ListBooksRequest { shelf: 100 })
            .key()
            .meta("x-bookstore-stream-delay-ms", "400")
            .shape("server"),
    );
    // Client streaming for longer than the 1 s backend deadline: streams have none.
    let mut bulk = call(
        "BulkCreateShelf",
        portico_bookstore::proto::CreateShelfRequest::default(),
    )
    .key()
    .shape("client");
    bulk.requests = (0..10)
        .map(|i| {
            portico_bookstore::proto::CreateShelfRequest {
                shelf: Some(Shelf {
                    theme: format!("t{i}"),
                    ..Default::default()
                }),
            }
            .encode_to_vec()
        })
        .collect();
    bulk.gap_ms = 150;
    calls.push(bulk);
    // Case 24: a 10-message bidirectional stream.
    let mut echo = call("EchoBooks", book(0, "")).key().shape("bidi");
    echo.requests = (1..=10).map(|i| book(i, "e").encode_to_vec()).collect();
    calls.push(echo);
    // Case 25: text and -bin metadata, echoed as initial and trailing metadata.
    let bin = B64.encode([0u8, 1, 2, 255]);
    calls.push(
        call("GetShelf", GetShelfRequest { shelf: 100 })
            .key()
            .meta("x-bookstore-echo-metadata", "x-text, x-data-bin")
            .meta("x-text", "hello")
            .meta("x-data-bin", &bin),
    );
    // The verified caller reaches the backend as x-endpoint-api-userinfo.
    calls.push(
        call("ListShelves", ())
            .meta("authorization", &format!("Bearer {good_token}"))
            .meta("x-bookstore-echo-metadata", "x-endpoint-api-userinfo"),
    );
    let got = run_calls(python, port, &calls);
    for (i, o) in got.iter().enumerate() {
        assert_eq!(o.code, 0, "{dialect:?} call {i}: {o:?}\n{}", log());
    }
    let stream = &got[3];
    // The books of shelf 100: the three just created (and those of an earlier dialect's run).
    assert!(stream.responses.len() >= 3, "{stream:?}");
    assert!(
        stream.times[0] + 0.6 < stream.end,
        "{dialect:?}: the first message waited for the stream's end: {stream:?}"
    );
    let bulk = portico_bookstore::proto::ListShelvesResponse::decode(&got[4].responses[0][..])
        .expect("ListShelvesResponse");
    assert_eq!(bulk.shelves.len(), 10);
    assert!(got[4].end > 1.3, "{:?}", got[4]);
    let echoed: Vec<i64> = got[5]
        .responses
        .iter()
        .map(|r| Book::decode(&r[..]).expect("Book").id)
        .collect();
    assert_eq!(echoed, (1..=10).collect::<Vec<_>>());
    let meta = &got[6];
    for side in [&meta.initial, &meta.trailing] {
        assert!(
            side.contains(&("x-text".into(), "hello".into())),
            "{dialect:?}: {meta:?}"
        );
        assert!(
            side.contains(&("x-data-bin".into(), bin.clone())),
            "{dialect:?}: {meta:?}"
        );
    }
    let userinfo = got[7]
        .initial
        .iter()
        .find(|(k, _)| k == "x-endpoint-api-userinfo")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("{dialect:?}: no userinfo reached the backend: {:?}", got[7]));
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(userinfo.trim_end_matches('='))
        .expect("userinfo is URL-safe base64");
    let info: Value = serde_json::from_slice(&decoded).expect("userinfo JSON");
    // ESP v1 sends its own summary of the claims, ESPv2 the token's payload.
    let issuer_field = match dialect {
        Dialect::Esp => "issuer",
        Dialect::Espv2 => "iss",
    };
    assert_eq!(info[issuer_field], ISSUER, "{info}");
    // ESP v1 pads its base64, ESPv2 does not.
    assert_eq!(
        userinfo.ends_with('='),
        dialect == Dialect::Esp && decoded.len() % 3 != 0
    );

    // Checks and reports carry the gRPC call's facts.
    let ops = wait_ops(seen, "EchoBooks", 1, &log);
    let op = &ops[0];
    assert_eq!(op["labels"]["/protocol"], "grpc", "{op}");
    assert_eq!(
        log_field(op, dialect, "url"),
        &format!("/{PKG}/EchoBooks"),
        "{op}"
    );
    assert_eq!(log_field(op, dialect, "http_method"), "POST", "{op}");
    // Case 24: one Check and one reported operation for the whole 10-message stream.
    assert_eq!(ops.len(), 1, "{ops:?}");
    let checks: Vec<Value> = seen
        .lock()
        .unwrap()
        .checks
        .iter()
        .filter(|c| c["operation"]["operationName"] == format!("{PKG}.EchoBooks").as_str())
        .cloned()
        .collect();
    assert_eq!(checks.len(), 1, "{checks:?}");
    let check = &checks[0];
    assert_eq!(check["operation"]["consumerId"], format!("api_key:{KEY}"));
    match dialect {
        Dialect::Esp => {
            for side in ["producer", "consumer"] {
                for m in [
                    "streaming_request_message_counts",
                    "streaming_response_message_counts",
                ] {
                    let name = format!("serviceruntime.googleapis.com/api/{side}/{m}");
                    let d = &metric(op, &name).unwrap_or_else(|| panic!("{name}: {op}"))
                        ["distributionValue"];
                    assert_eq!(
                        (d["minimum"].as_f64(), d["maximum"].as_f64()),
                        (Some(10.0), Some(10.0)),
                        "{name}: {op}"
                    );
                }
                let name = format!("serviceruntime.googleapis.com/api/{side}/streaming_durations");
                assert!(metric(op, &name).is_some(), "{name}: {op}");
            }
            // Unary calls have no streaming metrics.
            let unary = &wait_ops(seen, "GetShelf", 1, &log)[0];
            assert!(metric(
                unary,
                "serviceruntime.googleapis.com/api/producer/streaming_durations"
            )
            .is_none());
        }
        Dialect::Espv2 => {
            assert_eq!(log_field(op, dialect, "grpc_status_code"), "OK", "{op}");
            assert!(
                metric(
                    op,
                    "serviceruntime.googleapis.com/api/producer/streaming_durations"
                )
                .is_none(),
                "{op}"
            );
            // Case 4: NotFound is reported as 404; case 5: code 74 keeps HTTP 200.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let all = report_ops(seen);
                let find = |code: &str, grpc: &str| {
                    all.iter().any(|o| {
                        o["labels"]["/response_code"] == code
                            && o["logEntries"].as_array().is_some_and(|es| {
                                es.iter()
                                    .any(|e| e["structPayload"]["grpc_status_code"] == grpc)
                            })
                    })
                };
                if find("404", "NotFound") && find("200", "74") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "no 404/NotFound or 200/74 report: {all:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    seen.lock().unwrap().reports.clear();
    seen.lock().unwrap().checks.clear();
}

// ---------------------------------------------------------------------------------------------
// What the tests below share.

/// A test's client, directory and Service Control double.
struct Harness {
    python: &'static str,
    dir: tempfile::TempDir,
    /// Runs the doubles; kept alive for the test.
    rt: tokio::runtime::Runtime,
    seen: Shared,
    sc: SocketAddr,
    /// For configs whose calls need no JWT: nothing listens there.
    unused_jwks: SocketAddr,
}

/// `None` after a loud skip when grpcio is absent.
fn harness(test: &str) -> Option<Harness> {
    let python = grpc_python(test)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let seen: Shared = Arc::new(Mutex::new(Seen::default()));
    let sc = peer::start(&rt, service_control(seen.clone()));
    Some(Harness {
        python,
        dir: tempfile::tempdir().expect("tempdir"),
        rt,
        seen,
        sc,
        unused_jwks: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
    })
}

/// A self-signed certificate for `localhost`, made now: (certificate, key) files.
fn localhost_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let cert = dir.join("books.crt");
    let key = dir.join("books.key");
    std::fs::write(&cert, ck.cert.pem()).expect("cert file");
    std::fs::write(&key, ck.key_pair.serialize_pem()).expect("key file");
    (cert, key)
}

// ---------------------------------------------------------------------------------------------
// ESP v1's intermediate reports for long streams.

fn has_label(op: &Value, label: &str) -> bool {
    op["labels"].get(label).is_some()
}

fn int_metric(op: &Value, name: &str) -> Option<i64> {
    metric(op, name).map(|v| {
        v["int64Value"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .or_else(|| v["int64Value"].as_i64())
            .unwrap_or_else(|| panic!("{name} is not an int64: {v}"))
    })
}

/// `portico esp` with `intermediate_report_min_interval: 1` (from `--server_config_template`,
/// as ESP's grpc_long_streaming.t sets it): a bidi stream of about 3 s is reported while it
/// runs — the first intermediate report with `request_count`, each with the bytes moved since
/// the last, none with a response code or a log entry — then once more at its end without
/// `request_count`; a short stream gets one report; the stream's messages arrive paced by the
/// backend, not held for the reports.
#[test]
fn esp_reports_long_streams_in_parts() {
    let Some(Harness {
        python,
        dir,
        rt: _rt,
        seen,
        sc,
        unused_jwks,
    }) = harness("esp_reports_long_streams_in_parts")
    else {
        return;
    };
    let config = dir.path().join("service.json");
    std::fs::write(&config, service_config(unused_jwks).to_string()).expect("config");
    let template = dir.path().join("server_config.pb.txt");
    std::fs::write(
        &template,
        "service_control_config {\n  report_aggregator_config {\n    cache_entries: 0\n  }\n  intermediate_report_min_interval: 1\n}\n",
    )
    .expect("server config");
    let (books, books_port) = bookstore(dir.path(), "bookstore", None);
    let (p, port) = proxy(
        Dialect::Esp,
        dir.path(),
        "esp-long-streams",
        &config,
        &format!("grpc://127.0.0.1:{books_port}"),
        sc,
        &[format!("--server_config_template={}", template.display())],
    );
    let log = || format!("proxy:\n{}\nbookstore:\n{}", p.log(), books.log());

    // Short first: its report must be whole, with nothing after it.
    let short = call("StreamBooks", ListBooksRequest { shelf: 100 })
        .key()
        .shape("server");
    // 8 echoes, the backend pausing 400 ms after each: about 3.2 s.
    let mut long = call("EchoBooks", book(0, ""))
        .key()
        .shape("bidi")
        .meta("x-bookstore-stream-delay-ms", "400");
    long.requests = (1..=8).map(|i| book(i, "long").encode_to_vec()).collect();
    let got = run_calls(python, port, &[short, long]);
    for o in &got {
        assert_eq!(o.code, 0, "{o:?}\n{}", log());
    }
    let long = &got[1];
    assert_eq!(long.responses.len(), 8, "{long:?}");
    // Each message arrives as the backend sends it, one about every 400 ms, none held back
    // while a report is made.
    assert!(long.times[0] < 0.8, "{long:?}");
    for w in long.times.windows(2) {
        assert!(w[1] - w[0] < 0.9, "a message was held back: {long:?}");
    }
    assert!(long.end > 2.8, "{long:?}");

    // The final report is the one with a response code.
    let deadline = Instant::now() + Duration::from_secs(20);
    let ops = loop {
        let ops = wait_ops(&seen, "EchoBooks", 1, &log);
        if ops.iter().any(|o| has_label(o, "/response_code")) {
            break ops;
        }
        assert!(Instant::now() < deadline, "no final report: {ops:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let (finals, parts): (Vec<&Value>, Vec<&Value>) =
        ops.iter().partition(|o| has_label(o, "/response_code"));
    assert_eq!(finals.len(), 1, "{ops:?}");
    assert!(!parts.is_empty(), "no intermediate report: {ops:?}");
    let fin = finals[0];
    let m = |side: &str, name: &str| format!("serviceruntime.googleapis.com/api/{side}/{name}");
    for side in ["producer", "consumer"] {
        // request_count once, in the first intermediate report.
        let counts: i64 = parts
            .iter()
            .filter_map(|o| int_metric(o, &m(side, "request_count")))
            .sum();
        assert_eq!(counts, 1, "{side}: {parts:?}");
        assert_eq!(int_metric(fin, &m(side, "request_count")), None, "{fin}");
        for o in &parts {
            assert_eq!(o["labels"]["/protocol"], "grpc", "{o}");
            assert_eq!(
                o["labels"]["/credential_id"],
                format!("apikey:{KEY}"),
                "{o}"
            );
            for label in ["/response_code_class", "/status_code", "/error_type"] {
                assert!(!has_label(o, label), "{label} in {o}");
            }
            assert!(
                o["logEntries"].as_array().is_none_or(|e| e.is_empty()),
                "{o}"
            );
            for name in [
                "request_sizes",
                "response_sizes",
                "total_latencies",
                "streaming_durations",
                "streaming_response_message_counts",
                "error_count",
            ] {
                assert!(metric(o, &m(side, name)).is_none(), "{name} in {o}");
            }
        }
        // Bytes moved while the stream ran, then the rest in the final report: together the
        // call's response size.
        let streamed: i64 = parts
            .iter()
            .filter_map(|o| int_metric(o, &m(side, "response_bytes")))
            .sum();
        assert!(streamed > 0, "{side}: {parts:?}");
        let rest = int_metric(fin, &m(side, "response_bytes")).expect("final response_bytes");
        assert!(rest > 0, "{fin}");
        let size = metric(fin, &m(side, "response_sizes")).expect("response_sizes")
            ["distributionValue"]["mean"]
            .as_f64()
            .expect("mean");
        assert_eq!((streamed + rest) as f64, size, "{side}: {parts:?}\n{fin}");
        let d = &metric(fin, &m(side, "streaming_response_message_counts"))
            .expect("message counts")["distributionValue"];
        assert_eq!(d["maximum"].as_f64(), Some(8.0), "{fin}");
    }
    assert_eq!(fin["labels"]["/response_code"], "200", "{fin}");
    assert_eq!(fin["labels"]["/response_code_class"], "2xx", "{fin}");
    assert_eq!(fin["logEntries"].as_array().map(Vec::len), Some(1), "{fin}");

    // The short stream: one whole report.
    let short = wait_ops(&seen, "StreamBooks", 1, &log);
    assert_eq!(short.len(), 1, "{short:?}");
    assert_eq!(short[0]["labels"]["/response_code"], "200", "{short:?}");
    assert_eq!(
        int_metric(
            &short[0],
            "serviceruntime.googleapis.com/api/producer/request_count"
        ),
        Some(1)
    );
}

// ---------------------------------------------------------------------------------------------
// `grpcs://` in backend rules.

/// A backend rule whose address is `grpcs://`: ESPv2 calls it over TLS (ALPN h2) with the
/// trust `--backend=grpcs://` has, an untrusted certificate failing the call with status 14;
/// ESP v1 does not use rule addresses for gRPC (start_esp's
/// `grpc_pass ... override`), so `portico esp` calls `--backend`.
#[test]
fn grpcs_backend_rules() {
    let Some(Harness {
        python,
        dir,
        rt: _rt,
        sc,
        unused_jwks,
        ..
    }) = harness("grpcs_backend_rules")
    else {
        return;
    };
    let (cert, key) = localhost_cert(dir.path());
    let (tls_books, tls_port) = bookstore(dir.path(), "bookstore-tls", Some((&cert, &key)));
    let config = dir.path().join("service.json");
    std::fs::write(
        &config,
        service_config_with_backend(unused_jwks, Some(&format!("grpcs://localhost:{tls_port}")))
            .to_string(),
    )
    .expect("config");
    // Nothing listens at --backend: an answer can only come from the rule's address.
    let nowhere = format!("grpc://127.0.0.1:{}", free_port());
    espv2_over_tls(
        python,
        dir.path(),
        "espv2-rule-grpcs",
        &config,
        &nowhere,
        sc,
        &cert,
    );

    // ESP v1: the rule's address is not used for gRPC; --backend answers.
    let (books, books_port) = bookstore(dir.path(), "bookstore", None);
    let (esp, port3) = proxy(
        Dialect::Esp,
        dir.path(),
        "esp-rule-grpcs",
        &config,
        &format!("grpc://127.0.0.1:{books_port}"),
        sc,
        &[format!("--backend_ca_cert_path={}", cert.display())],
    );
    // Nor does ESP v1 add nginx's forwarding headers for a gRPC backend: start_esp sets them
    // only in its proxy_pass locations, not with grpc_pass.
    let forwarding = ["x-forwarded-for", "x-real-ip", "x-google-real-ip"];
    let got = run_calls(
        python,
        port3,
        &[call("GetShelf", GetShelfRequest { shelf: 200 })
            .key()
            .meta("x-bookstore-echo-metadata", &forwarding.join(", "))],
    );
    assert_eq!(got[0].code, 0, "{:?}\n{}", got[0], esp.log());
    assert_eq!(shelf(&got[0]).theme, "Classic");
    assert!(
        !got[0]
            .initial
            .iter()
            .any(|(k, _)| forwarding.contains(&k.as_str())),
        "{:?}",
        got[0].initial
    );
    drop((esp, books, tls_books));
}
