//! The proxy's runtime settings: what every serving part reads ([`Settings`] and the types it
//! is made of), whatever produced them. [`crate::cli`] parses ESP's flags into a [`Settings`];
//! nothing on the request path imports the flag parser.
//!
//! Layer rule: this module imports only leaf modules ([`crate::cors`], [`crate::retry`],
//! [`crate::request_head`]'s options, [`crate::tls`]'s settings, [`crate::header_rules`],
//! [`crate::compression`]'s settings), never the serving code ([`crate::server`],
//! [`crate::pipeline`], [`crate::forward`], [`crate::routing`]).

use crate::cors::CorsSettings;
use ipnet::IpNet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Exit code for bad arguments (start_esp's `ArgumentParser.error`).
pub const EXIT_BAD_ARGS: u8 = 4;
/// Exit code when one port is given for two listeners.
pub const EXIT_PORT_CONFLICT: u8 = 2;
/// Exit code for other setup errors.
pub const EXIT_SETUP: u8 = 3;
/// Exit code when the service configuration cannot be fetched.
pub const EXIT_FETCH: u8 = 1;

/// Peers whose `X-Forwarded-For` is believed by default: loopback, private (RFC 1918, RFC 4193)
/// and link-local addresses — a local load balancer, a sidecar or a mesh ingress. ESP trusted
/// every peer (`0.0.0.0/0, ::/0`), which let any client choose the caller IP that IP-restricted
/// API keys are checked against; that is one flag away (docs/security.md).
pub const DEFAULT_XFF_TRUSTED_PROXY_LIST: &str =
    "127.0.0.0/8, ::1/128, 10.0.0.0/8, 172.16.0.0/12, \
     192.168.0.0/16, fc00::/7, 169.254.0.0/16, fe80::/10";

/// How the client address is read from `X-Forwarded-For` the way Envoy's connection manager
/// does (ESPv2's `--envoy_xff_num_trusted_hops`, `--envoy_use_remote_address`), instead of
/// nginx's trusted-proxy walk ([`Settings::xff_trusted`]).
///
/// - `use_remote_address: false` (ESPv2's default): the client is the `trusted_hops + 1`-th
///   address from the right of `X-Forwarded-For` (the right-most with 0 hops); with fewer
///   addresses, or one that is not an IP address there, the TCP peer. `X-Forwarded-For` goes to
///   the backend as the client sent it.
/// - `use_remote_address: true`: with 0 hops the TCP peer; otherwise the `trusted_hops`-th
///   address from the right (the peer counting as the first hop), or the peer when there are
///   fewer. The peer's address is appended to `X-Forwarded-For` towards the backend.
///
/// Every copy of the header is read as one comma list. ESPv2's default is 2 hops for a sidecar
/// (a load balancer and a mesh ingress in front), 0 on serverless platforms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XffHops {
    pub trusted_hops: u32,
    pub use_remote_address: bool,
}

/// ESPv2's `--envoy_xff_num_trusted_hops` default for a sidecar (`start_proxy.py` passes 0 on
/// serverless platforms).
pub const ESPV2_XFF_NUM_TRUSTED_HOPS: u32 = 2;

/// `--envoy_xff_num_trusted_hops`'s value: a whole number of hops (Envoy's field is unsigned;
/// ESPv2 would wrap a negative number around to four billion hops).
pub fn parse_xff_num_trusted_hops(v: &str) -> Result<u32, String> {
    v.trim().parse::<u32>().map_err(|_| {
        format!("invalid --envoy_xff_num_trusted_hops {v:?}: expected a whole number of hops, 0 or more")
    })
}

/// The header `--enable_operation_name_header` sets towards the backend: ESPv2's generated
/// prefix (`X-Endpoint-`) and `API-Operation-Name`.
pub static OPERATION_NAME_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-endpoint-api-operation-name");

/// ESPv2's `--generated_header_prefix` default.
pub const DEFAULT_GENERATED_HEADER_PREFIX: &str = "X-Endpoint-";

/// The headers the proxy generates towards the backend, named with ESPv2's
/// `--generated_header_prefix` (default `X-Endpoint-`): the JWT payload (`API-UserInfo`), the
/// consumer's project (`API-Project-ID`) and the operation (`Api-Operation-Name`, with
/// `--enable_operation_name_header`). A client's copy of any `<prefix>API-*` header, in any
/// spelling, is removed before anything reads the request
/// ([`crate::request_head::HeadOptions::generated_prefix`]); so are `X-Endpoint-API-*` copies
/// whatever the prefix, since backends written for ESP read those.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedHeaders {
    pub user_info: http::HeaderName,
    pub project_id: http::HeaderName,
    pub operation_name: http::HeaderName,
}

impl GeneratedHeaders {
    /// The names for `prefix`, checked: a header-name token (RFC 9110 `tchar`s), not empty, at
    /// most 100 bytes. `Err` is the reason, for the flag's message.
    pub fn with_prefix(prefix: &str) -> Result<GeneratedHeaders, String> {
        if prefix.is_empty() {
            return Err("the prefix is empty".into());
        }
        if prefix.len() > 100 {
            return Err("the prefix is longer than 100 bytes".into());
        }
        let tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
        if let Some(c) = prefix.bytes().find(|c| !tchar(*c)) {
            return Err(format!(
                "{:?} cannot be part of a header name (use letters, digits and -)",
                char::from(c)
            ));
        }
        let name = |suffix: &str| {
            http::HeaderName::from_bytes(format!("{prefix}{suffix}").as_bytes())
                .map_err(|e| e.to_string())
        };
        Ok(GeneratedHeaders {
            user_info: name("API-UserInfo")?,
            project_id: name("API-Project-ID")?,
            operation_name: name("Api-Operation-Name")?,
        })
    }

    /// What a client header must start with (lower case, in any spelling) to be removed:
    /// `<prefix>api-`.
    pub fn client_copies(&self) -> String {
        let s = self.operation_name.as_str();
        s[..s.len() - "operation-name".len()].to_string()
    }
}

impl Default for GeneratedHeaders {
    fn default() -> Self {
        GeneratedHeaders {
            user_info: http::HeaderName::from_static("x-endpoint-api-userinfo"),
            project_id: http::HeaderName::from_static("x-endpoint-api-project-id"),
            operation_name: OPERATION_NAME_HEADER.clone(),
        }
    }
}

/// ESPv2's `--health_check_operation` default: the health check's operation is
/// `<it>.ESPv2_Autogenerated_HealthCheck`.
pub const DEFAULT_HEALTH_CHECK_OPERATION: &str = "espv2_deployment";
/// ESPv2's `--cors_operation_delimiter` default: an auto-generated CORS operation is
/// `<API name><it><method name>`.
pub const DEFAULT_CORS_OPERATION_DELIMITER: &str = ".ESPv2_Autogenerated_CORS_";

/// `--http_request_timeout_s`'s default: ESPv2's default backend deadline (its
/// `x-google-backend` `deadline` when none is given). ESP's nginx waited 86,400 s.
pub const DEFAULT_BACKEND_TIMEOUT_S: f64 = 15.0;

/// What the proxy does at start-up when a token it depends on cannot be had (ESPv2's
/// `DependencyErrorBehavior`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DependencyErrorBehavior {
    /// Listen only once every token the config needs was fetched (Service Control's access
    /// token, backend ID tokens), trying again every two seconds (ESPv2's
    /// `BLOCK_INIT_ON_ANY_ERROR`, also what its `UNSPECIFIED` does).
    BlockInitOnAnyError,
    /// Listen at once; a request whose token cannot be had gets an error (ESPv2's
    /// `ALWAYS_INIT`; `portico esp`'s only behaviour).
    AlwaysInit,
}

/// One kind of Service Control call: how long each attempt may take, and how many more attempts
/// follow one that failed in transport (no answer, connection refused, timed out). An answer,
/// even an error, is never retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallPolicy {
    pub timeout: Duration,
    pub retries: u32,
}

impl CallPolicy {
    /// The longest a caller waits for this call when every attempt times out.
    pub fn worst_case(&self) -> Duration {
        self.timeout.saturating_mul(self.retries.saturating_add(1))
    }
}

/// `--service_control_{check,quota,report}_{timeout_ms,retries}`. The defaults are ESP v1's
/// (its `aggregated.cc`): check 1,500 ms and 3 retries, quota 1,500 ms and 1, report 3,500 ms
/// and 5. ESPv2 shortened the timeouts (1,000/1,000/2,000 ms); Portico keeps ESP's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceControlCalls {
    pub check: CallPolicy,
    pub quota: CallPolicy,
    pub report: CallPolicy,
}

impl Default for ServiceControlCalls {
    fn default() -> Self {
        ServiceControlCalls {
            check: CallPolicy {
                timeout: Duration::from_millis(1500),
                retries: 3,
            },
            quota: CallPolicy {
                timeout: Duration::from_millis(1500),
                retries: 1,
            },
            report: CallPolicy {
                timeout: Duration::from_millis(3500),
                retries: 5,
            },
        }
    }
}

/// Largest `--service_control_*_timeout_ms`: ten minutes.
pub const MAX_SERVICE_CONTROL_TIMEOUT_MS: u64 = 600_000;
/// Largest `--service_control_*_retries`.
pub const MAX_SERVICE_CONTROL_RETRIES: u32 = 100;

/// The backend's protocol, from the `--backend` scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendScheme {
    Http,
    Https,
    /// gRPC: HTTP/2 cleartext (prior knowledge).
    Grpc,
    /// gRPC over TLS (ALPN `h2`), ESPv2's `grpcs://`.
    Grpcs,
}

/// The parsed `--backend`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAddr {
    pub scheme: BackendScheme,
    pub host: String,
    pub port: u16,
}

impl BackendAddr {
    /// `grpc://` or `grpcs://`.
    pub fn is_grpc(&self) -> bool {
        matches!(self.scheme, BackendScheme::Grpc | BackendScheme::Grpcs)
    }

    /// `host:port` as it goes into upstream URIs (IPv6 hosts bracketed).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// How ESP picks the service config at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutStrategy {
    Fixed,
    Managed,
}

/// One `--rewrite` rule.
#[derive(Debug, Clone)]
pub struct RewriteRule {
    pub pattern: regex::Regex,
    pub replacement: String,
}

/// Validated start-up settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Which proxy Portico stands in for: ESP v1 (`portico esp`) or ESPv2 (`portico espv2`);
    /// every place where they answer differently reads it ([`crate::dialect`]).
    pub dialect: crate::dialect::Dialect,
    pub service: Option<String>,
    pub version: Option<String>,
    pub rollout_strategy: RolloutStrategy,
    pub backend: BackendAddr,
    pub listen_address: IpAddr,
    pub http_port: Option<u16>,
    pub http2_port: Option<u16>,
    pub ssl_port: Option<u16>,
    /// The status server (`/endpoints_status`, `/healthz`, `/metrics`); `None`: not served
    /// (ESPv2's default, whose admin port is off unless `--status_port` names one). `Some(0)`:
    /// a port the system picks.
    pub status_port: Option<u16>,
    /// TLS on `--ssl_port`: the certificate (`--ssl_cert_path`/`--ssl_key_path`,
    /// `--generate_self_signed_cert`; ESPv2's `--ssl_server_cert_path`), client certificates
    /// (ESPv2's `--ssl_server_root_cert_path`), versions (`--ssl_protocols`; ESPv2's
    /// `--ssl_minimum_protocol`/`--ssl_maximum_protocol`) and suites.
    pub server_tls: crate::tls::ServerTls,
    /// TLS to `https://` backends: trust anchors (`--backend_ca_cert_path`; ESPv2's
    /// `--ssl_backend_client_root_certs_file`) and the proxy's client certificate
    /// (`--tls_mutual_auth`; ESPv2's `--ssl_backend_client_cert_path`).
    pub backend_tls: crate::tls::BackendTls,
    pub service_account_key: Option<PathBuf>,
    /// `--metadata`: a GCE-compatible metadata server base URL (already checked); with no key
    /// file, the proxy's own access tokens come from it.
    pub metadata: Option<String>,
    pub healthz: Option<String>,
    /// ESPv2's `--health_check_grpc_backend*`: `--healthz` answers 503 while the `grpc://`
    /// backend's `grpc.health.v1.Health/Check` says it is not serving ([`crate::grpc_health`]).
    pub grpc_backend_health: Option<HealthCheckSettings>,
    /// ESPv2's `--enable_grpc_for_http1` (its default, on): gRPC responses lose
    /// `Content-Length`, and to an HTTP/1.1 client they announce the gRPC status trailers
    /// ([`crate::forward::keep_grpc_trailers`]). Off (and for `portico esp`): HTTP/1.1 clients
    /// get no trailers, as from Envoy without `enable_trailers`.
    pub grpc_for_http1: bool,
    pub non_gcp: bool,
    pub service_json_path: Option<PathBuf>,
    pub management: Option<String>,
    pub service_control_url_override: Option<String>,
    pub network_fail_open: bool,
    /// `--skip_service_control_filter`: no `:check`, `:allocateQuota` or `:report` at all, and
    /// no API key required (ESP's `service_control off`).
    pub skip_service_control: bool,
    /// `--skip_jwt_authn_filter`: no JWT required or checked (ESP's `api_authentication off`).
    pub skip_jwt_authn: bool,
    /// Timeouts and retries of `:check`, `:allocateQuota` and `:report`.
    pub service_control_calls: ServiceControlCalls,
    /// 0 = unlimited, as in nginx.
    pub client_max_body_size: u64,
    pub xff_trusted: Vec<IpNet>,
    /// `--client_header_timeout` and `--keepalive_timeout`, for every listener.
    pub conn_limits: portico_listen::ConnLimits,
    /// `--keepalive_timeout=0`: one request per HTTP/1 connection.
    pub keep_alive: bool,
    /// `--large_client_header_buffers`.
    pub header_limits: HeaderLimits,
    /// `--client_body_timeout`.
    pub client_body_timeout: Duration,
    /// `--client_body_buffer_size`: bytes of a request body read before a backend connection
    /// is taken (0: none).
    pub client_body_buffer_size: usize,
    /// `--client_body_min_rate` (bytes/s, 0: none).
    pub client_body_min_rate: u64,
    pub client_ip_header: Option<String>,
    pub client_ip_position: i32,
    pub cors: Option<CorsSettings>,
    pub hsts: bool,
    pub rewrites: Vec<RewriteRule>,
    pub enable_websocket: bool,
    /// `--underscores_in_headers` (and ESPv2's refusal of names with `_` without it), the
    /// path flags, `X-Forwarded-Client-Cert` removal: how the request head is settled
    /// ([`crate::request_head`]).
    pub head: crate::request_head::HeadOptions,
    pub log_request_headers: Vec<String>,
    pub log_response_headers: Vec<String>,
    pub log_jwt_payload: Vec<String>,
    pub jwks_cache_duration: Option<Duration>,
    /// `--jwt_pad_forward_payload_header` (ESPv2): the JWT payload forwarded in
    /// `X-Endpoint-API-UserInfo` gets base64 `=` padding.
    pub jwt_pad_forward_payload: bool,
    /// ESPv2 accepts a token for the service's own name (`https://SERVICE`) when a provider
    /// lists no audiences; `--disable_jwt_audience_service_name_check` turns that off, and such
    /// a provider then accepts any audience.
    pub jwt_audience_service_name_check: bool,
    /// ESPv2's `--jwt_cache_size`: how many verified tokens are remembered (0: none); `None`:
    /// Portico's default.
    pub jwt_cache_size: Option<usize>,
    /// ESPv2's `--jwks_fetch_num_retries` and its back-off (`--jwks_fetch_retry_back_off_*`).
    pub jwks_fetch_retry: JwksFetchRetry,
    /// ESPv2's `--disable_oidc_discovery`: a config with a provider without `jwks_uri` is
    /// refused (at start, and at rollout it does not replace the serving config).
    pub disable_oidc_discovery: bool,
    pub enable_jwt_authorization_url_redirect: bool,
    /// Sampling, context headers and export of traces (crate::trace, docs/tracing.md).
    pub tracing: crate::trace::TraceSettings,
    pub rollout_fetch_throttle_window: Option<Duration>,
    pub worker_threads: usize,
    /// Per serving thread, for each HTTP/1.1 backend.
    pub backend_max_connections: usize,
    /// When and how often a backend call is made again (ESPv2's `--backend_retry_*` flags);
    /// `None`: never (ESP).
    pub backend_retry: Option<crate::retry::RetryPolicy>,
    /// How backend connections are opened and how many requests each backend may carry
    /// (ESPv2's `--cluster_connect_timeout`, `--backend_dns_lookup_family`,
    /// `--dns_resolver_addresses`, `--backend_cluster_maximum_requests`); `portico esp`: the
    /// system's resolver and connect timeout, every address, no limit.
    pub backend_net: crate::backend_net::BackendNetSettings,
    /// ESPv2's `--enable_backend_address_override`: every method goes to `--backend`, rule
    /// addresses (and their path translation) unused; deadlines and backend authentication
    /// still apply.
    pub backend_address_override: bool,
    pub backend_timeout: Duration,
    /// `--experimental_proxy_backend_host_header`.
    pub backend_host_header: Option<http::HeaderValue>,
    /// `--compute_platform_override`.
    pub compute_platform: Option<String>,
    /// Where the proxy runs, as the metadata server said at start-up (`portico espv2` asks it
    /// unless `--non_gcp`); `None` when it was not asked or not reached.
    pub gcp: Option<crate::gcp_metadata::GcpAttributes>,
    /// ESPv2's `--[no-]service_control_enable_api_key_uid_reporting` (default on): a verified
    /// key's `/credential_id` is its uid when the check names one.
    pub api_key_uid_reporting: bool,
    /// ESPv2's `--check_metadata` without `--service`: the service name is read from the
    /// metadata server at start-up.
    pub service_from_metadata: bool,
    /// `--report_log_entries_per_second`.
    pub report_log_entries_per_second: usize,
    /// `--report_max_log_entries_per_flush`.
    pub report_max_log_entries_per_flush: usize,
    /// `--enable_backend_routing`.
    pub enable_backend_routing: bool,
    /// `--access_log`: `None` = stdout.
    pub access_log: Option<String>,
    /// ESPv2's `--add_request_header` then `--append_request_header`: set on the request to the
    /// backend, last ([`crate::header_rules`]; [`crate::header_rules::from_espv2_flags`]).
    pub request_headers_to_add: Vec<crate::header_rules::HeaderRule>,
    /// ESPv2's `--add_response_header` then `--append_response_header`: set on every response to
    /// the client ([`crate::header_rules`]).
    pub response_headers_to_add: Vec<crate::header_rules::HeaderRule>,
    /// ESPv2's `--enable_operation_name_header`: the matched method's selector goes to the
    /// backend in this header ([`OPERATION_NAME_HEADER`]); a client's copy never does.
    pub operation_name_header: Option<http::HeaderName>,
    /// ESPv2's `--envoy_xff_num_trusted_hops`/`--envoy_use_remote_address`: `Some` replaces
    /// the `xff_trusted` walk with Envoy's rule ([`XffHops`]).
    pub xff_hops: Option<XffHops>,
    /// ESPv2's `--enable_response_compression` ([`crate::compression`]).
    pub response_compression: Option<crate::compression::CompressionSettings>,
    /// ESPv2's `--http_request_timeout_s`: how long each of the proxy's own calls may take
    /// (Service Management, metadata server, IAM Credentials, token endpoint). `None`: each
    /// keeps `portico esp`'s own limit.
    pub http_request_timeout: Option<Duration>,
    /// ESPv2's `--*_iam_service_account` flags ([`crate::iam_credentials`]).
    pub iam: Option<crate::iam_credentials::IamSettings>,
    /// ESPv2's `--dependency_error_behavior`: whether serving waits for the tokens the proxy
    /// needs ([`crate::server`]).
    pub dependency_error_behavior: DependencyErrorBehavior,
    /// What the command line made of itself that an operator should read once at start-up
    /// (where application default credentials were found, flags without effect).
    pub startup_notes: Vec<String>,
    /// ESPv2's `--access_log_format`: Envoy's command operators, compiled at start-up
    /// ([`crate::access_log::Format`]); `None`: the JSON lines.
    pub access_log_format: Option<std::sync::Arc<crate::access_log::Format>>,
    /// ESPv2's `--enable_debug`: debug-level logs from Portico's crates unless `RUST_LOG` says
    /// otherwise.
    pub enable_debug: bool,
    /// ESPv2's `--generated_header_prefix`: the names of the headers the proxy generates.
    pub generated_headers: GeneratedHeaders,
    /// ESPv2's `--client_ip_from_forwarded_header`: the caller IP for Service Control is the
    /// `for=` of the last element of `Forwarded` (RFC 7239) when it names an IP address.
    pub client_ip_from_forwarded: bool,
    /// The operation of the `--healthz` answer, in the access log (ESPv2:
    /// `<--health_check_operation>.ESPv2_Autogenerated_HealthCheck`); `None` for ESP.
    pub health_check_operation: Option<String>,
    /// ESPv2's `--cors_operation_delimiter`: `allowCors` preflight rules are named
    /// `<API><delimiter><method>`, one per method; `None`: ESP's single `CORS` operation.
    pub cors_operation_delimiter: Option<String>,
    /// ESPv2's `--disallow_colon_in_wildcard_path_segment` ([`portico_config::PathMatcherBuilder::disallow_colon_in_wildcards`]).
    pub disallow_colon_in_wildcard_path_segment: bool,
    /// HTTP/JSON → gRPC transcoding (`--transcoding_*`; ESP v1's two hidden ones), used when the
    /// backend or a backend rule is `grpc://` (docs/grpc.md, "Transcoding and gRPC-Web").
    pub transcoding: portico_transcode::Options,
    /// ESP v1: at most one intermediate report per this interval for a long gRPC stream
    /// (`intermediate_report_min_interval` of `--server_config_template`; 10 s by default).
    /// Not used by `portico espv2`, whose reports are one per call.
    pub intermediate_report_interval: Duration,
    /// Flags accepted only for compatibility, reported once at start-up.
    pub ignored_flags: Vec<&'static str>,
    /// Flags accepted whose feature is not built yet, reported once at start-up (ESPv2's
    /// flags that issue 17 still has to implement; always empty for `portico esp`).
    pub not_implemented_flags: Vec<&'static str>,
}

impl Settings {
    /// Backend authentication (`jwt_audience` rules) is off: requests go to such backends
    /// without an ID token (ESPv2 under `--non_gcp`).
    pub fn backend_auth_disabled(&self) -> bool {
        self.non_gcp && self.dialect.non_gcp_disables_backend_auth()
    }
}

/// nginx's `large_client_header_buffers NUMBER SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderLimits {
    /// The request line, and each header line (`name: value`), at most this many bytes.
    pub line: usize,
    /// The whole request head at most this many bytes.
    pub total: usize,
}

impl Default for HeaderLimits {
    /// nginx's default, `4 8k`.
    fn default() -> Self {
        HeaderLimits {
            line: 8 << 10,
            total: 32 << 10,
        }
    }
}

/// Parses `--backend` the way start_esp does: the scheme is optional (HTTP), `https://` defaults
/// to port 443, `http://` to 80.
pub fn parse_backend(s: &str) -> Result<BackendAddr, String> {
    let (scheme, rest) = if let Some(r) = s.strip_prefix("http://") {
        (BackendScheme::Http, r)
    } else if let Some(r) = s.strip_prefix("https://") {
        (BackendScheme::Https, r)
    } else if let Some(r) = s.strip_prefix("grpc://") {
        (BackendScheme::Grpc, r)
    } else if let Some(r) = s.strip_prefix("grpcs://") {
        (BackendScheme::Grpcs, r)
    } else if s.contains("://") {
        return Err(format!(
            "invalid --backend {s:?}: unsupported scheme (use http://, https://, grpc:// or grpcs://)"
        ));
    } else {
        (BackendScheme::Http, s)
    };
    let hostport = rest.strip_suffix('/').unwrap_or(rest);
    if hostport.contains('/') {
        return Err(format!(
            "invalid --backend {s:?}: a path is not allowed, give host[:port] only"
        ));
    }
    let default_port = match scheme {
        BackendScheme::Https | BackendScheme::Grpcs => 443,
        BackendScheme::Http => 80,
        BackendScheme::Grpc => 0,
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("invalid --backend {s:?}: unclosed '[' in IPv6 address"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(s, p)?,
            None if after.is_empty() => default_port,
            None => return Err(format!("invalid --backend {s:?}: garbage after ']'")),
        };
        (h.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), parse_port(s, p)?),
            None => (hostport.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err(format!("invalid --backend {s:?}: missing host"));
    }
    if port == 0 {
        return Err(format!(
            "invalid --backend {s:?}: a port is required for grpc://"
        ));
    }
    Ok(BackendAddr { scheme, host, port })
}

fn parse_port(whole: &str, p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("invalid --backend {whole:?}: bad port {p:?}")),
    }
}

/// ESPv2's `--health_check_grpc_backend*` as given on the command line; the checker is
/// [`crate::grpc_health`] (kept here, below it, as plain data every layer may name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckSettings {
    /// The `service` of each `HealthCheckRequest`; empty asks for the server as a whole.
    pub service: String,
    /// Between checks once the backend has carried traffic, and each check's timeout.
    pub interval: Duration,
    /// Between checks until the backend has carried traffic.
    pub no_traffic_interval: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_forms() {
        let b = parse_backend("https://example.com").unwrap();
        assert_eq!((b.scheme, b.port), (BackendScheme::Https, 443));
        let b = parse_backend("grpcs://books.example").unwrap();
        assert_eq!((b.scheme, b.port), (BackendScheme::Grpcs, 443));
        let b = parse_backend("grpcs://127.0.0.1:8443").unwrap();
        assert_eq!((b.scheme, b.port), (BackendScheme::Grpcs, 8443));
        let b = parse_backend("http://10.0.0.1").unwrap();
        assert_eq!(b.port, 80);
        let b = parse_backend("[::1]:8081").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("::1", 8081));
        assert_eq!(b.authority(), "[::1]:8081");
        assert!(parse_backend("grpc://h")
            .unwrap_err()
            .contains("port is required"));
        assert!(parse_backend("http://h:1/path")
            .unwrap_err()
            .contains("path"));
        assert!(parse_backend("h:99999").unwrap_err().contains("bad port"));
    }

    #[test]
    fn xff_hops_are_a_whole_number() {
        assert_eq!(parse_xff_num_trusted_hops("2"), Ok(2));
        assert_eq!(parse_xff_num_trusted_hops(" 0 "), Ok(0));
        for bad in ["-1", "1.5", "", "two", "4294967296"] {
            let e = parse_xff_num_trusted_hops(bad).unwrap_err();
            assert!(e.starts_with("invalid --envoy_xff_num_trusted_hops"), "{e}");
        }
    }
}

/// How a key-set fetch that got no answer or a 5xx is retried (ESPv2's JWKS retry policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwksFetchRetry {
    /// 0: one try only (ESP, and ESPv2's default).
    pub retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for JwksFetchRetry {
    fn default() -> Self {
        JwksFetchRetry {
            retries: 0,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(32),
        }
    }
}
