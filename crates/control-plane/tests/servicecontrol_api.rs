//! Service Control through the HTTP API, in process: services, configs, rollouts, API keys,
//! service accounts and IAM are set up with the same calls gcloud makes, then `:check`,
//! `:allocateQuota`, `:report` and the read API are exercised on SQLite, PostgreSQL and Redis.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use portico_control_plane::apis::servicecontrol::quota::ManualClock;
use portico_control_plane::app::{build_state_with, AppState, ServeOptions};
use serde_json::{json, Value};

const SVC: &str = "echo-api.endpoints.demo-proj.cloud.goog";
const PRODUCER: &str = "demo-proj";
const CONSUMER: &str = "consumer-proj";
const OTHER: &str = "other-proj";
const SELECTOR: &str = "1.echo_api_endpoints_demo_proj_cloud_goog.Echo";
const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const REDIS_URL: &str = "redis://127.0.0.1:6379/";
const LIMIT: i64 = 5;

const OPENAPI: &str = r#"swagger: "2.0"
info:
  title: Echo
  version: 1.0.0
host: "echo-api.endpoints.demo-proj.cloud.goog"
x-google-management:
  metrics:
    - name: "echo-requests"
      displayName: "Echo requests"
      valueType: INT64
      metricKind: DELTA
  quota:
    limits:
      - name: "echo-limit"
        displayName: "Echo requests per minute"
        metric: "echo-requests"
        unit: "1/min/{project}"
        values:
          STANDARD: 5
paths:
  /echo:
    post:
      operationId: Echo
      x-google-quota:
        metricCosts:
          echo-requests: 1
      responses:
        "200":
          description: ok
security:
  - api_key: []
securityDefinitions:
  api_key:
    type: apiKey
    name: key
    in: query
"#;

fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn skip(what: &str, err: impl std::fmt::Display) {
    assert!(!on_ci(), "{what} is required on CI: {err}");
    eprintln!("SKIPPED: {what} not available: {err}");
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

enum Backend {
    Sqlite,
    Postgres,
    /// Redis counters (the database is SQLite).
    Redis,
}

struct Harness {
    dir: tempfile::TempDir,
    state: AppState,
    admin: String,
    clock: Arc<ManualClock>,
    pg_schema: Option<String>,
}

fn real_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 for a minute-aligned base 30 minutes ago plus `offset_s` (report timestamps must be
/// recent: the retention pruner runs on the real clock).
fn at(offset_s: i64) -> String {
    let base = (real_now_ms() / 60_000 - 30) * 60;
    time::OffsetDateTime::from_unix_timestamp(base + offset_s)
        .expect("time")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format")
}

async fn reachable_pg() -> Result<(), String> {
    use sqlx::Connection;
    let fut = sqlx::PgConnection::connect(PG_URL);
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(Ok(c)) => {
            let _ = c.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connect timed out".into()),
    }
}

async fn reachable_redis() -> Result<(), String> {
    let c = redis::Client::open(REDIS_URL).map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(3), c.get_multiplexed_async_connection()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connect timed out".into()),
    }
}

impl Harness {
    async fn start(backend: Backend) -> Option<Harness> {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(backend, dir).await
    }

    async fn start_in(backend: Backend, dir: tempfile::TempDir) -> Option<Harness> {
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut opts = ServeOptions::sqlite(listen, dir.path());
        let mut pg_schema = None;
        match backend {
            Backend::Sqlite => {}
            Backend::Postgres => {
                if let Err(e) = reachable_pg().await {
                    skip("PostgreSQL at 127.0.0.1:5432", e);
                    return None;
                }
                let schema = unique("sc_api");
                opts.database_url = Some(PG_URL.into());
                opts.database_schema = Some(schema.clone());
                pg_schema = Some(schema);
            }
            Backend::Redis => {
                if let Err(e) = reachable_redis().await {
                    skip("Redis at 127.0.0.1:6379", e);
                    return None;
                }
                // A fresh schema name only namespaces the Redis keys here (SQLite is the store).
                opts.database_schema = Some(unique("sc_redis"));
                opts.redis_url = Some(REDIS_URL.into());
            }
        }
        let clock = ManualClock::new(real_now_ms());
        let c2 = clock.clone();
        let (state, token_path) = build_state_with(&opts, listen, move |s| {
            s.servicecontrol.clock = c2;
        })
        .await
        .expect("state");
        let admin = std::fs::read_to_string(token_path)
            .expect("admin token")
            .trim()
            .to_string();
        Some(Harness {
            dir,
            state,
            admin,
            clock,
            pg_schema,
        })
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = method.parse().expect("method");
        let (status, v) = support::request(&self.state, method, path, token, body).await;
        (status.as_u16(), v)
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self
            .call(method, path, Some(&self.admin.clone()), body)
            .await;
        assert!((200..300).contains(&s), "{method} {path} → {s}: {v}");
        v
    }

    /// Service, config, rollout, consumer enablement: what `gcloud endpoints services deploy`
    /// and `gcloud services enable` do.
    async fn deploy(&self) -> (String, String) {
        self.admin(
            "POST",
            "/v1/services",
            Some(json!({"serviceName": SVC, "producerProjectId": PRODUCER})),
        )
        .await;
        let files = json!({"configSource": {"files": [{
            "fileContents": base64::engine::general_purpose::URL_SAFE.encode(OPENAPI),
            "filePath": "openapi.yaml",
            "fileType": "OPEN_API_YAML"}]}});
        let op = self
            .admin(
                "POST",
                &format!("/v1/services/{SVC}/configs:submit"),
                Some(files),
            )
            .await;
        let config_id = op["response"]["serviceConfig"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("config id in {op}"))
            .to_string();
        let op = self
            .admin(
                "POST",
                &format!("/v1/services/{SVC}/rollouts"),
                Some(json!({"serviceName": SVC,
                    "trafficPercentStrategy": {"percentages": {config_id.clone(): 100.0}}})),
            )
            .await;
        let rollout_id = op["response"]["rolloutId"]
            .as_str()
            .unwrap_or_else(|| panic!("rollout id in {op}"))
            .to_string();
        self.admin(
            "POST",
            &format!("/v1/projects/{CONSUMER}/services/{SVC}:enable"),
            Some(json!({})),
        )
        .await;
        (config_id, rollout_id)
    }

    async fn api_key(&self, project: &str, restrictions: Value) -> (String, String) {
        let op = self
            .admin(
                "POST",
                &format!("/v2/projects/{project}/locations/global/keys"),
                Some(json!({"displayName": "k", "restrictions": restrictions})),
            )
            .await;
        let key = op["response"]["keyString"]
            .as_str()
            .unwrap_or_else(|| panic!("keyString in {op}"))
            .to_string();
        let name = op["response"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        (key, name)
    }

    /// A service account with a key; returns a self-signed token (ESP's runtime credential).
    async fn service_account(&self, id: &str, grant: bool) -> String {
        let sa = self
            .admin(
                "POST",
                &format!("/v1/projects/{PRODUCER}/serviceAccounts"),
                Some(json!({"accountId": id})),
            )
            .await;
        let email = sa["email"].as_str().expect("email").to_string();
        let key = self
            .admin(
                "POST",
                &format!("/v1/projects/{PRODUCER}/serviceAccounts/{email}/keys"),
                Some(json!({})),
            )
            .await;
        let file = base64::engine::general_purpose::STANDARD
            .decode(key["privateKeyData"].as_str().expect("privateKeyData"))
            .expect("base64");
        let key = portico_credentials::ServiceAccountKey::from_json_str(
            std::str::from_utf8(&file).expect("utf8"),
            "test",
        )
        .expect("key file");
        if grant {
            let mut policy = self
                .admin(
                    "POST",
                    &format!("/v1/services/{SVC}:getIamPolicy"),
                    Some(json!({})),
                )
                .await;
            let binding = json!({"role": "roles/servicemanagement.serviceController",
                                 "members": [format!("serviceAccount:{email}")]});
            match policy["bindings"].as_array_mut() {
                Some(b) => b.push(binding),
                None => policy["bindings"] = json!([binding]),
            }
            self.admin(
                "POST",
                &format!("/v1/services/{SVC}:setIamPolicy"),
                Some(json!({"policy": policy})),
            )
            .await;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_secs();
        key.self_signed_token(
            &format!(
                "{}/google.api.servicecontrol.v1.ServiceController",
                self.state.public_url
            ),
            now,
            3600,
        )
        .expect("token")
    }

    async fn check(&self, consumer_id: &str, labels: Value) -> Value {
        self.admin(
            "POST",
            &format!("/v1/services/{SVC}:check"),
            Some(json!({"operation": {
                "operationId": uuid::Uuid::new_v4().to_string(),
                "operationName": SELECTOR,
                "consumerId": consumer_id,
                "labels": labels,
            }})),
        )
        .await
    }

    async fn finish(self) {
        if let Some(schema) = &self.pg_schema {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                .execute(self.state.store.pool())
                .await;
        }
    }
}

/// Asserts a `:check` answer: no error when `blocked_by` is `None`, else that first error.
fn expect_check(r: &Value, blocked_by: Option<&str>, case: &dyn std::fmt::Display) {
    match blocked_by {
        None => assert!(r.get("checkErrors").is_none(), "{case}: {r}"),
        Some(code) => assert_eq!(first_error(r), code, "{case}: {r}"),
    }
}

fn first_error(v: &Value) -> &str {
    v["checkErrors"][0]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn check_errors_and_key_restrictions() {
    let h = Harness::start(Backend::Sqlite).await.expect("sqlite");
    let (config_id, rollout_id) = h.deploy().await;
    let (key, _) = h.api_key(CONSUMER, json!({})).await;
    let ok_labels = json!({"servicecontrol.googleapis.com/caller_ip": "10.1.2.3"});

    // A valid key of a project that enabled the service.
    let r = h.check(&format!("api_key:{key}"), ok_labels.clone()).await;
    assert!(r.get("checkErrors").is_none(), "{r}");
    assert_eq!(r["serviceConfigId"], config_id);
    assert_eq!(r["serviceRolloutId"], rollout_id);
    let number = r["checkInfo"]["consumerInfo"]["projectNumber"]
        .as_str()
        .expect("project number")
        .to_string();
    let (c, lookup) = h
        .call(
            "GET",
            &format!("/v1/projects/{CONSUMER}"),
            Some(&h.admin),
            None,
        )
        .await;
    if c == 200 {
        assert_eq!(lookup["projectNumber"].as_str(), Some(number.as_str()));
    }

    // Unknown key.
    let r = h
        .check(
            "api_key:AIzaThisKeyDoesNotExist000000000000000",
            ok_labels.clone(),
        )
        .await;
    assert_eq!(first_error(&r), "API_KEY_INVALID", "{r}");
    assert!(r.get("checkInfo").is_none());
    assert!(
        !r.to_string().contains("ThisKeyDoesNotExist"),
        "key echoed: {r}"
    );

    // A key of a project that did not enable the service.
    let (other_key, _) = h.api_key(OTHER, json!({})).await;
    let r = h
        .check(&format!("api_key:{other_key}"), ok_labels.clone())
        .await;
    assert_eq!(first_error(&r), "SERVICE_NOT_ACTIVATED", "{r}");

    // project: consumers; unknown projects; the producer itself.
    let r = h.check(&format!("project:{CONSUMER}"), json!({})).await;
    assert!(r.get("checkErrors").is_none(), "{r}");
    let r = h.check("project:never-seen-proj", json!({})).await;
    assert_eq!(first_error(&r), "PROJECT_INVALID", "{r}");
    let r = h.check(&format!("project:{PRODUCER}"), json!({})).await;
    assert!(r.get("checkErrors").is_none(), "producer is activated: {r}");
    let r = h
        .check(&format!("project_number:{number}"), json!({}))
        .await;
    assert!(r.get("checkErrors").is_none(), "{r}");

    // API targets: service only, method lists (full selector, short name, wildcard), mismatch.
    for (targets, allowed) in [
        (json!([{"service": SVC}]), true),
        (json!([{"service": "other.example.com"}]), false),
        (json!([{"service": SVC, "methods": ["Echo"]}]), true),
        (json!([{"service": SVC, "methods": [SELECTOR]}]), true),
        (json!([{"service": SVC, "methods": ["Ec*"]}]), true),
        (json!([{"service": SVC, "methods": ["AuthInfo*"]}]), false),
    ] {
        let (k, _) = h.api_key(CONSUMER, json!({"apiTargets": targets})).await;
        let r = h.check(&format!("api_key:{k}"), ok_labels.clone()).await;
        expect_check(&r, (!allowed).then_some("API_TARGET_BLOCKED"), &targets);
    }

    // Server (IP) restrictions.
    let (k, _) = h
        .api_key(
            CONSUMER,
            json!({"serverKeyRestrictions": {"allowedIps": ["10.0.0.0/8", "192.168.7.7"]}}),
        )
        .await;
    for (ip, allowed) in [
        ("10.9.9.9", true),
        ("192.168.7.7", true),
        ("192.168.7.8", false),
    ] {
        let r = h
            .check(
                &format!("api_key:{k}"),
                json!({"servicecontrol.googleapis.com/caller_ip": ip}),
            )
            .await;
        expect_check(&r, (!allowed).then_some("IP_ADDRESS_BLOCKED"), &ip);
    }
    let r = h.check(&format!("api_key:{k}"), json!({})).await;
    assert_eq!(first_error(&r), "IP_ADDRESS_BLOCKED", "no caller ip: {r}");

    // Browser (referrer) restrictions.
    let (k, _) = h
        .api_key(
            CONSUMER,
            json!({"browserKeyRestrictions": {"allowedReferrers": ["https://app.example.com/*", "*.corp.example.org/*"]}}),
        )
        .await;
    for (referer, allowed) in [
        ("https://app.example.com/page", true),
        ("https://x.corp.example.org/a", true),
        ("https://evil.example.net/", false),
    ] {
        let r = h
            .check(
                &format!("api_key:{k}"),
                json!({"servicecontrol.googleapis.com/referer": referer}),
            )
            .await;
        expect_check(&r, (!allowed).then_some("REFERER_BLOCKED"), &referer);
    }

    // A deleted key is invalid.
    let (k, name) = h.api_key(CONSUMER, json!({})).await;
    h.admin("DELETE", &format!("/v2/{name}"), None).await;
    let r = h.check(&format!("api_key:{k}"), ok_labels.clone()).await;
    assert_eq!(first_error(&r), "API_KEY_INVALID", "deleted key: {r}");

    // Unknown service: 404 for the admin; malformed consumer: 400.
    let (s, v) = h
        .call(
            "POST",
            "/v1/services/nope.example.com:check",
            Some(&h.admin),
            Some(json!({"operation": {"operationId": "x", "consumerId": "project:demo-proj"}})),
        )
        .await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = h
        .call(
            "POST",
            &format!("/v1/services/{SVC}:check"),
            Some(&h.admin),
            Some(json!({"operation": {"operationId": "x", "consumerId": "bogus"}})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    h.finish().await;
}

#[tokio::test]
async fn only_service_controllers_may_call() {
    let h = Harness::start(Backend::Sqlite).await.expect("sqlite");
    h.deploy().await;
    let allowed = h.service_account("esp-allowed", true).await;
    let denied = h.service_account("esp-denied", false).await;
    let body = json!({"operation": {"operationId": "o1", "operationName": SELECTOR,
                                    "consumerId": format!("project:{CONSUMER}")}});
    for verb in ["check", "report", "allocateQuota"] {
        let path = format!("/v1/services/{SVC}:{verb}");
        let b = if verb == "allocateQuota" {
            json!({"allocateOperation": {"operationId": "q", "methodName": SELECTOR,
                   "consumerId": format!("project:{CONSUMER}"), "quotaMetrics": []}})
        } else if verb == "report" {
            json!({})
        } else {
            body.clone()
        };
        let (s, v) = h.call("POST", &path, None, Some(b.clone())).await;
        assert_eq!(s, 401, "{verb} without credentials: {v}");
        let (s, v) = h
            .call("POST", &path, Some("not-a-token"), Some(b.clone()))
            .await;
        assert_eq!(s, 401, "{verb} with a bogus token: {v}");
        let (s, v) = h.call("POST", &path, Some(&denied), Some(b.clone())).await;
        assert_eq!(s, 403, "{verb} without serviceController: {v}");
        let (s, v) = h.call("POST", &path, Some(&allowed), Some(b.clone())).await;
        assert_eq!(s, 200, "{verb} as serviceController: {v}");
    }
    // The read API: admin yes, an account without a role on the service no.
    let (s, v) = h
        .call(
            "GET",
            &format!("/portico/v1/services/{SVC}/logs"),
            Some(&denied),
            None,
        )
        .await;
    assert_eq!(s, 403, "{v}");
    let (s, v) = h
        .call(
            "GET",
            &format!("/portico/v1/services/{SVC}/logs"),
            Some(&allowed),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    h.finish().await;
}

fn allocate_body(consumer: &str, cost: i64, mode: &str) -> Value {
    json!({"allocateOperation": {
        "operationId": uuid::Uuid::new_v4().to_string(),
        "methodName": SELECTOR,
        "consumerId": consumer,
        "quotaMetrics": [{"metricName": "echo-requests", "metricValues": [{"int64Value": cost.to_string()}]}],
        "quotaMode": mode,
    }})
}

/// Four concurrent clients send 4 × 6 allocations against a limit of 5 per minute: exactly 5
/// succeed. Then the clock moves to the next minute and the quota is back.
async fn quota_exact_and_rollover(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    h.deploy().await;
    let (key, _) = h.api_key(CONSUMER, json!({})).await;
    let consumer = format!("api_key:{key}");
    let h = Arc::new(h);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let h = h.clone();
        let consumer = consumer.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            let mut exhausted = Vec::new();
            for _ in 0..6 {
                let v = h
                    .admin(
                        "POST",
                        &format!("/v1/services/{SVC}:allocateQuota"),
                        Some(allocate_body(&consumer, 1, "NORMAL")),
                    )
                    .await;
                match v["allocateErrors"][0]["code"].as_str() {
                    None => ok += 1,
                    Some(_) => exhausted.push(v),
                }
            }
            (ok, exhausted)
        }));
    }
    let mut ok = 0;
    let mut exhausted = Vec::new();
    for t in tasks {
        let (o, e) = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("in time")
            .expect("task");
        ok += o;
        exhausted.extend(e);
    }
    assert_eq!(ok, LIMIT, "exactly the limit is admitted");
    assert_eq!(exhausted.len() as i64, 24 - LIMIT);
    let e = &exhausted[0]["allocateErrors"][0];
    assert_eq!(e["code"], "RESOURCE_EXHAUSTED");
    let desc = e["description"].as_str().unwrap_or_default();
    assert!(
        desc.starts_with("Quota exceeded for quota metric 'Echo requests' and limit 'Echo requests per minute' of service 'echo-api.endpoints.demo-proj.cloud.goog' for consumer 'project_number:"),
        "{desc}"
    );
    // CHECK_ONLY neither consumes nor succeeds now.
    let v = h
        .admin(
            "POST",
            &format!("/v1/services/{SVC}:allocateQuota"),
            Some(allocate_body(&consumer, 1, "CHECK_ONLY")),
        )
        .await;
    assert_eq!(v["allocateErrors"][0]["code"], "RESOURCE_EXHAUSTED", "{v}");

    // Next minute: fresh window. BEST_EFFORT with cost 7 gets the 5 available and reports
    // exhaustion.
    h.clock.advance(60_000);
    let v = h
        .admin(
            "POST",
            &format!("/v1/services/{SVC}:allocateQuota"),
            Some(allocate_body(&consumer, 7, "BEST_EFFORT")),
        )
        .await;
    assert_eq!(v["allocateErrors"][0]["code"], "RESOURCE_EXHAUSTED", "{v}");
    assert_eq!(
        v["quotaMetrics"][0]["metricValues"][0]["int64Value"], "5",
        "{v}"
    );
    let v = h
        .admin(
            "POST",
            &format!("/v1/services/{SVC}:allocateQuota"),
            Some(allocate_body(&consumer, 1, "NORMAL")),
        )
        .await;
    assert_eq!(
        v["allocateErrors"][0]["code"], "RESOURCE_EXHAUSTED",
        "window is full: {v}"
    );
    h.clock.advance(60_000);
    let v = h
        .admin(
            "POST",
            &format!("/v1/services/{SVC}:allocateQuota"),
            Some(allocate_body(&consumer, 1, "NORMAL")),
        )
        .await;
    assert!(v.get("allocateErrors").is_none(), "{v}");
    // Another consumer project has its own counter.
    let v = h
        .admin(
            "POST",
            &format!("/v1/services/{SVC}:allocateQuota"),
            Some(allocate_body(&format!("project:{PRODUCER}"), 5, "NORMAL")),
        )
        .await;
    assert!(v.get("allocateErrors").is_none(), "{v}");
    // Invalid keys are reported as such.
    let v = h
        .admin(
            "POST",
            &format!("/v1/services/{SVC}:allocateQuota"),
            Some(allocate_body("api_key:nope", 1, "NORMAL")),
        )
        .await;
    assert_eq!(v["allocateErrors"][0]["code"], "API_KEY_INVALID", "{v}");
    match Arc::try_unwrap(h) {
        Ok(h) => h.finish().await,
        Err(_) => panic!("harness still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_sqlite() {
    quota_exact_and_rollover(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_postgres() {
    quota_exact_and_rollover(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_redis() {
    quota_exact_and_rollover(Backend::Redis).await;
}

fn report_op(id: &str, consumer: &str, code: u16, latency_s: f64, at: &str) -> Value {
    let class = format!("{}xx", code / 100);
    json!({
        "operationId": id,
        "operationName": SELECTOR,
        "consumerId": consumer,
        "startTime": at,
        "endTime": at,
        "labels": {
            "serviceruntime.googleapis.com/api_method": SELECTOR,
            "/response_code": code.to_string(),
            "/response_code_class": class,
        },
        "metricValueSets": [
            {"metricName": "serviceruntime.googleapis.com/api/producer/request_count",
             "metricValues": [{"int64Value": "1"}]},
            {"metricName": "serviceruntime.googleapis.com/api/producer/error_count",
             "metricValues": [{"int64Value": if code >= 400 { "1" } else { "0" }}]},
            {"metricName": "serviceruntime.googleapis.com/api/producer/total_latencies",
             "metricValues": [{"distributionValue": {"count": "1", "mean": latency_s,
                "minimum": latency_s, "maximum": latency_s, "bucketCounts": [],
                "exponentialBuckets": {"numFiniteBuckets": 29, "growthFactor": 2.0, "scale": 1e-6}}}]},
        ],
        "logEntries": [{"name": "endpoints_log", "timestamp": at,
            "severity": if code >= 400 { "ERROR" } else { "INFO" },
            "structPayload": {"http_response_code": code, "api_method": SELECTOR,
                              "url": "/echo?key=AIzaSyVerySecretKeyMaterial", "api_key": "AIzaSyVerySecretKeyMaterial"}}],
    })
}

async fn timeseries_total(h: &Harness) -> (i64, i64, Value) {
    let v = h
        .admin(
            "GET",
            &format!("/portico/v1/services/{SVC}/timeseries?since=2h"),
            None,
        )
        .await;
    let mut req = 0;
    let mut err = 0;
    for s in v["timeSeries"].as_array().into_iter().flatten() {
        for p in s["points"].as_array().into_iter().flatten() {
            req += p["requestCount"]
                .as_str()
                .and_then(|x| x.parse::<i64>().ok())
                .unwrap_or(0);
            err += p["errorCount"]
                .as_str()
                .and_then(|x| x.parse::<i64>().ok())
                .unwrap_or(0);
        }
    }
    (req, err, v)
}

#[tokio::test]
async fn report_idempotent_queryable_and_durable_across_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_path_buf();
    let h = Harness::start_in(Backend::Sqlite, dir)
        .await
        .expect("sqlite");
    let (config_id, rollout_id) = h.deploy().await;
    let (key, _) = h.api_key(CONSUMER, json!({})).await;
    let consumer = format!("api_key:{key}");

    // ESP's rollout ping: an empty report answers with the rollout id.
    let v = h
        .admin(
            "POST",
            &format!("/v1/services/{SVC}:report"),
            Some(json!({})),
        )
        .await;
    assert_eq!(v["serviceRolloutId"], rollout_id, "{v}");
    assert_eq!(v["serviceConfigId"], config_id, "{v}");

    let batch = json!({"serviceConfigId": config_id, "operations": [
        report_op("op-1", &consumer, 200, 0.004, &at(10)),
        report_op("op-2", &consumer, 200, 0.120, &at(20)),
        report_op("op-3", &consumer, 503, 0.030, &at(65)),
    ]});
    h.admin(
        "POST",
        &format!("/v1/services/{SVC}:report"),
        Some(batch.clone()),
    )
    .await;
    // The proxy retries the same batch: nothing is counted twice.
    h.admin("POST", &format!("/v1/services/{SVC}:report"), Some(batch))
        .await;
    let (req, err, v) = timeseries_total(&h).await;
    assert_eq!((req, err), (3, 1), "{v}");
    let points = &v["timeSeries"][0]["points"];
    assert_eq!(
        points.as_array().map(|a| a.len()),
        Some(2),
        "two minutes: {v}"
    );
    assert_eq!(points[0]["responseCodeClasses"]["2xx"], "2");
    assert_eq!(points[1]["responseCodeClasses"]["5xx"], "1");
    assert_eq!(points[0]["latency"]["p50Ms"], json!(5.0), "{v}");

    let v = h
        .admin(
            "GET",
            &format!("/portico/v1/services/{SVC}/topConsumers?since=2h"),
            None,
        )
        .await;
    assert_eq!(v["consumers"][0]["requestCount"], "3", "{v}");
    let consumer_label = v["consumers"][0]["consumer"]
        .as_str()
        .expect("consumer")
        .to_string();
    assert!(consumer_label.starts_with("project_number:"), "{v}");

    let v = h
        .admin(
            "GET",
            &format!("/portico/v1/services/{SVC}/logs?since=2h&statusClass=5xx"),
            None,
        )
        .await;
    let entries = v["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{v}");
    assert_eq!(entries[0]["httpResponseCode"], 503);
    assert!(
        !v.to_string().contains("VerySecretKeyMaterial"),
        "key stored in logs: {v}"
    );
    let (s, v) = h
        .call(
            "GET",
            &format!("/portico/v1/services/{SVC}/logs?statusClass=9xx"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, 400, "{v}");

    // Prometheus exposition.
    let (s, text) = h.call("GET", "/metrics", None, None).await;
    assert_eq!(s, 200);
    let text = text.as_str().unwrap_or_default().to_string();
    assert!(
        text.contains(&format!(
        "portico_api_requests_total{{service=\"{SVC}\",method=\"{SELECTOR}\",code_class=\"2xx\"}} 2"
    )),
        "{text}"
    );
    assert!(
        text.contains("portico_servicecontrol_calls_total{call=\"report\",result=\"ok\"} 3"),
        "{text}"
    );

    // Restart on the same data directory: everything accepted is still there, and replays are
    // still recognised.
    let Harness { state, dir, .. } = h;
    drop(state);
    let h2 = Harness::start_in(Backend::Sqlite, dir)
        .await
        .expect("restart");
    assert_eq!(h2.dir.path(), data.as_path());
    let (req, err, v) = timeseries_total(&h2).await;
    assert_eq!((req, err), (3, 1), "after restart: {v}");
    let again = json!({"operations": [report_op("op-3", &consumer, 503, 0.030, &at(65))]});
    h2.admin("POST", &format!("/v1/services/{SVC}:report"), Some(again))
        .await;
    let (req, _, _) = timeseries_total(&h2).await;
    assert_eq!(req, 3, "replay after restart not counted");
    h2.finish().await;
}

#[tokio::test]
async fn report_on_postgres() {
    let Some(h) = Harness::start(Backend::Postgres).await else {
        return;
    };
    h.deploy().await;
    let batch = json!({"operations": [
        report_op("p-1", &format!("project:{CONSUMER}"), 200, 0.004, &at(10)),
        report_op("p-2", &format!("project:{CONSUMER}"), 404, 0.002, &at(11)),
    ]});
    h.admin(
        "POST",
        &format!("/v1/services/{SVC}:report"),
        Some(batch.clone()),
    )
    .await;
    h.admin("POST", &format!("/v1/services/{SVC}:report"), Some(batch))
        .await;
    let (req, err, v) = timeseries_total(&h).await;
    assert_eq!((req, err), (2, 1), "{v}");
    let v = h
        .admin(
            "GET",
            &format!("/portico/v1/services/{SVC}/logs?since=2h&method={SELECTOR}"),
            None,
        )
        .await;
    assert_eq!(v["entries"].as_array().map(|a| a.len()), Some(2), "{v}");
    h.finish().await;
}

/// `gcloud projects delete`/`undelete` (Resource Manager v1) drive `PROJECT_DELETED`, and the
/// Portico `expireTime` extension on API keys drives `API_KEY_EXPIRED`, in `:check` and
/// `:allocateQuota`.
async fn project_deleted_and_key_expired(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    h.deploy().await;
    let (key, _) = h.api_key(CONSUMER, json!({})).await;
    let consumer = format!("api_key:{key}");
    let (producer_key, _) = h.api_key(PRODUCER, json!({})).await;
    let r = h.check(&consumer, json!({})).await;
    assert!(r.get("checkErrors").is_none(), "{r}");

    // Delete: GET shows the state; check and allocate refuse the consumer, by key and by project.
    let v = h
        .admin("DELETE", &format!("/v1/projects/{CONSUMER}"), None)
        .await;
    assert_eq!(v, json!({}));
    let v = h
        .admin("GET", &format!("/v1/projects/{CONSUMER}"), None)
        .await;
    assert_eq!(v["lifecycleState"], "DELETE_REQUESTED", "{v}");
    let r = h.check(&consumer, json!({})).await;
    assert_eq!(first_error(&r), "PROJECT_DELETED", "{r}");
    let number = r["checkInfo"]["consumerInfo"]["projectNumber"]
        .as_str()
        .unwrap_or_else(|| panic!("consumer info still present: {r}"))
        .to_string();
    assert_eq!(r["checkErrors"][0]["subject"], format!("projects/{number}"));
    let r = h.check(&format!("project:{CONSUMER}"), json!({})).await;
    assert_eq!(first_error(&r), "PROJECT_DELETED", "{r}");
    let r = h
        .check(&format!("project_number:{number}"), json!({}))
        .await;
    assert_eq!(first_error(&r), "PROJECT_DELETED", "{r}");
    let v = h
        .admin(
            "POST",
            &format!("/v1/services/{SVC}:allocateQuota"),
            Some(allocate_body(&consumer, 1, "NORMAL")),
        )
        .await;
    assert_eq!(v["allocateErrors"][0]["code"], "PROJECT_DELETED", "{v}");
    // Another project's key is unaffected.
    let r = h.check(&format!("api_key:{producer_key}"), json!({})).await;
    assert!(r.get("checkErrors").is_none(), "{r}");
    // Deleting again is a no-op (Google: delete only affects ACTIVE projects).
    h.admin("DELETE", &format!("/v1/projects/{CONSUMER}"), None)
        .await;

    // Undelete restores; a second undelete is a precondition failure.
    let v = h
        .admin(
            "POST",
            &format!("/v1/projects/{CONSUMER}:undelete"),
            Some(json!({})),
        )
        .await;
    assert_eq!(v, json!({}));
    let v = h
        .admin("GET", &format!("/v1/projects/{CONSUMER}"), None)
        .await;
    assert_eq!(v["lifecycleState"], "ACTIVE", "{v}");
    let r = h.check(&consumer, json!({})).await;
    assert!(r.get("checkErrors").is_none(), "after undelete: {r}");
    let v = h
        .admin(
            "POST",
            &format!("/v1/services/{SVC}:allocateQuota"),
            Some(allocate_body(&consumer, 1, "NORMAL")),
        )
        .await;
    assert!(v.get("allocateErrors").is_none(), "{v}");
    let (s, v) = h
        .call(
            "POST",
            &format!("/v1/projects/{CONSUMER}:undelete"),
            Some(&h.admin),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["status"], "FAILED_PRECONDITION", "{v}");

    // expireTime (Portico extension): a future one keeps the key valid and is returned by get
    // and list; a past one (set by PATCH) expires it; clearing it revives it.
    let future = "2999-01-01T00:00:00Z";
    let op = h
        .admin(
            "POST",
            &format!("/v2/projects/{CONSUMER}/locations/global/keys?keyId=expiring"),
            Some(json!({"displayName": "e", "restrictions": {}, "expireTime": future})),
        )
        .await;
    assert_eq!(op["response"]["expireTime"], future, "{op}");
    let expiring = format!(
        "api_key:{}",
        op["response"]["keyString"].as_str().expect("keyString")
    );
    let r = h.check(&expiring, json!({})).await;
    assert!(r.get("checkErrors").is_none(), "future expiry: {r}");
    let keys_path = format!("/v2/projects/{CONSUMER}/locations/global/keys");
    let v = h.admin("GET", &format!("{keys_path}/expiring"), None).await;
    assert_eq!(v["expireTime"], future, "{v}");
    let v = h.admin("GET", &keys_path, None).await;
    let listed = v["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["name"].as_str().is_some_and(|n| n.ends_with("/expiring")))
        .cloned()
        .unwrap_or_else(|| panic!("expiring key listed: {v}"));
    assert_eq!(listed["expireTime"], future);

    let op = h
        .admin(
            "PATCH",
            &format!("{keys_path}/expiring?updateMask=expireTime"),
            Some(json!({"expireTime": "2020-06-01T12:00:00+02:00"})),
        )
        .await;
    assert_eq!(op["response"]["expireTime"], "2020-06-01T10:00:00Z", "{op}");
    let r = h.check(&expiring, json!({})).await;
    assert_eq!(first_error(&r), "API_KEY_EXPIRED", "{r}");
    assert_eq!(
        r["checkErrors"][0]["detail"],
        "API key expired. Please renew the API key."
    );
    let v = h
        .admin(
            "POST",
            &format!("/v1/services/{SVC}:allocateQuota"),
            Some(allocate_body(&expiring, 1, "NORMAL")),
        )
        .await;
    assert_eq!(v["allocateErrors"][0]["code"], "API_KEY_EXPIRED", "{v}");
    // The other key of the same project is not touched.
    let r = h.check(&consumer, json!({})).await;
    assert!(r.get("checkErrors").is_none(), "{r}");
    // A mask without the field in the body clears it.
    let op = h
        .admin(
            "PATCH",
            &format!("{keys_path}/expiring?updateMask=expireTime"),
            Some(json!({})),
        )
        .await;
    assert!(op["response"].get("expireTime").is_none(), "{op}");
    let r = h.check(&expiring, json!({})).await;
    assert!(r.get("checkErrors").is_none(), "cleared expiry: {r}");
    // A bad timestamp is a 400 naming it.
    let (s, v) = h
        .call(
            "PATCH",
            &format!("{keys_path}/expiring?updateMask=expireTime"),
            Some(&h.admin),
            Some(json!({"expireTime": "next tuesday"})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("next tuesday"),
        "{v}"
    );
    h.finish().await;
}

#[tokio::test]
async fn project_deleted_and_key_expired_sqlite() {
    project_deleted_and_key_expired(Backend::Sqlite).await;
}

#[tokio::test]
async fn project_deleted_and_key_expired_postgres() {
    project_deleted_and_key_expired(Backend::Postgres).await;
}

/// Only the admin or a project owner may delete or undelete a project (Google keeps
/// `resourcemanager.projects.delete` out of `roles/editor`); a refused delete changes nothing.
#[tokio::test]
async fn only_owners_delete_projects() {
    let h = Harness::start(Backend::Sqlite).await.expect("sqlite");
    h.deploy().await;
    let editor = h.service_account("proj-editor", false).await;
    let owner = h.service_account("proj-owner", false).await;
    let member = |id: &str| format!("serviceAccount:{id}@{PRODUCER}.iam.gserviceaccount.com");
    h.admin(
        "POST",
        &format!("/v1/projects/{CONSUMER}:setIamPolicy"),
        Some(json!({"policy": {"bindings": [
            {"role": "roles/editor", "members": [member("proj-editor")]},
            {"role": "roles/owner", "members": [member("proj-owner")]},
        ]}})),
    )
    .await;
    let path = format!("/v1/projects/{CONSUMER}");
    let (s, v) = h.call("DELETE", &path, Some(&editor), None).await;
    assert_eq!(s, 403, "editor deletes: {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("resourcemanager.projects.delete"),
        "{v}"
    );
    let v = h.admin("GET", &path, None).await;
    assert_eq!(
        v["lifecycleState"], "ACTIVE",
        "refused delete changed state: {v}"
    );
    let (s, v) = h.call("DELETE", &path, Some(&owner), None).await;
    assert_eq!(s, 200, "owner deletes: {v}");
    let (s, v) = h
        .call(
            "POST",
            &format!("{path}:undelete"),
            Some(&editor),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, 403, "editor undeletes: {v}");
    let (s, v) = h
        .call(
            "POST",
            &format!("{path}:undelete"),
            Some(&owner),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, 200, "owner undeletes: {v}");
    // Without any credentials: 401.
    let (s, v) = h.call("DELETE", &path, None, None).await;
    assert_eq!(s, 401, "{v}");
    h.finish().await;
}
