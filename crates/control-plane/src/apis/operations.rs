//! Long-running operations, one global table for every API.
//!
//! Portico finishes its work inside the request, so operations are stored already `done` with a
//! `response` (or an `error`). gcloud's servicemanagement client still polls once
//! (`GET /v1/operations/{id}`); serviceusage skips polling when the POST says `done`; apikeys polls
//! `GET /v2/operations/{id}`. Both paths read this table, so names must be unique across APIs —
//! each module uses Google's name format (`operations/serviceConfigs.<svc>:<uuid>`, ...).
//!
//! The table and the stored [`Operation`] shape live in [`crate::store::operations`]; an API
//! writes its operation in the same transaction as the change it describes, so a failed change
//! leaves no operation behind. This module only answers `GET .../operations[/{id}]`.
//!
//! Layer rule: handlers only; the SQL is in `store::operations`, and no other API is imported.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;

use crate::app::{page_token, AppState, Params};
use crate::authz::{perms, require_service_permission, Principal};
use crate::error::ApiError;
use crate::store::operations as ops_store;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/operations", get(list_operations))
        .route("/v1/operations/{id}", get(get_operation))
        .route("/v2/operations/{id}", get(get_operation))
}

/// Looks an operation up by `operations/<id>` or bare `<id>`.
async fn lookup(state: &AppState, id: &str) -> Result<Option<Value>, ApiError> {
    let name = if id.starts_with("operations/") {
        id.to_string()
    } else {
        format!("operations/{id}")
    };
    Ok(ops_store::get(&state.store, &name).await?)
}

async fn get_operation(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let not_found = || {
        ApiError::not_found(format!(
            "Operation 'operations/{}' not found.",
            id.trim_start_matches("operations/")
        ))
    };
    let op = lookup(&state, &id).await?.ok_or_else(not_found)?;
    // A service's operations are as private as the service; a service account without read
    // access cannot tell them from missing ones.
    let service = ops_store::service_of(&op);
    if !service.is_empty()
        && require_service_permission(&state, &principal, &service, perms::SERVICES_GET)
            .await
            .is_err()
    {
        return Err(not_found());
    }
    Ok(Json(op))
}

/// `gcloud endpoints operations list --service=S [--filter=...]` sends
/// `filter=serviceName="S"` optionally followed by ` AND (<expr>)`, where `<expr>` compares
/// `done` (`=`, `!=`) or `startTime` (`>=`, `>`, `<=`, `<`, quoted ISO 8601).
#[derive(Debug, PartialEq)]
struct OpFilter {
    service: String,
    done: Option<(bool, bool)>,
    start_time: Option<(String, String)>,
}

fn parse_op_filter(f: &str) -> Result<OpFilter, ApiError> {
    let bad = |why: &str| ApiError::invalid_argument(format!("Invalid filter '{f}': {why}."));
    let (head, rest) = match f.split_once(" AND ") {
        Some((h, r)) => (h.trim(), Some(r.trim())),
        None => (f.trim(), None),
    };
    let service = head
        .strip_prefix("serviceName")
        .map(str::trim_start)
        .and_then(|h| h.strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| bad("expected serviceName=\"<service>\""))?;
    let mut out = OpFilter {
        service,
        done: None,
        start_time: None,
    };
    let Some(expr) = rest else {
        return Ok(out);
    };
    let expr = expr
        .strip_prefix('(')
        .and_then(|e| e.strip_suffix(')'))
        .unwrap_or(expr)
        .trim();
    if let Some(v) = expr.strip_prefix("done") {
        let v = v.trim();
        let (eq, val) = if let Some(x) = v.strip_prefix("!=") {
            (false, x)
        } else if let Some(x) = v.strip_prefix('=') {
            (true, x)
        } else {
            return Err(bad("done supports = and !="));
        };
        let b = match val.trim().to_ascii_lowercase().as_str() {
            "true" => true,
            "false" => false,
            _ => return Err(bad("done compares with true or false")),
        };
        out.done = Some((eq, b));
    } else if let Some(v) = expr.strip_prefix("startTime") {
        let v = v.trim();
        let op = [">=", "<=", ">", "<"]
            .into_iter()
            .find(|o| v.starts_with(o))
            .ok_or_else(|| bad("startTime supports >=, >, <= and <"))?;
        let val = v[op.len()..].trim();
        let val = val
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .ok_or_else(|| bad("the startTime value must be quoted"))?;
        out.start_time = Some((op.to_string(), val.to_string()));
    } else {
        return Err(bad("only done and startTime can be filtered on"));
    }
    Ok(out)
}

impl OpFilter {
    fn matches(&self, op: &Value) -> bool {
        if let Some((eq, want)) = self.done {
            let done = op.get("done").and_then(Value::as_bool).unwrap_or(false);
            if (done == want) != eq {
                return false;
            }
        }
        if let Some((cmp, bound)) = &self.start_time {
            // RFC 3339 UTC strings order like the instants they name; a date-only bound
            // compares as that day's midnight.
            let t = op
                .pointer("/metadata/startTime")
                .and_then(Value::as_str)
                .unwrap_or("");
            let ok = match cmp.as_str() {
                ">=" => t >= bound.as_str(),
                ">" => t > bound.as_str(),
                "<=" => t <= bound.as_str(),
                _ => t < bound.as_str(),
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

async fn list_operations(
    State(state): State<AppState>,
    principal: Principal,
    params: Params,
) -> Result<Json<ListOperationsResponse>, ApiError> {
    let Some(f) = params.get("filter") else {
        return Err(ApiError::invalid_argument(
            "A filter naming the service is required, e.g. serviceName=\"my-api.example.com\".",
        ));
    };
    let filter = parse_op_filter(f)?;
    require_service_permission(&state, &principal, &filter.service, perms::SERVICES_GET).await?;
    let (limit, offset) = params.page(50, 100)?;
    let matching: Vec<Value> = ops_store::list_for_service(&state.store, &filter.service)
        .await?
        .into_iter()
        .filter(|op| filter.matches(op))
        .collect();
    let total = matching.len() as i64;
    let operations: Vec<Value> = matching
        .into_iter()
        .skip(offset as usize)
        .take(limit as usize)
        .collect();
    let next_page_token = (offset + limit < total).then(|| page_token(offset + limit));
    Ok(Json(ListOperationsResponse {
        operations,
        next_page_token,
    }))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListOperationsResponse {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    operations: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_page_token: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn op_filters() {
        let f = parse_op_filter("serviceName=\"a.b.c\"").unwrap();
        assert_eq!(f.service, "a.b.c");
        let f = parse_op_filter("serviceName=\"a.b.c\" AND (done = true)").unwrap();
        assert_eq!(f.done, Some((true, true)));
        assert!(f.matches(&json!({"done": true})));
        assert!(!f.matches(&json!({})));
        let f = parse_op_filter("serviceName=\"a.b.c\" AND (startTime >= \"2017-02-01\")").unwrap();
        assert!(f.matches(&json!({"metadata": {"startTime": "2026-11-23T10:00:00Z"}})));
        assert!(!f.matches(&json!({"metadata": {"startTime": "2016-11-23T10:00:00Z"}})));
        assert!(parse_op_filter("name=x").is_err());
        assert!(parse_op_filter("serviceName=\"a\" AND (bogus = 1)").is_err());
        assert!(parse_op_filter("serviceName=\"a\" AND (startTime > 2017)").is_err());
    }
}
