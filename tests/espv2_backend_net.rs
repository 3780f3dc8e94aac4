//! End to end, through real processes: how `portico espv2` connects to backends
//! (`--cluster_connect_timeout`, `--backend_dns_lookup_family`, `--dns_resolver_addresses` and
//! `--dns`), which address it uses (`--enable_backend_address_override`) and how many requests
//! a backend may carry at once (`--backend_cluster_maximum_requests`).
//!
//! The DNS server is a hand-written UDP responder started by the test on 127.0.0.1 (A and AAAA
//! records for made-up names, NXDOMAIN for the rest), or one that never answers. `localhost`
//! is not used for the family tests: on some machines (this project's CI among them) it
//! resolves to 127.0.0.1 only; the made-up name resolves to 127.0.0.1 and ::1 everywhere.

mod common;

use common::espv2;
use common::peer::{self, Action, Request};
use common::{free_port, Proc};
use serde_json::json;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SERVICE: &str = "espv2-net.endpoints.e2e-proj.cloud.goog";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A backend that answers with who it is and the target it got; `/slow...` after a while.
fn reflector(name: &'static str) -> peer::Handler {
    Arc::new(move |r: &Request| {
        if r.path.starts_with("/slow") {
            return Action::Stall(Duration::from_secs(3));
        }
        Action::Respond(200, json!({"backend": name, "uri": r.path}).to_string())
    })
}

/// A service config: `(selector, GET path, backend rule)` per method, every call allowed
/// without an API key.
fn write_config(dir: &Path, methods: &[(&str, &str, Option<serde_json::Value>)]) -> String {
    let rules: Vec<_> = methods
        .iter()
        .map(|(name, path, _)| json!({"selector": format!("e2e.Api.{name}"), "get": path}))
        .collect();
    let usage: Vec<_> = methods
        .iter()
        .map(|(name, _, _)| json!({"selector": format!("e2e.Api.{name}"), "allowUnregisteredCalls": true}))
        .collect();
    let backend: Vec<_> = methods
        .iter()
        .filter_map(|(name, _, rule)| {
            let mut rule = rule.clone()?;
            rule["selector"] = json!(format!("e2e.Api.{name}"));
            Some(rule)
        })
        .collect();
    let config = json!({
        "name": SERVICE, "id": "2024-01-01r0",
        "apis": [{"name": "e2e.Api", "version": "v1"}],
        "http": {"rules": rules},
        "usage": {"rules": usage},
        "backend": {"rules": backend},
    });
    let path = dir.join(format!("service-{}.json", free_port()));
    std::fs::write(&path, config.to_string()).expect("config");
    path.display().to_string()
}

/// `portico espv2` with `config`, no Service Control, an unreachable metadata server, and
/// `flags`.
fn proxy(dir: &Path, name: &str, config: &str, flags: &[String]) -> (Proc, u16) {
    let mut all = vec![
        format!("--service_json_path={config}"),
        "--skip_service_control_filter".to_string(),
        format!("--metadata_url=http://127.0.0.1:{}", free_port()),
    ];
    all.extend(flags.iter().cloned());
    espv2::start(dir, name, &all)
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// GET `path`: status, body and how long it took.
fn get(port: u16, path: &str) -> (u16, String, Duration) {
    let start = Instant::now();
    let resp = client()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .expect("the proxy answers");
    let status = resp.status().as_u16();
    (status, resp.text().unwrap_or_default(), start.elapsed())
}

// ---- A DNS server double.

/// The question of a DNS query: its name (lower-case, with the final dot) and type.
fn question(q: &[u8]) -> Option<(String, u16, usize)> {
    let mut name = String::new();
    let mut i = 12;
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        name.push_str(&String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        name.push('.');
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    // Name, type and class.
    Some((name, qtype, i + 4))
}

/// The answer to `q` from `records`: A or AAAA records of a known name (none of the other
/// family: an empty NOERROR answer), NXDOMAIN for an unknown one.
fn answer(q: &[u8], records: &HashMap<String, Vec<IpAddr>>) -> Option<Vec<u8>> {
    let (name, qtype, end) = question(q)?;
    let known = records.get(&name);
    let ips: Vec<&IpAddr> = known
        .into_iter()
        .flatten()
        .filter(|ip| match qtype {
            1 => ip.is_ipv4(),
            28 => ip.is_ipv6(),
            _ => false,
        })
        .collect();
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&q[0..2]);
    // QR, the query's RD, RA; NXDOMAIN for a name it does not know.
    let rcode = if known.is_some() { 0 } else { 3 };
    out.extend_from_slice(&[0x80 | (q[2] & 0x01), 0x80 | rcode]);
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&q[12..end]);
    for ip in ips {
        // A pointer to the question's name, type, class IN, TTL 30 s.
        out.extend_from_slice(&[0xc0, 0x0c]);
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&[0, 1, 0, 0, 0, 30]);
        match ip {
            IpAddr::V4(v4) => {
                out.extend_from_slice(&[0, 4]);
                out.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                out.extend_from_slice(&[0, 16]);
                out.extend_from_slice(&v6.octets());
            }
        }
    }
    Some(out)
}

/// A DNS server on 127.0.0.1 answering from `records` (`None`: it never answers).
fn dns_server(
    rt: &tokio::runtime::Runtime,
    records: Option<HashMap<String, Vec<IpAddr>>>,
) -> SocketAddr {
    let socket = rt
        .block_on(tokio::net::UdpSocket::bind("127.0.0.1:0"))
        .expect("bind dns");
    let addr = socket.local_addr().expect("dns addr");
    rt.spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let Some(records) = &records else {
                continue;
            };
            if let Some(reply) = answer(&buf[..n], records) {
                let _ = socket.send_to(&reply, from).await;
            }
        }
    });
    addr
}

fn records(list: &[(&str, &[&str])]) -> HashMap<String, Vec<IpAddr>> {
    list.iter()
        .map(|(name, ips)| {
            (
                name.to_string(),
                ips.iter().map(|ip| ip.parse().expect("ip")).collect(),
            )
        })
        .collect()
}

const CONNECT_TIMEOUT: &str = "upstream connect error or disconnect/reset before headers. reset \
                               reason: connection timeout";

/// A listener whose accept queue is full: connections to it never complete their handshake.
/// Returns it with the connections that fill it (both must stay open).
fn full_backlog() -> (
    tokio::net::TcpListener,
    Vec<std::net::TcpStream>,
    SocketAddr,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let listener = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().expect("socket");
        s.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
        s.listen(0).expect("listen")
    });
    let addr = listener.local_addr().expect("addr");
    let mut held = Vec::new();
    // Connect until one does not complete: from then on the queue is full.
    for _ in 0..64 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => held.push(s),
            Err(_) => return (listener, held, addr),
        }
    }
    panic!(
        "a listener with backlog 0 kept accepting handshakes: cannot test connect timeouts here"
    );
}

#[test]
fn cluster_connect_timeout_bounds_the_handshake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_listener, _held, addr) = full_backlog();
    let config = write_config(dir.path(), &[("Echo", "/echo", None)]);

    // One attempt: ESPv2's 503 after the timeout, not the 15 s deadline or the OS's minutes.
    let (once, port) = proxy(
        dir.path(),
        "once",
        &config,
        &[
            format!("--backend=http://{addr}"),
            "--cluster_connect_timeout=1s".into(),
            "--backend_retry_num=0".into(),
        ],
    );
    let (status, body, took) = get(port, "/echo");
    assert_eq!(
        (status, body.as_str()),
        (503, espv2::body(503, CONNECT_TIMEOUT).as_str()),
        "{}",
        once.log()
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "answered after {took:?}"
    );

    // ESPv2's default retry conditions retry a connect timeout (`connect-failure`) once.
    let (retried, port) = proxy(
        dir.path(),
        "retried",
        &config,
        &[
            format!("--backend=http://{addr}"),
            "--cluster_connect_timeout=500ms".into(),
        ],
    );
    let (status, body, took) = get(port, "/echo");
    assert_eq!(
        (status, body.as_str()),
        (
            503,
            espv2::body(
                503,
                "upstream connect error or disconnect/reset before headers. retried and the \
                 latest reset reason: connection timeout"
            )
            .as_str()
        ),
        "{}",
        retried.log()
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "answered after {took:?}"
    );
}

#[test]
fn dns_resolver_addresses_resolve_backend_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let backend = peer::start(&rt, reflector("backend"));
    let dns = dns_server(
        &rt,
        Some(records(&[
            ("backend.portico-test.example.", &["127.0.0.1"]),
            // A name without a dot, as ESPv2's dns_resolver_test resolves one.
            ("pqdn-backend.", &["127.0.0.1"]),
        ])),
    );
    let silent = dns_server(&rt, None);
    let config = write_config(
        dir.path(),
        &[
            ("Echo", "/echo", None),
            (
                "Short",
                "/short",
                Some(
                    json!({"address": format!("http://pqdn-backend:{}/base", backend.port()),
                             "pathTranslation": "APPEND_PATH_TO_ADDRESS"}),
                ),
            ),
            (
                "Missing",
                "/missing",
                Some(
                    json!({"address": format!("http://missing.portico-test.example:{}", backend.port()),
                             "pathTranslation": "APPEND_PATH_TO_ADDRESS"}),
                ),
            ),
        ],
    );
    let named = format!(
        "--backend=http://backend.portico-test.example:{}",
        backend.port()
    );

    for flag in ["--dns_resolver_addresses", "--dns"] {
        let (p, port) = proxy(
            dir.path(),
            &flag[2..],
            &config,
            &[named.clone(), format!("{flag}={dns}")],
        );
        let (status, body, _) = get(port, "/echo?x=1");
        assert_eq!(status, 200, "{flag}: {body}\n{}", p.log());
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).expect("json"),
            json!({"backend": "backend", "uri": "/echo?x=1"})
        );
        let (status, body, _) = get(port, "/short");
        assert_eq!(status, 200, "{flag}: {body}\n{}", p.log());
        assert!(body.contains("\"uri\":\"/base/short\""), "{body}");
        // A name the server does not know: ESPv2's (Envoy's) answer for a cluster without
        // hosts.
        let (status, body, _) = get(port, "/missing");
        assert_eq!(
            (status, body.as_str()),
            (503, espv2::body(503, "no healthy upstream").as_str()),
            "{flag}\n{}",
            p.log()
        );
    }

    // A server that never answers: the same 503, soon, and the proxy still serves.
    let (p, port) = proxy(
        dir.path(),
        "silent",
        &config,
        &[named.clone(), format!("--dns_resolver_addresses={silent}")],
    );
    let (status, body, took) = get(port, "/echo");
    assert_eq!(
        (status, body.as_str()),
        (503, espv2::body(503, "no healthy upstream").as_str()),
        "{}",
        p.log()
    );
    assert!(took < Duration::from_secs(8), "answered after {took:?}");
    let (status, _, _) = get(port, "/missing");
    assert_eq!(status, 503);

    // Without the flag the system's resolver is asked, which knows no such name.
    let (p, port) = proxy(dir.path(), "system", &config, &[named]);
    let (status, body, _) = get(port, "/echo");
    assert_eq!(
        (status, body.as_str()),
        (503, espv2::body(503, "no healthy upstream").as_str()),
        "{}",
        p.log()
    );
}

#[test]
fn backend_dns_lookup_family_picks_the_addresses_tried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    // One backend on IPv6 only, one on IPv4 only; the name resolves to both loopbacks.
    let six = peer::start_on(&rt, "[::1]:0", reflector("six"));
    let four = peer::start(&rt, reflector("four"));
    let dns = dns_server(
        &rt,
        Some(records(&[(
            "dual.portico-test.example.",
            &["127.0.0.1", "::1"],
        )])),
    );
    let rule = |port: u16| {
        Some(
            json!({"address": format!("http://dual.portico-test.example:{port}"),
                    "pathTranslation": "APPEND_PATH_TO_ADDRESS"}),
        )
    };
    let config = write_config(
        dir.path(),
        &[
            ("Six", "/six", rule(six.port())),
            ("Four", "/four", rule(four.port())),
        ],
    );
    // (family, IPv6-only backend served, IPv4-only backend served)
    let cases: &[(Option<&str>, bool, bool)] = &[
        (None, false, true),
        (Some("v4preferred"), false, true),
        (Some("auto"), true, false),
        (Some("v4only"), false, true),
        (Some("v6only"), true, false),
        (Some("all"), true, true),
    ];
    for &(family, six_ok, four_ok) in cases {
        let mut flags = vec![format!("--dns_resolver_addresses={dns}")];
        if let Some(f) = family {
            flags.push(format!("--backend_dns_lookup_family={f}"));
        }
        let (p, port) = proxy(dir.path(), family.unwrap_or("default"), &config, &flags);
        for (path, ok, name) in [("/six", six_ok, "six"), ("/four", four_ok, "four")] {
            let (status, body, _) = get(port, path);
            if ok {
                assert_eq!(status, 200, "{family:?} {path}: {body}\n{}", p.log());
                assert!(body.contains(&format!("\"backend\":\"{name}\"")), "{body}");
            } else {
                // Refused on the other family's loopback (and retried once, as ESPv2 does).
                assert_eq!(status, 503, "{family:?} {path}: {body}\n{}", p.log());
                assert!(
                    body.contains("remote connection failure, transport failure reason: delayed connect error: 111"),
                    "{family:?} {path}: {body}"
                );
            }
        }
    }
}

#[test]
fn backend_address_override_sends_every_method_to_backend() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let local = peer::start(&rt, reflector("local"));
    let dead = free_port();
    let constant = |path: &str, deadline: Option<f64>| {
        let mut r = json!({"address": format!("http://127.0.0.1:{dead}{path}"),
                           "pathTranslation": "CONSTANT_ADDRESS"});
        if let Some(d) = deadline {
            r["deadline"] = json!(d);
        }
        Some(r)
    };
    let config = write_config(
        dir.path(),
        &[
            (
                "GetPet",
                "/pet/{pet_id}",
                constant("/dynamicrouting/getpetbyid", None),
            ),
            ("Slow", "/slow", constant("/dynamicrouting/slow", Some(1.0))),
            ("Local", "/local", None),
        ],
    );
    let backend = format!("--backend=http://{local}");

    // Without the flag the rule's address is used, and it is dead.
    let (p, port) = proxy(dir.path(), "rules", &config, std::slice::from_ref(&backend));
    let (status, body, _) = get(port, "/pet/123?x=1");
    assert_eq!(status, 503, "{body}\n{}", p.log());
    assert!(body.contains("delayed connect error: 111"), "{body}");

    // With it, --backend serves every method, with the path as the client sent it (ESPv2
    // drops the rule's path translation with its address), and the rule's deadline holds.
    let (p, port) = proxy(
        dir.path(),
        "override",
        &config,
        &[backend, "--enable_backend_address_override".into()],
    );
    for (path, uri) in [
        ("/pet/123?x=1", "/pet/123?x=1"),
        ("/local?k=v", "/local?k=v"),
    ] {
        let (status, body, _) = get(port, path);
        assert_eq!(status, 200, "{path}: {body}\n{}", p.log());
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).expect("json"),
            json!({"backend": "local", "uri": uri}),
            "{path}"
        );
    }
    let (status, body, took) = get(port, "/slow");
    assert_eq!(
        (status, body.as_str()),
        (504, espv2::body(504, "upstream request timeout").as_str()),
        "{}",
        p.log()
    );
    assert!(
        took < Duration::from_millis(2500),
        "the rule's 1 s deadline: {took:?}"
    );
}

#[test]
fn backend_cluster_maximum_requests_refuses_the_overflow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let backend = peer::start(&rt, reflector("backend"));
    let config = write_config(
        dir.path(),
        &[("Slow", "/slow", None), ("Echo", "/echo", None)],
    );
    let (p, port) = proxy(
        dir.path(),
        "max1",
        &config,
        &[
            format!("--backend=http://{backend}"),
            "--backend_cluster_maximum_requests=1".into(),
        ],
    );
    // The first request holds the backend's one place for 3 s.
    let first = std::thread::spawn(move || get(port, "/slow"));
    std::thread::sleep(Duration::from_millis(500));
    let (status, body, took) = get(port, "/echo");
    assert_eq!(
        (status, body.as_str()),
        (
            503,
            espv2::body(
                503,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow"
            )
            .as_str()
        ),
        "{}",
        p.log()
    );
    assert!(
        took < Duration::from_secs(1),
        "refused at once, not queued: {took:?}"
    );
    let (status, _, _) = first.join().expect("first request");
    assert_eq!(status, 200, "{}", p.log());
    // Its place is free again once its response has been sent.
    let (status, body, _) = get(port, "/echo");
    assert_eq!(status, 200, "{body}\n{}", p.log());

    // The default (Envoy's 1024) lets both through.
    let (p, port) = proxy(
        dir.path(),
        "default",
        &config,
        &[format!("--backend=http://{backend}")],
    );
    let first = std::thread::spawn(move || get(port, "/slow"));
    std::thread::sleep(Duration::from_millis(500));
    let (status, body, _) = get(port, "/echo");
    assert_eq!(status, 200, "{body}\n{}", p.log());
    assert_eq!(first.join().expect("first").0, 200);
}

/// An HTTP/2 cleartext backend (what `grpc://` speaks) answering `h2 <path>`, `/slow` after
/// 3 s.
fn h2c_backend(rt: &tokio::runtime::Runtime, bind: &str) -> SocketAddr {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(bind))
        .expect("bind h2c");
    let addr = listener.local_addr().expect("h2c addr");
    rt.spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        if req.uri().path() == "/slow" {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                        }
                        let text = format!("h2 {}", req.uri().path());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(text)),
                        ))
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                        .await;
            });
        }
    });
    addr
}

#[test]
fn http2_backends_connect_the_same_way() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let six = h2c_backend(&rt, "[::1]:0");
    let dns = dns_server(
        &rt,
        Some(records(&[(
            "h2.portico-test.example.",
            &["127.0.0.1", "::1"],
        )])),
    );
    let config = write_config(
        dir.path(),
        &[("Echo", "/echo", None), ("Slow", "/slow", None)],
    );
    let named = format!("--backend=grpc://h2.portico-test.example:{}", six.port());
    let resolver = format!("--dns_resolver_addresses={dns}");

    // The name through the DNS servers, the family choosing the IPv6 address.
    let (p, port) = proxy(
        dir.path(),
        "h2-auto",
        &config,
        &[
            named.clone(),
            resolver.clone(),
            "--backend_dns_lookup_family=auto".into(),
        ],
    );
    let (status, body, _) = get(port, "/echo");
    assert_eq!((status, body.as_str()), (200, "h2 /echo"), "{}", p.log());
    let (p, port) = proxy(
        dir.path(),
        "h2-v4only",
        &config,
        &[
            named.clone(),
            resolver.clone(),
            "--backend_dns_lookup_family=v4only".into(),
        ],
    );
    let (status, body, _) = get(port, "/echo");
    assert_eq!(status, 503, "{body}\n{}", p.log());
    assert!(body.contains("delayed connect error: 111"), "{body}");

    // The connect timeout.
    let (_listener, _held, stuck) = full_backlog();
    let (p, port) = proxy(
        dir.path(),
        "h2-timeout",
        &config,
        &[
            format!("--backend=grpc://{stuck}"),
            "--cluster_connect_timeout=1s".into(),
            "--backend_retry_num=0".into(),
        ],
    );
    let (status, body, took) = get(port, "/echo");
    assert_eq!(
        (status, body.as_str()),
        (503, espv2::body(503, CONNECT_TIMEOUT).as_str()),
        "{}",
        p.log()
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "answered after {took:?}"
    );

    // The limit on requests in flight, over one multiplexed connection.
    let (p, port) = proxy(
        dir.path(),
        "h2-max1",
        &config,
        &[
            named,
            resolver,
            "--backend_dns_lookup_family=v6only".into(),
            "--backend_cluster_maximum_requests=1".into(),
        ],
    );
    let first = std::thread::spawn(move || get(port, "/slow"));
    std::thread::sleep(Duration::from_millis(500));
    let (status, body, _) = get(port, "/echo");
    assert_eq!(
        (status, body.as_str()),
        (
            503,
            espv2::body(
                503,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow"
            )
            .as_str()
        ),
        "{}",
        p.log()
    );
    let (status, body, _) = first.join().expect("first");
    assert_eq!((status, body.as_str()), (200, "h2 /slow"), "{}", p.log());
    let (status, _, _) = get(port, "/echo");
    assert_eq!(status, 200);
}
