//! The proxy's own error responses, worded by the dialect ([`crate::dialect`]): a JSON body
//! ([`error_response`]) or, for gRPC clients, a trailers-only response
//! ([`grpc_error_response`]); and the two ways a request is answered before a method is
//! matched (`Pipeline::fail`, `Pipeline::refuse`).

use super::state::{Ctx, ReportInfo};
use super::{Pipeline, ProxyBody};
use crate::auth::AuthError;
use crate::dialect::Dialect;
use crate::error::EspError;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

/// A proxy error for this request in its dialect's words: JSON, or for gRPC clients a
/// trailers-only response carrying `grpc-status`/`grpc-message` (ESP's `grpc_finish`, Envoy's
/// local reply to gRPC).
pub(super) fn proxy_error(err: &EspError, ctx: &Ctx, jwt_present: bool) -> Response<ProxyBody> {
    // A gRPC-Web call is refused in plain HTTP by both: ESPv2's auth filters run before its
    // gRPC-Web one, and ESP v1's error filter answers in gRPC only `application/grpc[+proto]`
    // (error.cc, IsGrpcRequest).
    if ctx.content_type_grpc && !ctx.grpc_web {
        grpc_error_response(err, ctx.dialect)
    } else {
        error_response(err, ctx.dialect, ctx.head, jwt_present)
    }
}

/// gRPC's percent-encoding for `grpc-message`: controls, non-ASCII and `%`.
const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// A proxy error as a gRPC trailers-only response: HTTP 200, the status in the headers.
pub fn grpc_error_response(err: &EspError, dialect: Dialect) -> Response<ProxyBody> {
    let reply = dialect.reply(err);
    let mut resp = Response::new(ProxyBody::empty());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    if let Ok(v) = HeaderValue::from_str(&reply.grpc_code.to_string()) {
        h.insert("grpc-status", v);
    }
    // ESP v1 sends the bare message; ESPv2 (Envoy's local reply to a gRPC client) sends its
    // JSON error body as the message, `{"code":401,"message":"Jwt is missing"}` (ESPv2's
    // TestGRPCJwt), without the body's final newline.
    let text = match dialect {
        Dialect::Esp => std::borrow::Cow::Borrowed(reply.message.as_ref()),
        Dialect::EspV2 => {
            let mut body = dialect.body(err, &reply);
            if body.ends_with('\n') {
                body.pop();
            }
            std::borrow::Cow::Owned(body)
        }
    };
    let msg = percent_encoding::utf8_percent_encode(&text, GRPC_MESSAGE).to_string();
    if let Ok(v) = HeaderValue::from_str(&msg) {
        h.insert("grpc-message", v);
    }
    resp
}

/// A proxy error as an HTTP response: the dialect's JSON body (none for HEAD) and status,
/// `Content-Type`, and `WWW-Authenticate` on 401/403.
pub fn error_response(
    err: &EspError,
    dialect: Dialect,
    head: bool,
    jwt_present: bool,
) -> Response<ProxyBody> {
    let reply = dialect.reply(err);
    let body = if head {
        ProxyBody::empty()
    } else {
        ProxyBody::full(dialect.body(err, &reply))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if (reply.status == 401 || reply.status == 403) && dialect.challenges_every_401_and_403() {
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

impl Pipeline {
    /// A proxy-generated error before any method was matched: ESP's body, logged, not reported.
    pub(super) fn fail(&self, err: EspError, ctx: &Ctx, url: String) -> Response<ProxyBody> {
        self.finalize(
            proxy_error(&err, ctx, false),
            ctx,
            url,
            Some(err),
            None,
            None,
        )
    }

    /// Answers a request refused (or redirected) for its head, before matching: counted,
    /// logged and reported like an unmatched request, never forwarded.
    pub(super) fn refuse(
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

    /// A request refused after it was matched: ESP's error body, reported with the method's
    /// report data (the phases after **match** all answer this way).
    pub(super) fn fail_matched(
        &self,
        err: EspError,
        ctx: &Ctx,
        url: String,
        report: ReportInfo,
    ) -> Response<ProxyBody> {
        self.finalize(
            proxy_error(&err, ctx, ctx.jwt_present),
            ctx,
            url,
            Some(err),
            Some(report),
            None,
        )
    }

    /// A failed **authenticate** phase: ESP's error, and under
    /// `--enable_jwt_authorization_url_redirect` the same JSON body with the status turned into
    /// a redirect to the provider's `authorizationUrl` (missing or expired token only; see
    /// [`AuthError`]).
    pub(super) fn refuse_auth(
        &self,
        e: AuthError,
        ctx: &Ctx,
        target: String,
        report: ReportInfo,
        host: &[u8],
    ) -> Response<ProxyBody> {
        let mut resp = proxy_error(&e.error, ctx, e.token_present);
        if let crate::error::ErrorKind::Jwt(problem) = &e.error.kind {
            if !ctx.dialect.challenges_every_401_and_403() {
                if let Some(v) =
                    crate::dialect::espv2_jwt_challenge(problem, ctx.tls, host, &target)
                {
                    resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
            }
        }
        if self.state.settings.enable_jwt_authorization_url_redirect && !ctx.content_type_grpc {
            if let Some(loc) = e
                .authorization_url
                .as_deref()
                .and_then(|u| HeaderValue::from_str(u).ok())
            {
                *resp.status_mut() = StatusCode::FOUND;
                resp.headers_mut().insert(header::LOCATION, loc);
            }
        }
        self.finalize(resp, ctx, target, Some(e.error), Some(report), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body;

    #[test]
    fn error_response_headers() {
        let esp = Dialect::Esp;
        let r = error_response(&EspError::unregistered_caller(), esp, false, false);
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        assert_eq!(r.headers()["content-type"], "application/json");
        let r = error_response(&EspError::cors_not_allowed(), esp, true, true);
        assert_eq!(
            r.headers()["www-authenticate"],
            "Bearer, error=\"invalid_token\""
        );
        assert!(r.body().is_end_stream());
        let r = error_response(
            &EspError::bad_gateway(crate::error::NetworkFailure::Reset, false),
            esp,
            false,
            false,
        );
        assert!(r.headers().get("www-authenticate").is_none());
        let g = grpc_error_response(&EspError::unregistered_caller(), esp);
        assert_eq!(g.status(), 200);
        assert_eq!(g.headers()["grpc-status"], "16");
        assert_eq!(g.headers()["content-type"], "application/grpc");
        assert!(g.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .starts_with("Method doesn't allow unregistered callers"));
        // ESPv2: Envoy's code for the HTTP status, the JSON body as the message.
        let missing = EspError::new(
            crate::error::Code::Unauthenticated,
            "JWT validation failed: Missing or invalid credentials",
            crate::error::Cause::Auth,
        )
        .with_kind(crate::error::ErrorKind::Jwt(
            crate::error::JwtProblem::Missing,
        ));
        let g = grpc_error_response(&missing, Dialect::EspV2);
        assert_eq!(g.headers()["grpc-status"], "16");
        assert_eq!(
            g.headers()["grpc-message"],
            "{\"code\":401,\"message\":\"Jwt is missing\"}"
        );
    }
}
