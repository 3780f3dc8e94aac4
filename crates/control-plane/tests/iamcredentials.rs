//! IAM Credentials `generateIdToken` and `generateAccessToken` through the whole router: who may
//! mint a token for an account, what the token says and does, delegation chains checked link by
//! link, and the refusals (bad project segment, missing or huge audience, bad scopes and
//! lifetimes, malformed delegates, unknown and disabled accounts, unknown fields).

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
            StatusCode::NOT_FOUND,
        ),
        (
            path(TARGET),
            json!({"audience": AUDIENCE, "delegates": [TARGET]}),
            StatusCode::BAD_REQUEST,
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

fn access_path(account: &str) -> String {
    format!("/v1/projects/-/serviceAccounts/{account}:generateAccessToken")
}

fn email(id: &str) -> String {
    format!("{id}@{PROJECT}.iam.gserviceaccount.com")
}

fn delegate(id: &str) -> String {
    format!("projects/-/serviceAccounts/{}", email(id))
}

async fn bind(e: &TestEnv, bindings: Value) {
    let (s, v) = e
        .admin(
            Method::POST,
            &format!("/v1/projects/{PROJECT}:setIamPolicy"),
            Some(json!({"policy": {"bindings": bindings}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// What the control plane says of a bearer token: the status of a call that needs
/// `iam.serviceAccounts.list` on the project.
async fn use_token(e: &TestEnv, token: &str) -> StatusCode {
    e.call(
        Method::GET,
        &format!("/v1/projects/{PROJECT}/serviceAccounts"),
        Some(token),
        None,
    )
    .await
    .0
}

#[tokio::test]
async fn generate_access_token_mints_tokens_that_act_as_the_account() {
    let e = env().await;
    for id in ["runner", "creator", "oidc-only", "editor-sa"] {
        make_account(&e, id).await;
    }
    let member = |id: &str| format!("serviceAccount:{}", email(id));
    bind(
        &e,
        json!([
            {"role": "roles/iam.serviceAccountTokenCreator", "members": [member("creator")]},
            {"role": "roles/iam.serviceAccountOpenIdTokenCreator", "members": [member("oidc-only")]},
            {"role": "roles/editor", "members": [member("editor-sa")]},
            {"role": "roles/viewer", "members": [member("runner")]},
        ]),
    )
    .await;
    let scope = json!(["https://www.googleapis.com/auth/servicecontrol"]);
    let before = time::OffsetDateTime::now_utc().unix_timestamp();
    let (s, v) = e
        .call(
            Method::POST,
            &access_path(TARGET),
            Some(&format!("sa:{}", email("creator"))),
            Some(json!({"scope": scope, "lifetime": "600s"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let token = v["accessToken"].as_str().expect("accessToken").to_string();
    assert!(token.starts_with("ya29."), "{token}");
    let expire = time::OffsetDateTime::parse(
        v["expireTime"].as_str().expect("expireTime"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339")
    .unix_timestamp();
    assert!((before + 600..=before + 602).contains(&expire), "{v}");
    // The token is the runner's: its viewer binding lets it list accounts.
    assert_eq!(use_token(&e, &token).await, StatusCode::OK);
    assert_eq!(
        use_token(&e, "ya29.not-a-token-anyone-issued").await,
        StatusCode::UNAUTHORIZED
    );
    // Default lifetime is an hour.
    let (s, v) = e
        .admin(
            Method::POST,
            &access_path(TARGET),
            Some(json!({"scope": scope})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let expire = time::OffsetDateTime::parse(
        v["expireTime"].as_str().expect("expireTime"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339")
    .unix_timestamp();
    assert!((before + 3600..=before + 3602).contains(&expire), "{v}");

    // The OpenID role mints ID tokens only; editors mint nothing.
    for id in ["oidc-only", "editor-sa", "runner"] {
        let (s, v) = e
            .call(
                Method::POST,
                &access_path(TARGET),
                Some(&format!("sa:{}", email(id))),
                Some(json!({"scope": scope})),
            )
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{id}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("iam.serviceAccounts.getAccessToken"),
            "{v}"
        );
    }
    let (s, _) = e
        .call(
            Method::POST,
            &path(TARGET),
            Some(&format!("sa:{}", email("oidc-only"))),
            Some(json!({"audience": AUDIENCE})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    // Refusals of the request itself.
    for body in [
        json!({}),
        json!({"scope": []}),
        json!({"scope": [""]}),
        json!({"scope": ["a b"]}),
        json!({"scope": scope, "lifetime": "0s"}),
        json!({"scope": scope, "lifetime": "3601s"}),
        json!({"scope": scope, "lifetime": "1h"}),
        json!({"scope": scope, "audience": AUDIENCE}),
        json!({"scope": scope, "delegates": ["nobody"]}),
    ] {
        let (s, v) = e
            .admin(Method::POST, &access_path(TARGET), Some(body.clone()))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
    }

    // Disabling the account stops its tokens; deleting it revokes them.
    let (s, _) = e
        .admin(
            Method::POST,
            &format!("/v1/projects/-/serviceAccounts/{TARGET}:disable"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(use_token(&e, &token).await, StatusCode::UNAUTHORIZED);
    let (s, v) = e
        .admin(
            Method::POST,
            &access_path(TARGET),
            Some(json!({"scope": scope})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["status"], "FAILED_PRECONDITION");
    let (s, _) = e
        .admin(
            Method::POST,
            &format!("/v1/projects/-/serviceAccounts/{TARGET}:enable"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(use_token(&e, &token).await, StatusCode::OK);
    let (s, _) = e
        .admin(
            Method::DELETE,
            &format!("/v1/projects/{PROJECT}/serviceAccounts/{TARGET}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(use_token(&e, &token).await, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn delegation_chains_are_checked_link_by_link() {
    let e = env().await;
    for id in ["runner", "caller", "first-hop", "second-hop", "stranger"] {
        make_account(&e, id).await;
    }
    // Project-level bindings are all Portico has, so a "link" is a binding in the project of
    // the account acted for; every account here lives in one project, so the chain is proven
    // by who holds the role: caller, then first, then second.
    let member = |id: &str| format!("serviceAccount:{}", email(id));
    let scope = json!(["https://www.googleapis.com/auth/cloud-platform"]);
    let call = |who: &'static str, body: Value, id_token: bool| {
        let e = &e;
        async move {
            let p = if id_token {
                path(TARGET)
            } else {
                access_path(TARGET)
            };
            e.call(
                Method::POST,
                &p,
                Some(&format!("sa:{}", email(who))),
                Some(body),
            )
            .await
        }
    };

    // Nobody but the caller holds the role: the first delegate may not act for the second.
    bind(
        &e,
        json!([{"role": "roles/iam.serviceAccountTokenCreator", "members": [member("caller")]}]),
    )
    .await;
    let chain = json!([delegate("first-hop"), delegate("second-hop")]);
    let (s, v) = call("caller", json!({"scope": scope, "delegates": chain}), false).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(
        v["error"]["message"],
        format!(
            "Permission 'iam.serviceAccounts.getAccessToken' denied: delegate {} may not act \
             for {}.",
            email("first-hop"),
            email("second-hop")
        )
    );

    // The whole chain holds the role: the token is the target's.
    bind(
        &e,
        json!([
            {"role": "roles/iam.serviceAccountTokenCreator",
             "members": [member("caller"), member("first-hop"), member("second-hop")]},
            {"role": "roles/viewer", "members": [member("runner")]},
        ]),
    )
    .await;
    let (s, v) = call("caller", json!({"scope": scope, "delegates": chain}), false).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let token = v["accessToken"].as_str().expect("accessToken").to_string();
    assert_eq!(use_token(&e, &token).await, StatusCode::OK);
    let (s, v) = call(
        "caller",
        json!({"audience": AUDIENCE, "includeEmail": true, "delegates": chain}),
        true,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let claims = verify(&e, v["token"].as_str().expect("token"), AUDIENCE);
    assert_eq!(claims["email"], TARGET);

    // A caller without the role gets nowhere, however good the chain after it.
    let (s, v) = call(
        "stranger",
        json!({"scope": scope, "delegates": chain}),
        false,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");

    // A delegate that does not exist looks like a forbidden one; a disabled one is named.
    let ghost = json!([delegate("ghost"), delegate("second-hop")]);
    let (s, v) = call("caller", json!({"scope": scope, "delegates": ghost}), false).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, _) = e
        .admin(
            Method::POST,
            &format!(
                "/v1/projects/-/serviceAccounts/{}:disable",
                email("first-hop")
            ),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = call("caller", json!({"scope": scope, "delegates": chain}), false).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["status"], "FAILED_PRECONDITION");

    // Too long a chain is refused before any lookup.
    let long: Vec<String> = (0..11).map(|_| delegate("second-hop")).collect();
    let (s, v) = call("caller", json!({"scope": scope, "delegates": long}), false).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}
