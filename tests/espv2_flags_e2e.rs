//! End to end, `portico espv2` with ESPv2's TLS, header and compression flags (issue 17 items
//! 8, 9, 11) on its command line, through real processes: the real binary with a service config
//! file and a certificate directory made at test time, a header-echoing backend double, and the
//! real `curl` as the client. Each flag's behaviour in depth is tested against the in-process
//! proxy (crates/proxy/tests/{tls_e2e,espv2_headers}.rs); this test proves the command line
//! reaches it.

mod common;

use common::espv2;
use common::peer;
use common::{free_port, Proc};
use serde_json::{json, Value};
use std::process::Command;
use std::sync::Arc;

const SERVICE: &str = "espv2-flags.endpoints.e2e-proj.cloud.goog";

/// `curl` against the proxy's TLS listener, trusting the test's certificate; returns the
/// response head (lower-cased) and the body as curl wrote it.
fn curl(port: u16, ca: &std::path::Path, path: &str, extra: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-D", "-", "-o", "-"])
        .arg("--cacert")
        .arg(ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(extra)
        .arg(format!("https://localhost:{port}{path}"))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_ascii_lowercase(), body.to_string())
}

#[test]
fn tls_header_and_compression_flags_work_from_the_command_line() {
    if Command::new("curl").arg("--version").output().is_err() {
        panic!("curl is required (the CI script installs it)");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let backend = peer::start(&rt, Arc::new(espv2::echo_headers));

    // ESPv2's certificate directory: server.crt and server.key.
    let certs = dir.path().join("ssl");
    std::fs::create_dir(&certs).expect("cert dir");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    std::fs::write(certs.join("server.crt"), cert.cert.pem()).expect("crt");
    std::fs::write(certs.join("server.key"), cert.key_pair.serialize_pem()).expect("key");

    let config = dir.path().join("service.json");
    std::fs::write(
        &config,
        json!({
            "name": SERVICE, "id": "2024-01-01r0",
            "apis": [{"name": "e2e.Api", "version": "v1"}],
            "http": {"rules": [{"selector": "e2e.Api.Echo", "get": "/echo"}]},
        })
        .to_string(),
    )
    .expect("config");
    let port = free_port();
    let args: Vec<String> = vec![
        "espv2".into(),
        format!("--listener_port={port}"),
        format!("--service_json_path={}", config.display()),
        format!("--backend=http://{backend}"),
        "--skip_service_control_filter".into(),
        format!("--metadata_url=http://127.0.0.1:{}", free_port()),
        format!("--ssl_server_cert_path={}", certs.display()),
        "--ssl_minimum_protocol=TLSv1.3".into(),
        "--add_response_header=x-served-by=portico".into(),
        "--add_request_header=x-client=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%".into(),
        "--enable_operation_name_header".into(),
        "--enable_response_compression".into(),
    ];
    let mut proxy = Proc::spawn(&args, &dir.path().join("espv2.log"));
    proxy.wait_for_port(port, "portico espv2");
    let ca = certs.join("server.crt");

    // TLS on the listener, the response header, gzip on request.
    let (head, body) = curl(port, &ca, "/echo", &["--compressed"]);
    assert!(
        head.starts_with("http/2 200") || head.starts_with("http/1.1 200"),
        "{head}\n{}",
        proxy.log()
    );
    assert!(head.contains("\nx-served-by: portico"), "{head}");
    assert!(head.contains("\ncontent-encoding: gzip"), "{head}");
    let seen: Value = serde_json::from_str(&body).expect("curl decompressed the JSON body");
    assert_eq!(
        seen["x-endpoint-api-operation-name"], "e2e.Api.Echo",
        "{seen}"
    );
    assert_eq!(seen["x-client"], "127.0.0.1", "{seen}");
    // Without Accept-Encoding the body is plain.
    let (head, body) = curl(port, &ca, "/echo", &[]);
    assert!(!head.contains("content-encoding"), "{head}");
    assert!(body.starts_with('{'), "{body}");
    // The minimum protocol: a client limited to TLS 1.2 gets no answer.
    let (head, _) = curl(port, &ca, "/echo", &["--tls-max", "1.2"]);
    assert!(head.is_empty(), "TLS 1.2 was served: {head}");
    // Envoy's default under ESPv2: a header name with '_' is refused.
    let (head, body) = curl(port, &ca, "/echo", &["-H", "x_under: 1"]);
    assert!(
        head.starts_with("http/2 400") || head.starts_with("http/1.1 400"),
        "{head}"
    );
    assert!(head.contains("\nx-served-by: portico"), "{head}");
    assert_eq!(body.trim_end(), r#"{"code":400,"message":"Bad Request"}"#);
    // The listener is TLS only.
    let plain = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://127.0.0.1:{port}/echo"))
        .output()
        .expect("curl runs");
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");
    drop(proxy);
}
