//! Service Management v1: managed services, configs, rollouts, service IAM policies.
//!
//! Routes (prefix `/servicemanagement` optional, see `app`):
//! - `GET|POST /v1/services`, `GET|DELETE /v1/services/{s}`, `POST /v1/services/{s}:undelete`,
//!   `:getIamPolicy`, `:setIamPolicy`, `:testIamPermissions` (other verbs on that path go to
//!   `app::SERVICE_VERB_HANDLERS`, i.e. Service Control) — [`services`], [`policy`].
//! - `POST /v1/services/{s}/configs:submit` (OpenAPI sources → `google.api.Service` through
//!   `portico_config::openapi::convert`), `GET /v1/services/{s}/configs[/{id}]`, ESP's
//!   `GET /v1/services/{s}/config[?configId=]` — [`configs`].
//! - `GET|POST /v1/services/{s}/rollouts`, `GET /v1/services/{s}/rollouts/{id}` — [`rollouts`].
//! - `POST /v1/services:generateConfigReport` — [`report`].
//!
//! Known limits: only OpenAPI 2.0 sources are accepted (gRPC descriptor sets and service-config
//! YAML are refused with a clear INVALID_ARGUMENT); rollouts take effect at once (status
//! SUCCESS, no gradual traffic steps); `generateConfigReport` lists element-level changes but
//! never gives advice (no breaking-change analysis); service policies do not support conditions.
//!
//! Every change happens in one transaction together with its (already finished) operation, so a
//! failed request leaves nothing behind. Ids and the counters behind them are described in
//! [`crate::store::services`].
//!
//! Layer rule: handlers only. The SQL is in `store::{services, configs, rollouts, operations,
//! usage}`; this API imports no other API.

mod configs;
mod policy;
mod report;
mod rollouts;
mod services;

use axum::extract::{FromRequestParts, Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;

use crate::app::{parse_json_body, split_verb, AppState, MAX_BODY_BYTES, SERVICE_VERB_HANDLERS};
use crate::authz::{require_service_permission, Principal};
use crate::error::ApiError;
use crate::store::now_rfc3339;
use crate::store::operations::{Any, Empty, Operation};

pub use configs::{Conversions, CONVERSION_TIMEOUT};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/services",
            get(services::list_services).post(services::create_service),
        )
        .route(
            "/v1/services:generateConfigReport",
            post(report::generate_config_report),
        )
        .route(
            "/v1/services/{service}",
            get(services::get_service)
                .delete(services::delete_service)
                .post(service_verb),
        )
        .route("/v1/services/{service}/configs", get(configs::list_configs))
        .route(
            "/v1/services/{service}/configs:submit",
            post(configs::submit_config),
        )
        .route(
            "/v1/services/{service}/configs/{config_id}",
            get(configs::get_config),
        )
        .route(
            "/v1/services/{service}/config",
            get(configs::get_config_esp),
        )
        .route(
            "/v1/services/{service}/rollouts",
            get(rollouts::list_rollouts).post(rollouts::create_rollout),
        )
        .route(
            "/v1/services/{service}/rollouts/{rollout_id}",
            get(rollouts::get_rollout),
        )
}

/// `POST /v1/services/{service}:{verb}`: Service Management's own verbs, or a handler another
/// module registered in `SERVICE_VERB_HANDLERS` (Service Control's `:check`, `:report`, ...).
async fn service_verb(
    State(state): State<AppState>,
    Path(segment): Path<String>,
    req: Request,
) -> Response {
    let (service, verb) = split_verb(&segment);
    let (service, verb) = (service.to_string(), verb.map(str::to_string));
    let Some(verb) = verb else {
        return ApiError::not_found(format!(
            "No POST method on services/{service}; expected services/{service}:<verb>."
        ))
        .into_response();
    };
    if let Some((_, h)) = SERVICE_VERB_HANDLERS.iter().find(|(v, _)| *v == verb) {
        return h(state, service, req).await;
    }
    match own_verb(state, service, &verb, req).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn own_verb(
    state: AppState,
    service: String,
    verb: &str,
    req: Request,
) -> Result<Value, ApiError> {
    let (mut parts, body) = req.into_parts();
    let principal = Principal::from_request_parts(&mut parts, &state).await?;
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| ApiError::invalid_argument(format!("Cannot read request body: {e}")))?;
    match verb {
        "undelete" => to_json(services::undelete(&state, &principal, &service).await?),
        "getIamPolicy" => to_json(policy::get_iam_policy(&state, &principal, &service).await?),
        "setIamPolicy" => to_json(
            policy::set_iam_policy(&state, &principal, &service, parse_json_body(&bytes)?).await?,
        ),
        "testIamPermissions" => to_json(
            policy::test_iam_permissions(&state, &principal, &service, parse_json_body(&bytes)?)
                .await?,
        ),
        other => Err(ApiError::not_found(format!(
            "Unknown method services.{other} on service '{service}'."
        ))),
    }
}

fn to_json(v: impl Serialize) -> Result<Value, ApiError> {
    Ok(serde_json::to_value(v)?)
}

// ---------------------------------------------------------------------------------------------
// Lookups other modules ask (authz, Service Control); the SQL is in `store::services`.

// ---------------------------------------------------------------------------------------------
// Shared by the handlers of this API

fn not_found_or_denied(service: &str) -> ApiError {
    ApiError::permission_denied(format!(
        "Service '{service}' not found or permission denied."
    ))
}

/// Checks `permission` on `service`, answering any failure with the same message whether the
/// service is missing or the caller lacks the right, so names of others' services do not leak.
async fn require_service_or_hide(
    state: &AppState,
    principal: &Principal,
    service: &str,
    permission: &str,
) -> Result<(), ApiError> {
    require_service_permission(state, principal, service, permission)
        .await
        .map_err(|_| not_found_or_denied(service))
}

/// `google.api.servicemanagement.v1.ManagedService`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ManagedService {
    service_name: String,
    producer_project_id: String,
    /// Only in listings, for gcloud's TITLE column.
    #[serde(skip_serializing_if = "Option::is_none")]
    service_config: Option<ServiceConfigTitle>,
}

impl ManagedService {
    fn new(name: &str, producer: &str) -> Self {
        ManagedService {
            service_name: name.to_string(),
            producer_project_id: producer.to_string(),
            service_config: None,
        }
    }
}

#[derive(Serialize)]
struct ServiceConfigTitle {
    name: String,
    title: String,
}

/// `google.api.servicemanagement.v1.OperationMetadata` of a finished operation.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OperationMetadata {
    #[serde(rename = "@type")]
    type_url: &'static str,
    resource_names: Vec<String>,
    start_time: String,
    progress_percentage: u32,
}

/// A finished Service Management operation on `resource` that answered `response`.
fn operation(
    name: String,
    resource: String,
    response: impl Serialize,
) -> Result<Operation, ApiError> {
    let metadata = OperationMetadata {
        type_url: "type.googleapis.com/google.api.servicemanagement.v1.OperationMetadata",
        resource_names: vec![resource],
        start_time: now_rfc3339(),
        progress_percentage: 100,
    };
    Ok(Operation::done(
        name,
        serde_json::to_value(metadata)?,
        serde_json::to_value(response)?,
    ))
}
