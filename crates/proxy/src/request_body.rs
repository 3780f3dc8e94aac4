//! The client's request body on its way to the backend, and why forwarding fails: what
//! [`crate::forward`] (the forwarder, header rewriting) and [`crate::upstream`] (the HTTP/1.1
//! connection pool) both build on.
//!
//! * [`LimitedBody`]: streams the client's body, refusing it past `--client_max_body_size`
//!   ([`BodyTooLarge`]), reading up to `--client_body_buffer_size` before a backend connection
//!   is taken ([`LimitedBody::poll_fill`]), and telling the client's failures apart
//!   ([`ClientBodyError`]);
//! * [`BodyProgress`]: where the body stands, shared with the request waiting for its backend
//!   (the backend deadline counts from the body's end, the client may pause at most
//!   `--client_body_timeout`, a streamed body must keep `--client_body_min_rate`);
//! * [`ForwardError`]: each failure as one row of ESP's error catalogue.
//!
//! Layer rule: this module imports only [`crate::error`]; `forward` and `upstream` import it,
//! never the other way round, so the two have no import loop.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::error::error_chain;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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

/// What the request's accounting learns from its body: the bytes received ([`BODY_UNREAD`]
/// until the body is forwarded) and when the last one arrived (the access log's
/// `%REQUEST_DURATION%`). Shared between [`LimitedBody`] and the request.
#[derive(Debug)]
pub struct BodyCount {
    bytes: std::sync::atomic::AtomicU64,
    /// gRPC messages received, when the body is counted as gRPC
    /// ([`LimitedBody::with_grpc_message_count`]).
    messages: std::sync::atomic::AtomicU64,
    /// Microseconds from `since` to the body's end, plus one; 0 while it has not ended.
    ended_us: std::sync::atomic::AtomicU64,
    since: std::time::Instant,
}

impl BodyCount {
    /// A count for a request that arrived at `since`.
    pub fn new(since: std::time::Instant) -> Arc<BodyCount> {
        Arc::new(BodyCount {
            bytes: std::sync::atomic::AtomicU64::new(BODY_UNREAD),
            messages: std::sync::atomic::AtomicU64::new(0),
            ended_us: std::sync::atomic::AtomicU64::new(0),
            since,
        })
    }

    /// Bytes received, or [`BODY_UNREAD`].
    pub fn received(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// gRPC messages received so far (0 unless counted).
    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }

    /// From the request's arrival to its body's last byte; `None` while it has not ended.
    pub fn ended_after(&self) -> Option<Duration> {
        match self.ended_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us - 1)),
        }
    }

    fn ended(&self) {
        let us = u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        let _ = self.ended_us.compare_exchange(
            0,
            us.saturating_add(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

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
/// connection's task) and the request waiting for the backend
/// ([`SendWithin`](crate::forward::SendWithin)), which needs to know when the body ended and, on
/// a failure, whose fault it was.
#[derive(Debug)]
pub struct BodyProgress {
    start: tokio::time::Instant,
    /// The longest pause allowed between two reads from the client.
    pub(crate) body_timeout: Duration,
    /// Milliseconds from `start` to the last frame (or the end) of the body.
    last_event_ms: AtomicU64,
    state: AtomicU8,
    /// `--client_body_buffer_size` for this body (0: streamed from the start).
    buffer_size: u64,
    /// The body is being read into the buffer, before a backend connection is taken.
    filling: AtomicBool,
    /// `--client_body_min_rate` (bytes/s), 0: none. Enforced only once the body has outgrown
    /// the buffer and streams to a backend connection it holds.
    pub(crate) min_rate: u64,
    /// Set when the body streams to the backend (it did not fit in the buffer).
    rate_enforced: AtomicBool,
    /// Bytes received from the client so far.
    received: AtomicU64,
    /// Milliseconds spent waiting on the client, up to `wait_start_ms` (time waiting on the
    /// backend to take a frame is not the client's).
    client_ms: AtomicU64,
    /// When the current wait on the client began (milliseconds from `start`).
    wait_start_ms: AtomicU64,
    /// A copy of the body kept to send it again ([`LimitedBody::record_for_replay`]); the
    /// flag spares the lock when nothing is kept.
    recording: AtomicBool,
    record: std::sync::Mutex<Option<Box<Recording>>>,
}

/// The body as read so far, for a retry: at most `limit` bytes, else given up.
#[derive(Debug)]
struct Recording {
    data: bytes::BytesMut,
    /// `data`, frozen once a replay asked for it.
    frozen: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
    limit: usize,
}

/// A request body to send again: its data and trailers, as the client sent them.
#[derive(Debug, Clone, Default)]
pub struct ReplayBody {
    pub data: Vec<Bytes>,
    pub trailers: Option<http::HeaderMap>,
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
            recording: AtomicBool::new(false),
            record: std::sync::Mutex::new(None),
        })
    }

    fn lock_record(&self) -> std::sync::MutexGuard<'_, Option<Box<Recording>>> {
        // A few field writes per critical section: a poisoned lock still holds a usable copy.
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies a frame read from the client into the recording, or gives the recording up
    /// once it passes its limit.
    fn keep(&self, frame: &Frame<Bytes>) {
        if !self.recording.load(Ordering::Acquire) {
            return;
        }
        let mut record = self.lock_record();
        let Some(r) = record.as_mut() else {
            return;
        };
        if let Some(data) = frame.data_ref() {
            if r.data.len() + data.len() > r.limit {
                *record = None;
                self.recording.store(false, Ordering::Release);
                return;
            }
            r.data.extend_from_slice(data);
        } else if let Some(t) = frame.trailers_ref() {
            r.trailers = Some(t.clone());
        }
    }

    /// The whole body, when it was read to its end and kept ([`LimitedBody::record_for_replay`]).
    pub fn recorded(&self) -> Option<ReplayBody> {
        if !self.is_done() {
            return None;
        }
        let mut record = self.lock_record();
        let r = record.as_mut()?;
        let data = r
            .frozen
            .get_or_insert_with(|| std::mem::take(&mut r.data).freeze())
            .clone();
        Some(ReplayBody {
            data: vec![data],
            trailers: r.trailers.clone(),
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
    pub(crate) fn deadline(
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
    /// No connection, or no HTTP exchange on it (how, for the dialects that say so; what).
    #[error("cannot connect to the backend: {1}")]
    Connect(crate::error::NetworkFailure, String),
    /// An HTTP/2 backend refused the stream (`REFUSED_STREAM`): it did not process it.
    #[error("the backend refused the stream: {0}")]
    RefusedStream(String),
    /// The last failure after the request was sent again ([`crate::retry`]).
    #[error("{0} (after retries)")]
    Retried(Box<ForwardError>),
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
    counter: Option<Arc<BodyCount>>,
    /// `None` for a request without a body.
    progress: Option<Arc<BodyProgress>>,
    /// Frames read before the backend connection was taken, sent first; in reverse order once
    /// the buffering is over (popped from the end). A `Vec` and the buffer's size in the
    /// progress: every request future holds this body, twice (docs/performance.md).
    buffered: Vec<Frame<Bytes>>,
    /// Counts gRPC messages into `counter` (boxed: only gRPC requests pay for it).
    grpc_frames: Option<Box<crate::grpc::FrameCounter>>,
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
            grpc_frames: None,
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
    pub fn with_counter(mut self, counter: Option<Arc<BodyCount>>) -> Self {
        if let Some(c) = &counter {
            c.bytes.store(0, Ordering::Relaxed);
        }
        self.counter = counter;
        self
    }

    /// Also counts the gRPC messages of the body into the counter ([`BodyCount::messages`]),
    /// for ESP v1's streaming metrics. Needs [`LimitedBody::with_counter`].
    pub fn with_grpc_message_count(mut self) -> Self {
        if self.counter.is_some() {
            self.grpc_frames = Some(Box::default());
        }
        self
    }

    /// Keeps a copy of the body as it is read, up to `limit` bytes, so that the request can be
    /// sent again once the body has been read whole ([`BodyProgress::recorded`]); a longer
    /// body is not kept. For bodies that stream to the backend from their first byte; one
    /// read into the buffer first is copied from there instead ([`LimitedBody::held_whole`]).
    pub fn record_for_replay(&mut self, limit: usize) {
        if let Some(p) = &self.progress {
            *p.lock_record() = Some(Box::new(Recording {
                data: bytes::BytesMut::new(),
                frozen: None,
                trailers: None,
                limit,
            }));
            p.recording.store(true, Ordering::Release);
        }
    }

    /// The whole body, when it has been read into the buffer before sending
    /// ([`LimitedBody::poll_fill`]) or there is none: to send the request again. `None` for a
    /// body still (partly) with the client.
    pub fn held_whole(&self) -> Option<ReplayBody> {
        if self.progress.as_ref().is_some_and(|p| !p.is_done()) {
            return None;
        }
        let mut body = ReplayBody::default();
        // Held in reverse once the buffering is over.
        for frame in self.buffered.iter().rev() {
            if let Some(d) = frame.data_ref() {
                body.data.push(d.clone());
            } else if let Some(t) = frame.trailers_ref() {
                body.trailers = Some(t.clone());
            }
        }
        Some(body)
    }

    /// A body to send again: `body`'s frames, counted nowhere (the client's bytes were counted
    /// once).
    pub fn replay(body: ReplayBody) -> Self {
        let mut frames: Vec<Frame<Bytes>> = body.data.into_iter().map(Frame::data).collect();
        if let Some(t) = body.trailers {
            frames.push(Frame::trailers(t));
        }
        frames.reverse();
        LimitedBody {
            inner: None,
            remaining: u64::MAX,
            seen: 0,
            counter: None,
            progress: None,
            buffered: frames,
            grpc_frames: None,
        }
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
            grpc_frames: None,
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
                        c.bytes.fetch_add(n, Ordering::Relaxed);
                        if let Some(g) = this.grpc_frames.as_mut() {
                            g.feed(data);
                            c.messages.store(g.messages(), Ordering::Relaxed);
                        }
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
                if let Some(p) = &this.progress {
                    p.keep(&frame);
                }
                // hyper does not poll again once a body says it has ended.
                let state = if inner.is_end_stream() {
                    if let Some(c) = &this.counter {
                        c.ended();
                    }
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
                if let Some(c) = &this.counter {
                    c.ended();
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

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
}
