//! The HTTP layer: shared state ([`state`]), extractors ([`extract`]), the router and its
//! middleware ([`router`]), in-process start-up ([`serve`]) and the console.
//!
//! Layer rule: `app` is the top of the crate; it composes `apis/` and nothing below imports
//! `app` except for [`AppState`], the extractors and [`split_verb`].
//!
//! # Adding an API
//! 1. Handlers: `pub mod yourapi;` in `apis/mod.rs`; they parse, authorize ([`crate::authz`]),
//!    call the store and shape the response.
//! 2. Tables: a `store/<resource>.rs` module holding the SQL and its
//!    `pub const MIGRATIONS: &[store::Migration]`, listed in [`crate::store::migrations`].
//! 3. Routes: `pub fn routes() -> Router<AppState>` in your API module, merged in [`router`] below.
//!    Routes are written without any API prefix (`/v1/projects/{project}/serviceAccounts`); the
//!    prefixes `/servicemanagement/`, `/serviceusage/`, `/iam/`, `/cloudresourcemanager/`,
//!    `/apikeys/` and `/servicecontrol/` are stripped before routing so users may point several
//!    `api_endpoint_overrides` at one port.
//! 4. Google custom verbs (`/v1/projects/{p}:getIamPolicy`) live *inside* a path segment, which
//!    axum cannot route on. Route the segment as a parameter (`/v1/projects/{project}`) and split it
//!    with [`split_verb`]. Axum path parameters are already percent-decoded (`%3A` → `:`).
//! 5. `POST /v1/services/{service}:check|:report|:allocateQuota` arrive at Service Management's
//!    `POST /v1/services/{service}` route, which hands them to [`SERVICE_VERB_HANDLERS`], where
//!    Service Control's handlers are registered.
//! 6. Per-module start-up state (caches, keys): add a field to [`Shared`] and initialise it in
//!    [`build_state`]; a handler that needs only part of it takes a substate
//!    ([`IdentityState`]) through axum's `FromRef`. Service-account token verification plugs in as an [`authz::TokenVerifier`]
//!    pushed onto `Shared::verifiers` in [`build_state`].

pub mod console;
pub mod extract;
pub mod router;
pub mod serve;
pub mod state;

use std::future::Future;
use std::pin::Pin;

use axum::extract::Request;
use axum::response::Response;
use axum::Router;

pub use extract::{
    page_token, parse_json_body, JsonBody, Page, PageSizeWording, Params, MAX_BODY_BYTES,
};
pub use router::{oneshot, service, split_verb};
pub use serve::{build_state, build_state_with, serve, RunningServer, ServeError, ServeOptions};
pub use state::{AppState, IdentityState, Shared};

use router::{method_not_allowed, not_found};

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
/// Service Control's `check`, `allocateQuota` and `report` are registered here.
pub const SERVICE_VERB_HANDLERS: &[(&str, ServiceVerbHandler)] = &[
    ("check", crate::apis::servicecontrol::check_handler),
    (
        "allocateQuota",
        crate::apis::servicecontrol::allocate_quota_handler,
    ),
    ("report", crate::apis::servicecontrol::report_handler),
];

/// In-process helpers for handler tests: a fresh SQLite state and a request runner.
// The PostgreSQL helpers have no caller in src (tests/support has its own).
#[cfg(test)]
#[allow(dead_code)]
pub(crate) mod test_support {
    use super::*;
    use crate::authz::{self, TokenVerifier};
    use crate::error::ApiError;
    use axum::body::Body;
    use axum::http::{Method, StatusCode};
    use serde_json::Value;
    use std::sync::Arc;

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
