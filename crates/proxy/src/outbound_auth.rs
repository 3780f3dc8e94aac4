//! Outbound authentication: the bearer tokens the proxy signs for its own calls to the control
//! plane (Service Management from [`crate::config_source`], Service Control from
//! [`crate::service_control`]). A leaf: it imports neither of its callers.
//!
//! Like ESP's runtime, the proxy does no OAuth exchange: it signs a short-lived RS256 JWT with
//! the service-account key, one per audience (the API being called), and reuses it until it is
//! close to expiry. Signing costs a millisecond or so of RSA work, so caching matters only for
//! the hot path, where check/report calls would otherwise sign on every request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use portico_credentials::ServiceAccountKey;

/// Token lifetime ESP uses (`exp = iat + 3600`).
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Re-sign this long before expiry so a token never expires in flight (ESP re-signs after
/// ~3500 s; 55 min leaves room for clock skew on the control plane).
const REFRESH_AFTER: Duration = Duration::from_secs(55 * 60);

/// Audience suffixes (appended to the API's base URL), as ESP uses them.
pub const SERVICE_CONTROLLER: &str = "/google.api.servicecontrol.v1.ServiceController";
pub const QUOTA_CONTROLLER: &str = "/google.api.servicecontrol.v1.QuotaController";
pub const SERVICE_MANAGER: &str = "/google.api.servicemanagement.v1.ServiceManager";

/// The metadata server's access-token resource for the instance's default account.
pub const METADATA_TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";
/// ESP's limits for a metadata fetch: per-attempt timeout and retries after the first try.
const METADATA_TIMEOUT: Duration = Duration::from_secs(30);
const METADATA_RETRIES: u32 = 3;
/// A metadata token is replaced this long before the expiry the server announced.
const METADATA_REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// After a failed fetch, callers get the failure for this long before the next fetch, so a
/// down metadata server is not hammered by every request (ESP's failure status window).
pub const METADATA_FAILURE_WINDOW: Duration = Duration::from_secs(5);
/// A token answer is a few hundred bytes; anything far larger is not one.
const METADATA_MAX_BODY: usize = 64 * 1024;
/// Longest lifetime believed from the server, so an absurd `expires_in` cannot overflow time.
const METADATA_MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Why no token could be had. Fetch and parse failures carry ESP's client-facing messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("cannot sign a token: {0}")]
    Sign(String),
    #[error("Failed to fetch service account token ({0})")]
    Fetch(String),
    #[error("Failed to parse access token response ({0})")]
    Parse(String),
}

impl TokenError {
    /// The message a client sees (the detail stays in the logs).
    pub fn client_message(&self) -> &'static str {
        match self {
            TokenError::Parse(_) => "Failed to parse access token response",
            TokenError::Sign(_) | TokenError::Fetch(_) => "Failed to fetch service account token",
        }
    }
}

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Access tokens from somewhere other than this module (another account's, from IAM
/// Credentials: [`crate::iam_credentials`]), one token for every audience.
pub trait AccessTokens: Send + Sync + std::fmt::Debug {
    /// `Bearer <token>`.
    fn authorization(&self) -> BoxFuture<'_, Result<String, TokenError>>;
}

/// Mints and caches self-signed tokens per audience, or hands out the metadata server's access
/// token, or another account's ([`TokenSource::acting_as`]). Cheap to clone.
#[derive(Clone)]
pub struct TokenSource {
    key: Option<Arc<ServiceAccountKey>>,
    metadata: Option<MetadataTokens>,
    other_account: Option<Arc<dyn AccessTokens>>,
    cache: Arc<Mutex<HashMap<String, (String, Instant)>>>,
}

impl TokenSource {
    /// Without a key no `Authorization` header is sent (a control plane that requires one will
    /// answer 401/403, which the callers report precisely).
    pub fn new(key: Option<Arc<ServiceAccountKey>>) -> Self {
        Self::with_metadata(key, None)
    }

    /// A key file wins over the metadata server, as in ESP.
    pub fn with_metadata(
        key: Option<Arc<ServiceAccountKey>>,
        metadata: Option<MetadataTokens>,
    ) -> Self {
        TokenSource {
            metadata: if key.is_some() { None } else { metadata },
            key,
            other_account: None,
            cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Every call carries `tokens`' access token instead of the proxy's own (ESPv2's
    /// `--service_control_iam_service_account`).
    pub fn acting_as(mut self, tokens: Arc<dyn AccessTokens>) -> Self {
        self.other_account = Some(tokens);
        self
    }

    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }

    /// `Some("Bearer ...")` for `audience`, or `None` when there is neither key nor metadata
    /// server. A metadata token is not per audience: one OAuth token serves every API.
    pub async fn authorization(&self, audience: &str) -> Result<Option<String>, TokenError> {
        if let Some(other) = &self.other_account {
            return other.authorization().await.map(Some);
        }
        if let Some(metadata) = &self.metadata {
            return metadata.authorization().await.map(Some);
        }
        self.signed(audience)
    }

    fn signed(&self, audience: &str) -> Result<Option<String>, TokenError> {
        let Some(key) = &self.key else {
            return Ok(None);
        };
        if let Ok(cache) = self.cache.lock() {
            if let Some((token, minted)) = cache.get(audience) {
                if minted.elapsed() < REFRESH_AFTER {
                    return Ok(Some(format!("Bearer {token}")));
                }
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let token = key
            .self_signed_token(audience, now, TOKEN_LIFETIME.as_secs())
            .map_err(|e| TokenError::Sign(e.to_string()))?;
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(audience.to_string(), (token.clone(), Instant::now()));
        }
        Ok(Some(format!("Bearer {token}")))
    }
}

/// Access tokens from a GCE-compatible metadata server, shared by every caller in the process:
/// one fetch in flight at a time, its result (token or failure) handed to everyone who waited.
#[derive(Clone)]
pub struct MetadataTokens {
    inner: Arc<MetadataInner>,
}

impl std::fmt::Debug for MetadataTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataTokens")
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

struct MetadataInner {
    http: reqwest::Client,
    url: String,
    state: Mutex<MetadataState>,
    /// Held for the whole fetch, so concurrent callers queue behind it instead of fetching.
    fetching: tokio::sync::Mutex<()>,
}

struct MetadataState {
    /// Completed fetches; a caller that waited sees it move and takes that fetch's result.
    generation: u64,
    last: Option<Result<(String, Instant), (TokenError, Instant)>>,
}

impl MetadataState {
    /// The cached answer while it is still to be used: a token before its refresh time, a
    /// failure inside its window.
    fn current(&self, now: Instant) -> Option<Result<String, TokenError>> {
        match &self.last {
            Some(Ok((header, refresh_at))) if now < *refresh_at => Some(Ok(header.clone())),
            Some(Err((error, until))) if now < *until => Some(Err(error.clone())),
            _ => None,
        }
    }

    fn latest(&self) -> Option<Result<String, TokenError>> {
        match &self.last {
            Some(Ok((header, _))) => Some(Ok(header.clone())),
            Some(Err((error, _))) => Some(Err(error.clone())),
            None => None,
        }
    }
}

/// Why a `--metadata` value cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MetadataUrlError {
    #[error("invalid metadata server URL {url:?}: {reason}")]
    Invalid { url: String, reason: String },
}

/// Checks a metadata server base URL (`http://169.254.169.254`): http(s), a host, no query,
/// fragment or credentials. Returns the base without a trailing slash.
pub fn parse_metadata_url(url: &str) -> Result<String, MetadataUrlError> {
    let bad = |reason: &str| MetadataUrlError::Invalid {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("expected an http:// or https:// URL"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("a base URL takes no query or fragment"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad("a base URL takes no user name or password"));
    }
    Ok(parsed.as_str().trim_end_matches('/').to_string())
}

#[derive(serde::Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

impl MetadataTokens {
    /// `base` is the metadata server's origin (optionally with a path prefix), as `--metadata`.
    pub fn new(base: &str) -> Result<Self, MetadataUrlError> {
        Self::with_timeout(base, METADATA_TIMEOUT)
    }

    /// As [`MetadataTokens::new`], each attempt bounded by `timeout` (ESPv2's
    /// `--http_request_timeout_s`).
    pub fn with_timeout(base: &str, timeout: Duration) -> Result<Self, MetadataUrlError> {
        let base = parse_metadata_url(base)?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| MetadataUrlError::Invalid {
                url: base.clone(),
                reason: format!("cannot build the HTTP client: {e}"),
            })?;
        Ok(MetadataTokens {
            inner: Arc::new(MetadataInner {
                http,
                url: format!("{base}{METADATA_TOKEN_PATH}"),
                state: Mutex::new(MetadataState {
                    generation: 0,
                    last: None,
                }),
                fetching: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Whether the next [`MetadataTokens::authorization`] asks the metadata server: no token
    /// yet, or one due for refresh, and no failure inside its window (ESP's "need to fetch").
    pub fn needs_fetch(&self) -> bool {
        self.lock_state().current(Instant::now()).is_none()
    }

    /// `Bearer <token>`, from the cache while it is fresh.
    pub async fn authorization(&self) -> Result<String, TokenError> {
        let seen = {
            let state = self.lock_state();
            if let Some(answer) = state.current(Instant::now()) {
                return answer;
            }
            state.generation
        };
        let _fetching = self.inner.fetching.lock().await;
        {
            let state = self.lock_state();
            if state.generation != seen {
                if let Some(answer) = state.latest() {
                    return answer;
                }
            }
            if let Some(answer) = state.current(Instant::now()) {
                return answer;
            }
        }
        let result = self.fetch().await;
        let now = Instant::now();
        let mut state = self.lock_state();
        state.generation = state.generation.wrapping_add(1);
        match result {
            Ok((header, lifetime)) => {
                let refresh_at = now + lifetime.saturating_sub(METADATA_REFRESH_MARGIN);
                state.last = Some(Ok((header.clone(), refresh_at)));
                Ok(header)
            }
            Err(error) => {
                tracing::error!(url = %self.inner.url, %error, "cannot get an access token from the metadata server");
                state.last = Some(Err((error.clone(), now + METADATA_FAILURE_WINDOW)));
                Err(error)
            }
        }
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, MetadataState> {
        // The state is replaced whole under the lock, so a poisoned guard still holds a
        // consistent value.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn fetch(&self) -> Result<(String, Duration), TokenError> {
        let mut attempt = 0;
        loop {
            match self.fetch_once().await {
                Ok(body) => return parse_token_answer(&body),
                Err((error, retryable)) => {
                    if !retryable || attempt >= METADATA_RETRIES {
                        return Err(error);
                    }
                    attempt += 1;
                    tracing::debug!(url = %self.inner.url, attempt, %error, "retrying the metadata server");
                }
            }
        }
    }

    /// The body of a 200, or the failure and whether another attempt may help.
    async fn fetch_once(&self) -> Result<Vec<u8>, (TokenError, bool)> {
        let fetch = |m: String| TokenError::Fetch(m);
        let mut resp = self
            .inner
            .http
            .get(&self.inner.url)
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .map_err(|e| (fetch(crate::error::error_chain(&e)), true))?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err((fetch(format!("HTTP {status}")), status >= 500));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > METADATA_MAX_BODY as u64)
        {
            return Err((TokenError::Parse("answer too large".into()), false));
        }
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > METADATA_MAX_BODY {
                        return Err((TokenError::Parse("answer too large".into()), false));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body),
                Err(e) => return Err((fetch(crate::error::error_chain(&e)), true)),
            }
        }
    }
}

/// The `Authorization` value and lifetime in a metadata token answer.
fn parse_token_answer(body: &[u8]) -> Result<(String, Duration), TokenError> {
    let answer: TokenAnswer =
        serde_json::from_slice(body).map_err(|e| TokenError::Parse(e.to_string()))?;
    // The token goes into a header verbatim: only visible ASCII, no spaces, so an answer
    // cannot smuggle header syntax or break the `Bearer` scheme.
    if answer.access_token.is_empty() || !answer.access_token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(TokenError::Parse(
            "access_token is empty or not a token".into(),
        ));
    }
    let lifetime = Duration::from_secs(answer.expires_in).min(METADATA_MAX_LIFETIME);
    Ok((format!("Bearer {}", answer.access_token), lifetime))
}

/// The Portico control plane a key file names: the origin of its `token_uri` (Portico's key
/// files point it at the control plane itself). `None` for a key issued by Google, whose
/// `token_uri` is Google's OAuth server: the caller then uses Google's API hosts.
pub fn control_plane_of(key: &portico_credentials::ServiceAccountKey) -> Option<String> {
    let parsed = reqwest::Url::parse(&key.token_uri).ok()?;
    let host = parsed.host_str()?;
    if host.ends_with(".googleapis.com") || host == "accounts.google.com" {
        return None;
    }
    origin_of(&key.token_uri)
}

/// `scheme://host[:port]` of a URL.
pub fn origin_of(url: &str) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    // host_str already brackets IPv6 literals.
    let host = parsed.host_str()?;
    Some(match parsed.port() {
        Some(port) => format!("{}://{}:{}", parsed.scheme(), host, port),
        None => format!("{}://{}", parsed.scheme(), host),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_strips_path_and_keeps_port() {
        assert_eq!(
            origin_of("http://127.0.0.1:8080/token").as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(
            origin_of("https://oauth2.googleapis.com/token").as_deref(),
            Some("https://oauth2.googleapis.com")
        );
        assert_eq!(
            origin_of("http://[::1]:9/x").as_deref(),
            Some("http://[::1]:9")
        );
        assert_eq!(origin_of("not a url"), None);
    }

    #[test]
    fn google_issued_keys_name_no_control_plane() {
        let g = portico_credentials::generate_rsa_key().expect("key");
        let key = |token_uri: &str| {
            let json = serde_json::json!({
                "type": "service_account", "project_id": "p", "private_key_id": g.key_id,
                "private_key": g.private_pkcs8_pem, "client_email": "a@p.iam.gserviceaccount.com",
                "token_uri": token_uri,
            });
            portico_credentials::ServiceAccountKey::from_json_str(&json.to_string(), "t")
                .expect("key")
        };
        assert_eq!(
            control_plane_of(&key("https://oauth2.googleapis.com/token")),
            None
        );
        assert_eq!(
            control_plane_of(&key("http://127.0.0.1:8080/token")).as_deref(),
            Some("http://127.0.0.1:8080")
        );
    }

    #[test]
    fn no_key_means_no_header() {
        let t = TokenSource::new(None);
        assert_eq!(t.signed("aud").ok().flatten(), None);
    }

    #[test]
    fn token_answers_are_checked() {
        let ok = parse_token_answer(
            br#"{"access_token":"ya29.x","expires_in":3599,"token_type":"Bearer"}"#,
        );
        assert_eq!(
            ok,
            Ok(("Bearer ya29.x".to_string(), Duration::from_secs(3599)))
        );
        for bad in [
            &br#"{"access_token":"a b","expires_in":1}"#[..],
            br#"{"access_token":"a\r\nX: y","expires_in":1}"#,
            br#"{"access_token":"","expires_in":1}"#,
            br#"{"access_token":"a"}"#,
            br#"{"access_token":"a","expires_in":-1}"#,
            br#"{"expires_in":1}"#,
            b"<html>",
            b"",
        ] {
            assert!(
                matches!(parse_token_answer(bad), Err(TokenError::Parse(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let (_, life) =
            parse_token_answer(br#"{"access_token":"a","expires_in":18446744073709551615}"#)
                .expect("parsed");
        assert_eq!(life, METADATA_MAX_LIFETIME);
    }

    #[test]
    fn metadata_urls_are_checked() {
        assert_eq!(
            parse_metadata_url("http://169.254.169.254/")
                .ok()
                .as_deref(),
            Some("http://169.254.169.254")
        );
        for bad in [
            "",
            "169.254.169.254",
            "ftp://h",
            "http://h/?a=b",
            "http://u:p@h",
            "http://",
        ] {
            assert!(parse_metadata_url(bad).is_err(), "{bad}");
        }
    }
}
