//! The Service Control client used by the request pipeline (through
//! [`crate::pipeline::ControlApi`]). It imports nothing of the pipeline; its outbound tokens come
//! from [`crate::outbound_auth`]. This file holds the facade ([`ServiceControl`]: `check`,
//! `allocate_quota`, `report`, `shutdown`), its options, statistics and metrics, the state the
//! three concerns share (`Inner`, `Sharded`) and the housekeeping task; each concern keeps its
//! cache and its network half in one file, and `transport` makes the HTTP calls for all three.
//!
//! * **check** — [`check`]: the verdict cache and its key, then the `:check` request, its call
//!   and the verdict stored back (`impl Inner` there). A request waits only on a miss; fail-open
//!   only for network errors and HTTP 5xx when the policy is open; exact ESP error messages.
//! * **quota** — [`quota`]: the quota cache answers at once (never waits); a new signature's
//!   first allocation, and every second the aggregated due ones (from the housekeeping task),
//!   go out as `:allocateQuota` (`quota::send_allocation`), whose verdicts go back into the cache.
//! * **report** — cache in [`aggregate`] (a request is merged in O(1) into its signature's
//!   aggregate; memory bounded by distinct signatures, `endpoints_log` entries capped per
//!   interval with errors preferred), network in [`report`]: aggregates become operations,
//!   queued and sent every second by `report::report_loop` in batches of up to 100 (ESP sends
//!   10; one larger JSON request costs the control plane less than ten small ones). Batches that
//!   fail for network/5xx reasons stay in a bounded buffer (oldest dropped and counted) and are
//!   retried with backoff until the control plane answers again. [`ServiceControl::shutdown`]
//!   flushes.
//!
//! Every response carrying `serviceRolloutId` is passed to the [`RolloutNotifier`] so managed
//! rollouts are picked up without waiting for the next poll.

mod aggregate;
pub mod check;
pub mod quota;
pub mod report;
mod transport;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use portico_credentials::ServiceAccountKey;
use portico_servicecontrol::labels;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{watch, Notify};

pub use aggregate::{DEFAULT_LOG_ENTRIES_PER_SECOND, DEFAULT_MAX_LOG_ENTRIES_PER_FLUSH};
pub use quota::metric_costs;
pub use report::RequestRecord;

use crate::config_source::{Rollout, RolloutNotifier};
use crate::error::{Code, EspError};
use crate::outbound_auth::{control_plane_of, TokenSource};
use crate::settings::{CallPolicy, ServiceControlCalls, Settings};
use aggregate::{Aggregator, LogPolicy};
use check::{CheckCache, Lookup};
use quota::{Decision, NewEntry, QuotaCache};
use report::{QueuedOp, ReportFilter, StaticLabels};
use transport::Transport;

/// Service Control's public address, used when nothing else names one.
pub const DEFAULT_SERVICE_CONTROL_URL: &str = "https://servicecontrol.googleapis.com";

/// Longest API key the proxy looks up. Google's keys (and Portico's) are 39 bytes; anything
/// over this is answered as an invalid key at once — no cache entry, no `:check` — so a client
/// cannot make the proxy hold or send strings of its choosing (docs/security.md).
pub const MAX_API_KEY_BYTES: usize = 128;

/// ESP's answer to an invalid API key (400, code 3), for keys refused without a `:check`.
pub fn invalid_api_key() -> EspError {
    EspError::new(
        Code::InvalidArgument,
        "API key not valid. Please pass a valid API key.",
        crate::error::Cause::ServiceControl,
    )
    .with_kind(crate::error::ErrorKind::CheckRefused {
        code: "API_KEY_INVALID".into(),
        service: "".into(),
    })
}

/// Picks the Service Control base URL: `--service_control_url_override`, else the control
/// plane named by the key file's `token_uri`, else `https://` + the config's
/// `control.environment`. `None` means Service Control is not configured.
pub fn resolve_service_control_url(
    url_override: Option<&str>,
    key: Option<&ServiceAccountKey>,
    control_environment: Option<&str>,
) -> Option<String> {
    if let Some(u) = url_override.filter(|u| !u.is_empty()) {
        return Some(u.trim_end_matches('/').to_string());
    }
    if let Some(origin) = key.and_then(control_plane_of) {
        return Some(origin);
    }
    let env = control_environment.filter(|e| !e.is_empty())?;
    Some(if env.contains("://") {
        env.trim_end_matches('/').to_string()
    } else {
        format!("https://{}", env.trim_end_matches('/'))
    })
}

/// Settings; [`ServiceControlOptions::new`] gives ESP's defaults.
#[derive(Debug, Clone)]
pub struct ServiceControlOptions {
    pub base_url: String,
    pub credentials: Option<Arc<ServiceAccountKey>>,
    /// `--metadata`: access tokens from this server when there is no key file.
    pub metadata: Option<crate::outbound_auth::MetadataTokens>,
    /// Another account's access tokens for every call, instead of the proxy's own
    /// (`--service_control_iam_service_account`).
    pub acting_as: Option<Arc<dyn crate::outbound_auth::AccessTokens>>,
    /// `--service_control_network_fail_policy=open` (the default).
    pub network_fail_open: bool,
    pub rollout_notifier: Option<RolloutNotifier>,
    /// The configs in force (from [`crate::config_source::start`]). When given, reports carry
    /// only the metrics and logs each config declares, as ESP's do; when `None`, the full
    /// standard set is sent.
    pub service_configs: Option<watch::Receiver<Arc<Rollout>>>,
    /// Whose reports and labels to send: ESP's or ESPv2's.
    pub dialect: crate::dialect::Dialect,
    /// `servicecontrol.googleapis.com/service_agent`.
    pub service_agent: String,
    pub platform: String,
    /// `cloud.googleapis.com/location`.
    pub location: String,
    /// The zone (or region) the metadata server named; ESPv2's log entries carry it.
    pub zone: Option<String>,
    /// ESPv2: a verified key's `/credential_id` is its uid when the check named one
    /// (`--[no-]service_control_enable_api_key_uid_reporting`).
    pub api_key_uid_reporting: bool,
    /// Opening a connection to Service Control may take this long at most (ESPv2's
    /// `--cluster_connect_timeout`); each call's own timeout bounds it too. `None`: only that.
    pub connect_timeout: Option<Duration>,
    /// Per attempt; a `:check` that never answers holds its request for
    /// `check_timeout × (check_retries + 1)`.
    pub check_timeout: Duration,
    /// Attempts after the first, for transport failures only.
    pub check_retries: u32,
    pub quota_timeout: Duration,
    pub quota_retries: u32,
    pub report_timeout: Duration,
    /// Immediate attempts after the first; a batch still undelivered is kept and retried with
    /// backoff ([`ServiceControlOptions::report_retry_initial_backoff`]).
    pub report_retries: u32,
    /// 0 disables the check cache (every request waits for a remote check).
    pub check_cache_entries: usize,
    /// Bytes the check cache may hold (keys, verdicts, bookkeeping), whatever the entry count.
    pub check_cache_bytes: usize,
    pub check_refresh_interval: Duration,
    pub check_expiration: Duration,
    pub quota_cache_entries: usize,
    /// Bytes the quota cache may hold, whatever the entry count.
    pub quota_cache_bytes: usize,
    pub quota_refresh_interval: Duration,
    pub quota_expiration: Duration,
    /// Distinct operation signatures aggregated before an early flush (at most twice as many
    /// are held; requests of further new signatures are dropped and counted); 0 sends every
    /// report at once, like ESP with `cache_entries: 0`.
    pub report_cache_entries: usize,
    pub report_flush_interval: Duration,
    pub report_max_operations_per_request: usize,
    /// Batches whose JSON body exceeds this are split (a single operation is sent anyway).
    pub report_max_request_bytes: usize,
    /// Operations kept for retry while the control plane is unreachable (oldest dropped
    /// beyond this, and counted).
    pub report_buffer_operations: usize,
    /// `endpoints_log` entries kept per signature and second of flush interval (at most 100
    /// per operation, ESP's limit); entries beyond are not sent and are counted
    /// (`droppedLogEntries`). Request counts and latencies stay exact. 0 sends no entries.
    pub report_log_entries_per_second: usize,
    /// `endpoints_log` entries held across all signatures per flush interval; successes may
    /// use only half, so errors are always logged in preference.
    pub report_max_log_entries_per_flush: usize,
    pub report_retry_initial_backoff: Duration,
    pub report_retry_max_backoff: Duration,
}

impl ServiceControlOptions {
    pub fn new(base_url: impl Into<String>) -> Self {
        let calls = ServiceControlCalls::default();
        ServiceControlOptions {
            base_url: base_url.into(),
            credentials: None,
            metadata: None,
            acting_as: None,
            network_fail_open: true,
            rollout_notifier: None,
            service_configs: None,
            dialect: crate::dialect::Dialect::Esp,
            service_agent: format!("ESP/portico-{}", env!("CARGO_PKG_VERSION")),
            platform: "unknown".to_string(),
            location: "global".to_string(),
            zone: None,
            api_key_uid_reporting: true,
            connect_timeout: None,
            check_timeout: calls.check.timeout,
            check_retries: calls.check.retries,
            quota_timeout: calls.quota.timeout,
            quota_retries: calls.quota.retries,
            report_timeout: calls.report.timeout,
            report_retries: calls.report.retries,
            check_cache_entries: 10_000,
            check_cache_bytes: 16 << 20,
            check_refresh_interval: Duration::from_secs(60),
            check_expiration: Duration::from_secs(300),
            quota_cache_entries: 10_000,
            quota_cache_bytes: 16 << 20,
            quota_refresh_interval: Duration::from_secs(1),
            quota_expiration: Duration::from_secs(600),
            report_cache_entries: 10_000,
            report_flush_interval: Duration::from_secs(1),
            report_max_operations_per_request: 100,
            report_max_request_bytes: 4 << 20,
            report_buffer_operations: 10_000,
            report_log_entries_per_second: DEFAULT_LOG_ENTRIES_PER_SECOND,
            report_max_log_entries_per_flush: DEFAULT_MAX_LOG_ENTRIES_PER_FLUSH,
            report_retry_initial_backoff: Duration::from_secs(1),
            report_retry_max_backoff: Duration::from_secs(30),
        }
    }
}

impl ServiceControlOptions {
    /// Takes what the command line says about Service Control: the failure policy, the
    /// platform label, the report log caps and each call's timeout and retries.
    pub fn with_settings(mut self, settings: &Settings) -> Self {
        self.network_fail_open = settings.network_fail_open;
        self.dialect = settings.dialect;
        self.connect_timeout = settings.backend_net.connect_timeout;
        if settings.dialect == crate::dialect::Dialect::EspV2 {
            // ESPv2's agent, and where it runs as the metadata server said (nothing known:
            // its defaults).
            self.service_agent = format!("ESPv2/portico-{}", env!("CARGO_PKG_VERSION"));
            let gcp = settings.gcp.as_ref();
            self.platform = settings
                .compute_platform
                .clone()
                .or_else(|| gcp.map(|g| g.platform.to_string()))
                .unwrap_or_else(|| crate::gcp_metadata::UNKNOWN_PLATFORM.to_string());
            self.zone = gcp.and_then(|g| g.zone.clone());
            self.location = self.zone.clone().unwrap_or_else(|| "global".to_string());
            self.api_key_uid_reporting = settings.api_key_uid_reporting;
        } else if let Some(p) = &settings.compute_platform {
            self.platform = p.clone();
        }
        self.report_log_entries_per_second = settings.report_log_entries_per_second;
        self.report_max_log_entries_per_flush = settings.report_max_log_entries_per_flush;
        let calls = &settings.service_control_calls;
        self.check_timeout = calls.check.timeout;
        self.check_retries = calls.check.retries;
        self.quota_timeout = calls.quota.timeout;
        self.quota_retries = calls.quota.retries;
        self.report_timeout = calls.report.timeout;
        self.report_retries = calls.report.retries;
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceControlError {
    #[error("cannot build the Service Control HTTP client: {0}")]
    Client(String),
}

/// What the pipeline knows when it checks a request.
#[derive(Debug, Clone)]
pub struct CheckInput<'a> {
    pub service_name: &'a str,
    pub service_config_id: &'a str,
    pub operation_name: &'a str,
    pub api_key: &'a str,
    pub caller_ip: IpAddr,
    pub referer: Option<&'a str>,
    pub android_package: Option<&'a str>,
    pub android_cert: Option<&'a str>,
    pub ios_bundle: Option<&'a str>,
    /// A traced request: where the remote call on a cache miss records its span.
    pub trace: Option<crate::trace::RemoteCall<'a>>,
    /// ESPv2: the request's trace context, written on the remote `:check`.
    pub context: Option<crate::trace::CheckContext<'a>>,
}

/// A request the check allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckOk {
    pub consumer_project_number: Option<i64>,
    /// The key is valid and the API enabled for its project: report the consumer.
    pub api_key_valid: bool,
    /// Allowed only because Service Control was unreachable and the policy is fail-open;
    /// reports then use `/credential_id` = `apikey:UNKNOWN`.
    pub network_failure: bool,
    /// `checkInfo.apiKeyUid`, when the control plane returns one.
    pub api_key_uid: Option<String>,
}

/// What `:check` made of a request's API key (ESPv2 reports it as `api_key_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ApiKeyState {
    /// No check was made (no key, no check needed, the request refused before), or it could
    /// not be made: the key cannot be trusted.
    #[default]
    NotChecked,
    /// The check said the key is not valid (`API_KEY_INVALID`, `_EXPIRED`, `_NOT_FOUND`).
    Invalid,
    /// The key is valid but its project has not enabled the API (`SERVICE_NOT_ACTIVATED`).
    NotEnabled,
    /// The key is valid and the API enabled: the consumer is known (even when the check
    /// refused the request for another reason, such as a blocked referer).
    Verified,
}

impl ApiKeyState {
    /// ESPv2's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiKeyState::NotChecked => "NOT CHECKED",
            ApiKeyState::Invalid => "INVALID",
            ApiKeyState::NotEnabled => "NOT ENABLED",
            ApiKeyState::Verified => "VERIFIED",
        }
    }

    /// The state after a check answered `outcome` (ESPv2's `ClientCache::handleCheckResponse`).
    pub fn after_check(outcome: &Result<CheckOk, EspError>) -> ApiKeyState {
        match outcome {
            Ok(ok) if ok.api_key_valid && !ok.network_failure => ApiKeyState::Verified,
            Ok(_) => ApiKeyState::NotChecked,
            Err(e) => match &e.kind {
                crate::error::ErrorKind::CheckRefused { code, .. } => match &**code {
                    "API_KEY_INVALID" | "API_KEY_EXPIRED" | "API_KEY_NOT_FOUND" => {
                        ApiKeyState::Invalid
                    }
                    "SERVICE_NOT_ACTIVATED" => ApiKeyState::NotEnabled,
                    // A dependency of Service Control was down (refused under the closed
                    // network fail policy): the key was not checked.
                    c if c.ends_with("_UNAVAILABLE") => ApiKeyState::NotChecked,
                    _ => ApiKeyState::Verified,
                },
                _ => ApiKeyState::NotChecked,
            },
        }
    }
}

/// What the pipeline knows when it charges quota. `metric_costs` comes from
/// [`metric_costs`]; an empty list means the method has no quota.
#[derive(Debug, Clone)]
pub struct QuotaInput<'a> {
    pub service_name: &'a str,
    pub service_config_id: &'a str,
    /// The method selector.
    pub method_name: &'a str,
    /// Empty when the request had no key; the producer project is charged then.
    pub api_key: &'a str,
    pub producer_project_id: &'a str,
    pub caller_ip: IpAddr,
    pub referer: Option<&'a str>,
    pub metric_costs: &'a [(String, i64)],
}

/// Counters for `/endpoints_status`. The first eight are ESP's `serviceControlStatistics`
/// (same names, same order); the rest are Portico's. Serialised as proto3 JSON does uint64:
/// decimal strings.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Statistics {
    #[serde(serialize_with = "u64_string")]
    pub total_called_checks: u64,
    /// Background re-checks of stale positive entries.
    #[serde(serialize_with = "u64_string")]
    pub send_checks_by_flush: u64,
    /// Remote checks a request waited for.
    #[serde(serialize_with = "u64_string")]
    pub send_checks_in_flight: u64,
    #[serde(serialize_with = "u64_string")]
    pub total_called_reports: u64,
    /// `:report` requests of aggregated operations the control plane accepted.
    #[serde(serialize_with = "u64_string")]
    pub send_reports_by_flush: u64,
    /// `:report` requests sent unaggregated (report cache disabled) and accepted.
    #[serde(serialize_with = "u64_string")]
    pub send_reports_in_flight: u64,
    /// Operations in accepted `:report` requests.
    #[serde(serialize_with = "u64_string")]
    pub send_report_operations: u64,
    /// Largest `:report` body sent, in bytes.
    #[serde(serialize_with = "u64_string")]
    pub max_report_size: u64,
    #[serde(serialize_with = "u64_string")]
    pub check_cache_hits: u64,
    #[serde(serialize_with = "u64_string")]
    pub check_cache_misses: u64,
    #[serde(serialize_with = "u64_string")]
    pub check_failures: u64,
    #[serde(serialize_with = "u64_string")]
    pub check_cache_entries: u64,
    #[serde(serialize_with = "u64_string")]
    pub total_called_quotas: u64,
    #[serde(serialize_with = "u64_string")]
    pub send_quotas_by_flush: u64,
    #[serde(serialize_with = "u64_string")]
    pub quota_failures: u64,
    #[serde(serialize_with = "u64_string")]
    pub report_failures: u64,
    #[serde(serialize_with = "u64_string")]
    pub dropped_report_operations: u64,
    /// Operations built and not yet delivered.
    #[serde(serialize_with = "u64_string")]
    pub report_queue_depth: u64,
    /// `endpoints_log` entries not sent under the log policy (the requests are counted).
    #[serde(serialize_with = "u64_string")]
    pub dropped_log_entries: u64,
    /// Distinct operation signatures aggregated since the last flush.
    #[serde(serialize_with = "u64_string")]
    pub report_aggregates: u64,
}

fn u64_string<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[derive(Default)]
struct Stats {
    total_called_checks: Counter,
    check_cache_hits: Counter,
    check_cache_misses: Counter,
    send_checks_in_flight: Counter,
    send_checks_by_flush: Counter,
    check_failures: Counter,
    total_called_quotas: Counter,
    send_quotas_by_flush: Counter,
    quota_failures: Counter,
    total_called_reports: Counter,
    send_reports_by_flush: Counter,
    send_report_operations: Counter,
    report_failures: Counter,
    dropped_report_operations: Counter,
    dropped_log_entries: Counter,
    report_queue_depth: Gauge,
    check_cache_entries: Gauge,
    send_reports_in_flight: Counter,
    max_report_size: Gauge,
}

/// What the facade and the background tasks share. Each concern's methods on it live with its
/// cache: `impl Inner` in [`check`] and [`report`], `send_allocation` in [`quota`].
struct Inner {
    opts: ServiceControlOptions,
    transport: Transport,
    statics: StaticLabels,
    checks: Sharded<CheckCache>,
    quota: Sharded<QuotaCache>,
    /// Requests merged since the last flush.
    aggregator: Aggregator,
    /// Operations built from flushed aggregates, waiting to be (re)sent, oldest first.
    reports: Mutex<VecDeque<QueuedOp>>,
    /// Per config id; configs are immutable, so a filter never goes stale.
    report_filters: Mutex<HashMap<String, Arc<ReportFilter>>>,
    stats: Stats,
}

/// Cheap to clone; all clones share caches, buffers and background tasks.
#[derive(Clone)]
pub struct ServiceControl {
    inner: Arc<Inner>,
    wake_reports: Arc<Notify>,
    shutdown_tx: Arc<watch::Sender<bool>>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// The runtime `new` ran on: background work is spawned there even when a method is
    /// called from a thread without a current runtime (which would make `tokio::spawn` panic).
    runtime: tokio::runtime::Handle,
    /// The metadata server's token cache (no key file), shared with the trace exporter.
    metadata: Option<crate::outbound_auth::MetadataTokens>,
}

impl ServiceControl {
    /// Builds the client and starts its background tasks on the current tokio runtime.
    pub fn new(opts: ServiceControlOptions) -> Result<Self, ServiceControlError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            ServiceControlError::Client("ServiceControl::new needs a tokio runtime".to_string())
        })?;
        let metadata = opts.metadata.clone();
        let mut tokens = TokenSource::with_metadata(opts.credentials.clone(), metadata.clone());
        if let Some(other) = &opts.acting_as {
            tokens = tokens.acting_as(other.clone());
        }
        let transport = Transport::new(&opts.base_url, tokens, opts.connect_timeout)
            .map_err(|e| ServiceControlError::Client(e.to_string()))?;
        let inner = Arc::new(Inner {
            statics: StaticLabels {
                service_agent: opts.service_agent.clone(),
                user_agent: match opts.dialect {
                    crate::dialect::Dialect::Esp => "ESP",
                    crate::dialect::Dialect::EspV2 => "ESPv2",
                },
                platform: opts.platform.clone(),
                location: opts.location.clone(),
                zone: opts.zone.clone(),
                api_key_uid_reporting: opts.api_key_uid_reporting,
            },
            checks: Sharded::new(|| {
                CheckCache::new(
                    opts.check_cache_entries.div_ceil(aggregate::SHARDS),
                    opts.check_cache_bytes.div_ceil(aggregate::SHARDS),
                    opts.check_refresh_interval,
                    opts.check_expiration,
                    opts.network_fail_open,
                )
            }),
            quota: Sharded::new(|| {
                QuotaCache::new(
                    opts.quota_cache_entries.div_ceil(aggregate::SHARDS),
                    opts.quota_cache_bytes.div_ceil(aggregate::SHARDS),
                    opts.quota_refresh_interval,
                    opts.quota_expiration,
                )
            }),
            aggregator: Aggregator::new(
                opts.report_cache_entries,
                LogPolicy::new(
                    opts.report_log_entries_per_second,
                    opts.report_flush_interval,
                    opts.report_max_log_entries_per_flush,
                ),
            ),
            reports: Mutex::new(VecDeque::new()),
            report_filters: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            transport,
            opts,
        });
        let wake_reports = Arc::new(Notify::new());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let report_task = runtime.spawn(report::report_loop(
            Arc::downgrade(&inner),
            wake_reports.clone(),
            shutdown_rx.clone(),
        ));
        let quota_task = runtime.spawn(housekeeping_loop(Arc::downgrade(&inner), shutdown_rx));
        Ok(ServiceControl {
            inner,
            wake_reports,
            shutdown_tx: Arc::new(shutdown_tx),
            tasks: Arc::new(Mutex::new(vec![report_task, quota_task])),
            runtime,
            metadata,
        })
    }

    /// The metadata server's token cache this client authenticates with (no key file).
    pub fn metadata_tokens(&self) -> Option<crate::outbound_auth::MetadataTokens> {
        self.metadata.clone()
    }

    pub fn base_url(&self) -> &str {
        self.inner.transport.base()
    }

    /// Gets the access token Service Control calls carry (fetching it if it comes from a
    /// server), so start-up can wait for it (`--dependency_error_behavior`).
    pub async fn access_token_ready(&self) -> Result<(), crate::outbound_auth::TokenError> {
        self.inner.transport.token_ready().await
    }

    /// Checks a request that carries an API key. `Err` is the response to send.
    pub async fn check(&self, input: CheckInput<'_>) -> Result<CheckOk, EspError> {
        let inner = &self.inner;
        inner.stats.total_called_checks.inc();
        if input.api_key.len() > MAX_API_KEY_BYTES {
            return Err(invalid_api_key());
        }
        let key = check::cache_key(&input);
        let cached = inner.checks.for_key(&key).lock().ok().and_then(|mut c| {
            if c.enabled() {
                Some(c.lookup(&key, Instant::now()))
            } else {
                None
            }
        });
        match cached {
            Some(Lookup::Hit(outcome)) => {
                inner.stats.check_cache_hits.inc();
                return outcome;
            }
            Some(Lookup::HitAndRefresh(ok)) => {
                inner.stats.check_cache_hits.inc();
                inner.stats.send_checks_by_flush.inc();
                let request = inner.check_request(&input);
                let bg = self.inner.clone();
                let service = input.service_name.to_string();
                self.runtime.spawn(async move {
                    // A refresh is no request's call: no context (as Envoy's flush transport).
                    let verdict = bg.remote_check(&service, &request, None).await;
                    bg.complete_check(&key, &verdict);
                });
                return Ok(ok);
            }
            Some(Lookup::Miss) => {
                inner.stats.check_cache_misses.inc();
            }
            None => {}
        }
        inner.stats.send_checks_in_flight.inc();
        // ESPv2: each attempt's span is the parent of the context headers it carries, and is
        // recorded when traced.
        let traced = input.trace.map(|t| (t, std::time::SystemTime::now()));
        let context = input.context.map(|c| c.call());
        let call = context.clone();
        // The remote check runs in its own task so that a client hanging up (which drops this
        // future) cannot leave a cache entry marked "being re-checked" forever.
        let request = inner.check_request(&input);
        let bg = self.inner.clone();
        let service = input.service_name.to_string();
        let task = self.runtime.spawn(async move {
            let verdict = bg.remote_check(&service, &request, call.as_deref()).await;
            bg.complete_check(&key, &verdict);
            verdict.outcome
        });
        let joined = task.await;
        if let Some((t, start)) = traced {
            let attempts = context.map(|c| c.attempts()).unwrap_or_default();
            t.record(start, &attempts);
        }
        match joined {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::error!(error = %e, "Service Control check task failed");
                Err(EspError::new(
                    Code::Internal,
                    "Service Control check failed",
                    crate::error::Cause::ServiceControl,
                ))
            }
        }
    }

    /// Charges quota without waiting: `Err` only when an earlier allocation for the same
    /// method and consumer came back negative.
    pub fn allocate_quota(&self, input: QuotaInput<'_>) -> Result<(), EspError> {
        if input.metric_costs.is_empty() {
            return Ok(());
        }
        if input.api_key.len() > MAX_API_KEY_BYTES {
            return Err(invalid_api_key());
        }
        let inner = &self.inner;
        inner.stats.total_called_quotas.inc();
        let key = quota::cache_key(&input);
        let consumer_id = || {
            if input.api_key.is_empty() {
                format!("project:{}", input.producer_project_id)
            } else {
                format!("api_key:{}", input.api_key)
            }
        };
        let make_labels = || {
            let mut l = BTreeMap::new();
            l.insert(labels::CALLER_IP.to_string(), input.caller_ip.to_string());
            if let Some(r) = input.referer {
                l.insert(labels::REFERER.to_string(), r.to_string());
            }
            l.insert(
                labels::USER_AGENT.to_string(),
                inner.statics.user_agent.to_string(),
            );
            l.insert(
                labels::SERVICE_AGENT.to_string(),
                inner.statics.service_agent.clone(),
            );
            l
        };
        let decision = match inner.quota.for_key(&key).lock() {
            Ok(mut q) => q.decide(
                key,
                NewEntry {
                    service: input.service_name,
                    config_id: input.service_config_id,
                    method_name: input.method_name,
                    consumer_id: &consumer_id,
                    labels: &make_labels,
                    costs: input.metric_costs,
                },
                Instant::now(),
            ),
            // A poisoned lock means a panic elsewhere; quota fails open rather than failing
            // every request.
            Err(_) => Decision::Allow,
        };
        match decision {
            Decision::Allow => Ok(()),
            Decision::Deny(e) => Err(e),
            Decision::AllowAndSend(alloc) => {
                self.runtime
                    .spawn(quota::send_allocation(self.inner.clone(), alloc));
                Ok(())
            }
        }
    }

    /// Reports a finished request: merges it into its signature's aggregate (O(1), one shard
    /// lock) and keeps its log entry if the log policy allows. Never blocks on the network.
    pub fn report(&self, record: RequestRecord) {
        let inner = &self.inner;
        inner.stats.total_called_reports.inc();
        let added = inner
            .aggregator
            .add(record, std::time::SystemTime::now(), |config_id| {
                inner.report_filter(config_id)
            });
        if !added.accepted {
            // More distinct signatures than the table holds before the reporter runs.
            inner.stats.dropped_report_operations.inc();
        }
        if added.log_dropped {
            inner.stats.dropped_log_entries.inc();
        }
        if added.flush_soon || inner.opts.report_cache_entries == 0 {
            self.wake_reports.notify_one();
        }
    }

    /// Flushes pending reports (one attempt, bounded by the report timeout) and stops the
    /// background tasks. Other clones stop reporting too.
    pub async fn shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
        self.wake_reports.notify_one();
        let tasks: Vec<_> = match self.tasks.lock() {
            Ok(mut t) => t.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        // A flush already under way, then the final one, each at worst every attempt timing out.
        let o = &self.inner.opts;
        let one_flush = CallPolicy {
            timeout: o.report_timeout,
            retries: o.report_retries,
        }
        .worst_case();
        let limit = one_flush
            .saturating_mul(2)
            .saturating_add(Duration::from_secs(1));
        for t in tasks {
            if tokio::time::timeout(limit, t).await.is_err() {
                tracing::warn!("Service Control shutdown flush did not finish in time");
            }
        }
    }

    pub fn statistics(&self) -> Statistics {
        let s = &self.inner.stats;
        Statistics {
            total_called_checks: s.total_called_checks.get(),
            send_checks_by_flush: s.send_checks_by_flush.get(),
            send_checks_in_flight: s.send_checks_in_flight.get(),
            total_called_reports: s.total_called_reports.get(),
            send_reports_by_flush: s.send_reports_by_flush.get(),
            send_reports_in_flight: s.send_reports_in_flight.get(),
            send_report_operations: s.send_report_operations.get(),
            max_report_size: s.max_report_size.get().max(0) as u64,
            check_cache_hits: s.check_cache_hits.get(),
            check_cache_misses: s.check_cache_misses.get(),
            check_failures: s.check_failures.get(),
            check_cache_entries: self.inner.check_cache_len() as u64,
            total_called_quotas: s.total_called_quotas.get(),
            send_quotas_by_flush: s.send_quotas_by_flush.get(),
            quota_failures: s.quota_failures.get(),
            report_failures: s.report_failures.get(),
            dropped_report_operations: s.dropped_report_operations.get(),
            report_queue_depth: s.report_queue_depth.get().max(0) as u64,
            dropped_log_entries: s.dropped_log_entries.get(),
            report_aggregates: self.inner.aggregator.signatures() as u64,
        }
    }

    /// Registers the client's counters (names prefixed `service_control_`).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        let s = &self.inner.stats;
        let counters: [(&str, &str, &Counter); 15] = [
            (
                "service_control_checks",
                "Checks requested by the pipeline",
                &s.total_called_checks,
            ),
            (
                "service_control_check_cache_hits",
                "Checks answered from the cache",
                &s.check_cache_hits,
            ),
            (
                "service_control_check_cache_misses",
                "Checks not in the cache",
                &s.check_cache_misses,
            ),
            (
                "service_control_remote_checks",
                "Remote checks a request waited for",
                &s.send_checks_in_flight,
            ),
            (
                "service_control_background_checks",
                "Background re-checks of cached verdicts",
                &s.send_checks_by_flush,
            ),
            (
                "service_control_check_failures",
                "Remote checks that failed (network, HTTP, garbage)",
                &s.check_failures,
            ),
            (
                "service_control_quota_calls",
                "Quota charges requested by the pipeline",
                &s.total_called_quotas,
            ),
            (
                "service_control_allocate_quota_requests",
                ":allocateQuota calls sent",
                &s.send_quotas_by_flush,
            ),
            (
                "service_control_allocate_quota_failures",
                ":allocateQuota calls that failed",
                &s.quota_failures,
            ),
            (
                "service_control_report_calls",
                "Requests handed to the reporter",
                &s.total_called_reports,
            ),
            (
                "service_control_report_requests",
                ":report calls accepted",
                &s.send_reports_by_flush,
            ),
            (
                "service_control_report_operations",
                "Operations delivered in :report calls",
                &s.send_report_operations,
            ),
            (
                "service_control_report_failures",
                ":report calls that failed",
                &s.report_failures,
            ),
            (
                "service_control_report_dropped_operations",
                "Operations dropped (buffer full or rejected)",
                &s.dropped_report_operations,
            ),
            (
                "service_control_report_dropped_log_entries",
                "endpoints_log entries not sent under the log policy (requests still counted)",
                &s.dropped_log_entries,
            ),
        ];
        for (name, help, c) in counters {
            registry.register(name, help, c.clone());
        }
        registry.register(
            "service_control_unaggregated_report_requests",
            ":report calls sent without aggregation and accepted",
            s.send_reports_in_flight.clone(),
        );
        let gauges: [(&str, &str, &Gauge); 3] = [
            (
                "service_control_report_queue_depth",
                "Operations built and not yet delivered",
                &s.report_queue_depth,
            ),
            (
                "service_control_max_report_bytes",
                "Largest :report body sent",
                &s.max_report_size,
            ),
            (
                "service_control_check_cache_entries",
                "Entries in the check cache",
                &s.check_cache_entries,
            ),
        ];
        for (name, help, g) in gauges {
            registry.register(name, help, g.clone());
        }
    }
}

/// Independently locked parts of a cache, picked by a hash of the entry's key: a cached check
/// or a quota charge locks one of [`aggregate::SHARDS`] small maps, so workers rarely meet.
struct Sharded<T> {
    shards: Box<[Mutex<T>]>,
    /// Seeded per table, so which keys share a shard cannot be chosen from outside.
    hasher: foldhash::fast::RandomState,
}

impl<T> Sharded<T> {
    fn new(make: impl Fn() -> T) -> Self {
        Sharded {
            shards: (0..aggregate::SHARDS).map(|_| Mutex::new(make())).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn for_key(&self, key: &str) -> &Mutex<T> {
        use std::hash::BuildHasher as _;
        let h = self.hasher.hash_one(key);
        // `shards` is never empty (SHARDS > 0), so the modulo is in range.
        &self.shards[(h % self.shards.len() as u64) as usize]
    }

    fn iter(&self) -> impl Iterator<Item = &Mutex<T>> {
        self.shards.iter()
    }
}

impl Inner {
    fn saw_rollout(&self, rollout_id: &str) {
        if let Some(n) = &self.opts.rollout_notifier {
            n.notify_rollout_id(rollout_id);
        }
    }
}

/// Sends due quota allocations every refresh interval and evicts idle check-cache entries.
async fn housekeeping_loop(inner: Weak<Inner>, mut shutdown: watch::Receiver<bool>) {
    let mut last_sweep = Instant::now();
    loop {
        let interval = match inner.upgrade() {
            Some(i) => i.opts.quota_refresh_interval,
            None => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let now = Instant::now();
        for shard in inner.quota.iter() {
            let due = shard.lock().map(|mut q| q.due(now)).unwrap_or_default();
            for alloc in due {
                tokio::spawn(quota::send_allocation(inner.clone(), alloc));
            }
        }
        if now.duration_since(last_sweep) >= Duration::from_secs(10) {
            last_sweep = now;
            for shard in inner.checks.iter() {
                if let Ok(mut c) = shard.lock() {
                    c.evict_expired(now);
                }
            }
            inner
                .stats
                .check_cache_entries
                .set(inner.check_cache_len() as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_resolution_order() {
        assert_eq!(
            resolve_service_control_url(Some("http://127.0.0.1:5/"), None, Some("x")).as_deref(),
            Some("http://127.0.0.1:5")
        );
        assert_eq!(
            resolve_service_control_url(None, None, Some("servicecontrol.googleapis.com"))
                .as_deref(),
            Some(DEFAULT_SERVICE_CONTROL_URL)
        );
        assert_eq!(
            resolve_service_control_url(None, None, Some("http://127.0.0.1:7")).as_deref(),
            Some("http://127.0.0.1:7")
        );
        assert_eq!(resolve_service_control_url(None, None, None), None);
    }

    #[test]
    fn statistics_serialise_like_esp() {
        let st = Statistics {
            total_called_checks: 3,
            max_report_size: 1024,
            ..Default::default()
        };
        let v = serde_json::to_value(&st).expect("json");
        let obj = v.as_object().expect("object");
        let names: Vec<&str> = obj.keys().map(String::as_str).take(8).collect();
        assert_eq!(
            names,
            [
                "totalCalledChecks",
                "sendChecksByFlush",
                "sendChecksInFlight",
                "totalCalledReports",
                "sendReportsByFlush",
                "sendReportsInFlight",
                "sendReportOperations",
                "maxReportSize"
            ]
        );
        assert_eq!(v["totalCalledChecks"], "3");
        assert_eq!(v["maxReportSize"], "1024");
        // Portico's additions, shown on /endpoints_status with the others.
        assert_eq!(v["droppedLogEntries"], "0");
        assert_eq!(v["reportAggregates"], "0");
    }

    #[tokio::test]
    async fn metrics_register_and_encode() {
        let sc =
            ServiceControl::new(ServiceControlOptions::new("http://127.0.0.1:9")).expect("client");
        let mut registry = prometheus_client::registry::Registry::default();
        sc.register_metrics(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("service_control_checks_total 0"), "{text}");
        assert!(
            text.contains("service_control_report_queue_depth 0"),
            "{text}"
        );
        sc.shutdown().await;
    }
}
