//! End to end: `portico espv2` and the metadata server, counting every call it gets.
//!
//! - Default (GCP) mode, no key file: at start-up the proxy asks the metadata server for the
//!   service name (`--check_metadata`, no `--service`) and where it runs (root, project,
//!   region then zone, platform probes; each tried five times 20 ms apart while it fails);
//!   then its access token (once, shared by Service Management and Service Control) and the
//!   ID token of a `jwt_audience` backend (`format=standard`, once per audience). The zone and
//!   platform are in the reports.
//! - `--non_gcp`: the metadata server gets no call at all; backend authentication is off, so
//!   the `jwt_audience` backend gets the client's own `Authorization`; reports say
//!   `UNKNOWN(ESPv2)` and `global`.
//! - A metadata server that does not answer: with a key file the proxy serves anyway and
//!   reports without a location; with `--check_metadata` and no `--service` it cannot start
//!   (exit code 1, ESPv2's message).
//!
//! Every peer is a double on a loopback port chosen at run time (tests/common/peer.rs).

mod common;

use base64::Engine as _;
use common::peer::{self, Action, Request};
use common::{free_port, Proc};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SERVICE: &str = "espv2-meta.endpoints.meta-proj.cloud.goog";
const CONFIG_ID: &str = "2024-06-01r0";
const AUDIENCE: &str = "https://private.example";
const TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";
const IDENTITY_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/identity";
const SERVICE_NAME_PATH: &str = "/computeMetadata/v1/instance/attributes/endpoints-service-name";

/// Requests a double saw: (method, path with query, headers).
type Log = Arc<Mutex<Vec<(String, String, Vec<(String, String)>)>>>;

fn recording(
    log: Log,
    answer: impl Fn(&Request) -> Action + Send + Sync + 'static,
) -> peer::Handler {
    Arc::new(move |r: &Request| {
        log.lock()
            .unwrap()
            .push((r.method.clone(), r.path.clone(), r.headers.clone()));
        answer(r)
    })
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A GKE node's metadata server in zone `us-east1-b` (no region: not Cloud Run), serving the
/// service name unless `service_name` is false.
fn metadata(service_name: bool) -> impl Fn(&Request) -> Action + Send + Sync + 'static {
    move |r: &Request| {
        let (path, query) = r.path.split_once('?').unwrap_or((r.path.as_str(), ""));
        let ok = |body: &str| Action::Respond(200, body.to_string());
        match path {
            "/" => ok("computeMetadata/\n"),
            "/computeMetadata/v1/project/project-id" => ok("meta-proj"),
            "/computeMetadata/v1/instance/zone" => ok("projects/123456/zones/us-east1-b"),
            "/computeMetadata/v1/instance/attributes/kube-env" => ok("KUBERNETES_MASTER_NAME: m"),
            SERVICE_NAME_PATH if service_name => ok(SERVICE),
            TOKEN_PATH => ok(&json!({"access_token": "meta-access", "expires_in": 3600,
                                     "token_type": "Bearer"})
            .to_string()),
            IDENTITY_PATH => {
                let audience = reqwest::Url::parse(&format!("http://md/?{query}"))
                    .ok()
                    .and_then(|u| {
                        u.query_pairs()
                            .find(|(k, _)| k == "audience")
                            .map(|(_, v)| v.into_owned())
                    })
                    .unwrap_or_default();
                let token = format!(
                    "{}.{}.c2ln",
                    b64(&json!({"alg": "RS256"})),
                    b64(&json!({"aud": audience, "exp": now() + 3600}))
                );
                ok(&token)
            }
            _ => Action::Respond(404, "not found".into()),
        }
    }
}

fn service_config() -> Value {
    let metrics: Vec<String> = [
        "request_count",
        "request_sizes",
        "response_sizes",
        "total_latencies",
        "backend_latencies",
        "request_overhead_latencies",
    ]
    .iter()
    .map(|m| format!("serviceruntime.googleapis.com/api/producer/{m}"))
    .collect();
    json!({
        "name": SERVICE,
        "id": CONFIG_ID,
        "producerProjectId": "meta-proj",
        "apis": [{"name": "meta.Api", "version": "v1"}],
        "http": {"rules": [
            {"selector": "meta.Api.Echo", "get": "/echo"},
            {"selector": "meta.Api.Private", "get": "/private"},
        ]},
        "usage": {"rules": [{"selector": "meta.Api.Private", "allowUnregisteredCalls": true}]},
        "logging": {"producerDestinations": [
            {"monitoredResource": "api", "logs": ["endpoints_log"]}]},
        "monitoring": {"producerDestinations": [{"monitoredResource": "api", "metrics": metrics}]},
    })
}

/// The config with the private method's backend at `backend`, asking for an ID token.
fn service_config_with_backend(backend: std::net::SocketAddr) -> Value {
    let mut c = service_config();
    c["backend"] = json!({"rules": [{"selector": "meta.Api.Private",
        "address": format!("http://{backend}"), "jwtAudience": AUDIENCE}]});
    c
}

/// Service Control: every key is fine; reports are kept.
fn service_control(reports: Arc<Mutex<Vec<Value>>>) -> impl Fn(&Request) -> Action + Send + Sync {
    move |r: &Request| {
        if r.path.ends_with(":report") {
            let body: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
            reports
                .lock()
                .unwrap()
                .extend(body["operations"].as_array().cloned().unwrap_or_default());
        }
        Action::Respond(200, json!({"operationId": "x"}).to_string())
    }
}

fn key_file(dir: &std::path::Path, dead: u16) -> std::path::PathBuf {
    let g = portico_credentials::generate_rsa_key().expect("keygen");
    let path = dir.join("key.json");
    let mut f = std::fs::File::create(&path).expect("key file");
    f.write_all(
        json!({
            "type": "service_account", "project_id": "meta-proj", "private_key_id": g.key_id,
            "private_key": g.private_pkcs8_pem, "client_email": "proxy@meta-proj.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": format!("http://127.0.0.1:{dead}/token"),
        })
        .to_string()
        .as_bytes(),
    )
    .expect("write key");
    path
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// How many times each path (query left out) was asked.
fn counts(log: &Log) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for (_, path, _) in log.lock().unwrap().iter() {
        let p = path.split('?').next().unwrap_or("").to_string();
        *c.entry(p).or_default() += 1;
    }
    c
}

/// The labels and log payload of the first reported operation for `method`, waiting for it.
fn report_for(reports: &Mutex<Vec<Value>>, method: &str, log: &dyn Fn() -> String) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(op) = reports.lock().unwrap().iter().find(|op| {
            op["operationName"] == method
                && op["logEntries"].as_array().is_some_and(|l| !l.is_empty())
        }) {
            return op.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no report for {method}; proxy log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

#[test]
fn default_mode_asks_the_metadata_server_and_non_gcp_asks_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dead = free_port();

    let md_log: Log = Arc::default();
    let md = peer::start(&rt, recording(md_log.clone(), metadata(true)));
    let backend_log: Log = Arc::default();
    let backend = peer::start(
        &rt,
        recording(backend_log.clone(), |_| {
            Action::Respond(200, r#"{"ok":true}"#.into())
        }),
    );
    let sm_log: Log = Arc::default();
    let config = service_config_with_backend(backend).to_string();
    let sm = peer::start(
        &rt,
        recording(sm_log.clone(), move |r| {
            // ESPv2's config manager asks for the FULL view (sourceInfo included).
            if r.path == format!("/v1/services/{SERVICE}/configs/{CONFIG_ID}?view=FULL") {
                Action::Respond(200, config.clone())
            } else {
                Action::Respond(404, "{}".into())
            }
        }),
    );
    let sc_log: Log = Arc::default();
    let reports: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sc = peer::start(
        &rt,
        recording(sc_log.clone(), service_control(reports.clone())),
    );

    // Default mode: no key file, no --service.
    let port = free_port();
    let mut proxy = Proc::spawn(
        &[
            "espv2".to_string(),
            format!("--listener_port={port}"),
            "--check_metadata".to_string(),
            format!("--version={CONFIG_ID}"),
            format!("--metadata_url=http://{md}"),
            format!("--service_management_url=http://{sm}"),
            format!("--service_control_url=http://{sc}"),
            format!("--backend=http://{backend}"),
        ],
        &dir.path().join("gcp.log"),
    );
    proxy.wait_for_port(port, "portico espv2 (GCP mode)");
    let log = || proxy.log();
    let c = client();
    let get = |path: &str, auth: Option<&str>| {
        let mut r = c.get(format!("http://127.0.0.1:{port}{path}"));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send().expect("request").status().as_u16()
    };
    assert_eq!(get("/echo?key=k1", None), 200, "{}", log());
    assert_eq!(
        get("/private", Some("Bearer client-token")),
        200,
        "{}",
        log()
    );
    assert_eq!(get("/private", None), 200, "{}", log());

    // The service came from the metadata server; its config from Service Management, asked
    // with the metadata server's access token.
    let sm_calls = sm_log.lock().unwrap().clone();
    assert_eq!(sm_calls.len(), 1, "{sm_calls:?}");
    assert_eq!(
        header(&sm_calls[0].2, "authorization"),
        Some("Bearer meta-access")
    );
    let op = report_for(&reports, "meta.Api.Echo", &log);
    for (_, path, h) in sc_log.lock().unwrap().iter() {
        assert_eq!(
            header(h, "authorization"),
            Some("Bearer meta-access"),
            "{path}"
        );
    }
    // Where it runs, in the report.
    assert_eq!(op["labels"]["cloud.googleapis.com/location"], "us-east1-b");
    assert_eq!(
        op["labels"]["servicecontrol.googleapis.com/platform"],
        "GKE(ESPv2)"
    );
    assert_eq!(
        op["logEntries"][0]["structPayload"]["location"],
        "us-east1-b"
    );

    // The backend got the metadata server's ID token, the client's own header beside it.
    let calls = backend_log.lock().unwrap().clone();
    let private: Vec<_> = calls.iter().filter(|(_, p, _)| p == "/private").collect();
    assert_eq!(private.len(), 2, "{calls:?}");
    let id_token = header(&private[0].2, "authorization").unwrap_or("");
    let payload = id_token
        .strip_prefix("Bearer ")
        .and_then(|t| t.split('.').nth(1))
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
        .unwrap_or(Value::Null);
    assert_eq!(payload["aud"], AUDIENCE, "{id_token}");
    assert_eq!(
        header(&private[0].2, "x-forwarded-authorization"),
        Some("Bearer client-token")
    );
    assert_eq!(header(&private[1].2, "authorization"), Some(id_token));

    // Every call, counted: values asked once, what answered 404 five times (ESPv2's retries),
    // one access token for every Service Management and Service Control call, one ID token
    // for two requests. Nothing else.
    let want: BTreeMap<String, usize> = [
        ("/", 1),
        (SERVICE_NAME_PATH, 1),
        ("/computeMetadata/v1/project/project-id", 1),
        ("/computeMetadata/v1/instance/region", 5),
        ("/computeMetadata/v1/instance/zone", 1),
        (
            "/computeMetadata/v1/instance/attributes/gae_server_software",
            5,
        ),
        ("/computeMetadata/v1/instance/attributes/kube-env", 1),
        (TOKEN_PATH, 1),
        (IDENTITY_PATH, 1),
    ]
    .into_iter()
    .map(|(p, n)| (p.to_string(), n))
    .collect();
    assert_eq!(counts(&md_log), want, "{}", log());
    for (method, path, h) in md_log.lock().unwrap().iter() {
        assert_eq!(method, "GET", "{path}");
        assert_eq!(header(h, "metadata-flavor"), Some("Google"), "{path}");
    }
    let identity = md_log
        .lock()
        .unwrap()
        .iter()
        .find(|(_, p, _)| p.starts_with(IDENTITY_PATH))
        .map(|(_, p, _)| p.clone())
        .unwrap_or_default();
    assert!(
        identity.contains("audience=https%3A%2F%2Fprivate.example")
            && identity.ends_with("&format=standard"),
        "{identity}"
    );
    drop(proxy);

    // --non_gcp: nothing asked of the metadata server, even when --metadata_url names it.
    md_log.lock().unwrap().clear();
    backend_log.lock().unwrap().clear();
    reports.lock().unwrap().clear();
    let file = dir.path().join("service.json");
    std::fs::write(&file, service_config_with_backend(backend).to_string()).expect("config");
    let key = key_file(dir.path(), dead);
    let port = free_port();
    let mut proxy = Proc::spawn(
        &[
            "espv2".to_string(),
            format!("--listener_port={port}"),
            format!("--service_json_path={}", file.display()),
            "--non_gcp".to_string(),
            format!("--service_account_key={}", key.display()),
            format!("--metadata_url=http://{md}"),
            format!("--service_control_url=http://{sc}"),
            format!("--backend=http://{backend}"),
        ],
        &dir.path().join("non-gcp.log"),
    );
    proxy.wait_for_port(port, "portico espv2 --non_gcp");
    let log = || proxy.log();
    let c = client();
    let resp = c
        .get(format!("http://127.0.0.1:{port}/private"))
        .header("authorization", "Bearer client-token")
        .send()
        .expect("request");
    assert_eq!(resp.status(), 200, "{}", log());
    let resp = c
        .get(format!("http://127.0.0.1:{port}/echo?key=k2"))
        .send()
        .expect("request");
    assert_eq!(resp.status(), 200, "{}", log());
    // Backend authentication is off: the client's header goes through as it came.
    let calls = backend_log.lock().unwrap().clone();
    let private = calls
        .iter()
        .find(|(_, p, _)| p == "/private")
        .expect("the private backend was called");
    assert_eq!(
        header(&private.2, "authorization"),
        Some("Bearer client-token")
    );
    assert_eq!(header(&private.2, "x-forwarded-authorization"), None);
    assert!(
        log().contains("backend authentication is enabled for this method"),
        "{}",
        log()
    );
    let op = report_for(&reports, "meta.Api.Echo", &log);
    assert_eq!(op["labels"]["cloud.googleapis.com/location"], "global");
    assert_eq!(
        op["labels"]["servicecontrol.googleapis.com/platform"],
        "UNKNOWN(ESPv2)"
    );
    assert!(
        op["logEntries"][0]["structPayload"]
            .get("location")
            .is_none(),
        "{op:#}"
    );
    assert!(
        md_log.lock().unwrap().is_empty(),
        "{:?}",
        md_log.lock().unwrap()
    );
    drop(proxy);

    // A metadata server that is not there: with a key file the proxy serves anyway, and its
    // reports say nothing of where it runs. ALWAYS_INIT, as ESPv2's own tests of unreachable
    // token sources run: the private method's ID token (from the key's dead token endpoint)
    // would otherwise keep the listener closed.
    reports.lock().unwrap().clear();
    let port = free_port();
    let mut proxy = Proc::spawn(
        &[
            "espv2".to_string(),
            format!("--listener_port={port}"),
            format!("--service_json_path={}", file.display()),
            format!("--service_account_key={}", key.display()),
            format!("--metadata_url=http://127.0.0.1:{dead}"),
            format!("--service_control_url=http://{sc}"),
            format!("--backend=http://{backend}"),
            "--dependency_error_behavior=ALWAYS_INIT".to_string(),
        ],
        &dir.path().join("no-metadata.log"),
    );
    proxy.wait_for_port(port, "portico espv2 without a metadata server");
    let log = || proxy.log();
    assert_eq!(
        client()
            .get(format!("http://127.0.0.1:{port}/echo?key=k3"))
            .send()
            .expect("request")
            .status(),
        200
    );
    let op = report_for(&reports, "meta.Api.Echo", &log);
    assert_eq!(op["labels"]["cloud.googleapis.com/location"], "global");
    assert_eq!(
        op["labels"]["servicecontrol.googleapis.com/platform"],
        "UNKNOWN(ESPv2)"
    );
    assert!(
        log().contains("metadata server was not reached"),
        "{}",
        log()
    );
    drop(proxy);
    drop(rt);
}

#[test]
fn no_service_name_from_the_metadata_server_stops_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let md_log: Log = Arc::default();
    let md = peer::start(&rt, recording(md_log.clone(), metadata(false)));
    let log_path = dir.path().join("proxy.log");
    let out = std::fs::File::create(&log_path).expect("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_portico"))
        .args([
            "espv2".to_string(),
            format!("--listener_port={}", free_port()),
            "--check_metadata".to_string(),
            "--rollout_strategy=managed".to_string(),
            format!("--metadata_url=http://{md}"),
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("fd"))
        .stderr(out)
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the proxy did not stop; log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(
            "failed to read metadata with key endpoints-service-name from metadata server"
        ),
        "{log}"
    );
    // Asked five times, as ESPv2 does; nothing else before giving up.
    assert_eq!(
        counts(&md_log),
        [(SERVICE_NAME_PATH.to_string(), 5)].into_iter().collect(),
        "{log}"
    );
    drop(rt);
}
