//! Implicit projects: a row per project id once something names it, with its stable random
//! number, its creation time and its lifecycle state.
//!
//! Layer rule: SQL only, `StoreError` only; id validation and "assign on first use" policy
//! live in `crate::projects`.

use crate::store::{now_rfc3339, Migration, Store, StoreError};

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
) -> Result<Option<LifecycleState>, StoreError> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT lifecycle_state FROM projects WHERE project_id = $1")
            .bind(project_id)
            .fetch_optional(store.pool())
            .await?;
    Ok(row.map(|(s,)| LifecycleState::from_stored(&s)))
}

/// Moves a project from `from` to `to`; `false` when it was not in `from` (the compare and the
/// write are one statement, so two racing deletes cannot both see `ACTIVE`). The project must
/// already exist (see `crate::projects::project_number`).
pub async fn set_lifecycle_state(
    store: &Store,
    project_id: &str,
    from: LifecycleState,
    to: LifecycleState,
) -> Result<bool, StoreError> {
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
pub async fn create_time(store: &Store, project_id: &str) -> Result<Option<String>, StoreError> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT create_time FROM projects WHERE project_id = $1")
            .bind(project_id)
            .fetch_optional(store.pool())
            .await?;
    Ok(row.map(|(t,)| t))
}

/// The number of a known project.
pub async fn number(store: &Store, project_id: &str) -> Result<Option<i64>, StoreError> {
    let row: Option<(i64,)> =
        sqlx::query_as("SELECT project_number FROM projects WHERE project_id = $1")
            .bind(project_id)
            .fetch_optional(store.pool())
            .await?;
    Ok(row.map(|(n,)| n))
}

/// Records `project_id` with `number` unless the id or the number is taken (then nothing
/// happens; the caller re-reads).
pub async fn insert_if_absent(
    store: &Store,
    project_id: &str,
    number: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO projects (project_id, project_number, create_time) VALUES ($1, $2, $3) \
         ON CONFLICT DO NOTHING",
    )
    .bind(project_id)
    .bind(number)
    .bind(now_rfc3339())
    .execute(store.pool())
    .await?;
    Ok(())
}

/// The id of the project with this number.
pub async fn id_for_number(store: &Store, number: i64) -> Result<Option<String>, StoreError> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT project_id FROM projects WHERE project_number = $1")
            .bind(number)
            .fetch_optional(store.pool())
            .await?;
    Ok(row.map(|(id,)| id))
}
