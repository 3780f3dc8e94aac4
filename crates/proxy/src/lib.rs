//! The data plane: `portico esp`, an ESP v1-compatible API proxy on hyper 1.x.
//!
//! Where to find things, in the order a request meets them:
//! - [`cli`]: ESP's start-up flags → [`cli::Settings`] (exit codes as `start_esp`).
//! - [`server`]: listeners (HTTP/1.1, h2c, TLS+h2), one single-threaded runtime per core with
//!   `SO_REUSEPORT`, the status port, rollout following, graceful shutdown.
//! - [`config_source`]: loads the service config and follows rollouts (Service Management).
//! - [`request_head`]: the method, headers and path settled before anything reads them (the
//!   method and path the backend runs are the ones matched).
//! - [`routing`]: per-config method tables — where a request is **matched**.
//! - [`pipeline`]: the request path in ESP's order — match, **authenticate** ([`auth`]), API
//!   key, **check** and quota ([`service_control`]), **forward** ([`forward`], over the capped backend
//!   connection pool in [`upstream`]), **report**.
//! - [`memory`]: allocator settings and releasing start-up code pages.
//! - [`error`]: ESP's exact error bodies; [`cors`]: `--cors_preset`; [`status`]:
//!   `/endpoints_status`, `/healthz`, `/metrics`; [`metrics`]; [`access_log`].

pub mod access_log;
pub mod auth;
pub mod cli;
pub mod config_source;
pub mod cors;
pub mod error;
pub mod forward;
#[doc(hidden)]
pub mod fuzz;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod outbound_auth;
pub mod pipeline;
pub mod request_head;
pub mod routing;
pub mod server;
pub mod service_control;
pub mod settings;
pub mod status;
pub mod upstream;
