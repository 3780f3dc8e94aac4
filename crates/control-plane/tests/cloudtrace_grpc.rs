//! Cloud Trace v2 over gRPC, as ESPv2's exporter calls it: `TraceService/BatchWriteSpans` on
//! the control plane's own port (h2c), through a real tonic client on an HTTP/2 channel. The
//! same permission (`cloudtrace.traces.patch`: PERMISSION_DENIED `The caller does not have
//! permission` without it), the same checks and bounds as the REST `batchWrite`, the spans read
//! back through the REST v1 API.

mod support;

use axum::http::{Method, StatusCode};
use portico_control_plane::apis::cloudtrace::grpc::pb::{
    self, attribute_value, span, trace_service_client::TraceServiceClient,
};
use serde_json::json;
use support::{env, TestEnv};

const PROJECT: &str = "grpc-trace-proj";
const T: &str = "0af7651916cd43dd8448eb211c80319c";

/// Serves the whole control plane (the `portico control-plane` service) on a loopback port,
/// HTTP/1.1 and h2c as `app::serve` does.
async fn listen(e: &TestEnv) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = portico_control_plane::app::service(e.state.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let app = app.clone();
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                let _ = builder
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(stream),
                        hyper_util::service::TowerToHyperService::new(app),
                    )
                    .await;
            });
        }
    });
    (format!("http://{addr}"), task)
}

async fn client(url: &str) -> TraceServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("endpoint")
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(30))
        .connect()
        .await
        .expect("connect");
    TraceServiceClient::new(channel).max_encoding_message_size(64 << 20)
}

fn ts(secs: i64, nanos: i32) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: secs,
        nanos,
    }
}

fn text(s: &str) -> Option<pb::TruncatableString> {
    Some(pb::TruncatableString {
        value: s.to_string(),
        truncated_byte_count: 0,
    })
}

/// An ESPv2-shaped span: `ingress Echo` (root) or a child.
fn span(id: &str, parent: &str, name: &str, start: i64) -> pb::Span {
    let mut attrs = std::collections::HashMap::new();
    attrs.insert(
        "g.co/agent".to_string(),
        pb::AttributeValue {
            value: Some(attribute_value::Value::StringValue(
                text("opencensus-cpp [0.4.0]").unwrap_or_default(),
            )),
        },
    );
    attrs.insert(
        "http.status_code".to_string(),
        pb::AttributeValue {
            value: Some(attribute_value::Value::IntValue(200)),
        },
    );
    pb::Span {
        name: format!("projects/{PROJECT}/traces/{T}/spans/{id}"),
        span_id: id.to_string(),
        parent_span_id: parent.to_string(),
        display_name: text(name),
        start_time: Some(ts(start, 0)),
        end_time: Some(ts(start, 5_000_000)),
        attributes: Some(span::Attributes {
            attribute_map: attrs,
            dropped_attributes_count: 0,
        }),
        status: Some(pb::google::rpc::Status {
            code: 0,
            message: String::new(),
            details: vec![],
        }),
        same_process_as_parent_span: Some(true),
        span_kind: span::SpanKind::Server as i32,
        ..Default::default()
    }
}

fn call(
    token: &str,
    name: &str,
    spans: Vec<pb::Span>,
) -> tonic::Request<pb::BatchWriteSpansRequest> {
    let mut r = tonic::Request::new(pb::BatchWriteSpansRequest {
        name: name.to_string(),
        spans,
    });
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("metadata"),
    );
    r
}

/// The trace's spans as REST v1 reads them back.
async fn stored(e: &TestEnv) -> Vec<serde_json::Value> {
    let (s, v) = e
        .call(
            Method::GET,
            &format!("/v1/projects/{PROJECT}/traces/{T}"),
            Some(&e.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["spans"].as_array().cloned().unwrap_or_default()
}

async fn bind_agent(e: &TestEnv, agent: &str) {
    let (s, v) = e
        .admin(
            Method::POST,
            &format!("/v1/projects/{PROJECT}/serviceAccounts"),
            Some(json!({"accountId": "trace-agent"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = e
        .admin(
            Method::POST,
            &format!("/v1/projects/{PROJECT}:setIamPolicy"),
            Some(json!({"policy": {"bindings": [
                {"role": "roles/cloudtrace.agent", "members": [format!("serviceAccount:{}", &agent[3..])]},
            ]}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn batch_write_spans_over_grpc() {
    let e = env().await;
    let (url, server) = listen(&e).await;
    let mut c = client(&url).await;
    let agent = format!("sa:trace-agent@{PROJECT}.iam.gserviceaccount.com");
    let name = format!("projects/{PROJECT}");
    let good = || {
        vec![
            span(
                "00000000000000a1",
                "00000000000000a0",
                "router backend egress",
                1_796_000_000,
            ),
            span("00000000000000a0", "", "ingress Echo", 1_796_000_000),
        ]
    };

    // No credentials; then credentials without the binding: Google's refusal.
    let mut anon = tonic::Request::new(pb::BatchWriteSpansRequest {
        name: name.clone(),
        spans: good(),
    });
    anon.metadata_mut()
        .insert("authorization", "Bearer not-a-token".parse().expect("md"));
    let err = c
        .batch_write_spans(anon)
        .await
        .expect_err("unauthenticated");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    // ESPv2's `--cloud_trace_url_override` channel carries no credentials at all.
    let bare = tonic::Request::new(pb::BatchWriteSpansRequest {
        name: name.clone(),
        spans: good(),
    });
    let err = c.batch_write_spans(bare).await.expect_err("no credentials");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("missing required authentication"),
        "{err:?}"
    );
    let err = c
        .batch_write_spans(call(&agent, &name, good()))
        .await
        .expect_err("no binding yet");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert_eq!(err.message(), "The caller does not have permission");

    // The walkthrough's binding: accepted, stored, read back through REST v1.
    bind_agent(&e, &agent).await;
    c.batch_write_spans(call(&agent, &name, good()))
        .await
        .expect("written");
    let spans = stored(&e).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let root = spans
        .iter()
        .find(|s| s["name"] == "ingress Echo")
        .expect("root");
    assert_eq!(root["kind"], "RPC_SERVER");
    assert_eq!(root["spanId"], 0xa0u64.to_string());
    assert_eq!(root["labels"]["g.co/agent"], "opencensus-cpp [0.4.0]");
    assert_eq!(root["labels"]["http.status_code"], "200");
    assert_eq!(root["startTime"], "2026-11-30T00:53:20Z");
    let child = spans
        .iter()
        .find(|s| s["name"] == "router backend egress")
        .expect("child");
    assert_eq!(child["parentSpanId"], 0xa0u64.to_string());

    // The REST checks, as gRPC statuses: a malformed name, a span of another project, a bad
    // span id, an end before its start, an attribute with no value, an unknown kind.
    let expect_invalid = |r: Result<tonic::Response<()>, tonic::Status>, want: &str| {
        let err = r.expect_err(want);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(want), "{want}: {}", err.message());
    };
    for bad_name in ["", "projects/", "projects/a/b", "PROJECTS/x"] {
        let r = c.batch_write_spans(call(&agent, bad_name, good())).await;
        expect_invalid(r, "expected projects/PROJECT_ID");
    }
    let mut s = good();
    s[1].name = format!("projects/other/traces/{T}/spans/00000000000000a0");
    let r = c.batch_write_spans(call(&agent, &name, s)).await;
    expect_invalid(r, "spans[1]: span");
    let mut s = good();
    s[0].name = format!("projects/{PROJECT}/traces/{T}/spans/xyz");
    let r = c.batch_write_spans(call(&agent, &name, s)).await;
    expect_invalid(r, "spans[0]: invalid span id 'xyz'");
    let mut s = good();
    s[0].end_time = Some(ts(1_000, 0));
    let r = c.batch_write_spans(call(&agent, &name, s)).await;
    expect_invalid(r, "spans[0]");
    let mut s = good();
    s[0].start_time = Some(ts(1_796_000_000, -5));
    let r = c.batch_write_spans(call(&agent, &name, s)).await;
    expect_invalid(r, "spans[0].startTime: invalid timestamp");
    let mut s = good();
    if let Some(a) = s[0].attributes.as_mut() {
        a.attribute_map
            .insert("empty".into(), pb::AttributeValue { value: None });
    }
    let r = c.batch_write_spans(call(&agent, &name, s)).await;
    expect_invalid(r, "has none of stringValue, intValue, boolValue");
    let mut s = good();
    s[0].span_kind = 42;
    let r = c.batch_write_spans(call(&agent, &name, s)).await;
    expect_invalid(r, "invalid spanKind '42'");
    let mut s = good();
    s[0].display_name = text(&"n".repeat(129));
    let r = c.batch_write_spans(call(&agent, &name, s)).await;
    expect_invalid(r, "spans[0]");

    // The bounds: more spans than one call may carry, and one trace's share.
    let many: Vec<pb::Span> = (1..=25_001u64)
        .map(|i| {
            let mut s = span(&format!("{i:016x}"), "", "x", 1_796_000_000);
            s.attributes = None;
            s.status = None;
            s
        })
        .collect();
    let r = c.batch_write_spans(call(&agent, &name, many)).await;
    expect_invalid(r, "25001 spans in one call");
    let per_trace: Vec<pb::Span> = (1..=1_001u64)
        .map(|i| {
            let mut s = span(&format!("{i:016x}"), "", "x", 1_796_000_000);
            s.attributes = None;
            s
        })
        .collect();
    let r = c.batch_write_spans(call(&agent, &name, per_trace)).await;
    expect_invalid(r, "more than 1000 spans for trace");
    // A message over the REST body bound (16 MiB) is refused before decoding.
    let mut huge = good();
    huge[0].display_name = text(&"x".repeat(17 << 20));
    let err = c
        .batch_write_spans(call(&agent, &name, huge))
        .await
        .expect_err("too large");
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    // Nothing of the refused calls was stored.
    assert_eq!(stored(&e).await.len(), 2);

    // Not a BatchWriteSpansRequest: a gRPC error, nothing stored.
    let err = not_a_request(&url, &agent).await;
    assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
    assert!(err.message().contains("decode"), "{err:?}");

    // A method the service does not serve.
    let mut grpc = tonic::client::Grpc::new(
        tonic::transport::Endpoint::from_shared(url.clone())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect"),
    );
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static(
        "/google.devtools.cloudtrace.v2.TraceService/CreateSpan",
    );
    let r: Result<tonic::Response<pb::Span>, _> = grpc
        .unary(
            tonic::Request::new(span("00000000000000b0", "", "x", 1)),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await;
    assert_eq!(
        r.expect_err("not served").code(),
        tonic::Code::Unimplemented
    );
    server.abort();
}

/// A message that is not a `BatchWriteSpansRequest`: a `TruncatableString` whose field 2 is a
/// varint where the request's field 2 (`spans`) is a message. The answer is a gRPC status.
async fn not_a_request(url: &str, token: &str) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static(
        "/google.devtools.cloudtrace.v2.TraceService/BatchWriteSpans",
    );
    let mut req = tonic::Request::new(pb::TruncatableString {
        value: format!("projects/{PROJECT}"),
        truncated_byte_count: 7,
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("metadata"),
    );
    let r: Result<tonic::Response<()>, tonic::Status> = grpc
        .unary(req, path, tonic_prost::ProstCodec::default())
        .await;
    r.expect_err("not a BatchWriteSpansRequest")
}
