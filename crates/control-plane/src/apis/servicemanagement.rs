//! Service Management v1: managed services, configs, rollouts, service IAM policies.
//!
//! Routes (prefix `/servicemanagement` optional, see `server`):
//! - `GET|POST /v1/services`, `GET|DELETE /v1/services/{s}`, `POST /v1/services/{s}:undelete`,
//!   `:getIamPolicy`, `:setIamPolicy` (other verbs on that path go to
//!   `server::SERVICE_VERB_HANDLERS`, i.e. Service Control).
//! - `POST /v1/services/{s}/configs:submit` (OpenAPI sources → `google.api.Service` through
//!   `portico_config::openapi::convert`), `GET /v1/services/{s}/configs[/{id}]`, ESP's
//!   `GET /v1/services/{s}/config[?configId=]`.
//! - `GET|POST /v1/services/{s}/rollouts`, `GET /v1/services/{s}/rollouts/{id}`.
//! - `POST /v1/services:generateConfigReport`.
//!
//! Known limits: only OpenAPI 2.0 sources are accepted (gRPC descriptor sets and service-config
//! YAML are refused with a clear INVALID_ARGUMENT); rollouts take effect at once (status
//! SUCCESS, no gradual traffic steps); `generateConfigReport` lists element-level changes but
//! never gives advice (no breaking-change analysis); service policies do not support conditions.
//!
//! Every change happens in one transaction together with its (already finished) operation, so a
//! failed request leaves nothing behind. Config and rollout ids are `YYYY-MM-DDrN`, N counting per
//! service per UTC day from 0; the counters live on the service row, which every writer updates
//! first (this also serialises writers of one service on both databases).

use std::collections::BTreeMap;

use axum::extract::{FromRequestParts, Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::AnyConnection;

use crate::apis::operations::{self, sm_metadata, Outcome};
use crate::app::{
    page_token, parse_json_body, split_verb, AppState, JsonBody, Params, MAX_BODY_BYTES,
    SERVICE_VERB_HANDLERS,
};
use crate::authz::{
    perms, require_project_permission, require_service_permission, Policy, Principal,
};
use crate::error::ApiError;
use crate::store::{now_rfc3339, Migration};

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        id: "sm_0001",
        sql: &[
            "CREATE TABLE IF NOT EXISTS sm_services (\
         service_name TEXT PRIMARY KEY, \
         producer_project_id TEXT NOT NULL, \
         deleted BIGINT NOT NULL, \
         op_counter BIGINT NOT NULL, \
         config_day TEXT NOT NULL, \
         config_next BIGINT NOT NULL, \
         rollout_day TEXT NOT NULL, \
         rollout_next BIGINT NOT NULL, \
         policy TEXT NOT NULL, \
         create_time TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS sm_configs (\
         service_name TEXT NOT NULL, \
         config_id TEXT NOT NULL, \
         seq BIGINT NOT NULL, \
         body TEXT NOT NULL, \
         create_time TEXT NOT NULL, \
         PRIMARY KEY (service_name, config_id))",
            "CREATE TABLE IF NOT EXISTS sm_rollouts (\
         service_name TEXT NOT NULL, \
         rollout_id TEXT NOT NULL, \
         seq BIGINT NOT NULL, \
         status TEXT NOT NULL, \
         body TEXT NOT NULL, \
         create_time TEXT NOT NULL, \
         PRIMARY KEY (service_name, rollout_id))",
        ],
    },
    // Newest-first listings (configs list, ESP's rollout poll) read these in seq order.
    Migration {
        id: "sm_0002",
        sql: &[
            "CREATE INDEX IF NOT EXISTS sm_configs_by_seq ON sm_configs (service_name, seq)",
            "CREATE INDEX IF NOT EXISTS sm_rollouts_by_seq ON sm_rollouts (service_name, seq)",
        ],
    },
];

const TYPE_MANAGED_SERVICE: &str =
    "type.googleapis.com/google.api.servicemanagement.v1.ManagedService";
const TYPE_SUBMIT_RESPONSE: &str =
    "type.googleapis.com/google.api.servicemanagement.v1.SubmitConfigSourceResponse";
const TYPE_ROLLOUT: &str = "type.googleapis.com/google.api.servicemanagement.v1.Rollout";
const TYPE_UNDELETE_RESPONSE: &str =
    "type.googleapis.com/google.api.servicemanagement.v1.UndeleteServiceResponse";
const TYPE_CONFIG_REF: &str = "type.googleapis.com/google.api.servicemanagement.v1.ConfigRef";
const TYPE_CONFIG_FILE: &str = "type.googleapis.com/google.api.servicemanagement.v1.ConfigFile";

/// How long one `configs:submit` may spend converting (waiting for a turn included) before it
/// is stopped with DEADLINE_EXCEEDED. The largest body accepted (16 MiB) converts in about two
/// seconds on one core, so this leaves room for a slow or busy machine and no more.
pub const CONVERSION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How OpenAPI conversions run: on the blocking pool rather than the threads that answer
/// requests, a few at a time (half the CPUs, at least one, so conversions never take every
/// core from `:check` and `/token`), each within a time limit. A conversion whose caller went
/// away is told to stop and does within a few hundred YAML events or paths.
pub struct Conversions {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    timeout: std::time::Duration,
    /// Runs on the converting thread before each conversion (tests hold a conversion here).
    #[cfg(test)]
    pub(crate) before_convert: Option<std::sync::Arc<dyn Fn() + Send + Sync>>,
}

impl Default for Conversions {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Conversions::new((cpus / 2).max(1), CONVERSION_TIMEOUT)
    }
}

impl Conversions {
    /// `concurrent` conversions at most (at least 1), each stopped after `timeout`.
    pub fn new(concurrent: usize, timeout: std::time::Duration) -> Self {
        Conversions {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(concurrent.max(1))),
            timeout,
            #[cfg(test)]
            before_convert: None,
        }
    }
}

/// Sets the flag when dropped: the request future is dropped when its client goes away, and
/// the conversion it started sees the flag and stops.
struct CancelOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/services", get(list_services).post(create_service))
        .route(
            "/v1/services:generateConfigReport",
            post(generate_config_report),
        )
        .route(
            "/v1/services/{service}",
            get(get_service).delete(delete_service).post(service_verb),
        )
        .route("/v1/services/{service}/configs", get(list_configs))
        .route("/v1/services/{service}/configs:submit", post(submit_config))
        .route(
            "/v1/services/{service}/configs/{config_id}",
            get(get_config),
        )
        .route("/v1/services/{service}/config", get(get_config_esp))
        .route(
            "/v1/services/{service}/rollouts",
            get(list_rollouts).post(create_rollout),
        )
        .route(
            "/v1/services/{service}/rollouts/{rollout_id}",
            get(get_rollout),
        )
}

// ---------------------------------------------------------------------------------------------
// Lookups shared with other modules

/// The service's IAM policy and producer project, `None` if the service does not exist or is
/// deleted.
pub async fn policy_and_producer(
    state: &AppState,
    service_name: &str,
) -> Result<Option<(Policy, String)>, ApiError> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT policy, producer_project_id FROM sm_services \
         WHERE service_name = $1 AND deleted = 0",
    )
    .bind(service_name)
    .fetch_optional(state.store.pool())
    .await?;
    match row {
        Some((p, producer)) => Ok(Some((serde_json::from_str(&p)?, producer))),
        None => Ok(None),
    }
}

/// The producer project of a live (not deleted) service.
pub async fn producer_project(
    state: &AppState,
    service_name: &str,
) -> Result<Option<String>, ApiError> {
    Ok(policy_and_producer(state, service_name)
        .await?
        .map(|(_, p)| p))
}

/// The newest stored config of a live service (what `/config` without an id returns).
pub async fn latest_config(
    state: &AppState,
    service_name: &str,
) -> Result<Option<Value>, ApiError> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT body FROM sm_configs WHERE service_name = $1 ORDER BY seq DESC LIMIT 1",
    )
    .bind(service_name)
    .fetch_optional(state.store.pool())
    .await?;
    Ok(match row {
        Some((b,)) => Some(serde_json::from_str(&b)?),
        None => None,
    })
}

/// The id of the newest SUCCESS rollout (Service Control piggybacks it as `serviceRolloutId`).
pub async fn latest_rollout_id(
    state: &AppState,
    service_name: &str,
) -> Result<Option<String>, ApiError> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT rollout_id FROM sm_rollouts WHERE service_name = $1 AND status = 'SUCCESS' \
         ORDER BY seq DESC LIMIT 1",
    )
    .bind(service_name)
    .fetch_optional(state.store.pool())
    .await?;
    Ok(row.map(|(r,)| r))
}

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

fn managed_service(name: &str, producer: &str) -> Value {
    json!({"serviceName": name, "producerProjectId": producer})
}

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

/// `YYYY-MM-DD` in UTC.
fn today() -> String {
    let d = time::OffsetDateTime::now_utc().date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Bumps a per-day counter column pair on the service row and returns the new id
/// (`<day>r<n>`), or `None` if the service is gone. This is the first write of its transaction
/// on purpose (see the module doc).
async fn next_id(
    conn: &mut AnyConnection,
    service: &str,
    which: Counter,
) -> Result<Option<String>, ApiError> {
    let day = today();
    let (day_col, next_col) = match which {
        Counter::Config => ("config_day", "config_next"),
        Counter::Rollout => ("rollout_day", "rollout_next"),
    };
    let sql = format!(
        "UPDATE sm_services SET {next_col} = CASE WHEN {day_col} = $1 THEN {next_col} + 1 ELSE 1 END, \
         {day_col} = $1 WHERE service_name = $2 AND deleted = 0"
    );
    let done = sqlx::query(&sql)
        .bind(&day)
        .bind(service)
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() == 0 {
        return Ok(None);
    }
    let (n,): (i64,) = sqlx::query_as(&format!(
        "SELECT {next_col} FROM sm_services WHERE service_name = $1"
    ))
    .bind(service)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Some(format!("{day}r{}", n - 1)))
}

/// The id the next config would get, without consuming it (for `validateOnly`).
async fn peek_config_id(state: &AppState, service: &str) -> Result<String, ApiError> {
    let day = today();
    let row: Option<(String, i64)> =
        sqlx::query_as("SELECT config_day, config_next FROM sm_services WHERE service_name = $1")
            .bind(service)
            .fetch_optional(state.store.pool())
            .await?;
    let n = match row {
        Some((d, n)) if d == day => n,
        _ => 0,
    };
    Ok(format!("{day}r{n}"))
}

#[derive(Clone, Copy)]
enum Counter {
    Config,
    Rollout,
}

/// Bumps the service's operation counter (for `operations/services.<svc>-<N>`) and returns N.
async fn next_service_op(conn: &mut AnyConnection, service: &str) -> Result<i64, ApiError> {
    sqlx::query("UPDATE sm_services SET op_counter = op_counter + 1 WHERE service_name = $1")
        .bind(service)
        .execute(&mut *conn)
        .await?;
    let (n,): (i64,) = sqlx::query_as("SELECT op_counter FROM sm_services WHERE service_name = $1")
        .bind(service)
        .fetch_one(&mut *conn)
        .await?;
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// Services

async fn list_services(
    State(state): State<AppState>,
    principal: Principal,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    let (limit, offset) = params.page(500, 2000)?;
    let producer = params.get("producerProjectId").map(str::to_string);
    if let Some(p) = &producer {
        crate::projects::validate_project_id(p)?;
    }
    // consumerId (`project:<id>`) lists services the consumer enabled.
    let consumer = match params.get("consumerId") {
        Some(c) => Some(
            c.strip_prefix("project:")
                .ok_or_else(|| {
                    ApiError::invalid_argument(format!(
                        "Invalid consumerId '{c}': expected project:<project id>."
                    ))
                })?
                .to_string(),
        ),
        None => None,
    };
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT service_name, producer_project_id, policy FROM sm_services \
         WHERE deleted = 0 AND ($1 = '' OR producer_project_id = $1) ORDER BY service_name",
    )
    .bind(producer.clone().unwrap_or_default())
    .fetch_all(state.store.pool())
    .await?;
    let mut visible = Vec::new();
    for (name, prod, policy) in rows {
        if let Some(c) = &consumer {
            if !crate::apis::serviceusage::is_enabled(&state.store, c, &name).await? {
                continue;
            }
        }
        let allowed = match principal.member() {
            None => true,
            Some(m) => {
                serde_json::from_str::<Policy>(&policy)?.grants(&m, perms::SERVICES_GET)
                    || require_service_permission(&state, &principal, &name, perms::SERVICES_GET)
                        .await
                        .is_ok()
            }
        };
        if allowed {
            visible.push((name, prod));
        }
    }
    let total = visible.len() as i64;
    let mut page = Vec::new();
    for (name, prod) in visible
        .into_iter()
        .skip(offset as usize)
        .take(limit as usize)
    {
        let mut ms = managed_service(&name, &prod);
        // gcloud's table shows serviceConfig.title in its TITLE column.
        let title = latest_config(&state, &name)
            .await?
            .and_then(|c| c.get("title").and_then(Value::as_str).map(str::to_string));
        if let Some(t) = title {
            ms["serviceConfig"] = json!({"name": name, "title": t});
        }
        page.push(ms);
    }
    let mut out = json!({});
    if !page.is_empty() {
        out["services"] = Value::Array(page);
    }
    if offset + limit < total {
        out["nextPageToken"] = Value::String(page_token(offset + limit));
    }
    Ok(Json(out))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct CreateServiceBody {
    service_name: String,
    producer_project_id: String,
}

async fn create_service(
    State(state): State<AppState>,
    principal: Principal,
    JsonBody(body): JsonBody<CreateServiceBody>,
) -> Result<Json<Value>, ApiError> {
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

    let policy = Policy::default().normalized_for_store()?;
    let mut tx = state.store.begin_write().await?;
    let inserted = sqlx::query(
        "INSERT INTO sm_services (service_name, producer_project_id, deleted, op_counter, \
         config_day, config_next, rollout_day, rollout_next, policy, create_time) \
         VALUES ($1, $2, 0, 0, '', 0, '', 0, $3, $4) ON CONFLICT (service_name) DO NOTHING",
    )
    .bind(&name)
    .bind(&producer)
    .bind(serde_json::to_string(&policy)?)
    .bind(now_rfc3339())
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        let (deleted,): (i64,) =
            sqlx::query_as("SELECT deleted FROM sm_services WHERE service_name = $1")
                .bind(&name)
                .fetch_one(&mut *tx)
                .await?;
        return Err(if deleted != 0 {
            ApiError::failed_precondition(format!(
                "Service '{name}' was deleted; undelete it (gcloud endpoints services undelete) \
                 or choose another name."
            ))
        } else {
            ApiError::already_exists(format!("Service '{name}' already exists."))
        });
    }
    let op = operations::insert(
        &mut tx,
        &format!("operations/services.{name}-0"),
        sm_metadata(&[format!("services/{name}")]),
        Outcome::Response(with_type(
            TYPE_MANAGED_SERVICE,
            managed_service(&name, &producer),
        )),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(service = %name, producer = %producer, "service created");
    Ok(Json(op))
}

fn with_type(t: &str, v: Value) -> Value {
    let mut out = json!({"@type": t});
    if let (Some(o), Value::Object(m)) = (out.as_object_mut(), v) {
        o.extend(m);
    }
    out
}

async fn get_service(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_service_or_hide(&state, &principal, &service, perms::SERVICES_GET).await?;
    match producer_project(&state, &service).await? {
        Some(p) => Ok(Json(managed_service(&service, &p))),
        None => Err(not_found_or_denied(&service)),
    }
}

async fn delete_service(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_service_or_hide(&state, &principal, &service, perms::SERVICES_DELETE).await?;
    let mut tx = state.store.begin_write().await?;
    let done =
        sqlx::query("UPDATE sm_services SET deleted = 1 WHERE service_name = $1 AND deleted = 0")
            .bind(&service)
            .execute(&mut *tx)
            .await?;
    if done.rows_affected() == 0 {
        return Err(not_found_or_denied(&service));
    }
    let n = next_service_op(&mut tx, &service).await?;
    // Google records the deletion as a rollout with a deleteServiceStrategy.
    record_rollout(
        &mut tx,
        &service,
        json!({"deleteServiceStrategy": {}}),
        &principal,
        Counter::Rollout,
        true,
    )
    .await?;
    let op = operations::insert(
        &mut tx,
        &format!("operations/services.{service}-{n}"),
        sm_metadata(&[format!("services/{service}")]),
        Outcome::Response(json!({"@type": "type.googleapis.com/google.protobuf.Empty"})),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(service = %service, "service deleted");
    Ok(Json(op))
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
        "undelete" => undelete(&state, &principal, &service).await,
        "getIamPolicy" => get_iam_policy(&state, &principal, &service).await,
        "setIamPolicy" => {
            set_iam_policy(&state, &principal, &service, parse_json_body(&bytes)?).await
        }
        "testIamPermissions" => {
            test_iam_permissions(&state, &principal, &service, parse_json_body(&bytes)?).await
        }
        other => Err(ApiError::not_found(format!(
            "Unknown method services.{other} on service '{service}'."
        ))),
    }
}

async fn undelete(
    state: &AppState,
    principal: &Principal,
    service: &str,
) -> Result<Value, ApiError> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT producer_project_id, deleted FROM sm_services WHERE service_name = $1",
    )
    .bind(service)
    .fetch_optional(state.store.pool())
    .await?;
    let Some((producer, deleted)) = row else {
        return Err(not_found_or_denied(service));
    };
    require_project_permission(state, principal, &producer, perms::SERVICES_DELETE)
        .await
        .map_err(|_| not_found_or_denied(service))?;
    if deleted == 0 {
        return Err(ApiError::failed_precondition(format!(
            "Service '{service}' is not deleted."
        )));
    }
    let mut tx = state.store.begin_write().await?;
    let done =
        sqlx::query("UPDATE sm_services SET deleted = 0 WHERE service_name = $1 AND deleted = 1")
            .bind(service)
            .execute(&mut *tx)
            .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::aborted(format!(
            "Service '{service}' was changed concurrently; retry."
        )));
    }
    let n = next_service_op(&mut tx, service).await?;
    // The deletion left a deleteServiceStrategy rollout on top; proxies follow the newest
    // SUCCESS rollout, so put the last traffic split back in front of it.
    let last_traffic: Option<(String,)> = sqlx::query_as(
        "SELECT body FROM sm_rollouts WHERE service_name = $1 AND body LIKE '%trafficPercentStrategy%' \
         ORDER BY seq DESC LIMIT 1",
    )
    .bind(service)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((body,)) = last_traffic {
        let prev: Value = serde_json::from_str(&body)?;
        if let Some(strategy) = prev.get("trafficPercentStrategy") {
            record_rollout(
                &mut tx,
                service,
                json!({ "trafficPercentStrategy": strategy }),
                principal,
                Counter::Rollout,
                false,
            )
            .await?;
        }
    }
    let op = operations::insert(
        &mut tx,
        &format!("operations/services.{service}-{n}"),
        sm_metadata(&[format!("services/{service}")]),
        Outcome::Response(json!({
            "@type": TYPE_UNDELETE_RESPONSE,
            "service": managed_service(service, &producer),
        })),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(service = %service, "service undeleted");
    Ok(op)
}

// ---------------------------------------------------------------------------------------------
// IAM

async fn get_iam_policy(
    state: &AppState,
    principal: &Principal,
    service: &str,
) -> Result<Value, ApiError> {
    require_service_or_hide(state, principal, service, perms::SERVICES_GET_IAM).await?;
    let (policy, _) = policy_and_producer(state, service)
        .await?
        .ok_or_else(|| not_found_or_denied(service))?;
    Ok(serde_json::to_value(policy)?)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SetIamPolicyBody {
    policy: Option<Policy>,
}

async fn set_iam_policy(
    state: &AppState,
    principal: &Principal,
    service: &str,
    body: SetIamPolicyBody,
) -> Result<Value, ApiError> {
    require_service_or_hide(state, principal, service, perms::SERVICES_SET_IAM).await?;
    let Some(new) = body.policy else {
        return Err(ApiError::invalid_argument("policy is required.")
            .with_field_violation("policy", "required"));
    };
    let presented = new.etag.clone();
    let new = new.normalized_for_store()?;
    let mut tx = state.store.begin_write().await?;
    // Write first to take the row lock (and SQLite's write lock) before reading the etag.
    let touched = sqlx::query(
        "UPDATE sm_services SET policy = policy WHERE service_name = $1 AND deleted = 0",
    )
    .bind(service)
    .execute(&mut *tx)
    .await?;
    if touched.rows_affected() == 0 {
        return Err(not_found_or_denied(service));
    }
    let (current,): (String,) =
        sqlx::query_as("SELECT policy FROM sm_services WHERE service_name = $1")
            .bind(service)
            .fetch_one(&mut *tx)
            .await?;
    let current: Policy = serde_json::from_str(&current)?;
    if !crate::authz::etag_matches(&presented, &current.etag)? {
        return Err(ApiError::aborted(
            "There were concurrent policy changes. Please retry the whole read-modify-write with \
             exponential backoff.",
        ));
    }
    sqlx::query("UPDATE sm_services SET policy = $1 WHERE service_name = $2")
        .bind(serde_json::to_string(&new)?)
        .bind(service)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(service = %service, bindings = new.bindings.len(), "service IAM policy set");
    Ok(serde_json::to_value(new)?)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TestIamPermissionsBody {
    permissions: Vec<String>,
}

async fn test_iam_permissions(
    state: &AppState,
    principal: &Principal,
    service: &str,
    body: TestIamPermissionsBody,
) -> Result<Value, ApiError> {
    if producer_project(state, service).await?.is_none() {
        return Err(not_found_or_denied(service));
    }
    let mut granted = Vec::new();
    for p in body.permissions {
        if require_service_permission(state, principal, service, &p)
            .await
            .is_ok()
        {
            granted.push(p);
        }
    }
    Ok(if granted.is_empty() {
        json!({})
    } else {
        json!({ "permissions": granted })
    })
}

// ---------------------------------------------------------------------------------------------
// Configs

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct SubmitBody {
    config_source: ConfigSource,
    validate_only: bool,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ConfigSource {
    files: Vec<ConfigFile>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ConfigFile {
    file_path: String,
    file_contents: String,
    file_type: String,
}

/// [`convert_sources`] under the rules of [`Conversions`].
async fn convert_bounded(
    state: &AppState,
    service: &str,
    files: Vec<ConfigFile>,
) -> Result<(portico_config::Service, Vec<Value>), ApiError> {
    let conversions = &state.conversions;
    let started = tokio::time::Instant::now();
    let deadline = started + conversions.timeout;
    let permit = match tokio::time::timeout_at(
        deadline,
        conversions.permits.clone().acquire_owned(),
    )
    .await
    {
        Ok(Ok(p)) => p,
        Ok(Err(_)) | Err(_) => {
            return Err(ApiError::unavailable(format!(
                "The control plane is busy converting other service configs and could not start \
                 this one within {} s; try again.",
                conversions.timeout.as_secs_f64()
            )))
        }
    };
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _cancel_on_drop = CancelOnDrop(cancel.clone());
    let opts = portico_config::ConvertOptions {
        deadline: Some(deadline.into_std()),
        cancel: Some(cancel),
    };
    let timeout = conversions.timeout;
    #[cfg(test)]
    let before = conversions.before_convert.clone();
    let service = service.to_string();
    let work = move || {
        // Held until the work really ends, even when the request that started it is gone.
        let _permit = permit;
        #[cfg(test)]
        if let Some(f) = before {
            f();
        }
        convert_sources(&service, &files, &opts, timeout)
    };
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) => Err(ApiError::internal(format_args!(
            "the conversion failed: {e}"
        ))),
    }
}

/// Turns the submitted files into a config: decode, convert, check the name.
fn convert_sources(
    service: &str,
    files: &[ConfigFile],
    opts: &portico_config::ConvertOptions,
    timeout: std::time::Duration,
) -> Result<(portico_config::Service, Vec<Value>), ApiError> {
    use portico_config::openapi::{convert_with, Severity, SourceFile};
    use portico_config::Interrupted;
    if files.is_empty() {
        return Err(
            ApiError::invalid_argument("configSource.files must not be empty.")
                .with_field_violation("configSource.files", "required"),
        );
    }
    let mut sources = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        match f.file_type.as_str() {
            "OPEN_API_YAML" | "OPEN_API_JSON" => {}
            "" | "FILE_TYPE_UNSPECIFIED" => {
                return Err(ApiError::invalid_argument(format!(
                    "configSource.files[{i}].fileType is required (OPEN_API_YAML or OPEN_API_JSON)."
                )))
            }
            other => {
                return Err(ApiError::invalid_argument(format!(
                    "File type {other} of '{}' is not supported: Portico accepts OpenAPI 2.0 \
                     sources (OPEN_API_YAML, OPEN_API_JSON).",
                    f.file_path
                )))
            }
        }
        let bytes = crate::authz::decode_base64_any(&f.file_contents).ok_or_else(|| {
            ApiError::invalid_argument(format!(
                "configSource.files[{i}].fileContents is not valid base64."
            ))
        })?;
        let path = if f.file_path.is_empty() {
            format!("file{i}")
        } else {
            f.file_path.clone()
        };
        sources.push(SourceFile::new(path, bytes));
    }
    let conv = convert_with(&sources, opts).map_err(|e| {
        match e.interrupted {
            Some(Interrupted::DeadlineExceeded) => {
                return ApiError::new(
                    crate::error::Code::DeadlineExceeded,
                    format!(
                        "Converting the service config took longer than {} s and was stopped; \
                         split the API into several files or services, or try again when the \
                         control plane is less busy.",
                        timeout.as_secs_f64()
                    ),
                )
            }
            Some(Interrupted::Cancelled) => {
                return ApiError::new(
                    crate::error::Code::Cancelled,
                    "The caller went away; the conversion was stopped.",
                )
            }
            None => {}
        }
        let mut msg = String::from("Cannot convert to service config.");
        for d in e.errors() {
            msg.push('\n');
            msg.push_str(&format!("{}: {}", d.location(), d.message));
        }
        let violations: Vec<Value> = e
            .errors()
            .map(|d| json!({"field": d.location(), "description": d.message}))
            .collect();
        ApiError::invalid_argument(msg).with_detail(json!({
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": violations,
        }))
    })?;
    if conv.service.name != service {
        return Err(ApiError::invalid_argument(format!(
            "The service name '{}' in the configuration (host) does not match the service \
             '{service}' it was submitted to.",
            conv.service.name
        )));
    }
    let diagnostics = conv
        .warnings
        .iter()
        .map(|d| {
            json!({
                "location": d.location(),
                "kind": match d.severity { Severity::Warning => "WARNING", Severity::Error => "ERROR" },
                "message": d.message,
            })
        })
        .collect();
    let mut svc = conv.service;
    let has_sources = svc
        .source_info
        .as_ref()
        .is_some_and(|s| !s.source_files.is_empty());
    if !has_sources {
        svc.source_info = Some(portico_config::service::SourceInfo {
            source_files: sources
                .iter()
                .zip(files)
                .map(|(s, f)| {
                    json!({
                        "@type": TYPE_CONFIG_FILE,
                        "filePath": s.path,
                        "fileContents": base64::engine::general_purpose::STANDARD.encode(&s.contents),
                        "fileType": f.file_type,
                    })
                })
                .collect(),
        });
    }
    Ok((svc, diagnostics))
}

async fn submit_config(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
    JsonBody(body): JsonBody<SubmitBody>,
) -> Result<Json<Value>, ApiError> {
    require_service_or_hide(&state, &principal, &service, perms::SERVICES_UPDATE).await?;
    let producer = producer_project(&state, &service)
        .await?
        .ok_or_else(|| not_found_or_denied(&service))?;
    let (mut svc, diagnostics) =
        convert_bounded(&state, &service, body.config_source.files).await?;
    svc.producer_project_id = producer;
    if svc.config_version == 0 {
        svc.config_version = 3;
    }
    let op_name = format!(
        "operations/serviceConfigs.{service}:{}",
        uuid::Uuid::new_v4()
    );

    let mut tx = state.store.begin_write().await?;
    let id = if body.validate_only {
        // Nothing is stored for a validation; only the operation gcloud polls is kept.
        peek_config_id(&state, &service).await?
    } else {
        next_id(&mut tx, &service, Counter::Config)
            .await?
            .ok_or_else(|| not_found_or_denied(&service))?
    };
    svc.id = id.clone();
    // A large config takes a while to render too: off the request threads as well.
    let (config, stored) = tokio::task::spawn_blocking(move || {
        let config = serde_json::to_value(&svc)?;
        let stored = serde_json::to_string(&config)?;
        Ok::<_, serde_json::Error>((config, stored))
    })
    .await
    .map_err(|e| ApiError::internal(format_args!("rendering the config failed: {e}")))??;
    if !body.validate_only {
        let (seq,): (i64,) = sqlx::query_as(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM sm_configs WHERE service_name = $1",
        )
        .bind(&service)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO sm_configs (service_name, config_id, seq, body, create_time) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&service)
        .bind(&id)
        .bind(seq)
        .bind(stored)
        .bind(now_rfc3339())
        .execute(&mut *tx)
        .await?;
    }
    let mut response = json!({"@type": TYPE_SUBMIT_RESPONSE, "serviceConfig": config});
    let diagnostics: Vec<Value> = diagnostics;
    if !diagnostics.is_empty() {
        response["diagnostics"] = Value::Array(diagnostics);
    }
    let op = operations::insert(
        &mut tx,
        &op_name,
        sm_metadata(&[format!("services/{service}/configs/{id}")]),
        Outcome::Response(response),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(service = %service, config_id = %id, validate_only = body.validate_only, "config submitted");
    Ok(Json(op))
}

/// `view=FULL` includes `sourceInfo`; the default (BASIC) leaves it out, as Google does.
fn apply_view(mut config: Value, params: &Params) -> Result<Value, ApiError> {
    match params.get("view") {
        Some("FULL") => {}
        None | Some("BASIC") => {
            if let Some(o) = config.as_object_mut() {
                o.remove("sourceInfo");
            }
        }
        Some(v) => {
            return Err(ApiError::invalid_argument(format!(
                "Invalid view '{v}': expected BASIC or FULL."
            )))
        }
    }
    Ok(config)
}

async fn list_configs(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    require_service_or_hide(&state, &principal, &service, perms::SERVICES_GET).await?;
    let (limit, offset) = params.page(50, 100)?;
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT body FROM sm_configs WHERE service_name = $1 ORDER BY seq DESC LIMIT $2 OFFSET $3",
    )
    .bind(&service)
    .bind(limit + 1)
    .bind(offset)
    .fetch_all(state.store.pool())
    .await?;
    let more = rows.len() as i64 > limit;
    let mut configs = Vec::new();
    for (b,) in rows.into_iter().take(limit as usize) {
        let mut v: Value = serde_json::from_str(&b)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("sourceInfo");
        }
        configs.push(v);
    }
    let mut out = json!({});
    if !configs.is_empty() {
        out["serviceConfigs"] = Value::Array(configs);
    }
    if more {
        out["nextPageToken"] = Value::String(page_token(offset + limit));
    }
    Ok(Json(out))
}

async fn load_config(state: &AppState, service: &str, id: &str) -> Result<Value, ApiError> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT body FROM sm_configs WHERE service_name = $1 AND config_id = $2")
            .bind(service)
            .bind(id)
            .fetch_optional(state.store.pool())
            .await?;
    match row {
        Some((b,)) => Ok(serde_json::from_str(&b)?),
        None => Err(ApiError::not_found(format!(
            "Service configuration '{id}' not found for service '{service}'."
        ))),
    }
}

async fn get_config(
    State(state): State<AppState>,
    principal: Principal,
    Path((service, config_id)): Path<(String, String)>,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    require_service_or_hide(&state, &principal, &service, perms::SERVICES_GET).await?;
    let c = load_config(&state, &service, &config_id).await?;
    Ok(Json(apply_view(c, &params)?))
}

/// ESP's `GET /v1/services/{s}/config?configId=ID`; without an id, the newest config.
async fn get_config_esp(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    require_service_or_hide(&state, &principal, &service, perms::SERVICES_GET).await?;
    let c = match params.get("configId") {
        Some(id) => load_config(&state, &service, id).await?,
        None => latest_config(&state, &service).await?.ok_or_else(|| {
            ApiError::not_found(format!("Service '{service}' has no configuration yet."))
        })?,
    };
    Ok(Json(apply_view(c, &params)?))
}

// ---------------------------------------------------------------------------------------------
// Rollouts

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RolloutBody {
    rollout_id: String,
    traffic_percent_strategy: Option<TrafficPercentStrategy>,
    delete_service_strategy: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TrafficPercentStrategy {
    percentages: BTreeMap<String, f64>,
}

/// Inserts a rollout row (SUCCESS) and returns the Rollout JSON. `id_taken_first`: the caller
/// already holds the service row lock (deletion), so the counter bump may follow other writes.
async fn record_rollout(
    conn: &mut AnyConnection,
    service: &str,
    strategy: Value,
    principal: &Principal,
    counter: Counter,
    deleted_ok: bool,
) -> Result<Value, ApiError> {
    let id = if deleted_ok {
        // The service row was just marked deleted, so bump the counter without the liveness
        // condition next_id applies.
        let day = today();
        sqlx::query(
            "UPDATE sm_services SET rollout_next = CASE WHEN rollout_day = $1 THEN rollout_next + 1 ELSE 1 END, \
             rollout_day = $1 WHERE service_name = $2",
        )
        .bind(&day)
        .bind(service)
        .execute(&mut *conn)
        .await?;
        let (n,): (i64,) =
            sqlx::query_as("SELECT rollout_next FROM sm_services WHERE service_name = $1")
                .bind(service)
                .fetch_one(&mut *conn)
                .await?;
        format!("{day}r{}", n - 1)
    } else {
        next_id(conn, service, counter)
            .await?
            .ok_or_else(|| not_found_or_denied(service))?
    };
    insert_rollout(conn, service, &id, strategy, principal).await
}

async fn insert_rollout(
    conn: &mut AnyConnection,
    service: &str,
    id: &str,
    strategy: Value,
    principal: &Principal,
) -> Result<Value, ApiError> {
    let mut rollout = json!({
        "rolloutId": id,
        "createTime": now_rfc3339(),
        "createdBy": principal.display(),
        "status": "SUCCESS",
        "serviceName": service,
    });
    if let (Some(o), Value::Object(s)) = (rollout.as_object_mut(), strategy) {
        o.extend(s);
    }
    let (seq,): (i64,) =
        sqlx::query_as("SELECT COALESCE(MAX(seq), 0) + 1 FROM sm_rollouts WHERE service_name = $1")
            .bind(service)
            .fetch_one(&mut *conn)
            .await?;
    let inserted = sqlx::query(
        "INSERT INTO sm_rollouts (service_name, rollout_id, seq, status, body, create_time) \
         VALUES ($1, $2, $3, 'SUCCESS', $4, $5) ON CONFLICT (service_name, rollout_id) DO NOTHING",
    )
    .bind(service)
    .bind(id)
    .bind(seq)
    .bind(serde_json::to_string(&rollout)?)
    .bind(now_rfc3339())
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(ApiError::already_exists(format!(
            "Rollout '{id}' already exists for service '{service}'."
        )));
    }
    Ok(rollout)
}

async fn create_rollout(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
    JsonBody(body): JsonBody<RolloutBody>,
) -> Result<Json<Value>, ApiError> {
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
    let generated = next_id(&mut tx, &service, Counter::Rollout)
        .await?
        .ok_or_else(|| not_found_or_denied(&service))?;
    for id in strategy.percentages.keys() {
        let found: Option<(String,)> = sqlx::query_as(
            "SELECT config_id FROM sm_configs WHERE service_name = $1 AND config_id = $2",
        )
        .bind(&service)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if found.is_none() {
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
    let rollout = insert_rollout(
        &mut tx,
        &service,
        &id,
        json!({"trafficPercentStrategy": {"percentages": strategy.percentages}}),
        &principal,
    )
    .await?;
    let op = operations::insert(
        &mut tx,
        &format!("operations/rollouts.{service}:{}", uuid::Uuid::new_v4()),
        sm_metadata(&[format!("services/{service}/rollouts/{id}")]),
        Outcome::Response(with_type(TYPE_ROLLOUT, rollout)),
    )
    .await?;
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

async fn list_rollouts(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    require_service_or_hide(&state, &principal, &service, perms::SERVICES_GET).await?;
    let statuses = parse_status_filter(params.get("filter"))?;
    let (limit, offset) = params.page(50, 100)?;
    // Statuses come from a fixed whitelist (parse_status_filter), so inlining them is safe;
    // proxies poll this with pageSize=1, so paging happens in SQL.
    let status_clause = match &statuses {
        Some(v) => format!(
            " AND status IN ({})",
            v.iter()
                .map(|s| format!("'{s}'"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => String::new(),
    };
    let rows: Vec<(String,)> = sqlx::query_as(&format!(
        "SELECT body FROM sm_rollouts WHERE service_name = $1{status_clause} \
         ORDER BY seq DESC LIMIT $2 OFFSET $3"
    ))
    .bind(&service)
    .bind(limit + 1)
    .bind(offset)
    .fetch_all(state.store.pool())
    .await?;
    let more = rows.len() as i64 > limit;
    let mut rollouts = Vec::new();
    for (b,) in rows.into_iter().take(limit as usize) {
        rollouts.push(serde_json::from_str::<Value>(&b)?);
    }
    let mut out = json!({});
    if !rollouts.is_empty() {
        out["rollouts"] = Value::Array(rollouts);
    }
    if more {
        out["nextPageToken"] = Value::String(page_token(offset + limit));
    }
    Ok(Json(out))
}

async fn get_rollout(
    State(state): State<AppState>,
    principal: Principal,
    Path((service, rollout_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    require_service_or_hide(&state, &principal, &service, perms::SERVICES_GET).await?;
    let row: Option<(String,)> =
        sqlx::query_as("SELECT body FROM sm_rollouts WHERE service_name = $1 AND rollout_id = $2")
            .bind(&service)
            .bind(&rollout_id)
            .fetch_optional(state.store.pool())
            .await?;
    match row {
        Some((b,)) => Ok(Json(serde_json::from_str(&b)?)),
        None => Err(ApiError::not_found(format!(
            "Rollout '{rollout_id}' not found for service '{service}'."
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// generateConfigReport

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ConfigReportBody {
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

async fn generate_config_report(
    State(state): State<AppState>,
    principal: Principal,
    JsonBody(body): JsonBody<ConfigReportBody>,
) -> Result<Json<Value>, ApiError> {
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
    let mut out = json!({"serviceName": service, "id": id});
    if !changes.is_empty() {
        out["changeReports"] = json!([{ "configChanges": changes }]);
    }
    Ok(Json(out))
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

    use crate::app::test_support::{env, TestEnv};
    use axum::http::{Method, StatusCode};

    const SVC: &str = "echo-api.endpoints.demo-proj.cloud.goog";
    const ECHO: &str =
        include_str!("../../../../tests/fixtures/servicemanagement/echo-openapi.yaml");
    const ECHO_V2: &str =
        include_str!("../../../../tests/fixtures/servicemanagement/echo-openapi-v2.yaml");
    const BROKEN: &str =
        include_str!("../../../../tests/fixtures/servicemanagement/broken-openapi.yaml");

    fn submit_body(spec: &str, validate_only: bool) -> Value {
        json!({"configSource": {"files": [{
            "filePath": "openapi.yaml",
            // gcloud sends URL-safe base64.
            "fileContents": base64::engine::general_purpose::URL_SAFE.encode(spec),
            "fileType": "OPEN_API_YAML"}]},
            "validateOnly": validate_only})
    }

    async fn create(e: &TestEnv) {
        let (st, op) = e
            .admin(
                Method::POST,
                "/v1/services?alt=json",
                Some(json!({"serviceName": SVC, "producerProjectId": "demo-proj"})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{op}");
        assert_eq!(op["name"], format!("operations/services.{SVC}-0"));
        assert_eq!(op["done"], true);
        assert_eq!(op["response"]["producerProjectId"], "demo-proj");
    }

    async fn submit(e: &TestEnv, spec: &str) -> String {
        let (st, op) = e
            .admin(
                Method::POST,
                &format!("/v1/services/{SVC}/configs:submit"),
                Some(submit_body(spec, false)),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{op}");
        op["response"]["serviceConfig"]["id"]
            .as_str()
            .expect("config id")
            .to_string()
    }

    #[tokio::test]
    async fn deploy_flow_ids_listing_rollouts_and_operations() {
        let e = env().await;
        let (st, err) = e
            .admin(Method::GET, &format!("/v1/services/{SVC}"), None)
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        assert_eq!(err["error"]["status"], "PERMISSION_DENIED");
        create(&e).await;
        let (st, _) = e
            .admin(
                Method::POST,
                "/v1/services",
                Some(json!({"serviceName": SVC, "producerProjectId": "demo-proj"})),
            )
            .await;
        assert_eq!(st, StatusCode::CONFLICT);

        let day = today();
        let r0 = submit(&e, ECHO).await;
        assert_eq!(r0, format!("{day}r0"));
        let r1 = submit(&e, ECHO_V2).await;
        assert_eq!(r1, format!("{day}r1"));

        // Newest first, paginated.
        let (st, page) = e
            .admin(
                Method::GET,
                &format!("/v1/services/{SVC}/configs?pageSize=1"),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(page["serviceConfigs"][0]["id"], r1.as_str());
        let tok = page["nextPageToken"].as_str().expect("token").to_string();
        let (_, page2) = e
            .admin(
                Method::GET,
                &format!("/v1/services/{SVC}/configs?pageSize=1&pageToken={tok}"),
                None,
            )
            .await;
        assert_eq!(page2["serviceConfigs"][0]["id"], r0.as_str());
        assert!(page2.get("nextPageToken").is_none());

        let (st, cfg) = e
            .admin(
                Method::GET,
                &format!("/v1/services/{SVC}/configs/{r0}"),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(cfg["name"], SVC);
        assert_eq!(cfg["producerProjectId"], "demo-proj");
        assert!(cfg.get("sourceInfo").is_none());
        let (_, full) = e
            .admin(
                Method::GET,
                &format!("/v1/services/{SVC}/configs/{r0}?view=FULL"),
                None,
            )
            .await;
        let src = full["sourceInfo"]["sourceFiles"][0]["fileContents"]
            .as_str()
            .expect("source");
        assert_eq!(
            crate::authz::decode_base64_any(src).expect("b64"),
            ECHO.as_bytes()
        );
        let (_, latest) = e
            .admin(Method::GET, &format!("/v1/services/{SVC}/config"), None)
            .await;
        assert_eq!(latest["id"], r1.as_str());
        let (_, by_id) = e
            .admin(
                Method::GET,
                &format!("/v1/services/{SVC}/config?configId={r0}"),
                None,
            )
            .await;
        assert_eq!(by_id["id"], r0.as_str());
        let (st, nf) = e
            .admin(
                Method::GET,
                &format!("/v1/services/{SVC}/configs/2020-01-01r9"),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        assert_eq!(
            nf["error"]["message"],
            format!("Service configuration '2020-01-01r9' not found for service '{SVC}'.")
        );

        // Rollouts: unknown config rejected, then one per config, newest first.
        let (st, _) = e
            .admin(
                Method::POST,
                &format!("/v1/services/{SVC}/rollouts"),
                Some(json!({"trafficPercentStrategy": {"percentages": {"nope": 100.0}}})),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        let mut rollout_op = String::new();
        for id in [&r0, &r1] {
            let (st, op) = e
                .admin(
                    Method::POST,
                    &format!("/v1/services/{SVC}/rollouts"),
                    Some(json!({"serviceName": SVC,
                        "trafficPercentStrategy": {"percentages": {id.as_str(): 100.0}}})),
                )
                .await;
            assert_eq!(st, StatusCode::OK, "{op}");
            assert_eq!(op["response"]["status"], "SUCCESS");
            rollout_op = op["name"].as_str().expect("name").to_string();
        }
        let (_, ro) = e
            .admin(
                Method::GET,
                &format!("/v1/services/{SVC}/rollouts?filter=status%3DSUCCESS&pageSize=1"),
                None,
            )
            .await;
        assert_eq!(
            ro["rollouts"][0]["trafficPercentStrategy"]["percentages"][r1.as_str()],
            100.0
        );
        assert!(ro["nextPageToken"].is_string());
        let rid = ro["rollouts"][0]["rolloutId"]
            .as_str()
            .expect("id")
            .to_string();
        assert_eq!(rid, format!("{day}r1"));
        let (st, _) = e
            .admin(
                Method::GET,
                &format!("/v1/services/{SVC}/rollouts/{rid}"),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK);

        // Operations: percent-encoded ':' and an API prefix, with or without `operations/`.
        let id = rollout_op
            .trim_start_matches("operations/")
            .replace(':', "%3A");
        let (st, op) = e
            .admin(
                Method::GET,
                &format!("/servicemanagement/v1/operations/{id}?alt=json"),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{op}");
        assert_eq!(op["name"], rollout_op.as_str());
        assert_eq!(op["done"], true);

        // Generate config report: identical configs → no changes; r0 → r1 lists added rules.
        let cref = |id: &str| json!({"@type": TYPE_CONFIG_REF, "name": format!("services/{SVC}/configs/{id}")});
        let (st, rep) = e
            .admin(
                Method::POST,
                "/v1/services:generateConfigReport",
                Some(json!({"newConfig": cref(&r1), "oldConfig": cref(&r1)})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{rep}");
        assert!(rep.get("changeReports").is_none());
        let (_, rep) = e
            .admin(
                Method::POST,
                "/v1/services:generateConfigReport",
                Some(json!({"newConfig": cref(&r1), "oldConfig": cref(&r0)})),
            )
            .await;
        let changes = rep["changeReports"][0]["configChanges"]
            .as_array()
            .expect("changes");
        assert!(changes.iter().any(|c| c["changeType"] == "ADDED"
            && c["element"]
                .as_str()
                .unwrap_or("")
                .starts_with("http.rules[")));
    }

    /// A spec with `paths` operations, big enough that the converter reads the clock often.
    fn many_paths(n: usize) -> String {
        let mut paths = String::from("paths:\n");
        for i in 0..n {
            paths.push_str(&format!(
                "  /gen{i}:\n    get:\n      operationId: gen{i}\n      responses:\n        '200':\n          description: ok\n"
            ));
        }
        ECHO.replacen("paths:\n", &paths, 1)
    }

    /// Issue 14 item 10: a conversion is bounded in time, with a clear error, and stores
    /// nothing.
    #[tokio::test]
    async fn a_conversion_past_its_time_bound_fails_clearly() {
        let e = crate::app::test_support::env_customized(|s| {
            s.conversions = Conversions::new(1, std::time::Duration::from_nanos(1));
        })
        .await;
        create(&e).await;
        let (st, err) = e
            .admin(
                Method::POST,
                &format!("/v1/services/{SVC}/configs:submit"),
                Some(submit_body(&many_paths(500), false)),
            )
            .await;
        assert_eq!(st, StatusCode::GATEWAY_TIMEOUT, "{}", err["error"]);
        assert_eq!(err["error"]["status"], "DEADLINE_EXCEEDED");
        let msg = err["error"]["message"].as_str().expect("message");
        assert!(
            msg.starts_with(
                "Converting the service config took longer than 0.000000001 s and was stopped;"
            ),
            "{msg}"
        );
        let (_, list) = e
            .admin(Method::GET, &format!("/v1/services/{SVC}/configs"), None)
            .await;
        assert!(list.get("serviceConfigs").is_none(), "{list}");
    }

    /// A hook that holds each conversion until the test releases it (or 10 s pass), and says
    /// whether the test released it.
    struct Hold {
        entered: tokio::sync::mpsc::UnboundedReceiver<()>,
        release: std::sync::mpsc::Sender<()>,
        released_by_test: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    fn hold() -> (Hold, std::sync::Arc<dyn Fn() + Send + Sync>) {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let (entered_tx, entered) = tokio::sync::mpsc::unbounded_channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let released_by_test = Arc::new(AtomicBool::new(false));
        let flag = released_by_test.clone();
        let hook = move || {
            let _ = entered_tx.send(());
            // The bound only matters when the conversion blocks the thread the test runs on
            // (the bug): then the test cannot release it, and this gives up.
            let released = release_rx
                .lock()
                .is_ok_and(|rx| rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok());
            flag.store(released, Ordering::SeqCst);
        };
        (
            Hold {
                entered,
                release,
                released_by_test,
            },
            Arc::new(hook),
        )
    }

    /// Issue 14 item 10: while a conversion runs, unrelated requests are answered. The test
    /// runs on a single-threaded runtime: a conversion on that thread would hold everything.
    #[tokio::test(flavor = "current_thread")]
    async fn unrelated_requests_are_answered_while_a_conversion_runs() {
        let (mut hold, hook) = hold();
        let e = std::sync::Arc::new(
            crate::app::test_support::env_customized(|s| {
                s.conversions.before_convert = Some(hook);
            })
            .await,
        );
        create(&e).await;
        let e2 = e.clone();
        let submit = tokio::spawn(async move {
            e2.admin(
                Method::POST,
                &format!("/v1/services/{SVC}/configs:submit"),
                Some(submit_body(ECHO, false)),
            )
            .await
        });
        hold.entered.recv().await.expect("the conversion started");
        // The conversion is now held: these are answered meanwhile.
        let (st, _) = e.call(Method::GET, "/metrics", None, None).await;
        assert_eq!(st, StatusCode::OK);
        let (st, _) = e
            .admin(Method::GET, &format!("/v1/services/{SVC}"), None)
            .await;
        assert_eq!(st, StatusCode::OK);
        let _ = hold.release.send(());
        let (st, op) = submit.await.expect("submit task");
        assert_eq!(st, StatusCode::OK, "{op}");
        assert!(
            hold.released_by_test
                .load(std::sync::atomic::Ordering::SeqCst),
            "the conversion blocked the runtime: /metrics was only answered after it gave up"
        );
    }

    /// Conversions beyond the bound wait for a turn, within the same time limit.
    #[tokio::test]
    async fn concurrent_conversions_are_bounded() {
        let (mut hold, hook) = hold();
        let e = std::sync::Arc::new(
            crate::app::test_support::env_customized(|s| {
                s.conversions = Conversions::new(1, std::time::Duration::from_millis(300));
                s.conversions.before_convert = Some(hook);
            })
            .await,
        );
        create(&e).await;
        let e2 = e.clone();
        let first = tokio::spawn(async move {
            e2.admin(
                Method::POST,
                &format!("/v1/services/{SVC}/configs:submit"),
                Some(submit_body(ECHO, false)),
            )
            .await
        });
        hold.entered
            .recv()
            .await
            .expect("the first conversion started");
        // The only permit is held until this test releases it: the second cannot start.
        let (st, err) = e
            .admin(
                Method::POST,
                &format!("/v1/services/{SVC}/configs:submit"),
                Some(submit_body(ECHO, false)),
            )
            .await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{err}");
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("The control plane is busy converting other service configs"),
            "{err}"
        );
        let _ = hold.release.send(());
        // The first ran past its own limit while held.
        let (st, err) = first.await.expect("first submit");
        assert_eq!(st, StatusCode::GATEWAY_TIMEOUT, "{err}");
    }

    /// Issue 14 items 9 and 11 through the API: 400 naming the file and line.
    #[tokio::test]
    async fn hostile_specs_are_refused_with_file_and_line() {
        let e = env().await;
        create(&e).await;
        let mut bomb = ECHO.to_string();
        bomb.push_str("x-bomb:\n  l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let refs = vec![format!("*l{}", i - 1); 10].join(", ");
            bomb.push_str(&format!("  l{i}: &l{i} [{refs}]\n"));
        }
        let bomb_line = ECHO.lines().count() + 7;
        let deadline = ECHO.replace(
            "paths:\n",
            "x-google-backend:\n  address: https://b.example.com\n  deadline: 1e300\npaths:\n",
        );
        assert_ne!(deadline, ECHO);
        let deadline_line = deadline
            .lines()
            .position(|l| l.contains("1e300"))
            .expect("line")
            + 1;
        for (spec, expected) in [
            (
                bomb,
                format!("openapi.yaml:{bomb_line}:"),
            ),
            (
                deadline,
                format!("openapi.yaml:{deadline_line}:13: x-google-backend deadline 1e300 is out of range"),
            ),
        ] {
            let (st, err) = e
                .admin(
                    Method::POST,
                    &format!("/v1/services/{SVC}/configs:submit"),
                    Some(submit_body(&spec, false)),
                )
                .await;
            assert_eq!(st, StatusCode::BAD_REQUEST, "{err}");
            let msg = err["error"]["message"].as_str().expect("message");
            assert!(
                msg.starts_with(&format!("Cannot convert to service config.\n{expected}")),
                "{msg}"
            );
        }
    }

    #[tokio::test]
    async fn validate_only_and_rejected_specs_store_nothing() {
        let e = env().await;
        create(&e).await;
        let (st, op) = e
            .admin(
                Method::POST,
                &format!("/v1/services/{SVC}/configs:submit"),
                Some(submit_body(ECHO, true)),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{op}");
        assert_eq!(
            op["response"]["serviceConfig"]["id"],
            format!("{}r0", today())
        );
        let (st, err) = e
            .admin(
                Method::POST,
                &format!("/v1/services/{SVC}/configs:submit"),
                Some(submit_body(BROKEN, false)),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{err}");
        assert_eq!(err["error"]["status"], "INVALID_ARGUMENT");
        let msg = err["error"]["message"].as_str().expect("message");
        assert!(
            msg.starts_with("Cannot convert to service config.\nopenapi.yaml:"),
            "{msg}"
        );
        let (_, list) = e
            .admin(Method::GET, &format!("/v1/services/{SVC}/configs"), None)
            .await;
        assert!(list.get("serviceConfigs").is_none(), "{list}");
        // Neither consumed an id.
        assert_eq!(submit(&e, ECHO).await, format!("{}r0", today()));
        // A spec for another host is refused.
        let other = ECHO.replace("echo-api.endpoints", "other-api.endpoints");
        let (st, _) = e
            .admin(
                Method::POST,
                &format!("/v1/services/{SVC}/configs:submit"),
                Some(submit_body(&other, false)),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn iam_policy_etags_and_service_account_permissions() {
        let e = env().await;
        create(&e).await;
        let r0 = submit(&e, ECHO).await;
        let sa = "sa:echo-sa@demo-proj.iam.gserviceaccount.com";
        let cfg_uri = format!("/v1/services/{SVC}/config?configId={r0}");

        let (st, body) = e.call(Method::GET, &cfg_uri, None, None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"]["status"], "UNAUTHENTICATED");
        let (st, _) = e.call(Method::GET, &cfg_uri, Some("wrong"), None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        let (st, _) = e.call(Method::GET, &cfg_uri, Some(sa), None).await;
        assert_eq!(st, StatusCode::FORBIDDEN);

        let (st, pol) = e
            .admin(
                Method::POST,
                &format!("/v1/services/{SVC}:getIamPolicy"),
                Some(json!({})),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let etag = pol["etag"].as_str().expect("etag").to_string();
        let url_safe = base64::engine::general_purpose::URL_SAFE
            .encode(crate::authz::decode_base64_any(&etag).expect("b64"));
        let binding = json!([{"role": "roles/servicemanagement.serviceController",
            "members": ["serviceAccount:echo-sa@demo-proj.iam.gserviceaccount.com"]}]);
        let (st, body) = e
            .admin(
                Method::POST,
                &format!("/v1/services/{SVC}:setIamPolicy"),
                Some(json!({"policy": {"bindings": binding, "etag": url_safe, "version": 1}})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{body}");
        assert_ne!(body["etag"], etag.as_str());
        // The old etag is now stale.
        let (st, body) = e
            .admin(
                Method::POST,
                &format!("/v1/services/{SVC}:setIamPolicy"),
                Some(json!({"policy": {"bindings": [], "etag": etag, "version": 1}})),
            )
            .await;
        assert_eq!(st, StatusCode::CONFLICT);
        assert_eq!(body["error"]["status"], "ABORTED");

        let (st, cfg) = e.call(Method::GET, &cfg_uri, Some(sa), None).await;
        assert_eq!(st, StatusCode::OK, "{cfg}");
        assert_eq!(cfg["id"], r0.as_str());
        // serviceController reads but does not write.
        let (st, _) = e
            .call(
                Method::POST,
                &format!("/v1/services/{SVC}/configs:submit"),
                Some(sa),
                Some(submit_body(ECHO, false)),
            )
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        let (st, _) = e
            .call(
                Method::GET,
                &cfg_uri,
                Some("sa:other@demo-proj.iam.gserviceaccount.com"),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn concurrent_submits_get_distinct_ids() {
        concurrent_submits(std::sync::Arc::new(env().await)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_submits_get_distinct_ids_postgres() {
        let Some(e) = crate::app::test_support::env_pg("concurrent_submits_postgres").await else {
            return;
        };
        let e = std::sync::Arc::new(e);
        concurrent_submits(e.clone()).await;
        e.drop_pg_schema().await;
    }

    /// Two control planes on one PostgreSQL schema: ids stay unique across replicas and each
    /// sees what the other wrote (policies included).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_share_postgres() {
        use crate::app::test_support::env_pg_schema;
        let schema = format!("cp_{}", uuid::Uuid::new_v4().simple());
        let Some(a) = env_pg_schema("two_replicas_share_postgres", &schema).await else {
            return;
        };
        let b = env_pg_schema("two_replicas_share_postgres", &schema)
            .await
            .expect("second replica");
        create(&a).await;
        let (ta, tb) = tokio::join!(submit(&a, ECHO), submit(&b, ECHO_V2));
        assert_ne!(ta, tb);
        let (_, list) = b
            .admin(Method::GET, &format!("/v1/services/{SVC}/configs"), None)
            .await;
        assert_eq!(list["serviceConfigs"].as_array().map(Vec::len), Some(2));
        let (_, pol) = a
            .admin(
                Method::POST,
                &format!("/v1/services/{SVC}:getIamPolicy"),
                None,
            )
            .await;
        let (st, _) = b
            .admin(
                Method::POST,
                &format!("/v1/services/{SVC}:setIamPolicy"),
                Some(json!({"policy": {"etag": pol["etag"], "bindings": [
                    {"role": "roles/servicemanagement.serviceController",
                     "members": ["serviceAccount:esp@demo-proj.iam.gserviceaccount.com"]}]}})),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        // Replica A's view of the etag is now stale.
        let (st, _) = a
            .admin(
                Method::POST,
                &format!("/v1/services/{SVC}:setIamPolicy"),
                Some(json!({"policy": {"etag": pol["etag"], "bindings": []}})),
            )
            .await;
        assert_eq!(st, StatusCode::CONFLICT);
        let (st, _) = a
            .call(
                Method::GET,
                &format!("/v1/services/{SVC}/configs/{ta}"),
                Some("sa:esp@demo-proj.iam.gserviceaccount.com"),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        a.drop_pg_schema().await;
    }

    async fn concurrent_submits(e: std::sync::Arc<TestEnv>) {
        create(&e).await;
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let e = e.clone();
            tasks.push(tokio::spawn(async move { submit(&e, ECHO).await }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.expect("task"));
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 6, "{ids:?}");
        let (_, list) = e
            .admin(Method::GET, &format!("/v1/services/{SVC}/configs"), None)
            .await;
        assert_eq!(list["serviceConfigs"].as_array().map(Vec::len), Some(6));
    }

    #[tokio::test]
    async fn delete_and_undelete() {
        let e = env().await;
        create(&e).await;
        let r0 = submit(&e, ECHO).await;
        let (st, _) = e
            .admin(
                Method::POST,
                &format!("/v1/services/{SVC}/rollouts"),
                Some(json!({"trafficPercentStrategy": {"percentages": {r0.as_str(): 100.0}}})),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let (st, op) = e
            .admin(Method::DELETE, &format!("/v1/services/{SVC}"), None)
            .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(op["name"], format!("operations/services.{SVC}-1"));
        let (st, _) = e
            .admin(Method::GET, &format!("/v1/services/{SVC}"), None)
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        let (_, list) = e
            .admin(
                Method::GET,
                "/v1/services?producerProjectId=demo-proj",
                None,
            )
            .await;
        assert!(list.get("services").is_none());
        let (st, op) = e
            .admin(Method::POST, &format!("/v1/services/{SVC}:undelete"), None)
            .await;
        assert_eq!(st, StatusCode::OK, "{op}");
        assert_eq!(op["name"], format!("operations/services.{SVC}-2"));
        assert_eq!(op["response"]["service"]["serviceName"], SVC);
        let (_, list) = e
            .admin(
                Method::GET,
                "/v1/services?producerProjectId=demo-proj",
                None,
            )
            .await;
        assert_eq!(list["services"][0]["serviceName"], SVC);
        let (st, _) = e
            .admin(Method::POST, &format!("/v1/services/{SVC}:undelete"), None)
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        // Newest first: the restored traffic split, the deletion, the original rollout.
        let (_, ro) = e
            .admin(Method::GET, &format!("/v1/services/{SVC}/rollouts"), None)
            .await;
        let ro = ro["rollouts"].as_array().expect("rollouts").clone();
        assert_eq!(ro.len(), 3);
        assert_eq!(
            ro[0]["trafficPercentStrategy"]["percentages"][r0.as_str()],
            100.0
        );
        assert!(ro[1].get("deleteServiceStrategy").is_some());
        assert_eq!(
            latest_rollout_id(&e.state, SVC).await.unwrap().as_deref(),
            ro[0]["rolloutId"].as_str()
        );
    }

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
