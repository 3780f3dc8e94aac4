//! End to end: what `portico espv2` reports to Service Control is ESPv2's report, field by
//! field (ESPv2's request_builder.cc and its integration tests' `ExpectedReport`): labels
//! (`user_agent` `ESPv2`, `/status_code` the Service Control status, `/credential_id` only
//! for a verified key, `api_method` also for unknown operations), metrics (no `error_count`
//! or `*_bytes`, `backend_latencies` always), and the `endpoints_log` entry (`httpRequest`,
//! `api_key_state`, `response_code_detail`, `http_status_code`, `log_message` "<method> is
//! called"). Health checks (`--healthz=/healthz`) are neither checked nor reported.
//!
//! The proxy is the real binary; Service Control, the backend and the JWKS server are doubles
//! on loopback ports chosen at run time (tests/common/peer.rs). The Service Control double
//! records every `:check` and every `:report` operation.

mod common;

use common::peer::{self, Action, Request};
use common::{free_port, Proc};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SERVICE: &str = "espv2-reports.endpoints.e2e-proj.cloud.goog";
const CONFIG_ID: &str = "2024-05-01r3";
const UNKNOWN: &str = "<Unknown Operation Name>";

/// Everything the Service Control double saw.
#[derive(Default)]
struct Seen {
    /// `:check` request bodies.
    checks: Vec<String>,
    /// Every operation of every `:report`, in arrival order.
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
            if req.body.contains("api_key:quota") {
                return Action::Respond(
                    200,
                    json!({"operationId": "q", "allocateErrors": [
                        {"code": "RESOURCE_EXHAUSTED", "description": "Insufficient tokens for quota group reads"}
                    ]})
                    .to_string(),
                );
            }
            return Action::Respond(200, json!({"operationId": "q"}).to_string());
        }
        if !req.path.ends_with(":check") {
            return Action::Respond(404, "{}".into());
        }
        seen.lock().unwrap().checks.push(req.body.clone());
        let key = req
            .body
            .split("api_key:")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("");
        let refuse = |code: &str| {
            Action::Respond(
                200,
                json!({"operationId": "c", "checkErrors": [{"code": code}]}).to_string(),
            )
        };
        match key {
            "invalid" => refuse("API_KEY_INVALID"),
            "notenabled" => refuse("SERVICE_NOT_ACTIVATED"),
            "uidkey" => Action::Respond(
                200,
                json!({"operationId": "c", "checkInfo": {"apiKeyUid": "uid-77"}}).to_string(),
            ),
            _ => Action::Respond(
                200,
                json!({"operationId": "c",
                       "checkInfo": {"consumerInfo": {"projectNumber": "123456"}}})
                .to_string(),
            ),
        }
    })
}

fn backend(req: &Request) -> Action {
    match req.path.split('?').next().unwrap_or("") {
        "/fail" => Action::Respond(500, r#"{"backend":"broke"}"#.into()),
        _ => Action::Respond(200, r#"{"ok":true}"#.into()),
    }
}

/// Every metric a generated config declares, and two ESPv2 never sends even when declared.
fn metrics() -> Vec<String> {
    let mut m = Vec::new();
    for form in ["producer/", "consumer/", "producer/by_consumer/"] {
        for name in [
            "request_count",
            "request_sizes",
            "response_sizes",
            "total_latencies",
            "backend_latencies",
            "request_overhead_latencies",
            "error_count",
            "request_bytes",
            "response_bytes",
        ] {
            m.push(format!("serviceruntime.googleapis.com/api/{form}{name}"));
        }
    }
    m
}

fn service_config(dead: u16) -> Value {
    let rule = |name: &str, verb: &str, path: &str| json!({"selector": format!("e2e.Api.{name}"), verb: path});
    json!({
        "name": SERVICE,
        "id": CONFIG_ID,
        "producerProjectId": "e2e-proj",
        "apis": [{"name": "e2e.Api", "version": "v1"}],
        "http": {"rules": [
            rule("Echo", "post", "/echo"),
            rule("Uid", "post", "/uid"),
            rule("Jwt", "get", "/jwt"),
            rule("Fail", "get", "/fail"),
            rule("Quota", "get", "/quota"),
        ]},
        "authentication": {
            "providers": [{"id": "p1", "issuer": "https://issuer.example",
                           "jwksUri": format!("http://127.0.0.1:{dead}/jwks"), "audiences": "aud"}],
            "rules": [{"selector": "e2e.Api.Jwt", "requirements": [{"providerId": "p1"}]}],
        },
        "quota": {"metricRules": [{"selector": "e2e.Api.Quota", "metricCosts": {"reads": "1"}}]},
        "logging": {"producerDestinations": [
            {"monitoredResource": "api", "logs": ["endpoints_log"]}]},
        "monitoring": {
            "producerDestinations": [{"monitoredResource": "api", "metrics": metrics()}],
            "consumerDestinations": [{"monitoredResource": "api", "metrics": metrics()}],
        },
    })
}

fn key_file(dir: &std::path::Path, dead: u16) -> std::path::PathBuf {
    let g = portico_credentials::generate_rsa_key().expect("keygen");
    let path = dir.join("key.json");
    let mut f = std::fs::File::create(&path).expect("key file");
    f.write_all(
        json!({
            "type": "service_account", "project_id": "e2e-proj", "private_key_id": g.key_id,
            "private_key": g.private_pkcs8_pem, "client_email": "proxy@e2e-proj.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": format!("http://127.0.0.1:{dead}/token"),
        })
        .to_string()
        .as_bytes(),
    )
    .expect("write key");
    path
}

/// The operation whose log entry is for `name` answered `code`, waiting for the report.
fn main_op(seen: &Mutex<Seen>, name: &str, code: u16, log: &dyn Fn() -> String) -> Value {
    main_op_at(seen, name, code, "/", log)
}

/// Like [`main_op`], for a request whose URL starts with `url`; the operation's log entries
/// are those of such requests only.
fn main_op_at(
    seen: &Mutex<Seen>,
    name: &str,
    code: u16,
    url: &str,
    log: &dyn Fn() -> String,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = code.to_string();
    loop {
        {
            let s = seen.lock().unwrap();
            let found = s.operations.iter().find(|op| {
                op["operationName"] == name
                    && op["labels"]["/response_code"].as_str() == Some(code.as_str())
                    && op["logEntries"].as_array().is_some_and(|l| {
                        l.iter().any(|e| {
                            e["httpRequest"]["requestUrl"]
                                .as_str()
                                .is_some_and(|u| u.starts_with(url))
                        })
                    })
            });
            if let Some(op) = found {
                // Requests of one signature share an operation: keep this request's entry.
                let mut op = op.clone();
                if let Some(entries) = op["logEntries"].as_array_mut() {
                    entries.retain(|e| {
                        e["httpRequest"]["requestUrl"]
                            .as_str()
                            .is_some_and(|u| u.starts_with(url))
                    });
                }
                return op;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no report operation for {name} {code}; operations: {:#?}\nproxy log:\n{}",
            seen.lock().unwrap().operations,
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The by-consumer operation of `main` (its id with a `1` appended), if any was reported.
fn by_consumer(seen: &Mutex<Seen>, main: &Value) -> Option<Value> {
    let id = format!("{}1", main["operationId"].as_str().unwrap_or("?"));
    let s = seen.lock().unwrap();
    s.operations
        .iter()
        .find(|op| op["operationId"] == id.as_str())
        .cloned()
}

fn labels(op: &Value) -> BTreeMap<String, String> {
    op["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn metric_names(op: &Value) -> Vec<String> {
    let mut v: Vec<String> = op["metricValueSets"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| m["metricName"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn names(prefix: &str, list: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = list
        .iter()
        .map(|n| format!("serviceruntime.googleapis.com/api/{prefix}{n}"))
        .collect();
    v.sort();
    v
}

/// ESPv2's labels for a request, the per-case ones given.
fn expected_labels(
    method: &str,
    code: u16,
    status_code: &str,
    extra: &[(&str, &str)],
) -> BTreeMap<String, String> {
    let mut l: BTreeMap<String, String> = [
        ("/protocol", "http".to_string()),
        ("/response_code", code.to_string()),
        ("/response_code_class", format!("{}xx", code / 100)),
        ("/status_code", status_code.to_string()),
        ("cloud.googleapis.com/location", "global".to_string()),
        (
            "serviceruntime.googleapis.com/api_method",
            method.to_string(),
        ),
        (
            "servicecontrol.googleapis.com/platform",
            "UNKNOWN(ESPv2)".to_string(),
        ),
        (
            "servicecontrol.googleapis.com/service_agent",
            format!("ESPv2/portico-{}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "servicecontrol.googleapis.com/user_agent",
            "ESPv2".to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if code >= 400 {
        l.insert("/error_type".into(), format!("{}xx", code / 100));
    }
    if method != UNKNOWN {
        l.insert(
            "serviceruntime.googleapis.com/api_version".into(),
            "v1".into(),
        );
    }
    for (k, v) in extra {
        l.insert(k.to_string(), v.to_string());
    }
    l
}

/// The log entry's payload without its `timestamp`, which changes per request.
fn payload(op: &Value) -> BTreeMap<String, Value> {
    let entry = &op["logEntries"][0];
    let mut p: BTreeMap<String, Value> = entry["structPayload"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let ts = p.remove("timestamp");
    assert!(
        ts.as_ref().is_some_and(Value::is_number),
        "timestamp: {ts:?}"
    );
    p
}

/// ESPv2's payload for a request, the per-case fields given.
fn expected_payload(
    method: &str,
    code: u16,
    state: &str,
    detail: &str,
    extra: &[(&str, Value)],
) -> BTreeMap<String, Value> {
    let mut p: BTreeMap<String, Value> = [
        ("service_config_id", json!(CONFIG_ID)),
        (
            "service_agent",
            json!(format!("ESPv2/portico-{}", env!("CARGO_PKG_VERSION"))),
        ),
        ("api_key_state", json!(state)),
        ("http_status_code", json!(code)),
        ("response_code_detail", json!(detail)),
        ("producer_project_id", json!("e2e-proj")),
        ("api_method", json!(method)),
        ("log_message", json!(format!("{method} is called"))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if method != UNKNOWN {
        p.insert("api_name".into(), json!("e2e.Api"));
        p.insert("api_version".into(), json!("v1"));
    }
    for (k, v) in extra {
        p.insert(k.to_string(), v.clone());
    }
    p
}

/// The log entry's `httpRequest`, the fields that change per request checked and removed.
fn http_request(op: &Value) -> BTreeMap<String, Value> {
    let entry = &op["logEntries"][0];
    let mut h: BTreeMap<String, Value> = entry["httpRequest"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let latency = h.remove("latency");
    assert!(
        latency
            .as_ref()
            .and_then(Value::as_str)
            .is_some_and(|l| l.ends_with('s') && l[..l.len() - 1].parse::<f64>().is_ok()),
        "latency: {latency:?} in {entry}"
    );
    for size in ["requestSize", "responseSize"] {
        let v = h.remove(size);
        assert!(
            v.as_ref()
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|n| n > 0),
            "{size}: {v:?} in {entry}"
        );
    }
    h
}

#[test]
fn reports_carry_espv2s_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let sc = peer::start(&rt, service_control(seen.clone()));
    let backend_addr = peer::start(&rt, Arc::new(backend));
    let dead = free_port();
    let config = dir.path().join("service.json");
    std::fs::write(&config, service_config(dead).to_string()).expect("config");
    let key = key_file(dir.path(), dead);

    let port = free_port();
    let mut proxy = Proc::spawn(
        &[
            "espv2".to_string(),
            format!("--listener_port={port}"),
            format!("--service_json_path={}", config.display()),
            format!("--backend=http://{backend_addr}"),
            "--non_gcp".to_string(),
            format!("--service_account_key={}", key.display()),
            format!("--service_control_url=http://{sc}"),
            "--service_control_check_retries=0".to_string(),
            "--healthz=/healthz".to_string(),
        ],
        &dir.path().join("proxy.log"),
    );
    proxy.wait_for_port(port, "portico espv2");
    let log = || proxy.log();
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let call = |method: &str, path: &str| -> u16 {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        client
            .request(m, format!("http://127.0.0.1:{port}{path}"))
            .send()
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
            .status()
            .as_u16()
    };

    // A health check first: answered, never checked, never reported.
    assert_eq!(call("GET", "/healthz?key=hzkey"), 200, "{}", log());

    assert_eq!(call("POST", "/echo?key=good"), 200, "{}", log());
    assert_eq!(call("POST", "/echo?key=invalid"), 400);
    assert_eq!(call("POST", "/echo?key=notenabled"), 403);
    assert_eq!(call("POST", "/echo"), 401);
    assert_eq!(call("GET", "/nowhere?key=stray"), 404);
    // A key longer than any key is not read (nor kept in the report).
    let long_key = "k".repeat(200);
    assert_eq!(call("GET", &format!("/toolong?key={long_key}")), 404);
    assert_eq!(call("GET", "/jwt?key=good"), 401);
    assert_eq!(call("GET", "/fail?key=good"), 500);
    assert_eq!(call("POST", "/uid?key=uidkey"), 200);
    // Quota allocations run beside requests; a refusal applies to a later request.
    let deadline = Instant::now() + Duration::from_secs(20);
    while call("GET", "/quota?key=quota") != 429 {
        assert!(Instant::now() < deadline, "quota never refused: {}", log());
        std::thread::sleep(Duration::from_millis(100));
    }

    let producer = names(
        "producer/",
        &[
            "request_count",
            "request_sizes",
            "response_sizes",
            "total_latencies",
            "backend_latencies",
            "request_overhead_latencies",
        ],
    );
    let mut producer_and_consumer = producer.clone();
    producer_and_consumer.extend(names(
        "consumer/",
        &[
            "request_count",
            "request_sizes",
            "response_sizes",
            "total_latencies",
        ],
    ));
    producer_and_consumer.sort();

    // A verified key: the consumer is reported, the by-consumer operation follows.
    let op = main_op(&seen, "e2e.Api.Echo", 200, &log);
    assert_eq!(op["consumerId"], "api_key:good", "{op:#}");
    assert_eq!(
        labels(&op),
        expected_labels(
            "e2e.Api.Echo",
            200,
            "0",
            &[("/credential_id", "apikey:good")]
        )
    );
    assert_eq!(metric_names(&op), producer_and_consumer, "{op:#}");
    assert_eq!(
        payload(&op),
        expected_payload(
            "e2e.Api.Echo",
            200,
            "VERIFIED",
            "via_upstream",
            &[("api_key", json!("good"))]
        )
    );
    let entry = &op["logEntries"][0];
    assert_eq!(entry["name"], "endpoints_log");
    assert_eq!(entry["severity"], "INFO");
    let h = http_request(&op);
    let url = h.get("requestUrl").and_then(Value::as_str).unwrap_or("");
    assert!(
        url.starts_with("/echo?key=") && !url.contains("good"),
        "the URL's key is masked: {url}"
    );
    let mut want_http: BTreeMap<String, Value> = [
        ("requestMethod", json!("POST")),
        ("status", json!(200)),
        ("remoteIp", json!("127.0.0.1")),
        ("protocol", json!("http")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    want_http.insert("requestUrl".into(), json!(url));
    assert_eq!(h, want_http);
    let bc = by_consumer(&seen, &op).expect("a by-consumer operation");
    assert_eq!(bc["consumerId"], "api_key:good");
    assert_eq!(
        labels(&bc),
        expected_labels(
            "e2e.Api.Echo",
            200,
            "0",
            &[
                ("/credential_id", "apikey:good"),
                ("serviceruntime.googleapis.com/consumer_project", "123456")
            ]
        )
    );
    assert_eq!(
        metric_names(&bc),
        names(
            "producer/by_consumer/",
            &[
                "request_count",
                "request_sizes",
                "response_sizes",
                "total_latencies",
                "backend_latencies",
                "request_overhead_latencies",
            ]
        )
    );
    assert!(bc["logEntries"].is_null(), "{bc:#}");

    // An invalid key: not trusted, so in the log entry only.
    let op = main_op(&seen, "e2e.Api.Echo", 400, &log);
    assert!(op["consumerId"].is_null(), "{op:#}");
    assert_eq!(labels(&op), expected_labels("e2e.Api.Echo", 400, "3", &[]));
    assert_eq!(metric_names(&op), producer);
    assert_eq!(
        payload(&op),
        expected_payload(
            "e2e.Api.Echo",
            400,
            "INVALID",
            "service_control_check_error{API_KEY_INVALID}",
            &[
                ("api_key", json!("invalid")),
                (
                    "error_cause",
                    json!("API key not valid. Please pass a valid API key.")
                )
            ]
        )
    );
    assert_eq!(op["logEntries"][0]["severity"], "ERROR");
    assert!(by_consumer(&seen, &op).is_none());

    let op = main_op(&seen, "e2e.Api.Echo", 403, &log);
    assert_eq!(labels(&op), expected_labels("e2e.Api.Echo", 403, "7", &[]));
    assert_eq!(
        payload(&op),
        expected_payload(
            "e2e.Api.Echo",
            403,
            "NOT ENABLED",
            "service_control_check_error{SERVICE_NOT_ACTIVATED}",
            &[
                ("api_key", json!("notenabled")),
                (
                    "error_cause",
                    json!(format!("API {SERVICE} is not enabled for the project."))
                )
            ]
        )
    );

    let op = main_op(&seen, "e2e.Api.Echo", 401, &log);
    assert_eq!(labels(&op), expected_labels("e2e.Api.Echo", 401, "16", &[]));
    assert_eq!(
        payload(&op),
        expected_payload(
            "e2e.Api.Echo",
            401,
            "NOT CHECKED",
            "service_control_bad_request{MISSING_API_KEY}",
            &[(
                "error_cause",
                json!(
                    "Method doesn't allow unregistered callers (callers without established \
                     identity). Please use API Key or other form of API consumer identity to \
                     call this API."
                )
            )]
        )
    );

    // An unknown operation: named so, its key extracted but not checked.
    let op = main_op_at(&seen, UNKNOWN, 404, "/nowhere", &log);
    assert!(op["consumerId"].is_null(), "{op:#}");
    assert_eq!(labels(&op), expected_labels(UNKNOWN, 404, "0", &[]));
    assert_eq!(metric_names(&op), producer);
    assert_eq!(
        payload(&op),
        expected_payload(
            UNKNOWN,
            404,
            "NOT CHECKED",
            "direct_response",
            &[("api_key", json!("stray"))]
        )
    );

    let op = main_op_at(&seen, UNKNOWN, 404, "/toolong", &log);
    assert_eq!(
        payload(&op),
        expected_payload(UNKNOWN, 404, "NOT CHECKED", "direct_response", &[])
    );
    assert!(!op.to_string().contains(&long_key), "{op:#}");

    // JWT refused before Service Control: status 0, Envoy's detail.
    let op = main_op(&seen, "e2e.Api.Jwt", 401, &log);
    assert!(op["consumerId"].is_null(), "{op:#}");
    assert_eq!(labels(&op), expected_labels("e2e.Api.Jwt", 401, "0", &[]));
    assert_eq!(
        payload(&op),
        expected_payload(
            "e2e.Api.Jwt",
            401,
            "NOT CHECKED",
            "jwt_authn_access_denied{Jwt_is_missing}",
            &[("api_key", json!("good"))]
        )
    );

    // The backend's own error: the check was fine, the status code is 0.
    let op = main_op(&seen, "e2e.Api.Fail", 500, &log);
    assert_eq!(op["consumerId"], "api_key:good");
    assert_eq!(
        labels(&op),
        expected_labels(
            "e2e.Api.Fail",
            500,
            "0",
            &[("/credential_id", "apikey:good")]
        )
    );
    assert_eq!(metric_names(&op), producer_and_consumer);
    assert_eq!(
        payload(&op),
        expected_payload(
            "e2e.Api.Fail",
            500,
            "VERIFIED",
            "via_upstream",
            &[("api_key", json!("good"))]
        )
    );

    // --service_control_enable_api_key_uid_reporting (ESPv2's default): the key's uid.
    let op = main_op(&seen, "e2e.Api.Uid", 200, &log);
    assert_eq!(op["consumerId"], "api_key:uidkey");
    assert_eq!(labels(&op)["/credential_id"], "uid-77");

    let op = main_op(&seen, "e2e.Api.Quota", 429, &log);
    assert_eq!(
        labels(&op),
        expected_labels(
            "e2e.Api.Quota",
            429,
            "8",
            &[("/credential_id", "apikey:quota")]
        )
    );
    assert_eq!(
        payload(&op),
        expected_payload(
            "e2e.Api.Quota",
            429,
            "VERIFIED",
            "service_control_quota_error{RESOURCE_EXHAUSTED}",
            &[
                ("api_key", json!("quota")),
                (
                    "error_cause",
                    json!("Insufficient tokens for quota group reads")
                )
            ]
        )
    );

    // The health check, long reported if it ever was: in no check and no operation.
    let s = seen.lock().unwrap();
    assert!(
        !s.checks.iter().any(|c| c.contains("hzkey")),
        "{:?}",
        s.checks
    );
    for op in &s.operations {
        let text = op.to_string();
        assert!(
            !text.contains("healthz") && !text.contains("hzkey"),
            "health check reported: {op:#}"
        );
    }
    drop(s);
    drop(rt);
}
