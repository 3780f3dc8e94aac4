//! Rollouts: create, list, get; and the rollout records a deletion and an undeletion leave.
//!
//! Handlers only (see the parent module's layer rule); storage goes through `crate::store`.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{not_found_or_denied, operation, require_service_or_hide, Any};
use crate::app::{page_token, AppState, JsonBody, Params};
use crate::authz::{perms, Principal};
use crate::error::ApiError;
use crate::store::now_rfc3339;
use crate::store::operations::{self as ops_store, Connection, Operation};
use crate::store::services::{self as services_store, Counter};
use crate::store::{configs as configs_store, rollouts as rollouts_store};

const TYPE_ROLLOUT: &str = "type.googleapis.com/google.api.servicemanagement.v1.Rollout";

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub(super) struct RolloutBody {
    rollout_id: String,
    traffic_percent_strategy: Option<TrafficPercentStrategy>,
    delete_service_strategy: Option<Value>,
}

#[derive(Deserialize, Serialize, Default)]
#[serde(default)]
struct TrafficPercentStrategy {
    percentages: BTreeMap<String, f64>,
}

/// What a rollout does.
pub(super) enum Strategy {
    /// A `trafficPercentStrategy` object.
    TrafficPercent(Value),
    DeleteService,
}

/// `google.api.servicemanagement.v1.Rollout`, as stored and answered.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Rollout {
    rollout_id: String,
    create_time: String,
    created_by: String,
    status: &'static str,
    service_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    traffic_percent_strategy: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delete_service_strategy: Option<Value>,
}

/// Stores a finished (SUCCESS) rollout `id` and returns it.
pub(super) async fn record(
    conn: &mut Connection,
    service: &str,
    id: &str,
    strategy: Strategy,
    principal: &Principal,
) -> Result<Rollout, ApiError> {
    let (traffic_percent_strategy, delete_service_strategy) = match strategy {
        Strategy::TrafficPercent(s) => (Some(s), None),
        Strategy::DeleteService => (None, Some(json!({}))),
    };
    let rollout = Rollout {
        rollout_id: id.to_string(),
        create_time: now_rfc3339(),
        created_by: principal.display(),
        status: "SUCCESS",
        service_name: service.to_string(),
        traffic_percent_strategy,
        delete_service_strategy,
    };
    let body = serde_json::to_string(&rollout)?;
    if !rollouts_store::insert(conn, service, id, &body).await? {
        return Err(ApiError::already_exists(format!(
            "Rollout '{id}' already exists for service '{service}'."
        )));
    }
    Ok(rollout)
}

pub(super) async fn create_rollout(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
    JsonBody(body): JsonBody<RolloutBody>,
) -> Result<Json<Operation>, ApiError> {
    require_service_or_hide(&state, &principal, &service, perms::SERVICES_UPDATE).await?;
    if body.delete_service_strategy.is_some() {
        return Err(ApiError::invalid_argument(
            "Use DELETE /v1/services/{service} to delete a service; deleteServiceStrategy \
             rollouts are recorded by the deletion.",
        ));
    }
    let Some(strategy) = body.traffic_percent_strategy else {
        return Err(
            ApiError::invalid_argument("trafficPercentStrategy is required.")
                .with_field_violation("trafficPercentStrategy", "required"),
        );
    };
    if strategy.percentages.is_empty() {
        return Err(ApiError::invalid_argument(
            "trafficPercentStrategy.percentages must name at least one config.",
        ));
    }
    let total: f64 = strategy.percentages.values().sum();
    if strategy
        .percentages
        .values()
        .any(|p| !(0.0..=100.0).contains(p))
        || (total - 100.0).abs() > 1e-6
    {
        return Err(ApiError::invalid_argument(format!(
            "trafficPercentStrategy.percentages must be between 0 and 100 and add up to 100 \
             (they add up to {total})."
        )));
    }
    if !body.rollout_id.is_empty() {
        let ok = body.rollout_id.len() <= 63
            && body.rollout_id.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            });
        if !ok {
            return Err(ApiError::invalid_argument(format!(
                "Invalid rolloutId '{}': at most 63 lower-case letters, digits, '.', '_' or '-'.",
                body.rollout_id
            )));
        }
    }
    let mut tx = state.store.begin_write().await?;
    // The counter bump comes first: it locks the service row before the config reads.
    let generated = services_store::next_id(&mut tx, &service, Counter::Rollout, true)
        .await?
        .ok_or_else(|| not_found_or_denied(&service))?;
    for id in strategy.percentages.keys() {
        if !configs_store::exists(&mut tx, &service, id).await? {
            return Err(ApiError::invalid_argument(format!(
                "Service configuration '{id}' referenced by the rollout does not exist for \
                 service '{service}'."
            )));
        }
    }
    let id = if body.rollout_id.is_empty() {
        generated
    } else {
        body.rollout_id.clone()
    };
    let rollout = record(
        &mut tx,
        &service,
        &id,
        Strategy::TrafficPercent(serde_json::to_value(&strategy)?),
        &principal,
    )
    .await?;
    let op = operation(
        format!("operations/rollouts.{service}:{}", uuid::Uuid::new_v4()),
        format!("services/{service}/rollouts/{id}"),
        Any::new(TYPE_ROLLOUT, rollout),
    )?;
    ops_store::insert(&mut tx, &op).await?;
    tx.commit().await?;
    tracing::info!(service = %service, rollout_id = %id, "rollout created");
    Ok(Json(op))
}

/// Parses the rollout list `filter`: empty, `status=X`, `status = X` or `status in (X, Y)`.
fn parse_status_filter(filter: Option<&str>) -> Result<Option<Vec<String>>, ApiError> {
    const STATUSES: &[&str] = &[
        "IN_PROGRESS",
        "SUCCESS",
        "CANCELLED",
        "FAILED",
        "PENDING",
        "FAILED_ROLLED_BACK",
    ];
    let Some(f) = filter.map(str::trim).filter(|f| !f.is_empty()) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::invalid_argument(format!(
            "Invalid filter '{f}': expected status=<STATUS> or status in (<STATUS>, ...)."
        ))
    };
    let rest = f.strip_prefix("status").ok_or_else(bad)?.trim_start();
    let values: Vec<String> = if let Some(v) = rest.strip_prefix('=') {
        vec![v.trim().to_string()]
    } else if let Some(v) = rest.strip_prefix("in") {
        let v = v.trim();
        let inner = v
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or_else(bad)?;
        inner.split(',').map(|s| s.trim().to_string()).collect()
    } else {
        return Err(bad());
    };
    if values.is_empty() || values.iter().any(|v| !STATUSES.contains(&v.as_str())) {
        return Err(bad());
    }
    Ok(Some(values))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ListRolloutsResponse {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rollouts: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_page_token: Option<String>,
}

pub(super) async fn list_rollouts(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
    params: Params,
) -> Result<Json<ListRolloutsResponse>, ApiError> {
    require_service_or_hide(&state, &principal, &service, perms::SERVICES_GET).await?;
    let statuses = parse_status_filter(params.get("filter"))?;
    let (limit, offset) = params.page(50, 100)?;
    let mut rollouts = rollouts_store::list(
        &state.store,
        &service,
        statuses.as_deref(),
        limit + 1,
        offset,
    )
    .await?;
    let more = rollouts.len() as i64 > limit;
    rollouts.truncate(limit as usize);
    Ok(Json(ListRolloutsResponse {
        rollouts,
        next_page_token: more.then(|| page_token(offset + limit)),
    }))
}

pub(super) async fn get_rollout(
    State(state): State<AppState>,
    principal: Principal,
    Path((service, rollout_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    require_service_or_hide(&state, &principal, &service, perms::SERVICES_GET).await?;
    match rollouts_store::get(&state.store, &service, &rollout_id).await? {
        Some(r) => Ok(Json(r)),
        None => Err(ApiError::not_found(format!(
            "Rollout '{rollout_id}' not found for service '{service}'."
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_filters() {
        assert_eq!(parse_status_filter(None).unwrap(), None);
        assert_eq!(
            parse_status_filter(Some("status=SUCCESS")).unwrap(),
            Some(vec!["SUCCESS".into()])
        );
        assert_eq!(
            parse_status_filter(Some("status in (SUCCESS, IN_PROGRESS)")).unwrap(),
            Some(vec!["SUCCESS".into(), "IN_PROGRESS".into()])
        );
        assert!(parse_status_filter(Some("status=BOGUS")).is_err());
        assert!(parse_status_filter(Some("name=x")).is_err());
    }
}
