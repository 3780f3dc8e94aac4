//! End to end: `portico espv2 --health_check_grpc_backend` polling the real `portico bookstore`'s
//! `grpc.health.v1.Health/Check`, and `--healthz` following it as ESPv2's does (200 while the
//! backend is healthy, 503 while not); the backend's status is flipped with the Bookstore's
//! `x-bookstore-set-health` control metadata on a direct call. Also: a backend without the
//! health service, the service name flag, no health checking at all, and refused flag values.

mod common;

use common::bookstore::{self, get_shelf_request, GET_SHELF};
use common::{espv2, free_port, Proc};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn proxy(dir: &Path, name: &str, backend: u16, extra: &[&str]) -> (Proc, u16) {
    let mut flags = vec![
        format!(
            "--service_json_path={}",
            bookstore::pass_through_config(dir).display()
        ),
        format!("--backend=grpc://127.0.0.1:{backend}"),
        "--skip_service_control_filter".to_string(),
        format!("--metadata_url=http://127.0.0.1:{}", free_port()),
        "--healthz=healthz".to_string(),
    ];
    flags.extend(extra.iter().map(|s| s.to_string()));
    espv2::start(dir, name, &flags)
}

/// `GET /healthz` over HTTP/1.1: the status code.
fn healthz(port: u16) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).expect("status line");
    String::from_utf8_lossy(&head[9..12]).parse().unwrap_or(0)
}

/// Polls `--healthz` until it answers `want`, at most `within`; the time it took.
fn wait_healthz(port: u16, want: u16, within: Duration, log: &dyn Fn() -> String) -> Duration {
    let start = Instant::now();
    loop {
        let got = healthz(port);
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "healthz still {got}, not {want}, after {within:?}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sets the Bookstore's health for `service` ("" = the server) with a direct call.
fn set_health(backend: u16, status: &str, service: Option<&str>) {
    let mut headers = vec![format!("x-bookstore-set-health: {status}")];
    if let Some(s) = service {
        headers.push(format!("x-bookstore-set-health-service: {s}"));
    }
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    let r = bookstore::call(backend, GET_SHELF, &get_shelf_request(100), &headers, false);
    assert_eq!(r.status, 200);
    assert_eq!(r.last("grpc-status"), Some("0"), "{:?}", r.headers);
}

/// The Bookstore (started with `store_flags`) and a proxy in front of it with `proxy_flags`,
/// in a fresh directory; `None` (test skipped) without curl outside CI.
fn backend_and_proxy(store_flags: &[&str], proxy_flags: &[&str]) -> Option<Setup> {
    if Command::new("curl").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "curl is required in CI");
        eprintln!("SKIPPED: curl not found");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, bport) = bookstore::start(dir.path(), "bookstore", store_flags);
    let (proxy, port) = proxy(dir.path(), "proxy", bport, proxy_flags);
    Some(Setup {
        dir,
        store: Some(store),
        bport,
        proxy,
        port,
    })
}

struct Setup {
    dir: tempfile::TempDir,
    store: Option<Proc>,
    bport: u16,
    proxy: Proc,
    port: u16,
}

impl Setup {
    /// Both logs, for failure messages (the Bookstore's read from its file: it may be gone).
    fn logs(&self) -> String {
        let store =
            std::fs::read_to_string(self.dir.path().join("bookstore.log")).unwrap_or_default();
        format!("proxy:\n{}\nbookstore:\n{store}", self.proxy.log())
    }
}

#[test]
fn healthz_follows_the_grpc_backends_health() {
    // ESPv2's own test shortens the no-traffic interval the same way: no request reaches the
    // backend through the proxy here, and the default would wait 60 s between checks.
    let Some(mut t) = backend_and_proxy(
        &[],
        &[
            "--health_check_grpc_backend",
            "--health_check_grpc_backend_no_traffic_interval=200ms",
        ],
    ) else {
        return;
    };
    let (bport, port) = (t.bport, t.port);
    // The first check runs at start-up, and one success is enough then.
    wait_healthz(port, 200, Duration::from_secs(10), &|| t.logs());

    // NOT_SERVING is an active failure: unhealthy at the next check.
    set_health(bport, "NOT_SERVING", None);
    let took = wait_healthz(port, 503, Duration::from_secs(3), &|| t.logs());
    eprintln!("503 after {took:?}");
    assert!(
        t.logs().contains("the gRPC backend is unhealthy"),
        "{}",
        t.logs()
    );
    // The proxy still routes to it (Envoy's panic threshold with one host).
    let r = bookstore::call(port, GET_SHELF, &get_shelf_request(100), &[], false);
    assert_eq!(
        r.last("grpc-status"),
        Some("0"),
        "{:?}\n{}",
        r.headers,
        t.logs()
    );

    // Back to SERVING: three successes in a row. The request above was traffic, so checks
    // now follow the 1 s interval.
    set_health(bport, "SERVING", None);
    let took = wait_healthz(port, 200, Duration::from_secs(6), &|| t.logs());
    eprintln!("200 again after {took:?}");
    assert!(
        took >= Duration::from_millis(1500),
        "took {took:?}: fewer than 3 checks?"
    );

    // The Bookstore gone: network failures, three in a row at the 1 s interval.
    drop(t.store.take());
    let took = wait_healthz(port, 503, Duration::from_secs(8), &|| t.logs());
    eprintln!("503 after the backend stopped: {took:?}");
}

#[test]
fn the_service_flag_names_the_service_checked() {
    let Some(t) = backend_and_proxy(
        &[],
        &[
            "--health_check_grpc_backend",
            "--health_check_grpc_backend_no_traffic_interval=200ms",
            "--health_check_grpc_backend_service=endpoints.examples.bookstore.Bookstore",
        ],
    ) else {
        return;
    };
    let (bport, port) = (t.bport, t.port);
    let log = || t.logs();
    // The Bookstore's health service knows only the server ("") until told: NOT_FOUND.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(healthz(port), 503, "{}", log());
    set_health(
        bport,
        "SERVING",
        Some("endpoints.examples.bookstore.Bookstore"),
    );
    wait_healthz(port, 200, Duration::from_secs(3), &log);
    // The server as a whole going down does not matter to this name.
    set_health(bport, "NOT_SERVING", None);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(healthz(port), 200, "{}", log());
    set_health(
        bport,
        "NOT_SERVING",
        Some("endpoints.examples.bookstore.Bookstore"),
    );
    wait_healthz(port, 503, Duration::from_secs(3), &log);
}

#[test]
fn a_backend_without_the_health_service_is_unhealthy() {
    let Some(t) = backend_and_proxy(
        &["--no-health-service"],
        &[
            "--health_check_grpc_backend",
            "--health_check_grpc_backend_interval=100ms",
            "--health_check_grpc_backend_no_traffic_interval=100ms",
        ],
    ) else {
        return;
    };
    let port = t.port;
    let log = || t.logs();
    // UNIMPLEMENTED, every 100 ms for a second: never healthy.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        assert_eq!(healthz(port), 503, "{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(log().contains("grpc-status 12"), "{}", log());
    // The service itself works.
    let r = bookstore::call(port, GET_SHELF, &get_shelf_request(100), &[], false);
    assert_eq!(r.last("grpc-status"), Some("0"), "{:?}", r.headers);
}

#[test]
fn without_the_flag_healthz_does_not_look_at_the_backend() {
    let Some(t) = backend_and_proxy(&[], &[]) else {
        return;
    };
    let (bport, port) = (t.bport, t.port);
    set_health(bport, "NOT_SERVING", None);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(healthz(port), 200);
}

#[test]
fn bad_health_check_flags_are_refused_with_a_sentence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let refused = |flags: &[&str]| -> String {
        let mut args = vec![
            "espv2".to_string(),
            format!("--listener_port={}", free_port()),
            format!(
                "--service_json_path={}",
                bookstore::pass_through_config(dir.path()).display()
            ),
            format!("--metadata_url=http://127.0.0.1:{}", free_port()),
        ];
        args.extend(flags.iter().map(|s| s.to_string()));
        let out = Command::new(env!("CARGO_BIN_EXE_portico"))
            .args(&args)
            .output()
            .expect("run portico");
        assert_eq!(out.status.code(), Some(1), "{flags:?}");
        String::from_utf8_lossy(&out.stderr).trim().to_string()
    };
    let grpc = "--backend=grpc://127.0.0.1:1";
    let check = "--health_check_grpc_backend";
    for (flags, want) in [
        (
            vec![check],
            "Flag --health_check_grpc_backend requires the flag --backend to use grpc scheme.",
        ),
        (
            vec!["--backend=http://127.0.0.1:1", check],
            "Flag --health_check_grpc_backend requires the flag --backend to use grpc scheme.",
        ),
        (
            vec![grpc, "--health_check_grpc_backend_interval=1s"],
            "Flag --health_check_grpc_backend_interval requires the flag \
             --health_check_grpc_backend to be used.",
        ),
        (
            vec![grpc, "--health_check_grpc_backend_service=x"],
            "Flag --health_check_grpc_backend_service requires the flag \
             --health_check_grpc_backend to be used.",
        ),
        (
            vec![grpc, "--health_check_grpc_backend_no_traffic_interval=1s"],
            "Flag --health_check_grpc_backend_no_traffic_interval requires the flag \
             --health_check_grpc_backend to be used.",
        ),
        (
            vec![grpc, check, "--health_check_grpc_backend_interval=0s"],
            "invalid --health_check_grpc_backend_interval '0s': it must be above 0; give a \
             duration such as 1s or 500ms",
        ),
        (
            vec![grpc, check, "--health_check_grpc_backend_interval=-1s"],
            "invalid --health_check_grpc_backend_interval '-1s': negative; give a duration \
             such as 1s or 500ms",
        ),
        (
            vec![grpc, check, "--health_check_grpc_backend_interval=soon"],
            "invalid --health_check_grpc_backend_interval 'soon': not a duration; give a \
             duration such as 1s or 500ms",
        ),
        (
            vec![grpc, check, "--health_check_grpc_backend_interval=5"],
            "invalid --health_check_grpc_backend_interval '5': a number needs a unit (ns, us, \
             ms, s, m, h); give a duration such as 1s or 500ms",
        ),
        (
            vec![
                grpc,
                check,
                "--health_check_grpc_backend_no_traffic_interval=0",
            ],
            "invalid --health_check_grpc_backend_no_traffic_interval '0': it must be above 0; \
             give a duration such as 1s or 500ms",
        ),
        (
            vec![
                grpc,
                check,
                "--health_check_grpc_backend_no_traffic_interval=25h",
            ],
            "invalid --health_check_grpc_backend_no_traffic_interval '25h': it must be at most \
             24h; give a duration such as 1s or 500ms",
        ),
    ] {
        let got = refused(&flags);
        assert!(got.ends_with(want), "{flags:?}:\n{got}\nwant: {want}");
    }
}

#[test]
fn a_grpcs_backend_is_checked_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let cert = dir.path().join("books.crt");
    let key = dir.path().join("books.key");
    std::fs::write(&cert, ck.cert.pem()).expect("cert file");
    std::fs::write(&key, ck.key_pair.serialize_pem()).expect("key file");
    let (_store, bport) = bookstore::start(
        dir.path(),
        "bookstore",
        &[
            &format!("--tls-cert={}", cert.display()),
            &format!("--tls-key={}", key.display()),
        ],
    );
    let flags = |trust: bool| {
        let mut f = vec![
            format!(
                "--service_json_path={}",
                bookstore::pass_through_config(dir.path()).display()
            ),
            format!("--backend=grpcs://localhost:{bport}"),
            "--skip_service_control_filter".to_string(),
            format!("--metadata_url=http://127.0.0.1:{}", free_port()),
            "--healthz=healthz".to_string(),
            "--health_check_grpc_backend".to_string(),
            "--health_check_grpc_backend_no_traffic_interval=200ms".to_string(),
        ];
        if trust {
            f.push(format!(
                "--ssl_backend_client_root_certs_file={}",
                cert.display()
            ));
        }
        f
    };
    let (trusting, port) = espv2::start(dir.path(), "trusting", &flags(true));
    wait_healthz(port, 200, Duration::from_secs(10), &|| trusting.log());
    // A certificate the proxy does not trust is a failed check, never a cleartext one.
    let (wary, wport) = espv2::start(dir.path(), "wary", &flags(false));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(healthz(wport), 503, "{}", wary.log());
}
