//! Public keys of service accounts, published where Google publishes them, so that a JWT signed
//! with a Portico service-account key can be verified by anyone (the proxy's
//! `x-google-jwks_uri`, client libraries, other gateways). No authentication: these are public.
//!
//! - `GET /service_accounts/v1/jwk/{email}` and `/service_accounts/v1/metadata/jwk/{email}` —
//!   JWKS: `{"keys":[{"kty":"RSA","alg":"RS256","use":"sig","kid":<private_key_id>,"n","e"}]}`.
//! - `GET /robot/v1/metadata/x509/{email}` and `/service_accounts/v1/metadata/x509/{email}` —
//!   Google's certificate map `{"<private_key_id>": "-----BEGIN CERTIFICATE-----..."}` (the
//!   self-signed certificates the IAM module made when each key was created).
//! - `GET /.well-known/openid-configuration` — discovery for this control plane as an issuer of
//!   ID tokens ([`crate::idtoken`]), so a backend can verify them with any OpenID library.
//! - `GET /oauth2/v3/certs` (JWKS) and `/oauth2/v1/certs` (X.509 map, named in key files as
//!   `auth_provider_x509_cert_url`) — the control plane's own ID-token signing keys, every
//!   replica's, from `store::idtoken_keys`.
//!
//! Keys come from the IAM module's `iam_sa_keys` table; a deleted key disappears from both
//! documents at once, so verifiers that refresh drop it (the proxy within its JWKS TTL).

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rsa::pkcs8::DecodePublicKey as _;
use rsa::traits::PublicKeyParts as _;
use serde::ser::SerializeMap as _;
use serde::{Serialize, Serializer};

use crate::app::AppState;
use crate::error::ApiError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/service_accounts/v1/jwk/{email}", get(jwk_set))
        .route("/service_accounts/v1/metadata/jwk/{email}", get(jwk_set))
        .route("/robot/v1/metadata/x509/{email}", get(x509_map))
        .route("/service_accounts/v1/metadata/x509/{email}", get(x509_map))
        .route(
            "/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .route("/oauth2/v3/certs", get(own_jwks))
        .route("/oauth2/v1/certs", get(own_x509))
}

/// An RS256 signing key as a JSON Web Key (RFC 7517). Field order is the wire order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Jwk {
    pub kty: &'static str,
    pub alg: &'static str,
    #[serde(rename = "use")]
    pub use_: &'static str,
    pub kid: String,
    /// Modulus, base64url without padding.
    pub n: String,
    /// Public exponent, base64url without padding.
    pub e: String,
}

/// A JWK set: `{"keys": [...]}`.
#[derive(Debug, Serialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

/// Google's certificate map, `{"<key id>": "<PEM>", ...}` in the store's key order.
struct CertificateMap(Vec<(String, String)>);

impl Serialize for CertificateMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Key ids are the key table's primary key, so no entry repeats.
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (kid, pem) in &self.0 {
            map.serialize_entry(kid, pem)?;
        }
        map.end()
    }
}

/// OpenID Connect discovery for this control plane as an issuer. Field order is the wire order.
#[derive(Debug, Serialize)]
struct OpenIdConfiguration {
    issuer: String,
    token_endpoint: String,
    jwks_uri: String,
    grant_types_supported: [&'static str; 1],
    token_endpoint_auth_methods_supported: [&'static str; 1],
    id_token_signing_alg_values_supported: [&'static str; 1],
    response_types_supported: [&'static str; 2],
    subject_types_supported: [&'static str; 1],
}

/// An RSA public key (SPKI PEM) as an RS256 signing JWK.
pub fn rsa_jwk(kid: &str, public_pem: &str) -> Result<Jwk, String> {
    let key = rsa::RsaPublicKey::from_public_key_pem(public_pem)
        .map_err(|e| format!("stored public key {kid} is not an RSA SPKI PEM: {e}"))?;
    Ok(Jwk {
        kty: "RSA",
        alg: "RS256",
        use_: "sig",
        kid: kid.to_string(),
        n: URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
        e: URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
    })
}

fn public(body: impl Serialize) -> Response {
    // Verifiers poll these; a short cache lifetime keeps key deletion effective.
    ([(header::CACHE_CONTROL, "public, max-age=60")], Json(body)).into_response()
}

fn no_account(email: &str) -> ApiError {
    ApiError::not_found(format!("Service account {email} does not exist."))
}

async fn jwk_set(
    State(state): State<AppState>,
    Path(email): Path<String>,
) -> Result<Response, ApiError> {
    if crate::store::accounts::find(&state.store, &email)
        .await?
        .is_none()
    {
        return Err(no_account(&email));
    }
    let rows = crate::store::accounts::list_keys_by_create_time(&state.store, &email).await?;
    let mut keys = Vec::with_capacity(rows.len());
    for key in rows {
        match rsa_jwk(&key.key_id, &key.public_key_pem) {
            Ok(jwk) => keys.push(jwk),
            // One unreadable row must not hide the account's other keys.
            Err(e) => tracing::error!(email = %email, error = %e, "skipping key in JWKS"),
        }
    }
    Ok(public(JwkSet { keys }))
}

async fn x509_map(
    State(state): State<AppState>,
    Path(email): Path<String>,
) -> Result<Response, ApiError> {
    let certs = crate::store::accounts::certificates(&state.store, &email)
        .await?
        .ok_or_else(|| no_account(&email))?;
    Ok(public(CertificateMap(certs)))
}

async fn openid_configuration(State(state): State<AppState>) -> Response {
    let base = &state.public_url;
    public(OpenIdConfiguration {
        issuer: base.clone(),
        token_endpoint: format!("{base}/token"),
        jwks_uri: format!("{base}/oauth2/v3/certs"),
        grant_types_supported: ["urn:ietf:params:oauth:grant-type:jwt-bearer"],
        token_endpoint_auth_methods_supported: ["private_key_jwt"],
        id_token_signing_alg_values_supported: ["RS256"],
        response_types_supported: ["token", "id_token"],
        subject_types_supported: ["public"],
    })
}

/// The control plane's ID-token signing keys.
async fn own_jwks(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut keys = Vec::new();
    for key in crate::store::idtoken_keys::list(&state.store).await? {
        match rsa_jwk(&key.kid, &key.public_pem) {
            Ok(jwk) => keys.push(jwk),
            Err(e) => tracing::error!(error = %e, "skipping ID-token key in JWKS"),
        }
    }
    Ok(public(JwkSet { keys }))
}

async fn own_x509(State(state): State<AppState>) -> Result<Response, ApiError> {
    let certs = crate::store::idtoken_keys::list(&state.store)
        .await?
        .into_iter()
        .map(|k| (k.kid, k.certificate_pem))
        .collect();
    Ok(public(CertificateMap(certs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwk_matches_the_generated_key() {
        let k = portico_credentials::generate_rsa_key().unwrap();
        let jwk = serde_json::to_value(rsa_jwk(&k.key_id, &k.public_spki_pem).unwrap()).unwrap();
        assert_eq!(jwk["n"], k.public_jwk.n);
        assert_eq!(jwk["e"], k.public_jwk.e);
        assert_eq!(jwk["kid"], k.key_id);
        assert_eq!(jwk["alg"], "RS256");
        assert!(rsa_jwk(
            "x",
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
        )
        .is_err());
    }
}
