//! The router's fallbacks: unknown paths and methods answer Google-shaped JSON, and the API
//! prefixes are stripped before routing.

mod support;

use axum::http::Method;
use support::env;

#[tokio::test]
async fn unknown_paths_and_methods_are_google_json() {
    let e = env().await;
    let (st, body) = e.admin(Method::GET, "/v1/nothing/here", None).await;
    assert_eq!(st.as_u16(), 404);
    assert_eq!(body["error"]["status"], "NOT_FOUND");
    let (st, body) = e.admin(Method::PUT, "/v1/services", None).await;
    assert_eq!(st.as_u16(), 404);
    assert_eq!(body["error"]["status"], "NOT_FOUND");
    // Prefixes are stripped before routing.
    let (st, _) = e
        .admin(
            Method::GET,
            "/serviceusage/v1/projects/demo-proj/services",
            None,
        )
        .await;
    assert_eq!(st.as_u16(), 200);
}
