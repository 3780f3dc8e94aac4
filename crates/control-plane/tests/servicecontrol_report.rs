//! Service Control's `:report` path below the HTTP layer: extracting rollups and redacted logs
//! from operations, the store's replay-safe batch write on SQLite and PostgreSQL, and retention.

mod support;

use std::collections::BTreeMap;

use portico_control_plane::apis::servicecontrol::report::*;
use portico_control_plane::store::servicecontrol::reports::{prune, write, ROWS_PER_STATEMENT};
use portico_control_plane::store::Store;
use portico_servicecontrol::redact::SecretParams;
use portico_servicecontrol::{
    labels, metrics, Distribution, ExponentialBuckets, LogEntry, MetricValue, MetricValueSet,
    Operation,
};
use support::testutil;

/// An operation shaped like ESP's: producer + consumer metrics, labels, one log entry.
fn esp_operation(id: &str, code: i64, latency_s: f64) -> Operation {
    let class = code_class_of(code);
    let op_labels: BTreeMap<String, String> = [
        (labels::API_METHOD, "1.echo_api.Echo"),
        (labels::RESPONSE_CODE, &code.to_string()),
        (labels::RESPONSE_CODE_CLASS, &class),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    // ESP's time distribution: 29 exponential buckets, growth 2, scale 1e-6 s.
    let mut buckets = vec![0i64; 31];
    let idx = (1..=29)
        .find(|i| latency_s < 1e-6 * 2f64.powi(*i))
        .unwrap_or(30) as usize;
    buckets[idx] = 1;
    let count = |name: &str, v: i64| MetricValueSet {
        metric_name: name.to_string(),
        metric_values: vec![MetricValue {
            int64_value: Some(v),
            ..Default::default()
        }],
    };
    Operation {
        operation_id: id.to_string(),
        operation_name: "1.echo_api.Echo".into(),
        consumer_id: "api_key:AIzaSECRETSECRETSECRET1234".into(),
        start_time: "2026-11-23T10:15:30.5Z".into(),
        end_time: "2026-11-23T10:15:30.6Z".into(),
        labels: op_labels,
        metric_value_sets: vec![
            count(metrics::PRODUCER_REQUEST_COUNT, 1),
            count(metrics::CONSUMER_REQUEST_COUNT, 1),
            count(
                metrics::PRODUCER_ERROR_COUNT,
                if code >= 400 { 1 } else { 0 },
            ),
            MetricValueSet {
                metric_name: metrics::PRODUCER_TOTAL_LATENCIES.into(),
                metric_values: vec![MetricValue {
                    distribution_value: Some(Distribution {
                        count: 1,
                        mean: latency_s,
                        minimum: latency_s,
                        maximum: latency_s,
                        bucket_counts: buckets,
                        exponential_buckets: Some(ExponentialBuckets {
                            num_finite_buckets: 29,
                            growth_factor: 2.0,
                            scale: 1e-6,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
            },
        ],
        log_entries: vec![LogEntry {
            name: "endpoints_log".into(),
            timestamp: "2026-11-23T10:15:30.6Z".into(),
            severity: if code >= 400 { "ERROR" } else { "INFO" }.into(),
            struct_payload: Some(
                serde_json::json!({
                    "api_key": "AIzaSECRETSECRETSECRET1234",
                    "url": "/echo?key=AIzaSECRETSECRETSECRET1234&x=1",
                    "http_response_code": code,
                    "api_method": "1.echo_api.Echo",
                    "log_message": "Method: 1.echo_api.Echo",
                })
                .as_object()
                .cloned()
                .unwrap_or_default(),
            ),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn extracts_counts_classes_latency_and_redacted_logs() {
    let op = esp_operation("op-1", 503, 0.030);
    let (deltas, logs) = extract(&op, "project_number:5", 0, &SecretParams::default());
    assert_eq!(deltas.len(), 1);
    let d = &deltas[0];
    assert_eq!(d.method, "1.echo_api.Echo");
    assert_eq!(d.code_class, "5xx");
    assert_eq!((d.requests, d.errors), (1, 1));
    assert_eq!(d.minute_ms, parse_time_ms("2026-11-23T10:15:00Z").unwrap());
    assert_eq!(d.latency_sum_us, 30_000);
    // 30 ms lies in ESP's bucket [16.4 ms, 32.8 ms); its midpoint 24.6 ms is in (10, 25].
    assert_eq!(d.latency_buckets[latency_bucket(24.6)], 1);
    assert_eq!(d.latency_buckets.iter().sum::<i64>(), 1);

    assert_eq!(logs.len(), 1);
    let l = &logs[0];
    assert_eq!((l.status_code, l.code_class.as_str()), (503, "5xx"));
    assert_eq!(l.severity, "ERROR");
    let text = l.entry.to_string();
    assert!(!text.contains("SECRETSECRET"), "key leaked: {text}");
    assert_eq!(l.entry["structPayload"]["api_key"], "…1234");
    assert_eq!(l.entry["structPayload"]["url"], "/echo?key=…1234&x=1");
}

#[test]
fn error_count_derived_when_metric_missing_and_by_consumer_op_ignored() {
    let mut op = esp_operation("op-2", 404, 0.001);
    op.metric_value_sets
        .retain(|s| s.metric_name != metrics::PRODUCER_ERROR_COUNT);
    let (d, _) = extract(&op, "", 0, &SecretParams::default());
    assert_eq!(
        (d[0].requests, d[0].errors, d[0].code_class.as_str()),
        (1, 1, "4xx")
    );

    let by_consumer = Operation {
        operation_id: "op-21".into(),
        metric_value_sets: vec![MetricValueSet {
            metric_name: "serviceruntime.googleapis.com/api/producer/by_consumer/request_count"
                .into(),
            metric_values: vec![MetricValue {
                int64_value: Some(1),
                ..Default::default()
            }],
        }],
        ..Default::default()
    };
    assert!(extract(&by_consumer, "", 0, &SecretParams::default())
        .0
        .is_empty());
}

/// Every string of an entry is redacted, whatever field a client puts a URL in, with the
/// service's own parameter names; members named like a secret are masked whole.
#[test]
fn stored_entries_hold_no_secret_anywhere() {
    let secret = "AIzaSECRETSECRETSECRET1234";
    let mut op = esp_operation("op-3", 404, 0.001);
    let entry = &mut op.log_entries[0];
    entry.labels.insert(
        labels::REFERER.into(),
        format!("https://app.example/page?KEY={secret}"),
    );
    entry.text_payload = Some(format!("GET /x;Api_Key={secret} HTTP/1.1"));
    if let Some(p) = entry.struct_payload.as_mut() {
        p.insert(
            "url".into(),
            format!("/a?%6Bey={secret}&myKey={secret}&x=1#access_token={secret}").into(),
        );
        p.insert(
            "log_message".into(),
            format!(
                "Endpoints management skipped for an unrecognized HTTP call: GET /a?key={secret}"
            )
            .into(),
        );
        p.insert("nested".into(), serde_json::json!({"deep": [format!("?access_token={secret}")], "Access_Token": secret}));
    }
    let secrets = SecretParams::new(["mykey"]);
    let (_, logs) = extract(&op, "", 0, &secrets);
    let text = logs[0].entry.to_string();
    assert!(!text.contains("SECRETSECRET"), "secret stored: {text}");
    assert_eq!(
        logs[0].entry["structPayload"]["url"],
        "/a?%6Bey=…1234&myKey=…1234&x=1#access_token=…1234"
    );
    assert_eq!(
        logs[0].entry["structPayload"]["nested"]["Access_Token"],
        "…1234"
    );
    // Without the service's names, its custom parameter would be stored in clear.
    let (_, logs) = extract(&op, "", 0, &SecretParams::default());
    assert!(logs[0].entry.to_string().contains("myKey=AIzaSECRET"));
}

async fn rollup_requests(store: &Store, service: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) FROM sc_rollups WHERE service = $1",
    )
    .bind(service)
    .fetch_one(store.pool())
    .await
    .expect("sum");
    n
}

fn prepared(op: &Operation) -> PreparedOp {
    let (deltas, logs) = extract(op, "project_number:5", 0, &SecretParams::default());
    PreparedOp {
        operation_id: op.operation_id.clone(),
        deltas,
        logs,
    }
}

async fn replays_are_not_double_counted(store: &Store) {
    let svc = "svc.example.com";
    let ops = vec![
        prepared(&esp_operation("a", 200, 0.002)),
        prepared(&esp_operation("b", 200, 0.004)),
    ];
    let first = write(store, svc, ops, 1_000).await.expect("write");
    assert_eq!((first.applied, first.replayed), (2, 0));
    assert_eq!(rollup_requests(store, svc).await, 2);
    // The proxy retried the batch, plus one new operation.
    let ops = vec![
        prepared(&esp_operation("a", 200, 0.002)),
        prepared(&esp_operation("b", 200, 0.004)),
        prepared(&esp_operation("c", 500, 0.004)),
    ];
    let second = write(store, svc, ops, 2_000).await.expect("write");
    assert_eq!((second.applied, second.replayed), (1, 2));
    assert_eq!(rollup_requests(store, svc).await, 3);
    // The same id twice within one batch counts once.
    let ops = vec![
        prepared(&esp_operation("d", 200, 0.002)),
        prepared(&esp_operation("d", 200, 0.002)),
    ];
    let third = write(store, svc, ops, 3_000).await.expect("write");
    assert_eq!((third.applied, third.replayed), (1, 1));
    assert_eq!(rollup_requests(store, svc).await, 4);
    let (logs,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM sc_logs")
        .fetch_one(store.pool())
        .await
        .expect("count");
    assert_eq!(logs, 4);
}

#[tokio::test]
async fn large_batches_span_several_statements() {
    let (_d, store) = testutil::sqlite_store().await;
    let mut ops = Vec::new();
    for i in 0..(ROWS_PER_STATEMENT * 2 + 7) {
        // Distinct methods give distinct rollup rows, so the rollup upsert is chunked too.
        let mut op = esp_operation(&format!("big{i}"), 200, 0.002);
        op.labels
            .insert(labels::API_METHOD.to_string(), format!("m{}", i % 120));
        ops.push(prepared(&op));
    }
    let n = ops.len() as i64;
    let out = write(&store, "s", ops, 1).await.expect("write");
    assert_eq!(out.applied as i64, n);
    assert_eq!(out.deltas.len(), 120);
    assert_eq!(rollup_requests(&store, "s").await, n);
}

#[tokio::test]
async fn sqlite_report_idempotency() {
    let (_d, store) = testutil::sqlite_store().await;
    replays_are_not_double_counted(&store).await;
}

#[tokio::test]
async fn postgres_report_idempotency() {
    let Some((schema, store)) = testutil::pg_store().await else {
        return;
    };
    replays_are_not_double_counted(&store).await;
    testutil::drop_pg_schema(&store, &schema).await;
}

#[tokio::test]
async fn retention_bounds_logs() {
    let (_d, store) = testutil::sqlite_store().await;
    let base = parse_time_ms("2026-11-23T10:15:30.6Z").unwrap();
    let mut ops = Vec::new();
    for i in 0..10 {
        let mut op = esp_operation(&format!("op{i}"), 200, 0.001);
        op.log_entries[0].timestamp = format_time_ms(base + i * 1000);
        ops.push(prepared(&op));
    }
    write(&store, "s", ops, base).await.expect("write");
    let r = Retention {
        log_max_age_ms: 5_500,
        log_max_per_service: 3,
        ..Default::default()
    };
    // At base+10s: entries at base+0..4s are too old; of the remaining 5, only 3 are kept.
    let deleted = prune(&store, &r, base + 10_000).await.expect("prune");
    assert_eq!(deleted, 7);
    let kept: Vec<(i64,)> = sqlx::query_as("SELECT ts_ms FROM sc_logs ORDER BY ts_ms")
        .fetch_all(store.pool())
        .await
        .expect("rows");
    assert_eq!(
        kept.into_iter().map(|k| k.0 - base).collect::<Vec<_>>(),
        vec![7_000, 8_000, 9_000]
    );
}
