//! The response body and the request's completion: [`ProxyBody`] carries a `Completion`
//! armed by `Pipeline::finalize`; when the body ends (or is dropped) the **report** phase runs
//! (`Completion::report`: metrics, access log, Service Control report). [`AbortGuard`]
//! accounts for requests whose client leaves before the response head.

use super::state::{logged_headers, Ctx, ReportInfo};
use super::{ConnInfo, Pipeline, ProxyState, RequestRecord};
use crate::error::EspError;
use crate::forward;
use crate::request_head;
use crate::service_control::report::StreamCounts;
use bytes::Bytes;
use http::header::HeaderValue;
use http::{Method, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use std::borrow::Cow;
use std::net::IpAddr;
use std::pin::Pin;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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
        if let (true, Some(format)) = (
            state.access_log.enabled(),
            state.settings.access_log_format.as_ref(),
        ) {
            let url = uri.to_string();
            let table = state.routes.load();
            let path = table.secrets.redact(&url);
            let empty = http::HeaderMap::new();
            let addr = std::net::SocketAddr::new(peer, 0);
            // Envoy's entry for a client that left before the response: code 0, flag DC.
            let line = format.render(&crate::access_log::Record {
                start: std::time::SystemTime::now()
                    .checked_sub(total)
                    .unwrap_or(std::time::UNIX_EPOCH),
                method: method.as_str(),
                path: &path,
                authority: uri.authority().map(|a| a.as_str()),
                tls: false,
                version: Version::HTTP_11,
                status: 0,
                flags: "DC",
                details: "downstream_remote_disconnect",
                bytes_received: 0,
                bytes_sent: 0,
                duration: total,
                request_duration: None,
                response_duration: None,
                upstream_host: None,
                upstream_failure: None,
                client: addr,
                peer: addr,
                local: None,
                api_method: None,
                request_headers: &empty,
                response_headers: &empty,
                key_headers: &[],
                secrets: &table.secrets,
            });
            state.access_log.write_raw(&line);
        } else if state.access_log.enabled() {
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

enum Kind {
    Empty,
    Full(Option<Bytes>),
    Stream(crate::upstream::UpstreamBody),
    /// A backend body rewritten on its way (gRPC-Web framing, `pipeline/transcode.rs`).
    Boxed(Pin<Box<dyn Body<Data = Bytes, Error = BodyError> + Send>>),
}

/// The response body: a proxy-generated one or the backend's, streamed, compressed frame by
/// frame when the response is (`--enable_response_compression`). When it ends (or is dropped,
/// e.g. for HEAD or a client that went away) the request is accounted: metrics, access log and
/// the Service Control report, with the bytes sent (compressed, when they were).
pub struct ProxyBody {
    kind: Kind,
    sent: u64,
    done: Option<Box<Completion>>,
    /// Set while the body is compressed; one pointer otherwise.
    comp: Option<Box<Compressing>>,
}

/// A compressed body's state: the encoder until the stream is finished, and the backend's
/// trailers, held back while the encoder's last bytes go out.
struct Compressing {
    enc: Option<crate::compression::Encoder>,
    trailers: Option<http::HeaderMap>,
}

/// A response body's failure: the backend's body broke, or (never in practice: it writes to
/// memory) the encoder did.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl ProxyBody {
    pub fn empty() -> ProxyBody {
        ProxyBody {
            kind: Kind::Empty,
            sent: 0,
            done: None,
            comp: None,
        }
    }

    pub fn full(b: impl Into<Bytes>) -> ProxyBody {
        ProxyBody {
            kind: Kind::Full(Some(b.into())),
            sent: 0,
            done: None,
            comp: None,
        }
    }

    /// A body rewritten frame by frame as it streams (gRPC-Web framing of a gRPC response).
    pub fn boxed(b: impl Body<Data = Bytes, Error = BodyError> + Send + 'static) -> ProxyBody {
        ProxyBody {
            kind: Kind::Boxed(Box::pin(b)),
            sent: 0,
            done: None,
            comp: None,
        }
    }

    /// A backend response body, streamed.
    pub fn upstream(b: crate::upstream::UpstreamBody) -> ProxyBody {
        ProxyBody {
            kind: Kind::Stream(b),
            sent: 0,
            done: None,
            comp: None,
        }
    }

    fn finish(&mut self) {
        if let Some(c) = self.done.take() {
            c.report(self.sent);
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

impl ProxyBody {
    fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(s) => Pin::new(s)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BodyError::from))),
            Kind::Boxed(b) => b.as_mut().poll_frame(cx),
        }
    }

    /// The inner body, each data frame compressed and flushed as it comes; at its end (or
    /// before its trailers) the encoder's last bytes. The encoder, and its place under the
    /// cap, go as soon as the stream is finished or fails.
    fn poll_compressed(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            let finished = self.comp.as_ref().is_none_or(|c| c.enc.is_none());
            if finished {
                let trailers = self.comp.take().and_then(|c| c.trailers);
                return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
            }
            let frame = match self.poll_inner(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(f))) => Some(f),
                Poll::Ready(None) => None,
                Poll::Ready(Some(Err(e))) => {
                    self.comp = None;
                    return Poll::Ready(Some(Err(e)));
                }
            };
            let Some(c) = self.comp.as_mut() else {
                continue;
            };
            let out = match frame.map(Frame::into_data) {
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => match c.enc.as_mut() {
                    Some(enc) => enc.compress(&data),
                    None => Ok(Bytes::new()),
                },
                Some(Err(other)) => {
                    c.trailers = other.into_trailers().ok();
                    c.enc.take().map_or(Ok(Bytes::new()), |mut e| e.finish())
                }
                None => c.enc.take().map_or(Ok(Bytes::new()), |mut e| e.finish()),
            };
            match out {
                Ok(b) if b.is_empty() => continue,
                Ok(b) => return Poll::Ready(Some(Ok(Frame::data(b)))),
                Err(e) => {
                    self.comp = None;
                    tracing::error!(error = %e, "response compression failed");
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let res = if this.comp.is_some() {
            this.poll_compressed(cx)
        } else {
            this.poll_inner(cx)
        };
        match &res {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.sent += d.len() as u64;
                    if let Some(s) = this.done.as_ref().and_then(|c| c.stream.as_ref()) {
                        s.sent(d.len());
                    }
                }
                if let Some(g) = this.done.as_mut().and_then(|c| c.grpc.as_mut()) {
                    if let Some(d) = f.data_ref() {
                        g.response_frames.feed(d);
                    } else if let Some(status) = f
                        .trailers_ref()
                        .and_then(|t| t.get("grpc-status"))
                        .and_then(crate::grpc::parse_status)
                    {
                        g.status = Some(status);
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.finish(),
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        if self.comp.is_some() {
            return false;
        }
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(b) => b.is_none(),
            Kind::Stream(s) => s.is_end_stream(),
            Kind::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        if self.comp.is_some() {
            return SizeHint::default();
        }
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream(s) => s.size_hint(),
            Kind::Boxed(b) => b.size_hint(),
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
    /// The response's status line and headers, counted into the reported response size as
    /// ESP counts every byte it sent on the connection (the access log keeps the body bytes).
    response_head_bytes: u64,
    /// The `Content-Length` counted in `request_bytes`, replaced by the bytes received when
    /// the body was read.
    declared_body: u64,
    body_counter: Option<Arc<crate::request_body::BodyCount>>,
    backend_latency: Option<Duration>,
    user_agent: Option<HeaderValue>,
    referer: Option<HeaderValue>,
    error: Option<EspError>,
    /// The backend speaks gRPC (`grpc://`).
    backend_grpc: bool,
    /// A gRPC call (`application/grpc*` request): its status and message counts, read as the
    /// response streams by.
    grpc: Option<Box<GrpcFacts>>,
    /// Report to Service Control (ESP-handled request on a config with SC).
    report: Option<ReportInfo>,
    /// A long stream's intermediate reports (ESP v1): fed the bytes sent, and told when the
    /// final report is made.
    stream: Option<Arc<super::stream_report::StreamReporter>>,
    /// What only `--access_log_format` reads; allocated only with a format.
    formatted: Option<Box<FormatFacts>>,
    /// A traced request's spans: the last handle, dropped with the completion once the body
    /// is sent, ends the root span and queues the trace.
    trace: Option<Arc<crate::trace::Recorder>>,
    /// ESPv2's untraced request's trace ID, for the report.
    unsampled_trace: Option<[u8; 16]>,
}

/// What a gRPC call's report needs from its response.
#[derive(Default)]
struct GrpcFacts {
    /// `grpc-status` of a trailers-only response, or of the trailers.
    status: Option<u32>,
    /// Messages in the response body.
    response_frames: crate::grpc::FrameCounter,
}

/// The facts of a request only an `--access_log_format` entry needs.
struct FormatFacts {
    peer: std::net::SocketAddr,
    local: Option<std::net::SocketAddr>,
    /// The client's headers the format reads.
    request_headers: http::HeaderMap,
    /// The response headers the format reads.
    response_headers: http::HeaderMap,
    tls: bool,
    /// From the request's arrival to the backend's response head.
    response_duration: Option<Duration>,
    /// The `--healthz` answer.
    health_check: bool,
}

impl ProxyBody {
    /// Marks the request as the `--healthz` answer, for the access log's operation.
    pub(super) fn mark_health_check(&mut self) {
        if let Some(f) = self.done.as_mut().and_then(|c| c.formatted.as_mut()) {
            f.health_check = true;
        }
    }
}

impl Completion {
    /// One `--access_log_format` entry ([`crate::access_log::Format`]).
    fn write_formatted(
        &self,
        format: &crate::access_log::Format,
        facts: &FormatFacts,
        total: Duration,
        sent: u64,
    ) {
        let st = &self.state;
        let settings = &st.settings;
        let table = st.routes.load();
        let kind = self.error.as_ref().map(|e| &e.kind);
        let went_upstream = self.backend_latency.is_some()
            || matches!(
                kind,
                Some(crate::error::ErrorKind::BackendFailed { .. })
                    | Some(crate::error::ErrorKind::BackendTimeout)
            );
        let method_info = self.report.as_ref().and_then(|r| r.method.as_ref());
        let upstream_host =
            went_upstream.then(|| match method_info.and_then(|m| m.backend.as_ref()) {
                Some(t) if settings.enable_backend_routing => t.authority.clone(),
                _ => settings.backend.authority(),
            });
        let flags = response_flags(kind);
        let details = match settings.dialect {
            crate::dialect::Dialect::EspV2 => crate::dialect::espv2_response_code_detail(kind),
            _ if self.error.is_none() => Cow::Borrowed("via_upstream"),
            _ => Cow::Borrowed(""),
        };
        let details = if self.error.is_none() && self.backend_latency.is_none() {
            // Answered by the proxy itself (health check, preflight).
            Cow::Borrowed("direct_response")
        } else {
            details
        };
        // Envoy's words for a connection that could not be made.
        let upstream_failure = match kind {
            Some(crate::error::ErrorKind::BackendFailed { how, .. }) => match how {
                crate::error::NetworkFailure::Connect(errno) => {
                    Some(Cow::Owned(format!("delayed connect error: {errno}")))
                }
                crate::error::NetworkFailure::Tls => Some(Cow::Borrowed("TLS error")),
                crate::error::NetworkFailure::Unresolved => {
                    Some(Cow::Borrowed("name resolution failure"))
                }
                _ => None,
            },
            _ => None,
        };
        let api_method = if facts.health_check {
            settings.health_check_operation.as_deref()
        } else {
            self.report.as_ref().map(|r| {
                r.method.as_ref().map_or(
                    crate::service_control::report::UNKNOWN_OPERATION_NAME,
                    |m| m.selector.as_str(),
                )
            })
        };
        let received = match &self.body_counter {
            Some(c) => match c.received() {
                forward::BODY_UNREAD => 0,
                n => n,
            },
            None => 0,
        };
        // A request without a body is whole with its head; one whose body was not read
        // (answered first) has no such time.
        let request_duration = match &self.body_counter {
            None => Some(Duration::ZERO),
            Some(c) => c.ended_after(),
        };
        let key_headers: &[http::HeaderName] =
            method_info.map_or(&[], |m| m.api_key_locations.headers.as_slice());
        let client_port = if self.client_ip == facts.peer.ip() {
            facts.peer.port()
        } else {
            0
        };
        let line = format.render(&crate::access_log::Record {
            start: std::time::SystemTime::now()
                .checked_sub(total)
                .unwrap_or(std::time::UNIX_EPOCH),
            method: self.method.as_str(),
            path: &self.url,
            authority: None,
            tls: facts.tls,
            version: self.version,
            status: self.status,
            flags,
            details: &details,
            bytes_received: received,
            bytes_sent: sent,
            duration: total,
            request_duration,
            response_duration: facts.response_duration,
            upstream_host: upstream_host.as_deref(),
            upstream_failure: upstream_failure.as_deref(),
            client: std::net::SocketAddr::new(self.client_ip, client_port),
            peer: facts.peer,
            local: facts.local,
            api_method,
            request_headers: &facts.request_headers,
            response_headers: &facts.response_headers,
            key_headers,
            secrets: &table.secrets,
        });
        st.access_log.write_raw(&line);
    }

    /// **report**: metrics, the access log and the Service Control report, once the response
    /// body has been sent (or dropped).
    fn report(mut self: Box<Self>, sent: u64) {
        let total = self.start.elapsed();
        if let Some(t) = &self.trace {
            t.set_status(self.status);
        }
        if let Some(c) = &self.body_counter {
            let received = c.received();
            if received != forward::BODY_UNREAD {
                self.request_bytes =
                    self.request_bytes.saturating_sub(self.declared_body) + received;
            }
        }
        let st = &self.state;
        if tracing::enabled!(tracing::Level::DEBUG) {
            // ESPv2's per-request debug logs; the path without its query, which can hold keys.
            tracing::debug!(
                method = %self.method,
                path = crate::request_head::path_of(&self.url),
                status = self.status,
                operation = self
                    .report
                    .as_ref()
                    .and_then(|r| r.method.as_ref())
                    .map_or("", |m| m.selector.as_str()),
                duration_ms = total.as_millis() as u64,
                "request completed"
            );
        }
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
        if let (true, Some(format), Some(facts)) = (
            st.access_log.enabled(),
            st.settings.access_log_format.as_ref(),
            self.formatted.as_deref(),
        ) {
            self.write_formatted(format, facts, total, sent);
        } else if st.access_log.enabled() {
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
        // No intermediate report after this point; the final one says what they left.
        let part = self
            .stream
            .take()
            .map_or(crate::service_control::report::ReportPart::Whole, |s| {
                s.finish()
            });
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
        let grpc_status = self.grpc.as_ref().and_then(|g| g.status);
        // ESPv2 reports a gRPC response's status as the HTTP status it stands for (NotFound →
        // 404); a code that is not canonical keeps the HTTP status.
        let response_code = match (st.settings.dialect, grpc_status) {
            (crate::dialect::Dialect::EspV2, Some(code)) if self.status == 200 => {
                crate::grpc::http_status(code).unwrap_or(self.status)
            }
            _ => self.status,
        };
        // ESP v1's streaming metrics, for the methods declared streaming.
        let streaming = match (&self.grpc, r.method.as_ref()) {
            (Some(g), Some(m)) if m.streaming => Some(StreamCounts {
                request_messages: self.body_counter.as_ref().map_or(0, |c| c.messages()),
                response_messages: g.response_frames.messages(),
                duration: total,
            }),
            _ => None,
        };
        let (error_cause, error_message, error_kind) = match self.error {
            Some(e) => (
                Some(e.cause.as_str().to_string()),
                Some(e.message),
                Some(e.kind),
            ),
            None => (None, None, None),
        };
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
            response_code,
            status_code,
            grpc_status,
            streaming,
            part,
            request_size: self.request_bytes,
            response_size: self.response_head_bytes.saturating_add(sent),
            total_latency: total,
            backend_latency: self.backend_latency,
            overhead_latency: total.saturating_sub(self.backend_latency.unwrap_or_default()),
            caller_ip: Some(self.caller_ip),
            referer,
            error_cause,
            error_message,
            error_kind,
            protocol: self.protocol.to_string(),
            backend_protocol,
            request_headers: r.request_headers,
            response_headers: r.response_headers,
            jwt_payloads: r.auth.map(|a| a.jwt_payloads).filter(|p| !p.is_empty()),
            start_time: None,
            dialect: st.settings.dialect,
            api_key_state: r.api_key_state,
            api_key_uid: r.check.and_then(|c| c.api_key_uid),
            trace: match (&self.trace, self.unsampled_trace, &st.tracer) {
                (Some(t), _, _) => t.trace_name(),
                (None, Some(id), Some(tracer)) => tracer.trace_name(&id),
                _ => None,
            },
        });
    }
}

impl Pipeline {
    /// Adds the always-on response headers (CORS preset, HSTS) and arms the completion.
    pub(super) fn finalize(
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
        self.add_operator_headers(&mut resp, ctx);
        let report = report.map(|mut r| {
            r.response_headers = logged_headers(&settings.log_response_headers, resp.headers());
            r
        });
        self.arm(resp, ctx, url, error, report, backend_latency)
    }

    /// Like `finalize` without CORS and HSTS (the preflight carries its own headers).
    pub(super) fn finalize_plain(
        &self,
        mut resp: Response<ProxyBody>,
        ctx: &Ctx,
        url: String,
        error: Option<EspError>,
    ) -> Response<ProxyBody> {
        self.add_operator_headers(&mut resp, ctx);
        self.arm(resp, ctx, url, error, None, None)
    }

    /// `--add_response_header`/`--append_response_header`, on every response to the client
    /// ([`crate::header_rules`]).
    fn add_operator_headers(&self, resp: &mut Response<ProxyBody>, ctx: &Ctx) {
        let rules = &self.state.settings.response_headers_to_add;
        if rules.is_empty() {
            return;
        }
        let empty = http::HeaderMap::new();
        let request = ctx
            .conn_facts
            .as_ref()
            .map_or(&empty, |c| &c.request_headers);
        let status = resp.status();
        crate::header_rules::apply_to_response(
            rules,
            status,
            resp.headers_mut(),
            request,
            &ctx.rule_facts(),
        );
    }

    /// `--enable_response_compression`: `Vary` on what could be compressed, and the encoder on
    /// what the client accepts compressed ([`crate::compression`]).
    fn compress(&self, resp: &mut Response<ProxyBody>, ctx: &Ctx) {
        let (Some(settings), Some(gate)) = (
            &self.state.settings.response_compression,
            &self.state.compression,
        ) else {
            return;
        };
        let status = resp.status();
        let length = resp.body().size_hint().exact();
        if !crate::compression::compressible(settings, status, resp.headers(), length) {
            return;
        }
        crate::compression::add_vary(resp.headers_mut());
        let Some(encoding) = ctx.accept else { return };
        let bodiless = ctx.head
            || status == http::StatusCode::NO_CONTENT
            || status == http::StatusCode::NOT_MODIFIED
            || resp.body().is_end_stream();
        if bodiless {
            return;
        }
        let Some(permit) = gate.try_acquire() else {
            self.state.compression_busy.inc();
            return;
        };
        crate::compression::set_encoded_head(resp.headers_mut(), encoding);
        resp.body_mut().comp = Some(Box::new(Compressing {
            enc: Some(crate::compression::Encoder::new(encoding, settings, permit)),
            trailers: None,
        }));
    }

    pub(super) fn arm(
        &self,
        mut resp: Response<ProxyBody>,
        ctx: &Ctx,
        url: String,
        error: Option<EspError>,
        report: Option<ReportInfo>,
        backend_latency: Option<Duration>,
    ) -> Response<ProxyBody> {
        self.compress(&mut resp, ctx);
        let status = resp.status().as_u16();
        // Only Service Control's report counts the head; nothing else pays for it.
        let response_head_bytes = if report.is_some() {
            response_head_size(&resp, ctx.head)
        } else {
            0
        };
        let backend_grpc = self.forwarder.version() == Version::HTTP_2;
        let is_grpc_request = ctx.content_type_grpc;
        let protocol = ctx.frontend_protocol();
        let mut report = report;
        let stream = report.as_mut().and_then(|r| r.stream.take());
        let formatted = self
            .state
            .settings
            .access_log_format
            .as_ref()
            .map(|format| {
                let mut response_headers = http::HeaderMap::new();
                for name in format.response_headers() {
                    for v in resp.headers().get_all(name) {
                        response_headers.append(name.clone(), v.clone());
                    }
                }
                let (peer, local, request_headers) = match &ctx.conn_facts {
                    Some(c) => (c.peer, c.local, c.request_headers.clone()),
                    None => (
                        std::net::SocketAddr::new(ctx.client_ip, 0),
                        None,
                        http::HeaderMap::new(),
                    ),
                };
                Box::new(FormatFacts {
                    peer,
                    local,
                    request_headers,
                    response_headers,
                    tls: ctx.tls,
                    response_duration: backend_latency.map(|_| ctx.start.elapsed()),
                    health_check: false,
                })
            });
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
            response_head_bytes,
            declared_body: ctx.request_bytes,
            body_counter: ctx.body_counter.clone(),
            backend_latency,
            user_agent: ctx.user_agent.clone(),
            referer: ctx.referer.clone(),
            error,
            backend_grpc,
            grpc: is_grpc_request.then(|| {
                Box::new(GrpcFacts {
                    status: resp
                        .headers()
                        .get("grpc-status")
                        .and_then(crate::grpc::parse_status),
                    ..GrpcFacts::default()
                })
            }),
            report,
            stream,
            formatted,
            trace: ctx.trace.clone(),
            unsampled_trace: ctx.unsampled_trace,
        }));
        if ctx.head {
            // A HEAD answer never carries a body, whoever produced it.
            let done = resp.body_mut().done.take();
            *resp.body_mut() = ProxyBody {
                kind: Kind::Empty,
                sent: 0,
                done,
                comp: None,
            };
        }
        resp
    }
}

/// Envoy's response flags for how the request ended (`-`: nothing to flag).
fn response_flags(kind: Option<&crate::error::ErrorKind>) -> &'static str {
    use crate::error::{ErrorKind, NetworkFailure};
    match kind {
        Some(ErrorKind::BackendFailed { how, retried }) => match (how, retried) {
            (NetworkFailure::Unresolved, _) => "UH",
            (NetworkFailure::Timeout, false) => "UT",
            (NetworkFailure::Timeout, true) => "UT,URX",
            // Envoy counts a connect timeout as a connection failure.
            (
                NetworkFailure::Connect(_) | NetworkFailure::Tls | NetworkFailure::ConnectTimeout,
                false,
            ) => "UF",
            (
                NetworkFailure::Connect(_) | NetworkFailure::Tls | NetworkFailure::ConnectTimeout,
                true,
            ) => "UF,URX",
            // The circuit breaker: Envoy's upstream overflow.
            (NetworkFailure::Overflow, _) => "UO",
            (NetworkFailure::Reset, false) => "UC",
            (NetworkFailure::Reset, true) => "UC,URX",
            (NetworkFailure::RefusedStream, false) => "UR",
            (NetworkFailure::RefusedStream, true) => "UR,URX",
        },
        Some(ErrorKind::BackendTimeout) => "UT",
        _ => "-",
    }
}

/// Approximate size of the status line and headers as written on HTTP/1.1, including the
/// `date` and `content-length` the server adds when the response names none (hop-by-hop
/// headers the connection adds, such as `connection: close`, are not counted).
fn response_head_size(resp: &Response<ProxyBody>, head_request: bool) -> u64 {
    let status = resp.status();
    // "HTTP/1.1 200 OK\r\n"
    let line = 9 + 3 + 1 + status.canonical_reason().map_or(0, str::len) + 2;
    let headers = resp.headers();
    let mut size: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if !headers.contains_key(http::header::DATE) {
        // "date: " + an IMF-fixdate (29 bytes) + CRLF.
        size += 6 + 29 + 2;
    }
    let framed = headers.contains_key(http::header::CONTENT_LENGTH)
        || headers.contains_key(http::header::TRANSFER_ENCODING);
    let bodiless = status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED;
    if !framed && !bodiless {
        use http_body::Body as _;
        match resp.body().size_hint().exact() {
            Some(n) if !head_request || n > 0 => {
                size += "content-length: ".len() + n.to_string().len() + 2;
            }
            Some(_) => {}
            None => size += "transfer-encoding: chunked\r\n".len(),
        }
    }
    (line + size + 2) as u64
}
