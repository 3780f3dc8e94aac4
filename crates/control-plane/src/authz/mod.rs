//! Authentication (who is calling) and authorization (may they).
//!
//! - The admin token: 32 random bytes written to `DATA/admin-token` (mode 0600) on first start.
//!   gcloud sends it via `auth/access_token_file`. Its value is never logged.
//! - [`Principal`] is an axum extractor: `Authorization: Bearer <t>` → `Admin` if `t` is the
//!   admin token, otherwise each [`TokenVerifier`] in `AppState::verifiers` is asked (the
//!   tokens API verifies service-account JWTs / issued access tokens). No header or an unknown
//!   token → 401 UNAUTHENTICATED.
//! - [`roles`]: the permissions and the one role → permission table.
//! - [`policy`]: the IAM policy model (Policy, Binding, etag).
//! - [`check`] holds [`require_service_permission`] (admin always; a service account needs a role
//!   granting the permission in the service's IAM policy or in the producer project's policy)
//!   and [`require_project_permission`] (the project's policy).
//!
//! Layer rule: `authz` sits below `apis/` and reads policies from `store`. The one exception
//! is the service policy lookup, which lives in Service Management's module today.

pub mod check;
pub mod policy;
pub mod roles;

pub use check::{require_project_permission, require_service_permission};
pub use policy::{
    canonical_etag, decode_base64_any, etag_matches, load_project_policy, Binding, Policy,
    EMPTY_POLICY_ETAG,
};
pub use roles::{perms, role_grants};

use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::pin::Pin;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine;
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

#[cfg(test)]
mod tests {
    use super::*;

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
