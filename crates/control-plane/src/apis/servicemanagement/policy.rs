//! A service's IAM policy: `:getIamPolicy`, `:setIamPolicy`, `:testIamPermissions`.
//!
//! Handlers only (see the parent module's layer rule); storage goes through `crate::store`.

use serde::{Deserialize, Serialize};

use super::{not_found_or_denied, require_service_or_hide};
use crate::app::AppState;
use crate::authz::{perms, require_service_permission, Policy, Principal};
use crate::error::ApiError;
use crate::store::services as services_store;

pub(super) async fn get_iam_policy(
    state: &AppState,
    principal: &Principal,
    service: &str,
) -> Result<Policy, ApiError> {
    require_service_or_hide(state, principal, service, perms::SERVICES_GET_IAM).await?;
    let (policy, _) = services_store::policy_and_producer(&state.store, service)
        .await?
        .ok_or_else(|| not_found_or_denied(service))?;
    Ok(serde_json::from_str(&policy)?)
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct SetIamPolicyBody {
    policy: Option<Policy>,
}

pub(super) async fn set_iam_policy(
    state: &AppState,
    principal: &Principal,
    service: &str,
    body: SetIamPolicyBody,
) -> Result<Policy, ApiError> {
    require_service_or_hide(state, principal, service, perms::SERVICES_SET_IAM).await?;
    let Some(new) = body.policy else {
        return Err(ApiError::invalid_argument("policy is required.")
            .with_field_violation("policy", "required"));
    };
    let presented = new.etag.clone();
    let new = new.normalized_for_store()?;
    let mut tx = state.store.begin_write().await?;
    let Some(current) = services_store::lock_policy(&mut tx, service).await? else {
        return Err(not_found_or_denied(service));
    };
    let current: Policy = serde_json::from_str(&current)?;
    if !crate::authz::etag_matches(&presented, &current.etag)? {
        return Err(ApiError::aborted(
            "There were concurrent policy changes. Please retry the whole read-modify-write with \
             exponential backoff.",
        ));
    }
    services_store::set_policy(&mut tx, service, &serde_json::to_string(&new)?).await?;
    tx.commit().await?;
    tracing::info!(service = %service, bindings = new.bindings.len(), "service IAM policy set");
    Ok(new)
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct TestIamPermissionsBody {
    permissions: Vec<String>,
}

/// `google.iam.v1.TestIamPermissionsResponse`.
#[derive(Serialize)]
pub(super) struct TestIamPermissionsResponse {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    permissions: Vec<String>,
}

pub(super) async fn test_iam_permissions(
    state: &AppState,
    principal: &Principal,
    service: &str,
    body: TestIamPermissionsBody,
) -> Result<TestIamPermissionsResponse, ApiError> {
    if services_store::producer_project(&state.store, service)
        .await?
        .is_none()
    {
        return Err(not_found_or_denied(service));
    }
    let mut permissions = Vec::new();
    for p in body.permissions {
        if require_service_permission(state, principal, service, &p)
            .await
            .is_ok()
        {
            permissions.push(p);
        }
    }
    Ok(TestIamPermissionsResponse { permissions })
}
