//! Service Control v1: `services/{svc}:check`, `:allocateQuota` and `:report`, plus Portico's
//! read side (rollup time series, top consumers, recent logs) and the Prometheus `/metrics`.
//!
//! Where things are:
//! - [`restrictions`]: pure matching of API-key restrictions (API targets, IPs, referrers, apps).
//! - [`quota`]: limit/window planning and the quota modes (the counters are in the store).
//! - [`report`]: operations → per-minute rollups and log rows.
//! - [`consumer`]: `consumerId` → consumer project; the service's active rollout and config.
//! - [`check`], [`allocate`], [`ingest`]: the three Service Control calls.
//! - [`query`]: the JSON read API and `/metrics`; [`prom`]: the Prometheus registry.
//!
//! Request flow: Service Management's `POST /v1/services/{s}` route hands `:check`,
//! `:allocateQuota` and `:report` to the handlers here (via [`crate::app::SERVICE_VERB_HANDLERS`]).
//! Each handler authenticates the caller, requires the matching serviceController permission on
//! the service, checks that the service exists, parses the JSON body, and answers in Google's
//! shapes. Outcomes and latencies feed [`prom::ScMetrics`].
//!
//! Layer rule: handlers only. Every statement on Service Control's tables (`sc_*`), the quota
//! counter backends (SQL and Redis) and the reads of other APIs' tables are in
//! [`crate::store::servicecontrol`]; nothing here runs SQL. Other APIs are consulted in three
//! places: `producer_of` (Service Management: does the service exist, who produces it),
//! [`consumer::resolve`] (API Keys and projects) and the activation step of [`check::check`]
//! (Service Usage).

pub mod allocate;
pub mod check;
pub mod consumer;
pub mod ingest;
pub mod prom;
pub mod query;
pub mod quota;
pub mod report;
pub mod restrictions;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use axum::Json;
use portico_config::service::Service;
use portico_servicecontrol::{AllocateQuotaResponse, CheckResponse, ReportResponse};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::app::AppState;
use crate::authz::{perms, require_service_permission, Principal};
use crate::error::ApiError;
use crate::store::servicecontrol::reports;
use crate::store::Store;

pub use query::routes;

/// Service Control's start-up state (one per server).
pub struct ScState {
    pub counters: quota::Counters,
    pub clock: quota::SharedClock,
    pub metrics: prom::ScMetrics,
    pub retention: report::Retention,
    configs: Mutex<HashMap<(String, String), Arc<Service>>>,
    /// Dropping the state (server gone) closes this channel, which stops the pruning task.
    _stop: tokio::sync::watch::Sender<()>,
}

/// Parsed configs kept in memory; configs are immutable, this only bounds memory.
const CONFIG_CACHE_ENTRIES: usize = 256;
/// How often old counters, logs and replay ids are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Counters(#[from] quota::CounterError),
}

impl ScState {
    /// Chooses the counter backend (Redis when a client is given, else the database) and starts
    /// the background pruning. `redis_prefix` namespaces Redis keys (e.g. per deployment).
    pub async fn start(
        store: &Store,
        redis: Option<&redis::Client>,
        redis_prefix: &str,
        clock: quota::SharedClock,
        retention: report::Retention,
    ) -> Result<ScState, StartError> {
        let counters = match redis {
            Some(c) => quota::Counters::Redis(
                quota::RedisCounters::connect(c.clone(), redis_prefix).await?,
            ),
            None => quota::Counters::Sql(quota::SqlCounters::new(store.clone())),
        };
        let (stop, mut stopped) = tokio::sync::watch::channel(());
        let (store2, counters2, clock2) = (store.clone(), counters.clone(), clock.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PRUNE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let now = clock2.now_ms();
                if let Err(e) = counters2.prune(now).await {
                    tracing::warn!(error = %e, "pruning quota counters failed");
                }
                match reports::prune(&store2, &retention, now).await {
                    Ok(n) if n > 0 => tracing::debug!(deleted = n, "pruned service logs"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "pruning service logs failed"),
                }
            }
        });
        tracing::info!(
            backend = counters.kind(),
            "service control quota counters ready"
        );
        Ok(ScState {
            counters,
            clock,
            metrics: prom::ScMetrics::new(),
            retention,
            configs: Mutex::new(HashMap::new()),
            _stop: stop,
        })
    }

    fn config_cache_get(&self, key: &(String, String)) -> Option<Arc<Service>> {
        self.configs.lock().ok()?.get(key).cloned()
    }

    fn config_cache_put(&self, key: (String, String), cfg: Arc<Service>) {
        if let Ok(mut m) = self.configs.lock() {
            if m.len() >= CONFIG_CACHE_ENTRIES {
                m.clear();
            }
            m.insert(key, cfg);
        }
    }
}

/// Largest Service Control request body accepted.
const MAX_BODY: usize = 8 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Call {
    Check,
    AllocateQuota,
    Report,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::Check => "check",
            Call::AllocateQuota => "allocateQuota",
            Call::Report => "report",
        }
    }
    fn permission(self) -> &'static str {
        match self {
            Call::Check => perms::SERVICES_CHECK,
            Call::AllocateQuota => perms::SERVICES_QUOTA,
            Call::Report => perms::SERVICES_REPORT,
        }
    }
}

/// The producer project of `service`; a service that does not exist is a 404.
///
/// Services are Service Management's table; this is the one place Service Control reads it.
async fn producer_of(state: &AppState, service: &str) -> Result<String, ApiError> {
    crate::store::services::producer_project(&state.store, service)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Service '{service}' not found.")))
}

/// Authentication, authorisation, service existence, body parsing: common to all three calls.
async fn prelude<T: DeserializeOwned>(
    state: &AppState,
    service: &str,
    call: Call,
    req: Request,
) -> Result<(String, consumer::Active, T), ApiError> {
    let (mut parts, body) = req.into_parts();
    let principal = Principal::from_request_parts(&mut parts, state).await?;
    require_service_permission(state, &principal, service, call.permission()).await?;
    let producer = producer_of(state, service).await?;
    if let Some(ct) = parts.headers.get(http::header::CONTENT_TYPE) {
        if ct.as_bytes().starts_with(b"application/x-protobuf") {
            return Err(ApiError::invalid_argument(
                "Portico's Service Control accepts JSON (application/json) only.",
            ));
        }
    }
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|e| ApiError::invalid_argument(format!("Cannot read request body: {e}")))?;
    let parsed: T = if bytes.iter().all(u8::is_ascii_whitespace) {
        // ESP's rollout ping is an empty ReportRequest; an empty body means the same.
        serde_json::from_slice(b"{}")
    } else {
        serde_json::from_slice(&bytes)
    }
    .map_err(|e| ApiError::invalid_argument(format!("Invalid JSON payload received. {e}")))?;
    let active = consumer::active(state, service).await?;
    Ok((producer, active, parsed))
}

/// A Service Control response that may carry per-operation errors (an answered call, but a
/// refusal: `denied` in the call metrics).
trait Refusals: Serialize {
    fn refuses(&self) -> bool;
}

impl Refusals for CheckResponse {
    fn refuses(&self) -> bool {
        !self.check_errors.is_empty()
    }
}

impl Refusals for AllocateQuotaResponse {
    fn refuses(&self) -> bool {
        !self.allocate_errors.is_empty()
    }
}

impl Refusals for ReportResponse {
    fn refuses(&self) -> bool {
        !self.report_errors.is_empty()
    }
}

/// The call's metrics result (`ok` or `denied`) and its 200 response.
fn answered(r: impl Refusals) -> (&'static str, Response) {
    let result = if r.refuses() { "denied" } else { "ok" };
    (result, Json(r).into_response())
}

async fn answer(
    state: &AppState,
    service: &str,
    req: Request,
    call: Call,
) -> Result<(&'static str, Response), ApiError> {
    let sc = &state.servicecontrol;
    Ok(match call {
        Call::Check => {
            let (producer, active, body) = prelude(state, service, call, req).await?;
            answered(check::check(state, service, &producer, &active, body).await?)
        }
        Call::AllocateQuota => {
            let (producer, active, body) = prelude(state, service, call, req).await?;
            answered(allocate::allocate(state, sc, service, &producer, &active, body).await?)
        }
        Call::Report => {
            let (producer, active, body) = prelude(state, service, call, req).await?;
            answered(ingest::report(state, sc, service, &producer, &active, body).await?)
        }
    })
}

async fn run(state: AppState, service: String, req: Request, call: Call) -> Response {
    let started = Instant::now();
    let (result, response) = match answer(&state, &service, req, call).await {
        Ok(answered) => answered,
        Err(e) => ("error", e.into_response()),
    };
    state
        .servicecontrol
        .metrics
        .record_call(call.name(), result, started.elapsed().as_secs_f64());
    response
}

type VerbFuture = Pin<Box<dyn Future<Output = Response> + Send>>;

/// `POST /v1/services/{service}:check`.
pub fn check_handler(state: AppState, service: String, req: Request) -> VerbFuture {
    Box::pin(run(state, service, req, Call::Check))
}

/// `POST /v1/services/{service}:allocateQuota`.
pub fn allocate_quota_handler(state: AppState, service: String, req: Request) -> VerbFuture {
    Box::pin(run(state, service, req, Call::AllocateQuota))
}

/// `POST /v1/services/{service}:report`.
pub fn report_handler(state: AppState, service: String, req: Request) -> VerbFuture {
    Box::pin(run(state, service, req, Call::Report))
}
