//! Long-running operations, one global table for every API.
//!
//! Portico finishes its work inside the request, so operations are stored already `done` with a
//! `response` (or an `error`). gcloud's servicemanagement client still polls once
//! (`GET /v1/operations/{id}`); serviceusage skips polling when the POST says `done`; apikeys polls
//! `GET /v2/operations/{id}`. Both paths read this table, so names must be unique across APIs —
//! each module uses Google's name format (`operations/serviceConfigs.<svc>:<uuid>`, ...).
//!
//! Write an operation in the same transaction as the change it describes ([`insert`] takes a
//! connection), so a failed change leaves no operation behind.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use sqlx::AnyConnection;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::server::AppState;
use crate::store::{now_rfc3339, Migration};

pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "ops_0001",
    sql: &["CREATE TABLE IF NOT EXISTS operations (\
            name TEXT PRIMARY KEY, \
            body TEXT NOT NULL, \
            create_time TEXT NOT NULL)"],
}];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/operations/{id}", get(get_operation))
        .route("/v2/operations/{id}", get(get_operation))
}

/// How an operation ended.
pub enum Outcome {
    Response(Value),
    Error(ApiError),
}

/// Builds and stores a finished operation; returns its JSON. `name` must start with
/// `operations/` and contain no further `/` (gcloud sends the id as one path segment).
pub async fn insert(
    conn: &mut AnyConnection,
    name: &str,
    metadata: Value,
    outcome: Outcome,
) -> Result<Value, ApiError> {
    let mut op = json!({"name": name});
    if !metadata.is_null() {
        op["metadata"] = metadata;
    }
    op["done"] = Value::Bool(true);
    match outcome {
        Outcome::Response(r) => op["response"] = r,
        Outcome::Error(e) => op["error"] = e.rpc_status(),
    }
    sqlx::query("INSERT INTO operations (name, body, create_time) VALUES ($1, $2, $3)")
        .bind(name)
        .bind(serde_json::to_string(&op)?)
        .bind(now_rfc3339())
        .execute(conn)
        .await?;
    Ok(op)
}

/// Servicemanagement's operation metadata.
pub fn sm_metadata(resource_names: &[String]) -> Value {
    json!({
        "@type": "type.googleapis.com/google.api.servicemanagement.v1.OperationMetadata",
        "resourceNames": resource_names,
        "startTime": now_rfc3339(),
        "progressPercentage": 100,
    })
}

/// Looks an operation up by `operations/<id>` or bare `<id>`.
pub async fn lookup(state: &AppState, id: &str) -> Result<Option<Value>, ApiError> {
    let name = if id.starts_with("operations/") {
        id.to_string()
    } else {
        format!("operations/{id}")
    };
    let row: Option<(String,)> = sqlx::query_as("SELECT body FROM operations WHERE name = $1")
        .bind(&name)
        .fetch_optional(state.store.pool())
        .await?;
    match row {
        Some((body,)) => Ok(Some(serde_json::from_str(&body)?)),
        None => Ok(None),
    }
}

async fn get_operation(
    State(state): State<AppState>,
    _principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match lookup(&state, &id).await? {
        Some(op) => Ok(Json(op)),
        None => Err(ApiError::not_found(format!(
            "Operation 'operations/{}' not found.",
            id.trim_start_matches("operations/")
        ))),
    }
}
