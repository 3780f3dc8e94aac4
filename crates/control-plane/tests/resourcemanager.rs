//! Resource Manager's project verbs through the whole router: `:testIamPermissions` answers
//! the subset of the asked permissions the caller holds (what gcloud and the console ask
//! before offering an action), and refuses wildcards and oversized lists.

mod support;

use axum::http::{Method, StatusCode};
use serde_json::json;
use support::env;

const PROJECT: &str = "rm-proj";

#[tokio::test]
async fn test_iam_permissions_answers_what_the_caller_holds() {
    let e = env().await;
    for id in ["viewer", "nobody"] {
        let (s, v) = e
            .admin(
                Method::POST,
                &format!("/v1/projects/{PROJECT}/serviceAccounts"),
                Some(json!({"accountId": id})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let member = |id: &str| format!("serviceAccount:{id}@{PROJECT}.iam.gserviceaccount.com");
    let (s, v) = e
        .admin(
            Method::POST,
            &format!("/v1/projects/{PROJECT}:setIamPolicy"),
            Some(json!({"policy": {"bindings": [
                {"role": "roles/viewer", "members": [member("viewer")]},
            ]}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let asked = json!({"permissions": [
        "resourcemanager.projects.get",
        "resourcemanager.projects.getIamPolicy",
        "resourcemanager.projects.setIamPolicy",
        "apikeys.keys.create",
    ]});
    let uri = format!("/v1/projects/{PROJECT}:testIamPermissions");
    let viewer = format!("sa:viewer@{PROJECT}.iam.gserviceaccount.com");
    let (s, v) = e
        .call(Method::POST, &uri, Some(&viewer), Some(asked.clone()))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        json!({"permissions": [
            "resourcemanager.projects.get",
            "resourcemanager.projects.getIamPolicy",
        ]})
    );
    // Someone with no role gets an empty answer, not a refusal.
    let nobody = format!("sa:nobody@{PROJECT}.iam.gserviceaccount.com");
    let (s, v) = e
        .call(Method::POST, &uri, Some(&nobody), Some(asked.clone()))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({}));
    // The admin token holds everything.
    let (s, v) = e.admin(Method::POST, &uri, Some(asked.clone())).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, asked);

    // Wildcards, empty names and oversized lists are refused.
    for bad in [json!(["resourcemanager.*"]), json!(["*"]), json!([""])] {
        let (s, v) = e
            .call(
                Method::POST,
                &uri,
                Some(&viewer),
                Some(json!({"permissions": bad})),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    }
    let many: Vec<String> = (0..101).map(|i| format!("x.y.z{i}")).collect();
    let (s, v) = e
        .call(
            Method::POST,
            &uri,
            Some(&viewer),
            Some(json!({"permissions": many})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("at most 100"), "{v}");
    // Unknown fields are refused like everywhere else.
    let (s, _) = e
        .call(
            Method::POST,
            &uri,
            Some(&viewer),
            Some(json!({"permission": ["a.b.c"]})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}
