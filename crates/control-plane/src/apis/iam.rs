//! IAM v1: service accounts and their keys (`gcloud iam service-accounts ...`).
//!
//! Routes (project may be `-` when the account is named by email or unique id):
//! - `POST/GET  /v1/projects/{project}/serviceAccounts` — create (`accountId` checked against
//!   Google's rule) / list (`accounts`, `pageSize` + `pageToken`).
//! - `GET/DELETE /v1/projects/{project}/serviceAccounts/{email|uniqueId}`.
//! - `POST/GET  .../serviceAccounts/{account}/keys` — create an RSA-2048 key / list keys.
//! - `GET/DELETE .../serviceAccounts/{account}/keys/{keyId}`.
//!
//! Keys: the private half exists only in the create response (`privateKeyData`, base64 of a
//! standard key-file JSON whose `token_uri` is this control plane's `/token`). The database keeps
//! the public key (SPKI PEM) and a self-signed X.509 certificate made from the fresh key at
//! creation time — Google publishes such certificates at `client_x509_cert_url`, and
//! [`certificates`] returns them for whoever serves that URL. Deleting a key deletes its row, so
//! self-signed JWTs and access tokens minted with it stop verifying at once (see `tokens.rs`).
//!
//! Authorization: the admin token may do anything; a service account needs a project role that
//! grants the `iam.*` permission (see [`crate::apis::resourcemanager::require_project_permission`]).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand::Rng as _;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::app::AppState;
use crate::authz::Principal;
use crate::authz::{perms, require_project_permission};
use crate::error::ApiError;
use crate::store::{now_rfc3339, Store};

/// Nanoseconds since the epoch: a creation order that sorts as an integer.
pub(crate) fn creation_seq() -> i64 {
    let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    i64::try_from(nanos).unwrap_or(i64::MAX)
}

/// Email domain of service accounts: `<accountId>@<project>.iam.gserviceaccount.com`.
pub const SA_DOMAIN_SUFFIX: &str = ".iam.gserviceaccount.com";
/// Google's `validBeforeTime` for user-managed keys (they never expire on their own).
const KEY_VALID_BEFORE: &str = "9999-12-31T23:59:59Z";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/projects/{project}/serviceAccounts",
            post(create_account).get(list_accounts),
        )
        .route(
            "/v1/projects/{project}/serviceAccounts/{account}",
            get(get_account).delete(delete_account).post(account_verb),
        )
        .route(
            "/v1/projects/{project}/serviceAccounts/{account}/keys",
            post(create_key).get(list_keys),
        )
        .route(
            "/v1/projects/{project}/serviceAccounts/{account}/keys/{key}",
            get(get_key).delete(delete_key),
        )
}

/// A stored service account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub email: String,
    pub project_id: String,
    pub account_id: String,
    pub unique_id: String,
    pub display_name: String,
    pub description: String,
    pub etag: String,
    /// A disabled account cannot obtain or use tokens until enabled again.
    pub disabled: bool,
}

impl ServiceAccount {
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "name": format!("projects/{}/serviceAccounts/{}", self.project_id, self.email),
            "projectId": self.project_id,
            "uniqueId": self.unique_id,
            "email": self.email,
            "etag": self.etag,
            "oauth2ClientId": self.unique_id,
        });
        if !self.display_name.is_empty() {
            v["displayName"] = json!(self.display_name);
        }
        if !self.description.is_empty() {
            v["description"] = json!(self.description);
        }
        if self.disabled {
            v["disabled"] = json!(true);
        }
        v
    }
}

type AccountRow = (String, String, String, String, String, String, String, i64);

fn account_from_row(r: AccountRow) -> ServiceAccount {
    ServiceAccount {
        email: r.0,
        project_id: r.1,
        account_id: r.2,
        unique_id: r.3,
        display_name: r.4,
        description: r.5,
        etag: r.6,
        disabled: r.7 != 0,
    }
}

const ACCOUNT_COLUMNS: &str =
    "email, project_id, account_id, unique_id, display_name, description, etag, disabled";

/// Finds an account by email or unique id (both forms appear in Google paths).
pub async fn find_account(
    store: &Store,
    account: &str,
) -> Result<Option<ServiceAccount>, ApiError> {
    let column = if account.contains('@') {
        "email"
    } else {
        "unique_id"
    };
    let row: Option<AccountRow> = sqlx::query_as(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM iam_service_accounts WHERE {column} = $1"
    ))
    .bind(account)
    .fetch_optional(store.pool())
    .await?;
    Ok(row.map(account_from_row))
}

/// A key that can verify signatures, and whether its account is disabled.
#[derive(Debug, Clone)]
pub struct VerificationKey {
    /// SPKI PEM.
    pub public_key_pem: String,
    pub account_disabled: bool,
}

/// The public key of `key_id` if it exists and belongs to `email`.
pub async fn public_key(
    store: &Store,
    email: &str,
    key_id: &str,
) -> Result<Option<VerificationKey>, ApiError> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT k.public_key_pem, a.disabled FROM iam_sa_keys k \
         JOIN iam_service_accounts a ON a.email = k.email \
         WHERE k.key_id = $1 AND k.email = $2",
    )
    .bind(key_id)
    .bind(email)
    .fetch_optional(store.pool())
    .await?;
    Ok(row.map(|(public_key_pem, d)| VerificationKey {
        public_key_pem,
        account_disabled: d != 0,
    }))
}

/// `(key_id, certificate PEM)` for every key of the account, for Google's x509 map
/// (`/robot/v1/metadata/x509/{email}` → `{"<key_id>": "<PEM>", ...}`). `None`: no such account.
pub async fn certificates(
    store: &Store,
    email: &str,
) -> Result<Option<Vec<(String, String)>>, ApiError> {
    if find_account(store, email).await?.is_none() {
        return Ok(None);
    }
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT key_id, certificate_pem FROM iam_sa_keys WHERE email = $1 ORDER BY create_seq, key_id",
    )
    .bind(email)
    .fetch_all(store.pool())
    .await?;
    Ok(Some(rows))
}

/// Google's account-id rule `^[a-z](?:[-a-z0-9]{4,28}[a-z0-9])$`, checked by hand (no regex
/// dependency for one pattern).
pub fn validate_account_id(id: &str) -> Result<(), ApiError> {
    let bytes = id.as_bytes();
    let ok = (6..=30).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.last().is_some_and(|b| *b != b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_argument(format!(
            "Invalid account ID '{id}': it must be 6 to 30 characters long, use only lower-case \
             letters, digits and hyphens, start with a letter and not end with a hyphen \
             (^[a-z](?:[-a-z0-9]{{4,28}}[a-z0-9])$)."
        ))
        .with_field_violation(
            "account_id",
            "must match ^[a-z](?:[-a-z0-9]{4,28}[a-z0-9])$",
        ))
    }
}

/// Parses a JSON request body into `T`; an empty body counts as `{}`.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let text: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(text)
        .map_err(|e| ApiError::invalid_argument(format!("Invalid JSON payload received. {e}")))
}

/// Offset-based page tokens (base64 of the decimal offset), shared by the identity list calls.
pub(crate) fn page_bounds(
    query: &HashMap<String, String>,
    default_size: usize,
    max_size: usize,
) -> Result<(usize, usize), ApiError> {
    let size = match query.get("pageSize").map(String::as_str) {
        None | Some("") | Some("0") => default_size,
        Some(s) => s.parse::<usize>().map_err(|_| {
            ApiError::invalid_argument(format!("Invalid pageSize '{s}': expected a number."))
        })?,
    }
    .min(max_size);
    let offset = match query.get("pageToken").map(String::as_str) {
        None | Some("") => 0,
        Some(t) => crate::crypto::decode_base64_lenient(t)
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| ApiError::invalid_argument(format!("Invalid pageToken '{t}'.")))?,
    };
    Ok((offset, size.max(1)))
}

pub(crate) fn next_page_token(offset: usize, size: usize, total: usize) -> Option<String> {
    let next = offset + size;
    (next < total).then(|| STANDARD.encode(next.to_string()))
}

/// Resolves the `{project}` path segment; `-` means "whatever project the account is in".
async fn path_project(state: &AppState, project: &str) -> Result<Option<String>, ApiError> {
    if project == "-" {
        Ok(None)
    } else {
        crate::projects::project_id_for(&state.store, project)
            .await
            .map(Some)
    }
}

/// The project an account reference belongs to, when it can be told without a lookup.
fn project_of_email(email: &str) -> Option<&str> {
    email
        .split_once('@')
        .and_then(|(_, domain)| domain.strip_suffix(SA_DOMAIN_SUFFIX))
}

fn unknown_account(account: &str) -> ApiError {
    ApiError::not_found(format!("Unknown service account {account}."))
}

/// Authorises `permission` on the account's project, then loads the account. For a service
/// account caller the permission is checked before the lookup, so a 403 never reveals whether
/// the account exists.
async fn authorised_account(
    state: &AppState,
    principal: &Principal,
    project: &str,
    account: &str,
    permission: &str,
) -> Result<ServiceAccount, ApiError> {
    let path_project = path_project(state, project).await?;
    let hinted = path_project
        .clone()
        .or_else(|| project_of_email(account).map(str::to_string));
    if let Some(p) = &hinted {
        require_project_permission(state, principal, p, permission).await?;
    }
    let found = find_account(&state.store, account).await?;
    let Some(sa) = found else {
        if hinted.is_none() && *principal != Principal::Admin {
            return Err(ApiError::permission_denied(format!(
                "Permission '{permission}' denied on resource (or it may not exist)."
            )));
        }
        return Err(unknown_account(account));
    };
    if hinted.is_none() {
        require_project_permission(state, principal, &sa.project_id, permission).await?;
    }
    if path_project.is_some_and(|p| p != sa.project_id) {
        return Err(unknown_account(account));
    }
    Ok(sa)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct CreateAccountRequest {
    account_id: String,
    service_account: CreateAccountBody,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct CreateAccountBody {
    display_name: String,
    description: String,
}

fn new_unique_id() -> String {
    // Google's unique ids are 21-digit decimal numbers.
    let mut rng = rand::rngs::OsRng;
    let mut s = String::with_capacity(21);
    s.push(char::from(b'1' + rng.gen_range(0..9u8)));
    for _ in 0..20 {
        s.push(char::from(b'0' + rng.gen_range(0..10u8)));
    }
    s
}

fn new_etag() -> String {
    let bytes: [u8; 8] = rand::random();
    STANDARD.encode(bytes)
}

async fn create_account(
    State(state): State<AppState>,
    principal: Principal,
    Path(project): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let project_id = crate::projects::project_id_for(&state.store, &project).await?;
    require_project_permission(&state, &principal, &project_id, perms::SA_CREATE).await?;
    let req: CreateAccountRequest = json_body(&body)?;
    validate_account_id(&req.account_id)?;
    if req.service_account.display_name.chars().count() > 100 {
        return Err(ApiError::invalid_argument(
            "displayName must be at most 100 characters.",
        ));
    }
    if req.service_account.description.chars().count() > 256 {
        return Err(ApiError::invalid_argument(
            "description must be at most 256 characters.",
        ));
    }
    let sa = ServiceAccount {
        email: format!("{}@{}{}", req.account_id, project_id, SA_DOMAIN_SUFFIX),
        project_id: project_id.clone(),
        account_id: req.account_id.clone(),
        unique_id: new_unique_id(),
        display_name: req.service_account.display_name,
        description: req.service_account.description,
        etag: new_etag(),
        disabled: false,
    };
    let inserted = sqlx::query(
        "INSERT INTO iam_service_accounts \
         (email, project_id, account_id, unique_id, display_name, description, etag, create_time) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
    )
    .bind(&sa.email)
    .bind(&sa.project_id)
    .bind(&sa.account_id)
    .bind(&sa.unique_id)
    .bind(&sa.display_name)
    .bind(&sa.description)
    .bind(&sa.etag)
    .bind(now_rfc3339())
    .execute(state.store.pool())
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(ApiError::already_exists(format!(
            "Service account {} already exists within project projects/{}.",
            req.account_id, project_id
        ))
        .with_detail(json!({
            "@type": "type.googleapis.com/google.rpc.ResourceInfo",
            "resourceName": format!("projects/{}/serviceAccounts/{}", project_id, sa.email),
        })));
    }
    tracing::info!(email = %sa.email, by = %principal.display(), "created service account");
    Ok(Json(sa.to_json()))
}

async fn list_accounts(
    State(state): State<AppState>,
    principal: Principal,
    Path(project): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let project_id = crate::projects::project_id_for(&state.store, &project).await?;
    require_project_permission(&state, &principal, &project_id, perms::SA_LIST).await?;
    let (offset, size) = page_bounds(&query, 100, 100)?;
    let rows: Vec<AccountRow> = sqlx::query_as(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM iam_service_accounts WHERE project_id = $1 ORDER BY email"
    ))
    .bind(&project_id)
    .fetch_all(state.store.pool())
    .await?;
    let total = rows.len();
    let accounts: Vec<Value> = rows
        .into_iter()
        .skip(offset)
        .take(size)
        .map(|r| account_from_row(r).to_json())
        .collect();
    let mut out = json!({});
    if !accounts.is_empty() {
        out["accounts"] = Value::Array(accounts);
    }
    if let Some(t) = next_page_token(offset, size, total) {
        out["nextPageToken"] = json!(t);
    }
    Ok(Json(out))
}

async fn get_account(
    State(state): State<AppState>,
    principal: Principal,
    Path((project, account)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let sa = authorised_account(&state, &principal, &project, &account, perms::SA_GET).await?;
    Ok(Json(sa.to_json()))
}

async fn delete_account(
    State(state): State<AppState>,
    principal: Principal,
    Path((project, account)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let sa = authorised_account(&state, &principal, &project, &account, perms::SA_DELETE).await?;
    let mut tx = state.store.begin_write().await?;
    // Keys first: on SQLite a transaction should write before it reads (see store.rs).
    sqlx::query("DELETE FROM iam_sa_keys WHERE email = $1")
        .bind(&sa.email)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM iam_service_accounts WHERE email = $1")
        .bind(&sa.email)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(email = %sa.email, by = %principal.display(), "deleted service account");
    Ok(Json(json!({})))
}

/// `POST .../serviceAccounts/{email}:disable` and `:enable`.
async fn account_verb(
    State(state): State<AppState>,
    principal: Principal,
    Path((project, segment)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let (account, verb) = crate::app::split_verb(&segment);
    let (permission, disabled) = match verb {
        Some("disable") => (perms::SA_DISABLE, true),
        Some("enable") => (perms::SA_ENABLE, false),
        Some(other) => {
            return Err(ApiError::not_found(format!(
                "Unknown method '{other}' on service accounts (expected :disable or :enable)."
            )))
        }
        None => {
            return Err(ApiError::not_found(
                "POST on a service account needs a verb (:disable or :enable).",
            ))
        }
    };
    let sa = authorised_account(&state, &principal, &project, account, permission).await?;
    sqlx::query("UPDATE iam_service_accounts SET disabled = $1, etag = $2 WHERE email = $3")
        .bind(i64::from(disabled))
        .bind(new_etag())
        .bind(&sa.email)
        .execute(state.store.pool())
        .await?;
    tracing::info!(email = %sa.email, disabled, by = %principal.display(), "service account state changed");
    Ok(Json(json!({})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct CreateKeyRequest {
    private_key_type: String,
    key_algorithm: String,
}

/// Key material and certificate for a new key; CPU-heavy (RSA generation), so run it off the
/// async workers.
struct NewKey {
    generated: portico_credentials::GeneratedKey,
    certificate_pem: String,
}

fn make_key(email: &str) -> Result<NewKey, String> {
    let generated = portico_credentials::generate_rsa_key().map_err(|e| e.to_string())?;
    let key_pair = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(
        &generated.private_pkcs8_pem,
        &rcgen::PKCS_RSA_SHA256,
    )
    .map_err(|e| format!("key pair for certificate: {e}"))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| format!("certificate params: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, email);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = time::macros::datetime!(9999-12-31 23:59:59 UTC);
    let serial: [u8; 16] = rand::random();
    // A positive serial: clear the top bit of the DER INTEGER.
    let mut serial = serial.to_vec();
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from(serial));
    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| format!("self-signing certificate: {e}"))?;
    Ok(NewKey {
        generated,
        certificate_pem: cert.pem(),
    })
}

fn key_name(sa: &ServiceAccount, key_id: &str) -> String {
    format!(
        "projects/{}/serviceAccounts/{}/keys/{}",
        sa.project_id, sa.email, key_id
    )
}

fn key_json(sa: &ServiceAccount, key_id: &str, valid_after: &str, valid_before: &str) -> Value {
    json!({
        "name": key_name(sa, key_id),
        "validAfterTime": valid_after,
        "validBeforeTime": valid_before,
        "keyAlgorithm": "KEY_ALG_RSA_2048",
        "keyOrigin": "GOOGLE_PROVIDED",
        "keyType": "USER_MANAGED",
    })
}

/// The key file gcloud writes verbatim. Field order is Google's.
fn key_file_json(state: &AppState, sa: &ServiceAccount, key_id: &str, private_pem: &str) -> Value {
    let base = &state.public_url;
    let encoded_email =
        percent_encoding::utf8_percent_encode(&sa.email, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    json!({
        "type": "service_account",
        "project_id": sa.project_id,
        "private_key_id": key_id,
        "private_key": private_pem,
        "client_email": sa.email,
        "client_id": sa.unique_id,
        "auth_uri": format!("{base}/o/oauth2/auth"),
        "token_uri": format!("{base}/token"),
        "auth_provider_x509_cert_url": format!("{base}/oauth2/v1/certs"),
        "client_x509_cert_url": format!("{base}/robot/v1/metadata/x509/{encoded_email}"),
        "universe_domain": "googleapis.com",
    })
}

async fn create_key(
    State(state): State<AppState>,
    principal: Principal,
    Path((project, account)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let sa = authorised_account(&state, &principal, &project, &account, perms::KEY_CREATE).await?;
    let req: CreateKeyRequest = json_body(&body)?;
    match req.private_key_type.as_str() {
        "" | "TYPE_UNSPECIFIED" | "TYPE_GOOGLE_CREDENTIALS_FILE" => {}
        other => {
            return Err(ApiError::invalid_argument(format!(
                "privateKeyType {other} is not supported; only TYPE_GOOGLE_CREDENTIALS_FILE \
                 (JSON key files) can be created."
            )))
        }
    }
    match req.key_algorithm.as_str() {
        "" | "KEY_ALG_UNSPECIFIED" | "KEY_ALG_RSA_2048" => {}
        other => {
            return Err(ApiError::invalid_argument(format!(
                "keyAlgorithm {other} is not supported; keys are KEY_ALG_RSA_2048."
            )))
        }
    }
    let email = sa.email.clone();
    let new_key = tokio::task::spawn_blocking(move || make_key(&email))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let key_id = new_key.generated.key_id.clone();
    let valid_after = now_rfc3339();
    sqlx::query(
        "INSERT INTO iam_sa_keys (key_id, email, public_key_pem, certificate_pem, valid_after, \
         valid_before, create_time, create_seq) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&key_id)
    .bind(&sa.email)
    .bind(&new_key.generated.public_spki_pem)
    .bind(&new_key.certificate_pem)
    .bind(&valid_after)
    .bind(KEY_VALID_BEFORE)
    .bind(&valid_after)
    .bind(creation_seq())
    .execute(state.store.pool())
    .await?;
    let file = key_file_json(&state, &sa, &key_id, &new_key.generated.private_pkcs8_pem);
    let file_bytes = serde_json::to_vec_pretty(&file)?;
    let mut out = key_json(&sa, &key_id, &valid_after, KEY_VALID_BEFORE);
    out["privateKeyType"] = json!("TYPE_GOOGLE_CREDENTIALS_FILE");
    out["privateKeyData"] = json!(STANDARD.encode(file_bytes));
    tracing::info!(email = %sa.email, key_id = %key_id, by = %principal.display(), "created service account key");
    Ok(Json(out))
}

type KeyRow = (String, String, String);

async fn list_keys(
    State(state): State<AppState>,
    principal: Principal,
    Path((project, account)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let sa = authorised_account(&state, &principal, &project, &account, perms::KEY_LIST).await?;
    // Only user-managed keys exist here; a filter for SYSTEM_MANAGED alone lists nothing.
    let key_types = query.get("keyTypes").map(String::as_str).unwrap_or("");
    if key_types == "SYSTEM_MANAGED" {
        return Ok(Json(json!({})));
    }
    let rows: Vec<KeyRow> = sqlx::query_as(
        "SELECT key_id, valid_after, valid_before FROM iam_sa_keys WHERE email = $1 \
         ORDER BY create_seq, key_id",
    )
    .bind(&sa.email)
    .fetch_all(state.store.pool())
    .await?;
    let keys: Vec<Value> = rows
        .iter()
        .map(|(id, after, before)| key_json(&sa, id, after, before))
        .collect();
    if keys.is_empty() {
        return Ok(Json(json!({})));
    }
    Ok(Json(json!({ "keys": keys })))
}

async fn get_key(
    State(state): State<AppState>,
    principal: Principal,
    Path((project, account, key)): Path<(String, String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let sa = authorised_account(&state, &principal, &project, &account, perms::KEY_GET).await?;
    let row: Option<(String, String, String, String)> = sqlx::query_as(
        "SELECT valid_after, valid_before, public_key_pem, certificate_pem FROM iam_sa_keys \
         WHERE key_id = $1 AND email = $2",
    )
    .bind(&key)
    .bind(&sa.email)
    .fetch_optional(state.store.pool())
    .await?;
    let Some((after, before, public_pem, cert_pem)) = row else {
        return Err(ApiError::not_found(format!(
            "Service account key {key} does not exist."
        )));
    };
    let mut out = key_json(&sa, &key, &after, &before);
    match query.get("publicKeyType").map(String::as_str) {
        None | Some("") | Some("TYPE_NONE") => {}
        Some("TYPE_X509_PEM_FILE") => {
            out["publicKeyData"] = json!(STANDARD.encode(cert_pem.as_bytes()));
        }
        Some("TYPE_RAW_PUBLIC_KEY") => {
            // The PEM body is already the base64 of the SPKI DER.
            let body: String = public_pem
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect();
            out["publicKeyData"] = json!(body);
        }
        Some(other) => {
            return Err(ApiError::invalid_argument(format!(
            "Invalid publicKeyType '{other}': expected TYPE_X509_PEM_FILE or TYPE_RAW_PUBLIC_KEY."
        )))
        }
    }
    Ok(Json(out))
}

async fn delete_key(
    State(state): State<AppState>,
    principal: Principal,
    Path((project, account, key)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let sa = authorised_account(&state, &principal, &project, &account, perms::KEY_DELETE).await?;
    let deleted = sqlx::query("DELETE FROM iam_sa_keys WHERE key_id = $1 AND email = $2")
        .bind(&key)
        .bind(&sa.email)
        .execute(state.store.pool())
        .await?;
    if deleted.rows_affected() == 0 {
        return Err(ApiError::not_found(format!(
            "Service account key {key} does not exist."
        )));
    }
    tracing::info!(email = %sa.email, key_id = %key, by = %principal.display(), "deleted service account key");
    Ok(Json(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_id_rule() {
        for ok in [
            "esp-sa",
            "echo-sa",
            "a12345",
            "abcdefghijklmnopqrstuvwxyz1234",
        ] {
            assert!(validate_account_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "sa",
            "Bad_Name",
            "1abcdef",
            "abcde-",
            "abcdefghijklmnopqrstuvwxyz12345",
            "",
            "abc def",
        ] {
            let e = validate_account_id(bad).expect_err(bad);
            assert_eq!(e.code, crate::error::Code::InvalidArgument);
            assert!(e.message.contains(bad), "{}", e.message);
        }
    }

    #[test]
    fn email_project_hint() {
        assert_eq!(
            project_of_email("esp-sa@demo-proj.iam.gserviceaccount.com"),
            Some("demo-proj")
        );
        assert_eq!(project_of_email("someone@example.com"), None);
        assert_eq!(project_of_email("123456789012345678901"), None);
    }

    #[test]
    fn unique_ids_look_like_googles() {
        let id = new_unique_id();
        assert_eq!(id.len(), 21);
        assert!(id.chars().all(|c| c.is_ascii_digit()));
        assert!(!id.starts_with('0'));
    }

    #[test]
    fn paging_round_trip() {
        let mut q = HashMap::new();
        q.insert("pageSize".to_string(), "2".to_string());
        assert_eq!(page_bounds(&q, 100, 100).expect("bounds"), (0, 2));
        let t = next_page_token(0, 2, 5).expect("token");
        q.insert("pageToken".to_string(), t);
        assert_eq!(page_bounds(&q, 100, 100).expect("bounds"), (2, 2));
        assert_eq!(next_page_token(4, 2, 5), None);
        q.insert("pageToken".to_string(), "!!".to_string());
        assert!(page_bounds(&q, 100, 100).is_err());
    }

    #[test]
    fn key_material_and_certificate_match() {
        let k = make_key("esp-sa@demo-proj.iam.gserviceaccount.com").expect("key");
        assert!(k.certificate_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(k.generated.key_id.len(), 40);
        // A token signed with the private key verifies with the stored public key.
        let key_file = portico_credentials::ServiceAccountKey {
            key_type: "service_account".into(),
            project_id: "demo-proj".into(),
            private_key_id: k.generated.key_id.clone(),
            private_key: k.generated.private_pkcs8_pem.clone(),
            client_email: "esp-sa@demo-proj.iam.gserviceaccount.com".into(),
            client_id: String::new(),
            auth_uri: String::new(),
            token_uri: "http://127.0.0.1/token".into(),
            auth_provider_x509_cert_url: String::new(),
            client_x509_cert_url: String::new(),
            universe_domain: String::new(),
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp() as u64;
        let t = key_file
            .self_signed_token("http://127.0.0.1/x", now, 600)
            .expect("sign");
        portico_credentials::verify_rs256(&t, &k.generated.public_spki_pem).expect("verify");
    }
}
