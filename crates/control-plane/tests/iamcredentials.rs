//! IAM Credentials `generateIdToken` through the whole router: who may mint an ID token for an
//! account, what the token says, and the refusals (bad project segment, missing or huge
//! audience, delegation, unknown and disabled accounts, unknown fields).

mod support;

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use support::{env, TestEnv};

const PROJECT: &str = "creds-proj";
const TARGET: &str = "runner@creds-proj.iam.gserviceaccount.com";
const AUDIENCE: &str = "https://backend.creds.test";

fn path(account: &str) -> String {
    format!("/v1/projects/-/serviceAccounts/{account}:generateIdToken")
}

async fn make_account(e: &TestEnv, id: &str) -> Value {
    let (s, v) = e
        .admin(
            Method::POST,
            &format!("/v1/projects/{PROJECT}/serviceAccounts"),
            Some(json!({"accountId": id})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

fn verify(e: &TestEnv, token: &str, audience: &str) -> Value {
    let key = e.state.id_tokens.public_key();
    let dk = jsonwebtoken::DecodingKey::from_rsa_pem(key.public_pem.as_bytes()).expect("key");
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&[audience]);
    v.set_issuer(&[e.state.public_url.as_str()]);
    jsonwebtoken::decode::<Value>(token, &dk, &v)
        .expect("ID token verifies")
        .claims
}

#[tokio::test]
async fn generate_id_token_mints_for_token_creators_only() {
    let e = env().await;
    let target = make_account(&e, "runner").await;
    for id in ["minter", "editor-sa", "sa-admin", "nobody"] {
        make_account(&e, id).await;
    }
    let member = |id: &str| format!("serviceAccount:{id}@{PROJECT}.iam.gserviceaccount.com");
    let (s, v) = e
        .admin(
            Method::POST,
            &format!("/v1/projects/{PROJECT}:setIamPolicy"),
            Some(json!({"policy": {"bindings": [
                {"role": "roles/iam.serviceAccountOpenIdTokenCreator", "members": [member("minter")]},
                {"role": "roles/editor", "members": [member("editor-sa")]},
                {"role": "roles/iam.serviceAccountAdmin", "members": [member("sa-admin")]},
            ]}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // The admin, and a token creator, get a token; with and without the email claim.
    let (s, v) = e
        .admin(
            Method::POST,
            &path(TARGET),
            Some(json!({"audience": AUDIENCE, "includeEmail": true})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let claims = verify(&e, v["token"].as_str().expect("token"), AUDIENCE);
    assert_eq!(claims["email"], TARGET);
    assert_eq!(claims["sub"], target["uniqueId"]);
    let minter = format!("sa:minter@{PROJECT}.iam.gserviceaccount.com");
    let (s, v) = e
        .call(
            Method::POST,
            &path(TARGET),
            Some(&minter),
            Some(json!({"audience": AUDIENCE})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let claims = verify(&e, v["token"].as_str().expect("token"), AUDIENCE);
    assert!(claims.get("email").is_none(), "{claims}");
    // By unique id, and through the API prefix an api_endpoint_override would use.
    let by_id = format!(
        "/iamcredentials{}",
        path(target["uniqueId"].as_str().expect("uniqueId"))
    );
    let (s, v) = e
        .call(
            Method::POST,
            &by_id,
            Some(&minter),
            Some(json!({"audience": AUDIENCE})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // Editors, service-account admins and strangers may not mint; nor may anyone unsigned.
    for id in ["editor-sa", "sa-admin", "nobody"] {
        let who = format!("sa:{id}@{PROJECT}.iam.gserviceaccount.com");
        let (s, v) = e
            .call(
                Method::POST,
                &path(TARGET),
                Some(&who),
                Some(json!({"audience": AUDIENCE})),
            )
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{id}: {v}");
    }
    let (s, _) = e
        .call(
            Method::POST,
            &path(TARGET),
            None,
            Some(json!({"audience": AUDIENCE})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // A missing account looks the same as a forbidden one to non-admins.
    let (s, v) = e
        .call(
            Method::POST,
            &path("ghost@creds-proj.iam.gserviceaccount.com"),
            Some(&minter),
            Some(json!({"audience": AUDIENCE})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, _) = e
        .admin(
            Method::POST,
            &path("ghost@creds-proj.iam.gserviceaccount.com"),
            Some(json!({"audience": AUDIENCE})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn generate_id_token_refuses_bad_requests() {
    let e = env().await;
    make_account(&e, "runner").await;
    let cases: Vec<(String, Value, StatusCode)> = vec![
        (
            format!("/v1/projects/{PROJECT}/serviceAccounts/{TARGET}:generateIdToken"),
            json!({"audience": AUDIENCE}),
            StatusCode::BAD_REQUEST,
        ),
        (path(TARGET), json!({}), StatusCode::BAD_REQUEST),
        (
            path(TARGET),
            json!({"audience": format!("https://x.test/{}", "a".repeat(3000))}),
            StatusCode::BAD_REQUEST,
        ),
        (
            path(TARGET),
            json!({"audience": AUDIENCE, "delegates": ["projects/-/serviceAccounts/x@y"]}),
            StatusCode::NOT_IMPLEMENTED,
        ),
        (
            path(TARGET),
            json!({"audience": AUDIENCE, "lifetime": "3600s"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            path(TARGET),
            json!({"audience": 7}),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (p, body, expected) in cases {
        let (s, v) = e.admin(Method::POST, &p, Some(body.clone())).await;
        assert_eq!(s, expected, "{p} {body}: {v}");
    }
    // A disabled account mints nothing until enabled again.
    let (s, v) = e
        .admin(
            Method::POST,
            &format!("/v1/projects/-/serviceAccounts/{TARGET}:disable"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = e
        .admin(
            Method::POST,
            &path(TARGET),
            Some(json!({"audience": AUDIENCE})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["status"], "FAILED_PRECONDITION");
    // IAM's own verbs on the same path still work, and unknown verbs are still 404.
    let (s, _) = e
        .admin(
            Method::POST,
            &format!("/v1/projects/-/serviceAccounts/{TARGET}:enable"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = e
        .admin(
            Method::POST,
            &format!("/v1/projects/-/serviceAccounts/{TARGET}:generateAccessTokenX"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}
