//! Configs: `configs:submit` (OpenAPI sources, or a gRPC descriptor set + api_config.yaml files,
//! converted by the config crate, off the request
//! threads and within [`Conversions`]' bounds), list, get, and ESP's `/config`.
//!
//! Handlers only (see the parent module's layer rule); storage goes through `crate::store`.

use axum::extract::{Path, State};
use axum::Json;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{not_found_or_denied, operation, require_service_or_hide, Any};
use crate::app::{page_token, AppState, JsonBody, Params};
use crate::authz::{perms, Principal};
use crate::error::ApiError;
use crate::store::configs::{self as configs_store, Rendered};
use crate::store::operations::Operation;
use crate::store::services as services_store;

const TYPE_SUBMIT_RESPONSE: &str =
    "type.googleapis.com/google.api.servicemanagement.v1.SubmitConfigSourceResponse";
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
    /// Runs on the converting thread before each conversion; tests hold a conversion here to
    /// watch what the server does meanwhile.
    pub before_convert: Option<std::sync::Arc<dyn Fn() + Send + Sync>>,
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

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub(super) struct SubmitBody {
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
) -> Result<(portico_config::Service, Vec<Diagnostic>), ApiError> {
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
    let before = conversions.before_convert.clone();
    let service = service.to_string();
    let work = move || {
        // Held until the work really ends, even when the request that started it is gone.
        let _permit = permit;
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

/// Which converter a submission goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SourceKind {
    OpenApi,
    Grpc(portico_config::grpc::FileType),
}

/// Turns the submitted files into a config: decode, convert, check the name.
fn convert_sources(
    service: &str,
    files: &[ConfigFile],
    opts: &portico_config::ConvertOptions,
    timeout: std::time::Duration,
) -> Result<(portico_config::Service, Vec<Diagnostic>), ApiError> {
    use portico_config::grpc::{FileType, GrpcSource};
    use portico_config::openapi::{convert_with, Severity, SourceFile};
    use portico_config::Interrupted;
    if files.is_empty() {
        return Err(
            ApiError::invalid_argument("configSource.files must not be empty.")
                .with_field_violation("configSource.files", "required"),
        );
    }
    let mut sources = Vec::with_capacity(files.len());
    let mut kinds = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        let kind = match f.file_type.as_str() {
            "OPEN_API_YAML" | "OPEN_API_JSON" => SourceKind::OpenApi,
            "" | "FILE_TYPE_UNSPECIFIED" => {
                return Err(ApiError::invalid_argument(format!(
                    "configSource.files[{i}].fileType is required (OPEN_API_YAML, OPEN_API_JSON, \
                     SERVICE_CONFIG_YAML, FILE_DESCRIPTOR_SET_PROTO or PROTO_FILE)."
                )))
            }
            other => match FileType::from_name(other) {
                Some(t) => SourceKind::Grpc(t),
                None => {
                    return Err(ApiError::invalid_argument(format!(
                        "File type {other} of '{}' is not supported: Portico accepts OpenAPI 2.0 and 3.x \
                         sources (OPEN_API_YAML, OPEN_API_JSON) or gRPC sources \
                         (SERVICE_CONFIG_YAML, FILE_DESCRIPTOR_SET_PROTO, PROTO_FILE).",
                        f.file_path
                    )))
                }
            },
        };
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
        kinds.push(kind);
    }
    let openapi: Vec<&str> = sources
        .iter()
        .zip(&kinds)
        .filter(|(_, k)| **k == SourceKind::OpenApi)
        .map(|(s, _)| s.path.as_str())
        .collect();
    let grpc = openapi.len() < sources.len();
    if grpc && !openapi.is_empty() {
        let others: Vec<&str> = sources
            .iter()
            .zip(&kinds)
            .filter(|(_, k)| **k != SourceKind::OpenApi)
            .map(|(s, _)| s.path.as_str())
            .collect();
        return Err(ApiError::invalid_argument(format!(
            "OpenAPI files ({}) and gRPC service files ({}) cannot be deployed together: a \
             service is described either by OpenAPI or by a descriptor set and api_config.yaml.",
            openapi.join(", "),
            others.join(", ")
        )));
    }
    let converted = if grpc {
        let grpc_sources: Vec<GrpcSource> = sources
            .iter()
            .zip(&kinds)
            .filter_map(|(s, k)| match k {
                SourceKind::Grpc(t) => Some(GrpcSource {
                    file_type: *t,
                    file: s.clone(),
                }),
                SourceKind::OpenApi => None,
            })
            .collect();
        portico_config::grpc::convert_with(&grpc_sources, opts)
    } else {
        convert_with(&sources, opts)
    };
    let conv = converted.map_err(|e| {
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
            msg.push_str(&d.to_string());
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
            "The service name '{}' in the configuration ({}) does not match the service \
             '{service}' it was submitted to.",
            conv.service.name,
            if grpc {
                "name"
            } else {
                "host; in OpenAPI 3.x the url of the server with x-google-endpoint"
            }
        )));
    }
    let diagnostics = conv
        .warnings
        .iter()
        .map(|d| Diagnostic {
            location: d.location(),
            kind: match d.severity {
                Severity::Warning => "WARNING",
                Severity::Error => "ERROR",
            },
            message: d.message.clone(),
        })
        .collect();
    let mut svc = conv.service;
    let has_sources = svc
        .source_info
        .as_ref()
        .is_some_and(|s| !s.source_files.is_empty());
    if !has_sources {
        let source_files = sources
            .iter()
            .zip(files)
            .map(|(s, f)| {
                serde_json::to_value(Any::new(
                    TYPE_CONFIG_FILE,
                    SourceFileOut {
                        file_path: &s.path,
                        file_contents: base64::engine::general_purpose::STANDARD
                            .encode(&s.contents),
                        file_type: &f.file_type,
                    },
                ))
            })
            .collect::<Result<_, _>>()?;
        svc.source_info = Some(portico_config::service::SourceInfo { source_files });
    }
    Ok((svc, diagnostics))
}

/// `google.api.servicemanagement.v1.ConfigFile`, as kept in a config's `sourceInfo`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SourceFileOut<'a> {
    file_path: &'a str,
    file_contents: String,
    file_type: &'a str,
}

/// `google.api.servicemanagement.v1.Diagnostic`: a conversion warning.
#[derive(Serialize)]
pub(super) struct Diagnostic {
    location: String,
    kind: &'static str,
    message: String,
}

/// `google.api.servicemanagement.v1.SubmitConfigSourceResponse`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SubmitConfigSourceResponse {
    service_config: Value,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    diagnostics: Vec<Diagnostic>,
}

/// Checks and converts in the handler; the id, the stored config and the operation are one
/// store call ([`configs_store::submit`]), one transaction.
pub(super) async fn submit_config(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
    JsonBody(body): JsonBody<SubmitBody>,
) -> Result<Json<Operation>, ApiError> {
    require_service_or_hide(&state, &principal, &service, perms::SERVICES_UPDATE).await?;
    let producer = services_store::producer_project(&state.store, &service)
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
    let validate_only = body.validate_only;
    let resource_prefix = format!("services/{service}/configs/");
    let render = move |id: String| async move {
        svc.id = id.clone();
        // A large config takes a while to render too: off the request threads as well.
        let (config, stored) = tokio::task::spawn_blocking(move || {
            let config = serde_json::to_value(&svc)?;
            let stored = serde_json::to_string(&config)?;
            Ok::<_, serde_json::Error>((config, stored))
        })
        .await
        .map_err(|e| ApiError::internal(format_args!("rendering the config failed: {e}")))??;
        let operation = operation(
            op_name,
            format!("{resource_prefix}{id}"),
            Any::new(
                TYPE_SUBMIT_RESPONSE,
                SubmitConfigSourceResponse {
                    service_config: config,
                    diagnostics,
                },
            ),
        )?;
        Ok::<_, ApiError>(Rendered {
            config: stored,
            operation,
        })
    };
    let (id, op) = configs_store::submit(&state.store, &service, validate_only, render)
        .await?
        .ok_or_else(|| not_found_or_denied(&service))?;
    tracing::info!(service = %service, config_id = %id, validate_only, "config submitted");
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

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ListServiceConfigsResponse {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    service_configs: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_page_token: Option<String>,
}

pub(super) async fn list_configs(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
    params: Params,
) -> Result<Json<ListServiceConfigsResponse>, ApiError> {
    require_service_or_hide(&state, &principal, &service, perms::SERVICES_GET).await?;
    let (limit, offset) = params.page(50, 100)?;
    let mut service_configs =
        configs_store::list(&state.store, &service, limit + 1, offset).await?;
    let more = service_configs.len() as i64 > limit;
    service_configs.truncate(limit as usize);
    for c in &mut service_configs {
        if let Some(o) = c.as_object_mut() {
            o.remove("sourceInfo");
        }
    }
    Ok(Json(ListServiceConfigsResponse {
        service_configs,
        next_page_token: more.then(|| page_token(offset + limit)),
    }))
}

/// One config of `service`, or NOT_FOUND naming it.
pub(super) async fn load_config(
    state: &AppState,
    service: &str,
    id: &str,
) -> Result<Value, ApiError> {
    configs_store::get(&state.store, service, id)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "Service configuration '{id}' not found for service '{service}'."
            ))
        })
}

pub(super) async fn get_config(
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
pub(super) async fn get_config_esp(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    require_service_or_hide(&state, &principal, &service, perms::SERVICES_GET).await?;
    let c = match params.get("configId") {
        Some(id) => load_config(&state, &service, id).await?,
        None => configs_store::latest(&state.store, &service)
            .await?
            .ok_or_else(|| {
                ApiError::not_found(format!("Service '{service}' has no configuration yet."))
            })?,
    };
    Ok(Json(apply_view(c, &params)?))
}
