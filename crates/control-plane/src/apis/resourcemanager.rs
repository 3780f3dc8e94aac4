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
//!
//! # Project roles (kept deliberately small)
//! [`require_project_permission`]: the admin token may do anything. A service account needs a
//! binding in the project's policy whose role grants the permission — `roles/owner` (all),
//! `roles/editor` (all but `*.setIamPolicy`), `roles/viewer` (`*.get`, `*.list`,
//! `getIamPolicy`), or one of the narrow roles in [`identity_role_grants`]. The project policy
//! is also what [`ProjectPolicies`] hands to `authz::require_service_permission`, so a project
//! owner/editor may manage that project's services too.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::app::{split_verb, AppState};
use crate::authz::{self, BoxFuture, Policy, Principal, ProjectPolicySource};
use crate::error::ApiError;
use crate::projects::LifecycleState;
use crate::store::{now_rfc3339, Migration, Store};

pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "rm_0001",
    sql: &["CREATE TABLE IF NOT EXISTS rm_project_policies (\
            project_id TEXT PRIMARY KEY, \
            policy TEXT NOT NULL, \
            etag TEXT NOT NULL, \
            update_time TEXT NOT NULL)"],
}];

/// The etag of a project that has never had a policy set (what Google returns, bytes 00 20 01).
pub const EMPTY_POLICY_ETAG: &str = "ACAB";

/// Permissions the identity APIs check against project policies.
pub mod perms {
    pub const SA_CREATE: &str = "iam.serviceAccounts.create";
    pub const SA_GET: &str = "iam.serviceAccounts.get";
    pub const SA_LIST: &str = "iam.serviceAccounts.list";
    pub const SA_DELETE: &str = "iam.serviceAccounts.delete";
    pub const SA_DISABLE: &str = "iam.serviceAccounts.disable";
    pub const SA_ENABLE: &str = "iam.serviceAccounts.enable";
    pub const KEY_CREATE: &str = "iam.serviceAccountKeys.create";
    pub const KEY_GET: &str = "iam.serviceAccountKeys.get";
    pub const KEY_LIST: &str = "iam.serviceAccountKeys.list";
    pub const KEY_DELETE: &str = "iam.serviceAccountKeys.delete";
    pub const PROJECT_GET: &str = "resourcemanager.projects.get";
    pub const PROJECT_DELETE: &str = "resourcemanager.projects.delete";
    pub const PROJECT_UNDELETE: &str = "resourcemanager.projects.undelete";
    pub const PROJECT_GET_IAM: &str = "resourcemanager.projects.getIamPolicy";
    pub const PROJECT_SET_IAM: &str = "resourcemanager.projects.setIamPolicy";
    pub const APIKEYS_CREATE: &str = "apikeys.keys.create";
    pub const APIKEYS_GET: &str = "apikeys.keys.get";
    pub const APIKEYS_LIST: &str = "apikeys.keys.list";
    pub const APIKEYS_UPDATE: &str = "apikeys.keys.update";
    pub const APIKEYS_DELETE: &str = "apikeys.keys.delete";
    pub const APIKEYS_UNDELETE: &str = "apikeys.keys.undelete";
    pub const APIKEYS_GET_KEY_STRING: &str = "apikeys.keys.getKeyString";
    pub const APIKEYS_LOOKUP: &str = "apikeys.keys.lookup";
}

/// Narrow predefined roles for the identity APIs, on top of `authz::role_grants`' basic roles.
pub fn identity_role_grants(role: &str, permission: &str) -> bool {
    match role {
        "roles/viewer" | "roles/iam.securityReviewer" => permission == perms::PROJECT_GET_IAM,
        "roles/iam.serviceAccountAdmin" => permission.starts_with("iam.serviceAccounts."),
        "roles/iam.serviceAccountKeyAdmin" => {
            permission.starts_with("iam.serviceAccountKeys.")
                || matches!(permission, perms::SA_GET | perms::SA_LIST)
        }
        "roles/resourcemanager.projectIamAdmin" => matches!(
            permission,
            perms::PROJECT_GET_IAM | perms::PROJECT_SET_IAM | perms::PROJECT_GET
        ),
        "roles/serviceusage.apiKeysAdmin" => permission.starts_with("apikeys."),
        "roles/serviceusage.apiKeysViewer" => matches!(
            permission,
            perms::APIKEYS_GET | perms::APIKEYS_LIST | perms::APIKEYS_LOOKUP
        ),
        _ => false,
    }
}

fn policy_grants(policy: &Policy, member: &str, permission: &str) -> bool {
    // Deleting a project is owner-only in Google (editor has everything but IAM writes, and
    // this), so these two bypass the generic role table.
    let owner_only = matches!(permission, perms::PROJECT_DELETE | perms::PROJECT_UNDELETE);
    policy.bindings.iter().any(|b| {
        b.members.iter().any(|m| m == member)
            && if owner_only {
                b.role == "roles/owner"
            } else {
                authz::role_grants(&b.role, permission) || identity_role_grants(&b.role, permission)
            }
    })
}

/// The stored policy of a project; `None` if never set.
pub async fn load_policy(store: &Store, project_id: &str) -> Result<Option<Policy>, ApiError> {
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT policy, etag FROM rm_project_policies WHERE project_id = $1")
            .bind(project_id)
            .fetch_optional(store.pool())
            .await?;
    match row {
        Some((text, etag)) => {
            let mut p: Policy = serde_json::from_str(&text)?;
            p.etag = etag;
            Ok(Some(p))
        }
        None => Ok(None),
    }
}

/// Admin: allowed. Service account: needs a project role granting `permission`.
pub async fn require_project_permission(
    state: &AppState,
    principal: &Principal,
    project_id: &str,
    permission: &str,
) -> Result<(), ApiError> {
    let Some(member) = principal.member() else {
        return Ok(());
    };
    if let Some(policy) = load_policy(&state.store, project_id).await? {
        if policy_grants(&policy, &member, permission) {
            return Ok(());
        }
    }
    Err(ApiError::permission_denied(format!(
        "Permission '{permission}' denied on resource 'projects/{project_id}' for {member} (or it \
         may not exist)."
    ))
    .with_detail(json!({
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "IAM_PERMISSION_DENIED",
        "domain": "iam.googleapis.com",
        "metadata": {"permission": permission, "resource": format!("projects/{project_id}")},
    })))
}

/// Plugs project policies into `authz::require_service_permission`.
pub struct ProjectPolicies;

impl ProjectPolicySource for ProjectPolicies {
    fn project_policy<'a>(
        &'a self,
        state: &'a AppState,
        project_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Policy>, ApiError>> {
        Box::pin(load_policy(&state.store, project_id))
    }
}

/// For `Shared::project_policies`.
pub fn policy_source() -> Arc<dyn ProjectPolicySource> {
    Arc::new(ProjectPolicies)
}

pub fn routes() -> Router<AppState> {
    Router::new().route(
        "/v1/projects/{project}",
        get(get_project).post(project_verb).delete(delete_project),
    )
}

async fn get_project(
    State(state): State<AppState>,
    principal: Principal,
    Path(project): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let project_id = crate::projects::project_id_for(&state.store, &project).await?;
    require_project_permission(&state, &principal, &project_id, perms::PROJECT_GET).await?;
    let number = crate::projects::project_number(&state.store, &project_id).await?;
    let lifecycle = crate::projects::lifecycle_state(&state.store, &project_id)
        .await?
        .unwrap_or(LifecycleState::Active);
    let mut v = json!({
        "projectNumber": number.to_string(),
        "projectId": project_id,
        "lifecycleState": lifecycle.as_str(),
        "name": project_id,
    });
    if let Some(t) = crate::projects::create_time(&state.store, &project_id).await? {
        v["createTime"] = json!(t);
    }
    Ok(Json(v))
}

async fn delete_project(
    State(state): State<AppState>,
    principal: Principal,
    Path(project): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let project_id = crate::projects::project_id_for(&state.store, &project).await?;
    require_project_permission(&state, &principal, &project_id, perms::PROJECT_DELETE).await?;
    let changed = crate::projects::set_lifecycle_state(
        &state.store,
        &project_id,
        LifecycleState::Active,
        LifecycleState::DeleteRequested,
    )
    .await?;
    if changed {
        tracing::info!(project = %project_id, by = %principal.display(), "project delete requested");
    }
    Ok(Json(json!({})))
}

async fn undelete_project(
    state: &AppState,
    principal: &Principal,
    project_id: &str,
) -> Result<Json<Value>, ApiError> {
    require_project_permission(state, principal, project_id, perms::PROJECT_UNDELETE).await?;
    let changed = crate::projects::set_lifecycle_state(
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
    Ok(Json(json!({})))
}

async fn project_verb(
    State(state): State<AppState>,
    principal: Principal,
    Path(segment): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let (project, verb) = split_verb(&segment);
    let project_id = crate::projects::project_id_for(&state.store, project).await?;
    match verb {
        Some("getIamPolicy") => {
            require_project_permission(&state, &principal, &project_id, perms::PROJECT_GET_IAM)
                .await?;
            Ok(Json(policy_json(
                load_policy(&state.store, &project_id).await?,
            )))
        }
        Some("setIamPolicy") => {
            require_project_permission(&state, &principal, &project_id, perms::PROJECT_SET_IAM)
                .await?;
            let req: SetIamPolicyRequest = crate::apis::iam::json_body(&body)?;
            let stored = set_policy(&state.store, &project_id, req.policy).await?;
            tracing::info!(project = %project_id, by = %principal.display(), "set project IAM policy");
            Ok(Json(policy_json(Some(stored))))
        }
        Some("undelete") => undelete_project(&state, &principal, &project_id).await,
        Some(other) => Err(ApiError::not_found(format!(
            "Unknown method '{other}' on projects/{project_id}."
        ))),
        None => Err(ApiError::not_found(format!(
            "The requested URL /v1/projects/{project} was not found on this server (POST needs \
             a :getIamPolicy, :setIamPolicy or :undelete verb)."
        ))),
    }
}

fn policy_json(policy: Option<Policy>) -> Value {
    match policy {
        Some(p) => match serde_json::to_value(&p) {
            Ok(v) => v,
            Err(_) => json!({"version": 1, "etag": EMPTY_POLICY_ETAG}),
        },
        None => json!({"version": 1, "etag": EMPTY_POLICY_ETAG}),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct SetIamPolicyRequest {
    policy: Policy,
}

/// Canonical (standard-alphabet, padded) form of a presented etag, so it can be compared with
/// the stored one inside a conditional SQL statement.
fn canonical_etag(presented: &str) -> Result<String, ApiError> {
    crate::crypto::decode_base64_lenient(presented)
        .map(|b| STANDARD.encode(b))
        .ok_or_else(|| {
            ApiError::invalid_argument(format!("Invalid etag '{presented}': not valid base64."))
                .with_field_violation("policy.etag", "must be base64")
        })
}

fn concurrent_change() -> ApiError {
    ApiError::aborted(
        "There were concurrent policy changes. Please retry the whole read-modify-write with \
         exponential backoff. The request's ETag does not match the current policy's ETag.",
    )
}

/// Stores `requested` for the project if its etag matches (or it has none); returns the stored
/// policy with its new etag. The compare and the write are one SQL statement, so two writers
/// racing with the same etag cannot both win.
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
    let text = serde_json::to_string(&policy)?;
    let now = now_rfc3339();
    let empty = canonical_etag(EMPTY_POLICY_ETAG)?;
    let affected = match presented {
        None => sqlx::query(
            "INSERT INTO rm_project_policies (project_id, policy, etag, update_time) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (project_id) DO UPDATE SET \
             policy = excluded.policy, etag = excluded.etag, update_time = excluded.update_time",
        )
        .bind(project_id)
        .bind(&text)
        .bind(&etag)
        .bind(&now)
        .execute(store.pool())
        .await?
        .rows_affected(),
        Some(p) if p == empty => sqlx::query(
            "INSERT INTO rm_project_policies (project_id, policy, etag, update_time) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (project_id) DO NOTHING",
        )
        .bind(project_id)
        .bind(&text)
        .bind(&etag)
        .bind(&now)
        .execute(store.pool())
        .await?
        .rows_affected(),
        Some(p) => sqlx::query(
            "UPDATE rm_project_policies SET policy = $1, etag = $2, update_time = $3 \
             WHERE project_id = $4 AND etag = $5",
        )
        .bind(&text)
        .bind(&etag)
        .bind(&now)
        .bind(project_id)
        .bind(&p)
        .execute(store.pool())
        .await?
        .rows_affected(),
    };
    if affected == 0 {
        return Err(concurrent_change());
    }
    policy.etag = etag;
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::Binding;

    fn binding(role: &str, member: &str) -> Binding {
        Binding {
            role: role.into(),
            members: vec![member.into()],
            condition: None,
        }
    }

    async fn store() -> (tempfile::TempDir, Store) {
        let (d, s) = crate::store::tests::temp_store().await;
        s.migrate(&[MIGRATIONS]).await.expect("migrate");
        (d, s)
    }

    #[tokio::test]
    async fn etag_read_modify_write() {
        let (_d, s) = store().await;
        assert!(load_policy(&s, "demo-proj").await.expect("load").is_none());
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
        let loaded = load_policy(&s, "demo-proj")
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
        assert!(identity_role_grants(
            "roles/serviceusage.apiKeysAdmin",
            perms::APIKEYS_CREATE
        ));
        assert!(!identity_role_grants(
            "roles/serviceusage.apiKeysViewer",
            perms::APIKEYS_GET_KEY_STRING
        ));
        assert!(identity_role_grants(
            "roles/iam.serviceAccountKeyAdmin",
            perms::KEY_CREATE
        ));
        assert!(!identity_role_grants(
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
