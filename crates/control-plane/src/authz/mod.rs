//! Authentication (who is calling) and authorization (may they), plus the IAM `Policy` type.
//!
//! - The admin token: 32 random bytes written to `DATA/admin-token` (mode 0600) on first start.
//!   gcloud sends it via `auth/access_token_file`. Its value is never logged.
//! - [`Principal`] is an axum extractor: `Authorization: Bearer <t>` → `Admin` if `t` is the
//!   admin token, otherwise each [`TokenVerifier`] in `AppState::verifiers` is asked (the
//!   identity module verifies service-account JWTs / issued access tokens). No header or an
//!   unknown token → 401 UNAUTHENTICATED.
//! - [`require_service_permission`]: admin always; a service account needs a role granting the
//!   permission in the service's IAM policy (stored by Service Management) or in the producer
//!   project's policy (via [`ProjectPolicySource`], provided by the identity module).

use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::pin::Pin;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::app::AppState;
use crate::error::ApiError;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Holder of the admin token.
    Admin,
    /// A service account, authenticated by a verifier.
    ServiceAccount { email: String },
}

impl Principal {
    /// IAM member string (`serviceAccount:<email>`), `None` for the admin.
    pub fn member(&self) -> Option<String> {
        match self {
            Principal::Admin => None,
            Principal::ServiceAccount { email } => Some(format!("serviceAccount:{email}")),
        }
    }

    /// What to record in `createdBy` fields.
    pub fn display(&self) -> String {
        match self {
            Principal::Admin => "admin".to_string(),
            Principal::ServiceAccount { email } => email.clone(),
        }
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Verifies a non-admin bearer token.
pub trait TokenVerifier: Send + Sync + 'static {
    /// `Ok(Some(p))`: the token is valid and names `p`. `Ok(None)`: not a token this verifier
    /// understands (the next one is asked). `Err`: recognised but rejected (expired, bad
    /// signature); the error is returned to the caller as is.
    fn verify<'a>(
        &'a self,
        state: &'a AppState,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Option<Principal>, ApiError>>;
}

/// Project-level IAM policies (Resource Manager), consulted after the service's own policy.
pub trait ProjectPolicySource: Send + Sync + 'static {
    fn project_policy<'a>(
        &'a self,
        state: &'a AppState,
        project_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Policy>, ApiError>>;
}

/// The admin bearer token; only its SHA-256 is kept in memory after loading.
pub(crate) struct AdminToken {
    digest: [u8; 32],
}

impl AdminToken {
    /// Reads the token file, or creates it (mode 0600) with a fresh random token.
    pub(crate) fn load_or_create(path: &Path) -> std::io::Result<AdminToken> {
        match std::fs::read_to_string(path) {
            Ok(s) => {
                let t = s.trim();
                if t.is_empty() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "admin token file is empty",
                    ));
                }
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    if let Ok(m) = std::fs::metadata(path) {
                        if m.permissions().mode() & 0o077 != 0 {
                            tracing::warn!(
                                path = %path.display(),
                                "the admin token file is readable by other users; chmod 600 it"
                            );
                        }
                    }
                }
                return Ok(AdminToken::from_value(t));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)?;
            }
        }
        let mut raw = [0u8; 32];
        rand::Rng::fill(&mut rand::rngs::OsRng, &mut raw[..]);
        let token = format!(
            "ptk_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        );
        let mut f = {
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                o.mode(0o600);
            }
            o.open(path)?
        };
        f.write_all(token.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        tracing::info!(path = %path.display(), "wrote a new admin token");
        Ok(AdminToken::from_value(&token))
    }

    fn from_value(t: &str) -> AdminToken {
        AdminToken {
            digest: Sha256::digest(t.as_bytes()).into(),
        }
    }

    /// Compares digests so timing does not depend on how many leading characters match.
    fn matches(&self, presented: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        d.iter()
            .zip(self.digest.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// The bearer token from an `Authorization` header, if any.
pub fn bearer_token(parts: &Parts) -> Option<&str> {
    let v = parts
        .headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        let t = rest.trim();
        (!t.is_empty()).then_some(t)
    } else {
        None
    }
}

/// Resolves a bearer token to a principal (admin first, then the verifiers).
pub async fn authenticate(state: &AppState, token: Option<&str>) -> Result<Principal, ApiError> {
    let Some(token) = token else {
        return Err(ApiError::unauthenticated(
            "Request is missing required authentication credential: expected an \
             'Authorization: Bearer <token>' header with the admin token or a service-account \
             access token.",
        ));
    };
    if state.admin_token.matches(token) {
        return Ok(Principal::Admin);
    }
    for v in &state.verifiers {
        if let Some(p) = v.verify(state, token).await? {
            return Ok(p);
        }
    }
    Err(ApiError::unauthenticated(
        "Request had invalid authentication credentials: the bearer token is not the admin \
         token and not a valid service-account token.",
    ))
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(p) = parts.extensions.get::<Principal>() {
            return Ok(p.clone());
        }
        let token = bearer_token(parts).map(str::to_string);
        let p = authenticate(state, token.as_deref()).await?;
        parts.extensions.insert(p.clone());
        Ok(p)
    }
}

/// Permissions checked by this crate.
pub mod perms {
    pub const SERVICES_GET: &str = "servicemanagement.services.get";
    pub const SERVICES_UPDATE: &str = "servicemanagement.services.update";
    pub const SERVICES_DELETE: &str = "servicemanagement.services.delete";
    pub const SERVICES_GET_IAM: &str = "servicemanagement.services.getIamPolicy";
    pub const SERVICES_SET_IAM: &str = "servicemanagement.services.setIamPolicy";
    pub const SERVICES_CHECK: &str = "servicemanagement.services.check";
    pub const SERVICES_REPORT: &str = "servicemanagement.services.report";
    pub const SERVICES_QUOTA: &str = "servicemanagement.services.quota";
    pub const SERVICES_BIND: &str = "servicemanagement.services.bind";
    pub const SERVICES_CREATE: &str = "servicemanagement.services.create";
    pub const SERVICEUSAGE_ENABLE: &str = "serviceusage.services.enable";
    pub const SERVICEUSAGE_DISABLE: &str = "serviceusage.services.disable";
    pub const SERVICEUSAGE_LIST: &str = "serviceusage.services.list";
}

/// Whether `role` includes `permission` (the subset of Google's predefined roles Portico knows).
pub fn role_grants(role: &str, permission: &str) -> bool {
    use perms::*;
    let is_iam_write = permission.ends_with(".setIamPolicy");
    match role {
        "roles/owner" => true,
        "roles/editor" => !is_iam_write,
        "roles/viewer" => permission.ends_with(".get") || permission.ends_with(".list"),
        "roles/servicemanagement.admin" => permission.starts_with("servicemanagement."),
        "roles/servicemanagement.configEditor" => {
            matches!(permission, SERVICES_GET | SERVICES_UPDATE)
        }
        // ESP fetches configs and rollouts with this role, so it includes reads.
        "roles/servicemanagement.serviceController" => matches!(
            permission,
            SERVICES_GET | SERVICES_CHECK | SERVICES_REPORT | SERVICES_QUOTA
        ),
        "roles/servicemanagement.serviceConsumer" => permission == SERVICES_BIND,
        "roles/serviceusage.serviceUsageAdmin" => permission.starts_with("serviceusage."),
        "roles/serviceusage.serviceUsageConsumer" => permission == SERVICEUSAGE_LIST,
        _ => false,
    }
}

/// Admin: always allowed. Service account: needs a role granting `permission` in the service's
/// policy or the producer project's policy. A denial reads like Google's ("not found or
/// permission denied") so callers cannot probe which services exist.
pub async fn require_service_permission(
    state: &AppState,
    principal: &Principal,
    service_name: &str,
    permission: &str,
) -> Result<(), ApiError> {
    let Some(member) = principal.member() else {
        return Ok(());
    };
    let denied = || {
        ApiError::permission_denied(format!(
            "Permission '{permission}' denied on service '{service_name}' for {member}, or the \
             service was not found."
        ))
    };
    let Some((policy, producer)) =
        crate::apis::servicemanagement::policy_and_producer(state, service_name).await?
    else {
        return Err(denied());
    };
    if policy.grants(&member, permission) {
        return Ok(());
    }
    if let Some(src) = &state.project_policies {
        if let Some(pp) = src.project_policy(state, &producer).await? {
            if pp.grants(&member, permission) {
                return Ok(());
            }
        }
    }
    Err(denied())
}

/// Admin: always allowed. Service account: needs a role granting `permission` in the project's
/// policy (only available when a [`ProjectPolicySource`] is installed).
pub async fn require_project_permission(
    state: &AppState,
    principal: &Principal,
    project_id: &str,
    permission: &str,
) -> Result<(), ApiError> {
    let Some(member) = principal.member() else {
        return Ok(());
    };
    if let Some(src) = &state.project_policies {
        if let Some(pp) = src.project_policy(state, project_id).await? {
            if pp.grants(&member, permission) {
                return Ok(());
            }
        }
    }
    Err(ApiError::permission_denied(format!(
        "Permission '{permission}' denied on project '{project_id}' for {member}."
    )))
}

/// `google.iam.v1.Policy` (bindings without conditions).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Policy {
    #[serde(skip_serializing_if = "is_zero")]
    pub version: i64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bindings: Vec<Binding>,
    /// Base64 (standard alphabet on output; either alphabet accepted on input).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub etag: String,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Binding {
    pub role: String,
    pub members: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub condition: Option<serde_json::Value>,
}

impl Policy {
    pub fn grants(&self, member: &str, permission: &str) -> bool {
        self.bindings
            .iter()
            .any(|b| b.members.iter().any(|m| m == member) && role_grants(&b.role, permission))
    }

    /// Normalises a policy about to be stored: drops empty bindings, merges duplicate roles,
    /// dedups members, and sets a fresh etag derived from the content.
    pub fn normalized_for_store(mut self) -> Result<Policy, ApiError> {
        let mut merged: Vec<Binding> = Vec::new();
        for b in self.bindings.drain(..) {
            if b.role.is_empty() {
                return Err(ApiError::invalid_argument("Binding has an empty role.")
                    .with_field_violation("policy.bindings.role", "must not be empty"));
            }
            if b.condition.is_some() {
                return Err(ApiError::invalid_argument(
                    "Conditional role bindings are not supported.",
                ));
            }
            for m in &b.members {
                validate_member(m)?;
            }
            match merged.iter_mut().find(|x| x.role == b.role) {
                Some(x) => x.members.extend(b.members),
                None => merged.push(b),
            }
        }
        for b in &mut merged {
            b.members.sort();
            b.members.dedup();
        }
        merged.retain(|b| !b.members.is_empty());
        self.bindings = merged;
        if self.version == 0 {
            self.version = 1;
        }
        self.etag = String::new();
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&self).unwrap_or_default());
        h.update(uuid::Uuid::new_v4().as_bytes());
        self.etag = base64::engine::general_purpose::STANDARD.encode(&h.finalize()[..8]);
        Ok(self)
    }
}

fn validate_member(m: &str) -> Result<(), ApiError> {
    let ok = match m.split_once(':') {
        Some(("user" | "serviceAccount" | "group" | "domain" | "principal", rest)) => {
            !rest.is_empty()
        }
        _ => matches!(m, "allUsers" | "allAuthenticatedUsers"),
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_argument(format!(
            "Invalid member '{m}': expected user:, serviceAccount:, group:, domain:, allUsers \
             or allAuthenticatedUsers."
        )))
    }
}

/// Decodes base64 in either alphabet, padding optional (gcloud re-encodes bytes URL-safe).
pub fn decode_base64_any(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let trimmed = s.trim().trim_end_matches('=');
    if trimmed.contains(['+', '/']) && trimmed.contains(['-', '_']) {
        return None;
    }
    let cleaned: String = trimmed.chars().filter(|c| !c.is_whitespace()).collect();
    if cleaned.contains(['-', '_']) {
        URL_SAFE_NO_PAD.decode(cleaned.as_bytes()).ok()
    } else {
        STANDARD_NO_PAD.decode(cleaned.as_bytes()).ok()
    }
}

/// Whether a presented etag equals the stored one, compared as decoded bytes.
/// An empty presented etag means "unconditional" (Google's semantics).
pub fn etag_matches(presented: &str, stored: &str) -> Result<bool, ApiError> {
    if presented.is_empty() {
        return Ok(true);
    }
    let p = decode_base64_any(presented).ok_or_else(|| {
        ApiError::invalid_argument(format!("Invalid etag '{presented}': not valid base64."))
            .with_field_violation("policy.etag", "must be base64")
    })?;
    Ok(decode_base64_any(stored).is_some_and(|s| s == p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_either_alphabet_padding_optional() {
        assert_eq!(
            decode_base64_any("APrp7M925/g="),
            decode_base64_any("APrp7M925_g")
        );
        assert!(decode_base64_any("APrp7M925_g=").is_some());
        assert_eq!(decode_base64_any("Pz8/"), Some(b"???".to_vec()));
        assert_eq!(decode_base64_any("Pz8_"), Some(b"???".to_vec()));
        assert!(decode_base64_any("W/\"abc\"").is_none());
    }

    #[test]
    fn etags_compare_as_bytes() {
        assert!(etag_matches("APrp7M925_g=", "APrp7M925/g=").unwrap());
        assert!(!etag_matches("ACAB", "APrp7M925/g=").unwrap());
        assert!(etag_matches("", "APrp7M925/g=").unwrap());
        assert!(etag_matches("!!", "ACAB").is_err());
    }

    #[test]
    fn roles() {
        assert!(role_grants(
            "roles/servicemanagement.serviceController",
            perms::SERVICES_CHECK
        ));
        assert!(role_grants(
            "roles/servicemanagement.serviceController",
            perms::SERVICES_GET
        ));
        assert!(!role_grants(
            "roles/servicemanagement.serviceController",
            perms::SERVICES_UPDATE
        ));
        assert!(!role_grants("roles/editor", perms::SERVICES_SET_IAM));
        assert!(role_grants("roles/owner", perms::SERVICES_SET_IAM));
        assert!(!role_grants("roles/cloudtrace.agent", perms::SERVICES_GET));
    }

    #[test]
    fn normalise_merges_and_sets_etag() {
        let p = Policy {
            version: 0,
            bindings: vec![
                Binding {
                    role: "roles/owner".into(),
                    members: vec!["user:a@x".into()],
                    condition: None,
                },
                Binding {
                    role: "roles/owner".into(),
                    members: vec!["user:a@x".into(), "user:b@x".into()],
                    condition: None,
                },
                Binding {
                    role: "roles/viewer".into(),
                    members: vec![],
                    condition: None,
                },
            ],
            etag: "x".into(),
        }
        .normalized_for_store()
        .unwrap();
        assert_eq!(p.version, 1);
        assert_eq!(p.bindings.len(), 1);
        assert_eq!(p.bindings[0].members, vec!["user:a@x", "user:b@x"]);
        assert!(decode_base64_any(&p.etag).is_some());
        assert!(p.grants("user:b@x", perms::SERVICES_SET_IAM));
    }

    #[test]
    fn bad_member_rejected() {
        let p = Policy {
            bindings: vec![Binding {
                role: "roles/owner".into(),
                members: vec!["bob".into()],
                condition: None,
            }],
            ..Default::default()
        };
        assert_eq!(
            p.normalized_for_store().unwrap_err().code,
            crate::error::Code::InvalidArgument
        );
    }

    #[test]
    fn admin_token_file_is_private_and_stable() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("admin-token");
        let a = AdminToken::load_or_create(&p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(a.matches(text.trim()));
        assert!(!a.matches("ptk_wrong"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let b = AdminToken::load_or_create(&p).unwrap();
        assert_eq!(a.digest, b.digest);
    }
}
