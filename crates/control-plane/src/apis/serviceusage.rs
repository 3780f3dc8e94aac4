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
//! Service Control asks [`is_enabled`] whether a consumer may call a service.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::apis::operations::{self, Outcome};
use crate::app::{page_token, split_verb, AppState, JsonBody, Params};
use crate::authz::{perms, require_project_permission, require_service_permission, Principal};
use crate::error::ApiError;
use crate::store::{now_rfc3339, Migration, Store};

pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "su_0001",
    sql: &["CREATE TABLE IF NOT EXISTS su_enabled (\
            project_id TEXT NOT NULL, \
            service_name TEXT NOT NULL, \
            enable_time TEXT NOT NULL, \
            PRIMARY KEY (project_id, service_name))"],
}];

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

/// Whether `consumer_project_id` has enabled `service` (Service Control's consumer check).
pub async fn is_enabled(
    store: &Store,
    consumer_project_id: &str,
    service: &str,
) -> Result<bool, ApiError> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT service_name FROM su_enabled WHERE project_id = $1 AND service_name = $2",
    )
    .bind(consumer_project_id)
    .bind(service)
    .fetch_optional(store.pool())
    .await?;
    Ok(row.is_some())
}

/// The title shown for a service: a platform API's name, or the newest config's `title`.
async fn title_of(state: &AppState, service: &str) -> Result<Option<String>, ApiError> {
    if let Some((_, t)) = PLATFORM_SERVICES.iter().find(|(n, _)| *n == service) {
        return Ok(Some(t.to_string()));
    }
    Ok(
        crate::apis::servicemanagement::latest_config(state, service)
            .await?
            .and_then(|c| c.get("title").and_then(Value::as_str).map(str::to_string)),
    )
}

async fn service_json(
    state: &AppState,
    number: i64,
    service: &str,
    enabled: bool,
) -> Result<Value, ApiError> {
    let mut config = json!({"name": service});
    if let Some(t) = title_of(state, service).await? {
        config["title"] = Value::String(t);
    }
    Ok(json!({
        "name": format!("projects/{number}/services/{service}"),
        "config": config,
        "state": if enabled { "ENABLED" } else { "DISABLED" },
        "parent": format!("projects/{number}"),
    }))
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
    let producer = crate::apis::servicemanagement::producer_project(state, service)
        .await?
        .ok_or_else(denied)?;
    if producer != consumer {
        require_service_permission(state, principal, service, perms::SERVICES_BIND)
            .await
            .map_err(|_| denied())?;
    }
    Ok(())
}

fn op_name(number: i64) -> String {
    format!("operations/acat.p2-{number}-{}", uuid::Uuid::new_v4())
}

/// Records `service` as enabled for `consumer`; enabling an already-enabled service keeps its
/// original enable time, so repeated enables are harmless.
async fn mark_enabled(
    conn: &mut sqlx::AnyConnection,
    consumer: &str,
    service: &str,
) -> Result<(), ApiError> {
    sqlx::query(
        "INSERT INTO su_enabled (project_id, service_name, enable_time) VALUES ($1, $2, $3) \
         ON CONFLICT (project_id, service_name) DO NOTHING",
    )
    .bind(consumer)
    .bind(service)
    .bind(now_rfc3339())
    .execute(conn)
    .await?;
    Ok(())
}

fn su_metadata() -> Value {
    json!({"@type": "type.googleapis.com/google.api.serviceusage.v1.OperationMetadata"})
}

async fn service_verb(
    State(state): State<AppState>,
    principal: Principal,
    Path((project, segment)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let (service, verb) = split_verb(&segment);
    let consumer = crate::projects::project_id_for(&state.store, &project).await?;
    let number = crate::projects::project_number(&state.store, &consumer).await?;
    match verb {
        Some("enable") => {
            require_project_permission(&state, &principal, &consumer, perms::SERVICEUSAGE_ENABLE)
                .await?;
            check_enableable(&state, &principal, &consumer, service).await?;
            let svc = service_json(&state, number, service, true).await?;
            let mut tx = state.store.begin_write().await?;
            mark_enabled(&mut tx, &consumer, service).await?;
            let op = operations::insert(
                &mut tx,
                &op_name(number),
                su_metadata(),
                Outcome::Response(json!({
                    "@type": "type.googleapis.com/google.api.serviceusage.v1.EnableServiceResponse",
                    "service": svc,
                })),
            )
            .await?;
            tx.commit().await?;
            tracing::info!(consumer = %consumer, service = %service, "service enabled");
            Ok(Json(op))
        }
        Some("disable") => {
            require_project_permission(&state, &principal, &consumer, perms::SERVICEUSAGE_DISABLE)
                .await?;
            let svc = service_json(&state, number, service, false).await?;
            let mut tx = state.store.begin_write().await?;
            sqlx::query("DELETE FROM su_enabled WHERE project_id = $1 AND service_name = $2")
                .bind(&consumer)
                .bind(service)
                .execute(&mut *tx)
                .await?;
            let op = operations::insert(
                &mut tx,
                &op_name(number),
                su_metadata(),
                Outcome::Response(json!({
                    "@type": "type.googleapis.com/google.api.serviceusage.v1.DisableServiceResponse",
                    "service": svc,
                })),
            )
            .await?;
            tx.commit().await?;
            tracing::info!(consumer = %consumer, service = %service, "service disabled");
            Ok(Json(op))
        }
        Some(other) => Err(ApiError::not_found(format!(
            "Unknown method services.{other}; expected :enable or :disable."
        ))),
        None => Err(ApiError::not_found(format!(
            "No POST method on projects/{project}/services/{service}; expected :enable or :disable."
        ))),
    }
}

async fn get_one(
    State(state): State<AppState>,
    principal: Principal,
    Path((project, service)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let consumer = crate::projects::project_id_for(&state.store, &project).await?;
    require_project_permission(&state, &principal, &consumer, perms::SERVICEUSAGE_LIST).await?;
    let number = crate::projects::project_number(&state.store, &consumer).await?;
    let enabled = is_enabled(&state.store, &consumer, &service).await?;
    Ok(Json(service_json(&state, number, &service, enabled).await?))
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
) -> Result<Json<Value>, ApiError> {
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
        services.push(service_json(&state, number, s, true).await?);
    }
    let mut tx = state.store.begin_write().await?;
    for s in &body.service_ids {
        mark_enabled(&mut tx, &consumer, s).await?;
    }
    let op = operations::insert(
        &mut tx,
        &op_name(number),
        su_metadata(),
        Outcome::Response(json!({
            "@type": "type.googleapis.com/google.api.serviceusage.v1.BatchEnableServicesResponse",
            "services": services,
        })),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(consumer = %consumer, count = body.service_ids.len(), "services enabled");
    Ok(Json(op))
}

async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Path(project): Path<String>,
    params: Params,
) -> Result<Json<Value>, ApiError> {
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
    let enabled: Vec<(String,)> = sqlx::query_as(
        "SELECT service_name FROM su_enabled WHERE project_id = $1 ORDER BY service_name",
    )
    .bind(&consumer)
    .fetch_all(state.store.pool())
    .await?;
    let enabled: Vec<String> = enabled.into_iter().map(|(s,)| s).collect();
    let mut names: Vec<(String, bool)> = Vec::new();
    if want_enabled {
        names.extend(enabled.iter().map(|s| (s.clone(), true)));
    }
    if want_disabled {
        // Disabled = what this project could enable: platform APIs and its own services.
        let own: Vec<(String,)> = sqlx::query_as(
            "SELECT service_name FROM sm_services WHERE producer_project_id = $1 AND deleted = 0",
        )
        .bind(&consumer)
        .fetch_all(state.store.pool())
        .await?;
        let candidates = PLATFORM_SERVICES
            .iter()
            .map(|(n, _)| n.to_string())
            .chain(own.into_iter().map(|(s,)| s));
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
        services.push(service_json(&state, number, &n, e).await?);
    }
    let mut out = json!({});
    if !services.is_empty() {
        out["services"] = Value::Array(services);
    }
    if offset + limit < total {
        out["nextPageToken"] = Value::String(page_token(offset + limit));
    }
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::test_support::env;
    use axum::http::{Method, StatusCode};

    const SVC: &str = "echo-api.endpoints.demo-proj.cloud.goog";

    #[tokio::test]
    async fn enable_list_disable_and_batch() {
        let e = env().await;
        let (st, _) = e
            .admin(
                Method::POST,
                "/v1/services",
                Some(json!({"serviceName": SVC, "producerProjectId": "demo-proj"})),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        assert!(!is_enabled(&e.state.store, "demo-proj", SVC).await.unwrap());

        let (st, op) = e
            .admin(
                Method::POST,
                &format!("/serviceusage/v1/projects/demo-proj/services/{SVC}:enable"),
                Some(json!({})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{op}");
        assert_eq!(op["done"], true);
        let number = crate::projects::project_number(&e.state.store, "demo-proj")
            .await
            .unwrap();
        assert!(op["name"]
            .as_str()
            .unwrap()
            .starts_with(&format!("operations/acat.p2-{number}-")));
        assert_eq!(op["response"]["service"]["state"], "ENABLED");
        assert_eq!(
            op["response"]["service"]["name"],
            format!("projects/{number}/services/{SVC}")
        );
        assert!(is_enabled(&e.state.store, "demo-proj", SVC).await.unwrap());

        // Unknown services are refused as a whole batch; platform APIs are fine.
        let (st, _) = e
            .admin(
                Method::POST,
                "/v1/projects/demo-proj/services:batchEnable",
                Some(json!({"serviceIds": ["servicecontrol.googleapis.com", "nope.example.com"]})),
            )
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        assert!(
            !is_enabled(&e.state.store, "demo-proj", "servicecontrol.googleapis.com")
                .await
                .unwrap()
        );
        let (st, op) = e
            .admin(
                Method::POST,
                "/v1/projects/demo-proj/services:batchEnable",
                Some(json!({"serviceIds": ["servicecontrol.googleapis.com",
                                            "endpoints.googleapis.com"]})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{op}");
        assert_eq!(op["response"]["services"].as_array().unwrap().len(), 2);

        // The project number works in paths too.
        let (st, list) = e
            .admin(
                Method::GET,
                &format!("/v1/projects/{number}/services?filter=state:ENABLED&pageSize=200"),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let names: Vec<&str> = list["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["config"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            vec![
                "echo-api.endpoints.demo-proj.cloud.goog",
                "endpoints.googleapis.com",
                "servicecontrol.googleapis.com"
            ]
        );

        let (st, op) = e
            .admin(
                Method::POST,
                &format!("/v1/projects/demo-proj/services/{SVC}:disable"),
                Some(json!({})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{op}");
        assert_eq!(op["response"]["service"]["state"], "DISABLED");
        assert!(!is_enabled(&e.state.store, "demo-proj", SVC).await.unwrap());

        // Another consumer needs serviceConsumer on the service; a SA needs project rights.
        let (st, _) = e
            .call(
                Method::POST,
                &format!("/v1/projects/other-proj/services/{SVC}:enable"),
                Some("sa:x@other-proj.iam.gserviceaccount.com"),
                Some(json!({})),
            )
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        let (st, _) = e
            .admin(
                Method::GET,
                "/v1/projects/demo-proj/services?filter=bogus",
                None,
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
    }
}
