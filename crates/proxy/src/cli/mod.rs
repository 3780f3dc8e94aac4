//! `portico esp`: ESP v1's startup flags, by their ESP names, parsed and validated into
//! [`Settings`]. Both `--flag=value` and `--flag value` work, and so do ESP's short forms
//! (`-s`, `-v`, `-R`, `-a`, `-p`, `-P`, `-S`, `-N`, `-k`, `-z`, `-x`).
//!
//! Exit codes follow `start_esp`: 4 for bad arguments, 2 when one port is given twice,
//! 3 for other setup errors (unreadable files, listeners that cannot bind), 1 when the
//! service configuration cannot be fetched.
//!
//! nginx tuning flags that have no meaning without nginx (`--worker_processes`, ...) are
//! accepted so existing command lines keep working, and each one is logged as ignored.
//! `--keepalive_timeout`, `--client_body_timeout`, `--client_body_buffer_size` and
//! `--large_client_header_buffers` do what nginx does with them (see [`crate::server`] and
//! docs/security.md).

pub mod espv2;
pub mod server_config;

use crate::cors::CorsSettings;
use crate::settings::{
    parse_backend, HeaderLimits, RewriteRule, RolloutStrategy, ServiceControlCalls, Settings,
    DEFAULT_BACKEND_TIMEOUT_S, DEFAULT_XFF_TRUSTED_PROXY_LIST, EXIT_BAD_ARGS, EXIT_PORT_CONFLICT,
    EXIT_SETUP, MAX_SERVICE_CONTROL_RETRIES, MAX_SERVICE_CONTROL_TIMEOUT_MS,
};
use crate::tls::{
    BackendRoots, BackendTls, CertKeyFiles, ProtocolVersions, ServerIdentity, ServerTls,
};
use clap::{ArgAction, Parser};
use ipnet::IpNet;
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const DEFAULT_CORS_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";
const DEFAULT_CORS_HEADERS: &str =
    "DNT,User-Agent,X-Requested-With,If-Modified-Since,Cache-Control,Content-Type,Range,Authorization";
const DEFAULT_CORS_EXPOSE: &str = "Content-Length,Content-Range";

/// The raw command line, named as ESP names its flags.
#[derive(Debug, Parser)]
#[command(
    name = "portico esp",
    about = "ESP-compatible API proxy. Accepts Extensible Service Proxy v1 startup flags.",
    disable_version_flag = true,
    after_help = "Portico listens on 127.0.0.1 unless --listen_address is given; in a container \
                  pass --listen_address=0.0.0.0 (the Portico image does)."
)]
pub struct EspArgs {
    /// Endpoints service name.
    #[arg(short = 's', long = "service")]
    pub service: Option<String>,
    /// Service config id; without it the latest successful rollout is loaded.
    #[arg(short = 'v', long = "version")]
    pub version: Option<String>,
    /// `fixed` or `managed` (follow new rollouts at run time).
    #[arg(short = 'R', long = "rollout_strategy", default_value = "fixed")]
    pub rollout_strategy: String,
    /// Backend address: `host:port`, `http://host[:port]`, `https://host[:port]`, `grpc://host:port`.
    #[arg(short = 'a', long = "backend", default_value = "127.0.0.1:8081")]
    pub backend: String,
    /// HTTP/1.x port (also accepts cleartext HTTP/2 with prior knowledge).
    #[arg(short = 'p', long = "http_port")]
    pub http_port: Option<u16>,
    /// Cleartext HTTP/2 port.
    #[arg(short = 'P', long = "http2_port")]
    pub http2_port: Option<u16>,
    /// TLS port (HTTP/1.1 and HTTP/2 via ALPN).
    #[arg(short = 'S', long = "ssl_port")]
    pub ssl_port: Option<u16>,
    /// Status server port (`/endpoints_status`, `/healthz`, `/metrics`).
    #[arg(short = 'N', long = "status_port", default_value_t = 8090)]
    pub status_port: u16,
    /// Service-account key JSON (falls back to GOOGLE_APPLICATION_CREDENTIALS).
    #[arg(
        short = 'k',
        long = "service_account_key",
        env = "GOOGLE_APPLICATION_CREDENTIALS"
    )]
    pub service_account_key: Option<PathBuf>,
    /// Adds `GET /<name>` answering 200 on the serving ports.
    #[arg(short = 'z', long = "healthz")]
    pub healthz: Option<String>,
    /// Do not use the GCE metadata server (requires --service_account_key).
    #[arg(long = "non_gcp", action = ArgAction::SetTrue)]
    pub non_gcp: bool,
    /// Load the service config from this `google.api.Service` JSON file.
    #[arg(long = "service_json_path")]
    pub service_json_path: Option<PathBuf>,
    /// Service Management base URL.
    #[arg(short = 'g', long = "management")]
    pub management: Option<String>,
    /// Service Control base URL (overrides `control.environment`).
    #[arg(long = "service_control_url_override")]
    pub service_control_url_override: Option<String>,
    /// `open` (allow requests when Service Control is unreachable) or `close`.
    #[arg(long = "service_control_network_fail_policy", default_value = "open")]
    pub service_control_network_fail_policy: String,
    /// ESPv2: milliseconds one `:check` attempt may take (default 1500, ESP's).
    #[arg(long = "service_control_check_timeout_ms")]
    pub service_control_check_timeout_ms: Option<String>,
    /// ESPv2: further `:check` attempts after one that got no answer (default 3, ESP's).
    #[arg(long = "service_control_check_retries")]
    pub service_control_check_retries: Option<String>,
    /// ESPv2: milliseconds one `:allocateQuota` attempt may take (default 1500, ESP's).
    #[arg(long = "service_control_quota_timeout_ms")]
    pub service_control_quota_timeout_ms: Option<String>,
    /// ESPv2: further `:allocateQuota` attempts after one that got no answer (default 1, ESP's).
    #[arg(long = "service_control_quota_retries")]
    pub service_control_quota_retries: Option<String>,
    /// ESPv2: milliseconds one `:report` attempt may take (default 3500, ESP's).
    #[arg(long = "service_control_report_timeout_ms")]
    pub service_control_report_timeout_ms: Option<String>,
    /// ESPv2: further `:report` attempts after one that got no answer (default 5, ESP's); a
    /// batch still undelivered stays queued and is sent again later.
    #[arg(long = "service_control_report_retries")]
    pub service_control_report_retries: Option<String>,
    /// ESPv2: no Service Control at all (ESP's `service_control off`): no check, quota or report,
    /// no API key required; methods are still matched.
    #[arg(long = "skip_service_control_filter", action = ArgAction::SetTrue)]
    pub skip_service_control_filter: bool,
    /// ESPv2: no JWT authentication (ESP's `api_authentication off`): tokens are neither required
    /// nor checked, and the backend gets no `X-Endpoint-API-UserInfo`.
    #[arg(long = "skip_jwt_authn_filter", action = ArgAction::SetTrue)]
    pub skip_jwt_authn_filter: bool,
    /// Deprecated in ESP and overwritten by --service_control_network_fail_policy; accepted.
    #[arg(long = "service_control_network_fail_open", action = ArgAction::SetTrue)]
    pub service_control_network_fail_open: bool,
    /// Maximum request body size, nginx syntax (`32m`, `512k`, `0` = unlimited).
    #[arg(long = "client_max_body_size", default_value = "32m")]
    pub client_max_body_size: String,
    /// Peers whose X-Forwarded-For is trusted (comma-separated CIDRs or addresses); the client
    /// is the right-most address not in the list. Default: loopback, private and link-local
    /// ranges (ESP's default, every address, is `0.0.0.0/0,::/0`).
    #[arg(
        short = 'x',
        long = "xff_trusted_proxy_list",
        default_value = DEFAULT_XFF_TRUSTED_PROXY_LIST
    )]
    pub xff_trusted_proxy_list: String,
    /// Header from which the caller IP reported to Service Control is taken.
    #[arg(long = "client_ip_header")]
    pub client_ip_header: Option<String>,
    /// Position in --client_ip_header's comma list; negative counts from the end.
    #[arg(
        long = "client_ip_position",
        default_value_t = 0,
        allow_hyphen_values = true
    )]
    pub client_ip_position: i32,
    /// `basic` or `cors_with_regex`.
    #[arg(long = "cors_preset")]
    pub cors_preset: Option<String>,
    #[arg(long = "cors_allow_origin", default_value = "*")]
    pub cors_allow_origin: String,
    #[arg(long = "cors_allow_origin_regex", default_value = "")]
    pub cors_allow_origin_regex: String,
    #[arg(long = "cors_allow_methods", default_value = DEFAULT_CORS_METHODS)]
    pub cors_allow_methods: String,
    #[arg(long = "cors_allow_headers", default_value = DEFAULT_CORS_HEADERS)]
    pub cors_allow_headers: String,
    #[arg(long = "cors_allow_credentials", action = ArgAction::SetTrue)]
    pub cors_allow_credentials: bool,
    #[arg(long = "cors_expose_headers", default_value = DEFAULT_CORS_EXPOSE)]
    pub cors_expose_headers: String,
    /// Adds `Strict-Transport-Security` to every response.
    #[arg(long = "enable_strict_transport_security", action = ArgAction::SetTrue)]
    pub enable_strict_transport_security: bool,
    /// `"<regex> <replacement>"`, applied in order to the request URI; the first match wins.
    #[arg(long = "rewrite", action = ArgAction::Append)]
    pub rewrite: Vec<String>,
    /// Pass WebSocket upgrades through to the backend.
    #[arg(long = "enable_websocket", action = ArgAction::SetTrue)]
    pub enable_websocket: bool,
    /// Forward client headers whose names contain `_` (dropped by default, as nginx does). The
    /// proxy's own headers (`X-Endpoint-API-*`, method overrides, other spellings of
    /// `X-Forwarded-For`/`X-Real-IP`) are removed in every spelling either way.
    #[arg(long = "underscores_in_headers", action = ArgAction::SetTrue)]
    pub underscores_in_headers: bool,
    /// ESPv2: match and forward the path as received: no decoding, no dot-segment removal, no
    /// `\` read as `/`, no refusal of ambiguous encodings (an encoded NUL is still refused).
    /// Repeated slashes are still merged unless --disable_merge_slashes_in_path.
    #[arg(long = "disable_normalize_path", action = ArgAction::SetTrue)]
    pub disable_normalize_path: bool,
    /// ESPv2: keep repeated slashes in the path instead of merging them.
    #[arg(long = "disable_merge_slashes_in_path", action = ArgAction::SetTrue)]
    pub disable_merge_slashes_in_path: bool,
    /// ESPv2: decode `%2F` and `%5C` in the path and redirect (307) the client to the resulting
    /// path; gRPC requests are refused (400) instead.
    #[arg(long = "disallow_escaped_slashes_in_path", action = ArgAction::SetTrue)]
    pub disallow_escaped_slashes_in_path: bool,
    /// Portico: address the serving and status listeners bind to (default loopback).
    // A later --listen_address wins over an earlier one, so `docker run IMAGE --listen_address=...`
    // can override the one the image's entrypoint passes.
    #[arg(
        long = "listen_address",
        default_value = "127.0.0.1",
        overrides_with = "listen_address"
    )]
    pub listen_address: String,
    /// Request headers copied into the report's log entry (comma-separated).
    #[arg(long = "log_request_headers")]
    pub log_request_headers: Option<String>,
    /// Response headers copied into the report's log entry (comma-separated).
    #[arg(long = "log_response_headers")]
    pub log_response_headers: Option<String>,
    /// JWT payload claims copied into the report's log entry (comma-separated).
    #[arg(long = "log_jwt_payload")]
    pub log_jwt_payload: Option<String>,
    /// JWKS cache lifetime in seconds (default 300).
    #[arg(long = "jwks_cache_duration_in_s")]
    pub jwks_cache_duration_in_s: Option<u64>,
    /// Answer a missing or expired JWT with 302 to the provider's `authorizationUrl`.
    #[arg(long = "enable_jwt_authorization_url_redirect", action = ArgAction::SetTrue)]
    pub enable_jwt_authorization_url_redirect: bool,
    /// Trace no request unless its X-Cloud-Trace-Context (`o=1`) or grpc-trace-bin asks.
    #[arg(long = "disable_cloud_trace_auto_sampling", action = ArgAction::SetTrue)]
    pub disable_cloud_trace_auto_sampling: bool,
    /// Portico's: ESP's `minimum_qps` server-config knob. Auto-sample at most this many
    /// requests per second (default 0.1: one per 10 s).
    #[arg(long = "cloud_trace_minimum_qps")]
    pub cloud_trace_minimum_qps: Option<f64>,
    /// Portico's: send traces as OTLP/HTTP protobuf to this URL (for example
    /// `http://127.0.0.1:4318/v1/traces`) instead of Cloud Trace.
    #[arg(long = "tracing_otlp_endpoint")]
    pub tracing_otlp_endpoint: Option<String>,
    /// TLS certificate for --ssl_port.
    #[arg(long = "ssl_cert_path", default_value = "/etc/nginx/ssl/nginx.crt")]
    pub ssl_cert_path: PathBuf,
    /// TLS private key for --ssl_port.
    #[arg(long = "ssl_key_path", default_value = "/etc/nginx/ssl/nginx.key")]
    pub ssl_key_path: PathBuf,
    /// Generate a self-signed certificate (CN=localhost) for --ssl_port at start-up.
    #[arg(long = "generate_self_signed_cert", action = ArgAction::SetTrue)]
    pub generate_self_signed_cert: bool,
    /// TLS versions --ssl_port accepts, nginx's names in any case (SSLv2, SSLv3, TLSv1, TLSv1.1,
    /// TLSv1.2, TLSv1.3); repeatable, or several in one value separated by spaces. Portico speaks
    /// TLSv1.2 and TLSv1.3 only: older names are dropped with a warning, and a list naming
    /// neither is refused. Default: both.
    #[arg(long = "ssl_protocols", action = ArgAction::Append)]
    pub ssl_protocols: Vec<String>,
    /// Present a client certificate to `https://` backends (TLS mutual authentication): by
    /// default ESP's /etc/nginx/ssl/backend.crt and backend.key.
    #[arg(short = 't', long = "tls_mutual_auth", action = ArgAction::SetTrue)]
    pub tls_mutual_auth: bool,
    /// Portico: the client certificate (PEM, chain first) for --tls_mutual_auth, in place of
    /// /etc/nginx/ssl/backend.crt.
    #[arg(long = "backend_client_cert_path")]
    pub backend_client_cert_path: Option<PathBuf>,
    /// Portico: the client certificate's private key for --tls_mutual_auth, in place of
    /// /etc/nginx/ssl/backend.key.
    #[arg(long = "backend_client_key_path")]
    pub backend_client_key_path: Option<PathBuf>,
    /// Portico: serving threads (one single-threaded runtime each, SO_REUSEPORT); default = cores.
    #[arg(long = "worker_threads")]
    pub worker_threads: Option<usize>,
    /// Portico: connections open to an HTTP/1.1 backend at most, per serving thread (busy, idle
    /// and being dialled); a request finding them all busy waits for one, within
    /// --http_request_timeout_s. Default 100 (Envoy's circuit breakers cap at 1,024 per cluster;
    /// nginx has no cap).
    #[arg(long = "backend_max_connections", default_value_t = crate::upstream::DEFAULT_MAX_CONNECTIONS)]
    pub backend_max_connections: usize,
    /// Portico: seconds to wait for the backend's response head, counted from the end of the
    /// request body (default 15, ESPv2's default backend deadline; ESP's nginx waited 86400).
    /// An `x-google-backend` `deadline` overrides it per method.
    #[arg(long = "http_request_timeout_s", default_value_t = DEFAULT_BACKEND_TIMEOUT_S)]
    pub http_request_timeout_s: f64,
    /// Idle time allowed on a client connection between requests, nginx syntax (`75s`, `2m`;
    /// default 75s); `0` closes every connection after one response.
    #[arg(long = "keepalive_timeout")]
    pub keepalive_timeout: Option<String>,
    /// Longest pause between two reads of a request body, nginx syntax (default 60s); a client
    /// that stops sending its body is answered 408.
    #[arg(long = "client_body_timeout")]
    pub client_body_timeout: Option<String>,
    /// How much of a request body is read before a backend connection is taken, nginx syntax
    /// (default 16k, nginx's); a larger body streams. `0`: stream every body from its first byte.
    #[arg(long = "client_body_buffer_size")]
    pub client_body_buffer_size: Option<String>,
    /// Portico: lowest average rate (bytes per second, after a 5 s grace period) at which a body
    /// larger than `--client_body_buffer_size` must arrive while it holds a backend connection
    /// (default 240, Kestrel's); slower is answered 408. `0`: no minimum.
    #[arg(long = "client_body_min_rate")]
    pub client_body_min_rate: Option<u64>,
    /// Portico (nginx's directive): time allowed for a request head, from a new connection or
    /// from the first byte after an idle period (default 60s).
    #[arg(long = "client_header_timeout")]
    pub client_header_timeout: Option<String>,
    /// Request-head limits, nginx syntax `"NUMBER SIZE"` (default `"4 8k"`): the request line
    /// and each header line at most SIZE, the whole head at most NUMBER × SIZE.
    #[arg(long = "large_client_header_buffers")]
    pub large_client_header_buffers: Option<String>,
    /// Portico: extra trusted CA certificates (PEM) for an `https://` backend, e.g. a private CA
    /// or the backend's self-signed certificate. The public web PKI is always trusted.
    #[arg(long = "backend_ca_cert_path")]
    pub backend_ca_cert_path: Option<PathBuf>,
    /// Where the access log goes: a file path, `/dev/stdout` (default) or `off`.
    #[arg(long = "access_log")]
    pub access_log: Option<String>,
    /// Accepted for compatibility: Portico polls rollouts every 2 s instead of ESP's random delay.
    #[arg(long = "rollout_fetch_throttle_window_in_s")]
    pub rollout_fetch_throttle_window_in_s: Option<u64>,

    // nginx-only tuning and ESP-internal knobs: accepted and ignored with a logged note.
    #[arg(long = "worker_processes", hide = true)]
    pub worker_processes: Option<String>,
    #[arg(long = "allow_invalid_headers", action = ArgAction::SetTrue, hide = true)]
    pub allow_invalid_headers: bool,
    #[arg(long = "enable_debug", action = ArgAction::SetTrue, hide = true)]
    pub enable_debug: bool,
    #[arg(long = "server_config_dir", hide = true)]
    pub server_config_dir: Option<String>,
    #[arg(long = "config_dir", hide = true)]
    pub config_dir: Option<String>,
    #[arg(long = "dns", hide = true)]
    pub dns: Option<String>,
    #[arg(long = "pid_file", hide = true)]
    pub pid_file: Option<String>,
    #[arg(long = "check_metadata", action = ArgAction::SetTrue, hide = true)]
    pub check_metadata: bool,
    /// GCE-compatible metadata server base URL (e.g. `http://169.254.169.254`); without a
    /// key file, the proxy's access tokens for Service Control and Management come from it.
    #[arg(short = 'm', long = "metadata")]
    pub metadata: Option<String>,
    #[arg(long = "enable_api_key_uid_reporting", hide = true)]
    pub enable_api_key_uid_reporting: Option<String>,
    #[arg(long = "cloud_trace_url_override", hide = true)]
    pub cloud_trace_url_override: Option<String>,
    #[arg(long = "transcoding_always_print_primitive_fields", action = ArgAction::SetTrue, hide = true)]
    pub transcoding_always_print_primitive_fields: bool,
    #[arg(long = "transcoding_preserve_proto_field_names", action = ArgAction::SetTrue, hide = true)]
    pub transcoding_preserve_proto_field_names: bool,
    #[arg(long = "template", hide = true)]
    pub template: Option<String>,
    #[arg(long = "server_config_template", hide = true)]
    pub server_config_template: Option<String>,
    #[arg(long = "nginx", hide = true)]
    pub nginx: Option<String>,
    #[arg(long = "nginx_debug", hide = true)]
    pub nginx_debug: Option<String>,

    /// Host header sent to the backend instead of the client's.
    #[arg(long = "experimental_proxy_backend_host_header")]
    pub experimental_proxy_backend_host_header: Option<String>,
    /// `servicecontrol.googleapis.com/platform` label in reports (default `unknown`).
    #[arg(long = "compute_platform_override")]
    pub compute_platform_override: Option<String>,
    /// Portico: `endpoints_log` entries kept per report signature per second (0 = none). Request
    /// counts and latencies stay exact; entries over the cap are counted as dropped.
    #[arg(long = "report_log_entries_per_second", default_value_t = crate::service_control::DEFAULT_LOG_ENTRIES_PER_SECOND)]
    pub report_log_entries_per_second: usize,
    /// Portico: `endpoints_log` entries sent per report flush across all signatures (errors first).
    #[arg(long = "report_max_log_entries_per_flush", default_value_t = crate::service_control::DEFAULT_MAX_LOG_ENTRIES_PER_FLUSH)]
    pub report_max_log_entries_per_flush: usize,

    // ESP features Portico does not have: refused with a precise message, not ignored.
    #[arg(short = 'n', long = "nginx_config", hide = true)]
    pub nginx_config: Option<String>,
    #[arg(short = 'c', long = "service_config_url", hide = true)]
    pub service_config_url: Option<String>,
    /// Route each method to its `backend.rules` address (`x-google-backend`) instead of --backend.
    #[arg(long = "enable_backend_routing", action = ArgAction::SetTrue)]
    pub enable_backend_routing: bool,
    #[arg(long = "experimental_enable_multiple_api_configs", action = ArgAction::SetTrue, hide = true)]
    pub experimental_enable_multiple_api_configs: bool,
    #[arg(long = "enable_grpc_backend_ssl", action = ArgAction::SetTrue, hide = true)]
    pub enable_grpc_backend_ssl: bool,
    #[arg(long = "grpc_backend_ssl_root_certs_file", hide = true)]
    pub grpc_backend_ssl_root_certs_file: Option<String>,
    #[arg(long = "grpc_backend_ssl_private_key_file", hide = true)]
    pub grpc_backend_ssl_private_key_file: Option<String>,
    #[arg(long = "grpc_backend_ssl_cert_chain_file", hide = true)]
    pub grpc_backend_ssl_cert_chain_file: Option<String>,
    #[arg(long = "generate_config_file_only", action = ArgAction::SetTrue, hide = true)]
    pub generate_config_file_only: bool,
    #[arg(long = "server_config_generation_path", hide = true)]
    pub server_config_generation_path: Option<String>,
}

/// Parses `large_client_header_buffers` (`"4 8k"`).
pub fn parse_header_buffers(s: &str) -> Result<HeaderLimits, String> {
    let mut parts = s.split_whitespace();
    let (Some(n), Some(size), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!(
            "invalid --large_client_header_buffers {s:?}: expected \"NUMBER SIZE\", e.g. \"4 8k\""
        ));
    };
    let n: usize = n
        .parse()
        .ok()
        .filter(|n| (1..=64).contains(n))
        .ok_or_else(|| {
            format!("invalid --large_client_header_buffers {s:?}: NUMBER must be 1 to 64")
        })?;
    let line = parse_nginx_size(size)
        .map_err(|e| format!("--large_client_header_buffers: {e}"))
        .and_then(|b| {
            usize::try_from(b)
                .ok()
                .filter(|b| (1 << 10..=1 << 20).contains(b))
                .ok_or_else(|| {
                    format!("invalid --large_client_header_buffers {s:?}: SIZE must be 1k to 1m")
                })
        })?;
    Ok(HeaderLimits {
        line,
        total: line * n,
    })
}

/// Parses an nginx time (`75s`, `60`, `500ms`, `2m`, `1h`, `1d`; no unit means seconds). ESP's
/// `--keepalive_timeout` may carry nginx's optional second value (the `Keep-Alive: timeout=`
/// header); only the first is used.
pub fn parse_nginx_time(s: &str) -> Result<Duration, String> {
    let t = s.split_whitespace().next().unwrap_or("");
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid time {s:?}: expected a number with an optional unit"))?;
    let ms = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "invalid time {s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ))
        }
    };
    n.checked_mul(ms)
        .filter(|ms| *ms <= 7 * 86_400_000)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("invalid time {s:?}: more than 7 days"))
}

/// Parses `--service_control_*_timeout_ms`: whole milliseconds, 1 to 600,000.
fn parse_sc_timeout(flag: &str, v: &str) -> Result<Duration, String> {
    match v.trim().parse::<u64>() {
        Ok(ms) if (1..=MAX_SERVICE_CONTROL_TIMEOUT_MS).contains(&ms) => {
            Ok(Duration::from_millis(ms))
        }
        _ => Err(format!(
            "invalid {flag} {v:?}: must be a whole number of milliseconds from 1 to \
             {MAX_SERVICE_CONTROL_TIMEOUT_MS}"
        )),
    }
}

/// Parses `--service_control_*_retries`: 0 (one attempt only) to 100.
fn parse_sc_retries(flag: &str, v: &str) -> Result<u32, String> {
    match v.trim().parse::<u32>() {
        Ok(n) if n <= MAX_SERVICE_CONTROL_RETRIES => Ok(n),
        _ => Err(format!(
            "invalid {flag} {v:?}: must be a whole number from 0 to {MAX_SERVICE_CONTROL_RETRIES}"
        )),
    }
}

/// The six Service Control call flags over ESP's defaults.
fn service_control_calls(a: &EspArgs) -> Result<ServiceControlCalls, ArgError> {
    let mut calls = ServiceControlCalls::default();
    for (flag, value, policy) in [
        (
            "--service_control_check_timeout_ms",
            &a.service_control_check_timeout_ms,
            &mut calls.check,
        ),
        (
            "--service_control_quota_timeout_ms",
            &a.service_control_quota_timeout_ms,
            &mut calls.quota,
        ),
        (
            "--service_control_report_timeout_ms",
            &a.service_control_report_timeout_ms,
            &mut calls.report,
        ),
    ] {
        if let Some(v) = value {
            policy.timeout = parse_sc_timeout(flag, v).map_err(ArgError::bad)?;
        }
    }
    for (flag, value, policy) in [
        (
            "--service_control_check_retries",
            &a.service_control_check_retries,
            &mut calls.check,
        ),
        (
            "--service_control_quota_retries",
            &a.service_control_quota_retries,
            &mut calls.quota,
        ),
        (
            "--service_control_report_retries",
            &a.service_control_report_retries,
            &mut calls.report,
        ),
    ] {
        if let Some(v) = value {
            policy.retries = parse_sc_retries(flag, v).map_err(ArgError::bad)?;
        }
    }
    Ok(calls)
}

/// ESP's TLS flags (and Portico's file-path flags beside them) as settings; files are read at
/// start ([`crate::tls`]).
/// Tracing for `portico esp`: ESP's auto-sampling (one request per `1 / minimum_qps` seconds,
/// off with `--disable_cloud_trace_auto_sampling` or `--enable_backend_routing`, which
/// start_esp refuses to combine with either tracing flag) and the Cloud Trace base URL
/// (`https://` assumed without a scheme, as in ESP's server config).
fn esp_tracing(a: &EspArgs) -> Result<crate::trace::TraceSettings, ArgError> {
    let mut t = crate::trace::TraceSettings::esp();
    if a.enable_backend_routing {
        for (flag, set) in [
            (
                "--disable_cloud_trace_auto_sampling",
                a.disable_cloud_trace_auto_sampling,
            ),
            (
                "--cloud_trace_url_override",
                a.cloud_trace_url_override.is_some(),
            ),
        ] {
            if set {
                return Err(ArgError::bad(format!(
                    "{flag} cannot be used with --enable_backend_routing (which turns \
                     auto-sampling off)"
                )));
            }
        }
    }
    if let Some(q) = a.cloud_trace_minimum_qps {
        if !q.is_finite() || q < 0.0 {
            return Err(ArgError::bad(format!(
                "invalid --cloud_trace_minimum_qps {q}: must be 0 or more (0: no auto-sampling)"
            )));
        }
        t.auto_interval = (q > 0.0).then(|| Duration::from_secs_f64((1.0 / q).min(1e9)));
    }
    if a.disable_cloud_trace_auto_sampling || a.enable_backend_routing {
        t.auto_interval = None;
    }
    t.url_override = match a.cloud_trace_url_override.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(u) => Some(parse_trace_url(u, "--cloud_trace_url_override")?),
    };
    t.otlp_endpoint = match a.tracing_otlp_endpoint.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(u) => Some(parse_trace_url(u, "--tracing_otlp_endpoint")?),
    };
    Ok(t)
}

/// An `http(s)://` URL for a trace export flag, `https://` assumed without a scheme; no
/// trailing `/`.
pub(crate) fn parse_trace_url(u: &str, flag: &str) -> Result<String, ArgError> {
    let full = if u.contains("://") {
        u.to_string()
    } else {
        format!("https://{u}")
    };
    match full.parse::<http::Uri>() {
        Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {
            Ok(full.trim_end_matches('/').to_string())
        }
        _ => Err(ArgError::bad(format!(
            "invalid {flag} {u:?}: must be an http:// or https:// URL"
        ))),
    }
}

fn tls_settings(a: &EspArgs) -> Result<(ServerTls, BackendTls), ArgError> {
    let (versions, warning) =
        ProtocolVersions::from_nginx_list(&a.ssl_protocols).map_err(|e| ArgError::bad(e.0))?;
    let server = ServerTls {
        identity: if a.generate_self_signed_cert {
            ServerIdentity::SelfSigned
        } else {
            ServerIdentity::Files(CertKeyFiles {
                cert: a.ssl_cert_path.clone(),
                key: a.ssl_key_path.clone(),
            })
        },
        client_ca: None,
        versions,
        cipher_suites: None,
        warnings: warning.into_iter().collect(),
    };
    // Relocating files that would not be used is a mistake better said at once than found when
    // the backend refuses the proxy.
    for (flag, set) in [
        (
            "--backend_client_cert_path",
            a.backend_client_cert_path.is_some(),
        ),
        (
            "--backend_client_key_path",
            a.backend_client_key_path.is_some(),
        ),
    ] {
        if set && !a.tls_mutual_auth {
            return Err(ArgError::bad(format!(
                "{flag} is used only with --tls_mutual_auth (-t); add it, or drop {flag}"
            )));
        }
    }
    let client_cert = a.tls_mutual_auth.then(|| CertKeyFiles {
        cert: a
            .backend_client_cert_path
            .clone()
            .unwrap_or_else(|| crate::tls::ESP_BACKEND_CLIENT_CERT.into()),
        key: a
            .backend_client_key_path
            .clone()
            .unwrap_or_else(|| crate::tls::ESP_BACKEND_CLIENT_KEY.into()),
    });
    let backend = BackendTls {
        roots: BackendRoots::BuiltIn {
            extra: a.backend_ca_cert_path.clone(),
        },
        client_cert,
        cipher_suites: None,
    };
    Ok((server, backend))
}

/// Why the command line was refused, with start_esp's exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ArgError {
    pub exit_code: u8,
    pub message: String,
}

impl ArgError {
    fn bad(message: impl Into<String>) -> Self {
        ArgError {
            exit_code: EXIT_BAD_ARGS,
            message: message.into(),
        }
    }
}

/// Parses an nginx size (`1024`, `512k`, `32m`, `1g`; case-insensitive suffix).
pub fn parse_nginx_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_lowercase() {
                'k' => 1u64 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                _ => {
                    return Err(format!(
                        "invalid size {s:?}: unknown suffix {c:?} (use k, m or g)"
                    ))
                }
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "invalid size {s:?}: expected a number with an optional k, m or g suffix"
        ));
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

fn split_list(s: &Option<String>) -> Vec<String> {
    s.as_deref()
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Parses `args` (`args[0]` is the program name) into validated settings.
pub fn parse(args: Vec<OsString>) -> Result<Settings, ArgError> {
    let raw = EspArgs::try_parse_from(args).map_err(|e| ArgError {
        exit_code: match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
            _ => EXIT_BAD_ARGS,
        },
        message: e.render().to_string(),
    })?;
    validate(raw)
}

/// Checks flag values and combinations; see the module docs for exit codes.
pub fn validate(a: EspArgs) -> Result<Settings, ArgError> {
    // ESP's TLS to a gRPC backend has Portico's spelling: the scheme says it, and the trust
    // anchors and client certificate are the ones every TLS backend uses.
    const GRPC_TLS: &str = "TLS to a gRPC backend is asked for with --backend=grpcs://HOST:PORT \
         (trust anchors: --backend_ca_cert_path; client certificate: --tls_mutual_auth)";
    let unsupported: [(&str, bool, &str); 9] = [
        (
            "--nginx_config",
            a.nginx_config.is_some(),
            "there is no nginx; use Portico's flags",
        ),
        (
            "--service_config_url",
            a.service_config_url.is_some(),
            "use --service_json_path with a downloaded config, or --management",
        ),
        (
            "--experimental_enable_multiple_api_configs",
            a.experimental_enable_multiple_api_configs,
            "run one proxy per service",
        ),
        (
            "--enable_grpc_backend_ssl",
            a.enable_grpc_backend_ssl,
            GRPC_TLS,
        ),
        (
            "--grpc_backend_ssl_root_certs_file",
            a.grpc_backend_ssl_root_certs_file.is_some(),
            GRPC_TLS,
        ),
        (
            "--grpc_backend_ssl_private_key_file",
            a.grpc_backend_ssl_private_key_file.is_some(),
            GRPC_TLS,
        ),
        (
            "--grpc_backend_ssl_cert_chain_file",
            a.grpc_backend_ssl_cert_chain_file.is_some(),
            GRPC_TLS,
        ),
        (
            "--generate_config_file_only",
            a.generate_config_file_only,
            "Portico generates no nginx configuration",
        ),
        (
            "--server_config_generation_path",
            a.server_config_generation_path.is_some(),
            "Portico generates no server configuration",
        ),
    ];
    if let Some((flag, _, why)) = unsupported.iter().find(|(_, set, _)| *set) {
        return Err(ArgError::bad(format!(
            "{flag} is an ESP flag Portico does not support: {why}"
        )));
    }
    let rollout_strategy = match a.rollout_strategy.as_str() {
        "fixed" => RolloutStrategy::Fixed,
        "managed" => RolloutStrategy::Managed,
        other => {
            return Err(ArgError::bad(format!(
                "invalid --rollout_strategy {other:?}: must be \"fixed\" or \"managed\""
            )))
        }
    };
    if a.service.as_deref().is_some_and(|s| s.contains('|')) {
        return Err(ArgError::bad(
            "--service with several names (a|b) needs --experimental_enable_multiple_api_configs, \
             which Portico does not support; run one proxy per service",
        ));
    }
    if a.service.as_deref().is_some_and(str::is_empty) {
        return Err(ArgError::bad("--service must not be empty"));
    }
    if a.service_json_path.is_none() {
        if a.service.is_none() {
            return Err(ArgError::bad(
                "no service: give --service=NAME (and optionally --version=CONFIG_ID), \
                 or --service_json_path=FILE",
            ));
        }
    } else if a.version.is_some() && a.service.is_none() {
        // With a local file the config id comes from the file; a lone --version is meaningless.
        return Err(ArgError::bad(
            "--version needs --service; with --service_json_path the config id is read from the file",
        ));
    }
    if a.service_json_path.is_some() && rollout_strategy == RolloutStrategy::Managed {
        return Err(ArgError::bad(
            "--rollout_strategy=managed cannot be used with --service_json_path (a local file has no rollouts)",
        ));
    }
    let backend = parse_backend(&a.backend).map_err(ArgError::bad)?;
    let listen_address: IpAddr = a.listen_address.parse().map_err(|_| {
        ArgError::bad(format!(
            "invalid --listen_address {:?}: expected an IP address such as 127.0.0.1 or 0.0.0.0",
            a.listen_address
        ))
    })?;

    // ESP listens on 8080 only when no serving port is named at all.
    let http_port = if a.http_port.is_none() && a.http2_port.is_none() && a.ssl_port.is_none() {
        Some(8080)
    } else {
        a.http_port
    };
    let mut seen: Vec<(&str, u16)> = Vec::new();
    for (name, port) in [
        ("--http_port", http_port),
        ("--http2_port", a.http2_port),
        ("--ssl_port", a.ssl_port),
        ("--status_port", Some(a.status_port)),
    ] {
        let Some(port) = port else { continue };
        // Port 0 means "let the OS pick", so two zeros never collide.
        if port != 0 {
            if let Some((other, _)) = seen.iter().find(|(_, p)| *p == port) {
                return Err(ArgError {
                    exit_code: EXIT_PORT_CONFLICT,
                    message: format!("port {port} is used by both {other} and {name}"),
                });
            }
        }
        seen.push((name, port));
    }

    let network_fail_open = match a.service_control_network_fail_policy.as_str() {
        "open" => true,
        "close" => false,
        other => {
            return Err(ArgError::bad(format!(
                "invalid --service_control_network_fail_policy {other:?}: must be \"open\" or \"close\""
            )))
        }
    };
    let service_control_calls = service_control_calls(&a)?;
    let client_max_body_size = parse_nginx_size(&a.client_max_body_size)
        .map_err(|e| ArgError::bad(format!("--client_max_body_size: {e}")))?;

    let mut xff_trusted = Vec::new();
    for item in a
        .xff_trusted_proxy_list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let net = item
            .parse::<IpNet>()
            .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                ArgError::bad(format!(
                    "invalid --xff_trusted_proxy_list entry {item:?}: expected an IP address or CIDR"
                ))
            })?;
        xff_trusted.push(net);
    }
    let keep_alive_timeout = match a.keepalive_timeout.as_deref() {
        Some(t) => {
            parse_nginx_time(t).map_err(|e| ArgError::bad(format!("--keepalive_timeout: {e}")))?
        }
        None => portico_listen::DEFAULT_KEEP_ALIVE_TIMEOUT,
    };
    let header_read_timeout = match a.client_header_timeout.as_deref() {
        Some(t) => parse_nginx_time(t)
            .map_err(|e| ArgError::bad(format!("--client_header_timeout: {e}")))
            .and_then(|d| {
                if d.is_zero() {
                    Err(ArgError::bad("--client_header_timeout must be more than 0"))
                } else {
                    Ok(d)
                }
            })?,
        None => portico_listen::DEFAULT_HEADER_READ_TIMEOUT,
    };
    let client_body_timeout = match a.client_body_timeout.as_deref() {
        Some(t) => parse_nginx_time(t)
            .map_err(|e| ArgError::bad(format!("--client_body_timeout: {e}")))
            .and_then(|d| {
                if d.is_zero() {
                    Err(ArgError::bad("--client_body_timeout must be more than 0"))
                } else {
                    Ok(d)
                }
            })?,
        None => crate::forward::CLIENT_BODY_TIMEOUT,
    };
    let client_body_buffer_size = match a.client_body_buffer_size.as_deref() {
        Some(v) => parse_nginx_size(v)
            .map_err(|e| ArgError::bad(format!("--client_body_buffer_size: {e}")))
            .and_then(|n| {
                // Held per request in memory: a typo like `64m` for `64k` multiplies by connections.
                usize::try_from(n)
                    .ok()
                    .filter(|n| *n <= 1 << 30)
                    .ok_or_else(|| ArgError::bad("--client_body_buffer_size must be at most 1g"))
            })?,
        None => crate::forward::CLIENT_BODY_BUFFER_SIZE,
    };
    let client_body_min_rate = a
        .client_body_min_rate
        .unwrap_or(crate::forward::CLIENT_BODY_MIN_RATE);
    let header_limits = match a.large_client_header_buffers.as_deref() {
        Some(s) => parse_header_buffers(s).map_err(ArgError::bad)?,
        None => HeaderLimits::default(),
    };

    let cors = match a.cors_preset.as_deref() {
        None => None,
        Some(preset) => Some(
            CorsSettings::from_flags(
                preset,
                &a.cors_allow_origin,
                &a.cors_allow_origin_regex,
                &a.cors_allow_methods,
                &a.cors_allow_headers,
                a.cors_allow_credentials,
                &a.cors_expose_headers,
                a.enable_strict_transport_security,
            )
            .map_err(ArgError::bad)?,
        ),
    };

    let mut rewrites = Vec::new();
    for r in &a.rewrite {
        let mut parts = r.split_whitespace();
        let (Some(pat), Some(rep), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(ArgError::bad(format!(
                "invalid --rewrite {r:?}: expected \"<regex> <replacement>\""
            )));
        };
        let pattern = regex::Regex::new(pat)
            .map_err(|e| ArgError::bad(format!("invalid --rewrite regex {pat:?}: {e}")))?;
        rewrites.push(RewriteRule {
            pattern,
            replacement: rep.to_string(),
        });
    }

    if let Some(h) = &a.healthz {
        if h.is_empty() || h.contains('/') || h.contains('?') {
            return Err(ArgError::bad(format!(
                "invalid --healthz {h:?}: give a single path segment such as \"healthz\""
            )));
        }
    }
    if a.non_gcp && a.service_account_key.is_none() && a.service_json_path.is_none() {
        return Err(ArgError {
            exit_code: EXIT_SETUP,
            message: "--non_gcp needs --service_account_key (there is no metadata server to get tokens from)"
                .into(),
        });
    }
    if let Some(p) = a.client_ip_header.as_deref() {
        if http::HeaderName::from_bytes(p.as_bytes()).is_err() {
            return Err(ArgError::bad(format!(
                "invalid --client_ip_header {p:?}: not a header name"
            )));
        }
    }
    for (flag, list) in [
        ("--log_request_headers", &a.log_request_headers),
        ("--log_response_headers", &a.log_response_headers),
    ] {
        for h in split_list(list) {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(ArgError::bad(format!(
                    "invalid {flag} entry {h:?}: not a header name"
                )));
            }
        }
    }
    // Also refuses values no time span can hold (1e300), which would panic below.
    if !(a.http_request_timeout_s > 0.0
        && Duration::try_from_secs_f64(a.http_request_timeout_s).is_ok())
    {
        return Err(ArgError::bad(format!(
            "invalid --http_request_timeout_s {}: must be a positive number of seconds",
            a.http_request_timeout_s
        )));
    }
    if a.backend_max_connections == 0 {
        return Err(ArgError::bad(
            "--backend_max_connections must be at least 1",
        ));
    }
    let worker_threads = match a.worker_threads {
        Some(0) => return Err(ArgError::bad("--worker_threads must be at least 1")),
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    for (flag, url) in [
        ("--management", &a.management),
        (
            "--service_control_url_override",
            &a.service_control_url_override,
        ),
    ] {
        if let Some(u) = url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(ArgError::bad(format!(
                    "invalid {flag} {u:?}: expected an http:// or https:// URL"
                )));
            }
        }
    }

    let metadata = match a.metadata.as_deref() {
        Some(_) if a.non_gcp => {
            return Err(ArgError::bad(
                "--metadata and --non_gcp contradict each other: --non_gcp means there is no metadata server",
            ))
        }
        Some(m) => Some(
            crate::outbound_auth::parse_metadata_url(m)
                .map_err(|e| ArgError::bad(format!("invalid --metadata: {e}")))?,
        ),
        None => None,
    };

    let mut ignored_flags = Vec::new();
    let nginx_only: [(&'static str, bool); 9] = [
        ("--worker_processes", a.worker_processes.is_some()),
        ("--allow_invalid_headers", a.allow_invalid_headers),
        ("--enable_debug", a.enable_debug),
        ("--server_config_dir", a.server_config_dir.is_some()),
        ("--config_dir", a.config_dir.is_some()),
        ("--dns", a.dns.is_some()),
        ("--pid_file", a.pid_file.is_some()),
        ("--check_metadata", a.check_metadata),
        (
            "--service_control_network_fail_open",
            a.service_control_network_fail_open,
        ),
    ];
    for (flag, set) in nginx_only {
        if set {
            ignored_flags.push(flag);
        }
    }
    for (flag, set) in [
        (
            "--enable_api_key_uid_reporting",
            a.enable_api_key_uid_reporting.is_some(),
        ),
        ("--template", a.template.is_some()),
        ("--nginx", a.nginx.is_some()),
        ("--nginx_debug", a.nginx_debug.is_some()),
    ] {
        if set {
            ignored_flags.push(flag);
        }
    }
    let (intermediate_report_interval, startup_notes) = intermediate_report_interval(&a)?;
    let backend_host_header = match a.experimental_proxy_backend_host_header.as_deref() {
        None => None,
        Some(h) => Some(http::HeaderValue::from_str(h).map_err(|_| {
            ArgError::bad(format!(
                "invalid --experimental_proxy_backend_host_header {h:?}: not a valid header value"
            ))
        })?),
    };

    let tracing = esp_tracing(&a)?;
    let (server_tls, backend_tls) = tls_settings(&a)?;
    let client_certificates = server_tls.client_ca.is_some();

    Ok(Settings {
        dialect: crate::dialect::Dialect::Esp,
        service: a.service,
        version: a.version,
        rollout_strategy,
        backend,
        listen_address,
        http_port,
        http2_port: a.http2_port,
        ssl_port: a.ssl_port,
        status_port: Some(a.status_port),
        server_tls,
        backend_tls,
        service_account_key: a.service_account_key,
        metadata,
        healthz: a.healthz,
        grpc_backend_health: None,
        grpc_for_http1: false,
        non_gcp: a.non_gcp,
        service_json_path: a.service_json_path,
        management: a.management,
        service_control_url_override: a.service_control_url_override,
        network_fail_open,
        skip_service_control: a.skip_service_control_filter,
        skip_jwt_authn: a.skip_jwt_authn_filter,
        service_control_calls,
        client_max_body_size,
        xff_trusted,
        conn_limits: portico_listen::ConnLimits {
            header_read_timeout,
            keep_alive_timeout,
        },
        keep_alive: !keep_alive_timeout.is_zero(),
        header_limits,
        client_body_timeout,
        client_body_buffer_size,
        client_body_min_rate,
        client_ip_header: a.client_ip_header,
        client_ip_position: a.client_ip_position,
        cors,
        hsts: a.enable_strict_transport_security,
        rewrites,
        enable_websocket: a.enable_websocket,
        head: crate::request_head::HeadOptions {
            underscores_in_headers: a.underscores_in_headers,
            // nginx drops such headers; refusing them is ESPv2's behaviour.
            refuse_underscores: false,
            // A client certificate was verified: what the client says about one is not passed on.
            sanitize_client_cert: client_certificates,
            path: crate::request_head::PathOptions {
                normalize: !a.disable_normalize_path,
                merge_slashes: !a.disable_merge_slashes_in_path,
                unescape_slashes: a.disallow_escaped_slashes_in_path,
            },
            generated_prefix: None,
        },
        log_request_headers: split_list(&a.log_request_headers),
        log_response_headers: split_list(&a.log_response_headers),
        log_jwt_payload: split_list(&a.log_jwt_payload),
        jwks_cache_duration: a.jwks_cache_duration_in_s.map(Duration::from_secs),
        jwt_pad_forward_payload: false,
        jwt_audience_service_name_check: true,
        jwt_cache_size: None,
        jwks_fetch_retry: Default::default(),
        disable_oidc_discovery: false,
        enable_jwt_authorization_url_redirect: a.enable_jwt_authorization_url_redirect,
        tracing,
        rollout_fetch_throttle_window: a
            .rollout_fetch_throttle_window_in_s
            .map(Duration::from_secs),
        worker_threads,
        backend_max_connections: a.backend_max_connections,
        backend_retry: None,
        backend_net: Default::default(),
        backend_address_override: false,
        backend_timeout: Duration::from_secs_f64(a.http_request_timeout_s),
        access_log: a.access_log,
        backend_host_header,
        compute_platform: a.compute_platform_override,
        // What only `portico espv2` asks the metadata server for, and its reporting switch.
        gcp: None,
        api_key_uid_reporting: true,
        service_from_metadata: false,
        report_log_entries_per_second: a.report_log_entries_per_second,
        report_max_log_entries_per_flush: a.report_max_log_entries_per_flush,
        enable_backend_routing: a.enable_backend_routing,
        // ESPv2's header, client-address and compression flags have no ESP v1 equivalent.
        request_headers_to_add: Vec::new(),
        response_headers_to_add: Vec::new(),
        operation_name_header: None,
        xff_hops: None,
        response_compression: None,
        http_request_timeout: None,
        iam: None,
        dependency_error_behavior: crate::settings::DependencyErrorBehavior::AlwaysInit,
        startup_notes,
        access_log_format: None,
        enable_debug: false,
        generated_headers: crate::settings::GeneratedHeaders::default(),
        client_ip_from_forwarded: false,
        health_check_operation: None,
        cors_operation_delimiter: None,
        disallow_colon_in_wildcard_path_segment: false,
        // ESP v1's two hidden transcoding flags (start_esp.py), the only ones it has.
        transcoding: portico_transcode::Options {
            always_print_primitive_fields: a.transcoding_always_print_primitive_fields,
            preserve_proto_field_names: a.transcoding_preserve_proto_field_names,
            ..Default::default()
        },
        intermediate_report_interval,
        ignored_flags,
        not_implemented_flags: Vec::new(),
    })
}

/// ESP's default gap between a long gRPC stream's intermediate reports
/// (`global_context.cc`, `kIntermediateReportInterval`).
pub const DEFAULT_INTERMEDIATE_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// `service_control_config.intermediate_report_min_interval` from `--server_config_template`
/// (ESP reads it from its server config, for which start_esp has no flag); 0 or absent keeps
/// ESP's 10 s, as ESP does. With the note for the operator that nothing else is read there.
fn intermediate_report_interval(a: &EspArgs) -> Result<(Duration, Vec<String>), ArgError> {
    let Some(path) = a.server_config_template.as_deref() else {
        return Ok((DEFAULT_INTERMEDIATE_REPORT_INTERVAL, Vec::new()));
    };
    let text = std::fs::read_to_string(path).map_err(|e| ArgError {
        exit_code: EXIT_SETUP,
        message: format!("cannot read --server_config_template {path}: {e}"),
    })?;
    let facts = server_config::parse(&text)
        .map_err(|e| ArgError::bad(format!("invalid --server_config_template {path}: {e}")))?;
    let interval = match facts.intermediate_report_min_interval {
        Some(n) if n > 0 => Duration::from_secs(n.unsigned_abs().into()),
        _ => DEFAULT_INTERMEDIATE_REPORT_INTERVAL,
    };
    let note = format!(
        "--server_config_template {path}: only service_control_config.intermediate_report_min_interval is read from it (intermediate reports every {} s); its other fields are set by flags in Portico",
        interval.as_secs()
    );
    Ok((interval, vec![note]))
}

/// Entry point for the `portico esp` subcommand; `args[0]` is the program name.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let settings = match parse(args) {
        Ok(s) => s,
        Err(e) => {
            if e.exit_code == 0 {
                print!("{}", e.message);
            } else {
                eprintln!("portico esp: {}", e.message.trim_end());
            }
            return ExitCode::from(e.exit_code);
        }
    };
    for note in &settings.startup_notes {
        tracing::info!("{note}");
    }
    for flag in &settings.ignored_flags {
        tracing::info!(
            flag,
            "flag accepted for ESP compatibility and ignored (no nginx in Portico)"
        );
    }
    crate::server::run(settings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::BackendScheme;

    fn p(args: &[&str]) -> Result<Settings, ArgError> {
        let mut v: Vec<OsString> = vec!["portico esp".into()];
        v.extend(args.iter().map(OsString::from));
        parse(v)
    }

    #[test]
    fn seed_command_line_parses_in_both_forms() {
        let s = p(&[
            "--service=echo-api.endpoints.demo-proj.cloud.goog",
            "--rollout_strategy=managed",
            "--http_port=8082",
            "--backend=localhost:8080",
            "--service_account_key",
            "/esp/service-account-creds.json",
        ])
        .unwrap();
        assert_eq!(
            s.service.as_deref(),
            Some("echo-api.endpoints.demo-proj.cloud.goog")
        );
        assert_eq!(s.rollout_strategy, RolloutStrategy::Managed);
        assert_eq!(s.http_port, Some(8082));
        assert_eq!(s.backend.host, "localhost");
        assert_eq!(s.backend.port, 8080);
        assert_eq!(s.status_port, Some(8090));
        assert_eq!(s.listen_address.to_string(), "127.0.0.1");
        assert!(s.network_fail_open);
        assert_eq!(s.client_max_body_size, 32 << 20);
    }

    #[test]
    fn backend_max_connections_defaults_to_100_and_refuses_0() {
        let s = p(&["--service=svc", "--backend=127.0.0.1:8080"]).unwrap();
        assert_eq!(s.backend_max_connections, 100);
        let s = p(&[
            "--service=svc",
            "--backend=127.0.0.1:8080",
            "--backend_max_connections=7",
        ])
        .unwrap();
        assert_eq!(s.backend_max_connections, 7);
        let e = p(&[
            "--service=svc",
            "--backend=127.0.0.1:8080",
            "--backend_max_connections=0",
        ])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            e.contains("--backend_max_connections must be at least 1"),
            "{e}"
        );
    }

    #[test]
    fn short_forms_work() {
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "2017-02-13r0",
            "-p",
            "9000",
            "-a",
            "grpc://127.0.0.1:9001",
            "-N",
            "9002",
            "-z",
            "hz",
        ])
        .unwrap();
        assert_eq!(s.version.as_deref(), Some("2017-02-13r0"));
        assert_eq!(s.http_port, Some(9000));
        assert_eq!(s.backend.scheme, BackendScheme::Grpc);
        assert_eq!(s.status_port, Some(9002));
        assert_eq!(s.healthz.as_deref(), Some("hz"));
    }

    #[test]
    fn default_http_port_only_without_other_ports() {
        assert_eq!(p(&["-s", "svc"]).unwrap().http_port, Some(8080));
        let s = p(&["-s", "svc", "--ssl_port=8443"]).unwrap();
        assert_eq!((s.http_port, s.ssl_port), (None, Some(8443)));
    }

    #[test]
    fn unknown_flag_exits_4() {
        let e = p(&["-s", "svc", "--no_such_flag=1"]).unwrap_err();
        assert_eq!(e.exit_code, EXIT_BAD_ARGS);
        assert!(e.message.contains("--no_such_flag"), "{}", e.message);
    }

    #[test]
    fn bad_values_exit_4_with_precise_messages() {
        let e = p(&["-s", "svc", "--rollout_strategy=sometimes"]).unwrap_err();
        assert_eq!(e.exit_code, 4);
        assert!(e.message.contains("\"sometimes\""));
        let e = p(&["-s", "svc", "--http_port=notaport"]).unwrap_err();
        assert_eq!(e.exit_code, 4);
        let e = p(&["-s", "svc", "--client_max_body_size=12q"]).unwrap_err();
        assert!(e.message.contains("unknown suffix"), "{}", e.message);
        let e = p(&["-s", "svc", "--backend=ftp://x:1"]).unwrap_err();
        assert!(e.message.contains("unsupported scheme"), "{}", e.message);
        let e = p(&["-s", "svc", "--service_control_network_fail_policy=maybe"]).unwrap_err();
        assert_eq!(e.exit_code, 4);
        let e = p(&["-s", "svc", "--cors_preset=everything"]).unwrap_err();
        assert!(e.message.contains("cors_preset"), "{}", e.message);
        let e = p(&["-s", "svc", "--rewrite=onlyonepart"]).unwrap_err();
        assert!(e.message.contains("<regex> <replacement>"), "{}", e.message);
        let e = p(&["-s", "svc", "--xff_trusted_proxy_list=10.0.0.0/8,nonsense"]).unwrap_err();
        assert!(e.message.contains("\"nonsense\""), "{}", e.message);
        // A timeout no time span can hold is refused with exit code 4, not a panic.
        for t in ["1e300", "-1", "NaN", "inf", "0"] {
            let e = p(&["-s", "svc", &format!("--http_request_timeout_s={t}")]).unwrap_err();
            assert_eq!(e.exit_code, 4, "{t}");
            assert!(
                e.message.contains("must be a positive number of seconds"),
                "{t}: {}",
                e.message
            );
        }
    }

    #[test]
    fn service_control_call_flags_default_to_esps_and_parse() {
        let s = p(&["-s", "svc"]).unwrap();
        let c = s.service_control_calls;
        let ms = Duration::from_millis;
        assert_eq!((c.check.timeout, c.check.retries), (ms(1500), 3));
        assert_eq!((c.quota.timeout, c.quota.retries), (ms(1500), 1));
        assert_eq!((c.report.timeout, c.report.retries), (ms(3500), 5));
        assert_eq!(c.check.worst_case(), ms(6000));
        let s = p(&[
            "-s",
            "svc",
            "--service_control_check_timeout_ms=250",
            "--service_control_check_retries=0",
            "--service_control_quota_timeout_ms",
            "600000",
            "--service_control_quota_retries=100",
            "--service_control_report_timeout_ms=1",
            "--service_control_report_retries=2",
        ])
        .unwrap();
        let c = s.service_control_calls;
        assert_eq!((c.check.timeout, c.check.retries), (ms(250), 0));
        assert_eq!((c.quota.timeout, c.quota.retries), (ms(600_000), 100));
        assert_eq!((c.report.timeout, c.report.retries), (ms(1), 2));
        assert!(s.ignored_flags.is_empty(), "{:?}", s.ignored_flags);
        for (flag, bad) in [
            ("--service_control_check_timeout_ms", "0"),
            ("--service_control_check_timeout_ms", "-5"),
            ("--service_control_check_timeout_ms", "1.5"),
            ("--service_control_check_timeout_ms", "1500ms"),
            ("--service_control_quota_timeout_ms", "600001"),
            (
                "--service_control_report_timeout_ms",
                "99999999999999999999999",
            ),
            ("--service_control_report_timeout_ms", ""),
        ] {
            let e = p(&["-s", "svc", &format!("{flag}={bad}")]).unwrap_err();
            assert_eq!(e.exit_code, EXIT_BAD_ARGS, "{flag}={bad}");
            assert_eq!(
                e.message,
                format!(
                    "invalid {flag} {bad:?}: must be a whole number of milliseconds from 1 to 600000"
                )
            );
        }
        for (flag, bad) in [
            ("--service_control_check_retries", "-1"),
            ("--service_control_quota_retries", "101"),
            ("--service_control_report_retries", "4294967296"),
            ("--service_control_report_retries", "three"),
        ] {
            let e = p(&["-s", "svc", &format!("{flag}={bad}")]).unwrap_err();
            assert_eq!(e.exit_code, EXIT_BAD_ARGS, "{flag}={bad}");
            assert_eq!(
                e.message,
                format!("invalid {flag} {bad:?}: must be a whole number from 0 to 100")
            );
        }
    }

    #[test]
    fn skip_filter_switches_are_off_by_default() {
        let s = p(&["-s", "svc"]).unwrap();
        assert!(!s.skip_service_control && !s.skip_jwt_authn);
        let s = p(&[
            "-s",
            "svc",
            "--skip_service_control_filter",
            "--skip_jwt_authn_filter",
        ])
        .unwrap();
        assert!(s.skip_service_control && s.skip_jwt_authn);
        assert!(s.ignored_flags.is_empty(), "{:?}", s.ignored_flags);
        // Switches take no value.
        let e = p(&["-s", "svc", "--skip_jwt_authn_filter=false"]).unwrap_err();
        assert_eq!(e.exit_code, EXIT_BAD_ARGS);
    }

    #[test]
    fn report_log_caps_default_and_parse() {
        let s = p(&["-s", "svc"]).unwrap();
        assert_eq!(
            s.report_log_entries_per_second,
            crate::service_control::DEFAULT_LOG_ENTRIES_PER_SECOND
        );
        let s = p(&["-s", "svc", "--report_log_entries_per_second=0"]).unwrap();
        assert_eq!(s.report_log_entries_per_second, 0);
        let e = p(&["-s", "svc", "--report_log_entries_per_second=many"]).unwrap_err();
        assert_eq!(e.exit_code, 4);
    }

    #[test]
    fn a_later_listen_address_overrides_the_entrypoints() {
        // The container image's entrypoint passes --listen_address=0.0.0.0; a user's own
        // --listen_address after the image name must win, not be refused as a duplicate.
        let s = p(&[
            "-s",
            "svc",
            "--listen_address=0.0.0.0",
            "--listen_address=127.0.0.2",
        ])
        .unwrap();
        assert_eq!(s.listen_address.to_string(), "127.0.0.2");
    }

    #[test]
    fn same_port_twice_exits_2() {
        let e = p(&["-s", "svc", "--http_port=8080", "--status_port=8080"]).unwrap_err();
        assert_eq!(e.exit_code, EXIT_PORT_CONFLICT);
        assert!(e.message.contains("--http_port") && e.message.contains("--status_port"));
    }

    #[test]
    fn version_needs_service_unless_local_file() {
        let e = p(&["--version=2017-02-13r0"]).unwrap_err();
        assert_eq!(e.exit_code, 4);
        assert!(e.message.contains("--service"));
        assert!(p(&["--service_json_path=/tmp/x.json"]).is_ok());
        let e = p(&["--service_json_path=/tmp/x.json", "--version=1"]).unwrap_err();
        assert_eq!(e.exit_code, 4);
    }

    #[test]
    fn server_config_template_sets_the_intermediate_report_interval() {
        let s = p(&["-s", "svc"]).unwrap();
        assert_eq!(
            s.intermediate_report_interval,
            DEFAULT_INTERMEDIATE_REPORT_INTERVAL
        );
        assert!(s.startup_notes.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("server_config.pb.txt");
        let flag = format!("--server_config_template={}", file.display());
        let e = p(&["-s", "svc", &flag]).unwrap_err();
        assert_eq!(e.exit_code, EXIT_SETUP, "{}", e.message);
        std::fs::write(
            &file,
            "service_control_config { intermediate_report_min_interval: 3 }",
        )
        .unwrap();
        let s = p(&["-s", "svc", &flag]).unwrap();
        assert_eq!(s.intermediate_report_interval, Duration::from_secs(3));
        assert!(s.ignored_flags.is_empty(), "{:?}", s.ignored_flags);
        assert!(
            s.startup_notes[0]
                .contains("only service_control_config.intermediate_report_min_interval"),
            "{:?}",
            s.startup_notes
        );
        // 0 is ESP's "unset": its default.
        std::fs::write(
            &file,
            "service_control_config { intermediate_report_min_interval: 0 }",
        )
        .unwrap();
        let s = p(&["-s", "svc", &flag]).unwrap();
        assert_eq!(
            s.intermediate_report_interval,
            DEFAULT_INTERMEDIATE_REPORT_INTERVAL
        );
        std::fs::write(&file, "service_control_config {").unwrap();
        let e = p(&["-s", "svc", &flag]).unwrap_err();
        assert_eq!(e.exit_code, EXIT_BAD_ARGS);
        assert!(
            e.message.contains("invalid --server_config_template"),
            "{}",
            e.message
        );
    }

    #[test]
    fn non_gcp_without_key_is_setup_error() {
        // Clear the env fallback for this parse only by passing an explicit empty list is not
        // possible with clap's env; the variable is unset in the test environment.
        if std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").is_some() {
            return;
        }
        let e = p(&["-s", "svc", "--non_gcp"]).unwrap_err();
        assert_eq!(e.exit_code, EXIT_SETUP);
        assert!(p(&["-s", "svc", "--non_gcp", "-k", "/k.json"]).is_ok());
    }

    #[test]
    fn client_body_buffer_size_and_min_rate() {
        let s = p(&["-s", "svc"]).unwrap();
        assert_eq!(s.client_body_buffer_size, 16 * 1024);
        assert_eq!(s.client_body_min_rate, 240);
        let s = p(&[
            "-s",
            "svc",
            "--client_body_buffer_size=128k",
            "--client_body_min_rate=0",
        ])
        .unwrap();
        assert_eq!(s.client_body_buffer_size, 128 * 1024);
        assert_eq!(s.client_body_min_rate, 0);
        // A flag with an effect, so not listed as ignored.
        assert!(s.ignored_flags.is_empty(), "{:?}", s.ignored_flags);
        assert_eq!(
            p(&["-s", "svc", "--client_body_buffer_size=0"])
                .unwrap()
                .client_body_buffer_size,
            0
        );
        for bad in [
            "--client_body_buffer_size=2g",
            "--client_body_buffer_size=lots",
            "--client_body_buffer_size=-1",
            "--client_body_min_rate=-5",
            "--client_body_min_rate=fast",
        ] {
            assert!(p(&["-s", "svc", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn nginx_flags_are_accepted_and_listed_as_ignored() {
        let s = p(&[
            "-s",
            "svc",
            "--worker_processes=4",
            "--keepalive_timeout",
            "75s",
            "--large_client_header_buffers=4 32k",
        ])
        .unwrap();
        assert_eq!(s.ignored_flags, vec!["--worker_processes"]);
        assert_eq!(s.conn_limits.keep_alive_timeout, Duration::from_secs(75));
        assert_eq!(
            s.header_limits,
            HeaderLimits {
                line: 32 << 10,
                total: 128 << 10
            }
        );
    }

    #[test]
    fn connection_limits_default_to_nginx_and_parse_nginx_syntax() {
        let s = p(&["-s", "svc"]).unwrap();
        assert_eq!(s.conn_limits, portico_listen::ConnLimits::default());
        assert_eq!(s.conn_limits.header_read_timeout, Duration::from_secs(60));
        assert_eq!(s.conn_limits.keep_alive_timeout, Duration::from_secs(75));
        assert!(s.keep_alive);
        assert_eq!(
            s.header_limits,
            HeaderLimits {
                line: 8192,
                total: 32768
            }
        );
        let s = p(&[
            "-s",
            "svc",
            "--keepalive_timeout=650s 600s",
            "--client_header_timeout=500ms",
            "--client_body_timeout=2m",
        ])
        .unwrap();
        assert_eq!(s.client_body_timeout, Duration::from_secs(120));
        assert_eq!(s.conn_limits.keep_alive_timeout, Duration::from_secs(650));
        assert_eq!(
            s.conn_limits.header_read_timeout,
            Duration::from_millis(500)
        );
        assert!(
            !p(&["-s", "svc", "--keepalive_timeout=0"])
                .unwrap()
                .keep_alive
        );
        for bad in [
            "--keepalive_timeout=soon",
            "--keepalive_timeout=5y",
            "--client_header_timeout=0",
            "--client_body_timeout=0",
            "--large_client_header_buffers=8k",
            "--large_client_header_buffers=0 8k",
            "--large_client_header_buffers=4 100",
            "--large_client_header_buffers=4 2g",
        ] {
            let e = p(&["-s", "svc", bad]).unwrap_err();
            assert_eq!(e.exit_code, EXIT_BAD_ARGS, "{bad}");
        }
    }

    #[test]
    fn backend_deadline_defaults_to_15_seconds() {
        let s = p(&["-s", "svc"]).unwrap();
        assert_eq!(s.backend_timeout, Duration::from_secs(15));
        let s = p(&["-s", "svc", "--http_request_timeout_s=86400"]).unwrap();
        assert_eq!(s.backend_timeout, Duration::from_secs(86400));
    }

    #[test]
    fn default_xff_trust_is_loopback_private_and_link_local_only() {
        let s = p(&["-s", "svc"]).unwrap();
        let trusted = |ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            s.xff_trusted.iter().any(|n| n.contains(&ip))
        };
        for ip in [
            "127.0.0.1",
            "127.255.0.9",
            "::1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "fc00::1",
            "fd12:3456::1",
            "169.254.1.1",
            "fe80::1",
        ] {
            assert!(trusted(ip), "{ip} should be trusted");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "172.15.255.255",
            "192.169.0.1",
            "11.0.0.1",
            "100.64.0.1",
            "2001:db8::1",
            "2607:f8b0::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(!trusted(ip), "{ip} should not be trusted");
        }
        // ESP's behaviour stays one flag away.
        let s = p(&["-s", "svc", "--xff_trusted_proxy_list=0.0.0.0/0,::/0"]).unwrap();
        assert!(s
            .xff_trusted
            .iter()
            .any(|n| n.contains(&"8.8.8.8".parse::<IpAddr>().unwrap())));
    }

    #[test]
    fn request_head_flags_default_to_the_safe_rules_and_are_listed() {
        let s = p(&["-s", "svc"]).unwrap();
        assert_eq!(s.head, crate::request_head::HeadOptions::default());
        assert!(!s.head.underscores_in_headers);
        assert!(s.head.path.normalize && s.head.path.merge_slashes);
        assert!(!s.head.path.unescape_slashes);
        let s = p(&[
            "-s",
            "svc",
            "--underscores_in_headers",
            "--disable_normalize_path",
            "--disable_merge_slashes_in_path",
            "--disallow_escaped_slashes_in_path",
        ])
        .unwrap();
        assert!(s.head.underscores_in_headers);
        assert!(!s.head.path.normalize && !s.head.path.merge_slashes);
        assert!(s.head.path.unescape_slashes);
        assert!(s.ignored_flags.is_empty(), "{:?}", s.ignored_flags);
        let help = p(&["--help"]).unwrap_err();
        assert_eq!(help.exit_code, 0);
        for flag in [
            "--underscores_in_headers",
            "--disable_normalize_path",
            "--disable_merge_slashes_in_path",
            "--disallow_escaped_slashes_in_path",
        ] {
            assert!(help.message.contains(flag), "{flag} missing from --help");
        }
    }

    #[test]
    fn unsupported_esp_flags_are_refused_precisely() {
        let e = p(&["-s", "svc", "-n", "/etc/nginx/custom.conf"]).unwrap_err();
        assert_eq!(e.exit_code, EXIT_BAD_ARGS);
        assert!(
            e.message
                .contains("--nginx_config is an ESP flag Portico does not support"),
            "{}",
            e.message
        );
        for flag in [
            "--enable_grpc_backend_ssl",
            "--grpc_backend_ssl_root_certs_file=/r.pem",
            "--grpc_backend_ssl_private_key_file=/k.pem",
            "--grpc_backend_ssl_cert_chain_file=/c.pem",
        ] {
            let e = p(&["-s", "svc", flag]).unwrap_err();
            let name = flag.split('=').next().unwrap_or(flag);
            assert_eq!(
                e.message,
                format!(
                    "{name} is an ESP flag Portico does not support: TLS to a gRPC backend is \
                     asked for with --backend=grpcs://HOST:PORT (trust anchors: \
                     --backend_ca_cert_path; client certificate: --tls_mutual_auth)"
                ),
                "{flag}"
            );
        }
        assert!(
            p(&["-s", "svc", "--enable_backend_routing"])
                .unwrap()
                .enable_backend_routing
        );
        let s = p(&[
            "-s",
            "svc",
            "--experimental_proxy_backend_host_header=internal.svc",
            "--compute_platform_override=GKE",
            "--cloud_trace_url_override=http://x",
        ])
        .unwrap();
        assert_eq!(s.backend_host_header.unwrap(), "internal.svc");
        assert_eq!(s.compute_platform.as_deref(), Some("GKE"));
        assert!(s.ignored_flags.is_empty(), "{:?}", s.ignored_flags);
        assert_eq!(s.tracing.url_override.as_deref(), Some("http://x"));
    }

    #[test]
    fn esp_tracing_flags() {
        let s = p(&["-s", "svc"]).unwrap();
        assert_eq!(s.tracing.auto_interval, Some(Duration::from_secs(10)));
        let s = p(&["-s", "svc", "--disable_cloud_trace_auto_sampling"]).unwrap();
        assert_eq!(s.tracing.auto_interval, None);
        let s = p(&["-s", "svc", "--cloud_trace_minimum_qps=4"]).unwrap();
        assert_eq!(s.tracing.auto_interval, Some(Duration::from_millis(250)));
        let s = p(&[
            "-s",
            "svc",
            "--cloud_trace_url_override=trace.example:8443/",
        ])
        .unwrap();
        assert_eq!(
            s.tracing.url_override.as_deref(),
            Some("https://trace.example:8443")
        );
        for bad in [
            &["-s", "svc", "--cloud_trace_minimum_qps=-1"][..],
            &["-s", "svc", "--cloud_trace_minimum_qps=NaN"],
            &["-s", "svc", "--cloud_trace_url_override=ftp://x"],
            &["-s", "svc", "--tracing_otlp_endpoint=http://"],
            &[
                "-s",
                "svc",
                "--enable_backend_routing",
                "--disable_cloud_trace_auto_sampling",
            ],
        ] {
            let e = p(bad).unwrap_err();
            assert_eq!(e.exit_code, 4, "{bad:?}");
        }
        let s = p(&["-s", "svc", "--enable_backend_routing"]).unwrap();
        assert_eq!(s.tracing.auto_interval, None);
    }

    #[test]
    fn tls_mutual_auth_presents_esps_backend_certificate_or_the_given_one() {
        let s = p(&["-s", "svc"]).unwrap();
        assert_eq!(s.backend_tls, BackendTls::default());
        let s = p(&["-s", "svc", "-t"]).unwrap();
        assert_eq!(
            s.backend_tls.client_cert,
            Some(CertKeyFiles {
                cert: "/etc/nginx/ssl/backend.crt".into(),
                key: "/etc/nginx/ssl/backend.key".into(),
            })
        );
        let s = p(&[
            "-s",
            "svc",
            "--tls_mutual_auth",
            "--backend_client_cert_path=/c/client.pem",
            "--backend_client_key_path",
            "/c/client.key",
            "--backend_ca_cert_path=/c/ca.pem",
        ])
        .unwrap();
        assert_eq!(
            s.backend_tls,
            BackendTls {
                roots: BackendRoots::BuiltIn {
                    extra: Some("/c/ca.pem".into())
                },
                client_cert: Some(CertKeyFiles {
                    cert: "/c/client.pem".into(),
                    key: "/c/client.key".into(),
                }),
                cipher_suites: None,
            }
        );
        assert!(s.ignored_flags.is_empty(), "{:?}", s.ignored_flags);
        for flag in [
            "--backend_client_cert_path=/c.pem",
            "--backend_client_key_path=/c.key",
        ] {
            let e = p(&["-s", "svc", flag]).unwrap_err();
            assert_eq!(e.exit_code, EXIT_BAD_ARGS, "{flag}");
            assert!(
                e.message.contains("only with --tls_mutual_auth"),
                "{}",
                e.message
            );
        }
        // A switch: no value.
        assert_eq!(
            p(&["-s", "svc", "--tls_mutual_auth=true"])
                .unwrap_err()
                .exit_code,
            EXIT_BAD_ARGS
        );
    }

    #[test]
    fn ssl_port_certificate_flags_and_self_signed() {
        let s = p(&["-s", "svc", "--ssl_port=8443"]).unwrap();
        assert_eq!(s.server_tls, ServerTls::default());
        let s = p(&[
            "-s",
            "svc",
            "--ssl_port=8443",
            "--ssl_cert_path=/x/a.crt",
            "--ssl_key_path=/x/a.key",
        ])
        .unwrap();
        assert_eq!(
            s.server_tls.identity,
            ServerIdentity::Files(CertKeyFiles {
                cert: "/x/a.crt".into(),
                key: "/x/a.key".into()
            })
        );
        let s = p(&[
            "-s",
            "svc",
            "--ssl_port=8443",
            "--generate_self_signed_cert",
        ])
        .unwrap();
        assert_eq!(s.server_tls.identity, ServerIdentity::SelfSigned);
    }

    #[test]
    fn ssl_protocols_are_nginxs_names_and_honoured() {
        let v = |args: &[&str]| {
            let mut all = vec!["-s", "svc"];
            all.extend_from_slice(args);
            p(&all).map(|s| {
                (
                    s.server_tls.versions,
                    s.server_tls.warnings,
                    s.ignored_flags,
                )
            })
        };
        let (versions, warnings, ignored) = v(&[]).unwrap();
        assert_eq!(versions, ProtocolVersions::default());
        assert!(warnings.is_empty() && ignored.is_empty());
        let (versions, warnings, ignored) = v(&["--ssl_protocols=TLSv1.3"]).unwrap();
        assert_eq!(
            versions,
            ProtocolVersions {
                tls1_2: false,
                tls1_3: true
            }
        );
        assert!(warnings.is_empty());
        assert!(
            ignored.is_empty(),
            "--ssl_protocols is honoured, not ignored"
        );
        // nginx compares names in any case; several names in one value.
        let (versions, _, _) = v(&["--ssl_protocols=tlsv1.2 TLSV1.3"]).unwrap();
        assert_eq!(versions, ProtocolVersions::default());
        // ESP's own example: older versions are dropped with a warning.
        let (versions, warnings, _) =
            v(&["--ssl_protocols=TLSv1.1", "--ssl_protocols=TLSv1.2"]).unwrap();
        assert_eq!(
            versions,
            ProtocolVersions {
                tls1_2: true,
                tls1_3: false
            }
        );
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("TLSv1.1 not available"),
            "{warnings:?}"
        );
        // A set with a hole keeps the hole: TLSv1.2 is not named.
        let (versions, _, _) = v(&["--ssl_protocols=TLSv1.1", "--ssl_protocols=TLSv1.3"]).unwrap();
        assert_eq!(
            versions,
            ProtocolVersions {
                tls1_2: false,
                tls1_3: true
            }
        );
        for (bad, want) in [
            ("--ssl_protocols=TLSv1 TLSv1.1", "cannot be honoured"),
            ("--ssl_protocols=SSLv3", "cannot be honoured"),
            ("--ssl_protocols=TLSv1.0", "nginx spells TLS 1.0 \"TLSv1\""),
            ("--ssl_protocols=TLS1.2", "must be SSLv2, SSLv3, TLSv1"),
            ("--ssl_protocols=", "names no protocol"),
            ("--ssl_protocols=   ", "names no protocol"),
        ] {
            let e = v(&[bad]).unwrap_err();
            assert_eq!(e.exit_code, EXIT_BAD_ARGS, "{bad}");
            assert!(e.message.contains(want), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn nginx_sizes() {
        assert_eq!(parse_nginx_size("32m").unwrap(), 32 << 20);
        assert_eq!(parse_nginx_size("512K").unwrap(), 512 << 10);
        assert_eq!(parse_nginx_size("0").unwrap(), 0);
        assert_eq!(parse_nginx_size("1g").unwrap(), 1 << 30);
        assert!(parse_nginx_size("m").is_err());
        assert!(parse_nginx_size("-1").is_err());
    }

    #[test]
    fn rewrite_and_cors_flags() {
        let s = p(&[
            "-s",
            "svc",
            "--rewrite",
            "^/api/(.*)$ /$1",
            "--rewrite=^/x /y",
            "--cors_preset=cors_with_regex",
            "--cors_allow_origin_regex=^https://.*\\.example\\.com$",
        ])
        .unwrap();
        assert_eq!(s.rewrites.len(), 2);
        assert_eq!(s.rewrites[0].replacement, "/$1");
        assert!(s.cors.is_some());
    }

    #[test]
    fn listen_address_must_be_an_ip() {
        let e = p(&["-s", "svc", "--listen_address=localhost"]).unwrap_err();
        assert!(e.message.contains("--listen_address"));
        let s = p(&["-s", "svc", "--listen_address=0.0.0.0"]).unwrap();
        assert!(s.listen_address.is_unspecified());
    }
}
