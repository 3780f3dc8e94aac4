//! Service Usage v1: which consumer projects have enabled which services.
//!
//! Routes (prefix `/serviceusage` optional):
//! - `POST /v1/projects/{p}/services/{s}:enable` / `:disable`, `GET /v1/projects/{p}/services/{s}`
//! - `POST /v1/projects/{p}/services:batchEnable` (`{"serviceIds": [...]}`)
//! - `GET /v1/projects/{p}/services[?filter=state:ENABLED|state:DISABLED]`
//!
//! `{p}` may be a project id or number. A service can be enabled if it is a live managed service
//! (consumers other than the producer need `servicemanagement.services.bind` on it) or one of
//! the platform APIs Portico implements or that Endpoints tutorials enable. Operations come back
//! already `done`, so gcloud does not poll them.
//!
//! Whether a consumer may call a service is [`crate::store::usage::is_enabled`]: Service Control
//! and Service Management's `consumerId` listing ask the store directly.
//!
//! Layer rule: handlers only; the SQL is in `store::{usage, services, configs, operations}`, and
//! no other API is imported.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::app::{page_token, split_verb, AppState, JsonBody, Params};
use crate::authz::{perms, require_project_permission, require_service_permission, Principal};
use crate::error::ApiError;
use crate::store::operations::{self as ops_store, Any, Empty, Operation};
use crate::store::{configs as configs_store, services as services_store, usage as usage_store};

/// Google platform APIs that may be enabled without being managed services here: the ones
/// Portico serves and the ones the Endpoints tutorials enable.
const PLATFORM_SERVICES: &[(&str, &str)] = &[
    ("servicemanagement.googleapis.com", "Service Management API"),
    ("servicecontrol.googleapis.com", "Service Control API"),
    ("serviceusage.googleapis.com", "Service Usage API"),
    ("endpoints.googleapis.com", "Cloud Endpoints"),
    (
        "iam.googleapis.com",
        "Identity and Access Management (IAM) API",
    ),
    (
        "iamcredentials.googleapis.com",
        "IAM Service Account Credentials API",
    ),
    (
        "cloudresourcemanager.googleapis.com",
        "Cloud Resource Manager API",
    ),
    ("apikeys.googleapis.com", "API Keys API"),
    ("cloudtrace.googleapis.com", "Cloud Trace API"),
    ("logging.googleapis.com", "Cloud Logging API"),
    ("monitoring.googleapis.com", "Cloud Monitoring API"),
];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/projects/{project}/services", get(list))
        .route(
            "/v1/projects/{project}/services:batchEnable",
            post(batch_enable),
        )
        .route(
            "/v1/projects/{project}/services/{service}",
            get(get_one).post(service_verb),
        )
}

/// The title shown for a service: a platform API's name, or the newest config's `title`.
async fn title_of(state: &AppState, service: &str) -> Result<Option<String>, ApiError> {
    if let Some((_, t)) = PLATFORM_SERVICES.iter().find(|(n, _)| *n == service) {
        return Ok(Some(t.to_string()));
    }
    Ok(configs_store::latest_title(&state.store, service).await?)
}

/// `google.api.serviceusage.v1.Service`.
#[derive(Serialize)]
struct ServiceState {
    name: String,
    config: ServiceConfig,
    state: &'static str,
    parent: String,
}

#[derive(Serialize)]
struct ServiceConfig {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<String>,
}

async fn service_state(
    state: &AppState,
    number: i64,
    service: &str,
    enabled: bool,
) -> Result<ServiceState, ApiError> {
    Ok(ServiceState {
        name: format!("projects/{number}/services/{service}"),
        config: ServiceConfig {
            name: service.to_string(),
            title: title_of(state, service).await?,
        },
        state: if enabled { "ENABLED" } else { "DISABLED" },
        parent: format!("projects/{number}"),
    })
}

/// Checks that `service` can be enabled by `principal` for `consumer`.
async fn check_enableable(
    state: &AppState,
    principal: &Principal,
    consumer: &str,
    service: &str,
) -> Result<(), ApiError> {
    if PLATFORM_SERVICES.iter().any(|(n, _)| *n == service) {
        return Ok(());
    }
    let denied = || {
        ApiError::permission_denied(format!(
            "Not found or permission denied for service(s): {service}."
        ))
    };
    let producer = services_store::producer_project(&state.store, service)
        .await?
        .ok_or_else(denied)?;
    if producer != consumer {
        require_service_permission(state, principal, service, perms::SERVICES_BIND)
            .await
            .map_err(|_| denied())?;
    }
    Ok(())
}

#[derive(Serialize)]
struct OneService {
    service: ServiceState,
}

#[derive(Serialize)]
struct ManyServices {
    services: Vec<ServiceState>,
}

/// A finished Service Usage operation for consumer project `number` that answered `response`.
fn operation(
    number: i64,
    type_url: &'static str,
    response: impl Serialize,
) -> Result<Operation, ApiError> {
    Ok(Operation::done(
        format!("operations/acat.p2-{number}-{}", uuid::Uuid::new_v4()),
        serde_json::to_value(Any::new(
            "type.googleapis.com/google.api.serviceusage.v1.OperationMetadata",
            Empty {},
        ))?,
        serde_json::to_value(Any::new(type_url, response))?,
    ))
}

async fn service_verb(
    State(state): State<AppState>,
    principal: Principal,
    Path((project, segment)): Path<(String, String)>,
) -> Result<Json<Operation>, ApiError> {
    let (service, verb) = split_verb(&segment);
    let consumer = crate::projects::project_id_for(&state.store, &project).await?;
    let number = crate::projects::project_number(&state.store, &consumer).await?;
    let enable = match verb {
        Some("enable") => true,
        Some("disable") => false,
        Some(other) => {
            return Err(ApiError::not_found(format!(
                "Unknown method services.{other}; expected :enable or :disable."
            )))
        }
        None => {
            return Err(ApiError::not_found(format!(
                "No POST method on projects/{project}/services/{service}; expected :enable or :disable."
            )))
        }
    };
    let (permission, response_type) = if enable {
        (
            perms::SERVICEUSAGE_ENABLE,
            "type.googleapis.com/google.api.serviceusage.v1.EnableServiceResponse",
        )
    } else {
        (
            perms::SERVICEUSAGE_DISABLE,
            "type.googleapis.com/google.api.serviceusage.v1.DisableServiceResponse",
        )
    };
    require_project_permission(&state, &principal, &consumer, permission).await?;
    if enable {
        check_enableable(&state, &principal, &consumer, service).await?;
    }
    let svc = service_state(&state, number, service, enable).await?;
    let mut tx = state.store.begin_write().await?;
    if enable {
        usage_store::enable(&mut tx, &consumer, service).await?;
    } else {
        usage_store::disable(&mut tx, &consumer, service).await?;
    }
    let op = operation(number, response_type, OneService { service: svc })?;
    ops_store::insert(&mut tx, &op).await?;
    tx.commit().await?;
    if enable {
        tracing::info!(consumer = %consumer, service = %service, "service enabled");
    } else {
        tracing::info!(consumer = %consumer, service = %service, "service disabled");
    }
    Ok(Json(op))
}

async fn get_one(
    State(state): State<AppState>,
    principal: Principal,
    Path((project, service)): Path<(String, String)>,
) -> Result<Json<ServiceState>, ApiError> {
    let consumer = crate::projects::project_id_for(&state.store, &project).await?;
    require_project_permission(&state, &principal, &consumer, perms::SERVICEUSAGE_LIST).await?;
    let number = crate::projects::project_number(&state.store, &consumer).await?;
    let enabled = usage_store::is_enabled(&state.store, &consumer, &service).await?;
    Ok(Json(
        service_state(&state, number, &service, enabled).await?,
    ))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct BatchEnableBody {
    service_ids: Vec<String>,
}

async fn batch_enable(
    State(state): State<AppState>,
    principal: Principal,
    Path(project): Path<String>,
    JsonBody(body): JsonBody<BatchEnableBody>,
) -> Result<Json<Operation>, ApiError> {
    if body.service_ids.is_empty() {
        return Err(ApiError::invalid_argument("serviceIds must not be empty.")
            .with_field_violation("serviceIds", "required"));
    }
    if body.service_ids.len() > 20 {
        return Err(ApiError::invalid_argument(
            "At most 20 services can be enabled per request.",
        ));
    }
    let consumer = crate::projects::project_id_for(&state.store, &project).await?;
    require_project_permission(&state, &principal, &consumer, perms::SERVICEUSAGE_ENABLE).await?;
    let number = crate::projects::project_number(&state.store, &consumer).await?;
    // All or nothing: validate every id before enabling any.
    let mut denied = Vec::new();
    for s in &body.service_ids {
        if check_enableable(&state, &principal, &consumer, s)
            .await
            .is_err()
        {
            denied.push(s.clone());
        }
    }
    if !denied.is_empty() {
        return Err(ApiError::permission_denied(format!(
            "Not found or permission denied for service(s): {}.",
            denied.join(", ")
        )));
    }
    let mut services = Vec::new();
    for s in &body.service_ids {
        services.push(service_state(&state, number, s, true).await?);
    }
    let mut tx = state.store.begin_write().await?;
    for s in &body.service_ids {
        usage_store::enable(&mut tx, &consumer, s).await?;
    }
    let op = operation(
        number,
        "type.googleapis.com/google.api.serviceusage.v1.BatchEnableServicesResponse",
        ManyServices { services },
    )?;
    ops_store::insert(&mut tx, &op).await?;
    tx.commit().await?;
    tracing::info!(consumer = %consumer, count = body.service_ids.len(), "services enabled");
    Ok(Json(op))
}

async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Path(project): Path<String>,
    params: Params,
) -> Result<Json<ListServicesResponse>, ApiError> {
    let consumer = crate::projects::project_id_for(&state.store, &project).await?;
    require_project_permission(&state, &principal, &consumer, perms::SERVICEUSAGE_LIST).await?;
    let number = crate::projects::project_number(&state.store, &consumer).await?;
    let (want_enabled, want_disabled) = match params.get("filter").map(|f| f.replace(' ', "")) {
        None => (true, true),
        Some(f) if f == "state:ENABLED" => (true, false),
        Some(f) if f == "state:DISABLED" => (false, true),
        Some(f) => {
            return Err(ApiError::invalid_argument(format!(
                "Invalid filter '{f}': expected state:ENABLED or state:DISABLED."
            )))
        }
    };
    let (limit, offset) = params.page(50, 200)?;
    let enabled = usage_store::enabled_services(&state.store, &consumer).await?;
    let mut names: Vec<(String, bool)> = Vec::new();
    if want_enabled {
        names.extend(enabled.iter().map(|s| (s.clone(), true)));
    }
    if want_disabled {
        // Disabled = what this project could enable: platform APIs and its own services.
        let own = services_store::list_live(&state.store, Some(&consumer)).await?;
        let candidates = PLATFORM_SERVICES
            .iter()
            .map(|(n, _)| n.to_string())
            .chain(own.into_iter().map(|s| s.name));
        for c in candidates {
            if !enabled.contains(&c) && !names.iter().any(|(n, _)| *n == c) {
                names.push((c, false));
            }
        }
    }
    names.sort();
    let total = names.len() as i64;
    let mut services = Vec::new();
    for (n, e) in names.into_iter().skip(offset as usize).take(limit as usize) {
        services.push(service_state(&state, number, &n, e).await?);
    }
    Ok(Json(ListServicesResponse {
        services,
        next_page_token: (offset + limit < total).then(|| page_token(offset + limit)),
    }))
}

/// `google.api.serviceusage.v1.ListServicesResponse`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListServicesResponse {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    services: Vec<ServiceState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_page_token: Option<String>,
}
