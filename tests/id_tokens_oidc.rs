//! ID tokens from the control plane, checked by a real OpenID library: a service account's
//! JWT-bearer grant with `target_audience` (what Google's client libraries send to get an ID
//! token) returns an `id_token`, which Debian's PyJWT verifies the way a backend would — from
//! the issuer's discovery document to its `jwks_uri` to the key named by `kid` — with the
//! audience and issuer pinned. `portico control-plane` runs as a real process.

mod common;

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{ControlPlane, Db};
use serde_json::{json, Value};

const PROJECT: &str = "oidc-proj";
const AUDIENCE: &str = "https://backend.oidc.test/run";

/// Debian's Python with PyJWT (`python3-jwt`), or `None` after a loud skip (a failure on CI).
fn pyjwt_python(test: &str) -> Option<&'static str> {
    let python = "/usr/bin/python3";
    let ok = Command::new(python)
        .args(["-c", "import jwt, cryptography; jwt.PyJWKClient"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: /usr/bin/python3 with PyJWT (python3-jwt) is required on CI");
    }
    eprintln!(
        "SKIPPED: {test}: /usr/bin/python3 with PyJWT (apt-get install python3-jwt) is absent"
    );
    None
}

/// Verifies `token` with PyJWT through discovery; prints the claims as JSON, or fails.
const VERIFY: &str = r#"
import json, sys, urllib.request
import jwt
issuer, audience, token = sys.argv[1], sys.argv[2], sys.stdin.read().strip()
doc = json.load(urllib.request.urlopen(issuer + "/.well-known/openid-configuration"))
assert doc["issuer"] == issuer, doc
key = jwt.PyJWKClient(doc["jwks_uri"]).get_signing_key_from_jwt(token)
claims = jwt.decode(token, key.key, algorithms=doc["id_token_signing_alg_values_supported"],
                    audience=audience, issuer=issuer)
print(json.dumps(claims))
"#;

fn pyjwt_verify(python: &str, issuer: &str, audience: &str, token: &str) -> Result<Value, String> {
    use std::io::Write as _;
    let mut child = Command::new(python)
        .args(["-c", VERIFY, issuer, audience])
        .env("NO_PROXY", "*")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(token.as_bytes())
        .expect("write token");
    let out = child.wait_with_output().expect("python output");
    if out.status.success() {
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn pyjwt_verifies_an_id_token_through_discovery() {
    let test = "pyjwt_verifies_an_id_token_through_discovery";
    let Some(python) = pyjwt_python(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path(), &Db::Sqlite);
    let api = cp.api();
    let email = format!("runner@{PROJECT}.iam.gserviceaccount.com");
    api.post(
        &format!("/v1/projects/{PROJECT}/serviceAccounts"),
        json!({"accountId": "runner"}),
    );
    let (key, _) = api.create_key(&email);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let assertion = key
        .sign_jwt(
            &json!({"iss": email, "aud": key.token_uri, "target_audience": AUDIENCE,
            "iat": now, "exp": now + 600}),
        )
        .expect("assertion");
    let resp = reqwest::blocking::Client::new()
        .post(format!("{}/token", cp.url))
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion.as_str()),
        ])
        .send()
        .expect("token call");
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().expect("json");
    let id_token = body["id_token"].as_str().expect("id_token");

    let claims = pyjwt_verify(python, &cp.url, AUDIENCE, id_token)
        .unwrap_or_else(|e| panic!("PyJWT refused the ID token: {e}\n{}", cp.log()));
    assert_eq!(claims["email"], email.as_str());
    assert_eq!(claims["aud"], AUDIENCE);
    assert_eq!(claims["iss"], cp.url.as_str());

    // The same library refuses it for another audience, and refuses a token whose signature
    // was tampered with: the check is real.
    let err = pyjwt_verify(python, &cp.url, "https://elsewhere.test", id_token)
        .expect_err("wrong audience must fail");
    assert!(err.contains("InvalidAudienceError"), "{err}");
    let mut parts: Vec<String> = id_token.split('.').map(str::to_string).collect();
    let sig = parts[2].clone();
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    parts[2] = format!("{flipped}{}", &sig[1..]);
    let err = pyjwt_verify(python, &cp.url, AUDIENCE, &parts.join("."))
        .expect_err("tampered token must fail");
    assert!(err.contains("InvalidSignatureError"), "{err}");
}
