//! IAM Credentials v1 (`iamcredentials.googleapis.com`): `generateIdToken` and
//! `generateAccessToken`, the calls gcloud-style clients, Google's client libraries and ESPv2's
//! `--*_iam_service_account` flags make to get a token for a service account they may act for
//! (`gcloud auth print-identity-token --impersonate-service-account`).
//!
//! - `POST /v1/projects/-/serviceAccounts/{email or unique id}:generateIdToken` with
//!   `{"audience": "...", "includeEmail": bool, "delegates": [...]}` → `{"token": "<ID token>"}`
//!   (RS256 from [`crate::idtoken`], the same tokens the OAuth2 endpoint issues for
//!   `target_audience`).
//! - `POST ...:generateAccessToken` with `{"scope": [...], "lifetime": "3600s", "delegates":
//!   [...]}` → `{"accessToken": "ya29...", "expireTime": "<RFC 3339>"}`. The token is one of
//!   [`crate::apis::tokens`]'s access tokens for the target account; no key of the account made
//!   it, so it lives until its expiry or until the account is deleted or disabled.
//! - The path is IAM's; IAM's verb handler hands these verbs here through
//!   [`crate::app::ACCOUNT_VERB_HANDLERS`]. The `/iamcredentials/` prefix is stripped like the
//!   other APIs' so an `api_endpoint_overrides/iamcredentials` may point at the same port.
//! - Who may: the caller needs `iam.serviceAccounts.getOpenIdToken` (ID tokens:
//!   `roles/iam.serviceAccountOpenIdTokenCreator`, `roles/iam.serviceAccountTokenCreator`,
//!   `roles/owner`) or `iam.serviceAccounts.getAccessToken` (access tokens: the token creator
//!   or owner) on the account's project; the project segment must be `-`, as Google requires.
//! - Delegation (`delegates`, each `projects/-/serviceAccounts/{email or unique id}`), checked
//!   as Google checks it: the caller needs the permission on the first delegate, each delegate
//!   on the next, and the last on the target. Every delegate must exist and be enabled. A
//!   refusal names the link that failed only to the admin; anyone else gets the same answer
//!   whether an account is missing or merely not theirs to use.

use std::future::Future;
use std::pin::Pin;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::authz::{perms, require_project_permission, Principal};
use crate::error::ApiError;
use crate::store::accounts::ServiceAccount;

/// Largest request body read (an audience or a few scopes, and a short chain).
const MAX_BODY_BYTES: usize = 64 << 10;
/// The resource-name prefix of a delegate.
const DELEGATE_PREFIX: &str = "projects/-/serviceAccounts/";
/// Longest delegation chain taken. Google documents no number; every link costs a policy
/// lookup, so the chain is bounded well above any real use.
pub const MAX_DELEGATES: usize = 10;
/// `generateAccessToken`'s default and longest lifetime (Google's without the organisation
/// policy that allows twelve hours).
pub const MAX_ACCESS_TOKEN_LIFETIME_S: i64 = 3600;
/// Most scopes one access token may name, and the longest scope.
const MAX_SCOPES: usize = 64;
const MAX_SCOPE_BYTES: usize = 512;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
struct GenerateIdTokenRequest {
    audience: String,
    include_email: bool,
    delegates: Vec<String>,
}

#[derive(Debug, Serialize)]
struct GenerateIdTokenResponse {
    token: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
struct GenerateAccessTokenRequest {
    scope: Vec<String>,
    lifetime: Option<String>,
    delegates: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerateAccessTokenResponse {
    access_token: String,
    expire_time: String,
}

/// `:generateIdToken`, registered in [`crate::app::ACCOUNT_VERB_HANDLERS`].
pub fn generate_id_token_handler(
    state: AppState,
    project: String,
    account: String,
    req: Request,
) -> Pin<Box<dyn Future<Output = Response> + Send>> {
    Box::pin(async move {
        match generate_id_token(&state, &project, &account, req).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        }
    })
}

/// `:generateAccessToken`, registered in [`crate::app::ACCOUNT_VERB_HANDLERS`].
pub fn generate_access_token_handler(
    state: AppState,
    project: String,
    account: String,
    req: Request,
) -> Pin<Box<dyn Future<Output = Response> + Send>> {
    Box::pin(async move {
        match generate_access_token(&state, &project, &account, req).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        }
    })
}

/// The caller and the JSON body of a request, with the project segment checked.
async fn read_request<T: serde::de::DeserializeOwned>(
    state: &AppState,
    project: &str,
    req: Request,
) -> Result<(Principal, T), ApiError> {
    let (parts, body) = req.into_parts();
    let principal = crate::authz::authenticate(state, crate::authz::bearer_token(&parts)).await?;
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| ApiError::invalid_argument(format!("Cannot read request body: {e}")))?;
    let body: T = crate::app::parse_json_body(&bytes)?;
    if project != "-" {
        return Err(ApiError::invalid_argument(format!(
            "Invalid resource name: the project must be '-', not '{project}'."
        ))
        .with_field_violation("name", "projects/-/serviceAccounts/{ACCOUNT}"));
    }
    Ok((principal, body))
}

/// The account segments of `delegates`, in order; malformed names are refused before any
/// lookup.
fn delegate_accounts(delegates: &[String]) -> Result<Vec<&str>, ApiError> {
    if delegates.len() > MAX_DELEGATES {
        return Err(ApiError::invalid_argument(format!(
            "delegates names {} accounts; at most {MAX_DELEGATES} are accepted.",
            delegates.len()
        ))
        .with_field_violation("delegates", "too many"));
    }
    delegates
        .iter()
        .enumerate()
        .map(|(i, d)| {
            d.strip_prefix(DELEGATE_PREFIX)
                .filter(|a| !a.is_empty() && !a.contains(['/', ':']) && a.len() <= 320)
                .ok_or_else(|| {
                    ApiError::invalid_argument(format!(
                        "delegates[{i}] is {d:?}; expected \
                         projects/-/serviceAccounts/{{ACCOUNT_EMAIL_OR_UNIQUEID}}."
                    ))
                    .with_field_violation(&format!("delegates[{i}]"), "invalid resource name")
                })
        })
        .collect()
}

/// Google's refusal when an account is missing or not the caller's to use.
fn denied(permission: &str) -> ApiError {
    ApiError::permission_denied(format!(
        "Permission '{permission}' denied on resource (or it may not exist)."
    ))
}

/// Walks caller → delegates → target, checking that each link may act for the next with
/// `permission`. Returns the target account.
async fn authorize_chain(
    state: &AppState,
    principal: &Principal,
    delegates: &[String],
    target: &str,
    permission: &str,
) -> Result<ServiceAccount, ApiError> {
    let chain = delegate_accounts(delegates)?;
    let is_admin = *principal == Principal::Admin;
    let mut acting = principal.clone();
    for (i, name) in chain.iter().copied().chain([target]).enumerate() {
        let is_target = i == chain.len();
        let Some(sa) = crate::store::accounts::find(&state.store, name).await? else {
            if !is_admin {
                return Err(denied(permission));
            }
            return Err(if is_target {
                ApiError::not_found(format!("Service account {name} does not exist."))
            } else {
                ApiError::not_found(format!(
                    "Service account {name} (delegates[{i}]) does not exist."
                ))
            });
        };
        if let Err(e) = require_project_permission(state, &acting, &sa.project_id, permission).await
        {
            // The caller's own denial is Google's usual one; a denial further down the chain
            // says which delegate may not act for which account (the caller named both).
            return Err(match &acting {
                Principal::ServiceAccount { email } if i > 0 => {
                    ApiError::permission_denied(format!(
                        "Permission '{permission}' denied: delegate {email} may not act for \
                         {}.",
                        sa.email
                    ))
                }
                _ => e,
            });
        }
        if sa.disabled {
            return Err(ApiError::failed_precondition(format!(
                "Service account {} is disabled.",
                sa.email
            )));
        }
        if is_target {
            return Ok(sa);
        }
        acting = Principal::ServiceAccount { email: sa.email };
    }
    // The loop returns at the target, which is always the chain's last element.
    Err(ApiError::internal("empty delegation chain"))
}

async fn generate_id_token(
    state: &AppState,
    project: &str,
    account: &str,
    req: Request,
) -> Result<Response, ApiError> {
    let (principal, body): (_, GenerateIdTokenRequest) = read_request(state, project, req).await?;
    if body.audience.is_empty() {
        return Err(ApiError::invalid_argument("audience is required.")
            .with_field_violation("audience", "required"));
    }
    if body.audience.len() > crate::idtoken::MAX_AUDIENCE_BYTES {
        return Err(ApiError::invalid_argument(format!(
            "audience is longer than {} bytes.",
            crate::idtoken::MAX_AUDIENCE_BYTES
        ))
        .with_field_violation("audience", "too long"));
    }
    let sa = authorize_chain(
        state,
        &principal,
        &body.delegates,
        account,
        perms::SA_GET_OPEN_ID_TOKEN,
    )
    .await?;
    let token = state
        .id_tokens
        .mint(
            &crate::idtoken::Subject {
                unique_id: &sa.unique_id,
                email: &sa.email,
                include_email: body.include_email,
            },
            &body.audience,
            crate::idtoken::now_unix(),
        )
        .map_err(ApiError::internal)?;
    tracing::info!(
        email = %sa.email,
        by = %principal.display(),
        delegates = body.delegates.len(),
        "issued ID token (generateIdToken)"
    );
    Ok(Json(GenerateIdTokenResponse { token }).into_response())
}

/// A `google.protobuf.Duration` in JSON (`"3600s"`, `"1.5s"`) as whole seconds, rounded up.
fn parse_lifetime(s: &str) -> Option<i64> {
    let digits = s.strip_suffix('s')?;
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty()
        || whole.len() > 12
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || fraction.len() > 9
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = whole.parse().ok()?;
    let up = i64::from(fraction.bytes().any(|b| b != b'0'));
    Some(secs + up)
}

async fn generate_access_token(
    state: &AppState,
    project: &str,
    account: &str,
    req: Request,
) -> Result<Response, ApiError> {
    let (principal, body): (_, GenerateAccessTokenRequest) =
        read_request(state, project, req).await?;
    if body.scope.is_empty() {
        return Err(ApiError::invalid_argument("scope is required.")
            .with_field_violation("scope", "required"));
    }
    if body.scope.len() > MAX_SCOPES
        || body
            .scope
            .iter()
            .any(|s| s.is_empty() || s.len() > MAX_SCOPE_BYTES || s.contains(char::is_whitespace))
    {
        return Err(ApiError::invalid_argument(format!(
            "scope must name 1 to {MAX_SCOPES} scopes, each a non-empty URL without spaces of \
             at most {MAX_SCOPE_BYTES} bytes."
        ))
        .with_field_violation("scope", "invalid"));
    }
    let lifetime = match body.lifetime.as_deref() {
        None => MAX_ACCESS_TOKEN_LIFETIME_S,
        Some(l) => parse_lifetime(l)
            .filter(|s| (1..=MAX_ACCESS_TOKEN_LIFETIME_S).contains(s))
            .ok_or_else(|| {
                ApiError::invalid_argument(format!(
                    "lifetime is {l:?}; give a duration from 1s to \
                     {MAX_ACCESS_TOKEN_LIFETIME_S}s, such as \"3600s\"."
                ))
                .with_field_violation("lifetime", "out of range")
            })?,
    };
    let sa = authorize_chain(
        state,
        &principal,
        &body.delegates,
        account,
        perms::SA_GET_ACCESS_TOKEN,
    )
    .await?;
    let now = crate::idtoken::now_unix();
    let expires_at = now + lifetime;
    let token = format!("ya29.{}", crate::crypto::random_urlsafe(32));
    crate::store::tokens::insert_access_token(
        &state.store,
        &crate::store::tokens::NewAccessToken {
            token_hash: &crate::crypto::token_hash(&token),
            email: &sa.email,
            key_id: crate::store::tokens::IMPERSONATION_KEY_ID,
            scope: &body.scope.join(" "),
            expires_at,
        },
    )
    .await?;
    let expire_time = time::OffsetDateTime::from_unix_timestamp(expires_at)
        .map(crate::store::format_rfc3339)
        .map_err(|e| ApiError::internal(format!("expiry out of range: {e}")))?;
    tracing::info!(
        email = %sa.email,
        by = %principal.display(),
        delegates = body.delegates.len(),
        "issued access token (generateAccessToken)"
    );
    Ok(Json(GenerateAccessTokenResponse {
        access_token: token,
        expire_time,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes() {
        assert_eq!(parse_lifetime("3600s"), Some(3600));
        assert_eq!(parse_lifetime("1.5s"), Some(2));
        assert_eq!(parse_lifetime("10.000s"), Some(10));
        for bad in [
            "",
            "s",
            "3600",
            "-1s",
            "1e3s",
            "1.s0",
            " 1s",
            "99999999999999s",
        ] {
            assert_eq!(parse_lifetime(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn delegate_names() {
        let ok = vec![
            "projects/-/serviceAccounts/a@p.iam.gserviceaccount.com".to_string(),
            "projects/-/serviceAccounts/1234".to_string(),
        ];
        assert_eq!(
            delegate_accounts(&ok).unwrap(),
            vec!["a@p.iam.gserviceaccount.com", "1234"]
        );
        for bad in [
            "a@p.iam.gserviceaccount.com",
            "projects/p/serviceAccounts/a@p.iam.gserviceaccount.com",
            "projects/-/serviceAccounts/",
            "projects/-/serviceAccounts/a/b",
        ] {
            assert!(delegate_accounts(&[bad.to_string()]).is_err(), "{bad}");
        }
        let many = vec![ok[0].clone(); MAX_DELEGATES + 1];
        assert!(delegate_accounts(&many).is_err());
    }
}
