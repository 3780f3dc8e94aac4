//! The method and the path the backend runs are the ones the policy
//! checked. Every test sends the attack as raw bytes to a real proxy (in-process
//! `server::start`, loopback ports chosen at run time) in front of a backend that records the
//! exact request heads it receives (`auth_common::RecordingBackend`), and asserts three things:
//! what the client got, what the backend received (or that it received nothing), and, where it
//! matters, what was logged and reported.
//!
//! The two services are the issue's: **strict** (`GET /items/{id}` and `GET /public/{id}`
//! allow unregistered calls, `DELETE /items/{id}` and `GET /secret` need an API key) and
//! **allow-all** (the same paths plus `x-google-allow: all`), written as OpenAPI and converted
//! with the same converter the control plane uses.
//!
//! Service Control is a TEST DOUBLE (`Control`): the key `good-key` is valid, any other is
//! refused; it records every report.

mod auth_common;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use auth_common::RecordingBackend;
use portico_proxy::config_source::Rollout;
use portico_proxy::error::{Cause, Code, EspError};
use portico_proxy::pipeline::{CheckInput, CheckOk, ControlApi, QuotaInput, RequestRecord};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GOOD_KEY: &str = "good-key";

fn openapi(allow_all: bool, backend: Option<&str>) -> String {
    let mut s = String::from(
        r#"swagger: "2.0"
info: {title: t, version: "1.0.0"}
host: t.endpoints.demo-proj.cloud.goog
securityDefinitions:
  api_key: {type: apiKey, name: key, in: query}
"#,
    );
    if allow_all {
        s.push_str("x-google-allow: all\n");
    }
    if let Some(b) = backend {
        s.push_str(&format!("x-google-backend: {{address: \"{b}\"}}\n"));
    }
    s.push_str(
        r#"paths:
  /items/{id}:
    get:
      operationId: getItem
      security: []
      parameters: [{name: id, in: path, required: true, type: string}]
      responses: {"200": {description: ok}}
    delete:
      operationId: deleteItem
      security: [{api_key: []}]
      parameters: [{name: id, in: path, required: true, type: string}]
      responses: {"200": {description: ok}}
  /public/{id}:
    get:
      operationId: getPublic
      security: []
      parameters: [{name: id, in: path, required: true, type: string}]
      responses: {"200": {description: ok}}
  /secret:
    get:
      operationId: getSecret
      security: [{api_key: []}]
      responses: {"200": {description: ok}}
"#,
    );
    s
}

/// TEST DOUBLE of the Service Control client: `good-key` is valid; reports are recorded.
#[derive(Default)]
struct Control {
    reports: Mutex<Vec<RequestRecord>>,
}

impl ControlApi for Control {
    fn check<'a>(
        &'a self,
        input: CheckInput<'a>,
    ) -> Pin<Box<dyn Future<Output = Result<CheckOk, EspError>> + Send + 'a>> {
        let ok = input.api_key == GOOD_KEY;
        Box::pin(async move {
            if ok {
                Ok(CheckOk {
                    api_key_valid: true,
                    ..Default::default()
                })
            } else {
                Err(EspError::new(
                    Code::InvalidArgument,
                    "API key not valid. Please pass a valid API key.",
                    Cause::ServiceControl,
                ))
            }
        })
    }

    fn allocate_quota(&self, _input: QuotaInput<'_>) -> Result<(), EspError> {
        Ok(())
    }

    fn report(&self, record: RequestRecord) {
        self.reports.lock().unwrap().push(record);
    }
}

struct Env {
    backend: RecordingBackend,
    control: Arc<Control>,
    proxy: portico_proxy::server::ProxyHandle,
    dir: tempfile::TempDir,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Svc {
    Strict,
    AllowAll,
}

impl Env {
    async fn start(svc: Svc, flags: &[&str]) -> Env {
        Self::start_with(svc, flags, None).await
    }

    /// `routed_prefix`: with `--enable_backend_routing`, the backend rule's address path.
    async fn start_with(svc: Svc, flags: &[&str], routed_prefix: Option<&str>) -> Env {
        let backend = RecordingBackend::start().await;
        let address = routed_prefix.map(|p| format!("http://{}{p}", backend.addr));
        let text = openapi(svc == Svc::AllowAll, address.as_deref());
        let conv = portico_config::convert(&[portico_config::SourceFile::new("api.yaml", text)])
            .unwrap_or_else(|e| panic!("{e}"));
        let mut service = conv.service;
        service.id = "2026-11-23r0".into();
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<std::ffi::OsString> = vec![
            "esp".into(),
            format!("--service={}", service.name).into(),
            "--http_port=0".into(),
            "--status_port=0".into(),
            "--worker_threads=1".into(),
            format!("--backend=http://{}", backend.addr).into(),
            format!("--access_log={}", dir.path().join("access.log").display()).into(),
        ];
        args.extend(flags.iter().map(|f| f.into()));
        let settings = portico_proxy::cli::parse(args).unwrap_or_else(|e| panic!("{e}"));
        let rollout = Arc::new(Rollout {
            rollout_id: service.id.clone(),
            configs: vec![(Arc::new(service), 100)],
        });
        let (_tx, rx) = tokio::sync::watch::channel(rollout);
        let control = Arc::new(Control::default());
        let proxy = portico_proxy::server::start(
            Arc::new(settings),
            rx,
            Some(control.clone() as Arc<dyn ControlApi>),
        )
        .await
        .expect("proxy starts");
        Env {
            backend,
            control,
            proxy,
            dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.http_addr.unwrap()
    }

    /// Sends `head` (request line and headers, without the final blank line; `Host` and
    /// `Connection: close` are added) and returns the response.
    async fn send(&self, head: &str) -> Resp {
        raw(
            self.addr(),
            &format!("{head}\r\nHost: api.example\r\nConnection: close\r\n\r\n"),
        )
        .await
    }

    /// The request lines the backend received.
    fn backend_lines(&self) -> Vec<String> {
        self.backend
            .heads()
            .iter()
            .map(|h| h.split("\r\n").next().unwrap_or("").to_string())
            .collect()
    }

    /// Header names (as received, lower case) of the last request the backend received.
    fn backend_header_names(&self) -> Vec<String> {
        let heads = self.backend.heads();
        let Some(last) = heads.last() else {
            return Vec::new();
        };
        last.split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, _)| k.to_string())
            .collect()
    }

    /// Access-log lines, waiting (bounded) until at least `n` are written.
    async fn access_log(&self, n: usize) -> Vec<serde_json::Value> {
        let path = self.dir.path().join("access.log");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            if lines.len() >= n || tokio::time::Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Reports, waiting (bounded) until at least `n` arrived.
    async fn reports(&self, n: usize) -> Vec<RequestRecord> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let r = self.control.reports.lock().unwrap().clone();
            if r.len() >= n || tokio::time::Instant::now() > deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

struct Resp {
    status: u16,
    head: String,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<String> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} / {:?}", self.head, self.body))
    }
}

/// One raw exchange on a fresh connection; the response is read until the proxy closes it.
async fn raw(addr: SocketAddr, request: &str) -> Resp {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Resp {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

fn assert_esp_error(r: &Resp, status: u16, code: i64) {
    assert_eq!(r.status, status, "{} {}", r.head, r.body);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let v = r.json();
    assert_eq!(v["code"], code, "{}", r.body);
    assert_eq!(
        v["details"][0]["@type"],
        "type.googleapis.com/google.rpc.DebugInfo"
    );
}

// ----------------------------------------------------------------------------------------------
// Item 1: X-HTTP-Method-Override.
// ----------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_to_an_open_method_forwards_that_method_not_the_request_line() {
    let env = Env::start(Svc::Strict, &[]).await;
    // The issue's reproduction: DELETE needs a key, GET does not.
    let r = env
        .send("DELETE /items/1 HTTP/1.1\r\nX-HTTP-Method-Override: GET")
        .await;
    assert_eq!(r.status, 200, "{}", r.head);
    // The backend runs what was checked, and never sees the override.
    assert_eq!(env.backend_lines(), vec!["GET /items/1 HTTP/1.1"]);
    assert!(!env
        .backend_header_names()
        .contains(&"x-http-method-override".to_string()));
    let log = env.access_log(1).await;
    assert_eq!(log[0]["method"], "GET", "{log:?}");
    let reports = env.reports(1).await;
    assert_eq!(reports[0].http_method, "GET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_to_a_keyed_method_needs_the_key_and_is_what_runs() {
    let env = Env::start(Svc::Strict, &[]).await;
    let r = env
        .send("GET /items/1 HTTP/1.1\r\nX-HTTP-Method-Override: DELETE")
        .await;
    assert_esp_error(&r, 401, 16);
    assert!(env.backend_lines().is_empty());
    let r = env
        .send("GET /items/1?key=good-key HTTP/1.1\r\nX-HTTP-Method-Override: DELETE")
        .await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(
        env.backend_lines(),
        vec!["DELETE /items/1?key=good-key HTTP/1.1"]
    );
    let reports = env.reports(2).await;
    assert_eq!(
        reports
            .iter()
            .map(|r| r.http_method.as_str())
            .collect::<Vec<_>>(),
        vec!["DELETE", "DELETE"]
    );
    let log = env.access_log(2).await;
    assert!(log.iter().all(|l| l["method"] == "DELETE"), "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_repeated_overrides_are_400_and_never_forwarded() {
    let env = Env::start(Svc::AllowAll, &[]).await;
    for head in [
        "POST /items/1 HTTP/1.1\r\nX-HTTP-Method-Override: delete",
        "POST /items/1 HTTP/1.1\r\nX-HTTP-Method-Override: Get",
        "POST /items/1 HTTP/1.1\r\nX-HTTP-Method-Override: GET\r\nX-HTTP-Method-Override: DELETE",
        "POST /items/1 HTTP/1.1\r\nX-HTTP-Method-Override: GET, DELETE",
        "POST /items/1 HTTP/1.1\r\nX-HTTP-Method-Override: ",
        "POST /items/1 HTTP/1.1\r\nx-http-method-override: G\u{e9}T",
    ] {
        let r = env.send(head).await;
        assert_esp_error(&r, 400, 3);
    }
    // Overrides to methods the proxy refuses are refused the same way.
    let r = env
        .send("POST /items/1 HTTP/1.1\r\nX-HTTP-Method-Override: CONNECT")
        .await;
    assert_esp_error(&r, 405, 9);
    let r = env
        .send("POST /items/1 HTTP/1.1\r\nX-HTTP-Method-Override: TRACE")
        .await;
    assert_esp_error(&r, 405, 9);
    assert!(env.backend_lines().is_empty(), "{:?}", env.backend_lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_override_headers_never_reach_the_backend() {
    // Frameworks also read X-HTTP-Method and X-Method-Override; the proxy matches neither, so a
    // backend must not see them (in any spelling).
    let env = Env::start(Svc::Strict, &["--underscores_in_headers"]).await;
    let r = env
        .send(
            "GET /items/1 HTTP/1.1\r\nX-HTTP-Method: DELETE\r\nX-Method-Override: DELETE\r\n\
             X_HTTP_Method_Override: DELETE\r\nx_http_method: DELETE",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(env.backend_lines(), vec!["GET /items/1 HTTP/1.1"]);
    let names = env.backend_header_names();
    for n in &names {
        let canon = n.replace('_', "-");
        assert!(
            ![
                "x-http-method",
                "x-method-override",
                "x-http-method-override"
            ]
            .contains(&canon.as_str()),
            "{n} reached the backend: {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_to_head_on_a_get_is_answered_without_a_broken_body() {
    let env = Env::start(Svc::Strict, &[]).await;
    let r = env
        .send("GET /items/1 HTTP/1.1\r\nX-HTTP-Method-Override: HEAD")
        .await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(env.backend_lines(), vec!["HEAD /items/1 HTTP/1.1"]);
    assert_eq!(r.body, "");
    assert_eq!(r.header("content-length").as_deref(), Some("0"));
}

// ----------------------------------------------------------------------------------------------
// Item 2: headers with underscores; identity headers in every spelling.
// ----------------------------------------------------------------------------------------------

const FORGED: &str = "X_Endpoint_API_UserInfo: eyJpZCI6ImFkbWluIn0\r\n\
                      X_Forwarded_For: 6.6.6.6\r\n\
                      X_Endpoint_API_Project_ID: 666\r\n\
                      X_Real_IP: 6.6.6.6\r\n\
                      X-Endpoint-API-UserInfo: eyJpZCI6ImFkbWluIn0\r\n\
                      X-ENDPOINT-API-PROJECT-ID: 666\r\n\
                      x-endpoint_api-userinfo: eyJpZCI6ImFkbWluIn0\r\n\
                      X-Endpoint-API-Anything: 1\r\n\
                      X_Custom_Header: kept-only-with-the-flag\r\n\
                      X-Plain: kept";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_with_underscores_are_dropped_and_identity_headers_removed() {
    let env = Env::start(Svc::Strict, &[]).await;
    let r = env
        .send(&format!("GET /items/1 HTTP/1.1\r\n{FORGED}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let names = env.backend_header_names();
    assert!(names.iter().all(|n| !n.contains('_')), "{names:?}");
    assert!(
        names.iter().all(|n| !n.starts_with("x-endpoint-api-")),
        "{names:?}"
    );
    assert!(names.contains(&"x-plain".to_string()));
    // The forged X_Forwarded_For did not become the client address either.
    assert_eq!(
        env.backend.last_header_values("x-forwarded-for"),
        vec!["127.0.0.1"]
    );
    assert_eq!(
        env.backend.last_header_values("x-real-ip"),
        vec!["127.0.0.1"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_underscores_in_headers_only_the_proxys_own_headers_are_removed() {
    let env = Env::start(Svc::Strict, &["--underscores_in_headers"]).await;
    let r = env
        .send(&format!("GET /items/1 HTTP/1.1\r\n{FORGED}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let names = env.backend_header_names();
    assert!(names.contains(&"x_custom_header".to_string()), "{names:?}");
    for n in &names {
        let canon = n.replace('_', "-");
        assert!(!canon.starts_with("x-endpoint-api-"), "{n}: {names:?}");
        if ["x-forwarded-for", "x-real-ip", "x-google-real-ip"].contains(&canon.as_str()) {
            assert!(!n.contains('_'), "{n} reached the backend: {names:?}");
        }
    }
    assert_eq!(
        env.backend.last_header_values("x-forwarded-for"),
        vec!["127.0.0.1"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_header_spelled_with_underscores_is_not_a_key() {
    let env = Env::start(Svc::Strict, &[]).await;
    let r = env
        .send("DELETE /items/1 HTTP/1.1\r\nx_api_key: good-key")
        .await;
    assert_esp_error(&r, 401, 16);
    assert!(env.backend_lines().is_empty());
}

// ----------------------------------------------------------------------------------------------
// Item 3: methods that are not upper-case tokens.
// ----------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_and_mixed_case_methods_are_400_before_matching() {
    let env = Env::start(Svc::AllowAll, &[]).await;
    for line in [
        "delete /items/1 HTTP/1.1",
        "Delete /items/1 HTTP/1.1",
        "Get /secret HTTP/1.1",
        "get /secret HTTP/1.1",
        "DEL3TE /items/1 HTTP/1.1",
    ] {
        let r = env.send(line).await;
        assert_esp_error(&r, 400, 3);
    }
    assert!(env.backend_lines().is_empty(), "{:?}", env.backend_lines());
    // Logged and reported as the client's error.
    let log = env.access_log(5).await;
    assert_eq!(log.len(), 5, "{log:?}");
    assert!(log.iter().all(|l| l["status"] == 400), "{log:?}");
    let reports = env.reports(5).await;
    assert!(
        reports
            .iter()
            .all(|r| r.response_code == 400 && r.status_code == Some(3)),
        "{:?}",
        reports
            .iter()
            .map(|r| (r.response_code, r.status_code))
            .collect::<Vec<_>>()
    );
    // The upper-case method is checked as before.
    let r = env.send("DELETE /items/1 HTTP/1.1").await;
    assert_esp_error(&r, 401, 16);
}

// ----------------------------------------------------------------------------------------------
// Item 4: CONNECT, TRACE, OPTIONS *, absolute-form targets, HTTP/2 :path.
// ----------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_trace_are_405_and_never_forwarded() {
    let env = Env::start(Svc::AllowAll, &[]).await;
    for line in [
        "CONNECT / HTTP/1.1",
        "CONNECT api.example:443 HTTP/1.1",
        "TRACE /items/1 HTTP/1.1",
        "TRACE /secret HTTP/1.1",
    ] {
        let r = env.send(line).await;
        assert_esp_error(&r, 405, 9);
    }
    assert!(env.backend_lines().is_empty(), "{:?}", env.backend_lines());
    let log = env.access_log(4).await;
    assert!(log.iter().all(|l| l["status"] == 405), "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asterisk_and_absolute_form_targets_match_what_is_forwarded() {
    let env = Env::start(Svc::AllowAll, &[]).await;
    let r = env.send("OPTIONS * HTTP/1.1").await;
    assert_esp_error(&r, 400, 3);
    // Absolute form: the path inside it is normalised and checked like any other.
    let r = env
        .send("GET http://elsewhere.example/x/../secret HTTP/1.1")
        .await;
    assert_esp_error(&r, 401, 16);
    assert!(env.backend_lines().is_empty(), "{:?}", env.backend_lines());
    let r = env
        .send("GET http://elsewhere.example/x/../secret?key=good-key HTTP/1.1")
        .await;
    assert_eq!(r.status, 200, "{}", r.head);
    // Forwarded in origin form, the path the policy matched.
    assert_eq!(
        env.backend_lines(),
        vec!["GET /secret?key=good-key HTTP/1.1"]
    );
}

/// One HTTP/2 (h2c, prior knowledge) request with a `:path` sent exactly as given.
async fn h2_get(addr: SocketAddr, path: &str) -> u16 {
    use http_body_util::Empty;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let uri: http::Uri = format!("http://{addr}{path}").parse().unwrap();
    let req = http::Request::get(uri)
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    resp.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_path_is_normalised_like_http1() {
    let env = Env::start(Svc::AllowAll, &[]).await;
    assert_eq!(h2_get(env.addr(), "/x/../secret").await, 401);
    assert_eq!(h2_get(env.addr(), "//secret").await, 401);
    assert_eq!(h2_get(env.addr(), "/public/..%2Fsecret").await, 400);
    assert!(env.backend_lines().is_empty(), "{:?}", env.backend_lines());
    assert_eq!(h2_get(env.addr(), "/x/%2e%2e/public/1?q=/../").await, 200);
    assert_eq!(env.backend_lines(), vec!["GET /public/1?q=/../ HTTP/1.1"]);
}

// ----------------------------------------------------------------------------------------------
// Item 5: encoded and dotted paths.
// ----------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_separators_that_would_form_dot_segments_are_400() {
    let env = Env::start(Svc::Strict, &[]).await;
    for path in [
        "/public/..%2Fsecret",
        "/public/..%2fsecret",
        "/public/..%5Csecret",
        "/public/..%5csecret",
        "/public/%2e%2e%2Fsecret",
        "/public/.%2E%2fsecret",
        "/public/x%2F..%2F..%2Fsecret",
        "/public/x%2F..",
        "/public/a%00",
        "/public/..;/secret",
        "/public/%2e%2e;x/secret",
    ] {
        let r = env.send(&format!("GET {path} HTTP/1.1")).await;
        assert_esp_error(&r, 400, 3);
    }
    assert!(env.backend_lines().is_empty(), "{:?}", env.backend_lines());
    // A plain %2F inside a segment (object names) is kept as sent.
    let r = env.send("GET /public/a%2Fb HTTP/1.1").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(env.backend_lines(), vec!["GET /public/a%2Fb HTTP/1.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dotted_and_doubled_paths_are_checked_as_the_path_they_resolve_to() {
    let env = Env::start(Svc::AllowAll, &[]).await;
    for path in [
        "/x/../secret",
        "//secret",
        "/x/%2e%2e/secret",
        "/x/%2E%2E/./secret",
        "/x/..\\secret",
        "/./secret",
        "/../../secret",
        "/secret/.",
    ] {
        let r = env.send(&format!("GET {path} HTTP/1.1")).await;
        assert_esp_error(&r, 401, 16);
    }
    assert!(env.backend_lines().is_empty(), "{:?}", env.backend_lines());
    // Encoded separators at a segment's edge and `;` parameters that change the method are
    // refused: a backend that decodes or drops them would serve /secret.
    for path in [
        "/secret%2F",
        "/secret%2f",
        "/%2Fsecret",
        "/secret;x",
        "/secret;",
    ] {
        let r = env.send(&format!("GET {path} HTTP/1.1")).await;
        assert_esp_error(&r, 400, 3);
    }
    assert!(env.backend_lines().is_empty(), "{:?}", env.backend_lines());
    // With the key, the backend receives the normalised path; the query is untouched.
    let r = env
        .send("GET /x/../secret?key=good-key&next=/a/../b//c HTTP/1.1")
        .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let r = env.send("GET //public//1/ HTTP/1.1").await;
    assert_eq!(r.status, 200, "{}", r.head);
    // `;` parameters that select the same method are forwarded as sent.
    let r = env.send("GET /public/1;v=2 HTTP/1.1").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(
        env.backend_lines(),
        vec![
            "GET /secret?key=good-key&next=/a/../b//c HTTP/1.1",
            "GET /public/1/ HTTP/1.1",
            "GET /public/1;v=2 HTTP/1.1",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_normalisation_forwards_paths_as_sent() {
    let env = Env::start(
        Svc::AllowAll,
        &[
            "--disable_normalize_path",
            "--disable_merge_slashes_in_path",
        ],
    )
    .await;
    let r = env.send("GET /x/../public/1 HTTP/1.1").await;
    assert_eq!(r.status, 200, "{}", r.head);
    let r = env.send("GET //public/1 HTTP/1.1").await;
    assert_eq!(r.status, 200, "{}", r.head);
    // An encoded NUL is refused whatever the flags.
    let r = env.send("GET /public/a%00b HTTP/1.1").await;
    assert_esp_error(&r, 400, 3);
    assert_eq!(
        env.backend_lines(),
        vec!["GET /x/../public/1 HTTP/1.1", "GET //public/1 HTTP/1.1"]
    );
    // Slashes only: dot segments kept, repeated slashes merged.
    let env = Env::start(Svc::AllowAll, &["--disable_normalize_path"]).await;
    let r = env.send("GET //public/./1 HTTP/1.1").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(env.backend_lines(), vec!["GET /public/./1 HTTP/1.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallow_escaped_slashes_redirects_http_and_refuses_grpc() {
    let env = Env::start(Svc::Strict, &["--disallow_escaped_slashes_in_path"]).await;
    let r = env.send("GET /public/..%2Fsecret?a=%2F HTTP/1.1").await;
    assert_eq!(r.status, 307, "{}", r.head);
    assert_eq!(r.header("location").as_deref(), Some("/secret?a=%2F"));
    let r = env.send("GET /public/a%2fb HTTP/1.1").await;
    assert_eq!(r.status, 307, "{}", r.head);
    assert_eq!(r.header("location").as_deref(), Some("/public/a/b"));
    let r = env.send("GET /public/a%5Cb HTTP/1.1").await;
    assert_eq!(r.status, 307, "{}", r.head);
    assert_eq!(r.header("location").as_deref(), Some("/public/a/b"));
    let r = env
        .send("POST /public/a%2Fb HTTP/1.1\r\nContent-Type: application/grpc\r\nContent-Length: 0")
        .await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.header("grpc-status").as_deref(), Some("3"), "{}", r.head);
    assert!(env.backend_lines().is_empty(), "{:?}", env.backend_lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_rewrite_see_the_normalised_path() {
    let env = Env::start(
        Svc::AllowAll,
        &["--healthz=healthz", "--rewrite=^/api/(.*)$ /$1"],
    )
    .await;
    // Answered by the proxy itself, as for /healthz.
    for path in ["/x/../healthz", "//healthz", "/./healthz"] {
        let r = env.send(&format!("GET {path} HTTP/1.1")).await;
        assert_eq!(r.status, 200, "{path}: {}", r.head);
    }
    assert!(env.backend_lines().is_empty(), "{:?}", env.backend_lines());
    // The rewrite's input is the normalised path: /api/../secret is /secret, not /../secret.
    let r = env.send("GET /api/../secret HTTP/1.1").await;
    assert_esp_error(&r, 401, 16);
    let r = env.send("GET /api//public/1 HTTP/1.1").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(env.backend_lines(), vec!["GET /public/1 HTTP/1.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_routing_forwards_the_normalised_path() {
    let env = Env::start_with(Svc::AllowAll, &["--enable_backend_routing"], Some("/base")).await;
    let r = env.send("GET /x/../public/1 HTTP/1.1").await;
    assert_eq!(r.status, 200, "{}", r.head);
    let r = env.send("GET /x/../secret HTTP/1.1").await;
    assert_esp_error(&r, 401, 16);
    assert_eq!(env.backend_lines(), vec!["GET /base/public/1 HTTP/1.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_unreserved_characters_are_decoded_before_matching() {
    let env = Env::start(Svc::AllowAll, &[]).await;
    // A backend decodes %73 to `s` before routing: /%73ecret is /secret to it.
    for path in ["/%73ecret", "/%73%65%63%72%65%74", "/x/%2E%2e/%73ecret"] {
        let r = env.send(&format!("GET {path} HTTP/1.1")).await;
        assert_esp_error(&r, 401, 16);
    }
    // Malformed escapes: a `%` that does not start one cannot be decoded the same way twice.
    for path in [
        "/public/a%zz",
        "/public/100%",
        "/public/a%2",
        "/public/%%373ecret",
    ] {
        let r = env.send(&format!("GET {path} HTTP/1.1")).await;
        assert_esp_error(&r, 400, 3);
    }
    assert!(env.backend_lines().is_empty(), "{:?}", env.backend_lines());
    let r = env.send("GET /public/%31%7E%2d HTTP/1.1").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(env.backend_lines(), vec!["GET /public/1~- HTTP/1.1"]);
}

// ----------------------------------------------------------------------------------------------
// Red-team follow-ups: `;` on empty segments, redirects, target overrides, Host, codings.
// ----------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_on_an_empty_segment_are_400_in_every_form() {
    // A servlet container drops `;x` and merges the empty segment left behind: `/;x/items/1`
    // would be checked as `/**` (allow-all) and run as `DELETE /items/1`.
    let env = Env::start(Svc::AllowAll, &[]).await;
    for line in [
        "DELETE /;x/items/1",
        "DELETE /items/;x/1",
        "DELETE /items;x/;/1",
        "GET /;x/secret",
        "GET /;/secret",
        "GET /;",
        "GET /public/;x",
        "GET http://elsewhere.example/;x/secret",
        "DELETE http://elsewhere.example/items/;x/1",
    ] {
        let r = env.send(&format!("{line} HTTP/1.1")).await;
        assert_esp_error(&r, 400, 3);
    }
    assert_eq!(h2_get(env.addr(), "/;x/secret").await, 400);
    assert_eq!(h2_get(env.addr(), "/;/secret").await, 400);
    assert!(env.backend_lines().is_empty(), "{:?}", env.backend_lines());
    let r = env.send("GET /public;v=1/1 HTTP/1.1").await;
    assert_esp_error(&r, 400, 3);
    // Parameters on a non-empty segment that name the same method still pass.
    let r = env.send("GET /public/1;v=1 HTTP/1.1").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(env.backend_lines(), vec!["GET /public/1;v=1 HTTP/1.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_are_compared_on_the_merged_path_when_slashes_are_kept() {
    // With --disable_merge_slashes_in_path `/items;x//1` is forwarded with its `//`; a servlet
    // container strips `;x`, merges `//` and runs `DELETE /items/1`, which needs a key.
    let env = Env::start(Svc::AllowAll, &["--disable_merge_slashes_in_path"]).await;
    for line in ["DELETE /items;x//1", "GET /secret;x//", "GET //secret;x"] {
        let r = env.send(&format!("{line} HTTP/1.1")).await;
        assert_esp_error(&r, 400, 3);
    }
    assert!(env.backend_lines().is_empty(), "{:?}", env.backend_lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_slash_redirects_never_name_another_host() {
    for flags in [
        &[
            "--disallow_escaped_slashes_in_path",
            "--disable_merge_slashes_in_path",
        ][..],
        &[
            "--disallow_escaped_slashes_in_path",
            "--disable_merge_slashes_in_path",
            "--disable_normalize_path",
        ][..],
        &["--disallow_escaped_slashes_in_path"][..],
    ] {
        let env = Env::start(Svc::Strict, flags).await;
        for (path, location) in [
            ("/%2Fevil.com", "/evil.com"),
            ("/%2F%2Fevil.com", "/evil.com"),
            ("/%5Cevil.example/path", "/evil.example/path"),
            ("/%2F%5Cevil.example/path?a=b", "/evil.example/path?a=b"),
            ("/public/a%2Fb", "/public/a/b"),
        ] {
            let r = env.send(&format!("GET {path} HTTP/1.1")).await;
            assert_eq!(r.status, 307, "{flags:?} {path}: {}", r.head);
            assert_eq!(
                r.header("location").as_deref(),
                Some(location),
                "{flags:?} {path}"
            );
        }
        assert!(env.backend_lines().is_empty(), "{:?}", env.backend_lines());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_override_headers_never_reach_the_backend() {
    // IIS URL Rewrite and Symfony/Zend route on these: the backend would run /secret.
    for flags in [&[][..], &["--underscores_in_headers"][..]] {
        let env = Env::start(Svc::Strict, flags).await;
        let r = env
            .send(
                "GET /public/1 HTTP/1.1\r\nX-Original-URL: /secret\r\nX-Rewrite-URL: /secret\r\n\
                 X-ORIGINAL-url: /secret\r\nx_original_url: /secret\r\nX_Rewrite_Url: /secret",
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.head);
        assert_eq!(env.backend_lines(), vec!["GET /public/1 HTTP/1.1"]);
        let names = env.backend_header_names();
        for n in &names {
            let canon = n.to_ascii_lowercase().replace('_', "-");
            assert!(
                !["x-original-url", "x-rewrite-url"].contains(&canon.as_str()),
                "{n} reached the backend: {names:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_or_missing_host_is_400_like_nginx() {
    let env = Env::start(Svc::AllowAll, &[]).await;
    for request in [
        "GET /public/1 HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
        "GET /public/1 HTTP/1.1\r\nHost: a.example\r\nhost: a.example\r\nConnection: close\r\n\r\n",
        "GET /public/1 HTTP/1.0\r\nHost: a.example\r\nHOST: b.example\r\n\r\n",
        "GET /public/1 HTTP/1.1\r\nConnection: close\r\n\r\n",
    ] {
        let r = raw(env.addr(), request).await;
        assert_esp_error(&r, 400, 3);
    }
    assert!(env.backend_lines().is_empty(), "{:?}", env.backend_lines());
    // HTTP/1.0 may omit Host; an absolute-form target names the host; HTTP/2 uses :authority.
    let r = raw(env.addr(), "GET /public/1 HTTP/1.0\r\n\r\n").await;
    assert_eq!(r.status, 200, "{}", r.head);
    let r = raw(
        env.addr(),
        "GET http://a.example/public/2 HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(h2_get(env.addr(), "/public/3").await, 200);
    assert_eq!(
        env.backend_lines(),
        vec![
            "GET /public/1 HTTP/1.1",
            "GET /public/2 HTTP/1.1",
            "GET /public/3 HTTP/1.1"
        ]
    );
}

/// A chunked POST of `hello` with the given `Transfer-Encoding` header line(s).
fn chunked_post(te: &str) -> String {
    format!(
        "POST /upload HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n{te}\r\n\r\n\
         5\r\nhello\r\n0\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_codings_other_than_chunked_are_501_like_nginx() {
    // Re-chunking towards the backend would drop `gzip`: the backend would read compressed
    // bytes as the body. nginx answers 501 for any coding but a lone `chunked`.
    let env = Env::start(Svc::AllowAll, &[]).await;
    for te in [
        "gzip, chunked",
        "deflate,chunked",
        "chunked, chunked",
        "identity, chunked",
    ] {
        let r = raw(
            env.addr(),
            &chunked_post(&format!("Transfer-Encoding: {te}")),
        )
        .await;
        assert_esp_error(&r, 501, 12);
    }
    let r = raw(
        env.addr(),
        &chunked_post("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked"),
    )
    .await;
    assert_esp_error(&r, 501, 12);
    assert!(env.backend_lines().is_empty(), "{:?}", env.backend_lines());
    for te in ["chunked", "Chunked", "CHUNKED"] {
        let r = raw(
            env.addr(),
            &chunked_post(&format!("Transfer-Encoding: {te}")),
        )
        .await;
        assert_eq!(r.status, 200, "{te}: {}", r.head);
    }
    // The recording backend does not read bodies: only the request lines count.
    let lines = env.backend_lines();
    let posts = lines.iter().filter(|l| *l == "POST /upload HTTP/1.1");
    assert_eq!(posts.count(), 3, "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_100_header_lines_are_431() {
    // hyper's fixed count for HTTP/1.1 (docs/security.md, Limits). `send` adds two lines.
    let env = Env::start(Svc::AllowAll, &[]).await;
    let lines =
        |n: usize| -> String { (0..n).map(|i| format!("\r\nX-H{i}: 1")).collect::<String>() };
    let r = env
        .send(&format!("GET /public/1 HTTP/1.1{}", lines(98)))
        .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let r = env
        .send(&format!("GET /public/1 HTTP/1.1{}", lines(99)))
        .await;
    assert_eq!(r.status, 431, "{}", r.head);
    assert_eq!(env.backend_lines(), vec!["GET /public/1 HTTP/1.1"]);
}
