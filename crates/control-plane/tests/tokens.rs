//! The OAuth2 grant and the bearer-token verifier end to end, in process (no gcloud): replay,
//! skew, audiences, project roles, and revocation by key deletion.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use portico_control_plane::apis::tokens::JWT_BEARER_GRANT;
use portico_control_plane::app::oneshot;
use portico_credentials::ServiceAccountKey;
use serde_json::{json, Value};
use support::{env, TestEnv};

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

const EMAIL: &str = "flow-sa@demo-proj.iam.gserviceaccount.com";
const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

async fn new_key(e: &TestEnv) -> ServiceAccountKey {
    let (s, v) = e
        .admin(
            Method::POST,
            "/v1/projects/demo-proj/serviceAccounts",
            Some(json!({"accountId": "flow-sa"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = e
        .admin(
            Method::POST,
            &format!("/v1/projects/-/serviceAccounts/{EMAIL}/keys"),
            Some(json!({"privateKeyType": "TYPE_GOOGLE_CREDENTIALS_FILE"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let name = v["name"].as_str().expect("name");
    assert!(name.split('/').count() >= 6, "{name}");
    let file = STANDARD
        .decode(v["privateKeyData"].as_str().expect("privateKeyData"))
        .expect("base64");
    ServiceAccountKey::from_json_str(&String::from_utf8(file).expect("utf8"), "response")
        .expect("key file")
}

async fn grant(e: &TestEnv, assertion: &str) -> (StatusCode, Value) {
    let body = format!(
        "grant_type={}&assertion={assertion}",
        url::form_urlencoded::byte_serialize(JWT_BEARER_GRANT.as_bytes()).collect::<String>()
    );
    let req = Request::builder()
        .method("POST")
        .uri("/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .expect("request");
    let resp = oneshot(e.state.clone(), req).await;
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn claims(key: &ServiceAccountKey, iat: i64, exp: i64) -> Value {
    json!({"iss": key.client_email, "aud": key.token_uri, "scope": SCOPE, "iat": iat, "exp": exp})
}

#[tokio::test]
async fn grant_replay_skew_roles_and_revocation() {
    let e = env().await;
    let key = new_key(&e).await;
    assert_eq!(key.token_uri, format!("{}/token", e.state.public_url));
    let now = now_unix();
    let assertion = key.sign_jwt(&claims(&key, now, now + 600)).expect("sign");
    let (s, v) = grant(&e, &assertion).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["expires_in"], 3599);
    let token = v["access_token"].as_str().expect("token").to_string();
    let (s, v) = grant(&e, &assertion).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "replay: {v}");
    assert_eq!(v["error"], "invalid_grant");

    // Clock skew: 30 s ahead / just expired are tolerated, 2 min ahead / long expired not.
    for (iat, exp, ok) in [
        (now + 30, now + 600, true),
        (now - 600, now - 30, true),
        (now + 120, now + 600, false),
        (now - 900, now - 120, false),
        (now, now + 3601, false),
    ] {
        let jwt = key.sign_jwt(&claims(&key, iat, exp)).expect("sign");
        let (s, v) = grant(&e, &jwt).await;
        assert_eq!(
            s == StatusCode::OK,
            ok,
            "iat {iat} exp {exp} (now {now}): {v}"
        );
    }
    let (s, _) = grant(&e, "eyJhbGciOiJub25lIn0.e30.").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Authenticated but without a role: 403; with roles/viewer on the project: 200.
    let list = "/v1/projects/demo-proj/serviceAccounts";
    let (s, v) = e.call(Method::GET, list, Some(&token), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = e
        .admin(
            Method::POST,
            "/v1/projects/demo-proj:setIamPolicy",
            Some(json!({"policy": {"bindings": [
                {"role": "roles/viewer", "members": [format!("serviceAccount:{EMAIL}")]}
            ]}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = e.call(Method::GET, list, Some(&token), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["accounts"][0]["email"], EMAIL);
    // Viewer cannot create keys.
    let (s, _) = e
        .call(
            Method::POST,
            &format!("/v1/projects/-/serviceAccounts/{EMAIL}/keys"),
            Some(&token),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Self-signed JWTs: the runtime audience works (twice: the second use is the cached
    // path), a foreign audience does not.
    let esp = key
        .self_signed_token(
            "http://10.0.0.5:8090/google.api.servicecontrol.v1.ServiceController",
            now as u64,
            3600,
        )
        .expect("sign");
    for _ in 0..2 {
        let (s, v) = e.call(Method::GET, list, Some(&esp), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let foreign = key
        .self_signed_token("https://example.com/api", now as u64, 3600)
        .expect("sign");
    let (s, _) = e.call(Method::GET, list, Some(&foreign), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // Disabling the account suspends its tokens and grants; enabling restores them.
    let (s, v) = e
        .admin(
            Method::POST,
            &format!("/v1/projects/-/serviceAccounts/{EMAIL}:disable"),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, v) = e
        .admin(
            Method::GET,
            &format!("/v1/projects/-/serviceAccounts/{EMAIL}"),
            None,
        )
        .await;
    assert_eq!(v["disabled"], true, "{v}");
    for t in [&token, &esp] {
        let (s, v) = e.call(Method::GET, list, Some(t), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("disabled"),
            "{v}"
        );
    }
    let jwt = key
        .sign_jwt(&claims(&key, now_unix(), now_unix() + 600))
        .expect("sign");
    let (s, v) = grant(&e, &jwt).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error_description"]
            .as_str()
            .unwrap_or("")
            .contains("disabled"),
        "{v}"
    );
    let (s, _) = e
        .admin(
            Method::POST,
            &format!("/v1/projects/-/serviceAccounts/{EMAIL}:enable"),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    for t in [&token, &esp] {
        let (s, v) = e.call(Method::GET, list, Some(t), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }

    // Deleting the key revokes everything minted with it, including the cached JWT.
    let (s, v) = e
        .admin(
            Method::DELETE,
            &format!(
                "/v1/projects/-/serviceAccounts/{EMAIL}/keys/{}",
                key.private_key_id
            ),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for t in [&token, &esp] {
        let (s, _) = e.call(Method::GET, list, Some(t), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let fresh = key
        .sign_jwt(&claims(&key, now_unix(), now_unix() + 600))
        .expect("sign");
    let (s, v) = grant(&e, &fresh).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error_description"], "Invalid JWT Signature.");
}

#[tokio::test]
async fn grant_input_errors_are_oauth_shaped() {
    let e = env().await;
    let req = |body: &'static str| {
        Request::builder()
            .method("POST")
            .uri("/token")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(body))
            .expect("request")
    };
    for (body, error) in [
        ("", "invalid_request"),
        ("grant_type=password&username=a", "unsupported_grant_type"),
        (
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer",
            "invalid_request",
        ),
    ] {
        let resp = oneshot(e.state.clone(), req(body)).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        let v: Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(v["error"], error, "{body}: {v}");
    }
}

/// A `target_audience` assertion is answered with Google's `{"id_token": ...}`: RS256, signed by
/// the key the control plane publishes at the `jwks_uri` of its discovery document, with the
/// account as `sub`/`email`. The ID token is not an access token for the control plane.
#[tokio::test]
async fn target_audience_grant_returns_an_id_token_verifiable_through_discovery() {
    let e = env().await;
    let key = new_key(&e).await;
    let now = now_unix();
    let audience = "https://backend.example.test/api";
    let assertion = key
        .sign_jwt(&json!({"iss": key.client_email, "aud": key.token_uri,
            "target_audience": audience, "iat": now, "exp": now + 600}))
        .expect("assertion");
    let (s, v) = grant(&e, &assertion).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let obj = v.as_object().expect("object");
    assert_eq!(obj.len(), 1, "only id_token: {v}");
    let id_token = v["id_token"].as_str().expect("id_token");

    // Verify the way a backend would: discovery → jwks_uri → the key named by `kid`.
    let (_, doc) = e
        .call(Method::GET, "/.well-known/openid-configuration", None, None)
        .await;
    let issuer = doc["issuer"].as_str().expect("issuer").to_string();
    let jwks_path = doc["jwks_uri"]
        .as_str()
        .and_then(|u| u.strip_prefix(issuer.as_str()))
        .expect("jwks_uri under the issuer")
        .to_string();
    let (_, jwks) = e.call(Method::GET, &jwks_path, None, None).await;
    let kid = portico_credentials::token_kid(id_token)
        .expect("header")
        .expect("kid");
    let jwk = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("signing key published");
    let dk = jsonwebtoken::DecodingKey::from_rsa_components(
        jwk["n"].as_str().expect("n"),
        jwk["e"].as_str().expect("e"),
    )
    .expect("key");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[issuer.as_str()]);
    let claims = jsonwebtoken::decode::<Value>(id_token, &dk, &validation)
        .expect("ID token verifies")
        .claims;
    assert_eq!(claims["email"], EMAIL);
    assert_eq!(claims["email_verified"], true);
    let (_, account) = e
        .admin(
            Method::GET,
            &format!("/v1/projects/-/serviceAccounts/{EMAIL}"),
            None,
        )
        .await;
    assert_eq!(claims["sub"], account["uniqueId"]);
    assert_eq!(claims["azp"], account["uniqueId"]);
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(lifetime, 3600);

    // Another audience does not verify; the ID token is no bearer token for the control plane.
    validation.set_audience(&["https://other.example.test"]);
    assert!(jsonwebtoken::decode::<Value>(id_token, &dk, &validation).is_err());
    let (s, _) = e
        .call(Method::GET, "/v1/services", Some(id_token), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // An absurd audience is refused before anything is signed.
    let long = format!("https://x.test/{}", "a".repeat(3000));
    let assertion = key
        .sign_jwt(&json!({"iss": key.client_email, "aud": key.token_uri,
            "target_audience": long, "iat": now, "exp": now + 600}))
        .expect("assertion");
    let (s, v) = grant(&e, &assertion).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"], "invalid_grant");
}
