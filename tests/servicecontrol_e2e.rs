//! Service Control end to end with real processes.
//!
//! - `portico up` (control plane + echo + proxy): requests sent through the proxy with `curl`
//!   come back from the control plane's read API as rollups, logs and Prometheus counters, each
//!   request counted exactly once (the proxy's report aggregation, retries and by-consumer
//!   operations must not double-count).
//! - `portico control-plane` killed with SIGKILL and restarted on the same data (SQLite, and
//!   PostgreSQL): reports acknowledged before the kill are still in the rollups, a replayed batch
//!   is still recognised, and quota consumed before the kill is still consumed.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{ControlPlane, Db};
use serde_json::{json, Value};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

fn call(base: &str, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let c = client();
    let url = format!("{base}{path}");
    let mut rb = match method {
        "GET" => c.get(&url),
        "DELETE" => c.delete(&url),
        _ => c.post(&url),
    }
    .bearer_auth(token);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().expect("body");
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

fn ok(base: &str, token: &str, method: &str, path: &str, body: Option<Value>) -> Value {
    let (s, v) = call(base, token, method, path, body);
    assert!((200..300).contains(&s), "{method} {path} → {s}: {v}");
    v
}

/// Sums requestCount per response-code class over every series of the service.
fn rollup_classes(base: &str, token: &str, svc: &str) -> std::collections::BTreeMap<String, i64> {
    let v = ok(
        base,
        token,
        "GET",
        &format!("/portico/v1/services/{svc}/timeseries?since=2h"),
        None,
    );
    let mut out = std::collections::BTreeMap::new();
    for s in v["timeSeries"].as_array().into_iter().flatten() {
        for p in s["points"].as_array().into_iter().flatten() {
            for (class, n) in p["responseCodeClasses"].as_object().into_iter().flatten() {
                let n: i64 = n.as_str().and_then(|x| x.parse().ok()).unwrap_or(0);
                *out.entry(class.clone()).or_insert(0) += n;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// portico up

struct Up {
    child: Child,
    stdout: String,
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn start_up(dir: &Path, ports: [u16; 4]) -> Up {
    let [port, backend, cp, status] = ports;
    let mut child = Command::new(env!("CARGO_BIN_EXE_portico"))
        .current_dir(dir)
        .args(["up", "--port", &port.to_string()])
        .args(["--backend-port", &backend.to_string()])
        .args(["--control-plane-port", &cp.to_string()])
        .args(["--status-port", &status.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn portico up");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut up = Up {
        child,
        stdout: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                up.stdout.push_str(&line);
                up.stdout.push('\n');
                if line.contains("Press Ctrl-C to stop") {
                    return up;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("portico up exited before it was ready:\n{}", up.stdout)
            }
        }
        assert!(
            Instant::now() < deadline,
            "portico up not ready in time:\n{}",
            up.stdout
        );
    }
}

fn run_curl(line: &str) -> u16 {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{line} --silent --output /dev/null --max-time 10 --write-out '%{{http_code}}'"
        ))
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("curl failed: {line}"))
}

#[test]
fn proxy_traffic_is_counted_once_in_rollups_logs_and_metrics() {
    if Command::new("curl").arg("--version").output().is_err() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "curl is required on CI"
        );
        eprintln!("SKIPPED: curl is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = [free_port(), free_port(), free_port(), free_port()];
    let up = start_up(dir.path(), ports);
    let lines: Vec<String> = up
        .stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl "))
        .map(str::to_string)
        .collect();
    // The 401 line, the keyed line, and the one listing the traces.
    assert_eq!(lines.len(), 3, "{}", up.stdout);
    const OK_CALLS: i64 = 7;
    for _ in 0..OK_CALLS {
        assert_eq!(run_curl(&lines[1]), 200);
    }
    assert_eq!(run_curl(&lines[0]), 401);

    let state: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join(".portico/state.json")).expect("state"),
    )
    .expect("state JSON");
    let svc = state["service"].as_str().expect("service").to_string();
    let token = std::fs::read_to_string(dir.path().join(".portico/admin-token"))
        .expect("admin token")
        .trim()
        .to_string();
    let base = format!("http://127.0.0.1:{}", ports[2]);

    // The proxy flushes reports about every second; wait (bounded) until they are in.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut classes;
    loop {
        classes = rollup_classes(&base, &token, &svc);
        if classes.get("2xx").copied().unwrap_or(0) >= OK_CALLS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reports did not arrive: {classes:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Give later flushes (retries, by-consumer operations) time to double-count, if they would.
    std::thread::sleep(Duration::from_secs(3));
    let classes = rollup_classes(&base, &token, &svc);
    assert_eq!(classes.get("2xx").copied(), Some(OK_CALLS), "{classes:?}");

    let logs = ok(
        &base,
        &token,
        "GET",
        &format!("/portico/v1/services/{svc}/logs?since=1h&statusClass=2xx&pageSize=100"),
        None,
    );
    let entries = logs["entries"].as_array().cloned().unwrap_or_default();
    assert_eq!(entries.len() as i64, OK_CALLS, "{logs}");
    // The API key from the curl line must not be stored in the logs.
    let key = lines[1]
        .split("key=")
        .nth(1)
        .map(|k| k.split(['&', '\'', '"', ' ']).next().unwrap_or(""))
        .unwrap_or("");
    assert!(key.len() > 8, "no key in {}", lines[1]);
    assert!(
        !logs.to_string().contains(key),
        "API key stored in logs: {logs}"
    );

    let top = ok(
        &base,
        &token,
        "GET",
        &format!("/portico/v1/services/{svc}/topConsumers?since=1h"),
        None,
    );
    assert!(
        top["consumers"][0]["consumer"]
            .as_str()
            .is_some_and(|c| c.starts_with("project_number:")),
        "{top}"
    );

    let metrics = client()
        .get(format!("{base}/metrics"))
        .send()
        .and_then(|r| r.text())
        .expect("metrics");
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("portico_api_requests_total{")
                && l.contains(&format!("service=\"{svc}\""))
                && l.contains("code_class=\"2xx\"")
        })
        .unwrap_or_else(|| panic!("no 2xx series in:\n{metrics}"));
    assert!(line.ends_with(&format!(" {OK_CALLS}")), "{line}");
    assert!(
        metrics.contains("portico_servicecontrol_calls_total{call=\"check\",result=\"ok\"}"),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------------------------
// Kill and restart

const SVC: &str = "durable-api.endpoints.durable-proj.cloud.goog";
const SELECTOR: &str = "1.durable_api_endpoints_durable_proj_cloud_goog.Echo";

const OPENAPI: &str = r#"swagger: "2.0"
info: {title: Durable, version: 1.0.0}
host: "durable-api.endpoints.durable-proj.cloud.goog"
x-google-management:
  metrics:
    - {name: "echo-requests", valueType: INT64, metricKind: DELTA}
  quota:
    limits:
      - {name: "echo-limit", metric: "echo-requests", unit: "1/min/{project}", values: {STANDARD: 5}}
paths:
  /echo:
    post:
      operationId: Echo
      x-google-quota: {metricCosts: {echo-requests: 1}}
      responses: {"200": {description: ok}}
security: [{api_key: []}]
securityDefinitions:
  api_key: {type: apiKey, name: key, in: query}
"#;

/// Operations without timestamps are filed under the minute the control plane received them.
fn report_batch() -> Value {
    let op = |id: &str, code: u16| {
        json!({"operationId": id, "operationName": SELECTOR, "consumerId": "project:durable-consumer",
               "labels": {"/response_code": code.to_string(),
                          "/response_code_class": format!("{}xx", code / 100)},
               "metricValueSets": [{"metricName": "serviceruntime.googleapis.com/api/producer/request_count",
                                    "metricValues": [{"int64Value": "1"}]}]})
    };
    json!({"operations": [op("d-1", 200), op("d-2", 200), op("d-3", 500)]})
}

fn minute_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 60)
        .unwrap_or(0)
}

fn unique_id() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    format!("q-{}-{nanos}-{n}", std::process::id())
}

fn allocate(base: &str, token: &str, consumer: &str) -> Value {
    ok(
        base,
        token,
        "POST",
        &format!("/v1/services/{SVC}:allocateQuota"),
        Some(json!({"allocateOperation": {
            "operationId": unique_id(),
            "methodName": SELECTOR, "consumerId": consumer, "quotaMode": "NORMAL",
            "quotaMetrics": [{"metricName": "echo-requests", "metricValues": [{"int64Value": "1"}]}]}})),
    )
}

fn kill_and_restart(db: Db) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cp = ControlPlane::start(dir.path(), &db);
    let token = cp.admin_token();
    let base = cp.url.clone();
    ok(
        &base,
        &token,
        "POST",
        "/v1/services",
        Some(json!({"serviceName": SVC, "producerProjectId": "durable-proj"})),
    );
    let files = json!({"configSource": {"files": [{
        "fileContents": base64::engine::general_purpose::URL_SAFE.encode(OPENAPI),
        "filePath": "openapi.yaml", "fileType": "OPEN_API_YAML"}]}});
    let op = ok(
        &base,
        &token,
        "POST",
        &format!("/v1/services/{SVC}/configs:submit"),
        Some(files),
    );
    let cfg = op["response"]["serviceConfig"]["id"]
        .as_str()
        .expect("config id")
        .to_string();
    ok(
        &base,
        &token,
        "POST",
        &format!("/v1/services/{SVC}/rollouts"),
        Some(json!({"serviceName": SVC, "trafficPercentStrategy": {"percentages": {cfg: 100.0}}})),
    );
    ok(
        &base,
        &token,
        "POST",
        &format!("/v1/projects/durable-consumer/services/{SVC}:enable"),
        Some(json!({})),
    );
    let key = ok(
        &base,
        &token,
        "POST",
        "/v2/projects/durable-consumer/locations/global/keys",
        Some(json!({"displayName": "d"})),
    );
    let consumer = format!(
        "api_key:{}",
        key["response"]["keyString"].as_str().expect("key")
    );

    // Exhaust the per-minute quota (5), then report a batch; everything is acknowledged.
    let minute = minute_now();
    let admitted = (0..6)
        .filter(|_| {
            allocate(&base, &token, &consumer)
                .get("allocateErrors")
                .is_none()
        })
        .count();
    assert_eq!(admitted, 5);
    ok(
        &base,
        &token,
        "POST",
        &format!("/v1/services/{SVC}:report"),
        Some(report_batch()),
    );
    assert_eq!(
        rollup_classes(&base, &token, SVC),
        [("2xx".to_string(), 2), ("5xx".to_string(), 1)]
            .into_iter()
            .collect()
    );

    // SIGKILL: no graceful shutdown, so only committed data can survive.
    cp.restart();
    let base = cp.url.clone();
    assert_eq!(
        rollup_classes(&base, &token, SVC),
        [("2xx".to_string(), 2), ("5xx".to_string(), 1)]
            .into_iter()
            .collect(),
        "rollups after restart; log:\n{}",
        cp.log()
    );
    ok(
        &base,
        &token,
        "POST",
        &format!("/v1/services/{SVC}:report"),
        Some(report_batch()),
    );
    assert_eq!(
        rollup_classes(&base, &token, SVC).get("2xx").copied(),
        Some(2),
        "a replayed batch after restart is not counted again"
    );
    let after = allocate(&base, &token, &consumer);
    if minute_now() == minute {
        assert_eq!(
            after["allocateErrors"][0]["code"], "RESOURCE_EXHAUSTED",
            "{after}"
        );
    } else {
        eprintln!("note: the minute rolled over during the test; quota persistence not asserted");
    }
    let check = ok(
        &base,
        &token,
        "POST",
        &format!("/v1/services/{SVC}:check"),
        Some(
            json!({"operation": {"operationId": "c", "operationName": SELECTOR, "consumerId": consumer}}),
        ),
    );
    assert!(check.get("checkErrors").is_none(), "{check}");
    assert!(check["serviceRolloutId"].is_string(), "{check}");
    drop(cp);
    common::drop_postgres_schema(&db);
}

#[test]
fn kill_and_restart_sqlite() {
    kill_and_restart(Db::Sqlite);
}

#[test]
fn kill_and_restart_postgres() {
    let Some(db) = common::postgres_or_skip("kill_and_restart_postgres") else {
        return;
    };
    kill_and_restart(db);
}
