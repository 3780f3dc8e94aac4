//! Project IAM policies (Resource Manager), stored as JSON documents with their etag.
//!
//! Layer rule: SQL only; the policy model (parsing, normalising, granting) lives in
//! `crate::authz`, so this module sees a policy as opaque text.

use crate::store::{now_rfc3339, Migration, Store, StoreError};

pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "rm_0001",
    sql: &["CREATE TABLE IF NOT EXISTS rm_project_policies (\
            project_id TEXT PRIMARY KEY, \
            policy TEXT NOT NULL, \
            etag TEXT NOT NULL, \
            update_time TEXT NOT NULL)"],
}];

/// A stored policy: its JSON document (without etag) and its etag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    pub document: String,
    pub etag: String,
}

/// When a write may happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteCondition<'a> {
    /// Overwrite whatever is there.
    Always,
    /// Only if the project has no policy yet.
    Absent,
    /// Only if the stored etag is exactly this one.
    EtagIs(&'a str),
}

/// The stored policy of a project; `None` if never set.
pub async fn load(store: &Store, project_id: &str) -> Result<Option<StoredPolicy>, StoreError> {
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT policy, etag FROM rm_project_policies WHERE project_id = $1")
            .bind(project_id)
            .fetch_optional(store.pool())
            .await?;
    Ok(row.map(|(document, etag)| StoredPolicy { document, etag }))
}

/// Writes `policy` under `condition`; `false` when the condition did not hold. The compare and
/// the write are one SQL statement, so two writers racing with the same etag cannot both win.
pub async fn put(
    store: &Store,
    project_id: &str,
    policy: &StoredPolicy,
    condition: WriteCondition<'_>,
) -> Result<bool, StoreError> {
    let now = now_rfc3339();
    let affected = match condition {
        WriteCondition::Always | WriteCondition::Absent => {
            // The two differ only in what a row already there means: replace it, or refuse.
            let on_conflict = if matches!(condition, WriteCondition::Always) {
                "DO UPDATE SET policy = excluded.policy, etag = excluded.etag, \
                 update_time = excluded.update_time"
            } else {
                "DO NOTHING"
            };
            sqlx::query(&format!(
                "INSERT INTO rm_project_policies (project_id, policy, etag, update_time) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (project_id) {on_conflict}"
            ))
            .bind(project_id)
            .bind(&policy.document)
            .bind(&policy.etag)
            .bind(&now)
            .execute(store.pool())
            .await?
            .rows_affected()
        }
        WriteCondition::EtagIs(expected) => sqlx::query(
            "UPDATE rm_project_policies SET policy = $1, etag = $2, update_time = $3 \
             WHERE project_id = $4 AND etag = $5",
        )
        .bind(&policy.document)
        .bind(&policy.etag)
        .bind(&now)
        .bind(project_id)
        .bind(expected)
        .execute(store.pool())
        .await?
        .rows_affected(),
    };
    Ok(affected > 0)
}
