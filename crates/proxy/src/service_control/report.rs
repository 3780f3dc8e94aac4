//! `:report` contents: the signature that decides which requests share an operation
//! ([`SigRef`]), the per-signature [`Aggregate`] a request is merged into in O(1) (exact
//! counts and distributions; see [`super::aggregate`] for where aggregates live and the log
//! policy), and turning an aggregate into Service Control operations (labels, metrics, the
//! `endpoints_log` entries), so a burst of N identical requests costs one operation with
//! `request_count` N.
//!
//! The network half is at the end: `report_loop` drains the aggregator every flush interval
//! into a bounded queue of operations and sends them in batches (split under the request size
//! limit), keeping a batch that failed for network/5xx reasons for a retry with backoff.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use portico_servicecontrol::{
    labels, Distribution, ExponentialBuckets, HttpRequest, LogEntry, MetricValue, MetricValueSet,
    Operation, ReportRequest, ReportResponse,
};
use tokio::sync::{watch, Notify};

use super::{ApiKeyState, Inner};
use crate::dialect::{espv2_response_code_detail, espv2_service_control_status, Dialect};
use crate::error::{Code, ErrorKind};
use crate::outbound_auth::SERVICE_CONTROLLER;

/// Operation name ESP reports for requests that matched no method.
pub const UNKNOWN_OPERATION_NAME: &str = "<Unknown Operation Name>";
/// Log name of the per-request log entry.
pub const ENDPOINTS_LOG: &str = "endpoints_log";

/// Everything the report needs to know about one finished request. Owned, because it is
/// handed to the background aggregator after the response has been sent.
#[derive(Debug, Clone, Default)]
pub struct RequestRecord {
    /// ESPv2's log entry `trace` (`projects/P/traces/T`), traced or not; written at the flush.
    pub trace: Option<crate::trace::TraceName>,
    pub service_name: String,
    pub service_config_id: String,
    pub producer_project_id: String,
    /// The matched method's selector; `None` when no method matched.
    pub operation_name: Option<String>,
    pub api_name: String,
    pub api_version: String,
    /// The API key the request carried, if any.
    pub api_key: Option<String>,
    /// The check said the key is valid and the API enabled (the consumer is then reported).
    pub api_key_valid: bool,
    /// From the check's `consumerInfo`; adds the by-consumer operation.
    pub consumer_project_number: Option<i64>,
    /// The check failed at the network level (fail-open): `/credential_id` is `apikey:UNKNOWN`.
    pub check_network_failure: bool,
    /// Overrides the derived `/credential_id` (e.g. `jwtauth:issuer=...&audience=...`).
    pub credential_id: Option<String>,
    pub http_method: String,
    /// Raw request URI, query included.
    pub url: String,
    pub response_code: u16,
    /// Canonical code of a proxy-generated error; derived from `response_code` when `None`.
    pub status_code: Option<i32>,
    pub request_size: u64,
    pub response_size: u64,
    pub total_latency: Duration,
    /// `None` when the request never reached the backend.
    pub backend_latency: Option<Duration>,
    pub overhead_latency: Duration,
    pub caller_ip: Option<IpAddr>,
    pub referer: Option<String>,
    /// `DebugInfo.detail` of a proxy error (`service_control`, `auth`, ...).
    pub error_cause: Option<String>,
    /// Message of a proxy error.
    pub error_message: Option<String>,
    /// Frontend protocol: `http`, `https` or `grpc`.
    pub protocol: String,
    /// Backend protocol, reported only when it differs from the frontend's.
    pub backend_protocol: Option<String>,
    /// Configured `--log_request_headers` present on the request, as (name, value).
    pub request_headers: Vec<(String, String)>,
    pub response_headers: Vec<(String, String)>,
    /// `path=value;` pairs from `--log_jwt_payloads`.
    pub jwt_payloads: Option<String>,
    /// When the request arrived; `now - total_latency` when `None`.
    pub start_time: Option<SystemTime>,
    /// Whose report this request makes: ESP's fields or ESPv2's.
    pub dialect: Dialect,
    /// What `:check` made of the key (ESPv2's `api_key_state`).
    pub api_key_state: ApiKeyState,
    /// `checkInfo.apiKeyUid` of the check, if it named one.
    pub api_key_uid: Option<String>,
    /// What the proxy's error stood for (`None`: no proxy error), for ESPv2's Service Control
    /// status and response code details.
    pub error_kind: Option<ErrorKind>,
    /// A gRPC call's `grpc-status` (ESPv2's `grpc_status_code` log field).
    pub grpc_status: Option<u32>,
    /// A streaming gRPC method's message counts and duration (ESP v1's streaming metrics).
    pub streaming: Option<StreamCounts>,
    /// Which of a long stream's reports this is (ESP v1); [`ReportPart::Whole`] for any other.
    pub part: ReportPart,
}

/// ESP v1 reports a long gRPC stream in parts (`request_handler.cc`
/// `AttemptIntermediateReport`, `proto.cc` metric tags): intermediate reports while it runs,
/// then a final one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReportPart {
    /// The call's only report.
    #[default]
    Whole,
    /// An intermediate report: only the bytes moved since the previous report (the record's
    /// `request_size`/`response_size` hold those deltas) and, in the first, `request_count`;
    /// no response code, latencies, sizes or log entry.
    Intermediate { first: bool },
    /// The final report of a stream that sent intermediate ones: everything but the
    /// producer and consumer `request_count` (the first intermediate report carried it), with
    /// the bytes not reported yet.
    Final {
        request_bytes_reported: u64,
        response_bytes_reported: u64,
    },
}

/// [`ReportPart`] without its numbers: what decides the operation's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum PartKind {
    Whole,
    Intermediate,
    Final,
}

impl ReportPart {
    fn kind(self) -> PartKind {
        match self {
            ReportPart::Whole => PartKind::Whole,
            ReportPart::Intermediate { .. } => PartKind::Intermediate,
            ReportPart::Final { .. } => PartKind::Final,
        }
    }
}

/// One streaming call's messages each way and how long it lasted.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StreamCounts {
    pub request_messages: u64,
    pub response_messages: u64,
    pub duration: Duration,
}

/// Labels that do not vary per request, fixed when the client is built.
#[derive(Debug, Clone)]
pub(crate) struct StaticLabels {
    pub(crate) service_agent: String,
    /// `servicecontrol.googleapis.com/user_agent`: `ESP`, or `ESPv2`.
    pub(crate) user_agent: &'static str,
    pub(crate) platform: String,
    pub(crate) location: String,
    /// The zone or region the metadata server named, if it was asked (ESPv2's log entries
    /// carry it as `location`).
    pub(crate) zone: Option<String>,
    /// ESPv2's `/credential_id` is the key's uid when the check named one.
    pub(crate) api_key_uid_reporting: bool,
}

fn rfc3339(t: SystemTime) -> String {
    let dt: time::OffsetDateTime = t.into();
    dt.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub(crate) fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// Distribution shapes ESP uses: time in seconds (29 buckets ×2 from 1 µs), sizes in bytes
/// (8 buckets ×10 from 1 B).
const TIME_BUCKETS: (i32, f64, f64) = (29, 2.0, 1e-6);
const SIZE_BUCKETS: (i32, f64, f64) = (8, 10.0, 1.0);

/// A distribution with no samples, in one of the shapes above.
fn empty_distribution((n, growth, scale): (i32, f64, f64)) -> Distribution {
    Distribution {
        count: 0,
        mean: 0.0,
        minimum: 0.0,
        maximum: 0.0,
        sum_of_squared_deviation: 0.0,
        bucket_counts: vec![0i64; n as usize + 2],
        exponential_buckets: Some(ExponentialBuckets {
            num_finite_buckets: n,
            growth_factor: growth,
            scale,
        }),
        linear_buckets: None,
        explicit_buckets: None,
    }
}

fn bucket_index(value: f64, (n, growth, scale): (i32, f64, f64)) -> usize {
    if value < scale {
        return 0;
    }
    // Bucket i (1..=n) holds [scale*g^(i-1), scale*g^i); the epsilon keeps exact powers
    // from falling one bucket short through rounding.
    let i = ((value / scale).ln() / growth.ln() + 1e-9).floor() as i64 + 1;
    i.clamp(1, i64::from(n) + 1) as usize
}

/// Adds one sample in O(1) (Welford's update), without allocating.
pub(crate) fn add_sample(d: &mut Distribution, value: f64, shape: (i32, f64, f64)) {
    let index = bucket_index(value, shape);
    if d.count == 0 {
        d.mean = value;
        d.minimum = value;
        d.maximum = value;
        d.sum_of_squared_deviation = 0.0;
    } else {
        let delta = value - d.mean;
        d.mean += delta / (d.count + 1) as f64;
        d.sum_of_squared_deviation += delta * (value - d.mean);
        d.minimum = d.minimum.min(value);
        d.maximum = d.maximum.max(value);
    }
    d.count += 1;
    if let Some(b) = d.bucket_counts.get_mut(index) {
        *b += 1;
    }
}

#[cfg(test)]
pub(crate) fn distribution(value: f64, shape: (i32, f64, f64)) -> Distribution {
    let mut d = empty_distribution(shape);
    add_sample(&mut d, value, shape);
    d
}

fn int_metric(name: &str, v: i64) -> MetricValueSet {
    MetricValueSet {
        metric_name: name.to_string(),
        metric_values: vec![MetricValue {
            int64_value: Some(v),
            ..Default::default()
        }],
    }
}

fn dist_metric(name: &str, d: Distribution) -> MetricValueSet {
    MetricValueSet {
        metric_name: name.to_string(),
        metric_values: vec![MetricValue {
            distribution_value: Some(d),
            ..Default::default()
        }],
    }
}

/// Which operation a metric family goes to. ESP sends `request_bytes`/`response_bytes` in
/// the producer and consumer forms only: there is no by-consumer variant of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Producer,
    Consumer,
    ByConsumer,
}

impl Form {
    fn prefix(self) -> &'static str {
        match self {
            Form::Producer => "serviceruntime.googleapis.com/api/producer/",
            Form::Consumer => "serviceruntime.googleapis.com/api/consumer/",
            Form::ByConsumer => "serviceruntime.googleapis.com/api/producer/by_consumer/",
        }
    }
}

/// The standard metric families of an aggregate in one form. Every request of an aggregate
/// has the same response code, so `error_count` is all or nothing.
fn standard_metrics(form: Form, a: &Aggregate, is_error: bool) -> Vec<MetricValueSet> {
    let prefix = form.prefix();
    // ESP tags the by-consumer request_count FINAL and the others START: a long stream's
    // final report has the former, its first intermediate report the latter.
    let requests = match form {
        Form::ByConsumer => a.count,
        _ => a.started,
    };
    let mut m = Vec::new();
    if requests > 0 {
        m.push(int_metric(&format!("{prefix}request_count"), requests));
    }
    if a.key.part == PartKind::Intermediate {
        push_bytes(&mut m, form, a);
        return m;
    }
    m.extend([
        dist_metric(&format!("{prefix}request_sizes"), a.request_sizes.clone()),
        dist_metric(&format!("{prefix}response_sizes"), a.response_sizes.clone()),
        dist_metric(
            &format!("{prefix}total_latencies"),
            a.total_latencies.clone(),
        ),
        dist_metric(
            &format!("{prefix}request_overhead_latencies"),
            a.overhead_latencies.clone(),
        ),
    ]);
    if a.backend_latencies.count > 0 {
        m.push(dist_metric(
            &format!("{prefix}backend_latencies"),
            a.backend_latencies.clone(),
        ));
    }
    if is_error {
        m.push(int_metric(&format!("{prefix}error_count"), a.count));
    }
    // ESP v1's streaming metrics, for streaming gRPC calls only (`service_control/proto.cc`).
    if form != Form::ByConsumer && a.streaming_durations.count > 0 {
        m.push(dist_metric(
            &format!("{prefix}streaming_request_message_counts"),
            a.streaming_request_messages.clone(),
        ));
        m.push(dist_metric(
            &format!("{prefix}streaming_response_message_counts"),
            a.streaming_response_messages.clone(),
        ));
        m.push(dist_metric(
            &format!("{prefix}streaming_durations"),
            a.streaming_durations.clone(),
        ));
    }
    push_bytes(&mut m, form, a);
    m
}

/// DELTA totals of the bytes moved, sent only when non-zero (as ESP's reports do).
fn push_bytes(m: &mut Vec<MetricValueSet>, form: Form, a: &Aggregate) {
    if form == Form::ByConsumer {
        return;
    }
    let prefix = form.prefix();
    if a.request_bytes > 0 {
        m.push(int_metric(
            &format!("{prefix}request_bytes"),
            a.request_bytes,
        ));
    }
    if a.response_bytes > 0 {
        m.push(int_metric(
            &format!("{prefix}response_bytes"),
            a.response_bytes,
        ));
    }
}

fn log_message(r: &RequestRecord) -> String {
    let Some(selector) = &r.operation_name else {
        return format!(
            "Endpoints management skipped for an unrecognized HTTP call: {} {}",
            r.http_method, r.url
        );
    };
    if r.response_code < 400 {
        return format!("Method: {selector}");
    }
    match (&r.error_message, r.status_code) {
        // A proxy-generated error: its canonical status and message.
        (Some(msg), code) => {
            let code = code.unwrap_or_else(|| Code::from_http_status(r.response_code).as_i32());
            format!(
                "Method: {selector} failed: {}: {msg}",
                Code::from_i32(code).name()
            )
        }
        // A backend error: the HTTP reason, e.g. FORBIDDEN.
        (None, _) => {
            let reason = http::StatusCode::from_u16(r.response_code)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("UNKNOWN")
                .to_ascii_uppercase()
                .replace([' ', '-'], "_");
            format!("Method: {selector} failed: {reason}")
        }
    }
}

fn header_list(h: &[(String, String)]) -> String {
    h.iter().map(|(k, v)| format!("{k}={v};")).collect()
}

/// When a request started and ended: from `start_time` when the pipeline gave one, else
/// `now` is taken as the end.
pub(crate) fn span(r: &RequestRecord, now: SystemTime) -> (SystemTime, SystemTime) {
    match r.start_time {
        Some(start) => (start, start.checked_add(r.total_latency).unwrap_or(start)),
        None => (now.checked_sub(r.total_latency).unwrap_or(now), now),
    }
}

/// The fields of a request that decide its operation's identity — service, config, consumer,
/// operation name and every label — borrowed from the record so that finding a request's
/// aggregate costs no allocation. Values are normalised so that requests producing the same
/// operation compare equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SigRef<'a> {
    dialect: Dialect,
    pub(crate) service_name: &'a str,
    pub(crate) service_config_id: &'a str,
    operation_name: Option<&'a str>,
    /// Non-empty keys only.
    api_key: Option<&'a str>,
    /// The key is reported as the consumer (valid, and the check did not fail open).
    consumer_valid: bool,
    network_failure: bool,
    credential_id: Option<&'a str>,
    /// The key's uid (ESPv2, verified keys only).
    api_key_uid: Option<&'a str>,
    protocol: &'a str,
    /// Only when it differs from `protocol` (otherwise no label).
    backend_protocol: Option<&'a str>,
    response_code: u16,
    status_code: i32,
    api_version: &'a str,
    /// Only with a valid consumer (otherwise no by-consumer operation).
    consumer_project: Option<i64>,
    part: PartKind,
}

impl<'a> SigRef<'a> {
    pub(crate) fn of(r: &'a RequestRecord) -> Self {
        if r.dialect == Dialect::EspV2 {
            return Self::espv2(r);
        }
        let api_key = r.api_key.as_deref().filter(|k| !k.is_empty());
        let network_failure = api_key.is_some() && r.check_network_failure;
        let consumer_valid = api_key.is_some() && r.api_key_valid && !r.check_network_failure;
        SigRef {
            dialect: Dialect::Esp,
            api_key_uid: None,
            service_name: &r.service_name,
            service_config_id: &r.service_config_id,
            operation_name: r.operation_name.as_deref(),
            api_key,
            consumer_valid,
            network_failure,
            credential_id: r.credential_id.as_deref(),
            protocol: &r.protocol,
            backend_protocol: r.backend_protocol.as_deref().filter(|bp| *bp != r.protocol),
            response_code: r.response_code,
            status_code: r
                .status_code
                .unwrap_or_else(|| Code::from_http_status(r.response_code).as_i32()),
            api_version: &r.api_version,
            consumer_project: r.consumer_project_number.filter(|_| consumer_valid),
            part: r.part.kind(),
        }
    }

    /// ESPv2's signature: a key that is not verified is in no label (only in the log entry,
    /// which is per request), so it does not split operations; `/status_code` is the Service
    /// Control status; the by-consumer operation follows the check's consumer project.
    fn espv2(r: &'a RequestRecord) -> Self {
        let verified = r.api_key_state == ApiKeyState::Verified;
        let api_key = r
            .api_key
            .as_deref()
            .filter(|k| !k.is_empty())
            .filter(|_| verified);
        SigRef {
            dialect: Dialect::EspV2,
            service_name: &r.service_name,
            service_config_id: &r.service_config_id,
            operation_name: r.operation_name.as_deref(),
            api_key,
            consumer_valid: api_key.is_some(),
            network_failure: false,
            credential_id: r.credential_id.as_deref(),
            api_key_uid: r
                .api_key_uid
                .as_deref()
                .filter(|u| !u.is_empty())
                .filter(|_| api_key.is_some()),
            protocol: &r.protocol,
            backend_protocol: r.backend_protocol.as_deref().filter(|bp| *bp != r.protocol),
            response_code: r.response_code,
            status_code: espv2_status_code(r.error_kind.as_ref()),
            api_version: &r.api_version,
            consumer_project: r.consumer_project_number.filter(|n| *n > 0),
            part: r.part.kind(),
        }
    }

    fn to_owned_key(self) -> SigKey {
        SigKey {
            dialect: self.dialect,
            api_key_uid: self.api_key_uid.map(Into::into),
            service_name: self.service_name.into(),
            service_config_id: self.service_config_id.into(),
            operation_name: self.operation_name.map(Into::into),
            api_key: self.api_key.map(Into::into),
            consumer_valid: self.consumer_valid,
            network_failure: self.network_failure,
            credential_id: self.credential_id.map(Into::into),
            protocol: self.protocol.into(),
            backend_protocol: self.backend_protocol.map(Into::into),
            response_code: self.response_code,
            status_code: self.status_code,
            api_version: self.api_version.into(),
            consumer_project: self.consumer_project,
            part: self.part,
        }
    }
}

/// The owned form of [`SigRef`], held by an aggregate (one allocation per signature, not per
/// request).
#[derive(Debug, Clone)]
pub(crate) struct SigKey {
    dialect: Dialect,
    api_key_uid: Option<Box<str>>,
    pub(crate) service_name: Arc<str>,
    pub(crate) service_config_id: Arc<str>,
    operation_name: Option<Box<str>>,
    api_key: Option<Box<str>>,
    consumer_valid: bool,
    network_failure: bool,
    credential_id: Option<Box<str>>,
    protocol: Box<str>,
    backend_protocol: Option<Box<str>>,
    response_code: u16,
    status_code: i32,
    api_version: Box<str>,
    consumer_project: Option<i64>,
    part: PartKind,
}

impl SigKey {
    pub(crate) fn as_ref(&self) -> SigRef<'_> {
        SigRef {
            dialect: self.dialect,
            api_key_uid: self.api_key_uid.as_deref(),
            service_name: &self.service_name,
            service_config_id: &self.service_config_id,
            operation_name: self.operation_name.as_deref(),
            api_key: self.api_key.as_deref(),
            consumer_valid: self.consumer_valid,
            network_failure: self.network_failure,
            credential_id: self.credential_id.as_deref(),
            protocol: &self.protocol,
            backend_protocol: self.backend_protocol.as_deref(),
            response_code: self.response_code,
            status_code: self.status_code,
            api_version: &self.api_version,
            consumer_project: self.consumer_project,
            part: self.part,
        }
    }

    fn is_error(&self) -> bool {
        self.response_code >= 400
    }

    fn selector(&self) -> &str {
        self.operation_name
            .as_deref()
            .unwrap_or(UNKNOWN_OPERATION_NAME)
    }

    fn consumer_id(&self) -> String {
        match &self.api_key {
            Some(k) if self.consumer_valid => format!("api_key:{k}"),
            _ => String::new(),
        }
    }
}

/// Every request of one signature since the last flush: exact counts and distributions
/// (merged in O(1) per request), the time span, and the `endpoints_log` entries kept under
/// the log policy (the records themselves; entries are built only when sent).
#[derive(Debug)]
pub(crate) struct Aggregate {
    pub(crate) key: SigKey,
    start: SystemTime,
    end: SystemTime,
    /// Records merged.
    count: i64,
    /// Calls begun among them (`request_count`): a long stream's first intermediate report
    /// counts its call, its other reports do not.
    started: i64,
    request_sizes: Distribution,
    response_sizes: Distribution,
    /// Sums behind `request_bytes` / `response_bytes` (saturating: a DELTA cannot wrap).
    request_bytes: i64,
    response_bytes: i64,
    total_latencies: Distribution,
    overhead_latencies: Distribution,
    /// Only requests that reached the backend.
    backend_latencies: Distribution,
    /// Only streaming gRPC calls (ESP v1's `streaming_*` metrics).
    streaming_request_messages: Distribution,
    streaming_response_messages: Distribution,
    streaming_durations: Distribution,
    /// Records whose log entry will be sent, `start_time` filled in.
    pub(crate) logs: Vec<RequestRecord>,
    /// The config's declared metrics and logs (`None`: send the standard set).
    pub(crate) filter: Option<Arc<ReportFilter>>,
}

impl Aggregate {
    pub(crate) fn new(key: SigRef<'_>, filter: Option<Arc<ReportFilter>>) -> Self {
        Aggregate {
            key: key.to_owned_key(),
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH,
            count: 0,
            started: 0,
            request_sizes: empty_distribution(SIZE_BUCKETS),
            response_sizes: empty_distribution(SIZE_BUCKETS),
            request_bytes: 0,
            response_bytes: 0,
            total_latencies: empty_distribution(TIME_BUCKETS),
            overhead_latencies: empty_distribution(TIME_BUCKETS),
            backend_latencies: empty_distribution(TIME_BUCKETS),
            streaming_request_messages: empty_distribution(SIZE_BUCKETS),
            streaming_response_messages: empty_distribution(SIZE_BUCKETS),
            streaming_durations: empty_distribution(TIME_BUCKETS),
            logs: Vec::new(),
            filter,
        }
    }

    /// Whether the config wants `endpoints_log` entries at all.
    pub(crate) fn wants_logs(&self) -> bool {
        // ESP writes a stream's log entry in its final report only.
        self.key.part != PartKind::Intermediate
            && self.filter.as_ref().is_none_or(|f| f.endpoints_log)
    }

    /// Merges one request's metrics: O(1), no allocation.
    pub(crate) fn add(&mut self, r: &RequestRecord, (start, end): (SystemTime, SystemTime)) {
        if self.count == 0 || start < self.start {
            self.start = start;
        }
        if self.count == 0 || end > self.end {
            self.end = end;
        }
        self.count += 1;
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let (request_bytes, response_bytes) = match r.part {
            ReportPart::Whole => {
                self.started += 1;
                (r.request_size, r.response_size)
            }
            ReportPart::Intermediate { first } => {
                self.started += i64::from(first);
                self.request_bytes = self.request_bytes.saturating_add(clamp(r.request_size));
                self.response_bytes = self.response_bytes.saturating_add(clamp(r.response_size));
                return;
            }
            ReportPart::Final {
                request_bytes_reported,
                response_bytes_reported,
            } => (
                r.request_size.saturating_sub(request_bytes_reported),
                r.response_size.saturating_sub(response_bytes_reported),
            ),
        };
        add_sample(&mut self.request_sizes, r.request_size as f64, SIZE_BUCKETS);
        add_sample(
            &mut self.response_sizes,
            r.response_size as f64,
            SIZE_BUCKETS,
        );
        self.request_bytes = self.request_bytes.saturating_add(clamp(request_bytes));
        self.response_bytes = self.response_bytes.saturating_add(clamp(response_bytes));
        add_sample(
            &mut self.total_latencies,
            r.total_latency.as_secs_f64(),
            TIME_BUCKETS,
        );
        add_sample(
            &mut self.overhead_latencies,
            r.overhead_latency.as_secs_f64(),
            TIME_BUCKETS,
        );
        match (r.backend_latency, self.key.dialect) {
            (Some(b), _) => {
                add_sample(&mut self.backend_latencies, b.as_secs_f64(), TIME_BUCKETS);
            }
            // ESPv2 counts a request that never reached the backend as 0 s of backend time.
            (None, Dialect::EspV2) => add_sample(&mut self.backend_latencies, 0.0, TIME_BUCKETS),
            (None, Dialect::Esp) => {}
        }
        if let Some(s) = &r.streaming {
            add_sample(
                &mut self.streaming_request_messages,
                s.request_messages as f64,
                SIZE_BUCKETS,
            );
            add_sample(
                &mut self.streaming_response_messages,
                s.response_messages as f64,
                SIZE_BUCKETS,
            );
            add_sample(
                &mut self.streaming_durations,
                s.duration.as_secs_f64(),
                TIME_BUCKETS,
            );
        }
    }

    #[cfg(test)]
    pub(crate) fn count(&self) -> i64 {
        self.count
    }

    /// The operation(s) for this aggregate: the main one (with the kept log entries), plus
    /// the by-consumer one when the check identified the consumer project; then the config's
    /// declarations applied.
    pub(crate) fn operations(&self, statics: &StaticLabels) -> Vec<Operation> {
        if self.key.dialect == Dialect::EspV2 {
            return self.espv2_operations(statics);
        }
        let k = &self.key;
        let is_error = k.is_error();
        let selector = k.selector();
        let consumer_id = k.consumer_id();

        let mut l = BTreeMap::new();
        l.insert(
            labels::SERVICE_AGENT.to_string(),
            statics.service_agent.clone(),
        );
        l.insert(labels::USER_AGENT.to_string(), "ESP".to_string());
        l.insert(labels::PLATFORM.to_string(), statics.platform.clone());
        l.insert(labels::LOCATION.to_string(), statics.location.clone());
        l.insert(labels::PROTOCOL.to_string(), k.protocol.to_string());
        // An intermediate report is sent before the call has a status.
        let intermediate = k.part == PartKind::Intermediate;
        if !intermediate {
            l.insert(
                labels::RESPONSE_CODE.to_string(),
                k.response_code.to_string(),
            );
            l.insert(
                labels::RESPONSE_CODE_CLASS.to_string(),
                format!("{}xx", k.response_code / 100),
            );
            l.insert(labels::STATUS_CODE.to_string(), k.status_code.to_string());
        }
        if is_error && !intermediate {
            l.insert(
                labels::ERROR_TYPE.to_string(),
                format!("{}xx", k.response_code / 100),
            );
        }
        let credential_id = match (&k.credential_id, &k.api_key) {
            (Some(c), _) => Some(c.to_string()),
            (None, Some(_)) if k.network_failure => Some("apikey:UNKNOWN".to_string()),
            (None, Some(key)) => Some(format!("apikey:{key}")),
            (None, None) => None,
        };
        if let Some(c) = credential_id {
            l.insert(labels::CREDENTIAL_ID.to_string(), c);
        }
        if k.operation_name.is_some() {
            l.insert(labels::API_METHOD.to_string(), selector.to_string());
        }
        if !k.api_version.is_empty() {
            l.insert(labels::API_VERSION.to_string(), k.api_version.to_string());
        }
        if let Some(bp) = &k.backend_protocol {
            l.insert(
                "servicecontrol.googleapis.com/backend_protocol".to_string(),
                bp.to_string(),
            );
        }

        let mut metrics = standard_metrics(Form::Producer, self, is_error);
        if !consumer_id.is_empty() {
            metrics.extend(standard_metrics(Form::Consumer, self, is_error));
        }
        let log_entries = if self.wants_logs() {
            self.logs.iter().map(|r| log_entry(r, statics)).collect()
        } else {
            Vec::new()
        };
        let operation_id = uuid::Uuid::new_v4().to_string();
        let (start, end) = (rfc3339(self.start), rfc3339(self.end));
        let main = Operation {
            operation_id: operation_id.clone(),
            operation_name: selector.to_string(),
            consumer_id: consumer_id.clone(),
            start_time: start.clone(),
            end_time: end.clone(),
            labels: l.clone(),
            metric_value_sets: metrics,
            log_entries,
            importance: String::new(),
        };
        let mut ops = vec![main];
        // The by-consumer metrics are all FINAL in ESP: an intermediate report has none.
        if let (Some(project), false) = (k.consumer_project, intermediate) {
            let mut bl = l;
            bl.insert(labels::CONSUMER_PROJECT.to_string(), project.to_string());
            ops.push(Operation {
                operation_id: format!("{operation_id}1"),
                operation_name: selector.to_string(),
                consumer_id,
                start_time: start,
                end_time: end,
                labels: bl,
                metric_value_sets: standard_metrics(Form::ByConsumer, self, is_error),
                log_entries: Vec::new(),
                importance: String::new(),
            });
        }
        if let Some(f) = &self.filter {
            f.apply(&mut ops);
        }
        ops
    }
}

/// The `endpoints_log` entry of one request.
fn log_entry(r: &RequestRecord, statics: &StaticLabels) -> LogEntry {
    let (_, end) = span(r, SystemTime::now());
    let status_code = r
        .status_code
        .unwrap_or_else(|| Code::from_http_status(r.response_code).as_i32());
    let is_error = r.response_code >= 400;
    let selector = r
        .operation_name
        .as_deref()
        .unwrap_or(UNKNOWN_OPERATION_NAME);
    let api_key = r.api_key.as_deref().filter(|k| !k.is_empty());
    let mut payload = serde_json::Map::new();
    let ts = end
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let mut put = |k: &str, v: serde_json::Value| {
        payload.insert(k.to_string(), v);
    };
    put("timestamp", serde_json::json!(ts));
    put("service_config_id", r.service_config_id.clone().into());
    put("service_agent", statics.service_agent.clone().into());
    put("producer_project_id", r.producer_project_id.clone().into());
    if let Some(k) = api_key {
        put("api_key", k.into());
    }
    if let Some(rf) = &r.referer {
        put("referer", rf.clone().into());
    }
    put("api_name", r.api_name.clone().into());
    put("api_version", r.api_version.clone().into());
    put("url", r.url.clone().into());
    put("api_method", selector.into());
    put("location", statics.location.clone().into());
    put("log_message", log_message(r).into());
    if let Some(j) = &r.jwt_payloads {
        put("jwt_payloads", j.clone().into());
    }
    put("http_response_code", r.response_code.into());
    put("request_size_in_bytes", r.request_size.into());
    if !r.request_headers.is_empty() {
        put("request_headers", header_list(&r.request_headers).into());
    }
    put("response_size_in_bytes", r.response_size.into());
    if !r.response_headers.is_empty() {
        put("response_headers", header_list(&r.response_headers).into());
    }
    put(
        "request_latency_in_ms",
        (r.total_latency.as_millis() as u64).into(),
    );
    put("http_method", r.http_method.clone().into());
    if let Some(ip) = r.caller_ip {
        put("client_ip", ip.to_string().into());
    }
    if is_error {
        let cause = r.error_cause.clone().unwrap_or_else(|| {
            // No proxy error: the backend answered with this status.
            if Code::from_i32(status_code).http_status() >= 400 {
                "application".to_string()
            } else {
                String::new()
            }
        });
        put("error_cause", cause.into());
    }
    LogEntry {
        name: ENDPOINTS_LOG.to_string(),
        timestamp: rfc3339(end),
        severity: if is_error { "ERROR" } else { "INFO" }.to_string(),
        struct_payload: Some(payload),
        ..Default::default()
    }
}

/// ESPv2's `/status_code`: the code of the status its Service Control filter ended the
/// request with; 0 (OK) when that filter let it through, whatever happened next.
fn espv2_status_code(kind: Option<&ErrorKind>) -> i32 {
    kind.and_then(espv2_service_control_status)
        .map_or(0, |(code, _)| code.as_i32())
}

/// ESPv2's protocol names: `grpc`, or `http` for everything else (it does not tell TLS apart).
fn espv2_protocol(protocol: &str) -> &str {
    if protocol == "grpc" {
        "grpc"
    } else {
        "http"
    }
}

/// A latency as ESPv2 logs it: whole milliseconds, as a proto3 JSON duration (`0.012s`).
fn duration_ms(d: Duration) -> String {
    let ms = d.as_millis();
    let (secs, frac) = (ms / 1000, ms % 1000);
    if frac == 0 {
        format!("{secs}s")
    } else {
        format!("{secs}.{frac:03}s")
    }
}

/// ESPv2's metrics: no `error_count` and no `*_bytes`; the consumer form has no backend or
/// overhead latencies (ESPv2's `supported_metrics`).
fn espv2_metrics(form: Form, a: &Aggregate) -> Vec<MetricValueSet> {
    let prefix = form.prefix();
    let mut m = vec![
        int_metric(&format!("{prefix}request_count"), a.count),
        dist_metric(&format!("{prefix}request_sizes"), a.request_sizes.clone()),
        dist_metric(&format!("{prefix}response_sizes"), a.response_sizes.clone()),
        dist_metric(
            &format!("{prefix}total_latencies"),
            a.total_latencies.clone(),
        ),
    ];
    if form != Form::Consumer {
        m.push(dist_metric(
            &format!("{prefix}backend_latencies"),
            a.backend_latencies.clone(),
        ));
        m.push(dist_metric(
            &format!("{prefix}request_overhead_latencies"),
            a.overhead_latencies.clone(),
        ));
    }
    m
}

impl Aggregate {
    /// ESPv2's operations (its `RequestBuilder::FillReportRequest`): the main one with the log
    /// entries, and the by-consumer one when the check named the consumer's project.
    fn espv2_operations(&self, statics: &StaticLabels) -> Vec<Operation> {
        let k = &self.key;
        let selector = k.selector();
        let consumer_id = k.consumer_id();
        let mut l = BTreeMap::new();
        let mut put = |key: &str, value: String| {
            l.insert(key.to_string(), value);
        };
        put(labels::SERVICE_AGENT, statics.service_agent.clone());
        put(labels::USER_AGENT, statics.user_agent.to_string());
        put(labels::PLATFORM, statics.platform.clone());
        put(labels::LOCATION, statics.location.clone());
        put(labels::PROTOCOL, espv2_protocol(&k.protocol).to_string());
        put(labels::RESPONSE_CODE, k.response_code.to_string());
        put(
            labels::RESPONSE_CODE_CLASS,
            format!("{}xx", k.response_code / 100 % 10),
        );
        put(labels::STATUS_CODE, k.status_code.to_string());
        if k.is_error() {
            put(
                labels::ERROR_TYPE,
                format!("{}xx", k.response_code / 100 % 10),
            );
        }
        // A verified key names the caller (by its uid when the check gave one); otherwise the
        // JWT does, if there was one.
        let credential = match (&k.api_key, &k.api_key_uid) {
            (Some(_), Some(uid)) if statics.api_key_uid_reporting => Some(uid.to_string()),
            (Some(key), _) => Some(format!("apikey:{key}")),
            (None, _) => k.credential_id.as_deref().map(str::to_string),
        };
        if let Some(c) = credential {
            put(labels::CREDENTIAL_ID, c);
        }
        put(labels::API_METHOD, selector.to_string());
        if !k.api_version.is_empty() {
            put(labels::API_VERSION, k.api_version.to_string());
        }
        if let Some(bp) = &k.backend_protocol {
            put(
                "servicecontrol.googleapis.com/backend_protocol",
                bp.to_string(),
            );
        }

        let mut metrics = espv2_metrics(Form::Producer, self);
        if !consumer_id.is_empty() {
            metrics.extend(espv2_metrics(Form::Consumer, self));
        }
        let log_entries = if self.wants_logs() {
            self.logs
                .iter()
                .map(|r| espv2_log_entry(r, statics))
                .collect()
        } else {
            Vec::new()
        };
        let operation_id = uuid::Uuid::new_v4().to_string();
        let (start, end) = (rfc3339(self.start), rfc3339(self.end));
        let mut ops = vec![Operation {
            operation_id: operation_id.clone(),
            operation_name: selector.to_string(),
            consumer_id: consumer_id.clone(),
            start_time: start.clone(),
            end_time: end.clone(),
            labels: l.clone(),
            metric_value_sets: metrics,
            log_entries,
            importance: String::new(),
        }];
        if let Some(project) = k.consumer_project {
            l.insert(labels::CONSUMER_PROJECT.to_string(), project.to_string());
            ops.push(Operation {
                operation_id: format!("{operation_id}1"),
                operation_name: selector.to_string(),
                consumer_id,
                start_time: start,
                end_time: end,
                labels: l,
                metric_value_sets: espv2_metrics(Form::ByConsumer, self),
                log_entries: Vec::new(),
                importance: String::new(),
            });
        }
        if let Some(f) = &self.filter {
            f.apply(&mut ops);
        }
        ops
    }
}

/// ESPv2's `endpoints_log` entry of one request (its `FillLogEntry`): the request in
/// `httpRequest`, ESPv2's payload fields.
fn espv2_log_entry(r: &RequestRecord, statics: &StaticLabels) -> LogEntry {
    let (_, end) = span(r, SystemTime::now());
    let selector = r
        .operation_name
        .as_deref()
        .unwrap_or(UNKNOWN_OPERATION_NAME);
    let ts = end
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let mut payload = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        payload.insert(k.to_string(), v);
    };
    let non_empty = |v: &str| (!v.is_empty()).then(|| v.to_string());
    put("timestamp", serde_json::json!(ts));
    put("service_config_id", r.service_config_id.clone().into());
    put("service_agent", statics.service_agent.clone().into());
    put("api_key_state", r.api_key_state.as_str().into());
    put("http_status_code", r.response_code.into());
    if let Some(code) = r.grpc_status {
        put(
            "grpc_status_code",
            crate::grpc::status_name(code).into_owned().into(),
        );
    }
    put(
        "response_code_detail",
        espv2_response_code_detail(r.error_kind.as_ref())
            .into_owned()
            .into(),
    );
    if let Some(p) = non_empty(&r.producer_project_id) {
        put("producer_project_id", p.into());
    }
    if let Some(k) = r.api_key.as_deref().and_then(non_empty) {
        put("api_key", k.into());
    }
    if let Some(n) = non_empty(&r.api_name) {
        put("api_name", n.into());
    }
    if let Some(v) = non_empty(&r.api_version) {
        put("api_version", v.into());
    }
    put("api_method", selector.into());
    if let Some(zone) = &statics.zone {
        put("location", zone.clone().into());
    }
    put("log_message", format!("{selector} is called").into());
    if !r.request_headers.is_empty() {
        put("request_headers", header_list(&r.request_headers).into());
    }
    if !r.response_headers.is_empty() {
        put("response_headers", header_list(&r.response_headers).into());
    }
    if let Some(j) = r.jwt_payloads.as_deref().and_then(non_empty) {
        put("jwt_payloads", j.into());
    }
    if let Some((_, message)) = r
        .error_kind
        .as_ref()
        .and_then(espv2_service_control_status)
        .filter(|(_, m)| !m.is_empty())
    {
        put("error_cause", message.into_owned().into());
    }
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    LogEntry {
        name: ENDPOINTS_LOG.to_string(),
        timestamp: rfc3339(end),
        severity: if r.response_code >= 400 {
            "ERROR"
        } else {
            "INFO"
        }
        .to_string(),
        trace: r
            .trace
            .as_ref()
            .map(crate::trace::TraceName::to_name)
            .unwrap_or_default(),
        struct_payload: Some(payload),
        http_request: Some(HttpRequest {
            request_method: r.http_method.clone(),
            request_url: r.url.clone(),
            request_size: clamp(r.request_size),
            status: i32::from(r.response_code),
            response_size: clamp(r.response_size),
            remote_ip: r.caller_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            referer: r.referer.clone().unwrap_or_default(),
            latency: duration_ms(r.total_latency),
            protocol: espv2_protocol(&r.protocol).to_string(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The operation(s) one request alone makes (an aggregate of one, its log kept).
#[cfg(test)]
pub(crate) fn operations_for(r: &RequestRecord, statics: &StaticLabels) -> Vec<Operation> {
    let times = span(r, SystemTime::now());
    let mut a = Aggregate::new(SigRef::of(r), None);
    a.add(r, times);
    let mut kept = r.clone();
    kept.start_time = Some(times.0);
    a.logs.push(kept);
    a.operations(statics)
}
/// Which of the proxy's metrics and logs a service config asks for. ESP reports only what
/// the config declares in `logging` / `monitoring` destinations (generated configs declare
/// the standard set), so a config without them gets bare operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReportFilter {
    pub(crate) endpoints_log: bool,
    metrics: std::collections::HashSet<String>,
}

impl ReportFilter {
    pub(crate) fn from_service(service: &portico_config::Service) -> Self {
        let endpoints_log = service.logging.as_ref().is_some_and(|l| {
            l.producer_destinations
                .iter()
                .chain(&l.consumer_destinations)
                .any(|d| d.logs.iter().any(|n| n == ENDPOINTS_LOG))
        });
        let metrics = service
            .monitoring
            .as_ref()
            .map(|m| {
                m.producer_destinations
                    .iter()
                    .chain(&m.consumer_destinations)
                    .flat_map(|d| d.metrics.iter().cloned())
                    .collect()
            })
            .unwrap_or_default();
        ReportFilter {
            endpoints_log,
            metrics,
        }
    }

    /// Strips undeclared metrics and logs; an extra (by-consumer) operation left with no
    /// metrics is dropped, the main operation is always kept.
    pub(crate) fn apply(&self, ops: &mut Vec<Operation>) {
        for op in ops.iter_mut() {
            op.metric_value_sets
                .retain(|m| self.metrics.contains(&m.metric_name));
            if !self.endpoints_log {
                op.log_entries.clear();
            }
        }
        let mut first = true;
        ops.retain(|op| {
            let keep = first || !op.metric_value_sets.is_empty();
            first = false;
            keep
        });
    }
}

/// An operation waiting to be sent, with its service and config id.
pub(super) type QueuedOp = (Arc<str>, Arc<str>, Operation);

impl Inner {
    /// Takes every aggregate, turns each into its operation(s) and moves them to the send
    /// queue (enforcing the buffer bound). Runs once per flush, so its cost is per signature.
    fn drain_aggregated(&self) {
        let mut ready: Vec<QueuedOp> = Vec::new();
        for agg in self.aggregator.take() {
            let service = agg.key.service_name.clone();
            let config = agg.key.service_config_id.clone();
            for op in agg.operations(&self.statics) {
                ready.push((service.clone(), config.clone(), op));
            }
        }
        let Ok(mut queue) = self.reports.lock() else {
            return;
        };
        queue.extend(ready);
        let limit = self.opts.report_buffer_operations.max(1);
        let mut dropped = 0u64;
        while queue.len() > limit {
            queue.pop_front();
            dropped += 1;
        }
        if dropped > 0 {
            self.stats.dropped_report_operations.inc_by(dropped);
            tracing::warn!(dropped, "report buffer full; dropped the oldest operations");
        }
        self.stats.report_queue_depth.set(queue.len() as i64);
    }

    /// The declared-metrics filter for `config_id`, if the configs in force are known and
    /// one of them (now or earlier) has this id.
    pub(super) fn report_filter(&self, config_id: &str) -> Option<Arc<ReportFilter>> {
        let configs = self.opts.service_configs.as_ref()?;
        let mut filters = self.report_filters.lock().ok()?;
        if let Some(f) = filters.get(config_id) {
            return Some(f.clone());
        }
        let rollout = configs.borrow().clone();
        let service = rollout
            .configs
            .iter()
            .find(|(s, _)| s.id == config_id)
            .map(|(s, _)| s.clone())?;
        let filter = Arc::new(ReportFilter::from_service(&service));
        filters.insert(config_id.to_string(), filter.clone());
        Some(filter)
    }

    /// Up to `max` queued operations for the same service and config, oldest first.
    fn next_batch(&self) -> Option<(Arc<str>, Arc<str>, Vec<Operation>)> {
        let mut queue = self.reports.lock().ok()?;
        let (service, config) = {
            let (s, c, _) = queue.front()?;
            (s.clone(), c.clone())
        };
        let max = self.opts.report_max_operations_per_request.max(1);
        let mut ops = Vec::new();
        let mut rest = VecDeque::with_capacity(queue.len());
        while let Some(item) = queue.pop_front() {
            if ops.len() < max && item.0 == service && item.1 == config {
                ops.push(item.2);
            } else {
                rest.push_back(item);
            }
        }
        *queue = rest;
        Some((service, config, ops))
    }

    fn requeue_front(&self, service: Arc<str>, config: Arc<str>, ops: Vec<Operation>) {
        if let Ok(mut queue) = self.reports.lock() {
            for op in ops.into_iter().rev() {
                queue.push_front((service.clone(), config.clone(), op));
            }
            self.stats.report_queue_depth.set(queue.len() as i64);
        }
    }

    /// Sends everything queued. Returns `false` if the control plane was unavailable (the
    /// failed batch is back at the front of the queue).
    async fn send_queued(&self) -> bool {
        while let Some((service, config, mut ops)) = self.next_batch() {
            let (request, payload) = loop {
                let request = ReportRequest {
                    operations: ops,
                    service_config_id: config.to_string(),
                };
                let payload = match serde_json::to_vec(&request) {
                    Ok(p) => p,
                    Err(e) => {
                        // Cannot happen for these types; dropping beats retrying forever.
                        self.stats
                            .dropped_report_operations
                            .inc_by(request.operations.len() as u64);
                        tracing::error!(error = %e, "cannot encode a report");
                        break (request, Vec::new());
                    }
                };
                // Operations full of log entries make large bodies; halve the batch until it
                // fits under the request size limit (the rest goes back to the queue front).
                ops = request.operations;
                if payload.len() > self.opts.report_max_request_bytes && ops.len() > 1 {
                    let tail = ops.split_off(ops.len() / 2);
                    self.requeue_front(service.clone(), config.clone(), tail);
                    continue;
                }
                break (
                    ReportRequest {
                        operations: ops,
                        service_config_id: config.to_string(),
                    },
                    payload,
                );
            };
            if payload.is_empty() {
                continue;
            }
            let n = request.operations.len() as u64;
            let size = payload.len() as i64;
            let result: Result<ReportResponse, _> = self
                .transport
                .call_encoded(
                    &service,
                    "report",
                    SERVICE_CONTROLLER,
                    payload,
                    self.opts.report_timeout,
                    self.opts.report_retries,
                    // Envoy sends reports with no span: no trace context.
                    None,
                )
                .await;
            match result {
                Ok(resp) => {
                    if self.opts.report_cache_entries == 0 {
                        self.stats.send_reports_in_flight.inc();
                    } else {
                        self.stats.send_reports_by_flush.inc();
                    }
                    if size > self.stats.max_report_size.get() {
                        self.stats.max_report_size.set(size);
                    }
                    self.stats.send_report_operations.inc_by(n);
                    self.saw_rollout(&resp.service_rollout_id);
                    for e in &resp.report_errors {
                        tracing::warn!(
                            operation_id = %e.operation_id,
                            code = e.status.code,
                            message = %e.status.message,
                            "Service Control rejected a report operation"
                        );
                    }
                }
                Err(failure) if failure.is_transient() => {
                    self.stats.report_failures.inc();
                    tracing::warn!(%service, error = %failure, operations = n, "Service control report failed; will retry");
                    self.requeue_front(service, config, request.operations);
                    return false;
                }
                Err(failure) => {
                    // 4xx or garbage: resending the same body cannot succeed.
                    self.stats.report_failures.inc();
                    self.stats.dropped_report_operations.inc_by(n);
                    tracing::error!(%service, error = %failure, operations = n, "Service control report failed; operations dropped");
                }
            }
        }
        if let Ok(queue) = self.reports.lock() {
            self.stats.report_queue_depth.set(queue.len() as i64);
        }
        true
    }
}

/// Flushes reports every interval (or when woken), with backoff while the control plane is
/// unavailable; on shutdown makes one last attempt and exits.
pub(super) async fn report_loop(
    inner: Weak<Inner>,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut retry_at: Option<Instant> = None;
    let mut backoff = Duration::ZERO;
    // Set when every handle is gone without shutdown(): flush once more, then stop.
    let mut closed = false;
    loop {
        let interval = match inner.upgrade() {
            Some(i) => i.opts.report_flush_interval,
            None => return,
        };
        if !closed && !*shutdown.borrow() {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = wake.notified() => {}
                r = shutdown.changed() => closed = r.is_err(),
            }
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let stopping = closed || *shutdown.borrow();
        inner.drain_aggregated();
        if !stopping && retry_at.is_some_and(|t| Instant::now() < t) {
            continue;
        }
        if inner.send_queued().await {
            retry_at = None;
            backoff = Duration::ZERO;
        } else {
            backoff = if backoff.is_zero() {
                inner.opts.report_retry_initial_backoff
            } else {
                (backoff * 2).min(inner.opts.report_retry_max_backoff)
            };
            retry_at = Some(Instant::now() + backoff);
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
pub(crate) fn test_statics() -> StaticLabels {
    StaticLabels {
        service_agent: "ESP/portico-test".into(),
        user_agent: "ESP",
        platform: "unknown".into(),
        location: "global".into(),
        zone: None,
        api_key_uid_reporting: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statics() -> StaticLabels {
        test_statics()
    }

    fn record() -> RequestRecord {
        RequestRecord {
            service_name: "s".into(),
            service_config_id: "c1".into(),
            operation_name: Some("1.echo.Echo".into()),
            api_key: Some("KEY".into()),
            api_key_valid: true,
            http_method: "POST".into(),
            url: "/echo?key=KEY".into(),
            response_code: 200,
            request_size: 120,
            response_size: 1500,
            total_latency: Duration::from_millis(3),
            backend_latency: Some(Duration::from_millis(2)),
            overhead_latency: Duration::from_millis(1),
            protocol: "http".into(),
            ..Default::default()
        }
    }

    #[test]
    fn buckets_follow_esp_shapes() {
        let d = distribution(150.0, SIZE_BUCKETS);
        assert_eq!(d.bucket_counts.len(), 10);
        assert_eq!(d.bucket_counts[3], 1, "100 <= 150 < 1000");
        assert_eq!(distribution(0.0, SIZE_BUCKETS).bucket_counts[0], 1);
        assert_eq!(distribution(1e12, SIZE_BUCKETS).bucket_counts[9], 1);
        assert_eq!(distribution(10.0, SIZE_BUCKETS).bucket_counts[2], 1);
        let t = distribution(0.003, TIME_BUCKETS);
        assert_eq!(t.bucket_counts.len(), 31);
        // 3 ms = 3000 µs: 2^11 = 2048 <= 3000 < 4096.
        assert_eq!(t.bucket_counts[12], 1);
    }

    #[test]
    fn samples_added_one_by_one_match_direct_statistics() {
        let values = [1.0, 5.0, 20.0, 300.0];
        let mut d = empty_distribution(SIZE_BUCKETS);
        for v in values {
            add_sample(&mut d, v, SIZE_BUCKETS);
        }
        let mean = values.iter().sum::<f64>() / 4.0;
        let ssd: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
        assert_eq!(d.count, 4);
        assert!((d.mean - mean).abs() < 1e-9);
        assert!((d.sum_of_squared_deviation - ssd).abs() < 1e-6);
        assert_eq!((d.minimum, d.maximum), (1.0, 300.0));
        assert_eq!(d.bucket_counts.iter().sum::<i64>(), 4);
    }

    #[test]
    fn operation_labels_metrics_and_log() {
        let mut r = record();
        r.consumer_project_number = Some(123);
        let ops = operations_for(&r, &statics());
        assert_eq!(ops.len(), 2, "main + by-consumer");
        let op = &ops[0];
        assert_eq!(op.operation_name, "1.echo.Echo");
        assert_eq!(op.consumer_id, "api_key:KEY");
        assert_eq!(op.labels["/response_code"], "200");
        assert_eq!(op.labels["/response_code_class"], "2xx");
        assert_eq!(op.labels["/status_code"], "0");
        assert_eq!(op.labels["/credential_id"], "apikey:KEY");
        assert!(!op.labels.contains_key("/error_type"));
        let names: Vec<&str> = op
            .metric_value_sets
            .iter()
            .map(|m| m.metric_name.as_str())
            .collect();
        assert!(names.contains(&"serviceruntime.googleapis.com/api/producer/request_count"));
        assert!(names.contains(&"serviceruntime.googleapis.com/api/consumer/request_count"));
        assert!(!names.iter().any(|n| n.ends_with("error_count")));
        let log = &op.log_entries[0];
        assert_eq!(log.name, "endpoints_log");
        assert_eq!(log.severity, "INFO");
        let p = log.struct_payload.as_ref().expect("payload");
        assert_eq!(p["log_message"], "Method: 1.echo.Echo");
        assert_eq!(p["url"], "/echo?key=KEY");
        assert_eq!(p["http_response_code"], 200);
        assert_eq!(ops[1].operation_id, format!("{}1", op.operation_id));
        assert_eq!(
            ops[1].labels["serviceruntime.googleapis.com/consumer_project"],
            "123"
        );
    }

    /// ESP v1's parts of a long stream (`proto.cc` metric tags START/INTERMEDIATE/FINAL): two
    /// intermediate reports merged into one operation, then the final one.
    #[test]
    fn a_long_stream_is_reported_in_parts() {
        let metrics = |op: &Operation| -> BTreeMap<String, Option<i64>> {
            op.metric_value_sets
                .iter()
                .map(|m| (m.metric_name.clone(), m.metric_values[0].int64_value))
                .collect()
        };
        let p = "serviceruntime.googleapis.com/api/producer/";
        let c = "serviceruntime.googleapis.com/api/consumer/";
        let mut r = record();
        r.consumer_project_number = Some(123);
        let statics = statics();
        let now = SystemTime::now();
        let mut first = r.clone();
        first.part = ReportPart::Intermediate { first: true };
        (first.request_size, first.response_size) = (10, 100);
        let mut second = r.clone();
        second.part = ReportPart::Intermediate { first: false };
        (second.request_size, second.response_size) = (0, 50);
        assert_eq!(SigRef::of(&first), SigRef::of(&second));
        assert_ne!(SigRef::of(&first), SigRef::of(&r));
        let mut a = Aggregate::new(SigRef::of(&first), None);
        a.add(&first, span(&first, now));
        a.add(&second, span(&second, now));
        assert!(!a.wants_logs());
        let ops = a.operations(&statics);
        // No by-consumer operation: ESP's by-consumer metrics are all final ones.
        assert_eq!(ops.len(), 1);
        let op = &ops[0];
        for label in ["/response_code", "/response_code_class", "/status_code"] {
            assert!(!op.labels.contains_key(label), "{label}");
        }
        assert_eq!(op.labels["/credential_id"], "apikey:KEY");
        let want: BTreeMap<String, Option<i64>> = [
            (format!("{p}request_count"), Some(1)),
            (format!("{p}request_bytes"), Some(10)),
            (format!("{p}response_bytes"), Some(150)),
            (format!("{c}request_count"), Some(1)),
            (format!("{c}request_bytes"), Some(10)),
            (format!("{c}response_bytes"), Some(150)),
        ]
        .into_iter()
        .collect();
        assert_eq!(metrics(op), want);

        // The final report: no producer/consumer request_count, the bytes not yet reported,
        // the sizes whole; the by-consumer operation keeps its request_count.
        let mut last = r.clone();
        last.part = ReportPart::Final {
            request_bytes_reported: 10,
            response_bytes_reported: 150,
        };
        (last.request_size, last.response_size) = (70, 400);
        let ops = operations_for(&last, &statics);
        assert_eq!(ops.len(), 2);
        let m = metrics(&ops[0]);
        assert!(!m.contains_key(&format!("{p}request_count")));
        assert!(!m.contains_key(&format!("{c}request_count")));
        assert_eq!(m[&format!("{p}request_bytes")], Some(60));
        assert_eq!(m[&format!("{c}response_bytes")], Some(250));
        assert!(m.contains_key(&format!("{p}response_sizes")));
        assert_eq!(ops[0].labels["/response_code"], "200");
        assert_eq!(ops[0].log_entries.len(), 1);
        let by_consumer = metrics(&ops[1]);
        assert_eq!(
            by_consumer[&format!("{p}by_consumer/request_count")],
            Some(1)
        );
        // A final report claiming more than was sent does not underflow.
        last.part = ReportPart::Final {
            request_bytes_reported: u64::MAX,
            response_bytes_reported: u64::MAX,
        };
        let m = metrics(&operations_for(&last, &statics)[0]);
        assert!(!m.contains_key(&format!("{p}request_bytes")));
    }

    #[test]
    fn errors_and_unknown_operations() {
        let mut r = record();
        r.response_code = 403;
        r.status_code = Some(7);
        r.error_cause = Some("service_control".into());
        r.error_message = Some("API s is not enabled for the consumer project.".into());
        r.api_key_valid = false;
        let op = &operations_for(&r, &statics())[0];
        assert_eq!(op.consumer_id, "");
        assert_eq!(op.labels["/error_type"], "4xx");
        let p = op.log_entries[0].struct_payload.as_ref().expect("payload");
        assert_eq!(
            p["log_message"],
            "Method: 1.echo.Echo failed: PERMISSION_DENIED: API s is not enabled for the consumer project."
        );
        assert_eq!(p["error_cause"], "service_control");
        assert_eq!(op.log_entries[0].severity, "ERROR");

        let mut r = record();
        r.response_code = 403;
        let p = operations_for(&r, &statics())[0].log_entries[0]
            .struct_payload
            .clone()
            .expect("payload");
        assert_eq!(p["log_message"], "Method: 1.echo.Echo failed: FORBIDDEN");

        let mut r = record();
        r.operation_name = None;
        r.response_code = 404;
        r.check_network_failure = true;
        let op = &operations_for(&r, &statics())[0];
        assert_eq!(op.operation_name, UNKNOWN_OPERATION_NAME);
        assert_eq!(op.labels["/credential_id"], "apikey:UNKNOWN");
        let p = op.log_entries[0].struct_payload.as_ref().expect("payload");
        assert_eq!(
            p["log_message"],
            "Endpoints management skipped for an unrecognized HTTP call: POST /echo?key=KEY"
        );
    }

    #[test]
    fn identical_requests_share_a_signature_and_differing_ones_do_not() {
        let r = record();
        assert_eq!(SigRef::of(&r), SigRef::of(&r.clone()));
        let mut other = record();
        other.url = "/echo?key=KEY&x=1".into();
        other.total_latency = Duration::from_millis(9);
        assert_eq!(SigRef::of(&r), SigRef::of(&other), "not part of the labels");
        for change in [
            |r: &mut RequestRecord| r.response_code = 201,
            |r: &mut RequestRecord| r.api_key = Some("OTHER".into()),
            |r: &mut RequestRecord| r.api_key_valid = false,
            |r: &mut RequestRecord| r.credential_id = Some("jwtauth:x".into()),
            |r: &mut RequestRecord| r.operation_name = None,
            |r: &mut RequestRecord| r.service_config_id = "c2".into(),
            |r: &mut RequestRecord| r.consumer_project_number = Some(7),
        ] {
            let mut d = record();
            change(&mut d);
            assert_ne!(SigRef::of(&r), SigRef::of(&d));
        }
        let mut a = Aggregate::new(SigRef::of(&r), None);
        let now = SystemTime::now();
        a.add(&r, span(&r, now));
        a.add(&other, span(&other, now));
        let ops = a.operations(&statics());
        let count = ops[0]
            .metric_value_sets
            .iter()
            .find(|m| m.metric_name.ends_with("producer/request_count"))
            .and_then(|m| m.metric_values[0].int64_value);
        assert_eq!(count, Some(2));
        assert!(ops[0].log_entries.is_empty(), "no log kept, none sent");
    }

    fn int_of(op: &Operation, name: &str) -> Option<i64> {
        op.metric_value_sets
            .iter()
            .find(|m| m.metric_name == name)
            .and_then(|m| m.metric_values[0].int64_value)
    }

    #[test]
    fn request_and_response_bytes_are_summed_in_producer_and_consumer_forms_only() {
        use portico_servicecontrol::metrics as mn;
        let mut r = record();
        r.consumer_project_number = Some(123);
        let mut other = record();
        other.consumer_project_number = Some(123);
        other.request_size = 30;
        other.response_size = 0;
        let mut a = Aggregate::new(SigRef::of(&r), None);
        let now = SystemTime::now();
        a.add(&r, span(&r, now));
        a.add(&other, span(&other, now));
        let ops = a.operations(&statics());
        assert_eq!(int_of(&ops[0], mn::PRODUCER_REQUEST_BYTES), Some(150));
        assert_eq!(int_of(&ops[0], mn::CONSUMER_REQUEST_BYTES), Some(150));
        assert_eq!(int_of(&ops[0], mn::PRODUCER_RESPONSE_BYTES), Some(1500));
        assert_eq!(int_of(&ops[0], mn::CONSUMER_RESPONSE_BYTES), Some(1500));
        assert!(
            !ops[1]
                .metric_value_sets
                .iter()
                .any(|m| m.metric_name.ends_with("_bytes")),
            "no by-consumer form"
        );

        // Zero totals are not sent; no valid consumer, no consumer form.
        let mut r = record();
        r.response_size = 0;
        r.api_key_valid = false;
        r.request_size = u64::MAX;
        let mut a = Aggregate::new(SigRef::of(&r), None);
        a.add(&r, span(&r, now));
        a.add(&r, span(&r, now));
        let ops = a.operations(&statics());
        assert_eq!(
            int_of(&ops[0], mn::PRODUCER_REQUEST_BYTES),
            Some(i64::MAX),
            "saturates instead of wrapping"
        );
        assert_eq!(int_of(&ops[0], mn::PRODUCER_RESPONSE_BYTES), None);
        assert_eq!(int_of(&ops[0], mn::CONSUMER_REQUEST_BYTES), None);
    }

    #[test]
    fn config_declarations_select_metrics_and_logs() {
        let mut svc = portico_config::Service::default();
        let mut r = record();
        r.consumer_project_number = Some(9);
        // Nothing declared: bare main operation.
        let mut ops = operations_for(&r, &statics());
        ReportFilter::from_service(&svc).apply(&mut ops);
        assert_eq!(ops.len(), 1);
        assert!(ops[0].metric_value_sets.is_empty() && ops[0].log_entries.is_empty());

        svc.logging = Some(portico_config::service::Logging {
            producer_destinations: vec![portico_config::service::LoggingDestination {
                monitored_resource: "api".into(),
                logs: vec!["endpoints_log".into()],
            }],
            consumer_destinations: vec![],
        });
        svc.monitoring = Some(portico_config::service::Monitoring {
            producer_destinations: vec![portico_config::service::MonitoringDestination {
                monitored_resource: "api".into(),
                metrics: vec!["serviceruntime.googleapis.com/api/producer/request_count".into()],
            }],
            consumer_destinations: vec![],
        });
        let mut ops = operations_for(&r, &statics());
        ReportFilter::from_service(&svc).apply(&mut ops);
        assert_eq!(
            ops.len(),
            1,
            "by-consumer metrics undeclared: operation dropped"
        );
        let names: Vec<&str> = ops[0]
            .metric_value_sets
            .iter()
            .map(|m| m.metric_name.as_str())
            .collect();
        assert_eq!(
            names,
            ["serviceruntime.googleapis.com/api/producer/request_count"]
        );
        assert_eq!(ops[0].log_entries.len(), 1);
    }

    /// A config Portico generates from OpenAPI declares every metric the proxy sends, the byte
    /// totals included (Google's generated configs declare them in the producer and consumer
    /// forms), so a deployed `openapi.yaml` loses none of them to the filter.
    #[test]
    fn a_converted_openapi_config_keeps_every_metric_the_proxy_sends() {
        let spec = "swagger: '2.0'\ninfo: {title: T, version: 1.0.0}\nhost: t.endpoints.p.cloud.goog\npaths:\n  /e:\n    post:\n      operationId: e\n      responses: {'200': {description: ok}}\n";
        let svc = portico_config::convert(&[portico_config::SourceFile::new("openapi.yaml", spec)])
            .expect("converts")
            .service;
        let mut r = record();
        r.consumer_project_number = Some(9);
        let names = |ops: &[Operation]| -> Vec<Vec<String>> {
            ops.iter()
                .map(|o| {
                    o.metric_value_sets
                        .iter()
                        .map(|m| m.metric_name.clone())
                        .collect()
                })
                .collect()
        };
        let mut ops = operations_for(&r, &statics());
        let before = names(&ops);
        assert!(
            before[0]
                .iter()
                .any(|m| m.ends_with("/producer/request_bytes")),
            "{before:?}"
        );
        ReportFilter::from_service(&svc).apply(&mut ops);
        let after = names(&ops);
        assert_eq!(after, before);
    }

    fn espv2_statics() -> StaticLabels {
        StaticLabels {
            service_agent: "ESPv2/portico-test".into(),
            user_agent: "ESPv2",
            platform: "GKE(ESPv2)".into(),
            location: "us-east1-b".into(),
            zone: Some("us-east1-b".into()),
            api_key_uid_reporting: true,
        }
    }

    fn espv2_record() -> RequestRecord {
        RequestRecord {
            dialect: Dialect::EspV2,
            api_key_state: ApiKeyState::Verified,
            ..record()
        }
    }

    /// An operation as JSON with what changes per run (ids, times) taken out.
    fn normalized(ops: &[Operation]) -> serde_json::Value {
        let mut v = serde_json::to_value(ops).expect("json");
        for op in v.as_array_mut().expect("ops") {
            let op = op.as_object_mut().expect("op");
            for k in ["operationId", "startTime", "endTime"] {
                op.remove(k);
            }
            for e in op
                .get_mut("logEntries")
                .and_then(|l| l.as_array_mut())
                .into_iter()
                .flatten()
            {
                let e = e.as_object_mut().expect("entry");
                e.remove("timestamp");
                if let Some(p) = e.get_mut("structPayload").and_then(|p| p.as_object_mut()) {
                    // Keeps the other keys in their order.
                    p.shift_remove("timestamp");
                }
            }
        }
        v
    }

    /// ESP v1's report, whole: `portico espv2`'s fields never leak into `portico esp`'s.
    #[test]
    fn esp_v1_report_json_is_esps() {
        let mut r = record();
        r.consumer_project_number = Some(123);
        r.api_key_uid = Some("uid-1".into());
        r.api_key_state = ApiKeyState::Verified;
        r.error_kind = Some(ErrorKind::BackendTimeout);
        r.caller_ip = Some("10.0.0.1".parse().expect("ip"));
        let got = normalized(&operations_for(&r, &statics()));
        let dist = |v: f64, shape| serde_json::to_value(distribution(v, shape)).expect("d");
        let base = |prefix: &str, backend: bool| {
            let mut m = vec![
                serde_json::json!({"metricName": format!("{prefix}request_count"), "metricValues": [{"int64Value": "1"}]}),
                serde_json::json!({"metricName": format!("{prefix}request_sizes"), "metricValues": [{"distributionValue": dist(120.0, SIZE_BUCKETS)}]}),
                serde_json::json!({"metricName": format!("{prefix}response_sizes"), "metricValues": [{"distributionValue": dist(1500.0, SIZE_BUCKETS)}]}),
                serde_json::json!({"metricName": format!("{prefix}total_latencies"), "metricValues": [{"distributionValue": dist(0.003, TIME_BUCKETS)}]}),
                serde_json::json!({"metricName": format!("{prefix}request_overhead_latencies"), "metricValues": [{"distributionValue": dist(0.001, TIME_BUCKETS)}]}),
            ];
            if backend {
                m.push(serde_json::json!({"metricName": format!("{prefix}backend_latencies"), "metricValues": [{"distributionValue": dist(0.002, TIME_BUCKETS)}]}));
            }
            m
        };
        let with_bytes = |prefix: &str| {
            let mut m = base(prefix, true);
            m.push(serde_json::json!({"metricName": format!("{prefix}request_bytes"), "metricValues": [{"int64Value": "120"}]}));
            m.push(serde_json::json!({"metricName": format!("{prefix}response_bytes"), "metricValues": [{"int64Value": "1500"}]}));
            m
        };
        let mut main_metrics = with_bytes("serviceruntime.googleapis.com/api/producer/");
        main_metrics.extend(with_bytes("serviceruntime.googleapis.com/api/consumer/"));
        let labels = serde_json::json!({
            "/credential_id": "apikey:KEY",
            "/protocol": "http",
            "/response_code": "200",
            "/response_code_class": "2xx",
            "/status_code": "0",
            "cloud.googleapis.com/location": "global",
            "servicecontrol.googleapis.com/platform": "unknown",
            "servicecontrol.googleapis.com/service_agent": "ESP/portico-test",
            "servicecontrol.googleapis.com/user_agent": "ESP",
            "serviceruntime.googleapis.com/api_method": "1.echo.Echo",
        });
        let mut by_consumer_labels = labels.clone();
        by_consumer_labels["serviceruntime.googleapis.com/consumer_project"] = "123".into();
        let want = serde_json::json!([
            {
                "operationName": "1.echo.Echo",
                "consumerId": "api_key:KEY",
                "labels": labels,
                "metricValueSets": main_metrics,
                "logEntries": [{
                    "name": "endpoints_log",
                    "severity": "INFO",
                    "structPayload": {
                        "service_config_id": "c1",
                        "service_agent": "ESP/portico-test",
                        "producer_project_id": "",
                        "api_key": "KEY",
                        "api_name": "",
                        "api_version": "",
                        "url": "/echo?key=KEY",
                        "api_method": "1.echo.Echo",
                        "location": "global",
                        "log_message": "Method: 1.echo.Echo",
                        "http_response_code": 200,
                        "request_size_in_bytes": 120,
                        "response_size_in_bytes": 1500,
                        "request_latency_in_ms": 3,
                        "http_method": "POST",
                        "client_ip": "10.0.0.1",
                    },
                }],
            },
            {
                "operationName": "1.echo.Echo",
                "consumerId": "api_key:KEY",
                "labels": by_consumer_labels,
                "metricValueSets": base("serviceruntime.googleapis.com/api/producer/by_consumer/", true),
            },
        ]);
        assert_eq!(got, want);
        // Key order in the payload is ESP's too (the JSON keeps insertion order).
        let p = &got[0]["logEntries"][0]["structPayload"];
        let keys: Vec<&str> = p
            .as_object()
            .expect("payload")
            .keys()
            .map(String::as_str)
            .collect();
        let want_keys: Vec<&str> = want[0]["logEntries"][0]["structPayload"]
            .as_object()
            .expect("payload")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, want_keys);
    }

    #[test]
    fn espv2_credentials_follow_the_key_state_and_the_uid_switch() {
        let cred = |r: &RequestRecord, st: &StaticLabels| {
            operations_for(r, st)[0]
                .labels
                .get("/credential_id")
                .cloned()
        };
        let mut r = espv2_record();
        r.credential_id = Some("jwtauth:issuer=aQ".into());
        assert_eq!(cred(&r, &espv2_statics()).as_deref(), Some("apikey:KEY"));
        r.api_key_uid = Some("uid-9".into());
        assert_eq!(cred(&r, &espv2_statics()).as_deref(), Some("uid-9"));
        let mut no_uid = espv2_statics();
        no_uid.api_key_uid_reporting = false;
        assert_eq!(cred(&r, &no_uid).as_deref(), Some("apikey:KEY"));
        // An untrusted key names nobody; the JWT does.
        for state in [
            ApiKeyState::NotChecked,
            ApiKeyState::Invalid,
            ApiKeyState::NotEnabled,
        ] {
            r.api_key_state = state;
            let ops = operations_for(&r, &espv2_statics());
            assert_eq!(
                ops[0].labels.get("/credential_id").map(String::as_str),
                Some("jwtauth:issuer=aQ"),
                "{state:?}"
            );
            assert_eq!(ops[0].consumer_id, "", "{state:?}");
            let p = ops[0].log_entries[0]
                .struct_payload
                .as_ref()
                .expect("payload");
            assert_eq!(p["api_key"], "KEY", "the log entry keeps it");
            assert_eq!(p["api_key_state"], state.as_str());
        }
        r.credential_id = None;
        assert_eq!(cred(&r, &espv2_statics()), None);
    }

    #[test]
    fn espv2_unverified_keys_do_not_split_operations() {
        let mut a = espv2_record();
        a.api_key_state = ApiKeyState::Invalid;
        let mut b = a.clone();
        b.api_key = Some("OTHER".into());
        assert_eq!(SigRef::of(&a), SigRef::of(&b));
        let mut c = espv2_record();
        c.api_key = Some("OTHER".into());
        assert_ne!(SigRef::of(&espv2_record()), SigRef::of(&c));
        // The same request in the other dialect is another operation.
        let mut esp = espv2_record();
        esp.dialect = Dialect::Esp;
        assert_ne!(SigRef::of(&espv2_record()), SigRef::of(&esp));
    }

    #[test]
    fn espv2_counts_no_backend_as_zero_backend_time() {
        let mut r = espv2_record();
        r.backend_latency = None;
        r.response_code = 404;
        r.operation_name = None;
        r.api_key_state = ApiKeyState::NotChecked;
        r.error_kind = Some(ErrorKind::PathNotDefined);
        let ops = operations_for(&r, &espv2_statics());
        let op = &ops[0];
        let backend = op
            .metric_value_sets
            .iter()
            .find(|m| m.metric_name.ends_with("producer/backend_latencies"))
            .and_then(|m| m.metric_values[0].distribution_value.clone())
            .expect("backend latencies");
        assert_eq!((backend.count, backend.maximum), (1, 0.0));
        assert_eq!(op.operation_name, UNKNOWN_OPERATION_NAME);
        assert_eq!(
            op.labels["serviceruntime.googleapis.com/api_method"],
            UNKNOWN_OPERATION_NAME
        );
        assert_eq!(op.labels["cloud.googleapis.com/location"], "us-east1-b");
        assert_eq!(
            op.labels["servicecontrol.googleapis.com/platform"],
            "GKE(ESPv2)"
        );
        let e = &op.log_entries[0];
        let p = e.struct_payload.as_ref().expect("payload");
        assert_eq!(p["location"], "us-east1-b");
        assert_eq!(p["response_code_detail"], "direct_response");
        assert_eq!(p["log_message"], "<Unknown Operation Name> is called");
        assert!(p.get("api_name").is_none() && p.get("error_cause").is_none());
        let h = e.http_request.as_ref().expect("httpRequest");
        assert_eq!((h.status, h.latency.as_str()), (404, "0.003s"));
        assert_eq!(h.request_url, "/echo?key=KEY");
    }

    #[test]
    fn espv2_latencies_are_whole_milliseconds() {
        assert_eq!(duration_ms(Duration::from_micros(2_999)), "0.002s");
        assert_eq!(duration_ms(Duration::from_secs(3)), "3s");
        assert_eq!(duration_ms(Duration::from_millis(61_005)), "61.005s");
        assert_eq!(duration_ms(Duration::ZERO), "0s");
    }
}
