//! The seed walkthrough, end to end, as a user types it (seeds/001: "Running ESP locally"):
//!
//! 1. `gcloud endpoints services deploy openapi.yaml` (the getting-started spec, host
//!    `echo-api.endpoints.demo-proj.cloud.goog`);
//! 2. `gcloud iam service-accounts create`, `... keys create service-account-creds.json`;
//! 3. `gcloud endpoints services add-iam-policy-binding ... roles/servicemanagement.serviceController`
//!    and `gcloud projects add-iam-policy-binding ... roles/cloudtrace.agent`;
//! 4. an API key (`gcloud services api-keys create`);
//! 5. the sample backend (`portico echo`) and the proxy with the seed's flags:
//!    `portico esp --service=... --rollout_strategy=managed --http_port=P --backend=localhost:B
//!    --service_account_key=FILE` (plus `--status_port`, only so parallel tests don't share 8090);
//! 6. `curl` without a key → the seed's 401 body, byte for byte; with `?key=` → the echo.
//!
//! Then what a user does next: a bad key (400 code 3), an unknown path (404 code 5), a second
//! deploy served within 5 s, and the control plane going away while the proxy keeps serving
//! cached consumers, with the reports delivered once it is back.
//!
//! Every process is real (the `portico` binary, gcloud, curl) on loopback ports chosen at run time.

mod common;

use common::{curl_echo, expect_ok, free_port, json, ControlPlane, Db, Gcloud, Proc};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SERVICE: &str = "echo-api.endpoints.demo-proj.cloud.goog";
const SA_EMAIL: &str = "esp-sa@demo-proj.iam.gserviceaccount.com";

/// The body the seed shows for a call without an API key, as ESP prints it.
const SEED_401_BODY: &str = "{\n \"code\": 16,\n \"message\": \"Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.\",\n \"details\": [\n  {\n   \"@type\": \"type.googleapis.com/google.rpc.DebugInfo\",\n   \"stackEntries\": [],\n   \"detail\": \"service_control\"\n  }\n ]\n}\n";

/// Writes the getting-started spec with the project id filled in, as the seed instructs.
fn write_spec(dir: &Path, extra_path: Option<&str>) -> PathBuf {
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/echo/openapi.yaml"
    ))
    .expect("examples/echo/openapi.yaml");
    let mut spec = src.replace("YOUR-PROJECT-ID", "demo-proj");
    if let Some(p) = extra_path {
        // A second version of the API: one more API-key method, spliced in front of /echo.
        let addition = format!(
            "  \"{p}\":\n    post:\n      operationId: \"shout\"\n      produces:\n      - \"application/json\"\n      responses:\n        200:\n          description: \"Shout\"\n      security:\n      - api_key: []\n"
        );
        let at = spec
            .find("  \"/echo\":")
            .expect("spec has a quoted /echo path");
        spec.insert_str(at, &addition);
    }
    let path = dir.join("openapi.yaml");
    std::fs::write(&path, spec).expect("write openapi.yaml");
    path
}

#[test]
fn seed_walkthrough_end_to_end() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).expect("work dir");

    // The control plane on a port we choose, so it can come back on the same address later
    // (the key file's token_uri names it).
    let cp_port = free_port();
    let cp_listen = format!("127.0.0.1:{cp_port}");
    let cp_data = tmp.path().join("cp");
    let public_url = format!("http://{cp_listen}");
    let mut cp = ControlPlane::start_on(
        &cp_data,
        &Db::Sqlite,
        &cp_listen,
        &["--public-url", &public_url],
    );
    let gcloud = Gcloud::new(&cp.url, &cp.admin_token_path());

    // 1. Deploy.
    write_spec(&work, None);
    let out = gcloud.run_in(
        Some(&work),
        &["endpoints", "services", "deploy", "openapi.yaml"],
        Duration::from_secs(120),
    );
    expect_ok("deploy", &out);
    let today = common::today_utc();
    assert!(
        out.stderr.contains(&format!(
            "Service Configuration [{today}r0] uploaded for service [{SERVICE}]"
        )),
        "deploy output:\n{out}"
    );

    // 2. Service account and key.
    expect_ok(
        "service-accounts create",
        &gcloud.run(&[
            "iam",
            "service-accounts",
            "create",
            "esp-sa",
            "--display-name",
            "My Service Account",
        ]),
    );
    let key_file = work.join("service-account-creds.json");
    let out = gcloud.run(&[
        "iam",
        "service-accounts",
        "keys",
        "create",
        key_file.to_str().expect("utf-8 path"),
        "--iam-account",
        SA_EMAIL,
    ]);
    expect_ok("keys create", &out);
    let key_json = json(&std::fs::read_to_string(&key_file).expect("key file written"));
    assert_eq!(key_json["type"], "service_account");
    assert_eq!(key_json["client_email"], SA_EMAIL);

    // 3. IAM roles.
    expect_ok(
        "endpoints add-iam-policy-binding",
        &gcloud.run(&[
            "endpoints",
            "services",
            "add-iam-policy-binding",
            SERVICE,
            "--member",
            &format!("serviceAccount:{SA_EMAIL}"),
            "--role",
            "roles/servicemanagement.serviceController",
        ]),
    );
    expect_ok(
        "projects add-iam-policy-binding",
        &gcloud.run(&[
            "projects",
            "add-iam-policy-binding",
            "demo-proj",
            "--member",
            &format!("serviceAccount:{SA_EMAIL}"),
            "--role",
            "roles/cloudtrace.agent",
        ]),
    );

    // 4. An API key.
    let out = gcloud.run(&[
        "services",
        "api-keys",
        "create",
        "--display-name=echo key",
        "--format=value(response.keyString)",
    ]);
    expect_ok("api-keys create", &out);
    let key = out.stdout.trim().to_string();
    assert!(
        key.starts_with("AIza") && key.len() == 39,
        "unexpected key string {key:?}:\n{out}"
    );

    // 5. Backend and proxy.
    let backend_port = free_port();
    let mut echo = Proc::spawn(
        &["echo", "--port", &backend_port.to_string()],
        &tmp.path().join("echo.log"),
    );
    echo.wait_for_port(backend_port, "portico echo");

    let http_port = free_port();
    let status_port = free_port();
    let esp_args_owned = [
        "esp".to_string(),
        format!("--service={SERVICE}"),
        "--rollout_strategy=managed".to_string(),
        format!("--http_port={http_port}"),
        format!("--backend=localhost:{backend_port}"),
        format!("--service_account_key={}", key_file.display()),
        format!("--status_port={status_port}"),
    ];
    let esp_args: Vec<&str> = esp_args_owned.iter().map(String::as_str).collect();
    let mut esp = Proc::spawn(&esp_args, &tmp.path().join("esp.log"));
    esp.wait_for_port(http_port, "portico esp");
    let base = format!("http://localhost:{http_port}");

    // 6. Without a key: the seed's 401, byte for byte.
    let (status, body) = curl_echo(&format!("{base}/echo"));
    assert_eq!(status, 401, "body: {body}\nesp log:\n{}", esp.log());
    assert_eq!(body, SEED_401_BODY);

    // With the key: the echo.
    let (status, body) = curl_echo(&format!("{base}/echo?key={key}"));
    assert_eq!(status, 200, "body: {body}\nesp log:\n{}", esp.log());
    assert_eq!(json(&body), serde_json::json!({"message": "hello world"}));

    // A key the control plane never issued: 400 code 3.
    let (status, body) = curl_echo(&format!(
        "{base}/echo?key=AIzaSyNotAKeyPorticoEverIssued0000000"
    ));
    assert_eq!(status, 400, "body: {body}");
    assert_eq!(json(&body)["code"], 3);
    assert_eq!(
        json(&body)["message"],
        "API key not valid. Please pass a valid API key."
    );

    // A path the config does not have: 404 code 5.
    let (status, body) = curl_echo(&format!("{base}/nowhere?key={key}"));
    assert_eq!(status, 404, "body: {body}");
    assert_eq!(json(&body)["code"], 5);
    assert_eq!(json(&body)["message"], "Method does not exist.");

    // A second deploy adds POST /shout; the proxy serves it within 5 s of gcloud returning.
    let (status, body) = curl_echo(&format!("{base}/shout?key={key}"));
    assert_eq!((status, json(&body)["code"].clone()), (404, 5.into()));
    write_spec(&work, Some("/shout"));
    let out = gcloud.run_in(
        Some(&work),
        &["endpoints", "services", "deploy", "openapi.yaml"],
        Duration::from_secs(120),
    );
    expect_ok("second deploy", &out);
    assert!(
        out.stderr
            .contains(&format!("Service Configuration [{today}r1] uploaded")),
        "second deploy output:\n{out}"
    );
    let deployed = Instant::now();
    loop {
        // The proxy now knows the method, so the backend answers (its own 404: /shout is not
        // one of the sample's routes) instead of the proxy's JSON code 5.
        let (status, body) = curl_echo(&format!("{base}/shout?key={key}"));
        let proxy_404 = status == 404 && body.contains("Method does not exist.");
        if !proxy_404 {
            break;
        }
        assert!(
            deployed.elapsed() < Duration::from_secs(5),
            "new rollout not served within 5 s; esp log:\n{}",
            esp.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "new rollout served {:?} after deploy returned",
        deployed.elapsed()
    );

    // The control plane goes away: cached consumers keep being served.
    cp.stop();
    let mut failed = 0;
    const DURING_OUTAGE: usize = 50;
    for _ in 0..DURING_OUTAGE {
        let (status, _) = curl_echo(&format!("{base}/echo?key={key}"));
        if status != 200 {
            failed += 1;
        }
    }
    assert_eq!(
        failed, 0,
        "requests failed while the control plane was down"
    );

    // It comes back on the same address; the reports buffered meanwhile are delivered: the
    // control plane's rollups count every request made during the outage.
    let cp = ControlPlane::start_on(
        &cp_data,
        &Db::Sqlite,
        &cp_listen,
        &["--public-url", &public_url],
    );
    let token = cp.admin_token();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = 0;
    while Instant::now() < deadline {
        seen = echo_requests_reported(&cp.url, &token);
        // Requests before the outage count too; at least the outage's must all be there.
        if seen > DURING_OUTAGE as i64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        seen > DURING_OUTAGE as i64,
        "only {seen} echo requests reported after the control plane came back; esp log:\n{}",
        esp.log()
    );
    drop(esp);
    drop(echo);
}

/// Sum of `requestCount` for the echo method over the last hour, from the control plane's
/// rollups (`/portico/v1/services/{svc}/timeseries`).
fn echo_requests_reported(cp_url: &str, token: &str) -> i64 {
    let out = Command::new("curl")
        .args([
            "--silent",
            "--max-time",
            "5",
            "--header",
            &format!("Authorization: Bearer {token}"),
            &format!("{cp_url}/portico/v1/services/{SERVICE}/timeseries?since=1h"),
        ])
        .output()
        .expect("curl timeseries");
    let v: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(_) => return 0,
    };
    common::echo_request_count(&v)
}
