//! Managed services: list, create, get, delete, undelete.
//!
//! Handlers only (see the parent module's layer rule); storage goes through `crate::store`.

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::rollouts::{self, Strategy};
use super::{
    not_found_or_denied, operation, require_service_or_hide, Any, Empty, ManagedService,
    ServiceConfigTitle,
};
use crate::app::{page_token, AppState, JsonBody, Params};
use crate::authz::{
    perms, require_project_permission, require_service_permission, Policy, Principal,
};
use crate::error::ApiError;
use crate::store::operations::{self as ops_store, Operation};
use crate::store::services::{self as services_store, Counter, Inserted};
use crate::store::{configs as configs_store, rollouts as rollouts_store, usage as usage_store};

const TYPE_MANAGED_SERVICE: &str =
    "type.googleapis.com/google.api.servicemanagement.v1.ManagedService";
const TYPE_UNDELETE_RESPONSE: &str =
    "type.googleapis.com/google.api.servicemanagement.v1.UndeleteServiceResponse";
const TYPE_EMPTY: &str = "type.googleapis.com/google.protobuf.Empty";

/// Service names are DNS names; `*.cloud.goog` names must belong to the producer project
/// (`<api>.endpoints.<project>.cloud.goog`), as Google enforces.
fn validate_service_name(name: &str, producer: &str) -> Result<(), ApiError> {
    let labels_ok = name.len() <= 253
        && name.contains('.')
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        });
    if !labels_ok {
        return Err(ApiError::invalid_argument(format!(
            "Invalid service name '{name}': expected a DNS name of lower-case letters, digits, \
             hyphens and dots, e.g. my-api.endpoints.{producer}.cloud.goog."
        ))
        .with_field_violation("serviceName", "must be a DNS name"));
    }
    if name.ends_with(".cloud.goog")
        && !name.ends_with(&format!(".endpoints.{producer}.cloud.goog"))
    {
        return Err(ApiError::invalid_argument(format!(
            "Service name '{name}' cannot be used by project '{producer}': cloud.goog names must \
             have the form <api>.endpoints.{producer}.cloud.goog."
        )));
    }
    Ok(())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ListServicesResponse {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    services: Vec<ManagedService>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_page_token: Option<String>,
}

pub(super) async fn list_services(
    State(state): State<AppState>,
    principal: Principal,
    params: Params,
) -> Result<Json<ListServicesResponse>, ApiError> {
    let (limit, offset) = params.page(500, 2000)?;
    let producer = params.get("producerProjectId");
    if let Some(p) = producer {
        crate::projects::validate_project_id(p)?;
    }
    // consumerId (`project:<id>`) lists services the consumer enabled.
    let consumer = match params.get("consumerId") {
        Some(c) => Some(c.strip_prefix("project:").ok_or_else(|| {
            ApiError::invalid_argument(format!(
                "Invalid consumerId '{c}': expected project:<project id>."
            ))
        })?),
        None => None,
    };
    let mut visible = Vec::new();
    for row in services_store::list_live(&state.store, producer).await? {
        if let Some(c) = consumer {
            if !usage_store::is_enabled(&state.store, c, &row.name).await? {
                continue;
            }
        }
        let allowed = match principal.member() {
            None => true,
            Some(m) => {
                serde_json::from_str::<Policy>(&row.policy)?.grants(&m, perms::SERVICES_GET)
                    || require_service_permission(
                        &state,
                        &principal,
                        &row.name,
                        perms::SERVICES_GET,
                    )
                    .await
                    .is_ok()
            }
        };
        if allowed {
            visible.push(row);
        }
    }
    let total = visible.len() as i64;
    let mut services = Vec::new();
    for row in visible
        .into_iter()
        .skip(offset as usize)
        .take(limit as usize)
    {
        let mut ms = ManagedService::new(&row.name, &row.producer_project_id);
        // gcloud's table shows serviceConfig.title in its TITLE column.
        if let Some(title) = configs_store::latest_title(&state.store, &row.name).await? {
            ms.service_config = Some(ServiceConfigTitle {
                name: row.name,
                title,
            });
        }
        services.push(ms);
    }
    Ok(Json(ListServicesResponse {
        services,
        next_page_token: (offset + limit < total).then(|| page_token(offset + limit)),
    }))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub(super) struct CreateServiceBody {
    service_name: String,
    producer_project_id: String,
}

pub(super) async fn create_service(
    State(state): State<AppState>,
    principal: Principal,
    JsonBody(body): JsonBody<CreateServiceBody>,
) -> Result<Json<Operation>, ApiError> {
    if body.service_name.is_empty() {
        return Err(ApiError::invalid_argument("serviceName is required.")
            .with_field_violation("serviceName", "required"));
    }
    if body.producer_project_id.is_empty() {
        return Err(ApiError::invalid_argument("producerProjectId is required.")
            .with_field_violation("producerProjectId", "required"));
    }
    let name = body.service_name;
    let producer = body.producer_project_id;
    crate::projects::validate_project_id(&producer)?;
    validate_service_name(&name, &producer)?;
    require_project_permission(&state, &principal, &producer, perms::SERVICES_CREATE).await?;
    crate::projects::project_number(&state.store, &producer).await?;

    let policy = serde_json::to_string(&Policy::default().normalized_for_store()?)?;
    let mut tx = state.store.begin_write().await?;
    if let Inserted::Exists { deleted } =
        services_store::insert(&mut tx, &name, &producer, &policy).await?
    {
        return Err(if deleted {
            ApiError::failed_precondition(format!(
                "Service '{name}' was deleted; undelete it (gcloud endpoints services undelete) \
                 or choose another name."
            ))
        } else {
            ApiError::already_exists(format!("Service '{name}' already exists."))
        });
    }
    let op = operation(
        format!("operations/services.{name}-0"),
        format!("services/{name}"),
        Any::new(TYPE_MANAGED_SERVICE, ManagedService::new(&name, &producer)),
    )?;
    ops_store::insert(&mut tx, &op).await?;
    tx.commit().await?;
    tracing::info!(service = %name, producer = %producer, "service created");
    Ok(Json(op))
}

pub(super) async fn get_service(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
) -> Result<Json<ManagedService>, ApiError> {
    require_service_or_hide(&state, &principal, &service, perms::SERVICES_GET).await?;
    match services_store::producer_project(&state.store, &service).await? {
        Some(p) => Ok(Json(ManagedService::new(&service, &p))),
        None => Err(not_found_or_denied(&service)),
    }
}

pub(super) async fn delete_service(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
) -> Result<Json<Operation>, ApiError> {
    require_service_or_hide(&state, &principal, &service, perms::SERVICES_DELETE).await?;
    let mut tx = state.store.begin_write().await?;
    if !services_store::set_deleted(&mut tx, &service, true).await? {
        return Err(not_found_or_denied(&service));
    }
    let n = services_store::next_operation_number(&mut tx, &service).await?;
    // Google records the deletion as a rollout with a deleteServiceStrategy. The row was just
    // marked deleted, so its id is taken without the liveness condition.
    let rollout_id = services_store::next_id(&mut tx, &service, Counter::Rollout, false)
        .await?
        .ok_or_else(|| not_found_or_denied(&service))?;
    rollouts::record(
        &mut tx,
        &service,
        &rollout_id,
        Strategy::DeleteService,
        &principal,
    )
    .await?;
    let op = operation(
        format!("operations/services.{service}-{n}"),
        format!("services/{service}"),
        Any::new(TYPE_EMPTY, Empty {}),
    )?;
    ops_store::insert(&mut tx, &op).await?;
    tx.commit().await?;
    tracing::info!(service = %service, "service deleted");
    Ok(Json(op))
}

#[derive(Serialize)]
struct UndeleteServiceResponse {
    service: ManagedService,
}

pub(super) async fn undelete(
    state: &AppState,
    principal: &Principal,
    service: &str,
) -> Result<Operation, ApiError> {
    let Some((producer, deleted)) =
        services_store::producer_and_deleted(&state.store, service).await?
    else {
        return Err(not_found_or_denied(service));
    };
    require_project_permission(state, principal, &producer, perms::SERVICES_DELETE)
        .await
        .map_err(|_| not_found_or_denied(service))?;
    if !deleted {
        return Err(ApiError::failed_precondition(format!(
            "Service '{service}' is not deleted."
        )));
    }
    let mut tx = state.store.begin_write().await?;
    if !services_store::set_deleted(&mut tx, service, false).await? {
        return Err(ApiError::aborted(format!(
            "Service '{service}' was changed concurrently; retry."
        )));
    }
    let n = services_store::next_operation_number(&mut tx, service).await?;
    // The deletion left a deleteServiceStrategy rollout on top; proxies follow the newest
    // SUCCESS rollout, so put the last traffic split back in front of it.
    if let Some(prev) = rollouts_store::latest_traffic_split(&mut tx, service).await? {
        if let Some(strategy) = prev.get("trafficPercentStrategy") {
            let id = services_store::next_id(&mut tx, service, Counter::Rollout, true)
                .await?
                .ok_or_else(|| not_found_or_denied(service))?;
            rollouts::record(
                &mut tx,
                service,
                &id,
                Strategy::TrafficPercent(strategy.clone()),
                principal,
            )
            .await?;
        }
    }
    let op = operation(
        format!("operations/services.{service}-{n}"),
        format!("services/{service}"),
        Any::new(
            TYPE_UNDELETE_RESPONSE,
            UndeleteServiceResponse {
                service: ManagedService::new(service, &producer),
            },
        ),
    )?;
    ops_store::insert(&mut tx, &op).await?;
    tx.commit().await?;
    tracing::info!(service = %service, "service undeleted");
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        assert!(
            validate_service_name("echo-api.endpoints.demo-proj.cloud.goog", "demo-proj").is_ok()
        );
        assert!(validate_service_name("echo-api.endpoints.other.cloud.goog", "demo-proj").is_err());
        assert!(validate_service_name("Echo.example.com", "demo-proj").is_err());
        assert!(validate_service_name("noDots", "demo-proj").is_err());
        assert!(validate_service_name("api.example.com", "demo-proj").is_ok());
    }
}
