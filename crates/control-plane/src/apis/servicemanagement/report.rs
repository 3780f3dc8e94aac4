//! `services:generateConfigReport`: element-level differences between two stored configs.
//!
//! Handlers only (see the parent module's layer rule); storage goes through `crate::store`.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::configs::load_config;
use super::require_service_or_hide;
use crate::app::{AppState, JsonBody};
use crate::authz::{perms, Principal};
use crate::error::ApiError;

const TYPE_CONFIG_REF: &str = "type.googleapis.com/google.api.servicemanagement.v1.ConfigRef";

/// `google.api.servicemanagement.v1.GenerateConfigReportResponse`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ConfigReport {
    service_name: String,
    id: Value,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    change_reports: Vec<ChangeReport>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ChangeReport {
    /// `google.api.ConfigChange` entries, built in [`config_changes`].
    config_changes: Vec<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub(super) struct ConfigReportBody {
    new_config: Option<Value>,
    old_config: Option<Value>,
}

/// Resolves a `ConfigRef` Any (`name: services/{s}/configs/{id}`) to (service, config).
async fn resolve_config_ref(
    state: &AppState,
    principal: &Principal,
    field: &str,
    v: &Value,
) -> Result<(String, Value), ApiError> {
    let ty = v.get("@type").and_then(Value::as_str).unwrap_or("");
    if ty != TYPE_CONFIG_REF {
        return Err(ApiError::invalid_argument(format!(
            "{field}: only {TYPE_CONFIG_REF} is supported (got '{ty}')."
        )));
    }
    let name = v.get("name").and_then(Value::as_str).unwrap_or("");
    let parts: Vec<&str> = name.split('/').collect();
    let ["services", service, "configs", id] = parts.as_slice() else {
        return Err(ApiError::invalid_argument(format!(
            "{field}.name '{name}' must look like services/<service>/configs/<id>."
        )));
    };
    require_service_or_hide(state, principal, service, perms::SERVICES_GET).await?;
    Ok((service.to_string(), load_config(state, service, id).await?))
}

pub(super) async fn generate_config_report(
    State(state): State<AppState>,
    principal: Principal,
    JsonBody(body): JsonBody<ConfigReportBody>,
) -> Result<Json<ConfigReport>, ApiError> {
    let Some(new) = &body.new_config else {
        return Err(ApiError::invalid_argument("newConfig is required.")
            .with_field_violation("newConfig", "required"));
    };
    let (service, new_cfg) = resolve_config_ref(&state, &principal, "newConfig", new).await?;
    let old_cfg = match &body.old_config {
        Some(o) => Some(
            resolve_config_ref(&state, &principal, "oldConfig", o)
                .await?
                .1,
        ),
        None => None,
    };
    let id = new_cfg.get("id").cloned().unwrap_or(Value::Null);
    // Two large configs flatten into a million entries: not on the request threads.
    let changes = tokio::task::spawn_blocking(move || config_changes(old_cfg.as_ref(), &new_cfg))
        .await
        .map_err(|e| ApiError::internal(format_args!("comparing the configs failed: {e}")))?;
    let change_reports = if changes.is_empty() {
        Vec::new()
    } else {
        vec![ChangeReport {
            config_changes: changes,
        }]
    };
    Ok(Json(ConfigReport {
        service_name: service,
        id,
        change_reports,
    }))
}

/// Element-level differences between two configs. Lists of rules are keyed by `selector` (or
/// `name`) so reordering is not a change. No advice is produced: Portico has no breaking-change
/// analysis, so an honest report lists changes without advising against them.
fn config_changes(old: Option<&Value>, new: &Value) -> Vec<Value> {
    let mut a = BTreeMap::new();
    let mut b = BTreeMap::new();
    if let Some(o) = old {
        flatten("", o, &mut a);
    }
    flatten("", new, &mut b);
    let mut out = Vec::new();
    for (k, nv) in &b {
        match a.get(k) {
            None => out.push(json!({"element": k, "newValue": nv, "changeType": "ADDED"})),
            Some(ov) if ov != nv => out.push(
                json!({"element": k, "oldValue": ov, "newValue": nv, "changeType": "MODIFIED"}),
            ),
            _ => {}
        }
    }
    for (k, ov) in &a {
        if !b.contains_key(k) {
            out.push(json!({"element": k, "oldValue": ov, "changeType": "REMOVED"}));
        }
    }
    out
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    const IGNORED: &[&str] = &["id", "sourceInfo", "producerProjectId", "configVersion"];
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if prefix.is_empty() && IGNORED.contains(&k.as_str()) {
                    continue;
                }
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, x, out);
            }
        }
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                let key = x
                    .get("selector")
                    .or_else(|| x.get("name"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| i.to_string());
                flatten(&format!("{prefix}[{key}]"), x, out);
            }
        }
        leaf => {
            out.insert(prefix.to_string(), leaf.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_diff_is_keyed_by_selector() {
        let old = json!({"id": "a", "http": {"rules": [
            {"selector": "x.A", "get": "/a"}, {"selector": "x.B", "get": "/b"}]}});
        let same_reordered = json!({"id": "b", "http": {"rules": [
            {"selector": "x.B", "get": "/b"}, {"selector": "x.A", "get": "/a"}]}});
        assert!(config_changes(Some(&old), &same_reordered).is_empty());
        let changed = json!({"id": "c", "http": {"rules": [
            {"selector": "x.A", "get": "/a2"}, {"selector": "x.C", "get": "/c"}]}});
        let ch = config_changes(Some(&old), &changed);
        let kinds: Vec<(&str, &str)> = ch
            .iter()
            .map(|c| {
                (
                    c["element"].as_str().unwrap(),
                    c["changeType"].as_str().unwrap(),
                )
            })
            .collect();
        assert!(kinds.contains(&("http.rules[x.A].get", "MODIFIED")));
        assert!(kinds.contains(&("http.rules[x.C].get", "ADDED")));
        assert!(kinds.contains(&("http.rules[x.B].get", "REMOVED")));
        assert!(kinds.contains(&("http.rules[x.B].selector", "REMOVED")));
    }
}
