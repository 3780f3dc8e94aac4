//! Service Usage v1: which consumer projects have enabled which services.

use axum::Router;

use crate::error::ApiError;
use crate::store::{Migration, Store};

pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "su_0001",
    sql: &["CREATE TABLE IF NOT EXISTS su_enabled (\
            project_id TEXT NOT NULL, \
            service_name TEXT NOT NULL, \
            enable_time TEXT NOT NULL, \
            PRIMARY KEY (project_id, service_name))"],
}];

pub fn routes() -> Router<crate::server::AppState> {
    Router::new()
}

/// Whether `consumer_project_id` has enabled `service` (Service Control's consumer check).
pub async fn is_enabled(
    store: &Store,
    consumer_project_id: &str,
    service: &str,
) -> Result<bool, ApiError> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT service_name FROM su_enabled WHERE project_id = $1 AND service_name = $2",
    )
    .bind(consumer_project_id)
    .bind(service)
    .fetch_optional(store.pool())
    .await?;
    Ok(row.is_some())
}
