//! The shared test set-up itself: a fresh environment answers with the admin token and refuses
//! without it.

mod support;

use axum::http::{Method, StatusCode};

#[tokio::test]
async fn fresh_environment_needs_the_admin_token() {
    let env = support::env().await;
    let (status, _) = env.call(Method::GET, "/v1/services", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = env.admin(Method::GET, "/v1/services", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
