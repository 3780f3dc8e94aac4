//! Cloud Trace (`cloudtrace.googleapis.com`): where ESP (v1 API) and ESPv2 (v2 API) send the
//! spans of the requests they trace, and where the console reads them.
//!
//! - `PATCH /v1/projects/{project}/traces` — `{"traces": [{projectId, traceId, spans: [...]}]}`,
//!   v1 spans (`spanId` a decimal fixed64, `kind`, `name`, times, `parentSpanId`, `labels`).
//!   A span sent again replaces the stored one (v1's overwrite). Answers `{}`.
//! - `POST /v2/projects/{project}/traces:batchWrite` — `{"spans": [...]}`, v2 spans (`name` =
//!   `projects/P/traces/T/spans/S`, `displayName`, `attributes`, `status`, ...). Stored in the
//!   same rows as v1 spans: the display name becomes the name, string/int/bool attributes become
//!   labels, `SERVER`/`CLIENT` become `RPC_SERVER`/`RPC_CLIENT`; status, time events, links and
//!   the attribute types are kept beside them. Google stores a re-sent v2 span twice; Portico
//!   replaces it, as for v1. Answers `{}`.
//! - gRPC `google.devtools.cloudtrace.v2.TraceService/BatchWriteSpans` ([`grpc`]): the same
//!   spans, checks and permission as `batchWrite`, for ESPv2's gRPC exporter.
//! - `GET /v1/projects/{project}/traces` (ListTraces: `view`, `filter`, `orderBy`, `startTime`,
//!   `endTime`, `pageSize`, `pageToken`) and `GET /v1/projects/{project}/traces/{traceId}`.
//!   v2 has no read API; v2 spans read back in v1's shape.
//!
//! Permissions are checked on the project in the URL: `cloudtrace.traces.patch` for both
//! writes (what `roles/cloudtrace.agent`, the walkthrough's binding, grants), `.get`/`.list`
//! for reads. A refusal is Google's 403 `The caller does not have permission`.
//!
//! Limits are Google's (25,000 spans per call, 1,000 per trace, 32 labels per span, keys of 128
//! bytes and values of 16 KiB, names of 128 bytes): beyond them the whole call is refused with
//! the span named, so a writer learns what was wrong and nothing half-stored remains. Storage
//! is bounded per project ([`Retention`]): spans older than the retention time, and the oldest
//! beyond the span cap, are dropped as new ones arrive. Lists look at the newest
//! [`LIST_SCAN_TRACES`] traces of the time window.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::app::{parse_json_body, AppState, PageSizeWording, Params};
use crate::authz::{load_project_policy, perms, Principal};
use crate::error::ApiError;
use crate::store::traces::{self as store, StoredSpan};

pub mod grpc;

/// Spans one write call may carry (Google: 25,000 per PatchTraces).
pub const MAX_SPANS_PER_CALL: usize = 25_000;
/// Spans one trace may have in one call (Google: 1,000 per trace).
pub const MAX_SPANS_PER_TRACE: usize = 1_000;
/// Labels (v1) or attributes (v2) per span.
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_KEY_BYTES: usize = 128;
pub const MAX_LABEL_VALUE_BYTES: usize = 16 << 10;
pub const MAX_NAME_BYTES: usize = 128;
/// How many of the newest traces in the window a list considers.
pub const LIST_SCAN_TRACES: i64 = 10_000;
const LIST_DEFAULT_PAGE: usize = 100;
const LIST_MAX_PAGE: usize = 1_000;

/// How much is kept per project.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Spans written longer ago than this are dropped.
    pub max_age: std::time::Duration,
    /// At most this many spans (the newest by start time) are kept.
    pub max_spans: i64,
    /// Pruning runs on every this-many-th write call (it scans the project's spans).
    pub prune_every: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: std::time::Duration::from_secs(7 * 24 * 3600),
            max_spans: 200_000,
            prune_every: 32,
        }
    }
}

/// Counts write calls, to prune every [`Retention::prune_every`]-th.
static WRITES: AtomicU64 = AtomicU64::new(0);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/projects/{project}/traces",
            patch(patch_traces).get(list_traces),
        )
        .route("/v1/projects/{project}/traces/{trace}", get(get_trace))
        .route(
            "/v2/projects/{project}/traces:batchWrite",
            post(batch_write),
        )
        // ESPv2's export: gRPC over the same port (h2c).
        .route(
            "/google.devtools.cloudtrace.v2.TraceService/{*method}",
            axum::routing::any(grpc::entry),
        )
}

/// Google's refusal for every Cloud Trace method, whatever the permission.
fn denied() -> ApiError {
    ApiError::permission_denied("The caller does not have permission")
}

/// The project id behind the URL's project, after checking `permission` on it.
async fn authorize(
    state: &AppState,
    principal: &Principal,
    project: &str,
    permission: &str,
) -> Result<String, ApiError> {
    let project_id = crate::projects::project_id_for(&state.store, project).await?;
    if let Some(member) = principal.member() {
        let policy = load_project_policy(&state.store, &project_id).await?;
        if !policy.is_some_and(|p| p.grants(&member, permission)) {
            tracing::info!(project = %project_id, %member, permission, "Cloud Trace call refused");
            return Err(denied());
        }
    }
    Ok(project_id)
}

fn bad(message: String) -> ApiError {
    ApiError::invalid_argument(message)
}

/// A trace id: 32 hex digits, not all zero; stored lower-case.
fn trace_id(s: &str, what: &str) -> Result<String, ApiError> {
    if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0') {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(bad(format!(
            "{what}: invalid trace id '{}': expected 32 hexadecimal digits, not all zero.",
            clip(s)
        )))
    }
}

/// A v2 span id: 16 hex digits, not all zero.
fn hex_span_id(s: &str, what: &str) -> Result<String, ApiError> {
    if s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0') {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(bad(format!(
            "{what}: invalid span id '{}': expected 16 hexadecimal digits, not all zero.",
            clip(s)
        )))
    }
}

/// A v1 span id (fixed64: a decimal string in JSON, a number accepted too), as 16 hex digits.
fn decimal_span_id(v: &Value, what: &str) -> Result<String, ApiError> {
    let n = match v {
        Value::String(s) => s.trim().parse::<u64>().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    };
    match n {
        Some(n) if n != 0 => Ok(format!("{n:016x}")),
        _ => Err(bad(format!(
            "{what}: invalid span id {}: expected a non-zero unsigned 64-bit number.",
            clip(&v.to_string())
        ))),
    }
}

/// A value shown in a message, cut so a huge input does not make a huge error.
fn clip(s: &str) -> String {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    if end < s.len() {
        format!("{}...", &s[..end])
    } else {
        s.to_string()
    }
}

/// RFC 3339 → (normalised text in UTC, nanoseconds since the epoch).
fn timestamp(s: &str, what: &str) -> Result<(String, i64), ApiError> {
    let t = OffsetDateTime::parse(s.trim(), &Rfc3339)
        .map_err(|_| {
            bad(format!(
                "{what}: invalid timestamp '{}': expected RFC 3339, such as \
                 2026-01-01T00:00:00.000000001Z.",
                clip(s)
            ))
        })?
        .to_offset(time::UtcOffset::UTC);
    let ns = i64::try_from(t.unix_timestamp_nanos())
        .map_err(|_| bad(format!("{what}: timestamp '{}' is out of range.", clip(s))))?;
    let text = t
        .format(&Rfc3339)
        .map_err(|_| bad(format!("{what}: timestamp '{}' is out of range.", clip(s))))?;
    Ok((text, ns))
}

fn check_name(name: &str, what: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(bad(format!("{what}: the span name is required.")));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(bad(format!(
            "{what}: the span name is {} bytes; at most {MAX_NAME_BYTES} are allowed.",
            name.len()
        )));
    }
    Ok(())
}

fn check_labels(labels: &BTreeMap<String, String>, what: &str) -> Result<(), ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(bad(format!(
            "{what}: {} labels; at most {MAX_LABELS} are allowed per span.",
            labels.len()
        )));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_KEY_BYTES {
            return Err(bad(format!(
                "{what}: label key '{}' must be 1 to {MAX_LABEL_KEY_BYTES} bytes.",
                clip(k)
            )));
        }
        if v.len() > MAX_LABEL_VALUE_BYTES {
            return Err(bad(format!(
                "{what}: the value of label '{}' is {} bytes; at most {MAX_LABEL_VALUE_BYTES} \
                 are allowed.",
                clip(k),
                v.len()
            )));
        }
    }
    Ok(())
}

fn check_times(start: i64, end: i64, what: &str) -> Result<(), ApiError> {
    if end < start {
        return Err(bad(format!("{what}: endTime is before startTime.")));
    }
    Ok(())
}

// ---- v1 write.

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
struct PatchTracesBody {
    traces: Vec<TraceV1In>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
struct TraceV1In {
    project_id: String,
    trace_id: String,
    spans: Vec<SpanV1In>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
struct SpanV1In {
    span_id: Value,
    kind: String,
    name: String,
    start_time: String,
    end_time: String,
    parent_span_id: Value,
    labels: BTreeMap<String, String>,
}

const V1_KINDS: &[&str] = &["SPAN_KIND_UNSPECIFIED", "RPC_SERVER", "RPC_CLIENT"];

fn v1_spans(project_id: &str, body: PatchTracesBody) -> Result<Vec<StoredSpan>, ApiError> {
    let total: usize = body.traces.iter().map(|t| t.spans.len()).sum();
    if total > MAX_SPANS_PER_CALL {
        return Err(bad(format!(
            "{total} spans in one call; at most {MAX_SPANS_PER_CALL} are allowed."
        )));
    }
    let mut out = Vec::with_capacity(total);
    for (ti, t) in body.traces.into_iter().enumerate() {
        let what = format!("traces[{ti}]");
        if !t.project_id.is_empty() && t.project_id != project_id {
            return Err(bad(format!(
                "{what}: projectId '{}' is not the project of the request ('{project_id}').",
                clip(&t.project_id)
            )));
        }
        let tid = trace_id(&t.trace_id, &what)?;
        if t.spans.len() > MAX_SPANS_PER_TRACE {
            return Err(bad(format!(
                "{what}: {} spans; at most {MAX_SPANS_PER_TRACE} are allowed per trace.",
                t.spans.len()
            )));
        }
        for (si, s) in t.spans.into_iter().enumerate() {
            let what = format!("traces[{ti}].spans[{si}]");
            let span_id = decimal_span_id(&s.span_id, &what)?;
            let parent_span_id = match &s.parent_span_id {
                Value::Null => String::new(),
                Value::String(p) if p.is_empty() || p == "0" => String::new(),
                Value::Number(n) if n.as_u64() == Some(0) => String::new(),
                other => decimal_span_id(other, &format!("{what}.parentSpanId"))?,
            };
            let kind = if s.kind.is_empty() {
                "SPAN_KIND_UNSPECIFIED".to_string()
            } else if V1_KINDS.contains(&s.kind.as_str()) {
                s.kind
            } else {
                return Err(bad(format!(
                    "{what}: invalid kind '{}': expected one of {}.",
                    clip(&s.kind),
                    V1_KINDS.join(", ")
                )));
            };
            check_name(&s.name, &what)?;
            check_labels(&s.labels, &what)?;
            let (start_time, start_ns) = timestamp(&s.start_time, &format!("{what}.startTime"))?;
            let (end_time, end_ns) = timestamp(&s.end_time, &format!("{what}.endTime"))?;
            check_times(start_ns, end_ns, &what)?;
            out.push(StoredSpan {
                trace_id: tid.clone(),
                span_id,
                parent_span_id,
                name: s.name,
                kind,
                start_time,
                end_time,
                start_ns,
                end_ns,
                labels: serde_json::to_string(&s.labels)?,
                extra: "{}".to_string(),
            });
        }
    }
    Ok(out)
}

async fn patch_traces(
    State(state): State<AppState>,
    principal: Principal,
    Path(project): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let project_id = authorize(&state, &principal, &project, perms::TRACES_PATCH).await?;
    let body: PatchTracesBody = parse_json_body(&body)?;
    let spans = v1_spans(&project_id, body)?;
    write(&state, &project_id, &spans).await?;
    Ok(Json(json!({})))
}

// ---- v2 write.

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
struct BatchWriteBody {
    spans: Vec<Map<String, Value>>,
}

/// A v2 `TruncatableString`'s value.
fn truncatable(v: Option<&Value>) -> Option<&str> {
    v?.get("value")?.as_str()
}

/// v2 attributes → string labels, and the attribute types for `extra`.
fn v2_labels(v: Option<&Value>, what: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let mut labels = BTreeMap::new();
    let Some(map) = v
        .and_then(|a| a.get("attributeMap"))
        .and_then(Value::as_object)
    else {
        return Ok(labels);
    };
    for (k, av) in map {
        let value = if let Some(s) = truncatable(av.get("stringValue")) {
            s.to_string()
        } else if let Some(i) = av.get("intValue") {
            match i {
                Value::String(s) if s.parse::<i64>().is_ok() => s.clone(),
                Value::Number(n) if n.is_i64() => n.to_string(),
                _ => {
                    return Err(bad(format!(
                        "{what}: attribute '{}' has an intValue that is not a 64-bit integer.",
                        clip(k)
                    )))
                }
            }
        } else if let Some(b) = av.get("boolValue").and_then(Value::as_bool) {
            b.to_string()
        } else {
            return Err(bad(format!(
                "{what}: attribute '{}' has none of stringValue, intValue, boolValue.",
                clip(k)
            )));
        };
        labels.insert(k.clone(), value);
    }
    Ok(labels)
}

fn v2_kind(kind: Option<&Value>, what: &str) -> Result<String, ApiError> {
    match kind
        .and_then(Value::as_str)
        .unwrap_or("SPAN_KIND_UNSPECIFIED")
    {
        "SERVER" => Ok("RPC_SERVER".into()),
        "CLIENT" => Ok("RPC_CLIENT".into()),
        "SPAN_KIND_UNSPECIFIED" | "INTERNAL" | "PRODUCER" | "CONSUMER" => {
            Ok("SPAN_KIND_UNSPECIFIED".into())
        }
        other => Err(bad(format!("{what}: invalid spanKind '{}'.", clip(other)))),
    }
}

/// Fields of a v2 span Portico knows; anything else is refused, as Google refuses unknown
/// fields.
const V2_FIELDS: &[&str] = &[
    "name",
    "spanId",
    "parentSpanId",
    "displayName",
    "startTime",
    "endTime",
    "attributes",
    "stackTrace",
    "timeEvents",
    "links",
    "status",
    "sameProcessAsParentSpan",
    "childSpanCount",
    "spanKind",
];

fn v2_spans(project_id: &str, body: BatchWriteBody) -> Result<Vec<StoredSpan>, ApiError> {
    if body.spans.len() > MAX_SPANS_PER_CALL {
        return Err(bad(format!(
            "{} spans in one call; at most {MAX_SPANS_PER_CALL} are allowed.",
            body.spans.len()
        )));
    }
    let mut per_trace: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::with_capacity(body.spans.len());
    for (i, s) in body.spans.into_iter().enumerate() {
        let what = format!("spans[{i}]");
        if let Some(k) = s.keys().find(|k| !V2_FIELDS.contains(&k.as_str())) {
            return Err(bad(format!("{what}: unknown field '{}'.", clip(k))));
        }
        let name = s.get("name").and_then(Value::as_str).unwrap_or("");
        // projects/{project}/traces/{trace}/spans/{span}
        let parts: Vec<&str> = name.split('/').collect();
        let (tid, sid) = match parts.as_slice() {
            ["projects", p, "traces", t, "spans", sp] => {
                if *p != project_id {
                    return Err(bad(format!(
                        "{what}: span '{}' is not in the project of the request \
                         ('{project_id}').",
                        clip(name)
                    )));
                }
                (trace_id(t, &what)?, hex_span_id(sp, &what)?)
            }
            _ => {
                return Err(bad(format!(
                    "{what}: invalid name '{}': expected \
                     projects/PROJECT/traces/TRACE_ID/spans/SPAN_ID.",
                    clip(name)
                )))
            }
        };
        if let Some(id) = s.get("spanId").and_then(Value::as_str) {
            if !id.eq_ignore_ascii_case(&sid) {
                return Err(bad(format!(
                    "{what}: spanId '{}' differs from the span id in its name.",
                    clip(id)
                )));
            }
        }
        let parent_span_id = match s.get("parentSpanId").and_then(Value::as_str) {
            None | Some("") => String::new(),
            Some(p) => hex_span_id(p, &format!("{what}.parentSpanId"))?,
        };
        let display = truncatable(s.get("displayName")).unwrap_or("");
        check_name(display, &what)?;
        let labels = v2_labels(s.get("attributes"), &what)?;
        check_labels(&labels, &what)?;
        let kind = v2_kind(s.get("spanKind"), &what)?;
        let str_field = |f: &str| s.get(f).and_then(Value::as_str).unwrap_or("");
        let (start_time, start_ns) =
            timestamp(str_field("startTime"), &format!("{what}.startTime"))?;
        let (end_time, end_ns) = timestamp(str_field("endTime"), &format!("{what}.endTime"))?;
        check_times(start_ns, end_ns, &what)?;
        let count = per_trace.entry(tid.clone()).or_default();
        *count += 1;
        if *count > MAX_SPANS_PER_TRACE {
            return Err(bad(format!(
                "{what}: more than {MAX_SPANS_PER_TRACE} spans for trace {tid} in one call."
            )));
        }
        // What v1's shape cannot hold, kept for the console.
        let mut extra = Map::new();
        for f in [
            "status",
            "timeEvents",
            "links",
            "spanKind",
            "sameProcessAsParentSpan",
            "childSpanCount",
        ] {
            if let Some(v) = s.get(f) {
                extra.insert(f.to_string(), v.clone());
            }
        }
        if let Some(a) = s.get("attributes") {
            extra.insert("attributes".to_string(), a.clone());
        }
        let extra = serde_json::to_string(&extra)?;
        // A trace store is no place for one span of megabytes of events.
        if extra.len() > 256 << 10 {
            return Err(bad(format!(
                "{what}: {} bytes of status, events, links and attributes; at most 256 KiB \
                 are kept per span.",
                extra.len()
            )));
        }
        out.push(StoredSpan {
            trace_id: tid,
            span_id: sid,
            parent_span_id,
            name: display.to_string(),
            kind,
            start_time,
            end_time,
            start_ns,
            end_ns,
            labels: serde_json::to_string(&labels)?,
            extra,
        });
    }
    Ok(out)
}

async fn batch_write(
    State(state): State<AppState>,
    principal: Principal,
    Path(project): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let project_id = authorize(&state, &principal, &project, perms::TRACES_PATCH).await?;
    let body: BatchWriteBody = parse_json_body(&body)?;
    let spans = v2_spans(&project_id, body)?;
    write(&state, &project_id, &spans).await?;
    Ok(Json(json!({})))
}

async fn write(state: &AppState, project_id: &str, spans: &[StoredSpan]) -> Result<(), ApiError> {
    if spans.is_empty() {
        return Ok(());
    }
    let now = OffsetDateTime::now_utc().unix_timestamp();
    store::put(&state.store, project_id, spans, now).await?;
    let retention = state.traces;
    if WRITES
        .fetch_add(1, Ordering::Relaxed)
        .is_multiple_of(retention.prune_every.max(1))
    {
        let max_age = i64::try_from(retention.max_age.as_secs()).unwrap_or(i64::MAX);
        let dropped = store::prune(
            &state.store,
            project_id,
            now.saturating_sub(max_age),
            retention.max_spans,
        )
        .await?;
        if dropped > 0 {
            tracing::debug!(project = %project_id, dropped, "trace spans pruned");
        }
    }
    Ok(())
}

// ---- v1 reads.

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TraceOut {
    project_id: String,
    trace_id: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    spans: Vec<Value>,
}

fn span_out(s: &StoredSpan) -> Value {
    let dec = |hex: &str| u64::from_str_radix(hex, 16).map(|n| n.to_string()).ok();
    let mut v = json!({
        "spanId": dec(&s.span_id),
        "kind": s.kind,
        "name": s.name,
        "startTime": s.start_time,
        "endTime": s.end_time,
    });
    if let Some(p) = dec(&s.parent_span_id) {
        v["parentSpanId"] = Value::String(p);
    }
    let labels: Value = serde_json::from_str(&s.labels).unwrap_or_else(|_| json!({}));
    if labels.as_object().is_some_and(|m| !m.is_empty()) {
        v["labels"] = labels;
    }
    v
}

async fn get_trace(
    State(state): State<AppState>,
    principal: Principal,
    Path((project, trace)): Path<(String, String)>,
) -> Result<Json<TraceOut>, ApiError> {
    let project_id = authorize(&state, &principal, &project, perms::TRACES_GET).await?;
    let tid = trace_id(&trace, "traceId")?;
    let spans = store::trace(&state.store, &project_id, &tid).await?;
    if spans.is_empty() {
        return Err(ApiError::not_found(format!("Trace {tid} was not found.")));
    }
    Ok(Json(TraceOut {
        project_id,
        trace_id: tid,
        spans: spans.iter().map(span_out).collect(),
    }))
}

/// One trace as a list sees it.
struct Summary {
    trace_id: String,
    spans: Vec<StoredSpan>,
    /// Index of the root span: the earliest span without a parent in the trace.
    root: usize,
    start_ns: i64,
    duration_ns: i64,
}

impl Summary {
    fn new(trace_id: String, spans: Vec<StoredSpan>) -> Summary {
        let ids: std::collections::HashSet<&str> =
            spans.iter().map(|s| s.span_id.as_str()).collect();
        let root = spans
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.parent_span_id.is_empty() || !ids.contains(s.parent_span_id.as_str())
            })
            .min_by_key(|(_, s)| s.start_ns)
            .map_or(0, |(i, _)| i);
        let start_ns = spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
        let end_ns = spans.iter().map(|s| s.end_ns).max().unwrap_or(start_ns);
        Summary {
            trace_id,
            root,
            start_ns,
            duration_ns: end_ns.saturating_sub(start_ns),
            spans,
        }
    }

    fn root(&self) -> Option<&StoredSpan> {
        self.spans.get(self.root)
    }

    fn labels(&self) -> impl Iterator<Item = (String, String)> + '_ {
        self.spans.iter().flat_map(|s| {
            serde_json::from_str::<BTreeMap<String, String>>(&s.labels)
                .unwrap_or_default()
                .into_iter()
        })
    }
}

/// One term of a ListTraces filter; all terms must hold.
#[derive(Debug, Clone, PartialEq)]
enum Term {
    /// `root:` (prefix) / `+root:` (exact) on the root span's name.
    Root { name: String, exact: bool },
    /// `span:` / `+span:` on any span's name.
    Span { name: String, exact: bool },
    /// `latency:` — the trace lasted at least this long.
    Latency(i64),
    /// `label:KEY` — some span has the label.
    HasLabel(String),
    /// `KEY:VALUE` / `+KEY:VALUE` — some span's label starts with (equals) the value.
    Label {
        key: String,
        value: String,
        exact: bool,
    },
}

/// `24ms`, `1.5s`, `300us`, `2m`, `1h` → nanoseconds.
fn parse_latency(s: &str) -> Option<i64> {
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))?;
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)?;
    let scale = match unit {
        "ns" => 1.0,
        "us" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" => 60e9,
        "h" => 3600e9,
        _ => return None,
    };
    let v = n * scale;
    (v < i64::MAX as f64).then_some(v as i64)
}

/// Splits on spaces outside double quotes; quotes are removed.
fn tokens(filter: &str) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in filter.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if quoted {
        return Err(bad(format!(
            "Invalid filter '{}': a quote is not closed.",
            clip(filter)
        )));
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

fn parse_filter(filter: &str) -> Result<Vec<Term>, ApiError> {
    if filter.len() > 4096 {
        return Err(bad("Invalid filter: longer than 4096 bytes.".to_string()));
    }
    let mut terms = Vec::new();
    for tok in tokens(filter)? {
        let (exact, body) = match tok.strip_prefix('+') {
            Some(rest) => (true, rest),
            None => (false, tok.as_str()),
        };
        let Some((key, value)) = body.split_once(':') else {
            return Err(bad(format!(
                "Invalid filter term '{}': expected KEY:VALUE (root:, span:, latency:, label:, \
                 method:, url:, or a label key).",
                clip(&tok)
            )));
        };
        let term = match key {
            "root" => Term::Root {
                name: value.to_string(),
                exact,
            },
            "span" => Term::Span {
                name: value.to_string(),
                exact,
            },
            "latency" => Term::Latency(parse_latency(value).ok_or_else(|| {
                bad(format!(
                    "Invalid filter term '{}': expected a duration such as 24ms or 1.5s.",
                    clip(&tok)
                ))
            })?),
            "label" => Term::HasLabel(value.to_string()),
            "method" => Term::Label {
                key: "/http/method".to_string(),
                value: value.to_string(),
                exact,
            },
            "url" => Term::Label {
                key: "/http/url".to_string(),
                value: value.to_string(),
                exact,
            },
            "" => {
                return Err(bad(format!(
                    "Invalid filter term '{}': the key is empty.",
                    clip(&tok)
                )))
            }
            other => Term::Label {
                key: other.to_string(),
                value: value.to_string(),
                exact,
            },
        };
        terms.push(term);
    }
    Ok(terms)
}

fn matches_name(name: &str, want: &str, exact: bool) -> bool {
    if exact {
        name == want
    } else {
        name.starts_with(want)
    }
}

fn keep(t: &Summary, terms: &[Term]) -> bool {
    terms.iter().all(|term| match term {
        Term::Root { name, exact } => t
            .root()
            .is_some_and(|r| matches_name(&r.name, name, *exact)),
        Term::Span { name, exact } => t.spans.iter().any(|s| matches_name(&s.name, name, *exact)),
        Term::Latency(ns) => t.duration_ns >= *ns,
        Term::HasLabel(key) => t.labels().any(|(k, _)| k == *key),
        Term::Label { key, value, exact } => t
            .labels()
            .any(|(k, v)| k == *key && matches_name(&v, value, *exact)),
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum OrderBy {
    TraceId,
    Name,
    Duration,
    Start,
}

fn parse_order(s: Option<&str>) -> Result<(OrderBy, bool), ApiError> {
    let Some(s) = s else {
        return Ok((OrderBy::Start, true));
    };
    let mut parts = s.split_whitespace();
    let field = match parts.next() {
        Some("trace_id") => OrderBy::TraceId,
        Some("name") => OrderBy::Name,
        Some("duration") => OrderBy::Duration,
        Some("start") => OrderBy::Start,
        _ => {
            return Err(bad(format!(
                "Invalid orderBy '{}': expected trace_id, name, duration or start, optionally \
                 followed by desc.",
                clip(s)
            )))
        }
    };
    let desc = match (parts.next(), parts.next()) {
        (None, _) => false,
        (Some("desc"), None) => true,
        (Some("asc"), None) => false,
        _ => {
            return Err(bad(format!(
                "Invalid orderBy '{}': only one field and desc may be given.",
                clip(s)
            )))
        }
    };
    Ok((field, desc))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListTracesResponse {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    traces: Vec<TraceOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_page_token: Option<String>,
}

async fn list_traces(
    State(state): State<AppState>,
    principal: Principal,
    Path(project): Path<String>,
    params: Params,
) -> Result<Json<ListTracesResponse>, ApiError> {
    let project_id = authorize(&state, &principal, &project, perms::TRACES_LIST).await?;
    let view = params.get("view").unwrap_or("MINIMAL");
    if !matches!(
        view,
        "MINIMAL" | "ROOTSPAN" | "COMPLETE" | "VIEW_TYPE_UNSPECIFIED"
    ) {
        return Err(bad(format!(
            "Invalid view '{}': expected MINIMAL, ROOTSPAN or COMPLETE.",
            clip(view)
        )));
    }
    let terms = parse_filter(params.get("filter").unwrap_or(""))?;
    let (order, desc) = parse_order(params.get("orderBy"))?;
    let from_ns = match params.get("startTime") {
        Some(t) => timestamp(t, "startTime")?.1,
        None => i64::MIN,
    };
    let to_ns = match params.get("endTime") {
        Some(t) => timestamp(t, "endTime")?.1,
        None => i64::MAX,
    };
    let page = params.paging(LIST_DEFAULT_PAGE, LIST_MAX_PAGE, PageSizeWording::Integer)?;
    let rows = store::recent(&state.store, &project_id, from_ns, to_ns, LIST_SCAN_TRACES).await?;
    let mut grouped: BTreeMap<String, Vec<StoredSpan>> = BTreeMap::new();
    for r in rows {
        grouped.entry(r.trace_id.clone()).or_default().push(r);
    }
    let mut traces: Vec<Summary> = grouped
        .into_iter()
        .map(|(id, spans)| Summary::new(id, spans))
        .filter(|t| keep(t, &terms))
        .collect();
    traces.sort_by(|a, b| {
        let o = match order {
            OrderBy::TraceId => a.trace_id.cmp(&b.trace_id),
            OrderBy::Name => {
                let n = |t: &Summary| t.root().map(|r| r.name.clone()).unwrap_or_default();
                n(a).cmp(&n(b))
            }
            OrderBy::Duration => a.duration_ns.cmp(&b.duration_ns),
            OrderBy::Start => a.start_ns.cmp(&b.start_ns),
        }
        .then_with(|| a.trace_id.cmp(&b.trace_id));
        if desc {
            o.reverse()
        } else {
            o
        }
    });
    let total = traces.len();
    let next_page_token = page.next_token(total);
    let out = traces
        .into_iter()
        .skip(page.offset)
        .take(page.size)
        .map(|t| {
            let spans = match view {
                "COMPLETE" => t.spans.iter().map(span_out).collect(),
                "ROOTSPAN" => t.root().map(span_out).into_iter().collect(),
                _ => Vec::new(),
            };
            TraceOut {
                project_id: project_id.clone(),
                trace_id: t.trace_id,
                spans,
            }
        })
        .collect();
    Ok(Json(ListTracesResponse {
        traces: out,
        next_page_token,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_as_cloud_trace_writes_them() {
        assert_eq!(
            parse_filter("root:echo +span:\"Backend call\" latency:24ms label:/agent method:GET")
                .unwrap(),
            vec![
                Term::Root {
                    name: "echo".into(),
                    exact: false
                },
                Term::Span {
                    name: "Backend call".into(),
                    exact: true
                },
                Term::Latency(24_000_000),
                Term::HasLabel("/agent".into()),
                Term::Label {
                    key: "/http/method".into(),
                    value: "GET".into(),
                    exact: false
                },
            ]
        );
        assert_eq!(parse_latency("1.5s"), Some(1_500_000_000));
        for bad in [
            "root",
            "latency:fast",
            "latency:-1ms",
            ":x",
            "root:\"open",
            "latency:1e400s",
        ] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
        assert!(parse_filter(&"a:b ".repeat(2000)).is_err());
    }

    #[test]
    fn order_by_is_one_field_and_a_direction() {
        assert_eq!(parse_order(None).unwrap(), (OrderBy::Start, true));
        assert_eq!(
            parse_order(Some("duration desc")).unwrap(),
            (OrderBy::Duration, true)
        );
        assert_eq!(parse_order(Some("name")).unwrap(), (OrderBy::Name, false));
        for bad in ["latency", "name desc desc", "name up", ""] {
            assert!(parse_order(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_and_times_are_checked() {
        assert!(trace_id("0".repeat(32).as_str(), "t").is_err());
        assert!(trace_id("ABCDEF0123456789abcdef0123456789", "t").is_ok());
        assert!(trace_id("xyz", "t").is_err());
        assert_eq!(
            decimal_span_id(&json!("255"), "s").unwrap(),
            "00000000000000ff"
        );
        assert_eq!(decimal_span_id(&json!(1), "s").unwrap(), "0000000000000001");
        for bad in [
            json!("0"),
            json!("-1"),
            json!("18446744073709551616"),
            json!(null),
        ] {
            assert!(decimal_span_id(&bad, "s").is_err(), "{bad}");
        }
        assert!(hex_span_id("00000000000000ff", "s").is_ok());
        assert!(hex_span_id("0000000000000000", "s").is_err());
        let (t, ns) = timestamp("2026-01-01T01:00:00.5+01:00", "t").unwrap();
        assert_eq!(t, "2026-01-01T00:00:00.5Z");
        assert_eq!(ns, 1_767_225_600_500_000_000);
        assert!(timestamp("yesterday", "t").is_err());
        // A huge bad value is cut in the message.
        let e = trace_id(&"x".repeat(10_000), "t").unwrap_err();
        assert!(e.message.len() < 300, "{}", e.message.len());
    }
}
