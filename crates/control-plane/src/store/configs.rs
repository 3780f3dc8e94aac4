//! The `sm_configs` table: the service configs submitted to each managed service, as JSON
//! documents numbered newest-last by `seq` (the table is created by
//! [`super::services::MIGRATIONS`]).
//!
//! Layer rule: storage only; imports nothing above `store`. A config is an open-ended
//! `google.api.Service` document, so it is stored and returned as JSON.

use std::future::Future;

use serde_json::Value;
use sqlx::AnyConnection;

use super::operations::{self, decode_json, Operation};
use super::services::{self, Counter};
use super::{now_rfc3339, Store, StoreError};

/// The newest config of a service (what ESP's `/config` without an id returns).
pub async fn latest(store: &Store, service: &str) -> Result<Option<Value>, StoreError> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT body FROM sm_configs WHERE service_name = $1 ORDER BY seq DESC LIMIT 1",
    )
    .bind(service)
    .fetch_optional(store.pool())
    .await?;
    row.map(|(b,)| decode_json(&b)).transpose()
}

/// The newest config's `title` (gcloud's TITLE column, Service Usage's service titles).
pub async fn latest_title(store: &Store, service: &str) -> Result<Option<String>, StoreError> {
    Ok(latest(store, service)
        .await?
        .and_then(|c| c.get("title").and_then(Value::as_str).map(str::to_string)))
}

/// One config by id.
pub async fn get(store: &Store, service: &str, id: &str) -> Result<Option<Value>, StoreError> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT body FROM sm_configs WHERE service_name = $1 AND config_id = $2")
            .bind(service)
            .bind(id)
            .fetch_optional(store.pool())
            .await?;
    row.map(|(b,)| decode_json(&b)).transpose()
}

/// Up to `limit` configs newest first from `offset`.
pub async fn list(
    store: &Store,
    service: &str,
    limit: i64,
    offset: i64,
) -> Result<Vec<Value>, StoreError> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT body FROM sm_configs WHERE service_name = $1 ORDER BY seq DESC LIMIT $2 OFFSET $3",
    )
    .bind(service)
    .bind(limit)
    .bind(offset)
    .fetch_all(store.pool())
    .await?;
    rows.iter().map(|(b,)| decode_json(b)).collect()
}

/// Whether config `id` exists (read inside a rollout's transaction).
pub async fn exists(conn: &mut AnyConnection, service: &str, id: &str) -> Result<bool, StoreError> {
    let found: Option<(String,)> = sqlx::query_as(
        "SELECT config_id FROM sm_configs WHERE service_name = $1 AND config_id = $2",
    )
    .bind(service)
    .bind(id)
    .fetch_optional(conn)
    .await?;
    Ok(found.is_some())
}

/// What a submitted config becomes once its id is known.
pub struct Rendered {
    /// The config document to store (JSON); ignored for a validation.
    pub config: String,
    /// The operation that answers the submission.
    pub operation: Operation,
}

/// Submits a config in one transaction: allocates its id, lets `render` turn the id into the
/// stored document and the answering operation, stores both and commits; returns the id and the operation. With `validate_only`
/// the id is only peeked at and only the operation is stored (gcloud polls it). `Ok(None)` if
/// the service is gone.
pub async fn submit<F, Fut, E>(
    store: &Store,
    service: &str,
    validate_only: bool,
    render: F,
) -> Result<Option<(String, Operation)>, E>
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Result<Rendered, E>>,
    E: From<StoreError>,
{
    let mut tx = store.begin_write().await?;
    let id = if validate_only {
        services::peek_config_id(store, service).await?
    } else {
        match services::next_id(&mut tx, service, Counter::Config, true).await? {
            Some(id) => id,
            None => return Ok(None),
        }
    };
    let rendered = render(id.clone()).await?;
    if !validate_only {
        let (seq,): (i64,) = sqlx::query_as(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM sm_configs WHERE service_name = $1",
        )
        .bind(service)
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        sqlx::query(
            "INSERT INTO sm_configs (service_name, config_id, seq, body, create_time) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(service)
        .bind(&id)
        .bind(seq)
        .bind(rendered.config)
        .bind(now_rfc3339())
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
    }
    operations::insert(&mut tx, &rendered.operation).await?;
    tx.commit().await?;
    Ok(Some((id, rendered.operation)))
}
