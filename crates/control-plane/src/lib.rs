//! The Portico control plane: Google-shaped REST APIs on axum, storage on sqlx.
//!
//! Layers, top to bottom (a layer imports only the layers below it; the one exception is
//! `app`'s state and extractors — [`app::AppState`], [`app::JsonBody`], [`app::Params`] — which
//! every handler takes, while `app`'s router is what composes the handlers):
//! - [`app`]: shared state, extractors, router assembly, API-prefix stripping, request
//!   logging, in-process start-up ([`app::serve`]), the console.
//! - [`apis`]: one module per Google API, handlers only (Service Management, Service Usage,
//!   IAM, Resource Manager, OAuth2 tokens, published key sets, API Keys, Service Control,
//!   operations). An API module never imports another.
//! - [`authz`]: the admin token, the [`authz::Principal`] extractor, token verifiers, the IAM
//!   policy model and permission checks.
//! - [`store`]: the SQLite/PostgreSQL pool, portable-SQL rules, the migrations, and all the
//!   SQL, one module per resource; it imports nothing above it.
//!
//! `tests/layers.rs` checks these rules on the sources.
//! - Beside them: [`error`] (`ApiError`, Google's error body), [`crypto`] (at-rest
//!   encryption of key strings), [`datadir`] (the `--data` directory, kept private),
//!   [`cli`] (`portico control-plane` flags).

pub mod apis;
pub mod app;
pub mod authz;
pub mod cli;
pub mod crypto;
pub mod datadir;
pub mod error;
pub mod idtoken;
pub mod projects;
pub mod store;
