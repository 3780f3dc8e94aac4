//! The **forward** and **respond** phases: `Pipeline::forward` rewrites the request for the
//! backend and returns the hand-written future ([`Forwarding`]) that sends it;
//! `Pipeline::respond` turns the backend's answer (or failure) into the client's response.

use super::errors::proxy_error;
use super::state::{Ctx, ReportInfo, Routed};
use super::{Pipeline, ProxyBody};
use crate::error::{Cause, Code, EspError, NetworkFailure};
use crate::forward::{self, ForwardError, LimitedBody};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

pin_project_lite::pin_project! {
    /// [`Pipeline::forward`]'s future.
    pub(super) struct Forwarding<'a, F> {
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
        Poll::Ready(this.pipeline.respond(
            sent,
            this.ctx,
            std::mem::take(this.target),
            this.report.take(),
            this.client_upgrade.take(),
            *this.sent_at,
        ))
    }
}

impl Pipeline {
    /// The forward stage: rewrites the request for the backend and returns the future that
    /// sends it and turns the backend's answer into the client's response.
    ///
    /// A plain function returning a hand-written future rather than an `async fn`: hyper keeps
    /// every connection's request future in one heap slot, as large as the largest state of
    /// [`Pipeline::handle`], which is this one. An `async fn` would hold its arguments and the
    /// request's parts twice (as arguments and as locals) next to the backend call; this holds
    /// them once.
    pub(super) fn forward<'a>(
        &'a self,
        req: Request<Incoming>,
        ctx: &'a Ctx,
        target: String,
        mut report: Option<ReportInfo>,
        routed: Option<Routed>,
    ) -> Forwarding<'a, impl Future<Output = forward::Sent>> {
        let settings = &self.state.settings;
        let backend_grpc = match &routed {
            Some(r) => r.target.forwarder.version() == Version::HTTP_2,
            None => self.forwarder.version() == Version::HTTP_2,
        };
        super::stream_report::StreamReporter::start(self, &mut report, ctx, backend_grpc);
        let (mut parts, body) = req.into_parts();
        let websocket = settings.enable_websocket && parts.headers.contains_key(header::UPGRADE);
        // With backend routing the method's rule picks the client, target, Host and deadline.
        let (forwarder, upstream_target, deadline) = match &routed {
            Some(r) => (
                &r.target.forwarder,
                r.upstream_target.as_str(),
                r.target.deadline,
            ),
            // A backend rule without an address bounds the call to `--backend` by its deadline,
            // and picks its HTTP version when that is not `--backend`'s own.
            None => {
                if let Some(h) = &self.state.backend_health {
                    h.note_traffic();
                }
                let local = report
                    .as_ref()
                    .and_then(|r| r.method.as_ref())
                    .and_then(|m| m.local_backend.as_ref());
                (
                    local
                        .and_then(|l| l.forwarder.as_ref())
                        .unwrap_or(&self.forwarder),
                    target.as_str(),
                    local.and_then(|l| l.deadline),
                )
            }
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
        // ESPv2's path-rewrite filter runs for a rule whose address has a path, or that is
        // CONSTANT_ADDRESS, and records the path it replaced.
        if let Some(r) = &routed {
            if settings.dialect.tells_backend_original_path()
                && (r.target.translation == crate::routing::PathTranslation::ConstantAddress
                    || !r.target.path_prefix.is_empty())
            {
                forward::set_original_path(&mut parts.headers, &target, None);
            }
        }
        let xff = match settings.xff_hops {
            None => forward::XffAppend::Address(ctx.client_ip),
            Some(h) if h.use_remote_address => forward::XffAppend::Address(
                ctx.conn_facts
                    .as_ref()
                    .map_or(ctx.client_ip, |c| c.peer.ip()),
            ),
            Some(_) => forward::XffAppend::Nothing,
        };
        if settings
            .dialect
            .forwards_grpc_untouched(settings.backend.is_grpc())
        {
            if let Some(h) = host {
                parts.headers.insert(header::HOST, h);
            }
        } else {
            forward::set_forwarding_headers_with(&mut parts.headers, ctx.client_ip, xff, host);
        }
        if websocket {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        if !settings.request_headers_to_add.is_empty() {
            // Last, as Envoy's router: the operator's word over everything the proxy set.
            crate::header_rules::apply_to_request(
                &settings.request_headers_to_add,
                &mut parts.headers,
                &ctx.rule_facts(),
            );
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
        let limited = LimitedBody::new(body, settings.client_max_body_size)
            .with_counter(ctx.body_counter.clone());
        // ESP v1 reports how many messages a streaming call carried each way.
        let limited = if ctx.content_type_grpc {
            limited.with_grpc_message_count()
        } else {
            limited
        };
        let upstream_req = Request::from_parts(
            parts,
            limited
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
        // A streaming gRPC method has no deadline (ESPv2's rule; a client-streaming call's
        // response headers come only after the client's last message).
        let streaming = report
            .as_ref()
            .and_then(|r| r.method.as_ref())
            .is_some_and(|m| m.streaming);
        let deadline = if streaming {
            Some(forward::NO_DEADLINE)
        } else {
            deadline
        };
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

    /// **respond**: the backend answered (or could not be reached); the client's response.
    pub(super) fn respond(
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
                if self.state.settings.grpc_for_http1 {
                    forward::keep_grpc_trailers(&mut rp.headers, ctx.version);
                }
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
                // After retries the last failure is answered, and ESPv2 says it retried.
                let (last, retried) = match &e {
                    ForwardError::Retried(last) => (&**last, true),
                    e => (e, false),
                };
                let err = match last {
                    ForwardError::Connect(how, _) => EspError::bad_gateway(*how, retried),
                    ForwardError::RefusedStream(_) => {
                        EspError::bad_gateway(NetworkFailure::RefusedStream, retried)
                    }
                    ForwardError::Other(_) | ForwardError::Retried(_) => {
                        EspError::bad_gateway(NetworkFailure::Reset, retried)
                    }
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
}
