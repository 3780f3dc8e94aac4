//! Outbound authentication: the bearer tokens the proxy signs for its own calls to the control
//! plane (Service Management from [`crate::config_source`], Service Control from
//! [`crate::service_control`]). A leaf: it imports neither of its callers.
//!
//! Like ESP's runtime, the proxy does no OAuth exchange: it signs a short-lived RS256 JWT with
//! the service-account key, one per audience (the API being called), and reuses it until it is
//! close to expiry. Signing costs a millisecond or so of RSA work, so caching matters only for
//! the hot path, where check/report calls would otherwise sign on every request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use portico_credentials::{CredentialsError, ServiceAccountKey};

/// Token lifetime ESP uses (`exp = iat + 3600`).
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Re-sign this long before expiry so a token never expires in flight (ESP re-signs after
/// ~3500 s; 55 min leaves room for clock skew on the control plane).
const REFRESH_AFTER: Duration = Duration::from_secs(55 * 60);

/// Audience suffixes (appended to the API's base URL), as ESP uses them.
pub const SERVICE_CONTROLLER: &str = "/google.api.servicecontrol.v1.ServiceController";
pub const QUOTA_CONTROLLER: &str = "/google.api.servicecontrol.v1.QuotaController";
pub const SERVICE_MANAGER: &str = "/google.api.servicemanagement.v1.ServiceManager";

/// Mints and caches self-signed tokens per audience. Cheap to clone.
#[derive(Clone)]
pub struct TokenSource {
    key: Option<Arc<ServiceAccountKey>>,
    cache: Arc<Mutex<HashMap<String, (String, Instant)>>>,
}

impl TokenSource {
    /// Without a key no `Authorization` header is sent (a control plane that requires one will
    /// answer 401/403, which the callers report precisely).
    pub fn new(key: Option<Arc<ServiceAccountKey>>) -> Self {
        TokenSource {
            key,
            cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }

    /// `Some("Bearer ...")` for `audience`, or `None` when there is no key.
    pub fn authorization(&self, audience: &str) -> Result<Option<String>, CredentialsError> {
        let Some(key) = &self.key else {
            return Ok(None);
        };
        if let Ok(cache) = self.cache.lock() {
            if let Some((token, minted)) = cache.get(audience) {
                if minted.elapsed() < REFRESH_AFTER {
                    return Ok(Some(format!("Bearer {token}")));
                }
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let token = key.self_signed_token(audience, now, TOKEN_LIFETIME.as_secs())?;
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(audience.to_string(), (token.clone(), Instant::now()));
        }
        Ok(Some(format!("Bearer {token}")))
    }
}

/// The Portico control plane a key file names: the origin of its `token_uri` (Portico's key
/// files point it at the control plane itself). `None` for a key issued by Google, whose
/// `token_uri` is Google's OAuth server: the caller then uses Google's API hosts.
pub fn control_plane_of(key: &portico_credentials::ServiceAccountKey) -> Option<String> {
    let parsed = reqwest::Url::parse(&key.token_uri).ok()?;
    let host = parsed.host_str()?;
    if host.ends_with(".googleapis.com") || host == "accounts.google.com" {
        return None;
    }
    origin_of(&key.token_uri)
}

/// `scheme://host[:port]` of a URL.
pub fn origin_of(url: &str) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    // host_str already brackets IPv6 literals.
    let host = parsed.host_str()?;
    Some(match parsed.port() {
        Some(port) => format!("{}://{}:{}", parsed.scheme(), host, port),
        None => format!("{}://{}", parsed.scheme(), host),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_strips_path_and_keeps_port() {
        assert_eq!(
            origin_of("http://127.0.0.1:8080/token").as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(
            origin_of("https://oauth2.googleapis.com/token").as_deref(),
            Some("https://oauth2.googleapis.com")
        );
        assert_eq!(
            origin_of("http://[::1]:9/x").as_deref(),
            Some("http://[::1]:9")
        );
        assert_eq!(origin_of("not a url"), None);
    }

    #[test]
    fn google_issued_keys_name_no_control_plane() {
        let g = portico_credentials::generate_rsa_key().expect("key");
        let key = |token_uri: &str| {
            let json = serde_json::json!({
                "type": "service_account", "project_id": "p", "private_key_id": g.key_id,
                "private_key": g.private_pkcs8_pem, "client_email": "a@p.iam.gserviceaccount.com",
                "token_uri": token_uri,
            });
            portico_credentials::ServiceAccountKey::from_json_str(&json.to_string(), "t")
                .expect("key")
        };
        assert_eq!(
            control_plane_of(&key("https://oauth2.googleapis.com/token")),
            None
        );
        assert_eq!(
            control_plane_of(&key("http://127.0.0.1:8080/token")).as_deref(),
            Some("http://127.0.0.1:8080")
        );
    }

    #[test]
    fn no_key_means_no_header() {
        let t = TokenSource::new(None);
        assert_eq!(t.authorization("aud").ok().flatten(), None);
    }
}
