//! Service-account authentication: the OAuth2 token endpoint and the bearer-token verifier.
//!
//! # `POST /token` — OAuth2 JWT-bearer grant (RFC 7523)
//! Form `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<JWT>`, the way
//! Google client libraries and `gcloud auth activate-service-account` call `token_uri`.
//! The assertion must be RS256 with `kid` = a live key id of the account named by `iss`; `aud`
//! is Google's fixed `https://oauth2.googleapis.com/token` (gcloud always sends it) or this
//! control plane's `<public-url>/token`; lifetime (`exp - iat`) at most one hour; 60 s of clock
//! skew are tolerated; each assertion is accepted once (its SHA-256 is remembered until it
//! expires). Either `scope` or `target_audience` must be present. The answer is
//! `{"access_token","expires_in":3599,"token_type":"Bearer"}`, or, when the assertion names a
//! `target_audience`, Google's `{"id_token": ...}`: an RS256 ID token for that audience from
//! [`crate::idtoken`], verifiable through this control plane's OpenID discovery document. Errors use the OAuth2 shape
//! (`{"error":"invalid_grant","error_description":...}`), which client libraries print.
//!
//! Access tokens are 256 random bits (`ya29.` + base64url); only their SHA-256 is stored, with
//! the account, the key that minted them and the expiry. A token dies with its key: verification
//! joins on the key table, so deleting a key (or the account) revokes its tokens at once.
//!
//! # Bearer tokens on API calls ([`ServiceAccountTokens`], an `auth::TokenVerifier`)
//! 1. An access token from `/token` (looked up by hash).
//! 2. A self-signed JWT, ESP's runtime credential: `iss` = `sub` = the account email, `kid` =
//!    key id, `aud` = `<control-plane origin>/google.api.servicecontrol.v1.ServiceController`
//!    (or `.QuotaController`, `/google.api.servicemanagement.v1.ServiceManager`), or any URL under
//!    this control plane's public URL. The origin of those three Google audience paths is not
//!    compared, so a proxy that reaches the control plane by another host name still works; the
//!    path still stops a token minted for an unrelated audience from being accepted.
//!    Verified tokens are cached (by hash) until they expire, but the key's existence is
//!    re-checked on every call.
//!
//! Either way the caller becomes `Principal::ServiceAccount { email }` and is then authorized by
//! IAM bindings (`auth::require_service_permission`, `resourcemanager::require_project_permission`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Serialize;
use serde_json::Value;

use crate::app::AppState;
use crate::authz::{BoxFuture, Principal, TokenVerifier};
use crate::crypto::{random_urlsafe, token_hash};
use crate::error::ApiError;
use crate::idtoken::now_unix;
use crate::store::tokens::NewAccessToken;
use crate::store::Store;

pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Audiences Google's token endpoint answers to; gcloud sends the first regardless of token_uri.
const GOOGLE_TOKEN_AUDIENCES: &[&str] = &[
    "https://oauth2.googleapis.com/token",
    "https://www.googleapis.com/oauth2/v4/token",
    "https://accounts.google.com/o/oauth2/token",
];
/// ESP's runtime audiences (appended to the API's origin).
const RUNTIME_AUDIENCE_PATHS: &[&str] = &[
    "/google.api.servicecontrol.v1.ServiceController",
    "/google.api.servicecontrol.v1.QuotaController",
    "/google.api.servicemanagement.v1.ServiceManager",
    // ESP signs its Cloud Trace calls for these.
    "/google.devtools.cloudtrace.v1.TraceService",
    "/google.devtools.cloudtrace.v2.TraceService",
];
/// Issued access tokens live an hour; `expires_in` is one second less, as Google answers.
const ACCESS_TOKEN_LIFETIME_S: i64 = 3600;
/// Longest assertion / self-signed token lifetime accepted.
const MAX_JWT_LIFETIME_S: i64 = 3600;
const CLOCK_SKEW_S: i64 = 60;
const MAX_CACHED_JWTS: usize = 10_000;

pub fn routes() -> Router<AppState> {
    Router::new().route("/token", post(token_endpoint))
}

/// An OAuth2 error response (RFC 6749 §5.2).
#[derive(Debug)]
pub struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
}

impl OAuthError {
    fn invalid_request(d: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error: "invalid_request",
            description: d.into(),
        }
    }
    fn invalid_grant(d: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error: "invalid_grant",
            description: d.into(),
        }
    }
    fn unsupported_grant_type(d: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error: "unsupported_grant_type",
            description: d.into(),
        }
    }
    fn server_error(e: ApiError) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            error: "server_error",
            description: e.message,
        }
    }
}

/// The OAuth2 error body: `{"error", "error_description"}`.
#[derive(Serialize)]
struct OAuthErrorBody {
    error: &'static str,
    error_description: String,
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(OAuthErrorBody {
                error: self.error,
                error_description: self.description,
            }),
        )
            .into_response()
    }
}

/// The OAuth2 access-token answer (RFC 6749 §5.1). Field order is the wire order.
#[derive(Debug, Serialize)]
struct TokenResponse {
    access_token: String,
    expires_in: i64,
    token_type: &'static str,
}

/// Google's answer to a grant whose assertion names a `target_audience`: only the ID token.
#[derive(Debug, Serialize)]
struct IdTokenResponse {
    id_token: String,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum GrantResponse {
    Access(TokenResponse),
    Id(IdTokenResponse),
}

impl From<ApiError> for OAuthError {
    fn from(e: ApiError) -> Self {
        OAuthError::server_error(e)
    }
}

/// Why a service-account JWT was refused. Messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("not a JWT")]
    NotJwt,
    #[error("JWT header must have alg RS256 and a kid (the key id)")]
    BadHeader,
    #[error("JWT must carry string claim `iss` naming the service account")]
    NoIssuer,
    #[error("Invalid JWT Signature.")]
    UnknownKey,
    #[error("Invalid JWT: {0}")]
    Invalid(String),
}

/// Claims of a verified service-account JWT.
#[derive(Debug, Clone)]
pub struct VerifiedJwt {
    pub email: String,
    pub key_id: String,
    pub iat: i64,
    pub exp: i64,
    pub claims: Value,
}

/// Reads the claims without verifying them (only to pick the key to verify with).
fn peek_claims(token: &str) -> Result<Value, JwtError> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::NotJwt);
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| JwtError::NotJwt)?;
    serde_json::from_slice(&bytes).map_err(|_| JwtError::NotJwt)
}

/// Verifies signature, key ownership and the time claims common to both JWT forms.
async fn verify_sa_jwt(store: &Store, token: &str, now: i64) -> Result<VerifiedJwt, JwtError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::NotJwt)?;
    let kid = match (header.alg, header.kid) {
        (jsonwebtoken::Algorithm::RS256, Some(kid)) if !kid.is_empty() => kid,
        _ => return Err(JwtError::BadHeader),
    };
    let unverified = peek_claims(token)?;
    let email = unverified
        .get("iss")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(JwtError::NoIssuer)?
        .to_string();
    let key = crate::store::accounts::public_key(store, &email, &kid)
        .await
        .map_err(|e| {
            JwtError::Invalid(format!("key lookup failed ({})", ApiError::from(e).message))
        })?
        .ok_or(JwtError::UnknownKey)?;
    let pem_for_task = key.public_key_pem.clone();
    let token_owned = token.to_string();
    // RSA verification is ~0.1 ms optimised but far slower in debug builds; keep it off the
    // async worker either way.
    let claims = tokio::task::spawn_blocking(move || {
        portico_credentials::verify_rs256(&token_owned, &pem_for_task)
    })
    .await
    .map_err(|e| JwtError::Invalid(format!("verification task failed: {e}")))?
    .map_err(|e| match e {
        portico_credentials::CredentialsError::Verify(m) => JwtError::Invalid(m),
        other => JwtError::Invalid(other.to_string()),
    })?;
    let iat = claims
        .get("iat")
        .and_then(Value::as_i64)
        .ok_or_else(|| JwtError::Invalid("missing numeric `iat` claim".into()))?;
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or_else(|| JwtError::Invalid("missing numeric `exp` claim".into()))?;
    // Told only to holders of a valid signature.
    if key.account_disabled {
        return Err(JwtError::Invalid(format!(
            "service account {email} is disabled"
        )));
    }
    if exp <= iat {
        return Err(JwtError::Invalid("`exp` must be after `iat`".into()));
    }
    if exp - iat > MAX_JWT_LIFETIME_S {
        return Err(JwtError::Invalid(format!(
            "token lifetime (exp - iat = {} s) exceeds {MAX_JWT_LIFETIME_S} s",
            exp - iat
        )));
    }
    if iat > now + CLOCK_SKEW_S {
        return Err(JwtError::Invalid(
            "`iat` is in the future (check the client's clock)".into(),
        ));
    }
    if exp < now - CLOCK_SKEW_S {
        return Err(JwtError::Invalid("token has expired".into()));
    }
    if claims.get("iss").and_then(Value::as_str) != Some(email.as_str()) {
        return Err(JwtError::Invalid(
            "`iss` changed under the signature".into(),
        ));
    }
    if let Some(sub) = claims.get("sub").and_then(Value::as_str) {
        if sub != email {
            return Err(JwtError::Invalid(
                "`sub` must equal `iss` (domain-wide delegation is not supported)".into(),
            ));
        }
    }
    Ok(VerifiedJwt {
        email,
        key_id: kid,
        iat,
        exp,
        claims,
    })
}

fn audiences(claims: &Value) -> Vec<&str> {
    match claims.get("aud") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

fn token_audience_ok(aud: &str, public_url: &str) -> bool {
    GOOGLE_TOKEN_AUDIENCES.contains(&aud) || aud == format!("{public_url}/token")
}

fn runtime_audience_ok(aud: &str, public_url: &str) -> bool {
    if aud == public_url || aud.starts_with(&format!("{public_url}/")) {
        return true;
    }
    // `scheme://host[:port]` followed by exactly one of ESP's API names.
    let Some(after_scheme) = aud
        .strip_prefix("https://")
        .or_else(|| aud.strip_prefix("http://"))
    else {
        return false;
    };
    match after_scheme.find('/') {
        Some(i) => {
            let path = &after_scheme[i..];
            i > 0 && RUNTIME_AUDIENCE_PATHS.contains(&path)
        }
        None => false,
    }
}

async fn token_endpoint(State(state): State<AppState>, body: Bytes) -> Response {
    match grant(&state, &body).await {
        Ok(v) => (StatusCode::OK, Json(v)).into_response(),
        Err(e) => {
            tracing::info!(error = e.error, reason = %e.description, "token request refused");
            e.into_response()
        }
    }
}

async fn grant(state: &AppState, body: &[u8]) -> Result<GrantResponse, OAuthError> {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    let grant_type = form.get("grant_type").map(String::as_str).unwrap_or("");
    if grant_type.is_empty() {
        return Err(OAuthError::invalid_request(
            "Missing grant_type: expected urn:ietf:params:oauth:grant-type:jwt-bearer.",
        ));
    }
    if grant_type != JWT_BEARER_GRANT {
        return Err(OAuthError::unsupported_grant_type(format!(
            "Unsupported grant_type '{grant_type}': only {JWT_BEARER_GRANT} is supported."
        )));
    }
    let assertion = form
        .get("assertion")
        .filter(|a| !a.is_empty())
        .ok_or_else(|| OAuthError::invalid_request("Missing assertion."))?;
    let now = now_unix();
    let jwt = verify_sa_jwt(&state.store, assertion, now)
        .await
        .map_err(|e| OAuthError::invalid_grant(e.to_string()))?;
    let auds = audiences(&jwt.claims);
    if !auds.iter().any(|a| token_audience_ok(a, &state.public_url)) {
        return Err(OAuthError::invalid_grant(format!(
            "Invalid JWT: `aud` must be {} or {}/token.",
            GOOGLE_TOKEN_AUDIENCES[0], state.public_url
        )));
    }
    let scope = jwt
        .claims
        .get("scope")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let target_audience = jwt
        .claims
        .get("target_audience")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if scope.is_empty() && target_audience.is_empty() {
        return Err(OAuthError::invalid_grant(
            "Invalid JWT: one of `scope` or `target_audience` is required.",
        ));
    }
    if target_audience.len() > crate::idtoken::MAX_AUDIENCE_BYTES {
        return Err(OAuthError::invalid_grant(format!(
            "Invalid JWT: `target_audience` is longer than {} bytes.",
            crate::idtoken::MAX_AUDIENCE_BYTES
        )));
    }
    remember_assertion(&state.store, assertion, jwt.exp, now).await?;
    if !target_audience.is_empty() {
        return id_token_for(state, &jwt.email, &target_audience, now)
            .await
            .map(|id_token| GrantResponse::Id(IdTokenResponse { id_token }));
    }
    let token = format!("ya29.{}", random_urlsafe(32));
    let recorded_scope = if scope.is_empty() {
        format!("target_audience:{target_audience}")
    } else {
        scope
    };
    crate::store::tokens::insert_access_token(
        &state.store,
        &NewAccessToken {
            token_hash: &token_hash(&token),
            email: &jwt.email,
            key_id: &jwt.key_id,
            scope: &recorded_scope,
            expires_at: now + ACCESS_TOKEN_LIFETIME_S,
        },
    )
    .await
    .map_err(|e| OAuthError::server_error(e.into()))?;
    tracing::info!(email = %jwt.email, key_id = %jwt.key_id, "issued access token");
    Ok(GrantResponse::Access(TokenResponse {
        access_token: token,
        expires_in: ACCESS_TOKEN_LIFETIME_S - 1,
        token_type: "Bearer",
    }))
}

/// An ID token for the account `email` (whose assertion was just verified), with its email, as
/// Google's token endpoint issues for a `target_audience` grant.
async fn id_token_for(
    state: &AppState,
    email: &str,
    audience: &str,
    now: i64,
) -> Result<String, OAuthError> {
    let account = crate::store::accounts::find(&state.store, email)
        .await
        .map_err(|e| OAuthError::server_error(e.into()))?
        .ok_or_else(|| {
            OAuthError::invalid_grant(format!("Service account {email} does not exist."))
        })?;
    let token = state
        .id_tokens
        .mint(
            &crate::idtoken::Subject {
                unique_id: &account.unique_id,
                email,
                include_email: true,
            },
            audience,
            now,
        )
        .map_err(|e| OAuthError::server_error(ApiError::internal(e)))?;
    tracing::info!(email = %email, "issued ID token");
    Ok(token)
}

/// Records the assertion's hash; a second use before it expires is refused. Expired entries
/// (and expired access tokens) are purged here, so both tables stay proportional to the
/// tokens live in the last hour.
async fn remember_assertion(
    store: &Store,
    assertion: &str,
    exp: i64,
    now: i64,
) -> Result<(), OAuthError> {
    let server = |e: crate::store::StoreError| OAuthError::server_error(e.into());
    crate::store::tokens::purge_expired(store, now - CLOCK_SKEW_S, now)
        .await
        .map_err(server)?;
    // Kept past exp by the skew allowance, since that is how long verification accepts it.
    let fresh =
        crate::store::tokens::remember_assertion(store, &token_hash(assertion), exp + CLOCK_SKEW_S)
            .await
            .map_err(server)?;
    if !fresh {
        return Err(OAuthError::invalid_grant(
            "Invalid JWT: this assertion has already been used; sign a new one.",
        ));
    }
    Ok(())
}

/// The `auth::TokenVerifier` for service accounts.
#[derive(Default)]
pub struct ServiceAccountTokens {
    /// token hash → (email, key id, exp) of self-signed JWTs already verified.
    verified: Mutex<HashMap<String, (String, String, i64)>>,
}

/// For `Shared::verifiers`.
pub fn verifier() -> Arc<dyn TokenVerifier> {
    Arc::new(ServiceAccountTokens::default())
}

fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.bytes().filter(|b| *b == b'.').count() == 2
}

impl ServiceAccountTokens {
    async fn verify_access_token(
        &self,
        state: &AppState,
        token: &str,
    ) -> Result<Option<Principal>, ApiError> {
        let row = crate::store::tokens::access_token(&state.store, &token_hash(token)).await?;
        match row {
            None => Ok(None),
            Some(t) if t.account_disabled => Err(ApiError::unauthenticated(format!(
                "Request had invalid authentication credentials: service account {} is \
                     disabled.",
                t.email
            ))),
            Some(t) if t.expires_at <= now_unix() => Err(ApiError::unauthenticated(
                "Request had invalid authentication credentials: the access token has expired; \
                 obtain a new one from the token endpoint.",
            )),
            Some(t) => Ok(Some(Principal::ServiceAccount { email: t.email })),
        }
    }

    async fn verify_self_signed(
        &self,
        state: &AppState,
        token: &str,
    ) -> Result<Option<Principal>, ApiError> {
        let now = now_unix();
        let cache_key = token_hash(token);
        let cached = self
            .verified
            .lock()
            .ok()
            .and_then(|m| m.get(&cache_key).cloned());
        if let Some((email, key_id, exp)) = cached {
            if exp >= now - CLOCK_SKEW_S
                && crate::store::accounts::usable_key_exists(&state.store, &email, &key_id).await?
            {
                return Ok(Some(Principal::ServiceAccount { email }));
            }
            if let Ok(mut m) = self.verified.lock() {
                m.remove(&cache_key);
            }
        }
        let rejected = |why: String| {
            ApiError::unauthenticated(format!(
                "Request had invalid authentication credentials: service-account JWT rejected: \
                 {why}"
            ))
        };
        let jwt = match verify_sa_jwt(&state.store, token, now).await {
            Ok(j) => j,
            Err(JwtError::NotJwt) => return Ok(None),
            // A JWT from some other issuer is another verifier's business.
            Err(JwtError::NoIssuer) => return Ok(None),
            Err(e) => {
                let iss = peek_claims(token)
                    .ok()
                    .and_then(|c| c.get("iss").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_default();
                if e == JwtError::UnknownKey
                    && !iss.ends_with(crate::store::accounts::SA_DOMAIN_SUFFIX)
                {
                    return Ok(None);
                }
                return Err(rejected(e.to_string()));
            }
        };
        let auds = audiences(&jwt.claims);
        if !auds
            .iter()
            .any(|a| runtime_audience_ok(a, &state.public_url))
        {
            return Err(rejected(format!(
                "`aud` must be a URL under {} or end in one of {}",
                state.public_url,
                RUNTIME_AUDIENCE_PATHS.join(", ")
            )));
        }
        if let Ok(mut m) = self.verified.lock() {
            if m.len() >= MAX_CACHED_JWTS {
                m.retain(|_, (_, _, exp)| *exp >= now);
                if m.len() >= MAX_CACHED_JWTS {
                    m.clear();
                }
            }
            m.insert(cache_key, (jwt.email.clone(), jwt.key_id.clone(), jwt.exp));
        }
        Ok(Some(Principal::ServiceAccount { email: jwt.email }))
    }
}

impl TokenVerifier for ServiceAccountTokens {
    fn verify<'a>(
        &'a self,
        state: &'a AppState,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Option<Principal>, ApiError>> {
        Box::pin(async move {
            if looks_like_jwt(token) {
                self.verify_self_signed(state, token).await
            } else {
                self.verify_access_token(state, token).await
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audience_rules() {
        let base = "http://127.0.0.1:8080";
        assert!(token_audience_ok(
            "https://oauth2.googleapis.com/token",
            base
        ));
        assert!(token_audience_ok("http://127.0.0.1:8080/token", base));
        assert!(!token_audience_ok("http://127.0.0.1:8081/token", base));
        assert!(!token_audience_ok("https://evil.example/token", base));
        assert!(runtime_audience_ok(
            "http://localhost:8080/google.api.servicecontrol.v1.ServiceController",
            base
        ));
        assert!(runtime_audience_ok(
            "https://servicecontrol.googleapis.com/google.api.servicecontrol.v1.ServiceController",
            base
        ));
        assert!(runtime_audience_ok("http://127.0.0.1:8080/anything", base));
        assert!(!runtime_audience_ok("http://127.0.0.1:80800/x", base));
        assert!(!runtime_audience_ok("https://other.example/api", base));
        assert!(!runtime_audience_ok(
            "https:///google.api.servicecontrol.v1.ServiceController",
            base
        ));
    }

    #[test]
    fn jwt_shape_detection() {
        assert!(looks_like_jwt("eyJhbGc.eyJpc3M.sig"));
        assert!(!looks_like_jwt("ya29.abcdef"));
        assert!(!looks_like_jwt("ptk_abc"));
        assert_eq!(peek_claims("a.b"), Err(JwtError::NotJwt));
        let payload = URL_SAFE_NO_PAD.encode(br#"{"iss":"x@y"}"#);
        assert_eq!(
            peek_claims(&format!("eyJ.{payload}.sig")).expect("claims")["iss"],
            "x@y"
        );
    }
}
