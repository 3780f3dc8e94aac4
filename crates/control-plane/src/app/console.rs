//! The web console: a single page (HTML, JS, CSS in `crates/control-plane/console/`, embedded at
//! compile time) that reads the JSON APIs the control plane already serves.
//!
//! Routes: `GET /console` (and `/console/`) → the page, `GET /console/app.js`,
//! `GET /console/app.css`, `GET /console/favicon.svg`. The assets hold no data and need no token;
//! every fetch the page makes carries the admin token the user pasted, as `Authorization:
//! Bearer`, to the ordinary APIs (Service Management, IAM, API Keys, the Service Control query
//! API), so the console has no privileges of its own and no API of its own to keep in step.
//!
//! Every console response carries strict headers ([`SECURITY_HEADERS`]): a CSP that allows only
//! same-origin resources (hence no inline script or style anywhere in the assets), no framing,
//! no referrer, no caching. See `docs/console.md`.

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::app::AppState;

const INDEX_HTML: &str = include_str!("../../console/index.html");
const APP_JS: &str = include_str!("../../console/app.js");
const APP_CSS: &str = include_str!("../../console/app.css");
const FAVICON_SVG: &str = include_str!("../../console/favicon.svg");

/// Headers on every console response. `default-src 'self'` forbids inline scripts, so an
/// injected `<script>` or `onclick=` could not run even if markup slipped through; the extra
/// directives close what `default-src` does not cover (base URI, form targets, framing).
pub const SECURITY_HEADERS: &[(&str, &str)] = &[
    (
        "content-security-policy",
        "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("cross-origin-opener-policy", "same-origin"),
];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(index))
        .route("/console/", get(index))
        .route("/console/app.js", get(app_js))
        .route("/console/app.css", get(app_css))
        .route("/console/favicon.svg", get(favicon))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    for (name, value) in SECURITY_HEADERS {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    resp
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

async fn favicon() -> Response {
    asset("image/svg+xml", FAVICON_SVG)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CSP would block inline code anyway; these keep the assets honest so the page does not
    /// silently break (or tempt someone into loosening the policy).
    #[test]
    fn assets_have_no_inline_code_and_no_html_sinks() {
        let lower = INDEX_HTML.to_ascii_lowercase();
        for (i, _) in lower.match_indices("<script") {
            let tag_end = lower[i..].find('>').map(|e| i + e).unwrap_or(lower.len());
            assert!(
                lower[i..tag_end].contains("src="),
                "inline <script> in index.html"
            );
        }
        assert!(!lower.contains(" style="), "inline style in index.html");
        assert!(!lower.contains(" onclick="), "inline handler in index.html");
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!APP_JS.contains(sink), "app.js uses {sink}");
        }
        // Nothing is loaded from other origins (the CSP would refuse it).
        for asset in [INDEX_HTML, APP_CSS] {
            assert!(!asset.contains("http://") && !asset.contains("https://"));
        }
    }
}
