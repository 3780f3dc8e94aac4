//! IAM Credentials v1 (`iamcredentials.googleapis.com`): `generateIdToken`, the call gcloud-style
//! clients and Google's client libraries make to get an ID token for a service account they may
//! act for (`gcloud auth print-identity-token --impersonate-service-account`).
//!
//! - `POST /v1/projects/-/serviceAccounts/{email or unique id}:generateIdToken` with
//!   `{"audience": "...", "includeEmail": bool}` → `{"token": "<ID token>"}` (RS256 from
//!   [`crate::idtoken`], the same tokens the OAuth2 endpoint issues for `target_audience`).
//! - The path is IAM's; IAM's verb handler hands `:generateIdToken` here through
//!   [`crate::app::ACCOUNT_VERB_HANDLERS`]. The `/iamcredentials/` prefix is stripped like the
//!   other APIs' so an `api_endpoint_overrides/iamcredentials` may point at the same port.
//! - The caller needs `iam.serviceAccounts.getOpenIdToken` on the account's project
//!   (`roles/iam.serviceAccountOpenIdTokenCreator`, `roles/iam.serviceAccountTokenCreator`,
//!   `roles/owner`); the project segment must be `-`, as Google requires. Delegation chains
//!   (`delegates`) are not implemented and are refused rather than ignored.

use std::future::Future;
use std::pin::Pin;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::authz::{perms, require_project_permission, Principal};
use crate::error::ApiError;

/// Largest request body read (an audience and two small fields).
const MAX_BODY_BYTES: usize = 64 << 10;

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

async fn generate_id_token(
    state: &AppState,
    project: &str,
    account: &str,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let principal = crate::authz::authenticate(state, crate::authz::bearer_token(&parts)).await?;
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| ApiError::invalid_argument(format!("Cannot read request body: {e}")))?;
    let body: GenerateIdTokenRequest = crate::app::parse_json_body(&bytes)?;
    if project != "-" {
        return Err(ApiError::invalid_argument(format!(
            "Invalid resource name: the project must be '-', not '{project}'."
        ))
        .with_field_violation("name", "projects/-/serviceAccounts/{ACCOUNT}"));
    }
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
    if !body.delegates.is_empty() {
        return Err(ApiError::unimplemented(
            "Delegation chains (delegates) are not supported by Portico.",
        ));
    }
    let permission = perms::SA_GET_OPEN_ID_TOKEN;
    let Some(sa) = crate::store::accounts::find(&state.store, account).await? else {
        // The same answer whether the account is missing or the caller may not see it.
        if principal != Principal::Admin {
            return Err(ApiError::permission_denied(format!(
                "Permission '{permission}' denied on resource (or it may not exist)."
            )));
        }
        return Err(ApiError::not_found(format!(
            "Service account {account} does not exist."
        )));
    };
    require_project_permission(state, &principal, &sa.project_id, permission).await?;
    if sa.disabled {
        return Err(ApiError::failed_precondition(format!(
            "Service account {} is disabled.",
            sa.email
        )));
    }
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
    tracing::info!(email = %sa.email, by = %principal.display(), "issued ID token (generateIdToken)");
    Ok(Json(GenerateIdTokenResponse { token }).into_response())
}
