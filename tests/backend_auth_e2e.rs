//! Backend authentication end to end: a method whose `x-google-backend` names a `jwt_audience`
//! reaches its backend with `Authorization: Bearer <ID token>` — minted by the control plane for
//! the proxy's service account and verifiable through the control plane's OpenID discovery —
//! and the client's `Authorization` as `X-Forwarded-Authorization`; a method with
//! `disable_auth: true` reaches it with the client's header untouched. A client's own
//! `X-Forwarded-Authorization` never reaches the backend of an authenticated rule.
//!
//! Real processes on loopback ports chosen at run time: `portico control-plane`, `portico esp`
//! (managed rollout, `--enable_backend_routing`) and a recording backend in this test.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

use common::{free_port, ControlPlane, Db, Proc};
use serde_json::{json, Value};

const PROJECT: &str = "backend-auth-proj";
const SERVICE: &str = "backend-auth.endpoints.backend-auth-proj.cloud.goog";
const AUDIENCE: &str = "https://private-backend.test";
const OTHER_AUDIENCE: &str = "https://other-backend.test";

fn openapi(backend: &str) -> String {
    format!(
        r#"swagger: "2.0"
info: {{title: BackendAuth, version: 1.0.0}}
host: "{SERVICE}"
paths:
  /private:
    get:
      operationId: private
      responses: {{"200": {{description: ok}}}}
      x-google-backend:
        address: "{backend}/private"
        jwt_audience: "{AUDIENCE}"
  /other:
    get:
      operationId: other
      responses: {{"200": {{description: ok}}}}
      x-google-backend:
        address: "{backend}/other"
        jwt_audience: "{OTHER_AUDIENCE}"
  /public:
    get:
      operationId: public
      responses: {{"200": {{description: ok}}}}
      x-google-backend:
        address: "{backend}/public"
        disable_auth: true
"#
    )
}

/// A backend that answers every request 200 and sends each request's header lines to the test.
fn recording_backend() -> (u16, mpsc::Receiver<Vec<(String, String)>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut writer = stream;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut headers = Vec::new();
                    let mut length = 0usize;
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end().to_string();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
                            if k == "content-length" {
                                length = v.parse().unwrap_or(0);
                            }
                            headers.push((k, v));
                        }
                    }
                    let mut body = vec![0u8; length];
                    let _ = reader.read_exact(&mut body);
                    let _ = tx.send(headers);
                    let _ = writer.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok",
                    );
                }
            });
        }
    });
    (port, rx)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn jwt_audience_rules_send_an_id_token_and_forward_the_client_header() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(&dir.path().join("cp"), &Db::Sqlite);
    let api = cp.api();
    let sa_email = format!("auth-proxy@{PROJECT}.iam.gserviceaccount.com");
    api.post(
        &format!("/v1/projects/{PROJECT}/serviceAccounts"),
        json!({"accountId": "auth-proxy"}),
    );
    let (_, key_text) = api.create_key(&sa_email);
    let key_file = dir.path().join("proxy-key.json");
    std::fs::write(&key_file, &key_text).expect("key file");

    let (backend_port, seen) = recording_backend();
    api.deploy(
        SERVICE,
        PROJECT,
        &openapi(&format!("http://127.0.0.1:{backend_port}")),
        &sa_email,
    );

    let proxy_port = free_port();
    let mut esp = Proc::spawn(
        &[
            "esp".into(),
            format!("--service={SERVICE}"),
            "--rollout_strategy=managed".into(),
            format!("--http_port={proxy_port}"),
            format!("--status_port={}", free_port()),
            format!("--backend=127.0.0.1:{backend_port}"),
            "--enable_backend_routing".into(),
            format!("--service_account_key={}", key_file.display()),
        ],
        &dir.path().join("esp.log"),
    );
    esp.wait_for_port(proxy_port, "portico esp");
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .no_proxy()
        .build()
        .expect("client");
    let send = |path: &str, extra: &[(&str, &str)]| {
        let mut req = client.get(format!("http://127.0.0.1:{proxy_port}{path}"));
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let resp = req.send().expect("request");
        let status = resp.status().as_u16();
        (status, resp.text().unwrap_or_default())
    };
    let get = |path: &str, extra: &[(&str, &str)]| {
        let (status, body) = send(path, extra);
        assert_eq!(status, 200, "GET {path}: {body}\n{}", esp.log());
        seen.recv_timeout(Duration::from_secs(10))
            .expect("backend saw the request")
    };

    // The authenticated rule: an ID token for the audience, the client's header forwarded.
    let h = get(
        "/private",
        &[
            ("authorization", "Bearer client-token"),
            ("x-forwarded-authorization", "Bearer forged"),
        ],
    );
    let auth = header(&h, "authorization");
    assert_eq!(auth.len(), 1, "{h:?}");
    let id_token = auth[0].strip_prefix("Bearer ").expect("bearer");
    assert_eq!(
        header(&h, "x-forwarded-authorization"),
        vec!["Bearer client-token"]
    );
    // Verify as the backend would: the issuer's discovery document, its jwks_uri, the `kid`.
    let doc = api.ok(
        reqwest::Method::GET,
        "/.well-known/openid-configuration",
        None,
    );
    let jwks_path = doc["jwks_uri"]
        .as_str()
        .and_then(|u| u.strip_prefix(cp.url.as_str()))
        .expect("jwks_uri on the control plane")
        .to_string();
    let jwks = api.ok(reqwest::Method::GET, &jwks_path, None);
    let kid = portico_credentials::token_kid(id_token)
        .expect("header")
        .expect("kid");
    let jwk = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("published key")
        .clone();
    let dk = jsonwebtoken::DecodingKey::from_rsa_components(
        jwk["n"].as_str().expect("n"),
        jwk["e"].as_str().expect("e"),
    )
    .expect("key");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[AUDIENCE]);
    validation.set_issuer(&[cp.url.as_str()]);
    let claims: Value = jsonwebtoken::decode(id_token, &dk, &validation)
        .expect("the backend can verify the ID token")
        .claims;
    assert_eq!(claims["email"], sa_email.as_str());

    // Without a client Authorization there is nothing to forward, and no forged copy passes.
    let h = get(
        "/private",
        &[("x-forwarded-authorization", "Bearer forged")],
    );
    assert_eq!(header(&h, "authorization").len(), 1);
    assert!(header(&h, "x-forwarded-authorization").is_empty(), "{h:?}");

    // `disable_auth`: the client's header as sent, nothing added.
    let h = get("/public", &[("authorization", "Bearer client-token")]);
    assert_eq!(header(&h, "authorization"), vec!["Bearer client-token"]);
    assert!(header(&h, "x-forwarded-authorization").is_empty(), "{h:?}");

    // With the issuer gone, a cached token still serves its audience; an audience with no
    // token yet is refused with ESP's 500 and the backend is not called.
    let mut cp = cp;
    cp.stop();
    let h = get("/private", &[]);
    assert_eq!(header(&h, "authorization"), auth);
    let (status, body) = send("/other", &[("authorization", "Bearer client-token")]);
    assert_eq!(status, 500, "{body}");
    let body: Value = serde_json::from_str(&body).expect("JSON error body");
    assert_eq!(body["code"], 13, "{body}");
    assert_eq!(
        body["message"],
        "Failed to fetch an identity token for backend authentication"
    );
    assert!(
        seen.recv_timeout(Duration::from_millis(500)).is_err(),
        "the backend must not be called without its token"
    );
}
