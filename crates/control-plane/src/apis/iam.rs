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
//! `store::accounts::certificates` returns them for whoever serves that URL. Deleting a key deletes its row, so
//! self-signed JWTs and access tokens minted with it stop verifying at once (see `apis/tokens.rs`).
//!
//! Authorization: the admin token may do anything; a service account needs a project role that
//! grants the `iam.*` permission (see [`crate::authz::require_project_permission`]).
//!
//! Layer rule: handlers only; accounts and keys are stored by `crate::store::accounts`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::app::{parse_json_body, AppState, IdentityState, PageSizeWording, Params};
use crate::authz::{perms, require_project_permission, Principal};
use crate::error::ApiError;
use crate::store::accounts::{self, NewAccountKey, ServiceAccount};
use crate::store::now_rfc3339;

pub use crate::store::accounts::SA_DOMAIN_SUFFIX;
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

/// `google.iam.admin.v1.ServiceAccount` on the wire.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceAccountJson {
    name: String,
    project_id: String,
    unique_id: String,
    email: String,
    etag: String,
    oauth2_client_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    display_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    description: String,
    /// Present only when true, like Google.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    disabled: bool,
}

impl From<ServiceAccount> for ServiceAccountJson {
    fn from(sa: ServiceAccount) -> Self {
        ServiceAccountJson {
            name: format!("projects/{}/serviceAccounts/{}", sa.project_id, sa.email),
            oauth2_client_id: sa.unique_id.clone(),
            project_id: sa.project_id,
            unique_id: sa.unique_id,
            email: sa.email,
            etag: sa.etag,
            display_name: sa.display_name,
            description: sa.description,
            disabled: sa.disabled,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ListAccountsResponse {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    accounts: Vec<ServiceAccountJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_page_token: Option<String>,
}

/// `google.iam.admin.v1.ServiceAccountKey` on the wire; the optional fields appear only in the
/// create (`privateKey*`) and get-with-`publicKeyType` (`publicKeyData`) answers.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceAccountKeyJson {
    name: String,
    valid_after_time: String,
    valid_before_time: String,
    key_algorithm: &'static str,
    key_origin: &'static str,
    key_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    private_key_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    private_key_data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    public_key_data: Option<String>,
}

#[derive(Debug, Serialize)]
struct ListKeysResponse {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    keys: Vec<ServiceAccountKeyJson>,
}

/// The `{}` Google answers for deletes and state changes.
#[derive(Debug, Serialize)]
struct Empty {}

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

/// Resolves the `{project}` path segment; `-` means "whatever project the account is in".
async fn path_project(state: &IdentityState, project: &str) -> Result<Option<String>, ApiError> {
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
    state: &IdentityState,
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
    let found = accounts::find(&state.store, account).await?;
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
    State(state): State<IdentityState>,
    principal: Principal,
    Path(project): Path<String>,
    body: Bytes,
) -> Result<Json<ServiceAccountJson>, ApiError> {
    let project_id = crate::projects::project_id_for(&state.store, &project).await?;
    require_project_permission(&state, &principal, &project_id, perms::SA_CREATE).await?;
    let req: CreateAccountRequest = parse_json_body(&body)?;
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
    if !accounts::insert(&state.store, &sa, &now_rfc3339()).await? {
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
    Ok(Json(sa.into()))
}

async fn list_accounts(
    State(state): State<IdentityState>,
    principal: Principal,
    Path(project): Path<String>,
    params: Params,
) -> Result<Json<ListAccountsResponse>, ApiError> {
    let project_id = crate::projects::project_id_for(&state.store, &project).await?;
    require_project_permission(&state, &principal, &project_id, perms::SA_LIST).await?;
    let page = params.paging(100, 100, PageSizeWording::Number)?;
    let all = accounts::list_in_project(&state.store, &project_id).await?;
    let total = all.len();
    let accounts = all
        .into_iter()
        .skip(page.offset)
        .take(page.size)
        .map(ServiceAccountJson::from)
        .collect();
    Ok(Json(ListAccountsResponse {
        accounts,
        next_page_token: page.next_token(total),
    }))
}

async fn get_account(
    State(state): State<IdentityState>,
    principal: Principal,
    Path((project, account)): Path<(String, String)>,
) -> Result<Json<ServiceAccountJson>, ApiError> {
    let sa = authorised_account(&state, &principal, &project, &account, perms::SA_GET).await?;
    Ok(Json(sa.into()))
}

async fn delete_account(
    State(state): State<IdentityState>,
    principal: Principal,
    Path((project, account)): Path<(String, String)>,
) -> Result<Json<Empty>, ApiError> {
    let sa = authorised_account(&state, &principal, &project, &account, perms::SA_DELETE).await?;
    accounts::delete(&state.store, &sa.email).await?;
    tracing::info!(email = %sa.email, by = %principal.display(), "deleted service account");
    Ok(Json(Empty {}))
}

/// `POST .../serviceAccounts/{email}:disable` and `:enable`; other APIs' verbs on this path
/// (IAM Credentials' `:generateIdToken`) go to their handlers in [`crate::app::ACCOUNT_VERB_HANDLERS`].
async fn account_verb(
    State(app): State<AppState>,
    Path((project, segment)): Path<(String, String)>,
    req: axum::extract::Request,
) -> Result<axum::response::Response, ApiError> {
    use axum::extract::FromRequestParts as _;
    use axum::response::IntoResponse as _;
    let (account, verb) = crate::app::split_verb(&segment);
    if let Some((_, handler)) = verb.and_then(|v| {
        crate::app::ACCOUNT_VERB_HANDLERS
            .iter()
            .find(|(name, _)| *name == v)
    }) {
        return Ok(handler(app.clone(), project.clone(), account.to_string(), req).await);
    }
    let (mut parts, _body) = req.into_parts();
    let principal = Principal::from_request_parts(&mut parts, &app).await?;
    let state = <IdentityState as axum::extract::FromRef<AppState>>::from_ref(&app);
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
    accounts::set_disabled(&state.store, &sa.email, disabled, &new_etag()).await?;
    tracing::info!(email = %sa.email, disabled, by = %principal.display(), "service account state changed");
    Ok(Json(Empty {}).into_response())
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
    let certificate_pem =
        crate::crypto::self_signed_certificate(&generated.private_pkcs8_pem, email)?;
    Ok(NewKey {
        generated,
        certificate_pem,
    })
}

fn key_name(sa: &ServiceAccount, key_id: &str) -> String {
    format!(
        "projects/{}/serviceAccounts/{}/keys/{}",
        sa.project_id, sa.email, key_id
    )
}

fn key_json(
    sa: &ServiceAccount,
    key_id: &str,
    valid_after: &str,
    valid_before: &str,
) -> ServiceAccountKeyJson {
    ServiceAccountKeyJson {
        name: key_name(sa, key_id),
        valid_after_time: valid_after.to_string(),
        valid_before_time: valid_before.to_string(),
        key_algorithm: "KEY_ALG_RSA_2048",
        key_origin: "GOOGLE_PROVIDED",
        key_type: "USER_MANAGED",
        private_key_type: None,
        private_key_data: None,
        public_key_data: None,
    }
}

/// The key file gcloud writes verbatim (field order is Google's, kept by the struct).
fn key_file(
    state: &IdentityState,
    sa: &ServiceAccount,
    key_id: &str,
    private_pem: &str,
) -> portico_credentials::ServiceAccountKey {
    let base = &state.public_url;
    let encoded_email =
        percent_encoding::utf8_percent_encode(&sa.email, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    portico_credentials::ServiceAccountKey {
        key_type: "service_account".to_string(),
        project_id: sa.project_id.clone(),
        private_key_id: key_id.to_string(),
        private_key: private_pem.to_string(),
        client_email: sa.email.clone(),
        client_id: sa.unique_id.clone(),
        auth_uri: format!("{base}/o/oauth2/auth"),
        token_uri: format!("{base}/token"),
        auth_provider_x509_cert_url: format!("{base}/oauth2/v1/certs"),
        client_x509_cert_url: format!("{base}/robot/v1/metadata/x509/{encoded_email}"),
        universe_domain: "googleapis.com".to_string(),
    }
}

async fn create_key(
    State(state): State<IdentityState>,
    principal: Principal,
    Path((project, account)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<ServiceAccountKeyJson>, ApiError> {
    let sa = authorised_account(&state, &principal, &project, &account, perms::KEY_CREATE).await?;
    let req: CreateKeyRequest = parse_json_body(&body)?;
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
    accounts::insert_key(
        &state.store,
        &NewAccountKey {
            key_id: &key_id,
            email: &sa.email,
            public_key_pem: &new_key.generated.public_spki_pem,
            certificate_pem: &new_key.certificate_pem,
            valid_after: &valid_after,
            valid_before: KEY_VALID_BEFORE,
        },
    )
    .await?;
    let file = key_file(&state, &sa, &key_id, &new_key.generated.private_pkcs8_pem);
    let file_bytes = serde_json::to_vec_pretty(&file)?;
    let mut out = key_json(&sa, &key_id, &valid_after, KEY_VALID_BEFORE);
    out.private_key_type = Some("TYPE_GOOGLE_CREDENTIALS_FILE");
    out.private_key_data = Some(STANDARD.encode(file_bytes));
    tracing::info!(email = %sa.email, key_id = %key_id, by = %principal.display(), "created service account key");
    Ok(Json(out))
}

async fn list_keys(
    State(state): State<IdentityState>,
    principal: Principal,
    Path((project, account)): Path<(String, String)>,
    params: Params,
) -> Result<Json<ListKeysResponse>, ApiError> {
    let sa = authorised_account(&state, &principal, &project, &account, perms::KEY_LIST).await?;
    // Only user-managed keys exist here; a filter for SYSTEM_MANAGED alone lists nothing.
    if params.0.get("keyTypes").map(String::as_str) == Some("SYSTEM_MANAGED") {
        return Ok(Json(ListKeysResponse { keys: Vec::new() }));
    }
    let keys = accounts::list_keys(&state.store, &sa.email)
        .await?
        .iter()
        .map(|k| key_json(&sa, &k.key_id, &k.valid_after, &k.valid_before))
        .collect();
    Ok(Json(ListKeysResponse { keys }))
}

async fn get_key(
    State(state): State<IdentityState>,
    principal: Principal,
    Path((project, account, key)): Path<(String, String, String)>,
    params: Params,
) -> Result<Json<ServiceAccountKeyJson>, ApiError> {
    let sa = authorised_account(&state, &principal, &project, &account, perms::KEY_GET).await?;
    let Some(stored) = accounts::get_key(&state.store, &sa.email, &key).await? else {
        return Err(ApiError::not_found(format!(
            "Service account key {key} does not exist."
        )));
    };
    let mut out = key_json(&sa, &key, &stored.valid_after, &stored.valid_before);
    match params.0.get("publicKeyType").map(String::as_str) {
        None | Some("") | Some("TYPE_NONE") => {}
        Some("TYPE_X509_PEM_FILE") => {
            out.public_key_data = Some(STANDARD.encode(stored.certificate_pem.as_bytes()));
        }
        Some("TYPE_RAW_PUBLIC_KEY") => {
            // The PEM body is already the base64 of the SPKI DER.
            let body: String = stored
                .public_key_pem
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect();
            out.public_key_data = Some(body);
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
    State(state): State<IdentityState>,
    principal: Principal,
    Path((project, account, key)): Path<(String, String, String)>,
) -> Result<Json<Empty>, ApiError> {
    let sa = authorised_account(&state, &principal, &project, &account, perms::KEY_DELETE).await?;
    if !accounts::delete_key(&state.store, &sa.email, &key).await? {
        return Err(ApiError::not_found(format!(
            "Service account key {key} does not exist."
        )));
    }
    tracing::info!(email = %sa.email, key_id = %key, by = %principal.display(), "deleted service account key");
    Ok(Json(Empty {}))
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
