//! The request path: [`Pipeline::handle`] takes one request through the phases below, in
//! ESP v1's order, each a named function in this folder:
//!
//! 0. **prepare** ([`phases`], `Pipeline::prepare`): settle the head
//!    ([`crate::request_head::settle`]: the method, with a valid `X-HTTP-Method-Override`; the
//!    headers, names with `_` and client copies of the proxy's own headers dropped; the path,
//!    normalised; 400/405 when refused), answer `--healthz` and `--cors_preset` preflights
//!    (nginx answered these before ESP ran), refuse a body over `--client_max_body_size`, apply
//!    `--rewrite`;
//! 1. pick a config of the current rollout (weighted, in [`Pipeline::handle`]) — with neither
//!    Service Control nor auth configured, everything is proxied (ESP's access handler
//!    declines; ESPv2 still routes every request:
//!    [`crate::dialect::Dialect::routes_every_request`]);
//! 2. **match** (`Pipeline::match_request`): the settled method + the rewritten target
//!    (undecoded) → [`crate::routing::MethodInfo`]; no match is 404 code 5, or 403 code 7 for OPTIONS; the
//!    method and target matched are the ones forwarded; `--enable_backend_routing` resolves
//!    the method's `backend.rules` address here ([`crate::routing::BackendTarget`]);
//! 3. **authenticate** (`Pipeline::authenticate`): the JWT ([`crate::auth`]); then the API
//!    key ([`crate::auth::api_key::extract_api_key`], §2.4);
//! 4. **check + quota** (`Pipeline::check_and_quota`): 401 code 16 when the method needs a
//!    consumer and none was given, `:check` with Service Control, then quota (never blocking);
//! 5. **forward** ([`backend`], `Pipeline::forward`): to `--backend`, or to the routed address
//!    ([`crate::forward`] over the pool in [`crate::upstream`]), with ESPv2's
//!    `X-Endpoint-API-Operation-Name` and, last, the operator's request headers
//!    ([`crate::header_rules`]);
//! 6. **respond** (`Pipeline::respond`, then `Pipeline::finalize` in [`body`]): the backend's
//!    answer, or the proxy's error ([`errors`]), with CORS/HSTS headers, then the operator's
//!    response headers, compressed when the client accepts it ([`crate::compression`]),
//!    carrying its completion;
//! 7. **report** (`Completion::report`, [`body`]): when the response body has been sent,
//!    metrics, the access log and the Service Control report.
//!
//! Where things are: [`state`] holds the per-request state (`Ctx`, `ReportInfo`); [`body`] the
//! response body, its completion and the abort guard; [`errors`] the proxy's error responses.
//! Errors generated here are [`EspError`]s rendered as ESP renders them; backend responses,
//! errors included, pass through untouched. Nothing on this path panics.
//!
//! Layer rule: the pipeline reads [`crate::settings`], never the flag parser ([`crate::cli`]);
//! it reaches Service Control only through [`ControlApi`].

mod backend;
mod body;
mod errors;
mod phases;
mod state;
mod stream_report;
mod transcode;

pub use body::{AbortGuard, ProxyBody};
pub use errors::{error_response, grpc_error_response};
pub use phases::rewrite;

use crate::auth::api_key::extract_api_key;
use crate::error::{Cause, Code, ErrorKind, EspError};
use crate::forward::Forwarder;
use crate::routing::RouteTable;
use crate::settings::Settings;
use arc_swap::ArcSwap;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;
use state::Prepared;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// Stage interfaces towards Service Control and JWT authentication.
// ---------------------------------------------------------------------------------------------

pub use crate::service_control::{CheckInput, CheckOk, QuotaInput, RequestRecord};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The pipeline's view of the Service Control client (check through the cache, quota from the
/// cache with background refresh, reports enqueued): the seam between the request path and
/// [`crate::service_control::ServiceControl`].
pub trait ControlApi: Send + Sync + 'static {
    fn check<'a>(&'a self, input: CheckInput<'a>) -> BoxFuture<'a, Result<CheckOk, EspError>>;
    fn allocate_quota(&self, input: QuotaInput<'_>) -> Result<(), EspError>;
    fn report(&self, record: RequestRecord);
    /// Status-page statistics (`serviceControlStatistics`), if the client keeps them.
    fn statistics(&self) -> Option<serde_json::Value> {
        None
    }
    /// The metadata server's token cache the client authenticates with, if any, so other
    /// outbound callers (the trace exporter) share its fetches instead of keeping their own.
    fn metadata_tokens(&self) -> Option<crate::outbound_auth::MetadataTokens> {
        None
    }
}

impl ControlApi for crate::service_control::ServiceControl {
    fn check<'a>(&'a self, input: CheckInput<'a>) -> BoxFuture<'a, Result<CheckOk, EspError>> {
        Box::pin(crate::service_control::ServiceControl::check(self, input))
    }
    fn allocate_quota(&self, input: QuotaInput<'_>) -> Result<(), EspError> {
        crate::service_control::ServiceControl::allocate_quota(self, input)
    }
    fn report(&self, record: RequestRecord) {
        crate::service_control::ServiceControl::report(self, record)
    }
    fn statistics(&self) -> Option<serde_json::Value> {
        serde_json::to_value(crate::service_control::ServiceControl::statistics(self)).ok()
    }
    fn metadata_tokens(&self) -> Option<crate::outbound_auth::MetadataTokens> {
        crate::service_control::ServiceControl::metadata_tokens(self)
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state.
// ---------------------------------------------------------------------------------------------

/// State shared by every serving thread.
pub struct ProxyState {
    pub settings: Arc<Settings>,
    /// The current rollout's routing tables; swapped whole, never mutated.
    pub routes: ArcSwap<RouteTable>,
    pub control: Option<Arc<dyn ControlApi>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub access_log: crate::access_log::AccessLog,
    /// ID tokens for backend rules with `jwt_audience`; `None` without `--service_account_key`.
    pub backend_tokens: Option<Arc<crate::backend_auth::IdTokenSource>>,
    /// The cap on response encoders alive at once, with `--enable_response_compression`.
    pub compression: Option<Arc<crate::compression::Gate>>,
    /// Sampling and export of traces; `None`: tracing is off ([`crate::trace`]).
    pub tracer: Option<Arc<crate::trace::Tracer>>,
    /// Responses sent uncompressed because `compression` was at its cap.
    compression_busy: prometheus_client::metrics::counter::Counter,
    /// The request headers the response header rules read (`%REQ(...)%`), kept per request.
    response_rules_read: Vec<HeaderName>,
    /// Header rules or `--envoy_use_remote_address` need the connection's facts per request.
    keep_conn_facts: bool,
    healthz_path: Option<String>,
    /// The gRPC backend's health (`--health_check_grpc_backend`), which `--healthz` answers
    /// with; `None`: not checked.
    pub backend_health: Option<Arc<crate::grpc_health::BackendHealth>>,
}

impl ProxyState {
    pub fn new(
        settings: Arc<Settings>,
        routes: RouteTable,
        control: Option<Arc<dyn ControlApi>>,
        metrics: Arc<crate::metrics::Metrics>,
        access_log: crate::access_log::AccessLog,
    ) -> ProxyState {
        let healthz_path = settings.healthz.as_ref().map(|h| format!("/{h}"));
        let compression_busy = prometheus_client::metrics::counter::Counter::default();
        let compression = settings.response_compression.as_ref().map(|c| {
            let active = prometheus_client::metrics::gauge::Gauge::default();
            metrics.register(
                "compression_streams_active",
                "Responses being compressed now",
                active.clone(),
            );
            metrics.register(
                "compression_skipped_busy",
                "Responses sent uncompressed because the encoder cap was reached",
                compression_busy.clone(),
            );
            crate::compression::Gate::new(c.max_streams, active)
        });
        let mut response_rules_read =
            crate::header_rules::request_headers_read(&settings.response_headers_to_add);
        // `--access_log_format` keeps the client's headers it reads, the same way.
        if let Some(f) = &settings.access_log_format {
            for n in f.request_headers() {
                if !response_rules_read.contains(n) {
                    response_rules_read.push(n.clone());
                }
            }
        }
        let keep_conn_facts = !settings.request_headers_to_add.is_empty()
            || !settings.response_headers_to_add.is_empty()
            || settings.xff_hops.is_some_and(|h| h.use_remote_address)
            || settings.access_log_format.is_some();
        ProxyState {
            settings,
            routes: ArcSwap::from_pointee(routes),
            control,
            metrics,
            access_log,
            backend_tokens: None,
            compression,
            tracer: None,
            compression_busy,
            response_rules_read,
            keep_conn_facts,
            healthz_path,
            backend_health: None,
        }
    }

    /// Installs a new routing table; requests in flight keep the one they started with.
    pub fn swap_routes(&self, table: RouteTable) {
        let ids: Vec<(String, u32)> = table
            .configs
            .iter()
            .map(|(c, p)| (c.config_id.clone(), *p))
            .collect();
        let service = table
            .configs
            .first()
            .map(|(c, _)| c.service.name.clone())
            .unwrap_or_default();
        self.metrics.set_configs(&service, &table.rollout_id, &ids);
        self.routes.store(Arc::new(table));
        self.metrics.config_swaps.inc();
    }
}

/// Connection facts the pipeline needs.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The address the connection was accepted on; recorded only when a header rule reads it
    /// ([`crate::header_rules::reads_local_address`]), as it costs a system call.
    pub local: Option<SocketAddr>,
    pub tls: bool,
}

/// One serving thread's pipeline: shared state + that thread's upstream pool.
#[derive(Clone)]
pub struct Pipeline {
    state: Arc<ProxyState>,
    forwarder: Forwarder,
}

impl Pipeline {
    pub fn new(state: Arc<ProxyState>, forwarder: Forwarder) -> Pipeline {
        Pipeline { state, forwarder }
    }

    pub fn state(&self) -> &Arc<ProxyState> {
        &self.state
    }

    /// Handles one request end to end, phase by phase (the list at the top of this module).
    /// Never fails: every outcome is a response.
    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<ProxyBody> {
        // 0. prepare.
        let Prepared {
            mut ctx,
            mut parts,
            body,
            target,
            cors_after_match,
        } = match self.prepare(req, conn) {
            Ok(p) => p,
            Err(resp) => return resp,
        };
        let st = &self.state;
        let settings = &st.settings;

        // 1. pick a config.
        let table = st.routes.load();
        let Some(config) = table.pick().cloned() else {
            let err = EspError::new(
                Code::Unavailable,
                "No service configuration is loaded",
                Cause::Internal,
            );
            return self.fail(err, &ctx, target);
        };
        drop(table);

        if !config.enabled && !settings.dialect.routes_every_request() {
            ctx.cors_origin = ctx.cors_origin.take().or(cors_after_match);
            // ESP declines: no matching, no check, no report; nginx proxies as is.
            if let Some(name) = &settings.operation_name_header {
                // No operation: nothing may claim one.
                parts.headers.remove(name);
            }
            let req = Request::from_parts(parts, body);
            return self.forward(req, &ctx, target, None, None).await;
        }

        // Traced or not: decided here, on the client's headers (crate::trace).
        if let Some(t) = &st.tracer {
            match t.begin(&parts.headers) {
                crate::trace::Started::Traced(r) => ctx.trace = Some(r),
                crate::trace::Started::Unsampled(id) => ctx.unsampled_trace = Some(id),
                crate::trace::Started::Off => {}
            }
            if let Some(r) = &ctx.trace {
                r.name_root(&config.service.name, None);
                if r.dialect() == crate::dialect::Dialect::EspV2 {
                    r.root_label("http.method", parts.method.to_string());
                    // The path only: a query can hold API keys.
                    r.root_label(
                        "http.url",
                        target.split('?').next().unwrap_or("").to_string(),
                    );
                }
            }
        }

        // The raw query, split off once for both the JWT and the API-key lookups.
        let query = target.split_once('?').map(|(_, q)| q);

        // 2. match.
        let (mi, routed) = match self.match_request(&config, &parts, &target) {
            Ok(m) => m,
            // ESPv2's CORS route answers it, as before any match: not reported.
            Err((err, _)) if err.kind == ErrorKind::CorsPreflightRefused => {
                return self.fail(err, &ctx, target);
            }
            Err((err, mut report)) => {
                report.api_key = self.unchecked_key(query, &parts.headers, None);
                return self.fail_matched(err, &ctx, target, report);
            }
        };
        if cors_after_match.is_some() {
            ctx.cors_origin = cors_after_match;
        }
        if let Some(r) = &ctx.trace {
            r.name_root(&config.service.name, Some(&mi.selector));
            // ESP fetches the metadata server's token first when it is missing or due
            // (`FetchAccessToken`); boxed, so its state is not part of every request's future.
            if r.dialect() == crate::dialect::Dialect::Esp {
                if let Some(m) = st
                    .control
                    .as_ref()
                    .and_then(|c| c.metadata_tokens())
                    .filter(|m| m.needs_fetch())
                {
                    Box::pin(crate::trace::fetch_access_token(r, &m)).await;
                }
            }
        }

        // 3. authenticate: the JWT, then the API key (ESP's `CheckAuth` span when traced).
        let auth = match crate::trace::auth_phase(
            ctx.trace.as_ref(),
            mi.auth.is_some(),
            self.authenticate(&parts, query, &mi, &config),
        )
        .await
        {
            Ok(a) => a,
            Err(e) => {
                let key = self.unchecked_key(query, &parts.headers, Some(&mi.api_key_locations));
                let report = self.report_info(&config, Some(&mi), key, &parts.headers);
                // HTTP/2's :authority, else Host (what Envoy calls the host).
                let host = parts
                    .uri
                    .authority()
                    .map(|a| a.as_str().as_bytes())
                    .or_else(|| parts.headers.get(http::header::HOST).map(|h| h.as_bytes()))
                    .unwrap_or_default();
                return self.refuse_auth(e, &ctx, target, report, host);
            }
        };
        // Later 401/403s say `invalid_token` only when a JWT was extracted for this request.
        ctx.jwt_present = auth.is_some();

        // API key: only for methods that need a consumer.
        let api_key = if mi.allow_unregistered_calls {
            None
        } else {
            extract_api_key(query, &parts.headers, &mi.api_key_locations).map(str::to_string)
        };

        // A method that needs a consumer already read its key; only one that does not is
        // read again, for ESPv2's report.
        let report_key = if mi.allow_unregistered_calls {
            self.unchecked_key(query, &parts.headers, Some(&mi.api_key_locations))
        } else {
            api_key.clone()
        };
        let mut report = self.report_info(&config, Some(&mi), report_key, &parts.headers);
        report.auth = auth;

        // 4. check + quota.
        if config.service_control && !mi.skip_service_control {
            if let Err(err) = self
                .check_and_quota(
                    &config,
                    &mi,
                    api_key.as_deref(),
                    &ctx,
                    &mut parts.headers,
                    &mut report,
                )
                .await
            {
                return self.fail_matched(err, &ctx, target, report);
            }
        }

        if let Some(a) = &report.auth {
            parts.headers.insert(
                settings.generated_headers.user_info.clone(),
                a.user_info.clone(),
            );
        }
        let unrouted_to_backend =
            settings.dialect.unrouted_methods_use_backend() && mi.backend_rule.is_none();
        if settings.enable_backend_routing
            && routed.is_none()
            && mi.local_backend.is_none()
            && !unrouted_to_backend
        {
            // ESP's `proxy_pass $backend_url` with no address for this method.
            let err = EspError::new(Code::Internal, "INTERNAL_SERVER_ERROR", Cause::Application);
            return self.fail_matched(err, &ctx, target, report);
        }
        // Backend authentication (`jwt_audience`): an ID token replaces the client's
        // Authorization. Boxed so the fetch's state is not part of every request's future.
        if let Some(audience) = mi
            .backend_rule
            .as_ref()
            .map(|r| r.jwt_audience.as_str())
            .filter(|a| !a.is_empty() && !settings.backend_auth_disabled())
        {
            let token = match &self.state.backend_tokens {
                Some(source) => match source.cached(audience) {
                    Some(h) => Ok(h),
                    None => match ctx.trace.as_ref().filter(|r| {
                        r.dialect() == crate::dialect::Dialect::Esp && source.from_metadata_server()
                    }) {
                        Some(r) => {
                            Box::pin(crate::trace::fetch_identity_token(r, source.get(audience)))
                                .await
                        }
                        None => Box::pin(source.get(audience)).await,
                    },
                },
                None => Err(crate::backend_auth::unavailable()),
            };
            match token {
                Ok(h) => crate::backend_auth::apply(&mut parts.headers, h),
                Err(err) => {
                    let err = err.with_kind(ErrorKind::BackendIdToken {
                        audience: audience.into(),
                    });
                    return self.fail_matched(err, &ctx, target, report);
                }
            }
        }
        if let Some(name) = &settings.operation_name_header {
            // Replaces any client copy (the default name is removed at `prepare` anyway).
            match HeaderValue::from_str(&mi.selector) {
                Ok(v) => {
                    parts.headers.insert(name, v);
                }
                Err(_) => {
                    parts.headers.remove(name);
                }
            }
        }
        // The Backend span, the parent of the context headers the backend gets.
        if let Some(r) = &ctx.trace {
            let name: std::borrow::Cow<'static, str> = match r.dialect() {
                crate::dialect::Dialect::Esp => "Backend".into(),
                crate::dialect::Dialect::EspV2 => {
                    let cluster = match &routed {
                        Some(t) => t.target.authority.clone(),
                        None => self
                            .forwarder
                            .backend_host()
                            .and_then(|h| h.to_str().ok().map(str::to_string))
                            .unwrap_or_default(),
                    };
                    format!("router backend-cluster-{cluster} egress").into()
                }
            };
            r.start_backend(name, &mut parts.headers);
        } else if let (Some(id), Some(t)) = (ctx.unsampled_trace, &st.tracer) {
            // ESPv2's router span of an untraced request: a new span ID, the flag off.
            t.write_outgoing(&id, crate::trace::new_span_id(), false, &mut parts.headers);
        }
        // 5. forward; 6. respond and 7. report follow from the backend's answer.
        // Calls a gRPC backend cannot take as they came are rewritten (`transcode.rs`); boxed,
        // so their state is not part of every request's future.
        if let Some(t) = Self::transcoding_for(
            &config.transcoder,
            &ctx,
            self.state.settings.dialect,
            &parts.method,
            &target,
        ) {
            return Box::pin(self.forward_transcoded(
                parts,
                body,
                &ctx,
                target,
                Some(report),
                routed,
                t,
            ))
            .await;
        }
        if config.transcoder.is_some() {
            if let Some(mode) = transcode::web_mode(self.state.settings.dialect, &parts.headers) {
                return Box::pin(self.forward_grpc_web(
                    parts,
                    body,
                    &ctx,
                    target,
                    Some(report),
                    routed,
                    mode,
                ))
                .await;
            }
        }
        let req = Request::from_parts(parts, body);
        self.forward(req, &ctx, target, Some(report), routed).await
    }

    /// The API key of a request no `:check` is made for (an unknown operation, a request
    /// refused before the check, a method that allows unregistered calls), for its report only,
    /// where the dialect reports such keys ([`crate::dialect::Dialect::reports_unchecked_api_keys`]):
    /// read from the method's locations, or ESP's defaults for an unknown operation. Keys too
    /// long to be one are not kept.
    fn unchecked_key(
        &self,
        query: Option<&str>,
        headers: &http::HeaderMap,
        locations: Option<&crate::auth::api_key::ApiKeyLocations>,
    ) -> Option<String> {
        if !self.state.settings.dialect.reports_unchecked_api_keys() {
            return None;
        }
        static DEFAULT: std::sync::LazyLock<crate::auth::api_key::ApiKeyLocations> =
            std::sync::LazyLock::new(crate::auth::api_key::ApiKeyLocations::esp_default);
        extract_api_key(query, headers, locations.unwrap_or(&DEFAULT))
            .filter(|k| k.len() <= crate::service_control::MAX_API_KEY_BYTES)
            .map(str::to_string)
    }
}
