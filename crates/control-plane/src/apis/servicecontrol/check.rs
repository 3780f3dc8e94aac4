//! `services/{svc}:check`: is this consumer allowed to call this method right now?
//!
//! Order of the checks (the first failure is the answer): consumer resolution
//! (`API_KEY_INVALID`, `PROJECT_INVALID`), the key's `expireTime` (`API_KEY_EXPIRED`, a Portico
//! extension of API Keys v2), the consumer project's lifecycle (`PROJECT_DELETED` after
//! `gcloud projects delete`), the key's API targets (`API_TARGET_BLOCKED`), its application
//! restrictions (`IP_ADDRESS_BLOCKED`, `REFERER_BLOCKED`, `CLIENT_APP_BLOCKED`), then activation
//! (`SERVICE_NOT_ACTIVATED`; the producer project counts as activated for its own service). The
//! response always carries `serviceConfigId` and the newest successful `serviceRolloutId`, which
//! is how proxies learn of rollouts.

use portico_servicecontrol::{
    labels, CheckError, CheckInfo, CheckRequest, CheckResponse, ConsumerInfo,
};

use time::OffsetDateTime;

use crate::app::AppState;
use crate::error::ApiError;

use super::consumer::{self, Active};
use super::restrictions;

fn err(code: &str, subject: String, detail: String) -> CheckError {
    CheckError {
        code: code.to_string(),
        subject,
        detail,
    }
}

/// Answers a check for a live service whose producer project is `producer`.
pub async fn check(
    state: &AppState,
    service: &str,
    producer: &str,
    active: &Active,
    req: CheckRequest,
) -> Result<CheckResponse, ApiError> {
    let op = &req.operation;
    if op.consumer_id.is_empty() {
        return Err(ApiError::invalid_argument(
            "operation.consumer_id is required (api_key:<key>, project:<id> or project_number:<n>).",
        ));
    }
    let mut resp = CheckResponse {
        operation_id: op.operation_id.clone(),
        service_config_id: active.config_id_for(&req.service_config_id),
        service_rollout_id: active.rollout_id.clone(),
        ..Default::default()
    };
    let consumer = match consumer::resolve(state, &op.consumer_id, producer).await? {
        Ok(c) => c,
        Err(problem) => {
            resp.check_errors.push(problem.refusal().into());
            return Ok(resp);
        }
    };
    resp.check_info = Some(CheckInfo {
        consumer_info: Some(ConsumerInfo {
            project_number: consumer.project_number,
            consumer_type: "PROJECT".into(),
            consumer_number: consumer.project_number,
        }),
        api_key_uid: consumer
            .key
            .as_ref()
            .map(|k| k.uid.clone())
            .unwrap_or_default(),
        ..Default::default()
    });
    let subject = format!("projects/{}", consumer.project_number);
    // Expiry is a wall-clock instant the key's owner chose, so it is compared with the real
    // clock (not Service Control's quota clock, which tests move by hand).
    if let Some(refusal) = consumer.lapsed(OffsetDateTime::now_utc()) {
        resp.check_errors.push(refusal.into());
        return Ok(resp);
    }
    if let Some(key) = &consumer.key {
        let r = consumer::key_restrictions(key);
        let label = |k: &str| {
            op.labels
                .get(k)
                .map(String::as_str)
                .filter(|v| !v.is_empty())
        };
        if !restrictions::api_target_allows(&r.api_targets, service, &op.operation_name) {
            resp.check_errors.push(err(
                "API_TARGET_BLOCKED",
                subject,
                format!(
                    "Requests to this API {service} method {} are blocked.",
                    op.operation_name
                ),
            ));
            return Ok(resp);
        }
        if !restrictions::ip_allowed(&r.allowed_ips, label(labels::CALLER_IP)) {
            resp.check_errors.push(err(
                "IP_ADDRESS_BLOCKED",
                subject,
                format!(
                    "The client IP address {} is blocked by the API key's restrictions.",
                    label(labels::CALLER_IP).unwrap_or("<unknown>")
                ),
            ));
            return Ok(resp);
        }
        if !restrictions::referrer_allowed(&r.allowed_referrers, label(labels::REFERER)) {
            resp.check_errors.push(err(
                "REFERER_BLOCKED",
                subject,
                format!(
                    "Requests from referer {} are blocked by the API key's restrictions.",
                    label(labels::REFERER).unwrap_or("<empty>")
                ),
            ));
            return Ok(resp);
        }
        if !restrictions::client_app_allowed(
            &r,
            label(labels::ANDROID_PACKAGE_NAME),
            label(labels::ANDROID_CERT_FINGERPRINT),
            label(labels::IOS_BUNDLE_ID),
        ) {
            resp.check_errors.push(err(
                "CLIENT_APP_BLOCKED",
                subject,
                "Requests from this client application are blocked by the API key's restrictions."
                    .into(),
            ));
            return Ok(resp);
        }
    }
    let activated = consumer.project_id == producer
        || crate::store::usage::is_enabled(&state.store, &consumer.project_id, service).await?;
    if !activated {
        resp.check_errors.push(err(
            "SERVICE_NOT_ACTIVATED",
            subject,
            format!(
                "API {service} is not enabled for the project {}.",
                consumer.project_id
            ),
        ));
    }
    Ok(resp)
}
