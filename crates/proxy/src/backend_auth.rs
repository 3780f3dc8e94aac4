//! Backend authentication: for a method whose `x-google-backend` rule names a `jwt_audience`,
//! the proxy calls the backend with `Authorization: Bearer <ID token for that audience>` and
//! hands the client's own `Authorization` on as `X-Forwarded-Authorization` (ESPv2's contract,
//! and what Cloud Run-style backends expect). Rules without an audience (or with
//! `disable_auth`) leave the client's header as it is.
//!
//! ID tokens come from the control plane's token endpoint (`token_uri` of the proxy's
//! `--service_account_key`): a JWT-bearer assertion with `target_audience`, answered with
//! `{"id_token"}`. Without a key file, a GCE-compatible metadata server (`--metadata`) mints
//! them: `instance/service-accounts/default/identity?audience=..&format=full` (`standard` for
//! `portico espv2`, as ESPv2 asks), answered with the bare token (a key file wins, as it does
//! for access tokens). They are cached per audience until five minutes before they expire; one
//! fetch runs at a time, and requests that waited for it take the cached result, so an expiry
//! under load costs one call, not one per request. Requests whose token is cached pay a map
//! lookup under a short lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use portico_credentials::ServiceAccountKey;
use portico_servicecontrol::Code;

use crate::error::{error_chain, Cause, EspError};

/// `X-Forwarded-Authorization`: where the client's `Authorization` goes.
pub static X_FORWARDED_AUTHORIZATION: http::HeaderName =
    http::HeaderName::from_static("x-forwarded-authorization");

/// A token is used until this long before its `exp`.
const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(300);
/// One token-endpoint call, end to end, unless `--http_request_timeout_s` says otherwise.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Audiences come from configs; a cap keeps a long run of rollouts from growing the map.
const MAX_AUDIENCES: usize = 1024;
/// Largest token-endpoint answer read.
const MAX_ANSWER_BYTES: usize = 64 << 10;

struct Cached {
    header: HeaderValue,
    refresh_at: Instant,
}

/// The metadata server's identity endpoint, below `--metadata`.
pub const METADATA_IDENTITY_PATH: &str =
    "/computeMetadata/v1/instance/service-accounts/default/identity";

/// Who mints the proxy's ID tokens.
enum Issuer {
    /// The token endpoint (`token_uri`) of the key file, asked with a signed assertion.
    KeyFile(Arc<ServiceAccountKey>),
    /// A metadata server's identity endpoint (the full URL), and the token `format` to ask.
    Metadata(String, &'static str),
    /// IAM Credentials' `generateIdToken` for another account
    /// (`--backend_auth_iam_service_account`).
    Iam(
        Arc<crate::iam_credentials::IamClient>,
        crate::iam_credentials::IamAccount,
    ),
}

/// ID tokens per audience for the proxy's service account.
pub struct IdTokenSource {
    issuer: Issuer,
    http: reqwest::Client,
    cache: Mutex<HashMap<String, Cached>>,
    fetching: tokio::sync::Mutex<()>,
    /// Fetches finished so far, and per audience the count after its last failed fetch: a
    /// request that waited while a fetch for its audience failed takes that failure instead of
    /// fetching again, so an issuer outage under load costs one call per audience, not one
    /// (five-second) call per waiting request in turn.
    finished: std::sync::atomic::AtomicU64,
    failed_at: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for IdTokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("IdTokenSource");
        match &self.issuer {
            Issuer::KeyFile(key) => d.field("account", &key.client_email),
            Issuer::Metadata(url, _) => d.field("metadata", url),
            Issuer::Iam(client, account) => d.field("iam", client).field("account", &account.email),
        };
        d.finish_non_exhaustive()
    }
}

/// The answer to a request whose backend needs an ID token the proxy cannot get.
pub fn unavailable() -> EspError {
    EspError::new(
        Code::Internal,
        "Failed to fetch an identity token for backend authentication",
        Cause::Internal,
    )
}

fn failed(detail: impl std::fmt::Display) -> EspError {
    tracing::warn!(error = %detail, "backend authentication: no ID token");
    unavailable()
}

impl IdTokenSource {
    /// Tokens minted by the key file's token endpoint, each call bounded by `timeout`
    /// ([`FETCH_TIMEOUT`] unless `--http_request_timeout_s`).
    pub fn new(key: Arc<ServiceAccountKey>, timeout: Duration) -> Result<IdTokenSource, String> {
        Self::with_issuer(Issuer::KeyFile(key), timeout)
    }

    /// Tokens from the metadata server at `base` (the `--metadata` value), in `format`
    /// (`full` or `standard`).
    pub fn from_metadata(
        base: &str,
        format: &'static str,
        timeout: Duration,
    ) -> Result<IdTokenSource, String> {
        let base = crate::outbound_auth::parse_metadata_url(base).map_err(|e| e.to_string())?;
        Self::with_issuer(
            Issuer::Metadata(format!("{base}{METADATA_IDENTITY_PATH}"), format),
            timeout,
        )
    }

    /// Tokens of `account`, from IAM Credentials (the client bounds its own calls).
    pub fn from_iam(
        client: Arc<crate::iam_credentials::IamClient>,
        account: crate::iam_credentials::IamAccount,
    ) -> Result<IdTokenSource, String> {
        Self::with_issuer(Issuer::Iam(client, account), FETCH_TIMEOUT)
    }

    fn with_issuer(issuer: Issuer, timeout: Duration) -> Result<IdTokenSource, String> {
        // Neither issuer redirects; following one would send the assertion (or the
        // metadata request) to wherever an answer pointed.
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| format!("HTTP client for ID tokens: {e}"))?;
        Ok(IdTokenSource {
            issuer,
            http,
            cache: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
            finished: std::sync::atomic::AtomicU64::new(0),
            failed_at: Mutex::new(HashMap::new()),
        })
    }

    /// The `Authorization` value for `audience`, if a fresh one is cached.
    /// The tokens come from a metadata server (what ESP records a `FetchIdentityToken` span
    /// for; a key file or IAM are not its metadata fetch).
    pub fn from_metadata_server(&self) -> bool {
        matches!(self.issuer, Issuer::Metadata(..))
    }

    pub fn cached(&self, audience: &str) -> Option<HeaderValue> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(audience)
            .filter(|c| Instant::now() < c.refresh_at)
            .map(|c| c.header.clone())
    }

    /// The `Authorization` value for `audience`, fetched if none is cached.
    pub async fn get(&self, audience: &str) -> Result<HeaderValue, EspError> {
        if let Some(h) = self.cached(audience) {
            return Ok(h);
        }
        use std::sync::atomic::Ordering;
        let started = self.finished.load(Ordering::Acquire);
        let _one_at_a_time = self.fetching.lock().await;
        // Whoever held the lock may have fetched this audience meanwhile, or failed to.
        if let Some(h) = self.cached(audience) {
            return Ok(h);
        }
        let failed_meanwhile = self
            .failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(audience)
            .is_some_and(|at| *at > started);
        if failed_meanwhile {
            return Err(unavailable());
        }
        let fetched = self.fetch(audience).await;
        let done = self.finished.fetch_add(1, Ordering::AcqRel) + 1;
        let (token, exp) = match fetched {
            Ok(t) => t,
            Err(e) => {
                let mut failed_at = self.failed_at.lock().unwrap_or_else(|p| p.into_inner());
                if failed_at.len() >= MAX_AUDIENCES && !failed_at.contains_key(audience) {
                    failed_at.clear();
                }
                failed_at.insert(audience.to_string(), done);
                return Err(e);
            }
        };
        let header = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| failed("the token endpoint's id_token is not a header value"))?;
        let now_unix = unix_now();
        let lifetime = Duration::from_secs(exp.saturating_sub(now_unix));
        let refresh_at = Instant::now() + lifetime.saturating_sub(REFRESH_BEFORE_EXPIRY);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_AUDIENCES && !cache.contains_key(audience) {
            cache.clear();
        }
        cache.insert(
            audience.to_string(),
            Cached {
                header: header.clone(),
                refresh_at,
            },
        );
        Ok(header)
    }

    /// One call to the issuer: the ID token and its `exp`.
    async fn fetch(&self, audience: &str) -> Result<(String, u64), EspError> {
        let token = match &self.issuer {
            Issuer::KeyFile(key) => self.fetch_from_token_endpoint(key, audience).await?,
            Issuer::Metadata(url, format) => {
                self.fetch_from_metadata(url, format, audience).await?
            }
            Issuer::Iam(client, account) => {
                client.id_token(account, audience).await.map_err(failed)?
            }
        };
        // The token goes into a header verbatim and must be a compact JWS: visible ASCII in
        // three dot-separated parts, so an answer cannot smuggle header syntax.
        if !token.bytes().all(|b| b.is_ascii_graphic()) || token.split('.').count() != 3 {
            return Err(failed("the issuer's ID token is not a JWT"));
        }
        let exp = token_exp(&token).unwrap_or(unix_now() + 3600);
        Ok((token, exp))
    }

    /// The metadata server's identity endpoint answers with the bare token.
    async fn fetch_from_metadata(
        &self,
        url: &str,
        format: &str,
        audience: &str,
    ) -> Result<String, EspError> {
        let resp = self
            .http
            .get(url)
            .query(&[("audience", audience), ("format", format)])
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .map_err(|e| failed(format!("{url}: {}", error_chain(&e))))?;
        let status = resp.status();
        let body = read_limited(resp).await?;
        if !status.is_success() {
            return Err(failed(format!(
                "{url} answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            )));
        }
        let token = std::str::from_utf8(&body)
            .map_err(|_| failed("the metadata server's ID token is not UTF-8"))?
            .trim();
        if token.is_empty() {
            return Err(failed("the metadata server answered an empty ID token"));
        }
        Ok(token.to_string())
    }

    /// The JWT-bearer grant with `target_audience`, answered with `{"id_token"}`.
    async fn fetch_from_token_endpoint(
        &self,
        key: &ServiceAccountKey,
        audience: &str,
    ) -> Result<String, EspError> {
        let now = unix_now();
        let assertion = key
            .sign_jwt(&serde_json::json!({
                "iss": key.client_email,
                "aud": key.token_uri,
                "target_audience": audience,
                "iat": now,
                "exp": now + 3600,
            }))
            .map_err(|e| failed(format!("signing the assertion: {e}")))?;
        let resp = self
            .http
            .post(&key.token_uri)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .map_err(|e| failed(format!("{}: {}", key.token_uri, error_chain(&e))))?;
        let status = resp.status();
        let body = read_limited(resp).await?;
        if !status.is_success() {
            return Err(failed(format!(
                "{} answered {status}: {}",
                key.token_uri,
                String::from_utf8_lossy(&body[..body.len().min(300)])
            )));
        }
        let answer: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| failed(format!("token endpoint answer is not JSON: {e}")))?;
        let token = answer["id_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| failed("token endpoint answer has no id_token"))?
            .to_string();
        Ok(token)
    }
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, EspError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| failed(format!("reading the token endpoint's answer: {e}")))?
    {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(failed("token endpoint answer is larger than 64 KiB"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `exp` of a JWT, read without verifying it: the proxy only uses it to know when to refresh a
/// token it just received over its own connection to the issuer.
fn token_exp(token: &str) -> Option<u64> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["exp"].as_u64()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Puts the backend's credentials on a request: the ID token as `Authorization`, the client's
/// `Authorization` (its first value; all are removed) as `X-Forwarded-Authorization`. A client's
/// own `X-Forwarded-Authorization` is dropped so it cannot pose as one the proxy moved.
pub fn apply(headers: &mut http::HeaderMap, id_token: HeaderValue) {
    headers.remove(&X_FORWARDED_AUTHORIZATION);
    if let Some(client) = headers.remove(http::header::AUTHORIZATION) {
        headers.insert(&X_FORWARDED_AUTHORIZATION, client);
    }
    headers.insert(http::header::AUTHORIZATION, id_token);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_header_moves_and_a_forged_one_is_dropped() {
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client-1"),
        );
        h.append(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client-2"),
        );
        h.insert(
            &X_FORWARDED_AUTHORIZATION,
            HeaderValue::from_static("Bearer forged"),
        );
        apply(&mut h, HeaderValue::from_static("Bearer id"));
        let auth: Vec<_> = h.get_all(http::header::AUTHORIZATION).iter().collect();
        assert_eq!(auth, vec![&HeaderValue::from_static("Bearer id")]);
        let fwd: Vec<_> = h.get_all(&X_FORWARDED_AUTHORIZATION).iter().collect();
        assert_eq!(fwd, vec![&HeaderValue::from_static("Bearer client-1")]);

        let mut h = http::HeaderMap::new();
        h.insert(
            &X_FORWARDED_AUTHORIZATION,
            HeaderValue::from_static("Bearer forged"),
        );
        apply(&mut h, HeaderValue::from_static("Bearer id"));
        assert!(h.get(&X_FORWARDED_AUTHORIZATION).is_none());
    }

    #[test]
    fn exp_is_read_from_the_payload() {
        use base64::Engine as _;
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let t = format!("{}.{}.sig", enc("{}"), enc(r#"{"exp":1900000000}"#));
        assert_eq!(token_exp(&t), Some(1_900_000_000));
        assert_eq!(token_exp("garbage"), None);
        assert_eq!(token_exp("a.%%%.c"), None);
    }

    /// A token endpoint that answers every request 503 after `delay`, counting requests.
    async fn failing_issuer(delay: Duration) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 << 10];
                    let _ = sock.read(&mut buf).await;
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    let _ = sock
                        .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nconnection: close\r\n\r\ndown")
                        .await;
                });
            }
        });
        (url, calls)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_waiting_on_a_failing_fetch_share_its_failure() {
        let (token_uri, calls) = failing_issuer(Duration::from_millis(300)).await;
        let g = portico_credentials::generate_rsa_key().unwrap();
        let key = ServiceAccountKey::from_json_str(
            &serde_json::json!({
                "type": "service_account", "project_id": "p", "private_key_id": g.key_id,
                "private_key": g.private_pkcs8_pem, "client_email": "a@p.iam.gserviceaccount.com",
                "token_uri": token_uri,
            })
            .to_string(),
            "t",
        )
        .unwrap();
        let source = Arc::new(IdTokenSource::new(Arc::new(key), FETCH_TIMEOUT).unwrap());
        let started = Instant::now();
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let s = source.clone();
                tokio::spawn(async move { s.get("https://backend.test").await })
            })
            .collect();
        for w in waiters {
            let err = w.await.unwrap().unwrap_err();
            assert_eq!(err, unavailable());
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // One 300 ms call, not eight in a row.
        assert!(
            started.elapsed() < Duration::from_millis(2000),
            "{:?}",
            started.elapsed()
        );
        // The failure is not remembered: the next request asks the issuer again.
        source.get("https://backend.test").await.unwrap_err();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
