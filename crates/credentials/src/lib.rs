//! Google-format service-account key files and the tokens made from them.
//!
//! * [`ServiceAccountKey`] — the JSON key file that `gcloud iam service-accounts keys create`
//!   writes (Google's field names). [`ServiceAccountKey::from_file`] validates it up front so a
//!   broken key is reported at startup, naming the file and the field.
//! * [`ServiceAccountKey::self_signed_token`] — ESP's runtime credential: an RS256 JWT with
//!   `iss` = `sub` = `client_email` and `aud` = the API being called; no OAuth exchange.
//! * [`ServiceAccountKey::jwt_bearer_assertion`] — the assertion for the OAuth2 JWT-bearer grant
//!   at `token_uri` (what Google client libraries do).
//! * [`generate_rsa_key`] — RSA-2048 key material for the control plane's key issuance.
//! * [`verify_rs256`] / [`token_kid`] — the verifying half, used by the control plane and tests.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use serde::{Deserialize, Serialize};

/// Lifetime ESP gives its self-signed tokens (`exp = iat + 3600`).
pub const DEFAULT_TOKEN_LIFETIME_S: u64 = 3600;

/// Everything that can go wrong loading a key or making/checking a token.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read service account key file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("service account key file {path} is not valid JSON: {message} (line {line}, column {column})")]
    NotJson {
        path: String,
        message: String,
        line: usize,
        column: usize,
    },
    #[error("service account key file {path} must contain a JSON object, found {found}")]
    NotObject { path: String, found: &'static str },
    #[error("service account key file {path} is missing field `{field}`")]
    MissingField { path: String, field: &'static str },
    #[error("service account key file {path}: field `{field}` must be a string")]
    FieldNotString { path: String, field: String },
    #[error(
        "service account key file {path}: field `type` is \"{found}\", expected \"service_account\""
    )]
    WrongType { path: String, found: String },
    #[error("service account key file {path}: field `private_key` is not a PEM-encoded RSA private key ({reason})")]
    BadPrivateKey { path: String, reason: String },
    #[error("cannot sign JWT: {0}")]
    Sign(String),
    #[error("JWT verification failed: {0}")]
    Verify(String),
    #[error("RSA key generation failed: {0}")]
    KeyGeneration(String),
}

pub type Result<T, E = CredentialsError> = std::result::Result<T, E>;

/// A Google service-account key file (`"type": "service_account"`).
///
/// Field names and order follow the files Google issues, so a Portico key works with Google
/// client libraries and vice versa.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAccountKey {
    #[serde(rename = "type")]
    pub key_type: String,
    pub project_id: String,
    pub private_key_id: String,
    pub private_key: String,
    pub client_email: String,
    #[serde(default)]
    pub client_id: String,
    #[serde(default)]
    pub auth_uri: String,
    pub token_uri: String,
    #[serde(default)]
    pub auth_provider_x509_cert_url: String,
    #[serde(default)]
    pub client_x509_cert_url: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub universe_domain: String,
}

// The private key must never end up in logs, so Debug is written by hand.
impl std::fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("project_id", &self.project_id)
            .field("private_key_id", &self.private_key_id)
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

const REQUIRED_FIELDS: [&str; 6] = [
    "type",
    "project_id",
    "private_key_id",
    "private_key",
    "client_email",
    "token_uri",
];

const OPTIONAL_STRING_FIELDS: [&str; 5] = [
    "client_id",
    "auth_uri",
    "auth_provider_x509_cert_url",
    "client_x509_cert_url",
    "universe_domain",
];

impl ServiceAccountKey {
    /// Reads and validates a key file. Errors name the file and, where relevant, the field.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_json_str(&text, &shown)
    }

    /// Parses key-file JSON; `origin` names the source in error messages (usually the path).
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| CredentialsError::NotJson {
                path: origin.to_string(),
                message: syntax_message(&e),
                line: e.line(),
                column: e.column(),
            })?;
        let object = match &value {
            serde_json::Value::Object(map) => map,
            other => {
                return Err(CredentialsError::NotObject {
                    path: origin.to_string(),
                    found: json_kind(other),
                })
            }
        };
        // Checked field by field (rather than trusting serde's message) so the error names
        // exactly which field is wrong, in the order a person reading the file would look.
        for field in REQUIRED_FIELDS {
            match object.get(field) {
                None | Some(serde_json::Value::Null) => {
                    return Err(CredentialsError::MissingField {
                        path: origin.to_string(),
                        field,
                    })
                }
                Some(serde_json::Value::String(_)) => {}
                Some(_) => {
                    return Err(CredentialsError::FieldNotString {
                        path: origin.to_string(),
                        field: field.to_string(),
                    })
                }
            }
        }
        for field in OPTIONAL_STRING_FIELDS {
            if let Some(v) = object.get(field) {
                if !v.is_string() {
                    return Err(CredentialsError::FieldNotString {
                        path: origin.to_string(),
                        field: field.to_string(),
                    });
                }
            }
        }
        let key: ServiceAccountKey =
            serde_json::from_value(value).map_err(|e| CredentialsError::NotJson {
                path: origin.to_string(),
                message: e.to_string(),
                line: 0,
                column: 0,
            })?;
        if key.key_type != "service_account" {
            return Err(CredentialsError::WrongType {
                path: origin.to_string(),
                found: key.key_type,
            });
        }
        parse_private_key(&key.private_key).map_err(|reason| CredentialsError::BadPrivateKey {
            path: origin.to_string(),
            reason,
        })?;
        Ok(key)
    }

    /// Signs `claims` with RS256; the header's `kid` is `private_key_id` so the verifier can pick
    /// the right public key among the account's keys.
    pub fn sign_jwt(&self, claims: &serde_json::Value) -> Result<String> {
        let encoding = EncodingKey::from_rsa_pem(self.private_key.as_bytes())
            .map_err(|e| CredentialsError::Sign(format!("private key unusable: {e}")))?;
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.private_key_id.clone());
        jsonwebtoken::encode(&header, claims, &encoding)
            .map_err(|e| CredentialsError::Sign(e.to_string()))
    }

    /// ESP's runtime token: `iss` = `sub` = `client_email`, `aud` = the called API.
    pub fn self_signed_token(
        &self,
        audience: &str,
        now_unix: u64,
        lifetime_s: u64,
    ) -> Result<String> {
        self.sign_jwt(&serde_json::json!({
            "iss": self.client_email,
            "sub": self.client_email,
            "aud": audience,
            "iat": now_unix,
            "exp": now_unix + lifetime_s,
        }))
    }

    /// Assertion for the OAuth2 JWT-bearer grant (RFC 7523) at `token_uri`.
    pub fn jwt_bearer_assertion(
        &self,
        scope: &str,
        now_unix: u64,
        lifetime_s: u64,
    ) -> Result<String> {
        self.sign_jwt(&serde_json::json!({
            "iss": self.client_email,
            "scope": scope,
            "aud": self.token_uri,
            "iat": now_unix,
            "exp": now_unix + lifetime_s,
        }))
    }

    /// The public half of this key as SPKI PEM (useful to verify our own tokens).
    pub fn public_key_pem(&self) -> Result<String> {
        let private = parse_private_key(&self.private_key).map_err(CredentialsError::Sign)?;
        private
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| CredentialsError::Sign(e.to_string()))
    }
}

fn syntax_message(e: &serde_json::Error) -> String {
    // serde_json appends " at line X column Y"; we report those separately.
    let full = e.to_string();
    match full.rfind(" at line ") {
        Some(i) => full[..i].to_string(),
        None => full,
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn parse_private_key(pem: &str) -> std::result::Result<RsaPrivateKey, String> {
    if !pem.contains("-----BEGIN ") {
        return Err("no PEM header `-----BEGIN PRIVATE KEY-----`".to_string());
    }
    match RsaPrivateKey::from_pkcs8_pem(pem) {
        Ok(k) => Ok(k),
        Err(pkcs8_err) => RsaPrivateKey::from_pkcs1_pem(pem)
            .map_err(|_| format!("not a PKCS#8 or PKCS#1 RSA key: {pkcs8_err}")),
    }
}

/// Key material for a newly issued service-account key.
#[derive(Clone)]
pub struct GeneratedKey {
    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), as Google puts it in key files.
    pub private_pkcs8_pem: String,
    /// SPKI PEM (`-----BEGIN PUBLIC KEY-----`); what the control plane stores.
    pub public_spki_pem: String,
    /// The public key as a JWK (RS256, `kid` = `key_id`).
    pub public_jwk: Jwk,
    /// 40 lowercase hex characters, Google's `private_key_id` format.
    pub key_id: String,
}

impl std::fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("key_id", &self.key_id)
            .field("public_jwk", &self.public_jwk)
            .finish_non_exhaustive()
    }
}

/// An RSA public key in JWK form (RFC 7517); `n` and `e` are base64url without padding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub alg: String,
    #[serde(rename = "use")]
    pub use_: String,
    pub kid: String,
    pub n: String,
    pub e: String,
}

/// Generates an RSA-2048 key pair and a random 40-hex key id.
pub fn generate_rsa_key() -> Result<GeneratedKey> {
    use rand::RngCore as _;
    let mut rng = rand::rngs::OsRng;
    let private = RsaPrivateKey::new(&mut rng, 2048)
        .map_err(|e| CredentialsError::KeyGeneration(e.to_string()))?;
    let private_pkcs8_pem = private
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| CredentialsError::KeyGeneration(e.to_string()))?
        .to_string();
    let public = private.to_public_key();
    let public_spki_pem = public
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| CredentialsError::KeyGeneration(e.to_string()))?;
    let mut id = [0u8; 20];
    rng.fill_bytes(&mut id);
    let key_id = hex::encode(id);
    let public_jwk = Jwk {
        kty: "RSA".to_string(),
        alg: "RS256".to_string(),
        use_: "sig".to_string(),
        kid: key_id.clone(),
        n: URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
        e: URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
    };
    Ok(GeneratedKey {
        private_pkcs8_pem,
        public_spki_pem,
        public_jwk,
        key_id,
    })
}

/// Verifies an RS256 token's signature against `public_pem` (SPKI or PKCS#1 PEM) and its
/// `exp`/`nbf` (60 s leeway); returns the claims. Audience and issuer are the caller's business.
pub fn verify_rs256(token: &str, public_pem: &str) -> Result<serde_json::Value> {
    let key = DecodingKey::from_rsa_pem(public_pem.as_bytes())
        .map_err(|e| CredentialsError::Verify(format!("public key unusable: {e}")))?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.validate_aud = false;
    validation.validate_nbf = true;
    validation.required_spec_claims.clear();
    validation.required_spec_claims.insert("exp".to_string());
    let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
        .map_err(|e| CredentialsError::Verify(e.to_string()))?;
    Ok(data.claims)
}

/// The `kid` in a token's header, without verifying anything (to choose the key to verify with).
pub fn token_kid(token: &str) -> Result<Option<String>> {
    jsonwebtoken::decode_header(token)
        .map(|h| h.kid)
        .map_err(|e| CredentialsError::Verify(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    // Key generation costs real CPU; one key serves every test.
    fn generated() -> &'static GeneratedKey {
        static KEY: OnceLock<GeneratedKey> = OnceLock::new();
        KEY.get_or_init(|| generate_rsa_key().expect("generate key"))
    }

    fn key_json(overrides: &[(&str, serde_json::Value)], remove: &[&str]) -> String {
        let g = generated();
        let mut v = serde_json::json!({
            "type": "service_account",
            "project_id": "demo-proj",
            "private_key_id": g.key_id,
            "private_key": g.private_pkcs8_pem,
            "client_email": "esp@demo-proj.iam.gserviceaccount.com",
            "client_id": "1234567890",
            "auth_uri": "http://127.0.0.1:9/o/oauth2/auth",
            "token_uri": "http://127.0.0.1:9/token",
            "auth_provider_x509_cert_url": "http://127.0.0.1:9/oauth2/v1/certs",
            "client_x509_cert_url": "http://127.0.0.1:9/robot/v1/metadata/x509/esp",
            "universe_domain": "googleapis.com"
        });
        let obj = v.as_object_mut().expect("object");
        for (k, val) in overrides {
            obj.insert((*k).to_string(), val.clone());
        }
        for k in remove {
            obj.remove(*k);
        }
        serde_json::to_string_pretty(&v).expect("serialise")
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn generated_key_shape() {
        let g = generated();
        assert_eq!(g.key_id.len(), 40);
        assert!(g.key_id.chars().all(|c| c.is_ascii_hexdigit()));
        assert!(g
            .private_pkcs8_pem
            .starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(g.public_spki_pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(g.public_jwk.e, "AQAB");
        // 2048-bit modulus = 256 bytes = 342 base64url chars without padding.
        assert_eq!(g.public_jwk.n.len(), 342);
    }

    #[test]
    fn self_signed_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "key.json", &key_json(&[], &[]));
        let key = ServiceAccountKey::from_file(&path).expect("load");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let aud = "http://127.0.0.1:9/google.api.servicecontrol.v1.ServiceController";
        let token = key.self_signed_token(aud, now, 3600).expect("sign");
        assert_eq!(
            token_kid(&token).expect("kid"),
            Some(generated().key_id.clone())
        );
        let claims = verify_rs256(&token, &generated().public_spki_pem).expect("verify");
        assert_eq!(claims["iss"], "esp@demo-proj.iam.gserviceaccount.com");
        assert_eq!(claims["sub"], claims["iss"]);
        assert_eq!(claims["aud"], aud);
        assert_eq!(claims["exp"].as_u64(), Some(now + 3600));
        // Our own derived public key verifies too.
        let own = key.public_key_pem().expect("public");
        verify_rs256(&token, &own).expect("verify with derived key");
    }

    #[test]
    fn tampered_or_foreign_tokens_fail() {
        let key = ServiceAccountKey::from_json_str(&key_json(&[], &[]), "mem").expect("load");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let token = key.self_signed_token("aud", now, 60).expect("sign");
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(br#"{"iss":"evil","exp":99999999999}"#);
        let forged = parts.join(".");
        assert!(matches!(
            verify_rs256(&forged, &generated().public_spki_pem),
            Err(CredentialsError::Verify(_))
        ));
        let expired = key.self_signed_token("aud", now - 7200, 60).expect("sign");
        let err = verify_rs256(&expired, &generated().public_spki_pem).unwrap_err();
        assert!(err.to_string().contains("Expired"), "{err}");
    }

    #[test]
    fn jwt_bearer_assertion_claims() {
        let key = ServiceAccountKey::from_json_str(&key_json(&[], &[]), "mem").expect("load");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let a = key
            .jwt_bearer_assertion("https://www.googleapis.com/auth/cloud-platform", now, 3600)
            .expect("sign");
        let claims = verify_rs256(&a, &generated().public_spki_pem).expect("verify");
        assert_eq!(claims["aud"], "http://127.0.0.1:9/token");
        assert_eq!(
            claims["scope"],
            "https://www.googleapis.com/auth/cloud-platform"
        );
        assert!(claims.get("sub").is_none());
    }

    #[test]
    fn unreadable_file_names_the_path() {
        let err = ServiceAccountKey::from_file("/nonexistent/portico/key.json").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CredentialsError::Read { .. }));
        assert!(msg.contains("/nonexistent/portico/key.json"), "{msg}");
    }

    #[test]
    fn not_json_reports_line_and_column() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "bad.json",
            "{\n  \"type\": \"service_account\",\n  oops\n}",
        );
        let err = ServiceAccountKey::from_file(&path).unwrap_err();
        match &err {
            CredentialsError::NotJson { line, column, .. } => {
                assert_eq!(*line, 3);
                assert_eq!(*column, 3);
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("bad.json") && msg.contains("line 3, column 3"),
            "{msg}"
        );
    }

    #[test]
    fn missing_field_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "k.json", &key_json(&[], &["client_email"]));
        let err = ServiceAccountKey::from_file(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "service account key file {} is missing field `client_email`",
                path.display()
            )
        );
        let err = ServiceAccountKey::from_json_str(
            &key_json(&[("private_key_id", serde_json::json!(42))], &[]),
            "k.json",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "service account key file k.json: field `private_key_id` must be a string"
        );
    }

    #[test]
    fn wrong_type_is_rejected() {
        let err = ServiceAccountKey::from_json_str(
            &key_json(&[("type", serde_json::json!("authorized_user"))], &[]),
            "k.json",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "service account key file k.json: field `type` is \"authorized_user\", expected \"service_account\""
        );
    }

    #[test]
    fn bad_private_key_is_rejected() {
        for bad in [
            "not a key at all",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ] {
            let err = ServiceAccountKey::from_json_str(
                &key_json(&[("private_key", serde_json::json!(bad))], &[]),
                "k.json",
            )
            .unwrap_err();
            assert!(
                matches!(err, CredentialsError::BadPrivateKey { .. }),
                "{err:?}"
            );
            assert!(
                err.to_string().starts_with(
                    "service account key file k.json: field `private_key` is not a PEM-encoded RSA private key"
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn key_file_serialises_in_google_shape() {
        let key = ServiceAccountKey::from_json_str(&key_json(&[], &[]), "mem").expect("load");
        let v = serde_json::to_value(&key).expect("ser");
        let names: Vec<&str> = v
            .as_object()
            .expect("obj")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(names[0], "type");
        assert!(names.contains(&"client_x509_cert_url"));
        let debug = format!("{key:?}");
        assert!(
            !debug.contains("PRIVATE KEY"),
            "Debug must not leak the key"
        );
    }
}
