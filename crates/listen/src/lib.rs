//! What every Portico listener shares (the proxy's serving ports, its status port, the control
//! plane): no connection may hold a socket for free, and running out of sockets must not turn
//! into a busy loop.
//!
//! - [`ConnLimits`]: nginx's `client_header_timeout` and `keepalive_timeout` for one connection.
//!   A new connection has `header_read_timeout` to deliver its first request head; between
//!   requests it may stay idle for `keep_alive_timeout`, and once the next request's first byte
//!   arrives, the head must be complete within `header_read_timeout`. While a request is in
//!   flight (from its head to the end of its response body) neither applies: the request's own
//!   deadlines do. hyper's `header_read_timeout` is not enough on its own: hyper-util's
//!   auto-detecting builder reads the first bytes (HTTP/1 or HTTP/2?) without any timeout, so a
//!   connection that never sends a byte was never closed, and hyper's one timer cannot tell
//!   "idle between requests" from "slow head".
//! - [`Acceptor`]: `accept` that pauses, exponentially, when the process is out of file
//!   descriptors or buffers (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`), with one warning per
//!   back-off period for the whole process (every serving thread and port has its own listener,
//!   and they run out together) instead of one per attempt.
//! - [`serve_connection`] and [`serve`]: a connection (or a whole listener) served through
//!   hyper-util's auto builder with both, and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// nginx's `client_header_timeout` default.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// nginx's `keepalive_timeout` default.
pub const DEFAULT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(75);

/// Per-connection time limits (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// From a new connection, or from the first byte of a request that follows an idle period,
    /// to the end of that request's head.
    pub header_read_timeout: Duration,
    /// Idle time allowed between the end of a response and the first byte of the next request.
    pub keep_alive_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            keep_alive_timeout: DEFAULT_KEEP_ALIVE_TIMEOUT,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Accepting with back-off.
// ---------------------------------------------------------------------------------------------

/// First pause after a resource-exhaustion error; doubled per consecutive failure.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause: a freed descriptor is used within this.
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// A back-off period (one warning) ends after this long without an exhaustion error.
const QUIET: Duration = Duration::from_secs(10);

/// What an `accept` error means for the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptFailure {
    /// Only that one connection failed (reset before accept, interrupted): try again at once.
    Transient,
    /// The process or the system is out of something: pause before trying again.
    Exhausted,
}

fn classify_accept_error(e: &std::io::Error) -> AcceptFailure {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            AcceptFailure::Exhausted
        }
        Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EINTR | libc::EAGAIN | libc::EPROTO) => {
            AcceptFailure::Transient
        }
        Some(libc::EPERM) => AcceptFailure::Transient,
        // Unknown errors are paused on too: retrying them at once could spin.
        _ => AcceptFailure::Exhausted,
    }
}

/// One listener's back-off schedule, apart from the clock and the socket (unit-tested).
#[derive(Debug, Default)]
struct Backoff {
    /// The next pause; `None` after a success.
    pause: Option<Duration>,
    /// The last exhaustion error, while a back-off period lasts.
    last_failure: Option<Instant>,
    /// Failures in the current period (for the period's closing log line).
    failures: u64,
}

impl Backoff {
    /// How long to pause after an exhaustion error.
    fn failed(&mut self, now: Instant) -> Duration {
        if self
            .last_failure
            .is_none_or(|t| now.duration_since(t) >= QUIET)
        {
            self.failures = 0;
        }
        self.failures += 1;
        self.last_failure = Some(now);
        let pause = self.pause.map_or(FIRST_PAUSE, |p| (p * 2).min(MAX_PAUSE));
        self.pause = Some(pause);
        pause
    }

    /// A connection was accepted: the next failure pauses briefly again, but still belongs
    /// to the same period (no new warning) unless `QUIET` has passed.
    fn succeeded(&mut self, now: Instant) -> Option<u64> {
        self.pause = None;
        match self.last_failure {
            Some(t) if now.duration_since(t) >= QUIET => {
                self.last_failure = None;
                Some(std::mem::take(&mut self.failures))
            }
            _ => None,
        }
    }
}

/// At most one exhaustion warning per `QUIET` period for the whole process.
struct WarnGate(std::sync::Mutex<Option<Instant>>);

impl WarnGate {
    const fn new() -> Self {
        WarnGate(std::sync::Mutex::new(None))
    }

    fn allow(&self, now: Instant) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let allow = last.is_none_or(|t| now.duration_since(t) >= QUIET);
        // Every failure extends the episode, whichever listener saw it.
        *last = Some(now);
        allow
    }
}

static WARNINGS: WarnGate = WarnGate::new();

/// A listener whose [`accept`](Acceptor::accept) never fails and never spins.
pub struct Acceptor {
    listener: tokio::net::TcpListener,
    /// Named in log lines (`--http_port`, `status`, `control plane`).
    name: &'static str,
    backoff: Backoff,
}

impl Acceptor {
    pub fn new(listener: tokio::net::TcpListener, name: &'static str) -> Self {
        Acceptor {
            listener,
            name,
            backoff: Backoff::default(),
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection. Cancel-safe: dropping the future loses no accepted connection.
    pub async fn accept(&mut self) -> (tokio::net::TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(conn) => {
                    if let Some(failures) = self.backoff.succeeded(Instant::now()) {
                        tracing::info!(
                            listener = self.name,
                            failed_accepts = failures,
                            "accepting connections normally again"
                        );
                    }
                    return conn;
                }
                Err(e) => match classify_accept_error(&e) {
                    AcceptFailure::Transient => {
                        tracing::debug!(listener = self.name, error = %e, "accept failed");
                    }
                    AcceptFailure::Exhausted => {
                        let now = Instant::now();
                        let pause = self.backoff.failed(now);
                        if WARNINGS.allow(now) {
                            tracing::warn!(
                                listener = self.name,
                                error = %e,
                                "accept failed; pausing accepts (up to {MAX_PAUSE:?} at a time) \
                                 until connections close; no further warning for this episode"
                            );
                        }
                        tokio::time::sleep(pause).await;
                    }
                },
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Per-connection activity.
// ---------------------------------------------------------------------------------------------

/// No timestamp (milliseconds since the connection's epoch).
const NONE: u64 = u64::MAX;

/// What the connection's IO, its requests and its watchdog share.
#[derive(Debug)]
struct Activity {
    /// tokio's clock, so that tests can run it paused.
    epoch: tokio::time::Instant,
    /// Requests whose response body has not finished.
    in_flight: AtomicUsize,
    /// When the connection last became idle (0: accepted).
    idle_since: AtomicU64,
    /// When the first byte arrived after the connection became idle; `NONE` if none yet.
    /// A new connection starts with 0: its first head is due `header_read_timeout` after
    /// accept, as nginx's wait for the first request is bounded by `client_header_timeout`.
    head_since: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: tokio::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis().min(u128::from(NONE - 1)) as u64
    }

    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_since.load(Ordering::Acquire) == NONE
        {
            self.head_since.store(self.now_ms(), Ordering::Release);
        }
    }

    fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        RequestGuard {
            activity: self.clone(),
        }
    }

    /// Why the connection should close now, if it should; else when to look again.
    fn check(&self, limits: &ConnLimits) -> Result<tokio::time::Instant, Expired> {
        let now = self.now_ms();
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Ok(self.at(now.saturating_add(ms(limits.keep_alive_timeout))));
        }
        let head = self.head_since.load(Ordering::Acquire);
        let (deadline, why) = if head != NONE {
            (
                head.saturating_add(ms(limits.header_read_timeout)),
                Expired::HeaderRead,
            )
        } else {
            (
                self.idle_since
                    .load(Ordering::Acquire)
                    .saturating_add(ms(limits.keep_alive_timeout)),
                Expired::KeepAlive,
            )
        };
        // A request that started while this looked is not cut short.
        if now >= deadline && self.in_flight.load(Ordering::Acquire) == 0 {
            Err(why)
        } else {
            Ok(self.at(deadline.max(now + 1)))
        }
    }

    fn at(&self, ms: u64) -> tokio::time::Instant {
        self.epoch + Duration::from_millis(ms)
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(NONE / 2)) as u64
}

/// Why a connection was closed by its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// A request head was not complete within `header_read_timeout`.
    HeaderRead,
    /// Idle for `keep_alive_timeout`.
    KeepAlive,
}

/// Resolves when the connection has exceeded one of its limits.
async fn watchdog(activity: Arc<Activity>, limits: ConnLimits) -> Expired {
    loop {
        match activity.check(&limits) {
            Err(why) => return why,
            Ok(next) => tokio::time::sleep_until(next).await,
        }
    }
}

/// Marks a request in flight until its response body is finished (or dropped).
struct RequestGuard {
    activity: Arc<Activity>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let a = &self.activity;
        // Timestamps first, count last: the watchdog never sees "idle" with a stale clock.
        a.idle_since.store(a.now_ms(), Ordering::Release);
        a.head_since.store(NONE, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// The connection's socket, noting when bytes arrive.
    struct TrackedIo<IO> {
        #[pin]
        io: IO,
        activity: Arc<Activity>,
    }
}

impl<IO: AsyncRead> AsyncRead for TrackedIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.io.poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.bytes_read();
        }
        res
    }
}

impl<IO: AsyncWrite> AsyncWrite for TrackedIo<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A service whose requests are counted in flight until their response bodies finish.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let guard = self.activity.request_started();
        TrackedFuture {
            fut: self.inner.call(req),
            guard: Some(guard),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's future; a request abandoned half-way (client gone) stops counting.
    struct TrackedFuture<F> {
        #[pin]
        fut: F,
        guard: Option<RequestGuard>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.fut.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(resp)) => {
                let guard = this.guard.take();
                Poll::Ready(Ok(resp.map(|inner| TrackedBody {
                    inner,
                    _guard: guard,
                })))
            }
            Poll::Ready(Err(e)) => {
                this.guard.take();
                Poll::Ready(Err(e))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted in flight until it is dropped.
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        _guard: Option<RequestGuard>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a connection served by [`serve_connection`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The client closed it, or hyper did (protocol error, `Connection: close`, upgrade).
    Done,
    /// Closed by a [`ConnLimits`] timeout.
    Expired(Expired),
    /// Drained after a shutdown signal.
    Shutdown,
}

/// Serves one connection with `builder` (upgrades allowed) under `limits`. When `shutdown`
/// turns `true`, the connection finishes what is in flight and closes (graceful shutdown);
/// the caller bounds how long it waits for that.
pub async fn serve_connection<IO, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: IO,
    service: S,
    limits: ConnLimits,
    mut shutdown: watch::Receiver<bool>,
) -> Closed
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let activity = Activity::new();
    let io = TrackedIo {
        io,
        activity: activity.clone(),
    };
    let service = Tracked {
        inner: service,
        activity: activity.clone(),
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let dog = watchdog(activity, limits);
    tokio::pin!(dog);
    if !*shutdown.borrow() {
        tokio::select! {
            _ = conn.as_mut() => return Closed::Done,
            why = dog.as_mut() => return Closed::Expired(why),
            _ = shutdown.changed() => {}
        }
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn.as_mut() => {}
        // An idle (or silent) connection is not worth waiting for during a drain either.
        _ = dog.as_mut() => {}
    }
    Closed::Shutdown
}

/// Accepts on `acceptor` and serves every connection with `make_service(peer)` until
/// `shutdown` turns `true`; then stops accepting and waits for the connections to drain
/// (callers bound that wait).
pub async fn serve<F, S, B>(
    mut acceptor: Acceptor,
    builder: auto::Builder<TokioExecutor>,
    limits: ConnLimits,
    make_service: F,
    mut shutdown: watch::Receiver<bool>,
) where
    F: Fn(SocketAddr) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let builder = Arc::new(builder);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let (stream, peer) = tokio::select! {
            a = acceptor.accept() => a,
            _ = shutdown.changed() => break,
            // Reap finished connections as they end, so the set stays small.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let _ = stream.set_nodelay(true);
        let service = make_service(peer);
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            serve_connection(&builder, stream, service, limits, shutdown).await;
        });
    }
    drop(acceptor);
    while conns.join_next().await.is_some() {}
}

/// Ctrl-C or SIGTERM (what `kill`, Kubernetes and `portico up` send): the samples' servers
/// (`portico echo`, `portico bookstore`) end on either.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_and_resets_on_success() {
        let mut b = Backoff::default();
        let t0 = Instant::now();
        let pauses: Vec<Duration> = (0..20u64)
            .map(|i| b.failed(t0 + Duration::from_millis(i)))
            .collect();
        assert_eq!(pauses[0], FIRST_PAUSE);
        assert_eq!(pauses[1], FIRST_PAUSE * 2);
        assert_eq!(*pauses.last().expect("pauses"), MAX_PAUSE);
        // A success resets the pause but not the period.
        assert_eq!(b.succeeded(t0 + Duration::from_millis(30)), None);
        assert_eq!(b.failed(t0 + Duration::from_millis(40)), FIRST_PAUSE);
        // After a quiet spell the period is over and its failures are counted once.
        let later = t0 + Duration::from_millis(40) + QUIET;
        assert_eq!(b.succeeded(later), Some(21));
        assert_eq!(b.succeeded(later), None);
    }

    #[test]
    fn one_warning_per_episode_across_listeners() {
        let gate = WarnGate::new();
        let t0 = Instant::now();
        assert!(gate.allow(t0));
        // Other listeners (threads, ports) failing in the same episode stay quiet, and keep
        // the episode going.
        for i in 1..100u64 {
            assert!(!gate.allow(t0 + Duration::from_millis(i * 100)));
        }
        let last = t0 + Duration::from_millis(9_900);
        assert!(!gate.allow(last + QUIET - Duration::from_millis(1)));
        assert!(gate.allow(last + QUIET + QUIET));
    }

    #[test]
    fn accept_errors_are_classified() {
        let os = std::io::Error::from_raw_os_error;
        for e in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(classify_accept_error(&os(e)), AcceptFailure::Exhausted);
        }
        for e in [libc::ECONNABORTED, libc::EINTR] {
            assert_eq!(classify_accept_error(&os(e)), AcceptFailure::Transient);
        }
    }

    fn limits() -> ConnLimits {
        ConnLimits {
            header_read_timeout: Duration::from_secs(60),
            keep_alive_timeout: Duration::from_secs(75),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_new_connection_gets_the_header_timeout() {
        let a = Activity::new();
        let t = tokio::time::Instant::now();
        assert_eq!(watchdog(a, limits()).await, Expired::HeaderRead);
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_secs(60) && waited < Duration::from_secs(61),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_between_requests_gets_keep_alive_then_header_time() {
        let a = Activity::new();
        let g = a.request_started();
        // A long request is never cut.
        let dog = tokio::spawn(watchdog(a.clone(), limits()));
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!dog.is_finished());
        drop(g);
        let idle_at = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(70)).await;
        assert!(!dog.is_finished(), "idle for less than keep-alive");
        // The next request's first byte: now the head has 60 s.
        a.bytes_read();
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(!dog.is_finished(), "head still within its time");
        let why = dog.await.expect("watchdog");
        assert_eq!(why, Expired::HeaderRead);
        let total = idle_at.elapsed();
        assert!(total >= Duration::from_secs(130), "{total:?}");
        assert!(total < Duration::from_secs(131), "{total:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_without_a_byte_closes_after_keep_alive() {
        let a = Activity::new();
        drop(a.request_started());
        let t = tokio::time::Instant::now();
        assert_eq!(watchdog(a, limits()).await, Expired::KeepAlive);
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_secs(75) && waited < Duration::from_secs(76),
            "{waited:?}"
        );
    }
}
