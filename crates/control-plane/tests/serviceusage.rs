//! Service Usage through the whole router: enable, disable, batch enable, list.

mod support;

use axum::http::{Method, StatusCode};
use portico_control_plane::store::usage::is_enabled;
use serde_json::json;
use support::env;

const SVC: &str = "echo-api.endpoints.demo-proj.cloud.goog";

#[tokio::test]
async fn enable_list_disable_and_batch() {
    let e = env().await;
    let (st, _) = e.create_service(SVC, "demo-proj").await;
    assert_eq!(st, StatusCode::OK);
    assert!(!is_enabled(&e.state.store, "demo-proj", SVC).await.unwrap());

    let (st, op) = e
        .admin(
            Method::POST,
            &format!("/serviceusage/v1/projects/demo-proj/services/{SVC}:enable"),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{op}");
    assert_eq!(op["done"], true);
    let number = portico_control_plane::projects::project_number(&e.state.store, "demo-proj")
        .await
        .unwrap();
    assert!(op["name"]
        .as_str()
        .unwrap()
        .starts_with(&format!("operations/acat.p2-{number}-")));
    assert_eq!(op["response"]["service"]["state"], "ENABLED");
    assert_eq!(
        op["response"]["service"]["name"],
        format!("projects/{number}/services/{SVC}")
    );
    assert!(is_enabled(&e.state.store, "demo-proj", SVC).await.unwrap());

    // Unknown services are refused as a whole batch; platform APIs are fine.
    let (st, _) = e
        .admin(
            Method::POST,
            "/v1/projects/demo-proj/services:batchEnable",
            Some(json!({"serviceIds": ["servicecontrol.googleapis.com", "nope.example.com"]})),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert!(
        !is_enabled(&e.state.store, "demo-proj", "servicecontrol.googleapis.com")
            .await
            .unwrap()
    );
    let (st, op) = e
        .admin(
            Method::POST,
            "/v1/projects/demo-proj/services:batchEnable",
            Some(json!({"serviceIds": ["servicecontrol.googleapis.com",
                                        "endpoints.googleapis.com"]})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{op}");
    assert_eq!(op["response"]["services"].as_array().unwrap().len(), 2);

    // The project number works in paths too.
    let (st, list) = e
        .admin(
            Method::GET,
            &format!("/v1/projects/{number}/services?filter=state:ENABLED&pageSize=200"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let names: Vec<&str> = list["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["config"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec![
            "echo-api.endpoints.demo-proj.cloud.goog",
            "endpoints.googleapis.com",
            "servicecontrol.googleapis.com"
        ]
    );

    let (st, op) = e
        .admin(
            Method::POST,
            &format!("/v1/projects/demo-proj/services/{SVC}:disable"),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{op}");
    assert_eq!(op["response"]["service"]["state"], "DISABLED");
    assert!(!is_enabled(&e.state.store, "demo-proj", SVC).await.unwrap());

    // Another consumer needs serviceConsumer on the service; a SA needs project rights.
    let (st, _) = e
        .call(
            Method::POST,
            &format!("/v1/projects/other-proj/services/{SVC}:enable"),
            Some("sa:x@other-proj.iam.gserviceaccount.com"),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _) = e
        .admin(
            Method::GET,
            "/v1/projects/demo-proj/services?filter=bogus",
            None,
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
}
