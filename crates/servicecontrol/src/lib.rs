//! Service Control v1 wire types (`google.api.servicecontrol.v1`) in proto3 JSON form.
//!
//! The proxy sends these to the control plane's `services/{svc}:check`, `:allocateQuota` and
//! `:report`; the control plane answers with them. Field names follow Google's REST reference so
//! that a real Service Control client or server could speak to either side. `int64` fields are
//! JSON strings in proto3 JSON; [`int64`] accepts both strings and numbers on input.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub mod code;
pub mod redact;

pub use code::Code;

/// proto3 JSON int64 helpers (strings on output; strings or numbers on input), shared with
/// the service-config model so both crates encode int64 the same way.
pub use portico_config::service::int64;

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// `google.api.servicecontrol.v1.CheckError.Code`: the names `:check` answers with, and their
/// numbers.
pub mod check_error {
    pub const CODES: &[(&str, i32)] = &[
        ("ERROR_CODE_UNSPECIFIED", 0),
        ("NOT_FOUND", 5),
        ("PERMISSION_DENIED", 7),
        ("RESOURCE_EXHAUSTED", 8),
        ("ABUSER_DETECTED", 103),
        ("SERVICE_NOT_ACTIVATED", 104),
        ("API_KEY_INVALID", 105),
        ("BILLING_DISABLED", 107),
        ("PROJECT_DELETED", 108),
        ("IP_ADDRESS_BLOCKED", 109),
        ("REFERER_BLOCKED", 110),
        ("CLIENT_APP_BLOCKED", 111),
        ("API_KEY_EXPIRED", 112),
        ("API_KEY_NOT_FOUND", 113),
        ("PROJECT_INVALID", 114),
        ("SECURITY_POLICY_VIOLATED", 121),
        ("API_TARGET_BLOCKED", 122),
        ("INVALID_CREDENTIAL", 123),
        ("LOCATION_POLICY_VIOLATED", 124),
        ("CONSUMER_INVALID", 125),
        ("NAMESPACE_LOOKUP_UNAVAILABLE", 300),
        ("SERVICE_STATUS_UNAVAILABLE", 301),
        ("BILLING_STATUS_UNAVAILABLE", 302),
        ("QUOTA_CHECK_UNAVAILABLE", 303),
        ("CLOUD_RESOURCE_MANAGER_BACKEND_UNAVAILABLE", 305),
        ("SECURITY_POLICY_BACKEND_UNAVAILABLE", 306),
        ("LOCATION_POLICY_BACKEND_UNAVAILABLE", 307),
    ];

    /// The number of a code named `name`.
    pub fn number(name: &str) -> Option<i32> {
        CODES.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    /// `code` as a name: itself, or the name of the number it spells (`121` is
    /// `SECURITY_POLICY_VIOLATED`); a number without a known name stays as it is.
    pub fn name(code: &str) -> &str {
        match code.parse::<i32>() {
            Ok(v) => CODES
                .iter()
                .find(|(_, number)| *number == v)
                .map_or(code, |(n, _)| *n),
            Err(_) => code,
        }
    }
}

/// Label keys the proxy puts on operations (Google's names).
pub mod labels {
    pub const CALLER_IP: &str = "servicecontrol.googleapis.com/caller_ip";
    pub const REFERER: &str = "servicecontrol.googleapis.com/referer";
    pub const USER_AGENT: &str = "servicecontrol.googleapis.com/user_agent";
    pub const SERVICE_AGENT: &str = "servicecontrol.googleapis.com/service_agent";
    pub const PLATFORM: &str = "servicecontrol.googleapis.com/platform";
    pub const ANDROID_PACKAGE_NAME: &str = "servicecontrol.googleapis.com/android_package_name";
    pub const ANDROID_CERT_FINGERPRINT: &str =
        "servicecontrol.googleapis.com/android_cert_fingerprint";
    pub const IOS_BUNDLE_ID: &str = "servicecontrol.googleapis.com/ios_bundle_id";
    pub const LOCATION: &str = "cloud.googleapis.com/location";
    pub const PROTOCOL: &str = "/protocol";
    pub const RESPONSE_CODE: &str = "/response_code";
    pub const RESPONSE_CODE_CLASS: &str = "/response_code_class";
    pub const STATUS_CODE: &str = "/status_code";
    pub const ERROR_TYPE: &str = "/error_type";
    pub const CREDENTIAL_ID: &str = "/credential_id";
    pub const API_METHOD: &str = "serviceruntime.googleapis.com/api_method";
    pub const API_VERSION: &str = "serviceruntime.googleapis.com/api_version";
    pub const CONSUMER_PROJECT: &str = "serviceruntime.googleapis.com/consumer_project";
}

/// Metric names the proxy reports (the serviceruntime set ESP sends).
pub mod metrics {
    pub const PRODUCER_REQUEST_COUNT: &str =
        "serviceruntime.googleapis.com/api/producer/request_count";
    pub const PRODUCER_ERROR_COUNT: &str = "serviceruntime.googleapis.com/api/producer/error_count";
    pub const PRODUCER_TOTAL_LATENCIES: &str =
        "serviceruntime.googleapis.com/api/producer/total_latencies";
    pub const PRODUCER_BACKEND_LATENCIES: &str =
        "serviceruntime.googleapis.com/api/producer/backend_latencies";
    pub const PRODUCER_OVERHEAD_LATENCIES: &str =
        "serviceruntime.googleapis.com/api/producer/request_overhead_latencies";
    pub const PRODUCER_REQUEST_SIZES: &str =
        "serviceruntime.googleapis.com/api/producer/request_sizes";
    pub const PRODUCER_RESPONSE_SIZES: &str =
        "serviceruntime.googleapis.com/api/producer/response_sizes";
    pub const CONSUMER_REQUEST_COUNT: &str =
        "serviceruntime.googleapis.com/api/consumer/request_count";
    pub const CONSUMER_ERROR_COUNT: &str = "serviceruntime.googleapis.com/api/consumer/error_count";
    pub const CONSUMER_TOTAL_LATENCIES: &str =
        "serviceruntime.googleapis.com/api/consumer/total_latencies";
    /// INT64 DELTA totals; producer and consumer forms only, sent when non-zero.
    pub const PRODUCER_REQUEST_BYTES: &str =
        "serviceruntime.googleapis.com/api/producer/request_bytes";
    pub const PRODUCER_RESPONSE_BYTES: &str =
        "serviceruntime.googleapis.com/api/producer/response_bytes";
    pub const CONSUMER_REQUEST_BYTES: &str =
        "serviceruntime.googleapis.com/api/consumer/request_bytes";
    pub const CONSUMER_RESPONSE_BYTES: &str =
        "serviceruntime.googleapis.com/api/consumer/response_bytes";
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CheckRequest {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub service_config_id: String,
    pub operation: Operation,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Operation {
    pub operation_id: String,
    pub operation_name: String,
    /// `api_key:<key>`, `project:<id>` or `project_number:<n>`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub consumer_id: String,
    /// RFC 3339 timestamps.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub start_time: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub end_time: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub metric_value_sets: Vec<MetricValueSet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub log_entries: Vec<LogEntry>,
    /// `LOW` (default) or `HIGH`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub importance: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MetricValueSet {
    pub metric_name: String,
    pub metric_values: Vec<MetricValue>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MetricValue {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub start_time: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub end_time: String,
    #[serde(with = "int64::opt", skip_serializing_if = "Option::is_none")]
    pub int64_value: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub double_value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bool_value: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub string_value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distribution_value: Option<Distribution>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Distribution {
    #[serde(with = "int64")]
    pub count: i64,
    pub mean: f64,
    pub minimum: f64,
    pub maximum: f64,
    pub sum_of_squared_deviation: f64,
    /// Underflow bucket first, overflow bucket last.
    #[serde(with = "int64::vec")]
    pub bucket_counts: Vec<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exponential_buckets: Option<ExponentialBuckets>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linear_buckets: Option<LinearBuckets>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explicit_buckets: Option<ExplicitBuckets>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ExponentialBuckets {
    pub num_finite_buckets: i32,
    pub growth_factor: f64,
    pub scale: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LinearBuckets {
    pub num_finite_buckets: i32,
    pub width: f64,
    pub offset: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ExplicitBuckets {
    pub bounds: Vec<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LogEntry {
    /// `endpoints_log` for the proxy's request log.
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub timestamp: String,
    /// `INFO`, `ERROR`, ...
    #[serde(skip_serializing_if = "String::is_empty")]
    pub severity: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub insert_id: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub struct_payload: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_payload: Option<String>,
    /// The request the entry is about (ESPv2 fills it; ESP puts the same facts in the payload).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_request: Option<HttpRequest>,
    /// `projects/P/traces/T`: the trace of the request (ESPv2 sets it on every report, sampled or
    /// not; the console links a logged request to its trace through it).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub trace: String,
}

/// `google.api.servicecontrol.v1.HttpRequest`: an HTTP request a log entry is about.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRequest {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub request_method: String,
    /// The request's URL as received (path and query).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub request_url: String,
    /// Bytes of the request, head and body.
    #[serde(with = "int64", skip_serializing_if = "is_zero")]
    pub request_size: i64,
    /// The response's HTTP status.
    #[serde(skip_serializing_if = "is_zero_i32")]
    pub status: i32,
    /// Bytes of the response, head and body.
    #[serde(with = "int64", skip_serializing_if = "is_zero")]
    pub response_size: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user_agent: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub remote_ip: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub server_ip: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub referer: String,
    /// A proto3 JSON duration: seconds with up to nine decimals and an `s`, e.g. `0.012s`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub latency: String,
    /// `http`, `grpc`, ...
    #[serde(skip_serializing_if = "String::is_empty")]
    pub protocol: String,
}

fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CheckResponse {
    pub operation_id: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub check_errors: Vec<CheckError>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub service_config_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub service_rollout_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_info: Option<CheckInfo>,
}

/// A check error; `code` is the enum name Google uses (`API_KEY_INVALID`,
/// `SERVICE_NOT_ACTIVATED`, `API_TARGET_BLOCKED`, `IP_ADDRESS_BLOCKED`, ...).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CheckError {
    pub code: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub subject: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CheckInfo {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unused_arguments: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer_info: Option<ConsumerInfo>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub api_key_uid: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConsumerInfo {
    #[serde(with = "int64", skip_serializing_if = "is_zero")]
    pub project_number: i64,
    /// `PROJECT`, `FOLDER`, `ORGANIZATION` or `CONSUMER_TYPE_UNSPECIFIED`.
    #[serde(rename = "type", skip_serializing_if = "String::is_empty")]
    pub consumer_type: String,
    #[serde(with = "int64", skip_serializing_if = "is_zero")]
    pub consumer_number: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ReportRequest {
    pub operations: Vec<Operation>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub service_config_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ReportResponse {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub report_errors: Vec<ReportError>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub service_config_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub service_rollout_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ReportError {
    pub operation_id: String,
    pub status: Status,
}

/// `google.rpc.Status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Status {
    pub code: i32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AllocateQuotaRequest {
    pub allocate_operation: QuotaOperation,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub service_config_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct QuotaOperation {
    pub operation_id: String,
    /// The method selector.
    pub method_name: String,
    pub consumer_id: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// One set per metric; the cost is the set's single `int64Value`.
    pub quota_metrics: Vec<MetricValueSet>,
    /// `NORMAL`, `BEST_EFFORT` or `CHECK_ONLY`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub quota_mode: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AllocateQuotaResponse {
    pub operation_id: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allocate_errors: Vec<QuotaError>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub quota_metrics: Vec<MetricValueSet>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub service_config_id: String,
    /// Not in Google's proto; Portico adds it so proxies learn of rollouts from quota calls too.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub service_rollout_id: String,
}

/// `code` is `RESOURCE_EXHAUSTED`, `BILLING_NOT_ACTIVE`, `PROJECT_DELETED`, `API_KEY_INVALID`,
/// `API_KEY_EXPIRED`, ...
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct QuotaError {
    pub code: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub subject: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int64_fields_are_strings_and_accept_numbers() {
        let ci = ConsumerInfo {
            project_number: 123,
            ..Default::default()
        };
        let j = serde_json::to_value(&ci).unwrap();
        assert_eq!(j["projectNumber"], "123");
        let back: ConsumerInfo =
            serde_json::from_str(r#"{"projectNumber": 456, "type": "PROJECT"}"#).unwrap();
        assert_eq!(back.project_number, 456);
        assert_eq!(back.consumer_type, "PROJECT");
    }

    #[test]
    fn check_response_round_trips_google_json() {
        let raw = r#"{"operationId":"op1","checkErrors":[{"code":"API_KEY_INVALID","detail":"bad"}],
            "checkInfo":{"consumerInfo":{"projectNumber":"110158789852"}},"serviceConfigId":"2026-11-22r0"}"#;
        let r: CheckResponse = serde_json::from_str(raw).unwrap();
        assert_eq!(r.check_errors[0].code, "API_KEY_INVALID");
        assert_eq!(
            r.check_info.unwrap().consumer_info.unwrap().project_number,
            110158789852
        );
    }

    #[test]
    fn a_log_entrys_trace_round_trips_and_is_absent_when_unset() {
        let e: LogEntry = serde_json::from_value(serde_json::json!({
            "name": "endpoints_log",
            "trace": "projects/p1/traces/0af7651916cd43dd8448eb211c80319c",
        }))
        .unwrap();
        assert_eq!(
            e.trace,
            "projects/p1/traces/0af7651916cd43dd8448eb211c80319c"
        );
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(
            j["trace"],
            "projects/p1/traces/0af7651916cd43dd8448eb211c80319c"
        );
        let none = serde_json::to_value(LogEntry::default()).unwrap();
        assert!(none.get("trace").is_none(), "{none}");
    }

    #[test]
    fn http_request_is_proto3_json_and_absent_when_unset() {
        let e = LogEntry {
            name: "endpoints_log".into(),
            http_request: Some(HttpRequest {
                request_method: "GET".into(),
                request_size: 120,
                status: 404,
                latency: "0.002s".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(
            j["httpRequest"],
            serde_json::json!({"requestMethod": "GET", "requestSize": "120", "status": 404,
                               "latency": "0.002s"})
        );
        let back: LogEntry = serde_json::from_value(j).unwrap();
        assert_eq!(back, e);
        let plain = serde_json::to_string(&LogEntry::default()).unwrap();
        assert!(!plain.contains("httpRequest"), "{plain}");
    }

    #[test]
    fn distribution_bucket_counts_are_strings() {
        let d = Distribution {
            count: 2,
            bucket_counts: vec![0, 2, 0],
            ..Default::default()
        };
        let j = serde_json::to_value(&d).unwrap();
        assert_eq!(j["bucketCounts"], serde_json::json!(["0", "2", "0"]));
        let back: Distribution = serde_json::from_value(j).unwrap();
        assert_eq!(back, d);
    }
}
