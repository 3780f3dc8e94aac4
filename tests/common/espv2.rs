//! What the `portico espv2` end-to-end tests share: starting the real binary on a port chosen
//! at run time, a throw-away service-account key file, ESPv2's error body, and a backend that
//! echoes the headers it received.

use super::peer::{Action, Request};
use super::{free_port, Proc};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// `portico espv2 --listener_port=PORT FLAGS...`, logging to `DIR/NAME.log`, once it listens.
pub fn start<S: AsRef<str>>(dir: &Path, name: &str, flags: &[S]) -> (Proc, u16) {
    let port = free_port();
    let mut args = vec!["espv2".to_string(), format!("--listener_port={port}")];
    args.extend(flags.iter().map(|f| f.as_ref().to_string()));
    let mut p = Proc::spawn(&args, &dir.join(format!("{name}.log")));
    p.wait_for_port(port, name);
    (p, port)
}

/// A key file whose `token_uri` points at a closed port: enough for a proxy that signs its own
/// Service Control tokens and never needs one from the issuer.
pub fn service_account_key(dir: &Path) -> PathBuf {
    let g = portico_credentials::generate_rsa_key().expect("keygen");
    let path = dir.join("key.json");
    let key = json!({
        "type": "service_account", "project_id": "e2e-proj", "private_key_id": g.key_id,
        "private_key": g.private_pkcs8_pem, "client_email": "proxy@e2e-proj.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": format!("http://127.0.0.1:{}/token", free_port()),
    });
    std::fs::write(&path, key.to_string()).expect("key file");
    path
}

/// ESPv2's error body, byte for byte: one line of JSON and a newline.
pub fn body(status: u16, message: &str) -> String {
    format!(
        "{{\"code\":{status},\"message\":{}}}\n",
        serde_json::to_string(message).expect("json")
    )
}

/// A backend answering 200 with the request's headers as a JSON object.
pub fn echo_headers(req: &Request) -> Action {
    let headers: serde_json::Map<String, Value> = req
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    Action::Respond(200, Value::Object(headers).to_string())
}

/// Like [`start`], with `RUST_LOG` as given (`None`: unset, so the proxy's own default
/// applies).
pub fn start_with_rust_log<S: AsRef<str>>(
    dir: &Path,
    name: &str,
    flags: &[S],
    rust_log: Option<&str>,
) -> (Proc, u16) {
    let port = free_port();
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).expect("log file");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_portico"));
    cmd.arg("espv2")
        .arg(format!("--listener_port={port}"))
        .args(flags.iter().map(|f| f.as_ref()))
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().expect("log fd"))
        .stderr(out);
    match rust_log {
        Some(v) => cmd.env("RUST_LOG", v),
        None => cmd.env_remove("RUST_LOG"),
    };
    let child = cmd.spawn().expect("spawn portico");
    let mut p = Proc { child, log };
    p.wait_for_port(port, name);
    (p, port)
}

/// An RSA signing key for test JWTs and its public JWK (with `kid`), for a JWKS double.
pub struct Signer {
    pub key: jsonwebtoken::EncodingKey,
    pub jwk: Value,
}

pub fn signer(kid: &str) -> Signer {
    let g = portico_credentials::generate_rsa_key().expect("keygen");
    let mut jwk = serde_json::to_value(&g.public_jwk).expect("jwk");
    jwk["kid"] = kid.into();
    Signer {
        key: jsonwebtoken::EncodingKey::from_rsa_pem(g.private_pkcs8_pem.as_bytes())
            .expect("encoding key"),
        jwk,
    }
}
