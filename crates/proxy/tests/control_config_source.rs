//! Config source against a test double of Service Management: fixed version, latest rollout,
//! managed rollout changes, precise startup errors, and the self-signed JWT on every call.

mod control_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use control_support::{service_account, verify_bearer, wait_until, FakePeer};
use portico_proxy::config_source::{self, ConfigSourceOptions, RolloutNotifier, RolloutStrategy};

const SVC: &str = "echo-api.endpoints.demo-proj.cloud.goog";

/// Rollouts oldest first: (rollout id, [(config id, percent)]).
type Rollouts = Arc<Mutex<Vec<(String, Vec<(String, f64)>)>>>;

fn config_json(id: &str) -> String {
    serde_json::json!({
        "name": SVC,
        "id": id,
        "title": format!("config {id}"),
        "control": {"environment": "servicecontrol.googleapis.com"}
    })
    .to_string()
}

/// A config no proxy can use: a backend deadline no time span can hold.
fn unusable_config_json(id: &str) -> String {
    serde_json::json!({
        "name": SVC,
        "id": id,
        "control": {"environment": "servicecontrol.googleapis.com"},
        "http": {"rules": [{"selector": "1.echo.Echo", "get": "/echo"}]},
        "backend": {"rules": [{"selector": "1.echo.Echo", "address": "https://b.example.com", "deadline": 1e300}]}
    })
    .to_string()
}

/// Answers like Service Management: rollouts list from `rollouts`, configs by id.
fn management(
    rollouts: Rollouts,
) -> impl Fn(&control_support::Recorded) -> (u16, String) + Send + Sync {
    move |r| {
        let path = r.uri.split('?').next().unwrap_or("");
        let prefix = format!("/v1/services/{SVC}");
        if path == format!("{prefix}/rollouts") {
            let list: Vec<serde_json::Value> = rollouts
                .lock()
                .expect("lock")
                .iter()
                .rev()
                .map(|(id, pcts)| {
                    let p: serde_json::Map<String, serde_json::Value> = pcts
                        .iter()
                        .map(|(c, v)| (c.clone(), serde_json::json!(v)))
                        .collect();
                    serde_json::json!({"rolloutId": id, "status": "SUCCESS", "serviceName": SVC,
                        "trafficPercentStrategy": {"percentages": p}})
                })
                .collect();
            return (200, serde_json::json!({ "rollouts": list }).to_string());
        }
        if let Some(id) = path.strip_prefix(&format!("{prefix}/configs/")) {
            if id.starts_with("2026-") {
                return (200, config_json(id));
            }
            if id.starts_with("unusable-") {
                return (200, unusable_config_json(id));
            }
        }
        (
            404,
            r#"{"error":{"code":404,"message":"not found","status":"NOT_FOUND"}}"#.to_string(),
        )
    }
}

fn opts(peer: &FakePeer) -> ConfigSourceOptions {
    let mut o = ConfigSourceOptions::new(SVC);
    // No --management: the URL comes from the key file's token_uri, as in production.
    o.credentials = Some(service_account(&peer.url()));
    o
}

#[tokio::test]
async fn fixed_version_fetches_that_config_with_a_verifiable_token() {
    let peer = FakePeer::start(management(Arc::new(Mutex::new(vec![])))).await;
    let mut o = opts(&peer);
    o.version = Some("2026-11-22r3".into());
    let rx = tokio::time::timeout(Duration::from_secs(10), config_source::start(o))
        .await
        .expect("in time")
        .expect("start");
    let r = rx.borrow().clone();
    assert_eq!(r.rollout_id, "2026-11-22r3");
    assert_eq!(r.configs.len(), 1);
    assert_eq!(r.configs[0].0.id, "2026-11-22r3");
    assert_eq!(r.configs[0].1, 100);
    let reqs = peer.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        reqs[0].uri,
        format!("/v1/services/{SVC}/configs/2026-11-22r3")
    );
    let claims = verify_bearer(&reqs[0]);
    assert_eq!(claims["iss"], "esp@demo-proj.iam.gserviceaccount.com");
    assert_eq!(claims["sub"], claims["iss"]);
    assert_eq!(
        claims["aud"],
        format!(
            "{}/google.api.servicemanagement.v1.ServiceManager",
            peer.url()
        )
    );
}

/// The proxies ask for the FULL view (ESPv2's config manager does): only it carries
/// `sourceInfo`, where a gRPC service's descriptor set is kept for the transcoder.
#[tokio::test]
async fn full_view_is_asked_when_set() {
    let peer = FakePeer::start(management(Arc::new(Mutex::new(vec![])))).await;
    let mut o = opts(&peer);
    o.version = Some("2026-11-22r3".into());
    o.full_view = true;
    let rx = tokio::time::timeout(Duration::from_secs(10), config_source::start(o))
        .await
        .expect("in time")
        .expect("start");
    assert_eq!(rx.borrow().configs[0].0.id, "2026-11-22r3");
    let uris: Vec<String> = peer.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(
        uris,
        vec![format!("/v1/services/{SVC}/configs/2026-11-22r3?view=FULL")]
    );
}

/// A config answer past the bound is refused with a sentence, once (it would come again).
#[tokio::test]
async fn an_oversized_config_answer_is_refused_without_retrying() {
    let huge = format!(
        "{{\"name\":\"{SVC}\",\"title\":\"{}\"}}",
        "x".repeat(config_source::MAX_ANSWER_BYTES)
    );
    let peer = FakePeer::start(move |r: &control_support::Recorded| {
        if r.uri.contains("/configs/") {
            (200, huge.clone())
        } else {
            (404, "{}".to_string())
        }
    })
    .await;
    let mut o = opts(&peer);
    o.version = Some("2026-11-22r3".into());
    let e = tokio::time::timeout(Duration::from_secs(30), config_source::start(o))
        .await
        .expect("in time")
        .expect_err("too large");
    assert!(e.to_string().contains("larger than 67108864 bytes"), "{e}");
    assert_eq!(peer.requests().len(), 1);
}

#[tokio::test]
async fn latest_rollout_fetches_every_config_in_the_split() {
    let rollouts = Arc::new(Mutex::new(vec![
        (
            "2026-11-22r0".to_string(),
            vec![("2026-11-22r0".to_string(), 100.0)],
        ),
        (
            "2026-11-22r1".to_string(),
            vec![
                ("2026-11-22r0".to_string(), 20.0),
                ("2026-11-22r1".to_string(), 80.0),
            ],
        ),
    ]));
    let peer = FakePeer::start(management(rollouts)).await;
    let rx = config_source::start(opts(&peer)).await.expect("start");
    let r = rx.borrow().clone();
    assert_eq!(r.rollout_id, "2026-11-22r1");
    let got: Vec<(String, u32)> = r.configs.iter().map(|(s, p)| (s.id.clone(), *p)).collect();
    assert_eq!(
        got,
        vec![("2026-11-22r0".into(), 20), ("2026-11-22r1".into(), 80)]
    );
    let reqs = peer.requests();
    assert_eq!(
        reqs[0].uri,
        format!("/v1/services/{SVC}/rollouts?filter=status=SUCCESS")
    );
    assert_eq!(reqs.len(), 3, "one list + two configs: {reqs:?}");
}

#[tokio::test]
async fn managed_rollout_change_is_published() {
    let rollouts = Arc::new(Mutex::new(vec![(
        "2026-11-22r0".to_string(),
        vec![("2026-11-22r0".to_string(), 100.0)],
    )]));
    let peer = FakePeer::start(management(rollouts.clone())).await;
    let mut o = opts(&peer);
    o.rollout_strategy = RolloutStrategy::Managed;
    o.poll_interval = Duration::from_millis(200);
    let mut rx = config_source::start(o).await.expect("start");
    assert_eq!(rx.borrow_and_update().rollout_id, "2026-11-22r0");

    rollouts.lock().expect("lock").push((
        "2026-11-22r1".to_string(),
        vec![("2026-11-22r1".to_string(), 100.0)],
    ));
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("new rollout within 5 s")
        .expect("sender alive");
    let r = rx.borrow().clone();
    assert_eq!(r.rollout_id, "2026-11-22r1");
    assert_eq!(r.configs[0].0.id, "2026-11-22r1");
    let polls = peer.requests_to("/rollouts");
    assert!(
        polls.iter().skip(1).all(|p| p.uri.ends_with("pageSize=1")),
        "{polls:?}"
    );
}

#[tokio::test]
async fn failed_config_download_keeps_the_previous_rollout() {
    let rollouts = Arc::new(Mutex::new(vec![(
        "2026-11-22r0".to_string(),
        vec![("2026-11-22r0".to_string(), 100.0)],
    )]));
    let peer = FakePeer::start(management(rollouts.clone())).await;
    let mut o = opts(&peer);
    o.rollout_strategy = RolloutStrategy::Managed;
    o.poll_interval = Duration::from_millis(100);
    let mut rx = config_source::start(o).await.expect("start");
    rx.borrow_and_update();
    // The new rollout names a config the peer cannot serve (404).
    rollouts.lock().expect("lock").push((
        "broken".to_string(),
        vec![
            ("2026-11-22r0".to_string(), 50.0),
            ("missing".to_string(), 50.0),
        ],
    ));
    assert!(
        wait_until(Duration::from_secs(5), || peer
            .requests()
            .iter()
            .any(|r| r.uri.ends_with("/configs/missing")))
        .await
    );
    assert!(!rx.has_changed().expect("alive"));
    assert_eq!(rx.borrow().rollout_id, "2026-11-22r0");
}

#[tokio::test]
async fn rollout_id_from_service_control_triggers_an_immediate_fetch() {
    let rollouts = Arc::new(Mutex::new(vec![(
        "2026-11-22r0".to_string(),
        vec![("2026-11-22r0".to_string(), 100.0)],
    )]));
    let peer = FakePeer::start(management(rollouts.clone())).await;
    let notifier = RolloutNotifier::new();
    let mut o = opts(&peer);
    o.rollout_strategy = RolloutStrategy::Managed;
    // Polling alone would take a minute; only the notification can make this test pass.
    o.poll_interval = Duration::from_secs(60);
    o.rollout_notifier = Some(notifier.clone());
    let mut rx = config_source::start(o).await.expect("start");
    rx.borrow_and_update();
    rollouts.lock().expect("lock").push((
        "2026-11-22r2".to_string(),
        vec![("2026-11-22r2".to_string(), 100.0)],
    ));
    notifier.notify_rollout_id("2026-11-22r2");
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("published promptly")
        .expect("alive");
    assert_eq!(rx.borrow().rollout_id, "2026-11-22r2");
}

#[tokio::test]
async fn startup_failure_names_status_and_control_plane_message() {
    let peer = FakePeer::start(|_| {
        (
            403,
            r#"{"error":{"code":403,"message":"Permission 'servicemanagement.services.get' denied: the caller lacks roles/servicemanagement.serviceController","status":"PERMISSION_DENIED"}}"#
                .to_string(),
        )
    })
    .await;
    let err = config_source::start(opts(&peer)).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("HTTP 403"), "{msg}");
    assert!(
        msg.contains("lacks roles/servicemanagement.serviceController"),
        "{msg}"
    );
    assert!(msg.contains("/rollouts?filter=status=SUCCESS"), "{msg}");
    // 4xx is final: no retries.
    assert_eq!(peer.requests().len(), 1);
}

#[tokio::test]
async fn no_rollout_and_unreachable_are_precise() {
    let peer = FakePeer::start(|_| (200, r#"{"rollouts":[]}"#.to_string())).await;
    let err = config_source::start(opts(&peer)).await.unwrap_err();
    assert!(
        err.to_string().contains("has no successful rollout"),
        "{err}"
    );

    let url = peer.url();
    drop(peer);
    let mut o = ConfigSourceOptions::new(SVC);
    o.management_url = Some(url.clone());
    o.fetch_attempts = 2;
    let err = config_source::start(o).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("cannot reach Service Management at {url}")),
        "{err}"
    );
}

#[tokio::test]
async fn local_service_json_needs_no_network() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("service.json");
    std::fs::write(&path, config_json("2026-11-22r9")).expect("write");
    let mut o = ConfigSourceOptions::new(SVC);
    o.service_json_path = Some(path.clone());
    o.management_url = Some("http://127.0.0.1:1".into());
    let rx = config_source::start(o).await.expect("start");
    assert_eq!(rx.borrow().configs[0].0.id, "2026-11-22r9");

    std::fs::write(&path, "{ not json").expect("write");
    let mut o = ConfigSourceOptions::new(SVC);
    o.service_json_path = Some(path.clone());
    let err = config_source::start(o).await.unwrap_err();
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(err.to_string().contains("line 1"), "{err}");
}

#[tokio::test]
async fn startup_waits_for_a_control_plane_that_is_still_starting() {
    let rollouts: Rollouts = Arc::new(Mutex::new(vec![(
        "2026-11-22r0".to_string(),
        vec![("2026-11-22r0".to_string(), 100.0)],
    )]));
    let peer = FakePeer::start(management(rollouts)).await;
    // First two calls: 503, as from a control plane still opening its database.
    let calls = Arc::new(Mutex::new(0u32));
    let inner = management(Arc::new(Mutex::new(vec![(
        "2026-11-22r0".to_string(),
        vec![("2026-11-22r0".to_string(), 100.0)],
    )])));
    let c = calls.clone();
    peer.set_responder(move |r| {
        let mut n = c.lock().expect("lock");
        *n += 1;
        if *n <= 2 {
            (503, "starting".to_string())
        } else {
            inner(r)
        }
    });
    let rx = tokio::time::timeout(Duration::from_secs(10), config_source::start(opts(&peer)))
        .await
        .expect("in time")
        .expect("started after retries");
    assert_eq!(rx.borrow().rollout_id, "2026-11-22r0");
    assert_eq!(peer.requests_to("/rollouts").len(), 3);
}

#[tokio::test]
async fn managed_rollout_resumes_after_a_control_plane_outage() {
    let rollouts: Rollouts = Arc::new(Mutex::new(vec![(
        "2026-11-22r0".to_string(),
        vec![("2026-11-22r0".to_string(), 100.0)],
    )]));
    let peer = FakePeer::start(management(rollouts.clone())).await;
    let mut o = opts(&peer);
    o.rollout_strategy = RolloutStrategy::Managed;
    o.poll_interval = Duration::from_millis(100);
    let mut rx = config_source::start(o).await.expect("start");
    rx.borrow_and_update();
    peer.stop();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        rx.borrow().rollout_id,
        "2026-11-22r0",
        "outage keeps the old rollout"
    );
    rollouts.lock().expect("lock").push((
        "2026-11-22r1".to_string(),
        vec![("2026-11-22r1".to_string(), 100.0)],
    ));
    peer.restart().await;
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("picked up after the outage")
        .expect("alive");
    assert_eq!(rx.borrow().rollout_id, "2026-11-22r1");
}

/// A rollout to a config the proxy cannot use is refused, the previous
/// rollout keeps serving, the refused config is not downloaded again on every poll, and the
/// next good rollout is taken.
#[tokio::test]
async fn unusable_config_in_a_new_rollout_keeps_the_previous_one() {
    let rollouts = Arc::new(Mutex::new(vec![(
        "2026-11-22r0".to_string(),
        vec![("2026-11-22r0".to_string(), 100.0)],
    )]));
    let peer = FakePeer::start(management(rollouts.clone())).await;
    let mut o = opts(&peer);
    o.rollout_strategy = RolloutStrategy::Managed;
    o.poll_interval = Duration::from_millis(100);
    let mut rx = config_source::start(o).await.expect("start");
    rx.borrow_and_update();
    rollouts.lock().expect("lock").push((
        "2026-11-22r1".to_string(),
        vec![("unusable-1".to_string(), 100.0)],
    ));
    assert!(
        wait_until(Duration::from_secs(5), || peer
            .requests()
            .iter()
            .any(|r| r.uri.ends_with("/configs/unusable-1")))
        .await
    );
    // Let a few more polls happen: none of them publishes or downloads the config again.
    let polls = peer.requests_to("/rollouts").len();
    assert!(
        wait_until(Duration::from_secs(5), || peer
            .requests_to("/rollouts")
            .len()
            >= polls + 3)
        .await
    );
    assert!(!rx.has_changed().expect("alive"));
    assert_eq!(rx.borrow().rollout_id, "2026-11-22r0");
    assert_eq!(peer.requests_to("/configs/unusable-1").len(), 1);

    rollouts.lock().expect("lock").push((
        "2026-11-22r2".to_string(),
        vec![("2026-11-22r2".to_string(), 100.0)],
    ));
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("the next good rollout within 5 s")
        .expect("sender alive");
    assert_eq!(rx.borrow().rollout_id, "2026-11-22r2");
}

/// At start there is no previous config: the error names the config, the rule and the value.
#[tokio::test]
async fn unusable_config_at_start_is_a_sentence() {
    let peer = FakePeer::start(management(Arc::new(Mutex::new(vec![])))).await;
    let mut o = opts(&peer);
    o.version = Some("unusable-2".into());
    let err = config_source::start(o).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "service config {}/v1/services/{SVC}/configs/unusable-2 cannot be used: backend rule \"1.echo.Echo\": deadline 1e300 is out of range: a deadline is a number of seconds from 0.001 to 86400 (one day)",
            peer.url()
        )
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("service.json");
    std::fs::write(&path, unusable_config_json("unusable-3")).expect("write");
    let mut o = ConfigSourceOptions::new(SVC);
    o.service_json_path = Some(path.clone());
    let err = config_source::start(o).await.unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "service config {} cannot be used: backend rule",
            path.display()
        )),
        "{err}"
    );
}
