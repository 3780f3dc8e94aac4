//! The request path, in ESP v1's order. [`Pipeline::handle`] is where one request goes through:
//!
//! 0. **settle the head** ([`crate::request_head::settle`]): the method (a valid
//!    `X-HTTP-Method-Override` replaces it), the headers (names with `_` and client copies of
//!    the proxy's own headers dropped), the path (normalised); 400/405 when refused;
//! 1. `--healthz` and `--cors_preset` preflights (nginx answered these before ESP ran);
//! 2. `--rewrite` on the normalised target;
//! 3. pick a config of the current rollout (weighted) — with neither Service Control nor auth
//!    configured, everything is proxied (ESP's access handler declines);
//! 4. **match** the settled method + the rewritten target (undecoded) → [`MethodInfo`]; no
//!    match is 404 code 5, or 403 code 7 for OPTIONS; the method and target matched are the
//!    ones forwarded;
//! 5. **authenticate**: the JWT stage ([`Pipeline::jwt_stage`]);
//! 6. API key ([`extract_api_key`], §2.4), 401 code 16 when the method needs a consumer and none
//!    was given;
//! 7. **check** with Service Control, then quota (never blocking);
//! 8. **forward** to `--backend`, or with `--enable_backend_routing` to the method's
//!    `backend.rules` address ([`crate::routing::BackendTarget`], [`crate::forward`]);
//! 9. **report** when the response body has been sent ([`ProxyBody`] drives the completion:
//!    metrics, access log, Service Control report).
//!
//! Errors generated here are [`EspError`]s rendered as ESP renders them; backend responses,
//! errors included, pass through untouched. Nothing on this path panics.

use crate::auth::AuthInfo;
use crate::error::{Cause, Code, EspError};
use crate::forward::{self, ForwardError, Forwarder, LimitedBody};
use crate::request_head;
use crate::routing::{ApiKeyLocations, ConfigRoutes, MethodInfo, RouteTable};
use crate::settings::Settings;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::borrow::Cow;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The header the JWT stage fills; client copies never reach the backend
/// ([`crate::request_head::sanitize_headers`]).
pub static X_ENDPOINT_API_USERINFO: HeaderName = HeaderName::from_static("x-endpoint-api-userinfo");
pub static X_ENDPOINT_API_PROJECT_ID: HeaderName =
    HeaderName::from_static("x-endpoint-api-project-id");
static X_ANDROID_PACKAGE: HeaderName = HeaderName::from_static("x-android-package");
static X_ANDROID_CERT: HeaderName = HeaderName::from_static("x-android-cert");
static X_IOS_BUNDLE: HeaderName = HeaderName::from_static("x-ios-bundle-identifier");

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
    healthz_path: Option<String>,
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
        ProxyState {
            settings,
            routes: ArcSwap::from_pointee(routes),
            control,
            metrics,
            access_log,
            healthz_path,
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

/// Armed while a request waits for its response head. If the client disconnects first, hyper
/// drops the request future and this records the request as nginx's 499 (client closed) in the
/// metrics and the access log.
pub struct AbortGuard {
    armed: Option<(Arc<ProxyState>, Instant, Method, http::Uri, IpAddr)>,
}

impl AbortGuard {
    pub fn new<B>(state: &Arc<ProxyState>, req: &Request<B>, conn: ConnInfo) -> AbortGuard {
        state.metrics.requests_in_flight.inc();
        // Logged with the method the request runs with (the override's), like every other line.
        let method = request_head::effective_method(req.method(), req.headers())
            .unwrap_or_else(|_| req.method().clone());
        AbortGuard {
            armed: Some((
                state.clone(),
                Instant::now(),
                method,
                req.uri().clone(),
                conn.peer.ip(),
            )),
        }
    }

    /// The response head is out; completion accounting takes over.
    pub fn disarm(mut self) {
        if let Some((state, ..)) = self.armed.take() {
            state.metrics.requests_in_flight.dec();
        }
    }
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        let Some((state, start, method, uri, peer)) = self.armed.take() else {
            return;
        };
        state.metrics.requests_in_flight.dec();
        let total = start.elapsed();
        state
            .metrics
            .observe_request(crate::metrics::method_label(&method), 499, total);
        if state.access_log.enabled() {
            let time = crate::access_log::now_rfc3339();
            let remote = peer.to_string();
            let url = uri.to_string();
            let uri = state.routes.load().secrets.redact(&url).into_owned();
            state.access_log.write(&crate::access_log::Entry {
                time: &time,
                remote_addr: &remote,
                method: method.as_str(),
                uri: &uri,
                protocol: "",
                status: 499,
                request_bytes: 0,
                response_bytes: 0,
                latency_ms: total.as_secs_f64() * 1e3,
                backend_latency_ms: None,
                api_method: "",
                config_id: "",
                user_agent: None,
                referer: None,
                error: Some("client closed the connection before the response"),
            });
        }
    }
}

/// Connection facts the pipeline needs.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// One serving thread's pipeline: shared state + that thread's upstream pool.
#[derive(Clone)]
pub struct Pipeline {
    state: Arc<ProxyState>,
    forwarder: Forwarder,
}

// ---------------------------------------------------------------------------------------------
// Response body with completion accounting.
// ---------------------------------------------------------------------------------------------

enum Kind {
    Empty,
    Full(Option<Bytes>),
    Stream(crate::upstream::UpstreamBody),
}

/// The response body: a proxy-generated one or the backend's, streamed. When it ends (or is
/// dropped, e.g. for HEAD or a client that went away) the request is accounted: metrics, access
/// log and the Service Control report.
pub struct ProxyBody {
    kind: Kind,
    sent: u64,
    done: Option<Box<Completion>>,
}

impl ProxyBody {
    pub fn empty() -> ProxyBody {
        ProxyBody {
            kind: Kind::Empty,
            sent: 0,
            done: None,
        }
    }

    pub fn full(b: impl Into<Bytes>) -> ProxyBody {
        ProxyBody {
            kind: Kind::Full(Some(b.into())),
            sent: 0,
            done: None,
        }
    }

    /// A backend response body, streamed.
    pub fn upstream(b: crate::upstream::UpstreamBody) -> ProxyBody {
        ProxyBody {
            kind: Kind::Stream(b),
            sent: 0,
            done: None,
        }
    }

    fn finish(&mut self) {
        if let Some(c) = self.done.take() {
            c.finish(self.sent);
        }
    }
}

impl Default for ProxyBody {
    fn default() -> Self {
        ProxyBody::empty()
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let res = match &mut this.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(s) => Pin::new(s).poll_frame(cx),
        };
        match &res {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.sent += d.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.finish(),
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(b) => b.is_none(),
            Kind::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream(s) => s.size_hint(),
        }
    }
}

/// What is known about a request once its response head is decided.
struct Completion {
    state: Arc<ProxyState>,
    start: Instant,
    method: Method,
    url: String,
    protocol: &'static str,
    version: Version,
    client_ip: IpAddr,
    caller_ip: IpAddr,
    status: u16,
    request_bytes: u64,
    /// The `Content-Length` counted in `request_bytes`, replaced by the bytes received when
    /// the body was read.
    declared_body: u64,
    body_counter: Option<Arc<AtomicU64>>,
    backend_latency: Option<Duration>,
    user_agent: Option<HeaderValue>,
    referer: Option<HeaderValue>,
    error: Option<EspError>,
    /// The backend speaks gRPC (`grpc://`).
    backend_grpc: bool,
    /// Report to Service Control (ESP-handled request on a config with SC).
    report: Option<ReportInfo>,
}

struct ReportInfo {
    config: Arc<ConfigRoutes>,
    method: Option<Arc<MethodInfo>>,
    api_key: Option<String>,
    check: Option<CheckOk>,
    check_network_failure: bool,
    auth: Option<AuthInfo>,
    request_headers: Vec<(String, String)>,
    response_headers: Vec<(String, String)>,
}

impl Completion {
    fn finish(mut self: Box<Self>, sent: u64) {
        let total = self.start.elapsed();
        if let Some(c) = &self.body_counter {
            let received = c.load(Ordering::Relaxed);
            if received != forward::BODY_UNREAD {
                self.request_bytes =
                    self.request_bytes.saturating_sub(self.declared_body) + received;
            }
        }
        let st = &self.state;
        st.metrics.observe_request(
            crate::metrics::method_label(&self.method),
            self.status,
            total,
        );
        if let Some(b) = self.backend_latency {
            st.metrics.backend_latency.observe(b.as_secs_f64());
        }
        let reporting = st.control.is_some()
            && self.report.as_ref().is_some_and(|r| {
                r.config.service_control
                    && !r.method.as_ref().is_some_and(|m| m.skip_service_control)
            });
        // Credentials in the URL (and in a referer or an error message quoting it) are masked
        // once, for the access log and the report alike, and only when either is written.
        let referer = if st.access_log.enabled() || reporting {
            let table = st.routes.load();
            let merged;
            let secrets = match &self.report {
                Some(r) if !table.secrets.covers(&r.config.secrets) => {
                    // The rollout changed under this request: its own config's names count too.
                    let mut m = (*table.secrets).clone();
                    m.extend(&r.config.secrets);
                    merged = m;
                    &merged
                }
                _ => &*table.secrets,
            };
            if let Cow::Owned(u) = secrets.redact(&self.url) {
                self.url = u;
            }
            if let Some(e) = self.error.as_mut() {
                if let Cow::Owned(m) = secrets.redact(&e.message) {
                    e.message = m;
                }
            }
            self.referer
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .map(|r| secrets.redact(r).into_owned())
        } else {
            None
        };
        if st.access_log.enabled() {
            let time = crate::access_log::now_rfc3339();
            let remote = self.client_ip.to_string();
            let uri = self.url.as_str();
            let (api_method, config_id) = match &self.report {
                Some(r) => (
                    r.method.as_ref().map_or("", |m| m.selector.as_str()),
                    r.config.config_id.as_str(),
                ),
                None => ("", ""),
            };
            st.access_log.write(&crate::access_log::Entry {
                time: &time,
                remote_addr: &remote,
                method: self.method.as_str(),
                uri,
                protocol: match self.version {
                    Version::HTTP_2 => "HTTP/2.0",
                    Version::HTTP_10 => "HTTP/1.0",
                    _ => "HTTP/1.1",
                },
                status: self.status,
                request_bytes: self.request_bytes,
                response_bytes: sent,
                latency_ms: total.as_secs_f64() * 1e3,
                backend_latency_ms: self.backend_latency.map(|d| d.as_secs_f64() * 1e3),
                api_method,
                config_id,
                user_agent: self.user_agent.as_ref().and_then(|v| v.to_str().ok()),
                referer: referer.as_deref(),
                error: self.error.as_ref().map(|e| e.message.as_str()),
            });
        }
        let Some(r) = self.report else { return };
        let Some(control) = &st.control else { return };
        if !r.config.service_control {
            // An auth-only config: ESP has no Service Control to report to.
            return;
        }
        if r.method.as_ref().is_some_and(|m| m.skip_service_control) {
            return;
        }
        let (api_name, api_version) = r
            .method
            .as_ref()
            .map(|m| (m.api_name.clone(), m.api_version.clone()))
            .unwrap_or_default();
        let status_code = self.error.as_ref().map(|e| e.code);
        let backend_protocol =
            (self.backend_grpc && self.protocol != "grpc").then(|| "grpc".to_string());
        control.report(RequestRecord {
            service_name: r.config.service.name.clone(),
            service_config_id: r.config.config_id.clone(),
            producer_project_id: r.config.service.producer_project_id.clone(),
            operation_name: r.method.as_ref().map(|m| m.selector.clone()),
            api_name,
            api_version,
            api_key: r.api_key,
            api_key_valid: r.check.as_ref().is_some_and(|c| c.api_key_valid),
            consumer_project_number: r.check.as_ref().and_then(|c| c.consumer_project_number),
            check_network_failure: r.check_network_failure
                || r.check.as_ref().is_some_and(|c| c.network_failure),
            credential_id: r.auth.as_ref().map(|a| a.credential_id.clone()),
            http_method: self.method.as_str().to_string(),
            url: self.url,
            response_code: self.status,
            status_code,
            request_size: self.request_bytes,
            response_size: sent,
            total_latency: total,
            backend_latency: self.backend_latency,
            overhead_latency: total.saturating_sub(self.backend_latency.unwrap_or_default()),
            caller_ip: Some(self.caller_ip),
            referer,
            error_cause: self.error.as_ref().map(|e| e.cause.as_str().to_string()),
            error_message: self.error.map(|e| e.message),
            protocol: self.protocol.to_string(),
            backend_protocol,
            request_headers: r.request_headers,
            response_headers: r.response_headers,
            jwt_payloads: r.auth.map(|a| a.jwt_payloads).filter(|p| !p.is_empty()),
            start_time: None,
        });
    }
}

// ---------------------------------------------------------------------------------------------
// API keys, rewrite, responses.
// ---------------------------------------------------------------------------------------------

/// The query string's value for `name` as nginx's `ngx_http_arg` finds it: first occurrence,
/// name compared case-insensitively, value raw (still percent-encoded).
fn query_arg<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k.eq_ignore_ascii_case(name) {
            return Some(v);
        }
    }
    None
}

/// ESP's API-key lookup (§2.4): every configured query parameter in order, then every header;
/// an empty value counts as absent.
pub fn extract_api_key<'a>(
    query: Option<&'a str>,
    headers: &'a HeaderMap,
    loc: &ApiKeyLocations,
) -> Option<&'a str> {
    if let Some(q) = query {
        for name in &loc.query {
            if let Some(v) = query_arg(q, name).filter(|v| !v.is_empty()) {
                return Some(v);
            }
        }
    }
    for h in &loc.headers {
        if let Some(v) = headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
        {
            return Some(v);
        }
    }
    None
}

/// Approximate size of the request line and headers as sent on HTTP/1.1.
fn request_head_size<B>(req: &Request<B>) -> u64 {
    let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    (line + headers + 2) as u64
}

/// Applies `--rewrite` rules to the raw target; the first matching rule wins.
pub fn rewrite<'a>(rules: &[crate::settings::RewriteRule], target: &'a str) -> Cow<'a, str> {
    for r in rules {
        if let Some(caps) = r.pattern.captures(target) {
            let mut out = String::new();
            caps.expand(&r.replacement, &mut out);
            return Cow::Owned(out);
        }
    }
    Cow::Borrowed(target)
}

/// A proxy error for this request: ESP's JSON, or for gRPC clients a trailers-only response
/// carrying `grpc-status`/`grpc-message` (ESP's `grpc_finish`).
fn proxy_error(err: &EspError, ctx: &Ctx, jwt_present: bool) -> Response<ProxyBody> {
    if ctx.content_type_grpc {
        grpc_error_response(err)
    } else {
        error_response(err, ctx.head, jwt_present)
    }
}

/// gRPC's percent-encoding for `grpc-message`: controls, non-ASCII and `%`.
const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// A proxy error as a gRPC trailers-only response: HTTP 200, the status in the headers.
pub fn grpc_error_response(err: &EspError) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::empty());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    if let Ok(v) = HeaderValue::from_str(&err.code.to_string()) {
        h.insert("grpc-status", v);
    }
    let msg = percent_encoding::utf8_percent_encode(&err.message, GRPC_MESSAGE).to_string();
    if let Ok(v) = HeaderValue::from_str(&msg) {
        h.insert("grpc-message", v);
    }
    resp
}

/// An ESP error as an HTTP response: JSON body (none for HEAD), `Content-Type`, and
/// `WWW-Authenticate` on 401/403.
pub fn error_response(err: &EspError, head: bool, jwt_present: bool) -> Response<ProxyBody> {
    let body = if head {
        ProxyBody::empty()
    } else {
        ProxyBody::full(err.body())
    };
    let mut resp = Response::new(body);
    *resp.status_mut() =
        StatusCode::from_u16(err.http_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if err.http_status == 401 || err.http_status == 403 {
        h.insert(
            header::WWW_AUTHENTICATE,
            if jwt_present {
                HeaderValue::from_static("Bearer, error=\"invalid_token\"")
            } else {
                HeaderValue::from_static("Bearer")
            },
        );
    }
    resp
}

fn header_str<'a>(h: &'a HeaderMap, n: &HeaderName) -> Option<&'a str> {
    h.get(n).and_then(|v| v.to_str().ok())
}

fn logged_headers(names: &[String], h: &HeaderMap) -> Vec<(String, String)> {
    names
        .iter()
        .filter_map(|n| {
            h.get(n.as_str())
                .and_then(|v| v.to_str().ok())
                .map(|v| (n.clone(), v.to_string()))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The pipeline.
// ---------------------------------------------------------------------------------------------

pin_project_lite::pin_project! {
    /// [`Pipeline::forward`]'s future.
    struct Forwarding<'a, F> {
        #[pin]
        stage: Stage<F>,
        pipeline: &'a Pipeline,
        ctx: &'a Ctx,
        target: String,
        report: Option<ReportInfo>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        sent_at: Instant,
    }
}

pin_project_lite::pin_project! {
    #[project = StageProj]
    enum Stage<F> {
        /// Waiting for the backend's response head.
        Sending { #[pin] send: forward::SendWithin<F> },
        /// Answered before anything was sent (or already returned: `None`).
        Answered { resp: Option<Response<ProxyBody>> },
    }
}

impl<'a, F> Forwarding<'a, F> {
    fn answered(pipeline: &'a Pipeline, ctx: &'a Ctx, resp: Response<ProxyBody>) -> Self {
        Forwarding {
            stage: Stage::Answered { resp: Some(resp) },
            pipeline,
            ctx,
            target: String::new(),
            report: None,
            client_upgrade: None,
            sent_at: Instant::now(),
        }
    }
}

impl<F: Future<Output = forward::Sent>> Future for Forwarding<'_, F> {
    type Output = Response<ProxyBody>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<ProxyBody>> {
        let mut this = self.project();
        let sent = match this.stage.as_mut().project() {
            StageProj::Sending { send } => match send.poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(sent) => sent,
            },
            StageProj::Answered { resp } => {
                return Poll::Ready(resp.take().unwrap_or_else(|| {
                    // Polled after completion, which hyper never does: an empty 500 rather
                    // than a panic on the request path.
                    let mut r = Response::new(ProxyBody::empty());
                    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    r
                }));
            }
        };
        // The backend call is done; its state goes now rather than with the connection's slot.
        this.stage.set(Stage::Answered { resp: None });
        Poll::Ready(this.pipeline.forwarded(
            sent,
            this.ctx,
            std::mem::take(this.target),
            this.report.take(),
            this.client_upgrade.take(),
            *this.sent_at,
        ))
    }
}

/// A request's backend under `--enable_backend_routing`.
struct Routed {
    target: Arc<crate::routing::BackendTarget>,
    /// Path and query sent upstream.
    upstream_target: String,
}

/// A request past [`Pipeline::prepare`]: its facts, its settled head and body, and the target
/// to match and forward (normalised, `--rewrite` applied).
struct Prepared {
    ctx: Ctx,
    parts: http::request::Parts,
    body: Incoming,
    target: String,
}

/// Per-request facts gathered before the outcome is known.
struct Ctx {
    start: Instant,
    method: Method,
    version: Version,
    head: bool,
    client_ip: IpAddr,
    caller_ip: IpAddr,
    tls: bool,
    cors_origin: Option<HeaderValue>,
    jwt_present: bool,
    /// `Content-Length` of the request body (0 when absent).
    request_bytes: u64,
    /// Request line + headers, for the report's request size.
    request_head_bytes: u64,
    /// Counts the body's bytes as they are received ([`forward::BODY_UNREAD`] until the body
    /// is forwarded): a client that leaves mid-body is logged with what it sent, not with its
    /// `Content-Length`.
    body_counter: Option<Arc<AtomicU64>>,
    user_agent: Option<HeaderValue>,
    referer: Option<HeaderValue>,
    /// `Content-Type: application/grpc*`: reported with protocol `grpc`.
    content_type_grpc: bool,
}

impl Pipeline {
    pub fn new(state: Arc<ProxyState>, forwarder: Forwarder) -> Pipeline {
        Pipeline { state, forwarder }
    }

    pub fn state(&self) -> &Arc<ProxyState> {
        &self.state
    }

    /// Everything before the config is picked: the head settled, health checks, preflights,
    /// the body limit, `--rewrite`. A plain function, so none of its locals take room in the
    /// request future (its size is memory per connection, docs/performance.md). `Err` is the
    /// response when the request ends here.
    // The `Err` is the response itself, moved out once; boxing it would allocate per request.
    #[allow(clippy::result_large_err)]
    fn prepare(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Result<Prepared, Response<ProxyBody>> {
        let st = &self.state;
        let settings = &st.settings;
        let request_head_bytes = request_head_size(&req);
        // Measured on the head as the client sent it, before any header is dropped.
        let head_error = crate::limits::head_line_error(&req, &settings.header_limits);
        let (mut parts, body) = req.into_parts();
        // The head is settled before anything reads it: the method and the path matched below
        // are the ones forwarded, and dropped headers are seen by nothing (crate::request_head).
        let raw_target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let framing = request_head::Framing {
            version: parts.version,
            has_authority: parts.uri.authority().is_some(),
        };
        let settled = request_head::settle(
            &parts.method,
            framing,
            &mut parts.headers,
            raw_target,
            settings.head,
        );
        let h = &parts.headers;
        let client_ip = forward::real_client_ip(conn.peer.ip(), h, &settings.xff_trusted);
        let caller_ip = settings
            .client_ip_header
            .as_deref()
            .and_then(|name| forward::ip_from_header(h, name, settings.client_ip_position))
            .unwrap_or(client_ip);
        let cors_origin = settings.cors.as_ref().and_then(|c| c.allowed_origin(h));
        let ctx = Ctx {
            start: Instant::now(),
            method: match &settled {
                Ok(s) => s.method.clone(),
                Err(e) => e.method().unwrap_or(&parts.method).clone(),
            },
            version: parts.version,
            // What the client's connection expects, whatever method is forwarded.
            head: parts.method == Method::HEAD,
            client_ip,
            caller_ip,
            tls: conn.tls,
            jwt_present: false,
            request_bytes: h
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            request_head_bytes,
            body_counter: (!body.is_end_stream())
                .then(|| Arc::new(AtomicU64::new(forward::BODY_UNREAD))),
            user_agent: h.get(header::USER_AGENT).cloned(),
            content_type_grpc: h
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")),
            referer: h.get(header::REFERER).cloned(),
            cors_origin,
        };

        // nginx refuses an over-long request or header line before anything else runs.
        if let Some(err) = head_error {
            let url = raw_target.to_string();
            return Err(self.fail(err, &ctx, url));
        }
        let settled = match settled {
            Ok(s) => s,
            Err(e) => {
                let err = e.esp_error();
                let resp = proxy_error(&err, &ctx, false);
                let url = raw_target.to_string();
                return Err(self.refuse(resp, Some(err), &ctx, url, &parts.headers));
            }
        };
        if settled.target.unescaped_slashes {
            // --disallow_escaped_slashes_in_path (ESPv2): the client asks again for the decoded
            // path, which is then checked like any other; gRPC clients cannot follow redirects.
            let url = raw_target.to_string();
            let location =
                HeaderValue::from_str(&request_head::redirect_target(&settled.target.text));
            return Err(match location {
                Ok(loc) if !ctx.content_type_grpc => {
                    let mut resp = Response::new(ProxyBody::empty());
                    *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                    resp.headers_mut().insert(header::LOCATION, loc);
                    self.refuse(resp, None, &ctx, url, &parts.headers)
                }
                _ => {
                    let err = EspError::new(
                        Code::InvalidArgument,
                        "The request path holds an escaped slash or backslash (%2F, %5C).",
                        Cause::Internal,
                    );
                    let resp = proxy_error(&err, &ctx, false);
                    self.refuse(resp, Some(err), &ctx, url, &parts.headers)
                }
            });
        }
        parts.method = settled.method;
        let normalized: &str = &settled.target.text;

        // nginx's exact-match health location and CORS preflight run before ESP.
        if st.healthz_path.as_deref() == Some(request_head::path_of(normalized)) {
            let resp = Response::new(ProxyBody::empty());
            return Err(self.finalize(resp, &ctx, normalized.to_string(), None, None, None));
        }
        if let (Some(cors), Some(origin)) = (&settings.cors, &ctx.cors_origin) {
            if ctx.method == Method::OPTIONS {
                let resp: Response<ProxyBody> = cors.preflight(origin.clone());
                return Err(self.finalize_plain(resp, &ctx, normalized.to_string(), None));
            }
        }
        if settings.client_max_body_size > 0 && ctx.request_bytes > settings.client_max_body_size {
            let err = EspError::payload_too_large();
            let url = normalized.to_string();
            return Err(self.fail(err, &ctx, url));
        }

        let target = rewrite(&settings.rewrites, normalized).into_owned();
        Ok(Prepared {
            ctx,
            parts,
            body,
            target,
        })
    }

    /// Handles one request end to end. Never fails: every outcome is a response.
    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<ProxyBody> {
        let Prepared {
            mut ctx,
            mut parts,
            body,
            target,
        } = match self.prepare(req, conn) {
            Ok(p) => p,
            Err(resp) => return resp,
        };
        let st = &self.state;
        let settings = &st.settings;

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

        if !config.enabled {
            // ESP declines: no matching, no check, no report; nginx proxies as is.
            let req = Request::from_parts(parts, body);
            return self.forward(req, &ctx, target, None, None).await;
        }

        let match_method = parts.method.as_str();
        let matched = config.matcher.matched(match_method, &target);
        if let Some(m) = &matched {
            if settings.head.path.normalize
                && !self.same_method_without_parameters(&config, match_method, &target, m.value())
            {
                let err = EspError::new(
                    Code::InvalidArgument,
                    "The request path's \";\" parameters change which API method it names.",
                    Cause::Internal,
                );
                let report = self.report_info(&config, None, None, &parts.headers);
                return self.finalize(
                    proxy_error(&err, &ctx, false),
                    &ctx,
                    target,
                    Some(err),
                    Some(report),
                    None,
                );
            }
        }
        let Some(mi) = matched.as_ref().map(|m| m.value().clone()) else {
            let err = if match_method == "OPTIONS" {
                EspError::cors_not_allowed()
            } else {
                EspError::method_does_not_exist()
            };
            let report = self.report_info(&config, None, None, &parts.headers);
            return self.finalize(
                proxy_error(&err, &ctx, ctx.jwt_present),
                &ctx,
                target,
                Some(err),
                Some(report),
                None,
            );
        };

        // Backend routing: resolved now (bindings come from the match), applied when forwarding.
        let routed = if settings.enable_backend_routing {
            mi.backend.as_ref().map(|b| {
                let bindings = match b.translation {
                    crate::routing::PathTranslation::ConstantAddress => {
                        matched.as_ref().map(|m| m.bindings()).unwrap_or_default()
                    }
                    crate::routing::PathTranslation::AppendPathToAddress => Vec::new(),
                };
                Routed {
                    target: b.clone(),
                    upstream_target: b.upstream_target(
                        &config.service,
                        &mi.selector,
                        &target,
                        &bindings,
                        &mi.api_key_locations.query,
                    ),
                }
            })
        } else {
            None
        };

        // The raw query, split off once for both the JWT and the API-key lookups.
        let query = target.split_once('?').map(|(_, q)| q);

        // JWT.
        let auth = match self.jwt_stage(&parts, query, &mi, &config).await {
            Ok(a) => a,
            Err(e) => {
                let report = self.report_info(&config, Some(&mi), None, &parts.headers);
                let mut resp = proxy_error(&e.error, &ctx, e.token_present);
                // --enable_jwt_authorization_url_redirect: ESP keeps the JSON body and turns
                // the status into a redirect (missing or expired token only; see AuthError).
                if self.state.settings.enable_jwt_authorization_url_redirect
                    && !ctx.content_type_grpc
                {
                    if let Some(loc) = e
                        .authorization_url
                        .as_deref()
                        .and_then(|u| HeaderValue::from_str(u).ok())
                    {
                        *resp.status_mut() = StatusCode::FOUND;
                        resp.headers_mut().insert(header::LOCATION, loc);
                    }
                }
                return self.finalize(resp, &ctx, target, Some(e.error), Some(report), None);
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

        let mut report = self.report_info(&config, Some(&mi), api_key.clone(), &parts.headers);
        report.auth = auth;

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
                return self.finalize(
                    proxy_error(&err, &ctx, ctx.jwt_present),
                    &ctx,
                    target,
                    Some(err),
                    Some(report),
                    None,
                );
            }
        }

        if let Some(a) = &report.auth {
            parts
                .headers
                .insert(&X_ENDPOINT_API_USERINFO, a.user_info.clone());
        }
        if settings.enable_backend_routing && routed.is_none() {
            // ESP's `proxy_pass $backend_url` with no address for this method.
            let err = EspError::new(Code::Internal, "INTERNAL_SERVER_ERROR", Cause::Application);
            return self.finalize(
                proxy_error(&err, &ctx, ctx.jwt_present),
                &ctx,
                target,
                Some(err),
                Some(report),
                None,
            );
        }
        let req = Request::from_parts(parts, body);
        self.forward(req, &ctx, target, Some(report), routed).await
    }

    /// ESP's `CheckServiceControl` + `QuotaControl` for a matched method on a config with
    /// Service Control: no key → 401 unless unregistered calls are allowed; a key → `:check`
    /// (through the client's cache); then quota when the method has metric costs.
    async fn check_and_quota(
        &self,
        config: &ConfigRoutes,
        mi: &MethodInfo,
        api_key: Option<&str>,
        ctx: &Ctx,
        headers: &mut HeaderMap,
        report: &mut ReportInfo,
    ) -> Result<(), EspError> {
        if api_key.is_none() && !mi.allow_unregistered_calls {
            return Err(EspError::unregistered_caller());
        }
        if api_key.is_some_and(|k| k.len() > crate::service_control::MAX_API_KEY_BYTES) {
            // No key is this long: answered as invalid before any cache or `:check`, and kept
            // out of the report (whose aggregates are keyed by it).
            report.api_key = None;
            return Err(crate::service_control::invalid_api_key());
        }
        let Some(control) = &self.state.control else {
            return Err(EspError::new(
                Code::Unavailable,
                "Service Control is configured for this service but the proxy has no Service Control client",
                Cause::ServiceControl,
            ));
        };
        if let Some(key) = api_key {
            let input = CheckInput {
                service_name: &config.service.name,
                service_config_id: &config.config_id,
                operation_name: &mi.selector,
                api_key: key,
                caller_ip: ctx.caller_ip,
                referer: header_str(headers, &header::REFERER),
                android_package: header_str(headers, &X_ANDROID_PACKAGE),
                android_cert: header_str(headers, &X_ANDROID_CERT),
                ios_bundle: header_str(headers, &X_IOS_BUNDLE),
            };
            match control.check(input).await {
                Ok(ok) => {
                    if let Some(n) = ok.consumer_project_number.filter(|n| *n > 0) {
                        if let Ok(v) = HeaderValue::from_str(&n.to_string()) {
                            headers.insert(&X_ENDPOINT_API_PROJECT_ID, v);
                        }
                    }
                    report.check = Some(ok);
                }
                Err(err) => {
                    report.check_network_failure = err.code == Code::Unavailable.as_i32();
                    return Err(err);
                }
            }
        }
        if !mi.metric_costs.is_empty() {
            control.allocate_quota(QuotaInput {
                service_name: &config.service.name,
                service_config_id: &config.config_id,
                method_name: &mi.selector,
                api_key: api_key.unwrap_or(""),
                producer_project_id: &config.service.producer_project_id,
                caller_ip: ctx.caller_ip,
                referer: header_str(headers, &header::REFERER),
                metric_costs: &mi.metric_costs,
            })?;
        }
        Ok(())
    }

    /// The JWT stage: `Ok(None)` when the method needs no JWT; on failure the error and whether
    /// a token was present (for `WWW-Authenticate`).
    async fn jwt_stage(
        &self,
        parts: &http::request::Parts,
        query: Option<&str>,
        mi: &MethodInfo,
        config: &ConfigRoutes,
    ) -> Result<Option<AuthInfo>, crate::auth::AuthError> {
        if mi.auth.is_none() {
            return Ok(None);
        }
        let Some(authn) = &config.authenticator else {
            return Err(crate::auth::AuthError {
                error: EspError::new(
                    Code::Internal,
                    "JWT authentication is required by this method but not configured",
                    Cause::Auth,
                ),
                token_present: false,
                authorization_url: None,
            });
        };
        authn
            .authenticate(&mi.selector, &parts.headers, query)
            .await
    }

    /// Answers a request refused (or redirected) for its head, before matching: counted,
    /// logged and reported like an unmatched request, never forwarded.
    fn refuse(
        &self,
        resp: Response<ProxyBody>,
        err: Option<EspError>,
        ctx: &Ctx,
        url: String,
        headers: &HeaderMap,
    ) -> Response<ProxyBody> {
        let report = self
            .state
            .routes
            .load()
            .pick()
            .filter(|c| c.enabled)
            .map(|c| self.report_info(c, None, None, headers));
        self.finalize(resp, ctx, url, err, report, None)
    }

    /// A path with `;` parameters must name the same method without them: servlet containers
    /// drop them before routing, so `/secret;x` (matched by `x-google-allow: all`'s `/**`)
    /// would run `/secret` unchecked. Only paths holding `;` pay for the second lookup.
    fn same_method_without_parameters(
        &self,
        config: &ConfigRoutes,
        method: &str,
        target: &str,
        matched: &Arc<MethodInfo>,
    ) -> bool {
        let path = request_head::path_of(target);
        if !path.contains(';') {
            return true;
        }
        // Compared as the servlet container routes it: stripped, then merged and resolved
        // (`/items;x//1` is `/items/1` to it even with --disable_merge_slashes_in_path).
        let Some(stripped) = request_head::servlet_path(path) else {
            return false;
        };
        config
            .matcher
            .lookup(method, &stripped)
            .is_some_and(|other| Arc::ptr_eq(other, matched))
    }

    fn report_info(
        &self,
        config: &Arc<ConfigRoutes>,
        method: Option<&Arc<MethodInfo>>,
        api_key: Option<String>,
        headers: &HeaderMap,
    ) -> ReportInfo {
        ReportInfo {
            config: config.clone(),
            method: method.cloned(),
            api_key,
            check: None,
            check_network_failure: false,
            auth: None,
            request_headers: logged_headers(&self.state.settings.log_request_headers, headers),
            response_headers: Vec::new(),
        }
    }

    /// The forward stage: rewrites the request for the backend and returns the future that
    /// sends it and turns the backend's answer into the client's response.
    ///
    /// A plain function returning a hand-written future rather than an `async fn`: hyper keeps
    /// every connection's request future in one heap slot, as large as the largest state of
    /// [`Pipeline::handle`], which is this one. An `async fn` would hold its arguments and the
    /// request's parts twice (as arguments and as locals) next to the backend call; this holds
    /// them once.
    fn forward<'a>(
        &'a self,
        req: Request<Incoming>,
        ctx: &'a Ctx,
        target: String,
        report: Option<ReportInfo>,
        routed: Option<Routed>,
    ) -> Forwarding<'a, impl Future<Output = forward::Sent>> {
        let settings = &self.state.settings;
        let (mut parts, body) = req.into_parts();
        let websocket = settings.enable_websocket && parts.headers.contains_key(header::UPGRADE);
        // With backend routing the method's rule picks the client, target, Host and deadline.
        let (forwarder, upstream_target, deadline) = match &routed {
            Some(r) => (
                &r.target.forwarder,
                r.upstream_target.as_str(),
                r.target.deadline,
            ),
            None => (&self.forwarder, target.as_str(), None),
        };
        let grpc = forwarder.version() == Version::HTTP_2;
        let host = match (&routed, &settings.backend_host_header) {
            (Some(r), _) => Some(r.target.host.clone()),
            (None, Some(h)) => Some(h.clone()),
            // ESP sends nginx's `$host`, empty for an HTTP/1.0 request without `Host`, and nginx
            // then omits the header: an HTTP/1.1 request many backends reject. The backend's
            // own name is what nginx sends by default (`$proxy_host`).
            (None, None) => forward::client_host(&parts.uri, &parts.headers)
                .or_else(|| forwarder.backend_host()),
        };
        forward::strip_hop_by_hop(&mut parts.headers, websocket, grpc);
        forward::set_forwarding_headers(&mut parts.headers, ctx.client_ip, host);
        if websocket {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let uri = match forwarder.upstream_uri(upstream_target) {
            Ok(u) => u,
            Err(e) => {
                let err = EspError::new(Code::InvalidArgument, e.to_string(), Cause::Internal);
                let resp = self.finalize(
                    proxy_error(&err, ctx, ctx.jwt_present),
                    ctx,
                    target,
                    Some(err),
                    report,
                    None,
                );
                return Forwarding::answered(self, ctx, resp);
            }
        };
        let client_upgrade = if websocket {
            // Taken from the client request before it is rebuilt for the backend.
            let mut tmp = Request::new(());
            *tmp.extensions_mut() = std::mem::take(&mut parts.extensions);
            Some(hyper::upgrade::on(&mut tmp))
        } else {
            None
        };
        parts.uri = uri;
        parts.version = forwarder.version();
        let upstream_req = Request::from_parts(
            parts,
            LimitedBody::new(body, settings.client_max_body_size)
                .with_counter(ctx.body_counter.clone())
                .with_body_timeout(settings.client_body_timeout)
                .with_buffer(
                    // Streaming RPCs and tunnels must not wait for a buffer to fill.
                    if websocket || ctx.content_type_grpc {
                        0
                    } else {
                        settings.client_body_buffer_size
                    },
                    settings.client_body_min_rate,
                ),
        );
        let send = forwarder.send_within(upstream_req, deadline);
        Forwarding {
            stage: Stage::Sending { send },
            pipeline: self,
            ctx,
            target,
            report,
            client_upgrade,
            sent_at: Instant::now(),
        }
    }

    /// The backend answered (or could not be reached): the client's response.
    fn forwarded(
        &self,
        sent: forward::Sent,
        ctx: &Ctx,
        target: String,
        report: Option<ReportInfo>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        sent_at: Instant,
    ) -> Response<ProxyBody> {
        match sent {
            Ok(mut resp) => {
                let backend_latency = sent_at.elapsed();
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client_up) = client_upgrade {
                        let backend_up = hyper::upgrade::on(&mut resp);
                        tokio::spawn(async move {
                            match tokio::try_join!(client_up, backend_up) {
                                Ok((c, b)) => {
                                    let mut c = hyper_util::rt::TokioIo::new(c);
                                    let mut b = hyper_util::rt::TokioIo::new(b);
                                    if let Err(e) =
                                        tokio::io::copy_bidirectional(&mut c, &mut b).await
                                    {
                                        tracing::debug!(error = %e, "websocket tunnel closed");
                                    }
                                }
                                Err(e) => tracing::warn!(error = %e, "websocket upgrade failed"),
                            }
                        });
                        let (mut rp, _) = resp.into_parts();
                        rp.headers
                            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                        let resp = Response::from_parts(rp, ProxyBody::empty());
                        return self.finalize(
                            resp,
                            ctx,
                            target,
                            None,
                            report,
                            Some(backend_latency),
                        );
                    }
                }
                let (mut rp, body) = resp.into_parts();
                forward::strip_hop_by_hop(&mut rp.headers, false, false);
                let body = if ctx.method == Method::HEAD && !ctx.head {
                    // An override made this request a HEAD: the backend sent no body, and the
                    // client, which sent another method, must not wait for one.
                    rp.headers.remove(header::CONTENT_LENGTH);
                    ProxyBody::empty()
                } else {
                    ProxyBody::upstream(body)
                };
                let resp = Response::from_parts(rp, body);
                self.finalize(resp, ctx, target, None, report, Some(backend_latency))
            }
            Err(ForwardError::ClientBody(c)) => {
                // The client's own failure: answered (when it can still hear) and logged as
                // such; a client that left mid-body is 499 and, as its backend never got the
                // whole request, not reported.
                let err = c.esp_error();
                tracing::debug!(error = %c, status = err.http_status, "client request failed");
                let report = report.filter(|_| c != forward::ClientBodyError::Closed);
                self.finalize(
                    proxy_error(&err, ctx, ctx.jwt_present),
                    ctx,
                    target,
                    Some(err),
                    report,
                    None,
                )
            }
            Err(e) => {
                let err = match &e {
                    ForwardError::Connect(_) | ForwardError::Other(_) => EspError::bad_gateway(),
                    ForwardError::Timeout(_) => EspError::gateway_timeout(),
                    ForwardError::BodyTooLarge(_) => EspError::payload_too_large(),
                    ForwardError::ClientBody(c) => c.esp_error(),
                };
                tracing::warn!(error = %e, status = err.http_status, "backend request failed");
                self.finalize(
                    proxy_error(&err, ctx, ctx.jwt_present),
                    ctx,
                    target,
                    Some(err),
                    report,
                    None,
                )
            }
        }
    }

    /// Adds the always-on response headers (CORS preset, HSTS) and arms the completion.
    fn finalize(
        &self,
        mut resp: Response<ProxyBody>,
        ctx: &Ctx,
        url: String,
        error: Option<EspError>,
        report: Option<ReportInfo>,
        backend_latency: Option<Duration>,
    ) -> Response<ProxyBody> {
        let settings = &self.state.settings;
        if let (Some(cors), Some(origin)) = (&settings.cors, &ctx.cors_origin) {
            cors.decorate(origin.clone(), resp.headers_mut());
        }
        if settings.hsts {
            crate::cors::add_hsts(resp.headers_mut());
        }
        let report = report.map(|mut r| {
            r.response_headers = logged_headers(&settings.log_response_headers, resp.headers());
            r
        });
        self.arm(resp, ctx, url, error, report, backend_latency)
    }

    /// A proxy-generated error before any method was matched: ESP's body, logged, not reported.
    fn fail(&self, err: EspError, ctx: &Ctx, url: String) -> Response<ProxyBody> {
        self.finalize(
            proxy_error(&err, ctx, false),
            ctx,
            url,
            Some(err),
            None,
            None,
        )
    }

    /// Like `finalize` without decorations (the preflight carries its own headers).
    fn finalize_plain(
        &self,
        resp: Response<ProxyBody>,
        ctx: &Ctx,
        url: String,
        error: Option<EspError>,
    ) -> Response<ProxyBody> {
        self.arm(resp, ctx, url, error, None, None)
    }

    fn arm(
        &self,
        mut resp: Response<ProxyBody>,
        ctx: &Ctx,
        url: String,
        error: Option<EspError>,
        report: Option<ReportInfo>,
        backend_latency: Option<Duration>,
    ) -> Response<ProxyBody> {
        let status = resp.status().as_u16();
        let backend_grpc = self.forwarder.version() == Version::HTTP_2;
        let is_grpc_request = ctx.content_type_grpc;
        let protocol = if is_grpc_request {
            "grpc"
        } else if ctx.tls {
            "https"
        } else {
            "http"
        };
        resp.body_mut().done = Some(Box::new(Completion {
            state: self.state.clone(),
            start: ctx.start,
            method: ctx.method.clone(),
            url,
            protocol,
            version: ctx.version,
            client_ip: ctx.client_ip,
            caller_ip: ctx.caller_ip,
            status,
            request_bytes: ctx.request_head_bytes + ctx.request_bytes,
            declared_body: ctx.request_bytes,
            body_counter: ctx.body_counter.clone(),
            backend_latency,
            user_agent: ctx.user_agent.clone(),
            referer: ctx.referer.clone(),
            error,
            backend_grpc,
            report,
        }));
        if ctx.head {
            // A HEAD answer never carries a body, whoever produced it.
            let done = resp.body_mut().done.take();
            *resp.body_mut() = ProxyBody {
                kind: Kind::Empty,
                sent: 0,
                done,
            };
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn default_order_key_then_api_key_then_header() {
        let d = ApiKeyLocations::esp_default();
        let h = hm(&[("x-api-key", "H")]);
        assert_eq!(extract_api_key(Some("api_key=A&key=B"), &h, &d), Some("B"));
        assert_eq!(extract_api_key(Some("api_key=A"), &h, &d), Some("A"));
        assert_eq!(extract_api_key(None, &h, &d), Some("H"));
        assert_eq!(
            extract_api_key(Some("other=1"), &HeaderMap::new(), &d),
            None
        );
    }

    #[test]
    fn query_names_are_case_insensitive_and_values_raw() {
        let d = ApiKeyLocations::esp_default();
        assert_eq!(
            extract_api_key(Some("KEY=a%2Bb"), &HeaderMap::new(), &d),
            Some("a%2Bb")
        );
    }

    #[test]
    fn empty_value_counts_as_absent() {
        let d = ApiKeyLocations::esp_default();
        let h = hm(&[("x-api-key", "")]);
        assert_eq!(extract_api_key(Some("key=&api_key=Z"), &h, &d), Some("Z"));
        assert_eq!(extract_api_key(Some("key="), &h, &d), None);
    }

    #[test]
    fn custom_locations_replace_defaults_queries_first() {
        let loc = ApiKeyLocations {
            query: vec!["mykey".into()],
            headers: vec![HeaderName::from_static("x-my-key")],
        };
        let h = hm(&[("x-my-key", "HDR"), ("x-api-key", "DEFAULT")]);
        assert_eq!(extract_api_key(Some("key=K&mykey=Q"), &h, &loc), Some("Q"));
        assert_eq!(extract_api_key(Some("key=K"), &h, &loc), Some("HDR"));
        let only_default = hm(&[("x-api-key", "DEFAULT")]);
        assert_eq!(extract_api_key(Some("key=K"), &only_default, &loc), None);
    }

    #[test]
    fn rewrite_first_match_wins_and_expands_groups() {
        let rules = vec![
            crate::settings::RewriteRule {
                pattern: regex::Regex::new("^/api/(.*)$").unwrap(),
                replacement: "/$1".into(),
            },
            crate::settings::RewriteRule {
                pattern: regex::Regex::new("^/api/x").unwrap(),
                replacement: "/never".into(),
            },
        ];
        assert_eq!(rewrite(&rules, "/api/x?key=1"), "/x?key=1");
        assert_eq!(rewrite(&rules, "/other"), "/other");
    }

    #[test]
    fn error_response_headers() {
        let r = error_response(&EspError::unregistered_caller(), false, false);
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        assert_eq!(r.headers()["content-type"], "application/json");
        let r = error_response(&EspError::cors_not_allowed(), true, true);
        assert_eq!(
            r.headers()["www-authenticate"],
            "Bearer, error=\"invalid_token\""
        );
        assert!(r.body().is_end_stream());
        let r = error_response(&EspError::bad_gateway(), false, false);
        assert!(r.headers().get("www-authenticate").is_none());
        let g = grpc_error_response(&EspError::unregistered_caller());
        assert_eq!(g.status(), 200);
        assert_eq!(g.headers()["grpc-status"], "16");
        assert_eq!(g.headers()["content-type"], "application/grpc");
        assert!(g.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .starts_with("Method doesn't allow unregistered callers"));
    }
}
