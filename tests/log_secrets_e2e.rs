//! End to end: credentials in request URLs never reach the stored request logs (read back
//! through `/portico/v1/services/S/logs`), the proxy's access log or either process's own log.
//!
//! Real processes of the `portico` binary on loopback ports chosen at run time: the control
//! plane, `portico echo` as the backend and `portico esp` (managed rollout) in front of it. The
//! service reads its API key from a custom query parameter (`mykey`) and its JWTs from another
//! (`jwt_q`); requests are written byte for byte on raw sockets so that every spelling reaches
//! the proxy as sent: ESP's default names in other cases, percent-encoded names, `;`
//! separators, repeated parameters, the custom names, a valid key and valid JWTs, an unknown
//! path (whose log message quotes the URL) and a referer carrying a key.

mod common;

use common::{free_port, ControlPlane, Db, Proc};
use std::io::{Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

const PROJECT: &str = "secrets-proj";
const SERVICE: &str = "secrets-api.endpoints.secrets-proj.cloud.goog";
const ISSUER: &str = "secrets-issuer";
const AUDIENCE: &str = "secrets-aud";

fn openapi(control_plane: &str, sa_email: &str) -> String {
    format!(
        r#"swagger: "2.0"
info: {{title: Secrets, version: 1.0.0}}
host: "{SERVICE}"
paths:
  /echo:
    post:
      operationId: echo
      responses: {{"200": {{description: ok}}}}
      security: [{{mykey: []}}]
  /auth/info/googlejwt:
    get:
      operationId: authInfo
      responses: {{"200": {{description: ok}}}}
      security: [{{jwt: []}}]
securityDefinitions:
  mykey: {{type: apiKey, name: mykey, in: query}}
  jwt:
    type: oauth2
    flow: implicit
    authorizationUrl: ""
    x-google-issuer: "{ISSUER}"
    x-google-jwks_uri: "{control_plane}/service_accounts/v1/jwk/{sa_email}"
    x-google-audiences: "{AUDIENCE}"
    x-google-jwt-locations:
      - query: jwt_q
"#
    )
}

/// Sends one request as written and returns the status code.
fn send_raw(port: u16, method: &str, target: &str, extra: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let body = if method == "POST" {
        r#"{"message":"hi"}"#
    } else {
        ""
    };
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {target}: no status in {text:?}"))
}

#[test]
fn no_secret_in_stored_logs_access_log_or_process_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control_plane = ControlPlane::start(&dir.path().join("cp"), &Db::Sqlite);
    let cp = control_plane.url.clone();
    let api = control_plane.api();

    // The proxy's identity and a key that signs client JWTs.
    let sa_email = format!("secrets-proxy@{PROJECT}.iam.gserviceaccount.com");
    api.post(
        &format!("/v1/projects/{PROJECT}/serviceAccounts"),
        json!({"accountId": "secrets-proxy", "serviceAccount": {"displayName": "secrets e2e"}}),
    );
    let (_, proxy_key_text) = api.create_key(&sa_email);
    let (signer, _) = api.create_key(&sa_email);
    let key_file = dir.path().join("proxy-key.json");
    std::fs::write(&key_file, proxy_key_text).expect("write key file");

    // The service, its config, rollout, enablement and the proxy's binding.
    api.deploy(SERVICE, PROJECT, &openapi(&cp, &sa_email), &sa_email);
    api.enable(PROJECT, SERVICE);
    let op = api.post(
        &format!("/v2/projects/{PROJECT}/locations/global/keys"),
        json!({"displayName": "secrets e2e"}),
    );
    let valid_key = api.wait_v2(op)["keyString"]
        .as_str()
        .expect("keyString")
        .to_string();

    let echo_port = free_port();
    let mut echo = Proc::spawn(
        &["echo".into(), "--port".into(), echo_port.to_string()],
        &dir.path().join("echo.log"),
    );
    echo.wait_for_port(echo_port, "portico echo");
    let proxy_port = free_port();
    let access_log = dir.path().join("access.log");
    let mut esp = Proc::spawn(
        &[
            "esp".into(),
            format!("--service={SERVICE}"),
            "--rollout_strategy=managed".into(),
            format!("--http_port={proxy_port}"),
            format!("--status_port={}", free_port()),
            format!("--backend=127.0.0.1:{echo_port}"),
            format!("--service_account_key={}", key_file.display()),
            format!("--access_log={}", access_log.display()),
        ],
        &dir.path().join("esp.log"),
    );
    esp.wait_for_port(proxy_port, "portico esp");

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let jwt = |n: u64| {
        signer
            .sign_jwt(&json!({"iss": ISSUER, "sub": sa_email, "aud": AUDIENCE,
                              "iat": now, "exp": now + 600, "jti": format!("e2e-{n}")}))
            .expect("sign")
    };
    let fake = |i: usize| format!("AIzaFAKE{i:02}-0123456789abcdefghijklmnopq");
    let (jwt1, jwt2, jwt3) = (jwt(1), jwt(2), jwt(3));
    // (method, target, extra header lines, expected status)
    let requests: Vec<(&str, String, String, u16)> = vec![
        (
            "POST",
            format!("/echo?mykey={valid_key}"),
            String::new(),
            200,
        ),
        (
            "POST",
            format!("/echo?MyKey={}", fake(1)),
            String::new(),
            400,
        ),
        ("POST", format!("/echo?key={}", fake(2)), String::new(), 401),
        ("POST", format!("/echo?KEY={}", fake(3)), String::new(), 401),
        (
            "POST",
            format!("/echo?Api_Key={}", fake(4)),
            String::new(),
            401,
        ),
        (
            "POST",
            format!("/echo?access_token={}", fake(5)),
            String::new(),
            401,
        ),
        (
            "POST",
            format!("/echo?%6Bey={}", fake(6)),
            String::new(),
            401,
        ),
        (
            "POST",
            format!("/echo?x=1;key={}", fake(7)),
            String::new(),
            401,
        ),
        (
            "POST",
            format!("/echo?key={}&key={}", fake(8), fake(9)),
            String::new(),
            401,
        ),
        (
            "GET",
            format!("/auth/info/googlejwt?jwt_q={jwt1}"),
            String::new(),
            200,
        ),
        (
            "GET",
            format!("/auth/info/googlejwt?access_token={jwt2}"),
            String::new(),
            401,
        ),
        (
            "GET",
            format!("/nope?api.key={}", fake(10)),
            String::new(),
            404,
        ),
        (
            "GET",
            format!("/auth/info/googlejwt?JWT_Q={jwt3}"),
            format!("Referer: https://app.example/page?key={}\r\n", fake(11)),
            200,
        ),
    ];
    for (method, target, extra, want) in &requests {
        let got = send_raw(proxy_port, method, target, extra);
        assert_eq!(got, *want, "{method} {target}; esp log:\n{}", esp.log());
    }
    // Everything but the last four characters of each credential is secret.
    let mut secrets: Vec<String> = (1..=11).map(fake).collect();
    secrets.extend([valid_key.clone(), jwt1, jwt2, jwt3]);
    let needles: Vec<String> = secrets
        .iter()
        .map(|s| s[..s.len() - 4].to_string())
        .collect();

    // The proxy reports about once a second: wait (bounded) until every request is stored.
    let logs_path = format!("/portico/v1/services/{SERVICE}/logs?since=1h&pageSize=100");
    let deadline = Instant::now() + Duration::from_secs(30);
    let logs = loop {
        let logs = api.ok(reqwest::Method::GET, &logs_path, None);
        let n = logs["entries"].as_array().map_or(0, Vec::len);
        if n >= requests.len() {
            break logs;
        }
        assert!(
            Instant::now() < deadline,
            "{n} of {} requests stored: {logs}\nesp log:\n{}",
            requests.len(),
            esp.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        logs["entries"].as_array().map_or(0, Vec::len),
        requests.len(),
        "{logs}"
    );
    let stored = logs.to_string();
    let access = std::fs::read_to_string(&access_log).expect("access log");
    assert_eq!(access.lines().count(), requests.len(), "{access}");
    let sinks = [
        ("stored logs", stored.clone()),
        ("access log", access.clone()),
        ("proxy's log", esp.log()),
        ("control plane's log", control_plane.log()),
        ("backend's log", echo.log()),
    ];
    for (what, text) in &sinks {
        for (s, needle) in secrets.iter().zip(&needles) {
            assert!(
                !text.contains(needle.as_str()),
                "{s} in the {what}:\n{text}"
            );
        }
    }
    // The masked values keep the parameter names and their last four characters.
    let tail = &valid_key[valid_key.len() - 4..];
    assert!(stored.contains(&format!("/echo?mykey=…{tail}")), "{stored}");
    assert!(access.contains(&format!("/echo?mykey=…{tail}")), "{access}");
    assert!(stored.contains("/echo?%6Bey=…nopq"), "{stored}");
}
