//! The `Authenticator` against real key servers on loopback: every ESP failure message and
//! status, each key format, OpenID discovery, caching and the exact `X-Endpoint-API-UserInfo`.

mod auth_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use auth_common::*;
use base64::engine::general_purpose::URL_SAFE;
use base64::Engine as _;
use http::HeaderMap;
use portico_config::service::Service;
use portico_proxy::auth::{AuthError, AuthOptions, Authenticator, KeyCache, KeyCacheOptions};
use serde_json::json;

const SVC: &str = "echo-api.endpoints.demo-proj.cloud.goog";
const ISS: &str = "https://issuer.example.com";
const AUD: &str = "echo.endpoints.sample.google.com";

fn service(providers: serde_json::Value, rules: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "name": SVC,
        "authentication": { "providers": providers, "rules": rules }
    }))
    .unwrap()
}

fn rule(selector: &str, providers: &[&str]) -> serde_json::Value {
    json!({
        "selector": selector,
        "requirements": providers.iter().map(|p| json!({"providerId": p})).collect::<Vec<_>>()
    })
}

fn cache() -> Arc<KeyCache> {
    KeyCache::new(KeyCacheOptions::default())
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("authorization", format!("Bearer {token}").parse().unwrap());
    h
}

fn claims(iss: &str, aud: serde_json::Value) -> serde_json::Value {
    json!({"iss": iss, "sub": "user-1", "aud": aud, "iat": now(), "exp": now() + 600})
}

struct Fixture {
    server: KeyServer,
    key: TestKey,
    auth: Authenticator,
}

/// One RSA provider serving a JWKS, protecting method `m`.
async fn fixture() -> Fixture {
    let server = KeyServer::start().await;
    let key = TestKey::rsa("k1");
    server.set("/jwks", 200, jwks(&[&key]));
    let svc = service(
        json!([{"id": "p1", "issuer": ISS, "jwksUri": server.url("/jwks"), "audiences": AUD}]),
        json!([rule("m", &["p1"])]),
    );
    let auth = Authenticator::new(&svc, &AuthOptions::default(), cache());
    Fixture { server, key, auth }
}

async fn reject(auth: &Authenticator, headers: &HeaderMap) -> AuthError {
    auth.authenticate("m", headers, None)
        .await
        .expect_err("request should be rejected")
}

fn assert_rejected(e: &AuthError, status: u16, code: i32, message: &str) {
    assert_eq!(e.error.http_status, status, "{e}");
    assert_eq!(e.error.code, code, "{e}");
    assert_eq!(e.error.message, message);
}

#[tokio::test]
async fn missing_token_is_401_with_plain_bearer_challenge() {
    let f = fixture().await;
    let e = reject(&f.auth, &HeaderMap::new()).await;
    assert_rejected(
        &e,
        401,
        16,
        "JWT validation failed: Missing or invalid credentials",
    );
    assert_eq!(e.www_authenticate(), "Bearer");
    assert_eq!(
        e.error.body(),
        "{\n \"code\": 16,\n \"message\": \"JWT validation failed: Missing or invalid credentials\",\n \"details\": [\n  {\n   \"@type\": \"type.googleapis.com/google.rpc.DebugInfo\",\n   \"stackEntries\": [],\n   \"detail\": \"auth\"\n  }\n ]\n}\n"
    );
    assert_eq!(f.server.total_hits(), 0, "no key fetch without a token");
}

#[tokio::test]
async fn methods_without_requirements_pass_untouched() {
    let f = fixture().await;
    let r = f.auth.authenticate("other", &HeaderMap::new(), None).await;
    assert!(matches!(r, Ok(None)));
    assert!(!f.auth.requires_auth("other"));
    assert!(f.auth.requires_auth("m"));
}

#[tokio::test]
async fn malformed_token_is_bad_jwt_format() {
    let f = fixture().await;
    let e = reject(&f.auth, &bearer("not-a-jwt")).await;
    assert_rejected(
        &e,
        401,
        16,
        "JWT validation failed: Bad JWT format: should have 2 dots",
    );
    assert_eq!(e.www_authenticate(), "Bearer, error=\"invalid_token\"");
    let e = reject(&f.auth, &bearer("e30.e30.sig")).await;
    assert_eq!(e.error.message, "JWT validation failed: Missing alg field.");
}

#[tokio::test]
async fn valid_token_passes_and_user_info_is_exact() {
    let f = fixture().await;
    let c = json!({"iss": ISS, "sub": "user-1", "aud": AUD, "email": "u@example.com", "exp": 4102444800i64});
    let token = f.key.sign(&c);
    let info = f
        .auth
        .authenticate("m", &bearer(&token), None)
        .await
        .unwrap()
        .expect("method requires auth");
    let expected = format!(
        "{{\"claims\":\"{{\\\"iss\\\":\\\"{ISS}\\\",\\\"sub\\\":\\\"user-1\\\",\\\"aud\\\":\\\"{AUD}\\\",\\\"email\\\":\\\"u@example.com\\\",\\\"exp\\\":4102444800}}\",\"issuer\":\"{ISS}\",\"id\":\"user-1\",\"email\":\"u@example.com\",\"audiences\":[\"{AUD}\"]}}"
    );
    assert_eq!(info.user_info.to_str().unwrap(), URL_SAFE.encode(&expected));
    assert_eq!(info.issuer, ISS);
    assert_eq!(info.audiences, vec![AUD.to_string()]);
    assert_eq!(
        info.credential_id,
        "jwtauth:issuer=aHR0cHM6Ly9pc3N1ZXIuZXhhbXBsZS5jb20&audience=ZWNoby5lbmRwb2ludHMuc2FtcGxlLmdvb2dsZS5jb20"
    );
}

#[tokio::test]
async fn token_sources_query_and_iap_header() {
    let f = fixture().await;
    let token = f.key.sign(&claims(ISS, AUD.into()));
    let q = format!("x=1&access_token={token}");
    assert!(f
        .auth
        .authenticate("m", &HeaderMap::new(), Some(&q))
        .await
        .unwrap()
        .is_some());
    let mut h = HeaderMap::new();
    h.insert("x-goog-iap-jwt-assertion", token.parse().unwrap());
    h.insert("authorization", "Bearer garbage".parse().unwrap());
    assert!(f.auth.authenticate("m", &h, None).await.unwrap().is_some());
}

#[tokio::test]
async fn bad_signature_is_rejected() {
    let f = fixture().await;
    let other = TestKey::rsa("k1"); // same kid, different key
    let token = other.sign(&claims(ISS, AUD.into()));
    let e = reject(&f.auth, &bearer(&token)).await;
    assert_rejected(
        &e,
        401,
        16,
        "JWT validation failed: JWT signature verification failed.",
    );
    // A tampered payload with the right key's signature fails the same way.
    let good = f.key.sign(&claims(ISS, AUD.into()));
    let parts: Vec<&str> = good.split('.').collect();
    let forged_payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
        claims(ISS, AUD.into())
            .to_string()
            .replace("user-1", "admin"),
    );
    let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    let e = reject(&f.auth, &bearer(&forged)).await;
    assert_eq!(
        e.error.message,
        "JWT validation failed: JWT signature verification failed."
    );
}

#[tokio::test]
async fn unknown_kid_names_the_kid() {
    let f = fixture().await;
    let token = f.key.sign_with_kid("nope", &claims(ISS, AUD.into()));
    let e = reject(&f.auth, &bearer(&token)).await;
    assert_rejected(
        &e,
        401,
        16,
        "JWT validation failed: Cannot find matching key in key set for kid=nope",
    );
    // The fetch was fresh, so the kid miss did not trigger a second (rate-limited) fetch.
    assert_eq!(f.server.hits("/jwks"), 1);
}

#[tokio::test]
async fn unknown_kid_refreshes_keys_after_rotation() {
    let server = KeyServer::start().await;
    let old = TestKey::rsa("old");
    server.set("/jwks", 200, jwks(&[&old]));
    let svc = service(
        json!([{"id": "p1", "issuer": ISS, "jwksUri": server.url("/jwks"), "audiences": AUD}]),
        json!([rule("m", &["p1"])]),
    );
    let keys = KeyCache::new(KeyCacheOptions {
        kid_refresh_interval: Duration::ZERO,
        ..Default::default()
    });
    let auth = Authenticator::new(&svc, &AuthOptions::default(), keys);
    assert!(auth
        .authenticate("m", &bearer(&old.sign(&claims(ISS, AUD.into()))), None)
        .await
        .is_ok());
    let new = TestKey::rsa("new");
    server.set("/jwks", 200, jwks(&[&old, &new]));
    let r = auth
        .authenticate("m", &bearer(&new.sign(&claims(ISS, AUD.into()))), None)
        .await;
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(server.hits("/jwks"), 2);
}

#[tokio::test]
async fn expired_and_not_yet_valid_are_time_constraint_failures() {
    let f = fixture().await;
    let mut c = claims(ISS, AUD.into());
    c["exp"] = (now() - 120).into();
    let e = reject(&f.auth, &bearer(&f.key.sign(&c))).await;
    assert_rejected(
        &e,
        401,
        16,
        "JWT validation failed: TIME_CONSTRAINT_FAILURE",
    );
    // Within the 60 s skew: still accepted.
    c["exp"] = (now() - 20).into();
    assert!(f
        .auth
        .authenticate("m", &bearer(&f.key.sign(&c)), None)
        .await
        .is_ok());
    let mut c = claims(ISS, AUD.into());
    c["nbf"] = (now() + 600).into();
    let e = reject(&f.auth, &bearer(&f.key.sign(&c))).await;
    assert_rejected(
        &e,
        401,
        16,
        "JWT validation failed: TIME_CONSTRAINT_FAILURE",
    );
}

#[tokio::test]
async fn wrong_issuer_is_401() {
    let f = fixture().await;
    let e = reject(
        &f.auth,
        &bearer(&f.key.sign(&claims("https://evil.example", AUD.into()))),
    )
    .await;
    assert_rejected(&e, 401, 16, "JWT validation failed: Issuer not allowed");
    assert_eq!(
        f.server.total_hits(),
        0,
        "issuer is checked before any key fetch"
    );
    // Normalisation: scheme and trailing slash do not matter.
    let ok = f.key.sign(&claims("issuer.example.com/", AUD.into()));
    assert!(f.auth.authenticate("m", &bearer(&ok), None).await.is_ok());
}

#[tokio::test]
async fn wrong_audience_is_403_and_service_name_counts() {
    let f = fixture().await;
    let e = reject(
        &f.auth,
        &bearer(&f.key.sign(&claims(ISS, "someone-else".into()))),
    )
    .await;
    assert_rejected(&e, 403, 7, "JWT validation failed: Audience not allowed");
    assert_eq!(e.www_authenticate(), "Bearer, error=\"invalid_token\"");
    for aud in [
        json!(SVC),
        json!(format!("https://{SVC}/")),
        json!(["x", format!("http://{AUD}")]),
    ] {
        let r = f
            .auth
            .authenticate("m", &bearer(&f.key.sign(&claims(ISS, aud.clone()))), None)
            .await;
        assert!(r.is_ok(), "aud {aud}: {r:?}");
    }
}

#[tokio::test]
async fn provider_audiences_win_over_requirement_audiences() {
    let server = KeyServer::start().await;
    let key = TestKey::rsa("k1");
    server.set("/jwks", 200, jwks(&[&key]));
    let svc = service(
        json!([
            {"id": "with", "issuer": ISS, "jwksUri": server.url("/jwks"), "audiences": "prov-aud"},
        ]),
        json!([{"selector": "m", "requirements": [{"providerId": "with", "audiences": "req-aud"}]}]),
    );
    let auth = Authenticator::new(&svc, &AuthOptions::default(), cache());
    assert!(auth
        .authenticate(
            "m",
            &bearer(&key.sign(&claims(ISS, "prov-aud".into()))),
            None
        )
        .await
        .is_ok());
    let e = reject(&auth, &bearer(&key.sign(&claims(ISS, "req-aud".into())))).await;
    assert_eq!(
        e.error.message,
        "JWT validation failed: Audience not allowed"
    );

    let svc = service(
        json!([{"id": "without", "issuer": ISS, "jwksUri": server.url("/jwks")}]),
        json!([{"selector": "m", "requirements": [{"providerId": "without", "audiences": "req-aud,other"}]}]),
    );
    let auth = Authenticator::new(&svc, &AuthOptions::default(), cache());
    assert!(auth
        .authenticate(
            "m",
            &bearer(&key.sign(&claims(ISS, "req-aud".into()))),
            None
        )
        .await
        .is_ok());
}

#[tokio::test]
async fn unreachable_jwks_is_401_and_does_not_slow_other_providers() {
    let server = KeyServer::start().await;
    let good = TestKey::rsa("g");
    server.set("/good", 200, jwks(&[&good]));
    server.set("/gone", 404, "no");
    let dead = format!("http://127.0.0.1:{}/jwks", dead_port());
    let svc = service(
        json!([
            {"id": "dead", "issuer": "https://dead.example", "jwksUri": dead, "audiences": AUD},
            {"id": "gone", "issuer": "https://gone.example", "jwksUri": server.url("/gone"), "audiences": AUD},
            {"id": "good", "issuer": ISS, "jwksUri": server.url("/good"), "audiences": AUD},
        ]),
        json!([
            rule("dead", &["dead"]),
            rule("gone", &["gone"]),
            rule("good", &["good"])
        ]),
    );
    let auth = Authenticator::new(&svc, &AuthOptions::default(), cache());
    let t = good.sign(&claims("https://dead.example", AUD.into()));
    let e = auth
        .authenticate("dead", &bearer(&t), None)
        .await
        .unwrap_err();
    assert_rejected(
        &e,
        401,
        16,
        "JWT validation failed: Unable to fetch verification key",
    );
    let t = good.sign(&claims("https://gone.example", AUD.into()));
    let e = auth
        .authenticate("gone", &bearer(&t), None)
        .await
        .unwrap_err();
    assert_eq!(
        e.error.message,
        "JWT validation failed: Unable to fetch verification key. HTTP response code: 404"
    );
    let start = Instant::now();
    let t = good.sign(&claims(ISS, AUD.into()));
    assert!(auth.authenticate("good", &bearer(&t), None).await.is_ok());
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "good provider took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn openid_discovery_finds_the_jwks() {
    let server = KeyServer::start().await;
    let key = TestKey::rsa("k1");
    let issuer = format!("http://{}", server.addr);
    server.set(
        "/.well-known/openid-configuration",
        200,
        json!({"issuer": issuer, "jwks_uri": server.url("/certs")}).to_string(),
    );
    server.set("/certs", 200, jwks(&[&key]));
    let svc = service(
        json!([{"id": "oidc", "issuer": issuer, "audiences": AUD}]),
        json!([rule("m", &["oidc"])]),
    );
    let auth = Authenticator::new(&svc, &AuthOptions::default(), cache());
    let r = auth
        .authenticate("m", &bearer(&key.sign(&claims(&issuer, AUD.into()))), None)
        .await;
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(server.hits("/.well-known/openid-configuration"), 1);
    assert_eq!(server.hits("/certs"), 1);
}

#[tokio::test]
async fn openid_discovery_failures_have_esps_messages() {
    let server = KeyServer::start().await;
    let key = TestKey::rsa("k1");
    let issuer = format!("http://{}/noparse", server.addr);
    server.set(
        "/noparse/.well-known/openid-configuration",
        200,
        r#"{"issuer":"x"}"#,
    );
    let unreachable = format!("http://127.0.0.1:{}", dead_port());
    let svc = service(
        json!([
            {"id": "a", "issuer": issuer, "audiences": AUD},
            {"id": "b", "issuer": unreachable, "audiences": AUD},
        ]),
        json!([rule("a", &["a"]), rule("b", &["b"])]),
    );
    let auth = Authenticator::new(&svc, &AuthOptions::default(), cache());
    let t = key.sign(&claims(&issuer, AUD.into()));
    let e = auth.authenticate("a", &bearer(&t), None).await.unwrap_err();
    assert_rejected(
        &e,
        401,
        16,
        "JWT validation failed: Unable to parse URI of the key via OpenID discovery",
    );
    let e = auth.authenticate("a", &bearer(&t), None).await.unwrap_err();
    assert_eq!(
        e.error.message,
        "JWT validation failed: Cannot determine the URI of the key"
    );
    let t = key.sign(&claims(&unreachable, AUD.into()));
    let e = auth.authenticate("b", &bearer(&t), None).await.unwrap_err();
    assert_eq!(
        e.error.message,
        "JWT validation failed: Unable to fetch URI of the key via OpenID discovery"
    );
}

#[tokio::test]
async fn x509_map_ec_jwks_and_hmac_secret_all_verify() {
    let server = KeyServer::start().await;
    let rsa = TestKey::rsa("rsa-cert");
    let ec = TestKey::ec("ec-cert");
    let ec_jwk = TestKey::ec("ec-jwk");
    server.set("/x509", 200, x509_map(&[&rsa, &ec]));
    server.set("/ecjwks", 200, jwks(&[&ec_jwk]));
    // ESP reads an HMAC key as the base64url encoding of the secret.
    server.set("/secret", 200, "dG9wLXNlY3JldC1ieXRlcw");
    let svc = service(
        json!([
            {"id": "x509", "issuer": "x509.example", "jwksUri": server.url("/x509"), "audiences": AUD},
            {"id": "ec", "issuer": "ec.example", "jwksUri": server.url("/ecjwks"), "audiences": AUD},
            {"id": "hs", "issuer": "hs.example", "jwksUri": server.url("/secret"), "audiences": AUD},
        ]),
        json!([rule("m", &["x509", "ec", "hs"])]),
    );
    let auth = Authenticator::new(&svc, &AuthOptions::default(), cache());
    for (name, token) in [
        ("rsa cert", rsa.sign(&claims("x509.example", AUD.into()))),
        ("ec cert", ec.sign(&claims("x509.example", AUD.into()))),
        ("ec jwk", ec_jwk.sign(&claims("ec.example", AUD.into()))),
    ] {
        let r = auth.authenticate("m", &bearer(&token), None).await;
        assert!(r.is_ok(), "{name}: {r:?}");
    }
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims("hs.example", AUD.into()),
        &jsonwebtoken::EncodingKey::from_secret(b"top-secret-bytes"),
    )
    .unwrap();
    assert!(auth.authenticate("m", &bearer(&hs), None).await.is_ok());
    let wrong = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims("hs.example", AUD.into()),
        &jsonwebtoken::EncodingKey::from_secret(b"guess"),
    )
    .unwrap();
    let e = auth
        .authenticate("m", &bearer(&wrong), None)
        .await
        .unwrap_err();
    assert_eq!(
        e.error.message,
        "JWT validation failed: JWT signature verification failed."
    );
    // An RS256 token is never checked against an HMAC secret (algorithm confusion): the body
    // is no public key, as ESP says.
    let confused = rsa.sign(&claims("hs.example", AUD.into()));
    let e = auth
        .authenticate("m", &bearer(&confused), None)
        .await
        .unwrap_err();
    assert_eq!(
        e.error.message,
        "JWT validation failed: Invalid JSON for public key"
    );
}

#[tokio::test]
async fn several_requirements_are_alternatives() {
    let server = KeyServer::start().await;
    let a = TestKey::rsa("a");
    let b = TestKey::ec("b");
    server.set("/a", 200, jwks(&[&a]));
    server.set("/b", 200, jwks(&[&b]));
    let svc = service(
        json!([
            {"id": "pa", "issuer": "a.example", "jwksUri": server.url("/a"), "audiences": AUD},
            {"id": "pb", "issuer": "b.example", "jwksUri": server.url("/b"), "audiences": AUD},
        ]),
        json!([rule("both", &["pa", "pb"]), rule("only_a", &["pa"])]),
    );
    let auth = Authenticator::new(&svc, &AuthOptions::default(), cache());
    let ta = a.sign(&claims("a.example", AUD.into()));
    let tb = b.sign(&claims("b.example", AUD.into()));
    assert!(auth.authenticate("both", &bearer(&ta), None).await.is_ok());
    assert!(auth.authenticate("both", &bearer(&tb), None).await.is_ok());
    assert!(auth
        .authenticate("only_a", &bearer(&ta), None)
        .await
        .is_ok());
    let e = auth
        .authenticate("only_a", &bearer(&tb), None)
        .await
        .unwrap_err();
    assert_eq!(e.error.message, "JWT validation failed: Issuer not allowed");
}

#[tokio::test]
async fn verified_tokens_are_cached_but_rules_still_apply() {
    let server = KeyServer::start().await;
    let key = TestKey::rsa("k1");
    server.set("/jwks", 200, jwks(&[&key]));
    let svc = service(
        json!([
            {"id": "p1", "issuer": ISS, "jwksUri": server.url("/jwks"), "audiences": AUD},
            {"id": "p2", "issuer": ISS, "jwksUri": server.url("/jwks"), "audiences": "other-aud"},
        ]),
        json!([rule("m", &["p1"]), rule("strict", &["p2"])]),
    );
    let keys = KeyCache::new(KeyCacheOptions {
        // Keys expire at once: only the token cache can make the second call fetch-free.
        ttl: Duration::ZERO,
        ..Default::default()
    });
    let auth = Authenticator::new(&svc, &AuthOptions::default(), keys.clone());
    let token = key.sign(&claims(ISS, AUD.into()));
    let first = auth
        .authenticate("m", &bearer(&token), None)
        .await
        .unwrap()
        .unwrap();
    let fetches = keys.fetch_count();
    assert_eq!(fetches, 1);
    let second = auth
        .authenticate("m", &bearer(&token), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(keys.fetch_count(), fetches, "cache hit must not fetch keys");
    assert_eq!(server.hits("/jwks"), 1);
    assert_eq!(first.user_info, second.user_info);
    // Same token, method whose audience does not match: still refused.
    let e = auth
        .authenticate("strict", &bearer(&token), None)
        .await
        .unwrap_err();
    assert_eq!(
        e.error.message,
        "JWT validation failed: Audience not allowed"
    );
}

#[tokio::test]
async fn custom_jwt_locations_and_payload_logging() {
    let server = KeyServer::start().await;
    let key = TestKey::rsa("k1");
    server.set("/jwks", 200, jwks(&[&key]));
    let svc = service(
        json!([{"id": "p1", "issuer": ISS, "jwksUri": server.url("/jwks"), "audiences": AUD,
                "jwtLocations": [{"header": "x-my-jwt", "valuePrefix": "Token "}, {"query": "jwt"}]}]),
        json!([rule("m", &["p1"])]),
    );
    let opts = AuthOptions {
        log_jwt_payload: vec!["sub".into(), "aud".into(), "missing".into()],
        ..Default::default()
    };
    let auth = Authenticator::new(&svc, &opts, cache());
    let token = key.sign(&claims(ISS, AUD.into()));
    let mut h = HeaderMap::new();
    h.insert("x-my-jwt", format!("Token {token}").parse().unwrap());
    let info = auth.authenticate("m", &h, None).await.unwrap().unwrap();
    assert_eq!(info.jwt_payloads, format!("sub=user-1;aud={AUD};"));
    assert!(auth
        .authenticate("m", &HeaderMap::new(), Some(&format!("jwt={token}")))
        .await
        .is_ok());
    // The defaults are not consulted for a provider with its own locations.
    let e = auth
        .authenticate("m", &bearer(&token), None)
        .await
        .unwrap_err();
    assert_eq!(
        e.error.message,
        "JWT validation failed: Missing or invalid credentials"
    );
}

#[tokio::test]
async fn allow_without_credential_lets_anonymous_calls_through() {
    let f = fixture().await;
    let svc = service(
        json!([{"id": "p1", "issuer": ISS, "jwksUri": f.server.url("/jwks"), "audiences": AUD}]),
        json!([{"selector": "m", "allowWithoutCredential": true, "requirements": [{"providerId": "p1"}]}]),
    );
    let auth = Authenticator::new(&svc, &AuthOptions::default(), cache());
    assert!(matches!(
        auth.authenticate("m", &HeaderMap::new(), None).await,
        Ok(None)
    ));
    let e = auth
        .authenticate("m", &bearer("x.y.z"), None)
        .await
        .unwrap_err();
    assert!(e
        .error
        .message
        .starts_with("JWT validation failed: Bad JWT format"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_jwks_times_out_and_does_not_block_other_providers() {
    // Accepts connections and never answers.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_addr = hang.local_addr().unwrap();
    let hang_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = hang.accept().await {
            held.push(sock);
        }
    });
    let server = KeyServer::start().await;
    let good = TestKey::rsa("g");
    server.set("/good", 200, jwks(&[&good]));
    let svc = service(
        json!([
            {"id": "hang", "issuer": "https://hang.example", "jwksUri": format!("http://{hang_addr}/jwks"), "audiences": AUD},
            {"id": "good", "issuer": ISS, "jwksUri": server.url("/good"), "audiences": AUD},
        ]),
        json!([rule("hang", &["hang"]), rule("good", &["good"])]),
    );
    let keys = KeyCache::new(KeyCacheOptions {
        fetch_timeout: Duration::from_millis(800),
        ..Default::default()
    });
    let auth = Arc::new(Authenticator::new(&svc, &AuthOptions::default(), keys));
    let slow = {
        let auth = auth.clone();
        let t = good.sign(&claims("https://hang.example", AUD.into()));
        tokio::spawn(async move {
            let start = Instant::now();
            let r = auth.authenticate("hang", &bearer(&t), None).await;
            (r, start.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    let t = good.sign(&claims(ISS, AUD.into()));
    assert!(auth.authenticate("good", &bearer(&t), None).await.is_ok());
    assert!(
        start.elapsed() < Duration::from_millis(700),
        "good provider waited on the hanging one: {:?}",
        start.elapsed()
    );
    let (r, took) = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the hanging fetch must time out")
        .unwrap();
    assert_eq!(
        r.unwrap_err().error.message,
        "JWT validation failed: Unable to fetch verification key"
    );
    assert!(
        took < Duration::from_secs(5),
        "fetch timeout not applied: {took:?}"
    );
    hang_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_requests_share_one_fetch() {
    let f = fixture().await;
    let auth = Arc::new(f.auth);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let auth = auth.clone();
        // Distinct tokens, so the verified-token cache cannot be what saves the fetches.
        let mut c = claims(ISS, AUD.into());
        c["jti"] = format!("t{i}").into();
        let t = f.key.sign(&c);
        tasks.push(tokio::spawn(async move {
            auth.authenticate("m", &bearer(&t), None)
                .await
                .map(|i| i.is_some())
        }));
    }
    for t in tasks {
        assert!(matches!(t.await.unwrap(), Ok(true)));
    }
    assert_eq!(f.server.hits("/jwks"), 1);
}

#[tokio::test]
async fn checks_run_in_esps_order() {
    let f = fixture().await;
    // Expired with a foreign issuer: the time window is judged first, before any key fetch.
    let mut c = claims("https://evil.example", "nobody".into());
    c["exp"] = (now() - 3600).into();
    let e = reject(&f.auth, &bearer(&f.key.sign(&c))).await;
    assert_eq!(
        e.error.message,
        "JWT validation failed: TIME_CONSTRAINT_FAILURE"
    );
    // `sub` is optional (ESP since 1.37): a token without it reaches the issuer check.
    let no_sub = json!({"iss": "https://evil.example", "aud": AUD, "exp": now() + 60});
    let e = reject(&f.auth, &bearer(&f.key.sign(&no_sub))).await;
    assert_eq!(e.error.message, "JWT validation failed: Issuer not allowed");
    // An email issuer asserting another subject: gRPC's unnamed status, before the issuer.
    let other = json!({"iss": "sa@evil.example", "sub": "x", "aud": AUD, "exp": now() + 60});
    let e = reject(&f.auth, &bearer(&f.key.sign(&other))).await;
    assert_eq!(e.error.message, "JWT validation failed: UNKNOWN");
    // No aud: a format error, also before the issuer.
    let no_aud = json!({"iss": ISS, "sub": "s", "exp": now() + 60});
    let e = reject(&f.auth, &bearer(&f.key.sign(&no_aud))).await;
    assert_eq!(
        e.error.message,
        "JWT validation failed: Bad JWT format: missing audience field."
    );
    // Issuer before audience.
    let e = reject(
        &f.auth,
        &bearer(&f.key.sign(&claims("https://evil.example", "nobody".into()))),
    )
    .await;
    assert_eq!(e.error.message, "JWT validation failed: Issuer not allowed");
    assert_eq!(f.server.total_hits(), 0);
}

#[tokio::test]
async fn x509_and_hmac_key_messages() {
    let server = KeyServer::start().await;
    let cert_key = TestKey::rsa("c1");
    server.set("/x509", 200, x509_map(&[&cert_key]));
    server.set("/jwks", 200, jwks(&[&cert_key]));
    let svc = service(
        json!([
            {"id": "x509", "issuer": "x509.example", "jwksUri": server.url("/x509"), "audiences": AUD},
            {"id": "jwks", "issuer": "jwks.example", "jwksUri": server.url("/jwks"), "audiences": AUD},
        ]),
        json!([rule("m", &["x509", "jwks"])]),
    );
    let auth = Authenticator::new(&svc, &AuthOptions::default(), cache());
    let t = cert_key.sign_with_kid("other", &claims("x509.example", AUD.into()));
    let e = auth.authenticate("m", &bearer(&t), None).await.unwrap_err();
    assert_eq!(
        e.error.message,
        "JWT validation failed: Could not find matching key in public key set for kid=other"
    );
    // No kid: every key is tried, and the failure says so.
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = None;
    let other = TestKey::rsa("x");
    let t = jsonwebtoken::encode(&h, &claims("x509.example", AUD.into()), &other.encoding).unwrap();
    let e = auth.authenticate("m", &bearer(&t), None).await.unwrap_err();
    assert_eq!(
        e.error.message,
        "JWT validation failed: The JWT cannot be validated with any of the public keys."
    );
    let t =
        jsonwebtoken::encode(&h, &claims("x509.example", AUD.into()), &cert_key.encoding).unwrap();
    assert!(auth.authenticate("m", &bearer(&t), None).await.is_ok());
    // An HS token against an RSA key set.
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims("jwks.example", AUD.into()),
        &jsonwebtoken::EncodingKey::from_secret(b"guess"),
    )
    .unwrap();
    let e = auth
        .authenticate("m", &bearer(&hs), None)
        .await
        .unwrap_err();
    assert_eq!(
        e.error.message,
        "JWT validation failed: Invalid base64 encoded HS symmetric key. Most likely JWT alg is HS, but public key is ES or RSA."
    );
}

// ---------------------------------------------------------------------------------------------
// ESPv2's rules (`AuthOptions::dialect`): audiences, token locations, X-Endpoint-API-UserInfo.

fn espv2(pad: bool, disable_service_name: bool) -> AuthOptions {
    AuthOptions {
        dialect: portico_proxy::dialect::Dialect::EspV2,
        pad_forward_payload: pad,
        disable_audience_service_name_check: disable_service_name,
        ..Default::default()
    }
}

async fn espv2_auth(
    providers: serde_json::Value,
    rules: serde_json::Value,
    opts: AuthOptions,
) -> Authenticator {
    Authenticator::new(&service(providers, rules), &opts, cache())
}

#[tokio::test]
async fn espv2_audiences_follow_envoy() {
    let server = KeyServer::start().await;
    let key = TestKey::rsa("k1");
    server.set("/jwks", 200, jwks(&[&key]));
    let jwks_uri = server.url("/jwks");
    let forbidden = |r: Result<Option<portico_proxy::auth::AuthInfo>, AuthError>| {
        let e = r.expect_err("refused");
        assert_eq!(
            e.error.kind,
            portico_proxy::error::ErrorKind::Jwt(
                portico_proxy::error::JwtProblem::AudienceNotAllowed
            )
        );
    };
    // A provider with audiences: only those; the service's name is not one.
    let a = espv2_auth(
        json!([{"id": "p", "issuer": ISS, "jwksUri": jwks_uri, "audiences": AUD}]),
        json!([rule("m", &["p"])]),
        espv2(false, false),
    )
    .await;
    assert!(try_aud(&a, &key, json!(AUD)).await.is_ok());
    assert!(try_aud(&a, &key, json!(format!("https://{AUD}/")))
        .await
        .is_ok());
    forbidden(try_aud(&a, &key, json!(SVC)).await);
    // The requirement's audiences replace the provider's.
    let a = espv2_auth(
        json!([{"id": "p", "issuer": ISS, "jwksUri": jwks_uri, "audiences": "prov-aud"}]),
        json!([{"selector": "m", "requirements": [{"providerId": "p", "audiences": "req-aud"}]}]),
        espv2(false, false),
    )
    .await;
    assert!(try_aud(&a, &key, json!("req-aud")).await.is_ok());
    forbidden(try_aud(&a, &key, json!("prov-aud")).await);
    // No audiences: `https://SERVICE`, compared without scheme and trailing slash.
    let none = json!([{"id": "p", "issuer": ISS, "jwksUri": jwks_uri}]);
    let a = espv2_auth(
        none.clone(),
        json!([rule("m", &["p"])]),
        espv2(false, false),
    )
    .await;
    for aud in [
        json!(format!("https://{SVC}")),
        json!(SVC),
        json!([format!("http://{SVC}/"), "x"]),
    ] {
        assert!(try_aud(&a, &key, aud.clone()).await.is_ok(), "{aud}");
    }
    forbidden(try_aud(&a, &key, json!("someone-else")).await);
    let no_aud = json!({"iss": ISS, "exp": now() + 600});
    let e = a.authenticate("m", &bearer(&key.sign(&no_aud)), None).await;
    forbidden(e);
    // ... and with the check disabled, any audience or none.
    let a = espv2_auth(none, json!([rule("m", &["p"])]), espv2(false, true)).await;
    assert!(try_aud(&a, &key, json!("someone-else")).await.is_ok());
    assert!(a
        .authenticate("m", &bearer(&key.sign(&no_aud)), None)
        .await
        .is_ok());
}

#[tokio::test]
async fn espv2_forwards_the_payload_segment_and_reads_envoys_locations() {
    let server = KeyServer::start().await;
    let key = TestKey::rsa("k1");
    server.set("/jwks", 200, jwks(&[&key]));
    let providers =
        json!([{"id": "p", "issuer": ISS, "jwksUri": server.url("/jwks"), "audiences": AUD}]);
    let token = key.sign(&json!({"iss": ISS, "aud": AUD, "exp": now() + 600, "sub": "s"}));
    let segment = token.split('.').nth(1).unwrap().to_string();
    assert_ne!(
        segment.len() % 4,
        0,
        "the test needs a payload that padding changes"
    );
    let a = espv2_auth(
        providers.clone(),
        json!([rule("m", &["p"])]),
        espv2(false, false),
    )
    .await;
    let info = a
        .authenticate("m", &bearer(&token), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.user_info.to_str().unwrap(), segment);
    let padded = espv2_auth(
        providers.clone(),
        json!([rule("m", &["p"])]),
        espv2(true, false),
    )
    .await;
    let info = padded
        .authenticate("m", &bearer(&token), None)
        .await
        .unwrap()
        .unwrap();
    let want = format!("{segment}{}", "=".repeat((4 - segment.len() % 4) % 4));
    assert_eq!(info.user_info.to_str().unwrap(), want);
    assert_eq!(info.user_info.len() % 4, 0);

    let header = |name: &'static str, v: String| {
        let mut h = HeaderMap::new();
        h.insert(name, v.parse().unwrap());
        h
    };
    // `Bearer ` anywhere in Authorization; the token ends at the first non-token character.
    for v in [
        format!("Bearer {token}"),
        format!("Foo, Bearer {token}, x=y"),
        format!("Bearer  {token}"),
    ] {
        assert!(
            a.authenticate("m", &header("authorization", v.clone()), None)
                .await
                .is_ok(),
            "{v}"
        );
    }
    // Without `Bearer ` the header holds no token (ESP v1 would try the whole value).
    let e = reject(&a, &header("authorization", token.clone())).await;
    assert_eq!(
        e.error.kind,
        portico_proxy::error::ErrorKind::Jwt(portico_proxy::error::JwtProblem::Missing)
    );
    assert!(a
        .authenticate(
            "m",
            &header("x-goog-iap-jwt-assertion", token.clone()),
            None
        )
        .await
        .is_ok());
    // `access_token` is read even when another Authorization header is present; its name is
    // matched exactly.
    let q = format!("access_token={token}");
    assert!(a
        .authenticate("m", &header("authorization", "Basic eDp5".into()), Some(&q))
        .await
        .is_ok());
    let e = reject_q(&a, &HeaderMap::new(), &format!("ACCESS_TOKEN={token}")).await;
    assert_eq!(
        e.error.kind,
        portico_proxy::error::ErrorKind::Jwt(portico_proxy::error::JwtProblem::Missing)
    );
}

async fn try_aud(
    a: &Authenticator,
    key: &TestKey,
    aud: serde_json::Value,
) -> Result<Option<portico_proxy::auth::AuthInfo>, AuthError> {
    a.authenticate("m", &bearer(&key.sign(&claims(ISS, aud))), None)
        .await
}

async fn reject_q(auth: &Authenticator, headers: &HeaderMap, query: &str) -> AuthError {
    auth.authenticate("m", headers, Some(query))
        .await
        .expect_err("request should be rejected")
}
