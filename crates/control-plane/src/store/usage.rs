//! The `su_enabled` table: which consumer projects have enabled which services.
//!
//! Layer rule: storage only; imports nothing above `store`.

use sqlx::AnyConnection;

use super::{now_rfc3339, Migration, Store, StoreError};

pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "su_0001",
    sql: &["CREATE TABLE IF NOT EXISTS su_enabled (\
            project_id TEXT NOT NULL, \
            service_name TEXT NOT NULL, \
            enable_time TEXT NOT NULL, \
            PRIMARY KEY (project_id, service_name))"],
}];

/// Whether `consumer_project_id` has enabled `service` (Service Control's consumer check, and
/// Service Management's `consumerId` listing).
pub async fn is_enabled(
    store: &Store,
    consumer_project_id: &str,
    service: &str,
) -> Result<bool, StoreError> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT service_name FROM su_enabled WHERE project_id = $1 AND service_name = $2",
    )
    .bind(consumer_project_id)
    .bind(service)
    .fetch_optional(store.pool())
    .await?;
    Ok(row.is_some())
}

/// Records `service` as enabled for `consumer`; enabling an already-enabled service keeps its
/// original enable time, so repeated enables are harmless.
pub async fn enable(
    conn: &mut AnyConnection,
    consumer: &str,
    service: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO su_enabled (project_id, service_name, enable_time) VALUES ($1, $2, $3) \
         ON CONFLICT (project_id, service_name) DO NOTHING",
    )
    .bind(consumer)
    .bind(service)
    .bind(now_rfc3339())
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn disable(
    conn: &mut AnyConnection,
    consumer: &str,
    service: &str,
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM su_enabled WHERE project_id = $1 AND service_name = $2")
        .bind(consumer)
        .bind(service)
        .execute(conn)
        .await?;
    Ok(())
}

/// The services `consumer` has enabled, in name order.
pub async fn enabled_services(store: &Store, consumer: &str) -> Result<Vec<String>, StoreError> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT service_name FROM su_enabled WHERE project_id = $1 ORDER BY service_name",
    )
    .bind(consumer)
    .fetch_all(store.pool())
    .await?;
    Ok(rows.into_iter().map(|(s,)| s).collect())
}
