//! The reads Service Control makes of tables other APIs own: projects (consumer resolution),
//! Service Management's rollouts and configs (what a service serves). Read-only, and none of
//! them creates anything: a check must not invent a project.

use crate::store::{Store, StoreError};

/// The number of the project with id `id`, if it exists.
pub async fn project_number_by_id(store: &Store, id: &str) -> Result<Option<i64>, StoreError> {
    let row: Option<(i64,)> =
        sqlx::query_as("SELECT project_number FROM projects WHERE project_id = $1")
            .bind(id)
            .fetch_optional(store.pool())
            .await?;
    Ok(row.map(|r| r.0))
}

/// The id of the project numbered `n`, if it exists.
pub async fn project_id_by_number(store: &Store, n: i64) -> Result<Option<String>, StoreError> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT project_id FROM projects WHERE project_number = $1")
            .bind(n)
            .fetch_optional(store.pool())
            .await?;
    Ok(row.map(|r| r.0))
}

/// The service's newest successful rollout: its id and its stored JSON body.
pub async fn latest_successful_rollout(
    store: &Store,
    service: &str,
) -> Result<Option<(String, String)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT rollout_id, body FROM sm_rollouts WHERE service_name = $1 AND status = 'SUCCESS' \
         ORDER BY seq DESC LIMIT 1",
    )
    .bind(service)
    .fetch_optional(store.pool())
    .await?)
}

/// The id of the service's newest config.
pub async fn newest_config_id(store: &Store, service: &str) -> Result<Option<String>, StoreError> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT config_id FROM sm_configs WHERE service_name = $1 ORDER BY seq DESC LIMIT 1",
    )
    .bind(service)
    .fetch_optional(store.pool())
    .await?;
    Ok(row.map(|r| r.0))
}

/// A config's stored JSON body (the `google.api.Service`).
pub async fn config_body(
    store: &Store,
    service: &str,
    config_id: &str,
) -> Result<Option<String>, StoreError> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT body FROM sm_configs WHERE service_name = $1 AND config_id = $2")
            .bind(service)
            .bind(config_id)
            .fetch_optional(store.pool())
            .await?;
    Ok(row.map(|r| r.0))
}
