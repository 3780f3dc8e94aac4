//! The Service Control client against a test double of the control plane (see
//! `control_support`): check cache, fail policy, error mapping, quota, report aggregation,
//! retry after an outage, shutdown flush, and the bearer tokens on every call.

mod control_support;

use std::net::IpAddr;
use std::time::Duration;

use control_support::{service_account, verify_bearer, wait_until, FakePeer, Recorded};
use portico_proxy::config_source::RolloutNotifier;
use portico_proxy::error::Cause;
use portico_proxy::service_control::{
    CheckInput, QuotaInput, RequestRecord, ServiceControl, ServiceControlOptions,
};

const SVC: &str = "echo-api.endpoints.demo-proj.cloud.goog";
const WAIT: Duration = Duration::from_secs(10);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn input<'a>(key: &'a str, caller: IpAddr) -> CheckInput<'a> {
    CheckInput {
        service_name: SVC,
        service_config_id: "2026-11-22r0",
        operation_name: "1.echo_api_endpoints_demo_proj_cloud_goog.Echo",
        api_key: key,
        caller_ip: caller,
        referer: None,
        android_package: None,
        android_cert: None,
        ios_bundle: None,
        trace: None,
        context: None,
    }
}

fn ok_check() -> (u16, String) {
    (
        200,
        r#"{"operationId":"x","checkInfo":{"consumerInfo":{"projectNumber":"123456"}}}"#.into(),
    )
}

fn check_error(code: &str) -> (u16, String) {
    (
        200,
        format!(r#"{{"operationId":"x","checkErrors":[{{"code":"{code}","detail":"d"}}]}}"#),
    )
}

/// Routes like Service Control: `:check`, `:allocateQuota`, `:report`.
fn route(
    check: impl Fn() -> (u16, String) + Send + Sync + 'static,
    quota: impl Fn() -> (u16, String) + Send + Sync + 'static,
) -> impl Fn(&Recorded) -> (u16, String) + Send + Sync + 'static {
    move |r| {
        if r.uri.ends_with(":check") {
            check()
        } else if r.uri.ends_with(":allocateQuota") {
            quota()
        } else if r.uri.ends_with(":report") {
            (200, "{}".into())
        } else {
            (404, "{}".into())
        }
    }
}

fn options(peer: &FakePeer) -> ServiceControlOptions {
    let mut o = ServiceControlOptions::new(peer.url());
    o.credentials = Some(service_account(&peer.url()));
    o.report_flush_interval = Duration::from_millis(100);
    o.quota_refresh_interval = Duration::from_millis(100);
    o.report_retry_initial_backoff = Duration::from_millis(100);
    o.report_retry_max_backoff = Duration::from_millis(400);
    o
}

fn record(code: u16) -> RequestRecord {
    RequestRecord {
        service_name: SVC.into(),
        service_config_id: "2026-11-22r0".into(),
        producer_project_id: "demo-proj".into(),
        operation_name: Some("1.echo_api_endpoints_demo_proj_cloud_goog.Echo".into()),
        api_name: "1.echo_api_endpoints_demo_proj_cloud_goog".into(),
        api_version: "1.0.0".into(),
        api_key: Some("KEY".into()),
        api_key_valid: true,
        http_method: "POST".into(),
        url: "/echo?key=KEY".into(),
        response_code: code,
        request_size: 100,
        response_size: 200,
        total_latency: Duration::from_millis(4),
        backend_latency: Some(Duration::from_millis(3)),
        overhead_latency: Duration::from_millis(1),
        caller_ip: Some(ip("127.0.0.1")),
        protocol: "http".into(),
        ..Default::default()
    }
}

fn metric_int(op: &serde_json::Value, name: &str) -> Option<i64> {
    op["metricValueSets"]
        .as_array()?
        .iter()
        .find(|m| m["metricName"] == name)
        .and_then(|m| m["metricValues"][0]["int64Value"].as_str())
        .and_then(|s| s.parse().ok())
}

fn reported_ops(peer: &FakePeer) -> Vec<serde_json::Value> {
    peer.requests_to(":report")
        .iter()
        .flat_map(|r| {
            r.json()["operations"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

fn total_request_count(peer: &FakePeer) -> i64 {
    reported_ops(peer)
        .iter()
        .filter_map(|op| {
            metric_int(
                op,
                "serviceruntime.googleapis.com/api/producer/request_count",
            )
        })
        .sum()
}

#[tokio::test]
async fn check_cache_hit_miss_and_background_refresh() {
    let peer = FakePeer::start(route(ok_check, || (200, "{}".into()))).await;
    let mut o = options(&peer);
    o.check_refresh_interval = Duration::from_millis(1000);
    let sc = ServiceControl::new(o).expect("client");

    let ok = sc
        .check(input("KEY", ip("10.0.0.1")))
        .await
        .expect("allowed");
    assert_eq!(ok.consumer_project_number, Some(123456));
    assert!(ok.api_key_valid && !ok.network_failure);
    assert_eq!(peer.requests_to(":check").len(), 1);

    // Hit: no new request.
    sc.check(input("KEY", ip("10.0.0.1")))
        .await
        .expect("allowed");
    assert_eq!(peer.requests_to(":check").len(), 1);
    // Another caller IP is another cache entry (labels are part of the key).
    sc.check(input("KEY", ip("10.0.0.2")))
        .await
        .expect("allowed");
    assert_eq!(peer.requests_to(":check").len(), 2);

    // After the refresh interval the cached answer is still used, and one re-check happens
    // in the background.
    tokio::time::sleep(Duration::from_millis(1050)).await;
    peer.clear();
    sc.check(input("KEY", ip("10.0.0.1")))
        .await
        .expect("allowed");
    sc.check(input("KEY", ip("10.0.0.1")))
        .await
        .expect("allowed");
    assert!(wait_until(WAIT, || peer.requests_to(":check").len() == 1).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(peer.requests_to(":check").len(), 1, "one refresh per key");

    let st = sc.statistics();
    assert_eq!(st.total_called_checks, 5);
    assert_eq!(st.check_cache_hits, 3);
    assert_eq!(st.check_cache_misses, 2);
    assert_eq!(st.send_checks_by_flush, 1);

    // Request shape and credentials.
    let req = &peer.requests_to(":check")[0];
    assert_eq!(req.uri, format!("/v1/services/{SVC}:check"));
    assert_eq!(req.content_type.as_deref(), Some("application/json"));
    let body = req.json();
    assert_eq!(body["serviceConfigId"], "2026-11-22r0");
    assert_eq!(body["operation"]["consumerId"], "api_key:KEY");
    assert_eq!(
        body["operation"]["operationName"],
        "1.echo_api_endpoints_demo_proj_cloud_goog.Echo"
    );
    assert_eq!(
        body["operation"]["labels"]["servicecontrol.googleapis.com/caller_ip"],
        "10.0.0.1"
    );
    assert_eq!(
        body["operation"]["labels"]["servicecontrol.googleapis.com/user_agent"],
        "ESP"
    );
    let claims = verify_bearer(req);
    assert_eq!(
        claims["aud"],
        format!(
            "{}/google.api.servicecontrol.v1.ServiceController",
            peer.url()
        )
    );
    assert_eq!(claims["iss"], "esp@demo-proj.iam.gserviceaccount.com");
    sc.shutdown().await;
}

#[tokio::test]
async fn negative_verdicts_are_cached_and_rechecked_once_per_interval() {
    let peer = FakePeer::start(route(
        || check_error("API_KEY_INVALID"),
        || (200, "{}".into()),
    ))
    .await;
    let mut o = options(&peer);
    o.check_refresh_interval = Duration::from_millis(300);
    let sc = ServiceControl::new(o).expect("client");
    for _ in 0..3 {
        let e = sc.check(input("BAD", ip("10.0.0.1"))).await.unwrap_err();
        assert_eq!((e.http_status, e.code), (400, 3));
        assert_eq!(e.message, "API key not valid. Please pass a valid API key.");
        assert_eq!(e.cause, Cause::ServiceControl);
    }
    assert_eq!(peer.requests_to(":check").len(), 1);
    tokio::time::sleep(Duration::from_millis(350)).await;
    // The key became valid meanwhile: the one request that re-asks sees it.
    peer.set_responder(route(ok_check, || (200, "{}".into())));
    sc.check(input("BAD", ip("10.0.0.1")))
        .await
        .expect("now valid");
    assert_eq!(peer.requests_to(":check").len(), 2);
    sc.check(input("BAD", ip("10.0.0.1")))
        .await
        .expect("cached positive");
    assert_eq!(peer.requests_to(":check").len(), 2);
    sc.shutdown().await;
}

#[tokio::test]
async fn network_failure_fail_open_vs_fail_closed() {
    let peer = FakePeer::start(route(ok_check, || (200, "{}".into()))).await;
    peer.stop();
    let mut o = options(&peer);
    o.check_retries = 1;
    let open = ServiceControl::new(o.clone()).expect("client");
    for _ in 0..2 {
        let ok = open
            .check(input("KEY", ip("10.0.0.1")))
            .await
            .expect("fail open");
        assert!(ok.network_failure && !ok.api_key_valid);
    }
    assert_eq!(
        open.statistics().check_failures,
        2,
        "network failures are never cached"
    );

    o.network_fail_open = false;
    let closed = ServiceControl::new(o).expect("client");
    let e = closed
        .check(input("KEY", ip("10.0.0.1")))
        .await
        .unwrap_err();
    assert_eq!((e.http_status, e.code), (503, 14));
    assert_eq!(e.message, "Failed to connect to service control");
    assert_eq!(e.cause, Cause::ServiceControl);

    // Back up: the next check goes through and is cached.
    peer.restart().await;
    closed
        .check(input("KEY", ip("10.0.0.1")))
        .await
        .expect("allowed");
    open.shutdown().await;
    closed.shutdown().await;
}

#[tokio::test]
async fn http_5xx_fails_open_only_when_open_and_4xx_never() {
    let peer = FakePeer::start(route(
        || (503, "backend down".into()),
        || (200, "{}".into()),
    ))
    .await;
    let mut o = options(&peer);
    o.check_cache_entries = 0;
    let open = ServiceControl::new(o.clone()).expect("client");
    let ok = open
        .check(input("KEY", ip("10.0.0.1")))
        .await
        .expect("5xx fails open");
    assert!(ok.network_failure);

    o.network_fail_open = false;
    let closed = ServiceControl::new(o).expect("client");
    let e = closed
        .check(input("KEY", ip("10.0.0.1")))
        .await
        .unwrap_err();
    assert_eq!(
        (e.http_status, e.code, e.message.as_str()),
        (503, 14, "backend down")
    );

    let cases: [(u16, &str, u16, i32, &str); 4] = [
        (
            500,
            "",
            500,
            13,
            "Service control request failed with HTTP response code 500",
        ),
        (
            502,
            "",
            500,
            13,
            "Service control request failed with HTTP response code 502",
        ),
        (504, "slow", 504, 4, "slow"),
        (501, "nope", 501, 12, "nope"),
    ];
    for (sc_status, body, http, code, msg) in cases {
        let b = body.to_string();
        peer.set_responder(route(move || (sc_status, b.clone()), || (200, "{}".into())));
        let e = closed
            .check(input("KEY", ip("10.0.0.1")))
            .await
            .unwrap_err();
        assert_eq!(
            (e.http_status, e.code, e.message.as_str()),
            (http, code, msg),
            "SC {sc_status}"
        );
    }

    // 4xx: 500 code 13 even when fail-open.
    peer.set_responder(route(
        || (403, "caller lacks serviceController".into()),
        || (200, "{}".into()),
    ));
    let e = open.check(input("KEY", ip("10.0.0.1"))).await.unwrap_err();
    assert_eq!(
        (e.http_status, e.code, e.message.as_str()),
        (500, 13, "caller lacks serviceController")
    );
    // 200 with garbage: 500 code 13 "Invalid response", even when fail-open.
    peer.set_responder(route(|| (200, "<html>".into()), || (200, "{}".into())));
    let e = open.check(input("KEY", ip("10.0.0.1"))).await.unwrap_err();
    assert_eq!(
        (e.http_status, e.code, e.message.as_str()),
        (500, 13, "Invalid response")
    );
    open.shutdown().await;
    closed.shutdown().await;
}

#[tokio::test]
async fn each_check_error_code_has_its_exact_message() {
    let peer = FakePeer::start(route(ok_check, || (200, "{}".into()))).await;
    let mut o = options(&peer);
    o.check_cache_entries = 0;
    let sc = ServiceControl::new(o).expect("client");
    let rows: &[(&str, u16, i32, String)] = &[
        ("API_KEY_INVALID", 400, 3, "API key not valid. Please pass a valid API key.".into()),
        ("API_KEY_EXPIRED", 400, 3, "API key expired. Please renew the API key.".into()),
        ("API_KEY_NOT_FOUND", 400, 3, "API key not found. Please pass a valid API key.".into()),
        ("NOT_FOUND", 400, 3, "Consumer project not found. Please pass a valid project.".into()),
        ("PROJECT_INVALID", 400, 3, "Consumer project not valid. Please pass a valid project.".into()),
        ("SERVICE_NOT_ACTIVATED", 403, 7, format!("API {SVC} is not enabled for the consumer project.")),
        ("API_TARGET_BLOCKED", 403, 7, format!("API {SVC} is invalid for the consumer project.")),
        ("PERMISSION_DENIED", 403, 7, format!("Consumer project doesn't have access to the API {SVC}")),
        ("RESOURCE_EXHAUSTED", 403, 7, "Quota check failed.".into()),
        ("IP_ADDRESS_BLOCKED", 403, 7, "IP address is blocked by the API key with restrictions.".into()),
        ("REFERER_BLOCKED", 403, 7, "Referer address is blocked by the API key with restrictions.".into()),
        ("CLIENT_APP_BLOCKED", 403, 7, "Client application is blocked by the API key with restrictions.".into()),
        ("PROJECT_DELETED", 403, 7, "Project has been deleted.".into()),
        ("BILLING_DISABLED", 403, 7, format!("API {SVC} has billing disabled. Please enable it.")),
        ("INVALID_CREDENTIAL", 403, 7, "The credential in the request can not be verified".into()),
        ("CONSUMER_INVALID", 403, 7, "The consumer from the API key does not represent a valid consumer folder or organization".into()),
        ("ABUSER_DETECTED", 500, 13, "Request blocked due to unsupported error code: 103".into()),
    ];
    for (code, http, c, msg) in rows {
        let code_s = code.to_string();
        peer.set_responder(route(move || check_error(&code_s), || (200, "{}".into())));
        let e = sc.check(input("KEY", ip("10.0.0.1"))).await.unwrap_err();
        assert_eq!(
            (e.http_status, e.code, &e.message),
            (*http, *c, msg),
            "{code}"
        );
        assert_eq!(e.cause, Cause::ServiceControl);
    }
    for code in [
        "NAMESPACE_LOOKUP_UNAVAILABLE",
        "SERVICE_STATUS_UNAVAILABLE",
        "BILLING_STATUS_UNAVAILABLE",
        "CLOUD_RESOURCE_MANAGER_BACKEND_UNAVAILABLE",
    ] {
        peer.set_responder(route(move || check_error(code), || (200, "{}".into())));
        sc.check(input("KEY", ip("10.0.0.1")))
            .await
            .expect("dependency outage fails open");
    }
    sc.shutdown().await;
}

#[tokio::test]
async fn rollout_id_in_check_response_reaches_the_notifier() {
    let peer = FakePeer::start(route(
        || {
            (
                200,
                r#"{"operationId":"x","serviceRolloutId":"2026-11-22r7"}"#.into(),
            )
        },
        || (200, "{}".into()),
    ))
    .await;
    let notifier = RolloutNotifier::new();
    let mut o = options(&peer);
    o.rollout_notifier = Some(notifier.clone());
    let sc = ServiceControl::new(o).expect("client");
    sc.check(input("KEY", ip("10.0.0.1")))
        .await
        .expect("allowed");
    assert_eq!(notifier.latest(), "2026-11-22r7");
    sc.shutdown().await;
}

fn quota_input<'a>(costs: &'a [(String, i64)]) -> QuotaInput<'a> {
    QuotaInput {
        service_name: SVC,
        service_config_id: "2026-11-22r0",
        method_name: "1.echo_api_endpoints_demo_proj_cloud_goog.Echo",
        api_key: "KEY",
        producer_project_id: "demo-proj",
        caller_ip: ip("10.0.0.1"),
        referer: None,
        metric_costs: costs,
    }
}

#[tokio::test]
async fn quota_first_allowed_then_429() {
    let peer = FakePeer::start(route(ok_check, || {
        (
            200,
            r#"{"operationId":"q","allocateErrors":[{"code":"RESOURCE_EXHAUSTED","description":"Insufficient tokens for quota 'read-requests' and limit 'limit-on-read-requests' of service 'x' for consumer 'api_key:KEY'."}]}"#.into(),
        )
    }))
    .await;
    let sc = ServiceControl::new(options(&peer)).expect("client");
    let costs = vec![("read-requests".to_string(), 1)];
    sc.allocate_quota(quota_input(&costs))
        .expect("first request is allowed at once");
    let mut denied = None;
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if let Err(e) = sc.allocate_quota(quota_input(&costs)) {
            denied = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = denied.expect("denied once the allocation answered");
    assert_eq!((e.http_status, e.code), (429, 8));
    assert!(
        e.message
            .starts_with("Insufficient tokens for quota 'read-requests'"),
        "{}",
        e.message
    );
    assert_eq!(e.cause, Cause::Internal);

    let req = &peer.requests_to(":allocateQuota")[0];
    let body = req.json();
    let op = &body["allocateOperation"];
    assert_eq!(
        op["methodName"],
        "1.echo_api_endpoints_demo_proj_cloud_goog.Echo"
    );
    assert_eq!(op["consumerId"], "api_key:KEY");
    assert_eq!(op["quotaMode"], "BEST_EFFORT");
    assert_eq!(op["quotaMetrics"][0]["metricName"], "read-requests");
    assert_eq!(op["quotaMetrics"][0]["metricValues"][0]["int64Value"], "1");
    assert_eq!(
        verify_bearer(req)["aud"],
        format!(
            "{}/google.api.servicecontrol.v1.QuotaController",
            peer.url()
        )
    );
    sc.shutdown().await;
}

#[tokio::test]
async fn quota_tokens_are_aggregated() {
    let peer = FakePeer::start(route(ok_check, || (200, r#"{"operationId":"q"}"#.into()))).await;
    let sc = ServiceControl::new(options(&peer)).expect("client");
    let costs = vec![("read-requests".to_string(), 2)];
    sc.allocate_quota(quota_input(&costs)).expect("allowed");
    assert!(wait_until(WAIT, || peer.requests_to(":allocateQuota").len() == 1).await);
    for _ in 0..5 {
        sc.allocate_quota(quota_input(&costs)).expect("allowed");
    }
    assert!(wait_until(WAIT, || peer.requests_to(":allocateQuota").len() == 2).await);
    let second = peer.requests_to(":allocateQuota")[1].json();
    assert_eq!(
        second["allocateOperation"]["quotaMetrics"][0]["metricValues"][0]["int64Value"],
        "10"
    );
    sc.shutdown().await;
}

#[tokio::test]
async fn n_requests_make_one_report_with_request_count_n() {
    let peer = FakePeer::start(route(ok_check, || (200, "{}".into()))).await;
    let mut o = options(&peer);
    o.report_flush_interval = Duration::from_millis(300);
    let sc = ServiceControl::new(o).expect("client");
    for _ in 0..25 {
        sc.report(record(200));
    }
    assert!(wait_until(WAIT, || !peer.requests_to(":report").is_empty()).await);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let reports = peer.requests_to(":report");
    assert_eq!(reports.len(), 1);
    let body = reports[0].json();
    assert_eq!(body["serviceConfigId"], "2026-11-22r0");
    let ops = body["operations"].as_array().expect("ops");
    assert_eq!(ops.len(), 1);
    let op = &ops[0];
    assert_eq!(
        metric_int(
            op,
            "serviceruntime.googleapis.com/api/producer/request_count"
        ),
        Some(25)
    );
    assert_eq!(
        metric_int(
            op,
            "serviceruntime.googleapis.com/api/consumer/request_count"
        ),
        Some(25)
    );
    assert_eq!(op["consumerId"], "api_key:KEY");
    assert_eq!(op["labels"]["/response_code"], "200");
    assert_eq!(op["labels"]["/credential_id"], "apikey:KEY");
    // The log policy keeps 50 entries per signature and second of flush interval (15 in
    // 300 ms); the request count above stays exact.
    let logs = op["logEntries"].as_array().expect("logs");
    assert_eq!(logs.len(), 15);
    assert_eq!(sc.statistics().dropped_log_entries, 10);
    assert_eq!(logs[0]["name"], "endpoints_log");
    assert_eq!(logs[0]["structPayload"]["http_method"], "POST");
    assert_eq!(logs[0]["structPayload"]["api_key"], "KEY");
    let lat = op["metricValueSets"]
        .as_array()
        .expect("sets")
        .iter()
        .find(|m| m["metricName"] == "serviceruntime.googleapis.com/api/producer/total_latencies")
        .expect("latency metric");
    let d = &lat["metricValues"][0]["distributionValue"];
    assert_eq!(d["count"], "25");
    assert_eq!(d["exponentialBuckets"]["numFiniteBuckets"], 29);
    assert_eq!(
        verify_bearer(&reports[0])["aud"],
        format!(
            "{}/google.api.servicecontrol.v1.ServiceController",
            peer.url()
        )
    );
    let st = sc.statistics();
    assert_eq!(
        (
            st.total_called_reports,
            st.send_reports_by_flush,
            st.send_report_operations
        ),
        (25, 1, 1)
    );
    sc.shutdown().await;
}

#[tokio::test]
async fn log_entries_are_capped_while_counts_stay_exact() {
    let peer = FakePeer::start(route(ok_check, || (200, "{}".into()))).await;
    let mut o = options(&peer);
    o.report_flush_interval = Duration::from_secs(3600);
    o.report_log_entries_per_second = 1;
    o.report_max_log_entries_per_flush = 1 << 20;
    let sc = ServiceControl::new(o).expect("client");
    for _ in 0..3000 {
        sc.report(record(200));
    }
    for _ in 0..7 {
        sc.report(record(503));
    }
    let st = sc.statistics();
    assert_eq!(
        st.report_aggregates, 2,
        "two signatures held, not 3007 requests"
    );
    sc.shutdown().await;
    let ops = reported_ops(&peer);
    assert_eq!(ops.len(), 2);
    for op in &ops {
        let code = op["labels"]["/response_code"].as_str().unwrap_or("");
        let count = metric_int(
            op,
            "serviceruntime.googleapis.com/api/producer/request_count",
        );
        let errors = metric_int(op, "serviceruntime.googleapis.com/api/producer/error_count");
        // One hour of interval at one entry per second would allow 3600; ESP's limit of
        // 100 entries per operation applies.
        let logs = op["logEntries"].as_array().map(Vec::len).unwrap_or(0);
        match code {
            "200" => assert_eq!((count, errors, logs), (Some(3000), None, 100)),
            "503" => assert_eq!((count, errors, logs), (Some(7), Some(7), 7)),
            other => panic!("unexpected response code {other}"),
        }
    }
    assert_eq!(sc.statistics().dropped_log_entries, 2900);
}

#[tokio::test]
async fn reports_are_batched() {
    let peer = FakePeer::start(route(ok_check, || (200, "{}".into()))).await;
    let mut o = options(&peer);
    o.report_flush_interval = Duration::from_secs(60);
    o.report_max_operations_per_request = 2;
    let sc = ServiceControl::new(o).expect("client");
    // Five different response codes: five signatures, so five operations.
    for code in [200, 201, 202, 204, 404] {
        sc.report(record(code));
    }
    sc.shutdown().await;
    let reports = peer.requests_to(":report");
    let sizes: Vec<usize> = reports
        .iter()
        .map(|r| r.json()["operations"].as_array().map(Vec::len).unwrap_or(0))
        .collect();
    assert_eq!(sizes, vec![2, 2, 1]);
}

#[tokio::test]
async fn reports_survive_an_outage_and_are_delivered_later() {
    let peer = FakePeer::start(route(ok_check, || (200, "{}".into()))).await;
    peer.stop();
    let sc = ServiceControl::new(options(&peer)).expect("client");
    for _ in 0..3 {
        sc.report(record(200));
    }
    assert!(
        wait_until(WAIT, || sc.statistics().report_failures >= 2).await,
        "retried while down"
    );
    sc.report(record(200));
    peer.restart().await;
    assert!(
        wait_until(WAIT, || total_request_count(&peer) == 4).await,
        "all four requests delivered after the peer came back: {:?}",
        sc.statistics()
    );
    let st = sc.statistics();
    assert_eq!(st.dropped_report_operations, 0);
    assert_eq!(st.report_queue_depth, 0);
    sc.shutdown().await;
}

#[tokio::test]
async fn report_buffer_is_bounded_and_counts_drops() {
    let peer = FakePeer::start(route(ok_check, || (200, "{}".into()))).await;
    peer.stop();
    let mut o = options(&peer);
    o.report_buffer_operations = 3;
    let sc = ServiceControl::new(o).expect("client");
    for code in [200, 201, 202, 204, 404] {
        sc.report(record(code));
    }
    assert!(wait_until(WAIT, || sc.statistics().dropped_report_operations == 2).await);
    peer.restart().await;
    assert!(wait_until(WAIT, || reported_ops(&peer).len() == 3).await);
    sc.shutdown().await;
}

#[tokio::test]
async fn rejected_reports_are_dropped_not_retried() {
    let peer = FakePeer::start(|r: &Recorded| {
        if r.uri.ends_with(":report") {
            (
                400,
                r#"{"error":{"code":400,"message":"bad report"}}"#.into(),
            )
        } else {
            (200, "{}".into())
        }
    })
    .await;
    let sc = ServiceControl::new(options(&peer)).expect("client");
    sc.report(record(200));
    assert!(wait_until(WAIT, || sc.statistics().dropped_report_operations == 1).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(peer.requests_to(":report").len(), 1);
    sc.shutdown().await;
}

#[tokio::test]
async fn shutdown_flushes_pending_reports() {
    let peer = FakePeer::start(route(ok_check, || (200, "{}".into()))).await;
    let mut o = options(&peer);
    // Only shutdown can make the report go out within this test.
    o.report_flush_interval = Duration::from_secs(3600);
    let sc = ServiceControl::new(o).expect("client");
    sc.report(record(500));
    assert!(peer.requests_to(":report").is_empty());
    tokio::time::timeout(WAIT, sc.shutdown())
        .await
        .expect("shutdown in time");
    let ops = reported_ops(&peer);
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0]["labels"]["/error_type"], "5xx");
    assert_eq!(
        metric_int(
            &ops[0],
            "serviceruntime.googleapis.com/api/producer/error_count"
        ),
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_hanging_up_does_not_wedge_the_cache() {
    let peer = FakePeer::start(route(
        || check_error("API_KEY_INVALID"),
        || (200, "{}".into()),
    ))
    .await;
    let mut o = options(&peer);
    o.check_refresh_interval = Duration::from_millis(200);
    let sc = ServiceControl::new(o).expect("client");
    sc.check(input("K", ip("10.0.0.1"))).await.unwrap_err();
    tokio::time::sleep(Duration::from_millis(250)).await;
    // The key is fixed, but the control plane is slow; the request that re-checks gives up.
    peer.set_responder(route(
        || {
            std::thread::sleep(Duration::from_millis(1000));
            ok_check()
        },
        || (200, "{}".into()),
    ));
    let gave_up = tokio::time::timeout(
        Duration::from_millis(50),
        sc.check(input("K", ip("10.0.0.1"))),
    )
    .await;
    assert!(gave_up.is_err(), "the caller should have timed out");
    // The re-check still completes and lands in the cache.
    assert!(wait_until(WAIT, || peer.requests_to(":check").len() == 2).await);
    // The peer records a call before answering it: give the answer time to land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sc.check(input("K", ip("10.0.0.1")))
        .await
        .expect("fresh positive verdict from the completed re-check");
    assert_eq!(peer.requests_to(":check").len(), 2);
    sc.shutdown().await;
}

#[tokio::test]
async fn oversized_report_batches_are_split() {
    let peer = FakePeer::start(route(ok_check, || (200, "{}".into()))).await;
    let mut o = options(&peer);
    o.report_flush_interval = Duration::from_secs(3600);
    // One operation with its log entry is ~2 KiB of JSON; allow about two per request.
    o.report_max_request_bytes = 5000;
    let sc = ServiceControl::new(o).expect("client");
    for code in [200, 201, 202, 204, 400, 401, 403, 404] {
        sc.report(record(code));
    }
    sc.shutdown().await;
    let reports = peer.requests_to(":report");
    assert!(
        reports.len() >= 3,
        "split into several requests: {}",
        reports.len()
    );
    for r in &reports {
        let ops = r.json()["operations"].as_array().map(Vec::len).unwrap_or(0);
        assert!(
            r.body.len() <= 5000 || ops == 1,
            "{} bytes for {ops} ops",
            r.body.len()
        );
    }
    assert_eq!(total_request_count(&peer), 8, "nothing lost in splitting");
}

#[tokio::test]
async fn fail_closed_stops_trusting_a_cached_verdict_once_a_recheck_fails() {
    let peer = FakePeer::start(route(ok_check, || (200, "{}".into()))).await;
    let mut o = options(&peer);
    o.network_fail_open = false;
    o.check_retries = 0;
    o.check_refresh_interval = Duration::from_millis(200);
    let sc = ServiceControl::new(o).expect("client");
    sc.check(input("KEY", ip("10.0.0.1")))
        .await
        .expect("allowed");
    peer.stop();
    tokio::time::sleep(Duration::from_millis(250)).await;
    // Stale: served from the cache while the background re-check runs (and fails).
    sc.check(input("KEY", ip("10.0.0.1")))
        .await
        .expect("cached");
    assert!(wait_until(WAIT, || sc.statistics().check_failures == 1).await);
    // The failure is recorded just before the cache entry is dropped; allow that moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let e = loop {
        match sc.check(input("KEY", ip("10.0.0.1"))).await {
            Err(e) => break e,
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Ok(_) => panic!("fail-closed kept trusting the stale verdict"),
        }
    };
    assert_eq!((e.http_status, e.code), (503, 14));
    sc.shutdown().await;
}

#[tokio::test]
async fn reports_carry_only_what_the_config_declares() {
    let peer = FakePeer::start(route(ok_check, || (200, "{}".into()))).await;
    let declared: portico_config::Service = serde_json::from_value(serde_json::json!({
        "name": SVC,
        "id": "2026-11-22r0",
        "logging": {"producerDestinations": [{"monitoredResource": "api", "logs": ["endpoints_log"]}]},
        "monitoring": {"producerDestinations": [{"monitoredResource": "api",
            "metrics": ["serviceruntime.googleapis.com/api/producer/request_count"]}]}
    }))
    .expect("service");
    let bare: portico_config::Service =
        serde_json::from_value(serde_json::json!({"name": SVC, "id": "bare"})).expect("service");
    let rollout = portico_proxy::config_source::Rollout {
        rollout_id: "r".into(),
        configs: vec![
            (std::sync::Arc::new(declared), 50),
            (std::sync::Arc::new(bare), 50),
        ],
    };
    let (_tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(rollout));
    let mut o = options(&peer);
    o.report_flush_interval = Duration::from_secs(3600);
    o.service_configs = Some(rx);
    let sc = ServiceControl::new(o).expect("client");
    sc.report(record(200));
    let mut bare_record = record(200);
    bare_record.service_config_id = "bare".into();
    sc.report(bare_record);
    sc.shutdown().await;
    let ops = reported_ops(&peer);
    assert_eq!(ops.len(), 2);
    for op in &ops {
        let names: Vec<String> = op["metricValueSets"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| m["metricName"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        let logs = op["logEntries"].as_array().map(Vec::len).unwrap_or(0);
        if names.is_empty() {
            assert_eq!(logs, 0, "bare config: no metrics, no logs");
        } else {
            assert_eq!(
                names,
                ["serviceruntime.googleapis.com/api/producer/request_count"]
            );
            assert_eq!(logs, 1);
        }
    }
    let bodies: Vec<String> = peer
        .requests_to(":report")
        .iter()
        .map(|r| {
            r.json()["serviceConfigId"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert!(bodies.contains(&"bare".to_string()) && bodies.contains(&"2026-11-22r0".to_string()));
}
