//! End to end: HTTP/JSON transcoding and gRPC-Web through `portico espv2` to the Bookstore
//! (`portico bookstore`), with curl as the client — the transcoding and gRPC-Web cases of
//! shared/reference/grpc-endpoints.md §5.3 (2, 3, 8–23, adapted where ESPv2's test service
//! differs from the sample) as one table, then the Service Control reports of a transcoded and
//! a gRPC-Web call.
//!
//! The proxy and the Bookstore are the real binary; Service Control is a double on a loopback
//! port (tests/common/peer.rs) that accepts the key `api-key` and records every operation.
//! The service config is what the control plane stores for the sample: the descriptor set
//! (compiled with protox) and api_config.yaml plus the HTTP rules of ESPv2's test variant,
//! converted by `portico_config::grpc::convert`.

mod common;

use base64::Engine;
use common::bookstore::get_shelf_request;
use common::espv2::body as espv2_body;
use common::peer::{self, Action, Request};
use common::{free_port, Proc};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PKG: &str = "endpoints.examples.bookstore.Bookstore";

/// ESPv2's test config's HTTP rules for GetShelf and ListBooks, next to the sample's.
const HTTP_YAML: &str = r#"
type: google.api.Service
config_version: 3
name: bookstore.endpoints.demo-proj.cloud.goog
http:
  rules:
  - selector: endpoints.examples.bookstore.Bookstore.GetShelf
    get: /v1/shelves/{shelf=*}
    additional_bindings:
    - get: /v1/fixedshelves/{shelf=100}
  - selector: endpoints.examples.bookstore.Bookstore.ListBooks
    get: /v1/shelves/{shelf}/books
    additional_bindings:
    - get: /v1/custom/shelves/{shelf}/custom/books
"#;

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bookstore-grpc")
}

fn service_json(dir: &Path) -> PathBuf {
    use portico_config::grpc::{convert, FileType, GrpcSource};
    let mut c = protox::Compiler::new([example_dir()]).expect("protox");
    c.include_imports(true).include_source_info(true);
    c.open_files(["bookstore.proto"]).expect("compile");
    let set = c.encode_file_descriptor_set();
    let yaml = std::fs::read(example_dir().join("api_config.yaml")).expect("yaml");
    let files = [
        GrpcSource::new(FileType::FileDescriptorSetProto, "api_descriptor.pb", set),
        GrpcSource::new(FileType::ServiceConfigYaml, "api_config.yaml", yaml),
        GrpcSource::new(
            FileType::ServiceConfigYaml,
            "api_config_http.yaml",
            HTTP_YAML.as_bytes().to_vec(),
        ),
    ];
    let mut service = convert(&files).expect("convert").service;
    service.id = "2026-12-06r0".into();
    let path = dir.join("service.json");
    std::fs::write(&path, serde_json::to_string(&service).expect("json")).expect("write");
    path
}

#[derive(Default)]
struct Seen {
    operations: Vec<Value>,
}

fn service_control(seen: Arc<Mutex<Seen>>) -> peer::Handler {
    Arc::new(move |req: &Request| {
        if req.path.ends_with(":report") {
            let body: Value = serde_json::from_str(&req.body).unwrap_or(Value::Null);
            let ops = body["operations"].as_array().cloned().unwrap_or_default();
            seen.lock().unwrap().operations.extend(ops);
            return Action::Respond(200, "{}".into());
        }
        if req.path.ends_with(":allocateQuota") {
            return Action::Respond(200, json!({"operationId": "q"}).to_string());
        }
        if req.body.contains("api_key:api-key") || !req.body.contains("api_key:") {
            return Action::Respond(200, json!({"operationId": "c"}).to_string());
        }
        Action::Respond(
            200,
            json!({"operationId": "c", "checkErrors": [{"code": "API_KEY_INVALID"}]}).to_string(),
        )
    })
}

/// `portico bookstore --port 0`, and the port it printed.
fn start_bookstore(dir: &Path) -> (Proc, u16) {
    let p = Proc::spawn(&["bookstore", "--port", "0"], &dir.join("bookstore.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = p.log();
        if let Some(rest) = log.split("listening on grpc://127.0.0.1:").nth(1) {
            let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(port) = port.parse() {
                return (p, port);
            }
        }
        assert!(Instant::now() < deadline, "bookstore did not start: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The proxy in front of the Bookstore: `portico espv2`, or `portico esp` over HTTP/1.1.
#[derive(Clone, Copy)]
enum Dialect {
    Esp,
    Espv2,
}

#[allow(clippy::too_many_arguments)]
fn start_proxy(
    dialect: Dialect,
    dir: &Path,
    name: &str,
    config: &Path,
    backend: u16,
    sc: std::net::SocketAddr,
    key: &Path,
    extra: &[&str],
) -> (Proc, u16) {
    let port = free_port();
    let mut args = match dialect {
        Dialect::Espv2 => vec![
            "espv2".to_string(),
            format!("--listener_port={port}"),
            format!("--service_control_url=http://{sc}"),
            "--service_control_check_retries=0".to_string(),
        ],
        Dialect::Esp => vec![
            "esp".to_string(),
            format!("--http_port={port}"),
            format!("--status_port={}", free_port()),
            format!("--service_control_url_override=http://{sc}"),
        ],
    };
    args.extend([
        format!("--service_json_path={}", config.display()),
        format!("--backend=grpc://127.0.0.1:{backend}"),
        "--non_gcp".to_string(),
        format!("--service_account_key={}", key.display()),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut p = Proc::spawn(&args, &dir.join(format!("{name}.log")));
    p.wait_for_port(port, name);
    (p, port)
}

/// One curl call: status, response headers (lower-case names), body bytes.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn curl(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[&str],
    h2c: bool,
) -> Reply {
    let dir = tempfile::tempdir().expect("tempdir");
    let head = dir.path().join("head");
    let out = dir.path().join("body");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-X", method])
        .arg("-D")
        .arg(&head)
        .arg("-o")
        .arg(&out)
        .arg("-w")
        .arg("%{http_code}");
    if h2c {
        cmd.arg("--http2-prior-knowledge");
    }
    for h in headers {
        cmd.args(["-H", h]);
    }
    if let Some(b) = body {
        let f = dir.path().join("req");
        std::fs::write(&f, b).expect("req body");
        cmd.arg("--data-binary").arg(format!("@{}", f.display()));
    }
    cmd.arg(format!("http://127.0.0.1:{port}{path}"));
    let o = cmd.output().expect("curl");
    let status: u16 = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let headers = std::fs::read_to_string(&head)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: std::fs::read(&out).unwrap_or_default(),
    }
}

fn curl_available() -> bool {
    Command::new("curl").arg("--version").output().is_ok()
}

/// A gRPC-Web (text) body: one message, framed and base64-encoded.
fn web_text_request(message: &[u8]) -> Vec<u8> {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    base64::engine::general_purpose::STANDARD
        .encode(framed)
        .into_bytes()
}

/// The frames of a gRPC-Web text response (chunks base64-encoded one by one, so decoded by
/// 4-character groups): data payloads, and the trailer frame's lines.
fn web_text_response(body: &[u8]) -> (Vec<Vec<u8>>, Vec<(String, String)>) {
    let mut dec = portico_transcode::web::TextDecoder::new();
    let raw = dec.push(body).expect("base64 response");
    dec.finish().expect("whole groups");
    let mut frames = portico_transcode::framing::FrameDecoder::new(1 << 20);
    frames.push(&raw);
    let (mut data, mut trailers) = (Vec::new(), Vec::new());
    while let Some(f) = frames.next_frame().expect("frame") {
        if f.flags & 0x80 != 0 {
            for line in String::from_utf8_lossy(&f.payload).split("\r\n") {
                if let Some((n, v)) = line.split_once(':') {
                    trailers.push((n.to_string(), v.to_string()));
                }
            }
        } else {
            data.push(f.payload.to_vec());
        }
    }
    frames.finish().expect("ends on a frame");
    (data, trailers)
}

enum Want {
    Json(Value),
    Text(&'static str),
    Status,
    /// The Bookstore's own refusal of a request that reached it untranscoded (grpc-go's:
    /// 415, `grpc-status: 3`).
    Untranscoded,
}

/// What the Bookstore answers a JSON request that reached it untranscoded.
const UNTRANSCODED: &str = "invalid gRPC request content-type \"application/json\"";

struct Case {
    name: &'static str,
    method: &'static str,
    path: String,
    body: Option<&'static str>,
    status: u16,
    want: Want,
}

fn case(
    name: &'static str,
    method: &'static str,
    path: &str,
    body: Option<&'static str>,
    status: u16,
    want: Want,
) -> Case {
    Case {
        name,
        method,
        path: path.to_string(),
        body,
        status,
        want,
    }
}

#[test]
fn transcoding_and_grpc_web_cases() {
    if !curl_available() {
        assert!(std::env::var_os("CI").is_none(), "curl is required in CI");
        eprintln!("SKIPPED: curl not found");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let sc = peer::start(&rt, service_control(seen.clone()));
    let config = service_json(dir.path());
    let key = common::espv2::service_account_key(dir.path());
    let (bookstore, bport) = start_bookstore(dir.path());
    let (proxy, port) = start_proxy(
        Dialect::Espv2,
        dir.path(),
        "proxy",
        &config,
        bport,
        sc,
        &key,
        &[],
    );
    let logs = || format!("proxy:\n{}\nbookstore:\n{}", proxy.log(), bookstore.log());

    let classic = json!({"id":"200","theme":"Classic"});
    let kids = json!({"id":"100","theme":"Kids"});
    let cases = vec![
        // 2: a transcoded GET (also over h2c below), key in the query.
        case(
            "2 key",
            "GET",
            "/v1/shelves/200?key=api-key",
            None,
            200,
            Want::Json(classic.clone()),
        ),
        case(
            "2 api_key",
            "GET",
            "/v1/shelves/200?api_key=api-key",
            None,
            200,
            Want::Json(classic.clone()),
        ),
        // 3: a query parameter naming no field: ESPv2's transcoder passes the request on as
        // it came, and the gRPC backend refuses its JSON content type.
        case(
            "3 unknown query",
            "GET",
            "/v1/shelves/200?key=api-key&foo=bar",
            None,
            415,
            Want::Untranscoded,
        ),
        case(
            "3 unknown nested field",
            "POST",
            "/v1/shelves/100/books?key=api-key&book.nope=1",
            Some(r#"{"id":3}"#),
            415,
            Want::Untranscoded,
        ),
        // 8: fields of the body field from the query, no body.
        case(
            "8 query into body field",
            "POST",
            "/v1/shelves?key=api-key&shelf.id=123&shelf.theme=kids",
            None,
            200,
            Want::Json(json!({"id":"123","theme":"kids"})),
        ),
        // 9: DELETE with two path variables.
        case(
            "9 delete",
            "DELETE",
            "/v1/shelves/125/books/001?key=api-key",
            None,
            200,
            Want::Json(json!({})),
        ),
        // 10: body: book.
        case(
            "10 body field",
            "POST",
            "/v1/shelves/100/books?key=api-key",
            Some(r#"{"id": 4, "author":"Leo Tolstoy","title":"War and Peace"}"#),
            200,
            Want::Json(json!({"id":"4","author":"Leo Tolstoy","title":"War and Peace"})),
        ),
        // 11: additional binding with nested path fields.
        case(
            "11 nested path",
            "POST",
            "/v1/shelves/100/books/5/Mark?key=api-key",
            Some(r#"{"title":"The Adventures of Huckleberry Finn"}"#),
            200,
            Want::Json(
                json!({"id":"5","author":"Mark","title":"The Adventures of Huckleberry Finn"}),
            ),
        ),
        // 13: {shelf=100}.
        case(
            "13 fixed value",
            "GET",
            "/v1/fixedshelves/100?key=api-key",
            None,
            200,
            Want::Json(kids.clone()),
        ),
        case(
            "13 other value",
            "GET",
            "/v1/fixedshelves/101?key=api-key",
            None,
            404,
            Want::Status,
        ),
        // 14: a custom additional binding.
        case(
            "14 custom binding",
            "GET",
            "/v1/custom/shelves/200/custom/books?key=api-key",
            None,
            200,
            Want::Json(json!({"books":[{"id":"2001","author":"Shakspeare","title":"Hamlet"}]})),
        ),
        // 15: Any resolved through the descriptor set.
        case(
            "15 any",
            "POST",
            "/v1/shelves?key=api-key",
            Some(
                r#"{"id":"15","theme":"t","any":{"@type":"type.googleapis.com/endpoints.examples.bookstore.ObjectOnlyForAny","id":"123","name":"name"}}"#,
            ),
            200,
            Want::Json(
                json!({"id":"15","theme":"t","any":{"@type":"type.googleapis.com/endpoints.examples.bookstore.ObjectOnlyForAny","id":123,"name":"name"}}),
            ),
        ),
        // 16: query into the body field, `+` as space, %20.
        case(
            "16 query and body",
            "POST",
            "/v1/shelves/100/books?key=api-key&book.author=Leo%20Tolstoy&book.title=War+and+Peace",
            Some(r#"{"id": 14}"#),
            200,
            Want::Json(json!({"id":"14","author":"Leo Tolstoy","title":"War and Peace"})),
        ),
        // 17: the default binding next to the custom rule.
        case(
            "17 default binding",
            "POST",
            &format!("/{PKG}/CreateBook?key=api-key"),
            Some(r#"{"shelf":100,"book":{"id":17,"author":"A","title":"T"}}"#),
            200,
            Want::Json(json!({"id":"17","author":"A","title":"T"})),
        ),
        // 18: a method reached only by its default binding (the sample's ReturnBadStatus has
        // no rule; its code 74 is not canonical → 500 with the gRPC code in the body).
        case(
            "18 auto bind GetShelf",
            "POST",
            &format!("/{PKG}/GetShelf?key=api-key"),
            Some(r#"{"shelf":"200"}"#),
            200,
            Want::Json(classic.clone()),
        ),
        case(
            "18 non-canonical code",
            "POST",
            &format!("/{PKG}/ReturnBadStatus?key=api-key"),
            Some("{}"),
            500,
            Want::Json(json!({"code":74,"message":"bad status"})),
        ),
        // 19 (default flags): the route takes the colon text into its `*` segment, the
        // transcoder reads the declared verb as a verb and has no route for it: forwarded as
        // it came, refused by the backend.
        case(
            "19 verb in wildcard",
            "POST",
            "/v1/shelves/100/single/random:registeredCustomVerb?key=api-key",
            Some(r#"{"id":19}"#),
            415,
            Want::Untranscoded,
        ),
        case(
            "19 verb in double wildcard",
            "POST",
            "/v1/shelves/100/double/random:registeredCustomVerb?key=api-key",
            Some(r#"{"id":19}"#),
            415,
            Want::Untranscoded,
        ),
        // 20 (default flags): an undeclared verb is text of the `*` segment.
        case(
            "20 unregistered verb",
            "POST",
            "/v1/shelves/100/single/random:unregisteredCustomVerb?key=api-key",
            Some(r#"{"id":1920}"#),
            200,
            Want::Json(json!({"id":"1920"})),
        ),
        case(
            "custom verb",
            "POST",
            "/v1/shelves/100:registeredCustomVerb?key=api-key",
            Some(r#"{"id":20}"#),
            200,
            Want::Json(json!({"id":"20"})),
        ),
        // Errors both ways.
        case(
            "backend NOT_FOUND",
            "GET",
            "/v1/shelves/999?key=api-key",
            None,
            404,
            Want::Json(json!({"code":5,"message":"Unable to find shelf 999"})),
        ),
        case(
            "malformed JSON",
            "POST",
            "/v1/shelves/100/books?key=api-key",
            Some("NO_BRACES_JSON"),
            400,
            Want::Text("{\"code\":400,\"message\":\"Unexpected token.\\nNO_BRACES_JSON\\n^\"}\n"),
        ),
        case(
            "wrong verb",
            "DELETE",
            "/v1/shelves?key=api-key",
            None,
            405,
            Want::Status,
        ),
        case(
            "no rule",
            "GET",
            "/v1/nothing?key=api-key",
            None,
            404,
            Want::Status,
        ),
        case("no key", "GET", "/v1/shelves/200", None, 401, Want::Status),
        // Server streaming as one JSON array (StreamBooks through its default binding).
        case(
            "server stream",
            "POST",
            &format!("/{PKG}/StreamBooks?key=api-key"),
            Some(r#"{"shelf":"200"}"#),
            200,
            Want::Json(json!([{"id":"2001","author":"Shakspeare","title":"Hamlet"}])),
        ),
    ];
    let mut failures = Vec::new();
    for c in &cases {
        let r = curl(
            port,
            c.method,
            &c.path,
            c.body.map(str::as_bytes),
            &["content-type: application/json"],
            false,
        );
        let body = String::from_utf8_lossy(&r.body).to_string();
        let ok_status = r.status == c.status;
        let ok_body = match &c.want {
            Want::Status => true,
            Want::Untranscoded => {
                r.header("grpc-message") == Some(UNTRANSCODED)
                    && r.header("grpc-status") == Some("3")
            }
            Want::Text(t) => body == *t,
            Want::Json(v) => serde_json::from_str::<Value>(&body).ok().as_ref() == Some(v),
        };
        if !ok_status || !ok_body {
            failures.push(format!(
                "{}: {} {} → {} {body}",
                c.name, c.method, c.path, r.status
            ));
        }
    }
    // 12: an encoded slash in a single-segment variable.
    let r = curl(
        port,
        "POST",
        "/v1/shelves/100/books/6/Foo%2FBar%2FBaz?key=api-key",
        None,
        &[],
        false,
    );
    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    if r.status != 200 || v["author"] != "Foo/Bar/Baz" {
        failures.push(format!("12 encoded slash: {} {v}", r.status));
    }
    // A server stream is sent message by message: with the Bookstore pausing 400 ms after
    // each book of shelf 100 (several were created above), the first bytes arrive long
    // before the last.
    let o = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{time_starttransfer} %{time_total}",
            "-X",
            "POST",
        ])
        .args([
            "-H",
            "x-bookstore-stream-delay-ms: 400",
            "--data-binary",
            r#"{"shelf":"100"}"#,
        ])
        .arg(format!(
            "http://127.0.0.1:{port}/{PKG}/StreamBooks?key=api-key"
        ))
        .output()
        .expect("curl");
    let timing = String::from_utf8_lossy(&o.stdout).to_string();
    let parts: Vec<f64> = timing
        .split(' ')
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    if !timing.starts_with("200 ")
        || parts.len() != 2
        || parts[1] < 1.2
        || parts[0] > parts[1] - 0.8
    {
        failures.push(format!(
            "stream not streamed: {timing} (code, first byte, total)"
        ));
    }
    // A transcoded call tells the backend what the client asked for, as Envoy's transcoder
    // does (the Bookstore echoes the metadata back as headers); a client's own copy is
    // replaced.
    let echo = "x-bookstore-echo-metadata: x-envoy-original-path, x-envoy-original-method";
    let r = curl(
        port,
        "DELETE",
        "/v1/shelves/125/books/002?key=api-key",
        None,
        &[echo, "x-envoy-original-method: PUT"],
        false,
    );
    if (
        r.status,
        r.header("x-envoy-original-path"),
        r.header("x-envoy-original-method"),
    ) != (
        200,
        Some("/v1/shelves/125/books/002?key=api-key"),
        Some("DELETE"),
    ) {
        failures.push(format!("original path: {} {:?}", r.status, r.headers));
    }
    // A gRPC call goes as it came: nothing to record.
    let g = common::bookstore::call(
        port,
        &format!("/{PKG}/GetShelf"),
        &get_shelf_request(100),
        &["x-api-key: api-key", echo],
        false,
    );
    if g.last("grpc-status") != Some("0") || g.last("x-envoy-original-path").is_some() {
        failures.push(format!("gRPC call: {:?}", g.headers));
    }
    // 2 over h2c.
    let r = curl(port, "GET", "/v1/shelves/200?key=api-key", None, &[], true);
    if r.status != 200 || serde_json::from_slice::<Value>(&r.body).ok() != Some(classic.clone()) {
        failures.push(format!(
            "2 h2c: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        ));
    }
    if r.header("content-type") != Some("application/json") {
        failures.push(format!(
            "2 h2c content-type: {:?}",
            r.header("content-type")
        ));
    }
    // 22: gRPC-Web text, ListShelves (no key needed).
    let r = curl(
        port,
        "POST",
        &format!("/{PKG}/ListShelves"),
        Some(&web_text_request(b"")),
        &["content-type: application/grpc-web-text", "x-grpc-web: 1"],
        false,
    );
    let (data, trailers) = web_text_response(&r.body);
    if r.status != 200
        || r.header("content-type") != Some("application/grpc-web-text+proto")
        || data.len() != 1
        || !trailers.contains(&("grpc-status".into(), "0".into()))
    {
        failures.push(format!(
            "22 grpc-web: {} {:?} {data:?} {trailers:?}",
            r.status, r.headers
        ));
    }
    // 23: gRPC-Web binary, the backend failing with ABORTED (trailers-only).
    let mut framed = vec![0u8];
    let msg = get_shelf_request(100);
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    let r = curl(
        port,
        "POST",
        &format!("/{PKG}/GetShelf"),
        Some(&framed),
        &[
            "content-type: application/grpc-web+proto",
            "x-api-key: api-key",
            "x-bookstore-fail: 10",
        ],
        false,
    );
    let text = base64::engine::general_purpose::STANDARD.encode(&r.body);
    let (_, trailers) = web_text_response(text.as_bytes());
    if r.status != 200
        || !trailers.contains(&("grpc-status".into(), "10".into()))
        || !trailers.contains(&("grpc-message".into(), "ABORTED".into()))
    {
        failures.push(format!("23 grpc-web error: {} {trailers:?}", r.status));
    }
    // gRPC-Web bad base64: Envoy's 400.
    let r = curl(
        port,
        "POST",
        &format!("/{PKG}/GetShelf"),
        Some(b"!!!!"),
        &[
            "content-type: application/grpc-web-text",
            "x-api-key: api-key",
        ],
        false,
    );
    let want = common::espv2::body(400, "Bad gRPC-web request, invalid base64 data.");
    if r.status != 400 || String::from_utf8_lossy(&r.body) != want {
        failures.push(format!(
            "bad base64: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        ));
    }
    // gRPC-Web without a key: a plain HTTP 401 (ESPv2's filter order), not a grpc-status.
    let r = curl(
        port,
        "POST",
        &format!("/{PKG}/GetShelf"),
        Some(&framed),
        &["content-type: application/grpc-web+proto"],
        false,
    );
    if r.status != 401 || r.header("grpc-status").is_some() {
        failures.push(format!("grpc-web no key: {} {:?}", r.status, r.headers));
    }
    assert!(
        failures.is_empty(),
        "failed cases:\n{}\n{}",
        failures.join("\n"),
        logs()
    );

    // Service Control: the transcoded GET and the gRPC-Web call were reported, under the
    // method's selector, with ESPv2's protocols.
    let deadline = Instant::now() + Duration::from_secs(20);
    // Requests of one signature share an operation: the 415 of case 3 has its own code.
    let find = |url: &str| -> Option<Value> {
        seen.lock()
            .unwrap()
            .operations
            .iter()
            .find(|op| {
                op["labels"]["/response_code"] == "200"
                    && op["logEntries"].as_array().is_some_and(|l| {
                        l.iter().any(|e| {
                            e["httpRequest"]["requestUrl"]
                                .as_str()
                                .is_some_and(|u| u.starts_with(url))
                        })
                    })
            })
            .cloned()
    };
    let (transcoded, web) = loop {
        let t = find("/v1/shelves/200?key=");
        let w = find(&format!("/{PKG}/ListShelves"));
        if let (Some(t), Some(w)) = (&t, &w) {
            break (t.clone(), w.clone());
        }
        assert!(
            Instant::now() < deadline,
            "no reports: {:#?}\n{}",
            seen.lock().unwrap().operations,
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        transcoded["operationName"],
        format!("{PKG}.GetShelf"),
        "{transcoded:#}"
    );
    assert_eq!(transcoded["labels"]["/protocol"], "http", "{transcoded:#}");
    assert_eq!(
        transcoded["labels"]["servicecontrol.googleapis.com/backend_protocol"], "grpc",
        "{transcoded:#}"
    );
    assert_eq!(
        transcoded["labels"]["/response_code"], "200",
        "{transcoded:#}"
    );
    assert_eq!(
        web["operationName"],
        format!("{PKG}.ListShelves"),
        "{web:#}"
    );
    assert_eq!(web["labels"]["/protocol"], "grpc", "{web:#}");
    // ESPv2 does not hand the query key to the backend as metadata (ESP v1 does, below).
    let r = curl(
        port,
        "GET",
        "/v1/shelves/200?key=api-key",
        None,
        &["x-bookstore-echo-metadata: x-api-key"],
        false,
    );
    assert_eq!(
        (r.status, r.header("x-api-key")),
        (200, None),
        "{:?}",
        r.headers
    );
    drop(proxy);

    // ESP v1 (`portico esp`): the same transcoding, and the query key copied into `x-api-key`
    // metadata for the gRPC backend (the Bookstore echoes it back as initial metadata, which
    // reaches the client as a header).
    let (esp, esp_port) = start_proxy(
        Dialect::Esp,
        dir.path(),
        "esp",
        &config,
        bport,
        sc,
        &key,
        &[],
    );
    let r = curl(
        esp_port,
        "GET",
        "/v1/shelves/200?key=api-key",
        None,
        &["x-bookstore-echo-metadata: x-api-key"],
        false,
    );
    assert_eq!(
        (
            r.status,
            r.header("x-api-key"),
            serde_json::from_slice::<Value>(&r.body).ok()
        ),
        (200, Some("api-key"), Some(classic.clone())),
        "{:?}\n{}",
        r.headers,
        esp.log()
    );
    // ESP v1 keeps answering an unknown query parameter itself.
    let r = curl(
        esp_port,
        "GET",
        "/v1/shelves/200?key=api-key&foo=bar",
        None,
        &[],
        false,
    );
    assert_eq!(
        (r.status, String::from_utf8_lossy(&r.body).contains("'foo'")),
        (415, true),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    // ESP v1 knows gRPC-Web only in its binary forms (`grpc.cc` IsGrpcWeb): binary is
    // served as under ESPv2; a `grpc-web-text` call is an HTTP call to it, transcoded from JSON,
    // and its base64 body is no JSON: 400 with a JSON error, not a gRPC-Web answer.
    let mut framed = vec![0u8];
    let msg = get_shelf_request(200);
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    let r = curl(
        esp_port,
        "POST",
        &format!("/{PKG}/GetShelf?key=api-key"),
        Some(&framed),
        &["content-type: application/grpc-web+proto", "x-grpc-web: 1"],
        false,
    );
    assert_eq!(
        (r.status, r.header("content-type")),
        (200, Some("application/grpc-web+proto")),
        "{}",
        esp.log()
    );
    // ESP v1's own refusal of a gRPC-Web call is plain HTTP with its JSON error: its error
    // filter speaks gRPC only to `application/grpc[+proto]` (error.cc, IsGrpcRequest).
    let r = curl(
        esp_port,
        "POST",
        &format!("/{PKG}/GetShelf"),
        Some(&framed),
        &["content-type: application/grpc-web+proto", "x-grpc-web: 1"],
        false,
    );
    let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    assert_eq!(
        (r.status, r.header("content-type"), &body["code"]),
        (401, Some("application/json"), &json!(16)),
        "{:?} {}",
        r.headers,
        String::from_utf8_lossy(&r.body)
    );
    assert!(r.header("grpc-status").is_none(), "{:?}", r.headers);
    // And ESP v1 reports gRPC-Web as the HTTP it is to it (`/protocol` is `grpc` only for
    // `application/grpc` calls): the successful call above and the transcoded GET make one
    // `http` operation, no `grpc` one.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ops: Vec<Value> = seen
            .lock()
            .unwrap()
            .operations
            .iter()
            .filter(|o| o["operationName"] == format!("{PKG}.GetShelf").as_str())
            .filter(|o| o["labels"]["servicecontrol.googleapis.com/user_agent"] == "ESP")
            .filter(|o| o["labels"]["/response_code"] == "200")
            .cloned()
            .collect();
        assert!(
            !ops.iter().any(|o| o["labels"]["/protocol"] == "grpc"),
            "{ops:?}"
        );
        let calls: i64 = ops
            .iter()
            .flat_map(|o| o["metricValueSets"].as_array().cloned().unwrap_or_default())
            .filter(|m| {
                m["metricName"] == "serviceruntime.googleapis.com/api/producer/request_count"
            })
            .filter_map(|m| {
                m["metricValues"][0]["int64Value"]
                    .as_str()?
                    .parse::<i64>()
                    .ok()
            })
            .sum();
        if calls >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{ops:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for ct in [
        "application/grpc-web-text",
        "application/grpc-web-text+proto",
        "Application/GRPC-Web-Text; charset=utf-8",
    ] {
        let r = curl(
            esp_port,
            "POST",
            &format!("/{PKG}/GetShelf?key=api-key"),
            Some(&web_text_request(&get_shelf_request(200))),
            &[&format!("content-type: {ct}"), "x-grpc-web: 1"],
            false,
        );
        let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        assert_eq!(
            (r.status, r.header("content-type"), &body["code"]),
            (400, Some("application/json"), &json!(3)),
            "{ct}: {:?} {}\n{}",
            r.headers,
            String::from_utf8_lossy(&r.body),
            esp.log()
        );
        assert!(r.header("grpc-status").is_none(), "{ct}: {:?}", r.headers);
    }
    drop(esp);

    // ESP v1 reports a long transcoded server stream in parts too (its transcoded calls go
    // through the same gRPC call as pass-through ones): with a 1 s interval, a stream the
    // Bookstore paces at 1.3 s after each of its two books gets intermediate reports while it
    // runs, then the final one.
    let template = dir.path().join("server_config.pb.txt");
    std::fs::write(
        &template,
        "service_control_config { intermediate_report_min_interval: 1 }\n",
    )
    .expect("server config");
    let (esp, esp_port) = start_proxy(
        Dialect::Esp,
        dir.path(),
        "esp-long",
        &config,
        bport,
        sc,
        &key,
        &[&format!("--server_config_template={}", template.display())],
    );
    // A shelf of its own with two books: the Bookstore pauses between them.
    let r = curl(
        esp_port,
        "POST",
        "/v1/shelves?key=api-key",
        Some(br#"{"theme":"long"}"#),
        &[],
        false,
    );
    let created: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    let shelf = created["id"].as_str().unwrap_or_else(|| {
        panic!(
            "{} {}\n{}",
            r.status,
            String::from_utf8_lossy(&r.body),
            esp.log()
        )
    });
    for id in [1, 2] {
        let r = curl(
            esp_port,
            "POST",
            &format!("/v1/shelves/{shelf}/books?key=api-key"),
            Some(format!(r#"{{"id":{id},"title":"t{id}"}}"#).as_bytes()),
            &[],
            false,
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    // Only this call's reports from here on (earlier parts reported StreamBooks too).
    std::thread::sleep(Duration::from_millis(1500));
    seen.lock().unwrap().operations.clear();
    let r = curl(
        esp_port,
        "POST",
        &format!("/{PKG}/StreamBooks?key=api-key"),
        Some(format!(r#"{{"shelf":"{shelf}"}}"#).as_bytes()),
        &["x-bookstore-stream-delay-ms: 1300"],
        false,
    );
    assert_eq!(r.status, 200, "{}", esp.log());
    let selector = format!("{PKG}.StreamBooks");
    let deadline = Instant::now() + Duration::from_secs(20);
    let (parts, finals) = loop {
        let ops: Vec<Value> = seen
            .lock()
            .unwrap()
            .operations
            .iter()
            .filter(|o| o["operationName"] == selector.as_str())
            .filter(|o| o["labels"]["/protocol"] == "http")
            .cloned()
            .collect();
        let (finals, parts): (Vec<Value>, Vec<Value>) = ops
            .into_iter()
            .partition(|o| o["labels"].get("/response_code").is_some());
        if !finals.is_empty() {
            break (parts, finals);
        }
        assert!(Instant::now() < deadline, "no final report\n{}", esp.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    let count = |o: &Value| {
        o["metricValueSets"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["metricName"] == "serviceruntime.googleapis.com/api/producer/request_count")
            .map(|m| m["metricValues"][0]["int64Value"].clone())
    };
    // The first intermediate report counts the call; later ones (if the aggregator did not
    // merge them) do not.
    assert!(!parts.is_empty(), "{finals:?}");
    let counted: Vec<Value> = parts.iter().filter_map(count).collect();
    assert_eq!(counted, [json!("1")], "{parts:?}");
    assert_eq!(finals.len(), 1, "{finals:?}");
    assert_eq!(count(&finals[0]), None, "{finals:?}");
    drop(esp);

    // 19 and 20 with --disallow_colon_in_wildcard_path_segment (ESPv2's
    // transcoding_bindings_test): no route takes a colon into a wildcard, but the transcoder
    // matches with its own matcher, after routing.
    let not_defined = espv2_body(404, "The current request is not defined by this API.");
    let (colon, cport) = start_proxy(
        Dialect::Espv2,
        dir.path(),
        "colon",
        &config,
        bport,
        sc,
        &key,
        &["--disallow_colon_in_wildcard_path_segment"],
    );
    let single = "/v1/shelves/100/single/random";
    let r = curl(
        cport,
        "POST",
        &format!("{single}:registeredCustomVerb?key=api-key"),
        Some(br#"{"id":5}"#),
        &["content-type: application/json"],
        false,
    );
    assert_eq!(
        (r.status, String::from_utf8_lossy(&r.body).to_string()),
        (404, not_defined.clone()),
        "{}",
        colon.log()
    );
    let r = curl(
        cport,
        "POST",
        &format!("{single}:unregisteredCustomVerb?key=api-key"),
        Some(br#"{"id":55,"author":"Leo Tolstoy","title":"War and Peace"}"#),
        &["content-type: application/json"],
        false,
    );
    assert_eq!(
        (r.status, serde_json::from_slice::<Value>(&r.body).ok()),
        (
            200,
            Some(json!({"id":"55","author":"Leo Tolstoy","title":"War and Peace"}))
        ),
        "{}",
        colon.log()
    );
    // ESPv2 runs no check for it (its deny-all route has no method); Portico checks it as the
    // method it calls.
    let r = curl(
        cport,
        "POST",
        &format!("{single}:unregisteredCustomVerb"),
        Some(br#"{"id":6}"#),
        &["content-type: application/json"],
        false,
    );
    assert_eq!(r.status, 401, "{}", colon.log());
    drop(colon);
    let (strict, sport) = start_proxy(
        Dialect::Espv2,
        dir.path(),
        "strict",
        &config,
        bport,
        sc,
        &key,
        &[
            "--disallow_colon_in_wildcard_path_segment",
            "--transcoding_match_unregistered_custom_verb",
        ],
    );
    let r = curl(
        sport,
        "POST",
        &format!("{single}:unregisteredCustomVerb?key=api-key"),
        Some(br#"{"id":5}"#),
        &["content-type: application/json"],
        false,
    );
    assert_eq!(
        (r.status, String::from_utf8_lossy(&r.body).to_string()),
        (404, not_defined),
        "{}",
        strict.log()
    );
    drop(strict);

    // 21: the printing flags, on a second proxy.
    let (flagged, fport) = start_proxy(
        Dialect::Espv2,
        dir.path(),
        "proxy-flags",
        &config,
        bport,
        sc,
        &key,
        &[
            "--transcoding_always_print_primitive_fields",
            "--transcoding_always_print_enums_as_ints",
            "--transcoding_preserve_proto_field_names",
            "--transcoding_ignore_unknown_query_parameters",
            "--transcoding_stream_newline_delimited",
            "--cors_preset=basic",
            "--cors_allow_headers=content-type,x-grpc-web,x-user-agent,x-api-key",
            "--cors_expose_headers=grpc-status,grpc-message",
        ],
    );
    // The CORS a browser's gRPC-Web client needs (§4): its preflight allows `x-grpc-web`, and
    // the answer exposes `grpc-status`/`grpc-message`.
    let r = curl(
        fport,
        "OPTIONS",
        &format!("/{PKG}/ListShelves"),
        None,
        &[
            "origin: http://web.example",
            "access-control-request-method: POST",
            "access-control-request-headers: content-type,x-grpc-web",
        ],
        false,
    );
    // Status and origin as tests/espv2_cors.rs has them for every preflight.
    assert_eq!(r.status, 200, "{:?}", r.headers);
    assert!(
        r.header("access-control-allow-headers")
            .is_some_and(|h| h.contains("x-grpc-web")),
        "{:?}",
        r.headers
    );
    let r = curl(
        fport,
        "POST",
        &format!("/{PKG}/ListShelves"),
        Some(&web_text_request(b"")),
        &[
            "content-type: application/grpc-web-text",
            "x-grpc-web: 1",
            "origin: http://web.example",
        ],
        false,
    );
    assert_eq!(r.status, 200, "{}", flagged.log());
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some("grpc-status,grpc-message"),
        "{:?}",
        r.headers
    );
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("http://web.example"),
        "{:?}",
        r.headers
    );
    let r = curl(
        fport,
        "POST",
        "/v1/shelves/100/books?key=api-key&foo=bar",
        Some(br#"{"id":21,"type":"COMIC"}"#),
        &[],
        false,
    );
    let got: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    assert_eq!(
        (r.status, got),
        (
            200,
            json!({"id":"21","author":"","title":"","type":1,"price_in_usd":0})
        ),
        "{}",
        flagged.log()
    );
    let r = curl(
        fport,
        "POST",
        &format!("/{PKG}/StreamBooks?key=api-key"),
        Some(br#"{"shelf":"200"}"#),
        &[],
        false,
    );
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        "{\"id\":\"2001\",\"author\":\"Shakspeare\",\"title\":\"Hamlet\",\"type\":0,\"price_in_usd\":0}\n",
        "{}",
        flagged.log()
    );
    drop(flagged);
    drop(bookstore);
}
