//! The forward and respond phases for calls the gRPC backend cannot take as they came:
//!
//! - **HTTP/JSON transcoding** (`Pipeline::forward_transcoded`): a request that matched an
//!   HTTP rule of a config with a transcoder ([`crate::routing::ConfigRoutes::transcoder`]) is
//!   read (bounded), turned into gRPC messages by [`portico_transcode`], sent as
//!   `POST /package.Service/Method` with `application/grpc`, and the backend's messages and
//!   status come back as JSON (`grpc-status` → HTTP status, `google.rpc.Status` body).
//! - **gRPC-Web** (`Pipeline::forward_grpc_web`): the body (base64-decoded for `-text`) goes to
//!   the backend as `application/grpc`; the response streams back frame by frame, its HTTP/2
//!   trailers as the final `0x80` frame.
//!
//! Auth, Service Control and the report already ran on the original request (ESPv2's filter
//! order), so the report names the HTTP URL, protocol `http` and backend protocol `grpc`.
//!
//! Memory: a transcoded request body is read whole up to `--client_max_body_size` (or
//! [`MAX_BUFFERED`] when that is 0), and a unary response up to [`MAX_BUFFERED`] (its status
//! decides the HTTP status, which must go first); a server stream is held until its first
//! message and then printed as it arrives ([`JsonStream`]); a gRPC-Web request body is read
//! whole under the same limit, its response streams.

use super::state::{Ctx, ReportInfo, Routed};
use super::{Pipeline, ProxyBody};
use crate::error::{Cause, Code, EspError};
use crate::forward::{self, LimitedBody};
use crate::request_body::ReplayBody;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use portico_transcode::framing::{self, FrameDecoder};
use portico_transcode::web::{self, WebMode};
use portico_transcode::{status, RouteError, Transcoder};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// The most a transcoded call holds in memory at once: a request body when
/// `--client_max_body_size` is 0 (unlimited), and a backend's response to a transcoded call.
pub const MAX_BUFFERED: usize = 32 * 1024 * 1024;

const GRPC: HeaderValue = HeaderValue::from_static("application/grpc");

/// Why reading a client body failed.
enum ReadError {
    TooLarge,
    Client(String),
    Timeout,
}

impl Pipeline {
    /// Whether this request is transcoded: a config with a transcoder, a request that is not
    /// gRPC, and an HTTP rule (or the default `POST /package.Service/Method`) for it. Under
    /// `portico espv2`, not when a query parameter names no field of the request message: the
    /// request then goes to the backend as it came, as ESPv2's transcoder passes it on
    /// ([`crate::dialect::Dialect::forwards_untranscodable_requests`]).
    pub(super) fn transcoding_for(
        transcoder: &Option<Arc<Transcoder>>,
        ctx: &Ctx,
        dialect: crate::dialect::Dialect,
        method: &Method,
        target: &str,
    ) -> Option<Arc<Transcoder>> {
        let t = transcoder.as_ref()?;
        if ctx.content_type_grpc {
            return None;
        }
        match t.route(method.as_str(), target) {
            Ok(call) => {
                if dialect.forwards_untranscodable_requests() {
                    if let Some(name) = call.unknown_query_parameter() {
                        tracing::debug!(
                            parameter = %name,
                            "not transcoded: the query parameter names no field of the request \
                             message; forwarded as it came"
                        );
                        return None;
                    }
                }
                Some(t.clone())
            }
            Err(RouteError::NotFound | RouteError::MethodNotAllowed { .. }) => None,
        }
    }

    /// Reads a client body whole, at most `limit` bytes, within `--client_body_timeout`.
    async fn read_body(&self, body: Incoming, limit: usize) -> Result<Bytes, ReadError> {
        let timeout = self.state.settings.client_body_timeout;
        let limited = http_body_util::Limited::new(body, limit);
        match tokio::time::timeout(timeout, limited.collect()).await {
            Err(_) => Err(ReadError::Timeout),
            Ok(Ok(c)) => Ok(c.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ReadError::TooLarge),
            Ok(Err(e)) => Err(ReadError::Client(e.to_string())),
        }
    }

    fn body_limit(&self) -> usize {
        match self.state.settings.client_max_body_size {
            0 => MAX_BUFFERED,
            n => usize::try_from(n).unwrap_or(MAX_BUFFERED),
        }
    }

    fn read_error(&self, e: ReadError) -> EspError {
        match e {
            ReadError::TooLarge => EspError::payload_too_large(),
            ReadError::Timeout => EspError::with_status(
                408,
                Code::DeadlineExceeded,
                "The request body was not received in time.",
                Cause::Application,
            ),
            ReadError::Client(why) => EspError::with_status(
                400,
                Code::InvalidArgument,
                format!("The request body could not be read: {why}"),
                Cause::Application,
            ),
        }
    }

    /// The client and deadline for the call, as [`Pipeline::forward`] picks them, and the
    /// request head rewritten for a gRPC backend: `POST`, `path`, `application/grpc`,
    /// `te: trailers`, ESP's forwarding headers and the operator's request headers.
    fn grpc_request(
        &self,
        mut parts: http::request::Parts,
        ctx: &Ctx,
        report: Option<&ReportInfo>,
        routed: Option<&Routed>,
        path: &str,
        body: Vec<Bytes>,
    ) -> Result<
        (
            Request<LimitedBody>,
            crate::forward::Forwarder,
            Option<std::time::Duration>,
        ),
        EspError,
    > {
        let settings = &self.state.settings;
        let (forwarder, deadline) = match routed {
            Some(r) => (r.target.forwarder.clone(), r.target.deadline),
            None => {
                if let Some(h) = &self.state.backend_health {
                    h.note_traffic();
                }
                let local = report
                    .and_then(|r| r.method.as_ref())
                    .and_then(|m| m.local_backend.as_ref());
                (
                    local
                        .and_then(|l| l.forwarder.clone())
                        .unwrap_or_else(|| self.forwarder.clone()),
                    local.and_then(|l| l.deadline),
                )
            }
        };
        let target = match routed {
            Some(r) => format!("{}{}", r.target.path_prefix, path),
            None => path.to_string(),
        };
        let uri = forwarder
            .upstream_uri(&target)
            .map_err(|e| EspError::new(Code::InvalidArgument, e.to_string(), Cause::Internal))?;
        let h = &mut parts.headers;
        forward::strip_hop_by_hop(h, false, false);
        for name in [
            header::CONTENT_LENGTH,
            header::CONTENT_TYPE,
            header::CONTENT_ENCODING,
            header::ACCEPT_ENCODING,
            header::ACCEPT,
        ] {
            h.remove(name);
        }
        h.insert(header::CONTENT_TYPE, GRPC);
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("grpc-accept-encoding", HeaderValue::from_static("identity"));
        let host = routed.map(|r| r.target.host.clone());
        if settings
            .dialect
            .forwards_grpc_untouched(settings.backend.is_grpc())
        {
            if let Some(host) = host {
                h.insert(header::HOST, host);
            }
        } else {
            forward::set_forwarding_headers_with(
                h,
                ctx.client_ip,
                forward::XffAppend::Address(ctx.client_ip),
                host,
            );
        }
        if !settings.request_headers_to_add.is_empty() {
            crate::header_rules::apply_to_request(
                &settings.request_headers_to_add,
                h,
                &ctx.rule_facts(),
            );
        }
        parts.method = Method::POST;
        parts.uri = uri;
        parts.version = Version::HTTP_2;
        let body = LimitedBody::replay(ReplayBody {
            data: body,
            trailers: None,
        });
        Ok((Request::from_parts(parts, body), forwarder, deadline))
    }

    /// Forward + respond for a transcoded HTTP/JSON call.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn forward_transcoded(
        &self,
        mut parts: http::request::Parts,
        body: Incoming,
        ctx: &Ctx,
        target: String,
        report: Option<ReportInfo>,
        routed: Option<Routed>,
        transcoder: Arc<Transcoder>,
    ) -> Response<ProxyBody> {
        let fail = |err: EspError, report: Option<ReportInfo>| {
            self.finalize(
                super::errors::proxy_error(&err, ctx, ctx.jwt_present),
                ctx,
                target.clone(),
                Some(err),
                report,
                None,
            )
        };
        let call = match transcoder.route(parts.method.as_str(), &target) {
            Ok(c) => c,
            Err(_) => {
                return fail(EspError::method_does_not_exist(), report);
            }
        };
        let bytes = match self.read_body(body, self.body_limit()).await {
            Ok(b) => b,
            Err(e) => return fail(self.read_error(e), report),
        };
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let messages = match call.request_messages(&bytes, content_type.as_deref()) {
            Ok(m) => m,
            Err(e) => {
                // 400 for a body or value that does not fit; under `portico esp`, 415 for a
                // query parameter that names no field (`portico espv2` forwarded such a
                // request untranscoded: `transcoding_for`).
                return fail(
                    EspError::with_status(
                        e.http_status(),
                        Code::InvalidArgument,
                        e.to_string(),
                        Cause::Application,
                    ),
                    report,
                );
            }
        };
        // ESP v1 gives the gRPC backend the API key of a transcoded call's query as
        // `x-api-key` metadata (V1 grpc.cc TryAddApiKeyHeaderFromQuery); ESPv2 does not.
        if self.state.settings.dialect == crate::dialect::Dialect::Esp
            && !parts.headers.contains_key("x-api-key")
        {
            if let Some(key) = query_key(&target) {
                if let Ok(v) = HeaderValue::from_str(&key) {
                    parts.headers.insert("x-api-key", v);
                }
            }
        }
        if self.state.settings.dialect.tells_backend_original_path() {
            forward::set_original_path(&mut parts.headers, &target, Some(&parts.method));
        }
        let frames: Vec<Bytes> = messages.iter().map(|m| framing::encode(m)).collect();
        let path = call.grpc_path();
        let (req, forwarder, deadline) =
            match self.grpc_request(parts, ctx, report.as_ref(), routed.as_ref(), &path, frames) {
                Ok(r) => r,
                Err(e) => return fail(e, report),
            };
        let mut writer = call.response();
        drop(call);
        let mut report = report;
        super::stream_report::StreamReporter::start(self, &mut report, ctx, true);
        let sent_at = Instant::now();
        let sent = forwarder.send_within(req, deadline).await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => return self.respond(Err(e), ctx, target, report, None, sent_at),
        };
        let latency = sent_at.elapsed();
        let (rp, body) = resp.into_parts();
        let is_grpc = rp
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if !is_grpc {
            // Not a gRPC answer (a proxy in between, a misconfigured backend): as it came.
            let mut rp = rp;
            forward::strip_hop_by_hop(&mut rp.headers, false, false);
            let resp = Response::from_parts(rp, ProxyBody::upstream(body));
            return self.finalize(resp, ctx, target, None, report, Some(latency));
        }
        let mut decoder = FrameDecoder::new(MAX_BUFFERED);
        let mut trailers = rp.headers.clone();
        let mut out = BytesMut::new();
        let mut body = body;
        let mut broken: Option<String> = None;
        let streaming = writer.is_streaming() && !writer.is_http_body();
        let mut handed_off = false;
        // A trailers-only answer carries `grpc-status` in its head and no body to read.
        if !rp.headers.contains_key("grpc-status") {
            loop {
                match body.frame().await {
                    None => break,
                    Some(Err(e)) => {
                        broken = Some(e.to_string());
                        break;
                    }
                    Some(Ok(f)) => match f.into_data() {
                        Ok(d) => {
                            decoder.push(&d);
                            loop {
                                match decoder.next_frame() {
                                    Ok(Some(fr)) if fr.flags & framing::FLAG_COMPRESSED != 0 => {
                                        broken =
                                            Some("the backend sent a compressed message".into());
                                        break;
                                    }
                                    Ok(Some(fr)) => match writer.message(&fr.payload) {
                                        Ok(b) => {
                                            if out.len() + b.len() > MAX_BUFFERED {
                                                broken = Some(format!(
                                                    "the response is larger than {MAX_BUFFERED} bytes"
                                                ));
                                                break;
                                            }
                                            out.extend_from_slice(&b);
                                        }
                                        Err(e) => {
                                            broken = Some(e.to_string());
                                            break;
                                        }
                                    },
                                    Ok(None) => break,
                                    Err(e) => {
                                        broken = Some(e.to_string());
                                        break;
                                    }
                                }
                            }
                            if broken.is_some() {
                                break;
                            }
                            // A stream's status is known once a message came: 200, and the
                            // rest streams as it arrives.
                            if streaming && !out.is_empty() {
                                handed_off = true;
                                break;
                            }
                        }
                        Err(f) => {
                            if let Ok(t) = f.into_trailers() {
                                trailers = t;
                            }
                        }
                    },
                }
            }
            if handed_off && broken.is_none() {
                let mut resp = Response::new(ProxyBody::boxed(JsonStream {
                    inner: ProxyBody::upstream(body),
                    decoder,
                    writer,
                    pending: Some(out.freeze()),
                    done: false,
                }));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                copy_metadata(&rp.headers, resp.headers_mut());
                return self.finalize(resp, ctx, target, None, report, Some(latency));
            }
            if broken.is_none() {
                if let Err(e) = decoder.finish() {
                    broken = Some(e.to_string());
                }
            }
        }
        if let Some(why) = broken {
            tracing::warn!(error = %why, path = %path, "transcoded response failed");
            let err = EspError::with_status(502, Code::Internal, why, Cause::Application);
            return self.finalize(
                super::errors::proxy_error(&err, ctx, ctx.jwt_present),
                ctx,
                target,
                Some(err),
                report,
                Some(latency),
            );
        }
        let code = grpc_status(&trailers);
        let mut resp = if code == 0 {
            out.extend_from_slice(&writer.finish());
            let mut r = Response::new(ProxyBody::full(out.freeze()));
            if let Ok(v) = HeaderValue::from_str(writer.content_type()) {
                r.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            r
        } else {
            let body = status::error_body(
                code,
                trailers
                    .get("grpc-message")
                    .map(HeaderValue::as_bytes)
                    .unwrap_or_default(),
                trailers
                    .get("grpc-status-details-bin")
                    .map(HeaderValue::as_bytes),
                transcoder.pool(),
            );
            let mut r = Response::new(ProxyBody::full(body));
            *r.status_mut() = StatusCode::from_u16(status::grpc_to_http(code))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        };
        copy_metadata(&rp.headers, resp.headers_mut());
        self.finalize(resp, ctx, target, None, report, Some(latency))
    }

    /// Forward + respond for a gRPC-Web call.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn forward_grpc_web(
        &self,
        parts: http::request::Parts,
        body: Incoming,
        ctx: &Ctx,
        target: String,
        report: Option<ReportInfo>,
        routed: Option<Routed>,
        mode: WebMode,
    ) -> Response<ProxyBody> {
        let fail = |err: EspError, report: Option<ReportInfo>| {
            self.finalize(
                super::errors::error_response(&err, ctx.dialect, ctx.head, ctx.jwt_present),
                ctx,
                target.clone(),
                Some(err),
                report,
                None,
            )
        };
        let bytes = match self.read_body(body, self.body_limit()).await {
            Ok(b) => b,
            Err(e) => return fail(self.read_error(e), report),
        };
        let bytes = match mode {
            WebMode::Binary => bytes,
            WebMode::Text => {
                let mut dec = web::TextDecoder::new();
                match dec.push(&bytes).and_then(|b| dec.finish().map(|()| b)) {
                    Ok(b) => Bytes::from(b),
                    Err(e) => {
                        return fail(
                            EspError::with_status(
                                400,
                                Code::InvalidArgument,
                                e.to_string(),
                                Cause::Application,
                            ),
                            report,
                        )
                    }
                }
            }
        };
        let path = target.split('?').next().unwrap_or("").to_string();
        let (req, forwarder, deadline) = match self.grpc_request(
            parts,
            ctx,
            report.as_ref(),
            routed.as_ref(),
            &path,
            vec![bytes],
        ) {
            Ok(r) => r,
            Err(e) => return fail(e, report),
        };
        let mut report = report;
        super::stream_report::StreamReporter::start(self, &mut report, ctx, true);
        let sent_at = Instant::now();
        let resp = match forwarder.send_within(req, deadline).await {
            Ok(r) => r,
            Err(e) => return self.respond(Err(e), ctx, target, report, None, sent_at),
        };
        let latency = sent_at.elapsed();
        let (mut rp, body) = resp.into_parts();
        forward::strip_hop_by_hop(&mut rp.headers, false, false);
        rp.headers.remove(header::CONTENT_LENGTH);
        let is_grpc = rp
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if is_grpc {
            rp.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(mode.response_content_type()),
            );
        }
        // A trailers-only answer (`grpc-status` in the head, no body) becomes a body holding
        // just the trailer frame, as a gRPC-Web client reads the status there too.
        let trailers_only = is_grpc && rp.headers.contains_key("grpc-status");
        let body = if trailers_only {
            let mut t = Vec::new();
            for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
                if let Some(v) = rp.headers.remove(name) {
                    t.push((name, v));
                }
            }
            let frame = web::trailer_frame(t.iter().map(|(n, v)| (*n, v.as_bytes())));
            ProxyBody::full(mode.encode_chunk(&frame))
        } else {
            ProxyBody::boxed(WebBody {
                inner: ProxyBody::upstream(body),
                mode,
                done: !is_grpc,
                passthrough: !is_grpc,
            })
        };
        let resp = Response::from_parts(rp, body);
        self.finalize(resp, ctx, target, None, report, Some(latency))
    }
}

/// The gRPC-Web form of a request, as the dialect knows them: ESP v1 only the binary ones
/// (`grpc.cc` `IsGrpcWeb`), ESPv2 the text ones too (Envoy's gRPC-Web filter).
pub(super) fn web_mode(dialect: crate::dialect::Dialect, headers: &HeaderMap) -> Option<WebMode> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(WebMode::from_content_type)
        .filter(|m| *m == WebMode::Binary || dialect != crate::dialect::Dialect::Esp)
}

/// Whether the request's `application/grpc*` content type makes it a gRPC call for the
/// dialect. `false` for ESP v1 and `grpc-web-text`, which ESP does not know as gRPC-Web: such
/// a call is an HTTP request to it (reported as `http`, refused in JSON, transcoded from JSON
/// when it names a method).
pub(super) fn grpc_content_type(dialect: crate::dialect::Dialect, headers: &HeaderMap) -> bool {
    const WEB_TEXT: &[u8] = b"application/grpc-web-text";
    if dialect != crate::dialect::Dialect::Esp {
        return true;
    }
    // Every request asks this: only a likely gRPC-Web text type is parsed.
    let Some(v) = headers.get(header::CONTENT_TYPE) else {
        return true;
    };
    let b = v.as_bytes();
    let maybe_text = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .and_then(|start| b.get(start..start + WEB_TEXT.len()))
        .is_some_and(|p| p.eq_ignore_ascii_case(WEB_TEXT));
    !maybe_text || v.to_str().ok().and_then(WebMode::from_content_type) != Some(WebMode::Text)
}

/// The backend's own response metadata, to the client as headers.
fn copy_metadata(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from.iter() {
        let n = name.as_str();
        if n == "content-type" || n == "content-length" || n.starts_with("grpc-") || forward_skip(n)
        {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

/// The rest of a transcoded server stream once its first message was printed: each message as
/// it arrives (`,{...}` or a line), then `]`. A failure after the first message cannot change
/// the status any more; the array is closed and the failure logged.
struct JsonStream {
    inner: ProxyBody,
    decoder: FrameDecoder,
    writer: portico_transcode::ResponseWriter,
    pending: Option<Bytes>,
    done: bool,
}

impl JsonStream {
    fn end(&mut self, why: Option<String>) {
        if let Some(why) = why {
            tracing::warn!(error = %why, "transcoded stream ended early");
        }
        self.done = true;
        let tail = self.writer.finish();
        if !tail.is_empty() {
            self.pending = Some(tail);
        }
    }
}

impl Body for JsonStream {
    type Data = Bytes;
    type Error = super::body::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(b) = this.pending.take() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    let why = this.decoder.finish().err().map(|e| e.to_string());
                    this.end(why);
                }
                Poll::Ready(Some(Err(e))) => this.end(Some(e.to_string())),
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(d) => {
                        this.decoder.push(&d);
                        let mut out = BytesMut::new();
                        let mut why = None;
                        loop {
                            match this.decoder.next_frame() {
                                Ok(Some(fr)) if fr.flags & framing::FLAG_COMPRESSED != 0 => {
                                    why = Some("the backend sent a compressed message".into());
                                    break;
                                }
                                Ok(Some(fr)) => match this.writer.message(&fr.payload) {
                                    Ok(b) => out.extend_from_slice(&b),
                                    Err(e) => {
                                        why = Some(e.to_string());
                                        break;
                                    }
                                },
                                Ok(None) => break,
                                Err(e) => {
                                    why = Some(e.to_string());
                                    break;
                                }
                            }
                        }
                        if !out.is_empty() {
                            this.pending = Some(out.freeze());
                        }
                        if let Some(why) = why {
                            // What was printed goes first, then the closing bracket.
                            let printed = this.pending.take();
                            this.end(Some(why));
                            let tail = this.pending.take();
                            let mut both = BytesMut::new();
                            for b in [printed, tail].into_iter().flatten() {
                                both.extend_from_slice(&b);
                            }
                            if !both.is_empty() {
                                this.pending = Some(both.freeze());
                            }
                        }
                    }
                    Err(f) => {
                        let status = f.trailers_ref().map(grpc_status).unwrap_or(0);
                        let why = (status != 0).then(|| format!("grpc-status {status}"));
                        this.end(why);
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_none()
    }
}

/// Hop-by-hop and framing headers a rebuilt response must not copy.
fn forward_skip(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "transfer-encoding" | "te" | "trailer" | "upgrade"
    )
}

/// `grpc-status` of a header block; a missing or unreadable one is 2 UNKNOWN, as gRPC clients
/// treat a stream that ends without a status.
fn grpc_status(h: &HeaderMap) -> i32 {
    h.get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(2)
}

/// The API key in a query (`key`, then `api_key`), percent-decoded.
fn query_key(target: &str) -> Option<String> {
    let query = target.split_once('?')?.1;
    for name in ["key", "api_key"] {
        for pair in query.split('&') {
            if let Some((n, v)) = pair.split_once('=') {
                if n == name && !v.is_empty() {
                    return Some(
                        percent_encoding::percent_decode_str(v)
                            .decode_utf8_lossy()
                            .into_owned(),
                    );
                }
            }
        }
    }
    None
}

/// A gRPC response body as gRPC-Web: data frames pass (base64 per chunk in text mode), the
/// trailers become the final `0x80` frame. A non-gRPC answer passes untouched.
struct WebBody {
    inner: ProxyBody,
    mode: WebMode,
    done: bool,
    passthrough: bool,
}

impl Body for WebBody {
    type Data = Bytes;
    type Error = super::body::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.passthrough {
            return Pin::new(&mut this.inner).poll_frame(cx);
        }
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(f))) => match f.into_data() {
                Ok(d) => Poll::Ready(Some(Ok(Frame::data(this.mode.encode_chunk(&d))))),
                Err(f) => {
                    this.done = true;
                    let t = f.into_trailers().unwrap_or_default();
                    let frame =
                        web::trailer_frame(t.iter().map(|(n, v)| (n.as_str(), v.as_bytes())));
                    Poll::Ready(Some(Ok(Frame::data(this.mode.encode_chunk(&frame)))))
                }
            },
            Poll::Ready(None) => {
                // No trailers (a trailers-only answer keeps its status in the head).
                this.done = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.passthrough {
            return self.inner.is_end_stream();
        }
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_status_defaults_to_unknown() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_status(&h), 2);
        h.insert("grpc-status", HeaderValue::from_static("5"));
        assert_eq!(grpc_status(&h), 5);
        h.insert("grpc-status", HeaderValue::from_static("x"));
        assert_eq!(grpc_status(&h), 2);
    }

    #[test]
    fn esp_knows_only_binary_grpc_web() {
        use crate::dialect::Dialect;
        let headers = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            h
        };
        for (ct, esp, espv2) in [
            ("application/grpc-web", Some(WebMode::Binary), true),
            ("application/grpc-web+proto", Some(WebMode::Binary), true),
            ("application/grpc-web-text", None, false),
            (" Application/GRPC-WEB-TEXT+proto; x=y", None, false),
            ("application/grpc-web-textual", None, true),
            ("application/grpc", None, true),
            ("application/json", None, true),
        ] {
            let h = headers(ct);
            assert_eq!(web_mode(Dialect::Esp, &h), esp, "{ct}");
            assert_eq!(grpc_content_type(Dialect::Esp, &h), espv2, "{ct}");
            assert!(grpc_content_type(Dialect::EspV2, &h), "{ct}");
        }
        assert_eq!(
            web_mode(Dialect::EspV2, &headers("application/grpc-web-text")),
            Some(WebMode::Text)
        );
        assert!(grpc_content_type(Dialect::Esp, &HeaderMap::new()));
    }

    #[test]
    fn query_key_reads_key_then_api_key() {
        assert_eq!(
            query_key("/a?x=1&api_key=b&key=a%20b").as_deref(),
            Some("a b")
        );
        assert_eq!(query_key("/a?api_key=b").as_deref(), Some("b"));
        assert_eq!(query_key("/a?key=").as_deref(), None);
        assert_eq!(query_key("/a").as_deref(), None);
    }
}
