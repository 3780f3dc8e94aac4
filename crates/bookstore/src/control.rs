//! Request metadata that lets a test steer the Bookstore, applied around every method.
//!
//! | Metadata | Effect |
//! |---|---|
//! | `x-bookstore-fail: <code>` | the call fails at once with this gRPC status code (1–255, canonical or not), as a trailers-only response |
//! | `x-bookstore-fail-message: <text>` | the message for `x-bookstore-fail` (default: the code's name, e.g. `ABORTED`; `bad status` for a non-canonical code) |
//! | `x-bookstore-echo-metadata: a, b-bin` | every value of the named request metadata comes back twice: in the initial metadata and in the trailing metadata |
//! | `x-bookstore-stream-delay-ms: <n>` | streaming methods pause n ms (0–10000) after each message they send |
//! | `x-bookstore-set-health: SERVING` or `NOT_SERVING` | before the call runs, the standard health service (`grpc.health.v1.Health`) says this for the service named by `x-bookstore-set-health-service` (default: the empty name, the server as a whole); it stays so until set again |
//!
//! `ReturnBadStatus` always fails with code 74 (`bad status`), also from here.
//!
//! Bad control values are refused with INVALID_ARGUMENT and a message naming the header, so a
//! mistyped test does not silently pass.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame};
use tonic::metadata::MetadataMap;
use tonic::Status;
use tower::ServiceExt;

use crate::proto::bookstore_server::BookstoreServer;
use crate::service::BookstoreService;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

pub const FAIL: &str = "x-bookstore-fail";
pub const FAIL_MESSAGE: &str = "x-bookstore-fail-message";
pub const ECHO_METADATA: &str = "x-bookstore-echo-metadata";
pub const STREAM_DELAY_MS: &str = "x-bookstore-stream-delay-ms";
pub const SET_HEALTH: &str = "x-bookstore-set-health";
pub const SET_HEALTH_SERVICE: &str = "x-bookstore-set-health-service";
/// Longest service name `x-bookstore-set-health-service` takes.
pub const MAX_HEALTH_SERVICE_NAME: usize = 256;

/// The status `ReturnBadStatus` answers with: not a canonical gRPC code.
pub const BAD_STATUS_CODE: u32 = 74;
/// Most names `x-bookstore-echo-metadata` may list.
pub const MAX_ECHO_NAMES: usize = 32;
/// Longest `x-bookstore-stream-delay-ms`.
pub const MAX_STREAM_DELAY_MS: u64 = 10_000;

/// What the control metadata of one request asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Control {
    /// Fail with this code and message.
    pub fail: Option<(u32, String)>,
    /// Metadata names to echo back.
    pub echo: Vec<HeaderName>,
    /// A health status to set: the service name and whether it is serving.
    pub set_health: Option<(String, bool)>,
}

/// A control header was malformed; the message names it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ControlError(pub String);

/// The canonical name of a gRPC code (`ABORTED`), if it is one.
pub fn code_name(code: u32) -> Option<&'static str> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.get(code as usize).copied()
}

fn single<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h HeaderValue>, ControlError> {
    let mut all = headers.get_all(name).iter();
    let first = all.next();
    if all.next().is_some() {
        return Err(ControlError(format!("{name} is given more than once")));
    }
    Ok(first)
}

/// Reads the control metadata of a request.
pub fn parse(headers: &HeaderMap) -> Result<Control, ControlError> {
    let mut control = Control::default();
    if let Some(v) = single(headers, FAIL)? {
        let code = v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|c| (1..=255).contains(c))
            .ok_or_else(|| {
                ControlError(format!(
                    "{FAIL} must be a gRPC status code from 1 to 255, not {:?}",
                    String::from_utf8_lossy(v.as_bytes())
                ))
            })?;
        let message = match single(headers, FAIL_MESSAGE)? {
            Some(m) => String::from_utf8_lossy(m.as_bytes()).into_owned(),
            None => code_name(code).unwrap_or("bad status").to_string(),
        };
        control.fail = Some((code, message));
    } else if single(headers, FAIL_MESSAGE)?.is_some() {
        return Err(ControlError(format!("{FAIL_MESSAGE} needs {FAIL}")));
    }
    if let Some(v) = single(headers, SET_HEALTH)? {
        let serving = match v.as_bytes() {
            b"SERVING" => true,
            b"NOT_SERVING" => false,
            other => {
                return Err(ControlError(format!(
                    "{SET_HEALTH} must be SERVING or NOT_SERVING, not {:?}",
                    String::from_utf8_lossy(other)
                )))
            }
        };
        let service = match single(headers, SET_HEALTH_SERVICE)? {
            None => String::new(),
            Some(s) => s
                .to_str()
                .ok()
                .filter(|s| s.len() <= MAX_HEALTH_SERVICE_NAME)
                .map(str::to_string)
                .ok_or_else(|| {
                    ControlError(format!(
                        "{SET_HEALTH_SERVICE} must be visible ASCII, at most \
                         {MAX_HEALTH_SERVICE_NAME} bytes"
                    ))
                })?,
        };
        control.set_health = Some((service, serving));
    } else if single(headers, SET_HEALTH_SERVICE)?.is_some() {
        return Err(ControlError(format!(
            "{SET_HEALTH_SERVICE} needs {SET_HEALTH}"
        )));
    }
    for v in headers.get_all(ECHO_METADATA) {
        let text = v
            .to_str()
            .map_err(|_| ControlError(format!("{ECHO_METADATA} must be ASCII")))?;
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let header = HeaderName::from_bytes(name.as_bytes())
                .ok()
                .filter(|h| h.as_str() == name && echoable(name))
                .ok_or_else(|| {
                    ControlError(format!(
                        "{ECHO_METADATA}: {name:?} is not a lowercase metadata name that can be echoed (not grpc-*, content-type, te or x-bookstore-*)"
                    ))
                })?;
            if !control.echo.contains(&header) {
                control.echo.push(header);
            }
            if control.echo.len() > MAX_ECHO_NAMES {
                return Err(ControlError(format!(
                    "{ECHO_METADATA} lists more than {MAX_ECHO_NAMES} names"
                )));
            }
        }
    }
    Ok(control)
}

/// Names whose echo would corrupt the response or the control protocol are refused.
fn echoable(name: &str) -> bool {
    !(name.starts_with("grpc-")
        || name.starts_with("x-bookstore-")
        || matches!(
            name,
            "content-type" | "te" | "content-length" | "transfer-encoding" | "connection"
        ))
}

/// The pause `x-bookstore-stream-delay-ms` asks for (zero when absent).
pub fn stream_delay(metadata: &MetadataMap) -> Result<Duration, Status> {
    let Some(v) = metadata.get(STREAM_DELAY_MS) else {
        return Ok(Duration::ZERO);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|ms| *ms <= MAX_STREAM_DELAY_MS)
        .map(Duration::from_millis)
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "{STREAM_DELAY_MS} must be a number of milliseconds from 0 to {MAX_STREAM_DELAY_MS}"
            ))
        })
}

/// Percent-encodes a grpc-message as the gRPC HTTP/2 spec asks: bytes outside printable ASCII,
/// and `%` itself, become `%XX`.
pub fn encode_grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A trailers-only gRPC response: one HEADERS frame carrying the status.
pub fn trailers_only(code: u32, message: &str) -> http::Response<tonic::body::Body> {
    let mut resp = http::Response::new(tonic::body::Body::default());
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&encode_grpc_message(message)) {
        h.insert("grpc-message", v);
    }
    resp
}

/// The services one server answers: the Bookstore, and the standard health service unless it
/// was left out (`portico bookstore --no-health-service`: calls to it are then UNIMPLEMENTED,
/// as from a server that does not have it).
#[derive(Clone)]
pub struct Services {
    pub bookstore: BookstoreServer<BookstoreService>,
    pub health: Option<(HealthReporter, HealthServer<HealthService>)>,
}

impl Services {
    /// The Bookstore over `store`, with the health service (every name `SERVING` until a call
    /// sets otherwise) when `health` is true.
    pub fn new(store: std::sync::Arc<crate::store::Store>, health: bool) -> Services {
        let health = health.then(|| {
            let reporter = HealthReporter::new();
            let server = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
            (reporter, server)
        });
        Services {
            bookstore: BookstoreServer::new(BookstoreService::new(store)),
            health,
        }
    }
}

/// The gRPC path prefix of the standard health service.
pub const HEALTH_PATH: &str = "/grpc.health.v1.Health/";

/// A request that is not gRPC (its `content-type` does not start with `application/grpc`) is
/// refused as the gRPC HTTP/2 spec asks ("SHOULD respond with HTTP status of 415") and as
/// grpc-go does it: HTTP 415 with a trailers-only INVALID_ARGUMENT naming the content type.
/// tonic itself would try to decode such a body; ESPv2's tests rely on the 415 (an HTTP/JSON
/// call its transcoder passes on untranscoded).
pub fn refuse_non_grpc(headers: &HeaderMap) -> Option<http::Response<tonic::body::Body>> {
    let ct = headers.get(http::header::CONTENT_TYPE);
    if ct.is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")) {
        return None;
    }
    let shown = ct.map_or_else(String::new, |v| {
        String::from_utf8_lossy(v.as_bytes()).into_owned()
    });
    let mut resp = trailers_only(3, &format!("invalid gRPC request content-type {shown:?}"));
    *resp.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
    Some(resp)
}

/// Serves one request: control metadata first, then the tonic service.
pub async fn handle<B>(
    req: http::Request<B>,
    services: Services,
) -> http::Response<tonic::body::Body>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    if let Some(refusal) = refuse_non_grpc(req.headers()) {
        return refusal;
    }
    let control = match parse(req.headers()) {
        Ok(c) => c,
        Err(e) => return trailers_only(3, &e.0),
    };
    let echoed: Vec<(HeaderName, HeaderValue)> = control
        .echo
        .iter()
        .flat_map(|name| {
            req.headers()
                .get_all(name)
                .iter()
                .map(move |v| (name.clone(), v.clone()))
        })
        .collect();
    if let Some((service, serving)) = &control.set_health {
        let Some((reporter, _)) = &services.health else {
            return trailers_only(
                9,
                &format!("{SET_HEALTH}: this server runs without the health service"),
            );
        };
        let status = if *serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status(service, status).await;
    }
    let bad_status = req.uri().path() == format!("{}ReturnBadStatus", crate::SERVICE_PATH);
    let health_call = req.uri().path().starts_with(HEALTH_PATH);
    let mut resp = if let Some((code, message)) = &control.fail {
        trailers_only(*code, message)
    } else if bad_status {
        trailers_only(BAD_STATUS_CODE, "bad status")
    } else if let (true, Some((_, health))) = (health_call, &services.health) {
        match health.clone().oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    } else {
        match services.bookstore.oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    };
    if echoed.is_empty() {
        return resp;
    }
    for (name, value) in &echoed {
        resp.headers_mut().append(name.clone(), value.clone());
    }
    // A trailers-only response has no second header block to echo into.
    if resp.headers().contains_key("grpc-status") {
        return resp;
    }
    let mut trailers = HeaderMap::new();
    for (name, value) in echoed {
        trailers.append(name, value);
    }
    resp.map(|body| {
        tonic::body::Body::new(AppendTrailers {
            inner: body,
            extra: Some(trailers),
        })
    })
}

/// A response body that adds headers to its trailers (or sends them as trailers when the inner
/// body ends without any).
struct AppendTrailers {
    inner: tonic::body::Body,
    extra: Option<HeaderMap>,
}

impl Body for AppendTrailers {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_trailers() {
                Ok(mut trailers) => {
                    if let Some(extra) = self.extra.take() {
                        for (name, value) in extra.iter() {
                            trailers.append(name.clone(), value.clone());
                        }
                    }
                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            Poll::Ready(None) => Poll::Ready(self.extra.take().map(|t| Ok(Frame::trailers(t)))),
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream() && self.extra.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn fail_takes_a_code_and_an_optional_message() {
        let c = parse(&headers(&[(FAIL, "10")])).unwrap();
        assert_eq!(c.fail, Some((10, "ABORTED".to_string())));
        let c = parse(&headers(&[(FAIL, "74")])).unwrap();
        assert_eq!(c.fail, Some((74, "bad status".to_string())));
        let c = parse(&headers(&[(FAIL, "13"), (FAIL_MESSAGE, "disk on fire")])).unwrap();
        assert_eq!(c.fail, Some((13, "disk on fire".to_string())));
        assert_eq!(parse(&HeaderMap::new()).unwrap(), Control::default());
    }

    #[test]
    fn bad_control_values_are_refused_by_name() {
        for (pairs, want) in [
            (
                vec![(FAIL, "0")],
                "x-bookstore-fail must be a gRPC status code from 1 to 255, not \"0\"",
            ),
            (vec![(FAIL, "256")], "from 1 to 255"),
            (vec![(FAIL, "ten")], "from 1 to 255"),
            (
                vec![(FAIL, "5"), (FAIL, "6")],
                "x-bookstore-fail is given more than once",
            ),
            (
                vec![(FAIL_MESSAGE, "x")],
                "x-bookstore-fail-message needs x-bookstore-fail",
            ),
            (
                vec![(ECHO_METADATA, "grpc-status")],
                "\"grpc-status\" is not a lowercase metadata name",
            ),
            (vec![(ECHO_METADATA, "Content-Type")], "\"Content-Type\""),
            (
                vec![(ECHO_METADATA, "x-bookstore-fail")],
                "\"x-bookstore-fail\"",
            ),
            (vec![(ECHO_METADATA, "a b")], "\"a b\""),
        ] {
            let e = parse(&headers(&pairs)).unwrap_err();
            assert!(e.0.contains(want), "{pairs:?}: {}", e.0);
        }
        let many: Vec<String> = (0..=MAX_ECHO_NAMES).map(|i| format!("x-m{i}")).collect();
        let e = parse(&headers(&[(ECHO_METADATA, &many.join(","))])).unwrap_err();
        assert!(e.0.contains("more than 32 names"), "{}", e.0);
    }

    #[test]
    fn health_controls_are_strict() {
        let c = parse(&headers(&[(SET_HEALTH, "NOT_SERVING")])).unwrap();
        assert_eq!(c.set_health, Some((String::new(), false)));
        let c = parse(&headers(&[
            (SET_HEALTH, "SERVING"),
            (SET_HEALTH_SERVICE, "endpoints.examples.bookstore.Bookstore"),
        ]))
        .unwrap();
        assert_eq!(
            c.set_health,
            Some(("endpoints.examples.bookstore.Bookstore".to_string(), true))
        );
        for (pairs, want) in [
            (
                vec![(SET_HEALTH, "serving")],
                "x-bookstore-set-health must be SERVING or NOT_SERVING, not \"serving\"",
            ),
            (
                vec![(SET_HEALTH, "SERVING"), (SET_HEALTH, "SERVING")],
                "x-bookstore-set-health is given more than once",
            ),
            (
                vec![(SET_HEALTH_SERVICE, "x")],
                "x-bookstore-set-health-service needs x-bookstore-set-health",
            ),
        ] {
            assert_eq!(parse(&headers(&pairs)).unwrap_err().0, want, "{pairs:?}");
        }
        let long = "s".repeat(MAX_HEALTH_SERVICE_NAME + 1);
        let e = parse(&headers(&[
            (SET_HEALTH, "SERVING"),
            (SET_HEALTH_SERVICE, &long),
        ]))
        .unwrap_err();
        assert!(e.0.contains("at most 256 bytes"), "{}", e.0);
    }

    #[test]
    fn only_grpc_content_types_are_served() {
        for ok in ["application/grpc", "application/grpc+proto"] {
            assert!(refuse_non_grpc(&headers(&[("content-type", ok)])).is_none());
        }
        let r = refuse_non_grpc(&headers(&[("content-type", "application/json")])).unwrap();
        assert_eq!(r.status(), 415);
        assert_eq!(r.headers()["grpc-status"], "3");
        assert_eq!(
            r.headers()["grpc-message"],
            "invalid gRPC request content-type \"application/json\""
        );
        let r = refuse_non_grpc(&HeaderMap::new()).unwrap();
        assert_eq!(
            r.headers()["grpc-message"],
            "invalid gRPC request content-type \"\""
        );
    }

    #[test]
    fn echo_names_are_collected_once_each() {
        let c = parse(&headers(&[
            (ECHO_METADATA, "x-a, x-b-bin"),
            (ECHO_METADATA, "x-a"),
        ]))
        .unwrap();
        assert_eq!(c.echo, ["x-a", "x-b-bin"]);
    }

    #[test]
    fn stream_delay_is_bounded() {
        let mut m = MetadataMap::new();
        assert_eq!(stream_delay(&m).unwrap(), Duration::ZERO);
        m.insert(STREAM_DELAY_MS, "250".parse().unwrap());
        assert_eq!(stream_delay(&m).unwrap(), Duration::from_millis(250));
        m.insert(STREAM_DELAY_MS, "10001".parse().unwrap());
        assert_eq!(
            stream_delay(&m).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(encode_grpc_message("a b"), "a b");
        assert_eq!(encode_grpc_message("100%\n\u{e9}"), "100%25%0A%C3%A9");
        let r = trailers_only(74, "bad status");
        assert_eq!(r.headers()["grpc-status"], "74");
        assert_eq!(r.headers()["grpc-message"], "bad status");
        assert_eq!(r.headers()["content-type"], "application/grpc");
    }
}
