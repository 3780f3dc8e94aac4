//! End to end: `portico espv2`'s credential flags through real processes on loopback ports
//! chosen at run time.
//!
//! - `--iam_url`, `--service_control_iam_service_account`/`--backend_auth_iam_service_account`
//!   and their delegates, against a real `portico control-plane`: the backend gets an ID token
//!   of the impersonated account, and Service Control's `:check` passes only because it
//!   carries the other account's access token (the proxy's own account may not check); a
//!   delegation chain through an account that does not exist gets no token.
//! - `--dependency_error_behavior`: by default the proxy does not listen while the metadata
//!   server refuses its tokens, and listens once it answers; with `ALWAYS_INIT` it listens at
//!   once and the request that needs the token gets ESPv2's error.
//! - `--http_request_timeout_s`: an IAM peer, a Service Management and a metadata server that
//!   never answer are given up on after the set time, not ESPv2's default 30 s.
//! - `--enable_application_default_credentials`: gcloud's well-known file under
//!   `CLOUDSDK_CONFIG` is found and used; user credentials are refused naming the file.

mod common;

use base64::Engine as _;
use common::peer::{self, Action, Request};
use common::{espv2, free_port, ControlPlane, Db, Proc};
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PROJECT: &str = "iam-creds-proj";
const SERVICE: &str = "iam-creds.endpoints.iam-creds-proj.cloud.goog";
const AUDIENCE: &str = "https://impersonated-backend.test";
const TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";
const IDENTITY_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/identity";

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .no_proxy()
        .build()
        .expect("client")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// The claims of a JWT, read without verifying it.
fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("JWT payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

/// The `Authorization` the echo backend saw, from its JSON answer.
fn backend_authorization(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    v["authorization"]
        .as_str()
        .unwrap_or_else(|| panic!("no authorization: {v}"))
        .to_string()
}

fn openapi(backend: &str) -> String {
    format!(
        r#"swagger: "2.0"
info: {{title: IamCreds, version: 1.0.0}}
host: "{SERVICE}"
securityDefinitions:
  api_key: {{type: apiKey, name: key, in: query}}
security: [{{api_key: []}}]
paths:
  /private:
    get:
      operationId: private
      responses: {{"200": {{description: ok}}}}
      x-google-backend:
        address: "{backend}/private"
        jwt_audience: "{AUDIENCE}"
"#
    )
}

#[test]
fn iam_tokens_of_other_accounts_for_service_control_and_backends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(&dir.path().join("cp"), &Db::Sqlite);
    let api = cp.api();
    let email = |id: &str| format!("{id}@{PROJECT}.iam.gserviceaccount.com");
    for id in ["iam-proxy", "iam-hop", "iam-sc-caller", "iam-backend-id"] {
        api.post(
            &format!("/v1/projects/{PROJECT}/serviceAccounts"),
            json!({"accountId": id}),
        );
    }
    let (_, key_text) = api.create_key(&email("iam-proxy"));
    let key_file = dir.path().join("proxy-key.json");
    std::fs::write(&key_file, &key_text).expect("key file");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let backend = peer::start(&rt, Arc::new(espv2::echo_headers));
    // The Service Control caller is the only one the service lets check and report.
    api.deploy(
        SERVICE,
        PROJECT,
        &openapi(&format!("http://{backend}")),
        &email("iam-sc-caller"),
    );
    api.enable(PROJECT, SERVICE);
    let member = |id: &str| format!("serviceAccount:{}", email(id));
    // The proxy may read configs (viewer) and act for accounts in the project, and so may the
    // delegate it goes through.
    api.post(
        &format!("/v1/projects/{PROJECT}:setIamPolicy"),
        json!({"policy": {"bindings": [
            {"role": "roles/iam.serviceAccountTokenCreator",
             "members": [member("iam-proxy"), member("iam-hop")]},
            {"role": "roles/viewer", "members": [member("iam-proxy")]},
        ]}}),
    );
    let op = api.post(
        &format!("/v2/projects/{PROJECT}/locations/global/keys"),
        json!({"displayName": "iam-creds"}),
    );
    let api_key = api.wait_v2(op)["keyString"]
        .as_str()
        .expect("keyString")
        .to_string();

    let base_flags = |extra: &[String]| {
        let mut v = vec![
            format!("--service={SERVICE}"),
            "--rollout_strategy=managed".to_string(),
            format!("--service_account_key={}", key_file.display()),
            format!("--backend=http://{backend}"),
            // GCP mode (backend authentication on) without a metadata server to ask.
            format!("--metadata_url=http://127.0.0.1:{}", free_port()),
            "--service_control_network_fail_policy=close".to_string(),
        ];
        v.extend(extra.iter().cloned());
        v
    };
    let get = |port: u16| {
        let resp = client()
            .get(format!("http://127.0.0.1:{port}/private?key={api_key}"))
            .send()
            .expect("request");
        (resp.status().as_u16(), resp.text().unwrap_or_default())
    };

    // Impersonating, through the delegate: the check passes, the backend gets the other
    // account's ID token.
    let iam = [
        format!("--iam_url={}", cp.url),
        format!(
            "--service_control_iam_service_account={}",
            email("iam-sc-caller")
        ),
        format!("--service_control_iam_delegates={}", email("iam-hop")),
        format!(
            "--backend_auth_iam_service_account={}",
            email("iam-backend-id")
        ),
        format!("--backend_auth_iam_delegates={}", email("iam-hop")),
    ];
    let (proxy, port) = espv2::start(dir.path(), "impersonating", &base_flags(&iam));
    let (status, body) = get(port);
    assert_eq!(status, 200, "{body}\n{}", proxy.log());
    let auth = backend_authorization(&body);
    let c = claims(auth.strip_prefix("Bearer ").expect("bearer"));
    assert_eq!(c["email"], email("iam-backend-id"), "{c}");
    assert_eq!(c["aud"], AUDIENCE, "{c}");
    assert_eq!(c["iss"], cp.url, "{c}");
    let cp_log = cp.log();
    assert!(
        cp_log.contains("issued access token (generateAccessToken)")
            && cp_log.contains(&email("iam-sc-caller")),
        "{cp_log}"
    );
    drop(proxy);

    // The same proxy as itself: its account may not check, and the backend gets its token.
    let (proxy, port) = espv2::start(dir.path(), "as-itself", &base_flags(&[]));
    let (status, body) = get(port);
    assert_ne!(status, 200, "{body}");
    drop(proxy);

    // A chain through an account that does not exist: IAM refuses, the backend's token cannot
    // be had (ALWAYS_INIT, or the proxy would not listen at all).
    let broken = [
        format!("--iam_url={}", cp.url),
        format!(
            "--service_control_iam_service_account={}",
            email("iam-sc-caller")
        ),
        format!(
            "--backend_auth_iam_service_account={}",
            email("iam-backend-id")
        ),
        format!("--backend_auth_iam_delegates={}", email("iam-ghost")),
        "--dependency_error_behavior=ALWAYS_INIT".to_string(),
    ];
    let (proxy, port) = espv2::start(dir.path(), "broken-chain", &base_flags(&broken));
    let (status, body) = get(port);
    assert_eq!(
        (status, body.as_str()),
        (
            500,
            espv2::body(500, &format!("Token not found for audience: {AUDIENCE}")).as_str()
        ),
        "{}",
        proxy.log()
    );
    assert!(
        proxy.log().contains("generateIdToken answered 403"),
        "{}",
        proxy.log()
    );
    drop(rt);
}

/// A metadata server whose token and identity answers fail (503) while `failing` is set;
/// `asked` counts token requests.
fn flaky_metadata(
    failing: Arc<AtomicBool>,
    asked: Arc<AtomicUsize>,
) -> impl Fn(&Request) -> Action + Send + Sync + 'static {
    move |r: &Request| {
        let (path, query) = r.path.split_once('?').unwrap_or((r.path.as_str(), ""));
        match path {
            TOKEN_PATH | IDENTITY_PATH => {
                asked.fetch_add(1, Ordering::SeqCst);
                if failing.load(Ordering::SeqCst) {
                    return Action::Respond(503, "not yet".into());
                }
                if path == TOKEN_PATH {
                    return Action::Respond(
                        200,
                        json!({"access_token": "meta-access", "expires_in": 3600}).to_string(),
                    );
                }
                let aud = reqwest::Url::parse(&format!("http://md/?{query}"))
                    .ok()
                    .and_then(|u| {
                        u.query_pairs()
                            .find(|(k, _)| k == "audience")
                            .map(|(_, v)| v.into_owned())
                    })
                    .unwrap_or_default();
                let b64 = |v: Value| {
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
                };
                Action::Respond(
                    200,
                    format!(
                        "{}.{}.c2ln",
                        b64(json!({"alg": "RS256"})),
                        b64(json!({"aud": aud, "exp": now() + 3600, "email": "meta@x"}))
                    ),
                )
            }
            "/" => Action::Respond(200, "computeMetadata/\n".into()),
            _ => Action::Respond(404, "not found".into()),
        }
    }
}

/// A `google.api.Service` with one method whose backend needs an ID token and whose calls need
/// no API key (so only a report follows).
fn service_json(dir: &std::path::Path, backend: std::net::SocketAddr) -> std::path::PathBuf {
    let config = json!({
        "name": "creds.endpoints.p.cloud.goog",
        "id": "2024-06-01r0",
        "producerProjectId": "p",
        "apis": [{"name": "creds.Api", "version": "v1"}],
        "http": {"rules": [{"selector": "creds.Api.Private", "get": "/private"}]},
        "usage": {"rules": [{"selector": "creds.Api.Private", "allowUnregisteredCalls": true}]},
        "backend": {"rules": [{"selector": "creds.Api.Private",
            "address": format!("http://{backend}"), "jwtAudience": AUDIENCE}]},
    });
    let path = dir.join("service.json");
    std::fs::write(&path, config.to_string()).expect("service json");
    path
}

fn accepts(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
        .is_ok()
}

#[test]
fn dependency_error_behavior_blocks_until_tokens_or_serves_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let backend = peer::start(&rt, Arc::new(espv2::echo_headers));
    let sc = peer::start(
        &rt,
        Arc::new(|_: &Request| Action::Respond(200, json!({}).to_string())),
    );
    let failing = Arc::new(AtomicBool::new(true));
    let asked = Arc::new(AtomicUsize::new(0));
    let md = peer::start(
        &rt,
        Arc::new(flaky_metadata(failing.clone(), asked.clone())),
    );
    let config = service_json(dir.path(), backend);
    let flags = |extra: &str| {
        let port = free_port();
        let mut v = vec![
            "espv2".to_string(),
            format!("--listener_port={port}"),
            format!("--service_json_path={}", config.display()),
            format!("--backend=http://{backend}"),
            format!("--metadata_url=http://{md}"),
            format!("--service_control_url=http://{sc}"),
        ];
        if !extra.is_empty() {
            v.push(extra.to_string());
        }
        (v, port)
    };

    // Default (BLOCK_INIT_ON_ANY_ERROR): nothing listens while the tokens fail.
    let (args, port) = flags("");
    let mut proxy = Proc::spawn(&args, &dir.path().join("block.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !proxy.log().contains("not serving until it can be had") {
        assert!(Instant::now() < deadline, "{}", proxy.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !accepts(port),
        "listening with no token; log:\n{}",
        proxy.log()
    );
    let tries = asked.load(Ordering::SeqCst);
    assert!(tries >= 2, "the token was asked {tries} times");
    // The metadata server comes back: the proxy listens, and the backend gets its token.
    failing.store(false, Ordering::SeqCst);
    proxy.wait_for_port(port, "blocked proxy once its tokens can be had");
    let resp = client()
        .get(format!("http://127.0.0.1:{port}/private"))
        .send()
        .expect("request");
    assert_eq!(resp.status(), 200);
    let auth = backend_authorization(&resp.text().unwrap_or_default());
    assert_eq!(claims(auth.trim_start_matches("Bearer "))["aud"], AUDIENCE);
    assert!(
        proxy.log().contains("start-up dependency is ready"),
        "{}",
        proxy.log()
    );
    drop(proxy);

    // ALWAYS_INIT: listening at once, and the request that needs the ID token is refused.
    failing.store(true, Ordering::SeqCst);
    let (args, port) = flags("--dependency_error_behavior=ALWAYS_INIT");
    let mut proxy = Proc::spawn(&args, &dir.path().join("always.log"));
    proxy.wait_for_port(port, "ALWAYS_INIT proxy");
    let resp = client()
        .get(format!("http://127.0.0.1:{port}/private"))
        .send()
        .expect("request");
    assert_eq!(resp.status(), 500);
    assert_eq!(
        resp.text().unwrap_or_default(),
        espv2::body(500, &format!("Token not found for audience: {AUDIENCE}"))
    );
    failing.store(false, Ordering::SeqCst);
    let resp = client()
        .get(format!("http://127.0.0.1:{port}/private"))
        .send()
        .expect("request");
    assert_eq!(resp.status(), 200, "{}", proxy.log());
    drop(proxy);
    drop(rt);
}

#[test]
fn http_request_timeout_bounds_the_proxys_own_calls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let backend = peer::start(&rt, Arc::new(espv2::echo_headers));
    // An IAM that takes every call and never answers in time.
    let iam = peer::start(
        &rt,
        Arc::new(|_: &Request| Action::Stall(Duration::from_secs(120))),
    );
    let config = service_json(dir.path(), backend);
    let key = espv2::service_account_key(dir.path());
    for timeout_s in [1u64, 3] {
        let (proxy, port) = espv2::start(
            dir.path(),
            &format!("iam-timeout-{timeout_s}"),
            &[
                format!("--service_json_path={}", config.display()),
                format!("--backend=http://{backend}"),
                format!("--metadata_url=http://127.0.0.1:{}", free_port()),
                format!("--service_account_key={}", key.display()),
                "--skip_service_control_filter".to_string(),
                format!("--iam_url=http://{iam}"),
                "--backend_auth_iam_service_account=ba@p.iam.gserviceaccount.com".to_string(),
                "--dependency_error_behavior=ALWAYS_INIT".to_string(),
                format!("--http_request_timeout_s={timeout_s}"),
            ],
        );
        let started = Instant::now();
        let resp = client()
            .get(format!("http://127.0.0.1:{port}/private"))
            .send()
            .expect("request");
        let took = started.elapsed();
        assert_eq!(resp.status(), 500, "{}", proxy.log());
        let t = Duration::from_secs(timeout_s);
        assert!(
            took >= t.mul_f64(0.9) && took < t + Duration::from_secs(3),
            "--http_request_timeout_s={timeout_s}: answered after {took:?}"
        );
        drop(proxy);
    }

    // A Service Management that never answers: the config fetch (five attempts, 0.25 s to 2 s
    // apart) gives up after five one-second attempts and the start stops, where ESPv2's
    // default would wait two and a half minutes.
    let sm = peer::start(
        &rt,
        Arc::new(|_: &Request| Action::Stall(Duration::from_secs(120))),
    );
    let log = dir.path().join("management-timeout.log");
    let out = std::fs::File::create(&log).expect("log");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_portico"))
        .args([
            "espv2".to_string(),
            format!("--listener_port={}", free_port()),
            "--service=svc.endpoints.p.cloud.goog".to_string(),
            "--version=2024-06-01r0".to_string(),
            format!("--service_management_url=http://{sm}"),
            "--non_gcp".to_string(),
            format!("--service_account_key={}", key.display()),
            "--http_request_timeout_s=1".to_string(),
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log fd"))
        .stderr(out)
        .spawn()
        .expect("spawn");
    assert_eq!(wait_exit(&mut child, Duration::from_secs(40)), Some(1));
    let took = started.elapsed();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(25),
        "gave up after {took:?}; log:\n{text}"
    );
    assert!(
        text.contains("cannot load the service configuration"),
        "{text}"
    );

    // A metadata server that answers its root but never a token: with a one-second limit the
    // start-up token fetch (tried four times) gives up within seconds, where ESPv2's default
    // would wait two minutes.
    let md = peer::start(
        &rt,
        Arc::new(|r: &Request| {
            if r.path.starts_with(TOKEN_PATH) {
                Action::Stall(Duration::from_secs(120))
            } else if r.path == "/" {
                Action::Respond(200, "computeMetadata/\n".into())
            } else {
                Action::Respond(404, "not found".into())
            }
        }),
    );
    let port = free_port();
    let proxy = Proc::spawn(
        &[
            "espv2".to_string(),
            format!("--listener_port={port}"),
            format!("--service_json_path={}", config.display()),
            format!("--backend=http://{backend}"),
            format!("--metadata_url=http://{md}"),
            format!("--service_control_url=http://127.0.0.1:{}", free_port()),
            "--http_request_timeout_s=1".to_string(),
        ],
        &dir.path().join("metadata-timeout.log"),
    );
    let started = Instant::now();
    while !proxy.log().contains("cannot get a start-up dependency") {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no give-up within 15 s; log:\n{}",
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(
        proxy.log().contains("timed out") || proxy.log().contains("timeout"),
        "{}",
        proxy.log()
    );
    drop(proxy);
    drop(rt);
}

#[test]
fn application_default_credentials_from_gclouds_well_known_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let backend = peer::start(&rt, Arc::new(espv2::echo_headers));
    let config = service_json(dir.path(), backend);
    let sdk = dir.path().join("gcloud");
    std::fs::create_dir_all(&sdk).expect("sdk dir");
    let adc = sdk.join("application_default_credentials.json");
    std::fs::copy(espv2::service_account_key(dir.path()), &adc).expect("adc file");
    let run = |name: &str, sdk: &std::path::Path| {
        let port = free_port();
        let log = dir.path().join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_portico"))
            .args([
                "espv2".to_string(),
                format!("--listener_port={port}"),
                format!("--service_json_path={}", config.display()),
                format!("--backend=http://{backend}"),
                "--non_gcp".to_string(),
                "--skip_service_control_filter".to_string(),
                "--enable_application_default_credentials".to_string(),
            ])
            .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
            .env("CLOUDSDK_CONFIG", sdk)
            .env("HOME", dir.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("spawn");
        (child, port, log)
    };

    // A service-account key in gcloud's place: found, said, and the proxy serves.
    let (mut child, port, log) = run("adc", &sdk);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !accepts(port) {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains(&format!(
            "application default credentials: {} (from gcloud's well-known file)",
            adc.display()
        )),
        "{text}"
    );
    let _ = child.kill();
    let _ = child.wait();

    // gcloud's user credentials: refused at start, naming the file.
    let user_sdk = dir.path().join("user-gcloud");
    std::fs::create_dir_all(&user_sdk).expect("dir");
    let user = user_sdk.join("application_default_credentials.json");
    std::fs::write(
        &user,
        r#"{"type":"authorized_user","client_id":"c","client_secret":"s","refresh_token":"r"}"#,
    )
    .expect("user file");
    let (mut child, _, log) = run("user", &user_sdk);
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert_eq!(status, Some(1));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains(&format!(
            "--enable_application_default_credentials: gcloud's application default \
             credentials: {} holds user credentials",
            user.display()
        )),
        "{text}"
    );
    // Nothing anywhere and --non_gcp: nowhere to get credentials from.
    let empty = dir.path().join("empty-gcloud");
    std::fs::create_dir_all(&empty).expect("dir");
    let (mut child, _, log) = run("none", &empty);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(30)), Some(1));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("found no credentials"), "{text}");
    drop(rt);
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
