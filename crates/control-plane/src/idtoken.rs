//! The control plane as an OpenID issuer: its own RS256 key for ID tokens (the tokens a backend
//! checks to know which service account is calling it — Cloud Run's pattern, and ESP's backend
//! authentication).
//!
//! Each control-plane process keeps one signing key in its secrets directory
//! (`id-token-signing-key.json`, mode 0600, next to the admin token): this is the issuer's key,
//! like Google's own signing keys, not a service account's — service-account private keys are
//! never stored. The key's public half and a self-signed certificate go into the database
//! ([`crate::store::idtoken_keys`]), and the published key sets are read from there, so with
//! several replicas on one PostgreSQL every replica's key verifies wherever the set is fetched.
//!
//! Tokens: `iss` = the control plane's public URL (what its OpenID discovery document names),
//! `aud` = the requested audience, `sub` and `azp` = the account's numeric unique id, `email`
//! and `email_verified` when asked for, `iat`, `exp` one hour later — the claims Google's ID
//! tokens for service accounts carry.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// File name of the signing key in the secrets directory.
pub const KEY_FILE: &str = "id-token-signing-key.json";

/// Lifetime of an ID token, as Google's.
pub const ID_TOKEN_LIFETIME_S: i64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum IdTokenError {
    #[error("cannot read the ID-token signing key {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("cannot create the ID-token signing key {path}: {reason}")]
    Create { path: String, reason: String },
    #[error("signing an ID token: {0}")]
    Sign(String),
}

/// What the key file holds. `kid` travels with the key so a restart publishes the same id.
#[derive(Serialize, Deserialize)]
struct KeyFile {
    kid: String,
    private_key_pem: String,
}

/// The public half, for the published key sets.
#[derive(Debug, Clone)]
pub struct PublicKey {
    pub kid: String,
    pub public_pem: String,
    pub certificate_pem: String,
}

/// Signs ID tokens with this process's key. `Debug` never prints key material.
pub struct IdTokenSigner {
    kid: String,
    key: jsonwebtoken::EncodingKey,
    issuer: String,
    public: PublicKey,
}

impl std::fmt::Debug for IdTokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdTokenSigner")
            .field("kid", &self.kid)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// Claims of one ID token.
#[derive(Debug, Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    azp: &'a str,
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email_verified: Option<bool>,
    iat: i64,
    exp: i64,
}

/// Who a token is for and about.
pub struct Subject<'a> {
    pub unique_id: &'a str,
    pub email: &'a str,
    pub include_email: bool,
}

impl IdTokenSigner {
    /// Loads the key from `dir`, or makes one (RSA generation: call off the async workers).
    /// A key file that exists but cannot be read or parsed is an error, never replaced: tokens
    /// already issued under it would stop verifying.
    pub fn load_or_create(dir: &Path, issuer: &str) -> Result<IdTokenSigner, IdTokenError> {
        let path = dir.join(KEY_FILE);
        let shown = path.display().to_string();
        let file = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str::<KeyFile>(&text).map_err(|e| IdTokenError::Read {
                path: shown.clone(),
                reason: format!("not a Portico key file: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let generated =
                    portico_credentials::generate_rsa_key().map_err(|e| IdTokenError::Create {
                        path: shown.clone(),
                        reason: e.to_string(),
                    })?;
                let file = KeyFile {
                    kid: generated.key_id,
                    private_key_pem: generated.private_pkcs8_pem,
                };
                let text = serde_json::to_string(&file).map_err(|e| IdTokenError::Create {
                    path: shown.clone(),
                    reason: e.to_string(),
                })?;
                crate::crypto::write_private_file(&path, &text).map_err(|e| {
                    IdTokenError::Create {
                        path: shown.clone(),
                        reason: e.to_string(),
                    }
                })?;
                file
            }
            Err(e) => {
                return Err(IdTokenError::Read {
                    path: shown,
                    reason: e.to_string(),
                })
            }
        };
        Self::from_key_file(file, issuer, &shown)
    }

    fn from_key_file(file: KeyFile, issuer: &str, shown: &str) -> Result<Self, IdTokenError> {
        use rsa::pkcs8::{DecodePrivateKey as _, EncodePublicKey as _};
        let bad = |reason: String| IdTokenError::Read {
            path: shown.to_string(),
            reason,
        };
        let private = rsa::RsaPrivateKey::from_pkcs8_pem(&file.private_key_pem)
            .map_err(|e| bad(format!("not an RSA PKCS#8 key: {e}")))?;
        let public_pem = private
            .to_public_key()
            .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
            .map_err(|e| bad(format!("public key: {e}")))?;
        let certificate_pem = crate::crypto::self_signed_certificate(&file.private_key_pem, issuer)
            .map_err(|e| bad(format!("certificate: {e}")))?;
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(file.private_key_pem.as_bytes())
            .map_err(|e| bad(format!("signing key: {e}")))?;
        Ok(IdTokenSigner {
            public: PublicKey {
                kid: file.kid.clone(),
                public_pem,
                certificate_pem,
            },
            kid: file.kid,
            key,
            issuer: issuer.to_string(),
        })
    }

    /// The public half, to publish.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// An ID token for `subject`, audience `audience`, issued at `now` (Unix seconds).
    pub fn mint(
        &self,
        subject: &Subject<'_>,
        audience: &str,
        now: i64,
    ) -> Result<String, IdTokenError> {
        let claims = Claims {
            iss: &self.issuer,
            aud: audience,
            azp: subject.unique_id,
            sub: subject.unique_id,
            email: subject.include_email.then_some(subject.email),
            email_verified: subject.include_email.then_some(true),
            iat: now,
            exp: now + ID_TOKEN_LIFETIME_S,
        };
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| IdTokenError::Sign(e.to_string()))
    }
}

/// Seconds since the Unix epoch: token times (`iat`, `exp`) are in these.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Largest audience accepted: a URL, in practice; bounded so a token cannot be made huge.
pub const MAX_AUDIENCE_BYTES: usize = 2048;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_kept_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = IdTokenSigner::load_or_create(dir.path(), "http://cp.test").unwrap();
        let b = IdTokenSigner::load_or_create(dir.path(), "http://cp.test").unwrap();
        assert_eq!(a.public_key().kid, b.public_key().kid);
        assert_eq!(a.public_key().public_pem, b.public_key().public_pem);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(!format!("{a:?}").contains("PRIVATE"));
    }

    #[test]
    fn a_damaged_key_file_is_an_error_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KEY_FILE), "{not json").unwrap();
        let err = IdTokenSigner::load_or_create(dir.path(), "http://cp.test").unwrap_err();
        assert!(err.to_string().contains(KEY_FILE), "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join(KEY_FILE)).unwrap(),
            "{not json"
        );
    }

    #[test]
    fn tokens_verify_with_the_public_key_and_carry_googles_claims() {
        let dir = tempfile::tempdir().unwrap();
        let s = IdTokenSigner::load_or_create(dir.path(), "http://cp.test").unwrap();
        let subject = Subject {
            unique_id: "104",
            email: "sa@p.iam.gserviceaccount.com",
            include_email: true,
        };
        let now = 1_900_000_000;
        let t = s.mint(&subject, "https://backend.test", now).unwrap();
        assert_eq!(
            portico_credentials::token_kid(&t).unwrap().as_deref(),
            Some(s.public_key().kid.as_str())
        );
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        v.set_audience(&["https://backend.test"]);
        v.set_issuer(&["http://cp.test"]);
        v.validate_exp = false;
        let key =
            jsonwebtoken::DecodingKey::from_rsa_pem(s.public_key().public_pem.as_bytes()).unwrap();
        let claims = jsonwebtoken::decode::<serde_json::Value>(&t, &key, &v)
            .unwrap()
            .claims;
        assert_eq!(claims["sub"], "104");
        assert_eq!(claims["azp"], "104");
        assert_eq!(claims["email"], "sa@p.iam.gserviceaccount.com");
        assert_eq!(claims["email_verified"], true);
        assert_eq!(claims["exp"], now + 3600);
        let no_email = Subject {
            include_email: false,
            ..subject
        };
        let t = s.mint(&no_email, "https://backend.test", now).unwrap();
        let claims = jsonwebtoken::decode::<serde_json::Value>(&t, &key, &v)
            .unwrap()
            .claims;
        assert!(claims.get("email").is_none());
        assert!(claims.get("email_verified").is_none());
    }
}
