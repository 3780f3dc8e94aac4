//! The sample served on a real loopback socket, driven over HTTP.

use base64::engine::general_purpose::URL_SAFE;
use base64::Engine;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::net::TcpListener;

struct Server {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(portico_echo::serve_with_shutdown(listener, async {
            let _ = rx.await;
        }));
        Server {
            base: format!("http://{addr}"),
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let done = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        assert!(
            matches!(done, Ok(Ok(Ok(())))),
            "server did not stop cleanly: {done:?}"
        );
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

#[tokio::test]
async fn echo_returns_the_body_it_got() {
    let server = Server::start().await;
    let resp = client()
        .post(format!("{}/echo", server.base))
        .header("content-type", "application/json")
        .body(r#"{"message":"hello world"}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/json",
        "content type"
    );
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body, json!({"message": "hello world"}));
    server.stop().await;
}

#[tokio::test]
async fn echo_rejects_non_json_with_a_json_error() {
    let server = Server::start().await;
    for (body, needle) in [("hello", "not valid JSON"), ("", "empty")] {
        let resp = client()
            .post(format!("{}/echo", server.base))
            .body(body)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 400, "body {body:?}");
        let err: Value = resp.json().await.expect("json error body");
        assert_eq!(err["code"], 400);
        let msg = err["message"].as_str().expect("message");
        assert!(msg.contains(needle), "{msg}");
    }
    server.stop().await;
}

#[tokio::test]
async fn auth_info_decodes_the_proxy_header() {
    let server = Server::start().await;
    let info = json!({"issuer": "https://accounts.google.com", "id": "123", "email": "u?>@x.test"});
    // Padded URL-safe, as ESP v1 sends it.
    let header = URL_SAFE.encode(info.to_string());
    for route in ["googlejwt", "googleidtoken", "firebase"] {
        let resp = client()
            .get(format!("{}/auth/info/{route}", server.base))
            .header("X-Endpoint-API-UserInfo", &header)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200, "{route}");
        if route == "firebase" {
            assert_eq!(resp.headers()["access-control-allow-origin"], "*");
        }
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body, info, "{route}");
    }
    server.stop().await;
}

#[tokio::test]
async fn auth_info_without_a_caller_is_401() {
    let server = Server::start().await;
    for header in [None, Some("")] {
        let mut req = client().get(format!("{}/auth/info/googlejwt", server.base));
        if let Some(h) = header {
            req = req.header("X-Endpoint-API-UserInfo", h);
        }
        let resp = req.send().await.expect("send");
        assert_eq!(resp.status(), 401, "header {header:?}");
        let err: Value = resp.json().await.expect("json");
        assert_eq!(err["code"], 401);
        assert!(err["message"]
            .as_str()
            .expect("message")
            .contains("X-Endpoint-API-UserInfo"));
    }
    let resp = client()
        .get(format!("{}/auth/info/firebase", server.base))
        .header("X-Endpoint-API-UserInfo", "%%%")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 400);
    server.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_preflight() {
    let server = Server::start().await;
    let resp = client()
        .get(format!("{}/nope", server.base))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 404);
    let err: Value = resp.json().await.expect("json");
    assert_eq!(err["code"], 404);

    let resp = client()
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/auth/info/firebase", server.base),
        )
        .header("Origin", "https://app.example")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    server.stop().await;
}
