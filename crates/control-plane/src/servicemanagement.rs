//! Service Management v1: managed services, configs, rollouts, service IAM policies.

use axum::Router;

use crate::auth::Policy;
use crate::error::ApiError;
use crate::server::AppState;
use crate::store::Migration;

pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "sm_0001",
    sql: &[
        "CREATE TABLE IF NOT EXISTS sm_services (\
         service_name TEXT PRIMARY KEY, \
         producer_project_id TEXT NOT NULL, \
         deleted BIGINT NOT NULL, \
         op_counter BIGINT NOT NULL, \
         config_day TEXT NOT NULL, \
         config_next BIGINT NOT NULL, \
         rollout_day TEXT NOT NULL, \
         rollout_next BIGINT NOT NULL, \
         policy TEXT NOT NULL, \
         create_time TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS sm_configs (\
         service_name TEXT NOT NULL, \
         config_id TEXT NOT NULL, \
         seq BIGINT NOT NULL, \
         body TEXT NOT NULL, \
         create_time TEXT NOT NULL, \
         PRIMARY KEY (service_name, config_id))",
        "CREATE TABLE IF NOT EXISTS sm_rollouts (\
         service_name TEXT NOT NULL, \
         rollout_id TEXT NOT NULL, \
         seq BIGINT NOT NULL, \
         status TEXT NOT NULL, \
         body TEXT NOT NULL, \
         create_time TEXT NOT NULL, \
         PRIMARY KEY (service_name, rollout_id))",
    ],
}];

pub fn routes() -> Router<AppState> {
    Router::new()
}

/// The service's IAM policy and producer project, `None` if the service does not exist or is
/// deleted.
pub async fn policy_and_producer(
    state: &AppState,
    service_name: &str,
) -> Result<Option<(Policy, String)>, ApiError> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT policy, producer_project_id FROM sm_services \
         WHERE service_name = $1 AND deleted = 0",
    )
    .bind(service_name)
    .fetch_optional(state.store.pool())
    .await?;
    match row {
        Some((p, producer)) => Ok(Some((serde_json::from_str(&p)?, producer))),
        None => Ok(None),
    }
}
