//! `portico espv2`: ESPv2's start-up flags (its `start_proxy.py`, plus the flags only its
//! config manager takes), by their ESPv2 names and with ESPv2's defaults and conflict rules,
//! parsed into the same [`Settings`] as `portico esp` with [`Dialect::EspV2`].
//!
//! How a command line is read, as Python's `argparse` reads ESPv2's:
//! - `--flag=value` and `--flag value`, short forms (`-s`, `-v`, `-R`, `-a`, `-N`, `-z`, `-g`,
//!   `-t`), and unambiguous abbreviations of long flags (`--listener` for `--listener_port`);
//! - a flag given twice: the last one wins; repeatable flags (`--add_request_header`, ...)
//!   collect every value;
//! - switches (`--non_gcp`) take no value;
//! - an unknown flag, a bad value or a conflict ([`enforce_conflicts`], ESPv2's
//!   `enforce_conflict_args` with its messages) stops the start with exit code 1, as
//!   `start_proxy.py` does.
//!
//! What each flag does in Portico is [`FLAGS`]: implemented, accepted and ignored (it tunes
//! Envoy and has no meaning here), accepted and not implemented yet (logged once at start-up),
//! or refused until implemented (flags whose absence would weaken security, such as downstream
//! TLS: serving plain text on a port the operator asked to be TLS is worse than not starting).
//! The README's ESPv2 flag table is checked against [`FLAGS`] by a test.
//!
//! The command line is translated into `portico esp`'s ([`EspArgs`]) and validated by the same
//! code, so both dialects produce their [`Settings`] one way.

use super::{ArgError, EspArgs};
use crate::dialect::Dialect;
use crate::settings::{DependencyErrorBehavior, Settings};
use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

/// `start_proxy.py` exits 1 for every refused command line (argparse errors and conflicts).
pub const EXIT_BAD_ARGS: u8 = 1;

/// ESPv2's `DEFAULT_LISTENER_PORT`.
pub const DEFAULT_LISTENER_PORT: i64 = 8080;
/// ESPv2's `DEFAULT_BACKEND`.
pub const DEFAULT_BACKEND: &str = "http://127.0.0.1:8082";
/// ESPv2's default CORS allow-headers (ESP's, plus `X-User-Agent`).
pub const DEFAULT_CORS_HEADERS: &str =
    "DNT,User-Agent,X-User-Agent,X-Requested-With,If-Modified-Since,Cache-Control,Content-Type,Range,Authorization";
/// The metadata server ESPv2 asks unless `--non_gcp` (its config manager's `--metadata_url`).
pub const DEFAULT_METADATA_URL: &str = "http://169.254.169.254";
/// `compute_platform_override` under `--on_serverless` (start_proxy.py's `SERVERLESS_PLATFORM`).
pub const SERVERLESS_PLATFORM: &str = "Cloud Run(ESPv2)";
/// What `--service` is while the service name waits for the metadata server
/// (`--check_metadata`); never in the settings `parse` returns.
const SERVICE_FROM_METADATA: &str = "service-name-from-metadata";
/// ESPv2's `--backend_retry_ons` default.
pub const DEFAULT_BACKEND_RETRY_ONS: &str = "reset,connect-failure,refused-stream";
/// ESPv2's `--backend_retry_num` default.
pub const DEFAULT_BACKEND_RETRY_NUM: u32 = 1;
/// Largest `--backend_retry_num` Portico takes.
pub const MAX_BACKEND_RETRY_NUM: u32 = 100;
/// ESPv2's `--http_request_timeout_s` default: its own calls (Service Management, metadata
/// server, IAM, token endpoints) may take this long.
pub const DEFAULT_HTTP_REQUEST_TIMEOUT_S: u64 = 30;
/// Largest `--http_request_timeout_s` taken (a day; ESPv2 has no bound, but nothing waits
/// longer usefully and it keeps time arithmetic far from overflow).
pub const MAX_HTTP_REQUEST_TIMEOUT_S: u64 = 86_400;
/// ESPv2's Service Control call timeouts (ms): check, quota, report.
pub const DEFAULT_SERVICE_CONTROL_TIMEOUTS_MS: [&str; 3] = ["1000", "1000", "2000"];

/// What a flag does in Portico.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// It has its ESPv2 effect.
    Implemented,
    /// Accepted and ignored, with the reason: it tunes Envoy (or ESPv2's own plumbing) and has
    /// no meaning in Portico. Logged once at start-up.
    Ignored(&'static str),
    /// Accepted; its feature is not built yet and belongs to the issue numbered here (18: gRPC,
    /// 19: tracing). Logged once at start-up with that number.
    NotYet(u16),
    /// Refused until implemented, with the reason: ignoring it would weaken security.
    Refused(&'static str),
}

use Support::{Ignored, Implemented, NotYet, Refused};

const NO_ENVOY: &str = "Envoy tuning; Portico has no Envoy";
const TLS_REFUSED: &str = "TLS to gRPC backends is asked for with --backend=grpcs://HOST:PORT \
     (trust anchors: --ssl_backend_client_root_certs_file); this deprecated flag is refused so \
     that Portico never connects in plain text where TLS was asked for";

/// Every flag `portico espv2` accepts and what it does. The README's table is checked against
/// this list.
pub const FLAGS: &[(&str, Support)] = &[
    // Service config and rollout.
    ("--service", Implemented),
    ("--version", Implemented),
    ("--service_json_path", Implemented),
    ("--rollout_strategy", Implemented),
    ("--management", Implemented),
    ("--check_metadata", Implemented),
    ("--http_request_timeout_s", Implemented),
    // Backend.
    ("--backend", Implemented),
    ("--enable_backend_address_override", Implemented),
    ("--backend_dns_lookup_family", Implemented),
    ("--dns_resolver_addresses", Implemented),
    ("--backend_retry_ons", Implemented),
    ("--backend_retry_on_status_codes", Implemented),
    ("--backend_retry_num", Implemented),
    ("--backend_per_try_timeout", Implemented),
    ("--health_check_grpc_backend", Implemented),
    ("--health_check_grpc_backend_service", Implemented),
    ("--health_check_grpc_backend_interval", Implemented),
    (
        "--health_check_grpc_backend_no_traffic_interval",
        Implemented,
    ),
    // Listener and TLS.
    ("--listener_port", Implemented),
    ("--status_port", Implemented),
    ("--ssl_server_cert_path", Implemented),
    ("--ssl_server_cipher_suites", Implemented),
    ("--ssl_server_root_cert_path", Implemented),
    ("--ssl_minimum_protocol", Implemented),
    ("--ssl_maximum_protocol", Implemented),
    ("--generate_self_signed_cert", Implemented),
    ("--enable_strict_transport_security", Implemented),
    ("--ssl_backend_client_cert_path", Implemented),
    ("--ssl_backend_client_root_certs_file", Implemented),
    ("--ssl_backend_client_cipher_suites", Implemented),
    // Health, headers and paths.
    ("--healthz", Implemented),
    ("--add_request_header", Implemented),
    ("--append_request_header", Implemented),
    ("--add_response_header", Implemented),
    ("--append_response_header", Implemented),
    ("--enable_operation_name_header", Implemented),
    ("--underscores_in_headers", Implemented),
    ("--disable_normalize_path", Implemented),
    ("--disable_merge_slashes_in_path", Implemented),
    ("--disallow_escaped_slashes_in_path", Implemented),
    ("--envoy_use_remote_address", Implemented),
    ("--envoy_xff_num_trusted_hops", Implemented),
    ("--envoy_connection_buffer_limit_bytes", Ignored(NO_ENVOY)),
    ("--enable_response_compression", Implemented),
    ("--envoy_extra_config_yaml", Ignored(NO_ENVOY)),
    (
        "--ads_named_pipe",
        Ignored("the pipe between ESPv2's config manager and Envoy; Portico is one process"),
    ),
    // CORS.
    ("--cors_preset", Implemented),
    ("--cors_allow_origin", Implemented),
    ("--cors_allow_origin_regex", Implemented),
    ("--cors_allow_methods", Implemented),
    ("--cors_allow_headers", Implemented),
    ("--cors_expose_headers", Implemented),
    ("--cors_allow_credentials", Implemented),
    ("--cors_max_age", Implemented),
    // JWT.
    (
        "--disable_jwks_async_fetch",
        Ignored(
            "Portico always fetches a key set when a request first needs it, which is what this \
         flag asks for",
        ),
    ),
    (
        "--jwks_async_fetch_fast_listener",
        Ignored("the listener never waits for key sets in Portico"),
    ),
    ("--jwt_cache_size", Implemented),
    ("--jwks_cache_duration_in_s", Implemented),
    ("--jwks_fetch_num_retries", Implemented),
    ("--jwks_fetch_retry_back_off_base_interval_ms", Implemented),
    ("--jwks_fetch_retry_back_off_max_interval_ms", Implemented),
    ("--jwt_pad_forward_payload_header", Implemented),
    ("--disable_jwt_audience_service_name_check", Implemented),
    // Service Control.
    ("--service_control_url", Implemented),
    ("--service_control_check_timeout_ms", Implemented),
    ("--service_control_quota_timeout_ms", Implemented),
    ("--service_control_report_timeout_ms", Implemented),
    ("--service_control_check_retries", Implemented),
    ("--service_control_quota_retries", Implemented),
    ("--service_control_report_retries", Implemented),
    ("--service_control_network_fail_policy", Implemented),
    (
        "--service_control_enable_api_key_uid_reporting",
        Implemented,
    ),
    (
        "--no-service_control_enable_api_key_uid_reporting",
        Implemented,
    ),
    ("--log_request_headers", Implemented),
    ("--log_response_headers", Implemented),
    ("--log_jwt_payloads", Implemented),
    // Logs and tracing.
    ("--access_log", Implemented),
    ("--access_log_format", Implemented),
    ("--disable_tracing", Implemented),
    ("--tracing_project_id", Implemented),
    ("--tracing_sample_rate", Implemented),
    ("--disable_cloud_trace_auto_sampling", Implemented),
    ("--tracing_incoming_context", Implemented),
    ("--tracing_outgoing_context", Implemented),
    ("--cloud_trace_url_override", Implemented),
    // Platform and credentials.
    ("--non_gcp", Implemented),
    ("--service_account_key", Implemented),
    ("--enable_application_default_credentials", Implemented),
    ("--enable_debug", Implemented),
    // gRPC-JSON transcoding.
    ("--transcoding_always_print_primitive_fields", Implemented),
    ("--transcoding_always_print_enums_as_ints", Implemented),
    ("--transcoding_stream_newline_delimited", Implemented),
    ("--transcoding_case_insensitive_enum_parsing", Implemented),
    ("--transcoding_preserve_proto_field_names", Implemented),
    ("--transcoding_ignore_query_parameters", Implemented),
    ("--transcoding_ignore_unknown_query_parameters", Implemented),
    (
        "--transcoding_query_parameters_disable_unescape_plus",
        Implemented,
    ),
    ("--transcoding_match_unregistered_custom_verb", Implemented),
    ("--disallow_colon_in_wildcard_path_segment", Implemented),
    // Deprecated, kept by ESPv2 for ESP v1 command lines.
    (
        "--enable_backend_routing",
        Ignored("routing by x-google-backend is always on in ESPv2, as in Portico's espv2 dialect"),
    ),
    (
        "--backend_protocol",
        Ignored("the protocol follows the --backend scheme, as in ESPv2"),
    ),
    ("--http_port", Implemented),
    ("--http2_port", Implemented),
    ("--ssl_port", Implemented),
    ("--dns", Implemented),
    ("--tls_mutual_auth", Implemented),
    ("--ssl_protocols", Implemented),
    ("--enable_grpc_backend_ssl", Refused(TLS_REFUSED)),
    (
        "--grpc_backend_ssl_root_certs_file",
        Ignored(
            "ESPv2 reads it only with --enable_grpc_backend_ssl, which is refused: give \
             --backend=grpcs://HOST:PORT and --ssl_backend_client_root_certs_file",
        ),
    ),
    ("--ssl_client_cert_path", Implemented),
    ("--ssl_client_root_certs_file", Implemented),
    ("--on_serverless", Implemented),
    // Flags of ESPv2's config manager (start_proxy.py does not take them).
    ("--listener_address", Implemented),
    ("--cluster_connect_timeout", Implemented),
    ("--service_management_url", Implemented),
    ("--metadata_url", Implemented),
    ("--iam_url", Implemented),
    ("--service_control_iam_service_account", Implemented),
    ("--service_control_iam_delegates", Implemented),
    ("--backend_auth_iam_service_account", Implemented),
    ("--backend_auth_iam_delegates", Implemented),
    (
        "--token_agent_port",
        Ignored("the port of Envoy's token agent; Portico fetches tokens itself"),
    ),
    ("--disable_oidc_discovery", Implemented),
    ("--dependency_error_behavior", Implemented),
    ("--skip_jwt_authn_filter", Implemented),
    ("--skip_service_control_filter", Implemented),
    (
        "--suppress_envoy_headers",
        Ignored(
            "Portico adds none of the x-envoy-* headers of Envoy's router, which this flag \
             suppresses (the x-envoy-original-path and x-envoy-original-method of ESPv2's \
             transcoding and path translation are not the router's and stay, as in ESPv2)",
        ),
    ),
    ("--enable_grpc_for_http1", Implemented),
    ("--min_stream_report_interval_ms", Implemented),
    ("--client_ip_from_forwarded_header", Implemented),
    ("--backend_cluster_maximum_requests", Implemented),
    ("--generated_header_prefix", Implemented),
    (
        "--tracing_max_num_attributes",
        Ignored("Portico sends at most 32 attributes per span and no annotations, message events or links"),
    ),
    (
        "--tracing_max_num_annotations",
        Ignored("Portico sends at most 32 attributes per span and no annotations, message events or links"),
    ),
    (
        "--tracing_max_num_message_events",
        Ignored("Portico sends at most 32 attributes per span and no annotations, message events or links"),
    ),
    (
        "--tracing_max_num_links",
        Ignored("Portico sends at most 32 attributes per span and no annotations, message events or links"),
    ),
    ("--health_check_operation", Implemented),
    ("--cors_operation_delimiter", Implemented),
    // Portico's own.
    ("--tracing_otlp_endpoint", Implemented),
    ("--listen_address", Implemented),
    ("--worker_threads", Implemented),
    ("--client_max_body_size", Implemented),
];

/// The raw command line, named as ESPv2 names its flags. Values are kept as text and checked in
/// [`validate`], so each refusal names its flag the way `start_proxy.py` would.
#[derive(Debug, Parser)]
#[command(
    name = "portico espv2",
    about = "ESPv2-compatible API proxy. Accepts ESPv2's start-up flags (start_proxy.py and its \
             config manager's); what each does in Portico is in the README's ESPv2 flag table.",
    disable_version_flag = true,
    args_override_self = true,
    infer_long_args = true,
    allow_negative_numbers = true,
    after_help = "Portico listens on 127.0.0.1 unless --listener_address is given; in a \
                  container pass --listener_address=0.0.0.0 (the Portico image's espv2 target \
                  does)."
)]
pub struct Espv2Args {
    // ---- Service config and rollout.
    /// Endpoints service name.
    #[arg(short = 's', long = "service", default_value = "")]
    pub service: String,
    /// Service config id; required with --rollout_strategy=fixed unless --service_json_path.
    #[arg(short = 'v', long = "version", default_value = "")]
    pub version: String,
    /// Load the service config from this `google.api.Service` JSON file.
    #[arg(long = "service_json_path")]
    pub service_json_path: Option<PathBuf>,
    /// `fixed` or `managed` (follow new rollouts).
    #[arg(short = 'R', long = "rollout_strategy", default_value = "fixed",
          value_parser = ["fixed", "managed"])]
    pub rollout_strategy: String,
    /// Service Management base URL.
    #[arg(short = 'g', long = "management", hide = true)]
    pub management: Option<String>,
    #[arg(long = "check_metadata", action = ArgAction::SetTrue)]
    pub check_metadata: bool,
    /// Timeout of ESPv2's own calls (Service Management, metadata server), not of backends.
    #[arg(long = "http_request_timeout_s")]
    pub http_request_timeout_s: Option<String>,

    // ---- Backend.
    /// Backend address: `http://`, `https://` or `grpc://` host[:port].
    #[arg(short = 'a', long = "backend", default_value = DEFAULT_BACKEND)]
    pub backend: String,
    #[arg(long = "enable_backend_address_override", action = ArgAction::SetTrue)]
    pub enable_backend_address_override: bool,
    #[arg(long = "backend_dns_lookup_family",
          value_parser = ["auto", "v4only", "v6only", "v4preferred", "all"])]
    pub backend_dns_lookup_family: Option<String>,
    #[arg(long = "dns_resolver_addresses")]
    pub dns_resolver_addresses: Option<String>,
    #[arg(long = "backend_retry_ons")]
    pub backend_retry_ons: Option<String>,
    #[arg(long = "backend_retry_on_status_codes")]
    pub backend_retry_on_status_codes: Option<String>,
    #[arg(long = "backend_retry_num")]
    pub backend_retry_num: Option<String>,
    #[arg(long = "backend_per_try_timeout")]
    pub backend_per_try_timeout: Option<String>,
    #[arg(long = "health_check_grpc_backend", action = ArgAction::SetTrue)]
    pub health_check_grpc_backend: bool,
    #[arg(long = "health_check_grpc_backend_service")]
    pub health_check_grpc_backend_service: Option<String>,
    #[arg(long = "health_check_grpc_backend_interval")]
    pub health_check_grpc_backend_interval: Option<String>,
    #[arg(long = "health_check_grpc_backend_no_traffic_interval")]
    pub health_check_grpc_backend_no_traffic_interval: Option<String>,

    // ---- Listener and TLS.
    /// The one serving port (HTTP/1.1, HTTP/2 cleartext and gRPC); default 8080.
    #[arg(long = "listener_port")]
    pub listener_port: Option<String>,
    /// Status server port (`/endpoints_status`, `/healthz`, `/metrics`); 0 (default): off.
    #[arg(
        short = 'N',
        long = "status_port",
        visible_alias = "admin_port",
        default_value = "0"
    )]
    pub status_port: String,
    #[arg(long = "ssl_server_cert_path")]
    pub ssl_server_cert_path: Option<String>,
    #[arg(long = "ssl_server_cipher_suites")]
    pub ssl_server_cipher_suites: Option<String>,
    #[arg(long = "ssl_server_root_cert_path")]
    pub ssl_server_root_cert_path: Option<String>,
    #[arg(long = "ssl_minimum_protocol", value_parser = ["TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3"])]
    pub ssl_minimum_protocol: Option<String>,
    #[arg(long = "ssl_maximum_protocol", value_parser = ["TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3"])]
    pub ssl_maximum_protocol: Option<String>,
    #[arg(long = "generate_self_signed_cert", action = ArgAction::SetTrue)]
    pub generate_self_signed_cert: bool,
    /// Adds `Strict-Transport-Security` to every response.
    #[arg(long = "enable_strict_transport_security", action = ArgAction::SetTrue)]
    pub enable_strict_transport_security: bool,
    #[arg(long = "ssl_backend_client_cert_path")]
    pub ssl_backend_client_cert_path: Option<String>,
    #[arg(long = "ssl_backend_client_root_certs_file")]
    pub ssl_backend_client_root_certs_file: Option<String>,
    #[arg(long = "ssl_backend_client_cipher_suites")]
    pub ssl_backend_client_cipher_suites: Option<String>,

    // ---- Health, headers and paths.
    /// A health-check path answered 200 on the listener port (`/healthz` or `healthz`); neither
    /// checked nor reported.
    #[arg(short = 'z', long = "healthz")]
    pub healthz: Option<String>,
    #[arg(long = "add_request_header", action = ArgAction::Append)]
    pub add_request_header: Vec<String>,
    #[arg(long = "append_request_header", action = ArgAction::Append)]
    pub append_request_header: Vec<String>,
    #[arg(long = "add_response_header", action = ArgAction::Append)]
    pub add_response_header: Vec<String>,
    #[arg(long = "append_response_header", action = ArgAction::Append)]
    pub append_response_header: Vec<String>,
    #[arg(long = "enable_operation_name_header", action = ArgAction::SetTrue)]
    pub enable_operation_name_header: bool,
    /// Forward client headers whose names contain `_` (dropped by default).
    #[arg(long = "underscores_in_headers", action = ArgAction::SetTrue)]
    pub underscores_in_headers: bool,
    /// Match and forward the path as received (no decoding or dot-segment removal).
    #[arg(long = "disable_normalize_path", action = ArgAction::SetTrue)]
    pub disable_normalize_path: bool,
    /// Keep repeated slashes in the path.
    #[arg(long = "disable_merge_slashes_in_path", action = ArgAction::SetTrue)]
    pub disable_merge_slashes_in_path: bool,
    /// Redirect a path holding `%2F`/`%5C` to its decoded form (gRPC: refuse).
    #[arg(long = "disallow_escaped_slashes_in_path", action = ArgAction::SetTrue)]
    pub disallow_escaped_slashes_in_path: bool,
    #[arg(long = "envoy_use_remote_address", action = ArgAction::SetTrue)]
    pub envoy_use_remote_address: bool,
    #[arg(long = "envoy_xff_num_trusted_hops")]
    pub envoy_xff_num_trusted_hops: Option<String>,
    #[arg(long = "envoy_connection_buffer_limit_bytes")]
    pub envoy_connection_buffer_limit_bytes: Option<String>,
    #[arg(long = "enable_response_compression", action = ArgAction::SetTrue)]
    pub enable_response_compression: bool,
    #[arg(long = "envoy_extra_config_yaml")]
    pub envoy_extra_config_yaml: Option<String>,
    #[arg(long = "ads_named_pipe")]
    pub ads_named_pipe: Option<String>,

    // ---- CORS.
    /// `basic` or `cors_with_regex`; no CORS handling without it.
    #[arg(long = "cors_preset")]
    pub cors_preset: Option<String>,
    #[arg(long = "cors_allow_origin", default_value = "*")]
    pub cors_allow_origin: String,
    #[arg(long = "cors_allow_origin_regex", default_value = "")]
    pub cors_allow_origin_regex: String,
    #[arg(
        long = "cors_allow_methods",
        default_value = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
    )]
    pub cors_allow_methods: String,
    #[arg(long = "cors_allow_headers", default_value = DEFAULT_CORS_HEADERS)]
    pub cors_allow_headers: String,
    #[arg(
        long = "cors_expose_headers",
        default_value = "Content-Length,Content-Range"
    )]
    pub cors_expose_headers: String,
    #[arg(long = "cors_allow_credentials", action = ArgAction::SetTrue)]
    pub cors_allow_credentials: bool,
    #[arg(long = "cors_max_age")]
    pub cors_max_age: Option<String>,

    // ---- JWT.
    #[arg(long = "disable_jwks_async_fetch", action = ArgAction::SetTrue)]
    pub disable_jwks_async_fetch: bool,
    #[arg(long = "jwks_async_fetch_fast_listener", action = ArgAction::SetTrue)]
    pub jwks_async_fetch_fast_listener: bool,
    #[arg(long = "jwt_cache_size")]
    pub jwt_cache_size: Option<String>,
    /// Key-set cache lifetime in seconds (default 300).
    #[arg(long = "jwks_cache_duration_in_s")]
    pub jwks_cache_duration_in_s: Option<String>,
    #[arg(long = "jwks_fetch_num_retries")]
    pub jwks_fetch_num_retries: Option<String>,
    #[arg(long = "jwks_fetch_retry_back_off_base_interval_ms")]
    pub jwks_fetch_retry_back_off_base_interval_ms: Option<String>,
    #[arg(long = "jwks_fetch_retry_back_off_max_interval_ms")]
    pub jwks_fetch_retry_back_off_max_interval_ms: Option<String>,
    #[arg(long = "jwt_pad_forward_payload_header", action = ArgAction::SetTrue)]
    pub jwt_pad_forward_payload_header: bool,
    #[arg(long = "disable_jwt_audience_service_name_check", action = ArgAction::SetTrue)]
    pub disable_jwt_audience_service_name_check: bool,

    // ---- Service Control.
    /// Service Control base URL.
    #[arg(long = "service_control_url")]
    pub service_control_url: Option<String>,
    /// Milliseconds one `:check` attempt may take (default 1000).
    #[arg(long = "service_control_check_timeout_ms")]
    pub service_control_check_timeout_ms: Option<String>,
    /// Milliseconds one `:allocateQuota` attempt may take (default 1000).
    #[arg(long = "service_control_quota_timeout_ms")]
    pub service_control_quota_timeout_ms: Option<String>,
    /// Milliseconds one `:report` attempt may take (default 2000).
    #[arg(long = "service_control_report_timeout_ms")]
    pub service_control_report_timeout_ms: Option<String>,
    /// Further `:check` attempts after one that got no answer (default 3).
    #[arg(long = "service_control_check_retries")]
    pub service_control_check_retries: Option<String>,
    /// Further `:allocateQuota` attempts (default 1).
    #[arg(long = "service_control_quota_retries")]
    pub service_control_quota_retries: Option<String>,
    /// Further `:report` attempts (default 5).
    #[arg(long = "service_control_report_retries")]
    pub service_control_report_retries: Option<String>,
    /// `open` (default: let requests through when Service Control is unreachable) or `close`.
    #[arg(long = "service_control_network_fail_policy", default_value = "open",
          value_parser = ["open", "close"])]
    pub service_control_network_fail_policy: String,
    /// Report the API key's uid (default on).
    #[arg(long = "service_control_enable_api_key_uid_reporting", action = ArgAction::SetTrue)]
    pub service_control_enable_api_key_uid_reporting: bool,
    #[arg(long = "no-service_control_enable_api_key_uid_reporting", action = ArgAction::SetTrue)]
    pub no_service_control_enable_api_key_uid_reporting: bool,
    /// Request headers copied into the report's log entry (comma-separated).
    #[arg(long = "log_request_headers")]
    pub log_request_headers: Option<String>,
    /// Response headers copied into the report's log entry (comma-separated).
    #[arg(long = "log_response_headers")]
    pub log_response_headers: Option<String>,
    /// JWT payload claims copied into the report's log entry (comma-separated).
    #[arg(long = "log_jwt_payloads")]
    pub log_jwt_payloads: Option<String>,

    // ---- Logs and tracing.
    /// Access log file (none by default).
    #[arg(long = "access_log")]
    pub access_log: Option<String>,
    #[arg(long = "access_log_format")]
    pub access_log_format: Option<String>,
    #[arg(long = "disable_tracing", action = ArgAction::SetTrue)]
    pub disable_tracing: bool,
    #[arg(long = "tracing_project_id")]
    pub tracing_project_id: Option<String>,
    #[arg(long = "tracing_sample_rate")]
    pub tracing_sample_rate: Option<String>,
    #[arg(long = "disable_cloud_trace_auto_sampling", action = ArgAction::SetTrue)]
    pub disable_cloud_trace_auto_sampling: bool,
    #[arg(long = "tracing_incoming_context")]
    pub tracing_incoming_context: Option<String>,
    #[arg(long = "tracing_outgoing_context")]
    pub tracing_outgoing_context: Option<String>,
    #[arg(long = "cloud_trace_url_override")]
    pub cloud_trace_url_override: Option<String>,

    // ---- Platform and credentials.
    /// Ask no metadata server; needs --service_account_key (or GOOGLE_APPLICATION_CREDENTIALS).
    #[arg(long = "non_gcp", action = ArgAction::SetTrue)]
    pub non_gcp: bool,
    /// Service-account key JSON (falls back to GOOGLE_APPLICATION_CREDENTIALS).
    #[arg(
        short = 'k',
        long = "service_account_key",
        env = "GOOGLE_APPLICATION_CREDENTIALS"
    )]
    pub service_account_key: Option<PathBuf>,
    /// Whether `service_account_key` came from GOOGLE_APPLICATION_CREDENTIALS rather than the
    /// flag (start_proxy.py's conflict rules look at the flag only).
    #[arg(skip)]
    pub service_account_key_from_env: bool,
    /// Google's application default credentials: GOOGLE_APPLICATION_CREDENTIALS, gcloud's
    /// well-known file, then the metadata server.
    #[arg(long = "enable_application_default_credentials", action = ArgAction::SetTrue)]
    pub enable_application_default_credentials: bool,
    #[arg(long = "enable_debug", action = ArgAction::SetTrue)]
    pub enable_debug: bool,

    // ---- gRPC-JSON transcoding.
    #[arg(long = "transcoding_always_print_primitive_fields", action = ArgAction::SetTrue)]
    pub transcoding_always_print_primitive_fields: bool,
    #[arg(long = "transcoding_always_print_enums_as_ints", action = ArgAction::SetTrue)]
    pub transcoding_always_print_enums_as_ints: bool,
    #[arg(long = "transcoding_stream_newline_delimited", action = ArgAction::SetTrue)]
    pub transcoding_stream_newline_delimited: bool,
    #[arg(long = "transcoding_case_insensitive_enum_parsing", action = ArgAction::SetTrue)]
    pub transcoding_case_insensitive_enum_parsing: bool,
    #[arg(long = "transcoding_preserve_proto_field_names", action = ArgAction::SetTrue)]
    pub transcoding_preserve_proto_field_names: bool,
    #[arg(long = "transcoding_ignore_query_parameters")]
    pub transcoding_ignore_query_parameters: Option<String>,
    #[arg(long = "transcoding_ignore_unknown_query_parameters", action = ArgAction::SetTrue)]
    pub transcoding_ignore_unknown_query_parameters: bool,
    #[arg(long = "transcoding_query_parameters_disable_unescape_plus", action = ArgAction::SetTrue)]
    pub transcoding_query_parameters_disable_unescape_plus: bool,
    #[arg(long = "transcoding_match_unregistered_custom_verb", action = ArgAction::SetTrue)]
    pub transcoding_match_unregistered_custom_verb: bool,
    #[arg(long = "disallow_colon_in_wildcard_path_segment", action = ArgAction::SetTrue)]
    pub disallow_colon_in_wildcard_path_segment: bool,

    // ---- Deprecated (ESP v1 command lines).
    #[arg(long = "enable_backend_routing", action = ArgAction::SetTrue, hide = true)]
    pub enable_backend_routing: bool,
    #[arg(long = "backend_protocol", value_parser = ["http1", "http2", "grpc"], hide = true)]
    pub backend_protocol: Option<String>,
    #[arg(long = "http_port", hide = true)]
    pub http_port: Option<String>,
    #[arg(long = "http2_port", hide = true)]
    pub http2_port: Option<String>,
    #[arg(long = "ssl_port", hide = true)]
    pub ssl_port: Option<String>,
    #[arg(long = "dns", hide = true)]
    pub dns: Option<String>,
    #[arg(short = 't', long = "tls_mutual_auth", action = ArgAction::SetTrue, hide = true)]
    pub tls_mutual_auth: bool,
    #[arg(long = "ssl_protocols", action = ArgAction::Append, hide = true)]
    pub ssl_protocols: Vec<String>,
    #[arg(long = "enable_grpc_backend_ssl", action = ArgAction::SetTrue, hide = true)]
    pub enable_grpc_backend_ssl: bool,
    #[arg(long = "grpc_backend_ssl_root_certs_file", hide = true)]
    pub grpc_backend_ssl_root_certs_file: Option<String>,
    #[arg(long = "ssl_client_cert_path", hide = true)]
    pub ssl_client_cert_path: Option<String>,
    #[arg(long = "ssl_client_root_certs_file", hide = true)]
    pub ssl_client_root_certs_file: Option<String>,
    #[arg(long = "on_serverless", action = ArgAction::SetTrue, hide = true)]
    pub on_serverless: bool,

    // ---- The config manager's own flags.
    /// Address the listener binds to (Portico's default: 127.0.0.1).
    #[arg(long = "listener_address")]
    pub listener_address: Option<String>,
    #[arg(long = "cluster_connect_timeout")]
    pub cluster_connect_timeout: Option<String>,
    /// Service Management base URL (the config manager's name for --management).
    #[arg(long = "service_management_url")]
    pub service_management_url: Option<String>,
    /// GCE-compatible metadata server (default http://169.254.169.254 unless --non_gcp).
    #[arg(long = "metadata_url")]
    pub metadata_url: Option<String>,
    #[arg(long = "iam_url")]
    pub iam_url: Option<String>,
    #[arg(long = "service_control_iam_service_account")]
    pub service_control_iam_service_account: Option<String>,
    #[arg(long = "service_control_iam_delegates")]
    pub service_control_iam_delegates: Option<String>,
    #[arg(long = "backend_auth_iam_service_account")]
    pub backend_auth_iam_service_account: Option<String>,
    #[arg(long = "backend_auth_iam_delegates")]
    pub backend_auth_iam_delegates: Option<String>,
    #[arg(long = "token_agent_port")]
    pub token_agent_port: Option<String>,
    #[arg(long = "disable_oidc_discovery", action = ArgAction::SetTrue)]
    pub disable_oidc_discovery: bool,
    #[arg(long = "dependency_error_behavior")]
    pub dependency_error_behavior: Option<String>,
    /// No JWT authentication at all.
    #[arg(long = "skip_jwt_authn_filter", action = ArgAction::SetTrue)]
    pub skip_jwt_authn_filter: bool,
    /// No Service Control at all (no check, quota or report; no API key required).
    #[arg(long = "skip_service_control_filter", action = ArgAction::SetTrue)]
    pub skip_service_control_filter: bool,
    #[arg(long = "suppress_envoy_headers", num_args = 0..=1, default_missing_value = "true")]
    pub suppress_envoy_headers: Option<String>,
    #[arg(long = "enable_grpc_for_http1", num_args = 0..=1, default_missing_value = "true")]
    pub enable_grpc_for_http1: Option<String>,
    #[arg(long = "min_stream_report_interval_ms")]
    pub min_stream_report_interval_ms: Option<String>,
    #[arg(long = "client_ip_from_forwarded_header", action = ArgAction::SetTrue)]
    pub client_ip_from_forwarded_header: bool,
    #[arg(long = "backend_cluster_maximum_requests")]
    pub backend_cluster_maximum_requests: Option<String>,
    #[arg(long = "generated_header_prefix")]
    pub generated_header_prefix: Option<String>,
    #[arg(long = "tracing_max_num_attributes")]
    pub tracing_max_num_attributes: Option<String>,
    #[arg(long = "tracing_max_num_annotations")]
    pub tracing_max_num_annotations: Option<String>,
    #[arg(long = "tracing_max_num_message_events")]
    pub tracing_max_num_message_events: Option<String>,
    #[arg(long = "tracing_max_num_links")]
    pub tracing_max_num_links: Option<String>,
    #[arg(long = "health_check_operation")]
    pub health_check_operation: Option<String>,
    #[arg(long = "cors_operation_delimiter")]
    pub cors_operation_delimiter: Option<String>,

    // ---- Portico's own.
    /// Send traces as OTLP/HTTP protobuf to this URL (for example
    /// `http://127.0.0.1:4318/v1/traces`) instead of Cloud Trace.
    #[arg(long = "tracing_otlp_endpoint")]
    pub tracing_otlp_endpoint: Option<String>,
    /// Portico: the same as --listener_address.
    #[arg(long = "listen_address")]
    pub listen_address: Option<String>,
    /// Portico: serving threads (default: one per core).
    #[arg(long = "worker_threads")]
    pub worker_threads: Option<usize>,
    /// Portico: largest request body, nginx syntax (`32m`); default 0, no limit, as ESPv2.
    #[arg(long = "client_max_body_size", default_value = "0")]
    pub client_max_body_size: String,
}

impl ArgError {
    fn v2(message: impl Into<String>) -> Self {
        ArgError {
            exit_code: EXIT_BAD_ARGS,
            message: message.into(),
        }
    }
}

/// argparse's reading of an `int` flag; `None` for an absent one.
fn int_flag(flag: &str, v: Option<&str>) -> Result<Option<i64>, ArgError> {
    match v {
        None => Ok(None),
        Some(s) => s
            .trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|_| ArgError::v2(format!("argument {flag}: invalid int value: '{s}'"))),
    }
}

/// ESPv2's `--min_stream_report_interval_ms` default (its Service Control filter's).
pub const DEFAULT_MIN_STREAM_REPORT_INTERVAL_MS: u64 = 10_000;

/// `--min_stream_report_interval_ms`, checked as ESPv2 checks it: an unsigned number (its
/// config manager's `flag.Uint64`), 0 for the default, and otherwise at least 100 (its Service
/// Control filter refuses the config below that, with the words kept here). ESPv2 then keeps
/// the value and never reads it: no intermediate reports are sent (docs/grpc.md), so neither
/// does Portico, and the value itself is not kept.
fn min_stream_report_interval(v: Option<&str>) -> Result<u64, ArgError> {
    let Some(s) = v else {
        return Ok(DEFAULT_MIN_STREAM_REPORT_INTERVAL_MS);
    };
    match s.trim().parse::<u64>() {
        Ok(0) => Ok(DEFAULT_MIN_STREAM_REPORT_INTERVAL_MS),
        Ok(n) if n < 100 => Err(ArgError::v2(format!(
            "invalid --min_stream_report_interval_ms '{s}': min_stream_report_interval_ms must \
             be larger than: 100"
        ))),
        Ok(n) => Ok(n),
        Err(_) => Err(ArgError::v2(format!(
            "invalid --min_stream_report_interval_ms '{s}': give a whole number of \
             milliseconds, 0 (the default, {DEFAULT_MIN_STREAM_REPORT_INTERVAL_MS}) or from \
             100 up"
        ))),
    }
}

/// A Go duration (`time.ParseDuration`, how ESPv2's config manager reads `--cors_max_age` and
/// `--backend_per_try_timeout`): an optional sign, then numbers with optional fractions, each
/// with a unit (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`), as `480h`, `1.5h`, `2h45m`, `300ms`; a
/// bare `0` is zero. Negative durations are refused: no flag Portico reads this way means
/// anything with one. `Err` is the reason, for the flag's message.
pub fn go_duration(s: &str) -> Result<std::time::Duration, &'static str> {
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if rest.is_empty() {
        return Err("not a duration");
    }
    // Nanoseconds; Go refuses anything past i64::MAX (about 292 years).
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (whole, after) = rest.split_at(digits);
        let (fraction, after) = match after.strip_prefix('.') {
            Some(f) => {
                let n = f.bytes().take_while(u8::is_ascii_digit).count();
                f.split_at(n)
            }
            None => ("", after),
        };
        if whole.is_empty() && fraction.is_empty() {
            return Err("not a duration");
        }
        let unit_len = after
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(after.len(), |(i, _)| i);
        let (unit, next) = after.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err("a number needs a unit (ns, us, ms, s, m, h)"),
            _ => return Err("unknown unit (use ns, us, ms, s, m, h)"),
        };
        // Past 30 digits the value is out of range anyway; this also bounds the arithmetic.
        if whole.len() > 30 {
            return Err("out of range");
        }
        let mut value = whole.parse::<u128>().unwrap_or(0).saturating_mul(scale);
        let mut place = scale;
        for d in fraction.bytes().take(30) {
            place /= 10;
            value = value.saturating_add(u128::from(d - b'0') * place);
        }
        total = total.saturating_add(value);
        if total > i64::MAX as u128 {
            return Err("out of range");
        }
        rest = next;
    }
    if negative && total > 0 {
        return Err("negative");
    }
    Ok(std::time::Duration::from_nanos(total as u64))
}

/// Go's `strconv.ParseBool`, how ESPv2's config manager reads a boolean flag's value.
fn go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// `--health_check_grpc_backend` and its three settings (start_proxy.py already refused them
/// without it, or without a `grpc` backend). The durations are Go durations, as ESPv2's config
/// manager reads them; Envoy refuses a zero or negative interval, and so does Portico.
fn grpc_backend_health(
    a: &Espv2Args,
) -> Result<Option<crate::grpc_health::HealthCheckSettings>, ArgError> {
    use crate::grpc_health::{self as health, HealthCheckSettings};
    if !a.health_check_grpc_backend {
        return Ok(None);
    }
    let duration = |flag: &str, v: Option<&str>, default| match v {
        None => Ok(default),
        Some(t) => day_bounded_duration(flag, t, "1s"),
    };
    Ok(Some(HealthCheckSettings {
        service: a
            .health_check_grpc_backend_service
            .clone()
            .unwrap_or_default(),
        interval: duration(
            "--health_check_grpc_backend_interval",
            a.health_check_grpc_backend_interval.as_deref(),
            health::DEFAULT_INTERVAL,
        )?,
        no_traffic_interval: duration(
            "--health_check_grpc_backend_no_traffic_interval",
            a.health_check_grpc_backend_no_traffic_interval.as_deref(),
            health::DEFAULT_NO_TRAFFIC_INTERVAL,
        )?,
    }))
}

/// ESPv2's `DependencyErrorBehavior` names, as its config manager reads them (exact case).
/// `UNSPECIFIED` is each filter's default, which blocks.
pub fn parse_dependency_error_behavior(v: &str) -> Result<DependencyErrorBehavior, String> {
    match v {
        "ALWAYS_INIT" => Ok(DependencyErrorBehavior::AlwaysInit),
        "BLOCK_INIT_ON_ANY_ERROR" | "UNSPECIFIED" => {
            Ok(DependencyErrorBehavior::BlockInitOnAnyError)
        }
        _ => Err(format!(
            "unknown value for DependencyErrorBehavior ({v}), accepted values are: \
             [\"ALWAYS_INIT\" \"BLOCK_INIT_ON_ANY_ERROR\" \"UNSPECIFIED\"]"
        )),
    }
}

/// The `--*_iam_*` flags, checked; `None` when neither account is named.
fn iam_settings(a: &Espv2Args) -> Result<Option<crate::iam_credentials::IamSettings>, String> {
    use crate::iam_credentials::{parse_account, parse_iam_url, DEFAULT_IAM_URL};
    // ESPv2 reads an empty account flag as absent.
    let named = |v: &Option<String>| v.as_deref().filter(|s| !s.is_empty()).map(str::to_string);
    let service_control = named(&a.service_control_iam_service_account)
        .map(|email| {
            parse_account(
                "--service_control_iam_service_account",
                &email,
                "--service_control_iam_delegates",
                a.service_control_iam_delegates.as_deref(),
            )
        })
        .transpose()?;
    let backend_auth = named(&a.backend_auth_iam_service_account)
        .map(|email| {
            parse_account(
                "--backend_auth_iam_service_account",
                &email,
                "--backend_auth_iam_delegates",
                a.backend_auth_iam_delegates.as_deref(),
            )
        })
        .transpose()?;
    // Checked even when unused, so a typo is not left for the day an account is added.
    let url = parse_iam_url(a.iam_url.as_deref().unwrap_or(DEFAULT_IAM_URL))?;
    if service_control.is_none() && backend_auth.is_none() {
        return Ok(None);
    }
    Ok(Some(crate::iam_credentials::IamSettings {
        url,
        service_control,
        backend_auth,
    }))
}

/// ESPv2's `enforce_conflict_args`, in its order and with its messages. Returns the serving
/// port (8080 unless one port flag names another; 0 counts as absent, as in Python).
pub fn enforce_conflicts(a: &Espv2Args) -> Result<i64, ArgError> {
    if a.rollout_strategy == "managed" {
        if !a.version.is_empty() {
            return Err(ArgError::v2(
                "Flag --version cannot be used if --rollout_strategy=managed.",
            ));
        }
        if a.service_json_path.is_some() {
            return Err(ArgError::v2(
                "Flag -R or --rollout_strategy must be fixed with --service_json_path.",
            ));
        }
    } else if a.version.is_empty() && a.service_json_path.is_none() {
        return Err(ArgError::v2(
            "Flag --version is required if --rollout_strategy=fixed.",
        ));
    }
    if a.service_json_path.is_some() {
        if !a.service.is_empty() {
            return Err(ArgError::v2(
                "Flag --service cannot be used together with --service_json_path.",
            ));
        }
        if !a.version.is_empty() {
            return Err(ArgError::v2(
                "Flag --version cannot be used together with --service_json_path.",
            ));
        }
    }
    if a.non_gcp {
        let key_flag = a.service_account_key.is_some() && !a.service_account_key_from_env;
        if a.service_account_key.is_none() && !a.enable_application_default_credentials {
            return Err(ArgError::v2(
                "If --non_gcp is specified, --service_account_key or \
                 --enable_application_default_credentials has to be specified, or \
                 GOOGLE_APPLICATION_CREDENTIALS has to set in os.environ.",
            ));
        }
        if key_flag && a.enable_application_default_credentials {
            return Err(ArgError::v2(
                "Only one of --service_account_key or --enable_application_default_credentials \
                 can be supplied for credentials at once.",
            ));
        }
    }
    if a.access_log.is_none() && a.access_log_format.is_some() {
        return Err(ArgError::v2(
            "Flag --access_log_format has to be used together with --access_log.",
        ));
    }
    let ssl_port = int_flag("--ssl_port", a.ssl_port.as_deref())?.filter(|p| *p != 0);
    if ssl_port.is_some() && a.ssl_server_cert_path.is_some() {
        return Err(ArgError::v2(
            "Flag --ssl_port is going to be deprecated, please use --ssl_server_cert_path only.",
        ));
    }
    if a.tls_mutual_auth
        && (a.ssl_backend_client_cert_path.is_some() || a.ssl_client_cert_path.is_some())
    {
        return Err(ArgError::v2(
            "Flag --tls_mutual_auth is going to be deprecated, please use \
             --ssl_backend_client_cert_path only.",
        ));
    }
    if (a.ssl_backend_client_root_certs_file.is_some() || a.ssl_client_root_certs_file.is_some())
        && a.enable_grpc_backend_ssl
    {
        return Err(ArgError::v2(
            "Flag --enable_grpc_backend_ssl are going to be deprecated, please use \
             --ssl_backend_client_root_certs_file only.",
        ));
    }
    if a.generate_self_signed_cert && a.ssl_server_cert_path.is_some() {
        return Err(ArgError::v2(
            "Flag --generate_self_signed_cert and --ssl_server_cert_path cannot be used \
             simutaneously.",
        ));
    }

    let mut port_flags = Vec::new();
    let mut port = DEFAULT_LISTENER_PORT;
    for (flag, value) in [
        ("--http_port", &a.http_port),
        ("--http2_port", &a.http2_port),
        ("--listener_port", &a.listener_port),
        ("--ssl_port", &a.ssl_port),
    ] {
        // Python's `if args.http_port:`: 0 is the same as absent.
        if let Some(p) = int_flag(flag, value.as_deref())?.filter(|p| *p != 0) {
            port_flags.push(flag);
            port = p;
        }
    }
    if port_flags.len() > 1 {
        return Err(ArgError::v2(format!(
            "Multiple port flags {} are not allowed, use only the --listener_port flag",
            port_flags.join(",")
        )));
    } else if port < 1024 {
        return Err(ArgError::v2(format!(
            "Port {port} is a privileged port. For security purposes, the ESPv2 container \
             cannot bind to it. Use any port above 1024 instead."
        )));
    }

    if !a.ssl_protocols.is_empty()
        && (a.ssl_minimum_protocol.is_some() || a.ssl_maximum_protocol.is_some())
    {
        return Err(ArgError::v2(
            "Flag --ssl_protocols is going to be deprecated, please use --ssl_minimum_protocol \
             and --ssl_maximum_protocol.",
        ));
    }
    if a.transcoding_ignore_query_parameters.is_some()
        && a.transcoding_ignore_unknown_query_parameters
    {
        return Err(ArgError::v2(
            "Flag --transcoding_ignore_query_parameters cannot be used together with \
             --transcoding_ignore_unknown_query_parameters.",
        ));
    }
    if a.dns_resolver_addresses.is_some() && a.dns.is_some() {
        // ESPv2's message, its doubled words included.
        return Err(ArgError::v2(
            "Flag --dns_resolver_addresses cannot be used together with together with --dns.",
        ));
    }
    if a.ssl_backend_client_cert_path.is_some() && a.ssl_client_cert_path.is_some() {
        return Err(ArgError::v2(
            "Flag --ssl_client_cert_path is renamed to --ssl_backend_client_cert_path, only use \
             the latter flag.",
        ));
    }
    if a.ssl_backend_client_root_certs_file.is_some() && a.ssl_client_root_certs_file.is_some() {
        return Err(ArgError::v2(
            "Flag --ssl_client_root_certs_file is renamed to \
             --ssl_backend_client_root_certs_file, only use the latter flag.",
        ));
    }
    if a.health_check_grpc_backend && !a.backend.starts_with("grpc") {
        return Err(ArgError::v2(
            "Flag --health_check_grpc_backend requires the flag --backend to use grpc scheme.",
        ));
    }
    for (flag, set) in [
        (
            "--health_check_grpc_backend_interval",
            a.health_check_grpc_backend_interval.is_some(),
        ),
        (
            "--health_check_grpc_backend_service",
            a.health_check_grpc_backend_service.is_some(),
        ),
        (
            "--health_check_grpc_backend_no_traffic_interval",
            a.health_check_grpc_backend_no_traffic_interval.is_some(),
        ),
    ] {
        if set && !a.health_check_grpc_backend {
            return Err(ArgError::v2(format!(
                "Flag {flag} requires the flag --health_check_grpc_backend to be used."
            )));
        }
    }
    Ok(port)
}

/// Parses `args` (`args[0]` is the program name) into validated settings.
pub fn parse(args: Vec<OsString>) -> Result<Settings, ArgError> {
    let clap_error = |e: clap::Error| ArgError {
        exit_code: match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
            _ => EXIT_BAD_ARGS,
        },
        message: e.render().to_string(),
    };
    let matches = Espv2Args::command()
        .try_get_matches_from(args)
        .map_err(clap_error)?;
    let raw = Espv2Args::from_arg_matches(&matches).map_err(clap_error)?;
    let given = |flag: &str| {
        let id = flag.trim_start_matches('-').replace('-', "_");
        matches!(
            matches.value_source(&id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let mut raw = raw;
    raw.service_account_key_from_env =
        matches.value_source("service_account_key") == Some(ValueSource::EnvVariable);
    let mut settings = validate(raw)?;
    // `--service_control_enable_api_key_uid_reporting` and its `--no-` form: the last given
    // wins, as with argparse's BooleanOptionalAction; on by default.
    let last = |id: &str| {
        matches
            .indices_of(id)
            .filter(|_| matches.value_source(id) == Some(ValueSource::CommandLine))
            .and_then(Iterator::max)
    };
    settings.api_key_uid_reporting = match (
        last("service_control_enable_api_key_uid_reporting"),
        last("no_service_control_enable_api_key_uid_reporting"),
    ) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(on), Some(off)) => on > off,
    };
    for (flag, support) in FLAGS {
        if !given(flag) {
            continue;
        }
        match support {
            Implemented => {}
            Ignored(_) => settings.ignored_flags.push(flag),
            NotYet(_) => settings.not_implemented_flags.push(flag),
            Refused(why) => {
                return Err(ArgError::v2(format!("{flag} cannot be used yet: {why}")));
            }
        }
    }
    Ok(settings)
}

/// ESPv2's `--jwt_cache_size` default.
pub const ESPV2_JWT_CACHE_SIZE: usize = 1000;
/// Most JWKS fetch retries accepted: each can wait up to the back-off maximum, and requests
/// needing the keys wait for the whole chain.
pub const MAX_JWKS_FETCH_RETRIES: u32 = 100;

/// `--jwks_fetch_num_retries` and the back-off bounds, as Envoy accepts them: a base of at
/// least 1 ms and a maximum no smaller than the base.
fn jwks_fetch_retry(a: &Espv2Args) -> Result<crate::settings::JwksFetchRetry, ArgError> {
    let mut r = crate::settings::JwksFetchRetry::default();
    if let Some(s) = a.jwks_fetch_num_retries.as_deref() {
        r.retries = s
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= MAX_JWKS_FETCH_RETRIES)
            .ok_or_else(|| {
                ArgError::v2(format!(
                    "invalid --jwks_fetch_num_retries '{s}': must be a whole number from 0 to \
                     {MAX_JWKS_FETCH_RETRIES}"
                ))
            })?;
    }
    let ms = |flag: &str, v: &Option<String>| -> Result<Option<std::time::Duration>, ArgError> {
        let Some(s) = v.as_deref() else {
            return Ok(None);
        };
        s.trim()
            .parse::<u32>()
            .ok()
            .filter(|n| *n >= 1)
            .map(|n| Some(std::time::Duration::from_millis(u64::from(n))))
            .ok_or_else(|| {
                ArgError::v2(format!(
                    "invalid {flag} '{s}': must be a whole number of milliseconds from 1 to {}",
                    u32::MAX
                ))
            })
    };
    if let Some(d) = ms(
        "--jwks_fetch_retry_back_off_base_interval_ms",
        &a.jwks_fetch_retry_back_off_base_interval_ms,
    )? {
        r.backoff_base = d;
    }
    if let Some(d) = ms(
        "--jwks_fetch_retry_back_off_max_interval_ms",
        &a.jwks_fetch_retry_back_off_max_interval_ms,
    )? {
        r.backoff_max = d;
    }
    if r.backoff_max < r.backoff_base {
        return Err(ArgError::v2(format!(
            "--jwks_fetch_retry_back_off_max_interval_ms ({} ms) is below \
             --jwks_fetch_retry_back_off_base_interval_ms ({} ms)",
            r.backoff_max.as_millis(),
            r.backoff_base.as_millis()
        )));
    }
    Ok(r)
}

/// ESPv2's tracing flags (`start_proxy.py` and the config manager's rules): the rate in
/// [0, 1] (`--disable_cloud_trace_auto_sampling` is rate 0), the context lists from
/// `traceparent`, `grpc-trace-bin`, `x-cloud-trace-context` (empty: none), and with
/// `--non_gcp` and no `--tracing_project_id` no Cloud Trace export (OTLP needs no project).
fn tracing_settings(a: &Espv2Args) -> Result<crate::trace::TraceSettings, ArgError> {
    let mut t = crate::trace::TraceSettings::espv2();
    t.disabled = a.disable_tracing;
    if let Some(r) = a.tracing_sample_rate.as_deref() {
        t.sample_rate = r
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|r| (0.0..=1.0).contains(r))
            .ok_or_else(|| {
                ArgError::v2(format!(
                    "invalid --tracing_sample_rate '{r}': must be a number from 0 to 1"
                ))
            })?;
    }
    if a.disable_cloud_trace_auto_sampling {
        t.sample_rate = 0.0;
    }
    let formats = |flag: &str, v: &Option<String>, default: Vec<crate::trace::context::Format>| {
        let Some(v) = v else { return Ok(default) };
        let mut out = Vec::new();
        for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let f = crate::trace::context::Format::from_flag(name).ok_or_else(|| {
                ArgError::v2(format!(
                    "invalid {flag} '{v}': '{name}' is not one of traceparent, grpc-trace-bin, \
                     x-cloud-trace-context"
                ))
            })?;
            if !out.contains(&f) {
                out.push(f);
            }
        }
        Ok(out)
    };
    t.incoming = formats(
        "--tracing_incoming_context",
        &a.tracing_incoming_context,
        t.incoming.clone(),
    )?;
    t.outgoing = formats(
        "--tracing_outgoing_context",
        &a.tracing_outgoing_context,
        t.outgoing.clone(),
    )?;
    t.project_id = a
        .tracing_project_id
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string);
    let url = |flag: &str, v: &Option<String>| match v.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(u) => super::parse_trace_url(u, flag)
            .map(Some)
            .map_err(|e| ArgError::v2(e.message)),
    };
    t.url_override = url("--cloud_trace_url_override", &a.cloud_trace_url_override)?;
    t.otlp_endpoint = url("--tracing_otlp_endpoint", &a.tracing_otlp_endpoint)?;
    if a.non_gcp && t.project_id.is_none() && t.otlp_endpoint.is_none() && !t.disabled {
        tracing::info!(
            "tracing is off: --non_gcp without --tracing_project_id (as in ESPv2); give a \
             tracing project or --tracing_otlp_endpoint to trace"
        );
        t.disabled = true;
    }
    Ok(t)
}

/// Checks ESPv2's rules, translates the command line into `portico esp`'s and validates it
/// with the same code; then sets what only this dialect has.
pub fn validate(a: Espv2Args) -> Result<Settings, ArgError> {
    let tracing = tracing_settings(&a)?;
    let port = enforce_conflicts(&a)?;
    let backend_net = backend_net(&a)?;
    let grpc_backend_health = grpc_backend_health(&a)?;
    let port = u16::try_from(port).map_err(|_| {
        ArgError::v2(format!(
            "Port {port} is not a TCP port: use a port from 1024 to 65535."
        ))
    })?;
    let status_port = match int_flag("--status_port", Some(&a.status_port))? {
        Some(0) | None => None,
        Some(p) => Some(
            u16::try_from(p)
                .ok()
                .filter(|p| *p != port)
                .ok_or_else(|| {
                    ArgError::v2(format!(
                "invalid --status_port {p}: use a TCP port other than the listener's ({port}), \
                 or 0 for none"
            ))
                })?,
        ),
    };
    // ESPv2's config manager: no `--service` means the metadata server's
    // `endpoints-service-name`, read at start-up, but only with `--check_metadata` and a
    // metadata server.
    let service_from_metadata = a.service.is_empty() && a.service_json_path.is_none();
    if service_from_metadata {
        if !a.check_metadata {
            return Err(ArgError::v2(
                "service name is not specified, required because metadata fetching is disabled",
            ));
        }
        if a.non_gcp {
            return Err(ArgError::v2(
                "service name is not specified, required on a non-gcp deployment",
            ));
        }
    }
    if a.management.is_some() && a.service_management_url.is_some() {
        return Err(ArgError::v2(
            "--management and --service_management_url name the same URL: give one",
        ));
    }
    let http_request_timeout = match &a.http_request_timeout_s {
        None => DEFAULT_HTTP_REQUEST_TIMEOUT_S,
        Some(s) => int_flag("--http_request_timeout_s", Some(s))?
            .and_then(|t| u64::try_from(t).ok())
            .filter(|t| (1..=MAX_HTTP_REQUEST_TIMEOUT_S).contains(t))
            .ok_or_else(|| {
                ArgError::v2(format!(
                    "invalid --http_request_timeout_s '{s}': must be a whole number of seconds \
                     above 0 (at most {MAX_HTTP_REQUEST_TIMEOUT_S})"
                ))
            })?,
    };
    let dependency_error_behavior = match a.dependency_error_behavior.as_deref() {
        None => DependencyErrorBehavior::BlockInitOnAnyError,
        Some(v) => parse_dependency_error_behavior(v).map_err(ArgError::v2)?,
    };
    let iam = iam_settings(&a).map_err(ArgError::v2)?;
    let jwks_cache_duration_in_s = match a.jwks_cache_duration_in_s.as_deref() {
        None => None,
        Some(s) => Some(
            s.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=u64::from(u32::MAX)).contains(n))
                .ok_or_else(|| {
                    ArgError::v2(format!(
                        "invalid --jwks_cache_duration_in_s '{s}': must be a whole number of \
                         seconds above 0"
                    ))
                })?,
        ),
    };
    let jwt_cache_size = match a.jwt_cache_size.as_deref() {
        // ESPv2's default: 1000 verified tokens.
        None => ESPV2_JWT_CACHE_SIZE,
        Some(s) => s
            .trim()
            .parse::<u32>()
            .map_err(|_| {
                ArgError::v2(format!(
                    "invalid --jwt_cache_size '{s}': must be a whole number of tokens from 0 \
                     (no cache) to {}",
                    u32::MAX
                ))
            })?
            .try_into()
            .unwrap_or(usize::MAX),
    };
    let jwks_fetch_retry = jwks_fetch_retry(&a)?;
    let healthz = match a.healthz.as_deref() {
        None => None,
        Some(h) => {
            let path = h.strip_prefix('/').unwrap_or(h);
            if path.is_empty() || path.contains(['?', '#']) || path.chars().any(char::is_whitespace)
            {
                return Err(ArgError::v2(format!(
                    "invalid --healthz {h:?}: give a path such as /healthz"
                )));
            }
            Some(path.to_string())
        }
    };
    let listen_address = a.listen_address.or(a.listener_address);
    // start_proxy.py takes the key from GOOGLE_APPLICATION_CREDENTIALS when no flag names one;
    // clap's `env` already did.
    let mut service_account_key = a.service_account_key;
    let mut startup_notes = Vec::new();
    if a.enable_application_default_credentials {
        if service_account_key.is_some() && !a.service_account_key_from_env {
            startup_notes.push(
                "--enable_application_default_credentials: --service_account_key names the \
                 credentials, so no others are looked for"
                    .to_string(),
            );
        } else {
            let env = |name: &str| std::env::var_os(name);
            match crate::adc::find(&env) {
                Ok(Some(found)) => {
                    startup_notes.push(format!(
                        "application default credentials: {} (from {})",
                        found.path.display(),
                        found.origin
                    ));
                    service_account_key = Some(found.path);
                }
                Ok(None) if a.non_gcp => {
                    let looked = crate::adc::well_known_file(&env)
                        .map_or("gcloud's well-known file (no HOME)".to_string(), |p| {
                            p.display().to_string()
                        });
                    return Err(ArgError::v2(format!(
                        "--enable_application_default_credentials found no credentials: \
                         GOOGLE_APPLICATION_CREDENTIALS is not set and {looked} does not \
                         exist, and with --non_gcp there is no metadata server to ask"
                    )));
                }
                Ok(None) => startup_notes.push(
                    "application default credentials: none in GOOGLE_APPLICATION_CREDENTIALS \
                     or gcloud's well-known file; the metadata server's are used"
                        .to_string(),
                ),
                Err(e) => {
                    return Err(ArgError::v2(format!(
                        "--enable_application_default_credentials: {e}"
                    )))
                }
            }
        }
    }
    if let Some(iam) = &iam {
        if a.non_gcp && iam.backend_auth.is_some() {
            startup_notes.push(
                "--backend_auth_iam_service_account has no effect with --non_gcp: backend \
                 authentication is off, as in ESPv2"
                    .to_string(),
            );
        }
    }
    for (delegates, delegates_given, account, account_given) in [
        (
            "--service_control_iam_delegates",
            a.service_control_iam_delegates.is_some(),
            "--service_control_iam_service_account",
            a.service_control_iam_service_account.is_some(),
        ),
        (
            "--backend_auth_iam_delegates",
            a.backend_auth_iam_delegates.is_some(),
            "--backend_auth_iam_service_account",
            a.backend_auth_iam_service_account.is_some(),
        ),
    ] {
        if delegates_given && !account_given {
            startup_notes.push(format!(
                "{delegates} has no effect without {account}, as in ESPv2"
            ));
        }
    }
    if a.iam_url.is_some() && iam.is_none() {
        startup_notes.push(
            "--iam_url has no effect without --service_control_iam_service_account or \
             --backend_auth_iam_service_account"
                .to_string(),
        );
    }
    let metadata = if a.non_gcp {
        None
    } else {
        Some(
            a.metadata_url
                .unwrap_or_else(|| DEFAULT_METADATA_URL.to_string()),
        )
    };
    let [check_ms, quota_ms, report_ms] = DEFAULT_SERVICE_CONTROL_TIMEOUTS_MS;
    let cors = match a.cors_preset.as_deref() {
        None => None,
        Some(preset) => {
            let max_age = match a.cors_max_age.as_deref() {
                None => crate::cors::DEFAULT_MAX_AGE_SECS,
                Some(m) => go_duration(m.trim())
                    .map_err(|why| {
                        ArgError::v2(format!(
                            "invalid --cors_max_age '{m}': {why}; give a duration such as \
                             480h, 1.5h or 2h45m"
                        ))
                    })?
                    .as_secs(),
            };
            let flags = crate::cors::CorsFlags {
                preset,
                allow_origin: &a.cors_allow_origin,
                allow_origin_regex: &a.cors_allow_origin_regex,
                allow_methods: &a.cors_allow_methods,
                allow_headers: &a.cors_allow_headers,
                expose_headers: &a.cors_expose_headers,
                allow_credentials: a.cors_allow_credentials,
                hsts: a.enable_strict_transport_security,
            };
            Some(crate::cors::CorsSettings::espv2(flags, max_age).map_err(ArgError::v2)?)
        }
    };
    let retry_num = match a.backend_retry_num.as_deref() {
        None => DEFAULT_BACKEND_RETRY_NUM,
        Some(s) => s
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= MAX_BACKEND_RETRY_NUM)
            .ok_or_else(|| {
                ArgError::v2(format!(
                    "invalid --backend_retry_num '{s}': must be a whole number from 0 to \
                     {MAX_BACKEND_RETRY_NUM}"
                ))
            })?,
    };
    let retry_ons = a
        .backend_retry_ons
        .as_deref()
        .unwrap_or(DEFAULT_BACKEND_RETRY_ONS);
    let mut retry_on = crate::retry::RetryOn::parse(retry_ons).map_err(|bad| {
        ArgError::v2(format!(
            "invalid --backend_retry_ons '{retry_ons}': {bad:?} is not a retry condition (use \
             {}, or nothing to retry nothing)",
            crate::retry::ENVOY_RETRY_ONS.join(", ")
        ))
    })?;
    let retry_status_codes = match a.backend_retry_on_status_codes.as_deref() {
        None | Some("") => Vec::new(),
        Some(list) => {
            let codes = list
                .split(',')
                .map(|c| {
                    c.trim()
                        .parse::<u16>()
                        .ok()
                        .filter(|c| (100..600).contains(c))
                })
                .collect::<Option<Vec<u16>>>()
                .ok_or_else(|| {
                    ArgError::v2(format!(
                        "invalid --backend_retry_on_status_codes '{list}': give HTTP status \
                         codes from 100 to 599, separated by commas"
                    ))
                })?;
            // As ESPv2: status codes retry whatever --backend_retry_ons says.
            retry_on.retriable_status_codes = true;
            codes
        }
    };
    min_stream_report_interval(a.min_stream_report_interval_ms.as_deref())?;
    let per_try_timeout = match a.backend_per_try_timeout.as_deref() {
        None => None,
        Some(t) => Some(go_duration(t.trim()).map_err(|why| {
            ArgError::v2(format!(
                "invalid --backend_per_try_timeout '{t}': {why}; give a duration such as 2s or \
                 500ms"
            ))
        })?)
        .filter(|d| !d.is_zero()),
    };
    let backend_retry = crate::retry::RetryPolicy {
        retries: retry_num,
        on: retry_on,
        status_codes: retry_status_codes,
        per_try_timeout,
    };

    // `portico esp`'s command line with the same meaning, validated by the same code. Fields
    // not set here keep `portico esp`'s defaults.
    let mut e =
        EspArgs::try_parse_from(["portico esp"]).map_err(|err| ArgError::v2(err.to_string()))?;
    // A name from the metadata server is not known yet; `portico esp`'s checks are run with a
    // stand-in, which is taken out of the settings below.
    e.service = if service_from_metadata {
        Some(SERVICE_FROM_METADATA.to_string())
    } else {
        Some(a.service).filter(|s| !s.is_empty())
    };
    e.version = Some(a.version).filter(|v| !v.is_empty());
    e.service_json_path = a.service_json_path;
    e.rollout_strategy = a.rollout_strategy;
    e.management = a.management.or(a.service_management_url);
    e.backend = a.backend;
    e.enable_backend_routing = true;
    e.enable_websocket = true;
    e.http_port = Some(port);
    e.http2_port = None;
    e.ssl_port = None;
    // Checked against the listener above; set on the settings below (0 means "off" here).
    e.status_port = 0;
    e.service_account_key = service_account_key;
    e.healthz = None;
    e.non_gcp = a.non_gcp;
    e.metadata = metadata;
    e.service_control_url_override = a.service_control_url;
    e.service_control_network_fail_policy = a.service_control_network_fail_policy;
    e.service_control_check_timeout_ms = a
        .service_control_check_timeout_ms
        .or(Some(check_ms.to_string()));
    e.service_control_quota_timeout_ms = a
        .service_control_quota_timeout_ms
        .or(Some(quota_ms.to_string()));
    e.service_control_report_timeout_ms = a
        .service_control_report_timeout_ms
        .or(Some(report_ms.to_string()));
    e.service_control_check_retries = a.service_control_check_retries;
    e.service_control_quota_retries = a.service_control_quota_retries;
    e.service_control_report_retries = a.service_control_report_retries;
    e.skip_service_control_filter = a.skip_service_control_filter;
    e.skip_jwt_authn_filter = a.skip_jwt_authn_filter;
    e.client_max_body_size = a.client_max_body_size;
    // CORS is Envoy's here, built below.
    e.cors_preset = None;
    e.enable_strict_transport_security = a.enable_strict_transport_security;
    e.underscores_in_headers = a.underscores_in_headers;
    e.disable_normalize_path = a.disable_normalize_path;
    e.disable_merge_slashes_in_path = a.disable_merge_slashes_in_path;
    e.disallow_escaped_slashes_in_path = a.disallow_escaped_slashes_in_path;
    if let Some(l) = listen_address {
        e.listen_address = l;
    }
    e.log_request_headers = a.log_request_headers;
    e.log_response_headers = a.log_response_headers;
    e.log_jwt_payload = a.log_jwt_payloads;
    e.jwks_cache_duration_in_s = jwks_cache_duration_in_s;
    e.access_log = Some(a.access_log.unwrap_or_else(|| "off".to_string()));
    e.worker_threads = a.worker_threads;
    if a.on_serverless {
        e.compute_platform_override = Some(SERVERLESS_PLATFORM.to_string());
    }

    let mut settings = super::validate(e).map_err(|err| ArgError::v2(err.message))?;
    settings.dialect = Dialect::EspV2;
    settings.tracing = tracing;
    if service_from_metadata {
        settings.service = None;
        settings.service_from_metadata = true;
    }
    settings.status_port = status_port;
    settings.healthz = healthz;
    settings.grpc_backend_health = grpc_backend_health;
    settings.grpc_for_http1 = match a.enable_grpc_for_http1.as_deref() {
        None => true,
        Some(v) => go_bool(v).ok_or_else(|| {
            ArgError::v2(format!(
                "invalid --enable_grpc_for_http1 '{v}': give true or false"
            ))
        })?,
    };
    // A per-try timeout bounds each attempt even when nothing is retried, as in Envoy.
    settings.backend_net = backend_net;
    settings.backend_address_override = a.enable_backend_address_override;
    settings.backend_retry = (backend_retry.retries_anything()
        || backend_retry.per_try_timeout.is_some())
    .then_some(backend_retry);
    settings.cors = cors;
    settings.jwt_pad_forward_payload = a.jwt_pad_forward_payload_header;
    settings.http_request_timeout = Some(std::time::Duration::from_secs(http_request_timeout));
    settings.iam = iam;
    settings.dependency_error_behavior = dependency_error_behavior;
    settings.startup_notes = startup_notes;
    settings.jwt_audience_service_name_check = !a.disable_jwt_audience_service_name_check;
    settings.jwt_cache_size = Some(jwt_cache_size);
    settings.jwks_fetch_retry = jwks_fetch_retry;
    settings.disable_oidc_discovery = a.disable_oidc_discovery;

    // TLS (crate::tls): a listener with a certificate speaks TLS only, on the listener's port.
    let tls = crate::tls::from_espv2_flags(&crate::tls::Espv2TlsFlags {
        ssl_server_cert_path: a.ssl_server_cert_path,
        ssl_server_root_cert_path: a.ssl_server_root_cert_path,
        ssl_server_cipher_suites: a.ssl_server_cipher_suites,
        ssl_minimum_protocol: a.ssl_minimum_protocol,
        ssl_maximum_protocol: a.ssl_maximum_protocol,
        generate_self_signed_cert: a.generate_self_signed_cert,
        ssl_backend_client_cert_path: a.ssl_backend_client_cert_path,
        ssl_backend_client_root_certs_file: a.ssl_backend_client_root_certs_file,
        ssl_backend_client_cipher_suites: a.ssl_backend_client_cipher_suites,
        ssl_port: a
            .ssl_port
            .as_deref()
            .is_some_and(|p| !p.is_empty() && p != "0"),
        tls_mutual_auth: a.tls_mutual_auth,
        ssl_protocols: a.ssl_protocols,
        ssl_client_cert_path: a.ssl_client_cert_path,
        ssl_client_root_certs_file: a.ssl_client_root_certs_file,
        enable_grpc_backend_ssl: a.enable_grpc_backend_ssl,
        grpc_backend_ssl_root_certs_file: a.grpc_backend_ssl_root_certs_file,
    })
    .map_err(|e| ArgError::v2(e.0))?;
    if let Some(server) = tls.server {
        settings.server_tls = server;
        settings.ssl_port = Some(port);
        settings.http_port = None;
    }
    settings.backend_tls = tls.backend;

    // Header rules (crate::header_rules), ESPv2's header defaults and compression.
    let (request_rules, response_rules) =
        crate::header_rules::from_espv2_flags(&crate::header_rules::Espv2HeaderFlags {
            add_request_header: a.add_request_header,
            append_request_header: a.append_request_header,
            add_response_header: a.add_response_header,
            append_response_header: a.append_response_header,
        })
        .map_err(ArgError::v2)?;
    settings.request_headers_to_add = request_rules;
    settings.response_headers_to_add = response_rules;
    // Envoy's defaults in ESPv2: header names with '_' are refused (unless
    // --underscores_in_headers), a client's X-Forwarded-Client-Cert never passes.
    settings.head.refuse_underscores = true;
    settings.head.sanitize_client_cert = true;
    settings.xff_hops = Some(crate::settings::XffHops {
        trusted_hops: match &a.envoy_xff_num_trusted_hops {
            Some(v) => crate::settings::parse_xff_num_trusted_hops(v).map_err(ArgError::v2)?,
            None if a.on_serverless => 0,
            None => crate::settings::ESPV2_XFF_NUM_TRUSTED_HOPS,
        },
        use_remote_address: a.envoy_use_remote_address,
    });
    settings.response_compression = a
        .enable_response_compression
        .then(crate::compression::CompressionSettings::default);

    // Logs: Envoy's access-log format, and ESPv2's debug switch.
    settings.access_log_format = match a.access_log_format.as_deref() {
        None => None,
        Some(f) => Some(std::sync::Arc::new(
            crate::access_log::Format::parse(f)
                .map_err(|e| ArgError::v2(format!("invalid --access_log_format: {e}")))?,
        )),
    };
    settings.enable_debug = a.enable_debug;

    // Generated headers and the names of generated operations.
    let prefix = a
        .generated_header_prefix
        .as_deref()
        .unwrap_or(crate::settings::DEFAULT_GENERATED_HEADER_PREFIX);
    settings.generated_headers =
        crate::settings::GeneratedHeaders::with_prefix(prefix).map_err(|why| {
            ArgError::v2(format!(
                "invalid --generated_header_prefix {prefix:?}: {why}"
            ))
        })?;
    settings.head.generated_prefix =
        Some(leak_lowercase(&settings.generated_headers.client_copies()));
    settings.operation_name_header = a
        .enable_operation_name_header
        .then(|| settings.generated_headers.operation_name.clone());
    settings.client_ip_from_forwarded = a.client_ip_from_forwarded_header;
    let health_check_operation = operation_part(
        "--health_check_operation",
        a.health_check_operation
            .as_deref()
            .unwrap_or(crate::settings::DEFAULT_HEALTH_CHECK_OPERATION),
    )?;
    settings.health_check_operation = Some(format!(
        "{health_check_operation}.ESPv2_Autogenerated_HealthCheck"
    ));
    settings.cors_operation_delimiter = Some(
        operation_part(
            "--cors_operation_delimiter",
            a.cors_operation_delimiter
                .as_deref()
                .unwrap_or(crate::settings::DEFAULT_CORS_OPERATION_DELIMITER),
        )?
        .to_string(),
    );
    settings.disallow_colon_in_wildcard_path_segment = a.disallow_colon_in_wildcard_path_segment;
    settings.transcoding = portico_transcode::Options {
        preserve_proto_field_names: a.transcoding_preserve_proto_field_names,
        always_print_primitive_fields: a.transcoding_always_print_primitive_fields,
        always_print_enums_as_ints: a.transcoding_always_print_enums_as_ints,
        stream_newline_delimited: a.transcoding_stream_newline_delimited,
        case_insensitive_enum_parsing: a.transcoding_case_insensitive_enum_parsing,
        // A comma-separated list, as ESPv2's flag.
        ignore_query_parameters: a
            .transcoding_ignore_query_parameters
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect(),
        ignore_unknown_query_parameters: a.transcoding_ignore_unknown_query_parameters,
        query_parameters_disable_unescape_plus: a
            .transcoding_query_parameters_disable_unescape_plus,
        match_unregistered_custom_verb: a.transcoding_match_unregistered_custom_verb,
    };
    Ok(settings)
}

/// The prefix of the client headers removed as copies of generated ones, kept for the life of
/// the process (read by every request's head; made once per start).
fn leak_lowercase(s: &str) -> &'static str {
    // `_` is read as `-` in client names (CGI backends read both alike), so it is stored as
    // `-` to match both spellings.
    Box::leak(s.to_ascii_lowercase().replace('_', "-").into_boxed_str())
}

/// A piece of a generated operation's name (`--health_check_operation`,
/// `--cors_operation_delimiter`): it is reported to Service Control and can be sent in the
/// operation-name header, so visible ASCII only, no spaces, at most 100 bytes.
fn operation_part<'a>(flag: &str, v: &'a str) -> Result<&'a str, ArgError> {
    if v.is_empty() {
        return Err(ArgError::v2(format!("invalid {flag}: it is empty")));
    }
    if v.len() > 100 {
        return Err(ArgError::v2(format!(
            "invalid {flag}: longer than 100 bytes"
        )));
    }
    if let Some(c) = v.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(ArgError::v2(format!(
            "invalid {flag} {v:?}: {c:?} is not allowed (visible ASCII characters only, no \
             spaces)"
        )));
    }
    Ok(v)
}

/// A Go duration flag that must be above 0 and at most a day
/// ([`MAX_DURATION_FLAG`]); `example` is a typical value for the message.
fn day_bounded_duration(
    flag: &str,
    t: &str,
    example: &str,
) -> Result<std::time::Duration, ArgError> {
    go_duration(t.trim())
        .map_err(str::to_string)
        .and_then(|d| {
            if d.is_zero() {
                Err("it must be above 0".to_string())
            } else if d > MAX_DURATION_FLAG {
                Err("it must be at most 24h".to_string())
            } else {
                Ok(d)
            }
        })
        .map_err(|why| {
            ArgError::v2(format!(
                "invalid {flag} '{t}': {why}; give a duration such as {example} or 500ms"
            ))
        })
}

/// The longest `--cluster_connect_timeout`, `--health_check_grpc_backend_interval` and
/// `--health_check_grpc_backend_no_traffic_interval` taken (Portico's bound): a day is already
/// no timeout, and no health checking, at all.
pub const MAX_DURATION_FLAG: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// How backends are connected to: ESPv2's `--cluster_connect_timeout` (default 20s),
/// `--backend_dns_lookup_family` (default `v4preferred`), `--dns_resolver_addresses` (or its
/// old name `--dns`) and `--backend_cluster_maximum_requests` (0 or absent: Envoy's 1024).
fn backend_net(a: &Espv2Args) -> Result<crate::backend_net::BackendNetSettings, ArgError> {
    use crate::backend_net::{self as net, LookupFamily};
    let connect_timeout = match a.cluster_connect_timeout.as_deref() {
        None => net::DEFAULT_CONNECT_TIMEOUT,
        Some(t) => day_bounded_duration("--cluster_connect_timeout", t, "20s")?,
    };
    let lookup_family = match a.backend_dns_lookup_family.as_deref() {
        None => LookupFamily::V4Preferred,
        Some(f) => LookupFamily::parse(f).ok_or_else(|| {
            ArgError::v2(format!(
                "invalid --backend_dns_lookup_family '{f}': use one of {}",
                LookupFamily::NAMES.join(", ")
            ))
        })?,
    };
    // As start_proxy.py's `if args.dns_resolver_addresses:`, an empty value is none.
    let dns_servers = match (
        a.dns_resolver_addresses
            .as_deref()
            .filter(|v| !v.is_empty()),
        a.dns.as_deref().filter(|v| !v.is_empty()),
    ) {
        (Some(v), _) => net::parse_dns_servers("--dns_resolver_addresses", v),
        (None, Some(v)) => net::parse_dns_servers("--dns", v),
        (None, None) => Ok(Vec::new()),
    }
    .map_err(ArgError::v2)?;
    let max_requests = match a.backend_cluster_maximum_requests.as_deref() {
        None => net::ENVOY_DEFAULT_MAX_REQUESTS,
        Some(s) => match s.trim().parse::<u32>() {
            Ok(0) => net::ENVOY_DEFAULT_MAX_REQUESTS,
            Ok(n) => n as usize,
            Err(_) => {
                return Err(ArgError::v2(format!(
                    "invalid --backend_cluster_maximum_requests '{s}': must be a whole number \
                     from 0 (Envoy's default, {}) to {}",
                    net::ENVOY_DEFAULT_MAX_REQUESTS,
                    u32::MAX
                )))
            }
        },
    };
    Ok(net::BackendNetSettings {
        connect_timeout: Some(connect_timeout),
        lookup_family,
        dns_servers,
        max_requests: Some(max_requests),
    })
}

/// Entry point for the `portico espv2` subcommand; `args[0]` is the program name.
pub fn main(args: Vec<OsString>) -> ExitCode {
    main_with_logging(args, |_| {})
}

/// [`main`], with `init_logging` called once the command line is read (before anything is
/// logged): `--enable_debug` ([`Settings::enable_debug`]) chooses the level.
pub fn main_with_logging(args: Vec<OsString>, init_logging: impl FnOnce(&Settings)) -> ExitCode {
    let settings = match parse(args) {
        Ok(s) => s,
        Err(e) => {
            if e.exit_code == 0 {
                print!("{}", e.message);
            } else {
                eprintln!("portico espv2: {}", e.message.trim_end());
            }
            return ExitCode::from(e.exit_code);
        }
    };
    init_logging(&settings);
    if settings.enable_debug {
        tracing::debug!(
            "--enable_debug: debug logs from Portico (RUST_LOG, when set, decides instead)"
        );
    }
    log_flag_notes(&settings);
    crate::server::run(settings)
}

/// One line per flag that was accepted without its ESPv2 effect.
pub fn log_flag_notes(settings: &Settings) {
    for note in &settings.startup_notes {
        tracing::info!("{note}");
    }
    for flag in &settings.ignored_flags {
        let why = FLAGS
            .iter()
            .find_map(|(f, s)| match s {
                Ignored(why) if f == flag => Some(*why),
                _ => None,
            })
            .unwrap_or("no meaning in Portico");
        tracing::info!(flag, reason = why, "accepted and ignored");
    }
    for flag in &settings.not_implemented_flags {
        let issue = FLAGS
            .iter()
            .find_map(|(f, s)| match s {
                NotYet(issue) if f == flag => Some(*issue),
                _ => None,
            })
            .unwrap_or_default();
        tracing::warn!(flag, issue, "accepted, not implemented yet");
    }
    if settings
        .cors
        .as_ref()
        .is_some_and(|c| c.reflects_any_origin_with_credentials())
    {
        tracing::warn!(
            "--cors_allow_origin=* with --cors_allow_credentials: every origin (\"null\" \
             included) is echoed back with credentials allowed, as ESPv2 does, so any site can \
             read credentialed answers; name the origin instead"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{BackendScheme, RolloutStrategy};
    use std::time::Duration;

    fn p(args: &[&str]) -> Result<Settings, ArgError> {
        let mut v: Vec<OsString> = vec!["portico espv2".into()];
        v.extend(args.iter().map(OsString::from));
        parse(v)
    }

    fn err(args: &[&str]) -> String {
        let e = p(args).expect_err("refused");
        assert_eq!(e.exit_code, EXIT_BAD_ARGS, "{args:?}: {}", e.message);
        e.message
    }

    /// Runs only when GOOGLE_APPLICATION_CREDENTIALS is unset (clap reads it for the key).
    fn env_clear() -> bool {
        std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").is_none()
    }

    #[test]
    fn jwt_flags_reach_the_settings_and_bad_values_are_named() {
        let base = ["--service=svc", "--version=1"];
        let s = p(&base).unwrap();
        assert_eq!(s.jwt_cache_size, Some(ESPV2_JWT_CACHE_SIZE));
        assert_eq!(
            s.jwks_fetch_retry,
            crate::settings::JwksFetchRetry::default()
        );
        assert!(!s.disable_oidc_discovery);
        let s = p(&[
            "--service=svc",
            "--version=1",
            "--jwt_cache_size=0",
            "--jwks_fetch_num_retries=3",
            "--jwks_fetch_retry_back_off_base_interval_ms=50",
            "--jwks_fetch_retry_back_off_max_interval_ms=50",
            "--disable_oidc_discovery",
        ])
        .unwrap();
        assert_eq!(s.jwt_cache_size, Some(0));
        assert_eq!(s.jwks_fetch_retry.retries, 3);
        assert_eq!(s.jwks_fetch_retry.backoff_base, Duration::from_millis(50));
        assert_eq!(s.jwks_fetch_retry.backoff_max, Duration::from_millis(50));
        assert!(s.disable_oidc_discovery);
        assert!(s.not_implemented_flags.is_empty());

        let bad = |flag: &str| err(&["--service=svc", "--version=1", flag]);
        for v in ["-1", "x", "", "4294967296", "1e3", " "] {
            let m = bad(&format!("--jwt_cache_size={v}"));
            assert!(m.starts_with("invalid --jwt_cache_size"), "{m}");
        }
        for v in ["-1", "101", "two", ""] {
            let m = bad(&format!("--jwks_fetch_num_retries={v}"));
            assert!(m.contains("from 0 to 100"), "{m}");
        }
        for flag in [
            "--jwks_fetch_retry_back_off_base_interval_ms",
            "--jwks_fetch_retry_back_off_max_interval_ms",
        ] {
            for v in ["0", "-5", "1.5", "99999999999"] {
                let m = bad(&format!("{flag}={v}"));
                assert!(m.starts_with(&format!("invalid {flag} '{v}'")), "{m}");
            }
        }
        // The maximum may not be below the base (Envoy refuses such a back-off).
        let m = bad("--jwks_fetch_retry_back_off_max_interval_ms=100");
        assert!(m.contains("(100 ms) is below"), "{m}");
        let m = err(&[
            "--service=svc",
            "--version=1",
            "--jwks_fetch_retry_back_off_base_interval_ms=40000",
        ]);
        assert!(m.contains("(32000 ms) is below"), "{m}");
    }

    #[test]
    fn defaults_are_espv2s() {
        let s = p(&["--service=svc", "--version=2024-01-01r0"]).unwrap();
        assert_eq!(s.dialect, Dialect::EspV2);
        assert_eq!(s.service.as_deref(), Some("svc"));
        assert_eq!(s.version.as_deref(), Some("2024-01-01r0"));
        assert_eq!(s.rollout_strategy, RolloutStrategy::Fixed);
        assert_eq!(
            (s.http_port, s.http2_port, s.ssl_port),
            (Some(8080), None, None)
        );
        assert_eq!(s.status_port, None);
        assert_eq!(s.backend.scheme, BackendScheme::Http);
        assert_eq!(s.backend.authority(), "127.0.0.1:8082");
        assert_eq!(s.listen_address.to_string(), "127.0.0.1");
        let c = s.service_control_calls;
        let ms = Duration::from_millis;
        assert_eq!((c.check.timeout, c.check.retries), (ms(1000), 3));
        assert_eq!((c.quota.timeout, c.quota.retries), (ms(1000), 1));
        assert_eq!((c.report.timeout, c.report.retries), (ms(2000), 5));
        assert!(s.network_fail_open);
        assert_eq!(s.access_log.as_deref(), Some("off"));
        assert_eq!(s.metadata.as_deref(), Some(DEFAULT_METADATA_URL));
        assert!(s.enable_backend_routing && s.enable_websocket);
        assert_eq!(s.client_max_body_size, 0);
        assert_eq!(s.backend_timeout, Duration::from_secs(15));
        assert_eq!(
            s.backend_retry.as_ref().map(|r| r.retries),
            Some(DEFAULT_BACKEND_RETRY_NUM)
        );
        assert!(s.cors.is_none() && s.healthz.is_none() && !s.hsts);
        assert!(!s.skip_service_control && !s.skip_jwt_authn);
        assert_eq!(
            s.backend_net,
            crate::backend_net::BackendNetSettings {
                connect_timeout: Some(Duration::from_secs(20)),
                lookup_family: crate::backend_net::LookupFamily::V4Preferred,
                dns_servers: Vec::new(),
                max_requests: Some(1024),
            }
        );
        assert!(!s.backend_address_override);
        assert!(s.ignored_flags.is_empty(), "{:?}", s.ignored_flags);
        assert!(
            s.not_implemented_flags.is_empty(),
            "{:?}",
            s.not_implemented_flags
        );
    }

    #[test]
    fn conflicts_are_refused_with_espv2s_messages() {
        let cases: &[(&[&str], &str)] = &[
            (&["-s", "svc"], "Flag --version is required if --rollout_strategy=fixed."),
            (
                &["-s", "svc", "-v", "1", "-R", "managed"],
                "Flag --version cannot be used if --rollout_strategy=managed.",
            ),
            (
                &["--service_json_path=/s.json", "--rollout_strategy=managed"],
                "Flag -R or --rollout_strategy must be fixed with --service_json_path.",
            ),
            (
                &["--service_json_path=/s.json", "--service=svc"],
                "Flag --service cannot be used together with --service_json_path.",
            ),
            (
                &["--service_json_path=/s.json", "--version=1"],
                "Flag --version cannot be used together with --service_json_path.",
            ),
            (
                &["-s", "svc", "-v", "1", "--access_log_format=%START_TIME%"],
                "Flag --access_log_format has to be used together with --access_log.",
            ),
            (
                &["-s", "svc", "-v", "1", "--ssl_port=9443", "--ssl_server_cert_path=/c"],
                "Flag --ssl_port is going to be deprecated, please use --ssl_server_cert_path only.",
            ),
            (
                &["-s", "svc", "-v", "1", "-t", "--ssl_backend_client_cert_path=/c"],
                "Flag --tls_mutual_auth is going to be deprecated, please use \
                 --ssl_backend_client_cert_path only.",
            ),
            (
                &["-s", "svc", "-v", "1", "--enable_grpc_backend_ssl", "--ssl_client_root_certs_file=/r"],
                "Flag --enable_grpc_backend_ssl are going to be deprecated, please use \
                 --ssl_backend_client_root_certs_file only.",
            ),
            (
                &["-s", "svc", "-v", "1", "--generate_self_signed_cert", "--ssl_server_cert_path=/c"],
                "Flag --generate_self_signed_cert and --ssl_server_cert_path cannot be used \
                 simutaneously.",
            ),
            (
                &["-s", "svc", "-v", "1", "--http_port=9000", "--listener_port=9001"],
                "Multiple port flags --http_port,--listener_port are not allowed, use only the \
                 --listener_port flag",
            ),
            (
                &["-s", "svc", "-v", "1", "--listener_port=1023"],
                "Port 1023 is a privileged port. For security purposes, the ESPv2 container \
                 cannot bind to it. Use any port above 1024 instead.",
            ),
            (
                &["-s", "svc", "-v", "1", "--http2_port=-5"],
                "Port -5 is a privileged port. For security purposes, the ESPv2 container \
                 cannot bind to it. Use any port above 1024 instead.",
            ),
            (
                &["-s", "svc", "-v", "1", "--ssl_protocols=TLSv1.2", "--ssl_minimum_protocol=TLSv1.2"],
                "Flag --ssl_protocols is going to be deprecated, please use --ssl_minimum_protocol \
                 and --ssl_maximum_protocol.",
            ),
            (
                &[
                    "-s",
                    "svc",
                    "-v",
                    "1",
                    "--transcoding_ignore_query_parameters=a",
                    "--transcoding_ignore_unknown_query_parameters",
                ],
                "Flag --transcoding_ignore_query_parameters cannot be used together with \
                 --transcoding_ignore_unknown_query_parameters.",
            ),
            (
                &["-s", "svc", "-v", "1", "--dns_resolver_addresses=8.8.8.8", "--dns=1.1.1.1"],
                "Flag --dns_resolver_addresses cannot be used together with together with --dns.",
            ),
            (
                &["-s", "svc", "-v", "1", "--ssl_backend_client_cert_path=/a", "--ssl_client_cert_path=/b"],
                "Flag --ssl_client_cert_path is renamed to --ssl_backend_client_cert_path, only \
                 use the latter flag.",
            ),
            (
                &[
                    "-s",
                    "svc",
                    "-v",
                    "1",
                    "--ssl_backend_client_root_certs_file=/a",
                    "--ssl_client_root_certs_file=/b",
                ],
                "Flag --ssl_client_root_certs_file is renamed to \
                 --ssl_backend_client_root_certs_file, only use the latter flag.",
            ),
            (
                &["-s", "svc", "-v", "1", "--health_check_grpc_backend"],
                "Flag --health_check_grpc_backend requires the flag --backend to use grpc scheme.",
            ),
            (
                &["-s", "svc", "-v", "1", "--health_check_grpc_backend_interval=1s"],
                "Flag --health_check_grpc_backend_interval requires the flag \
                 --health_check_grpc_backend to be used.",
            ),
            (
                &["-s", "svc", "-v", "1", "--health_check_grpc_backend_service=x"],
                "Flag --health_check_grpc_backend_service requires the flag \
                 --health_check_grpc_backend to be used.",
            ),
            (
                &["-s", "svc", "-v", "1", "--health_check_grpc_backend_no_traffic_interval=9s"],
                "Flag --health_check_grpc_backend_no_traffic_interval requires the flag \
                 --health_check_grpc_backend to be used.",
            ),
        ];
        for (args, want) in cases {
            assert_eq!(err(args), *want, "{args:?}");
        }
        if env_clear() {
            assert_eq!(
                err(&["-s", "svc", "-v", "1", "--non_gcp"]),
                "If --non_gcp is specified, --service_account_key or \
                 --enable_application_default_credentials has to be specified, or \
                 GOOGLE_APPLICATION_CREDENTIALS has to set in os.environ."
            );
        }
        assert_eq!(
            err(&[
                "-s",
                "svc",
                "-v",
                "1",
                "--non_gcp",
                "-k",
                "/k.json",
                "--enable_application_default_credentials"
            ]),
            "Only one of --service_account_key or --enable_application_default_credentials \
             can be supplied for credentials at once."
        );
    }

    #[test]
    fn refused_and_portico_specific_errors() {
        // TLS to gRPC backends is not built: asking for it stops the start rather than
        // connecting in plain text.
        let m = err(&["-s", "svc", "-v", "1", "--enable_grpc_backend_ssl"]);
        assert!(
            m.starts_with("--enable_grpc_backend_ssl cannot be used yet: TLS to gRPC backends"),
            "{m}"
        );
        // A client CA without a server certificate would leave clients unauthenticated.
        let m = err(&["-s", "svc", "-v", "1", "--ssl_server_root_cert_path=/r"]);
        assert!(m.contains("--ssl_server_root_cert_path"), "{m}");
        // No --service: ESPv2's config manager's words.
        assert_eq!(
            err(&["-v", "1"]),
            "service name is not specified, required because metadata fetching is disabled"
        );
        assert_eq!(
            err(&["-v", "1", "--check_metadata", "--non_gcp", "-k", "/k.json"]),
            "service name is not specified, required on a non-gcp deployment"
        );
        let m = err(&["-s", "svc", "-v", "1", "--listener_port=70000"]);
        assert_eq!(
            m,
            "Port 70000 is not a TCP port: use a port from 1024 to 65535."
        );
        let m = err(&["-s", "svc", "-v", "1", "--status_port=8080"]);
        assert!(m.contains("other than the listener's (8080)"), "{m}");
        let m = err(&["-s", "svc", "-v", "1", "--status_port=65536"]);
        assert!(m.starts_with("invalid --status_port 65536"), "{m}");
        let m = err(&[
            "-s",
            "svc",
            "-v",
            "1",
            "-g",
            "http://a",
            "--service_management_url=http://b",
        ]);
        assert!(m.contains("give one"), "{m}");
        let m = err(&["-s", "svc", "-v", "1", "--healthz=/"]);
        assert!(m.starts_with("invalid --healthz"), "{m}");
        let m = err(&["-s", "svc", "-v", "1", "--http_request_timeout_s=0"]);
        assert!(m.contains("above 0"), "{m}");
        // A value `portico esp`'s validation refuses is refused here too, with exit code 1.
        let m = err(&["-s", "svc", "-v", "1", "--cors_preset=everything"]);
        assert!(m.contains("cors_preset"), "{m}");
        let m = err(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--service_control_check_timeout_ms=0",
        ]);
        assert!(m.contains("--service_control_check_timeout_ms"), "{m}");
    }

    #[test]
    fn unknown_flags_and_bad_values_are_refused_precisely() {
        let m = err(&["-s", "svc", "-v", "1", "--no_such_flag=1"]);
        assert!(m.contains("'--no_such_flag'"), "{m}");
        // An ESP v1 flag ESPv2 does not take.
        let m = err(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--xff_trusted_proxy_list=10.0.0.0/8",
        ]);
        assert!(m.contains("'--xff_trusted_proxy_list'"), "{m}");
        let m = err(&["-s", "svc", "-v", "1", "--rollout_strategy=sometimes"]);
        assert!(m.contains("sometimes") && m.contains("managed"), "{m}");
        let m = err(&["-s", "svc", "-v", "1", "--listener_port=eighty"]);
        assert_eq!(m, "argument --listener_port: invalid int value: 'eighty'");
        let m = err(&["-s", "svc", "-v", "1", "--backend_dns_lookup_family=v5only"]);
        assert!(m.contains("v5only"), "{m}");
        let m = err(&["-s", "svc", "-v", "1", "--ssl_minimum_protocol=SSLv3"]);
        assert!(m.contains("SSLv3"), "{m}");
        let m = err(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--service_control_network_fail_policy=maybe",
        ]);
        assert!(m.contains("maybe"), "{m}");
        // An abbreviation that fits two flags is refused, not guessed.
        let m = err(&["-s", "svc", "-v", "1", "--listener=9000"]);
        assert!(m.contains("--listener"), "{m}");
        let help = p(&["--help"]).unwrap_err();
        assert_eq!(help.exit_code, 0);
        assert!(help.message.contains("--listener_port"), "{}", help.message);
    }

    #[test]
    fn spellings_repeats_and_switches() {
        let eq = p(&[
            "--service=svc",
            "--version=1",
            "--listener_port=9001",
            "--backend=grpc://127.0.0.1:9002",
        ])
        .unwrap();
        let sp = p(&[
            "--service",
            "svc",
            "--version",
            "1",
            "--listener_port",
            "9001",
            "--backend",
            "grpc://127.0.0.1:9002",
        ])
        .unwrap();
        let short = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--listener_port",
            "9001",
            "-a",
            "grpc://127.0.0.1:9002",
        ])
        .unwrap();
        let abbrev = p(&[
            "--serv=svc",
            "--vers=1",
            "--listener_p=9001",
            "--backe=grpc://127.0.0.1:9002",
        ]);
        for s in [&eq, &sp, &short] {
            assert_eq!(s.service.as_deref(), Some("svc"));
            assert_eq!(s.http_port, Some(9001));
            assert_eq!(s.backend.scheme, BackendScheme::Grpc);
            assert_eq!(s.backend.authority(), "127.0.0.1:9002");
        }
        // `--serv` could be --service or --service_json_path, ...: argparse refuses it too.
        assert!(abbrev.is_err());
        // A prefix that names one flag is that flag, as in argparse.
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--listener_p=9001",
            "--enable_strict",
        ])
        .unwrap();
        assert_eq!(s.http_port, Some(9001));
        assert!(s.hsts);
        // Repeated: the last one wins, as in argparse.
        let s = p(&[
            "-s",
            "a",
            "-s",
            "svc",
            "-v",
            "1",
            "--listener_port=9001",
            "--listener_port=9002",
        ])
        .unwrap();
        assert_eq!(
            (s.service.as_deref(), s.http_port),
            (Some("svc"), Some(9002))
        );
        // Repeatable flags collect every value, in order.
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--add_request_header=a=b",
            "--add_request_header=c=d",
        ])
        .unwrap();
        assert_eq!(s.request_headers_to_add.len(), 2);
        assert!(s.not_implemented_flags.is_empty());
        // A switch takes no value.
        let m = err(&["-s", "svc", "-v", "1", "--underscores_in_headers=true"]);
        assert!(m.contains("--underscores_in_headers"), "{m}");
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--underscores_in_headers",
            "--disable_normalize_path",
            "--disable_merge_slashes_in_path",
            "--disallow_escaped_slashes_in_path",
            "--enable_strict_transport_security",
            "--skip_jwt_authn_filter",
            "--skip_service_control_filter",
        ])
        .unwrap();
        assert!(s.head.underscores_in_headers && s.hsts);
        assert!(
            !s.head.path.normalize && !s.head.path.merge_slashes && s.head.path.unescape_slashes
        );
        assert!(s.skip_jwt_authn && s.skip_service_control);
        assert!(
            s.not_implemented_flags.is_empty(),
            "{:?}",
            s.not_implemented_flags
        );
    }

    #[test]
    fn ports_and_listener() {
        // Python reads 0 as "not given": the default port.
        let s = p(&["-s", "svc", "-v", "1", "--listener_port=0"]).unwrap();
        assert_eq!(s.http_port, Some(8080));
        for flag in ["--http_port", "--http2_port", "--listener_port"] {
            let s = p(&["-s", "svc", "-v", "1", &format!("{flag}=9005")]).unwrap();
            assert_eq!(s.http_port, Some(9005), "{flag}");
            assert_eq!(s.http2_port, None);
        }
        let s = p(&["-s", "svc", "-v", "1", "--status_port=9091"]).unwrap();
        assert_eq!(s.status_port, Some(9091));
        let s = p(&["-s", "svc", "-v", "1", "--admin_port", "9092"]).unwrap();
        assert_eq!(s.status_port, Some(9092));
        let s = p(&["-s", "svc", "-v", "1", "-N", "0"]).unwrap();
        assert_eq!(s.status_port, None);
        let s = p(&["-s", "svc", "-v", "1", "--listener_address=0.0.0.0"]).unwrap();
        assert!(s.listen_address.is_unspecified());
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--listener_address=0.0.0.0",
            "--listen_address=::1",
        ])
        .unwrap();
        assert_eq!(s.listen_address.to_string(), "::1");
        let m = err(&["-s", "svc", "-v", "1", "--listener_address=localhost"]);
        assert!(
            m.contains("--listen_address") || m.contains("localhost"),
            "{m}"
        );
    }

    #[test]
    fn tls_header_and_compression_flags_reach_the_settings() {
        // Defaults: plain listener, Envoy's header defaults, no compression, no rules.
        let s = p(&["-s", "svc", "-v", "1"]).unwrap();
        assert_eq!((s.http_port, s.ssl_port), (Some(8080), None));
        assert!(s.head.refuse_underscores && s.head.sanitize_client_cert);
        let hops = s
            .xff_hops
            .as_ref()
            .expect("ESPv2 takes the client from X-Forwarded-For");
        assert_eq!(
            (hops.trusted_hops, hops.use_remote_address),
            (crate::settings::ESPV2_XFF_NUM_TRUSTED_HOPS, false)
        );
        assert!(s.response_compression.is_none() && s.operation_name_header.is_none());
        assert!(s.request_headers_to_add.is_empty() && s.response_headers_to_add.is_empty());
        // A certificate directory makes the one listener TLS-only, on the same port.
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--listener_port=9443",
            "--ssl_server_cert_path=/etc/endpoints/ssl",
            "--ssl_server_root_cert_path=/etc/endpoints/ca.pem",
            "--ssl_minimum_protocol=TLSv1.3",
            "--ssl_backend_client_cert_path=/etc/endpoints/backend",
            "--add_request_header=x-a=1",
            "--append_response_header=x-b=2",
            "--enable_operation_name_header",
            "--envoy_xff_num_trusted_hops=0",
            "--envoy_use_remote_address",
            "--enable_response_compression",
        ])
        .unwrap();
        assert_eq!((s.http_port, s.ssl_port), (None, Some(9443)));
        assert_ne!(s.server_tls, crate::tls::ServerTls::default());
        assert_ne!(s.backend_tls, crate::tls::BackendTls::default());
        assert_eq!(
            (
                s.request_headers_to_add.len(),
                s.response_headers_to_add.len()
            ),
            (1, 1)
        );
        assert_eq!(
            s.operation_name_header,
            Some(crate::settings::OPERATION_NAME_HEADER.clone())
        );
        let hops = s.xff_hops.as_ref().unwrap();
        assert_eq!((hops.trusted_hops, hops.use_remote_address), (0, true));
        assert!(s.response_compression.is_some());
        assert!(
            s.not_implemented_flags.is_empty(),
            "{:?}",
            s.not_implemented_flags
        );
        // Bad values are refused with the flag's name.
        let m = err(&["-s", "svc", "-v", "1", "--add_request_header=novalue"]);
        assert!(m.contains("--add_request_header"), "{m}");
        let m = err(&["-s", "svc", "-v", "1", "--envoy_xff_num_trusted_hops=-1"]);
        assert!(m.contains("xff"), "{m}");
        // Serverless: no trusted hops.
        let s = p(&["-s", "svc", "-v", "1", "--on_serverless"]).unwrap();
        assert_eq!(s.xff_hops.unwrap().trusted_hops, 0);
    }

    const CFG: &str = "--service_json_path=/cfg.json";

    #[test]
    fn log_and_naming_flags_have_espv2s_defaults() {
        let s = p(&[CFG]).unwrap();
        assert!(s.access_log_format.is_none() && !s.enable_debug);
        assert_eq!(
            s.generated_headers,
            crate::settings::GeneratedHeaders::default()
        );
        assert_eq!(s.head.generated_prefix, Some("x-endpoint-api-"));
        assert!(!s.client_ip_from_forwarded);
        assert_eq!(
            s.health_check_operation.as_deref(),
            Some("espv2_deployment.ESPv2_Autogenerated_HealthCheck")
        );
        assert_eq!(
            s.cors_operation_delimiter.as_deref(),
            Some(".ESPv2_Autogenerated_CORS_")
        );
        assert!(!s.disallow_colon_in_wildcard_path_segment);
        assert!(s.not_implemented_flags.is_empty());
    }

    #[test]
    fn log_and_naming_flags_reach_the_settings() {
        let s = p(&[
            CFG,
            "--access_log=/tmp/a.log",
            "--access_log_format=%REQ(:METHOD)% %RESPONSE_CODE%",
            "--enable_debug",
            "--generated_header_prefix=X-Apigateway_",
            "--enable_operation_name_header",
            "--client_ip_from_forwarded_header",
            "--health_check_operation=my_deploy",
            "--cors_operation_delimiter=.CORS_",
            "--disallow_colon_in_wildcard_path_segment",
        ])
        .unwrap();
        let f = s.access_log_format.as_ref().expect("format");
        assert_eq!(
            **f,
            crate::access_log::Format::parse("%REQ(:METHOD)% %RESPONSE_CODE%").unwrap()
        );
        assert!(s.enable_debug && s.client_ip_from_forwarded);
        assert_eq!(
            s.generated_headers.user_info.as_str(),
            "x-apigateway_api-userinfo"
        );
        assert_eq!(
            s.generated_headers.project_id.as_str(),
            "x-apigateway_api-project-id"
        );
        assert_eq!(
            s.operation_name_header.as_ref().map(|h| h.as_str()),
            Some("x-apigateway_api-operation-name")
        );
        // `_` stored as `-`: both spellings of a client's copy are removed.
        assert_eq!(s.head.generated_prefix, Some("x-apigateway-api-"));
        assert_eq!(
            s.health_check_operation.as_deref(),
            Some("my_deploy.ESPv2_Autogenerated_HealthCheck")
        );
        assert_eq!(s.cors_operation_delimiter.as_deref(), Some(".CORS_"));
        assert!(s.disallow_colon_in_wildcard_path_segment);
        assert!(
            s.not_implemented_flags.is_empty(),
            "{:?}",
            s.not_implemented_flags
        );
    }

    #[test]
    fn bad_log_and_naming_flags_are_refused_precisely() {
        assert_eq!(
            err(&[CFG, "--access_log_format=%START_TIME%"]),
            "Flag --access_log_format has to be used together with --access_log."
        );
        let e = err(&[CFG, "--access_log=/tmp/a", "--access_log_format=%NOPE% x"]);
        assert_eq!(
            e,
            "invalid --access_log_format: byte 0: %NOPE% is not an Envoy command operator"
        );
        let e = err(&[CFG, "--access_log=/tmp/a", "--access_log_format=ok 100%"]);
        assert!(
            e.contains("the '%' at byte 6 starts no command operator"),
            "{e}"
        );
        let e = err(&[CFG, "--access_log=/tmp/a", "--access_log_format="]);
        assert!(e.contains("the format is empty"), "{e}");
        let long = "x".repeat(101);
        for (bad, why) in [
            ("", "the prefix is empty"),
            ("X Endpoint-", "' ' cannot be part of a header name"),
            ("X-Endpoint:", "':' cannot be part of a header name"),
            ("X-\u{e9}-", "cannot be part of a header name"),
            (long.as_str(), "longer than 100 bytes"),
        ] {
            let e = err(&[CFG, &format!("--generated_header_prefix={bad}")]);
            assert!(
                e.starts_with("invalid --generated_header_prefix") && e.contains(why),
                "{bad:?}: {e}"
            );
        }
        for flag in ["--health_check_operation", "--cors_operation_delimiter"] {
            for (bad, why) in [
                ("", "it is empty"),
                ("a b", "' ' is not allowed"),
                ("a\u{7f}", "is not allowed"),
                (long.as_str(), "longer than 100 bytes"),
            ] {
                let e = err(&[CFG, &format!("{flag}={bad}")]);
                assert!(
                    e.starts_with(&format!("invalid {flag}")) && e.contains(why),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn wired_flags_reach_the_settings() {
        let s = p(&[
            "--service_json_path=/cfg.json",
            "--backend=https://backend.example:8443",
            "--healthz=/healthz",
            "--service_control_url=http://127.0.0.1:9",
            "--service_control_check_timeout_ms=250",
            "--service_control_report_retries=0",
            "--service_control_network_fail_policy=close",
            "--cors_preset=basic",
            "--cors_allow_credentials",
            "--log_request_headers=x-a,x-b",
            "--log_response_headers=x-c",
            "--log_jwt_payloads=sub",
            "--jwks_cache_duration_in_s=60",
            "--access_log=/tmp/access.log",
            "--metadata_url=http://127.0.0.1:9/",
            "--service_management_url=http://127.0.0.1:10",
            "--on_serverless",
            "--client_max_body_size=1m",
            "--worker_threads=2",
        ])
        .unwrap();
        assert_eq!(s.service, None);
        assert_eq!(
            s.service_json_path.as_deref(),
            Some(std::path::Path::new("/cfg.json"))
        );
        assert_eq!(s.backend.scheme, BackendScheme::Https);
        assert_eq!(s.healthz.as_deref(), Some("healthz"));
        assert_eq!(
            s.service_control_url_override.as_deref(),
            Some("http://127.0.0.1:9")
        );
        assert_eq!(
            s.service_control_calls.check.timeout,
            Duration::from_millis(250)
        );
        assert_eq!(s.service_control_calls.report.retries, 0);
        assert!(!s.network_fail_open);
        assert!(s.cors.as_ref().is_some_and(|c| c.allow_credentials));
        assert_eq!(
            s.cors
                .as_ref()
                .map(|c| c.allow_headers.to_str().unwrap().to_string())
                .unwrap(),
            DEFAULT_CORS_HEADERS
        );
        assert_eq!(s.log_request_headers, vec!["x-a", "x-b"]);
        assert_eq!(s.log_response_headers, vec!["x-c"]);
        assert_eq!(s.log_jwt_payload, vec!["sub"]);
        assert_eq!(s.jwks_cache_duration, Some(Duration::from_secs(60)));
        assert_eq!(s.access_log.as_deref(), Some("/tmp/access.log"));
        assert_eq!(s.metadata.as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(s.management.as_deref(), Some("http://127.0.0.1:10"));
        assert_eq!(s.compute_platform.as_deref(), Some(SERVERLESS_PLATFORM));
        assert_eq!(s.client_max_body_size, 1 << 20);
        assert_eq!(s.worker_threads, 2);
        let s = p(&["-s", "svc", "-v", "1", "--healthz=a/b"]).unwrap();
        assert_eq!(s.healthz.as_deref(), Some("a/b"));
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--non_gcp",
            "--service_account_key=/k.json",
        ])
        .unwrap();
        assert!(s.non_gcp);
        assert_eq!(s.metadata, None);
        let s = p(&["-s", "svc", "-R", "managed"]).unwrap();
        assert_eq!(s.rollout_strategy, RolloutStrategy::Managed);
        assert_eq!(s.version, None);
    }

    #[test]
    fn tracing_flags() {
        use crate::trace::context::Format;
        let s = p(&["-s", "svc", "-v", "1"]).unwrap();
        assert_eq!(s.tracing, crate::trace::TraceSettings::espv2());
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--tracing_sample_rate=1",
            "--tracing_incoming_context=grpc-trace-bin, x-cloud-trace-context",
            "--tracing_outgoing_context=",
            "--tracing_project_id=tp",
            "--cloud_trace_url_override=127.0.0.1:9",
        ])
        .unwrap();
        assert!(
            s.not_implemented_flags.is_empty(),
            "{:?}",
            s.not_implemented_flags
        );
        assert_eq!(s.tracing.sample_rate, 1.0);
        assert_eq!(
            s.tracing.incoming,
            vec![Format::GrpcTraceBin, Format::CloudTrace]
        );
        assert!(s.tracing.outgoing.is_empty());
        assert_eq!(s.tracing.project_id.as_deref(), Some("tp"));
        assert_eq!(
            s.tracing.url_override.as_deref(),
            Some("https://127.0.0.1:9")
        );
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--disable_cloud_trace_auto_sampling",
        ])
        .unwrap();
        assert_eq!(s.tracing.sample_rate, 0.0);
        assert!(
            p(&["-s", "svc", "-v", "1", "--disable_tracing"])
                .unwrap()
                .tracing
                .disabled
        );
        // --non_gcp without a tracing project: off, as in ESPv2; OTLP needs no project.
        let k = "--service_account_key=/k.json";
        assert!(
            p(&["-s", "svc", "-v", "1", k, "--non_gcp"])
                .unwrap()
                .tracing
                .disabled
        );
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            k,
            "--non_gcp",
            "--tracing_otlp_endpoint=http://c:4318/v1/traces",
        ]);
        assert!(!s.unwrap().tracing.disabled);
        for bad in [
            "--tracing_sample_rate=1.5",
            "--tracing_sample_rate=-0.1",
            "--tracing_sample_rate=NaN",
            "--tracing_sample_rate=x",
            "--tracing_incoming_context=b3",
            "--tracing_outgoing_context=traceparent,TRACEPARENT",
        ] {
            let e = p(&["-s", "svc", "-v", "1", bad]).unwrap_err();
            assert!(
                e.message
                    .contains(bad.split('=').next().unwrap_or_default()),
                "{bad}: {}",
                e.message
            );
        }
    }

    #[test]
    fn accepted_flags_are_listed_by_what_they_do() {
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--envoy_connection_buffer_limit_bytes=1024",
            "--enable_backend_routing",
            "--suppress_envoy_headers",
            "--http_request_timeout_s=7",
        ])
        .unwrap();
        assert_eq!(
            s.ignored_flags,
            vec![
                "--envoy_connection_buffer_limit_bytes",
                "--enable_backend_routing",
                "--suppress_envoy_headers"
            ]
        );
        assert!(s.not_implemented_flags.is_empty());
        // --http_request_timeout_s is ESPv2's timeout for its own calls, never the backend's.
        assert_eq!(s.backend_timeout, Duration::from_secs(15));
        assert_eq!(s.http_request_timeout, Some(Duration::from_secs(7)));
    }

    #[test]
    fn grpc_for_http1_is_a_go_boolean_defaulting_to_on() {
        assert!(p(&["-s", "svc", "-v", "1"]).unwrap().grpc_for_http1);
        for (v, want) in [
            ("", true),
            ("=true", true),
            ("=1", true),
            ("=false", false),
            ("=F", false),
        ] {
            let s = p(&[
                "-s",
                "svc",
                "-v",
                "1",
                &format!("--enable_grpc_for_http1{v}"),
            ])
            .unwrap();
            assert_eq!(s.grpc_for_http1, want, "{v}");
        }
        assert_eq!(
            err(&["-s", "svc", "-v", "1", "--enable_grpc_for_http1=maybe"]),
            "invalid --enable_grpc_for_http1 'maybe': give true or false"
        );
    }

    #[test]
    fn min_stream_report_interval_is_checked_as_espv2_checks_it() {
        for ok in ["0", "100", "250", "18446744073709551615"] {
            p(&[
                "-s",
                "svc",
                "-v",
                "1",
                &format!("--min_stream_report_interval_ms={ok}"),
            ])
            .unwrap_or_else(|e| panic!("{ok}: {}", e.message));
        }
        assert_eq!(min_stream_report_interval(None).unwrap(), 10_000);
        assert_eq!(min_stream_report_interval(Some("0")).unwrap(), 10_000);
        assert_eq!(min_stream_report_interval(Some("250")).unwrap(), 250);
        assert_eq!(
            err(&["-s", "svc", "-v", "1", "--min_stream_report_interval_ms=99"]),
            "invalid --min_stream_report_interval_ms '99': min_stream_report_interval_ms must \
             be larger than: 100"
        );
        for bad in ["-1", "abc", "1.5", "", "18446744073709551616", "1e3"] {
            assert_eq!(
                err(&[
                    "-s",
                    "svc",
                    "-v",
                    "1",
                    &format!("--min_stream_report_interval_ms={bad}")
                ]),
                format!(
                    "invalid --min_stream_report_interval_ms '{bad}': give a whole number of \
                     milliseconds, 0 (the default, 10000) or from 100 up"
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn own_call_timeout_and_dependency_behaviour() {
        let s = p(&["-s", "svc", "-v", "1"]).unwrap();
        assert_eq!(s.http_request_timeout, Some(Duration::from_secs(30)));
        assert_eq!(
            s.dependency_error_behavior,
            DependencyErrorBehavior::BlockInitOnAnyError
        );
        assert_eq!(s.iam, None);
        assert!(s.startup_notes.is_empty(), "{:?}", s.startup_notes);
        let s = p(&["-s", "svc", "-v", "1", "--http_request_timeout_s", " 5 "]).unwrap();
        assert_eq!(s.http_request_timeout, Some(Duration::from_secs(5)));
        for bad in ["0", "-1", "1.5", "abc", "86401", "99999999999999999999"] {
            let m = err(&[
                "-s",
                "svc",
                "-v",
                "1",
                &format!("--http_request_timeout_s={bad}"),
            ]);
            assert!(m.contains("--http_request_timeout_s"), "{bad}: {m}");
        }
        let behaviour = |v: &str| {
            p(&[
                "-s",
                "svc",
                "-v",
                "1",
                &format!("--dependency_error_behavior={v}"),
            ])
            .map(|s| s.dependency_error_behavior)
        };
        assert_eq!(
            behaviour("ALWAYS_INIT").unwrap(),
            DependencyErrorBehavior::AlwaysInit
        );
        for block in ["BLOCK_INIT_ON_ANY_ERROR", "UNSPECIFIED"] {
            assert_eq!(
                behaviour(block).unwrap(),
                DependencyErrorBehavior::BlockInitOnAnyError
            );
        }
        for bad in ["always_init", "BLOCK_INIT_ON_FIRST_ERROR", ""] {
            assert_eq!(
                behaviour(bad).unwrap_err().message,
                format!(
                    "unknown value for DependencyErrorBehavior ({bad}), accepted values are: \
                     [\"ALWAYS_INIT\" \"BLOCK_INIT_ON_ANY_ERROR\" \"UNSPECIFIED\"]"
                )
            );
        }
    }

    #[test]
    fn iam_accounts_and_delegates() {
        use crate::iam_credentials::{IamAccount, DEFAULT_IAM_URL};
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--service_control_iam_service_account=sc@p.iam.gserviceaccount.com",
            "--service_control_iam_delegates=d1@p.iam.gserviceaccount.com,d2@p.iam.gserviceaccount.com",
            "--backend_auth_iam_service_account=ba@p.iam.gserviceaccount.com",
        ])
        .unwrap();
        let iam = s.iam.expect("iam");
        assert_eq!(iam.url, DEFAULT_IAM_URL);
        assert_eq!(
            iam.service_control,
            Some(IamAccount {
                email: "sc@p.iam.gserviceaccount.com".into(),
                delegates: vec![
                    "d1@p.iam.gserviceaccount.com".into(),
                    "d2@p.iam.gserviceaccount.com".into()
                ],
            })
        );
        assert_eq!(
            iam.backend_auth,
            Some(IamAccount {
                email: "ba@p.iam.gserviceaccount.com".into(),
                delegates: vec![],
            })
        );
        assert!(s.not_implemented_flags.is_empty());
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--iam_url=http://127.0.0.1:9/",
            "--backend_auth_iam_service_account=ba@p.iam.gserviceaccount.com",
            "--backend_auth_iam_delegates=",
        ])
        .unwrap();
        let iam = s.iam.expect("iam");
        assert_eq!(iam.url, "http://127.0.0.1:9");
        assert!(iam.service_control.is_none());
        assert!(iam.backend_auth.expect("backend").delegates.is_empty());
        // Accepted without effect, and said, as ESPv2 ignores them.
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--iam_url=http://127.0.0.1:9",
            "--service_control_iam_delegates=d@p.iam.gserviceaccount.com",
            "--service_control_iam_service_account=",
        ])
        .unwrap();
        assert_eq!(s.iam, None);
        assert_eq!(
            s.startup_notes,
            vec![
                "--iam_url has no effect without --service_control_iam_service_account or \
                 --backend_auth_iam_service_account"
                    .to_string()
            ]
        );
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--backend_auth_iam_delegates=d@p.iam.gserviceaccount.com",
        ])
        .unwrap();
        assert_eq!(
            s.startup_notes,
            vec!["--backend_auth_iam_delegates has no effect without \
                 --backend_auth_iam_service_account, as in ESPv2"
                .to_string()]
        );
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--non_gcp",
            "-k",
            "/k.json",
            "--backend_auth_iam_service_account=ba@p.iam.gserviceaccount.com",
        ])
        .unwrap();
        assert!(
            s.startup_notes[0].contains("no effect with --non_gcp"),
            "{:?}",
            s.startup_notes
        );
        // Names that would change the IAM URL's path, and bad URLs, stop the start.
        for (flag, value) in [
            ("--service_control_iam_service_account", "a@b/../x"),
            (
                "--backend_auth_iam_service_account",
                "a@b:generateAccessToken",
            ),
            ("--service_control_iam_service_account", "not-an-email"),
        ] {
            let m = err(&["-s", "svc", "-v", "1", &format!("{flag}={value}")]);
            assert!(m.starts_with(&format!("invalid {flag}")), "{m}");
        }
        let m = err(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--backend_auth_iam_service_account=ba@p.iam.gserviceaccount.com",
            "--backend_auth_iam_delegates=d@p.iam.gserviceaccount.com,,",
        ]);
        assert!(m.starts_with("invalid --backend_auth_iam_delegates"), "{m}");
        let m = err(&["-s", "svc", "-v", "1", "--iam_url=ftp://iam"]);
        assert!(m.starts_with("invalid --iam_url"), "{m}");
    }

    #[test]
    fn application_default_credentials_without_any() {
        let home_file = crate::adc::well_known_file(&|n| std::env::var_os(n));
        if !env_clear() || home_file.as_ref().is_some_and(|p| p.exists()) {
            return;
        }
        let m = err(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--non_gcp",
            "--enable_application_default_credentials",
        ]);
        assert!(
            m.starts_with("--enable_application_default_credentials found no credentials"),
            "{m}"
        );
        // On a platform with a metadata server, that server's credentials are next.
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--enable_application_default_credentials",
        ])
        .unwrap();
        assert_eq!(s.service_account_key, None);
        assert!(s.startup_notes[0].contains("the metadata server's are used"));
        // A key named on the command line is the credentials; nothing is looked for.
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "-k",
            "/k.json",
            "--enable_application_default_credentials",
        ])
        .unwrap();
        assert_eq!(
            s.service_account_key.as_deref(),
            Some(std::path::Path::new("/k.json"))
        );
    }

    #[test]
    fn api_key_uid_reporting_is_on_unless_the_last_word_is_no() {
        let uid = |args: &[&str]| {
            let mut v = vec!["-s", "svc", "-v", "1"];
            v.extend(args);
            p(&v).unwrap().api_key_uid_reporting
        };
        let (on, off) = (
            "--service_control_enable_api_key_uid_reporting",
            "--no-service_control_enable_api_key_uid_reporting",
        );
        assert!(uid(&[]));
        assert!(uid(&[on]));
        assert!(!uid(&[off]));
        assert!(uid(&[off, on]));
        assert!(!uid(&[on, off]));
        assert!(!uid(&[on, off, off]));
    }

    #[test]
    fn the_service_name_can_come_from_the_metadata_server() {
        let s = p(&["--check_metadata", "-v", "2024-01-01r0"]).unwrap();
        assert_eq!(s.service, None);
        assert!(s.service_from_metadata);
        assert_eq!(s.metadata.as_deref(), Some(DEFAULT_METADATA_URL));
        assert_eq!(s.version.as_deref(), Some("2024-01-01r0"));
        let s = p(&[
            "--check_metadata",
            "-R",
            "managed",
            "--metadata_url=http://127.0.0.1:9",
        ])
        .unwrap();
        assert!(s.service_from_metadata && s.service.is_none());
        assert_eq!(s.metadata.as_deref(), Some("http://127.0.0.1:9"));
        // A name on the command line wins; --check_metadata then changes nothing.
        let s = p(&["-s", "svc", "-v", "1", "--check_metadata"]).unwrap();
        assert_eq!(s.service.as_deref(), Some("svc"));
        assert!(!s.service_from_metadata);
        assert!(s.not_implemented_flags.is_empty());
    }

    #[test]
    fn non_gcp_turns_backend_authentication_off() {
        let s = p(&["-s", "svc", "-v", "1"]).unwrap();
        assert!(!s.backend_auth_disabled());
        let s = p(&["-s", "svc", "-v", "1", "--non_gcp", "-k", "/k.json"]).unwrap();
        assert!(s.backend_auth_disabled() && s.metadata.is_none());
    }

    #[test]
    fn backend_retries() {
        use crate::retry::{RetryOn, RetryPolicy};
        let policy = |args: &[&str]| {
            let mut v = vec!["-s", "svc", "-v", "1"];
            v.extend(args);
            p(&v).map(|s| {
                assert!(
                    s.not_implemented_flags.is_empty(),
                    "{:?}",
                    s.not_implemented_flags
                );
                s.backend_retry
            })
        };
        let on = |s: &str| RetryOn::parse(s).unwrap();
        let default_on = on(DEFAULT_BACKEND_RETRY_ONS);
        assert_eq!(
            policy(&[]).unwrap(),
            Some(RetryPolicy {
                retries: 1,
                on: default_on,
                status_codes: vec![],
                per_try_timeout: None
            })
        );
        assert_eq!(
            policy(&["--backend_retry_num=4"]).unwrap().unwrap().retries,
            4
        );
        // Nothing to retry: no policy at all.
        assert_eq!(policy(&["--backend_retry_num=0"]).unwrap(), None);
        assert_eq!(policy(&["--backend_retry_ons="]).unwrap(), None);
        assert_eq!(policy(&["--backend_retry_ons= , "]).unwrap(), None);
        // ... unless a per-try timeout bounds the one attempt.
        assert_eq!(
            policy(&["--backend_retry_num=0", "--backend_per_try_timeout=1.5s"])
                .unwrap()
                .unwrap()
                .per_try_timeout,
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            policy(&["--backend_per_try_timeout=0s"])
                .unwrap()
                .unwrap()
                .per_try_timeout,
            None
        );
        let p5 = policy(&["--backend_retry_ons=5xx, reset", "--backend_retry_num=2"])
            .unwrap()
            .unwrap();
        assert_eq!((p5.retries, p5.on), (2, on("5xx,reset")));
        // Status codes retry whatever the conditions say, as ESPv2 adds retriable-status-codes.
        let codes = policy(&["--backend_retry_on_status_codes=500, 503,418"])
            .unwrap()
            .unwrap();
        assert_eq!(codes.status_codes, vec![500, 503, 418]);
        assert!(codes.on.retriable_status_codes && codes.on.reset);
        let codes_only = policy(&[
            "--backend_retry_ons=",
            "--backend_retry_on_status_codes=502",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            codes_only.on,
            RetryOn {
                retriable_status_codes: true,
                ..RetryOn::default()
            }
        );
        let refused = |flag: &str| err(&["-s", "svc", "-v", "1", flag]);
        let m = refused("--backend_retry_ons=connect-failure,sometimes");
        assert!(m.starts_with("invalid --backend_retry_ons"), "{m}");
        assert!(m.contains("\"sometimes\""), "{m}");
        for bad in ["-1", "101", "two", ""] {
            let m = refused(&format!("--backend_retry_num={bad}"));
            assert!(m.starts_with("invalid --backend_retry_num"), "{bad}: {m}");
        }
        for bad in ["99", "600", "5xx", "500,,503", "500;503", "-500", "65936"] {
            let m = refused(&format!("--backend_retry_on_status_codes={bad}"));
            assert!(
                m.starts_with("invalid --backend_retry_on_status_codes"),
                "{bad}: {m}"
            );
        }
        for bad in ["2", "-1s", "soon", "1e3s"] {
            let m = refused(&format!("--backend_per_try_timeout={bad}"));
            assert!(
                m.starts_with("invalid --backend_per_try_timeout"),
                "{bad}: {m}"
            );
        }
    }

    #[test]
    fn go_durations() {
        let secs = |s: &str| go_duration(s).map(|d| d.as_secs());
        for (text, want) in [
            ("480h", 1_728_000),
            ("2h", 7200),
            ("1.5h", 5400),
            ("2h45m", 9900),
            ("1h30m15s", 5415),
            ("90s", 90),
            ("300ms", 0),
            ("1500ms", 1),
            (".5m", 30),
            ("5.m", 300),
            ("0", 0),
            ("-0", 0),
            ("+1m", 60),
            ("1000000000ns", 1),
            ("2000000us", 2),
            ("3000000\u{b5}s", 3),
            ("2562047h", 2_562_047 * 3600),
        ] {
            assert_eq!(secs(text), Ok(want), "{text}");
        }
        assert_eq!(
            go_duration("1.0000000000000000000000000000000009s"),
            Ok(std::time::Duration::from_secs(1))
        );
        for bad in [
            "",
            "10",
            "h",
            ".h",
            "1x",
            "1 h",
            "1h ",
            "-1h",
            "1h-1m",
            "2562048h",
            "9".repeat(40).as_str(),
            "1..5h",
            "--1h",
            "1hh",
        ] {
            assert!(go_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cors_is_envoys() {
        let s = p(&[
            "-s",
            "svc",
            "-v",
            "1",
            "--cors_preset=basic",
            "--cors_allow_origin=https://a.example",
            "--cors_max_age=1.5h",
        ])
        .unwrap();
        let c = s.cors.expect("cors");
        assert_eq!(c.dialect, Dialect::EspV2);
        assert_eq!(c.max_age, "5400");
        assert_eq!(
            c.allow_headers, DEFAULT_CORS_HEADERS,
            "ESPv2's default allow-headers"
        );
        assert!(
            s.not_implemented_flags.is_empty(),
            "{:?}",
            s.not_implemented_flags
        );
        let c = p(&["-s", "svc", "-v", "1", "--cors_preset=basic"])
            .unwrap()
            .cors
            .expect("cors");
        assert_eq!(c.max_age, "1728000");
        assert!(matches!(c.origin, crate::cors::OriginPolicy::Any));
        // Flags for CORS without a preset do nothing, as in ESPv2.
        assert!(p(&["-s", "svc", "-v", "1", "--cors_max_age=nonsense"])
            .unwrap()
            .cors
            .is_none());
        for (flag, want) in [
            ("--cors_max_age=10", "invalid --cors_max_age '10'"),
            ("--cors_max_age=-2h", "negative"),
            ("--cors_max_age=", "invalid --cors_max_age ''"),
            ("--cors_allow_origin=", "cannot be empty"),
        ] {
            let m = err(&["-s", "svc", "-v", "1", "--cors_preset=basic", flag]);
            assert!(m.contains(want), "{flag}: {m}");
        }
    }

    #[test]
    fn huge_values_are_refused_or_kept_without_panic() {
        let big = "9".repeat(10_000);
        let m = err(&["-s", "svc", "-v", "1", &format!("--listener_port={big}")]);
        assert!(
            m.starts_with("argument --listener_port: invalid int value"),
            "{}",
            &m[..60]
        );
        let m = err(&[
            "-s",
            "svc",
            "-v",
            "1",
            &format!("--jwks_cache_duration_in_s={big}"),
        ]);
        assert!(m.starts_with("invalid --jwks_cache_duration_in_s"));
        let m = err(&[
            "-s",
            "svc",
            "-v",
            "1",
            &format!("--service_control_check_retries={big}"),
        ]);
        assert!(m.contains("--service_control_check_retries"));
        let name = "a".repeat(1 << 20);
        let s = p(&["-s", &name, "-v", "1"]).unwrap();
        assert_eq!(s.service.as_deref().map(str::len), Some(1 << 20));
        let many: Vec<String> = (0..10_000)
            .map(|i| format!("--add_response_header=h{i}=v"))
            .collect();
        let mut args = vec!["-s", "svc", "-v", "1"];
        args.extend(many.iter().map(String::as_str));
        let s = p(&args).unwrap();
        assert_eq!(s.response_headers_to_add.len(), 10_000);
    }

    /// The README's ESPv2 flag table says for each flag what [`FLAGS`] says, and lists no
    /// other flag.
    #[test]
    fn readme_table_matches_the_flags() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"));
        let section = readme
            .split("### ESPv2 flags")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("README has an ESPv2 flags section");
        let mut rows = Vec::new();
        for line in section.lines().filter(|l| l.starts_with("| `--")) {
            let mut cells = line.split(" | ");
            let flag = cells
                .next()
                .unwrap_or("")
                .trim_start_matches("| `")
                .trim_end_matches('`');
            let support = cells.next().unwrap_or("");
            rows.push((flag.to_string(), support.to_string()));
        }
        assert_eq!(rows.len(), FLAGS.len(), "README rows vs FLAGS");
        for (flag, support) in FLAGS {
            let Some((_, said)) = rows.iter().find(|(f, _)| f == flag) else {
                panic!("{flag} is missing from the README's ESPv2 flag table");
            };
            let word = match support {
                Implemented => "Yes",
                Ignored(_) => "Ignored: ",
                NotYet(_) => "Not yet (issue ",
                Refused(_) => "Refused: ",
            };
            assert!(
                said.starts_with(word),
                "{flag}: README says {said:?}, code says {support:?}"
            );
            if let NotYet(issue) = support {
                assert!(
                    said.starts_with(&format!("Not yet (issue {issue})")),
                    "{flag}: README names another issue: {said:?}"
                );
            }
            if let Ignored(why) | Refused(why) = support {
                assert!(
                    said.contains(why),
                    "{flag}: README gives another reason: {said:?}"
                );
            }
        }
    }

    #[test]
    fn every_flag_is_in_the_support_table_once() {
        let cmd = Espv2Args::command();
        let mut longs: Vec<String> = cmd
            .get_arguments()
            .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
            .filter(|l| l != "--help")
            .collect();
        longs.sort();
        let mut table: Vec<String> = FLAGS.iter().map(|(f, _)| f.to_string()).collect();
        table.sort();
        let before = table.len();
        table.dedup();
        assert_eq!(before, table.len(), "a flag is listed twice");
        assert_eq!(longs, table);
        // The presence check reads each flag by its clap id.
        for (flag, _) in FLAGS {
            let id = flag.trim_start_matches('-').replace('-', "_");
            assert!(
                cmd.get_arguments().any(|a| a.get_id() == id.as_str()),
                "{flag}"
            );
        }
    }

    #[test]
    fn backend_networking_flags_are_read_as_espv2_reads_them() {
        use crate::backend_net::LookupFamily;
        let base = ["--service=svc", "--version=1"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            p(&v).unwrap_or_else(|e| panic!("{extra:?}: {}", e.message))
        };
        let s = with(&["--cluster_connect_timeout=1.5s"]);
        assert_eq!(
            s.backend_net.connect_timeout,
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            with(&["--cluster_connect_timeout", "2m"])
                .backend_net
                .connect_timeout,
            Some(Duration::from_secs(120))
        );
        for (name, family) in [
            ("auto", LookupFamily::Auto),
            ("v4only", LookupFamily::V4Only),
            ("v6only", LookupFamily::V6Only),
            ("v4preferred", LookupFamily::V4Preferred),
            ("all", LookupFamily::All),
        ] {
            let flag = format!("--backend_dns_lookup_family={name}");
            assert_eq!(with(&[&flag]).backend_net.lookup_family, family);
        }
        let s = with(&["--dns_resolver_addresses=127.0.0.1;127.0.0.2:5353"]);
        assert_eq!(
            s.backend_net.dns_servers,
            vec![
                "127.0.0.1:53".parse().unwrap(),
                "127.0.0.2:5353".parse().unwrap()
            ]
        );
        // `--dns` is the same flag by its ESP v1 name.
        let s = with(&["--dns=10.0.0.9:54"]);
        assert_eq!(
            s.backend_net.dns_servers,
            vec!["10.0.0.9:54".parse().unwrap()]
        );
        assert!(s.not_implemented_flags.is_empty() && s.ignored_flags.is_empty());
        assert!(with(&["--dns_resolver_addresses="])
            .backend_net
            .dns_servers
            .is_empty());
        assert_eq!(
            with(&["--backend_cluster_maximum_requests=1"])
                .backend_net
                .max_requests,
            Some(1)
        );
        assert_eq!(
            with(&["--backend_cluster_maximum_requests=0"])
                .backend_net
                .max_requests,
            Some(1024)
        );
        assert!(with(&["--enable_backend_address_override"]).backend_address_override);

        let refused = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            err(&v)
        };
        for (args, want) in [
            (
                &["--cluster_connect_timeout=0s"][..],
                "invalid --cluster_connect_timeout '0s': it must be above 0; give a duration \
                 such as 20s or 500ms",
            ),
            (
                &["--cluster_connect_timeout=20"],
                "invalid --cluster_connect_timeout '20': a number needs a unit (ns, us, ms, s, \
                 m, h); give a duration such as 20s or 500ms",
            ),
            (
                &["--cluster_connect_timeout=-1s"],
                "invalid --cluster_connect_timeout '-1s': negative; give a duration such as 20s \
                 or 500ms",
            ),
            (
                &["--cluster_connect_timeout=25h"],
                "invalid --cluster_connect_timeout '25h': it must be at most 24h; give a \
                 duration such as 20s or 500ms",
            ),
            (
                &["--backend_cluster_maximum_requests=-1"],
                "invalid --backend_cluster_maximum_requests '-1': must be a whole number from 0 \
                 (Envoy's default, 1024) to 4294967295",
            ),
            (
                &["--backend_cluster_maximum_requests=4294967296"],
                "invalid --backend_cluster_maximum_requests '4294967296': must be a whole number \
                 from 0 (Envoy's default, 1024) to 4294967295",
            ),
            (
                &["--dns_resolver_addresses=dns.google"],
                "invalid --dns_resolver_addresses 'dns.google': \"dns.google\" is not IP_ADDR or \
                 IP_ADDR:PORT (port 1 to 65535); separate addresses with ';', e.g. \
                 127.0.0.1;10.0.0.2:5353",
            ),
            (
                &["--dns=1.1.1.1,8.8.8.8"],
                "invalid --dns '1.1.1.1,8.8.8.8': \"1.1.1.1,8.8.8.8\" is not IP_ADDR or \
                 IP_ADDR:PORT (port 1 to 65535); separate addresses with ';', e.g. \
                 127.0.0.1;10.0.0.2:5353",
            ),
            (
                &["--dns=1.1.1.1", "--dns_resolver_addresses=8.8.8.8"],
                "Flag --dns_resolver_addresses cannot be used together with together with --dns.",
            ),
        ] {
            assert_eq!(refused(args), want, "{args:?}");
        }
        // The family is one of ESPv2's five names, spelt as ESPv2 spells them.
        for bad in ["V4ONLY", "v6preferred", ""] {
            let flag = format!("--backend_dns_lookup_family={bad}");
            let e = refused(&[&flag]);
            assert!(e.contains("--backend_dns_lookup_family"), "{e}");
        }
    }
}
