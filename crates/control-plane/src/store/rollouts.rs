//! The `sm_rollouts` table: each managed service's rollouts, as JSON documents numbered
//! newest-last by `seq` (the table is created by [`super::services::MIGRATIONS`]). Rollouts
//! take effect at once, so every stored rollout is `SUCCESS`.
//!
//! Layer rule: storage only; imports nothing above `store`.

use serde_json::Value;
use sqlx::AnyConnection;

use super::operations::decode_json;
use super::{now_rfc3339, Store, StoreError};

/// Stores a rollout document under `id`; false if the service already has a rollout `id`.
pub async fn insert(
    conn: &mut AnyConnection,
    service: &str,
    id: &str,
    body: &str,
) -> Result<bool, StoreError> {
    let (seq,): (i64,) =
        sqlx::query_as("SELECT COALESCE(MAX(seq), 0) + 1 FROM sm_rollouts WHERE service_name = $1")
            .bind(service)
            .fetch_one(&mut *conn)
            .await?;
    let inserted = sqlx::query(
        "INSERT INTO sm_rollouts (service_name, rollout_id, seq, status, body, create_time) \
         VALUES ($1, $2, $3, 'SUCCESS', $4, $5) ON CONFLICT (service_name, rollout_id) DO NOTHING",
    )
    .bind(service)
    .bind(id)
    .bind(seq)
    .bind(body)
    .bind(now_rfc3339())
    .execute(&mut *conn)
    .await?;
    Ok(inserted.rows_affected() != 0)
}

/// The newest rollout that split traffic (rather than delete the service).
pub async fn latest_traffic_split(
    conn: &mut AnyConnection,
    service: &str,
) -> Result<Option<Value>, StoreError> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT body FROM sm_rollouts WHERE service_name = $1 AND body LIKE '%trafficPercentStrategy%' \
         ORDER BY seq DESC LIMIT 1",
    )
    .bind(service)
    .fetch_optional(conn)
    .await?;
    row.map(|(b,)| decode_json(&b)).transpose()
}

/// The id of the newest SUCCESS rollout (Service Control piggybacks it as `serviceRolloutId`).
pub async fn latest_success_id(store: &Store, service: &str) -> Result<Option<String>, StoreError> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT rollout_id FROM sm_rollouts WHERE service_name = $1 AND status = 'SUCCESS' \
         ORDER BY seq DESC LIMIT 1",
    )
    .bind(service)
    .fetch_optional(store.pool())
    .await?;
    Ok(row.map(|(r,)| r))
}

/// Up to `limit` rollouts newest first from `offset`, only those in `statuses` when given.
/// Proxies poll this with a page size of 1, so paging happens in SQL.
pub async fn list(
    store: &Store,
    service: &str,
    statuses: Option<&[String]>,
    limit: i64,
    offset: i64,
) -> Result<Vec<Value>, StoreError> {
    let statuses = statuses.unwrap_or_default();
    let status_clause = if statuses.is_empty() {
        String::new()
    } else {
        let marks: Vec<String> = (0..statuses.len()).map(|i| format!("${}", i + 4)).collect();
        format!(" AND status IN ({})", marks.join(", "))
    };
    let sql = format!(
        "SELECT body FROM sm_rollouts WHERE service_name = $1{status_clause} \
         ORDER BY seq DESC LIMIT $2 OFFSET $3"
    );
    let mut q = sqlx::query_as::<_, (String,)>(&sql)
        .bind(service)
        .bind(limit)
        .bind(offset);
    for s in statuses {
        q = q.bind(s);
    }
    let rows: Vec<(String,)> = q.fetch_all(store.pool()).await?;
    rows.iter().map(|(b,)| decode_json(b)).collect()
}

/// One rollout by id.
pub async fn get(store: &Store, service: &str, id: &str) -> Result<Option<Value>, StoreError> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT body FROM sm_rollouts WHERE service_name = $1 AND rollout_id = $2")
            .bind(service)
            .bind(id)
            .fetch_optional(store.pool())
            .await?;
    row.map(|(b,)| decode_json(&b)).transpose()
}
