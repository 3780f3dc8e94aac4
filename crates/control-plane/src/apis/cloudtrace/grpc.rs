//! Cloud Trace v2 over gRPC: `google.devtools.cloudtrace.v2.TraceService/BatchWriteSpans`, the
//! call ESPv2's exporter (opencensus-cpp in Envoy) makes, so a real ESPv2 pointed at Portico
//! with `--cloud_trace_url_override` has somewhere to send its spans. Served on the control
//! plane's own port, which speaks h2c beside HTTP/1.1 (`app/serve.rs`).
//!
//! The spans go through the REST `batchWrite`'s own checks (each span turned into the JSON
//! shape that handler takes, then [`super::v2_spans`]), into the same rows, behind the same
//! `cloudtrace.traces.patch` check on the project of the request's `name`: one set of bounds
//! and one set of error messages, whichever way the spans came. Errors are the REST errors'
//! codes (`google.rpc.Code` numbers, the same in both) as gRPC statuses.

use axum::extract::{FromRequestParts, Request, State};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use tower::ServiceExt;

use crate::app::AppState;
use crate::authz::{perms, Principal};
use crate::error::ApiError;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    pub mod google {
        pub mod rpc {
            tonic::include_proto!("google.rpc");
        }
        pub mod devtools {
            pub mod cloudtrace {
                pub mod v2 {
                    tonic::include_proto!("google.devtools.cloudtrace.v2");
                }
            }
        }
    }
    pub use google::devtools::cloudtrace::v2::*;
}

use pb::trace_service_server::{TraceService, TraceServiceServer};

/// The largest request message: the REST API's body bound (`app::extract::MAX_BODY_BYTES`).
pub const MAX_MESSAGE_BYTES: usize = crate::app::extract::MAX_BODY_BYTES;

/// Why the caller could not be authenticated, for the service to answer `UNAUTHENTICATED`.
#[derive(Clone)]
struct Unauthenticated(ApiError);

/// The axum entry for `/google.devtools.cloudtrace.v2.TraceService/*`: authenticates the caller
/// as every API does (the bearer token in the `authorization` metadata), then hands the
/// request to the tonic service, which answers unknown methods `UNIMPLEMENTED`.
pub(super) async fn entry(State(state): State<AppState>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    match Principal::from_request_parts(&mut parts, &state).await {
        Ok(p) => {
            parts.extensions.insert(p);
        }
        Err(e) => {
            parts.extensions.insert(Unauthenticated(e));
        }
    }
    let svc = TraceServiceServer::new(Grpc { state }).max_decoding_message_size(MAX_MESSAGE_BYTES);
    match svc.oneshot(Request::from_parts(parts, body)).await {
        Ok(resp) => resp.map(axum::body::Body::new).into_response(),
        Err(never) => match never {},
    }
}

struct Grpc {
    state: AppState,
}

fn status(e: ApiError) -> tonic::Status {
    tonic::Status::new(tonic::Code::from_i32(e.code.as_i32()), e.message)
}

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn batch_write_spans(
        &self,
        request: tonic::Request<pb::BatchWriteSpansRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        if let Some(Unauthenticated(e)) = request.extensions().get::<Unauthenticated>() {
            return Err(status(e.clone()));
        }
        let principal = request
            .extensions()
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| tonic::Status::unauthenticated("No credentials."))?;
        let req = request.into_inner();
        let project = match req.name.strip_prefix("projects/") {
            Some(p) if !p.is_empty() && !p.contains('/') => p.to_string(),
            _ => {
                return Err(status(ApiError::invalid_argument(format!(
                    "invalid name '{}': expected projects/PROJECT_ID.",
                    super::clip(&req.name)
                ))))
            }
        };
        let project_id = super::authorize(&self.state, &principal, &project, perms::TRACES_PATCH)
            .await
            .map_err(status)?;
        let body = super::BatchWriteBody {
            spans: req.spans.iter().map(span_json).collect(),
        };
        let spans = super::v2_spans(&project_id, body).map_err(status)?;
        super::write(&self.state, &project_id, &spans)
            .await
            .map_err(status)?;
        Ok(tonic::Response::new(()))
    }
}

// ---- A v2 span in proto3's JSON mapping, as the REST `batchWrite` receives it.

fn timestamp(t: &prost_types::Timestamp) -> Value {
    // Out-of-range seconds or nanos become text the REST parser refuses with its message.
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .filter(|_| (0..1_000_000_000).contains(&t.nanos))
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        }) {
        Some(s) => Value::String(s),
        None => Value::String(format!("{}s+{}ns", t.seconds, t.nanos)),
    }
}

fn truncatable(s: &pb::TruncatableString) -> Value {
    let mut v = json!({"value": s.value});
    if s.truncated_byte_count != 0 {
        v["truncatedByteCount"] = s.truncated_byte_count.into();
    }
    v
}

fn attributes(a: &pb::span::Attributes) -> Value {
    let mut map = Map::new();
    for (k, v) in &a.attribute_map {
        use pb::attribute_value::Value as V;
        let value = match &v.value {
            Some(V::StringValue(s)) => json!({"stringValue": truncatable(s)}),
            // int64 is a string in proto3 JSON.
            Some(V::IntValue(i)) => json!({"intValue": i.to_string()}),
            Some(V::BoolValue(b)) => json!({"boolValue": b}),
            None => json!({}),
        };
        map.insert(k.clone(), value);
    }
    let mut v = json!({"attributeMap": map});
    if a.dropped_attributes_count != 0 {
        v["droppedAttributesCount"] = a.dropped_attributes_count.into();
    }
    v
}

fn enum_name<E: TryFrom<i32>>(n: i32, name: impl Fn(E) -> &'static str) -> Value {
    // An unknown number stays a number: the REST checks name it.
    match E::try_from(n) {
        Ok(e) => Value::String(name(e).to_string()),
        Err(_) => Value::String(n.to_string()),
    }
}

fn time_events(t: &pb::span::TimeEvents) -> Value {
    use pb::span::time_event::{message_event::Type, Value as E};
    let events: Vec<Value> = t
        .time_event
        .iter()
        .map(|e| {
            let mut v = Map::new();
            if let Some(ts) = &e.time {
                v.insert("time".into(), timestamp(ts));
            }
            match &e.value {
                Some(E::Annotation(a)) => {
                    let mut an = Map::new();
                    if let Some(d) = &a.description {
                        an.insert("description".into(), truncatable(d));
                    }
                    if let Some(at) = &a.attributes {
                        an.insert("attributes".into(), attributes(at));
                    }
                    v.insert("annotation".into(), Value::Object(an));
                }
                Some(E::MessageEvent(m)) => {
                    v.insert(
                        "messageEvent".into(),
                        json!({
                            "type": enum_name(m.r#type, |t: Type| t.as_str_name()),
                            "id": m.id.to_string(),
                            "uncompressedSizeBytes": m.uncompressed_size_bytes.to_string(),
                            "compressedSizeBytes": m.compressed_size_bytes.to_string(),
                        }),
                    );
                }
                None => {}
            }
            Value::Object(v)
        })
        .collect();
    json!({
        "timeEvent": events,
        "droppedAnnotationsCount": t.dropped_annotations_count,
        "droppedMessageEventsCount": t.dropped_message_events_count,
    })
}

fn links(l: &pb::span::Links) -> Value {
    use pb::span::link::Type;
    let links: Vec<Value> = l
        .link
        .iter()
        .map(|k| {
            let mut v = json!({
                "traceId": k.trace_id,
                "spanId": k.span_id,
                "type": enum_name(k.r#type, |t: Type| t.as_str_name()),
            });
            if let Some(a) = &k.attributes {
                v["attributes"] = attributes(a);
            }
            v
        })
        .collect();
    json!({"link": links, "droppedLinksCount": l.dropped_links_count})
}

fn span_json(s: &pb::Span) -> Map<String, Value> {
    use pb::span::SpanKind;
    let mut m = Map::new();
    m.insert("name".into(), s.name.clone().into());
    m.insert("spanId".into(), s.span_id.clone().into());
    if !s.parent_span_id.is_empty() {
        m.insert("parentSpanId".into(), s.parent_span_id.clone().into());
    }
    if let Some(d) = &s.display_name {
        m.insert("displayName".into(), truncatable(d));
    }
    if let Some(t) = &s.start_time {
        m.insert("startTime".into(), timestamp(t));
    }
    if let Some(t) = &s.end_time {
        m.insert("endTime".into(), timestamp(t));
    }
    if let Some(a) = &s.attributes {
        m.insert("attributes".into(), attributes(a));
    }
    if let Some(t) = &s.time_events {
        m.insert("timeEvents".into(), time_events(t));
    }
    if let Some(l) = &s.links {
        m.insert("links".into(), links(l));
    }
    if let Some(st) = &s.status {
        // Details are `Any`s whose types Portico does not know: their type URLs are kept.
        let details: Vec<Value> = st
            .details
            .iter()
            .map(|d| json!({"@type": d.type_url}))
            .collect();
        let mut v = json!({"code": st.code, "message": st.message});
        if !details.is_empty() {
            v["details"] = details.into();
        }
        m.insert("status".into(), v);
    }
    if let Some(b) = s.same_process_as_parent_span {
        m.insert("sameProcessAsParentSpan".into(), b.into());
    }
    if let Some(c) = s.child_span_count {
        m.insert("childSpanCount".into(), c.into());
    }
    if s.span_kind != 0 {
        m.insert(
            "spanKind".into(),
            enum_name(s.span_kind, |k: SpanKind| k.as_str_name()),
        );
    }
    // The stack trace is accepted and not kept, as by the REST call.
    m
}
