//! The upstream side: a pooled keep-alive client to `--backend` (HTTP/1.1 for `http://`, rustls
//! for `https://`, HTTP/2 cleartext for `grpc://`), and the header rewriting ESP's nginx template
//! does on the way (`Host`, `X-Real-IP`, `X-Forwarded-For`, `X-Google-Real-IP`, hop-by-hop
//! removal). Bodies stream in both directions; the request body is counted against
//! `--client_max_body_size` as it flows.
//!
//! A backend rule's `protocol` (`h2`, `grpc`) asks for HTTP/2 where the scheme implies
//! HTTP/1.1: with prior knowledge (h2c) over `http://`, negotiated by ALPN (`h2` alone) over
//! `https://` ([`Forwarder::with_protocol`]).
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
//! gRPC (`application/grpc*`) and WebSocket requests, and HTTP/2 backends, stream from the
//! first byte: buffering would break streaming calls.
//!
//! With ESPv2's retries ([`Forwarder::with_retries`], rules in [`crate::retry`]) a call is a
//! loop of attempts inside the same deadline: an attempt that failed or got an answer the
//! policy retries is made again when the request is at hand — given back unwritten by the pool,
//! or kept: its body read whole into the buffer first (pooled backends) or copied as it streams
//! (HTTP/2 backends), at most [`REPLAY_BODY_LIMIT`] bytes.

use crate::backend_net::{BackendNet, NetResolver};
use crate::error::error_chain;
use crate::retry::{Failure, Retries};
use crate::settings::{BackendAddr, BackendScheme, XffHops};
use crate::upstream::{Dialer, Pool, PoolLimits, Unsent, UpstreamBody};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use ipnet::IpNet;
pub use portico_config::service::BackendProtocol;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

// The request body and the failure types are part of the forwarder's API (`send` takes a
// `Request<LimitedBody>`, answers `ForwardError`), so they are named here too.
pub use crate::request_body::{
    BodyCount, BodyProgress, BodyTooLarge, ClientBodyError, ForwardError, LimitedBody, BODY_UNREAD,
    CLIENT_BODY_BUFFER_SIZE, CLIENT_BODY_MIN_RATE, CLIENT_BODY_RATE_GRACE, CLIENT_BODY_TIMEOUT,
};

pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub static X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
pub static X_ENVOY_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-envoy-original-method");

/// The trailers a gRPC response to an HTTP/1.1 client announces in its `Trailer` header: hyper
/// writes only the trailer fields announced there (and only to a client that sent
/// `TE: trailers`, as gRPC clients do).
pub const GRPC_TRAILERS_ANNOUNCED: &str = "grpc-status, grpc-message, grpc-status-details-bin";

/// ESPv2's `--enable_grpc_for_http1` (on by default) on a backend's response head. Envoy's
/// HTTP/1 codec then encodes trailers (`enable_trailers`), and ESPv2's gRPC metadata scrubber
/// removes `Content-Length` from gRPC responses, which would otherwise make the HTTP/1 codec
/// drop the trailers. Here: a gRPC (not gRPC-Web) response loses `Content-Length`, and to an
/// HTTP/1.1 client it announces the gRPC status trailers, unless it is trailers-only (the
/// status is already in the head). Without the flag an HTTP/1.1 client gets no trailers, as
/// from Envoy without `enable_trailers`.
pub fn keep_grpc_trailers(headers: &mut HeaderMap, client: Version) {
    let grpc = headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.starts_with(b"application/grpc") && !v.starts_with(b"application/grpc-web")
    });
    if !grpc {
        return;
    }
    headers.remove(header::CONTENT_LENGTH);
    if client == Version::HTTP_11 && !headers.contains_key("grpc-status") {
        headers.insert(
            header::TRAILER,
            HeaderValue::from_static(GRPC_TRAILERS_ANNOUNCED),
        );
    }
}

/// ESPv2's record of a request it rewrote for the backend: `x-envoy-original-path` is the
/// client's target (path and query, as the proxy matched it), `x-envoy-original-method` its
/// method when that changed too (transcoding). A client's own copies are replaced, so the
/// backend reads the proxy's word.
pub fn set_original_path(headers: &mut HeaderMap, target: &str, method: Option<&http::Method>) {
    match HeaderValue::from_str(target) {
        Ok(v) => {
            headers.insert(X_ENVOY_ORIGINAL_PATH.clone(), v);
        }
        // A target is visible ASCII once parsed; anything else is not repeated.
        Err(_) => {
            headers.remove(&X_ENVOY_ORIGINAL_PATH);
        }
    }
    if let Some(m) = method {
        if let Ok(v) = HeaderValue::from_str(m.as_str()) {
            headers.insert(X_ENVOY_ORIGINAL_METHOD.clone(), v);
        }
    }
}
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

enum Upstream {
    /// HTTP/1.1 (`http://`, `https://`): this crate's capped pool ([`crate::upstream`]).
    Pooled(Pool),
    /// HTTP/2 cleartext with prior knowledge (`grpc://`, or `h2` over `http://`): one
    /// multiplexed connection, hyper-util's client.
    H2(Box<Client<HttpConnector<NetResolver>, LimitedBody>>),
    /// HTTP/2 over TLS (`h2` over `https://`), the same client behind rustls.
    H2Tls(Box<Client<hyper_rustls::HttpsConnector<HttpConnector<NetResolver>>, LimitedBody>>),
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
    /// ESPv2's retries for this backend ([`Forwarder::with_retries`]); `None`: one attempt.
    retries: Option<Arc<Retries>>,
    /// The backend's count of requests in flight, shared with every client for the same
    /// address (`--backend_cluster_maximum_requests`); `None`: no limit.
    cluster: Option<Arc<tokio::sync::Semaphore>>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("scheme", &self.scheme)
            .field("authority", &self.authority)
            .field("version", &self.version)
            .finish()
    }
}

/// Build error for the upstream client.
#[derive(Debug, thiserror::Error)]
pub enum ForwarderBuildError {
    #[error("invalid backend authority {0:?}")]
    Authority(String),
    #[error("cannot set up TLS to the backend: {0}")]
    Tls(String),
}

/// The rustls client settings for a TLS backend: `tls` (built at start from
/// [`crate::settings::Settings::backend_tls`] by [`crate::tls::client_config`]: trust anchors,
/// client certificate) or, without it, the built-in roots and no client certificate. No ALPN:
/// each client sets the protocols it offers.
fn tls_client_config(
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<rustls::ClientConfig, ForwarderBuildError> {
    match tls {
        Some(cfg) => Ok((*cfg).clone()),
        None => crate::tls::client_config(&crate::tls::BackendTls::default())
            .map_err(|e| ForwarderBuildError::Tls(e.to_string())),
    }
}

/// hyper-util's HTTP/2-only client: one multiplexed connection per backend, kept 90 s idle.
fn h2_client<C>(connector: C) -> Client<C, LimitedBody>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
{
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .set_host(false)
        .http2_only(true);
    builder.build(connector)
}

/// The TCP half of every HTTP/2 client, resolving and connecting as `net` says.
fn h2_tcp(net: &Arc<BackendNet>) -> HttpConnector<NetResolver> {
    let mut http = HttpConnector::new_with_resolver(NetResolver(net.clone()));
    http.set_connect_timeout(net.settings().connect_timeout);
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    http
}

impl Forwarder {
    /// A client for `backend` speaking what its scheme implies; `tls` is the TLS client setup
    /// for `https://` (see [`tls_client_config`]), unused otherwise.
    pub fn new(
        backend: &BackendAddr,
        timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
        limits: PoolLimits,
    ) -> Result<Forwarder, ForwarderBuildError> {
        Self::with_protocol(backend, BackendProtocol::Unset, timeout, tls, limits)
    }

    /// The HTTP version spoken to a backend with this scheme when a rule asks for `protocol`.
    /// `grpc://` is HTTP/2 whatever the rule says: Google ignores `protocol` for anything but
    /// HTTP backends, and gRPC cannot run on HTTP/1.1.
    pub fn version_for(scheme: BackendScheme, protocol: BackendProtocol) -> Version {
        match (scheme, protocol) {
            (BackendScheme::Grpc | BackendScheme::Grpcs, _) | (_, BackendProtocol::H2) => {
                Version::HTTP_2
            }
            (BackendScheme::Http | BackendScheme::Https, _) => Version::HTTP_11,
        }
    }

    /// [`new`](Self::new) for a backend rule's `protocol` (see [`Self::version_for`]).
    pub fn with_protocol(
        backend: &BackendAddr,
        protocol: BackendProtocol,
        timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
        limits: PoolLimits,
    ) -> Result<Forwarder, ForwarderBuildError> {
        Self::with_net(
            backend,
            protocol,
            timeout,
            tls,
            limits,
            &BackendNet::system(),
        )
    }

    /// [`with_protocol`](Self::with_protocol), connecting through `net` (resolver, lookup
    /// family, connect timeout) and counting requests in flight in its cluster for `backend`.
    pub fn with_net(
        backend: &BackendAddr,
        protocol: BackendProtocol,
        timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
        limits: PoolLimits,
        net: &Arc<BackendNet>,
    ) -> Result<Forwarder, ForwarderBuildError> {
        let authority: Authority = backend
            .authority()
            .parse()
            .map_err(|_| ForwarderBuildError::Authority(backend.authority()))?;
        let h2 = Self::version_for(backend.scheme, protocol) == Version::HTTP_2;
        let (upstream, scheme, version) = match (backend.scheme, h2) {
            (BackendScheme::Http, false) => (
                Upstream::Pooled(Pool::with_net(
                    Dialer::Plain {
                        authority: backend.authority(),
                    },
                    limits,
                    net.clone(),
                )),
                Scheme::HTTP,
                Version::HTTP_11,
            ),
            (BackendScheme::Http | BackendScheme::Grpc, _) => (
                Upstream::H2(Box::new(h2_client(h2_tcp(net)))),
                Scheme::HTTP,
                Version::HTTP_2,
            ),
            (BackendScheme::Https, false) => {
                let mut tls = tls_client_config(tls)?;
                tls.alpn_protocols = vec![b"http/1.1".to_vec()];
                let server_name = rustls::pki_types::ServerName::try_from(backend.host.clone())
                    .map_err(|e| ForwarderBuildError::Tls(format!("{}: {e}", backend.host)))?;
                (
                    Upstream::Pooled(Pool::with_net(
                        Dialer::Tls {
                            authority: backend.authority(),
                            server_name,
                            connector: tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls)),
                        },
                        limits,
                        net.clone(),
                    )),
                    Scheme::HTTPS,
                    Version::HTTP_11,
                )
            }
            // `grpcs://` is always HTTP/2 (version_for), over TLS offering `h2` alone.
            (BackendScheme::Https, true) | (BackendScheme::Grpcs, _) => {
                // The connector names the server after the request URI's host, which is this
                // one: checked here so a bad name fails when the config loads.
                rustls::pki_types::ServerName::try_from(backend.host.as_str())
                    .map_err(|e| ForwarderBuildError::Tls(format!("{}: {e}", backend.host)))?;
                let mut tcp = h2_tcp(net);
                tcp.enforce_http(false);
                // Offers `h2` alone: a server that cannot speak it fails the handshake rather
                // than answering an HTTP/1.1 conversation it was never going to get.
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(tls_client_config(tls)?)
                    .https_only()
                    .enable_http2()
                    .wrap_connector(tcp);
                (
                    Upstream::H2Tls(Box::new(h2_client(connector))),
                    Scheme::HTTPS,
                    Version::HTTP_2,
                )
            }
        };
        Ok(Forwarder {
            upstream: std::sync::Arc::new(upstream),
            scheme,
            authority,
            version,
            timeout,
            retries: None,
            cluster: net.cluster(&format!("{:?}://{}", backend.scheme, backend.authority())),
        })
    }

    /// Sends requests again as `retries` says ([`crate::retry`]); its count of retries in
    /// flight is the backend's, so every forwarder for the same backend shares one. `None`, or
    /// a policy that retries nothing and sets no per-try timeout: one attempt.
    pub fn with_retries(mut self, retries: Option<Arc<Retries>>) -> Forwarder {
        self.retries =
            retries.filter(|r| r.policy.retries_anything() || r.policy.per_try_timeout.is_some());
        self
    }

    /// Not counted in the backend's requests in flight: the proxy's own calls (its gRPC
    /// health checks), which Envoy's circuit breakers do not count either.
    pub fn without_cluster_limit(mut self) -> Forwarder {
        self.cluster = None;
        self
    }

    /// Connections open to the backend (busy and idle), for HTTP/1.1 backends.
    pub fn open_connections(&self) -> Option<usize> {
        match &*self.upstream {
            Upstream::Pooled(p) => Some(p.open_connections()),
            Upstream::H2(_) | Upstream::H2Tls(_) => None,
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
        // Over the backend's requests in flight, refused before anything is sent (Envoy's
        // circuit breaker): no retry, no wait.
        let slot = match self
            .cluster
            .as_ref()
            .map(|c| crate::backend_net::take_slot(c, self.authority.as_str()))
        {
            Some(Err(e)) => {
                return SendWithin {
                    call: Call::Refused { err: Some(e) },
                    sleep: tokio::time::sleep(limit),
                    limit,
                    sent_at: tokio::time::Instant::now(),
                    progress: None,
                    slot: None,
                }
            }
            Some(Ok(slot)) => Some(slot),
            None => None,
        };
        let call = match (&self.retries, &*self.upstream) {
            // Boxed: the attempts' state is only paid for where retries are configured.
            (Some(retries), _) => Call::Boxed {
                fut: Box::pin(call_with_retries(
                    self.upstream.clone(),
                    req,
                    retries.clone(),
                )),
            },
            (None, Upstream::Pooled(pool)) => Call::Pooled {
                fut: pool.send(req),
            },
            (None, Upstream::H2(c)) => Call::Boxed {
                fut: h2_call(c.request(req)),
            },
            (None, Upstream::H2Tls(c)) => Call::Boxed {
                fut: h2_call(c.request(req)),
            },
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
            slot,
        }
    }
}

/// The wait for response headers of a call that has no deadline (a streaming RPC): a year,
/// long enough to never fire, short enough to add to an `Instant` without overflow.
pub const NO_DEADLINE: Duration = Duration::from_secs(365 * 24 * 3600);

/// An HTTP/2 client's call, boxed: rarer than pooled calls, it need not widen every request's
/// future.
fn h2_call(
    fut: hyper_util::client::legacy::ResponseFuture,
) -> Pin<Box<dyn Future<Output = Sent> + Send>> {
    Box::pin(async move {
        match fut.await {
            Ok(resp) => Ok(resp.map(UpstreamBody::unpooled)),
            Err(e) => Err(classify(&e)),
        }
    })
}

/// A request kept to be sent again: its head, and its body when that was read whole before
/// the first attempt (a pooled backend's buffer) or is kept as it streams (HTTP/2 backends,
/// [`LimitedBody::record_for_replay`]).
struct Replay {
    method: http::Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    /// Known whole before the first attempt.
    body: Option<crate::request_body::ReplayBody>,
    /// Where the streamed body is kept, when it is.
    progress: Option<Arc<BodyProgress>>,
}

impl Replay {
    /// A copy of `req` to send again, or `None`: not worth keeping (an upgrade, whose
    /// connection is the client's) or a body too large to keep whole.
    fn of(req: &mut Request<LimitedBody>, pooled: bool, keep_limit: usize) -> Option<Replay> {
        if req.headers().contains_key(header::UPGRADE) {
            return None;
        }
        let (body, progress) = if pooled {
            (Some(req.body().held_whole()?), None)
        } else {
            match req.body().progress().cloned() {
                None => (Some(crate::request_body::ReplayBody::default()), None),
                Some(p) => {
                    req.body_mut().record_for_replay(keep_limit);
                    (None, Some(p))
                }
            }
        };
        Some(Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            body,
            progress,
        })
    }

    /// The request again, if its whole body is at hand.
    fn request(&self) -> Option<Request<LimitedBody>> {
        let body = match (&self.body, &self.progress) {
            (Some(b), _) => b.clone(),
            (None, Some(p)) => p.recorded()?,
            (None, None) => return None,
        };
        let mut req = Request::new(LimitedBody::replay(body));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        Some(req)
    }
}

/// What a failed attempt was, for the retry conditions; `None`: never retried (the client's
/// body, the size limit, a name that does not resolve).
fn failure_of(e: &ForwardError) -> Option<Failure> {
    use crate::error::NetworkFailure as N;
    match e {
        ForwardError::Connect(N::Connect(_) | N::Tls | N::Timeout | N::ConnectTimeout, _) => {
            Some(Failure::ConnectFailure)
        }
        // Envoy never retries a request its circuit breaker refused.
        ForwardError::Connect(N::Overflow, _) => None,
        // The HTTP/1.1 handshake on a new connection: nothing was written.
        ForwardError::Connect(N::Reset, _) => Some(Failure::NotSent),
        ForwardError::Connect(N::Unresolved, _) => None,
        ForwardError::Other(_) => Some(Failure::Reset),
        ForwardError::RefusedStream(_) | ForwardError::Connect(N::RefusedStream, _) => {
            Some(Failure::RefusedStream)
        }
        // Only the per-try timeout ends an attempt with this; the deadline ends the call.
        ForwardError::Timeout(_) => Some(Failure::PerTryTimeout),
        ForwardError::BodyTooLarge(_) | ForwardError::ClientBody(_) | ForwardError::Retried(_) => {
            None
        }
    }
}

/// The most a request body may be for the request to be sent again (Envoy keeps up to its
/// buffer limit); a larger body goes once. Kept per request in flight, hence small.
pub const REPLAY_BODY_LIMIT: usize = CLIENT_BODY_BUFFER_SIZE;

/// One attempt: the backend's response head, or why not and, when none of it was written, the
/// request.
async fn attempt(
    upstream: &Upstream,
    req: Request<LimitedBody>,
) -> Result<Response<UpstreamBody>, Unsent> {
    match upstream {
        Upstream::Pooled(pool) => pool.send_or_return(req).await,
        Upstream::H2(c) => match c.request(req).await {
            Ok(resp) => Ok(resp.map(UpstreamBody::unpooled)),
            Err(e) => Err((classify(&e), None)),
        },
        Upstream::H2Tls(c) => match c.request(req).await {
            Ok(resp) => Ok(resp.map(UpstreamBody::unpooled)),
            Err(e) => Err((classify(&e), None)),
        },
    }
}

/// [`attempt`] within `--backend_per_try_timeout`, counted as the deadline is: from the end of
/// the request's body.
async fn attempt_within(
    upstream: &Upstream,
    req: Request<LimitedBody>,
    per_try: Option<Duration>,
) -> Result<Response<UpstreamBody>, Unsent> {
    let Some(limit) = per_try else {
        return attempt(upstream, req).await;
    };
    let progress = req.body().progress().cloned();
    let sent_at = tokio::time::Instant::now();
    let call = attempt(upstream, req);
    tokio::pin!(call);
    let sleep = tokio::time::sleep_until(
        sent_at
            + progress
                .as_ref()
                .map_or(limit, |p| limit.min(p.body_timeout)),
    );
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            biased;
            r = &mut call => return r,
            () = &mut sleep => {
                let next = match &progress {
                    None => Err(ForwardError::Timeout(limit)),
                    Some(p) => p.deadline(sent_at, limit),
                };
                match next {
                    Ok(later) => sleep.as_mut().reset(later),
                    Err(e) => return Err((e, None)),
                }
            }
        }
    }
}

/// The backend call with ESPv2's retries ([`crate::retry`]): attempts while the failure or the
/// answer is one the policy retries, retries are left, the backend's retries in flight are
/// under their cap, and the request is at hand again (given back unwritten, or kept: a body
/// read whole and at most [`REPLAY_BODY_LIMIT`]). The deadline around it all is the caller's
/// ([`SendWithin`]).
async fn call_with_retries(
    upstream: Arc<Upstream>,
    mut req: Request<LimitedBody>,
    retries: Arc<Retries>,
) -> Sent {
    let policy = &retries.policy;
    let pooled = matches!(&*upstream, Upstream::Pooled(_));
    // A pooled backend gets the body up to the buffer first anyway: read it here, so that a
    // body that fits is known whole, and kept, before the first attempt.
    if pooled && req.body().wants_fill() {
        std::future::poll_fn(|cx| req.body_mut().poll_fill(cx)).await?;
    }
    let client_body = req.body().progress().cloned();
    let replay = if policy.on.needs_replay() && policy.retries > 0 {
        Replay::of(&mut req, pooled, REPLAY_BODY_LIMIT)
    } else {
        None
    };
    let mut next = req;
    let mut made = 0u32;
    // A retry's slot among the backend's retries in flight, held until its attempt ends.
    let mut ticket = None;
    loop {
        let result = attempt_within(&upstream, next, policy.per_try_timeout).await;
        // The retried attempt (if this was one) is over: its slot goes back.
        drop(ticket.take());
        // Whatever the backend said, a body the client broke ends it.
        if let Some(c) = client_body.as_ref().and_then(|p| p.client_error()) {
            return Err(ForwardError::ClientBody(c));
        }
        let (again, outcome) = match result {
            Ok(resp) => {
                let retry = made < policy.retries
                    && policy.on.on_response(
                        resp.status().as_u16(),
                        resp.headers(),
                        &policy.status_codes,
                    );
                let again = if retry {
                    replay.as_ref().and_then(Replay::request)
                } else {
                    None
                };
                (again, Ok(resp))
            }
            Err((e, unwritten)) => {
                let retry = made < policy.retries
                    && failure_of(&e).is_some_and(|f| policy.on.on_failure(f));
                let again = if retry {
                    unwritten.or_else(|| replay.as_ref().and_then(Replay::request))
                } else {
                    None
                };
                (again, Err(e))
            }
        };
        // Past the cap on retries in flight, the failure is the answer.
        let Some((again, slot)) = again.and_then(|r| retries.begin().map(|t| (r, t))) else {
            return match outcome {
                Err(e) if made > 0 => Err(ForwardError::Retried(Box::new(e))),
                other => other,
            };
        };
        // A retried answer's body is not read: its connection closes.
        drop(outcome);
        ticket = Some(slot);
        made += 1;
        tracing::debug!(retry = made, "backend call retried");
        tokio::time::sleep(crate::retry::backoff(made)).await;
        next = again;
    }
}

/// What sending a request to the backend gives: the response head, or why not.
pub type Sent = Result<Response<UpstreamBody>, ForwardError>;

pin_project_lite::pin_project! {
    /// The backend call behind [`Forwarder::send_within`]: pooled HTTP/1.1 in place, HTTP/2
    /// (hyper-util's client) boxed.
    #[project = CallProj]
    enum Call<P> {
        Pooled { #[pin] fut: P },
        /// HTTP/2 backends, and calls with retries.
        Boxed { fut: Pin<Box<dyn Future<Output = Sent> + Send>> },
        /// Refused before it began (the backend's requests in flight at their maximum).
        Refused { err: Option<ForwardError> },
    }
}

impl<P: Future<Output = Sent>> Future for Call<P> {
    type Output = Sent;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Sent> {
        match self.project() {
            CallProj::Pooled { fut } => fut.poll(cx),
            CallProj::Boxed { fut } => fut.as_mut().poll(cx),
            CallProj::Refused { err } => Poll::Ready(Err(err
                .take()
                .unwrap_or_else(|| ForwardError::Other("polled after completion".into())))),
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
        // The request's slot among its backend's requests in flight, handed to the response
        // body.
        slot: Option<crate::backend_net::ClusterSlot>,
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
                (Ok(mut resp), _) => {
                    if let Some(slot) = this.slot.take() {
                        resp.body_mut().hold(slot);
                    }
                    Ok(resp)
                }
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
        ForwardError::Connect(crate::error::network_failure(e, true), error_chain(e))
    } else if refused_stream(e) {
        ForwardError::RefusedStream(error_chain(e))
    } else {
        ForwardError::Other(error_chain(e))
    }
}

/// An HTTP/2 `REFUSED_STREAM` from the backend somewhere in the error's sources.
fn refused_stream(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut src = Some(e);
    while let Some(s) = src {
        if s.downcast_ref::<h2::Error>()
            .is_some_and(|h| h.reason() == Some(h2::Reason::REFUSED_STREAM))
        {
            return true;
        }
        src = s.source();
    }
    false
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those the `Connection` header names.
/// `keep_upgrade` keeps `Upgrade` for WebSocket pass-through; `keep_te_trailers` keeps
/// `TE: trailers`, which gRPC requires.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool, keep_te_trailers: bool) {
    // Most requests and responses carry none of these: one pass over the few names present
    // is cheaper than the nine hashed removals below (1.7 % of a request's CPU in `perf`).
    let hop_by_hop =
        |n: &HeaderName| ALWAYS_HOP_BY_HOP.contains(n) || n == header::UPGRADE || n == header::TE;
    let mut present = h.keys().filter(|n| hop_by_hop(n));
    match (present.next(), present.next()) {
        (None, _) => return,
        // Every gRPC call carries `te: trailers` and nothing else of these: settled here
        // without the removals below.
        (Some(n), None) if n == header::TE => {
            if !(keep_te_trailers && te_is_trailers(h)) {
                h.remove(header::TE);
            }
            return;
        }
        _ => {}
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
    if !(keep_te_trailers && te_is_trailers(h)) {
        h.remove(header::TE);
    }
}

/// `TE: trailers`, the one `TE` a gRPC call may pass on.
fn te_is_trailers(h: &HeaderMap) -> bool {
    h.get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("trailers"))
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

/// Envoy's trusted client address (ESPv2's `--envoy_xff_num_trusted_hops` and
/// `--envoy_use_remote_address`, [`XffHops`]): a fixed position from the right of
/// `X-Forwarded-For` (every copy read as one list), or the peer when the list is too short or
/// that entry is not an IP address. Unlike [`real_client_ip`] it trusts by count, not by
/// address: a client can only prepend entries, never reach the position read.
pub fn envoy_client_ip(peer: IpAddr, headers: &HeaderMap, hops: XffHops) -> IpAddr {
    // How many entries from the right are skipped before the one read.
    let skip = if hops.use_remote_address {
        match hops.trusted_hops.checked_sub(1) {
            // With no trusted hop, the peer itself is the client.
            None => return peer,
            Some(s) => s,
        }
    } else {
        hops.trusted_hops
    } as usize;
    let entry = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .rev()
        .flat_map(|v| v.as_bytes().rsplit(|&c| c == b','))
        .nth(skip);
    entry
        .and_then(|e| std::str::from_utf8(e).ok())
        .and_then(|e| e.trim_matches([' ', '\t']).parse::<IpAddr>().ok())
        .unwrap_or(peer)
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

/// ESPv2's `--client_ip_from_forwarded_header`: the address in the `for=` parameter of the
/// **last** element of `Forwarded` (RFC 7239), the one the nearest proxy added; `None` when
/// that element has no `for=`, or names no IP address (`unknown`, an obfuscated `_name`,
/// garbage), so the caller keeps the address it had. Earlier elements are never read: the
/// client wrote them. Every `Forwarded` line is one comma list (RFC 9110), so a second line
/// a proxy appended counts as later elements (ESPv2 ignores the header when there are two
/// lines). Parameter names are case-insensitive; values may be quoted strings (with `\`
/// escapes, and commas or semicolons inside); `[v6]`, `[v6]:port` and `v4:port` are taken
/// without their port. Never allocates for a header that is not quoted.
pub fn ip_from_forwarded(headers: &HeaderMap) -> Option<IpAddr> {
    let mut last: Option<Option<IpAddr>> = None;
    for v in headers.get_all(http::header::FORWARDED) {
        if let Some(found) = last_element_for(v.as_bytes()) {
            last = Some(found);
        }
    }
    last.flatten()
}

/// The last element's `for=` address of one `Forwarded` line: `None` when the line has no
/// element; `Some(None)` when its last element names no IP address.
fn last_element_for(line: &[u8]) -> Option<Option<IpAddr>> {
    // Split into elements (`,`) and pairs (`;`) outside quoted strings.
    let mut elements: Vec<Vec<(usize, usize)>> = vec![Vec::new()];
    let (mut start, mut i, mut quoted) = (0, 0, false);
    while i < line.len() {
        match line[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b';' if !quoted => {
                elements.last_mut()?.push((start, i));
                start = i + 1;
            }
            b',' if !quoted => {
                elements.last_mut()?.push((start, i));
                elements.push(Vec::new());
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if quoted {
        // An unclosed quote: the line is garbage, nothing in it is believed.
        return Some(None);
    }
    elements.last_mut()?.push((start, line.len().min(i)));
    let last = elements
        .iter()
        .rev()
        .find(|e| e.iter().any(|&(s, e)| !line[s..e].trim_ascii().is_empty()))?;
    for &(s, e) in last {
        let pair = line[s..e].trim_ascii();
        let Some(eq) = pair.iter().position(|&c| c == b'=') else {
            continue;
        };
        if !pair[..eq].trim_ascii().eq_ignore_ascii_case(b"for") {
            continue;
        }
        return Some(node_ip(pair[eq + 1..].trim_ascii()));
    }
    Some(None)
}

/// RFC 7239's node: an IPv4 address, `[IPv6]`, either with `:port`, possibly quoted.
fn node_ip(v: &[u8]) -> Option<IpAddr> {
    let unquoted;
    let v = match v.strip_prefix(b"\"").and_then(|r| r.strip_suffix(b"\"")) {
        Some(inner) => {
            let mut out = Vec::with_capacity(inner.len());
            let mut it = inner.iter();
            while let Some(&c) = it.next() {
                if c == b'\\' {
                    out.push(*it.next()?);
                } else {
                    out.push(c);
                }
            }
            unquoted = out;
            &unquoted[..]
        }
        None => v,
    };
    let text = std::str::from_utf8(v).ok()?;
    if let Some(rest) = text.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(valid_port)) {
            return None;
        }
        return inner.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    // A bare IPv6 address is not RFC 7239's form, but ESPv2 (Envoy's address parser) takes it.
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    let (host, port) = text.rsplit_once(':')?;
    if !valid_port(port) {
        return None;
    }
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// RFC 7239's `node-port`: a port number, or an obfuscated `_port`.
fn valid_port(p: &str) -> bool {
    p.parse::<u16>().is_ok()
        || (p.starts_with('_')
            && p.len() > 1
            && p[1..]
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-'))
}

/// What goes to the backend's `X-Forwarded-For`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XffAppend {
    /// The client's copies joined, then this address (nginx's `$proxy_add_x_forwarded_for`,
    /// with the client address; Envoy's `use_remote_address` with the peer's).
    Address(IpAddr),
    /// The client's header unchanged (Envoy without `use_remote_address`).
    Nothing,
}

/// Sets the forwarding headers ESP's nginx template sets (`X-Real-IP`, `X-Forwarded-For`
/// appended, `X-Google-Real-IP`, `Host`).
pub fn set_forwarding_headers(h: &mut HeaderMap, client_ip: IpAddr, host: Option<HeaderValue>) {
    set_forwarding_headers_with(h, client_ip, XffAppend::Address(client_ip), host)
}

/// [`set_forwarding_headers`] with the `X-Forwarded-For` rule given.
pub fn set_forwarding_headers_with(
    h: &mut HeaderMap,
    client_ip: IpAddr,
    xff_append: XffAppend,
    host: Option<HeaderValue>,
) {
    let client_text = client_ip.to_string();
    let client_value =
        HeaderValue::from_str(&client_text).unwrap_or_else(|_| HeaderValue::from_static(""));
    if let Some(host) = host {
        h.insert(header::HOST, host);
    }
    h.insert(&X_REAL_IP, client_value.clone());
    h.insert(&X_GOOGLE_REAL_IP, client_value.clone());
    let XffAppend::Address(appended) = xff_append else {
        return;
    };
    // Usually the same address: formatted once.
    let (ip_text, ip_value) = if appended == client_ip {
        (client_text, client_value)
    } else {
        let text = appended.to_string();
        let Ok(value) = HeaderValue::from_str(&text) else {
            return;
        };
        (text, value)
    };
    // All incoming copies joined, then the address.
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
}

#[cfg(test)]
mod tests {

    #[test]
    fn grpc_responses_keep_their_trailers_for_http1_clients() {
        let grpc = |ct: &str, extra: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
            for (n, v) in extra {
                h.insert(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            h
        };
        let mut h = grpc("application/grpc", &[]);
        keep_grpc_trailers(&mut h, Version::HTTP_11);
        assert_eq!(h[header::TRAILER], GRPC_TRAILERS_ANNOUNCED);
        assert!(!h.contains_key(header::CONTENT_LENGTH));
        // HTTP/2 carries trailers anyway; the length goes all the same (ESPv2's scrubber).
        let mut h = grpc("application/grpc+proto", &[]);
        keep_grpc_trailers(&mut h, Version::HTTP_2);
        assert!(!h.contains_key(header::TRAILER) && !h.contains_key(header::CONTENT_LENGTH));
        // Trailers-only: the status is in the head already.
        let mut h = grpc("application/grpc", &[("grpc-status", "5")]);
        keep_grpc_trailers(&mut h, Version::HTTP_11);
        assert!(!h.contains_key(header::TRAILER));
        // Not gRPC: untouched.
        for ct in ["application/grpc-web+proto", "application/json"] {
            let mut h = grpc(ct, &[]);
            keep_grpc_trailers(&mut h, Version::HTTP_11);
            assert_eq!(h.len(), 2, "{ct}");
        }
    }

    #[test]
    fn forwarded_for_is_read_from_the_last_element_only() {
        let ip = |lines: &[&[u8]]| {
            let mut h = HeaderMap::new();
            for l in lines {
                h.append(
                    http::header::FORWARDED,
                    HeaderValue::from_bytes(l).expect("value"),
                );
            }
            ip_from_forwarded(&h).map(|a| a.to_string())
        };
        let some = |s: &str| Some(s.to_string());
        assert_eq!(ip(&[]), None);
        assert_eq!(
            ip(&[b"for=192.0.2.60;proto=http;by=203.0.113.43"]),
            some("192.0.2.60")
        );
        assert_eq!(ip(&[b"For=\"192.0.2.60\""]), some("192.0.2.60"));
        assert_eq!(ip(&[b"for=192.0.2.60:8080"]), some("192.0.2.60"));
        assert_eq!(ip(&[b"for=\"192.0.2.60:_hidden\""]), some("192.0.2.60"));
        assert_eq!(
            ip(&[b"for=\"[2001:db8:cafe::17]\""]),
            some("2001:db8:cafe::17")
        );
        assert_eq!(ip(&[b"for=\"2001:db8::1\""]), some("2001:db8::1"));
        assert_eq!(
            ip(&[b"for=\"[2001:db8:cafe::17]:4711\""]),
            some("2001:db8:cafe::17")
        );
        // The last element is the nearest proxy's; the client wrote the first.
        assert_eq!(
            ip(&[b"for=1.1.1.1, for=198.51.100.17"]),
            some("198.51.100.17")
        );
        assert_eq!(
            ip(&[b"for=1.1.1.1", b"for=198.51.100.17;proto=https"]),
            some("198.51.100.17")
        );
        // A last element without an address is not replaced by an earlier one.
        assert_eq!(ip(&[b"for=1.1.1.1, proto=https"]), None);
        assert_eq!(ip(&[b"for=1.1.1.1, for=unknown"]), None);
        assert_eq!(ip(&[b"for=1.1.1.1, for=_gazonk"]), None);
        assert_eq!(ip(&[b"for=1.1.1.1", b"for=\"_mdn\""]), None);
        // Quoted commas and semicolons do not split.
        assert_eq!(ip(&[b"for=2.2.2.2;by=\"a,b;c\""]), some("2.2.2.2"));
        assert_eq!(ip(&[b"for=2.2.2.2, by=\"x, for=9.9.9.9\""]), None);
        assert_eq!(ip(&[b"for=\"\\1\\.2.3.4\""]), some("1.2.3.4"));
        // Trailing empty elements are skipped, not read as a missing `for=`.
        assert_eq!(ip(&[b"for=3.3.3.3, "]), some("3.3.3.3"));
        // Garbage.
        for bad in [
            &b"for=\"1.2.3.4"[..],
            b"for=1.2.3.4.5",
            b"for=[::1",
            b"for=[::1]x",
            b"for=[::1]:99999",
            b"for=1.2.3.4:port",
            b"for==1.2.3.4",
            b"for",
            b";;;,,,",
            b"for=\"\\",
            b"for=\xff\xfe",
        ] {
            assert_eq!(ip(&[bad]), None, "{}", String::from_utf8_lossy(bad));
        }
        let long = format!("{}for=4.4.4.4", "for=5.5.5.5, ".repeat(5000));
        assert_eq!(ip(&[long.as_bytes()]), some("4.4.4.4"));
    }
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
    fn envoy_hops_read_a_fixed_position_from_the_right() {
        let hops = |n, remote| XffHops {
            trusted_hops: n,
            use_remote_address: remote,
        };
        let peer: IpAddr = "10.9.9.9".parse().unwrap();
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 1.1.1.1"),
        );
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("2.2.2.2,3.3.3.3"),
        );
        let ip = |n, remote| envoy_client_ip(peer, &h, hops(n, remote)).to_string();
        // Without use_remote_address: the (hops + 1)-th from the right.
        assert_eq!(ip(0, false), "3.3.3.3");
        assert_eq!(ip(2, false), "1.1.1.1");
        assert_eq!(ip(3, false), "6.6.6.6");
        assert_eq!(ip(4, false), "10.9.9.9");
        // With it: the peer for 0 hops, else the hops-th from the right.
        assert_eq!(ip(0, true), "10.9.9.9");
        assert_eq!(ip(1, true), "3.3.3.3");
        assert_eq!(ip(2, true), "2.2.2.2");
        assert_eq!(ip(9, true), "10.9.9.9");
        // No header, or garbage at the position read: the peer.
        assert_eq!(
            envoy_client_ip(peer, &HeaderMap::new(), hops(0, false)),
            peer
        );
        let mut g = HeaderMap::new();
        g.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, nonsense, 2.2.2.2"),
        );
        assert_eq!(envoy_client_ip(peer, &g, hops(1, false)), peer);
        assert_eq!(
            envoy_client_ip(peer, &g, hops(2, false)).to_string(),
            "1.1.1.1"
        );
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
    fn refused_streams_are_told_apart() {
        #[derive(Debug)]
        struct Wrap(h2::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        assert!(refused_stream(&Wrap(h2::Error::from(
            h2::Reason::REFUSED_STREAM
        ))));
        assert!(!refused_stream(&Wrap(h2::Error::from(h2::Reason::CANCEL))));
        assert!(!refused_stream(&std::io::Error::other("x")));
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
    fn te_alone_is_settled_by_its_value() {
        // The gRPC fast path: only `te` of the hop-by-hop headers.
        for (value, keep, kept) in [
            ("trailers", true, true),
            (" Trailers ", true, true),
            ("trailers", false, false),
            ("gzip", true, false),
            ("trailers, gzip", true, false),
        ] {
            let mut h = HeaderMap::new();
            h.insert("te", HeaderValue::from_static(value));
            h.insert("content-type", HeaderValue::from_static("application/grpc"));
            strip_hop_by_hop(&mut h, false, keep);
            assert_eq!(h.contains_key("te"), kept, "{value:?} keep={keep}");
            assert!(h.contains_key("content-type"));
        }
        // `te` with another hop-by-hop header takes the full path.
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("keep-alive", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false, true);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["te"], "{h:?}");
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
