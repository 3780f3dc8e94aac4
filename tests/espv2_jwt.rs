//! End to end, `portico espv2` and JWTs the way ESPv2 treats them (issue 17 item 3), through
//! real processes: the backend receives the token's payload segment as
//! `X-Endpoint-API-UserInfo` (padded with `--jwt_pad_forward_payload_header`); tokens are read
//! from `Authorization: Bearer`, `X-Goog-Iap-Jwt-Assertion` and `?access_token=`; a provider
//! without audiences accepts `https://SERVICE` only, or any audience with
//! `--disable_jwt_audience_service_name_check`.
//!
//! The proxy is the real binary with a service config file; the backend (echoing the headers it
//! received) and the JWKS server are doubles on loopback ports chosen at run time.

mod common;

use common::espv2;
use common::free_port;
use common::peer::{self, Action, Request};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SERVICE: &str = "espv2-jwt.endpoints.e2e-proj.cloud.goog";
const ISSUER: &str = "https://issuer.example";
const AUDIENCE: &str = "e2e-audience";
const KID: &str = "e2e-kid";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

#[test]
fn user_info_locations_and_audiences_are_espv2s() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let g = portico_credentials::generate_rsa_key().expect("keygen");
    let mut jwk = serde_json::to_value(&g.public_jwk).expect("jwk");
    jwk["kid"] = KID.into();
    let jwks_doc = json!({"keys": [jwk]}).to_string();
    let jwks = peer::start(
        &rt,
        Arc::new(move |_: &Request| Action::Respond(200, jwks_doc.clone())),
    );
    let backend = peer::start(&rt, Arc::new(espv2::echo_headers));
    let signing = jsonwebtoken::EncodingKey::from_rsa_pem(g.private_pkcs8_pem.as_bytes())
        .expect("encoding key");
    let sign = |claims: Value| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        h.kid = Some(KID.to_string());
        jsonwebtoken::encode(&h, &claims, &signing).expect("sign")
    };

    let config = dir.path().join("service.json");
    std::fs::write(
        &config,
        json!({
            "name": SERVICE, "id": "2024-01-01r0",
            "apis": [{"name": "e2e.Api", "version": "v1"}],
            "http": {"rules": [
                {"selector": "e2e.Api.Jwt", "get": "/jwt"},
                {"selector": "e2e.Api.Own", "get": "/own"},
            ]},
            "authentication": {
                "providers": [
                    {"id": "p1", "issuer": ISSUER, "jwksUri": format!("http://{jwks}/jwks"), "audiences": AUDIENCE},
                    {"id": "own", "issuer": ISSUER, "jwksUri": format!("http://{jwks}/jwks")},
                ],
                "rules": [
                    {"selector": "e2e.Api.Jwt", "requirements": [{"providerId": "p1"}]},
                    {"selector": "e2e.Api.Own", "requirements": [{"providerId": "own"}]},
                ],
            },
        })
        .to_string(),
    )
    .expect("config");
    let flags = |extra: &[&str]| {
        let mut f = vec![
            format!("--service_json_path={}", config.display()),
            format!("--backend=http://{backend}"),
            "--skip_service_control_filter".to_string(),
            // A metadata server nobody asks: no method here needs a token of the proxy's own.
            format!("--metadata_url=http://127.0.0.1:{}", free_port()),
        ];
        f.extend(extra.iter().map(|s| s.to_string()));
        f
    };
    let (proxy, port) = espv2::start(dir.path(), "espv2", &flags(&[]));
    let (padded_proxy, padded_port) = espv2::start(
        dir.path(),
        "espv2-padded",
        &flags(&[
            "--jwt_pad_forward_payload_header",
            "--disable_jwt_audience_service_name_check",
        ]),
    );
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let get = |port: u16, path: &str, headers: &[(&str, &str)]| {
        let mut r = client.get(format!("http://127.0.0.1:{port}{path}"));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let resp = r.send().expect("request");
        (resp.status().as_u16(), resp.text().expect("body"))
    };

    // A payload whose base64url length is not a multiple of 4, so padding shows.
    let mut claims = json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "user", "exp": now() + 3600});
    let token = loop {
        let t = sign(claims.clone());
        if t.split('.').nth(1).map(str::len).unwrap_or(0) % 4 != 0 {
            break t;
        }
        claims["pad"] = format!("{}x", claims["pad"].as_str().unwrap_or("")).into();
    };
    let segment = token.split('.').nth(1).expect("payload").to_string();
    let bearer = format!("Bearer {token}");

    // X-Endpoint-API-UserInfo is the payload segment as sent; the client's copy never passes.
    let (status, body) = get(
        port,
        "/jwt",
        &[
            ("authorization", &bearer),
            ("x-endpoint-api-userinfo", "forged"),
        ],
    );
    assert_eq!(status, 200, "{body}\n{}", proxy.log());
    let seen: Value = serde_json::from_str(&body).expect("echo");
    assert_eq!(seen["x-endpoint-api-userinfo"], segment.as_str());
    assert_eq!(seen["authorization"], bearer.as_str());
    // Padded under --jwt_pad_forward_payload_header.
    let (status, body) = get(padded_port, "/jwt", &[("authorization", &bearer)]);
    assert_eq!(status, 200, "{body}\n{}", padded_proxy.log());
    let seen: Value = serde_json::from_str(&body).expect("echo");
    let want = format!("{segment}{}", "=".repeat(4 - segment.len() % 4));
    assert_eq!(seen["x-endpoint-api-userinfo"], want.as_str());

    // Where tokens are read.
    let missing = (
        401,
        "{\"code\":401,\"message\":\"Jwt is missing\"}\n".to_string(),
    );
    let iap = get(port, "/jwt", &[("x-goog-iap-jwt-assertion", &token)]);
    assert_eq!(iap.0, 200, "{}", iap.1);
    let query = get(port, &format!("/jwt?access_token={token}"), &[]);
    assert_eq!(query.0, 200, "{}", query.1);
    assert_eq!(get(port, "/jwt", &[("authorization", &token)]), missing);
    assert_eq!(
        get(port, &format!("/jwt?ACCESS_TOKEN={token}"), &[]),
        missing
    );

    // Audiences: the provider's own list excludes the service's name ...
    let to = |aud: &str| {
        format!(
            "Bearer {}",
            sign(json!({"iss": ISSUER, "aud": aud, "exp": now() + 3600}))
        )
    };
    let forbidden = (
        403,
        "{\"code\":403,\"message\":\"Audiences in Jwt are not allowed\"}\n".to_string(),
    );
    let service_aud = to(&format!("https://{SERVICE}"));
    assert_eq!(
        get(port, "/jwt", &[("authorization", &service_aud)]),
        forbidden
    );
    // ... a provider without audiences accepts exactly https://SERVICE ...
    assert_eq!(get(port, "/own", &[("authorization", &service_aud)]).0, 200);
    assert_eq!(
        get(port, "/own", &[("authorization", &to("someone-else"))]),
        forbidden
    );
    // ... or, with --disable_jwt_audience_service_name_check, any audience.
    assert_eq!(
        get(
            padded_port,
            "/own",
            &[("authorization", &to("someone-else"))]
        )
        .0,
        200
    );
    drop(rt);
}
