//! Service Management through the whole router: services, configs (conversion bounds
//! included), rollouts, operations, IAM policies, config reports, on SQLite and PostgreSQL.
//!
//! The request-then-assert runs look alike (`duplicates` pairs them): each asks a different
//! question and checks its own answer, so they are spelled out rather than table-driven.

mod support;

use axum::http::{Method, StatusCode};
use base64::Engine;
use portico_control_plane::apis::servicemanagement::Conversions;
use portico_control_plane::authz::decode_base64_any;
use portico_control_plane::store::rollouts::latest_success_id;
use serde_json::{json, Value};
use support::{env, TestEnv};

const TYPE_CONFIG_REF: &str = "type.googleapis.com/google.api.servicemanagement.v1.ConfigRef";

/// `YYYY-MM-DD` in UTC: the day part of config and rollout ids.
fn today() -> String {
    let d = time::OffsetDateTime::now_utc().date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

const SVC: &str = "echo-api.endpoints.demo-proj.cloud.goog";
const ECHO: &str = include_str!("fixtures/servicemanagement/echo-openapi.yaml");
const ECHO_V2: &str = include_str!("fixtures/servicemanagement/echo-openapi-v2.yaml");
const BROKEN: &str = include_str!("fixtures/servicemanagement/broken-openapi.yaml");
const ECHO_SPLIT: &str = include_str!("fixtures/servicemanagement/echo-split-openapi.yaml");
const ECHO_COMMON: &str = include_str!("fixtures/servicemanagement/echo-common.yaml");

fn submit_body(spec: &str, validate_only: bool) -> Value {
    json!({"configSource": {"files": [{
        "filePath": "openapi.yaml",
        // gcloud sends URL-safe base64.
        "fileContents": base64::engine::general_purpose::URL_SAFE.encode(spec),
        "fileType": "OPEN_API_YAML"}]},
        "validateOnly": validate_only})
}

async fn create(e: &TestEnv) {
    let (st, op) = e
        .admin(
            Method::POST,
            "/v1/services?alt=json",
            Some(json!({"serviceName": SVC, "producerProjectId": "demo-proj"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{op}");
    assert_eq!(op["name"], format!("operations/services.{SVC}-0"));
    assert_eq!(op["done"], true);
    assert_eq!(op["response"]["producerProjectId"], "demo-proj");
}

/// `configs:submit` as the admin.
async fn post_submit(e: &TestEnv, spec: &str, validate_only: bool) -> (StatusCode, Value) {
    e.admin(
        Method::POST,
        &format!("/v1/services/{SVC}/configs:submit"),
        Some(submit_body(spec, validate_only)),
    )
    .await
}

async fn submit(e: &TestEnv, spec: &str) -> String {
    let (st, op) = post_submit(e, spec, false).await;
    assert_eq!(st, StatusCode::OK, "{op}");
    op["response"]["serviceConfig"]["id"]
        .as_str()
        .expect("config id")
        .to_string()
}

#[tokio::test]
async fn deploy_flow_ids_listing_rollouts_and_operations() {
    let e = env().await;
    let (st, err) = e
        .admin(Method::GET, &format!("/v1/services/{SVC}"), None)
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(err["error"]["status"], "PERMISSION_DENIED");
    create(&e).await;
    let (st, _) = e.create_service(SVC, "demo-proj").await;
    assert_eq!(st, StatusCode::CONFLICT);

    let day = today();
    let r0 = submit(&e, ECHO).await;
    assert_eq!(r0, format!("{day}r0"));
    let r1 = submit(&e, ECHO_V2).await;
    assert_eq!(r1, format!("{day}r1"));

    // Newest first, paginated.
    let (st, page) = e
        .admin(
            Method::GET,
            &format!("/v1/services/{SVC}/configs?pageSize=1"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(page["serviceConfigs"][0]["id"], r1.as_str());
    let tok = page["nextPageToken"].as_str().expect("token").to_string();
    let (_, page2) = e
        .admin(
            Method::GET,
            &format!("/v1/services/{SVC}/configs?pageSize=1&pageToken={tok}"),
            None,
        )
        .await;
    assert_eq!(page2["serviceConfigs"][0]["id"], r0.as_str());
    assert!(page2.get("nextPageToken").is_none());

    let (st, cfg) = e
        .admin(
            Method::GET,
            &format!("/v1/services/{SVC}/configs/{r0}"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(cfg["name"], SVC);
    assert_eq!(cfg["producerProjectId"], "demo-proj");
    assert!(cfg.get("sourceInfo").is_none());
    let (_, full) = e
        .admin(
            Method::GET,
            &format!("/v1/services/{SVC}/configs/{r0}?view=FULL"),
            None,
        )
        .await;
    let src = full["sourceInfo"]["sourceFiles"][0]["fileContents"]
        .as_str()
        .expect("source");
    assert_eq!(decode_base64_any(src).expect("b64"), ECHO.as_bytes());
    let (_, latest) = e
        .admin(Method::GET, &format!("/v1/services/{SVC}/config"), None)
        .await;
    assert_eq!(latest["id"], r1.as_str());
    let (_, by_id) = e
        .admin(
            Method::GET,
            &format!("/v1/services/{SVC}/config?configId={r0}"),
            None,
        )
        .await;
    assert_eq!(by_id["id"], r0.as_str());
    let (st, nf) = e
        .admin(
            Method::GET,
            &format!("/v1/services/{SVC}/configs/2020-01-01r9"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(
        nf["error"]["message"],
        format!("Service configuration '2020-01-01r9' not found for service '{SVC}'.")
    );

    // Rollouts: unknown config rejected, then one per config, newest first.
    let (st, _) = e
        .admin(
            Method::POST,
            &format!("/v1/services/{SVC}/rollouts"),
            Some(json!({"trafficPercentStrategy": {"percentages": {"nope": 100.0}}})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let mut rollout_op = String::new();
    for id in [&r0, &r1] {
        let (st, op) = e
            .admin(
                Method::POST,
                &format!("/v1/services/{SVC}/rollouts"),
                Some(json!({"serviceName": SVC,
                    "trafficPercentStrategy": {"percentages": {id.as_str(): 100.0}}})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{op}");
        assert_eq!(op["response"]["status"], "SUCCESS");
        rollout_op = op["name"].as_str().expect("name").to_string();
    }
    let (_, ro) = e
        .admin(
            Method::GET,
            &format!("/v1/services/{SVC}/rollouts?filter=status%3DSUCCESS&pageSize=1"),
            None,
        )
        .await;
    assert_eq!(
        ro["rollouts"][0]["trafficPercentStrategy"]["percentages"][r1.as_str()],
        100.0
    );
    assert!(ro["nextPageToken"].is_string());
    let rid = ro["rollouts"][0]["rolloutId"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(rid, format!("{day}r1"));
    let (st, _) = e
        .admin(
            Method::GET,
            &format!("/v1/services/{SVC}/rollouts/{rid}"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);

    // Operations: percent-encoded ':' and an API prefix, with or without `operations/`.
    let id = rollout_op
        .trim_start_matches("operations/")
        .replace(':', "%3A");
    let (st, op) = e
        .admin(
            Method::GET,
            &format!("/servicemanagement/v1/operations/{id}?alt=json"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{op}");
    assert_eq!(op["name"], rollout_op.as_str());
    assert_eq!(op["done"], true);

    // Generate config report: identical configs → no changes; r0 → r1 lists added rules.
    let cref = |id: &str| json!({"@type": TYPE_CONFIG_REF, "name": format!("services/{SVC}/configs/{id}")});
    let (st, rep) = e
        .admin(
            Method::POST,
            "/v1/services:generateConfigReport",
            Some(json!({"newConfig": cref(&r1), "oldConfig": cref(&r1)})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{rep}");
    assert!(rep.get("changeReports").is_none());
    let (_, rep) = e
        .admin(
            Method::POST,
            "/v1/services:generateConfigReport",
            Some(json!({"newConfig": cref(&r1), "oldConfig": cref(&r0)})),
        )
        .await;
    let changes = rep["changeReports"][0]["configChanges"]
        .as_array()
        .expect("changes");
    assert!(changes.iter().any(|c| c["changeType"] == "ADDED"
        && c["element"]
            .as_str()
            .unwrap_or("")
            .starts_with("http.rules[")));
}

/// A spec with `paths` operations, big enough that the converter reads the clock often.
fn many_paths(n: usize) -> String {
    let mut paths = String::from("paths:\n");
    for i in 0..n {
        paths.push_str(&format!(
            "  /gen{i}:\n    get:\n      operationId: gen{i}\n      responses:\n        '200':\n          description: ok\n"
        ));
    }
    ECHO.replacen("paths:\n", &paths, 1)
}

/// A conversion is bounded in time, with a clear error, and stores
/// nothing.
#[tokio::test]
async fn a_conversion_past_its_time_bound_fails_clearly() {
    let e = support::env_customized(|s| {
        s.conversions = Conversions::new(1, std::time::Duration::from_nanos(1));
    })
    .await;
    create(&e).await;
    let (st, err) = post_submit(&e, &many_paths(500), false).await;
    assert_eq!(st, StatusCode::GATEWAY_TIMEOUT, "{}", err["error"]);
    assert_eq!(err["error"]["status"], "DEADLINE_EXCEEDED");
    let msg = err["error"]["message"].as_str().expect("message");
    assert!(
        msg.starts_with(
            "Converting the service config took longer than 0.000000001 s and was stopped;"
        ),
        "{msg}"
    );
    let (_, list) = e
        .admin(Method::GET, &format!("/v1/services/{SVC}/configs"), None)
        .await;
    assert!(list.get("serviceConfigs").is_none(), "{list}");
}

/// A hook that holds each conversion until the test releases it (or 10 s pass), and says
/// whether the test released it.
struct Hold {
    entered: tokio::sync::mpsc::UnboundedReceiver<()>,
    release: std::sync::mpsc::Sender<()>,
    released_by_test: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

fn hold() -> (Hold, std::sync::Arc<dyn Fn() + Send + Sync>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let (entered_tx, entered) = tokio::sync::mpsc::unbounded_channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let released_by_test = Arc::new(AtomicBool::new(false));
    let flag = released_by_test.clone();
    let hook = move || {
        let _ = entered_tx.send(());
        // The bound only matters when the conversion blocks the thread the test runs on
        // (the bug): then the test cannot release it, and this gives up.
        let released = release_rx
            .lock()
            .is_ok_and(|rx| rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok());
        flag.store(released, Ordering::SeqCst);
    };
    (
        Hold {
            entered,
            release,
            released_by_test,
        },
        Arc::new(hook),
    )
}

/// While a conversion runs, unrelated requests are answered. The test
/// runs on a single-threaded runtime: a conversion on that thread would hold everything.
#[tokio::test(flavor = "current_thread")]
async fn unrelated_requests_are_answered_while_a_conversion_runs() {
    let (mut hold, hook) = hold();
    let e = std::sync::Arc::new(
        support::env_customized(|s| {
            s.conversions.before_convert = Some(hook);
        })
        .await,
    );
    create(&e).await;
    let e2 = e.clone();
    let submit = tokio::spawn(async move { post_submit(&e2, ECHO, false).await });
    hold.entered.recv().await.expect("the conversion started");
    // The conversion is now held: these are answered meanwhile.
    let (st, _) = e.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = e
        .admin(Method::GET, &format!("/v1/services/{SVC}"), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let _ = hold.release.send(());
    let (st, op) = submit.await.expect("submit task");
    assert_eq!(st, StatusCode::OK, "{op}");
    assert!(
        hold.released_by_test
            .load(std::sync::atomic::Ordering::SeqCst),
        "the conversion blocked the runtime: /metrics was only answered after it gave up"
    );
}

/// Conversions beyond the bound wait for a turn, within the same time limit.
#[tokio::test]
async fn concurrent_conversions_are_bounded() {
    let (mut hold, hook) = hold();
    let e = std::sync::Arc::new(
        support::env_customized(|s| {
            s.conversions = Conversions::new(1, std::time::Duration::from_millis(300));
            s.conversions.before_convert = Some(hook);
        })
        .await,
    );
    create(&e).await;
    let e2 = e.clone();
    let first = tokio::spawn(async move { post_submit(&e2, ECHO, false).await });
    hold.entered
        .recv()
        .await
        .expect("the first conversion started");
    // The only permit is held until this test releases it: the second cannot start.
    let (st, err) = post_submit(&e, ECHO, false).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("The control plane is busy converting other service configs"),
        "{err}"
    );
    let _ = hold.release.send(());
    // The first ran past its own limit while held.
    let (st, err) = first.await.expect("first submit");
    assert_eq!(st, StatusCode::GATEWAY_TIMEOUT, "{err}");
}

/// A YAML alias bomb and out-of-range numbers through the API: 400 naming the file and line.
#[tokio::test]
async fn hostile_specs_are_refused_with_file_and_line() {
    let e = env().await;
    create(&e).await;
    let mut bomb = ECHO.to_string();
    bomb.push_str("x-bomb:\n  l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let refs = vec![format!("*l{}", i - 1); 10].join(", ");
        bomb.push_str(&format!("  l{i}: &l{i} [{refs}]\n"));
    }
    let bomb_line = ECHO.lines().count() + 7;
    let deadline = ECHO.replace(
        "paths:\n",
        "x-google-backend:\n  address: https://b.example.com\n  deadline: 1e300\npaths:\n",
    );
    assert_ne!(deadline, ECHO);
    let deadline_line = deadline
        .lines()
        .position(|l| l.contains("1e300"))
        .expect("line")
        + 1;
    for (spec, expected) in [
        (bomb, format!("openapi.yaml:{bomb_line}:")),
        (
            deadline,
            format!(
                "openapi.yaml:{deadline_line}:13: x-google-backend deadline 1e300 is out of range"
            ),
        ),
    ] {
        let (st, err) = post_submit(&e, &spec, false).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{err}");
        let msg = err["error"]["message"].as_str().expect("message");
        assert!(
            msg.starts_with(&format!("Cannot convert to service config.\n{expected}")),
            "{msg}"
        );
    }
}

/// `configs:submit` of several files, as gcloud sends them (`OPEN_API_YAML`, URL-safe base64).
async fn post_files(e: &TestEnv, files: &[(&str, &str)]) -> (StatusCode, Value) {
    let files: Vec<Value> = files
        .iter()
        .map(|(path, text)| {
            json!({"filePath": path,
                   "fileContents": base64::engine::general_purpose::URL_SAFE.encode(text),
                   "fileType": "OPEN_API_YAML"})
        })
        .collect();
    e.admin(
        Method::POST,
        &format!("/v1/services/{SVC}/configs:submit"),
        Some(json!({"configSource": {"files": files}, "validateOnly": false})),
    )
    .await
}

/// An API whose definitions, a parameter and a whole path item live in a second file: the
/// `$ref`s are resolved against the other file of the submission; a missing file is a 400
/// naming the referring file, its line and the file it wanted.
#[tokio::test]
async fn a_config_of_two_files_with_references_between_them() {
    let e = env().await;
    create(&e).await;
    let (st, op) = post_files(
        &e,
        &[
            ("echo-split-openapi.yaml", ECHO_SPLIT),
            ("echo-common.yaml", ECHO_COMMON),
        ],
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{op}");
    let cfg = &op["response"]["serviceConfig"];
    let api = "1.echo_api_endpoints_demo_proj_cloud_goog";
    assert_eq!(cfg["apis"].as_array().map(Vec::len), Some(1), "{cfg}");
    assert_eq!(
        cfg["http"]["rules"],
        json!([
            {"selector": format!("{api}.Echo"), "post": "/echo", "body": "message"},
            {"selector": format!("{api}.GetEcho"), "get": "/echo/{id}"},
        ])
    );
    // The operation from echo-common.yaml requires the key as its security says.
    let usage = cfg["usage"]["rules"].as_array().expect("usage rules");
    assert_eq!(usage.len(), 2, "{cfg}");
    assert!(
        usage
            .iter()
            .all(|r| r.get("allowUnregisteredCalls").is_none()),
        "{cfg}"
    );
    let id = cfg["id"].as_str().expect("id").to_string();
    let (_, full) = e
        .admin(
            Method::GET,
            &format!("/v1/services/{SVC}/configs/{id}?view=FULL"),
            None,
        )
        .await;
    let names: Vec<&str> = full["sourceInfo"]["sourceFiles"]
        .as_array()
        .expect("sources")
        .iter()
        .map(|f| f["filePath"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(names, ["echo-split-openapi.yaml", "echo-common.yaml"]);

    // Through the REST API a shared file needs neither swagger nor host.
    let bare = ECHO_COMMON
        .replace("swagger: \"2.0\"\n", "")
        .replace("host: \"echo-api.endpoints.demo-proj.cloud.goog\"\n", "");
    assert!(!bare
        .lines()
        .any(|l| l.starts_with("swagger") || l.starts_with("host")));
    let (st, op) = post_files(
        &e,
        &[
            ("echo-split-openapi.yaml", ECHO_SPLIT),
            ("echo-common.yaml", &bare),
        ],
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{op}");

    // Without the second file: 400, with the referring file and line.
    let line = ECHO_SPLIT
        .lines()
        .position(|l| l.contains("$ref: \"./echo-common.yaml#/definitions/message\""))
        .expect("line")
        + 1;
    let (st, err) = post_files(&e, &[("echo-split-openapi.yaml", ECHO_SPLIT)]).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["error"]["status"], "INVALID_ARGUMENT");
    let msg = err["error"]["message"].as_str().expect("message");
    assert!(
        msg.starts_with(&format!("Cannot convert to service config.\necho-split-openapi.yaml:{line}:19: reference \"./echo-common.yaml#/definitions/message\" cannot be resolved: the submission has no file \"echo-common.yaml\"")),
        "{msg}"
    );
    // A reference to a URL is refused, not fetched.
    let url = ECHO_SPLIT.replacen(
        "./echo-common.yaml#/definitions/message",
        "http://127.0.0.1:1/echo-common.yaml#/definitions/message",
        1,
    );
    let (st, err) = post_files(
        &e,
        &[
            ("echo-split-openapi.yaml", &url),
            ("echo-common.yaml", ECHO_COMMON),
        ],
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{err}");
    let msg = err["error"]["message"].as_str().expect("message");
    assert!(msg.contains(&format!("echo-split-openapi.yaml:{line}:19: reference \"http://127.0.0.1:1/echo-common.yaml#/definitions/message\" is a URL")), "{msg}");
    // The rejected submits stored nothing: two configs.
    let (_, list) = e
        .admin(Method::GET, &format!("/v1/services/{SVC}/configs"), None)
        .await;
    assert_eq!(list["serviceConfigs"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn validate_only_and_rejected_specs_store_nothing() {
    let e = env().await;
    create(&e).await;
    let (st, op) = post_submit(&e, ECHO, true).await;
    assert_eq!(st, StatusCode::OK, "{op}");
    assert_eq!(
        op["response"]["serviceConfig"]["id"],
        format!("{}r0", today())
    );
    let (st, err) = post_submit(&e, BROKEN, false).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["error"]["status"], "INVALID_ARGUMENT");
    let msg = err["error"]["message"].as_str().expect("message");
    assert!(
        msg.starts_with("Cannot convert to service config.\nopenapi.yaml:"),
        "{msg}"
    );
    let (_, list) = e
        .admin(Method::GET, &format!("/v1/services/{SVC}/configs"), None)
        .await;
    assert!(list.get("serviceConfigs").is_none(), "{list}");
    // Neither consumed an id.
    assert_eq!(submit(&e, ECHO).await, format!("{}r0", today()));
    // A spec for another host is refused.
    let other = ECHO.replace("echo-api.endpoints", "other-api.endpoints");
    let (st, _) = post_submit(&e, &other, false).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn iam_policy_etags_and_service_account_permissions() {
    let e = env().await;
    create(&e).await;
    let r0 = submit(&e, ECHO).await;
    let sa = "sa:echo-sa@demo-proj.iam.gserviceaccount.com";
    let cfg_uri = format!("/v1/services/{SVC}/config?configId={r0}");

    let (st, body) = e.call(Method::GET, &cfg_uri, None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["status"], "UNAUTHENTICATED");
    let (st, _) = e.call(Method::GET, &cfg_uri, Some("wrong"), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _) = e.call(Method::GET, &cfg_uri, Some(sa), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);

    let (st, pol) = e
        .admin(
            Method::POST,
            &format!("/v1/services/{SVC}:getIamPolicy"),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let etag = pol["etag"].as_str().expect("etag").to_string();
    let url_safe =
        base64::engine::general_purpose::URL_SAFE.encode(decode_base64_any(&etag).expect("b64"));
    let binding = json!([{"role": "roles/servicemanagement.serviceController",
        "members": ["serviceAccount:echo-sa@demo-proj.iam.gserviceaccount.com"]}]);
    let (st, body) = e
        .admin(
            Method::POST,
            &format!("/v1/services/{SVC}:setIamPolicy"),
            Some(json!({"policy": {"bindings": binding, "etag": url_safe, "version": 1}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_ne!(body["etag"], etag.as_str());
    // The old etag is now stale.
    let (st, body) = e
        .admin(
            Method::POST,
            &format!("/v1/services/{SVC}:setIamPolicy"),
            Some(json!({"policy": {"bindings": [], "etag": etag, "version": 1}})),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_eq!(body["error"]["status"], "ABORTED");

    let (st, cfg) = e.call(Method::GET, &cfg_uri, Some(sa), None).await;
    assert_eq!(st, StatusCode::OK, "{cfg}");
    assert_eq!(cfg["id"], r0.as_str());
    // serviceController reads but does not write.
    let (st, _) = e
        .call(
            Method::POST,
            &format!("/v1/services/{SVC}/configs:submit"),
            Some(sa),
            Some(submit_body(ECHO, false)),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _) = e
        .call(
            Method::GET,
            &cfg_uri,
            Some("sa:other@demo-proj.iam.gserviceaccount.com"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn concurrent_submits_get_distinct_ids() {
    concurrent_submits(std::sync::Arc::new(env().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submits_get_distinct_ids_postgres() {
    let Some(e) = support::env_pg("concurrent_submits_postgres").await else {
        return;
    };
    let e = std::sync::Arc::new(e);
    concurrent_submits(e.clone()).await;
    e.drop_pg_schema().await;
}

/// Two control planes on one PostgreSQL schema: ids stay unique across replicas and each
/// sees what the other wrote (policies included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_postgres() {
    use support::env_pg_schema;
    let schema = format!("cp_{}", uuid::Uuid::new_v4().simple());
    let Some(a) = env_pg_schema("two_replicas_share_postgres", &schema).await else {
        return;
    };
    let b = env_pg_schema("two_replicas_share_postgres", &schema)
        .await
        .expect("second replica");
    create(&a).await;
    let (ta, tb) = tokio::join!(submit(&a, ECHO), submit(&b, ECHO_V2));
    assert_ne!(ta, tb);
    let (_, list) = b
        .admin(Method::GET, &format!("/v1/services/{SVC}/configs"), None)
        .await;
    assert_eq!(list["serviceConfigs"].as_array().map(Vec::len), Some(2));
    let (_, pol) = a
        .admin(
            Method::POST,
            &format!("/v1/services/{SVC}:getIamPolicy"),
            None,
        )
        .await;
    let (st, _) = b
        .admin(
            Method::POST,
            &format!("/v1/services/{SVC}:setIamPolicy"),
            Some(json!({"policy": {"etag": pol["etag"], "bindings": [
                {"role": "roles/servicemanagement.serviceController",
                 "members": ["serviceAccount:esp@demo-proj.iam.gserviceaccount.com"]}]}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    // Replica A's view of the etag is now stale.
    let (st, _) = a
        .admin(
            Method::POST,
            &format!("/v1/services/{SVC}:setIamPolicy"),
            Some(json!({"policy": {"etag": pol["etag"], "bindings": []}})),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, _) = a
        .call(
            Method::GET,
            &format!("/v1/services/{SVC}/configs/{ta}"),
            Some("sa:esp@demo-proj.iam.gserviceaccount.com"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    a.drop_pg_schema().await;
}

async fn concurrent_submits(e: std::sync::Arc<TestEnv>) {
    create(&e).await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let e = e.clone();
        tasks.push(tokio::spawn(async move { submit(&e, ECHO).await }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("task"));
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6, "{ids:?}");
    let (_, list) = e
        .admin(Method::GET, &format!("/v1/services/{SVC}/configs"), None)
        .await;
    assert_eq!(list["serviceConfigs"].as_array().map(Vec::len), Some(6));
}

#[tokio::test]
async fn delete_and_undelete() {
    let e = env().await;
    create(&e).await;
    let r0 = submit(&e, ECHO).await;
    let (st, _) = e
        .admin(
            Method::POST,
            &format!("/v1/services/{SVC}/rollouts"),
            Some(json!({"trafficPercentStrategy": {"percentages": {r0.as_str(): 100.0}}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, op) = e
        .admin(Method::DELETE, &format!("/v1/services/{SVC}"), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(op["name"], format!("operations/services.{SVC}-1"));
    let (st, _) = e
        .admin(Method::GET, &format!("/v1/services/{SVC}"), None)
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (_, list) = e
        .admin(
            Method::GET,
            "/v1/services?producerProjectId=demo-proj",
            None,
        )
        .await;
    assert!(list.get("services").is_none());
    let (st, op) = e
        .admin(Method::POST, &format!("/v1/services/{SVC}:undelete"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{op}");
    assert_eq!(op["name"], format!("operations/services.{SVC}-2"));
    assert_eq!(op["response"]["service"]["serviceName"], SVC);
    let (_, list) = e
        .admin(
            Method::GET,
            "/v1/services?producerProjectId=demo-proj",
            None,
        )
        .await;
    assert_eq!(list["services"][0]["serviceName"], SVC);
    let (st, _) = e
        .admin(Method::POST, &format!("/v1/services/{SVC}:undelete"), None)
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    // Newest first: the restored traffic split, the deletion, the original rollout.
    let (_, ro) = e
        .admin(Method::GET, &format!("/v1/services/{SVC}/rollouts"), None)
        .await;
    let ro = ro["rollouts"].as_array().expect("rollouts").clone();
    assert_eq!(ro.len(), 3);
    assert_eq!(
        ro[0]["trafficPercentStrategy"]["percentages"][r0.as_str()],
        100.0
    );
    assert!(ro[1].get("deleteServiceStrategy").is_some());
    assert_eq!(
        latest_success_id(&e.state.store, SVC)
            .await
            .unwrap()
            .as_deref(),
        ro[0]["rolloutId"].as_str()
    );
}

/// `configs:submit` of typed files (gcloud's `fileType`s), URL-safe base64.
async fn post_typed(e: &TestEnv, files: &[(&str, &str, &[u8])]) -> (StatusCode, Value) {
    let files: Vec<Value> = files
        .iter()
        .map(|(path, file_type, bytes)| {
            json!({"filePath": path,
                   "fileContents": base64::engine::general_purpose::URL_SAFE.encode(bytes),
                   "fileType": file_type})
        })
        .collect();
    e.admin(
        Method::POST,
        &format!("/v1/services/{SVC}/configs:submit"),
        Some(json!({"configSource": {"files": files}, "validateOnly": false})),
    )
    .await
}

/// gRPC sources go to the gRPC converter (a service config without APIs needs no descriptor);
/// mixing them with OpenAPI files, a name for another service, a PROTO_FILE alone and a broken
/// descriptor are refused with messages that name the files.
#[tokio::test]
async fn grpc_sources_are_converted_and_mixed_sources_refused() {
    let e = env().await;
    create(&e).await;
    let yaml =
        format!("type: google.api.Service\nconfig_version: 3\nname: {SVC}\ntitle: Bare gRPC\n");
    let (st, op) = post_typed(
        &e,
        &[("api_config.yaml", "SERVICE_CONFIG_YAML", yaml.as_bytes())],
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{op}");
    let cfg = &op["response"]["serviceConfig"];
    assert_eq!(cfg["title"], "Bare gRPC");
    assert_eq!(
        cfg["control"]["environment"],
        "servicecontrol.googleapis.com"
    );
    assert_eq!(
        cfg["sourceInfo"]["sourceFiles"][0]["fileType"],
        "SERVICE_CONFIG_YAML"
    );

    let (st, err) = post_typed(
        &e,
        &[
            ("openapi.yaml", "OPEN_API_YAML", ECHO.as_bytes()),
            ("api_config.yaml", "SERVICE_CONFIG_YAML", yaml.as_bytes()),
        ],
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(
        err["error"]["message"],
        "OpenAPI files (openapi.yaml) and gRPC service files (api_config.yaml) cannot be \
         deployed together: a service is described either by OpenAPI or by a descriptor set \
         and api_config.yaml."
    );

    let other = yaml.replace("echo-api.endpoints", "other-api.endpoints");
    let (st, err) = post_typed(
        &e,
        &[("api_config.yaml", "SERVICE_CONFIG_YAML", other.as_bytes())],
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(
        err["error"]["message"],
        format!(
            "The service name 'other-api.endpoints.demo-proj.cloud.goog' in the configuration \
             (name) does not match the service '{SVC}' it was submitted to."
        )
    );

    let (st, err) = post_typed(
        &e,
        &[
            (
                "api_descriptor.pb",
                "FILE_DESCRIPTOR_SET_PROTO",
                b"\xff\xff",
            ),
            ("api_config.yaml", "SERVICE_CONFIG_YAML", yaml.as_bytes()),
            ("bookstore.proto", "PROTO_FILE", b"syntax = \"proto3\";"),
        ],
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{err}");
    let msg = err["error"]["message"].as_str().expect("message");
    assert!(
        msg.starts_with(
            "Cannot convert to service config.\napi_descriptor.pb: The descriptor set cannot be \
             used: it is not a protobuf-encoded google.protobuf.FileDescriptorSet"
        ),
        "{msg}"
    );
    let (st, err) = post_typed(
        &e,
        &[("bookstore.proto", "PROTO_FILE", b"syntax = \"proto3\";")],
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{err}");
    let msg = err["error"]["message"].as_str().expect("message");
    assert!(
        msg.contains("a gRPC service needs a SERVICE_CONFIG_YAML file"),
        "{msg}"
    );
    assert!(
        msg.contains("bookstore.proto: A PROTO_FILE is kept for display only"),
        "{msg}"
    );
}
