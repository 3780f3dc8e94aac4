//! `services/{svc}:allocateQuota`: resolve the consumer, plan counters from the config's limits
//! and the request's costs, apply them on the counter backend, and describe what happened.

use std::collections::BTreeMap;

use portico_servicecontrol::{
    AllocateQuotaRequest, AllocateQuotaResponse, MetricValue, MetricValueSet, QuotaError,
};

use crate::app::AppState;
use crate::error::ApiError;

use super::consumer::{self, Active};
use super::quota::{self, PlanError, QuotaMode};
use super::ScState;

/// Per-metric units consumed, as Google reports them.
pub const QUOTA_USED_METRIC: &str = "serviceruntime.googleapis.com/api/consumer/quota_used_count";
pub const QUOTA_NAME_LABEL: &str = "/quota_name";

fn quota_err(code: &str, subject: String, description: String) -> QuotaError {
    QuotaError {
        code: code.to_string(),
        subject,
        description,
    }
}

/// The cost per metric: the sum of the set's `int64Value`s (the proxy sends one per metric).
fn costs(req: &AllocateQuotaRequest) -> Result<BTreeMap<String, i64>, ApiError> {
    let mut out = BTreeMap::new();
    for set in &req.allocate_operation.quota_metrics {
        if set.metric_name.is_empty() {
            return Err(ApiError::invalid_argument(
                "allocate_operation.quota_metrics[].metric_name is required.",
            ));
        }
        let mut total = 0i64;
        for v in &set.metric_values {
            let Some(c) = v.int64_value else {
                return Err(ApiError::invalid_argument(format!(
                    "Quota metric '{}' needs an int64Value cost.",
                    set.metric_name
                )));
            };
            total = total.saturating_add(c);
        }
        *out.entry(set.metric_name.clone()).or_insert(0) += total;
    }
    Ok(out)
}

pub async fn allocate(
    state: &AppState,
    sc: &ScState,
    service: &str,
    producer: &str,
    active: &Active,
    req: AllocateQuotaRequest,
) -> Result<AllocateQuotaResponse, ApiError> {
    let op = &req.allocate_operation;
    let mode = QuotaMode::parse(&op.quota_mode).ok_or_else(|| {
        ApiError::invalid_argument(format!(
            "Invalid quota_mode '{}': expected NORMAL, BEST_EFFORT or CHECK_ONLY.",
            op.quota_mode
        ))
    })?;
    if op.consumer_id.is_empty() {
        return Err(ApiError::invalid_argument(
            "allocate_operation.consumer_id is required.",
        ));
    }
    let costs = costs(&req)?;
    let config_id = active.config_id_for(&req.service_config_id);
    let mut resp = AllocateQuotaResponse {
        operation_id: op.operation_id.clone(),
        service_config_id: config_id.clone(),
        service_rollout_id: active.rollout_id.clone(),
        ..Default::default()
    };
    let consumer = match consumer::resolve(state, &op.consumer_id, producer).await? {
        Ok(c) => c,
        Err(problem) => {
            resp.allocate_errors.push(problem.refusal().into());
            return Ok(resp);
        }
    };
    // Same rules as `:check` (see check.rs for why expiry uses the wall clock).
    if let Some(refusal) = consumer.lapsed(time::OffsetDateTime::now_utc()) {
        resp.allocate_errors.push(refusal.into());
        return Ok(resp);
    }
    let Some(config) = consumer::config(state, sc, service, &config_id).await? else {
        return Err(ApiError::not_found(format!(
            "Service configuration '{config_id}' of service '{service}' not found."
        )));
    };
    let label = consumer.label();
    let now = sc.clock.now_ms();
    let specs = quota::plan(&config, &label, &costs, now).map_err(|e| match e {
        PlanError::NegativeCost { .. } | PlanError::MissingCost(_) => {
            ApiError::invalid_argument(e.to_string())
        }
        PlanError::BadLimit { .. } => ApiError::failed_precondition(e.to_string()),
    })?;
    let grants = sc.counters.allocate(mode, &specs, now).await.map_err(|e| {
        tracing::error!(error = %e, service, "quota backend failed");
        ApiError::unavailable("Quota backend unavailable; retry the allocation.")
    })?;
    let mut used: BTreeMap<&str, i64> = BTreeMap::new();
    for (spec, g) in specs.iter().zip(&grants) {
        // A metric limited twice (per minute and per day) consumed the smaller grant.
        let e = used.entry(spec.metric.as_str()).or_insert(g.granted);
        *e = (*e).min(g.granted);
        if !g.fits {
            resp.allocate_errors.push(quota_err(
                "RESOURCE_EXHAUSTED",
                label.clone(),
                quota::exhausted_description(spec, &label),
            ));
        }
    }
    if mode != QuotaMode::CheckOnly {
        resp.quota_metrics = used
            .into_iter()
            .map(|(metric, granted)| MetricValueSet {
                metric_name: QUOTA_USED_METRIC.into(),
                metric_values: vec![MetricValue {
                    labels: [(QUOTA_NAME_LABEL.to_string(), metric.to_string())]
                        .into_iter()
                        .collect(),
                    int64_value: Some(granted),
                    ..Default::default()
                }],
            })
            .collect();
    }
    Ok(resp)
}
