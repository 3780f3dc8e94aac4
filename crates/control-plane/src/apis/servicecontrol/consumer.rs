//! Who is consuming: `consumerId` (`api_key:<key>`, `project:<id>`, `project_number:<n>`)
//! resolved to a consumer project, and the service's active config.
//!
//! Resolution only fails for consumers that do not exist (unknown/deleted key, unknown project).
//! A consumer that exists but may not call (its project is `DELETE_REQUESTED`, its key is past
//! its `expireTime`) resolves normally with [`Consumer::project_deleted`] / the key's
//! `expire_time` set, because `:report` must still attribute its traffic; `:check` and
//! `:allocateQuota` turn those into `PROJECT_DELETED` / `API_KEY_EXPIRED`.

use std::sync::Arc;

use portico_config::service::Service;
use portico_servicecontrol::{CheckError, QuotaError};
use serde_json::Value;
use time::OffsetDateTime;

use crate::app::AppState;
use crate::error::ApiError;
use crate::store::keys::{self as keys_store, ApiKeyRecord};
use crate::store::projects::LifecycleState;
use crate::store::servicecontrol::lookups;

use super::restrictions::{ApiTarget, KeyRestrictions};
use super::ScState;

/// A resolved consumer.
#[derive(Debug, Clone)]
pub struct Consumer {
    pub project_id: String,
    pub project_number: i64,
    /// Set when the consumer was named by an API key.
    pub key: Option<ApiKeyRecord>,
    /// The project is `DELETE_REQUESTED` (`gcloud projects delete`).
    pub project_deleted: bool,
}

impl Consumer {
    /// The form used in quota counters, rollups and Google's error texts.
    pub fn label(&self) -> String {
        format!("project_number:{}", self.project_number)
    }
}

/// Why a consumer could not be resolved; each maps to a Google error code.
#[derive(Debug, Clone, PartialEq)]
pub enum ConsumerProblem {
    /// Unknown or deleted key (`API_KEY_INVALID`).
    KeyInvalid,
    /// Unknown project (`PROJECT_INVALID`).
    ProjectInvalid(String),
}

/// A refusal in Google's terms, shared by `:check` (`CheckError.detail`) and `:allocateQuota`
/// (`QuotaError.description`).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub code: &'static str,
    pub subject: String,
    pub detail: String,
}

impl From<Refusal> for CheckError {
    fn from(r: Refusal) -> CheckError {
        CheckError {
            code: r.code.to_string(),
            subject: r.subject,
            detail: r.detail,
        }
    }
}

impl From<Refusal> for QuotaError {
    fn from(r: Refusal) -> QuotaError {
        QuotaError {
            code: r.code.to_string(),
            subject: r.subject,
            description: r.detail,
        }
    }
}

impl ConsumerProblem {
    pub fn refusal(self) -> Refusal {
        match self {
            ConsumerProblem::KeyInvalid => Refusal {
                code: "API_KEY_INVALID",
                subject: String::new(),
                detail: "API key not valid. Please pass a valid API key.".into(),
            },
            ConsumerProblem::ProjectInvalid(p) => Refusal {
                code: "PROJECT_INVALID",
                subject: format!("projects/{p}"),
                detail: format!("Consumer project '{p}' not found."),
            },
        }
    }
}

impl Consumer {
    /// Why an existing consumer may not call at `now`: its key is past `expireTime`
    /// (`API_KEY_EXPIRED`) or its project is deleted (`PROJECT_DELETED`), in that order.
    pub fn lapsed(&self, now: OffsetDateTime) -> Option<Refusal> {
        if let Some(key) = self.key.as_ref().filter(|k| key_expired(k, now)) {
            return Some(Refusal {
                code: "API_KEY_EXPIRED",
                subject: key.name.clone(),
                detail: "API key expired. Please renew the API key.".into(),
            });
        }
        self.project_deleted.then(|| Refusal {
            code: "PROJECT_DELETED",
            subject: format!("projects/{}", self.project_number),
            detail: format!("Project {} has been deleted.", self.project_id),
        })
    }
}

/// Whether a known project is deleted. A project with no row (an API key always has one, as
/// creating the key named its project) counts as live.
async fn is_deleted(state: &AppState, project_id: &str) -> Result<bool, ApiError> {
    Ok(
        crate::store::projects::lifecycle_state(&state.store, project_id).await?
            == Some(LifecycleState::DeleteRequested),
    )
}

/// A key past its `expireTime` at `now` (the Portico extension documented in `apikeys.rs`).
pub fn key_expired(key: &ApiKeyRecord, now: OffsetDateTime) -> bool {
    key.expire_time.is_some_and(|t| t <= now)
}

/// Looks a project number up without creating the project (a check must not invent projects);
/// the producer project is the one exception, it always exists for its own service.
async fn project_by_id(
    state: &AppState,
    id: &str,
    producer: &str,
) -> Result<Option<i64>, ApiError> {
    if id == producer {
        return crate::projects::project_number(&state.store, id)
            .await
            .map(Some);
    }
    Ok(lookups::project_number_by_id(&state.store, id).await?)
}

/// Resolves `consumer_id`. Malformed ids are a 400 for the caller (the proxy), unknown ones a
/// [`ConsumerProblem`] for the check/quota response.
pub async fn resolve(
    state: &AppState,
    consumer_id: &str,
    producer: &str,
) -> Result<Result<Consumer, ConsumerProblem>, ApiError> {
    if let Some(key) = consumer_id.strip_prefix("api_key:") {
        if key.is_empty() {
            return Ok(Err(ConsumerProblem::KeyInvalid));
        }
        return Ok(
            match keys_store::find_by_key_string(&state.store, &state.master_key, key).await? {
                Some(rec) if !rec.deleted => Ok(Consumer {
                    project_id: rec.project_id.clone(),
                    project_number: rec.project_number,
                    project_deleted: is_deleted(state, &rec.project_id).await?,
                    key: Some(rec),
                }),
                _ => Err(ConsumerProblem::KeyInvalid),
            },
        );
    }
    if let Some(id) = consumer_id.strip_prefix("project:") {
        return Ok(match project_by_id(state, id, producer).await? {
            Some(n) => Ok(Consumer {
                project_id: id.to_string(),
                project_number: n,
                key: None,
                project_deleted: is_deleted(state, id).await?,
            }),
            None => Err(ConsumerProblem::ProjectInvalid(id.to_string())),
        });
    }
    if let Some(n) = consumer_id.strip_prefix("project_number:") {
        let Ok(num) = n.parse::<i64>() else {
            return Ok(Err(ConsumerProblem::ProjectInvalid(n.to_string())));
        };
        return Ok(
            match lookups::project_id_by_number(&state.store, num).await? {
                Some(id) => Ok(Consumer {
                    project_deleted: is_deleted(state, &id).await?,
                    project_id: id,
                    project_number: num,
                    key: None,
                }),
                None => Err(ConsumerProblem::ProjectInvalid(n.to_string())),
            },
        );
    }
    Err(ApiError::invalid_argument(format!(
        "Invalid consumer_id {:?}: expected api_key:<key>, project:<id> or project_number:<n>.",
        redact_consumer_id(consumer_id)
    )))
}

/// For messages: never echo a key.
fn redact_consumer_id(id: &str) -> String {
    match id.split_once(':') {
        Some((kind, _)) => format!("{kind}:…"),
        None => "…".to_string(),
    }
}

/// The API Keys record's restrictions in the shape the matchers take.
pub fn key_restrictions(rec: &ApiKeyRecord) -> KeyRestrictions {
    let r = &rec.restrictions;
    KeyRestrictions {
        api_targets: r
            .api_targets
            .iter()
            .map(|t| ApiTarget {
                service: t.service.clone(),
                methods: t.methods.clone(),
            })
            .collect(),
        allowed_ips: r
            .server_key_restrictions
            .as_ref()
            .map(|s| s.allowed_ips.clone())
            .unwrap_or_default(),
        allowed_referrers: r
            .browser_key_restrictions
            .as_ref()
            .map(|b| b.allowed_referrers.clone())
            .unwrap_or_default(),
        allowed_android_apps: r
            .android_key_restrictions
            .as_ref()
            .map(|a| {
                a.allowed_applications
                    .iter()
                    .map(|x| (x.package_name.clone(), x.sha1_fingerprint.clone()))
                    .collect()
            })
            .unwrap_or_default(),
        allowed_ios_bundle_ids: r
            .ios_key_restrictions
            .as_ref()
            .map(|i| i.allowed_bundle_ids.clone())
            .unwrap_or_default(),
    }
}

/// What the service currently serves: the newest successful rollout and the config it sends
/// (most) traffic to; without any rollout, the newest config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Active {
    pub rollout_id: String,
    pub config_id: String,
}

impl Active {
    /// The config a request is about: the one it names, else the active one.
    pub fn config_id_for(&self, requested: &str) -> String {
        if requested.is_empty() {
            self.config_id.clone()
        } else {
            requested.to_string()
        }
    }
}

/// The rollout body is read as a JSON value, not a typed rollout: a strategy other than traffic
/// percentages, or a percentage that is not a number, gives an empty config id instead of an
/// error, and among equal percentages the one listed last wins (document order).
pub async fn active(state: &AppState, service: &str) -> Result<Active, ApiError> {
    if let Some((rollout_id, body)) =
        lookups::latest_successful_rollout(&state.store, service).await?
    {
        let body: Value = serde_json::from_str(&body)?;
        let config_id = body
            .pointer("/trafficPercentStrategy/percentages")
            .and_then(Value::as_object)
            .and_then(|p| {
                p.iter()
                    .filter_map(|(k, v)| v.as_f64().map(|f| (k, f)))
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|(k, _)| k.clone())
            })
            .unwrap_or_default();
        return Ok(Active {
            rollout_id,
            config_id,
        });
    }
    Ok(Active {
        rollout_id: String::new(),
        config_id: lookups::newest_config_id(&state.store, service)
            .await?
            .unwrap_or_default(),
    })
}

/// A config by id, parsed once and cached (config ids are immutable).
pub async fn config(
    state: &AppState,
    sc: &ScState,
    service: &str,
    config_id: &str,
) -> Result<Option<Arc<Service>>, ApiError> {
    let key = (service.to_string(), config_id.to_string());
    if let Some(c) = sc.config_cache_get(&key) {
        return Ok(Some(c));
    }
    let Some(body) = lookups::config_body(&state.store, service, config_id).await? else {
        return Ok(None);
    };
    let parsed: Service = serde_json::from_str(&body)?;
    let parsed = Arc::new(parsed);
    sc.config_cache_put(key, parsed.clone());
    Ok(Some(parsed))
}
