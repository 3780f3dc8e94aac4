//! JWT authentication through the whole proxy (in-process `server::start`): statuses, exact
//! bodies and `WWW-Authenticate` as the client sees them, the exact `X-Endpoint-API-UserInfo`
//! the backend receives, JWT AND API key, and the token cache seen from outside.

mod auth_common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use auth_common::*;
use base64::engine::general_purpose::URL_SAFE;
use base64::Engine as _;
use portico_config::service::Service;
use portico_proxy::config_source::Rollout;
use portico_proxy::error::{Cause, Code, EspError};
use portico_proxy::pipeline::{CheckInput, CheckOk, ControlApi, QuotaInput, RequestRecord};
use serde_json::json;

const SVC: &str = "echo-api.endpoints.demo-proj.cloud.goog";
const ISS: &str = "jwt-client.endpoints.sample.google.com";
const ISS2: &str = "sa@demo-proj.iam.gserviceaccount.com";
const AUD: &str = "echo.endpoints.sample.google.com";
const GOOD_KEY: &str = "good-api-key";

/// Service Control double: a fixed key is valid, any other is refused like Google's check.
#[derive(Default)]
struct Control {
    checks: AtomicUsize,
    reports: std::sync::Mutex<Vec<RequestRecord>>,
}

impl ControlApi for Control {
    fn check<'a>(
        &'a self,
        input: CheckInput<'a>,
    ) -> Pin<Box<dyn Future<Output = Result<CheckOk, EspError>> + Send + 'a>> {
        self.checks.fetch_add(1, Ordering::SeqCst);
        let ok = input.api_key == GOOD_KEY;
        Box::pin(async move {
            if ok {
                Ok(CheckOk {
                    api_key_valid: true,
                    ..Default::default()
                })
            } else {
                Err(EspError::new(
                    Code::InvalidArgument,
                    "API key not valid. Please pass a valid API key.",
                    Cause::ServiceControl,
                ))
            }
        })
    }

    fn allocate_quota(&self, _input: QuotaInput<'_>) -> Result<(), EspError> {
        Ok(())
    }

    fn report(&self, record: RequestRecord) {
        self.reports.lock().unwrap().push(record);
    }
}

struct Env {
    keys: KeyServer,
    k1: TestKey,
    k2: TestKey,
    backend: RecordingBackend,
    control: Arc<Control>,
    proxy: portico_proxy::server::ProxyHandle,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Env {
    async fn start(extra_flags: &[&str], jwks_uri_override: Option<String>) -> Env {
        let keys = KeyServer::start().await;
        let k1 = TestKey::rsa("k1");
        let k2 = TestKey::ec("k2");
        keys.set("/jwk", 200, jwks(&[&k1]));
        keys.set("/x509", 200, x509_map(&[&k2]));
        let backend = RecordingBackend::start().await;
        let service: Service = serde_json::from_value(json!({
            "name": SVC,
            "id": "2026-11-23r0",
            "control": {"environment": "servicecontrol.googleapis.com"},
            "http": {"rules": [
                {"selector": "auth_info", "get": "/auth/info/googlejwt"},
                {"selector": "both", "get": "/both"},
                {"selector": "anon", "get": "/anon"},
            ]},
            "usage": {"rules": [
                {"selector": "auth_info", "allowUnregisteredCalls": true},
                {"selector": "anon", "allowUnregisteredCalls": true},
            ]},
            "authentication": {
                "providers": [
                    {"id": "google_jwt", "issuer": ISS,
                     "jwksUri": jwks_uri_override.unwrap_or_else(|| keys.url("/jwk")),
                     "audiences": AUD, "authorizationUrl": "https://login.example/authorize"},
                    {"id": "google_service_account", "issuer": ISS2,
                     "jwksUri": keys.url("/x509"), "audiences": AUD},
                ],
                "rules": [
                    {"selector": "auth_info", "requirements": [
                        {"providerId": "google_jwt"}, {"providerId": "google_service_account"}]},
                    {"selector": "both", "requirements": [{"providerId": "google_jwt"}]},
                ],
            },
        }))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<std::ffi::OsString> = vec![
            "esp".into(),
            format!("--service={SVC}").into(),
            "--http_port=0".into(),
            "--status_port=0".into(),
            "--listen_address=127.0.0.1".into(),
            format!("--backend=http://{}", backend.addr).into(),
            format!("--access_log={}", dir.path().join("access.log").display()).into(),
        ];
        args.extend(extra_flags.iter().map(|f| f.into()));
        let settings = portico_proxy::cli::parse(args).expect("flags");
        let rollout = Arc::new(Rollout {
            rollout_id: "2026-11-23r0".into(),
            configs: vec![(Arc::new(service), 100)],
        });
        let (_tx, rx) = tokio::sync::watch::channel(rollout);
        let control = Arc::new(Control::default());
        let proxy = portico_proxy::server::start(
            Arc::new(settings),
            rx,
            Some(control.clone() as Arc<dyn ControlApi>),
        )
        .await
        .expect("proxy starts");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
            .unwrap();
        Env {
            keys,
            k1,
            k2,
            backend,
            control,
            proxy,
            client,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy.http_addr.unwrap(), path)
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String, Option<String>) {
        let mut req = self.client.get(self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("proxy answers");
        let status = resp.status().as_u16();
        let www = resp
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string());
        (status, resp.text().await.unwrap(), www)
    }
}

/// Claims as the issuer's kind mints them: a service account (an email issuer) names itself as
/// subject, which ESP requires.
fn claims(iss: &str, aud: &str) -> serde_json::Value {
    let sub = if iss.contains('@') { iss } else { "client-1" };
    json!({"iss": iss, "sub": sub, "aud": aud, "iat": now(), "exp": now() + 600})
}

fn esp_body(code: i32, message: &str, detail: &str) -> String {
    format!(
        "{{\n \"code\": {code},\n \"message\": \"{message}\",\n \"details\": [\n  {{\n   \"@type\": \"type.googleapis.com/google.rpc.DebugInfo\",\n   \"stackEntries\": [],\n   \"detail\": \"{detail}\"\n  }}\n ]\n}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_is_401_with_exact_body_and_challenge() {
    let env = Env::start(&[], None).await;
    let (status, body, www) = env.get("/auth/info/googlejwt", &[]).await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        esp_body(
            16,
            "JWT validation failed: Missing or invalid credentials",
            "auth"
        )
    );
    assert_eq!(www.as_deref(), Some("Bearer"));
    assert!(
        env.backend.heads().is_empty(),
        "rejected request reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tokens_are_refused_with_invalid_token_challenge() {
    let env = Env::start(&[], None).await;
    let cases = [
        (
            "garbage".to_string(),
            401,
            16,
            "JWT validation failed: Bad JWT format: should have 2 dots",
        ),
        (
            env.k1.sign(&claims(ISS, "nobody")),
            403,
            7,
            "JWT validation failed: Audience not allowed",
        ),
        (
            env.k1.sign(&claims("other-issuer", AUD)),
            401,
            16,
            "JWT validation failed: Issuer not allowed",
        ),
        (
            env.k1.sign_with_kid("zzz", &claims(ISS, AUD)),
            401,
            16,
            "JWT validation failed: Cannot find matching key in key set for kid=zzz",
        ),
        (
            TestKey::rsa("k1").sign(&claims(ISS, AUD)),
            401,
            16,
            "JWT validation failed: JWT signature verification failed.",
        ),
        (
            env.k1
                .sign(&json!({"iss": ISS, "aud": AUD, "exp": now() - 3600})),
            401,
            16,
            "JWT validation failed: TIME_CONSTRAINT_FAILURE",
        ),
    ];
    for (token, want_status, code, message) in cases {
        let auth = format!("Bearer {token}");
        let (status, body, www) = env
            .get("/auth/info/googlejwt", &[("authorization", &auth)])
            .await;
        assert_eq!(status, want_status, "{message}");
        assert_eq!(body, esp_body(code, message, "auth"));
        assert_eq!(
            www.as_deref(),
            Some("Bearer, error=\"invalid_token\""),
            "{message}"
        );
    }
    assert!(env.backend.heads().is_empty());
}

/// ESP splits a token at its first dot before it reads the header, so a token with one dot gets
/// the header's message, not "should have 2 dots"; the report's log message carries the same text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tokens_get_esps_parser_order_message_in_body_and_report() {
    let env = Env::start(&[], None).await;
    let cases = [
        ("invalid.token", "Bad JWT format: Invalid JSON in header"),
        ("invalid", "Bad JWT format: should have 2 dots"),
        (".abc.def", "Bad JWT format: Invalid base64 in header"),
        ("e30.e30", "Missing alg field."),
        (
            "eyJhbGciOiJSUzI1NiJ9.e30",
            "Bad JWT format: should have 2 dots",
        ),
        (
            "eyJhbGciOiJSUzI1NiJ9.e30.",
            "Bad JWT format: invalid JWT claims; issuer is mssing but required.",
        ),
    ];
    for (i, (token, reason)) in cases.iter().enumerate() {
        let auth = format!("Bearer {token}");
        let (status, body, www) = env
            .get("/auth/info/googlejwt", &[("authorization", &auth)])
            .await;
        let message = format!("JWT validation failed: {reason}");
        assert_eq!(status, 401, "{token}");
        assert_eq!(body, esp_body(16, &message, "auth"), "{token}");
        assert_eq!(www.as_deref(), Some("Bearer, error=\"invalid_token\""));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let record = loop {
            if let Some(r) = env.control.reports.lock().unwrap().get(i).cloned() {
                break r;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no report for {token}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(record.response_code, 401);
        assert_eq!(record.error_message.as_deref(), Some(message.as_str()));
    }
    assert!(env.backend.heads().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_receives_exact_user_info_and_no_spoofed_copy() {
    let env = Env::start(&[], None).await;
    let c = json!({"iss": ISS, "sub": "client-1", "aud": [AUD, "b-second"], "email": "c@example.com", "exp": 4102444800i64});
    let token = env.k1.sign(&c);
    let auth = format!("Bearer {token}");
    let (status, body, _) = env
        .get(
            "/auth/info/googlejwt",
            &[
                ("authorization", &auth),
                ("x-endpoint-api-userinfo", "spoofed"),
            ],
        )
        .await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    let expected_json = format!(
        "{{\"claims\":\"{{\\\"iss\\\":\\\"{ISS}\\\",\\\"sub\\\":\\\"client-1\\\",\\\"aud\\\":\\\"\\\",\\\"email\\\":\\\"c@example.com\\\",\\\"exp\\\":4102444800}}\",\"issuer\":\"{ISS}\",\"id\":\"client-1\",\"email\":\"c@example.com\",\"audiences\":[\"b-second\",\"{AUD}\"]}}"
    );
    assert_eq!(
        env.backend.last_header_values("x-endpoint-api-userinfo"),
        vec![URL_SAFE.encode(&expected_json)]
    );
    // The Authorization header is forwarded untouched (ESP strips nothing).
    assert_eq!(env.backend.last_header_values("authorization"), vec![auth]);
    // The report names the JWT credential (issuer and sorted audiences, base64url, no padding).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let credential = loop {
        let found = env
            .control
            .reports
            .lock()
            .unwrap()
            .iter()
            .find_map(|r| r.credential_id.clone());
        if let Some(c) = found {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no report with a JWT credential"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    assert_eq!(
        credential,
        format!(
            "jwtauth:issuer={}&audience={}",
            URL_SAFE_NO_PAD.encode(ISS),
            URL_SAFE_NO_PAD.encode(format!("b-second,{AUD}"))
        )
    );

    // A method without auth: the client's copy is removed, not forwarded.
    let (status, _, _) = env
        .get("/anon", &[("x-endpoint-api-userinfo", "spoofed")])
        .await;
    assert_eq!(status, 200);
    let values = env.backend.last_header_values("x-endpoint-api-userinfo");
    assert!(
        values.is_empty(),
        "spoofed header reached the backend: {values:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn either_provider_is_accepted() {
    let env = Env::start(&[], None).await;
    for token in [
        env.k1.sign(&claims(ISS, AUD)),
        env.k2.sign(&claims(ISS2, AUD)),
    ] {
        let auth = format!("Bearer {token}");
        let (status, _, _) = env
            .get("/auth/info/googlejwt", &[("authorization", &auth)])
            .await;
        assert_eq!(status, 200);
    }
    // `both` accepts only google_jwt.
    let auth = format!("Bearer {}", env.k2.sign(&claims(ISS2, AUD)));
    let (status, body, _) = env
        .get(
            &format!("/both?key={GOOD_KEY}"),
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        esp_body(16, "JWT validation failed: Issuer not allowed", "auth")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_and_api_key_are_both_required() {
    let env = Env::start(&[], None).await;
    let auth = format!("Bearer {}", env.k1.sign(&claims(ISS, AUD)));
    // JWT but no key: the API-key 401, with the invalid_token form since a JWT was present.
    let (status, body, www) = env.get("/both", &[("authorization", &auth)]).await;
    assert_eq!(status, 401);
    assert!(
        body.contains("Method doesn't allow unregistered callers"),
        "{body}"
    );
    assert_eq!(www.as_deref(), Some("Bearer, error=\"invalid_token\""));
    // Key but no JWT: the JWT stage refuses first, Service Control is never asked.
    let checks_before = env.control.checks.load(Ordering::SeqCst);
    let (status, body, _) = env.get(&format!("/both?key={GOOD_KEY}"), &[]).await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        esp_body(
            16,
            "JWT validation failed: Missing or invalid credentials",
            "auth"
        )
    );
    assert_eq!(env.control.checks.load(Ordering::SeqCst), checks_before);
    // Both: through.
    let (status, _, _) = env
        .get(
            &format!("/both?key={GOOD_KEY}"),
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(status, 200);
    assert!(!env.backend.last_header_values("x-endpoint-api-userinfo")[0].is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_token_needs_no_key_fetch() {
    // Keys expire immediately, so only the verified-token cache can avoid a second fetch.
    let env = Env::start(&["--jwks_cache_duration_in_s=0"], None).await;
    let auth = format!("Bearer {}", env.k1.sign(&claims(ISS, AUD)));
    for _ in 0..3 {
        let (status, _, _) = env
            .get("/auth/info/googlejwt", &[("authorization", &auth)])
            .await;
        assert_eq!(status, 200);
    }
    assert_eq!(env.keys.hits("/jwk"), 1);
    // A different token does need keys again.
    let other = format!("Bearer {}", env.k1.sign(&claims(ISS, SVC)));
    let (status, _, _) = env
        .get("/auth/info/googlejwt", &[("authorization", &other)])
        .await;
    assert_eq!(status, 200);
    assert_eq!(env.keys.hits("/jwk"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_jwks_is_401_unable_to_fetch() {
    let dead = format!("http://127.0.0.1:{}/jwk", dead_port());
    let env = Env::start(&[], Some(dead)).await;
    let auth = format!("Bearer {}", env.k1.sign(&claims(ISS, AUD)));
    let (status, body, www) = env
        .get("/auth/info/googlejwt", &[("authorization", &auth)])
        .await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        esp_body(
            16,
            "JWT validation failed: Unable to fetch verification key",
            "auth"
        )
    );
    assert_eq!(www.as_deref(), Some("Bearer, error=\"invalid_token\""));
    // The other provider on the same method is unaffected.
    let auth = format!("Bearer {}", env.k2.sign(&claims(ISS2, AUD)));
    let (status, _, _) = env
        .get("/auth/info/googlejwt", &[("authorization", &auth)])
        .await;
    assert_eq!(status, 200);
}

/// ESP does not remember a failed key fetch: the first request after the key server is back
/// fetches again and passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_outage_is_not_remembered() {
    let env = Env::start(&[], None).await;
    let body = jwks(&[&env.k1]);
    env.keys.set("/jwk", 503, "down");
    let auth = format!("Bearer {}", env.k1.sign(&claims(ISS, AUD)));
    let (status, body_503, _) = env
        .get("/auth/info/googlejwt", &[("authorization", &auth)])
        .await;
    assert_eq!(status, 401);
    assert_eq!(
        body_503,
        esp_body(
            16,
            "JWT validation failed: Unable to fetch verification key. HTTP response code: 503",
            "auth"
        )
    );
    env.keys.set("/jwk", 200, body);
    let (status, _, _) = env
        .get("/auth/info/googlejwt", &[("authorization", &auth)])
        .await;
    assert_eq!(
        status, 200,
        "not recovered on the first request after the outage"
    );
    assert_eq!(env.keys.hits("/jwk"), 2);
}

/// Requests that arrive while a slow key fetch is in flight wait for it and share its outcome,
/// a failure included: an outage under load costs one fetch, not one per request. The next
/// request after it fetches again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_during_a_slow_failing_fetch_share_it() {
    let env = Arc::new(Env::start(&[], None).await);
    let body = jwks(&[&env.k1]);
    env.keys.set("/jwk", 500, "down");
    env.keys.set_delay_ms(700);
    let mut tasks = Vec::new();
    for i in 0..12 {
        let env = env.clone();
        let mut c = claims(ISS, AUD);
        c["jti"] = format!("t{i}").into();
        let auth = format!("Bearer {}", env.k1.sign(&c));
        tasks.push(tokio::spawn(async move {
            env.get("/auth/info/googlejwt", &[("authorization", &auth)])
                .await
        }));
    }
    for t in tasks {
        let (status, body, _) = t.await.unwrap();
        assert_eq!(status, 401);
        assert!(body.contains("HTTP response code: 500"), "{body}");
    }
    assert_eq!(
        env.keys.hits("/jwk"),
        1,
        "concurrent misses made several fetches"
    );
    env.keys.set_delay_ms(0);
    env.keys.set("/jwk", 200, body);
    let auth = format!("Bearer {}", env.k1.sign(&claims(ISS, AUD)));
    let (status, _, _) = env
        .get("/auth/info/googlejwt", &[("authorization", &auth)])
        .await;
    assert_eq!(status, 200);
    assert_eq!(env.keys.hits("/jwk"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_url_redirect_for_missing_or_expired_tokens_only() {
    let env = Env::start(&["--enable_jwt_authorization_url_redirect"], None).await;
    let no_redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let expired = env
        .k1
        .sign(&json!({"iss": ISS, "aud": AUD, "exp": now() - 3600}));
    for (auth, message) in [
        (
            None,
            "JWT validation failed: Missing or invalid credentials",
        ),
        (
            Some(expired),
            "JWT validation failed: TIME_CONSTRAINT_FAILURE",
        ),
    ] {
        let mut req = no_redirect.get(env.url("/auth/info/googlejwt"));
        if let Some(t) = &auth {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 302, "{message}");
        assert_eq!(
            resp.headers()["location"],
            "https://login.example/authorize"
        );
        assert_eq!(resp.text().await.unwrap(), esp_body(16, message, "auth"));
    }
    // Other failures keep their status.
    let auth = format!("Bearer {}", env.k1.sign(&claims(ISS, "nobody")));
    let (status, _, _) = env
        .get("/auth/info/googlejwt", &[("authorization", &auth)])
        .await;
    assert_eq!(status, 403);
}

/// ESP v1 accepts a JWT without `exp` (gRPC's claims parser defaults it to "never expires"),
/// and so does ESPv2 (Envoy `jwt_authn` without `require_expiration`); a time claim of 0 is a
/// malformed claim in ESP v1, with its exact message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_without_exp_are_accepted_and_zero_times_refused_as_esp_does() {
    let env = Env::start(&[], None).await;
    let no_exp = env
        .k1
        .sign(&json!({"iss": ISS, "sub": "client-1", "aud": AUD}));
    for _ in 0..2 {
        // The second time from the token cache, whose entry lives at most 300 s.
        let auth = format!("Bearer {no_exp}");
        let (status, body, _) = env
            .get("/auth/info/googlejwt", &[("authorization", &auth)])
            .await;
        assert_eq!((status, body.as_str()), (200, "ok"));
    }
    for zero in [
        json!({"iss": ISS, "sub": "client-1", "aud": AUD, "exp": 0}),
        json!({"iss": ISS, "sub": "client-1", "aud": AUD, "exp": 0.5}),
        json!({"iss": ISS, "sub": "client-1", "aud": AUD, "nbf": 0}),
        json!({"iss": ISS, "sub": "client-1", "aud": AUD, "iat": 0}),
    ] {
        let auth = format!("Bearer {}", env.k1.sign(&zero));
        let (status, body, www) = env
            .get("/auth/info/googlejwt", &[("authorization", &auth)])
            .await;
        assert_eq!(status, 401, "{zero}");
        assert_eq!(
            body,
            esp_body(
                16,
                "JWT validation failed: Bad JWT format: invalid JWT claims; e.g. wrong data type, iss is not a string.",
                "auth"
            ),
            "{zero}"
        );
        assert_eq!(www.as_deref(), Some("Bearer, error=\"invalid_token\""));
    }
    assert_eq!(env.backend.heads().len(), 2);
}
