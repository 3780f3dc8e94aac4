//! `google.api.Service`: the service configuration, as serde types whose JSON is Google's
//! proto3 JSON (lowerCamel names, int64 as strings, empty fields omitted).
//!
//! This is the contract between the control plane (which produces and stores it), the proxy
//! (which builds its routing tables from it) and Service Control (quota limits, usage rules).
//! Unknown fields are ignored on input so configs produced by Google's own tools load too.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// proto3 JSON int64: emitted as a string, accepted as a string or a number.
pub mod int64 {
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum N {
            S(String),
            I(i64),
        }
        match N::deserialize(d)? {
            N::S(s) => s.parse().map_err(de::Error::custom),
            N::I(i) => Ok(i),
        }
    }

    /// Same, for `Option<i64>`.
    pub mod opt {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(v: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.serialize_str(&v.to_string()),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
            #[derive(Deserialize)]
            struct W(#[serde(with = "super")] i64);
            Option::<W>::deserialize(d).map(|o| o.map(|w| w.0))
        }
    }

    /// Same, for `Vec<i64>`.
    pub mod vec {
        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        pub fn serialize<S: Serializer>(v: &[i64], s: S) -> Result<S::Ok, S::Error> {
            let strs: Vec<String> = v.iter().map(|i| i.to_string()).collect();
            strs.serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i64>, D::Error> {
            #[derive(Deserialize)]
            struct W(#[serde(with = "super")] i64);
            Vec::<W>::deserialize(d).map(|v| v.into_iter().map(|w| w.0).collect())
        }
    }

    /// `map<string, int64>`.
    pub mod map {
        use serde::{Deserialize, Deserializer, Serialize, Serializer};
        use std::collections::BTreeMap;

        pub fn serialize<S: Serializer>(
            v: &BTreeMap<String, i64>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            let m: BTreeMap<&String, String> = v.iter().map(|(k, v)| (k, v.to_string())).collect();
            m.serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<BTreeMap<String, i64>, D::Error> {
            #[derive(Deserialize)]
            struct W(#[serde(with = "super")] i64);
            let m = BTreeMap::<String, W>::deserialize(d)?;
            Ok(m.into_iter().map(|(k, w)| (k, w.0)).collect())
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}
fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}
fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Service {
    /// The service name, e.g. `echo-api.endpoints.demo-proj.cloud.goog`.
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub title: String,
    /// The config id, `YYYY-MM-DDrN`; assigned by Service Management, empty in a fresh conversion.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub config_version: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub producer_project_id: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub apis: Vec<Api>,
    /// `google.protobuf.Type`s generated from definitions; kept opaque.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub documentation: Option<Documentation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<Http>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control: Option<Control>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_parameters: Option<SystemParameters>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<LogDescriptor>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricDescriptor>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub monitored_resources: Vec<MonitoredResourceDescriptor>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logging: Option<Logging>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub monitoring: Option<Monitoring>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_info: Option<SourceInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Api {
    /// `<major version>.<service name with . and - as _>`, e.g. `1.echo_api_endpoints_demo_proj_cloud_goog`.
    pub name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<Method>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_context: Option<SourceContext>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub syntax: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Method {
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub request_type_url: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub response_type_url: String,
    /// gRPC client streaming (`stream` request); never set for OpenAPI methods.
    #[serde(skip_serializing_if = "is_false")]
    pub request_streaming: bool,
    /// gRPC server streaming (`stream` response); never set for OpenAPI methods.
    #[serde(skip_serializing_if = "is_false")]
    pub response_streaming: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SourceContext {
    pub file_name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Documentation {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub summary: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub overview: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Http {
    pub rules: Vec<HttpRule>,
}

/// `google.api.HttpRule`: exactly one of the method fields (or `custom`) is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRule {
    pub selector: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub get: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub put: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub post: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delete: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom: Option<CustomHttpPattern>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub body: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub response_body: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub additional_bindings: Vec<HttpRule>,
}

impl HttpRule {
    /// The HTTP method and path template of this rule (`custom.kind` for custom patterns;
    /// `*` there means any method).
    pub fn method_and_path(&self) -> Option<(&str, &str)> {
        if let Some(p) = &self.get {
            return Some(("GET", p));
        }
        if let Some(p) = &self.put {
            return Some(("PUT", p));
        }
        if let Some(p) = &self.post {
            return Some(("POST", p));
        }
        if let Some(p) = &self.delete {
            return Some(("DELETE", p));
        }
        if let Some(p) = &self.patch {
            return Some(("PATCH", p));
        }
        self.custom
            .as_ref()
            .map(|c| (c.kind.as_str(), c.path.as_str()))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CustomHttpPattern {
    pub kind: String,
    pub path: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Usage {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub requirements: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<UsageRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UsageRule {
    pub selector: String,
    #[serde(skip_serializing_if = "is_false")]
    pub allow_unregistered_calls: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub skip_service_control: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SystemParameters {
    pub rules: Vec<SystemParameterRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SystemParameterRule {
    pub selector: String,
    pub parameters: Vec<SystemParameter>,
}

/// A custom location of a system parameter; for API keys `name` is `api_key`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SystemParameter {
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub http_header: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub url_query_parameter: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Authentication {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<AuthenticationRule>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<AuthProvider>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthenticationRule {
    pub selector: String,
    #[serde(skip_serializing_if = "is_false")]
    pub allow_without_credential: bool,
    /// Several requirements = any one of them (OR).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub requirements: Vec<AuthRequirement>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthRequirement {
    pub provider_id: String,
    /// Comma-separated.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub audiences: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthProvider {
    pub id: String,
    pub issuer: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub jwks_uri: String,
    /// Comma-separated.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub audiences: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub authorization_url: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub jwt_locations: Vec<JwtLocation>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct JwtLocation {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub header: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub query: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cookie: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub value_prefix: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Quota {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<QuotaLimit>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub metric_rules: Vec<MetricRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct QuotaLimit {
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(with = "int64", skip_serializing_if = "is_zero_i64")]
    pub default_limit: i64,
    #[serde(with = "int64", skip_serializing_if = "is_zero_i64")]
    pub max_limit: i64,
    #[serde(with = "int64", skip_serializing_if = "is_zero_i64")]
    pub free_tier: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub duration: String,
    pub metric: String,
    /// e.g. `1/min/{project}`.
    pub unit: String,
    /// e.g. `{"STANDARD": 1000}`.
    #[serde(with = "int64::map", skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, i64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub display_name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MetricRule {
    pub selector: String,
    #[serde(with = "int64::map", skip_serializing_if = "BTreeMap::is_empty")]
    pub metric_costs: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Endpoint {
    pub name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub target: String,
    #[serde(skip_serializing_if = "is_false")]
    pub allow_cors: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Backend {
    pub rules: Vec<BackendRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BackendRule {
    pub selector: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// Seconds.
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub deadline: f64,
    /// `APPEND_PATH_TO_ADDRESS` or `CONSTANT_ADDRESS`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path_translation: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub jwt_audience: String,
    #[serde(skip_serializing_if = "is_false")]
    pub disable_auth: bool,
    /// `http/1.1`, `h2`, `grpc`, in any case (see [`BackendRule::backend_protocol`]).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub protocol: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Control {
    /// `servicecontrol.googleapis.com` in Google's configs; any non-empty value enables
    /// Service Control in the proxy.
    pub environment: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LabelDescriptor {
    pub key: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub value_type: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LogDescriptor {
    pub name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<LabelDescriptor>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub display_name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MetricDescriptor {
    pub name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<LabelDescriptor>,
    /// `DELTA`, `GAUGE`, `CUMULATIVE`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub metric_kind: String,
    /// `INT64`, `DISTRIBUTION`, ...
    #[serde(skip_serializing_if = "String::is_empty")]
    pub value_type: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub unit: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub display_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MonitoredResourceDescriptor {
    #[serde(rename = "type")]
    pub resource_type: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<LabelDescriptor>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Logging {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub producer_destinations: Vec<LoggingDestination>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub consumer_destinations: Vec<LoggingDestination>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LoggingDestination {
    pub monitored_resource: String,
    pub logs: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Monitoring {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub producer_destinations: Vec<MonitoringDestination>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub consumer_destinations: Vec<MonitoringDestination>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MonitoringDestination {
    pub monitored_resource: String,
    pub metrics: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SourceInfo {
    /// `google.protobuf.Any`s of type `google.api.servicemanagement.v1.ConfigFile`
    /// (`filePath`, `fileContents` in standard base64, `fileType`).
    pub source_files: Vec<serde_json::Value>,
}

/// Shortest `backend.rules[].deadline` (seconds) a config may set: a shorter one rounds to no
/// time at all, so every request to the backend would time out at once.
pub const MIN_BACKEND_DEADLINE_S: f64 = 0.001;
/// Longest `backend.rules[].deadline` (seconds): one day. Beyond it a value is a mistake, and
/// past about 1.8e19 it cannot be represented as a time span at all (`1e300` would make a
/// time-span conversion panic in every proxy).
pub const MAX_BACKEND_DEADLINE_S: f64 = 86_400.0;
/// Largest `quota.metricRules[].metricCosts` value: a cost is charged per request against
/// per-minute limits, and the proxy adds costs up between allocations, where a cost near
/// `i64::MAX` would overflow. A billion per request is far beyond any real limit.
pub const MAX_METRIC_COST: i64 = 1_000_000_000;

/// Why `deadline` (seconds; 0 = unset) is not a usable backend deadline, if it is not; the
/// text follows the value ("deadline 1e300 is out of range: ...").
pub fn backend_deadline_problem(deadline: f64) -> Option<String> {
    if deadline == 0.0 || (MIN_BACKEND_DEADLINE_S..=MAX_BACKEND_DEADLINE_S).contains(&deadline) {
        return None;
    }
    Some(format!(
        "is out of range: a deadline is a number of seconds from {MIN_BACKEND_DEADLINE_S} to \
         {MAX_BACKEND_DEADLINE_S} (one day)"
    ))
}

/// The HTTP version a backend rule's `protocol` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendProtocol {
    /// Not set: the address's scheme decides (HTTP/1.1 for `http` and `https`, HTTP/2 for `grpc`).
    Unset,
    /// `http/1.1`.
    Http1,
    /// `h2`, or `grpc` (gRPC runs on HTTP/2): with prior knowledge over `http://`, negotiated
    /// by ALPN over `https://`.
    H2,
}

/// Reads a backend rule's `protocol`. ESPv2 lowercases the value before comparing it, so any
/// case is accepted; anything else is an error whose text follows the word "protocol".
pub fn parse_backend_protocol(protocol: &str) -> Result<BackendProtocol, String> {
    if protocol.is_empty() {
        Ok(BackendProtocol::Unset)
    } else if protocol.eq_ignore_ascii_case("http/1.1") {
        Ok(BackendProtocol::Http1)
    } else if protocol.eq_ignore_ascii_case("h2") || protocol.eq_ignore_ascii_case("grpc") {
        Ok(BackendProtocol::H2)
    } else {
        // A value is echoed in full only when short: a message is no place for a whole file.
        const SHOWN: usize = 40;
        let shown = match protocol.char_indices().nth(SHOWN) {
            Some((cut, _)) => format!("{:?}...", &protocol[..cut]),
            None => format!("{protocol:?}"),
        };
        Err(format!(
            "{shown} is not supported: use \"http/1.1\", \"h2\" or \"grpc\" (in any case), or \
             leave it unset"
        ))
    }
}

impl BackendRule {
    /// The rule's [`BackendProtocol`], or why its `protocol` is not one.
    pub fn backend_protocol(&self) -> Result<BackendProtocol, String> {
        parse_backend_protocol(&self.protocol)
    }
}

/// Why `cost` is not a usable metric cost, if it is not; the text follows the value. Submit
/// refuses negative costs (`x-google-quota` says "non-negative integer"), so a config loaded
/// from a file is held to the same rule; 0 is kept (ESP charges it as 1).
pub fn metric_cost_problem(cost: i64) -> Option<String> {
    (!(0..=MAX_METRIC_COST).contains(&cost)).then(|| {
        format!("is out of range: a cost is a number from 0 to {MAX_METRIC_COST} per request")
    })
}

impl Service {
    /// Checks the numbers a proxy turns into time spans and counts, and the backend protocols
    /// it must speak, so a config that cannot be served is refused when it is loaded rather
    /// than failing (or panicking) later. The message names the rule and the value.
    pub fn check_ranges(&self) -> Result<(), String> {
        for r in self.backend.iter().flat_map(|b| b.rules.iter()) {
            if let Some(problem) = backend_deadline_problem(r.deadline) {
                return Err(format!(
                    "backend rule {:?}: deadline {:?} {problem}",
                    r.selector, r.deadline
                ));
            }
            if let Err(problem) = r.backend_protocol() {
                return Err(format!("backend rule {:?}: protocol {problem}", r.selector));
            }
        }
        for r in self.quota.iter().flat_map(|q| q.metric_rules.iter()) {
            for (metric, cost) in &r.metric_costs {
                if let Some(problem) = metric_cost_problem(*cost) {
                    return Err(format!(
                        "quota metric rule {:?}: the cost {cost} of metric {metric:?} {problem}",
                        r.selector
                    ));
                }
            }
        }
        Ok(())
    }

    /// The usage rule for a selector, if any.
    pub fn usage_rule(&self, selector: &str) -> Option<&UsageRule> {
        self.usage
            .as_ref()?
            .rules
            .iter()
            .find(|r| r.selector == selector)
    }

    /// The JSON name of field `field` (a snake_case name, as path bindings carry it) of the
    /// request message of method `selector`, from `types[]`: `shelf_id` → `shelfId`. ESP uses
    /// this mapping for `CONSTANT_ADDRESS` backends and query bindings. `None` when the method,
    /// its request type or the field is unknown.
    pub fn request_field_json_name(&self, selector: &str, field: &str) -> Option<&str> {
        let (api, method) = self.apis.iter().find_map(|a| {
            let m = selector.strip_prefix(a.name.as_str())?.strip_prefix('.')?;
            Some((a, m))
        })?;
        let url = &api
            .methods
            .iter()
            .find(|m| m.name == method)?
            .request_type_url;
        let type_name = url.rsplit_once('/').map_or(url.as_str(), |(_, n)| n);
        let ty = self
            .types
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(type_name))?;
        ty.get("fields")?
            .as_array()?
            .iter()
            .find(|f| f.get("name").and_then(|n| n.as_str()) == Some(field))?
            .get("jsonName")?
            .as_str()
    }

    /// Whether Service Control is configured (`control.environment` non-empty).
    pub fn has_service_control(&self) -> bool {
        self.control
            .as_ref()
            .is_some_and(|c| !c.environment.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_limit_int64_values_round_trip_as_strings() {
        let raw = r#"{"name":"read-limit","metric":"read-requests","unit":"1/min/{project}",
                      "values":{"STANDARD":"1000"}}"#;
        let l: QuotaLimit = serde_json::from_str(raw).unwrap();
        assert_eq!(l.values["STANDARD"], 1000);
        let j = serde_json::to_value(&l).unwrap();
        assert_eq!(j["values"]["STANDARD"], "1000");
    }

    #[test]
    fn empty_fields_are_omitted() {
        let s = Service {
            name: "svc".into(),
            ..Default::default()
        };
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"{"name":"svc"}"#);
    }

    /// ESPv2 lowercases `protocol` before it compares it; anything but its values is refused
    /// when the config is loaded, naming the rule and the value.
    #[test]
    fn backend_protocols_are_matched_in_any_case_and_unknown_ones_refused() {
        let svc = |protocol: &str| {
            serde_json::from_value::<Service>(serde_json::json!({"backend": {"rules": [
                {"selector": "ok", "protocol": "h2"},
                {"selector": "a", "protocol": protocol}]}}))
            .unwrap()
        };
        for (protocol, want) in [
            ("", BackendProtocol::Unset),
            ("http/1.1", BackendProtocol::Http1),
            ("HTTP/1.1", BackendProtocol::Http1),
            ("h2", BackendProtocol::H2),
            ("H2", BackendProtocol::H2),
            ("grpc", BackendProtocol::H2),
            ("gRPC", BackendProtocol::H2),
        ] {
            assert_eq!(parse_backend_protocol(protocol), Ok(want), "{protocol:?}");
            assert_eq!(svc(protocol).check_ranges(), Ok(()), "{protocol:?}");
        }
        for bad in [
            "h3", " h2", "h2 ", "http/2", "HTTP/1.0", "h2c", "http", "h2\u{0}",
        ] {
            assert_eq!(
                svc(bad).check_ranges(),
                Err(format!(
                    "backend rule \"a\": protocol {bad:?} is not supported: use \"http/1.1\", \"h2\" \
                     or \"grpc\" (in any case), or leave it unset"
                )),
                "{bad:?}"
            );
        }
        // A value as long as a whole config is not repeated whole in the message.
        let long = "x".repeat(100_000);
        let message = svc(&long).check_ranges().unwrap_err();
        assert!(message.len() < 300, "{}", message.len());
        assert!(message.contains("protocol \"xxxx"), "{message}");
    }

    #[test]
    fn check_ranges_names_the_rule_and_value() {
        let svc = |json: &str| serde_json::from_str::<Service>(json).unwrap();
        assert_eq!(svc(r#"{"name":"s"}"#).check_ranges(), Ok(()));
        let ok = svc(
            r#"{"backend":{"rules":[{"selector":"a","deadline":86400},{"selector":"b"}]},
                "quota":{"metricRules":[{"selector":"a","metricCosts":{"m":"0","n":"1000000000"}}]}}"#,
        );
        assert_eq!(ok.check_ranges(), Ok(()));
        for (json, message) in [
            (
                r#"{"backend":{"rules":[{"selector":"a","deadline":1e300}]}}"#,
                "backend rule \"a\": deadline 1e300 is out of range: a deadline is a number of seconds from 0.001 to 86400 (one day)",
            ),
            (
                r#"{"backend":{"rules":[{"selector":"a","deadline":-1}]}}"#,
                "backend rule \"a\": deadline -1.0 is out of range: a deadline is a number of seconds from 0.001 to 86400 (one day)",
            ),
            (
                r#"{"backend":{"rules":[{"selector":"a","deadline":1e-9}]}}"#,
                "backend rule \"a\": deadline 1e-9 is out of range: a deadline is a number of seconds from 0.001 to 86400 (one day)",
            ),
            (
                r#"{"quota":{"metricRules":[{"selector":"a","metricCosts":{"m":"9223372036854775807"}}]}}"#,
                "quota metric rule \"a\": the cost 9223372036854775807 of metric \"m\" is out of range: a cost is a number from 0 to 1000000000 per request",
            ),
            (
                r#"{"quota":{"metricRules":[{"selector":"a","metricCosts":{"m":"-3"}}]}}"#,
                "quota metric rule \"a\": the cost -3 of metric \"m\" is out of range: a cost is a number from 0 to 1000000000 per request",
            ),
            (
                r#"{"quota":{"metricRules":[{"selector":"a","metricCosts":{"m":"-9223372036854775808"}}]}}"#,
                "quota metric rule \"a\": the cost -9223372036854775808 of metric \"m\" is out of range: a cost is a number from 0 to 1000000000 per request",
            ),
        ] {
            assert_eq!(svc(json).check_ranges(), Err(message.to_string()), "{json}");
        }
    }
}
