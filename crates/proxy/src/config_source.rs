//! Where the proxy's service configuration comes from, and how it follows new rollouts.
//!
//! [`start`] loads the first configuration (a local `--service_json_path` file, a pinned
//! `--version`, or the service's newest successful rollout from Service Management) and returns
//! a watch channel carrying the current [`Rollout`]. With [`RolloutStrategy::Managed`] a
//! background task keeps the channel current:
//!
//! * it polls `GET /v1/services/{svc}/rollouts?filter=status=SUCCESS&pageSize=1` every
//!   [`ConfigSourceOptions::poll_interval`] (2 s by default: Portico promises a new rollout is
//!   served within 5 s, where ESP polls every 60 s plus up to 300 s of jitter);
//! * it also wakes up at once when a Service Control response names a rollout it has not seen
//!   (fed in through a [`RolloutNotifier`]);
//! * it downloads every config of the new rollout and publishes only when all of them arrived,
//!   parsed and passed [`Service::check_ranges`]; otherwise it logs and the previous rollout
//!   keeps serving. A rollout refused for its content is not downloaded again (configs never
//!   change); the next rollout is.
//!
//! A config the proxy cannot use (a backend deadline no time span can hold, a metric cost that
//! would overflow, a backend protocol it does not speak) is refused here, with its origin and the offending rule named, so it can
//! neither stop a proxy from starting with a panic nor replace a working config.
//!
//! Calls carry `Authorization: Bearer <self-signed JWT>` with audience
//! `<management URL>/google.api.servicemanagement.v1.ServiceManager`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portico_config::Service;
use portico_credentials::ServiceAccountKey;
use serde::Deserialize;
use tokio::sync::{watch, Notify};

use crate::error::error_chain;
use crate::outbound_auth::{control_plane_of, TokenSource, SERVICE_MANAGER};

/// Service Management's public address, used when neither `--management` nor a key file says
/// otherwise.
pub const DEFAULT_MANAGEMENT_URL: &str = "https://servicemanagement.googleapis.com";

/// The configs currently in force and the share of traffic each receives.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// Service Management's rollout id; for a local file or a pinned version, the config id.
    pub rollout_id: String,
    /// Sorted by config id so the order is stable across polls.
    pub configs: Vec<(Arc<Service>, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutStrategy {
    /// Load once at startup.
    Fixed,
    /// Follow new rollouts at run time.
    Managed,
}

/// Startup options; see [`ConfigSourceOptions::new`] for the defaults.
#[derive(Debug, Clone)]
pub struct ConfigSourceOptions {
    pub service: String,
    pub version: Option<String>,
    pub rollout_strategy: RolloutStrategy,
    pub service_json_path: Option<PathBuf>,
    /// `--management`; when `None`, derived from the key file's `token_uri`
    /// (`scheme://host:port`), else [`DEFAULT_MANAGEMENT_URL`].
    pub management_url: Option<String>,
    pub credentials: Option<Arc<ServiceAccountKey>>,
    /// `--metadata`: access tokens from this server when there is no key file.
    pub metadata: Option<crate::outbound_auth::MetadataTokens>,
    /// Service Control responses naming a new rollout arrive through this.
    pub rollout_notifier: Option<RolloutNotifier>,
    pub poll_interval: Duration,
    pub request_timeout: Duration,
    /// Tries per Service Management call when the control plane is unreachable or answers
    /// 5xx (it may be starting alongside the proxy); backoff doubles from 250 ms.
    pub fetch_attempts: u32,
    /// What start-up flags forbid in a config (beyond what no config may hold).
    pub rules: ConfigRules,
    /// Ask for each config with `?view=FULL`, as ESPv2's config manager does: only that view
    /// carries `sourceInfo`, where a gRPC service's descriptor set (which the transcoder and
    /// gRPC-Web need) is kept. ESP v1 asks the BASIC view and transcodes from `types[]`, which
    /// Portico's configs do not carry, so `portico esp` asks for the FULL view too.
    pub full_view: bool,
}

/// Refusals that depend on how the proxy was started, applied to every config it loads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfigRules {
    /// ESPv2's `--disable_oidc_discovery`: every authentication provider must name its
    /// `jwks_uri`, because the issuer's discovery document (a URL the API producer controls)
    /// may not be trusted.
    pub require_jwks_uri: bool,
}

impl ConfigRules {
    fn check(&self, config: &Service) -> Result<(), String> {
        if self.require_jwks_uri {
            if let Some(p) = config
                .authentication
                .iter()
                .flat_map(|a| a.providers.iter())
                .find(|p| p.jwks_uri.trim().is_empty())
            {
                // ESPv2's words.
                return Err(format!(
                    "error processing authentication provider ({}): jwks_uri is empty, but \
                     OpenID Connect Discovery is disabled via startup option. Consider \
                     specifying the jwks_uri in the provider config",
                    p.id
                ));
            }
        }
        Ok(())
    }
}

impl ConfigSourceOptions {
    pub fn new(service: impl Into<String>) -> Self {
        ConfigSourceOptions {
            service: service.into(),
            version: None,
            rollout_strategy: RolloutStrategy::Fixed,
            service_json_path: None,
            management_url: None,
            credentials: None,
            metadata: None,
            rollout_notifier: None,
            poll_interval: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            fetch_attempts: 5,
            rules: ConfigRules::default(),
            full_view: false,
        }
    }

    /// The Service Management base URL these options resolve to.
    pub fn resolved_management_url(&self) -> String {
        if let Some(url) = &self.management_url {
            return url.trim_end_matches('/').to_string();
        }
        if let Some(origin) = self.credentials.as_ref().and_then(|k| control_plane_of(k)) {
            return origin;
        }
        DEFAULT_MANAGEMENT_URL.to_string()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigSourceError {
    #[error("cannot read service config file {path}: {source}")]
    ReadFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("service config {origin} is not a valid google.api.Service JSON: {message}")]
    Parse { origin: String, message: String },
    #[error("service config {origin} cannot be used: {message}")]
    Unusable { origin: String, message: String },
    #[error("service config {origin} is for service \"{found}\", but --service is \"{expected}\"")]
    ServiceMismatch {
        origin: String,
        expected: String,
        found: String,
    },
    #[error("cannot reach Service Management at {url}: {message}")]
    Network { url: String, message: String },
    #[error("GET {url} failed with HTTP {status}: {message}")]
    Http {
        url: String,
        status: u16,
        message: String,
    },
    #[error("service {service} has no successful rollout (deploy a config with `gcloud endpoints services deploy`)")]
    NoRollout { service: String },
    #[error("rollout {rollout_id} of service {service} names no configs")]
    EmptyRollout { service: String, rollout_id: String },
    #[error("cannot sign the Service Management token: {0}")]
    Credentials(#[from] portico_credentials::CredentialsError),
    #[error("{0}")]
    Token(#[from] crate::outbound_auth::TokenError),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// Tells the managed-rollout task about rollout ids seen in Service Control responses.
/// Cheap to clone; share one between [`start`] and the Service Control client.
#[derive(Clone, Default, Debug)]
pub struct RolloutNotifier {
    inner: Arc<NotifierInner>,
}

#[derive(Default, Debug)]
struct NotifierInner {
    latest: Mutex<String>,
    notify: Notify,
}

impl RolloutNotifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `rollout_id` and wakes the fetcher if it differs from the last id reported.
    /// Called on every check/report response, so it is cheap when nothing changed.
    pub fn notify_rollout_id(&self, rollout_id: &str) {
        if rollout_id.is_empty() {
            return;
        }
        let changed = match self.inner.latest.lock() {
            Ok(mut latest) if *latest != rollout_id => {
                *latest = rollout_id.to_string();
                true
            }
            _ => false,
        };
        if changed {
            self.inner.notify.notify_one();
        }
    }

    /// The last rollout id a Service Control response reported ("" if none yet).
    pub fn latest(&self) -> String {
        self.inner
            .latest
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }
}

/// Loads the first configuration and, for managed rollouts, starts following new ones.
/// Must be called inside a tokio runtime. The background task ends when every receiver is dropped.
pub async fn start(
    opts: ConfigSourceOptions,
) -> Result<watch::Receiver<Arc<Rollout>>, ConfigSourceError> {
    if let Some(path) = &opts.service_json_path {
        let rollout = load_local_file(path, &opts.service, &opts.rules)?;
        let (_tx, rx) = watch::channel(Arc::new(rollout));
        // A local file never changes rollout; dropping the sender leaves the value in place.
        return Ok(rx);
    }
    let client = ManagementClient::new(&opts)?;
    let first = match &opts.version {
        Some(version) => {
            let service = client.fetch_config(version).await?;
            Rollout {
                rollout_id: version.clone(),
                configs: vec![(Arc::new(service), 100)],
            }
        }
        None => {
            let latest = client.latest_rollout(false).await?;
            client.fetch_rollout(&latest, None).await?
        }
    };
    tracing::info!(
        service = %opts.service,
        rollout_id = %first.rollout_id,
        configs = ?first.configs.iter().map(|(s, p)| (s.id.as_str(), *p)).collect::<Vec<_>>(),
        "service configuration loaded"
    );
    let (tx, rx) = watch::channel(Arc::new(first));
    if opts.rollout_strategy == RolloutStrategy::Managed {
        let notifier = opts.rollout_notifier.clone().unwrap_or_default();
        tokio::spawn(follow_rollouts(client, tx, notifier, opts.poll_interval));
    }
    Ok(rx)
}

fn load_local_file(
    path: &std::path::Path,
    service: &str,
    rules: &ConfigRules,
) -> Result<Rollout, ConfigSourceError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigSourceError::ReadFile {
        path: origin.clone(),
        source,
    })?;
    let mut config = parse_service(&text, &origin, service, rules)?;
    if config.name.is_empty() {
        config.name = service.to_string();
    }
    Ok(Rollout {
        rollout_id: config.id.clone(),
        configs: vec![(Arc::new(config), 100)],
    })
}

fn parse_service(
    text: &str,
    origin: &str,
    expected: &str,
    rules: &ConfigRules,
) -> Result<Service, ConfigSourceError> {
    let config: Service = serde_json::from_str(text).map_err(|e| ConfigSourceError::Parse {
        origin: origin.to_string(),
        message: e.to_string(),
    })?;
    // ESP refuses a config for another service: it would route and report under the wrong name.
    if !expected.is_empty() && !config.name.is_empty() && config.name != expected {
        return Err(ConfigSourceError::ServiceMismatch {
            origin: origin.to_string(),
            expected: expected.to_string(),
            found: config.name,
        });
    }
    config
        .check_ranges()
        .and_then(|()| rules.check(&config))
        .map_err(|message| ConfigSourceError::Unusable {
            origin: origin.to_string(),
            message,
        })?;
    Ok(config)
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ListRolloutsResponse {
    rollouts: Vec<RolloutJson>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(rename_all = "camelCase", default)]
struct RolloutJson {
    rollout_id: String,
    status: String,
    traffic_percent_strategy: Option<TrafficPercentStrategy>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(rename_all = "camelCase", default)]
struct TrafficPercentStrategy {
    percentages: BTreeMap<String, f64>,
}

/// The most of one Service Management answer read. A FULL view carries the submitted sources
/// (the control plane takes submissions of up to 16 MiB, base64 in the answer) next to the
/// compiled config; a server sending more is refused rather than buffered without end.
pub const MAX_ANSWER_BYTES: usize = 64 << 20;

async fn read_bounded(mut resp: reqwest::Response, url: &str) -> Result<String, ConfigSourceError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| ConfigSourceError::Network {
        url: url.to_string(),
        message: error_chain(&e),
    })? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            // Not retried: the same answer would come again.
            return Err(ConfigSourceError::Unusable {
                origin: url.to_string(),
                message: format!("the answer is larger than {MAX_ANSWER_BYTES} bytes"),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

struct ManagementClient {
    http: reqwest::Client,
    base: String,
    service: String,
    tokens: TokenSource,
    attempts: u32,
    rules: ConfigRules,
    full_view: bool,
}

impl ManagementClient {
    fn new(opts: &ConfigSourceOptions) -> Result<Self, ConfigSourceError> {
        let http = reqwest::Client::builder()
            .timeout(opts.request_timeout)
            .build()
            .map_err(|e| ConfigSourceError::Client(e.to_string()))?;
        Ok(ManagementClient {
            http,
            base: opts.resolved_management_url(),
            service: opts.service.clone(),
            tokens: TokenSource::with_metadata(opts.credentials.clone(), opts.metadata.clone()),
            attempts: opts.fetch_attempts.max(1),
            rules: opts.rules,
            full_view: opts.full_view,
        })
    }

    /// GET with auth, retrying transport errors and 5xx (see `fetch_attempts`); 4xx are final.
    async fn get_json(&self, url: &str) -> Result<String, ConfigSourceError> {
        self.get_json_tries(url, self.attempts).await
    }

    async fn get_json_tries(&self, url: &str, attempts: u32) -> Result<String, ConfigSourceError> {
        let audience = format!("{}{}", self.base, SERVICE_MANAGER);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut req = self.http.get(url);
            if let Some(auth) = self.tokens.authorization(&audience).await? {
                req = req.header(http::header::AUTHORIZATION, auth);
            }
            let result = match req.send().await {
                Err(e) => Err(ConfigSourceError::Network {
                    url: url.to_string(),
                    message: error_chain(&e),
                }),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    match read_bounded(resp, url).await {
                        Ok(body) if status == 200 => return Ok(body),
                        Ok(body) => Err(ConfigSourceError::Http {
                            url: url.to_string(),
                            status,
                            message: google_error_message(&body),
                        }),
                        Err(e) => Err(e),
                    }
                }
            };
            let retriable = match &result {
                Err(ConfigSourceError::Network { .. }) => true,
                Err(ConfigSourceError::Http { status, .. }) => *status >= 500,
                _ => false,
            };
            if !retriable || attempt >= attempts {
                return result;
            }
            let delay = Duration::from_millis(250u64 << (attempt - 1).min(5));
            tracing::debug!(%url, attempt, ?delay, "retrying Service Management call");
            tokio::time::sleep(delay).await;
        }
    }

    fn service_path(&self) -> String {
        format!(
            "{}/v1/services/{}",
            self.base,
            percent_encoding::utf8_percent_encode(&self.service, PATH_SEGMENT)
        )
    }

    async fn fetch_config(&self, config_id: &str) -> Result<Service, ConfigSourceError> {
        let url = format!(
            "{}/configs/{}{}",
            self.service_path(),
            percent_encoding::utf8_percent_encode(config_id, PATH_SEGMENT),
            if self.full_view { "?view=FULL" } else { "" }
        );
        let body = self.get_json(&url).await?;
        let mut config = parse_service(&body, &url, &self.service, &self.rules)?;
        if config.name.is_empty() {
            config.name = self.service.clone();
        }
        if config.id.is_empty() {
            config.id = config_id.to_string();
        }
        Ok(config)
    }

    /// The newest successful rollout. `cheap` asks for one item only (the polling form).
    async fn latest_rollout(&self, cheap: bool) -> Result<RolloutJson, ConfigSourceError> {
        let url = if cheap {
            format!(
                "{}/rollouts?filter=status=SUCCESS&pageSize=1",
                self.service_path()
            )
        } else {
            format!("{}/rollouts?filter=status=SUCCESS", self.service_path())
        };
        // A poll is retried by the next poll; only startup waits for a slow control plane.
        let attempts = if cheap { 1 } else { self.attempts };
        let body = self.get_json_tries(&url, attempts).await?;
        let list: ListRolloutsResponse =
            serde_json::from_str(&body).map_err(|e| ConfigSourceError::Parse {
                origin: url.clone(),
                message: e.to_string(),
            })?;
        // The filter should make this the first item; checking status guards against a control
        // plane that ignores the filter.
        list.rollouts
            .into_iter()
            .find(|r| r.status.is_empty() || r.status == "SUCCESS")
            .ok_or_else(|| ConfigSourceError::NoRollout {
                service: self.service.clone(),
            })
    }

    /// Downloads every config of `rollout`, reusing already-parsed configs from `current`.
    async fn fetch_rollout(
        &self,
        rollout: &RolloutJson,
        current: Option<&Rollout>,
    ) -> Result<Rollout, ConfigSourceError> {
        let percentages = rollout
            .traffic_percent_strategy
            .as_ref()
            .map(|t| t.percentages.clone())
            .unwrap_or_default();
        if percentages.is_empty() {
            return Err(ConfigSourceError::EmptyRollout {
                service: self.service.clone(),
                rollout_id: rollout.rollout_id.clone(),
            });
        }
        let mut configs = Vec::with_capacity(percentages.len());
        for (config_id, percent) in percentages {
            let known = current.and_then(|c| {
                c.configs
                    .iter()
                    .find(|(s, _)| s.id == config_id)
                    .map(|(s, _)| s.clone())
            });
            let service = match known {
                Some(s) => s,
                None => Arc::new(self.fetch_config(&config_id).await?),
            };
            let percent = percent.round().clamp(0.0, 100.0) as u32;
            configs.push((service, percent));
        }
        Ok(Rollout {
            rollout_id: rollout.rollout_id.clone(),
            configs,
        })
    }
}

/// Characters escaped in a URL path segment (service names and config ids are plain, but a
/// stray `/` or `?` must not change the request).
pub(crate) const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'?')
    .add(b'<')
    .add(b'>');

async fn follow_rollouts(
    client: ManagementClient,
    tx: watch::Sender<Arc<Rollout>>,
    notifier: RolloutNotifier,
    poll_interval: Duration,
) {
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut last_warned = tokio::time::Instant::now();
    // The newest rollout refused for its content: it is not downloaded again on every poll.
    let mut refused: Option<String> = None;
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(poll_interval) => {}
            _ = notifier.inner.notify.notified() => {
                tracing::debug!(rollout_id = %notifier.latest(), "Service Control reported a rollout");
            }
        }
        let current = tx.borrow().clone();
        let latest = match client.latest_rollout(true).await {
            Ok(r) => {
                if failing_since.take().is_some() {
                    tracing::info!("Service Management reachable again; following rollouts");
                }
                r
            }
            Err(e) => {
                // Polls run every few seconds: warn when trouble starts and then once a
                // minute, not on every poll.
                let now = tokio::time::Instant::now();
                match failing_since {
                    None => {
                        failing_since = Some(now);
                        last_warned = now;
                        tracing::warn!(error = %e, "checking for a new rollout failed; keeping rollout {}", current.rollout_id);
                    }
                    Some(_) if now.duration_since(last_warned) >= Duration::from_secs(60) => {
                        last_warned = now;
                        tracing::warn!(error = %e, "still cannot check for new rollouts; keeping rollout {}", current.rollout_id);
                    }
                    Some(_) => tracing::debug!(error = %e, "rollout poll failed"),
                }
                continue;
            }
        };
        if latest.rollout_id == current.rollout_id
            || refused.as_deref() == Some(latest.rollout_id.as_str())
        {
            continue;
        }
        match client.fetch_rollout(&latest, Some(&current)).await {
            Ok(next) => {
                tracing::info!(
                    from = %current.rollout_id,
                    to = %next.rollout_id,
                    configs = ?next.configs.iter().map(|(s, p)| (s.id.as_str(), *p)).collect::<Vec<_>>(),
                    "new rollout loaded"
                );
                if tx.send(Arc::new(next)).is_err() {
                    return;
                }
            }
            Err(e) => {
                if matches!(e, ConfigSourceError::Unusable { .. }) {
                    refused = Some(latest.rollout_id.clone());
                }
                tracing::warn!(
                    error = %e,
                    rollout_id = %latest.rollout_id,
                    "loading the new rollout failed; keeping rollout {}",
                    current.rollout_id
                )
            }
        }
    }
}

/// The human message from a Google-style error body (`{"error":{"message":...}}`), else the
/// body itself (trimmed, bounded).
pub(crate) fn google_error_message(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
        if let Some(m) = v
            .get("error")
            .and_then(|e| e.get("message"))
            .and_then(|m| m.as_str())
        {
            return m.to_string();
        }
    }
    let trimmed = body.trim();
    if trimmed.is_empty() {
        return "(empty response body)".to_string();
    }
    trimmed.chars().take(500).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn google_error_message_prefers_error_message() {
        assert_eq!(
            google_error_message(
                r#"{"error":{"code":403,"message":"Permission denied","status":"PERMISSION_DENIED"}}"#
            ),
            "Permission denied"
        );
        assert_eq!(google_error_message("  plain  "), "plain");
        assert_eq!(google_error_message(""), "(empty response body)");
    }

    #[test]
    fn management_url_resolution() {
        let mut o = ConfigSourceOptions::new("svc");
        assert_eq!(o.resolved_management_url(), DEFAULT_MANAGEMENT_URL);
        o.management_url = Some("http://127.0.0.1:1/".into());
        assert_eq!(o.resolved_management_url(), "http://127.0.0.1:1");
    }

    #[test]
    fn notifier_wakes_only_on_change() {
        let n = RolloutNotifier::new();
        n.notify_rollout_id("r1");
        assert_eq!(n.latest(), "r1");
        n.notify_rollout_id("");
        assert_eq!(n.latest(), "r1");
    }

    #[test]
    fn a_provider_without_jwks_uri_is_refused_only_when_discovery_is_disabled() {
        let text = serde_json::json!({
            "name": "svc", "id": "c1",
            "authentication": {"providers": [
                {"id": "with", "issuer": "https://a.example", "jwksUri": "https://a.example/k"},
                {"id": "bare", "issuer": "https://b.example", "jwksUri": "  "},
            ]},
        })
        .to_string();
        assert!(parse_service(&text, "o", "svc", &ConfigRules::default()).is_ok());
        let strict = ConfigRules {
            require_jwks_uri: true,
        };
        let e = parse_service(&text, "https://sm/configs/c1", "svc", &strict).unwrap_err();
        let m = e.to_string();
        assert!(
            m.starts_with("service config https://sm/configs/c1 cannot be used"),
            "{m}"
        );
        assert!(
            m.contains("authentication provider (bare): jwks_uri is empty"),
            "{m}"
        );
        // The rollout task sees the same refusal and keeps the serving config.
        assert!(matches!(e, ConfigSourceError::Unusable { .. }));
    }

    #[test]
    fn local_file_name_mismatch_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("service.json");
        std::fs::write(&p, r#"{"name":"other.example.com","id":"2026-01-01r0"}"#).expect("write");
        let err = load_local_file(&p, "svc.example.com", &ConfigRules::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("is for service \"other.example.com\""),
            "{err}"
        );
        let ok = load_local_file(&p, "", &ConfigRules::default()).expect("no --service given");
        assert_eq!(ok.rollout_id, "2026-01-01r0");
        assert_eq!(ok.configs[0].1, 100);
    }
}
