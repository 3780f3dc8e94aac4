//! Export of finished traces, off the request path: a bounded queue ([`Queue`], the request
//! side: `try_send`, and a full queue drops the trace and counts it) and one exporter task
//! ([`spawn`]) that batches and sends to one target:
//!
//! * Cloud Trace v1 `PATCH {base}/v1/projects/P/traces` (ESP's JSON), every second or as soon
//!   as more than 100 traces wait, as ESP's aggregator does;
//! * Cloud Trace v2 `POST {base}/v2/projects/P/traces:batchWrite` (the REST form of what
//!   ESPv2 sends over gRPC);
//! * OTLP/HTTP protobuf `POST <endpoint>` to any OpenTelemetry collector. The messages are
//!   the OTLP protos' field numbers declared with prost ([`otlp`]) rather than the
//!   opentelemetry SDK: the SDK's span model generates its own IDs and names, and the proxy
//!   must keep ESP's (and also emit Cloud Trace v1/v2 from the same records).
//!
//! Cloud Trace calls carry the proxy's service-account token, as Service Control calls do
//! (self-signed for `<base>/google.devtools.cloudtrace.v1.TraceService`, or the metadata
//! server's). A 403 (no `roles/cloudtrace.agent` on the project) is logged once at warning
//! level with the `gcloud` command that fixes it; unlike ESP, which logs it at debug level.

use super::{FinishedTrace, Kind, SpanRecord};
use crate::outbound_auth::TokenSource;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// Traces waiting for the exporter, at most; more are dropped and counted.
pub const QUEUE_CAPACITY: usize = 1024;
/// ESP's aggregator: flush every second, or when more than 100 traces wait.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
pub const MAX_BATCH: usize = 100;
/// Per export call.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The request side of the export queue. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Queue {
    tx: mpsc::Sender<FinishedTrace>,
    /// Spans dropped (the status port's `trace_spans_dropped`).
    dropped: prometheus_client::metrics::counter::Counter,
}

impl Queue {
    pub fn new(capacity: usize) -> (Queue, mpsc::Receiver<FinishedTrace>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Queue {
                tx,
                dropped: Default::default(),
            },
            rx,
        )
    }

    #[cfg(test)]
    pub fn for_test(capacity: usize) -> (Queue, mpsc::Receiver<FinishedTrace>) {
        Self::new(capacity)
    }

    /// Never waits: a full queue (or a stopped exporter) drops the trace's spans and counts them.
    pub fn push(&self, trace: FinishedTrace) {
        if let Err(e) = self.tx.try_send(trace) {
            let t = match e {
                mpsc::error::TrySendError::Full(t) | mpsc::error::TrySendError::Closed(t) => t,
            };
            self.dropped.inc_by(t.spans.len() as u64);
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// The counter, to register with the status port's metrics.
    pub fn dropped_counter(&self) -> prometheus_client::metrics::counter::Counter {
        self.dropped.clone()
    }
}

/// Where the exporter sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    CloudTraceV1 { base: String, project: String },
    CloudTraceV2 { base: String, project: String },
    Otlp { url: String, service: String },
}

impl Target {
    fn url(&self) -> String {
        match self {
            Target::CloudTraceV1 { base, project } => {
                format!("{base}/v1/projects/{project}/traces")
            }
            Target::CloudTraceV2 { base, project } => {
                format!("{base}/v2/projects/{project}/traces:batchWrite")
            }
            Target::Otlp { url, .. } => url.clone(),
        }
    }

    fn audience(&self) -> Option<String> {
        match self {
            Target::CloudTraceV1 { base, .. } => {
                Some(format!("{base}/google.devtools.cloudtrace.v1.TraceService"))
            }
            Target::CloudTraceV2 { base, .. } => {
                Some(format!("{base}/google.devtools.cloudtrace.v2.TraceService"))
            }
            Target::Otlp { .. } => None,
        }
    }

    fn project(&self) -> &str {
        match self {
            Target::CloudTraceV1 { project, .. } | Target::CloudTraceV2 { project, .. } => project,
            Target::Otlp { .. } => "",
        }
    }

    /// The body and its content type for a batch.
    pub fn encode(&self, traces: &[FinishedTrace]) -> (Vec<u8>, &'static str) {
        match self {
            Target::CloudTraceV1 { project, .. } => (
                encode_v1(project, traces).to_string().into_bytes(),
                "application/json",
            ),
            Target::CloudTraceV2 { project, .. } => (
                encode_v2(project, traces).to_string().into_bytes(),
                "application/json",
            ),
            Target::Otlp { service, .. } => {
                use prost::Message;
                (
                    otlp::encode(service, traces).encode_to_vec(),
                    "application/x-protobuf",
                )
            }
        }
    }
}

/// What the exporter task needs.
pub struct Exporter {
    pub target: Target,
    pub tokens: Option<TokenSource>,
    /// The proxy's account, named in the 403 warning.
    pub account: Option<String>,
    pub flush_every: Duration,
    pub max_batch: usize,
}

/// Starts the exporter on the current runtime. It ends when every [`Queue`] is dropped,
/// after sending what is left.
pub fn spawn(exporter: Exporter, rx: mpsc::Receiver<FinishedTrace>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(exporter, rx))
}

async fn run(exporter: Exporter, mut rx: mpsc::Receiver<FinishedTrace>) {
    let client = match reqwest::Client::builder().timeout(EXPORT_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "trace export disabled: cannot build an HTTP client");
            return;
        }
    };
    let warned = AtomicBool::new(false);
    let mut buf: Vec<FinishedTrace> = Vec::new();
    let mut tick = tokio::time::interval(exporter.flush_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(t) => {
                    buf.push(t);
                    if buf.len() > exporter.max_batch {
                        send(&exporter, &client, &warned, std::mem::take(&mut buf)).await;
                    }
                }
                None => {
                    if !buf.is_empty() {
                        send(&exporter, &client, &warned, buf).await;
                    }
                    return;
                }
            },
            _ = tick.tick() => {
                if !buf.is_empty() {
                    send(&exporter, &client, &warned, std::mem::take(&mut buf)).await;
                }
            }
        }
    }
}

async fn send(
    exporter: &Exporter,
    client: &reqwest::Client,
    warned: &AtomicBool,
    batch: Vec<FinishedTrace>,
) {
    let target = &exporter.target;
    if target.project().is_empty() && !matches!(target, Target::Otlp { .. }) {
        tracing::debug!("traces dropped: no tracing project");
        return;
    }
    let spans: usize = batch.iter().map(|t| t.spans.len()).sum();
    let (body, content_type) = target.encode(&batch);
    let url = target.url();
    let mut req = match target {
        Target::CloudTraceV1 { .. } => client.patch(&url),
        _ => client.post(&url),
    }
    .header(http::header::CONTENT_TYPE, content_type)
    .body(body);
    if let (Some(tokens), Some(aud)) = (&exporter.tokens, target.audience()) {
        match tokens.authorization(&aud).await {
            Ok(Some(h)) => req = req.header(http::header::AUTHORIZATION, h),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, spans, "traces not exported: no token");
                return;
            }
        }
    }
    match req.send().await {
        Ok(resp) if resp.status().is_success() => {
            tracing::debug!(spans, url, "traces exported");
        }
        Ok(resp) if resp.status() == reqwest::StatusCode::FORBIDDEN => {
            if !warned.swap(true, Ordering::Relaxed) {
                let account = exporter.account.as_deref().unwrap_or("PROXY_ACCOUNT");
                let project = target.project();
                tracing::warn!(
                    url,
                    "Cloud Trace refused the proxy's spans (403 The caller does not have \
                     permission): grant the proxy's account the Cloud Trace agent role on the \
                     tracing project: gcloud projects add-iam-policy-binding {project} --member \
                     serviceAccount:{account} --role roles/cloudtrace.agent \
                     (this is said once; later refusals are logged at debug level)"
                );
            } else {
                tracing::debug!(spans, "traces refused (403)");
            }
        }
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            // The first chunk only, at most 256 bytes: the body is for the log, and a broken
            // server's answer can be any size.
            let first = resp.chunk().await.ok().flatten().unwrap_or_default();
            let text = String::from_utf8_lossy(&first[..first.len().min(256)]).into_owned();
            tracing::warn!(status, spans, url, body = %text, "trace export failed");
        }
        Err(e) => tracing::warn!(error = %e, spans, url, "trace export failed"),
    }
}

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    time::OffsetDateTime::from_unix_timestamp_nanos(d.as_nanos() as i128)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

/// The longest prefix of `s` of at most `max` bytes on a character boundary, and how many
/// bytes were cut.
fn truncate(s: &str, max: usize) -> (&str, usize) {
    if s.len() <= max {
        return (s, 0);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (&s[..end], s.len() - end)
}

/// Cloud Trace v1's limits the control plane (and Google) enforce: names under 128 bytes,
/// label keys 1 to 128 bytes, values up to 16 KiB, 32 labels.
fn v1_span(s: &SpanRecord) -> serde_json::Value {
    let mut labels = serde_json::Map::new();
    for (k, v) in s.labels.iter().take(32) {
        if k.is_empty() || k.len() > 128 {
            continue;
        }
        labels.insert(k.to_string(), truncate(v, 16 * 1024).0.into());
    }
    let mut o = serde_json::json!({
        "spanId": s.id.to_string(),
        "kind": "RPC_SERVER",
        "name": truncate(&s.name, 127).0,
        "startTime": rfc3339(s.start),
        "endTime": rfc3339(s.end.max(s.start)),
        "labels": labels,
    });
    if s.parent != 0 {
        o["parentSpanId"] = s.parent.to_string().into();
    }
    o
}

/// ESP's `PATCH .../traces` body.
pub fn encode_v1(project: &str, traces: &[FinishedTrace]) -> serde_json::Value {
    let traces: Vec<_> = traces
        .iter()
        .map(|t| {
            serde_json::json!({
                "projectId": project,
                // ESP exports the client's trace ID text as it came (case kept).
                "traceId": t.trace_text.clone().unwrap_or_else(|| super::context::hex(&t.trace_id)),
                "spans": t.spans.iter().map(v1_span).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({ "traces": traces })
}

fn truncatable(s: &str, max: usize) -> serde_json::Value {
    let (v, cut) = truncate(s, max);
    serde_json::json!({ "value": v, "truncatedByteCount": cut })
}

/// ESPv2's spans in `batchWrite`'s REST form.
pub fn encode_v2(project: &str, traces: &[FinishedTrace]) -> serde_json::Value {
    let mut spans = Vec::new();
    for t in traces {
        let trace = super::context::hex(&t.trace_id);
        for s in &t.spans {
            let id = format!("{:016x}", s.id);
            let mut map = serde_json::Map::new();
            for (k, v) in s.labels.iter().take(32) {
                if k.is_empty() || k.len() > 128 {
                    continue;
                }
                map.insert(
                    k.to_string(),
                    serde_json::json!({ "stringValue": truncatable(v, 256) }),
                );
            }
            let mut o = serde_json::json!({
                "name": format!("projects/{project}/traces/{trace}/spans/{id}"),
                "spanId": id,
                "displayName": truncatable(&s.name, 128),
                "startTime": rfc3339(s.start),
                "endTime": rfc3339(s.end.max(s.start)),
                "attributes": { "attributeMap": map, "droppedAttributesCount": 0 },
            });
            if s.parent != 0 {
                o["parentSpanId"] = format!("{:016x}", s.parent).into();
            }
            spans.push(o);
        }
    }
    serde_json::json!({ "spans": spans })
}

/// The OTLP trace protos' messages the exporter sends (opentelemetry-proto
/// `collector/trace/v1/trace_service.proto`, `trace/v1/trace.proto`, `common/v1/common.proto`,
/// `resource/v1/resource.proto`), with their field numbers. Only the fields Portico sets.
pub mod otlp {
    use super::{FinishedTrace, Kind};

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportTraceServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceSpans {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeSpans {
        #[prost(message, optional, tag = "1")]
        pub scope: Option<InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<Span>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InstrumentationScope {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub version: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Span {
        #[prost(bytes = "vec", tag = "1")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub span_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        pub parent_span_id: Vec<u8>,
        #[prost(string, tag = "5")]
        pub name: String,
        /// 1 INTERNAL, 2 SERVER, 3 CLIENT.
        #[prost(int32, tag = "6")]
        pub kind: i32,
        #[prost(fixed64, tag = "7")]
        pub start_time_unix_nano: u64,
        #[prost(fixed64, tag = "8")]
        pub end_time_unix_nano: u64,
        #[prost(message, repeated, tag = "9")]
        pub attributes: Vec<KeyValue>,
        /// Low 8 bits: the W3C trace flags (1: sampled).
        #[prost(fixed32, tag = "16")]
        pub flags: u32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AnyValue {
        #[prost(string, tag = "1")]
        pub string_value: String,
    }

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: Some(AnyValue {
                string_value: value.to_string(),
            }),
        }
    }

    fn nanos(t: std::time::SystemTime) -> u64 {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    pub fn encode(service: &str, traces: &[FinishedTrace]) -> ExportTraceServiceRequest {
        let spans = traces
            .iter()
            .flat_map(|t| {
                t.spans.iter().map(move |s| Span {
                    trace_id: t.trace_id.to_vec(),
                    span_id: s.id.to_be_bytes().to_vec(),
                    parent_span_id: if s.parent == 0 {
                        Vec::new()
                    } else {
                        s.parent.to_be_bytes().to_vec()
                    },
                    name: super::truncate(&s.name, 1024).0.to_string(),
                    kind: match s.kind {
                        Kind::Internal => 1,
                        Kind::Server => 2,
                        Kind::Client => 3,
                    },
                    start_time_unix_nano: nanos(s.start),
                    end_time_unix_nano: nanos(s.end.max(s.start)),
                    // Google's OTLP ingest's bounds: keys 512 bytes, values 64 KiB.
                    attributes: s
                        .labels
                        .iter()
                        .map(|(k, v)| {
                            kv(super::truncate(k, 512).0, super::truncate(v, 64 * 1024).0)
                        })
                        .collect(),
                    flags: 1,
                })
            })
            .collect();
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", service)],
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "portico".to_string(),
                        version: env!("CARGO_PKG_VERSION").to_string(),
                    }),
                    spans,
                }],
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn trace() -> FinishedTrace {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        FinishedTrace {
            trace_id: [0xab; 16],
            trace_text: None,
            spans: vec![
                SpanRecord {
                    id: 7,
                    parent: 0,
                    name: Cow::Borrowed("svc/M"),
                    start: t0,
                    end: t0 + Duration::from_millis(5),
                    kind: Kind::Server,
                    labels: vec![(Cow::Borrowed("k"), "v".into())],
                },
                SpanRecord {
                    id: 8,
                    parent: 7,
                    name: Cow::Owned("x".repeat(300)),
                    start: t0,
                    end: t0,
                    kind: Kind::Client,
                    labels: vec![(Cow::Borrowed("big"), "é".repeat(200))],
                },
            ],
        }
    }

    #[test]
    fn v1_body_is_esps_shape() {
        let v = encode_v1("p", &[trace()]);
        let t = &v["traces"][0];
        assert_eq!(t["projectId"], "p");
        assert_eq!(t["traceId"], "ab".repeat(16));
        assert_eq!(t["spans"][0]["spanId"], "7");
        assert_eq!(t["spans"][0]["kind"], "RPC_SERVER");
        assert!(t["spans"][0].get("parentSpanId").is_none());
        assert_eq!(t["spans"][1]["parentSpanId"], "7");
        assert_eq!(t["spans"][1]["name"].as_str().map(str::len), Some(127));
        assert_eq!(t["spans"][0]["startTime"], "2023-11-14T22:13:20Z");
    }

    #[test]
    fn v1_body_keeps_the_clients_trace_id_text() {
        let mut t = trace();
        t.trace_text = Some("ABABABABABABABABABABABABABABABAB".into());
        let v = encode_v1("p", &[t.clone()]);
        assert_eq!(
            v["traces"][0]["traceId"],
            "ABABABABABABABABABABABABABABABAB"
        );
        // v2 names are built from the bytes, in lower case (ESPv2 keeps no text).
        let v = encode_v2("p", &[t]);
        assert!(v["spans"][0]["name"]
            .as_str()
            .is_some_and(|n| n.contains(&"ab".repeat(16))));
    }

    #[test]
    fn v2_body_truncates_on_char_boundaries() {
        let v = encode_v2("p", &[trace()]);
        let s = &v["spans"][1];
        assert_eq!(
            s["name"],
            format!(
                "projects/p/traces/{}/spans/0000000000000008",
                "ab".repeat(16)
            )
        );
        assert_eq!(s["parentSpanId"], "0000000000000007");
        assert_eq!(s["displayName"]["truncatedByteCount"], 172);
        let big = &s["attributes"]["attributeMap"]["big"]["stringValue"];
        assert_eq!(big["value"].as_str().map(str::len), Some(256));
        assert_eq!(big["truncatedByteCount"], 144);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (q, _rx) = Queue::new(1);
        q.push(trace());
        q.push(trace());
        assert_eq!(q.dropped(), 2, "the second trace's two spans");
    }
}
