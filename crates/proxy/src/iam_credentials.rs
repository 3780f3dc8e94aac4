//! Tokens of another service account, from IAM Credentials (ESPv2's `--iam_url`,
//! `--service_control_iam_service_account`, `--backend_auth_iam_service_account` and their
//! `--*_iam_delegates`).
//!
//! The proxy authenticates as itself (its key file's self-signed token, audience
//! `<iam_url>/`, or the metadata server's access token: [`TokenSource`]) and asks
//! `POST <iam_url>/v1/projects/-/serviceAccounts/<account>:generateAccessToken` (scope
//! `servicecontrol`, for Service Control calls) or `...:generateIdToken` (per `jwt_audience`,
//! `includeEmail`, for backend authentication), naming the delegation chain as
//! `projects/-/serviceAccounts/<delegate>` in the order given. IAM checks that each link may act
//! for the next. Access tokens are kept until a minute before their `expireTime` (ESPv2's
//! refresh margin); a failure is kept for five seconds, so a down IAM is not asked by every
//! request. ID tokens are cached by [`crate::backend_auth`].
//!
//! Account names go into the URL path, so they are checked at start-up to hold only the
//! characters of an email address or a numeric unique id.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::outbound_auth::{AccessTokens, BoxFuture, TokenError, TokenSource};

/// ESPv2's `--iam_url` default.
pub const DEFAULT_IAM_URL: &str = "https://iamcredentials.googleapis.com";
/// The scope ESPv2 asks for Service Control calls.
pub const SERVICE_CONTROL_SCOPE: &str = "https://www.googleapis.com/auth/servicecontrol";
/// ESPv2's `--http_request_timeout_s` default, used when none is set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest delegation chain taken (what Portico's control plane accepts; Google documents none).
pub const MAX_DELEGATES: usize = 10;
/// An access token is replaced this long before its `expireTime` (ESPv2's refresh buffer).
const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// After a failed fetch, callers get the failure for this long before the next fetch.
const FAILURE_WINDOW: Duration = crate::outbound_auth::METADATA_FAILURE_WINDOW;
/// An answer is a token and a timestamp; anything far larger is not one.
const MAX_ANSWER_BYTES: usize = 64 << 10;
/// Longest account name (an email address is at most 254 bytes).
const MAX_ACCOUNT_BYTES: usize = 254;

/// A service account to act as, and the chain of accounts to go through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IamAccount {
    pub email: String,
    pub delegates: Vec<String>,
}

/// What the `--*_iam_*` flags asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IamSettings {
    /// IAM Credentials' base URL, without a trailing slash.
    pub url: String,
    /// Service Control calls carry this account's access token.
    pub service_control: Option<IamAccount>,
    /// Backends with a `jwt_audience` get this account's ID tokens.
    pub backend_auth: Option<IamAccount>,
}

/// Checks an account name as it will be put into a URL path: an email address or a unique id.
fn check_account(flag: &str, name: &str) -> Result<String, String> {
    let name = name.trim();
    let ok = !name.is_empty()
        && name.len() <= MAX_ACCOUNT_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'@' | b'.' | b'-' | b'_' | b'+'))
        && (name.contains('@') || name.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(name.to_string())
    } else {
        Err(format!(
            "invalid {flag} {name:?}: give a service account's email address (or its numeric \
             unique id)"
        ))
    }
}

/// An account flag and its delegates flag (comma-separated, as ESPv2 splits it), checked.
pub fn parse_account(
    account_flag: &str,
    account: &str,
    delegates_flag: &str,
    delegates: Option<&str>,
) -> Result<IamAccount, String> {
    let email = check_account(account_flag, account)?;
    let delegates = match delegates.filter(|d| !d.is_empty()) {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|d| check_account(delegates_flag, d))
            .collect::<Result<Vec<_>, _>>()?,
    };
    if delegates.len() > MAX_DELEGATES {
        return Err(format!(
            "invalid {delegates_flag}: {} accounts; at most {MAX_DELEGATES} are accepted",
            delegates.len()
        ));
    }
    Ok(IamAccount { email, delegates })
}

/// Checks `--iam_url`: http(s), a host, no query, fragment or credentials. Returns it without a
/// trailing slash.
pub fn parse_iam_url(url: &str) -> Result<String, String> {
    let bad = |why: &str| format!("invalid --iam_url {url:?}: {why}");
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

/// Calls IAM Credentials as the proxy's own account.
pub struct IamClient {
    http: reqwest::Client,
    base: String,
    own: TokenSource,
}

impl std::fmt::Debug for IamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IamClient")
            .field("url", &self.base)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct AccessTokenAnswer {
    access_token: String,
    expire_time: String,
}

#[derive(serde::Deserialize)]
struct IdTokenAnswer {
    token: String,
}

impl IamClient {
    /// `url` is checked with [`parse_iam_url`]; `own` is how the proxy authenticates itself.
    pub fn new(url: &str, own: TokenSource, timeout: Duration) -> Result<IamClient, String> {
        let base = parse_iam_url(url)?;
        // IAM never redirects; following one would send the proxy's own token elsewhere.
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("HTTP client for IAM Credentials: {e}"))?;
        Ok(IamClient { http, base, own })
    }

    /// One call; the body of a 200, or why there is none.
    async fn call(
        &self,
        account: &IamAccount,
        verb: &str,
        mut body: serde_json::Value,
    ) -> Result<Vec<u8>, String> {
        let url = format!(
            "{}/v1/projects/-/serviceAccounts/{}:{verb}",
            self.base, account.email
        );
        if !account.delegates.is_empty() {
            body["delegates"] = account
                .delegates
                .iter()
                .map(|d| format!("projects/-/serviceAccounts/{d}"))
                .collect();
        }
        let own = self
            .own
            .authorization(&format!("{}/", self.base))
            .await
            .map_err(|e| format!("the proxy's own token for IAM: {e}"))?
            .ok_or_else(|| {
                "the proxy has no credentials of its own to call IAM with (no key file, no \
                 metadata server)"
                    .to_string()
            })?;
        let mut resp = self
            .http
            .post(&url)
            .header(http::header::AUTHORIZATION, own)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("{url}: {}", crate::error::error_chain(&e)))?;
        let status = resp.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("{url}: {}", crate::error::error_chain(&e)))?
        {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(format!("{url}: answer over {MAX_ANSWER_BYTES} bytes"));
            }
            bytes.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            return Err(format!(
                "{url} answered {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
            ));
        }
        Ok(bytes)
    }

    /// An access token of `account` for `scope` and how long it lives.
    pub async fn access_token(
        &self,
        account: &IamAccount,
        scope: &str,
    ) -> Result<(String, Duration), String> {
        let body = self
            .call(
                account,
                "generateAccessToken",
                serde_json::json!({ "scope": [scope] }),
            )
            .await?;
        let answer: AccessTokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| format!("generateAccessToken's answer: {e}"))?;
        check_token(&answer.access_token)?;
        let expires = time::OffsetDateTime::parse(
            &answer.expire_time,
            &time::format_description::well_known::Rfc3339,
        )
        .map_err(|e| {
            format!(
                "generateAccessToken's expireTime {:?}: {e}",
                answer.expire_time
            )
        })?
        .unix_timestamp();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let lifetime = u64::try_from(expires)
            .ok()
            .and_then(|e| e.checked_sub(now))
            .filter(|l| *l > 0)
            .ok_or("generateAccessToken answered a token that has already expired")?;
        // An absurd expiry must not overflow time arithmetic; a day is far past Google's 12 h.
        Ok((
            answer.access_token,
            Duration::from_secs(lifetime.min(86_400)),
        ))
    }

    /// An ID token of `account` for `audience`, with its email claim.
    pub async fn id_token(&self, account: &IamAccount, audience: &str) -> Result<String, String> {
        let body = self
            .call(
                account,
                "generateIdToken",
                serde_json::json!({ "audience": audience, "includeEmail": true }),
            )
            .await?;
        let answer: IdTokenAnswer =
            serde_json::from_slice(&body).map_err(|e| format!("generateIdToken's answer: {e}"))?;
        check_token(&answer.token)?;
        Ok(answer.token)
    }
}

/// A token goes into a header verbatim: visible ASCII only, so an answer cannot smuggle header
/// syntax.
fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() || token.len() > 16 << 10 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("IAM answered a token that is not a header value".into());
    }
    Ok(())
}

/// The last fetch's outcome: the header and when to replace it, or the failure and until when
/// to repeat it.
type LastFetch = Option<Result<(String, Instant), (TokenError, Instant)>>;

/// Access tokens of one account for Service Control, shared by every call.
pub struct IamAccessTokens {
    client: Arc<IamClient>,
    account: IamAccount,
    scope: &'static str,
    /// Held through a fetch, so concurrent callers wait for it instead of fetching again.
    last: tokio::sync::Mutex<LastFetch>,
}

impl std::fmt::Debug for IamAccessTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IamAccessTokens")
            .field("account", &self.account.email)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl IamAccessTokens {
    pub fn new(client: Arc<IamClient>, account: IamAccount, scope: &'static str) -> Self {
        IamAccessTokens {
            client,
            account,
            scope,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// `Bearer <token>`, from the cache while it is fresh.
    pub async fn bearer(&self) -> Result<String, TokenError> {
        let mut last = self.last.lock().await;
        let now = Instant::now();
        match &*last {
            Some(Ok((header, refresh_at))) if now < *refresh_at => return Ok(header.clone()),
            Some(Err((error, until))) if now < *until => return Err(error.clone()),
            _ => {}
        }
        match self.client.access_token(&self.account, self.scope).await {
            Ok((token, lifetime)) => {
                let header = format!("Bearer {token}");
                let refresh_at = Instant::now() + lifetime.saturating_sub(REFRESH_MARGIN);
                *last = Some(Ok((header.clone(), refresh_at)));
                Ok(header)
            }
            Err(detail) => {
                tracing::error!(account = %self.account.email, error = %detail, "cannot get an access token from IAM Credentials");
                let error = TokenError::Fetch(detail);
                *last = Some(Err((error.clone(), Instant::now() + FAILURE_WINDOW)));
                Err(error)
            }
        }
    }
}

impl AccessTokens for IamAccessTokens {
    fn authorization(&self) -> BoxFuture<'_, Result<String, TokenError>> {
        Box::pin(self.bearer())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_and_delegates() {
        let a = parse_account(
            "--x",
            "sc@p.iam.gserviceaccount.com",
            "--d",
            Some("a@p.iam.gserviceaccount.com, 1234"),
        )
        .unwrap();
        assert_eq!(a.email, "sc@p.iam.gserviceaccount.com");
        assert_eq!(a.delegates, vec!["a@p.iam.gserviceaccount.com", "1234"]);
        assert!(parse_account("--x", "1234567", "--d", None).is_ok());
        assert!(parse_account("--x", "a@b", "--d", Some(""))
            .unwrap()
            .delegates
            .is_empty());
        for bad in [
            "",
            "no-at-sign",
            "a@b/../../x",
            "a@b:generateIdToken",
            "a@b?x=1",
            "a b@c",
            "a@b%2F",
        ] {
            let e = parse_account("--x", bad, "--d", None).unwrap_err();
            assert!(e.starts_with("invalid --x"), "{bad}: {e}");
        }
        let e = parse_account("--x", "a@b", "--d", Some("a@b,,c@d")).unwrap_err();
        assert!(e.starts_with("invalid --d"), "{e}");
        let many = ["a@b"; MAX_DELEGATES + 1].join(",");
        assert!(parse_account("--x", "a@b", "--d", Some(&many)).is_err());
    }

    #[test]
    fn iam_urls() {
        assert_eq!(
            parse_iam_url("https://iamcredentials.googleapis.com/").unwrap(),
            DEFAULT_IAM_URL
        );
        assert_eq!(
            parse_iam_url("http://127.0.0.1:9").unwrap(),
            "http://127.0.0.1:9"
        );
        for bad in [
            "ftp://x",
            "http://",
            "http://x?q",
            "http://u:p@x",
            "not a url",
        ] {
            assert!(parse_iam_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_must_be_header_values() {
        assert!(check_token("ya29.abc").is_ok());
        for bad in ["", "a b", "a\r\nx: y", "é"] {
            assert!(check_token(bad).is_err(), "{bad:?}");
        }
    }
}
