//! End to end, `portico espv2` and JWTs the way ESPv2 treats them (issue 17 item 3), through
//! real processes: the backend receives the token's payload segment as
//! `X-Endpoint-API-UserInfo` (padded with `--jwt_pad_forward_payload_header`); tokens are read
//! from `Authorization: Bearer`, `X-Goog-Iap-Jwt-Assertion` and `?access_token=`; a provider
//! without audiences accepts `https://SERVICE` only, or any audience with
//! `--disable_jwt_audience_service_name_check`.
//!
//! The proxy is the real binary with a service config file; the backend (echoing the headers it
//! received) and the JWKS server are doubles on loopback ports chosen at run time.

mod common;

use common::espv2;
use common::free_port;
use common::peer::{self, Action, Request};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SERVICE: &str = "espv2-jwt.endpoints.e2e-proj.cloud.goog";
const ISSUER: &str = "https://issuer.example";
const AUDIENCE: &str = "e2e-audience";
const KID: &str = "e2e-kid";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

#[test]
fn user_info_locations_and_audiences_are_espv2s() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let g = portico_credentials::generate_rsa_key().expect("keygen");
    let mut jwk = serde_json::to_value(&g.public_jwk).expect("jwk");
    jwk["kid"] = KID.into();
    let jwks_doc = json!({"keys": [jwk]}).to_string();
    let jwks = peer::start(
        &rt,
        Arc::new(move |_: &Request| Action::Respond(200, jwks_doc.clone())),
    );
    let backend = peer::start(&rt, Arc::new(espv2::echo_headers));
    let signing = jsonwebtoken::EncodingKey::from_rsa_pem(g.private_pkcs8_pem.as_bytes())
        .expect("encoding key");
    let sign = |claims: Value| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        h.kid = Some(KID.to_string());
        jsonwebtoken::encode(&h, &claims, &signing).expect("sign")
    };

    let config = dir.path().join("service.json");
    std::fs::write(
        &config,
        json!({
            "name": SERVICE, "id": "2024-01-01r0",
            "apis": [{"name": "e2e.Api", "version": "v1"}],
            "http": {"rules": [
                {"selector": "e2e.Api.Jwt", "get": "/jwt"},
                {"selector": "e2e.Api.Own", "get": "/own"},
            ]},
            "authentication": {
                "providers": [
                    {"id": "p1", "issuer": ISSUER, "jwksUri": format!("http://{jwks}/jwks"), "audiences": AUDIENCE},
                    {"id": "own", "issuer": ISSUER, "jwksUri": format!("http://{jwks}/jwks")},
                ],
                "rules": [
                    {"selector": "e2e.Api.Jwt", "requirements": [{"providerId": "p1"}]},
                    {"selector": "e2e.Api.Own", "requirements": [{"providerId": "own"}]},
                ],
            },
        })
        .to_string(),
    )
    .expect("config");
    let flags = |extra: &[&str]| {
        let mut f = vec![
            format!("--service_json_path={}", config.display()),
            format!("--backend=http://{backend}"),
            "--skip_service_control_filter".to_string(),
            // A metadata server nobody asks: no method here needs a token of the proxy's own.
            format!("--metadata_url=http://127.0.0.1:{}", free_port()),
        ];
        f.extend(extra.iter().map(|s| s.to_string()));
        f
    };
    let (proxy, port) = espv2::start(dir.path(), "espv2", &flags(&[]));
    let (padded_proxy, padded_port) = espv2::start(
        dir.path(),
        "espv2-padded",
        &flags(&[
            "--jwt_pad_forward_payload_header",
            "--disable_jwt_audience_service_name_check",
        ]),
    );
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let get = |port: u16, path: &str, headers: &[(&str, &str)]| {
        let mut r = client.get(format!("http://127.0.0.1:{port}{path}"));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let resp = r.send().expect("request");
        (resp.status().as_u16(), resp.text().expect("body"))
    };

    // A payload whose base64url length is not a multiple of 4, so padding shows.
    let mut claims = json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "user", "exp": now() + 3600});
    let token = loop {
        let t = sign(claims.clone());
        if t.split('.').nth(1).map(str::len).unwrap_or(0) % 4 != 0 {
            break t;
        }
        claims["pad"] = format!("{}x", claims["pad"].as_str().unwrap_or("")).into();
    };
    let segment = token.split('.').nth(1).expect("payload").to_string();
    let bearer = format!("Bearer {token}");

    // X-Endpoint-API-UserInfo is the payload segment as sent; the client's copy never passes.
    let (status, body) = get(
        port,
        "/jwt",
        &[
            ("authorization", &bearer),
            ("x-endpoint-api-userinfo", "forged"),
        ],
    );
    assert_eq!(status, 200, "{body}\n{}", proxy.log());
    let seen: Value = serde_json::from_str(&body).expect("echo");
    assert_eq!(seen["x-endpoint-api-userinfo"], segment.as_str());
    assert_eq!(seen["authorization"], bearer.as_str());
    // Padded under --jwt_pad_forward_payload_header.
    let (status, body) = get(padded_port, "/jwt", &[("authorization", &bearer)]);
    assert_eq!(status, 200, "{body}\n{}", padded_proxy.log());
    let seen: Value = serde_json::from_str(&body).expect("echo");
    let want = format!("{segment}{}", "=".repeat(4 - segment.len() % 4));
    assert_eq!(seen["x-endpoint-api-userinfo"], want.as_str());

    // Where tokens are read.
    let missing = (
        401,
        "{\"code\":401,\"message\":\"Jwt is missing\"}\n".to_string(),
    );
    let iap = get(port, "/jwt", &[("x-goog-iap-jwt-assertion", &token)]);
    assert_eq!(iap.0, 200, "{}", iap.1);
    let query = get(port, &format!("/jwt?access_token={token}"), &[]);
    assert_eq!(query.0, 200, "{}", query.1);
    assert_eq!(get(port, "/jwt", &[("authorization", &token)]), missing);
    assert_eq!(
        get(port, &format!("/jwt?ACCESS_TOKEN={token}"), &[]),
        missing
    );

    // Audiences: the provider's own list excludes the service's name ...
    let to = |aud: &str| {
        format!(
            "Bearer {}",
            sign(json!({"iss": ISSUER, "aud": aud, "exp": now() + 3600}))
        )
    };
    let forbidden = (
        403,
        "{\"code\":403,\"message\":\"Audiences in Jwt are not allowed\"}\n".to_string(),
    );
    let service_aud = to(&format!("https://{SERVICE}"));
    assert_eq!(
        get(port, "/jwt", &[("authorization", &service_aud)]),
        forbidden
    );
    // ... a provider without audiences accepts exactly https://SERVICE ...
    assert_eq!(get(port, "/own", &[("authorization", &service_aud)]).0, 200);
    assert_eq!(
        get(port, "/own", &[("authorization", &to("someone-else"))]),
        forbidden
    );
    // ... or, with --disable_jwt_audience_service_name_check, any audience.
    assert_eq!(
        get(
            padded_port,
            "/own",
            &[("authorization", &to("someone-else"))]
        )
        .0,
        200
    );
    drop(rt);
}

/// A key set holding one fresh RSA key under [`KID`], and a signer for it.
fn key_pair() -> (String, impl Fn(Value) -> String) {
    let g = portico_credentials::generate_rsa_key().expect("keygen");
    let mut jwk = serde_json::to_value(&g.public_jwk).expect("jwk");
    jwk["kid"] = KID.into();
    let doc = json!({"keys": [jwk]}).to_string();
    let signing = jsonwebtoken::EncodingKey::from_rsa_pem(g.private_pkcs8_pem.as_bytes())
        .expect("encoding key");
    let sign = move |claims: Value| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        h.kid = Some(KID.to_string());
        jsonwebtoken::encode(&h, &claims, &signing).expect("sign")
    };
    (doc, sign)
}

/// A config with one JWT method (`GET /jwt`) whose provider takes its keys from `jwks_uri`
/// (none: OpenID discovery).
fn jwt_config(dir: &std::path::Path, name: &str, jwks_uri: Option<String>) -> std::path::PathBuf {
    let mut provider = json!({"id": "p1", "issuer": ISSUER, "audiences": AUDIENCE});
    if let Some(uri) = jwks_uri {
        provider["jwksUri"] = uri.into();
    }
    let path = dir.join(name);
    std::fs::write(
        &path,
        json!({
            "name": SERVICE, "id": "2024-01-01r0",
            "apis": [{"name": "e2e.Api", "version": "v1"}],
            "http": {"rules": [{"selector": "e2e.Api.Jwt", "get": "/jwt"}]},
            "authentication": {
                "providers": [provider],
                "rules": [{"selector": "e2e.Api.Jwt", "requirements": [{"providerId": "p1"}]}],
            },
        })
        .to_string(),
    )
    .expect("config");
    path
}

fn base_flags(config: &std::path::Path, backend: std::net::SocketAddr) -> Vec<String> {
    vec![
        format!("--service_json_path={}", config.display()),
        format!("--backend=http://{backend}"),
        "--skip_service_control_filter".to_string(),
        format!("--metadata_url=http://127.0.0.1:{}", free_port()),
    ]
}

/// `--jwks_fetch_num_retries` (with its back-off flags) retries a key-set fetch answered 5xx;
/// without it one failed fetch fails the request with ESPv2's message, and the next request
/// fetches again. `--jwt_cache_size=0` turns off the verified-token cache: after the issuer
/// rotates its key, a token verified before is checked again (and refused), where the default
/// cache still answers from memory.
#[test]
fn jwks_fetch_retries_and_the_jwt_cache_size_are_espv2s() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (doc, sign) = key_pair();
    let (other_doc, _) = key_pair();
    let backend = peer::start(&rt, Arc::new(espv2::echo_headers));
    // Answers its first `fail` requests 503, then the current key set; counts requests.
    let jwks_peer = |fail: usize, doc: Arc<Mutex<String>>| {
        let hits = Arc::new(AtomicUsize::new(0));
        let seen = hits.clone();
        let addr = peer::start(
            &rt,
            Arc::new(move |_: &Request| {
                if seen.fetch_add(1, Ordering::SeqCst) < fail {
                    Action::Respond(503, "{}".to_string())
                } else {
                    Action::Respond(200, doc.lock().expect("doc").clone())
                }
            }),
        );
        (format!("http://{addr}/jwks"), hits)
    };
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let token = sign(json!({"iss": ISSUER, "aud": AUDIENCE, "exp": now() + 3600}));
    let get = |port: u16| {
        let resp = client
            .get(format!("http://127.0.0.1:{port}/jwt"))
            .bearer_auth(&token)
            .send()
            .expect("request");
        (resp.status().as_u16(), resp.text().expect("body"))
    };
    let fetch_failed = (401, espv2::body(401, "Jwks remote fetch is failed"));

    // Two 503s, two retries: the first request is served.
    let (uri, hits) = jwks_peer(2, Arc::new(Mutex::new(doc.clone())));
    let mut flags = base_flags(&jwt_config(dir.path(), "retry.json", Some(uri)), backend);
    flags.extend([
        "--jwks_fetch_num_retries=2".to_string(),
        "--jwks_fetch_retry_back_off_base_interval_ms=1".to_string(),
        "--jwks_fetch_retry_back_off_max_interval_ms=20".to_string(),
    ]);
    let (retrying, port) = espv2::start(dir.path(), "retrying", &flags);
    let got = get(port);
    assert_eq!(got.0, 200, "{}\n{}", got.1, retrying.log());
    assert_eq!(hits.load(Ordering::SeqCst), 3);

    // One 503, no retries: refused, and the next request fetches again.
    let (uri, hits) = jwks_peer(1, Arc::new(Mutex::new(doc.clone())));
    let flags = base_flags(&jwt_config(dir.path(), "once.json", Some(uri)), backend);
    let (once, port) = espv2::start(dir.path(), "once", &flags);
    assert_eq!(get(port), fetch_failed, "{}", once.log());
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(get(port).0, 200, "{}", once.log());
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    // The verified-token cache, on (ESPv2's default size) and off.
    let keys = Arc::new(Mutex::new(doc.clone()));
    let (uri, _) = jwks_peer(0, keys.clone());
    let config = jwt_config(dir.path(), "cache.json", Some(uri));
    let mut flags = base_flags(&config, backend);
    flags.push("--jwks_cache_duration_in_s=1".to_string());
    let (cached, cached_port) = espv2::start(dir.path(), "cached", &flags);
    flags.push("--jwt_cache_size=0".to_string());
    let (uncached, uncached_port) = espv2::start(dir.path(), "uncached", &flags);
    assert_eq!(get(cached_port).0, 200, "{}", cached.log());
    assert_eq!(get(uncached_port).0, 200, "{}", uncached.log());
    // The issuer rotates its key under the same kid; past twice the key-set lifetime both
    // proxies fetch the new set before answering.
    *keys.lock().expect("doc") = other_doc;
    std::thread::sleep(Duration::from_millis(2_300));
    assert_eq!(get(cached_port).0, 200, "{}", cached.log());
    let got = get(uncached_port);
    assert_eq!(got.0, 401, "{}\n{}", got.1, uncached.log());
    drop(rt);
}

/// `--disable_oidc_discovery`: a provider without `jwks_uri` stops the proxy at start with
/// ESPv2's sentence (and the file named); without the flag the same config starts.
#[test]
fn disable_oidc_discovery_refuses_a_provider_without_jwks_uri() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let config = jwt_config(dir.path(), "no-jwks.json", None);
    let mut flags = base_flags(&config, backend);
    let (started, _) = espv2::start(dir.path(), "discovering", &flags);
    drop(started);

    flags.push("--disable_oidc_discovery".to_string());
    // Bounded: a proxy that wrongly starts is killed after 30 s and the test fails.
    let log = dir.path().join("refused.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portico"))
        .arg("espv2")
        .arg(format!("--listener_port={}", free_port()))
        .args(&flags)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("run portico espv2");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains(
            "error processing authentication provider (p1): jwks_uri is empty, but OpenID \
             Connect Discovery is disabled via startup option. Consider specifying the jwks_uri \
             in the provider config"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("no-jwks.json"), "{stderr}");
}
