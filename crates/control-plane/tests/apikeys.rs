//! API Keys handlers in process: the key string's life cycle, at-rest storage, paging and
//! lookup.

mod support;

use axum::http::{Method, StatusCode};
use portico_control_plane::apis::apikeys::lookup;
use serde_json::json;
use support::env;

const KEYS: &str = "/v2/projects/demo-proj/locations/global/keys";

#[tokio::test]
async fn key_string_lifecycle_and_storage() {
    let e = env().await;
    let (s, op) = e
        .admin(
            Method::POST,
            &format!("{KEYS}?keyId=k1"),
            Some(json!({"displayName": "one", "restrictions": {
                "apiTargets": [{"service": "echo.example.com", "methods": ["Echo"]}],
                "browserKeyRestrictions": {"allowedReferrers": ["*.example.com/*"]}
            }})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{op}");
    assert_eq!(op["done"], true);
    assert!(op["name"]
        .as_str()
        .expect("op name")
        .starts_with("operations/akmf.p7-"));
    let key_string = op["response"]["keyString"]
        .as_str()
        .expect("keyString")
        .to_string();
    let name = op["response"]["name"].as_str().expect("name").to_string();
    let number = portico_control_plane::projects::project_number(&e.state.store, "demo-proj")
        .await
        .expect("number");
    assert_eq!(name, format!("projects/{number}/locations/global/keys/k1"));

    // The stored operation (what GET /v2/operations returns) has no key string.
    let op_id = op["name"]
        .as_str()
        .expect("op name")
        .trim_start_matches("operations/");
    let (s, stored_op) = e
        .admin(Method::GET, &format!("/v2/operations/{op_id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        stored_op["response"].get("keyString").is_none(),
        "{stored_op}"
    );
    assert_eq!(stored_op["response"]["name"], name.as_str());

    // No column of any row holds the key string.
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT k.key_hash, k.key_sealed, k.restrictions, o.body FROM apikeys_keys k, \
         operations o",
    )
    .fetch_all(e.state.store.pool())
    .await
    .expect("rows");
    assert!(!rows.is_empty());
    for r in &rows {
        for col in [&r.0, &r.1, &r.2, &r.3] {
            assert!(
                !col.contains(&key_string[4..]),
                "key string stored in clear"
            );
        }
    }

    // Readable back by number or id; lookup by hash.
    let (s, v) = e
        .admin(Method::GET, &format!("/v2/{name}/keyString"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["keyString"], key_string.as_str());
    let rec = lookup(&e.state, &key_string)
        .await
        .expect("lookup")
        .expect("found");
    assert_eq!(rec.name, name);
    assert_eq!(rec.project_id, "demo-proj");
    assert_eq!(rec.restrictions.api_targets[0].methods, vec!["Echo"]);
    assert!(!rec.deleted);
    assert!(lookup(&e.state, "AIzaNotAKey")
        .await
        .expect("lookup")
        .is_none());
    let (s, v) = e
        .admin(
            Method::GET,
            &format!("/v2/keys:lookupKey?keyString={key_string}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["parent"], format!("projects/{number}/locations/global"));

    // Soft delete: lookup still sees it (flagged), lookupKey does not; undelete restores.
    let (s, _) = e.admin(Method::DELETE, &format!("{KEYS}/k1"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        lookup(&e.state, &key_string)
            .await
            .expect("lookup")
            .expect("found")
            .deleted
    );
    let (s, _) = e
        .admin(
            Method::GET,
            &format!("/v2/keys:lookupKey?keyString={key_string}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = e.admin(Method::DELETE, &format!("{KEYS}/k1"), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "double delete");
    let (s, _) = e
        .admin(Method::POST, &format!("{KEYS}/k1:undelete"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        !lookup(&e.state, &key_string)
            .await
            .expect("lookup")
            .expect("found")
            .deleted
    );

    // Duplicate id, bad id, bad location, bad restrictions.
    let (s, v) = e
        .admin(Method::POST, &format!("{KEYS}?keyId=k1"), Some(json!({})))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, _) = e
        .admin(Method::POST, &format!("{KEYS}?keyId=K_1"), Some(json!({})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = e
        .admin(
            Method::GET,
            "/v2/projects/demo-proj/locations/us-east1/keys",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, v) = e
        .admin(
            Method::PATCH,
            &format!("{KEYS}/k1?updateMask=restrictions.serverKeyRestrictions"),
            Some(json!({"restrictions": {"serverKeyRestrictions": {"allowedIps": ["nope"]}}})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("nope"));
}

#[tokio::test]
async fn list_pages_and_show_deleted() {
    let e = env().await;
    for id in ["a1", "a2", "a3"] {
        let (s, _) = e
            .admin(Method::POST, &format!("{KEYS}?keyId={id}"), Some(json!({})))
            .await;
        assert_eq!(s, StatusCode::OK);
    }
    let (s, _) = e.admin(Method::DELETE, &format!("{KEYS}/a2"), None).await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = e
        .admin(Method::GET, &format!("{KEYS}?showDeleted=False"), None)
        .await;
    assert_eq!(v["keys"].as_array().expect("keys").len(), 2);
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let (s, v) = e
            .admin(
                Method::GET,
                &format!("{KEYS}?showDeleted=True&pageSize=2&pageToken={token}"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        for k in v["keys"].as_array().expect("keys") {
            seen.push(
                k["name"]
                    .as_str()
                    .expect("name")
                    .rsplit('/')
                    .next()
                    .unwrap_or("")
                    .to_string(),
            );
        }
        match v["nextPageToken"].as_str() {
            Some(t) => token = t.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, vec!["a1", "a2", "a3"]);
}

/// An etag read from the key makes a PATCH or DELETE conditional: a stale one is refused
/// with ABORTED and changes nothing; the current one (as shown, `W/"..."`, or bare) and no
/// etag at all succeed.
#[tokio::test]
async fn stale_etags_are_refused_on_update_and_delete() {
    let e = env().await;
    let (s, op) = e
        .admin(
            Method::POST,
            &format!("{KEYS}?keyId=etagged"),
            Some(json!({"displayName": "first"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{op}");
    let name = op["response"]["name"].as_str().expect("name").to_string();
    let read = |v: &serde_json::Value| v["etag"].as_str().expect("etag").to_string();
    let (_, key) = e.admin(Method::GET, &format!("/v2/{name}"), None).await;
    let first_etag = read(&key);
    assert!(first_etag.starts_with("W/\""), "{first_etag}");

    // Changed with the etag just read (as shown): accepted, and the etag moves on.
    let (s, op) = e
        .admin(
            Method::PATCH,
            &format!("/v2/{name}?updateMask=displayName"),
            Some(json!({"displayName": "second", "etag": first_etag})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{op}");
    let (_, key) = e.admin(Method::GET, &format!("/v2/{name}"), None).await;
    let second_etag = read(&key);
    assert_ne!(second_etag, first_etag);

    // The old etag is stale now: refused, nothing changed.
    let (s, err) = e
        .admin(
            Method::PATCH,
            &format!("/v2/{name}?updateMask=displayName"),
            Some(json!({"displayName": "lost update", "etag": first_etag})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{err}");
    assert_eq!(err["error"]["status"], "ABORTED", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("does not match")),
        "{err}"
    );
    let (_, key) = e.admin(Method::GET, &format!("/v2/{name}"), None).await;
    assert_eq!(key["displayName"], "second");
    assert_eq!(read(&key), second_etag);

    // A garbage etag is as stale as an old one.
    let (s, _) = e
        .admin(
            Method::PATCH,
            &format!("/v2/{name}?updateMask=displayName"),
            Some(json!({"displayName": "x", "etag": "W/\"\\\"\""})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);

    // DELETE with a stale etag is refused; with the bare current value it goes through.
    let (s, _) = e
        .admin(
            Method::DELETE,
            &format!("/v2/{name}?etag=not-the-etag"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (_, key) = e.admin(Method::GET, &format!("/v2/{name}"), None).await;
    assert!(key.get("deleteTime").is_none(), "{key}");
    let bare = second_etag
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string();
    let (s, op) = e
        .admin(Method::DELETE, &format!("/v2/{name}?etag={bare}"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{op}");

    // Without an etag, a change is unconditional (Google's rule).
    let (s, op) = e
        .admin(Method::POST, &format!("/v2/{name}:undelete"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{op}");
    let (s, op) = e
        .admin(
            Method::PATCH,
            &format!("/v2/{name}?updateMask=displayName"),
            Some(json!({"displayName": "third"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{op}");
}
