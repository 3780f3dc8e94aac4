//! API Keys v2 (`gcloud services api-keys ...`) and the key lookup Service Control uses.
//!
//! # The key record: [`lookup`]
//! `apikeys::lookup(&state, key_string) -> Result<Option<ApiKeyRecord>, ApiError>` finds a key by
//! its keyed hash (HMAC-SHA256 under the master key) through
//! `store::keys::find_by_key_string`, which other APIs (Service Control) call directly. The
//! record carries `uid`, `key_id`, `name` (`projects/<number>/locations/global/keys/<id>`),
//! `project_id`, `project_number`, `display_name`, `restrictions` (Google's JSON shape, typed:
//! [`Restrictions`]) and `deleted` (soft-deleted keys are still returned so the caller can say
//! "key deleted" rather than "invalid"). The key string itself is never in the record.
//!
//! # Routes (project = id or number; location must be `global`)
//! - `POST /v2/projects/{p}/locations/global/keys[?keyId=]` → operation, done, whose `response` is
//!   the Key **with `keyString`**. The stored copy of the operation omits `keyString`, so
//!   `GET /v2/operations/{id}` (served by `apis/operations.rs`) never returns it; gcloud does not poll
//!   an operation that is already done, and `getKeyString` is the way to read it later.
//! - `GET .../keys` (`showDeleted=True|False`, `pageSize`, `pageToken`), `GET .../keys/{id}`,
//!   `GET .../keys/{id}/keyString`, `PATCH .../keys/{id}?updateMask=` (displayName,
//!   restrictions[.apiTargets|.serverKeyRestrictions|.browserKeyRestrictions|...], annotations),
//!   `DELETE .../keys/{id}` (soft: sets `deleteTime`), `POST .../keys/{id}:undelete`.
//! - `GET /v2/keys:lookupKey?keyString=` → `{name, parent}`.
//!
//! # Portico extension: `expireTime`
//! Google's `google.api.apikeys.v2.Key` has no expiry, so Service Control's `API_KEY_EXPIRED`
//! could never happen. Portico adds one optional field, `expireTime` (RFC 3339, any offset; stored
//! and returned in UTC): set it in the create body or with
//! `PATCH .../keys/{id}?updateMask=expireTime` (an absent, null or empty value clears it); get and
//! list return it. From that instant on, `:check` and `:allocateQuota` answer `API_KEY_EXPIRED`
//! for the key (ESP turns it into 400 "API key expired. Please renew the API key."). A time in
//! the past is accepted: it is how a key is revoked now but kept for its metadata. gcloud has no
//! flag for it (use curl or a client library) but keeps working: `describe`/`list` just print the
//! extra field. Documented in `docs/identity.md`.
//!
//! # At rest
//! The key string is stored only as AES-256-GCM ciphertext (bound to the key's uid) and as the
//! keyed lookup hash; see `crypto.rs`. It is never logged and never put in an error message.
//!
//! Layer rule: handlers here, restriction validation in [`restrictions`], SQL and the stored
//! key's shape in `store::keys`, operations stored through `store::operations`.

mod restrictions;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use restrictions::{bad_field, parse_restrictions, set_client_restriction};

pub use crate::store::keys::{
    AndroidApplication, AndroidKeyRestrictions, ApiKeyRecord, ApiTarget, BrowserKeyRestrictions,
    IosKeyRestrictions, Restrictions, ServerKeyRestrictions,
};

use crate::app::{parse_json_body, split_verb, AppState, PageSizeWording, Params};
use crate::authz::{perms, require_project_permission, Principal};
use crate::error::ApiError;
use crate::store::keys::StoredKey;
use crate::store::operations::{self as ops_store, Any, Operation};
use crate::store::{format_rfc3339, now_rfc3339};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v2/projects/{project}/locations/{location}/keys",
            get(list_keys).post(create_key),
        )
        .route(
            "/v2/projects/{project}/locations/{location}/keys/{key}",
            get(get_key)
                .patch(patch_key)
                .delete(delete_key)
                .post(key_verb),
        )
        .route(
            "/v2/projects/{project}/locations/{location}/keys/{key}/keyString",
            get(get_key_string),
        )
        .route("/v2/keys:lookupKey", get(lookup_key))
}

/// Finds a key by its string (via the keyed hash). Soft-deleted keys are returned with
/// `deleted: true`.
pub async fn lookup(state: &AppState, key_string: &str) -> Result<Option<ApiKeyRecord>, ApiError> {
    Ok(crate::store::keys::find_by_key_string(&state.store, &state.master_key, key_string).await?)
}

const KEY_TYPE: &str = "type.googleapis.com/google.api.apikeys.v2.Key";

/// `google.api.apikeys.v2.Key` on the wire. Field order is the wire order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Key {
    name: String,
    uid: String,
    display_name: String,
    create_time: String,
    update_time: String,
    etag: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    delete_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expire_time: Option<String>,
    #[serde(skip_serializing_if = "Restrictions::is_empty")]
    restrictions: Restrictions,
    #[serde(skip_serializing_if = "Map::is_empty")]
    annotations: Map<String, Value>,
    /// Only in the answer to create: the stored operation and every read leave it out.
    #[serde(skip_serializing_if = "Option::is_none")]
    key_string: Option<String>,
}

impl Key {
    fn new(k: &StoredKey) -> Key {
        Key {
            name: k.name(),
            uid: k.uid.clone(),
            display_name: k.display_name.clone(),
            create_time: k.create_time.clone(),
            update_time: k.update_time.clone(),
            etag: format!("W/\"{}\"", k.etag),
            delete_time: k.is_deleted().then(|| k.delete_time.clone()),
            expire_time: k.expire_time.map(format_rfc3339),
            restrictions: k.restrictions.clone(),
            annotations: k.annotations.clone(),
            key_string: None,
        }
    }
}

/// `GET .../keys`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ListKeysResponse {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    keys: Vec<Key>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_page_token: Option<String>,
}

/// `GET /v2/keys:lookupKey`.
#[derive(Debug, Serialize)]
struct LookupKeyResponse {
    name: String,
    parent: String,
}

/// Google's key-id rule: `[a-z]([a-z0-9-]{0,61}[a-z0-9])?`.
fn validate_key_id(id: &str) -> Result<(), ApiError> {
    let b = id.as_bytes();
    let ok = (1..=63).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.last().is_some_and(|c| *c != b'-');
    if ok {
        Ok(())
    } else {
        Err(bad_field(
            "key_id",
            format!(
                "Invalid keyId '{id}': it must match [a-z]([a-z0-9-]{{0,61}}[a-z0-9])? (1-63 \
                 lower-case letters, digits or hyphens, starting with a letter)."
            ),
        ))
    }
}

fn new_etag() -> String {
    crate::crypto::random_urlsafe(12)
}

fn check_location(location: &str) -> Result<(), ApiError> {
    if location == "global" {
        Ok(())
    } else {
        Err(ApiError::invalid_argument(format!(
            "Invalid location '{location}': API keys live in location 'global'."
        )))
    }
}

/// `{project}/locations/{location}`: the parent of keys.
#[derive(Debug, Deserialize)]
struct ParentPath {
    project: String,
    location: String,
}

/// `{project}/locations/{location}/keys/{key}`.
#[derive(Debug, Deserialize)]
struct KeyPath {
    project: String,
    location: String,
    key: String,
}

impl ParentPath {
    /// Every handler's prologue: the location must be `global`, `{project}` (id or number)
    /// resolves to (id, number), and `permission` is authorised on it.
    async fn authorize(
        &self,
        state: &AppState,
        principal: &Principal,
        permission: &str,
    ) -> Result<(String, i64), ApiError> {
        check_location(&self.location)?;
        let project_id = crate::projects::project_id_for(&state.store, &self.project).await?;
        require_project_permission(state, principal, &project_id, permission).await?;
        let number = crate::projects::project_number(&state.store, &project_id).await?;
        Ok((project_id, number))
    }
}

impl KeyPath {
    fn parent(&self) -> ParentPath {
        ParentPath {
            project: self.project.clone(),
            location: self.location.clone(),
        }
    }

    /// [`ParentPath::authorize`], then the key itself (404 if absent).
    async fn authorize(
        &self,
        state: &AppState,
        principal: &Principal,
        permission: &str,
    ) -> Result<(String, i64, StoredKey), ApiError> {
        let (project_id, number) = self
            .parent()
            .authorize(state, principal, permission)
            .await?;
        let key = load_key(state, &project_id, &self.key).await?;
        Ok((project_id, number, key))
    }
}

async fn load_key(state: &AppState, project_id: &str, key_id: &str) -> Result<StoredKey, ApiError> {
    match crate::store::keys::get(&state.store, project_id, key_id).await? {
        Some(k) => Ok(k),
        None => Err(ApiError::not_found(format!(
            "Key 'projects/{project_id}/locations/global/keys/{key_id}' not found."
        ))),
    }
}

/// A finished API Keys operation for a key of project `number`, answering the key (as an
/// `Any`, with `keyString` only when given).
fn key_operation(
    number: i64,
    key: &StoredKey,
    key_string: Option<String>,
) -> Result<Operation, ApiError> {
    let key = Key {
        key_string,
        ..Key::new(key)
    };
    Ok(Operation::done(
        format!("operations/akmf.p7-{number}-{}", uuid::Uuid::new_v4()),
        Value::Null,
        serde_json::to_value(Any::new(KEY_TYPE, key))?,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct KeyBody {
    display_name: Option<String>,
    restrictions: Option<Value>,
    annotations: Option<serde_json::Map<String, Value>>,
    /// Portico extension (see the module doc).
    expire_time: Option<String>,
    /// On update: the etag the caller read; the update is refused if the key changed since.
    etag: Option<String>,
}

/// The stored etag inside what a client sends back: the `W/"..."` the API shows, or the bare
/// value.
fn presented_etag(presented: &str) -> &str {
    let t = presented.trim();
    let t = t.strip_prefix("W/").unwrap_or(t);
    t.strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(t)
}

/// Refuses a change made from a stale read: `presented` (empty: unconditional) must be the
/// key's current etag.
fn check_etag(key: &StoredKey, presented: Option<&str>) -> Result<(), ApiError> {
    match presented.map(str::trim) {
        None | Some("") => Ok(()),
        Some(p) if presented_etag(p) == key.etag => Ok(()),
        Some(p) => Err(ApiError::aborted(format!(
            "The etag '{p}' does not match key '{}': it changed since it was read. Read it \
             again and retry.",
            key.name()
        ))
        .with_field_violation("etag", "stale")),
    }
}

/// A conditional write found the key changed between its read and its write.
fn concurrent_change(key: &StoredKey) -> ApiError {
    ApiError::aborted(format!(
        "Key '{}' was changed by another request at the same time; read it again and retry.",
        key.name()
    ))
}

/// `expireTime` as sent → the instant, in UTC. Absent or empty means "never expires".
fn parse_expire_time(v: Option<&str>) -> Result<Option<OffsetDateTime>, ApiError> {
    match v.map(str::trim) {
        None | Some("") => Ok(None),
        Some(t) => OffsetDateTime::parse(t, &Rfc3339)
            .map(|d| Some(d.to_offset(time::UtcOffset::UTC)))
            .map_err(|e| {
                bad_field(
                    "expire_time",
                    format!(
                        "Invalid expireTime '{t}': expected an RFC 3339 timestamp such as \
                         2030-01-01T00:00:00Z ({e})."
                    ),
                )
            }),
    }
}

fn validate_display_name(n: &str) -> Result<(), ApiError> {
    if n.chars().count() > 63 {
        return Err(bad_field(
            "display_name",
            "displayName must be at most 63 characters.".into(),
        ));
    }
    Ok(())
}

async fn create_key(
    State(state): State<AppState>,
    principal: Principal,
    Path(parent): Path<ParentPath>,
    params: Params,
    body: Bytes,
) -> Result<Json<Operation>, ApiError> {
    let (project_id, number) = parent
        .authorize(&state, &principal, perms::APIKEYS_CREATE)
        .await?;
    let req: KeyBody = parse_json_body(&body)?;
    let display_name = req.display_name.unwrap_or_default();
    validate_display_name(&display_name)?;
    let restrictions = parse_restrictions(req.restrictions)?;
    let expire_time = parse_expire_time(req.expire_time.as_deref())?;
    let uid = uuid::Uuid::new_v4().to_string();
    let key_id = match params.get("keyId") {
        Some(k) => {
            validate_key_id(k)?;
            k.to_string()
        }
        None => uuid::Uuid::new_v4().to_string(),
    };
    let key_string = crate::crypto::new_api_key_string();
    let sealed = state
        .master_key
        .seal(uid.as_bytes(), key_string.as_bytes())
        .map_err(ApiError::internal)?;
    let now = now_rfc3339();
    let key = StoredKey {
        uid: uid.clone(),
        project_id: project_id.clone(),
        project_number: number,
        key_id: key_id.clone(),
        display_name,
        restrictions,
        annotations: req.annotations.unwrap_or_default(),
        etag: new_etag(),
        create_time: now.clone(),
        update_time: now.clone(),
        delete_time: String::new(),
        expire_time,
    };
    let hash = crate::store::keys::key_hash(&state.master_key, &key_string);
    let mut tx = state.store.begin_write().await?;
    if !crate::store::keys::insert(&mut tx, &key, &hash, &sealed).await? {
        return Err(ApiError::already_exists(format!(
            "Key with id '{key_id}' already exists in project {project_id}."
        )));
    }
    // Stored without the key string: the operations table is plain JSON.
    let mut op = key_operation(number, &key, None)?;
    ops_store::insert(&mut tx, &op).await?;
    tx.commit().await?;
    let with_key_string = key_operation(number, &key, Some(key_string))?;
    op.response = with_key_string.response;
    tracing::info!(key = %key.name(), by = %principal.display(), "created API key");
    Ok(Json(op))
}

async fn list_keys(
    State(state): State<AppState>,
    principal: Principal,
    Path(parent): Path<ParentPath>,
    params: Params,
) -> Result<Json<ListKeysResponse>, ApiError> {
    let (project_id, _) = parent
        .authorize(&state, &principal, perms::APIKEYS_LIST)
        .await?;
    let show_deleted = match params.get("showDeleted") {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(v) => {
            return Err(ApiError::invalid_argument(format!(
                "Invalid showDeleted '{v}': expected true or false."
            )))
        }
    };
    let page = params.paging(300, 300, PageSizeWording::Number)?;
    let keys: Vec<StoredKey> = crate::store::keys::list_in_project(&state.store, &project_id)
        .await?
        .into_iter()
        .filter(|k| show_deleted || !k.is_deleted())
        .collect();
    let total = keys.len();
    Ok(Json(ListKeysResponse {
        keys: keys
            .iter()
            .skip(page.offset)
            .take(page.size)
            .map(Key::new)
            .collect(),
        next_page_token: page.next_token(total),
    }))
}

async fn get_key(
    State(state): State<AppState>,
    principal: Principal,
    Path(path): Path<KeyPath>,
) -> Result<Json<Key>, ApiError> {
    let (_, _, key) = path
        .authorize(&state, &principal, perms::APIKEYS_GET)
        .await?;
    Ok(Json(Key::new(&key)))
}

/// `{"keyString": ...}`.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct KeyStringResponse {
    key_string: String,
}

async fn get_key_string(
    State(state): State<AppState>,
    principal: Principal,
    Path(path): Path<KeyPath>,
) -> Result<Json<KeyStringResponse>, ApiError> {
    let (_, _, stored) = path
        .authorize(&state, &principal, perms::APIKEYS_GET_KEY_STRING)
        .await?;
    let Some(sealed) = crate::store::keys::sealed_key_string(&state.store, &stored.uid).await?
    else {
        return Err(ApiError::not_found(format!(
            "Key '{}' not found.",
            stored.name()
        )));
    };
    let plain = state
        .master_key
        .open(stored.uid.as_bytes(), &sealed)
        .map_err(|e| {
            // Most likely a different master key than the one the key was created under.
            ApiError::internal(format_args!(
                "cannot decrypt API key {}: {e}",
                stored.name()
            ))
        })?;
    let key_string = String::from_utf8(plain).map_err(ApiError::internal)?;
    Ok(Json(KeyStringResponse { key_string }))
}

/// Applies an update mask entry to `key`; unknown paths are a 400 naming the path.
fn apply_mask_path(key: &mut StoredKey, path: &str, body: &KeyBody) -> Result<(), ApiError> {
    let restrictions_in_body = || parse_restrictions(body.restrictions.clone());
    match path {
        "displayName" | "display_name" => {
            let n = body.display_name.clone().unwrap_or_default();
            validate_display_name(&n)?;
            key.display_name = n;
        }
        "annotations" => key.annotations = body.annotations.clone().unwrap_or_default(),
        "expireTime" | "expire_time" => {
            key.expire_time = parse_expire_time(body.expire_time.as_deref())?
        }
        "restrictions" => key.restrictions = restrictions_in_body()?,
        "restrictions.apiTargets" | "restrictions.api_targets" => {
            key.restrictions.api_targets = restrictions_in_body()?.api_targets
        }
        "restrictions.serverKeyRestrictions" | "restrictions.server_key_restrictions" => {
            let v = restrictions_in_body()?.server_key_restrictions;
            set_client_restriction(&mut key.restrictions, v.is_some());
            key.restrictions.server_key_restrictions = v;
        }
        "restrictions.browserKeyRestrictions" | "restrictions.browser_key_restrictions" => {
            let v = restrictions_in_body()?.browser_key_restrictions;
            set_client_restriction(&mut key.restrictions, v.is_some());
            key.restrictions.browser_key_restrictions = v;
        }
        "restrictions.androidKeyRestrictions" | "restrictions.android_key_restrictions" => {
            let v = restrictions_in_body()?.android_key_restrictions;
            set_client_restriction(&mut key.restrictions, v.is_some());
            key.restrictions.android_key_restrictions = v;
        }
        "restrictions.iosKeyRestrictions" | "restrictions.ios_key_restrictions" => {
            let v = restrictions_in_body()?.ios_key_restrictions;
            set_client_restriction(&mut key.restrictions, v.is_some());
            key.restrictions.ios_key_restrictions = v;
        }
        other => {
            return Err(bad_field(
                "update_mask",
                format!(
                    "Invalid updateMask path '{other}': updatable fields are displayName, \
                     restrictions (or restrictions.<kind>), annotations and expireTime."
                ),
            ))
        }
    }
    Ok(())
}

async fn patch_key(
    State(state): State<AppState>,
    principal: Principal,
    Path(path): Path<KeyPath>,
    params: Params,
    body: Bytes,
) -> Result<Json<Operation>, ApiError> {
    // Authorised before the body is read, and the body read before the key is looked up: a
    // bad body on a missing key is a 400, not a 404.
    let (project_id, number) = path
        .parent()
        .authorize(&state, &principal, perms::APIKEYS_UPDATE)
        .await?;
    let req: KeyBody = parse_json_body(&body)?;
    let mut key = load_key(&state, &project_id, &path.key).await?;
    if key.is_deleted() {
        return Err(ApiError::failed_precondition(format!(
            "Key '{}' is deleted; undelete it before updating.",
            key.name()
        )));
    }
    check_etag(&key, req.etag.as_deref())?;
    let read_etag = key.etag.clone();
    let mask = params.0.get("updateMask").map(String::as_str).unwrap_or("");
    let paths: Vec<&str> = if mask.trim().is_empty() {
        // No mask: replace every updatable field present in the body.
        let mut p = Vec::new();
        if req.display_name.is_some() {
            p.push("displayName");
        }
        if req.restrictions.is_some() {
            p.push("restrictions");
        }
        if req.annotations.is_some() {
            p.push("annotations");
        }
        if req.expire_time.is_some() {
            p.push("expireTime");
        }
        p
    } else {
        mask.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect()
    };
    for p in paths {
        apply_mask_path(&mut key, p, &req)?;
    }
    key.restrictions.validate()?;
    key.etag = new_etag();
    key.update_time = now_rfc3339();
    let mut tx = state.store.begin_write().await?;
    if !crate::store::keys::update(&mut tx, &key, &read_etag).await? {
        return Err(concurrent_change(&key));
    }
    let op = key_operation(number, &key, None)?;
    ops_store::insert(&mut tx, &op).await?;
    tx.commit().await?;
    tracing::info!(key = %key.name(), by = %principal.display(), "updated API key");
    Ok(Json(op))
}

/// Sets or clears `delete_time` and records the operation.
async fn set_deleted(
    state: &AppState,
    principal: &Principal,
    path: &KeyPath,
    delete: bool,
    etag: Option<&str>,
) -> Result<Json<Operation>, ApiError> {
    let permission = if delete {
        perms::APIKEYS_DELETE
    } else {
        perms::APIKEYS_UNDELETE
    };
    let (_, number, mut key) = path.authorize(state, principal, permission).await?;
    check_etag(&key, etag)?;
    let read_etag = key.etag.clone();
    let already_deleted = key.is_deleted();
    if delete == already_deleted {
        return Err(ApiError::failed_precondition(if delete {
            format!("Key '{}' is already deleted.", key.name())
        } else {
            format!("Key '{}' is not deleted.", key.name())
        }));
    }
    let now = now_rfc3339();
    key.delete_time = if delete { now.clone() } else { String::new() };
    key.update_time = now;
    key.etag = new_etag();
    let mut tx = state.store.begin_write().await?;
    if !crate::store::keys::set_delete_time(&mut tx, &key, &read_etag).await? {
        return Err(concurrent_change(&key));
    }
    let op = key_operation(number, &key, None)?;
    ops_store::insert(&mut tx, &op).await?;
    tx.commit().await?;
    tracing::info!(key = %key.name(), deleted = delete, by = %principal.display(), "API key delete state changed");
    Ok(Json(op))
}

async fn delete_key(
    State(state): State<AppState>,
    principal: Principal,
    Path(path): Path<KeyPath>,
    params: Params,
) -> Result<Json<Operation>, ApiError> {
    // DeleteKeyRequest.etag, a query parameter.
    let etag = params.0.get("etag").map(String::as_str);
    set_deleted(&state, &principal, &path, true, etag).await
}

async fn key_verb(
    State(state): State<AppState>,
    principal: Principal,
    Path(path): Path<KeyPath>,
) -> Result<Json<Operation>, ApiError> {
    match split_verb(&path.key) {
        (key, Some("undelete")) => {
            let path = KeyPath {
                key: key.to_string(),
                ..path
            };
            set_deleted(&state, &principal, &path, false, None).await
        }
        (_, Some(other)) => Err(ApiError::not_found(format!(
            "Unknown method '{other}' on API keys."
        ))),
        (_, None) => Err(ApiError::not_found(
            "POST on a key needs a verb (:undelete).",
        )),
    }
}

async fn lookup_key(
    State(state): State<AppState>,
    principal: Principal,
    params: Params,
) -> Result<Json<LookupKeyResponse>, ApiError> {
    let key_string = params.get("keyString").ok_or_else(|| {
        ApiError::invalid_argument("Missing keyString query parameter.")
            .with_field_violation("key_string", "required")
    })?;
    let not_found = || ApiError::not_found("The API key was not found.");
    let record = lookup(&state, key_string).await?.ok_or_else(not_found)?;
    if record.deleted {
        return Err(not_found());
    }
    // A caller who may not see the key's project learns nothing beyond "not found".
    if require_project_permission(
        &state,
        &principal,
        &record.project_id,
        perms::APIKEYS_LOOKUP,
    )
    .await
    .is_err()
    {
        return Err(not_found());
    }
    Ok(Json(LookupKeyResponse {
        parent: format!("projects/{}/locations/global", record.project_number),
        name: record.name,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key_json(key: &StoredKey) -> Value {
        serde_json::to_value(Key::new(key)).expect("key JSON")
    }

    fn r(v: Value) -> Result<Restrictions, ApiError> {
        parse_restrictions(Some(v))
    }

    #[test]
    fn restrictions_validation() {
        assert!(r(json!({})).expect("empty").is_empty());
        let ok = r(json!({
            "apiTargets": [{"service": "echo.example.com", "methods": ["1.echo.Echo"]}],
            "serverKeyRestrictions": {"allowedIps": ["10.0.0.1", "192.168.0.0/16", "::1"]}
        }))
        .expect("ok");
        assert_eq!(ok.api_targets[0].methods, vec!["1.echo.Echo"]);
        let bad_ip = r(json!({"serverKeyRestrictions": {"allowedIps": ["10.0.0.300"]}}))
            .expect_err("bad ip");
        assert!(bad_ip.message.contains("10.0.0.300"));
        let two_kinds = r(json!({
            "serverKeyRestrictions": {"allowedIps": ["10.0.0.1"]},
            "browserKeyRestrictions": {"allowedReferrers": ["*.example.com/*"]}
        }))
        .expect_err("two kinds");
        assert_eq!(two_kinds.code, crate::error::Code::InvalidArgument);
        let typo = r(json!({"apiTarget": [{"service": "x"}]})).expect_err("typo");
        assert!(typo.message.contains("apiTarget"), "{}", typo.message);
        assert!(r(json!({"apiTargets": [{"service": ""}]})).is_err());
        assert!(r(json!({"browserKeyRestrictions": {"allowedReferrers": ["a b"]}})).is_err());
    }

    #[test]
    fn key_id_rule() {
        assert!(validate_key_id("k").is_ok());
        assert!(validate_key_id("my-key-1").is_ok());
        assert!(validate_key_id("My-key").is_err());
        assert!(validate_key_id("1key").is_err());
        assert!(validate_key_id("key-").is_err());
        assert!(validate_key_id(&"a".repeat(64)).is_err());
    }

    #[test]
    fn mask_paths() {
        let mut key = StoredKey {
            uid: "u".into(),
            project_id: "demo-proj".into(),
            project_number: 123456789012,
            key_id: "k".into(),
            display_name: "old".into(),
            restrictions: Restrictions::default(),
            annotations: Default::default(),
            etag: "e".into(),
            create_time: "t".into(),
            update_time: "t".into(),
            delete_time: String::new(),
            expire_time: None,
        };
        let body = KeyBody {
            display_name: Some("new".into()),
            restrictions: Some(json!({"apiTargets": [{"service": "s.example.com"}]})),
            annotations: None,
            expire_time: Some("2030-01-01T01:00:00+01:00".into()),
            etag: None,
        };
        apply_mask_path(&mut key, "restrictions.apiTargets", &body).expect("targets");
        assert_eq!(key.display_name, "old");
        assert_eq!(key.restrictions.api_targets[0].service, "s.example.com");
        apply_mask_path(&mut key, "displayName", &body).expect("name");
        assert_eq!(key.display_name, "new");
        assert!(apply_mask_path(&mut key, "keyString", &body).is_err());
        // Application restrictions are a oneof: referrers replace IPs.
        let ips = KeyBody {
            restrictions: Some(json!({"serverKeyRestrictions": {"allowedIps": ["10.0.0.0/8"]}})),
            ..Default::default()
        };
        apply_mask_path(&mut key, "restrictions.server_key_restrictions", &ips).expect("ips");
        let referrers = KeyBody {
            restrictions: Some(
                json!({"browserKeyRestrictions": {"allowedReferrers": ["*.example.com/*"]}}),
            ),
            ..Default::default()
        };
        apply_mask_path(
            &mut key,
            "restrictions.browser_key_restrictions",
            &referrers,
        )
        .expect("referrers");
        assert!(key.restrictions.server_key_restrictions.is_none());
        assert_eq!(key.restrictions.api_targets[0].service, "s.example.com");
        key.restrictions.validate().expect("one kind");
        let v = key_json(&key);
        assert_eq!(v["name"], "projects/123456789012/locations/global/keys/k");
        assert!(v.get("keyString").is_none());
        assert!(v.get("deleteTime").is_none());
        assert!(v.get("expireTime").is_none());
        // expireTime: normalised to UTC; an empty value clears it; garbage is a 400 naming it.
        apply_mask_path(&mut key, "expireTime", &body).expect("expire");
        assert_eq!(key_json(&key)["expireTime"], "2030-01-01T00:00:00Z");
        apply_mask_path(&mut key, "expire_time", &KeyBody::default()).expect("clear");
        assert!(key.expire_time.is_none());
        let bad = KeyBody {
            expire_time: Some("tomorrow".into()),
            ..Default::default()
        };
        let e = apply_mask_path(&mut key, "expireTime", &bad).expect_err("bad time");
        assert_eq!(e.code, crate::error::Code::InvalidArgument);
        assert!(e.message.contains("tomorrow"), "{}", e.message);
    }
}
