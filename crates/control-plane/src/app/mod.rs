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
        .merge(crate::apis::cloudtrace::routes())
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

/// `POST /v1/projects/{project}/serviceAccounts/{account}:{verb}` verbs that belong to another
/// API than IAM (whose route this path is). Arguments: state, the project segment, the account
/// segment without its verb, the whole request.
pub type AccountVerbHandler =
    fn(AppState, String, String, Request) -> Pin<Box<dyn Future<Output = Response> + Send>>;

/// IAM Credentials' `generateIdToken` and `generateAccessToken` share IAM's account path.
pub const ACCOUNT_VERB_HANDLERS: &[(&str, AccountVerbHandler)] = &[
    (
        "generateIdToken",
        crate::apis::iamcredentials::generate_id_token_handler,
    ),
    (
        "generateAccessToken",
        crate::apis::iamcredentials::generate_access_token_handler,
    ),
];
