//! What ESPv2 asks a GCE-compatible metadata server at start-up, besides tokens
//! ([`crate::outbound_auth::MetadataTokens`] and [`crate::backend_auth`] ask for those): where
//! the proxy runs ([`fetch_gcp_attributes`]: project, zone or region, platform, which go into
//! Service Control reports) and, with `--check_metadata`, the service to serve
//! ([`fetch_service_name`]). A leaf: it imports nothing of its callers.
//!
//! Each value is one `GET` with `Metadata-Flavor: Google`, tried up to five times 20 ms apart
//! while it fails or answers anything but 200, as ESPv2's config manager does. Answers are read
//! up to [`MAX_ANSWER_BYTES`] and must be short printable text, so a confused or hostile server
//! cannot put arbitrary bytes into labels and log entries.

use std::time::Duration;

/// The project the instance belongs to.
pub const PROJECT_ID_PATH: &str = "/computeMetadata/v1/project/project-id";
/// `projects/NUMBER/regions/REGION`: Cloud Run answers it, other platforms 404.
pub const REGION_PATH: &str = "/computeMetadata/v1/instance/region";
/// `projects/NUMBER/zones/ZONE`.
pub const ZONE_PATH: &str = "/computeMetadata/v1/instance/zone";
/// Present on App Engine flexible.
pub const GAE_SERVER_SOFTWARE_PATH: &str =
    "/computeMetadata/v1/instance/attributes/gae_server_software";
/// Present on GKE nodes.
pub const KUBE_ENV_PATH: &str = "/computeMetadata/v1/instance/attributes/kube-env";
/// The instance attribute `--check_metadata` reads the service name from.
pub const SERVICE_NAME_PATH: &str =
    "/computeMetadata/v1/instance/attributes/endpoints-service-name";

/// ESPv2's platform names (`servicecontrol.googleapis.com/platform`).
pub const GAE_FLEX_PLATFORM: &str = "GAE_FLEX(ESPv2)";
pub const GKE_PLATFORM: &str = "GKE(ESPv2)";
pub const GCE_PLATFORM: &str = "GCE(ESPv2)";
/// ESPv2's platform when nothing says where it runs.
pub const UNKNOWN_PLATFORM: &str = "UNKNOWN(ESPv2)";

/// ESPv2's `MetadataFetcherRetryConfig`: attempts per value and the pause between them.
const ATTEMPTS: u32 = 5;
const RETRY_INTERVAL: Duration = Duration::from_millis(20);
/// ESPv2's default `--http_request_timeout_s`, per attempt.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read; the values asked for are a few dozen bytes (`kube-env` is read only
/// to learn that it exists).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Longest value kept (a project id, zone or service name is far shorter).
const MAX_VALUE_BYTES: usize = 253;

/// Where the proxy runs, as the metadata server says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcpAttributes {
    /// `None` when the server did not say.
    pub project_id: Option<String>,
    /// The region (Cloud Run) or else the zone; `None` when the server named neither.
    pub zone: Option<String>,
    /// One of the `*_PLATFORM` names.
    pub platform: &'static str,
}

/// Why a value could not be had.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("failed fetching metadata {url}: {detail}")]
    Fetch { url: String, detail: String },
    #[error("metadata {url} answered a value that is not one: {detail}")]
    Invalid { url: String, detail: String },
}

/// A metadata server at a checked base URL ([`crate::outbound_auth::parse_metadata_url`]).
pub struct MetadataServer {
    base: String,
    http: reqwest::Client,
}

impl MetadataServer {
    pub fn new(base: &str) -> Result<MetadataServer, MetadataError> {
        Self::with_timeout(base, TIMEOUT)
    }

    /// As [`MetadataServer::new`], each attempt bounded by `timeout` (`--http_request_timeout_s`).
    pub fn with_timeout(base: &str, timeout: Duration) -> Result<MetadataServer, MetadataError> {
        Self::with_timeouts(base, timeout, None)
    }

    /// As [`MetadataServer::with_timeout`], a connection to the server taking at most
    /// `connect_timeout` (ESPv2's `--cluster_connect_timeout`, which bounds its metadata
    /// cluster too).
    pub fn with_timeouts(
        base: &str,
        timeout: Duration,
        connect_timeout: Option<Duration>,
    ) -> Result<MetadataServer, MetadataError> {
        let base = crate::outbound_auth::parse_metadata_url(base)
            .map_err(|e| MetadataError::Client(e.to_string()))?;
        // The metadata server never redirects; following one would send the request (and
        // its answer into reports) wherever an answer pointed.
        let mut http = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        if let Some(t) = connect_timeout {
            http = http.connect_timeout(t);
        }
        let http = http
            .build()
            .map_err(|e| MetadataError::Client(e.to_string()))?;
        Ok(MetadataServer { base, http })
    }

    /// The body of a 200 for `path`, after up to [`ATTEMPTS`] tries.
    async fn get(&self, path: &str) -> Result<Vec<u8>, MetadataError> {
        let url = format!("{}{path}", self.base);
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(RETRY_INTERVAL).await;
            }
            match self.get_once(&url).await {
                Ok(body) => return Ok(body),
                Err(detail) => last = detail,
            }
        }
        Err(MetadataError::Fetch { url, detail: last })
    }

    async fn get_once(&self, url: &str) -> Result<Vec<u8>, String> {
        let mut resp = self
            .http
            .get(url)
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .map_err(|e| crate::error::error_chain(&e))?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(format!("status code {status}"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| crate::error::error_chain(&e))?
        {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(format!("answer over {MAX_ANSWER_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// A short printable value at `path`.
    async fn value(&self, path: &str) -> Result<String, MetadataError> {
        let body = self.get(path).await?;
        text_value(&body).map_err(|detail| MetadataError::Invalid {
            url: format!("{}{path}", self.base),
            detail,
        })
    }

    /// Whether `path` answers 200.
    async fn exists(&self, path: &str) -> bool {
        self.get(path).await.is_ok()
    }

    /// ESPv2's `FetchGCPAttributes`: the server must answer at its root; then the project,
    /// the region or else the zone, and the platform, each left out when not answered.
    pub async fn gcp_attributes(&self) -> Result<GcpAttributes, MetadataError> {
        self.get("").await?;
        let project_id = self
            .value(PROJECT_ID_PATH)
            .await
            .ok()
            .filter(|p| !p.is_empty());
        let location = match self.value(REGION_PATH).await {
            Ok(l) => Ok(l),
            Err(_) => self.value(ZONE_PATH).await,
        };
        let zone = location.ok().and_then(|l| last_segment(&l));
        let platform = if self.exists(GAE_SERVER_SOFTWARE_PATH).await {
            GAE_FLEX_PLATFORM
        } else if self.exists(KUBE_ENV_PATH).await {
            GKE_PLATFORM
        } else {
            GCE_PLATFORM
        };
        Ok(GcpAttributes {
            project_id,
            zone,
            platform,
        })
    }

    /// `--check_metadata`: the instance's `endpoints-service-name` attribute.
    pub async fn service_name(&self) -> Result<String, MetadataError> {
        let name = self.value(SERVICE_NAME_PATH).await?;
        check_service_name(&name).map_err(|detail| MetadataError::Invalid {
            url: format!("{}{SERVICE_NAME_PATH}", self.base),
            detail,
        })?;
        Ok(name)
    }
}

/// A service name read from the metadata server becomes a path segment of Service Management
/// calls and a field of every report: nothing but a name will do.
fn check_service_name(name: &str) -> Result<(), String> {
    // `.` and `..` would be dot segments in the Service Management URL.
    if name.is_empty() || name == "." || name == ".." {
        return Err(format!("{name:?} is not a service name"));
    }
    if name.contains(['/', '?', '#', '%', '\\']) || name.chars().any(char::is_whitespace) {
        return Err(format!("{name:?} is not a service name"));
    }
    Ok(())
}

/// A metadata value: UTF-8, printable, at most [`MAX_VALUE_BYTES`]; surrounding whitespace
/// (a trailing newline) dropped.
fn text_value(body: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(body)
        .map_err(|_| "not UTF-8".to_string())?
        .trim();
    if text.len() > MAX_VALUE_BYTES {
        return Err(format!("{} bytes, more than {MAX_VALUE_BYTES}", text.len()));
    }
    if text.chars().any(char::is_control) {
        return Err("control characters".into());
    }
    Ok(text.to_string())
}

/// `projects/123/zones/us-central1-a` → `us-central1-a`; `None` without a last segment.
fn last_segment(location: &str) -> Option<String> {
    match location.rsplit_once('/') {
        Some((_, last)) if !last.is_empty() => Some(last.to_string()),
        _ => {
            tracing::warn!(
                location,
                "the metadata server's location has no last segment"
            );
            None
        }
    }
}

/// The attributes, or `None` with a warning when the server cannot be reached: ESPv2 then
/// reports without them.
pub async fn fetch_gcp_attributes(server: &MetadataServer) -> Option<GcpAttributes> {
    match server.gcp_attributes().await {
        Ok(a) => {
            tracing::info!(
                project = a.project_id.as_deref().unwrap_or(""),
                location = a.zone.as_deref().unwrap_or(""),
                platform = a.platform,
                "where the proxy runs, as the metadata server says"
            );
            Some(a)
        }
        Err(e) => {
            tracing::warn!(error = %e, "metadata server was not reached, skipping GCP attributes");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_short_printable_text() {
        assert_eq!(text_value(b"my-proj\n").unwrap(), "my-proj");
        assert!(text_value(b"a\x00b").is_err());
        assert!(text_value(b"a\nb").is_err());
        assert!(text_value(&[0xff, 0xfe]).is_err());
        assert!(text_value("x".repeat(254).as_bytes()).is_err());
        assert_eq!(text_value(b"").unwrap(), "");
    }

    #[test]
    fn service_names_are_names() {
        assert!(check_service_name("echo.endpoints.p.cloud.goog").is_ok());
        for bad in [
            "", ".", "..", "a/b", "../x", "a b", "a?b", "a#b", "a%2Fb", "a\\b", "a\u{a0}b",
        ] {
            assert!(check_service_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn locations_keep_their_last_segment() {
        assert_eq!(
            last_segment("projects/123/zones/us-central1-a").as_deref(),
            Some("us-central1-a")
        );
        assert_eq!(
            last_segment("projects/123/regions/europe-west1").as_deref(),
            Some("europe-west1")
        );
        assert_eq!(last_segment("projects/123/zones/"), None);
        assert_eq!(last_segment("us-east1-b"), None);
    }
}
