//! The Cloud Trace API through the whole router, on SQLite and PostgreSQL: who may write
//! (`roles/cloudtrace.agent`, the walkthrough's binding) and read, v1 `PATCH traces` and v2
//! `batchWrite` stored alike and read back in v1's shape, ListTraces' filters, orders, views and
//! pages, the refusals with the offending span named, and the retention bound.

mod support;

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use support::{env, env_customized, env_pg, TestEnv};

const PROJECT: &str = "trace-proj";
const T1: &str = "0123456789abcdef0123456789abcdef";
const T2: &str = "fedcba9876543210fedcba9876543210";
const T3: &str = "00000000000000000000000000000abc";

fn agent() -> String {
    format!("sa:trace-agent@{PROJECT}.iam.gserviceaccount.com")
}

fn reader() -> String {
    format!("sa:trace-reader@{PROJECT}.iam.gserviceaccount.com")
}

async fn accounts(e: &TestEnv) {
    for id in ["trace-agent", "trace-reader"] {
        let (s, v) = e
            .admin(
                Method::POST,
                &format!("/v1/projects/{PROJECT}/serviceAccounts"),
                Some(json!({"accountId": id})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
}

async fn bind(e: &TestEnv, bindings: Value) {
    let (s, v) = e
        .admin(
            Method::POST,
            &format!("/v1/projects/{PROJECT}:setIamPolicy"),
            Some(json!({"policy": {"bindings": bindings}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// An ESP v1 trace: a root span, a check and a backend span, `ms` long.
fn v1_trace(trace: &str, root: &str, ms: u32) -> Value {
    json!({"projectId": PROJECT, "traceId": trace, "spans": [
        {"spanId": "1", "kind": "RPC_SERVER", "name": root,
         "startTime": "2026-12-06T10:00:00Z", "endTime": format!("2026-12-06T10:00:00.{ms:03}Z"),
         "labels": {"/http/method": "GET", "/http/url": "http://h/echo?key=x", "/agent": "ESP"}},
        {"spanId": "2", "parentSpanId": "1", "name": "CheckServiceControl",
         "startTime": "2026-12-06T10:00:00.001Z", "endTime": "2026-12-06T10:00:00.002Z"},
        {"spanId": "3", "parentSpanId": "1", "kind": "RPC_CLIENT", "name": "Backend",
         "startTime": "2026-12-06T10:00:00.002Z", "endTime": format!("2026-12-06T10:00:00.{:03}Z", ms.saturating_sub(1).max(2))},
    ]})
}

async fn patch(e: &TestEnv, token: Option<&str>, traces: Value) -> (StatusCode, Value) {
    e.call(
        Method::PATCH,
        &format!("/v1/projects/{PROJECT}/traces"),
        token,
        Some(json!({ "traces": traces })),
    )
    .await
}

async fn scenario(e: &TestEnv) {
    accounts(e).await;
    let agent = agent();
    let reader = reader();
    // No binding yet: Google's refusal.
    let (s, v) = patch(e, Some(&agent), json!([v1_trace(T1, "svc/Echo", 40)])).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["message"], "The caller does not have permission");
    assert_eq!(v["error"]["status"], "PERMISSION_DENIED");
    // Nor unsigned.
    let (s, _) = patch(e, None, json!([v1_trace(T1, "svc/Echo", 40)])).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    bind(
        e,
        json!([
            {"role": "roles/cloudtrace.agent", "members": [format!("serviceAccount:trace-agent@{PROJECT}.iam.gserviceaccount.com")]},
            {"role": "roles/cloudtrace.user", "members": [format!("serviceAccount:trace-reader@{PROJECT}.iam.gserviceaccount.com")]},
        ]),
    )
    .await;
    let (s, v) = patch(
        e,
        Some(&agent),
        json!([v1_trace(T1, "svc/Echo", 40), v1_trace(T2, "svc/List", 900)]),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({}));

    // v2, through the API prefix an api_endpoint_overrides/cloudtrace would use.
    let span = |id: &str, parent: Option<&str>, name: &str| {
        let mut s = json!({
            "name": format!("projects/{PROJECT}/traces/{T3}/spans/{id}"),
            "spanId": id,
            "displayName": {"value": name, "truncatedByteCount": 0},
            "startTime": "2026-12-06T11:00:00Z", "endTime": "2026-12-06T11:00:00.250Z",
            "spanKind": "SERVER",
            "attributes": {"attributeMap": {
                "/http/method": {"stringValue": {"value": "POST"}},
                "/http/status_code": {"intValue": "200"},
                "cached": {"boolValue": false},
            }},
            "status": {"code": 0},
        });
        if let Some(p) = parent {
            s["parentSpanId"] = p.into();
        }
        s
    };
    let (s, v) = e
        .call(
            Method::POST,
            &format!("/cloudtrace/v2/projects/{PROJECT}/traces:batchWrite"),
            Some(&agent),
            Some(json!({"spans": [
                span("00000000000000aa", None, "ingress CreateShelf"),
                span("00000000000000bb", Some("00000000000000aa"), "router backend egress"),
            ]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // The agent writes only; the reader reads.
    let get = format!("/v1/projects/{PROJECT}/traces/{T3}");
    let (s, _) = e.call(Method::GET, &get, Some(&agent), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = e.call(Method::GET, &get, Some(&reader), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["traceId"], T3);
    assert_eq!(v["spans"][0]["spanId"], "170");
    assert_eq!(v["spans"][0]["name"], "ingress CreateShelf");
    assert_eq!(v["spans"][0]["kind"], "RPC_SERVER");
    assert_eq!(v["spans"][0]["labels"]["/http/status_code"], "200");
    assert_eq!(v["spans"][0]["labels"]["cached"], "false");
    assert_eq!(v["spans"][1]["parentSpanId"], "170");
    let (s, v) = e
        .call(
            Method::GET,
            &format!("/v1/projects/{PROJECT}/traces/{}", "1".repeat(32)),
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");

    // Lists: filters, order, views, pages.
    let list = |q: &str| format!("/v1/projects/{PROJECT}/traces?{q}");
    let ids = |v: &Value| -> Vec<String> {
        v["traces"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|t| t["traceId"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let (s, v) = e
        .call(
            Method::GET,
            &list("orderBy=duration%20desc"),
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(ids(&v), vec![T2, T3, T1]);
    assert!(v["traces"][0].get("spans").is_none(), "MINIMAL: {v}");
    let (_, v) = e
        .call(
            Method::GET,
            &list("filter=root:svc/&orderBy=name"),
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(ids(&v), vec![T1, T2]);
    let (_, v) = e
        .call(
            Method::GET,
            &list("filter=latency:100ms%20root:svc"),
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(ids(&v), vec![T2]);
    let (_, v) = e
        .call(
            Method::GET,
            &list("filter=method:POST&view=COMPLETE"),
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(ids(&v), vec![T3]);
    assert_eq!(v["traces"][0]["spans"].as_array().map(Vec::len), Some(2));
    let (_, v) = e
        .call(
            Method::GET,
            &list("filter=%2Bspan:Backend&view=ROOTSPAN"),
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(ids(&v).len(), 2);
    assert_eq!(v["traces"][0]["spans"].as_array().map(Vec::len), Some(1));
    let (_, v) = e
        .call(
            Method::GET,
            &list("startTime=2026-12-06T10:30:00Z"),
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(ids(&v), vec![T3]);
    let (_, first) = e
        .call(
            Method::GET,
            &list("pageSize=2&orderBy=trace_id"),
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(ids(&first), vec![T3, T1]);
    let token = first["nextPageToken"]
        .as_str()
        .expect("next page")
        .to_string();
    let (_, second) = e
        .call(
            Method::GET,
            &list(&format!("pageSize=2&orderBy=trace_id&pageToken={token}")),
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(ids(&second), vec![T2]);
    assert!(second.get("nextPageToken").is_none());
    for bad in [
        "filter=latency:soon",
        "orderBy=size",
        "view=ALL",
        "filter=root:%22x",
    ] {
        let (s, v) = e.call(Method::GET, &list(bad), Some(&reader), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }

    // A span sent again replaces the stored one.
    let mut again = v1_trace(T1, "svc/Echo2", 40);
    again["spans"] = json!([again["spans"][0].clone()]);
    let (s, v) = patch(e, Some(&agent), json!([again])).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, v) = e
        .call(
            Method::GET,
            &format!("/v1/projects/{PROJECT}/traces/{T1}"),
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(v["spans"].as_array().map(Vec::len), Some(3), "{v}");
    assert_eq!(v["spans"][0]["name"], "svc/Echo2");

    // Refusals name the span and store nothing of the call.
    let t = |f: &dyn Fn(&mut Value)| {
        let mut tr = v1_trace("abcdefabcdefabcdefabcdefabcdef01", "svc/Bad", 10);
        f(&mut tr);
        json!([tr])
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            t(&|tr| tr["traceId"] = "0".repeat(32).into()),
            "invalid trace id",
        ),
        (
            t(&|tr| tr["spans"][1]["spanId"] = "0".into()),
            "traces[0].spans[1]: invalid span id",
        ),
        (
            t(&|tr| tr["spans"][0]["kind"] = "SERVER".into()),
            "invalid kind",
        ),
        (
            t(&|tr| tr["spans"][0]["name"] = "n".repeat(129).into()),
            "129 bytes",
        ),
        (
            t(&|tr| tr["spans"][0]["endTime"] = "2026-12-06T09:00:00Z".into()),
            "endTime is before startTime",
        ),
        (
            t(&|tr| tr["spans"][0]["startTime"] = "noon".into()),
            "invalid timestamp",
        ),
        (
            t(&|tr| tr["projectId"] = "other".into()),
            "is not the project of the request",
        ),
        (
            t(&|tr| {
                let labels: serde_json::Map<String, Value> = (0..33)
                    .map(|i| (format!("k{i}"), Value::from("v")))
                    .collect();
                tr["spans"][0]["labels"] = Value::Object(labels);
            }),
            "33 labels",
        ),
        (
            t(&|tr| tr["spans"][0]["labels"] = json!({"k": "v".repeat(20_000)})),
            "at most 16384",
        ),
        (
            t(&|tr| tr["spans"][0]["color"] = "red".into()),
            "unknown field",
        ),
    ];
    for (body, want) in cases {
        let (s, v) = patch(e, Some(&agent), body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{want}: {v}");
        let m = v["error"]["message"].as_str().unwrap_or("");
        assert!(m.contains(want), "{want}: {m}");
    }
    let (s, _) = e
        .call(
            Method::GET,
            &format!("/v1/projects/{PROJECT}/traces/abcdefabcdefabcdefabcdefabcdef01"),
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "nothing of a refused call is stored"
    );
    let v2_cases: Vec<(Value, &str)> = vec![
        (
            json!({"name": "projects/other/traces/0123456789abcdef0123456789abcdef/spans/00000000000000aa"}),
            "not in the project",
        ),
        (json!({"name": "traces/x"}), "invalid name"),
        (
            json!({"name": format!("projects/{PROJECT}/traces/{T3}/spans/00000000000000cc"), "bogus": 1}),
            "unknown field 'bogus'",
        ),
        (
            json!({"name": format!("projects/{PROJECT}/traces/{T3}/spans/00000000000000cc"),
                   "displayName": {"value": "x"}, "startTime": "2026-12-06T11:00:00Z", "endTime": "2026-12-06T11:00:01Z",
                   "attributes": {"attributeMap": {"n": {"intValue": "twelve"}}}}),
            "not a 64-bit integer",
        ),
    ];
    for (span, want) in v2_cases {
        let (s, v) = e
            .call(
                Method::POST,
                &format!("/v2/projects/{PROJECT}/traces:batchWrite"),
                Some(&agent),
                Some(json!({"spans": [span]})),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{want}: {v}");
        let m = v["error"]["message"].as_str().unwrap_or("");
        assert!(m.contains(want), "{want}: {m}");
    }
}

#[tokio::test]
async fn cloud_trace_api_on_sqlite() {
    let e = env().await;
    scenario(&e).await;
}

#[tokio::test]
async fn cloud_trace_api_on_postgres() {
    let Some(e) = env_pg("cloud_trace_api_on_postgres").await else {
        return;
    };
    scenario(&e).await;
    e.drop_pg_schema().await;
}

/// Retention: beyond the span cap the oldest spans (by start) go; the newest stay.
#[tokio::test]
async fn retention_keeps_the_newest_spans() {
    let e = env_customized(|s| {
        s.traces = portico_control_plane::apis::cloudtrace::Retention {
            max_age: std::time::Duration::from_secs(3600),
            max_spans: 4,
            prune_every: 1,
        };
    })
    .await;
    for (i, minute) in (10..16).enumerate() {
        let trace = format!("{:032x}", i + 1);
        let body = json!([{"projectId": PROJECT, "traceId": trace, "spans": [
            {"spanId": "1", "name": "root", "startTime": format!("2026-12-06T10:{minute}:00Z"),
             "endTime": format!("2026-12-06T10:{minute}:01Z")},
        ]}]);
        let (s, v) = patch(&e, Some(&e.admin.clone()), body).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (s, v) = e
        .admin(
            Method::GET,
            &format!("/v1/projects/{PROJECT}/traces?orderBy=start"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ids: Vec<&str> = v["traces"]
        .as_array()
        .expect("traces")
        .iter()
        .map(|t| t["traceId"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        ids,
        vec![
            format!("{:032x}", 3),
            format!("{:032x}", 4),
            format!("{:032x}", 5),
            format!("{:032x}", 6)
        ]
    );
}
