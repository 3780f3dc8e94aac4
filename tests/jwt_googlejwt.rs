//! End to end: the getting-started `/auth/info/googlejwt` through `portico esp`, with a JWT
//! signed by a Portico service-account key and verified against the public keys that the
//! Portico control plane publishes (`/service_accounts/v1/jwk/{email}` and the X.509 map at
//! `/robot/v1/metadata/x509/{email}`), answered by `portico echo`, which decodes the
//! `X-Endpoint-API-UserInfo` the proxy made.
//!
//! Everything is a real process of the `portico` binary on loopback ports chosen at run time;
//! the service is deployed over the control plane's REST API exactly as gcloud would.

mod common;

use common::{free_port, Api, ControlPlane, Db, Proc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Value};

const PROJECT: &str = "demo-proj";
const SERVICE: &str = "echo-api.endpoints.demo-proj.cloud.goog";
const SA_ID: &str = "jwt-client";
const SAMPLE_AUD: &str = "echo.endpoints.sample.google.com";
const SAMPLE_ISS: &str = "jwt-client.endpoints.sample.google.com";

/// The repo's getting-started spec with its placeholders filled in for this run, its key URLs
/// pointing at the Portico control plane instead of Google's.
fn sample_openapi(sa_email: &str, control_plane: &str) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/echo/openapi.yaml"
    ))
    .expect("examples/echo/openapi.yaml");
    let filled = text
        .replace("https://www.googleapis.com/", &format!("{control_plane}/"))
        .replace("YOUR-SERVICE-ACCOUNT-EMAIL", sa_email)
        .replace("YOUR-CLIENT-PROJECT-ID", PROJECT)
        .replace("YOUR-PROJECT-ID", PROJECT)
        .replace("YOUR-CLIENT-ID", "demo-client");
    assert!(
        filled.contains(&format!(
            "{control_plane}/service_accounts/v1/jwk/{sa_email}"
        )),
        "the sample no longer names the JWKS URL this test relies on"
    );
    filled
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn esp_body(code: i32, message: &str) -> String {
    format!(
        "{{\n \"code\": {code},\n \"message\": \"{message}\",\n \"details\": [\n  {{\n   \"@type\": \"type.googleapis.com/google.rpc.DebugInfo\",\n   \"stackEntries\": [],\n   \"detail\": \"auth\"\n  }}\n ]\n}}\n"
    )
}

#[test]
fn googlejwt_signed_by_a_portico_service_account_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control_plane = ControlPlane::start(dir.path(), &Db::Sqlite);
    let cp = control_plane.url.clone();
    let token = std::fs::read_to_string(dir.path().join("admin-token")).expect("admin token");
    let api = Api::new(&cp, &token);

    // Identity: the account, a key for the proxy, and a second key that signs client JWTs.
    let sa_email = format!("{SA_ID}@{PROJECT}.iam.gserviceaccount.com");
    api.post(
        &format!("/v1/projects/{PROJECT}/serviceAccounts"),
        json!({"accountId": SA_ID, "serviceAccount": {"displayName": "jwt e2e"}}),
    );
    let (_, proxy_key_text) = api.create_key(&sa_email);
    let (signer, _) = api.create_key(&sa_email);
    let key_file = dir.path().join("proxy-key.json");
    std::fs::write(&key_file, proxy_key_text).expect("write key file");

    // The published key sets name both keys.
    let jwks = api.ok(
        reqwest::Method::GET,
        &format!("/service_accounts/v1/jwk/{sa_email}"),
        None,
    );
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert_eq!(kids.len(), 2, "{jwks}");
    assert!(kids.contains(&signer.private_key_id.as_str()));
    let x509 = api.ok(
        reqwest::Method::GET,
        &format!("/robot/v1/metadata/x509/{sa_email}"),
        None,
    );
    assert!(x509[&signer.private_key_id]
        .as_str()
        .is_some_and(|p| p.starts_with("-----BEGIN CERTIFICATE-----")));

    // Service Management: create, submit the sample, roll out, enable; the proxy's binding.
    let openapi = sample_openapi(&sa_email, &cp);
    api.deploy(SERVICE, PROJECT, &openapi, &sa_email);
    api.enable(PROJECT, SERVICE);

    // The sample backend and the proxy (managed rollout, short JWKS TTL to see key deletion).
    let echo_port = free_port();
    let mut echo = Proc::spawn(
        &["echo".into(), "--port".into(), echo_port.to_string()],
        &dir.path().join("echo.log"),
    );
    echo.wait_for_port(echo_port, "portico echo");
    let proxy_port = free_port();
    let mut esp = Proc::spawn(
        &[
            "esp".into(),
            format!("--service={SERVICE}"),
            "--rollout_strategy=managed".into(),
            format!("--http_port={proxy_port}"),
            format!("--status_port={}", free_port()),
            format!("--backend=127.0.0.1:{echo_port}"),
            format!("--service_account_key={}", key_file.display()),
            "--jwks_cache_duration_in_s=1".into(),
        ],
        &dir.path().join("esp.log"),
    );
    esp.wait_for_port(proxy_port, "portico esp");

    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .no_proxy()
        .build()
        .expect("client");
    let url = format!("http://127.0.0.1:{proxy_port}/auth/info/googlejwt");
    let get = |bearer: Option<&str>| {
        let mut req = client.get(&url);
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .unwrap_or_else(|e| panic!("GET {url}: {e}; esp log:\n{}", esp.log()));
        let status = resp.status().as_u16();
        let www = resp
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        (status, resp.text().unwrap_or_default(), www)
    };

    // No token: ESP's 401.
    let (status, body, www) = get(None);
    assert_eq!(status, 401, "{body}\nesp log:\n{}", esp.log());
    assert_eq!(
        body,
        esp_body(16, "JWT validation failed: Missing or invalid credentials")
    );
    assert_eq!(www.as_deref(), Some("Bearer"));

    // A client JWT for the sample's google_jwt provider (JWKS from the control plane).
    let mut serial = 0u64;
    let mut mint = |iss: &str, aud: &str| {
        serial += 1;
        let t = now();
        signer
            .sign_jwt(
                &json!({"iss": iss, "sub": sa_email, "aud": aud, "email": sa_email,
                              "iat": t, "exp": t + 600, "jti": format!("e2e-{serial}")}),
            )
            .expect("sign")
    };
    let jwt = mint(SAMPLE_ISS, SAMPLE_AUD);
    let (status, body, _) = get(Some(&jwt));
    assert_eq!(status, 200, "{body}\nesp log:\n{}", esp.log());
    // Echo decoded the proxy's header; it must be ESP's user info for exactly this token.
    let payload_json = String::from_utf8(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(jwt.split('.').nth(1).expect("payload"))
            .expect("payload base64"),
    )
    .expect("payload utf-8");
    let info: Value = serde_json::from_str(&body).expect("echo answers JSON");
    assert_eq!(
        info,
        json!({"claims": payload_json, "issuer": SAMPLE_ISS, "id": sa_email, "email": sa_email,
               "audiences": [SAMPLE_AUD]}),
    );

    // The google_service_account provider: issuer = the account, keys from the X.509 map.
    let (status, body, _) = get(Some(&mint(&sa_email, SAMPLE_AUD)));
    assert_eq!(status, 200, "{body}");

    // Wrong audience: 403.
    let (status, body, www) = get(Some(&mint(SAMPLE_ISS, "someone-else")));
    assert_eq!(status, 403);
    assert_eq!(
        body,
        esp_body(7, "JWT validation failed: Audience not allowed")
    );
    assert_eq!(www.as_deref(), Some("Bearer, error=\"invalid_token\""));

    // Deleting the signing key revokes it for new tokens once the proxy's keys refresh.
    api.ok(
        reqwest::Method::DELETE,
        &format!(
            "/v1/projects/-/serviceAccounts/{sa_email}/keys/{}",
            signer.private_key_id
        ),
        None,
    );
    let expected = esp_body(
        16,
        &format!(
            "JWT validation failed: Cannot find matching key in key set for kid={}",
            signer.private_key_id
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body, _) = get(Some(&mint(SAMPLE_ISS, SAMPLE_AUD)));
        if status == 401 && body == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "deleted key still accepted after 20 s: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
