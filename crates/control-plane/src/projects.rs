//! Implicit projects: a project exists once something names it. Each project id gets a stable,
//! random 12-digit project number on first use, because Google APIs put numbers in some names
//! (API keys, serviceusage) and accept id or number in paths.
//!
//! # Lifecycle
//! A project is `ACTIVE` or `DELETE_REQUESTED` (Resource Manager v1's `lifecycleState`).
//! `gcloud projects delete` / `undelete` (served by `resourcemanager.rs`) flip it with
//! [`set_lifecycle_state`]; Service Control reads it with [`lifecycle_state`] and answers
//! `PROJECT_DELETED` for a deleted consumer. Nothing is ever purged: Google purges after 30 days,
//! Portico keeps the row (and the number) so an undelete always works and numbers never get
//! reused.

use rand::Rng;

use crate::error::ApiError;
use crate::store::{now_rfc3339, Migration, Store};

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        id: "projects_0001",
        sql: &["CREATE TABLE IF NOT EXISTS projects (\
            project_id TEXT PRIMARY KEY, \
            project_number BIGINT NOT NULL UNIQUE, \
            create_time TEXT NOT NULL)"],
    },
    // Existing rows predate the lifecycle and are all live, hence the default.
    Migration {
        id: "projects_0002",
        sql: &["ALTER TABLE projects ADD COLUMN lifecycle_state TEXT NOT NULL DEFAULT 'ACTIVE'"],
    },
];

/// Resource Manager v1 `LifecycleState`. `DELETE_IN_PROGRESS` (Google's purge) never happens
/// in Portico, so it is not modelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleState {
    Active,
    DeleteRequested,
}

impl LifecycleState {
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleState::Active => "ACTIVE",
            LifecycleState::DeleteRequested => "DELETE_REQUESTED",
        }
    }

    /// Stored text → state. Anything unexpected counts as deleted: a row someone edited by hand
    /// must not silently re-enable a consumer.
    fn from_stored(s: &str) -> LifecycleState {
        if s == "ACTIVE" {
            LifecycleState::Active
        } else {
            LifecycleState::DeleteRequested
        }
    }
}

/// The state of a project Portico knows; `None` for one never named (no row is created).
pub async fn lifecycle_state(
    store: &Store,
    project_id: &str,
) -> Result<Option<LifecycleState>, ApiError> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT lifecycle_state FROM projects WHERE project_id = $1")
            .bind(project_id)
            .fetch_optional(store.pool())
            .await?;
    Ok(row.map(|(s,)| LifecycleState::from_stored(&s)))
}

/// Moves a project from `from` to `to`; `false` when it was not in `from` (the compare and the
/// write are one statement, so two racing deletes cannot both see `ACTIVE`). The project must
/// already exist (see [`project_number`]).
pub async fn set_lifecycle_state(
    store: &Store,
    project_id: &str,
    from: LifecycleState,
    to: LifecycleState,
) -> Result<bool, ApiError> {
    let affected = sqlx::query(
        "UPDATE projects SET lifecycle_state = $1 WHERE project_id = $2 AND lifecycle_state = $3",
    )
    .bind(to.as_str())
    .bind(project_id)
    .bind(from.as_str())
    .execute(store.pool())
    .await?
    .rows_affected();
    Ok(affected > 0)
}

/// `createTime` of a known project (the first time Portico saw it).
pub async fn create_time(store: &Store, project_id: &str) -> Result<Option<String>, ApiError> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT create_time FROM projects WHERE project_id = $1")
            .bind(project_id)
            .fetch_optional(store.pool())
            .await?;
    Ok(row.map(|(t,)| t))
}

/// Google's project id rule: 6–30 characters, lower-case letters, digits and hyphens, starting
/// with a letter and not ending with a hyphen.
pub fn validate_project_id(id: &str) -> Result<(), ApiError> {
    let ok = (6..=30).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && !id.ends_with('-')
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_argument(format!(
            "Invalid project id '{id}': use 6 to 30 lower-case letters, digits or hyphens, \
             starting with a letter."
        )))
    }
}

/// The project's number, assigning one on first use.
pub async fn project_number(store: &Store, project_id: &str) -> Result<i64, ApiError> {
    validate_project_id(project_id)?;
    for _ in 0..5 {
        if let Some((n,)) =
            sqlx::query_as::<_, (i64,)>("SELECT project_number FROM projects WHERE project_id = $1")
                .bind(project_id)
                .fetch_optional(store.pool())
                .await?
        {
            return Ok(n);
        }
        let candidate: i64 = rand::thread_rng().gen_range(100_000_000_000..1_000_000_000_000);
        // A racing insert of the same id, or a number collision, both land here as "no row";
        // the loop re-reads and retries.
        let _ = sqlx::query(
            "INSERT INTO projects (project_id, project_number, create_time) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(project_id)
        .bind(candidate)
        .bind(now_rfc3339())
        .execute(store.pool())
        .await?;
    }
    Err(ApiError::internal(format_args!(
        "could not assign a project number to {project_id}"
    )))
}

/// Resolves a path's project (id or number) to the project id. An unknown number is NOT_FOUND;
/// an id is accepted (and implicitly created) if it is well-formed.
pub async fn project_id_for(store: &Store, id_or_number: &str) -> Result<String, ApiError> {
    if !id_or_number.is_empty() && id_or_number.chars().all(|c| c.is_ascii_digit()) {
        let n: i64 = id_or_number
            .parse()
            .map_err(|_| ApiError::not_found(format!("Project '{id_or_number}' not found.")))?;
        let row: Option<(String,)> =
            sqlx::query_as("SELECT project_id FROM projects WHERE project_number = $1")
                .bind(n)
                .fetch_optional(store.pool())
                .await?;
        return row
            .map(|(id,)| id)
            .ok_or_else(|| ApiError::not_found(format!("Project '{id_or_number}' not found.")));
    }
    project_number(store, id_or_number).await?;
    Ok(id_or_number.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn numbers_are_stable_and_resolvable() {
        let (_d, store) = crate::store::tests::temp_store().await;
        store.migrate(&[MIGRATIONS]).await.unwrap();
        let n = project_number(&store, "demo-proj").await.unwrap();
        assert!((100_000_000_000..1_000_000_000_000).contains(&n));
        assert_eq!(project_number(&store, "demo-proj").await.unwrap(), n);
        assert_ne!(project_number(&store, "other-proj").await.unwrap(), n);
        assert_eq!(
            project_id_for(&store, &n.to_string()).await.unwrap(),
            "demo-proj"
        );
        assert_eq!(
            project_id_for(&store, "demo-proj").await.unwrap(),
            "demo-proj"
        );
        assert_eq!(
            project_id_for(&store, "123456789012")
                .await
                .unwrap_err()
                .code,
            crate::error::Code::NotFound
        );
        assert!(project_number(&store, "Bad_Id").await.is_err());
    }

    #[tokio::test]
    async fn lifecycle_transitions_are_conditional() {
        use LifecycleState::*;
        let (_d, store) = crate::store::tests::temp_store().await;
        store.migrate(&[MIGRATIONS]).await.unwrap();
        assert_eq!(lifecycle_state(&store, "demo-proj").await.unwrap(), None);
        project_number(&store, "demo-proj").await.unwrap();
        assert_eq!(
            lifecycle_state(&store, "demo-proj").await.unwrap(),
            Some(Active)
        );
        assert!(
            set_lifecycle_state(&store, "demo-proj", Active, DeleteRequested)
                .await
                .unwrap()
        );
        // A second delete finds it no longer ACTIVE.
        assert!(
            !set_lifecycle_state(&store, "demo-proj", Active, DeleteRequested)
                .await
                .unwrap()
        );
        assert_eq!(
            lifecycle_state(&store, "demo-proj").await.unwrap(),
            Some(DeleteRequested)
        );
        // Other projects are untouched.
        project_number(&store, "other-proj").await.unwrap();
        assert_eq!(
            lifecycle_state(&store, "other-proj").await.unwrap(),
            Some(Active)
        );
        assert!(
            set_lifecycle_state(&store, "demo-proj", DeleteRequested, Active)
                .await
                .unwrap()
        );
        assert_eq!(
            lifecycle_state(&store, "demo-proj").await.unwrap(),
            Some(Active)
        );
        assert!(create_time(&store, "demo-proj").await.unwrap().is_some());
    }
}
