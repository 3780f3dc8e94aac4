//! The Portico control plane: Google-shaped REST APIs on axum, storage on sqlx.
//!
//! Where things are:
//! - [`cli`]: `portico control-plane` flags; [`server::serve`] starts a server in-process (tests).
//! - [`server`]: shared state ([`server::AppState`]), router composition, API-prefix stripping,
//!   request logging. **Read its module doc to add a module** (migrations, routes, verbs).
//! - [`store`]: the SQLite/PostgreSQL pool, portable-SQL rules, the migrations registry.
//! - [`datadir`]: the `--data` directory: checked before binding, kept private (0700/0600).
//! - [`error`]: `ApiError`, Google's error body.
//! - [`auth`]: admin token, the [`auth::Principal`] extractor, token verifiers, IAM `Policy`,
//!   permission checks.
//! - [`operations`]: the global long-running operations table.
//! - [`projects`]: implicit projects and their numbers.
//! - [`servicemanagement`], [`serviceusage`]: Service Management v1 and Service Usage v1.
//! - [`iam`], [`resourcemanager`], [`tokens`], [`jwks`], [`apikeys`], [`crypto`]: identity —
//!   IAM v1 service accounts and keys, Resource Manager v1 project policies, the OAuth2 token
//!   endpoint and service-account token verification, published key sets, API Keys v2, and
//!   at-rest encryption of key strings.
//! - [`servicecontrol`]: Service Control v1 (`:check`, `:allocateQuota`, `:report`), reached
//!   through `server::SERVICE_VERB_HANDLERS`.
//! - [`console`]: the web console (`GET /console`), static assets reading the APIs above.

pub mod apikeys;
pub mod auth;
pub mod cli;
pub mod console;
pub mod crypto;
pub mod datadir;
pub mod error;
pub mod iam;
pub mod jwks;
pub mod operations;
pub mod projects;
pub mod resourcemanager;
pub mod server;
pub mod servicecontrol;
pub mod servicemanagement;
pub mod serviceusage;
pub mod store;
pub mod tokens;
