//! Listeners and process lifecycle.
//!
//! Serving model: `--worker_threads` threads (default: one per core), each running its own
//! single-threaded tokio runtime with its own upstream connection pool, all accepting on the
//! same ports through `SO_REUSEPORT` sockets — nginx's worker model, without cross-thread
//! hand-offs on the request path. Every serving port speaks HTTP/1.1 and HTTP/2 with prior
//! knowledge (auto-detected); `--ssl_port` adds TLS with ALPN `h2`/`http/1.1`.
//!
//! The control side (config rollouts, the status port, signals) runs on the caller's runtime.
//! A new rollout is compiled into a routing table there, off the request path, and swapped in
//! atomically: requests in flight finish on the table they started with.
//!
//! Shutdown (SIGTERM/SIGINT): stop accepting, let in-flight requests finish (bounded), then
//! flush Service Control.
//!
//! Every listener (serving ports and the status port) runs its connections under
//! `--client_header_timeout` and `--keepalive_timeout` and pauses accepting when descriptors run
//! out ([`portico_listen`]); the serving ports bound request heads as nginx's
//! `large_client_header_buffers` does (the whole head here, each line in the pipeline).

use crate::config_source::{self, ConfigSourceOptions, Rollout};
use crate::forward::Forwarder;
use crate::pipeline::{ConnInfo, ControlApi, Pipeline, ProxyState};
use crate::routing::{RouteOptions, RouteTable};
use crate::settings::{DependencyErrorBehavior, Settings};
use hyper::service::service_fn;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({flag}): {source}")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS for clients: {0}")]
    Tls(crate::tls::TlsError),
    #[error("TLS to backends: {0}")]
    BackendTls(crate::tls::TlsError),
    #[error("backend client: {0}")]
    Backend(#[from] crate::forward::ForwarderBuildError),
    #[error("cannot start a serving thread: {0}")]
    Thread(std::io::Error),
    #[error("--access_log: {0}")]
    AccessLog(std::io::Error),
    #[error("--service_account_key: {0}")]
    Credentials(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortKind {
    Http,
    Http2,
    Ssl,
}

impl PortKind {
    fn flag(self) -> &'static str {
        match self {
            PortKind::Http => "--http_port",
            PortKind::Http2 => "--http2_port",
            PortKind::Ssl => "--ssl_port",
        }
    }
}

/// A running proxy (in-process). Dropping it stops the serving threads without waiting.
pub struct ProxyHandle {
    pub http_addr: Option<SocketAddr>,
    pub http2_addr: Option<SocketAddr>,
    pub ssl_addr: Option<SocketAddr>,
    /// `None` when the status server is off (`portico espv2` without `--status_port`).
    pub status_addr: Option<SocketAddr>,
    pub state: Arc<ProxyState>,
    shutdown_tx: watch::Sender<bool>,
    workers: Vec<std::thread::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ProxyHandle {
    /// Stops accepting, waits up to `grace` for in-flight requests, then returns.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.shutdown_tx.send(true);
        let workers = std::mem::take(&mut self.workers);
        let joined = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        });
        // Workers bound their own drain by `grace`; the extra second covers thread teardown.
        let _ = tokio::time::timeout(grace + Duration::from_secs(1), joined).await;
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A non-blocking listener on `addr` that other sockets (one per serving thread) may share
/// (`SO_REUSEPORT`), with ESP's backlog.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_tcp_nodelay(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    // ESP's template listens with backlog=16384.
    sock.listen(16384)?;
    Ok(sock.into())
}

/// Binds `n` sockets on one port; port 0 is resolved by the first bind and reused.
fn bind_group(
    flag: &'static str,
    ip: IpAddr,
    port: u16,
    n: usize,
) -> Result<(SocketAddr, Vec<std::net::TcpListener>), StartError> {
    let mut addr = SocketAddr::new(ip, port);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let l = bind_reuseport(addr).map_err(|source| StartError::Bind { flag, addr, source })?;
        if addr.port() == 0 {
            addr = l
                .local_addr()
                .map_err(|source| StartError::Bind { flag, addr, source })?;
        }
        out.push(l);
    }
    Ok((addr, out))
}

/// The `--ssl_port` acceptor; files named by the settings are read here, once.
fn tls_acceptor(settings: &Settings) -> Result<tokio_rustls::TlsAcceptor, StartError> {
    let t = &settings.server_tls;
    for w in &t.warnings {
        tracing::warn!("{w}");
    }
    let cfg = crate::tls::server_config(t).map_err(StartError::Tls)?;
    if let Some(ca) = &t.client_ca {
        tracing::info!(
            client_ca = %ca.display(),
            "TLS clients must present a certificate issued by the client CA bundle"
        );
    }
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Compiles a rollout into a routing table.
pub fn compile(rollout: &Rollout, opts: &RouteOptions) -> RouteTable {
    let table = RouteTable::from_services(rollout.rollout_id.clone(), &rollout.configs, opts);
    for (c, _) in &table.configs {
        for s in &c.skipped_rules {
            tracing::warn!(config_id = %c.config_id, rule = %s, "HTTP rule not served");
        }
    }
    table
}

/// Starts the proxy in this process: serving threads on the configured ports and, on the
/// caller's runtime, the status server and the task that follows `rollouts`.
pub async fn start(
    settings: Arc<Settings>,
    rollouts: watch::Receiver<Arc<Rollout>>,
    control: Option<Arc<dyn ControlApi>>,
) -> Result<ProxyHandle, StartError> {
    start_with_metrics(
        settings,
        rollouts,
        control,
        Arc::new(crate::metrics::Metrics::new()),
    )
    .await
}

/// [`start`] with a metrics registry other components already registered into.
pub async fn start_with_metrics(
    settings: Arc<Settings>,
    mut rollouts: watch::Receiver<Arc<Rollout>>,
    control: Option<Arc<dyn ControlApi>>,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<ProxyHandle, StartError> {
    let mut key_opts = crate::auth::KeyCacheOptions::default();
    if let Some(d) = settings.jwks_cache_duration {
        key_opts.ttl = d;
    }
    key_opts.connect_timeout = settings.backend_net.connect_timeout;
    if let Some(n) = settings.jwt_cache_size {
        key_opts.token_cache_capacity = n;
    }
    // ESPv2 bounds its key-set fetches with --http_request_timeout_s too.
    if let Some(t) = settings.http_request_timeout {
        key_opts.fetch_timeout = t;
    }
    key_opts.fetch_retries = settings.jwks_fetch_retry.retries;
    key_opts.retry_backoff_base = settings.jwks_fetch_retry.backoff_base;
    key_opts.retry_backoff_max = settings.jwks_fetch_retry.backoff_max;
    // Built even for a cleartext `--backend`: rule addresses may be `https://`, and a file
    // named on the command line that cannot be used is better refused at start.
    let backend_tls =
        Arc::new(crate::tls::client_config(&settings.backend_tls).map_err(StartError::BackendTls)?);
    // One for the process: every backend client resolves, connects and counts its requests in
    // flight through it.
    let backend_net = crate::backend_net::BackendNet::new(settings.backend_net.clone());
    let route_opts = RouteOptions {
        sc_override: settings.service_control_url_override.is_some(),
        skip_service_control: settings.skip_service_control,
        skip_jwt_authn: settings.skip_jwt_authn,
        key_cache: crate::auth::KeyCache::new(key_opts),
        auth_options: crate::auth::AuthOptions {
            log_jwt_payload: settings.log_jwt_payload.clone(),
            dialect: settings.dialect,
            pad_forward_payload: settings.jwt_pad_forward_payload,
            disable_audience_service_name_check: !settings.jwt_audience_service_name_check,
        },
        backend_routing: settings.enable_backend_routing,
        backend_timeout: settings.backend_timeout,
        backend_pool: crate::upstream::PoolLimits {
            max: settings
                .backend_max_connections
                .saturating_mul(settings.worker_threads.max(1)),
            ..Default::default()
        },
        // Rule addresses, and `--backend` itself when a rule asks it for another protocol.
        backend_tls: Some(backend_tls.clone()),
        local_backend: Some(settings.backend.clone()),
        backend_retry: settings.backend_retry.clone(),
        disallow_colon_in_wildcard_path_segment: settings.disallow_colon_in_wildcard_path_segment,
        transcoding: settings.transcoding.clone(),
        cors_operation_delimiter: settings.cors_operation_delimiter.clone(),
        backend_net: backend_net.clone(),
        backend_address_override: settings.backend_address_override,
    };
    // `--backend`'s retries in flight are counted across the serving threads' clients.
    let backend_retries = settings
        .backend_retry
        .clone()
        .map(crate::retry::Retries::new);
    let first = rollouts.borrow_and_update().clone();
    let access_log = crate::access_log::AccessLog::from_flag(settings.access_log.as_deref())
        .map_err(StartError::AccessLog)?;
    let mut state = ProxyState::new(
        settings.clone(),
        RouteTable::new(String::new(), Vec::new()),
        control,
        metrics,
        access_log,
    );
    let shared_metadata = state.control.as_ref().and_then(|c| c.metadata_tokens());
    state.tracer = tracer_for(&settings, &first, &state.metrics, shared_metadata)
        .map_err(StartError::Credentials)?;
    // Backend rules with `jwt_audience` get ID tokens for the proxy's own account: minted by
    // the key file's token endpoint, or else by the metadata server; none when backend
    // authentication is off (ESPv2's `--non_gcp`), said once per method.
    if settings.backend_auth_disabled() {
        for (service, _) in &first.configs {
            let rules = service.backend.iter().flat_map(|b| &b.rules);
            for rule in rules.filter(|r| !r.jwt_audience.is_empty() && !r.disable_auth) {
                tracing::warn!(
                    method = %rule.selector,
                    "backend authentication is enabled for this method, but with --non_gcp it \
                     is disabled: the backend is called without an ID token"
                );
            }
        }
    } else if let Some(account) = settings.iam.as_ref().and_then(|i| i.backend_auth.as_ref()) {
        let client = iam_client_for(&settings).map_err(StartError::Credentials)?;
        state.backend_tokens = Some(Arc::new(
            crate::backend_auth::IdTokenSource::from_iam(client, account.clone())
                .map_err(StartError::Credentials)?,
        ));
    } else if let Some(path) = &settings.service_account_key {
        let key = portico_credentials::ServiceAccountKey::from_file(path)
            .map_err(|e| StartError::Credentials(format!("{}: {e}", path.display())))?;
        state.backend_tokens = Some(Arc::new(
            crate::backend_auth::IdTokenSource::new(
                Arc::new(key),
                settings
                    .http_request_timeout
                    .unwrap_or(crate::backend_auth::FETCH_TIMEOUT),
            )
            .map_err(StartError::Credentials)?,
        ));
    } else if let Some(url) = &settings.metadata {
        state.backend_tokens = Some(Arc::new(
            crate::backend_auth::IdTokenSource::from_metadata(
                url,
                settings.dialect.identity_token_format(),
                settings
                    .http_request_timeout
                    .unwrap_or(crate::backend_auth::FETCH_TIMEOUT),
            )
            .map_err(StartError::Credentials)?,
        ));
    }
    if let Some(tokens) = &state.backend_tokens {
        if settings.dependency_error_behavior == DependencyErrorBehavior::BlockInitOnAnyError {
            let audiences: std::collections::BTreeSet<&str> = first
                .configs
                .iter()
                .flat_map(|(service, _)| service.backend.iter().flat_map(|b| &b.rules))
                .filter(|r| !r.jwt_audience.is_empty() && !r.disable_auth)
                .map(|r| r.jwt_audience.as_str())
                .collect();
            for audience in audiences {
                block_until(
                    "an ID token for backend authentication",
                    audience,
                    || async {
                        tokens
                            .get(audience)
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    },
                )
                .await;
            }
        }
    }
    let health_checker = match &settings.grpc_backend_health {
        Some(hc) => {
            let health = Arc::new(crate::grpc_health::BackendHealth::default());
            state.backend_health = Some(health.clone());
            let client = crate::grpc_health::client_for(
                &settings.backend,
                hc.interval,
                Some(backend_tls.clone()),
                &backend_net,
            )?;
            Some(crate::grpc_health::Checker::new(client, hc.clone(), health))
        }
        None => None,
    };
    let state = Arc::new(state);
    state.swap_routes(compile(&first, &route_opts));

    let tls = match settings.ssl_port {
        Some(_) => Some(tls_acceptor(&settings)?),
        None => None,
    };
    let n = settings.worker_threads.max(1);
    let ip = settings.listen_address;
    let mut groups: Vec<(PortKind, Vec<std::net::TcpListener>)> = Vec::new();
    let mut http_addr = None;
    let mut http2_addr = None;
    let mut ssl_addr = None;
    if let Some(p) = settings.http_port {
        let (a, ls) = bind_group(settings.dialect.serving_port_flag(), ip, p, n)?;
        http_addr = Some(a);
        groups.push((PortKind::Http, ls));
    }
    if let Some(p) = settings.http2_port {
        let (a, ls) = bind_group("--http2_port", ip, p, n)?;
        http2_addr = Some(a);
        groups.push((PortKind::Http2, ls));
    }
    if let Some(p) = settings.ssl_port {
        let (a, ls) = bind_group("--ssl_port", ip, p, n)?;
        ssl_addr = Some(a);
        groups.push((PortKind::Ssl, ls));
    }
    let status_listener = match settings.status_port {
        Some(port) => {
            let status_bind = SocketAddr::new(ip, port);
            let bind_error = |source| StartError::Bind {
                flag: "--status_port",
                addr: status_bind,
                source,
            };
            let listener = tokio::net::TcpListener::bind(status_bind)
                .await
                .map_err(bind_error)?;
            let addr = listener.local_addr().map_err(bind_error)?;
            Some((listener, addr))
        }
        None => None,
    };
    let status_addr = status_listener.as_ref().map(|(_, a)| *a);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut workers = Vec::with_capacity(n);
    for i in 0..n {
        let mine: Vec<(PortKind, std::net::TcpListener)> = groups
            .iter_mut()
            .filter_map(|(k, ls)| ls.pop().map(|l| (*k, l)))
            .collect();
        let forwarder = Forwarder::with_net(
            &settings.backend,
            crate::forward::BackendProtocol::Unset,
            settings.backend_timeout,
            Some(backend_tls.clone()),
            crate::upstream::PoolLimits {
                max: settings.backend_max_connections,
                ..Default::default()
            },
            &backend_net,
        )?
        .with_retries(backend_retries.clone());
        let pipeline = Arc::new(Pipeline::new(state.clone(), forwarder));
        let rx = shutdown_rx.clone();
        let tls = tls.clone();
        let w = std::thread::Builder::new()
            .name(format!("portico-worker-{i}"))
            .spawn(move || worker_main(mine, pipeline, tls, rx))
            .map_err(StartError::Thread)?;
        workers.push(w);
    }

    let mut tasks = Vec::new();
    if let Some(checker) = health_checker {
        tasks.push(tokio::spawn(checker.run()));
    }
    let follower_state = state.clone();
    tasks.push(tokio::spawn(async move {
        // A local file's sender is dropped at once: `changed` errs and there is nothing to follow.
        while rollouts.changed().await.is_ok() {
            let rollout = rollouts.borrow_and_update().clone();
            let opts = route_opts.clone();
            // Compiling is CPU work; keep it off the runtime that serves the status port.
            match tokio::task::spawn_blocking(move || compile(&rollout, &opts)).await {
                Ok(table) => {
                    tracing::info!(rollout_id = %table.rollout_id, "serving new rollout");
                    follower_state.swap_routes(table);
                }
                Err(e) => tracing::error!(error = %e, "compiling the new rollout failed; keeping the old one"),
            }
        }
    }));
    if let Some((status_listener, _)) = status_listener {
        let status_state = state.clone();
        let status_shutdown = shutdown_rx.clone();
        let status_builder = {
            let mut b = auto::Builder::new(TokioExecutor::new()).http1_only();
            b.http1().header_read_timeout(None);
            b
        };
        let limits = settings.conn_limits;
        tasks.push(tokio::spawn(async move {
            let info = Arc::new(crate::status::StatusInfo {
                started_at: crate::access_log::now_rfc3339(),
                ..Default::default()
            });
            let acceptor = portico_listen::Acceptor::new(status_listener, "--status_port");
            portico_listen::serve(
                acceptor,
                status_builder,
                limits,
                move |_peer| {
                    let st = status_state.clone();
                    let info = info.clone();
                    service_fn(move |req| {
                        let r = crate::status::handle(&st, &info, &req);
                        async move { Ok::<_, Infallible>(r) }
                    })
                },
                status_shutdown,
            )
            .await;
        }));
    }

    Ok(ProxyHandle {
        http_addr,
        http2_addr,
        ssl_addr,
        status_addr,
        state,
        shutdown_tx,
        workers,
        tasks,
    })
}

/// How long in-flight requests may take to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

fn worker_main(
    listeners: Vec<(PortKind, std::net::TcpListener)>,
    pipeline: Arc<Pipeline>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot build a worker runtime");
            return;
        }
    };
    rt.block_on(async move {
        // Every connection task holds a clone: the strong count is the number of live connections.
        let live = Arc::new(());
        let mut loops = Vec::new();
        for (kind, l) in listeners {
            let listener = match tokio::net::TcpListener::from_std(l) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot register a listener");
                    continue;
                }
            };
            loops.push(tokio::spawn(accept_loop(
                kind,
                listener,
                pipeline.clone(),
                tls.clone(),
                live.clone(),
                shutdown.clone(),
            )));
        }
        for l in loops {
            let _ = l.await;
        }
        let deadline = tokio::time::Instant::now() + DRAIN;
        while Arc::strong_count(&live) > 1 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    connections = Arc::strong_count(&live) - 1,
                    "in-flight requests still running after {DRAIN:?}; closing them"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

async fn accept_loop(
    kind: PortKind,
    listener: tokio::net::TcpListener,
    pipeline: Arc<Pipeline>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    live: Arc<()>,
    mut shutdown: watch::Receiver<bool>,
) {
    let settings = &pipeline.state().settings;
    let builder = Arc::new(serving_builder(settings));
    let limits = settings.conn_limits;
    // One system call per connection, paid only when a header rule reads the address.
    let record_local = crate::header_rules::reads_local_address(&settings.request_headers_to_add)
        || crate::header_rules::reads_local_address(&settings.response_headers_to_add)
        || settings
            .access_log_format
            .as_ref()
            .is_some_and(|f| f.reads_local_address());
    let mut acceptor = portico_listen::Acceptor::new(listener, kind.flag());
    loop {
        let (stream, peer) = tokio::select! {
            a = acceptor.accept() => a,
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let conn_info = ConnInfo {
            peer,
            local: if record_local {
                stream.local_addr().ok()
            } else {
                None
            },
            tls: kind == PortKind::Ssl,
        };
        let (pipeline, builder, live, shutdown) = (
            pipeline.clone(),
            builder.clone(),
            live.clone(),
            shutdown.clone(),
        );
        match (kind, &tls) {
            (PortKind::Ssl, Some(acceptor)) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
                    let tls_stream = match handshake.await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    serve_conn(
                        builder, tls_stream, pipeline, conn_info, limits, shutdown, live,
                    )
                    .await;
                });
            }
            _ => {
                tokio::spawn(serve_conn(
                    builder, stream, pipeline, conn_info, limits, shutdown, live,
                ));
            }
        }
    }
}

/// Runs a closure when dropped (connection gauges stay right on every exit path).
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// The serving ports' HTTP/1.1 + h2c builder: head size as nginx's `large_client_header_buffers`
/// allows, `--keepalive_timeout=0` as one request per connection. Connection timeouts are
/// [`portico_listen`]'s, so hyper's own header timer is off (it would also cut idle keep-alive
/// connections at the header timeout).
fn serving_builder(settings: &Settings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper refuses a head that does not fit its read buffer with 431 (its floor is 8 KiB).
    let head = settings.header_limits.total.max(8 << 10);
    builder
        .http1()
        .header_read_timeout(None)
        .keep_alive(settings.keep_alive)
        .max_buf_size(head);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .max_header_list_size(u32::try_from(head).unwrap_or(u32::MAX));
    builder
}

/// Serves one client connection. On shutdown the connection finishes the request in flight
/// and closes; `_live` is dropped when it is done, which is what the worker's drain waits for.
async fn serve_conn<IO>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    io: IO,
    pipeline: Arc<Pipeline>,
    conn_info: ConnInfo,
    limits: portico_listen::ConnLimits,
    shutdown: watch::Receiver<bool>,
    _live: Arc<()>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let metrics = pipeline.state().metrics.clone();
    metrics.connections_accepted.inc();
    metrics.connections_active.inc();
    let _open = OnDrop(|| {
        metrics.connections_active.dec();
    });
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let p = pipeline.clone();
        // Not boxed: hyper's HTTP/1 dispatcher already keeps one heap slot of this future's size
        // per connection and reuses it for every request. Boxing it would make that slot
        // pointer-sized for idle connections but allocate and free several KiB per request,
        // which mimalloc's purging turns into ~1.3 page faults per request (0.5 unboxed;
        // bench/cpu_per_request.sh, docs/performance.md). The slot's size is kept
        // down instead: rare paths inside it (dialling, waiting, retries) are boxed.
        async move {
            // Accounts the request as 499 if the client goes away before the response head.
            let guard = crate::pipeline::AbortGuard::new(p.state(), &req, conn_info);
            let resp = p.handle(req, conn_info).await;
            guard.disarm();
            Ok::<_, Infallible>(resp)
        }
    });
    let closed = portico_listen::serve_connection(&builder, io, svc, limits, shutdown).await;
    if let portico_listen::Closed::Expired(why) = closed {
        tracing::debug!(peer = %conn_info.peer, ?why, "connection timed out");
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = i.recv() => tracing::info!("SIGINT: shutting down"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The Service Control client, when the config (or `--service_control_url_override`) asks
/// for one, set up from the command line's Service Control flags.
pub fn service_control_for(
    settings: &Settings,
    configs: watch::Receiver<Arc<Rollout>>,
    credentials: Option<Arc<portico_credentials::ServiceAccountKey>>,
    metadata: Option<crate::outbound_auth::MetadataTokens>,
    notifier: config_source::RolloutNotifier,
) -> Result<
    Option<crate::service_control::ServiceControl>,
    crate::service_control::ServiceControlError,
> {
    if settings.skip_service_control {
        tracing::info!("Service Control is disabled (--skip_service_control_filter)");
        return Ok(None);
    }
    let rollout = configs.borrow().clone();
    let environment = rollout
        .configs
        .iter()
        .filter_map(|(s, _)| s.control.as_ref())
        .map(|c| c.environment.as_str())
        .find(|e| !e.is_empty());
    // With a key file the control plane is known even if the first config has no
    // `control.environment`, so a later rollout that enables Service Control finds a client.
    let Some(base) = crate::service_control::resolve_service_control_url(
        settings.service_control_url_override.as_deref(),
        credentials.as_deref(),
        environment,
    ) else {
        return Ok(None);
    };
    let mut opts = crate::service_control::ServiceControlOptions::new(base).with_settings(settings);
    if let Some(account) = settings
        .iam
        .as_ref()
        .and_then(|i| i.service_control.as_ref())
    {
        let client = iam_client_for(settings)
            .map_err(crate::service_control::ServiceControlError::Client)?;
        opts.acting_as = Some(Arc::new(crate::iam_credentials::IamAccessTokens::new(
            client,
            account.clone(),
            crate::iam_credentials::SERVICE_CONTROL_SCOPE,
        )));
    }
    opts.credentials = credentials;
    opts.metadata = metadata;
    opts.rollout_notifier = Some(notifier);
    // Reports carry only the metrics and logs each config declares, as ESP's do.
    opts.service_configs = Some(configs);
    crate::service_control::ServiceControl::new(opts).map(Some)
}

/// The tracer and its exporter task (on the caller's runtime), unless tracing is off. Cloud
/// Trace calls go where Service Control calls go (the key file's control plane, or the
/// config's `control.environment`) unless `--cloud_trace_url_override` says otherwise, with
/// the same credentials; the project is `--tracing_project_id` or the service's producer
/// project. `--tracing_otlp_endpoint` replaces Cloud Trace with OTLP.
/// `shared_metadata` is Service Control's metadata token cache when there is one: the exporter
/// uses it rather than a cache of its own, so the metadata server is asked once, not twice.
pub fn tracer_for(
    settings: &Settings,
    first: &Rollout,
    metrics: &crate::metrics::Metrics,
    shared_metadata: Option<crate::outbound_auth::MetadataTokens>,
) -> Result<Option<Arc<crate::trace::Tracer>>, String> {
    use crate::trace::export::{self, Target};
    let t = &settings.tracing;
    if t.disabled {
        return Ok(None);
    }
    let service = first.configs.first().map(|(s, _)| s.clone());
    let key = match &settings.service_account_key {
        Some(p) => Some(Arc::new(
            portico_credentials::ServiceAccountKey::from_file(p)
                .map_err(|e| format!("{}: {e}", p.display()))?,
        )),
        None => None,
    };
    let target = if let Some(url) = &t.otlp_endpoint {
        Target::Otlp {
            url: url.clone(),
            service: service.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
        }
    } else {
        let environment = first
            .configs
            .iter()
            .filter_map(|(s, _)| s.control.as_ref())
            .map(|c| c.environment.as_str())
            .find(|e| !e.is_empty());
        let base = t.url_override.clone().or_else(|| {
            crate::service_control::resolve_service_control_url(
                settings.service_control_url_override.as_deref(),
                key.as_deref(),
                environment,
            )
        });
        let Some(base) = base else {
            tracing::info!("tracing is off: no Cloud Trace address (no control plane is known)");
            return Ok(None);
        };
        // ESPv2: the metadata server's project when it was asked (as ESPv2's config manager).
        let metadata_project = settings
            .gcp
            .as_ref()
            .and_then(|g| g.project_id.clone())
            .filter(|p| !p.is_empty() && settings.dialect == crate::dialect::Dialect::EspV2);
        let project = t
            .project_id
            .clone()
            .or(metadata_project)
            .or_else(|| service.as_ref().map(|s| s.producer_project_id.clone()))
            .unwrap_or_default();
        if project.is_empty() {
            tracing::warn!(
                "tracing is off: no tracing project (the service config names no producer project)"
            );
            return Ok(None);
        }
        match settings.dialect {
            crate::dialect::Dialect::Esp => Target::CloudTraceV1 { base, project },
            crate::dialect::Dialect::EspV2 => Target::CloudTraceV2 { base, project },
        }
    };
    let metadata = match shared_metadata {
        Some(m) if key.is_none() => Some(m),
        _ => metadata_tokens_for(settings, key.is_some()).map_err(|e| e.to_string())?,
    };
    let account = key.as_ref().map(|k| k.client_email.clone());
    let tokens = crate::outbound_auth::TokenSource::with_metadata(key, metadata);
    let (queue, rx) = export::Queue::new(export::QUEUE_CAPACITY);
    metrics.register(
        "trace_spans_dropped",
        "Spans of traced requests dropped because the export queue was full",
        queue.dropped_counter(),
    );
    let target_project = match &target {
        Target::CloudTraceV1 { project, .. } | Target::CloudTraceV2 { project, .. } => {
            Some(project.clone())
        }
        _ => None,
    };
    tracing::info!(target = ?target, "tracing on");
    export::spawn(
        export::Exporter {
            target,
            tokens: Some(tokens),
            account,
            flush_every: export::FLUSH_EVERY,
            max_batch: export::MAX_BATCH,
        },
        rx,
    );
    // The project reports name traces in: the Cloud Trace target's, or for OTLP the flag's or
    // the producer project (ESPv2 names one whatever the exporter).
    let report_project = match &target_project {
        Some(p) => p.clone(),
        None => t
            .project_id
            .clone()
            .or_else(|| service.as_ref().map(|s| s.producer_project_id.clone()))
            .unwrap_or_default(),
    };
    Ok(Some(Arc::new(
        crate::trace::Tracer::new(settings.dialect, t.clone(), queue)
            .with_report_project(report_project),
    )))
}

/// The metadata server's token source when `--metadata` is given and there is no key file (a
/// key file wins, as in ESP).
pub fn metadata_tokens_for(
    settings: &Settings,
    has_key: bool,
) -> Result<Option<crate::outbound_auth::MetadataTokens>, crate::outbound_auth::MetadataUrlError> {
    match (settings.metadata.as_deref(), settings.http_request_timeout) {
        (Some(url), Some(t)) if !has_key => {
            crate::outbound_auth::MetadataTokens::with_timeout(url, t).map(Some)
        }
        (Some(url), None) if !has_key => crate::outbound_auth::MetadataTokens::new(url).map(Some),
        _ => Ok(None),
    }
}

/// The IAM Credentials client of `--iam_url`, authenticated as the proxy itself: its key file's
/// self-signed token, or else the metadata server's access token.
pub fn iam_client_for(
    settings: &Settings,
) -> Result<Arc<crate::iam_credentials::IamClient>, String> {
    let url = settings
        .iam
        .as_ref()
        .map_or(crate::iam_credentials::DEFAULT_IAM_URL, |i| i.url.as_str());
    let key = match &settings.service_account_key {
        Some(p) => Some(Arc::new(
            portico_credentials::ServiceAccountKey::from_file(p)
                .map_err(|e| format!("{}: {e}", p.display()))?,
        )),
        None => None,
    };
    let metadata = metadata_tokens_for(settings, key.is_some()).map_err(|e| e.to_string())?;
    let own = crate::outbound_auth::TokenSource::with_metadata(key, metadata);
    let timeout = settings
        .http_request_timeout
        .unwrap_or(crate::iam_credentials::DEFAULT_TIMEOUT);
    crate::iam_credentials::IamClient::new(url, own, timeout).map(Arc::new)
}

/// How long `--dependency_error_behavior=BLOCK_INIT_ON_ANY_ERROR` waits between tries (ESPv2's
/// token fetch retry interval).
pub const DEPENDENCY_RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// Tries `fetch` until it succeeds, saying each failure; start-up waits here, not listening.
async fn block_until<F, Fut>(what: &str, target: &str, mut fetch: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut tries = 0u64;
    loop {
        tries += 1;
        match fetch().await {
            Ok(()) => {
                if tries > 1 {
                    tracing::info!(what, target, tries, "start-up dependency is ready");
                }
                return;
            }
            Err(error) => tracing::warn!(
                what,
                target,
                tries,
                %error,
                "cannot get a start-up dependency; not serving until it can be had \
                 (--dependency_error_behavior=BLOCK_INIT_ON_ANY_ERROR); trying again in 2 s"
            ),
        }
        tokio::time::sleep(DEPENDENCY_RETRY_INTERVAL).await;
    }
}

/// What ESPv2 asks the metadata server before it loads the config (unless `--non_gcp`, which
/// leaves `settings.metadata` unset): with `--check_metadata` and no `--service`, the service
/// name (no answer stops the start, exit code 1, as ESPv2's config manager); then where the
/// proxy runs, for the reports (no answer: reported without, and said).
async fn ask_metadata_server(settings: &mut Settings) -> Result<(), ExitCode> {
    if !settings.dialect.reads_gcp_attributes() {
        return Ok(());
    }
    let Some(url) = settings.metadata.clone() else {
        return Ok(());
    };
    let server = crate::gcp_metadata::MetadataServer::with_timeouts(
        &url,
        settings
            .http_request_timeout
            .unwrap_or(crate::gcp_metadata::TIMEOUT),
        settings.backend_net.connect_timeout,
    )
    .map_err(|e| {
        tracing::error!(error = %e, "cannot use the metadata server");
        ExitCode::from(crate::settings::EXIT_SETUP)
    })?;
    if settings.service_from_metadata {
        match server.service_name().await {
            Ok(name) => {
                tracing::info!(service = %name, "service name from the metadata server");
                settings.service = Some(name);
            }
            Err(e) => {
                tracing::error!(
                    "failed to read metadata with key endpoints-service-name from metadata \
                     server: {e}"
                );
                return Err(ExitCode::from(crate::settings::EXIT_FETCH));
            }
        }
    }
    settings.gcp = crate::gcp_metadata::fetch_gcp_attributes(&server).await;
    Ok(())
}

/// The whole `portico esp` process: fetch the config, serve, shut down on a signal.
pub fn run(settings: Settings) -> ExitCode {
    crate::memory::tune_allocator();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portico esp: cannot start the runtime: {e}");
            return ExitCode::from(crate::settings::EXIT_SETUP);
        }
    };
    rt.block_on(async move {
        let mut settings = settings;
        if let Err(code) = ask_metadata_server(&mut settings).await {
            return code;
        }
        let settings = Arc::new(settings);
        let credentials = match &settings.service_account_key {
            Some(p) => match portico_credentials::ServiceAccountKey::from_file(p) {
                Ok(k) => Some(Arc::new(k)),
                Err(e) => {
                    tracing::error!(path = %p.display(), error = %e, "cannot load --service_account_key");
                    return ExitCode::from(crate::settings::EXIT_SETUP);
                }
            },
            None => None,
        };
        // One token cache for Service Management and Service Control, so they share fetches.
        let metadata = match metadata_tokens_for(&settings, credentials.is_some()) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "cannot use --metadata");
                return ExitCode::from(crate::settings::EXIT_SETUP);
            }
        };
        let mut opts = ConfigSourceOptions::new(settings.service.clone().unwrap_or_default());
        opts.version = settings.version.clone();
        opts.rollout_strategy = match settings.rollout_strategy {
            crate::settings::RolloutStrategy::Fixed => config_source::RolloutStrategy::Fixed,
            crate::settings::RolloutStrategy::Managed => config_source::RolloutStrategy::Managed,
        };
        opts.service_json_path = settings.service_json_path.clone();
        opts.management_url = settings.management.clone();
        opts.credentials = credentials.clone();
        opts.metadata = metadata.clone();
        if let Some(t) = settings.http_request_timeout {
            opts.request_timeout = t;
        }
        opts.rules.require_jwks_uri = settings.disable_oidc_discovery;
        // Both dialects: a gRPC service's descriptor set is only in the FULL view.
        opts.full_view = true;
        let notifier = config_source::RolloutNotifier::new();
        opts.rollout_notifier = Some(notifier.clone());
        let rollouts = match config_source::start(opts).await {
            Ok(rx) => rx,
            Err(e) => {
                tracing::error!(error = %e, "cannot load the service configuration");
                return ExitCode::from(crate::settings::EXIT_FETCH);
            }
        };
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let control = match service_control_for(&settings, rollouts.clone(), credentials, metadata, notifier) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the Service Control client");
                return ExitCode::from(crate::settings::EXIT_SETUP);
            }
        };
        if let Some(sc) = &control {
            metrics.with_registry(|r| sc.register_metrics(r));
            if settings.dependency_error_behavior == DependencyErrorBehavior::BlockInitOnAnyError {
                block_until("the access token for Service Control", sc.base_url(), || async {
                    sc.access_token_ready().await.map_err(|e| e.to_string())
                })
                .await;
            }
        }
        let dyn_control = control.clone().map(|c| Arc::new(c) as Arc<dyn ControlApi>);
        let handle = match start_with_metrics(settings.clone(), rollouts, dyn_control, metrics).await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the proxy");
                return ExitCode::from(crate::settings::EXIT_SETUP);
            }
        };
        // Serving: what start-up ran is not needed again (see the function).
        crate::memory::release_startup_code();
        tracing::info!(
            http = ?handle.http_addr,
            http2 = ?handle.http2_addr,
            ssl = ?handle.ssl_addr,
            status = ?handle.status_addr,
            backend = %settings.backend.authority(),
            workers = settings.worker_threads,
            "portico {} serving",
            settings.dialect.command()
        );
        wait_for_signal().await;
        handle.shutdown(DRAIN).await;
        if let Some(sc) = control {
            sc.shutdown().await;
        }
        ExitCode::SUCCESS
    })
}
