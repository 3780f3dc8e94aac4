//! The upstream side: a pooled keep-alive client to `--backend` (HTTP/1.1 for `http://`, rustls
//! for `https://`, HTTP/2 cleartext for `grpc://`), and the header rewriting ESP's nginx template
//! does on the way (`Host`, `X-Real-IP`, `X-Forwarded-For`, `X-Google-Real-IP`, hop-by-hop
//! removal). Bodies stream in both directions; the request body is counted against
//! `--client_max_body_size` as it flows.
//!
//! Failures are classified so the pipeline can answer as ESP does: connect errors → 502
//! `BAD_GATEWAY`, no response head in time → 504 `GATEWAY_TIMEOUT`, body over the limit → 413.
//! A request body the *client* broke (a malformed chunk, a connection closed half-way, a body
//! that stops arriving) is the client's failure, not the backend's: [`LimitedBody`] records it
//! in its [`BodyProgress`] and the call ends with [`ForwardError::ClientBody`].
//!
//! The backend deadline (`--http_request_timeout_s`, a rule's `deadline`) counts from the end of
//! the request body, as Envoy's route timeout does: a slow upload is not the backend's delay.
//! While the body is still arriving, the client may pause at most `--client_body_timeout`
//! ([`CLIENT_BODY_TIMEOUT`] by default, nginx's) between two reads.
//!
//! A pooled (HTTP/1.1) backend connection is taken only once the body has been read whole, or
//! past `--client_body_buffer_size` ([`CLIENT_BODY_BUFFER_SIZE`]), as nginx buffers before it
//! connects upstream: a client dripping a small body holds no backend connection. A larger body
//! streams, and from then on must keep arriving at `--client_body_min_rate` on average
//! ([`CLIENT_BODY_MIN_RATE`], counted over the time spent waiting on the client, after
//! [`CLIENT_BODY_RATE_GRACE`]), or it is refused with 408 and its backend connection closed.
//! gRPC (`application/grpc*`) and WebSocket requests, and `grpc://` backends, stream from the
//! first byte: buffering would break streaming calls.

use crate::settings::{BackendAddr, BackendScheme};
use crate::upstream::{Dialer, Pool, PoolLimits, UpstreamBody};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use ipnet::IpNet;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_GOOGLE_REAL_IP: HeaderName = HeaderName::from_static("x-google-real-ip");
/// The hop-by-hop headers always removed; `Upgrade` and `TE` are removed unless kept, and the
/// names `Connection` lists only when it is present.
static ALWAYS_HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHORIZATION,
];

/// The request body was longer than `--client_max_body_size`.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// The longest pause allowed between two reads of a request body by default (nginx's
/// `client_body_timeout`).
pub const CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// How much of a request body is read before a pooled backend connection is taken, by default
/// (`--client_body_buffer_size`): nginx's default on 64-bit systems. nginx then spills to a
/// temporary file; Portico streams what does not fit. 16 KiB holds most JSON and form requests
/// whole; more is paid per request in flight, and an HTTP/2 client may have 200 in flight on one
/// connection (hyper's default), so 64 KiB would let one connection hold 12.5 MiB, 16 KiB
/// 3.1 MiB (docs/security.md, "Limits").
pub const CLIENT_BODY_BUFFER_SIZE: usize = 16 * 1024;

/// The lowest average rate, in bytes per second, at which a body too large for the buffer must
/// arrive while it holds a backend connection (`--client_body_min_rate`), as Kestrel's
/// `MinRequestBodyDataRate` (240 bytes/s after a 5 s grace period).
pub const CLIENT_BODY_MIN_RATE: u64 = 240;

/// Time waiting on the client before the minimum rate is enforced.
pub const CLIENT_BODY_RATE_GRACE: Duration = Duration::from_secs(5);

/// A body counter's value before the body is forwarded (the request was answered without
/// reading it): the access log and report then count its `Content-Length`.
pub const BODY_UNREAD: u64 = u64::MAX;

/// How the client's request body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientBodyError {
    /// Not valid HTTP framing (chunk size, chunk extension, ...): the client is answered 400.
    #[error("the client sent a malformed request body")]
    Malformed,
    /// The client closed (or reset) the connection or stream before the body was complete.
    #[error("the client closed the connection before the request body was complete")]
    Closed,
    /// The client stopped sending the body for longer than `--client_body_timeout`, or sent a
    /// body too large to buffer slower than `--client_body_min_rate`.
    #[error("the client stopped sending the request body")]
    Stalled,
}

impl ClientBodyError {
    /// The client's answer, in ESP's error format for errors nginx generates (the upper-case
    /// HTTP name as the message): 400 for a malformed body, 408 for a stalled one (nginx's
    /// `client_body_timeout`), and nginx's 499 for a client that left — written to the access
    /// log and metrics, though nobody is there to read it.
    pub fn esp_error(self) -> crate::error::EspError {
        use crate::error::{Cause, Code, EspError};
        match self {
            ClientBodyError::Malformed => {
                EspError::new(Code::InvalidArgument, "BAD_REQUEST", Cause::Application)
            }
            ClientBodyError::Stalled => EspError::with_status(
                408,
                Code::FailedPrecondition,
                "REQUEST_TIMEOUT",
                Cause::Application,
            ),
            ClientBodyError::Closed => EspError::with_status(
                499,
                Code::Cancelled,
                "CLIENT_CLOSED_REQUEST",
                Cause::Application,
            ),
        }
    }

    /// Which of the three a read error from the client's body is.
    fn of(e: &hyper::Error) -> ClientBodyError {
        if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
            return ClientBodyError::Closed;
        }
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = src {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind::*;
                return match io.kind() {
                    UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => {
                        ClientBodyError::Closed
                    }
                    _ => ClientBodyError::Malformed,
                };
            }
            // An HTTP/2 client resetting its stream has given up on the request.
            if s.downcast_ref::<h2::Error>().is_some_and(|h| h.is_reset()) {
                return ClientBodyError::Closed;
            }
            src = s.source();
        }
        // hyper's own "connection error" when the connection died under the body.
        if e.to_string().contains("connection error") {
            ClientBodyError::Closed
        } else {
            ClientBodyError::Malformed
        }
    }
}

/// Where a request body stands, shared between [`LimitedBody`] (polled by the backend
/// connection's task) and the request waiting for the backend ([`SendWithin`]), which needs to
/// know when the body ended and, on a failure, whose fault it was.
#[derive(Debug)]
pub struct BodyProgress {
    start: tokio::time::Instant,
    /// The longest pause allowed between two reads from the client.
    body_timeout: Duration,
    /// Milliseconds from `start` to the last frame (or the end) of the body.
    last_event_ms: AtomicU64,
    state: AtomicU8,
    /// `--client_body_buffer_size` for this body (0: streamed from the start).
    buffer_size: u64,
    /// The body is being read into the buffer, before a backend connection is taken.
    filling: AtomicBool,
    /// `--client_body_min_rate` (bytes/s), 0: none. Enforced only once the body has outgrown
    /// the buffer and streams to a backend connection it holds.
    min_rate: u64,
    /// Set when the body streams to the backend (it did not fit in the buffer).
    rate_enforced: AtomicBool,
    /// Bytes received from the client so far.
    received: AtomicU64,
    /// Milliseconds spent waiting on the client, up to `wait_start_ms` (time waiting on the
    /// backend to take a frame is not the client's).
    client_ms: AtomicU64,
    /// When the current wait on the client began (milliseconds from `start`).
    wait_start_ms: AtomicU64,
}

/// Not polled yet: the request is still waiting for a backend connection.
const BODY_UNPOLLED: u8 = 0;
/// Waiting for the client's next bytes.
const BODY_WAITING_ON_CLIENT: u8 = 1;
/// A frame was handed to the backend connection, which has not asked for the next yet.
const BODY_WAITING_ON_BACKEND: u8 = 2;
const BODY_DONE: u8 = 3;
const BODY_MALFORMED: u8 = 4;
const BODY_CLOSED: u8 = 5;
const BODY_TOO_LARGE: u8 = 6;

impl BodyProgress {
    fn new() -> Arc<BodyProgress> {
        Arc::new(BodyProgress {
            start: tokio::time::Instant::now(),
            body_timeout: CLIENT_BODY_TIMEOUT,
            last_event_ms: AtomicU64::new(0),
            state: AtomicU8::new(BODY_UNPOLLED),
            buffer_size: 0,
            filling: AtomicBool::new(false),
            min_rate: 0,
            rate_enforced: AtomicBool::new(false),
            received: AtomicU64::new(0),
            client_ms: AtomicU64::new(0),
            wait_start_ms: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis().min(u128::from(u64::MAX)) as u64
    }

    /// The body is waiting for the client's next bytes (called on every `Pending`).
    fn waiting_on_client(&self) {
        if self.state.load(Ordering::Acquire) != BODY_WAITING_ON_CLIENT {
            self.wait_start_ms.store(self.now_ms(), Ordering::Release);
            self.set(BODY_WAITING_ON_CLIENT);
        }
    }

    /// `n` bytes arrived; closes the current wait on the client, if any.
    fn received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::AcqRel);
        if self.state.load(Ordering::Acquire) == BODY_WAITING_ON_CLIENT {
            let waited = self
                .now_ms()
                .saturating_sub(self.wait_start_ms.load(Ordering::Acquire));
            self.client_ms.fetch_add(waited, Ordering::AcqRel);
        }
    }

    /// Bytes of the body received from the client so far.
    pub fn bytes_received(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    /// While waiting on the client with the minimum rate enforced: when the client's average
    /// rate (bytes received over time spent waiting on it) falls below `min_rate`, after the
    /// grace period. Bytes only add up, so this only moves later.
    fn rate_due(&self) -> Option<tokio::time::Instant> {
        if self.min_rate == 0 || !self.rate_enforced.load(Ordering::Acquire) {
            return None;
        }
        let received = self.received.load(Ordering::Acquire);
        let allowed_ms = (received.saturating_mul(1000) / self.min_rate)
            .max(CLIENT_BODY_RATE_GRACE.as_millis() as u64);
        let spent = self.client_ms.load(Ordering::Acquire);
        let left = allowed_ms.saturating_sub(spent);
        let wait_start =
            self.start + Duration::from_millis(self.wait_start_ms.load(Ordering::Acquire));
        Some(wait_start + Duration::from_millis(left))
    }

    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Release);
    }

    fn event(&self, state: u8) {
        let ms = self.start.elapsed().as_millis().min(u128::from(u64::MAX)) as u64;
        self.last_event_ms.store(ms, Ordering::Release);
        self.set(state);
    }

    fn last_event(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.last_event_ms.load(Ordering::Acquire))
    }

    /// The whole body was read from the client (a connection that carried it can be reused).
    pub fn is_done(&self) -> bool {
        self.state.load(Ordering::Acquire) == BODY_DONE
    }

    /// The client's failure, if the body failed because of the client.
    pub fn client_error(&self) -> Option<ClientBodyError> {
        match self.state.load(Ordering::Acquire) {
            BODY_MALFORMED => Some(ClientBodyError::Malformed),
            BODY_CLOSED => Some(ClientBodyError::Closed),
            _ => None,
        }
    }

    /// When the request waiting for its response head should give up, given its backend
    /// deadline `limit` and the time it was sent: `Ok(later)` to look again then, `Err` to stop.
    fn deadline(
        &self,
        sent_at: tokio::time::Instant,
        limit: Duration,
    ) -> Result<tokio::time::Instant, ForwardError> {
        let now = tokio::time::Instant::now();
        let (due, error) = match self.state.load(Ordering::Acquire) {
            // Waiting for a pooled connection (or a dial): the backend side's time.
            BODY_UNPOLLED => (sent_at + limit, ForwardError::Timeout(limit)),
            BODY_WAITING_ON_CLIENT => {
                let stall = self.last_event().max(sent_at) + self.body_timeout;
                (
                    self.rate_due().map_or(stall, |r| r.min(stall)),
                    ForwardError::ClientBody(ClientBodyError::Stalled),
                )
            }
            // The backend is not taking the body, or has it all and has not answered.
            BODY_WAITING_ON_BACKEND | BODY_DONE => (
                self.last_event().max(sent_at) + limit,
                ForwardError::Timeout(limit),
            ),
            BODY_MALFORMED => return Err(ForwardError::ClientBody(ClientBodyError::Malformed)),
            BODY_CLOSED => return Err(ForwardError::ClientBody(ClientBodyError::Closed)),
            _ => return Err(ForwardError::Timeout(limit)),
        };
        if due > now {
            Ok(due)
        } else {
            Err(error)
        }
    }
}

/// Why forwarding failed; each maps to one row of ESP's error catalogue.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot connect to the backend: {0}")]
    Connect(String),
    #[error("the backend did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    BodyTooLarge(BodyTooLarge),
    /// The client broke its own request body: not a backend failure.
    #[error(transparent)]
    ClientBody(ClientBodyError),
    #[error("backend exchange failed: {0}")]
    Other(String),
}

impl ForwardError {
    /// Walks an error's sources for the request body's own verdicts.
    pub(crate) fn from_body_error(e: &(dyn std::error::Error + 'static)) -> Option<ForwardError> {
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = src {
            if let Some(b) = s.downcast_ref::<BodyTooLarge>() {
                return Some(ForwardError::BodyTooLarge(BodyTooLarge { limit: b.limit }));
            }
            if let Some(c) = s.downcast_ref::<ClientBodyError>() {
                return Some(ForwardError::ClientBody(*c));
            }
            src = s.source();
        }
        None
    }
}

/// A request body that streams the client's body and fails once it passes the size limit,
/// so a chunked upload cannot get around `--client_max_body_size`; it also records how the
/// body went ([`BodyProgress`]) and tells the client's failures apart ([`ClientBodyError`]).
pub struct LimitedBody {
    inner: Option<Incoming>,
    remaining: u64,
    /// Bytes seen so far.
    pub seen: u64,
    /// Shared with the request's accounting when the size is not known up front.
    counter: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// `None` for a request without a body.
    progress: Option<Arc<BodyProgress>>,
    /// Frames read before the backend connection was taken, sent first; in reverse order once
    /// the buffering is over (popped from the end). A `Vec` and the buffer's size in the
    /// progress: every request future holds this body, twice (docs/performance.md).
    buffered: Vec<Frame<Bytes>>,
}

impl LimitedBody {
    /// `limit == 0` means unlimited, as in nginx.
    pub fn new(inner: Incoming, limit: u64) -> Self {
        let progress = (!inner.is_end_stream()).then(BodyProgress::new);
        LimitedBody {
            inner: Some(inner),
            remaining: if limit == 0 { u64::MAX } else { limit },
            seen: 0,
            counter: None,
            progress,
            buffered: Vec::new(),
        }
    }

    /// Reads up to `size` bytes of the body ([`LimitedBody::poll_fill`]) before a pooled backend
    /// connection is taken, so a client dripping a small body holds no backend connection; a
    /// body that does not fit then streams, and must keep arriving at `min_rate` bytes/s on
    /// average (0: no minimum) after [`CLIENT_BODY_RATE_GRACE`]. `size == 0`: stream from the
    /// start, as for gRPC and WebSocket requests. Nothing for a request without a body.
    pub fn with_buffer(mut self, size: usize, min_rate: u64) -> Self {
        if let Some(p) = self.progress.as_mut().and_then(Arc::get_mut) {
            p.min_rate = min_rate;
            p.buffer_size = size as u64;
            p.filling = AtomicBool::new(size > 0);
        }
        self
    }

    /// Whether [`LimitedBody::poll_fill`] has anything to do (a request without a body pays one
    /// `None` test).
    pub fn wants_fill(&self) -> bool {
        self.progress
            .as_ref()
            .is_some_and(|p| p.filling.load(Ordering::Relaxed))
    }

    /// Reads the body until it ends or passes the buffer size, keeping its frames to send
    /// first. `Err` when the client broke the body or it is over `--client_max_body_size`.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ForwardError>> {
        let Some(progress) = self.progress.clone() else {
            return Poll::Ready(Ok(()));
        };
        let mut result = Ok(());
        while progress.filling.load(Ordering::Relaxed) {
            match self.poll_inner(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => break,
                Poll::Ready(Some(Err(e))) => {
                    result = Err(ForwardError::from_body_error(&*e)
                        .unwrap_or_else(|| ForwardError::Other(error_chain(&*e))));
                    break;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    self.hold(frame);
                    if self.inner.as_ref().is_none_or(|b| b.is_end_stream()) {
                        break;
                    }
                    if self.seen > progress.buffer_size {
                        // Too large to hold: it streams, on a connection it now holds.
                        progress.rate_enforced.store(true, Ordering::Release);
                        break;
                    }
                }
            }
        }
        progress.filling.store(false, Ordering::Relaxed);
        self.buffered.reverse();
        Poll::Ready(result)
    }

    /// The longest pause allowed between two reads from the client (default
    /// [`CLIENT_BODY_TIMEOUT`]).
    pub fn with_body_timeout(mut self, timeout: Duration) -> Self {
        // Only while building: nothing shares the progress yet.
        if let Some(p) = self.progress.as_mut().and_then(Arc::get_mut) {
            p.body_timeout = timeout;
        }
        self
    }

    /// How the body is going; `None` when the request has no body.
    pub fn progress(&self) -> Option<&Arc<BodyProgress>> {
        self.progress.as_ref()
    }

    /// Also adds every byte received to `counter`, which starts at 0 here: until the body is
    /// forwarded it holds [`BODY_UNREAD`].
    pub fn with_counter(
        mut self,
        counter: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    ) -> Self {
        if let Some(c) = &counter {
            c.store(0, Ordering::Relaxed);
        }
        self.counter = counter;
        self
    }

    /// An empty body (for requests the pipeline builds itself).
    pub fn empty() -> Self {
        LimitedBody {
            inner: None,
            remaining: u64::MAX,
            seen: 0,
            counter: None,
            progress: None,
            buffered: Vec::new(),
        }
    }
}

fn record(progress: &Option<Arc<BodyProgress>>, state: u8) {
    if let Some(p) = progress {
        p.event(state);
    }
}

impl LimitedBody {
    /// Keeps a frame read while buffering. Data frames are joined into one: a body sent as
    /// thousands of one-byte chunks must not cost a frame (~100 bytes) per byte.
    fn hold(&mut self, frame: Frame<Bytes>) {
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(other) => return self.buffered.push(other),
        };
        let Some(last) = self.buffered.pop() else {
            return self.buffered.push(Frame::data(data));
        };
        match last.into_data() {
            Ok(prev) => {
                // Unique after the first join, so this grows one buffer in place (amortised).
                let mut joined = prev
                    .try_into_mut()
                    .unwrap_or_else(|shared| bytes::BytesMut::from(&shared[..]));
                joined.extend_from_slice(&data);
                self.buffered.push(Frame::data(joined.freeze()));
            }
            Err(other) => {
                self.buffered.push(other);
                self.buffered.push(Frame::data(data));
            }
        }
    }

    /// The client's next frame, counted against the limit and recorded in the progress.
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(&mut *inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    this.seen += n;
                    if let Some(p) = &this.progress {
                        p.received(n);
                    }
                    if let Some(c) = &this.counter {
                        c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    }
                    if n > this.remaining {
                        this.inner = None;
                        record(&this.progress, BODY_TOO_LARGE);
                        // What was allowed: the bytes before this frame and what remained.
                        let limit = (this.seen - n).saturating_add(this.remaining);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit }))));
                    }
                    this.remaining -= n;
                }
                // hyper does not poll again once a body says it has ended.
                let state = if inner.is_end_stream() {
                    BODY_DONE
                } else {
                    BODY_WAITING_ON_BACKEND
                };
                record(&this.progress, state);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let why = ClientBodyError::of(&e);
                this.inner = None;
                record(
                    &this.progress,
                    match why {
                        ClientBodyError::Malformed => BODY_MALFORMED,
                        _ => BODY_CLOSED,
                    },
                );
                tracing::debug!(error = %error_chain(&e), %why, "client request body failed");
                Poll::Ready(Some(Err(Box::new(why))))
            }
            Poll::Ready(None) => {
                record(&this.progress, BODY_DONE);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if let Some(p) = &this.progress {
                    p.waiting_on_client();
                }
                Poll::Pending
            }
        }
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.buffered.pop() {
            return Poll::Ready(Some(Ok(frame)));
        }
        self.poll_inner(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_empty() && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self
            .inner
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_else(|| SizeHint::with_exact(0));
        if self.buffered.is_empty() {
            return inner;
        }
        let held: u64 = self
            .buffered
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(held));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(held));
        }
        hint
    }
}

enum Upstream {
    /// HTTP/1.1 (`http://`, `https://`): this crate's capped pool ([`crate::upstream`]).
    Pooled(Pool),
    /// HTTP/2 cleartext (`grpc://`): one multiplexed connection, hyper-util's client.
    H2(Box<Client<HttpConnector, LimitedBody>>),
}

/// The upstream client for one serving thread (or, for `x-google-backend` routes, shared by
/// all). Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct Forwarder {
    upstream: std::sync::Arc<Upstream>,
    scheme: Scheme,
    authority: Authority,
    version: Version,
    timeout: Duration,
}

/// Build error for the upstream client.
#[derive(Debug, thiserror::Error)]
pub enum ForwarderBuildError {
    #[error("invalid backend authority {0:?}")]
    Authority(String),
    #[error("cannot set up TLS to the backend: {0}")]
    Tls(String),
}

/// Trust anchors for `https://` backends: the public web PKI plus, optionally, a PEM bundle
/// (`--backend_ca_cert_path`) for backends with a private CA or a self-signed certificate.
pub fn backend_roots(
    extra_pem: Option<&std::path::Path>,
) -> Result<rustls::RootCertStore, ForwarderBuildError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_pem {
        let pem = std::fs::read(path).map_err(|e| {
            ForwarderBuildError::Tls(format!("cannot read {}: {e}", path.display()))
        })?;
        let certs = rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ForwarderBuildError::Tls(format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(ForwarderBuildError::Tls(format!(
                "{} holds no PEM certificate",
                path.display()
            )));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| ForwarderBuildError::Tls(format!("{}: {e}", path.display())))?;
        }
    }
    Ok(roots)
}

impl Forwarder {
    /// A client for `backend`; `roots` are the trust anchors for `https://` (see
    /// [`backend_roots`]), unused otherwise.
    pub fn new(
        backend: &BackendAddr,
        timeout: Duration,
        roots: Option<rustls::RootCertStore>,
        limits: PoolLimits,
    ) -> Result<Forwarder, ForwarderBuildError> {
        let authority: Authority = backend
            .authority()
            .parse()
            .map_err(|_| ForwarderBuildError::Authority(backend.authority()))?;
        let (upstream, scheme, version) = match backend.scheme {
            BackendScheme::Http => (
                Upstream::Pooled(Pool::new(
                    Dialer::Plain {
                        authority: backend.authority(),
                    },
                    limits,
                )),
                Scheme::HTTP,
                Version::HTTP_11,
            ),
            BackendScheme::Grpc => {
                let mut http = HttpConnector::new();
                http.set_nodelay(true);
                http.set_keepalive(Some(Duration::from_secs(60)));
                let mut builder = Client::builder(TokioExecutor::new());
                builder
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(Duration::from_secs(90))
                    .set_host(false)
                    .http2_only(true);
                (
                    Upstream::H2(Box::new(builder.build(http))),
                    Scheme::HTTP,
                    Version::HTTP_2,
                )
            }
            BackendScheme::Https => {
                let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
                let roots = match roots {
                    Some(r) => r,
                    None => backend_roots(None)?,
                };
                let mut tls = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| ForwarderBuildError::Tls(e.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                tls.alpn_protocols = vec![b"http/1.1".to_vec()];
                let server_name = rustls::pki_types::ServerName::try_from(backend.host.clone())
                    .map_err(|e| ForwarderBuildError::Tls(format!("{}: {e}", backend.host)))?;
                (
                    Upstream::Pooled(Pool::new(
                        Dialer::Tls {
                            authority: backend.authority(),
                            server_name,
                            connector: tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls)),
                        },
                        limits,
                    )),
                    Scheme::HTTPS,
                    Version::HTTP_11,
                )
            }
        };
        Ok(Forwarder {
            upstream: std::sync::Arc::new(upstream),
            scheme,
            authority,
            version,
            timeout,
        })
    }

    /// Connections open to the backend (busy and idle), for HTTP/1.1 backends.
    pub fn open_connections(&self) -> Option<usize> {
        match &*self.upstream {
            Upstream::Pooled(p) => Some(p.open_connections()),
            Upstream::H2(_) => None,
        }
    }

    /// The upstream URI for a request target (path and query as the client sent it, after
    /// `--rewrite`): origin-form for HTTP/1.1 backends, which is what goes on the wire; absolute
    /// for HTTP/2, whose client takes `:scheme` and `:authority` from it.
    pub fn upstream_uri(&self, path_and_query: &str) -> Result<Uri, ForwardError> {
        let pq: PathAndQuery = path_and_query.parse().map_err(|_| {
            ForwardError::Other(format!("invalid request target {path_and_query:?}"))
        })?;
        if let Upstream::Pooled(_) = &*self.upstream {
            return Ok(Uri::from(pq));
        }
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|e| ForwardError::Other(e.to_string()))
    }

    /// The backend's `host[:port]`, nginx's `$proxy_host`: the `Host` sent when the client
    /// gave none (an HTTP/1.0 request), since HTTP/1.1 to the backend requires one.
    pub fn backend_host(&self) -> Option<HeaderValue> {
        HeaderValue::from_str(self.authority.as_str()).ok()
    }

    /// HTTP version spoken to the backend.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Sends a prepared request and waits (bounded) for the response head.
    pub fn send(&self, req: Request<LimitedBody>) -> SendWithin<impl Future<Output = Sent>> {
        self.send_within(req, None)
    }

    /// [`send`](Self::send) with a per-request timeout (a backend rule's `deadline`) instead of
    /// the client's default. The time waiting for a pooled connection counts.
    ///
    /// Built synchronously rather than as an `async fn`: every request's future holds this one
    /// in place, and an `async fn` would keep a second copy of the request (its argument) next
    /// to the pool's future that owns it. The future borrows nothing from the forwarder.
    pub fn send_within(
        &self,
        req: Request<LimitedBody>,
        timeout: Option<Duration>,
    ) -> SendWithin<impl Future<Output = Sent>> {
        let limit = timeout.unwrap_or(self.timeout);
        let progress = req.body().progress().cloned();
        let call = match &*self.upstream {
            Upstream::Pooled(pool) => Call::Pooled {
                fut: pool.send(req),
            },
            Upstream::H2(c) => {
                let fut = c.request(req);
                Call::H2 {
                    fut: Box::pin(async move {
                        match fut.await {
                            Ok(resp) => Ok(resp.map(UpstreamBody::unpooled)),
                            Err(e) => Err(classify(&e)),
                        }
                    }),
                }
            }
        };
        let sent_at = tokio::time::Instant::now();
        // With a body, look first at whichever of its limits comes first.
        let first = progress.as_ref().map_or(limit, |p| {
            let first = limit.min(p.body_timeout);
            // The minimum rate can trip as early as the end of its grace period.
            if p.min_rate > 0 {
                first.min(CLIENT_BODY_RATE_GRACE)
            } else {
                first
            }
        });
        SendWithin {
            call,
            sleep: tokio::time::sleep_until(sent_at + first),
            limit,
            sent_at,
            progress,
        }
    }
}

/// What sending a request to the backend gives: the response head, or why not.
pub type Sent = Result<Response<UpstreamBody>, ForwardError>;

pin_project_lite::pin_project! {
    /// The backend call behind [`Forwarder::send_within`]: pooled HTTP/1.1 in place, HTTP/2
    /// (hyper-util's client, gRPC backends) boxed.
    #[project = CallProj]
    enum Call<P> {
        Pooled { #[pin] fut: P },
        H2 { fut: Pin<Box<dyn Future<Output = Sent> + Send>> },
    }
}

impl<P: Future<Output = Sent>> Future for Call<P> {
    type Output = Sent;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Sent> {
        match self.project() {
            CallProj::Pooled { fut } => fut.poll(cx),
            CallProj::H2 { fut } => fut.as_mut().poll(cx),
        }
    }
}

pin_project_lite::pin_project! {
    /// [`Forwarder::send_within`]'s future: the backend call, bounded by its deadline counted
    /// from the end of the request body (see the module docs).
    pub struct SendWithin<P> {
        #[pin]
        call: Call<P>,
        #[pin]
        sleep: tokio::time::Sleep,
        limit: Duration,
        sent_at: tokio::time::Instant,
        progress: Option<Arc<BodyProgress>>,
    }
}

impl<P: Future<Output = Sent>> Future for SendWithin<P> {
    type Output = Sent;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Sent> {
        let mut this = self.project();
        if let Poll::Ready(r) = this.call.poll(cx) {
            // However hyper words a failure, a body the client broke is the client's.
            let client = this.progress.as_ref().and_then(|p| p.client_error());
            return Poll::Ready(match (r, client) {
                (Err(_), Some(c)) => Err(ForwardError::ClientBody(c)),
                (r, _) => r,
            });
        }
        loop {
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let next = match this.progress.as_ref() {
                None => Err(ForwardError::Timeout(*this.limit)),
                Some(p) => p.deadline(*this.sent_at, *this.limit),
            };
            match next {
                Ok(later) => this.sleep.as_mut().reset(later),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

fn classify(e: &hyper_util::client::legacy::Error) -> ForwardError {
    if let Some(f) = std::error::Error::source(e).and_then(ForwardError::from_body_error) {
        return f;
    }
    if e.is_connect() {
        ForwardError::Connect(error_chain(e))
    } else {
        ForwardError::Other(error_chain(e))
    }
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those the `Connection` header names.
/// `keep_upgrade` keeps `Upgrade` for WebSocket pass-through; `keep_te_trailers` keeps
/// `TE: trailers`, which gRPC requires.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool, keep_te_trailers: bool) {
    // Most requests and responses carry none of these: one pass over the few names present
    // is cheaper than the nine hashed removals below (1.7 % of a request's CPU in `perf`).
    let hop_by_hop =
        |n: &HeaderName| ALWAYS_HOP_BY_HOP.contains(n) || n == header::UPGRADE || n == header::TE;
    if !h.keys().any(hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if keep_upgrade && n == header::UPGRADE {
            continue;
        }
        if keep_te_trailers && n == header::TE {
            continue;
        }
        h.remove(&n);
    }
    for n in &ALWAYS_HOP_BY_HOP {
        h.remove(n);
    }
    if !keep_upgrade {
        h.remove(header::UPGRADE);
    }
    let te_is_trailers = h
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("trailers"));
    if !(keep_te_trailers && te_is_trailers) {
        h.remove(header::TE);
    }
}

/// nginx's `$host`: the Host header (or the h2 `:authority`) without port, lower-cased.
pub fn client_host(uri: &Uri, headers: &HeaderMap) -> Option<HeaderValue> {
    let raw = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))?;
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // IPv6 literal: keep the brackets, drop the port.
        match rest.find(']') {
            Some(i) => &raw[..i + 2],
            None => raw,
        }
    } else {
        raw.split(':').next().unwrap_or(raw)
    };
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        HeaderValue::from_str(&host.to_ascii_lowercase()).ok()
    } else {
        HeaderValue::from_str(host).ok()
    }
}

/// nginx `real_ip` with `real_ip_header X-Forwarded-For` and `real_ip_recursive on`: when the
/// peer is trusted, walk X-Forwarded-For from the right past trusted addresses; the first
/// untrusted one is the client. With ESP's list (everything trusted) that is the left-most
/// valid entry; with Portico's default (loopback, private, link-local) a client's own
/// X-Forwarded-For never wins over the address a trusted proxy saw. An IPv4 address seen
/// through an IPv6 socket (`::ffff:a.b.c.d`) is matched as the IPv4 address it is.
pub fn real_client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| {
        let canonical = ip.to_canonical();
        trusted
            .iter()
            .any(|n| n.contains(ip) || n.contains(&canonical))
    };
    if !is_trusted(&peer) {
        return peer;
    }
    let mut entries: Vec<&str> = Vec::new();
    for v in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(s) = v.to_str() {
            entries.extend(s.split(',').map(str::trim).filter(|e| !e.is_empty()));
        }
    }
    let mut current = peer;
    for e in entries.iter().rev() {
        let Ok(ip) = e.parse::<IpAddr>() else { break };
        current = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    current
}

/// `--client_ip_header`/`--client_ip_position`: the caller IP reported to Service Control.
pub fn ip_from_header(headers: &HeaderMap, name: &str, position: i32) -> Option<IpAddr> {
    let v = headers.get(name)?.to_str().ok()?;
    let parts: Vec<&str> = v.split(',').map(str::trim).collect();
    let idx = if position < 0 {
        parts.len().checked_sub(position.unsigned_abs() as usize)?
    } else {
        position as usize
    };
    parts.get(idx)?.parse().ok()
}

/// Sets the forwarding headers ESP's nginx template sets (`X-Real-IP`, `X-Forwarded-For`
/// appended, `X-Google-Real-IP`, `Host`).
pub fn set_forwarding_headers(h: &mut HeaderMap, client_ip: IpAddr, host: Option<HeaderValue>) {
    let ip_text = client_ip.to_string();
    let ip_value = HeaderValue::from_str(&ip_text).unwrap_or_else(|_| HeaderValue::from_static(""));
    // $proxy_add_x_forwarded_for: all incoming copies joined, then the client address.
    let mut xff = String::new();
    for v in h.get_all(&X_FORWARDED_FOR) {
        if let Ok(s) = v.to_str() {
            if !xff.is_empty() {
                xff.push_str(", ");
            }
            xff.push_str(s);
        }
    }
    let xff_value = if xff.is_empty() {
        ip_value.clone()
    } else {
        xff.push_str(", ");
        xff.push_str(&ip_text);
        HeaderValue::from_str(&xff).unwrap_or_else(|_| ip_value.clone())
    };
    h.insert(&X_FORWARDED_FOR, xff_value);
    h.insert(&X_REAL_IP, ip_value.clone());
    h.insert(&X_GOOGLE_REAL_IP, ip_value);
    if let Some(host) = host {
        h.insert(header::HOST, host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|x| x.parse().unwrap()).collect()
    }

    #[test]
    fn real_ip_default_trust_takes_leftmost() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 2.2.2.2"),
        );
        let ip = real_client_ip(
            "127.0.0.1".parse().unwrap(),
            &h,
            &nets(&["0.0.0.0/0", "::/0"]),
        );
        assert_eq!(ip.to_string(), "1.1.1.1");
    }

    #[test]
    fn real_ip_stops_at_first_untrusted_from_the_right() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 2.2.2.2, 10.0.0.5"),
        );
        let t = nets(&["10.0.0.0/8", "127.0.0.0/8"]);
        assert_eq!(
            real_client_ip("127.0.0.1".parse().unwrap(), &h, &t).to_string(),
            "2.2.2.2"
        );
        // An untrusted peer's header is ignored entirely.
        assert_eq!(
            real_client_ip("8.8.8.8".parse().unwrap(), &h, &t).to_string(),
            "8.8.8.8"
        );
    }

    #[test]
    fn default_trust_ignores_a_public_clients_own_xff() {
        let t: Vec<IpNet> = crate::settings::DEFAULT_XFF_TRUSTED_PROXY_LIST
            .split(',')
            .map(|n| n.trim().parse().unwrap())
            .collect();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        // A public client speaking for itself: its header is ignored.
        for peer in ["203.0.113.9", "::ffff:203.0.113.9", "2001:db8::9"] {
            assert_eq!(
                real_client_ip(peer.parse().unwrap(), &h, &t),
                peer.parse::<IpAddr>().unwrap()
            );
        }
        // A local load balancer or mesh ingress passes the real client through, however
        // many private hops; the client's own prefix before it does not win.
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 198.51.100.4, 10.0.0.7"),
        );
        for peer in ["127.0.0.1", "10.1.1.1", "::ffff:192.168.0.2", "fd00::1"] {
            assert_eq!(
                real_client_ip(peer.parse().unwrap(), &h, &t).to_string(),
                "198.51.100.4",
                "{peer}"
            );
        }
    }

    #[test]
    fn client_ip_header_positions() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 2.2.2.2, 3.3.3.3"),
        );
        assert_eq!(
            ip_from_header(&h, "x-forwarded-for", -2)
                .unwrap()
                .to_string(),
            "2.2.2.2"
        );
        assert_eq!(
            ip_from_header(&h, "x-forwarded-for", 0)
                .unwrap()
                .to_string(),
            "1.1.1.1"
        );
        assert!(ip_from_header(&h, "x-forwarded-for", 5).is_none());
        assert!(ip_from_header(&h, "x-forwarded-for", -4).is_none());
    }

    #[test]
    fn forwarding_headers_append_xff() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("9.9.9.9"));
        h.append("x-forwarded-for", HeaderValue::from_static("8.8.8.8"));
        set_forwarding_headers(
            &mut h,
            "9.9.9.9".parse().unwrap(),
            Some(HeaderValue::from_static("api.example")),
        );
        assert_eq!(h["x-forwarded-for"], "9.9.9.9, 8.8.8.8, 9.9.9.9");
        assert_eq!(h["x-real-ip"], "9.9.9.9");
        assert_eq!(h["x-google-real-ip"], "9.9.9.9");
        assert_eq!(h["host"], "api.example");
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false, false);
        assert_eq!(h.len(), 1, "{h:?}");
        let mut h2 = HeaderMap::new();
        h2.insert("te", HeaderValue::from_static("trailers"));
        h2.insert("upgrade", HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h2, true, true);
        assert_eq!(h2.len(), 2);
    }

    #[test]
    fn each_hop_by_hop_header_goes_alone() {
        // The no-hop-by-hop fast path must not skip a map whose only such header is one of them.
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "trailer",
            "transfer-encoding",
            "proxy-authorization",
            "upgrade",
            "te",
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static("x"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h, false, false);
            assert_eq!(h.len(), 1, "{name}: {h:?}");
            assert!(h.contains_key("x-kept"));
        }
    }

    #[test]
    fn buffered_data_frames_are_joined_and_trailers_kept_apart() {
        let mut b = LimitedBody::empty();
        for part in ["ab", "c", "def"] {
            b.hold(Frame::data(Bytes::from(part)));
        }
        b.hold(Frame::trailers(HeaderMap::new()));
        b.hold(Frame::data(Bytes::from("g")));
        assert_eq!(b.buffered.len(), 3);
        assert_eq!(
            b.buffered[0].data_ref().map(|d| &d[..]),
            Some(&b"abcdef"[..])
        );
        assert!(b.buffered[1].is_trailers());
        assert_eq!(b.buffered[2].data_ref().map(|d| &d[..]), Some(&b"g"[..]));
    }

    #[test]
    fn the_minimum_rate_counts_only_time_spent_waiting_on_the_client() {
        let mut p = BodyProgress::new();
        let Some(q) = Arc::get_mut(&mut p) else {
            panic!("unshared")
        };
        q.min_rate = 100;
        // Not past the buffer: no minimum.
        assert!(p.rate_due().is_none());
        p.rate_enforced.store(true, Ordering::Release);
        let at = |ms: u64| p.start + Duration::from_millis(ms);
        // 1,000 bytes at 100 bytes/s allow 10 s of waiting on the client.
        p.received.store(1000, Ordering::Release);
        p.wait_start_ms.store(0, Ordering::Release);
        assert_eq!(p.rate_due(), Some(at(10_000)));
        // 4 s of it spent, then 100 s waiting on the backend, which is not the client's:
        // a new wait from 104 s has 11 s - 4 s left.
        p.client_ms.store(4_000, Ordering::Release);
        p.received.store(1100, Ordering::Release);
        p.wait_start_ms.store(104_000, Ordering::Release);
        assert_eq!(p.rate_due(), Some(at(111_000)));
        // Few bytes: the grace period still applies.
        p.received.store(1, Ordering::Release);
        p.client_ms.store(0, Ordering::Release);
        p.wait_start_ms.store(0, Ordering::Release);
        assert_eq!(p.rate_due(), Some(at(5_000)));
    }

    #[test]
    fn host_drops_port_and_lowercases() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("LocalHost:8082"));
        assert_eq!(
            client_host(&Uri::from_static("/"), &h).unwrap(),
            "localhost"
        );
        h.insert("host", HeaderValue::from_static("[::1]:80"));
        assert_eq!(client_host(&Uri::from_static("/"), &h).unwrap(), "[::1]");
        let h = HeaderMap::new();
        assert_eq!(
            client_host(&Uri::from_static("http://a.b:1/x"), &h).unwrap(),
            "a.b"
        );
    }
}
