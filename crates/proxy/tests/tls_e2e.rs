//! TLS end to end, with certificates made at test time (`rcgen`) and the real `curl`:
//! - downstream: a certificate from files (ESP's `--ssl_cert_path`, ESPv2's certificate
//!   directory), client certificates (ESPv2's `--ssl_server_root_cert_path`: required, refused in
//!   the handshake when missing or from another CA), protocol versions (`--ssl_protocols`,
//!   `--ssl_minimum_protocol`/`--ssl_maximum_protocol`) and TLS 1.2 cipher suites;
//! - upstream: a backend that requires a client certificate gets the proxy's (ESP's
//!   `--tls_mutual_auth`, ESPv2's `--ssl_backend_client_cert_path`) over HTTP/1.1 and HTTP/2, and
//!   without it the call fails with the proxy's 502.
//!
//! The ESPv2 flags go through [`portico_proxy::tls::Espv2TlsFlags`], the function `portico
//! espv2`'s parser calls; everything else is `portico esp`'s parser. Every server listens on a
//! loopback port the system picks; curl runs bounded in time and is killed if the test ends.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portico_config::Service;
use portico_proxy::config_source::Rollout;
use portico_proxy::server::{self, ProxyHandle};
use portico_proxy::tls::Espv2TlsFlags;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

// ---------------------------------------------------------------------------------------------
// Certificates.

/// A certificate authority made for one test.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, as PEM.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    fn issue(&self, cn: &str, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    fn server(&self) -> Leaf {
        self.issue("localhost", ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn client(&self, cn: &str) -> Leaf {
        self.issue(cn, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Writes `leaf` as `<stem>.crt` and `<stem>.key` in `dir`.
fn write_pair(dir: &Path, stem: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
    (
        write(dir, &format!("{stem}.crt"), &leaf.cert_pem),
        write(dir, &format!("{stem}.key"), &leaf.key_pem),
    )
}

// ---------------------------------------------------------------------------------------------
// Backends.

/// A plain HTTP/1.1 backend that counts requests and answers `backend saw <path>`.
async fn plain_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    h.fetch_add(1, Ordering::SeqCst);
                    let body = format!("backend saw {}", req.uri().path());
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

/// What the mTLS backend saw of its callers: each client certificate chain's first DER, and
/// the HTTP version of each request.
#[derive(Default)]
struct Seen {
    client_certs: Vec<Vec<u8>>,
    versions: Vec<http::Version>,
}

/// An HTTPS backend (HTTP/1.1 and h2 by ALPN) with `server` as its certificate that requires a
/// client certificate issued by `client_ca`.
async fn mtls_backend(server: &Leaf, client_ca: &Ca) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(client_ca.cert.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(
        rustls_pemfile::private_key(&mut server.key_pem.as_bytes())
            .unwrap()
            .unwrap()
            .secret_der()
            .to_vec(),
    )
    .unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server.der.clone().into()], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let seen = s2.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                if let Some(chain) = tls.get_ref().1.peer_certificates() {
                    if let Some(first) = chain.first() {
                        seen.lock().unwrap().client_certs.push(first.to_vec());
                    }
                }
                let svc = service_fn(move |req: Request<Incoming>| {
                    seen.lock().unwrap().versions.push(req.version());
                    let body = format!("mtls backend saw {}", req.uri().path());
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

// ---------------------------------------------------------------------------------------------
// The proxy.

/// A config with one method, `GET /known`, no Service Control and no authentication.
fn service() -> Arc<Service> {
    routed_service(None)
}

/// [`service`] with, for `Some(address)`, a backend rule sending the method to `address` over
/// HTTP/2 (`protocol: h2`; served with `--enable_backend_routing`).
fn routed_service(h2_address: Option<&str>) -> Arc<Service> {
    let mut svc = serde_json::json!({
        "name": "plain.example.com",
        "id": "2026-11-23r1",
        "http": {"rules": [{"selector": "1.plain.Get", "get": "/known"}]}
    });
    if let Some(address) = h2_address {
        svc["backend"] = serde_json::json!({"rules": [
            {"selector": "1.plain.Get", "address": address, "protocol": "h2"}
        ]});
        // ESP declines a config with neither Service Control nor authentication (proxies as
        // is, without routing); a JWT rule on another method makes this one routed.
        svc["http"]["rules"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"selector": "1.plain.Other", "get": "/other"}));
        svc["authentication"] = serde_json::json!({
            "providers": [{"id": "p", "issuer": "https://issuer.example", "jwksUri": "http://127.0.0.1:1/jwks"}],
            "rules": [{"selector": "1.plain.Other", "requirements": [{"providerId": "p"}]}]
        });
    }
    Arc::new(serde_json::from_value(svc).unwrap())
}

/// Starts the proxy in this process from `portico esp` flags; `espv2`, when given, replaces the
/// TLS settings as `portico espv2` does with these ESPv2 flags (a TLS listener in place of the
/// plain one when they ask for downstream TLS).
async fn proxy(args: &[String], espv2: Option<Espv2TlsFlags>, svc: Arc<Service>) -> ProxyHandle {
    let mut v: Vec<std::ffi::OsString> = vec![
        "portico esp".into(),
        "--service=plain.example.com".into(),
        "--status_port=0".into(),
        "--worker_threads=1".into(),
        "--access_log=off".into(),
    ];
    v.extend(args.iter().map(Into::into));
    let mut settings = portico_proxy::cli::parse(v).unwrap();
    if let Some(flags) = espv2 {
        let tls = portico_proxy::tls::from_espv2_flags(&flags).unwrap();
        if let Some(server_tls) = tls.server {
            settings.server_tls = server_tls;
            settings.ssl_port = Some(0);
            settings.http_port = None;
        }
        settings.backend_tls = tls.backend;
    }
    let rollout = Arc::new(Rollout {
        rollout_id: svc.id.clone(),
        configs: vec![(svc, 100)],
    });
    let (_tx, rx) = watch::channel(rollout);
    server::start(Arc::new(settings), rx, None).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// curl.

struct Curl {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs curl with `args`, at most 30 s; `-v` so the negotiated protocol is in stderr.
async fn curl(args: &[String]) -> Curl {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "-v", "--noproxy", "*", "--max-time", "20"])
        .args(args)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("curl finished within 30 s")
        .expect("curl runs");
    Curl {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `https://localhost:<port>/known` resolved to the proxy's address, trusting `ca`.
fn https_args(addr: SocketAddr, ca: &Path) -> Vec<String> {
    vec![
        "--resolve".into(),
        format!("localhost:{}:127.0.0.1", addr.port()),
        "--cacert".into(),
        ca.display().to_string(),
        format!("https://localhost:{}/known", addr.port()),
    ]
}

fn with(mut base: Vec<String>, extra: &[&str]) -> Vec<String> {
    let url = base.pop().unwrap();
    base.extend(extra.iter().map(|s| s.to_string()));
    base.push(url);
    base
}

fn s(x: impl std::fmt::Display) -> String {
    x.to_string()
}

// ---------------------------------------------------------------------------------------------
// Downstream.

/// ESP's `--ssl_port` with a CA-issued certificate and key from files: curl trusting the CA gets
/// the backend's answer over HTTP/2 and HTTP/1.1.
#[tokio::test]
async fn ssl_port_serves_the_certificate_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("downstream CA");
    let (crt, key) = write_pair(dir.path(), "nginx", &ca.server());
    let ca_pem = write(dir.path(), "ca.pem", &ca.pem());
    let (backend, hits) = plain_backend().await;
    let p = proxy(
        &[
            s("--ssl_port=0"),
            format!("--ssl_cert_path={}", crt.display()),
            format!("--ssl_key_path={}", key.display()),
            format!("--backend=127.0.0.1:{}", backend.port()),
        ],
        None,
        service(),
    )
    .await;
    let addr = p.ssl_addr.unwrap();
    let r = curl(&with(https_args(addr, &ca_pem), &["--http2"])).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, "backend saw /known");
    assert!(r.stderr.contains("using HTTP/2"), "{}", r.stderr);
    let r = curl(&with(https_args(addr, &ca_pem), &["--http1.1"])).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, "backend saw /known");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

/// ESPv2's `--ssl_server_cert_path`: a directory with `server.crt` and `server.key`; the
/// listener then speaks TLS only.
#[tokio::test]
async fn espv2_certificate_directory_serves_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("downstream CA");
    write_pair(dir.path(), "server", &ca.server());
    let ca_pem = write(dir.path(), "ca.pem", &ca.pem());
    let (backend, _) = plain_backend().await;
    let p = proxy(
        &[format!("--backend=127.0.0.1:{}", backend.port())],
        Some(Espv2TlsFlags {
            ssl_server_cert_path: Some(dir.path().display().to_string()),
            ..Default::default()
        }),
        service(),
    )
    .await;
    assert!(p.http_addr.is_none());
    let addr = p.ssl_addr.unwrap();
    let r = curl(&https_args(addr, &ca_pem)).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, "backend saw /known");
    // Plain HTTP on the TLS listener gets no answer from the backend.
    let r = curl(&[format!("http://127.0.0.1:{}/known", addr.port())]).await;
    assert_ne!(r.code, Some(0), "{}", r.stdout);
}

/// The three mTLS cases of ESPv2's `TestDownstreamMTLS`: a client certificate issued by the
/// configured root gets through; none, or one from another CA, is refused in the handshake and
/// nothing reaches the backend.
#[tokio::test]
async fn downstream_mtls_requires_a_client_certificate_from_the_configured_root() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    write_pair(dir.path(), "server", &server_ca.server());
    let ca_pem = write(dir.path(), "ca.pem", &server_ca.pem());
    let client_ca = Ca::new("client CA");
    let client_root = write(dir.path(), "client-root.pem", &client_ca.pem());
    let (good_crt, good_key) = write_pair(dir.path(), "good", &client_ca.client("good client"));
    let other_ca = Ca::new("another CA");
    let (bad_crt, bad_key) = write_pair(dir.path(), "bad", &other_ca.client("stranger"));

    let (backend, hits) = plain_backend().await;
    let p = proxy(
        &[format!("--backend=127.0.0.1:{}", backend.port())],
        Some(Espv2TlsFlags {
            ssl_server_cert_path: Some(dir.path().display().to_string()),
            ssl_server_root_cert_path: Some(client_root.display().to_string()),
            ..Default::default()
        }),
        service(),
    )
    .await;
    let addr = p.ssl_addr.unwrap();
    let base = https_args(addr, &ca_pem);

    let cert_args = |crt: &Path, key: &Path| {
        with(
            base.clone(),
            &[
                "--cert",
                &crt.display().to_string(),
                "--key",
                &key.display().to_string(),
            ],
        )
    };
    let r = curl(&cert_args(&good_crt, &good_key)).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, "backend saw /known");
    // Over TLS 1.2 as well.
    let r = curl(&with(
        cert_args(&good_crt, &good_key),
        &["--tls-max", "1.2"],
    ))
    .await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    // No certificate, or one from another CA: refused. In TLS 1.3 the client's handshake is
    // over before the server has checked its certificate, so the alert may come after curl has
    // sent the request and see the connection closed first; over TLS 1.2 the alert ends the
    // handshake itself (rustls sends "certificate required" for both versions, Envoy
    // "handshake failure" for 1.2), so that is where its name is checked.
    let refused = |r: &Curl, alert: &str| {
        assert_ne!(r.code, Some(0), "{}", r.stdout);
        assert!(!r.stdout.contains("backend saw"), "{}", r.stdout);
        assert!(r.stderr.to_lowercase().contains(alert), "{}", r.stderr);
    };
    refused(&curl(&base).await, "");
    refused(
        &curl(&with(base.clone(), &["--tls-max", "1.2"])).await,
        "alert certificate required",
    );
    refused(&curl(&cert_args(&bad_crt, &bad_key)).await, "");
    refused(
        &curl(&with(cert_args(&bad_crt, &bad_key), &["--tls-max", "1.2"])).await,
        "alert unknown ca",
    );

    // The server's own certificate is not a client certificate of the configured root either.
    let r = curl(&cert_args(
        &dir.path().join("server.crt"),
        &dir.path().join("server.key"),
    ))
    .await;
    assert_ne!(r.code, Some(0), "{}", r.stdout);

    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "refused clients reached the backend"
    );
}

/// `--ssl_minimum_protocol=TLSv1.3` refuses a client limited to TLS 1.2 (and accepts 1.3);
/// `--ssl_maximum_protocol=TLSv1.2` refuses a client that insists on 1.3.
#[tokio::test]
async fn minimum_and_maximum_protocol_versions() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("downstream CA");
    write_pair(dir.path(), "server", &ca.server());
    let ca_pem = write(dir.path(), "ca.pem", &ca.pem());
    let (backend, hits) = plain_backend().await;
    let flags = |min: Option<&str>, max: Option<&str>| Espv2TlsFlags {
        ssl_server_cert_path: Some(dir.path().display().to_string()),
        ssl_minimum_protocol: min.map(str::to_string),
        ssl_maximum_protocol: max.map(str::to_string),
        ..Default::default()
    };
    let backend_flag = format!("--backend=127.0.0.1:{}", backend.port());

    let p = proxy(
        std::slice::from_ref(&backend_flag),
        Some(flags(Some("TLSv1.3"), None)),
        service(),
    )
    .await;
    let base = https_args(p.ssl_addr.unwrap(), &ca_pem);
    let r = curl(&with(base.clone(), &["--tls-max", "1.2"])).await;
    assert_ne!(r.code, Some(0), "{}", r.stdout);
    assert!(
        r.stderr.to_lowercase().contains("protocol version"),
        "{}",
        r.stderr
    );
    let r = curl(&base).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("TLSv1.3"), "{}", r.stderr);
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let p = proxy(
        std::slice::from_ref(&backend_flag),
        Some(flags(None, Some("TLSv1.2"))),
        service(),
    )
    .await;
    let base = https_args(p.ssl_addr.unwrap(), &ca_pem);
    let r = curl(&with(base.clone(), &["--tlsv1.3"])).await;
    assert_ne!(r.code, Some(0), "{}", r.stdout);
    let r = curl(&base).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("TLSv1.2"), "{}", r.stderr);
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    // TLSv1.0 as the minimum is raised to TLS 1.2 (a warning at start), not refused.
    let p = proxy(
        &[backend_flag],
        Some(flags(Some("TLSv1.0"), None)),
        service(),
    )
    .await;
    let base = https_args(p.ssl_addr.unwrap(), &ca_pem);
    let r = curl(&with(base, &["--tls-max", "1.2"])).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

/// ESP's `--ssl_protocols` (nginx's list, any case): `TLSv1.3` alone refuses a TLS 1.2 client.
#[tokio::test]
async fn esp_ssl_protocols_limit_the_versions() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("downstream CA");
    let (crt, key) = write_pair(dir.path(), "nginx", &ca.server());
    let ca_pem = write(dir.path(), "ca.pem", &ca.pem());
    let (backend, _) = plain_backend().await;
    let p = proxy(
        &[
            s("--ssl_port=0"),
            format!("--ssl_cert_path={}", crt.display()),
            format!("--ssl_key_path={}", key.display()),
            format!("--backend=127.0.0.1:{}", backend.port()),
            s("--ssl_protocols=tlsv1.3"),
        ],
        None,
        service(),
    )
    .await;
    let base = https_args(p.ssl_addr.unwrap(), &ca_pem);
    let r = curl(&with(base.clone(), &["--tls-max", "1.2"])).await;
    assert_ne!(r.code, Some(0), "{}", r.stdout);
    let r = curl(&base).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

/// `--ssl_server_cipher_suites` chooses the TLS 1.2 suites: a client offering only another one
/// is refused, one offering the listed one gets it.
#[tokio::test]
async fn server_cipher_suites_choose_the_tls12_suites() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("downstream CA");
    write_pair(dir.path(), "server", &ca.server());
    let ca_pem = write(dir.path(), "ca.pem", &ca.pem());
    let (backend, _) = plain_backend().await;
    let p = proxy(
        &[format!("--backend=127.0.0.1:{}", backend.port())],
        Some(Espv2TlsFlags {
            ssl_server_cert_path: Some(dir.path().display().to_string()),
            ssl_server_cipher_suites: Some("ECDHE-ECDSA-CHACHA20-POLY1305".into()),
            ..Default::default()
        }),
        service(),
    )
    .await;
    let base = with(
        https_args(p.ssl_addr.unwrap(), &ca_pem),
        &["--tls-max", "1.2"],
    );
    let r = curl(&with(
        base.clone(),
        &["--ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256"],
    ))
    .await;
    assert_ne!(r.code, Some(0), "{}", r.stdout);
    let r = curl(&with(
        base.clone(),
        &[
            "--ciphers",
            "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305",
        ],
    ))
    .await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr.contains("TLSv1.2 / ECDHE-ECDSA-CHACHA20-POLY1305"),
        "{}",
        r.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// Upstream.

/// ESP's `--tls_mutual_auth` (with Portico's `--backend_client_cert_path` and
/// `--backend_client_key_path` in place of `/etc/nginx/ssl/backend.{crt,key}`): a backend that
/// requires a client certificate gets the proxy's and answers; without the flag the call fails
/// with ESP's 502.
#[tokio::test]
async fn esp_tls_mutual_auth_presents_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let backend_ca = Ca::new("backend CA");
    let client_ca = Ca::new("proxy client CA");
    let proxy_cert = client_ca.client("portico");
    let (crt, key) = write_pair(dir.path(), "backend", &proxy_cert);
    let backend_ca_pem = write(dir.path(), "backend-ca.pem", &backend_ca.pem());
    let (backend, seen) = mtls_backend(&backend_ca.server(), &client_ca).await;
    let common = [
        format!("--backend=https://localhost:{}", backend.port()),
        format!("--backend_ca_cert_path={}", backend_ca_pem.display()),
        s("--http_port=0"),
    ];

    let mut args = common.to_vec();
    args.extend([
        s("--tls_mutual_auth"),
        format!("--backend_client_cert_path={}", crt.display()),
        format!("--backend_client_key_path={}", key.display()),
    ]);
    let p = proxy(&args, None, service()).await;
    let r = curl(&[format!("http://{}/known", p.http_addr.unwrap())]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, "mtls backend saw /known");
    assert_eq!(
        seen.lock().unwrap().client_certs,
        vec![proxy_cert.der.clone()]
    );

    let p = proxy(&common, None, service()).await;
    let r = curl(&[
        "-w".into(),
        "%{http_code}".into(),
        format!("http://{}/known", p.http_addr.unwrap()),
    ])
    .await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout.contains("BAD_GATEWAY") && r.stdout.ends_with("502"),
        "{}",
        r.stdout
    );
    assert_eq!(
        seen.lock().unwrap().client_certs.len(),
        1,
        "no other certificate arrived"
    );
}

/// ESPv2's `--ssl_backend_client_cert_path` (a directory with `client.crt`/`client.key`) and
/// `--ssl_backend_client_root_certs_file` (the only trust anchors for backends): with the
/// backend's CA in the file the call gets through, presenting the client certificate, to
/// `--backend` over HTTP/1.1 and to a backend rule's address over HTTP/2 (`protocol: h2`);
/// with another CA's certificate in the file it fails with 502.
#[tokio::test]
async fn espv2_backend_client_certificate_and_root_file() {
    let dir = tempfile::tempdir().unwrap();
    let backend_ca = Ca::new("backend CA");
    let client_ca = Ca::new("proxy client CA");
    let proxy_cert = client_ca.client("portico");
    let certs = tempfile::tempdir().unwrap();
    write_pair(certs.path(), "client", &proxy_cert);
    let roots = write(dir.path(), "roots.pem", &backend_ca.pem());
    let wrong_roots = write(dir.path(), "wrong.pem", &Ca::new("unrelated").pem());
    let (backend, seen) = mtls_backend(&backend_ca.server(), &client_ca).await;
    let address = format!("https://localhost:{}", backend.port());
    let args = [format!("--backend={address}"), s("--http_port=0")];
    let flags = |roots: &Path| Espv2TlsFlags {
        ssl_backend_client_cert_path: Some(certs.path().display().to_string()),
        ssl_backend_client_root_certs_file: Some(roots.display().to_string()),
        ..Default::default()
    };

    for h2 in [false, true] {
        let (svc, mut args) = (
            routed_service(h2.then_some(address.as_str())),
            args.to_vec(),
        );
        if h2 {
            args.push(s("--enable_backend_routing"));
        }
        let p = proxy(&args, Some(flags(&roots)), svc).await;
        let r = curl(&[format!("http://{}/known", p.http_addr.unwrap())]).await;
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert_eq!(r.stdout, "mtls backend saw /known", "h2: {h2}");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.client_certs.last(), Some(&proxy_cert.der));
        let want = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        assert_eq!(seen.versions.last(), Some(&want));
    }

    let before = seen.lock().unwrap().versions.len();
    let p = proxy(&args, Some(flags(&wrong_roots)), service()).await;
    let r = curl(&[
        "-w".into(),
        "%{http_code}".into(),
        format!("http://{}/known", p.http_addr.unwrap()),
    ])
    .await;
    assert!(r.stdout.ends_with("502"), "{}", r.stdout);
    assert_eq!(seen.lock().unwrap().versions.len(), before);
}
