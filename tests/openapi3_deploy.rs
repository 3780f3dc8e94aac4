//! End to end: `examples/echo/openapi3.yaml` (OpenAPI 3.0 with Google's 3.x extensions)
//! deployed through the Service Management REST API exactly as gcloud 543 and later send it
//! (create the service, `configs:submit` with the file as `OPEN_API_YAML` in URL-safe base64
//! under its base name, roll out, enable), then served by `portico esp` in front of
//! `portico echo`: 401 without an API key, the echo with one, as with the 2.0 file, and a JWT
//! method accepts a token from the `x-google-auth` issuer for its audience only. Also: one
//! submission cannot mix 2.0 and 3.x files, and the installed gcloud (528) refuses a 3.x file
//! on the client side, sending nothing.
//!
//! Real processes of the `portico` binary on loopback ports chosen at run time.

mod common;

use common::{echo_and_esp, gcloud_available, ControlPlane, Db, Gcloud};
use serde_json::json;
use std::time::Duration;

const PROJECT: &str = "oas3-proj";
const SERVICE: &str = "echo-api.endpoints.oas3-proj.cloud.goog";

fn example() -> String {
    include_str!("../examples/echo/openapi3.yaml").replace("YOUR-PROJECT-ID", PROJECT)
}

/// The example with the `google_jwt` scheme's keys served by this control plane for `sa_email`
/// (as `portico up` fills in its sample).
fn example_for(control_plane: &str, sa_email: &str) -> String {
    example()
        .replace("https://www.googleapis.com/", &format!("{control_plane}/"))
        .replace("YOUR-SERVICE-ACCOUNT-EMAIL", sa_email)
}

fn url_safe(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE.encode(text.as_bytes())
}

/// One POST through the proxy; the status and body.
fn post(port: u16, target: &str, body: &str) -> (u16, String) {
    let resp = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
        .post(format!("http://127.0.0.1:{port}{target}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .unwrap_or_else(|e| panic!("POST {target}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().unwrap_or_default())
}

#[test]
fn openapi3_echo_deployed_as_gcloud_543_sends_it_is_served_by_esp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control_plane = ControlPlane::start(&dir.path().join("cp"), &Db::Sqlite);
    let api = control_plane.api();
    let (sa_email, key_file) = api.proxy_account(PROJECT, "echo-proxy", dir.path());

    // gcloud ≥ 543: GET (403 or 404: new) → create → submit → rollout (→ enable).
    let (status, _) = api.call(
        reqwest::Method::GET,
        &format!("/v1/services/{SERVICE}"),
        None,
    );
    assert!(status == 403 || status == 404, "{status}");
    let spec = example_for(&control_plane.url, &sa_email);
    let config_id = api.deploy_file(SERVICE, PROJECT, "openapi3.yaml", &spec, &sa_email);
    let config = api.ok(
        reqwest::Method::GET,
        &format!("/v1/services/{SERVICE}/configs/{config_id}?view=FULL"),
        None,
    );
    assert_eq!(config["name"], SERVICE);
    assert_eq!(
        config["sourceInfo"]["sourceFiles"][0]["filePath"],
        "openapi3.yaml"
    );
    api.enable(PROJECT, SERVICE);

    // A 2.0 file next to a 3.x file is refused.
    let v2 = include_str!("../examples/echo/openapi.yaml").replace("YOUR-PROJECT-ID", PROJECT);
    let (status, body) = api.call(
        reqwest::Method::POST,
        &format!("/v1/services/{SERVICE}/configs:submit"),
        Some(json!({"configSource": {"files": [
            {"fileContents": url_safe(&example()), "filePath": "openapi3.yaml", "fileType": "OPEN_API_YAML"},
            {"fileContents": url_safe(&v2), "filePath": "openapi.yaml", "fileType": "OPEN_API_YAML"}]},
            "validateOnly": false})),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body.to_string().contains("openapi3.yaml:9:10: this file is OpenAPI 3.0.3 but openapi.yaml is OpenAPI 2.0 (swagger: \\\"2.0\\\"); one deployment cannot mix OpenAPI 2.0 and 3.x files"),
        "{body}"
    );

    let op = api.post(
        &format!("/v2/projects/{PROJECT}/locations/global/keys"),
        json!({"displayName": "oas3 e2e"}),
    );
    let key = api.wait_v2(op)["keyString"]
        .as_str()
        .expect("keyString")
        .to_string();
    let (_echo, esp, proxy_port) = echo_and_esp(dir.path(), SERVICE, &key_file, &[]);

    let message = r#"{"message":"hello from 3.x"}"#;
    let (status, body) = post(proxy_port, "/echo", message);
    assert_eq!(status, 401, "{body}\nesp log:\n{}", esp.log());
    assert!(body.contains("Please use API Key"), "{body}");
    let (status, body) = post(proxy_port, &format!("/echo?key={key}"), message);
    assert_eq!(status, 200, "{body}\nesp log:\n{}", esp.log());
    let echoed: serde_json::Value = serde_json::from_str(&body).expect("json echo");
    assert_eq!(echoed["message"], "hello from 3.x", "{body}");

    // The JWT methods: providers from x-google-auth (issuer, jwksUri, audiences list).
    let (signer, _) = api.create_key(&sa_email);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let jwt = |aud: &str| {
        signer
            .sign_jwt(
                &json!({"iss": "jwt-client.endpoints.sample.google.com", "sub": sa_email,
                              "aud": aud, "iat": now, "exp": now + 600}),
            )
            .expect("sign")
    };
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let get = |path: &str, token: Option<String>| {
        let mut req = client.get(format!("http://127.0.0.1:{proxy_port}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().expect("GET");
        (resp.status().as_u16(), resp.text().unwrap_or_default())
    };
    let (status, body) = get("/auth/info/googlejwt", None);
    assert_eq!(status, 401, "{body}");
    let (status, body) = get(
        "/auth/info/googlejwt",
        Some(jwt("echo.endpoints.sample.google.com")),
    );
    assert_eq!(status, 200, "{body}\nesp log:\n{}", esp.log());
    // ESP's answer to a token for another audience.
    let (status, body) = get("/auth/info/googlejwt", Some(jwt("someone-else")));
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("JWT validation failed: Audience not allowed"),
        "{body}"
    );
}

#[test]
fn gcloud_528_refuses_an_openapi3_file_before_sending_it() {
    if !gcloud_available("gcloud_528_refuses_an_openapi3_file_before_sending_it") {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(&root.path().join("data"), &Db::Sqlite);
    let g = Gcloud::new(&cp.url, &cp.admin_token_path());
    std::fs::write(root.path().join("openapi3.yaml"), example()).expect("write");
    let out = g.run_in(
        Some(root.path()),
        &["endpoints", "services", "deploy", "openapi3.yaml"],
        Duration::from_secs(180),
    );
    assert!(!out.ok(), "gcloud 528 accepted a 3.x file: {out}");
    assert!(
        out.stderr
            .contains("Unable to parse Open API, or Google Service Configuration specification from openapi3.yaml"),
        "{out}"
    );
    // Nothing reached the control plane: no service was created.
    let services = cp.api().ok(reqwest::Method::GET, "/v1/services", None);
    assert!(!services.to_string().contains(SERVICE), "{services}");
}
