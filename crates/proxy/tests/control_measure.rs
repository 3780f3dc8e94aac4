//! Measures (never asserts) what the Service Control client costs on the request path:
//! a cached check, a quota charge, and handing a record to the reporter, plus how long the
//! background reporter takes to deliver them to a local test double.
//!
//! Run: `cargo test -p portico-proxy --test control_measure -- --ignored --nocapture`
//! (add `--release` for representative figures; debug builds are several times slower).

mod control_support;

use std::time::{Duration, Instant};

use control_support::{service_account, wait_until, FakePeer, Recorded};
use portico_proxy::service_control::{
    CheckInput, QuotaInput, RequestRecord, ServiceControl, ServiceControlOptions,
};

const SVC: &str = "echo-api.endpoints.demo-proj.cloud.goog";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly with --ignored --nocapture"]
async fn measure_hot_path_costs() {
    let peer = FakePeer::start(|r: &Recorded| {
        if r.uri.ends_with(":check") {
            (200, r#"{"operationId":"x"}"#.into())
        } else {
            (200, "{}".into())
        }
    })
    .await;
    let mut o = ServiceControlOptions::new(peer.url());
    o.credentials = Some(service_account(&peer.url()));
    let sc = ServiceControl::new(o).expect("client");
    let input = || CheckInput {
        service_name: SVC,
        service_config_id: "2026-11-22r0",
        operation_name: "1.echo.Echo",
        api_key: "KEY",
        caller_ip: "10.0.0.1".parse().expect("ip"),
        referer: None,
        android_package: None,
        android_cert: None,
        ios_bundle: None,
        trace: None,
        context: None,
    };
    let t = Instant::now();
    sc.check(input()).await.expect("allowed");
    println!(
        "first (remote) check incl. token signing: {:?}",
        t.elapsed()
    );

    const N: u32 = 100_000;
    let t = Instant::now();
    for _ in 0..N {
        sc.check(input()).await.expect("allowed");
    }
    println!("cached check: {:?}/op", t.elapsed() / N);

    let costs = vec![("read-requests".to_string(), 1)];
    let q = || QuotaInput {
        service_name: SVC,
        service_config_id: "2026-11-22r0",
        method_name: "1.echo.Echo",
        api_key: "KEY",
        producer_project_id: "demo-proj",
        caller_ip: "10.0.0.1".parse().expect("ip"),
        referer: None,
        metric_costs: &costs,
    };
    let t = Instant::now();
    for _ in 0..N {
        sc.allocate_quota(q()).expect("allowed");
    }
    println!("quota charge: {:?}/op", t.elapsed() / N);

    const R: u32 = 20_000;
    let rec = RequestRecord {
        service_name: SVC.into(),
        service_config_id: "2026-11-22r0".into(),
        operation_name: Some("1.echo.Echo".into()),
        api_key: Some("KEY".into()),
        api_key_valid: true,
        http_method: "POST".into(),
        url: "/echo?key=KEY".into(),
        response_code: 200,
        request_size: 100,
        response_size: 200,
        total_latency: Duration::from_millis(2),
        backend_latency: Some(Duration::from_millis(1)),
        overhead_latency: Duration::from_millis(1),
        caller_ip: Some("10.0.0.1".parse().expect("ip")),
        protocol: "http".into(),
        ..Default::default()
    };
    let t = Instant::now();
    for _ in 0..R {
        sc.report(rec.clone());
    }
    println!(
        "report() hand-off (incl. record clone): {:?}/op",
        t.elapsed() / R
    );
    let t = Instant::now();
    let delivered = wait_until(Duration::from_secs(60), || {
        sc.statistics().report_queue_depth == 0 && sc.statistics().send_reports_by_flush > 0
    })
    .await;
    println!(
        "reporter drained {R} requests in {:?} (delivered={delivered}); stats: {:?}",
        t.elapsed(),
        sc.statistics()
    );
    sc.shutdown().await;
}
