//! `services/{svc}:report`: resolve each operation's consumer (API keys become
//! `project_number:<n>`; key strings are never stored), extract rollups and logs, write the batch
//! in one transaction, then feed the committed deltas to the Prometheus counters.

use std::collections::HashMap;

use portico_servicecontrol::redact::SecretParams;
use portico_servicecontrol::{labels, ReportError, ReportRequest, ReportResponse, Status};

use crate::app::AppState;
use crate::error::{ApiError, Code};
use crate::store::servicecontrol::reports;

use super::consumer::{self, Active};
use super::report::{self, PreparedOp};
use super::ScState;

/// Largest batch accepted in one call; ESP sends at most 10 operations per request.
pub const MAX_OPERATIONS: usize = 1000;

/// The consumer a report is attributed to in rollups: resolved project number, the operation's
/// `consumer_project` label, or `unknown` (invalid key) / empty (no consumer).
async fn consumer_label(
    state: &AppState,
    producer: &str,
    consumer_id: &str,
    op_labels: &std::collections::BTreeMap<String, String>,
) -> Result<String, ApiError> {
    if consumer_id.is_empty() {
        return Ok(op_labels
            .get(labels::CONSUMER_PROJECT)
            .map(|p| format!("project:{p}"))
            .unwrap_or_default());
    }
    match consumer::resolve(state, consumer_id, producer).await {
        Ok(Ok(c)) => Ok(c.label()),
        Ok(Err(_)) => Ok("unknown".to_string()),
        // A malformed consumer id does not fail the batch; it is counted as unknown.
        Err(e) if e.code == Code::InvalidArgument => Ok("unknown".to_string()),
        Err(e) => Err(e),
    }
}

/// The query parameters masked in this service's stored logs: the defaults plus the names the
/// reporting proxy's config and the active config read credentials from. A config that cannot
/// be read leaves the others (and the defaults) in force rather than failing the report.
async fn secret_params(
    state: &AppState,
    sc: &ScState,
    service: &str,
    config_ids: [&str; 2],
) -> SecretParams {
    let mut secrets = SecretParams::default();
    for (i, id) in config_ids.iter().enumerate() {
        if id.is_empty() || config_ids[..i].contains(id) {
            continue;
        }
        match consumer::config(state, sc, service, id).await {
            Ok(Some(cfg)) => secrets.extend(&SecretParams::for_service(&cfg)),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                service,
                config_id = id,
                error = %e.message,
                "cannot read the config's API-key parameter names; masking the defaults"
            ),
        }
    }
    secrets
}

pub async fn report(
    state: &AppState,
    sc: &ScState,
    service: &str,
    producer: &str,
    active: &Active,
    req: ReportRequest,
) -> Result<ReportResponse, ApiError> {
    if req.operations.len() > MAX_OPERATIONS {
        return Err(ApiError::invalid_argument(format!(
            "Too many operations in one report ({}); the limit is {MAX_OPERATIONS}.",
            req.operations.len()
        )));
    }
    let mut resp = ReportResponse {
        service_config_id: active.config_id_for(&req.service_config_id),
        service_rollout_id: active.rollout_id.clone(),
        ..Default::default()
    };
    let now = sc.clock.now_ms();
    let secrets = secret_params(
        state,
        sc,
        service,
        [&req.service_config_id, &active.config_id],
    )
    .await;
    let mut consumers: HashMap<String, String> = HashMap::new();
    let mut prepared = Vec::with_capacity(req.operations.len());
    for op in &req.operations {
        if op.operation_id.is_empty() {
            resp.report_errors.push(ReportError {
                operation_id: String::new(),
                status: Status {
                    code: Code::InvalidArgument.as_i32(),
                    message: format!(
                        "operation_id is required (operation '{}').",
                        op.operation_name
                    ),
                    details: vec![],
                },
            });
            continue;
        }
        let consumer = match consumers.get(&op.consumer_id) {
            Some(c) => c.clone(),
            None => {
                let c = consumer_label(state, producer, &op.consumer_id, &op.labels).await?;
                consumers.insert(op.consumer_id.clone(), c.clone());
                c
            }
        };
        let (deltas, logs) = report::extract(op, &consumer, now, &secrets);
        prepared.push(PreparedOp {
            operation_id: op.operation_id.clone(),
            deltas,
            logs,
        });
    }
    let outcome = reports::write(&state.store, service, prepared, now).await?;
    sc.metrics.record_deltas(service, &outcome.deltas);
    if outcome.replayed > 0 {
        tracing::debug!(
            service,
            replayed = outcome.replayed,
            "replayed report operations skipped"
        );
    }
    Ok(resp)
}
