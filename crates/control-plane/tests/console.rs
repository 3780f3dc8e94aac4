//! The console's static assets through the whole router: content types, security headers,
//! and nothing served beyond the known files.

mod support;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use portico_control_plane::app::oneshot;
use support::env;

async fn get(path: &str) -> Response {
    let e = env().await;
    let req = Request::builder()
        .uri(path)
        .body(Body::empty())
        .expect("request");
    oneshot(e.state.clone(), req).await
}

async fn text(resp: Response) -> String {
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

#[tokio::test]
async fn every_asset_is_served_with_the_security_headers() {
    for (path, ctype) in [
        ("/console", "text/html"),
        ("/console/", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/app.css", "text/css"),
        ("/console/favicon.svg", "image/svg+xml"),
    ] {
        let resp = get(path).await;
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        let h = resp.headers();
        let ct = h
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(ct.starts_with(ctype), "{path}: content-type {ct}");
        let csp = h
            .get("content-security-policy")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(csp.starts_with("default-src 'self'"), "{path}: csp {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: csp {csp}");
        assert_eq!(
            h.get("x-frame-options").map(|v| v.as_bytes()),
            Some(&b"DENY"[..])
        );
        assert_eq!(
            h.get("referrer-policy").map(|v| v.as_bytes()),
            Some(&b"no-referrer"[..])
        );
        assert_eq!(
            h.get("cache-control").map(|v| v.as_bytes()),
            Some(&b"no-store"[..])
        );
        assert!(h.get("set-cookie").is_none(), "{path} sets a cookie");
    }
}

#[tokio::test]
async fn unknown_console_paths_are_not_found() {
    let resp = get("/console/secrets.json").await;
    assert_eq!(resp.status().as_u16(), 404);
}

#[tokio::test]
async fn the_page_loads_its_script_from_a_file() {
    let html = text(get("/console").await).await;
    assert!(html.contains(r#"<script src="/console/app.js" defer></script>"#));
    assert!(html.contains(r#"href="/console/app.css""#));
}
