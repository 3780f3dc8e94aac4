//! The service-account key documents through the whole route table: JWKS, X.509 map and
//! OpenID discovery.

use axum::body::Body;
use axum::Router;
use base64::Engine as _;
use http::{Method, Request, StatusCode};
use serde_json::{json, Value};
use tower::ServiceExt as _;

async fn call(
    app: &Router,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The whole route table in-process: a key created over the IAM API is published in both
/// formats, verifies a JWT it signed, and disappears when deleted.
#[tokio::test]
async fn created_keys_are_published_and_verify_their_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let bound: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let opts = portico_control_plane::app::ServeOptions::sqlite(bound, dir.path());
    let (state, token_path) = portico_control_plane::app::build_state(&opts, bound)
        .await
        .unwrap();
    let admin = std::fs::read_to_string(token_path)
        .unwrap()
        .trim()
        .to_string();
    let app = portico_control_plane::app::service(state.clone());
    let email = "jwks-test@demo-proj.iam.gserviceaccount.com";

    let (status, _) = call(
        &app,
        Method::GET,
        &format!("/service_accounts/v1/jwk/{email}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, v) = call(
        &app,
        Method::POST,
        "/v1/projects/demo-proj/serviceAccounts",
        Some(&admin),
        Some(json!({"accountId": "jwks-test"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, key) = call(
        &app,
        Method::POST,
        &format!("/v1/projects/-/serviceAccounts/{email}/keys"),
        Some(&admin),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{key}");
    let file = base64::engine::general_purpose::STANDARD
        .decode(key["privateKeyData"].as_str().unwrap())
        .unwrap();
    let sa = portico_credentials::ServiceAccountKey::from_json_str(
        std::str::from_utf8(&file).unwrap(),
        "test",
    )
    .unwrap();
    let token = sa
        .self_signed_token("https://api.example", 4_000_000_000, 60)
        .unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&["https://api.example"]);

    // No admin token needed to read public keys.
    let (status, jwks) = call(
        &app,
        Method::GET,
        &format!("/service_accounts/v1/jwk/{email}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let jwk = &jwks["keys"][0];
    assert_eq!(jwk["kid"], sa.private_key_id.as_str());
    assert_eq!(
        (
            jwk["kty"].as_str(),
            jwk["alg"].as_str(),
            jwk["use"].as_str()
        ),
        (Some("RSA"), Some("RS256"), Some("sig"))
    );
    let dk = jsonwebtoken::DecodingKey::from_rsa_components(
        jwk["n"].as_str().unwrap(),
        jwk["e"].as_str().unwrap(),
    )
    .unwrap();
    jsonwebtoken::decode::<Value>(&token, &dk, &validation).expect("JWKS key verifies");

    for path in [
        format!("/robot/v1/metadata/x509/{email}"),
        format!("/service_accounts/v1/metadata/x509/{email}"),
    ] {
        let (status, map) = call(&app, Method::GET, &path, None, None).await;
        assert_eq!(status, StatusCode::OK);
        let pem = map[&sa.private_key_id]
            .as_str()
            .expect("cert for the key id");
        let dk = jsonwebtoken::DecodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
        jsonwebtoken::decode::<Value>(&token, &dk, &validation).expect("certificate verifies");
    }

    let (status, doc) = call(
        &app,
        Method::GET,
        "/.well-known/openid-configuration",
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["issuer"], state.public_url.as_str());
    assert_eq!(
        doc["jwks_uri"],
        format!("{}/oauth2/v3/certs", state.public_url)
    );
    // The control plane's own ID-token key: exactly this process's, in both key-set forms.
    let own_kid = state.id_tokens.public_key().kid.clone();
    let (_, own) = call(&app, Method::GET, "/oauth2/v3/certs", None, None).await;
    let own_keys = own["keys"].as_array().expect("keys");
    assert_eq!(own_keys.len(), 1, "{own}");
    assert_eq!(own_keys[0]["kid"], own_kid.as_str());
    assert_eq!(own_keys[0]["alg"], "RS256");
    let (_, own_x509) = call(&app, Method::GET, "/oauth2/v1/certs", None, None).await;
    assert!(
        own_x509[own_kid.as_str()]
            .as_str()
            .is_some_and(|p| p.starts_with("-----BEGIN CERTIFICATE-----")),
        "{own_x509}"
    );
    assert_eq!(
        doc["response_types_supported"],
        json!(["token", "id_token"])
    );

    let (status, _) = call(
        &app,
        Method::DELETE,
        &format!(
            "/v1/projects/-/serviceAccounts/{email}/keys/{}",
            sa.private_key_id
        ),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, jwks) = call(
        &app,
        Method::GET,
        &format!("/service_accounts/v1/jwk/{email}"),
        None,
        None,
    )
    .await;
    assert_eq!(jwks, json!({"keys": []}));
}
