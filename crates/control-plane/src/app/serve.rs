//! Start-up: options, building the state (storage, migrations, admin token, module state) and
//! serving it with connection limits.
//!
//! Layer rule: constructs every module's start-up state; handlers never call in here.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::router::service;
use super::state::{AppState, Shared};
use crate::authz::AdminToken;
use crate::store::{Store, StoreError};

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
/// verifiers this way).
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
    store.migrate(&crate::store::migrations()).await?;
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
    // RSA generation on first start takes a moment: off the async workers.
    let id_tokens = {
        let dir = secrets_dir.clone();
        let issuer = public_url.clone();
        tokio::task::spawn_blocking(move || {
            crate::idtoken::IdTokenSigner::load_or_create(&dir, &issuer)
        })
        .await
        .map_err(|e| ServeError::Config(format!("ID-token signing key: {e}")))?
        .map_err(|e| ServeError::Config(e.to_string()))?
    };
    let published = id_tokens.public_key();
    crate::store::idtoken_keys::register(
        &store,
        &crate::store::idtoken_keys::IssuerKey {
            kid: published.kid.clone(),
            public_pem: published.public_pem.clone(),
            certificate_pem: published.certificate_pem.clone(),
        },
    )
    .await?;
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
        master_key,
        id_tokens: std::sync::Arc::new(id_tokens),
        servicecontrol,
        conversions: crate::apis::servicemanagement::Conversions::default(),
        traces: crate::apis::cloudtrace::Retention::default(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

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
}
