//! The data plane: `portico esp`, an ESP v1-compatible API proxy on hyper 1.x.
//!
//! Where to find things, in the order a request meets them:
//! - [`cli`]: ESP's start-up flags, parsed into [`settings::Settings`] (exit codes as
//!   `start_esp`); [`cli::espv2`]: ESPv2's, into the same settings. Nothing else imports it.
//! - [`dialect`]: which proxy Portico speaks for (ESP v1 or ESPv2) and the table of every
//!   place where the two answer differently.
//! - [`settings`]: the runtime settings every part reads (backend address, rewrite rules,
//!   rollout strategy, header limits, ...).
//! - [`server`]: listeners (HTTP/1.1, h2c, TLS+h2), one single-threaded runtime per core with
//!   `SO_REUSEPORT`, the status port, rollout following, graceful shutdown.
//! - [`config_source`]: loads the service config and follows rollouts (Service Management).
//! - [`pipeline`]: the request path, one function per phase, in ESP's order:
//!   - `pipeline/phases.rs`: **prepare** (the head settled by [`request_head`], health checks,
//!     preflights, `--rewrite`), **match** (against [`routing`]'s per-config method tables),
//!     **authenticate** ([`auth`]; the API key in [`auth::api_key`]), **check** and quota
//!     ([`service_control`]);
//!   - `pipeline/backend.rs`: **forward** ([`forward`], over the capped backend connection
//!     pool in [`upstream`]; the request body and forwarding errors both use are in
//!     [`request_body`]; ESPv2's backend retries in [`retry`]) and **respond**;
//!   - `pipeline/body.rs`: the response body, whose end runs **report** (metrics, access log,
//!     Service Control report);
//!   - `pipeline/state.rs` (per-request state), `pipeline/errors.rs` (the proxy's error
//!     responses).
//! - [`service_control`]: the Service Control client, each concern (check, quota, report) with
//!   its cache; [`outbound_auth`]: the tokens the proxy signs for its calls to the control
//!   plane; [`gcp_metadata`]: what ESPv2 asks the metadata server besides tokens (project,
//!   zone, platform; the service name with `--check_metadata`).
//! - [`tls`]: TLS settings (serving certificate, client certificates, versions, suites; backend
//!   trust anchors and client certificate) and the rustls configurations built from them at
//!   start; [`tls::from_espv2_flags`] maps ESPv2's TLS flags.
//! - [`memory`]: allocator settings and releasing start-up code pages.
//! - [`header_rules`]: ESPv2's `--add_request_header` & co. (values with Envoy's variables);
//!   [`compression`]: `--enable_response_compression` (negotiation, what is compressed, the
//!   streaming encoder and the cap on encoders).
//! - [`error`]: ESP's exact error bodies, codes from [`error::Code`]; [`cors`]:
//!   `--cors_preset`; [`status`]: `/endpoints_status`, `/healthz`, `/metrics`; [`metrics`];
//!   [`access_log`]; [`limits`]: per-line header limits.
//!
//! Layer rules: the serving modules read [`settings`], never [`cli`]; the pipeline reaches
//! Service Control only through [`pipeline::ControlApi`]; the top-level modules import each
//! other without a cycle (`tests/module_graph.rs`).

pub mod access_log;
pub mod adc;
pub mod auth;
pub mod backend_auth;
pub mod backend_net;
pub mod cli;
pub mod compression;
pub mod config_source;
pub mod cors;
pub mod dialect;
pub mod error;
pub mod forward;
#[doc(hidden)]
pub mod fuzz;
pub mod gcp_metadata;
pub mod grpc;
pub mod grpc_health;
pub mod header_rules;
pub mod iam_credentials;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod outbound_auth;
pub mod pipeline;
pub mod request_body;
pub mod request_head;
pub mod retry;
pub mod routing;
pub mod server;
pub mod service_control;
pub mod settings;
pub mod status;
pub mod tls;
pub mod trace;
pub mod upstream;
