//! The two permission checks every API uses: on a service, and on a project.
//!
//! Layer rule: policies come from the store (`store::policies` for projects; the service's own
//! policy through Service Management's lookup); no API module calls another to authorize.

use serde_json::json;

use super::policy::{load_project_policy, Policy};
use super::Principal;
use crate::app::AppState;
use crate::error::ApiError;
use crate::store::Store;

/// Admin: always allowed. Service account: needs a role granting `permission` in the service's
/// policy or the producer project's policy. A denial reads like Google's ("not found or
/// permission denied") so callers cannot probe which services exist.
pub async fn require_service_permission(
    state: &AppState,
    principal: &Principal,
    service_name: &str,
    permission: &str,
) -> Result<(), ApiError> {
    let Some(member) = principal.member() else {
        return Ok(());
    };
    let denied = || {
        ApiError::permission_denied(format!(
            "Permission '{permission}' denied on service '{service_name}' for {member}, or the \
             service was not found."
        ))
    };
    let Some((policy, producer)) =
        crate::store::services::policy_and_producer(&state.store, service_name).await?
    else {
        return Err(denied());
    };
    let policy: Policy = serde_json::from_str(&policy)?;
    if policy.grants(&member, permission) {
        return Ok(());
    }
    if project_grants(&state.store, &producer, &member, permission).await? {
        return Ok(());
    }
    Err(denied())
}

/// Admin: always allowed. Service account: needs a binding in the project's policy whose role
/// grants `permission`.
///
/// `state` is anything holding the store: `&AppState` for every caller today, or a substate.
pub async fn require_project_permission(
    state: &impl AsRef<Store>,
    principal: &Principal,
    project_id: &str,
    permission: &str,
) -> Result<(), ApiError> {
    let Some(member) = principal.member() else {
        return Ok(());
    };
    if project_grants(state.as_ref(), project_id, &member, permission).await? {
        return Ok(());
    }
    Err(project_denied(project_id, &member, permission))
}

async fn project_grants(
    store: &Store,
    project_id: &str,
    member: &str,
    permission: &str,
) -> Result<bool, ApiError> {
    Ok(load_project_policy(store, project_id)
        .await?
        .as_ref()
        .is_some_and(|p: &Policy| p.grants(member, permission)))
}

/// A denial on a project. Two wordings exist and both are kept byte for byte, because clients
/// and tests match them: Service Management and Service Usage permissions get the short form
/// naming the project; the identity APIs (IAM, Resource Manager, API Keys) get Google's IAM
/// form naming the resource, with an `ErrorInfo` detail gcloud reads. The wording follows the
/// permission's API rather than a caller-chosen flag so one call site cannot pick the other
/// API's message.
fn project_denied(project_id: &str, member: &str, permission: &str) -> ApiError {
    if permission.starts_with("servicemanagement.") || permission.starts_with("serviceusage.") {
        return ApiError::permission_denied(format!(
            "Permission '{permission}' denied on project '{project_id}' for {member}."
        ));
    }
    ApiError::permission_denied(format!(
        "Permission '{permission}' denied on resource 'projects/{project_id}' for {member} (or it \
         may not exist)."
    ))
    .with_detail(json!({
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "IAM_PERMISSION_DENIED",
        "domain": "iam.googleapis.com",
        "metadata": {"permission": permission, "resource": format!("projects/{project_id}")},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::perms;

    #[test]
    fn denial_wording_follows_the_permissions_api() {
        let short = project_denied("p", "serviceAccount:a@x", perms::SERVICEUSAGE_LIST);
        assert_eq!(
            short.message,
            "Permission 'serviceusage.services.list' denied on project 'p' for serviceAccount:a@x."
        );
        let iam = project_denied("p", "serviceAccount:a@x", perms::SA_LIST);
        assert_eq!(
            iam.message,
            "Permission 'iam.serviceAccounts.list' denied on resource 'projects/p' for \
             serviceAccount:a@x (or it may not exist)."
        );
    }
}
