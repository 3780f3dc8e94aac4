//! The HTTP server: shared state, the router that composes every module, and in-process start-up.
//!
//! # Adding a module (other engineers read this)
//! 1. `pub mod yourmod;` in `lib.rs`.
//! 2. Schema: `pub const MIGRATIONS: &[store::Migration]` in your module, listed in
//!    [`migrations`] below.
//! 3. Routes: `pub fn routes() -> Router<AppState>` in your module, merged in [`router`] below.
//!    Routes are written without any API prefix (`/v1/projects/{project}/serviceAccounts`); the
//!    prefixes `/servicemanagement/`, `/serviceusage/`, `/iam/`, `/cloudresourcemanager/`,
//!    `/apikeys/` and `/servicecontrol/` are stripped before routing so users may point several
//!    `api_endpoint_overrides` at one port.
//! 4. Google custom verbs (`/v1/projects/{p}:getIamPolicy`) live *inside* a path segment, which
//!    axum cannot route on. Route the segment as a parameter (`/v1/projects/{project}`) and split it
//!    with [`split_verb`]. Axum path parameters are already percent-decoded (`%3A` → `:`).
//! 5. `POST /v1/services/{service}:check|:report|:allocateQuota` arrive at Service Management's
//!    `POST /v1/services/{service}` route, which hands them to [`SERVICE_VERB_HANDLERS`]; the
//!    Service Control engineer registers their handlers there.
//! 6. Per-module start-up state (caches, keys): add a field to [`Shared`] and initialise it in
//!    [`build_state`]. Service-account token verification plugs in as an [`authz::TokenVerifier`]
//!    pushed onto `Shared::verifiers` in [`build_state`].

pub mod console;

use std::future::Future;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::http::Uri;
use axum::response::Response;
use axum::Router;
use tower::{Layer, ServiceExt};

use crate::authz::{self, AdminToken, TokenVerifier};
use crate::error::ApiError;
use crate::store::{Migration, Store, StoreError};

/// Every module's schema, applied in this order at start-up.
pub fn migrations() -> Vec<&'static [Migration]> {
    vec![
        crate::projects::MIGRATIONS,
        crate::store::operations::MIGRATIONS,
        crate::store::services::MIGRATIONS,
        crate::store::usage::MIGRATIONS,
        // Identity (IAM, Resource Manager, tokens, API keys).
        crate::apis::iam::MIGRATIONS,
        crate::apis::resourcemanager::MIGRATIONS,
        crate::apis::tokens::MIGRATIONS,
        crate::apis::apikeys::MIGRATIONS,
        crate::apis::servicecontrol::MIGRATIONS,
    ]
}

/// Every module's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(crate::apis::operations::routes())
        .merge(crate::apis::servicemanagement::routes())
        .merge(crate::apis::serviceusage::routes())
        .merge(crate::apis::iam::routes())
        .merge(crate::apis::resourcemanager::routes())
        .merge(crate::apis::tokens::routes())
        .merge(crate::apis::apikeys::routes())
        .merge(crate::apis::jwks::routes())
        .merge(crate::apis::servicecontrol::routes())
        .merge(crate::app::console::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// A handler for a custom verb on `POST /v1/services/{service}:{verb}` owned by another module.
/// Arguments: state, the (decoded) service name, the whole request.
pub type ServiceVerbHandler =
    fn(AppState, String, Request) -> Pin<Box<dyn Future<Output = Response> + Send>>;

/// Verbs on `/v1/services/{service}:{verb}` that Service Management does not own itself.
/// The Service Control engineer adds `("check", servicecontrol::check_handler)` etc. here.
pub const SERVICE_VERB_HANDLERS: &[(&str, ServiceVerbHandler)] = &[
    ("check", crate::apis::servicecontrol::check_handler),
    (
        "allocateQuota",
        crate::apis::servicecontrol::allocate_quota_handler,
    ),
    ("report", crate::apis::servicecontrol::report_handler),
];

/// Splits `name:verb` at the last `:`. `echo.example.com:undelete` → (`echo.example.com`,
/// Some(`undelete`)).
pub fn split_verb(segment: &str) -> (&str, Option<&str>) {
    match segment.rsplit_once(':') {
        Some((name, verb)) if !verb.is_empty() && !verb.contains('/') => (name, Some(verb)),
        _ => (segment, None),
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!(
        "The requested URL {} was not found on this server.",
        uri.path()
    ))
}

/// A JSON request body whose parse errors are Google-shaped (400 INVALID_ARGUMENT naming the
/// problem). An empty body parses as `{}` because gcloud sends none for some POSTs.
pub struct JsonBody<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|e| ApiError::invalid_argument(format!("Cannot read request body: {e}")))?;
        parse_json_body(&bytes).map(JsonBody)
    }
}

/// Largest accepted request body (OpenAPI sources arrive base64-encoded in one JSON body).
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// Parses a JSON body with Google-shaped errors; empty means `{}`.
pub fn parse_json_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid_argument(format!("Invalid JSON payload received. {e}")))
}

/// Query parameters as a map; unknown ones (gcloud's `alt=json`) are simply never read.
#[derive(Debug, Default, Clone)]
pub struct Params(pub std::collections::HashMap<String, String>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or("");
        Ok(Params(
            url::form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        ))
    }
}

impl Params {
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// `pageSize` / `pageToken` → (limit, offset). Tokens are base64 of the offset, which is
    /// what gcloud was seen following (`Mw==`, `Ng==`).
    pub fn page(&self, default_size: i64, max_size: i64) -> Result<(i64, i64), ApiError> {
        let size = match self.get("pageSize") {
            None => default_size,
            Some(s) => match s.parse::<i64>() {
                Ok(n) if n < 0 => {
                    return Err(ApiError::invalid_argument(format!(
                        "Invalid pageSize {n}: must not be negative."
                    )))
                }
                Ok(0) => default_size,
                Ok(n) => n.min(max_size),
                Err(_) => {
                    return Err(ApiError::invalid_argument(format!(
                        "Invalid pageSize '{s}': expected an integer."
                    )))
                }
            },
        };
        let offset = match self.get("pageToken") {
            None => 0,
            Some(t) => crate::authz::decode_base64_any(t)
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.parse::<i64>().ok())
                .filter(|n| *n >= 0)
                .ok_or_else(|| ApiError::invalid_argument(format!("Invalid pageToken '{t}'.")))?,
        };
        Ok((size, offset))
    }
}

/// The `nextPageToken` for a page that ended at `next_offset`.
pub fn page_token(next_offset: i64) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(next_offset.to_string())
}

/// Google's front ends answer an unsupported HTTP method on a known path with 404 and a JSON
/// error; axum's default is an empty 405.
async fn method_not_allowed(method: http::Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!(
        "Method {method} is not supported for {}.",
        uri.path()
    ))
}

/// Start-up options (the CLI flags, or set directly by tests).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where to listen; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Data directory: the SQLite database (unless `database_url`) and the admin token.
    pub data_dir: Option<PathBuf>,
    /// `postgres://...`; SQLite under `data_dir` when absent.
    pub database_url: Option<String>,
    /// PostgreSQL schema to use (created if absent).
    pub database_schema: Option<String>,
    pub redis_url: Option<String>,
    /// The URL clients reach this server at (default `http://<bound addr>`); written into key files.
    pub public_url: Option<String>,
    /// Where the admin token lives (default `DATA/admin-token`); created if absent.
    pub admin_token_file: Option<PathBuf>,
    /// Master key file (API key encryption); default `DATA/master-key`, created if absent.
    /// `PORTICO_MASTER_KEY` overrides both. Replicas sharing a database must share the key.
    pub master_key_file: Option<PathBuf>,
    /// Header-read and keep-alive timeouts for every connection (nginx's 60 s and 75 s).
    pub conn_limits: portico_listen::ConnLimits,
}

impl ServeOptions {
    pub fn sqlite(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        ServeOptions {
            listen,
            data_dir: Some(data_dir.into()),
            database_url: None,
            database_schema: None,
            redis_url: None,
            public_url: None,
            admin_token_file: None,
            master_key_file: None,
            conn_limits: portico_listen::ConnLimits::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    DataDir(#[from] crate::datadir::DataDirError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin token file {path}: {source}")]
    AdminToken {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Config(String),
}

/// State shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub store: Store,
    /// Base URL clients use to reach the control plane (no trailing `/`).
    pub public_url: String,
    /// Redis client for quota counters, when configured.
    pub redis: Option<redis::Client>,
    /// Directory for secrets kept outside the database (the admin token's directory).
    pub secrets_dir: PathBuf,
    pub(crate) admin_token: AdminToken,
    /// Verifiers for non-admin bearer tokens, asked in order.
    pub verifiers: Vec<Arc<dyn TokenVerifier>>,
    /// Optional source of project-level IAM policies for permission checks.
    pub project_policies: Option<Arc<dyn authz::ProjectPolicySource>>,
    /// Encrypts API key strings and keys their lookup hash (see `crypto.rs`).
    pub master_key: crate::crypto::MasterKey,
    /// Service Control: quota counters, clock, Prometheus registry, config cache.
    pub servicecontrol: crate::apis::servicecontrol::ScState,
    /// Where and how long OpenAPI conversions run (`configs:submit`).
    pub conversions: crate::apis::servicemanagement::Conversions,
}

impl AppState {
    pub fn new(shared: Shared) -> Self {
        AppState(Arc::new(shared))
    }
}

/// A server started by [`serve`]. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    pub addr: SocketAddr,
    pub public_url: String,
    pub admin_token_path: PathBuf,
    pub state: AppState,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Stops accepting, lets in-flight requests finish, and waits.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        self.wait_inner().await
    }

    /// Serves until `signal` resolves, then stops accepting and gives in-flight requests up to
    /// `drain` to finish.
    pub async fn run_until(
        mut self,
        signal: impl Future<Output = ()>,
        drain: std::time::Duration,
    ) -> std::io::Result<()> {
        tokio::select! {
            r = &mut self.task => return match r {
                Ok(r) => r,
                Err(e) => Err(std::io::Error::other(e)),
            },
            _ = signal => {}
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        match tokio::time::timeout(drain, self.wait_inner()).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(
                    ?drain,
                    "requests still running after the drain period; exiting"
                );
                Ok(())
            }
        }
    }

    /// Runs until the server stops (an I/O error, or never).
    pub async fn wait(mut self) -> std::io::Result<()> {
        self.wait_inner().await
    }

    async fn wait_inner(&mut self) -> std::io::Result<()> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

/// Builds the shared state: storage, migrations, admin token, module state.
pub async fn build_state(
    opts: &ServeOptions,
    bound: SocketAddr,
) -> Result<(AppState, PathBuf), ServeError> {
    build_state_with(opts, bound, |_| {}).await
}

/// [`build_state`] with a last look at the state before it is frozen (tests install extra
/// verifiers or policy sources this way).
pub async fn build_state_with(
    opts: &ServeOptions,
    bound: SocketAddr,
    customize: impl FnOnce(&mut Shared),
) -> Result<(AppState, PathBuf), ServeError> {
    if let Some(dir) = &opts.data_dir {
        crate::datadir::prepare(dir)?;
    }
    let token_path = match (&opts.admin_token_file, &opts.data_dir) {
        (Some(p), _) => p.clone(),
        (None, Some(d)) => d.join("admin-token"),
        (None, None) => {
            return Err(ServeError::Config(
                "either --data or --admin-token-file is required".into(),
            ))
        }
    };
    let store = match (&opts.database_url, &opts.data_dir) {
        (Some(url), _) => Store::open_postgres(url, opts.database_schema.as_deref()).await?,
        (None, Some(dir)) => Store::open_sqlite(dir).await?,
        (None, None) => {
            return Err(ServeError::Config(
                "either --data (SQLite) or --database-url is required".into(),
            ))
        }
    };
    store.migrate(&migrations()).await?;
    let admin_token =
        AdminToken::load_or_create(&token_path).map_err(|source| ServeError::AdminToken {
            path: token_path.display().to_string(),
            source,
        })?;
    let redis = match &opts.redis_url {
        Some(u) => Some(redis::Client::open(u.as_str())?),
        None => None,
    };
    let public_url = match &opts.public_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        // A wildcard address is not something clients can dial; loopback at least works locally,
        // and key files name this URL, so say how to fix it.
        None if bound.ip().is_unspecified() => {
            let url = format!("http://127.0.0.1:{}", bound.port());
            tracing::warn!(
                public_url = %url,
                "listening on a wildcard address without --public-url; issued key files will \
                 point at loopback"
            );
            url
        }
        None => format!("http://{bound}"),
    };
    let secrets_dir = token_path
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let master_key = crate::crypto::MasterKey::resolve(
        opts.master_key_file.as_deref(),
        Some(opts.data_dir.as_deref().unwrap_or(&secrets_dir)),
    )
    .map_err(|e| ServeError::Config(e.to_string()))?;
    // Redis keys are namespaced per PostgreSQL schema so deployments (and tests) sharing one
    // Redis do not share counters.
    let redis_prefix = format!("portico:{}:", opts.database_schema.as_deref().unwrap_or(""));
    let servicecontrol = crate::apis::servicecontrol::ScState::start(
        &store,
        redis.as_ref(),
        &redis_prefix,
        std::sync::Arc::new(crate::apis::servicecontrol::quota::SystemClock),
        crate::apis::servicecontrol::report::Retention::default(),
    )
    .await
    .map_err(|e| ServeError::Config(e.to_string()))?;
    let mut shared = Shared {
        store,
        public_url,
        redis,
        secrets_dir,
        admin_token,
        verifiers: vec![crate::apis::tokens::verifier()],
        project_policies: Some(crate::apis::resourcemanager::policy_source()),
        master_key,
        servicecontrol,
        conversions: crate::apis::servicemanagement::Conversions::default(),
    };
    customize(&mut shared);
    Ok((AppState::new(shared), token_path))
}

/// Binds, builds the state and serves in a background task: HTTP/1.1 and h2c, every connection
/// under `opts.conn_limits` (axum's own `serve` has no timeouts at all, so a connection that
/// never sent a byte held its socket forever), accepts paused rather than spinning when file
/// descriptors run out.
pub async fn serve(opts: ServeOptions) -> Result<RunningServer, ServeError> {
    // Before binding: an unusable --data must not leave a port open that never answers.
    if let Some(dir) = &opts.data_dir {
        crate::datadir::prepare(dir)?;
    }
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: opts.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: opts.listen,
        source,
    })?;
    let (state, admin_token_path) = build_state(&opts, addr).await?;
    let app = service(state.clone());
    let (tx, rx) = tokio::sync::watch::channel(false);
    let limits = opts.conn_limits;
    let task = tokio::spawn(async move {
        let mut builder =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        // The connection limits are portico_listen's; hyper's header timer would also cut idle
        // keep-alive connections at the header timeout.
        builder.http1().header_read_timeout(None);
        portico_listen::serve(
            portico_listen::Acceptor::new(listener, "control plane"),
            builder,
            limits,
            move |_peer| hyper_util::service::TowerToHyperService::new(app.clone()),
            rx,
        )
        .await;
        Ok(())
    });
    Ok(RunningServer {
        addr,
        public_url: state.public_url.clone(),
        admin_token_path,
        state,
        shutdown: Some(tx),
        task,
    })
}

/// The complete service: prefix stripping and request logging wrapped around the router.
/// Stripping must happen before routing, so it wraps the router instead of being a route layer.
pub fn service(state: AppState) -> Router {
    let inner = router(state);
    let stripped = axum::middleware::map_request(strip_api_prefix).layer(inner);
    Router::new()
        .fallback_service(stripped)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(log_request))
}

/// API prefixes users may put in `api_endpoint_overrides` to share one port.
const API_PREFIXES: &[&str] = &[
    "/servicemanagement/",
    "/serviceusage/",
    "/iam/",
    "/cloudresourcemanager/",
    "/apikeys/",
    "/servicecontrol/",
];

async fn strip_api_prefix(mut req: Request) -> Request {
    let path = req.uri().path();
    if let Some(p) = API_PREFIXES.iter().find(|p| path.starts_with(**p)) {
        let rest = &path[p.len() - 1..];
        let new = match req.uri().query() {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_string(),
        };
        if let Ok(pq) = new.parse::<axum::http::uri::PathAndQuery>() {
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = Some(pq);
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    req
}

/// Logs method, path, status, latency and the gcloud command (from the User-Agent's
/// `command/...` token). Headers are never logged: they carry bearer tokens and API keys.
async fn log_request(req: Request<Body>, next: axum::middleware::Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let command = req
        .headers()
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| {
            ua.split_whitespace()
                .find_map(|t| t.strip_prefix("command/"))
                .map(str::to_string)
        })
        .unwrap_or_default();
    let resp = next.run(req).await;
    tracing::info!(
        %method,
        path,
        status = resp.status().as_u16(),
        elapsed_ms = start.elapsed().as_millis() as u64,
        command,
        "request"
    );
    resp
}

/// Test helper: runs one request through the full service.
pub async fn oneshot(state: AppState, req: Request) -> Response {
    match service(state).oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_paths_and_methods_are_google_json() {
        let e = test_support::env().await;
        let (st, body) = e.admin(http::Method::GET, "/v1/nothing/here", None).await;
        assert_eq!(st.as_u16(), 404);
        assert_eq!(body["error"]["status"], "NOT_FOUND");
        let (st, body) = e.admin(http::Method::PUT, "/v1/services", None).await;
        assert_eq!(st.as_u16(), 404);
        assert_eq!(body["error"]["status"], "NOT_FOUND");
        // Prefixes are stripped before routing.
        let (st, _) = e
            .admin(
                http::Method::GET,
                "/serviceusage/v1/projects/demo-proj/services",
                None,
            )
            .await;
        assert_eq!(st.as_u16(), 200);
    }

    /// Reads until the server closes the connection; how long that took, or `None`.
    async fn closed_within(
        s: &mut tokio::net::TcpStream,
        limit: std::time::Duration,
    ) -> Option<std::time::Duration> {
        use tokio::io::AsyncReadExt;
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        tokio::time::timeout(limit, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
        .map(|()| started.elapsed())
    }

    #[tokio::test]
    async fn idle_connections_are_closed_and_requests_still_served() {
        use std::time::Duration;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut opts = ServeOptions::sqlite("127.0.0.1:0".parse().expect("addr"), dir.path());
        opts.conn_limits = portico_listen::ConnLimits {
            header_read_timeout: Duration::from_secs(1),
            keep_alive_timeout: Duration::from_secs(2),
        };
        let server = serve(opts).await.expect("serve");
        let addr = server.addr;
        let test = async {
            // A connection that never sends a byte: closed by the header timeout.
            let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let took = closed_within(&mut silent, Duration::from_secs(5))
                .await
                .expect("a silent connection stayed open");
            assert!(took < Duration::from_secs(4), "{took:?}");
            // A partial head: closed too.
            let mut partial = tokio::net::TcpStream::connect(addr).await.expect("connect");
            partial
                .write_all(b"GET /v1/services HTTP/1.1\r\nHost: x\r\n")
                .await
                .expect("write");
            assert!(closed_within(&mut partial, Duration::from_secs(5))
                .await
                .is_some());
            // A request is answered; then the idle keep-alive connection is closed after ~2 s.
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("write");
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).await.expect("response");
            assert!(
                String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 404"),
                "{}",
                String::from_utf8_lossy(&buf[..n])
            );
            let took = closed_within(&mut s, Duration::from_secs(6))
                .await
                .expect("an idle keep-alive connection stayed open");
            assert!(
                took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
                "{took:?}"
            );
        };
        tokio::time::timeout(Duration::from_secs(30), test)
            .await
            .expect("bounded");
        // Graceful shutdown still returns.
        tokio::time::timeout(Duration::from_secs(10), server.shutdown())
            .await
            .expect("shutdown in time")
            .expect("shutdown");
    }

    #[test]
    fn split_verb_cases() {
        assert_eq!(split_verb("a.b.c:undelete"), ("a.b.c", Some("undelete")));
        assert_eq!(split_verb("a.b.c"), ("a.b.c", None));
        assert_eq!(split_verb("a.b.c:"), ("a.b.c:", None));
    }
}

/// In-process helpers for handler tests: a fresh SQLite state and a request runner.
// The PostgreSQL helpers have no caller in src (tests/support has its own).
#[cfg(test)]
#[allow(dead_code)]
pub(crate) mod test_support {
    use super::*;
    use axum::http::{Method, StatusCode};
    use serde_json::Value;

    /// Accepts `sa:<email>` bearer tokens as that service account, so permission checks can be
    /// exercised without the identity module.
    pub(crate) struct TestSaTokens;

    impl TokenVerifier for TestSaTokens {
        fn verify<'a>(
            &'a self,
            _state: &'a AppState,
            token: &'a str,
        ) -> authz::BoxFuture<'a, Result<Option<authz::Principal>, ApiError>> {
            Box::pin(async move {
                Ok(token
                    .strip_prefix("sa:")
                    .map(|e| authz::Principal::ServiceAccount {
                        email: e.to_string(),
                    }))
            })
        }
    }

    pub(crate) struct TestEnv {
        pub _dir: tempfile::TempDir,
        pub state: AppState,
        pub admin: String,
    }

    pub(crate) async fn env() -> TestEnv {
        env_customized(|_| {}).await
    }

    /// [`env`] with a last change to the state (conversion limits, hooks).
    pub(crate) async fn env_customized(customize: impl FnOnce(&mut Shared)) -> TestEnv {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = ServeOptions::sqlite("127.0.0.1:0".parse().expect("addr"), dir.path());
        env_with_customized(dir, opts, customize).await
    }

    /// A state on PostgreSQL in a fresh schema, or `None` after a loud `SKIPPED:` when
    /// PostgreSQL is absent (a failure when `CI=true`). Call [`TestEnv::drop_pg_schema`] at the
    /// end.
    pub(crate) async fn env_pg(test: &str) -> Option<TestEnv> {
        let schema = format!("cp_{}", uuid::Uuid::new_v4().simple());
        env_pg_schema(test, &schema).await
    }

    /// Like [`env_pg`] on a given schema (two environments on one schema = two replicas).
    pub(crate) async fn env_pg_schema(test: &str, schema: &str) -> Option<TestEnv> {
        let reachable = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            tokio::net::TcpStream::connect("127.0.0.1:5432"),
        )
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false);
        if !reachable {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: PostgreSQL is not reachable on 127.0.0.1:5432 and CI=true");
            }
            eprintln!("SKIPPED: {test}: PostgreSQL is not reachable on 127.0.0.1:5432");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut opts = ServeOptions::sqlite("127.0.0.1:0".parse().expect("addr"), dir.path());
        opts.database_url = Some("postgres://postgres@127.0.0.1:5432/test".into());
        opts.database_schema = Some(schema.to_string());
        Some(env_with(dir, opts).await)
    }

    async fn env_with(dir: tempfile::TempDir, opts: ServeOptions) -> TestEnv {
        env_with_customized(dir, opts, |_| {}).await
    }

    async fn env_with_customized(
        dir: tempfile::TempDir,
        opts: ServeOptions,
        customize: impl FnOnce(&mut Shared),
    ) -> TestEnv {
        let (state, token_path) = build_state_with(
            &opts,
            "127.0.0.1:1".parse().expect("addr"),
            |s: &mut Shared| {
                s.verifiers.insert(0, Arc::new(TestSaTokens));
                customize(s);
            },
        )
        .await
        .expect("state");
        let admin = std::fs::read_to_string(token_path)
            .expect("token")
            .trim()
            .to_string();
        TestEnv {
            _dir: dir,
            state,
            admin,
        }
    }

    impl TestEnv {
        /// Drops this environment's PostgreSQL schema (no-op on SQLite).
        pub(crate) async fn drop_pg_schema(&self) {
            if self.state.store.backend() != crate::store::Backend::Postgres {
                return;
            }
            // `name` has no Any-driver decoding, hence the cast.
            let schema: Result<(String,), _> =
                sqlx::query_as("SELECT CAST(current_schema() AS TEXT)")
                    .fetch_one(self.state.store.pool())
                    .await;
            match schema {
                Ok((schema,)) if schema.starts_with("cp_") => {
                    if let Err(e) = sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
                        .execute(self.state.store.pool())
                        .await
                    {
                        eprintln!("drop schema {schema}: {e}");
                    }
                }
                Ok((other,)) => eprintln!("not dropping schema {other}: not a test schema"),
                Err(e) => eprintln!("current_schema(): {e}"),
            }
        }

        pub(crate) async fn call(
            &self,
            method: Method,
            uri: &str,
            token: Option<&str>,
            body: Option<Value>,
        ) -> (StatusCode, Value) {
            let mut b = Request::builder().method(method).uri(uri);
            if let Some(t) = token {
                b = b.header("authorization", format!("Bearer {t}"));
            }
            let body = match body {
                Some(v) => {
                    b = b.header("content-type", "application/json");
                    Body::from(v.to_string())
                }
                None => Body::empty(),
            };
            let resp = oneshot(self.state.clone(), b.body(body).expect("request")).await;
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .expect("body");
            let v = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
            };
            (status, v)
        }

        pub(crate) async fn admin(
            &self,
            method: Method,
            uri: &str,
            body: Option<Value>,
        ) -> (StatusCode, Value) {
            let t = self.admin.clone();
            self.call(method, uri, Some(&t), body).await
        }
    }
}
