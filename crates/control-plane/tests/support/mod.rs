//! Shared set-up for the control plane's API tests: a fresh state on SQLite (or PostgreSQL in
//! its own schema) and a request runner that goes through the whole router, as a client would.
//! Built on the crate's public API only, so the tests exercise what an embedder can reach.
#![allow(dead_code)]

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use portico_control_plane::app::{build_state_with, oneshot, AppState, ServeOptions, Shared};
use portico_control_plane::authz::{self, TokenVerifier};
use portico_control_plane::error::ApiError;
use serde_json::Value;

/// Accepts `sa:<email>` bearer tokens as that service account, so permission checks can be
/// exercised without the identity module.
pub struct TestSaTokens;

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

pub struct TestEnv {
    pub _dir: tempfile::TempDir,
    pub state: AppState,
    pub admin: String,
}

pub async fn env() -> TestEnv {
    env_customized(|_| {}).await
}

/// [`env`] with a last change to the state (conversion limits, hooks).
pub async fn env_customized(customize: impl FnOnce(&mut Shared)) -> TestEnv {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = ServeOptions::sqlite("127.0.0.1:0".parse().expect("addr"), dir.path());
    env_with_customized(dir, opts, customize).await
}

/// A state on PostgreSQL in a fresh schema, or `None` after a loud `SKIPPED:` when
/// PostgreSQL is absent (a failure when `CI=true`). Call [`TestEnv::drop_pg_schema`] at the
/// end.
pub async fn env_pg(test: &str) -> Option<TestEnv> {
    let schema = format!("cp_{}", uuid::Uuid::new_v4().simple());
    env_pg_schema(test, &schema).await
}

/// Like [`env_pg`] on a given schema (two environments on one schema = two replicas).
pub async fn env_pg_schema(test: &str, schema: &str) -> Option<TestEnv> {
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

/// One request through the whole router, as a client sends it: a bearer token if given, a JSON
/// body if given; the answer's status and body (JSON, or the text as a JSON string). Bounded at
/// 30 s so a hung handler fails the test instead of hanging it.
pub async fn request(
    state: &AppState,
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
    let req = b.body(body).expect("request");
    let resp = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        oneshot(state.clone(), req),
    )
    .await
    .expect("response within 30 s");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
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

impl TestEnv {
    /// Drops this environment's PostgreSQL schema (no-op on SQLite).
    pub async fn drop_pg_schema(&self) {
        if self.state.store.backend() != portico_control_plane::store::Backend::Postgres {
            return;
        }
        // `name` has no Any-driver decoding, hence the cast.
        let schema: Result<(String,), _> = sqlx::query_as("SELECT CAST(current_schema() AS TEXT)")
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

    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        request(&self.state, method, uri, token, body).await
    }

    pub async fn admin(
        &self,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let t = self.admin.clone();
        self.call(method, uri, Some(&t), body).await
    }
}

/// Service Control's stores on each backend, with a loud skip when PostgreSQL/Redis are
/// absent (a failure when `CI=true`).
pub mod testutil {
    use portico_control_plane::store::Store;

    pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
    pub const REDIS_URL: &str = "redis://127.0.0.1:6379/";

    fn on_ci() -> bool {
        std::env::var("CI").is_ok_and(|v| v == "true")
    }

    /// Missing service: skip loudly, or fail on CI.
    pub fn skip(what: &str, err: impl std::fmt::Display) {
        if on_ci() {
            panic!("{what} is required on CI: {err}");
        }
        eprintln!("SKIPPED: {what} not available: {err}");
    }

    pub fn unique(prefix: &str) -> String {
        format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
    }

    pub async fn sqlite_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_sqlite(dir.path()).await.expect("open sqlite");
        store
            .migrate(&[portico_control_plane::store::servicecontrol::MIGRATIONS])
            .await
            .expect("migrations");
        (dir, store)
    }

    /// A PostgreSQL store on a fresh schema, or `None` (after a `SKIPPED:` line) when absent.
    pub async fn pg_store() -> Option<(String, Store)> {
        let schema = unique("sc_test");
        match Store::open_postgres(PG_URL, Some(&schema)).await {
            Ok(store) => {
                store
                    .migrate(&[portico_control_plane::store::servicecontrol::MIGRATIONS])
                    .await
                    .expect("migrations");
                Some((schema, store))
            }
            Err(e) => {
                skip("PostgreSQL at 127.0.0.1:5432", e);
                None
            }
        }
    }

    /// Drops a test schema (best effort: a leftover schema only wastes space).
    pub async fn drop_pg_schema(store: &Store, schema: &str) {
        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .execute(store.pool())
            .await;
    }

    pub async fn redis_client() -> Option<redis::Client> {
        let client = match redis::Client::open(REDIS_URL) {
            Ok(c) => c,
            Err(e) => {
                skip("Redis at 127.0.0.1:6379", e);
                return None;
            }
        };
        match tokio::time::timeout(
            std::time::Duration::from_secs(3),
            client.get_multiplexed_async_connection(),
        )
        .await
        {
            Ok(Ok(_)) => Some(client),
            Ok(Err(e)) => {
                skip("Redis at 127.0.0.1:6379", e);
                None
            }
            Err(_) => {
                skip("Redis at 127.0.0.1:6379", "connect timed out");
                None
            }
        }
    }
}

impl TestEnv {
    /// `POST /v1/services` as the admin: creates managed service `name` owned by `producer`.
    pub async fn create_service(&self, name: &str, producer: &str) -> (StatusCode, Value) {
        self.admin(
            Method::POST,
            "/v1/services",
            Some(serde_json::json!({"serviceName": name, "producerProjectId": producer})),
        )
        .await
    }
}
