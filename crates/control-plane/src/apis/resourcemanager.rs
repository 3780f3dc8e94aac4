//! Resource Manager v1, the part gcloud uses: project IAM policies, plus project-level
//! authorization for the identity APIs.
//!
//! - `GET  /v1/projects/{project}` — the (implicit) project, with its `lifecycleState`.
//! - `DELETE /v1/projects/{project}` (`gcloud projects delete`) — marks it `DELETE_REQUESTED`;
//!   `POST /v1/projects/{project}:undelete` (`gcloud projects undelete`) makes it `ACTIVE`
//!   again. Both answer `{}` like Google. Deleting a deleted project is a no-op (Google: "only
//!   affects the project if it is ACTIVE"); undeleting an active one is 400 FAILED_PRECONDITION.
//!   A deleted project's API keys fail `:check` with `PROJECT_DELETED` (`servicecontrol/`).
//!   Only the admin token or a `roles/owner` member may do either: Google keeps
//!   `resourcemanager.projects.delete`/`undelete` out of `roles/editor`.
//! - `POST /v1/projects/{project}:getIamPolicy` / `:setIamPolicy` — read-modify-write with an
//!   etag. The etag is base64 bytes; gcloud echoes it URL-safe, so it is compared as decoded
//!   bytes. A stale etag is 409 ABORTED; an absent etag overwrites unconditionally (Google's
//!   rule). A project that never had a policy answers `{"version":1,"etag":"ACAB"}`.
//!   `version` is stored as sent (gcloud bumps it to 3).
//! - `POST /v1/projects/{project}:testIamPermissions` — which of the asked permissions (at most
//!   100, no wildcards) the caller holds on the project; asking needs no permission.
//!
//! Authorization is `authz::require_project_permission` with the one role table in
//! `authz::roles`; the project policy stored here is also what
//! `authz::require_service_permission` consults, so a project owner/editor may manage that
//! project's services too. Policy rows live in `store::policies`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::app::{parse_json_body, split_verb, AppState, IdentityState};
use crate::authz::{
    canonical_etag, load_project_policy, perms, require_project_permission, Policy, Principal,
    EMPTY_POLICY_ETAG,
};
use crate::error::ApiError;
use crate::store::policies::{StoredPolicy, WriteCondition};
use crate::store::projects::LifecycleState;
use crate::store::Store;

pub fn routes() -> Router<AppState> {
    Router::new().route(
        "/v1/projects/{project}",
        get(get_project).post(project_verb).delete(delete_project),
    )
}

/// `cloudresourcemanager.v1.Project`, the fields Portico knows.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Project {
    /// Google sends the int64 as a string.
    project_number: String,
    project_id: String,
    lifecycle_state: &'static str,
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    create_time: Option<String>,
}

/// The `{}` Google answers for delete and undelete.
#[derive(Debug, Serialize)]
struct Empty {}

async fn get_project(
    State(state): State<IdentityState>,
    principal: Principal,
    Path(project): Path<String>,
) -> Result<Json<Project>, ApiError> {
    let project_id = crate::projects::project_id_for(&state.store, &project).await?;
    require_project_permission(&state, &principal, &project_id, perms::PROJECT_GET).await?;
    let number = crate::projects::project_number(&state.store, &project_id).await?;
    let lifecycle = crate::store::projects::lifecycle_state(&state.store, &project_id)
        .await?
        .unwrap_or(LifecycleState::Active);
    let create_time = crate::store::projects::create_time(&state.store, &project_id).await?;
    Ok(Json(Project {
        project_number: number.to_string(),
        project_id: project_id.clone(),
        lifecycle_state: lifecycle.as_str(),
        name: project_id,
        create_time,
    }))
}

async fn delete_project(
    State(state): State<IdentityState>,
    principal: Principal,
    Path(project): Path<String>,
) -> Result<Json<Empty>, ApiError> {
    let project_id = crate::projects::project_id_for(&state.store, &project).await?;
    require_project_permission(&state, &principal, &project_id, perms::PROJECT_DELETE).await?;
    let changed = crate::store::projects::set_lifecycle_state(
        &state.store,
        &project_id,
        LifecycleState::Active,
        LifecycleState::DeleteRequested,
    )
    .await?;
    if changed {
        tracing::info!(project = %project_id, by = %principal.display(), "project delete requested");
    }
    Ok(Json(Empty {}))
}

async fn undelete_project(
    state: &IdentityState,
    principal: &Principal,
    project_id: &str,
) -> Result<(), ApiError> {
    require_project_permission(state, principal, project_id, perms::PROJECT_UNDELETE).await?;
    let changed = crate::store::projects::set_lifecycle_state(
        &state.store,
        project_id,
        LifecycleState::DeleteRequested,
        LifecycleState::Active,
    )
    .await?;
    if !changed {
        return Err(ApiError::failed_precondition(format!(
            "Project '{project_id}' is not in the DELETE_REQUESTED state; only a deleted project \
             can be undeleted."
        )));
    }
    tracing::info!(project = %project_id, by = %principal.display(), "project undeleted");
    Ok(())
}

/// What a project's custom verbs answer: a policy, or `{}` for `:undelete`.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum VerbResponse {
    Policy(Policy),
    Empty(Empty),
    Permissions(TestIamPermissionsResponse),
}

/// Most permissions one `:testIamPermissions` call may ask about (each is a lookup).
const MAX_TESTED_PERMISSIONS: usize = 100;

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TestIamPermissionsRequest {
    permissions: Vec<String>,
}

/// `google.iam.v1.TestIamPermissionsResponse`: the subset the caller holds.
#[derive(Debug, Serialize)]
struct TestIamPermissionsResponse {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    permissions: Vec<String>,
}

/// Which of `asked` the caller holds on the project. Needs no permission of its own (Google's
/// rule: anyone may ask what they may do); wildcards are refused as Google refuses them.
async fn test_project_permissions(
    state: &IdentityState,
    principal: &Principal,
    project_id: &str,
    asked: Vec<String>,
) -> Result<TestIamPermissionsResponse, ApiError> {
    if asked.len() > MAX_TESTED_PERMISSIONS {
        return Err(ApiError::invalid_argument(format!(
            "Too many permissions: {} were asked, at most {MAX_TESTED_PERMISSIONS} may be.",
            asked.len()
        ))
        .with_field_violation("permissions", "too many"));
    }
    if let Some(bad) = asked
        .iter()
        .find(|p| p.contains('*') || p.is_empty() || p.len() > 256)
    {
        return Err(ApiError::invalid_argument(format!(
            "Permission '{bad}' is invalid: name one permission, without wildcards."
        ))
        .with_field_violation("permissions", "invalid"));
    }
    let permissions = match principal.member() {
        // The admin token may do everything.
        None => asked,
        Some(member) => {
            let policy = load_project_policy(&state.store, project_id).await?;
            asked
                .into_iter()
                .filter(|p| policy.as_ref().is_some_and(|pol| pol.grants(&member, p)))
                .collect()
        }
    };
    Ok(TestIamPermissionsResponse { permissions })
}

async fn project_verb(
    State(state): State<IdentityState>,
    principal: Principal,
    Path(segment): Path<String>,
    body: Bytes,
) -> Result<Json<VerbResponse>, ApiError> {
    let (project, verb) = split_verb(&segment);
    let project_id = crate::projects::project_id_for(&state.store, project).await?;
    match verb {
        Some("getIamPolicy") => {
            require_project_permission(&state, &principal, &project_id, perms::PROJECT_GET_IAM)
                .await?;
            let policy = load_project_policy(&state.store, &project_id).await?;
            Ok(Json(VerbResponse::Policy(policy_or_empty(policy))))
        }
        Some("setIamPolicy") => {
            require_project_permission(&state, &principal, &project_id, perms::PROJECT_SET_IAM)
                .await?;
            let req: SetIamPolicyRequest = parse_json_body(&body)?;
            let stored = set_policy(&state.store, &project_id, req.policy).await?;
            tracing::info!(project = %project_id, by = %principal.display(), "set project IAM policy");
            Ok(Json(VerbResponse::Policy(stored)))
        }
        Some("undelete") => {
            undelete_project(&state, &principal, &project_id).await?;
            Ok(Json(VerbResponse::Empty(Empty {})))
        }
        Some("testIamPermissions") => {
            let req: TestIamPermissionsRequest = parse_json_body(&body)?;
            let granted =
                test_project_permissions(&state, &principal, &project_id, req.permissions).await?;
            Ok(Json(VerbResponse::Permissions(granted)))
        }
        Some(other) => Err(ApiError::not_found(format!(
            "Unknown method '{other}' on projects/{project_id}."
        ))),
        None => Err(ApiError::not_found(format!(
            "The requested URL /v1/projects/{project} was not found on this server (POST needs \
             a :getIamPolicy, :setIamPolicy, :testIamPermissions or :undelete verb)."
        ))),
    }
}

/// A project that never had a policy answers version 1 with the empty-policy etag.
fn policy_or_empty(policy: Option<Policy>) -> Policy {
    policy.unwrap_or_else(|| Policy {
        version: 1,
        bindings: Vec::new(),
        etag: EMPTY_POLICY_ETAG.to_string(),
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct SetIamPolicyRequest {
    policy: Policy,
}

fn concurrent_change() -> ApiError {
    ApiError::aborted(
        "There were concurrent policy changes. Please retry the whole read-modify-write with \
         exponential backoff. The request's ETag does not match the current policy's ETag.",
    )
}

/// Stores `requested` for the project if its etag matches (or it has none); returns the stored
/// policy with its new etag.
pub async fn set_policy(
    store: &Store,
    project_id: &str,
    requested: Policy,
) -> Result<Policy, ApiError> {
    if !matches!(requested.version, 0 | 1 | 3) {
        return Err(ApiError::invalid_argument(format!(
            "Invalid policy version {}: expected 1 or 3.",
            requested.version
        )));
    }
    let presented = if requested.etag.trim().is_empty() {
        None
    } else {
        Some(canonical_etag(&requested.etag)?)
    };
    let mut policy = requested.normalized_for_store()?;
    let etag = std::mem::take(&mut policy.etag);
    let stored = StoredPolicy {
        document: serde_json::to_string(&policy)?,
        etag,
    };
    let empty = canonical_etag(EMPTY_POLICY_ETAG)?;
    let condition = match &presented {
        None => WriteCondition::Always,
        Some(p) if *p == empty => WriteCondition::Absent,
        Some(p) => WriteCondition::EtagIs(p),
    };
    if !crate::store::policies::put(store, project_id, &stored, condition).await? {
        return Err(concurrent_change());
    }
    policy.etag = stored.etag;
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::Binding;
    use base64::Engine as _;

    fn policy_grants(policy: &Policy, member: &str, permission: &str) -> bool {
        policy.grants(member, permission)
    }

    fn binding(role: &str, member: &str) -> Binding {
        Binding {
            role: role.into(),
            members: vec![member.into()],
            condition: None,
        }
    }

    async fn store() -> (tempfile::TempDir, Store) {
        let (d, s) = crate::store::tests::temp_store().await;
        s.migrate(&[crate::store::policies::MIGRATIONS])
            .await
            .expect("migrate");
        (d, s)
    }

    #[tokio::test]
    async fn etag_read_modify_write() {
        let (_d, s) = store().await;
        assert!(load_project_policy(&s, "demo-proj")
            .await
            .expect("load")
            .is_none());
        // First write with the empty-policy etag, sent URL-safe like gcloud would.
        let first = set_policy(
            &s,
            "demo-proj",
            Policy {
                version: 3,
                bindings: vec![binding("roles/cloudtrace.agent", "serviceAccount:a@x")],
                etag: "ACAB".into(),
            },
        )
        .await
        .expect("first set");
        assert_eq!(first.version, 3);
        // A second writer still holding ACAB loses.
        let stale = set_policy(
            &s,
            "demo-proj",
            Policy {
                version: 3,
                bindings: vec![],
                etag: "ACAB".into(),
            },
        )
        .await
        .expect_err("stale");
        assert_eq!(stale.code, crate::error::Code::Aborted);
        // The current etag, re-encoded URL-safe without padding, wins.
        let bytes = crate::crypto::decode_base64_lenient(&first.etag).expect("etag b64");
        let urlsafe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let second = set_policy(
            &s,
            "demo-proj",
            Policy {
                version: 3,
                bindings: vec![binding("roles/owner", "serviceAccount:b@x")],
                etag: urlsafe,
            },
        )
        .await
        .expect("second set");
        assert_ne!(second.etag, first.etag);
        let loaded = load_project_policy(&s, "demo-proj")
            .await
            .expect("load")
            .expect("some");
        assert_eq!(loaded, second);
        assert!(policy_grants(
            &loaded,
            "serviceAccount:b@x",
            perms::SA_CREATE
        ));
        assert!(!policy_grants(
            &loaded,
            "serviceAccount:a@x",
            perms::SA_CREATE
        ));
        // Garbage etag is a 400, not a conflict.
        let bad = set_policy(
            &s,
            "demo-proj",
            Policy {
                version: 1,
                bindings: vec![],
                etag: "W/\"x\"".into(),
            },
        )
        .await
        .expect_err("bad etag");
        assert_eq!(bad.code, crate::error::Code::InvalidArgument);
    }

    #[test]
    fn narrow_roles() {
        assert!(crate::authz::role_grants(
            "roles/serviceusage.apiKeysAdmin",
            perms::APIKEYS_CREATE
        ));
        assert!(!crate::authz::role_grants(
            "roles/serviceusage.apiKeysViewer",
            perms::APIKEYS_GET_KEY_STRING
        ));
        assert!(crate::authz::role_grants(
            "roles/iam.serviceAccountKeyAdmin",
            perms::KEY_CREATE
        ));
        assert!(!crate::authz::role_grants(
            "roles/iam.serviceAccountKeyAdmin",
            perms::SA_CREATE
        ));
        let viewer = Policy {
            version: 1,
            bindings: vec![binding("roles/viewer", "serviceAccount:v@x")],
            etag: String::new(),
        };
        assert!(policy_grants(
            &viewer,
            "serviceAccount:v@x",
            perms::APIKEYS_LIST
        ));
        assert!(policy_grants(
            &viewer,
            "serviceAccount:v@x",
            perms::PROJECT_GET_IAM
        ));
        assert!(!policy_grants(
            &viewer,
            "serviceAccount:v@x",
            perms::PROJECT_SET_IAM
        ));
        assert!(!policy_grants(
            &viewer,
            "serviceAccount:v@x",
            perms::APIKEYS_GET_KEY_STRING
        ));
        let editor = Policy {
            version: 1,
            bindings: vec![binding("roles/editor", "serviceAccount:e@x")],
            etag: String::new(),
        };
        assert!(policy_grants(
            &editor,
            "serviceAccount:e@x",
            perms::KEY_CREATE
        ));
        assert!(!policy_grants(
            &editor,
            "serviceAccount:e@x",
            perms::PROJECT_SET_IAM
        ));
        // Deleting a project is for owners only, as in Google.
        for p in [perms::PROJECT_DELETE, perms::PROJECT_UNDELETE] {
            assert!(!policy_grants(&editor, "serviceAccount:e@x", p), "{p}");
            let owner = Policy {
                version: 1,
                bindings: vec![binding("roles/owner", "serviceAccount:o@x")],
                etag: String::new(),
            };
            assert!(policy_grants(&owner, "serviceAccount:o@x", p), "{p}");
            assert!(!policy_grants(&owner, "serviceAccount:e@x", p), "{p}");
        }
    }
}
