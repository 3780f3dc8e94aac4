//! Per-request state: the facts gathered before the outcome is known ([`Ctx`]), a request
//! past `prepare` ([`Prepared`]), its routed backend ([`Routed`]), and what the report will
//! need ([`ReportInfo`]). Plain data for the phases; nothing here does I/O.

use super::Pipeline;
use crate::auth::AuthInfo;
use crate::routing::{ConfigRoutes, MethodInfo};
use crate::service_control::{ApiKeyState, CheckOk};
use http::header::{HeaderMap, HeaderValue};
use http::{Method, Version};
use hyper::body::Incoming;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

/// A request's backend under `--enable_backend_routing`.
pub(super) struct Routed {
    pub(super) target: Arc<crate::routing::BackendTarget>,
    /// Path and query sent upstream.
    pub(super) upstream_target: String,
}

/// A request past [`Pipeline::prepare`]: its facts, its settled head and body, and the target
/// to match and forward (normalised, `--rewrite` applied).
pub(super) struct Prepared {
    pub(super) ctx: Ctx,
    pub(super) parts: http::request::Parts,
    pub(super) body: Incoming,
    pub(super) target: String,
    /// The allowed CORS origin, armed in `Ctx::cors_origin` once an API route matched (ESPv2,
    /// [`crate::dialect::Dialect::cors_headers_need_a_route`]).
    pub(super) cors_after_match: Option<HeaderValue>,
}

/// Per-request facts gathered before the outcome is known.
pub(super) struct Ctx {
    /// Whose words the proxy's own answers use.
    pub(super) dialect: crate::dialect::Dialect,
    pub(super) start: Instant,
    pub(super) method: Method,
    pub(super) version: Version,
    pub(super) head: bool,
    pub(super) client_ip: IpAddr,
    pub(super) caller_ip: IpAddr,
    pub(super) tls: bool,
    /// The coding the client accepts for the response, with `--enable_response_compression`.
    pub(super) accept: Option<crate::compression::Encoding>,
    /// What only ESPv2's header rules and `--envoy_use_remote_address` read; allocated only
    /// when they are configured (the request future's size is memory per connection).
    pub(super) conn_facts: Option<Box<ConnFacts>>,
    pub(super) cors_origin: Option<HeaderValue>,
    pub(super) jwt_present: bool,
    /// `Content-Length` of the request body (0 when absent).
    pub(super) request_bytes: u64,
    /// Request line + headers, for the report's request size.
    pub(super) request_head_bytes: u64,
    /// Counts the body's bytes as they are received ([`forward::BODY_UNREAD`] until the body
    /// is forwarded): a client that leaves mid-body is logged with what it sent, not with its
    /// `Content-Length`.
    pub(super) body_counter: Option<Arc<crate::request_body::BodyCount>>,
    pub(super) user_agent: Option<HeaderValue>,
    pub(super) referer: Option<HeaderValue>,
    /// `Content-Type: application/grpc*`: reported with protocol `grpc`.
    pub(super) content_type_grpc: bool,
    /// The request's spans when it is traced ([`crate::trace`]); `None` (no allocation) when not.
    pub(super) trace: Option<Arc<crate::trace::Recorder>>,
    /// ESPv2's untraced request: its trace ID (reports name it, outgoing headers carry it).
    pub(super) unsampled_trace: Option<[u8; 16]>,
    /// `Content-Type: application/grpc-web*`: ESPv2 answers its own refusals of these as
    /// plain HTTP errors (its auth filters run before the gRPC-Web one).
    pub(super) grpc_web: bool,
}

/// The connection's addresses, and the client's request headers the response header rules
/// read (`%REQ(...)%`).
pub(super) struct ConnFacts {
    pub(super) peer: SocketAddr,
    /// When the listener recorded it ([`super::ConnInfo`]).
    pub(super) local: Option<SocketAddr>,
    pub(super) request_headers: HeaderMap,
}

impl Ctx {
    /// The report's `/protocol`: what the client speaks. ESP v1 says `grpc` only for
    /// `application/grpc` calls (its `grpc_pass_through`), so gRPC-Web is HTTP to it; ESPv2
    /// goes by the response's content type, `grpc` for gRPC-Web too.
    pub(super) fn frontend_protocol(&self) -> &'static str {
        let web_as_http = self.grpc_web && self.dialect == crate::dialect::Dialect::Esp;
        if self.content_type_grpc && !web_as_http {
            "grpc"
        } else if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// What the operator's header rules read about this request ([`crate::header_rules`]).
    pub(super) fn rule_facts(&self) -> crate::header_rules::Facts {
        let (peer, local) = match &self.conn_facts {
            Some(c) => (c.peer, c.local),
            None => (SocketAddr::new(self.client_ip, 0), None),
        };
        // An address taken from X-Forwarded-For has no port, which Envoy renders as 0.
        let client_port = if self.client_ip == peer.ip() {
            peer.port()
        } else {
            0
        };
        crate::header_rules::Facts {
            client: SocketAddr::new(self.client_ip, client_port),
            peer,
            local,
            version: self.version,
            start: std::time::SystemTime::now()
                .checked_sub(self.start.elapsed())
                .unwrap_or(std::time::UNIX_EPOCH),
        }
    }
}

pub(super) struct ReportInfo {
    pub(super) config: Arc<ConfigRoutes>,
    pub(super) method: Option<Arc<MethodInfo>>,
    pub(super) api_key: Option<String>,
    pub(super) check: Option<CheckOk>,
    pub(super) check_network_failure: bool,
    /// What `:check` made of `api_key`.
    pub(super) api_key_state: ApiKeyState,
    pub(super) auth: Option<AuthInfo>,
    pub(super) request_headers: Vec<(String, String)>,
    pub(super) response_headers: Vec<(String, String)>,
    /// A long gRPC stream's intermediate reports (ESP v1), once it is forwarded.
    pub(super) stream: Option<Arc<super::stream_report::StreamReporter>>,
}

impl Pipeline {
    pub(super) fn report_info(
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
            api_key_state: ApiKeyState::NotChecked,
            auth: None,
            request_headers: logged_headers(&self.state.settings.log_request_headers, headers),
            response_headers: Vec::new(),
            stream: None,
        }
    }
}

pub(super) fn logged_headers(names: &[String], h: &HeaderMap) -> Vec<(String, String)> {
    names
        .iter()
        .filter_map(|n| {
            h.get(n.as_str())
                .and_then(|v| v.to_str().ok())
                .map(|v| (n.clone(), v.to_string()))
        })
        .collect()
}
