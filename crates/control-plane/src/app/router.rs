//! Router assembly around the APIs' routes: Google-shaped 404s, API-prefix stripping, request
//! logging, custom-verb splitting, and the one-request runner tests use.
//!
//! Layer rule: knows no API; `app::router()` (in `app/mod.rs`) lists them.

use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::http::Uri;
use axum::response::Response;
use axum::Router;
use tower::{Layer, ServiceExt};

use super::extract::MAX_BODY_BYTES;
use super::state::AppState;
use crate::error::ApiError;

/// Splits `name:verb` at the last `:`. `echo.example.com:undelete` → (`echo.example.com`,
/// Some(`undelete`)).
pub fn split_verb(segment: &str) -> (&str, Option<&str>) {
    match segment.rsplit_once(':') {
        Some((name, verb)) if !verb.is_empty() && !verb.contains('/') => (name, Some(verb)),
        _ => (segment, None),
    }
}

pub(crate) async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!(
        "The requested URL {} was not found on this server.",
        uri.path()
    ))
}

/// Google's front ends answer an unsupported HTTP method on a known path with 404 and a JSON
/// error; axum's default is an empty 405.
pub(crate) async fn method_not_allowed(method: http::Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!(
        "Method {method} is not supported for {}.",
        uri.path()
    ))
}

/// The complete service: prefix stripping and request logging wrapped around the router.
/// Stripping must happen before routing, so it wraps the router instead of being a route layer.
pub fn service(state: AppState) -> Router {
    let inner = super::router(state);
    let stripped = axum::middleware::map_request(strip_api_prefix).layer(inner);
    Router::new()
        .fallback_service(stripped)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(log_request))
}

/// API prefixes users may put in `api_endpoint_overrides` to share one port.
const API_PREFIXES: &[&str] = &[
    "/servicemanagement/",
    "/serviceusage/",
    "/iam/",
    "/cloudresourcemanager/",
    "/apikeys/",
    "/servicecontrol/",
    "/iamcredentials/",
    "/cloudtrace/",
];

async fn strip_api_prefix(mut req: Request) -> Request {
    let path = req.uri().path();
    if let Some(p) = API_PREFIXES.iter().find(|p| path.starts_with(**p)) {
        let rest = &path[p.len() - 1..];
        let new = match req.uri().query() {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_string(),
        };
        if let Ok(pq) = new.parse::<axum::http::uri::PathAndQuery>() {
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = Some(pq);
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    req
}

/// Logs method, path, status, latency and the gcloud command (from the User-Agent's
/// `command/...` token). Headers are never logged: they carry bearer tokens and API keys.
async fn log_request(req: Request<Body>, next: axum::middleware::Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let command = req
        .headers()
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| {
            ua.split_whitespace()
                .find_map(|t| t.strip_prefix("command/"))
                .map(str::to_string)
        })
        .unwrap_or_default();
    let resp = next.run(req).await;
    tracing::info!(
        %method,
        path,
        status = resp.status().as_u16(),
        elapsed_ms = start.elapsed().as_millis() as u64,
        command,
        "request"
    );
    resp
}

/// Test helper: runs one request through the full service.
pub async fn oneshot(state: AppState, req: Request) -> Response {
    match service(state).oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_verb_cases() {
        assert_eq!(split_verb("a.b.c:undelete"), ("a.b.c", Some("undelete")));
        assert_eq!(split_verb("a.b.c"), ("a.b.c", None));
        assert_eq!(split_verb("a.b.c:"), ("a.b.c:", None));
    }
}
