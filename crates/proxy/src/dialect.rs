//! One proxy, two dialects: `portico esp` speaks ESP v1's, `portico espv2` ESPv2's. The
//! dialect is chosen once at start ([`crate::settings::Settings::dialect`]) and read at the few
//! points where the two proxies answer differently; there is one pipeline, not two.
//!
//! Every difference is listed here. When you add one, add its row and read the dialect where
//! the difference is, never a copy of the code around it.
//!
//! | Where | ESP v1 (`portico esp`) | ESPv2 (`portico espv2`) | Read in |
//! |---|---|---|---|
//! | Start-up flags | ESP's `start_esp` flags, exit code 4 on a bad one | ESPv2's `start_proxy.py` flags (and its config manager's), exit code 1 | `cli`, `cli::espv2` |
//! | Serving ports | `--http_port`, `--http2_port`, `--ssl_port` | one `--listener_port` (default 8080) for HTTP/1.1, h2c and gRPC | `cli::espv2`, [`Dialect::serving_port_flag`] |
//! | Status server | on, `--status_port` default 8090 | off unless `--status_port`/`--admin_port` names a port | `cli::espv2` |
//! | Defaults | backend `127.0.0.1:8081`; access log on stdout; Service Control timeouts 1500/1500/3500 ms; body limit 32m; WebSockets only with `--enable_websocket` | backend `http://127.0.0.1:8082`; no access log unless `--access_log`; timeouts 1000/1000/2000 ms; no body limit; WebSockets on; CORS allow-headers add `X-User-Agent`; metadata server `http://169.254.169.254` unless `--non_gcp` | `cli::espv2` |
//! | A config with neither Service Control nor JWT rules | every request proxied to `--backend` as it came, unmatched | matched and routed as any: backend rules apply, an undefined path is 404, a wrong method 405 | `pipeline/mod.rs`, [`Dialect::routes_every_request`] |
//! | `x-google-backend` routing | only with `--enable_backend_routing`; a method without a backend rule is 500 then | always; a method without a backend rule goes to `--backend` | `cli::espv2`, [`Dialect::unrouted_methods_use_backend`] |
//! | `CONSTANT_ADDRESS` backend target | address path, `?`, the path bindings, then the query's `name=value` parameters without the API key's | address path, the client's query as sent (API key included), then `&` and the path bindings | `routing::BackendTarget::upstream_target`, [`Dialect::constant_address_keeps_query`] |
//! | Backend retries | none | Envoy's: `--backend_retry_ons` conditions (default `reset,connect-failure,refused-stream`), `--backend_retry_num` more attempts (default 1), `--backend_per_try_timeout`, `--backend_retry_on_status_codes`; only a request not written at all or whose body was read whole (at most 16 KiB) goes again; at most 3 retries in flight per backend; the answer is the last attempt's, and a 503 of the proxy's says `retried and the latest reset reason` | `cli::espv2`, `settings::Settings::backend_retry`, `retry`, `forward::Forwarder::with_retries` |
//! | Error body | pretty-printed `google.rpc.Status`: `code` the canonical gRPC code, `message`, a `DebugInfo` detail | one line `{"code":<HTTP status>,"message":"<text>"}` and a newline | [`Dialect::body`] |
//! | Error words | ESP's catalogue, carried by each [`EspError`] | ESPv2's, from the error's [`ErrorKind`]: Service Control errors as `CODE_NAME: text`, JWT errors in jwt_verify_lib's words (audience not allowed is 403), backend failures in Envoy's (`upstream request timeout`, 504; `upstream connect error ...`, 503; an unreachable backend is 503, not 502), `Payload Too Large`; Portico's own refusals keep their words | [`Dialect::reply`] |
//! | gRPC clients' errors | `grpc-status` is the error's canonical code | `grpc-status` is Envoy's mapping of the HTTP status (404 → 12, 400 → 13, 503 → 14, ...) | [`Dialect::reply`] |
//! | Path known, method not | 404 `Method does not exist.` (OPTIONS: 403 CORS) | 405 naming the rule's template; so is an `X-HTTP-Method-Override` to such a method | [`Dialect::refuses_wrong_method_with_405`], `pipeline/phases.rs` |
//! | Preflights under `--cors_preset` | any OPTIONS with an allowed origin is answered 204, `Access-Control-Max-Age: 1728000`, `Content-Type: text/plain` | only with an allowed `Origin` and a non-empty `Access-Control-Request-Method`, at any path: 200, `--cors_max_age` in seconds, the expose headers too; an OPTIONS no API rule takes that is not one is 400 with ESPv2's message (not reported), whatever its path | [`Dialect::preflight_needs_request_method`], [`Dialect::refuses_bad_preflights`], `cors::CorsSettings::preflight`, `pipeline/phases.rs` |
//! | CORS origins | `basic` sends the configured value (`*` by default) whatever the request's `Origin`; `cors_with_regex` finds the regex in the `Origin`, case-insensitively (nginx's `~*`) | the request's own `Origin` echoed when allowed: `*` allows any, another `basic` value exactly that one, the regex must match the whole origin, case-sensitively (Envoy); an `Origin` that is empty or given twice is none | `cors::CorsSettings::espv2`, `allowed_origin` |
//! | CORS headers on answers | every answer (errors included): origin, methods, headers, expose headers, credentials | only answers to requests an API route matched, with an allowed `Origin`: origin, expose headers, credentials | [`Dialect::cors_headers_need_a_route`], `cors::CorsSettings::decorate` |
//! | JWT: which fault a token is refused for | ESP v1's order: parse, time, issuer, audience, keys, signature | Envoy's: three sections, parse, issuer, time, audience, keys, signature | `auth::Authenticator::authenticate` (`AuthOptions::dialect`) |
//! | JWT: where it is read | `X-Goog-Iap-Jwt-Assertion`, then `Authorization` (`Bearer ` stripped if there, else the whole value), then `access_token` only without `Authorization` | `Authorization` holding `Bearer ` (the token characters after it), then `X-Goog-Iap-Jwt-Assertion`, then `access_token` (exact name) | `auth::token::extract_espv2` |
//! | JWT: audiences | the provider's list (else the requirement's), and the service's name always | the requirement's list, else the provider's, else `https://SERVICE` (any with `--disable_jwt_audience_service_name_check`); a token without `aud` passes only where any does | `auth::Authenticator::new`, `check_audience` |
//! | Header names with `_` | dropped (nginx), kept with `--underscores_in_headers` | the request is refused 400 `Bad Request` (Envoy), kept with `--underscores_in_headers` | `cli::espv2` (`HeadOptions::refuse_underscores`) |
//! | A client's `X-Forwarded-Client-Cert` | removed when client certificates are required | always removed (Envoy) | `cli::espv2` (`HeadOptions::sanitize_client_cert`) |
//! | Client address | `--xff_trusted_proxy_list` / `--client_ip_header` | `X-Forwarded-For` by `--envoy_xff_num_trusted_hops` (default 2, 0 serverless) | `cli::espv2` (`Settings::xff_hops`) |
//! | TLS | `--ssl_port` with `/etc/nginx/ssl/nginx.{crt,key}`; `-t` for backend client certificates | the listener TLS-only with `--ssl_server_cert_path` (client CA, protocol bounds, suites); `--ssl_backend_client_cert_path` / root file | `cli::espv2` (`tls::from_espv2_flags`) |
//! | Operation name, header rules, compression | none | `--enable_operation_name_header` (named with `--generated_header_prefix`), `--add/append_request/response_header`, `--enable_response_compression` | `cli::espv2` (`Settings` fields) |
//! | `X-Endpoint-API-UserInfo` | base64url (padded) JSON with `claims`, `issuer`, `id`, `email`, `audiences` | the token's payload segment as sent (`=`-padded with `--jwt_pad_forward_payload_header`) | `auth::Authenticator::authenticate` |
//! | Report labels | `user_agent` `ESP`, agent `ESP/portico-V`, platform `unknown` (or `--compute_platform_override`), location `global`; `/status_code` the error's canonical code (else from the HTTP status); `/credential_id` the JWT's, else `apikey:KEY` for any key (`apikey:UNKNOWN` after a fail-open check); `api_method` only for a matched method | `user_agent` `ESPv2`, agent `ESPv2/portico-V`, platform and location from the metadata server (`GCE(ESPv2)`, ..., else `UNKNOWN(ESPv2)` and `global`); `/status_code` the Service Control filter's status (0 unless no key, `:check` or quota refused or failed); `/credential_id` a verified key's (its uid, or `apikey:KEY`), else the JWT's; `api_method` also `<Unknown Operation Name>`; `/protocol` never `https` | `service_control::report` (`RequestRecord::dialect`, `StaticLabels`), [`espv2_service_control_status`] |
//! | Report metrics | the standard set with `error_count` and `request_bytes`/`response_bytes`; `backend_latencies` only for requests that reached the backend | no `error_count` or `*_bytes`; consumer form without backend/overhead latencies; `backend_latencies` for every request (0 when the backend was not reached); consumer metrics only for a verified key | `service_control::report` |
//! | Report log entry | the request in the payload (`url`, `http_method`, `http_response_code`, sizes, `client_ip`, ...), `log_message` `Method: M` / `... failed: ...`, `error_cause` `auth`/`service_control`/... | the request in `httpRequest`; payload `api_key_state` (`NOT CHECKED`, `INVALID`, `NOT ENABLED`, `VERIFIED`), `http_status_code`, `response_code_detail` (Envoy's: `via_upstream`, `direct_response`, `service_control_check_error{CODE}`, `jwt_authn_access_denied{Jwt_is_missing}`, ...), `log_message` `M is called`, `error_cause` the Service Control status's message, `location` only when the metadata server named one | `service_control::report`, [`espv2_response_code_detail`] |
//! | API key of a request not checked | not read (unknown operation, refused before the check, unregistered calls allowed) | read and reported, untrusted, in the log entry only | [`Dialect::reports_unchecked_api_keys`], `Pipeline::unchecked_key` |
//! | Metadata server | asked only with `--metadata`, for tokens | asked by default (`--metadata_url`, unless `--non_gcp`): at start-up for project, zone and platform (reports), with `--check_metadata` for the service name; tokens as in ESP; ID tokens with `format=standard` (ESP: `full`) | [`Dialect::reads_gcp_attributes`], `server::run`, `gcp_metadata`, [`Dialect::identity_token_format`] |
//! | Backend connections | the system's resolver and connect timeout; every address of a name tried in turn; no limit on requests in flight | Envoy's cluster settings: connect timeout 20 s (`--cluster_connect_timeout`; 503 `... reset reason: connection timeout`), IPv4 addresses preferred (`--backend_dns_lookup_family`), the DNS servers `--dns_resolver_addresses` names (none answering: 503 `no healthy upstream`), at most 1024 requests in flight per backend address (`--backend_cluster_maximum_requests`; over it 503 `... reset reason: overflow`, not retried); `--enable_backend_address_override` sends every method to `--backend` | `cli::espv2` (`Settings::backend_net`, `Settings::backend_address_override`), `backend_net`, `forward::Forwarder::with_net`, `routing::RouteOptions` |
//! | `WWW-Authenticate` | on every 401 and 403: `Bearer`, with `error="invalid_token"` when a token was sent | only on JWT refusals: `Bearer realm="<scheme>://<host><path, 256 bytes>"`, with `error="invalid_token"` unless the token was missing | [`Dialect::challenges_every_401_and_403`], [`espv2_jwt_challenge`], `pipeline::errors` |
//! | `:check` failures forgiven by `--service_control_network_fail_policy=open` | no answer, or any 5xx; a `*_UNAVAILABLE` check error is always let through, the key trusted | no answer, 429, 502, 503, 504 (what Envoy maps to `UNAVAILABLE`; a 500 is refused); a `*_UNAVAILABLE` check error follows the policy (open: through, key `NOT CHECKED`; close: 503 `One or more Google Service Control backends are unavailable.`) | [`Dialect::check_failure_may_fail_open`], [`Dialect::unavailable_check_errors_follow_fail_policy`], `service_control::check` |
//! | Access log | JSON lines on stdout (or the `--access_log` file) | none unless `--access_log`; JSON lines, or Envoy's format strings with `--access_log_format` | `cli::espv2` (`Settings::access_log_format`), `access_log::format` |
//! | Log level | `RUST_LOG` (default info) | `--enable_debug`: debug for Portico's crates, unless `RUST_LOG` is set | `main` (`cli::espv2::main_with_logging`) |
//! | Generated headers | `X-Endpoint-API-UserInfo`, `X-Endpoint-API-Project-ID`; client copies of `X-Endpoint-API-*` removed | the same names under `--generated_header_prefix` (default `X-Endpoint-`), also `<prefix>Api-Operation-Name`; client copies of `<prefix>API-*` and `X-Endpoint-API-*` removed | `cli::espv2` (`Settings::generated_headers`, `HeadOptions::generated_prefix`) |
//! | Generated operations | `allowCors`: one `CORS` operation for every path template without an `OPTIONS` rule | one per method, `<API><--cors_operation_delimiter><method>` with the method's API and backend; the health check `<--health_check_operation>.ESPv2_Autogenerated_HealthCheck` (access log only) | `routing` (`RouteOptions::cors_operation_delimiter`), `Settings::health_check_operation` |
//! | Caller IP for Service Control | `--client_ip_header`/`--client_ip_position`, else the client address | the last `Forwarded` element's `for=` with `--client_ip_from_forwarded_header`, else the client address | `pipeline::phases` (`forward::ip_from_forwarded`) |
//! | Wildcards and `:` | `{var}`, `*`, `**` take segments holding `:` | the same, unless `--disallow_colon_in_wildcard_path_segment` | `routing` (`PathMatcherBuilder::disallow_colon_in_wildcards`) |
//! | `x-envoy-original-path`, `x-envoy-original-method` | never | the client's target (and method) on a transcoded call; the target on a call whose path a backend rule translates | [`Dialect::tells_backend_original_path`], `forward::set_original_path` |
//! | HTTP/JSON request the transcoder cannot take (a query parameter naming no field) | 415 from the proxy, naming the parameter | forwarded untranscoded; the gRPC backend answers (415 from a spec-following server); a path no route takes but the transcoder does (a colon in a wildcard under `--disallow_colon_in_wildcard_path_segment`) is transcoded | [`Dialect::forwards_untranscodable_requests`], `pipeline::transcode`, `pipeline::phases` |
//! | Backend authentication under `--non_gcp` | ID tokens minted with the key file | off: `jwt_audience` rules' backends are called without an ID token | [`Dialect::non_gcp_disables_backend_auth`], `Settings::backend_auth_disabled` |
//! | `--http_request_timeout_s` | the backend's timeout; the proxy's own calls keep fixed limits (metadata 30 s, ID tokens 5 s, Service Management 5 s) | the proxy's own calls (default 30 s); the backend's deadline is 15 s or the rule's | `cli::espv2::validate`, `Settings::http_request_timeout` |
//! | Tokens missing at start-up | serve at once; requests needing them fail | by default not listening until Service Control's token and every backend ID token were had (`--dependency_error_behavior`) | `server::start_with_metrics`, `server::run` (`Settings::dependency_error_behavior`) |
//!
//! gRPC calls (docs/grpc.md): ESP v1 answers a gRPC caller's failure with the canonical code and
//! the bare message, ESPv2 with Envoy's code for the HTTP status and its JSON body as
//! `grpc-message` (`pipeline::errors::grpc_error_response`); ESPv2 reports a gRPC response's
//! `/response_code` from its `grpc-status` and logs `grpc_status_code`, ESP v1 reports streaming
//! message counts (`service_control::report`).
//!
//! Not yet different: the log entry's `trace` (tracing, issue 19).

use crate::error::{Code, ErrorKind, EspError, JwtProblem, NetworkFailure, ScFailure};
use std::borrow::Cow;
use std::fmt;

/// Which proxy's behaviour Portico reproduces. Plain data, `Copy`: read it wherever the two
/// differ (see the table above).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Dialect {
    /// ESP v1 (nginx-based, `endpoints-runtime:1`).
    #[default]
    Esp,
    /// ESPv2 (Envoy-based, `endpoints-runtime:2`).
    EspV2,
}

impl Dialect {
    /// The `portico` sub-command that speaks this dialect.
    pub fn command(self) -> &'static str {
        match self {
            Dialect::Esp => "esp",
            Dialect::EspV2 => "espv2",
        }
    }

    /// A request whose method no rule has for its path, while some rule matches the path for
    /// another method, is 405 naming that rule's template (ESPv2), not 404 (ESP v1).
    pub fn refuses_wrong_method_with_405(self) -> bool {
        self == Dialect::EspV2
    }

    /// Under `--cors_preset`, only an `OPTIONS` request with `Access-Control-Request-Method`
    /// (and an allowed `Origin`) is a preflight (ESPv2's CORS route); ESP v1's nginx answered
    /// any `OPTIONS` with an allowed origin.
    pub fn preflight_needs_request_method(self) -> bool {
        self == Dialect::EspV2
    }

    /// Under `--cors_preset`, an `OPTIONS` request that is not a valid preflight is refused
    /// 400 whatever its path (ESPv2); ESP v1 matches it like any request.
    pub fn refuses_bad_preflights(self) -> bool {
        self == Dialect::EspV2
    }

    /// Under `--cors_preset`, only the answers of requests an API route matched carry CORS
    /// headers (Envoy's CORS filter does nothing on ESPv2's 404, 405 and 400 routes, nor before
    /// routing); ESP v1's nginx adds them to every answer.
    pub fn cors_headers_need_a_route(self) -> bool {
        self == Dialect::EspV2
    }

    /// With routing by `x-google-backend`, a method without a backend rule goes to
    /// `--backend` (ESPv2); ESP v1 answers 500, as its nginx had no address for it.
    pub fn unrouted_methods_use_backend(self) -> bool {
        self == Dialect::EspV2
    }

    /// Calls to this `--backend` get no `X-Real-IP`, `X-Forwarded-For` or `X-Google-Real-IP`:
    /// ESP v1 with a `grpc://` backend, whose start_esp sets those only in its `proxy_pass`
    /// locations, not with `grpc_pass` (which passes the client's metadata as it came).
    /// (`grpc_backend`: `--backend` is `grpc://` or `grpcs://`; taken as a flag so this module
    /// stays below `settings`.)
    pub fn forwards_grpc_untouched(self, grpc_backend: bool) -> bool {
        self == Dialect::Esp && grpc_backend
    }

    /// A config with neither Service Control nor JWT rules is still matched and routed
    /// (ESPv2's routes always end in its 404); ESP v1's module declines such a config and nginx
    /// proxies every request as it came.
    pub fn routes_every_request(self) -> bool {
        self == Dialect::EspV2
    }

    /// An HTTP/JSON request the transcoder cannot take as its route says (a query parameter
    /// that names no field) goes to the gRPC backend as it came, and a path only the
    /// transcoder's matcher takes is transcoded (ESPv2: its transcoder filter passes a request
    /// on when it fails with INVALID_ARGUMENT, and matches paths with its own matcher, after
    /// routing). ESP v1: the proxy's 415.
    pub fn forwards_untranscodable_requests(self) -> bool {
        self == Dialect::EspV2
    }

    /// The backend learns the path (and, transcoded, the method) the client sent when the proxy
    /// changed it: `x-envoy-original-path` and `x-envoy-original-method` from ESPv2's gRPC-JSON
    /// transcoder (Envoy's `json_transcoder_filter.cc`), `x-envoy-original-path` from its
    /// path-rewrite filter for a backend rule's path translation. ESP v1 adds neither.
    pub fn tells_backend_original_path(self) -> bool {
        self == Dialect::EspV2
    }

    /// A `CONSTANT_ADDRESS` backend gets the client's query whole, then the path bindings
    /// (ESPv2's path-rewrite filter); ESP v1 sends the bindings, then the query's parameters
    /// other than the API key's.
    pub fn constant_address_keeps_query(self) -> bool {
        self == Dialect::EspV2
    }

    /// The API key of a request that is reported without a `:check` (an unknown operation, a
    /// request refused before the check, a method that allows unregistered calls) is read and
    /// reported, untrusted, in the log entry (ESPv2); ESP v1 reports no key for it.
    pub fn reports_unchecked_api_keys(self) -> bool {
        self == Dialect::EspV2
    }

    /// The metadata server is asked, at start-up, where the proxy runs (project, zone,
    /// platform), for the reports (ESPv2, unless `--non_gcp`); ESP v1 reports `global`.
    pub fn reads_gcp_attributes(self) -> bool {
        self == Dialect::EspV2
    }

    /// `--non_gcp` turns backend authentication off: a method whose backend rule names a
    /// `jwt_audience` is called without an ID token (ESPv2); ESP v1 has no such rule, and
    /// `portico esp` mints the tokens with its key file.
    pub fn non_gcp_disables_backend_auth(self) -> bool {
        self == Dialect::EspV2
    }

    /// The `format` of the ID tokens asked from the metadata server: ESPv2's `standard`, or
    /// `full` (the claims of the instance too) for `portico esp`.
    pub fn identity_token_format(self) -> &'static str {
        match self {
            Dialect::Esp => "full",
            Dialect::EspV2 => "standard",
        }
    }

    /// Whether a failed `:check` that got this HTTP status (`None`: no answer at all) may be
    /// forgiven by `--service_control_network_fail_policy=open`. ESP v1 forgives any 5xx;
    /// ESPv2 only what Envoy maps to `UNAVAILABLE` (429, 502, 503, 504; no answer becomes
    /// Envoy's own 503/504), so a 500 refuses the request even when open.
    pub fn check_failure_may_fail_open(self, http_status: Option<u16>) -> bool {
        match (self, http_status) {
            (_, None) => true,
            (Dialect::Esp, Some(s)) => s >= 500,
            (Dialect::EspV2, Some(s)) => matches!(s, 429 | 502 | 503 | 504),
        }
    }

    /// A check answered with a `*_UNAVAILABLE` error (a Service Control dependency down) obeys
    /// the network fail policy, the key untrusted (ESPv2); ESP v1 always lets it through with
    /// the key trusted.
    pub fn unavailable_check_errors_follow_fail_policy(self) -> bool {
        self == Dialect::EspV2
    }

    /// `WWW-Authenticate` goes on every 401 and 403 the proxy writes (ESP v1's nginx:
    /// `Bearer`, with `error="invalid_token"` when a token was sent); ESPv2 sends it only on its
    /// JWT refusals, with the request's URI as realm ([`espv2_jwt_challenge`]).
    pub fn challenges_every_401_and_403(self) -> bool {
        self == Dialect::Esp
    }

    /// The flag that names the plain-text serving port, for messages about it.
    pub fn serving_port_flag(self) -> &'static str {
        match self {
            Dialect::Esp => "--http_port",
            Dialect::EspV2 => "--listener_port",
        }
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.command())
    }
}

/// A proxy error as one dialect words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply<'e> {
    /// The HTTP status.
    pub status: u16,
    /// The message: the body's `message`, and `grpc-message` for gRPC clients.
    pub message: Cow<'e, str>,
    /// `grpc-status` for gRPC clients.
    pub grpc_code: i32,
}

impl Dialect {
    /// How this dialect answers `err`.
    pub fn reply(self, err: &EspError) -> Reply<'_> {
        match self {
            Dialect::Esp => Reply {
                status: err.http_status,
                message: Cow::Borrowed(&err.message),
                grpc_code: err.code,
            },
            Dialect::EspV2 => {
                let (status, message) = espv2_words(err);
                Reply {
                    status,
                    message,
                    // Envoy's local replies to gRPC clients derive the code from the status.
                    grpc_code: envoy_grpc_code(status).as_i32(),
                }
            }
        }
    }

    /// The JSON body of `err` (already worded as `reply`): ESP v1's pretty-printed
    /// `google.rpc.Status` with its `DebugInfo`, or ESPv2's one line
    /// `{"code":<HTTP status>,"message":"<text>"}` (Envoy's local-reply JSON format, newline
    /// included).
    pub fn body(self, err: &EspError, reply: &Reply<'_>) -> String {
        match self {
            Dialect::Esp => err.body(),
            Dialect::EspV2 => format!(
                "{{\"code\":{},\"message\":{}}}\n",
                reply.status,
                serde_json::to_string(reply.message.as_ref())
                    .unwrap_or_else(|_| String::from("\"\""))
            ),
        }
    }
}

/// Envoy's `Grpc::Utility::httpToGrpcStatus`.
fn envoy_grpc_code(status: u16) -> Code {
    match status {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// The status ESPv2's Service Control filter ends a request with (an `absl::Status`), for the
/// situations that filter refuses: no API key, a `:check` refusal, a `:check` that failed, a
/// refused quota. `None` for every other situation, where that status stays OK. The reply
/// prints it as `CODE_NAME: message`; ESPv2's report carries its code as `/status_code` and
/// its message as the log entry's `error_cause`.
pub fn espv2_service_control_status(kind: &ErrorKind) -> Option<(Code, Cow<'_, str>)> {
    Some(match kind {
        ErrorKind::UnregisteredCaller => (
            Code::Unauthenticated,
            Cow::Borrowed(
                "Method doesn't allow unregistered callers (callers without established \
                 identity). Please use API Key or other form of API consumer identity to call \
                 this API.",
            ),
        ),
        ErrorKind::CheckRefused { code, service } => check_status(code, service),
        ErrorKind::ServiceControlFailed(f) => service_control_failed_status(f),
        ErrorKind::QuotaRefused { code, description } => {
            let code = match &**code {
                "RESOURCE_EXHAUSTED" => Code::ResourceExhausted,
                "BILLING_NOT_ACTIVE" => Code::PermissionDenied,
                "PROJECT_DELETED" | "API_KEY_INVALID" | "API_KEY_EXPIRED" => Code::InvalidArgument,
                _ => Code::Internal,
            };
            (code, Cow::Borrowed(&**description))
        }
        _ => return None,
    })
}

/// Envoy's response code details (`%RESPONSE_CODE_DETAILS%`) for a request the proxy refused
/// with `kind`, or, with `None`, answered with the backend's response: what ESPv2 reports as
/// `response_code_detail`. ESPv2's filters write `filter_error-type{DETAIL}`; Envoy's own
/// refusals their fixed words. Portico's own refusals, which ESPv2 has no words for, are
/// `portico_local_reply`.
pub fn espv2_response_code_detail(kind: Option<&ErrorKind>) -> Cow<'static, str> {
    let Some(kind) = kind else {
        return Cow::Borrowed("via_upstream");
    };
    let reset = |reason: &str| {
        Cow::Owned(format!(
            "upstream_reset_before_response_started{{{reason}}}"
        ))
    };
    match kind {
        ErrorKind::Portico => Cow::Borrowed("portico_local_reply"),
        // ESPv2's routes for unknown paths, wrong methods and bad preflights answer directly.
        ErrorKind::PathNotDefined
        | ErrorKind::MethodNotAllowed { .. }
        | ErrorKind::CorsPreflightRefused => Cow::Borrowed("direct_response"),
        // Envoy's jwt_authn: the verifier's words, whitespace turned into `_`.
        ErrorKind::Jwt(p) => Cow::Owned(format!(
            "jwt_authn_access_denied{{{}}}",
            jwt_words(*p).replace(char::is_whitespace, "_")
        )),
        ErrorKind::UnregisteredCaller => {
            Cow::Borrowed("service_control_bad_request{MISSING_API_KEY}")
        }
        ErrorKind::CheckRefused { code, .. } => Cow::Owned(format!(
            "service_control_check_error{{{}}}",
            portico_servicecontrol::check_error::name(code)
        )),
        ErrorKind::ServiceControlFailed(f) => {
            // The failed call's own status, by its code's name.
            let code = match f {
                ScFailure::Network(_) => Code::Unavailable,
                ScFailure::Http { status, .. } => envoy_grpc_code(*status),
                ScFailure::Invalid | ScFailure::Token => Code::Internal,
            };
            Cow::Owned(format!(
                "service_control_check_network_failure{{{}}}",
                code.name()
            ))
        }
        ErrorKind::QuotaRefused { code, .. } => {
            Cow::Owned(format!("service_control_quota_error{{{code}}}"))
        }
        ErrorKind::BackendFailed { how, .. } => match how {
            NetworkFailure::Connect(errno) => reset(&format!(
                "remote_connection_failure,delayed_connect_error:_{errno}"
            )),
            NetworkFailure::Unresolved => Cow::Borrowed("no_healthy_upstream"),
            NetworkFailure::Timeout => Cow::Borrowed("upstream_response_timeout"),
            NetworkFailure::Tls => reset("connection_failure,TLS_error"),
            NetworkFailure::Reset => reset("connection_termination"),
            NetworkFailure::RefusedStream => reset("remote_refused_stream_reset"),
            NetworkFailure::ConnectTimeout => reset("connection_timeout"),
            NetworkFailure::Overflow => reset("overflow"),
        },
        ErrorKind::BackendTimeout => Cow::Borrowed("upstream_response_timeout"),
        ErrorKind::PayloadTooLarge => Cow::Borrowed("request_payload_too_large"),
        ErrorKind::BackendIdToken { .. } => Cow::Borrowed("backend_auth_missing_backend_token"),
    }
}

/// ESPv2's Service Control errors: an `absl::Status` printed as `CODE_NAME: message`, with the
/// HTTP status the code maps to.
fn status_words(code: Code, message: &str) -> (u16, Cow<'static, str>) {
    (
        code.http_status(),
        Cow::Owned(format!("{}: {message}", code.name())),
    )
}

/// What Envoy's router answers when a peer gives no response: status and body; `retried`:
/// after retries.
fn envoy_no_response(how: NetworkFailure, retried: bool) -> (u16, Cow<'static, str>) {
    let reset = if retried {
        "upstream connect error or disconnect/reset before headers. retried and the latest reset \
         reason: "
    } else {
        "upstream connect error or disconnect/reset before headers. reset reason: "
    };
    match how {
        NetworkFailure::Connect(errno) => (
            503,
            Cow::Owned(format!(
                "{reset}remote connection failure, transport failure reason: delayed connect \
                 error: {errno}"
            )),
        ),
        NetworkFailure::Unresolved => (503, Cow::Borrowed("no healthy upstream")),
        NetworkFailure::Timeout => (504, Cow::Borrowed("upstream request timeout")),
        NetworkFailure::Tls => (
            503,
            Cow::Owned(format!(
                "{reset}connection failure, transport failure reason: TLS error"
            )),
        ),
        NetworkFailure::Reset => (503, Cow::Owned(format!("{reset}connection termination"))),
        NetworkFailure::RefusedStream => (
            503,
            Cow::Owned(format!("{reset}remote refused stream reset")),
        ),
        NetworkFailure::ConnectTimeout => (503, Cow::Owned(format!("{reset}connection timeout"))),
        NetworkFailure::Overflow => (503, Cow::Owned(format!("{reset}overflow"))),
    }
}

/// ESPv2's status and message for an error (its catalogue: docs/espv2.md).
fn espv2_words(err: &EspError) -> (u16, Cow<'_, str>) {
    match &err.kind {
        ErrorKind::Portico => (err.http_status, Cow::Borrowed(&err.message)),
        ErrorKind::PathNotDefined => (
            404,
            Cow::Borrowed("The current request is not defined by this API."),
        ),
        ErrorKind::MethodNotAllowed { template } => (
            405,
            Cow::Owned(format!(
                "The current request is matched to the defined url template \"{template}\" but \
                 its http method is not allowed"
            )),
        ),
        ErrorKind::CorsPreflightRefused => (
            400,
            Cow::Borrowed(
                "The CORS preflight request is missing one (or more) of the following required \
                 headers [Origin, Access-Control-Request-Method] or has an unmatched Origin \
                 header.",
            ),
        ),
        ErrorKind::Jwt(JwtProblem::Internal) => (err.http_status, Cow::Borrowed(&err.message)),
        ErrorKind::Jwt(p) => {
            let status = if *p == JwtProblem::AudienceNotAllowed {
                403
            } else {
                401
            };
            (status, jwt_words(*p))
        }
        ErrorKind::UnregisteredCaller
        | ErrorKind::CheckRefused { .. }
        | ErrorKind::ServiceControlFailed(_)
        | ErrorKind::QuotaRefused { .. } => match espv2_service_control_status(&err.kind) {
            Some((code, message)) => status_words(code, &message),
            None => (err.http_status, Cow::Borrowed(&err.message)),
        },
        ErrorKind::BackendFailed { how, retried } => envoy_no_response(*how, *retried),
        ErrorKind::BackendTimeout => envoy_no_response(NetworkFailure::Timeout, false),
        ErrorKind::PayloadTooLarge => (413, Cow::Borrowed("Payload Too Large")),
        ErrorKind::BackendIdToken { audience } => (
            500,
            Cow::Owned(format!("Token not found for audience: {audience}")),
        ),
    }
}

/// google/jwt_verify_lib's texts, which Envoy's `jwt_authn` answers with.
fn jwt_words(p: JwtProblem) -> Cow<'static, str> {
    use JwtProblem as P;
    Cow::Borrowed(match p {
        P::Missing => "Jwt is missing",
        P::BadFormat => {
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
        }
        P::HeaderBadBase64 => "Jwt header is an invalid Base64url encoded",
        P::HeaderBadJson => "Jwt header is an invalid JSON",
        P::HeaderBadAlg => "Jwt header [alg] field is required and must be a string",
        P::HeaderUnsupportedAlg => "Jwt header [alg] is not supported",
        P::PayloadBadBase64 => "Jwt payload is an invalid Base64url encoded",
        P::PayloadBadJson => "Jwt payload is an invalid JSON",
        P::ClaimNotString(claim) => {
            return Cow::Owned(format!("Jwt payload [{claim}] field is not a string"))
        }
        P::ClaimNotInteger(claim) => {
            return Cow::Owned(format!("Jwt payload [{claim}] field is not an integer"))
        }
        P::ClaimNotPositive(claim) => {
            return Cow::Owned(format!(
                "Jwt payload [{claim}] field is not a positive integer"
            ))
        }
        P::AudienceNotStrings => "Jwt payload [aud] field is not a string or string list",
        P::SignatureBadBase64 => "Jwt signature is an invalid Base64url encoded",
        P::Expired => "Jwt is expired",
        P::NotYetValid => "Jwt not yet valid",
        P::UnknownIssuer => "Jwt issuer is not configured",
        P::AudienceNotAllowed => "Audiences in Jwt are not allowed",
        P::JwksFetchFailed => "Jwks remote fetch is failed",
        P::KidAlgMismatch => "Jwks doesn't have key to match kid or alg from Jwt",
        P::VerificationFailed | P::Internal => "Jwt verification fails",
    })
}

/// Envoy caps the URI it names as realm at this many bytes of path.
const CHALLENGE_PATH_MAX: usize = 256;

/// ESPv2's `WWW-Authenticate` on a JWT refusal (Envoy's JWT filter): `Bearer
/// realm="<scheme>://<host><path>"`, the path (with its query) cut at 256 bytes, and
/// `, error="invalid_token"` unless the token was missing. Envoy copies the host and path as
/// they are; here `"` and `\` are escaped so that a hostile `Host` cannot end the quoted
/// string early. `None` when the value cannot be a header (it always can from a parsed request).
pub fn espv2_jwt_challenge(
    problem: &JwtProblem,
    tls: bool,
    host: &[u8],
    target: &str,
) -> Option<http::HeaderValue> {
    let mut cut = target.len().min(CHALLENGE_PATH_MAX);
    while !target.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut v: Vec<u8> = Vec::with_capacity(48 + host.len() + cut);
    v.extend_from_slice(b"Bearer realm=\"");
    v.extend_from_slice(if tls { b"https://" } else { b"http://" });
    for &b in host.iter().chain(&target.as_bytes()[..cut]) {
        if b == b'"' || b == b'\\' {
            v.push(b'\\');
        }
        v.push(b);
    }
    v.push(b'"');
    if *problem != JwtProblem::Missing {
        v.extend_from_slice(b", error=\"invalid_token\"");
    }
    http::HeaderValue::from_bytes(&v).ok()
}

/// ESPv2's `ConvertCheckResponse`: the first check error's code and text./// ESPv2's `ConvertCheckResponse`: the first check error's code and text.
fn check_status(code: &str, service: &str) -> (Code, Cow<'static, str>) {
    match code {
        "NOT_FOUND" => (
            Code::InvalidArgument,
            "Client project not found. Please pass a valid project.".into(),
        ),
        "RESOURCE_EXHAUSTED" => (Code::ResourceExhausted, "Quota check failed.".into()),
        // ESPv2's text starts with a space.
        "API_TARGET_BLOCKED" => (
            Code::PermissionDenied,
            " The API targeted by this request is invalid for the given API key.".into(),
        ),
        "API_KEY_NOT_FOUND" => (
            Code::InvalidArgument,
            "API key not found. Please pass a valid API key.".into(),
        ),
        "API_KEY_EXPIRED" => (
            Code::InvalidArgument,
            "API key expired. Please renew the API key.".into(),
        ),
        "API_KEY_INVALID" => (
            Code::InvalidArgument,
            "API key not valid. Please pass a valid API key.".into(),
        ),
        "SERVICE_NOT_ACTIVATED" => (
            Code::PermissionDenied,
            format!("API {service} is not enabled for the project.").into(),
        ),
        "PERMISSION_DENIED" => (Code::PermissionDenied, "Permission denied.".into()),
        "IP_ADDRESS_BLOCKED" => (Code::PermissionDenied, "IP address blocked.".into()),
        "REFERER_BLOCKED" => (Code::PermissionDenied, "Referer blocked.".into()),
        "CLIENT_APP_BLOCKED" => (Code::PermissionDenied, "Client application blocked.".into()),
        "PROJECT_DELETED" => (Code::PermissionDenied, "Project has been deleted.".into()),
        "PROJECT_INVALID" => (
            Code::InvalidArgument,
            "Client project not valid. Please pass a valid project.".into(),
        ),
        "BILLING_DISABLED" => (
            Code::PermissionDenied,
            format!("API {service} has billing disabled. Please enable it.").into(),
        ),
        "INVALID_CREDENTIAL" => (
            Code::PermissionDenied,
            "The credential in the request can not be verified.".into(),
        ),
        "CONSUMER_INVALID" => (
            Code::PermissionDenied,
            "The consumer from the API key does not represent a valid consumer folder or \
             organization."
                .into(),
        ),
        "NAMESPACE_LOOKUP_UNAVAILABLE"
        | "SERVICE_STATUS_UNAVAILABLE"
        | "BILLING_STATUS_UNAVAILABLE"
        | "CLOUD_RESOURCE_MANAGER_BACKEND_UNAVAILABLE" => (
            Code::Unavailable,
            "One or more Google Service Control backends are unavailable.".into(),
        ),
        other => (
            Code::Internal,
            format!(
                "Request blocked due to unsupported error code in Google Service Control Check \
                 response: {other}"
            )
            .into(),
        ),
    }
}

/// ESPv2's answer when `:check` itself failed: an unavailable Service Control (5xx, or no
/// answer, which Envoy turns into its own 503/504) stays `UNAVAILABLE`; anything else is the
/// proxy's fault, `INTERNAL`.
fn service_control_failed_status(f: &ScFailure) -> (Code, Cow<'static, str>) {
    let failed_with = |status: u16, body: &str| {
        let mut m = format!("Calling Google Service Control API failed with: {status}");
        if !body.is_empty() {
            m.push_str(" and body: ");
            m.push_str(body);
        }
        m
    };
    match f {
        ScFailure::Network(how) => {
            // Service Control's cluster has no retry policy; the call's own retries do not
            // show in Envoy's text.
            let (status, body) = envoy_no_response(*how, false);
            (Code::Unavailable, Cow::Owned(failed_with(status, &body)))
        }
        ScFailure::Http { status, body } => {
            let code = match envoy_grpc_code(*status) {
                Code::Unavailable => Code::Unavailable,
                _ => Code::Internal,
            };
            (code, Cow::Owned(failed_with(*status, body)))
        }
        ScFailure::Invalid => (Code::Internal, Cow::Borrowed("Invalid response")),
        ScFailure::Token => (
            Code::Internal,
            Cow::Borrowed("Missing access token for service control call"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Cause;

    fn v2(err: &EspError) -> (u16, String, i32, String) {
        let r = Dialect::EspV2.reply(err);
        let body = Dialect::EspV2.body(err, &r);
        (r.status, r.message.into_owned(), r.grpc_code, body)
    }

    #[test]
    fn espv2_jwt_challenges_name_the_uri_and_cannot_be_broken_out_of() {
        let v = espv2_jwt_challenge(&JwtProblem::Missing, false, b"h:8080", "/p?q=1").unwrap();
        assert_eq!(v, "Bearer realm=\"http://h:8080/p?q=1\"");
        let v = espv2_jwt_challenge(&JwtProblem::Expired, true, b"h", "/p").unwrap();
        assert_eq!(v, "Bearer realm=\"https://h/p\", error=\"invalid_token\"");
        // A hostile Host cannot close the realm's quotes.
        let v = espv2_jwt_challenge(&JwtProblem::Missing, false, br#"h", evil="1\"#, "/").unwrap();
        assert_eq!(v, r#"Bearer realm="http://h\", evil=\"1\\/""#);
        // The path is cut at 256 bytes, on a character boundary.
        let long = format!("/{}", "é".repeat(300));
        let v = espv2_jwt_challenge(&JwtProblem::Missing, false, b"h", &long).unwrap();
        let s = v
            .to_str()
            .map(str::to_owned)
            .unwrap_or_else(|_| String::from_utf8_lossy(v.as_bytes()).into_owned());
        assert!(
            s.len() <= "Bearer realm=\"http://h\"".len() + 256,
            "{}",
            s.len()
        );
        assert!(s.ends_with("é\""), "{s}");
    }

    #[test]
    fn esp_v1_words_are_the_errors_own() {
        let e = EspError::unregistered_caller();
        let r = Dialect::Esp.reply(&e);
        assert_eq!((r.status, r.grpc_code), (401, 16));
        assert_eq!(r.message, e.message);
        assert_eq!(Dialect::Esp.body(&e, &r), e.body());
        // A kind never changes ESP v1's answer.
        let m = EspError::method_does_not_exist().with_kind(ErrorKind::MethodNotAllowed {
            template: "/a".into(),
        });
        let r = Dialect::Esp.reply(&m);
        assert_eq!(
            (r.status, r.message.as_ref()),
            (404, "Method does not exist.")
        );
    }

    #[test]
    fn espv2_body_is_one_json_line_with_the_http_status() {
        let e = EspError::method_does_not_exist().with_kind(ErrorKind::MethodNotAllowed {
            template: "/v1/\"odd\"\\{x}".into(),
        });
        let (status, _, grpc, body) = v2(&e);
        assert_eq!((status, grpc), (405, 2));
        assert_eq!(
            body,
            "{\"code\":405,\"message\":\"The current request is matched to the defined url \
             template \\\"/v1/\\\"odd\\\"\\\\{x}\\\" but its http method is not allowed\"}\n"
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["code"], 405);
    }

    #[test]
    fn espv2_grpc_codes_are_envoys_from_the_status() {
        for (kind, status, grpc) in [
            (ErrorKind::PathNotDefined, 404, 12),
            (ErrorKind::UnregisteredCaller, 401, 16),
            (ErrorKind::Jwt(JwtProblem::AudienceNotAllowed), 403, 7),
            (ErrorKind::Jwt(JwtProblem::Expired), 401, 16),
            (ErrorKind::BackendTimeout, 504, 14),
            (ErrorKind::PayloadTooLarge, 413, 2),
            (ErrorKind::CorsPreflightRefused, 400, 13),
        ] {
            let e = EspError::new(Code::Internal, "x", Cause::Internal).with_kind(kind.clone());
            let (s, _, g, _) = v2(&e);
            assert_eq!((s, g), (status, grpc), "{kind:?}");
        }
    }

    #[test]
    fn service_control_words() {
        let sc = |kind: ErrorKind| {
            let e = EspError::new(Code::Internal, "x", Cause::ServiceControl).with_kind(kind);
            let (s, m, _, _) = v2(&e);
            (s, m)
        };
        let failed = |f: ScFailure| sc(ErrorKind::ServiceControlFailed(f));
        assert_eq!(
            failed(ScFailure::Network(NetworkFailure::Unresolved)),
            (
                503,
                "UNAVAILABLE: Calling Google Service Control API failed with: 503 and body: no \
                 healthy upstream"
                    .into()
            )
        );
        assert_eq!(
            failed(ScFailure::Http {
                status: 401,
                body: "".into()
            }),
            (
                500,
                "INTERNAL: Calling Google Service Control API failed with: 401".into()
            )
        );
        assert_eq!(
            failed(ScFailure::Http {
                status: 429,
                body: "slow down".into()
            })
            .0,
            503
        );
        assert_eq!(
            failed(ScFailure::Invalid),
            (500, "INTERNAL: Invalid response".into())
        );
        assert_eq!(
            failed(ScFailure::Token),
            (
                500,
                "INTERNAL: Missing access token for service control call".into()
            )
        );
        // absl's `CODE: message`, even when the message is empty.
        assert_eq!(
            sc(ErrorKind::QuotaRefused {
                code: "RESOURCE_EXHAUSTED".into(),
                description: "".into()
            }),
            (429, "RESOURCE_EXHAUSTED: ".into())
        );
        assert_eq!(
            sc(ErrorKind::QuotaRefused {
                code: "PROJECT_DELETED".into(),
                description: "gone".into()
            }),
            (400, "INVALID_ARGUMENT: gone".into())
        );
        assert_eq!(
            sc(ErrorKind::CheckRefused {
                code: "CONSUMER_INVALID".into(),
                service: "s".into()
            }),
            (
                403,
                "PERMISSION_DENIED: The consumer from the API key does not represent a valid \
                 consumer folder or organization."
                    .into()
            )
        );
    }

    #[test]
    fn espv2_response_code_details_are_envoys() {
        let d = |k: Option<ErrorKind>| espv2_response_code_detail(k.as_ref()).into_owned();
        assert_eq!(d(None), "via_upstream");
        assert_eq!(d(Some(ErrorKind::PathNotDefined)), "direct_response");
        assert_eq!(
            d(Some(ErrorKind::MethodNotAllowed {
                template: "/a".into()
            })),
            "direct_response"
        );
        assert_eq!(
            d(Some(ErrorKind::Jwt(JwtProblem::Missing))),
            "jwt_authn_access_denied{Jwt_is_missing}"
        );
        assert_eq!(
            d(Some(ErrorKind::Jwt(JwtProblem::ClaimNotInteger("exp")))),
            "jwt_authn_access_denied{Jwt_payload_[exp]_field_is_not_an_integer}"
        );
        assert_eq!(
            d(Some(ErrorKind::UnregisteredCaller)),
            "service_control_bad_request{MISSING_API_KEY}"
        );
        let refused = |code: &str| ErrorKind::CheckRefused {
            code: code.into(),
            service: "s".into(),
        };
        assert_eq!(
            d(Some(refused("API_KEY_INVALID"))),
            "service_control_check_error{API_KEY_INVALID}"
        );
        // The unsupported-code refusal carries the number; the detail names it.
        assert_eq!(
            d(Some(refused("121"))),
            "service_control_check_error{SECURITY_POLICY_VIOLATED}"
        );
        assert_eq!(d(Some(refused("999"))), "service_control_check_error{999}");
        let failed = |f| Some(ErrorKind::ServiceControlFailed(f));
        assert_eq!(
            d(failed(ScFailure::Network(NetworkFailure::Timeout))),
            "service_control_check_network_failure{UNAVAILABLE}"
        );
        assert_eq!(
            d(failed(ScFailure::Http {
                status: 403,
                body: "".into()
            })),
            "service_control_check_network_failure{PERMISSION_DENIED}"
        );
        assert_eq!(
            d(failed(ScFailure::Http {
                status: 500,
                body: "".into()
            })),
            "service_control_check_network_failure{UNKNOWN}"
        );
        assert_eq!(
            d(failed(ScFailure::Token)),
            "service_control_check_network_failure{INTERNAL}"
        );
        assert_eq!(
            d(Some(ErrorKind::QuotaRefused {
                code: "RESOURCE_EXHAUSTED".into(),
                description: "x".into()
            })),
            "service_control_quota_error{RESOURCE_EXHAUSTED}"
        );
        assert_eq!(
            d(Some(ErrorKind::BackendFailed {
                how: NetworkFailure::Connect(111),
                retried: true
            })),
            "upstream_reset_before_response_started{remote_connection_failure,delayed_connect_error:_111}"
        );
        assert_eq!(
            d(Some(ErrorKind::BackendFailed {
                how: NetworkFailure::Reset,
                retried: false
            })),
            "upstream_reset_before_response_started{connection_termination}"
        );
        // Envoy's circuit breaker and connect timeout.
        assert_eq!(
            d(Some(ErrorKind::BackendFailed {
                how: NetworkFailure::Overflow,
                retried: false
            })),
            "upstream_reset_before_response_started{overflow}"
        );
        assert_eq!(
            d(Some(ErrorKind::BackendFailed {
                how: NetworkFailure::ConnectTimeout,
                retried: true
            })),
            "upstream_reset_before_response_started{connection_timeout}"
        );
        assert_eq!(
            d(Some(ErrorKind::BackendTimeout)),
            "upstream_response_timeout"
        );
        assert_eq!(
            d(Some(ErrorKind::PayloadTooLarge)),
            "request_payload_too_large"
        );
        assert_eq!(
            d(Some(ErrorKind::BackendIdToken {
                audience: "a".into()
            })),
            "backend_auth_missing_backend_token"
        );
        assert_eq!(d(Some(ErrorKind::Portico)), "portico_local_reply");
    }

    #[test]
    fn espv2_service_control_status_is_the_filters() {
        let st = |k: ErrorKind| {
            espv2_service_control_status(&k).map(|(c, m)| (c.as_i32(), m.into_owned()))
        };
        assert_eq!(st(ErrorKind::UnregisteredCaller).map(|(c, _)| c), Some(16));
        assert_eq!(
            st(ErrorKind::CheckRefused {
                code: "SERVICE_NOT_ACTIVATED".into(),
                service: "svc".into()
            }),
            Some((7, "API svc is not enabled for the project.".into()))
        );
        assert_eq!(
            st(ErrorKind::QuotaRefused {
                code: "RESOURCE_EXHAUSTED".into(),
                description: "tokens".into()
            }),
            Some((8, "tokens".into()))
        );
        // Refused before or after Service Control: its status stays OK.
        for k in [
            ErrorKind::PathNotDefined,
            ErrorKind::Jwt(JwtProblem::Missing),
            ErrorKind::BackendTimeout,
            ErrorKind::Portico,
        ] {
            assert_eq!(st(k.clone()), None, "{k:?}");
        }
    }

    #[test]
    fn portico_refusals_keep_their_words_in_espv2s_shape() {
        let e = EspError::with_status(
            414,
            Code::FailedPrecondition,
            "URI_TOO_LONG",
            Cause::Application,
        );
        let (s, m, _, body) = v2(&e);
        assert_eq!((s, m.as_str()), (414, "URI_TOO_LONG"));
        assert_eq!(body, "{\"code\":414,\"message\":\"URI_TOO_LONG\"}\n");
        let tls = EspError::bad_gateway(NetworkFailure::Tls, false);
        assert_eq!(
            v2(&tls).1,
            "upstream connect error or disconnect/reset before headers. reset reason: \
             connection failure, transport failure reason: TLS error"
        );
        assert_eq!(
            v2(&EspError::bad_gateway(NetworkFailure::Unresolved, true)).1,
            "no healthy upstream"
        );
        assert_eq!(
            v2(&EspError::bad_gateway(NetworkFailure::Overflow, false)).3,
            "{\"code\":503,\"message\":\"upstream connect error or disconnect/reset before \
             headers. reset reason: overflow\"}\n"
        );
        assert_eq!(
            v2(&EspError::bad_gateway(
                NetworkFailure::ConnectTimeout,
                false
            ))
            .3,
            "{\"code\":503,\"message\":\"upstream connect error or disconnect/reset before \
             headers. reset reason: connection timeout\"}\n"
        );
        assert_eq!(
            v2(&EspError::bad_gateway(NetworkFailure::ConnectTimeout, true)).1,
            "upstream connect error or disconnect/reset before headers. retried and the latest \
             reset reason: connection timeout"
        );
        assert_eq!(
            v2(&EspError::bad_gateway(NetworkFailure::RefusedStream, true)),
            (
                503,
                "upstream connect error or disconnect/reset before headers. retried and the \
                 latest reset reason: remote refused stream reset"
                    .into(),
                14,
                "{\"code\":503,\"message\":\"upstream connect error or disconnect/reset before \
                 headers. retried and the latest reset reason: remote refused stream reset\"}\n"
                    .into()
            )
        );
    }
}
