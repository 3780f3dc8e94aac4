//! `gcloud projects delete` reaches the data plane: a consumer project's API keys stop working
//! at the proxy with ESP's 403 code 7 `Project has been deleted.`, and work again after
//! `gcloud projects undelete`. Then the Portico `expireTime` extension: a key whose
//! `expireTime` was set in the past (by `PATCH ...?updateMask=expireTime`, gcloud has no flag for
//! it) gets 400 code 3 `API key expired. Please renew the API key.`.
//!
//! Set-up as in the seed walkthrough (deploy, service account with
//! `roles/servicemanagement.serviceController`, `portico echo`, `portico esp`), except that the
//! API keys belong to a second project, `consumer-proj`, which enabled the service with
//! `gcloud services enable`. Deleting it leaves the producer project `demo-proj`, and so the
//! service and the proxy's own credentials, alive.
//!
//! Every process is real (the `portico` binary, gcloud, curl) on loopback ports chosen at run time.

mod common;

use common::{
    curl_echo, expect_ok, free_port, gcloud_available, json, ControlPlane, Db, Gcloud, Proc,
};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const SERVICE: &str = "echo-api.endpoints.demo-proj.cloud.goog";
const SA_EMAIL: &str = "esp-sa@demo-proj.iam.gserviceaccount.com";
const CONSUMER: &str = "consumer-proj";

/// A new API key `key_id` in `consumer-proj`; returns the key string.
fn consumer_key(gcloud: &Gcloud, key_id: &str) -> String {
    let out = gcloud.run(&[
        "services",
        "api-keys",
        "create",
        &format!("--key-id={key_id}"),
        "--project",
        CONSUMER,
        "--format=value(response.keyString)",
    ]);
    expect_ok("api-keys create", &out);
    let key = out.stdout.trim().to_string();
    assert!(key.starts_with("AIza"), "unexpected key {key:?}:\n{out}");
    key
}

fn lifecycle_state(gcloud: &Gcloud) -> String {
    let out = gcloud.run(&[
        "projects",
        "describe",
        CONSUMER,
        "--format=value(lifecycleState)",
    ]);
    expect_ok("projects describe", &out);
    out.stdout.trim().to_string()
}

fn write_spec(dir: &Path) {
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/echo/openapi.yaml"
    ))
    .expect("examples/echo/openapi.yaml");
    std::fs::write(
        dir.join("openapi.yaml"),
        src.replace("YOUR-PROJECT-ID", "demo-proj"),
    )
    .expect("write openapi.yaml");
}

#[test]
fn deleted_consumer_project_is_refused_by_the_proxy() {
    if !gcloud_available("deleted_consumer_project_is_refused_by_the_proxy") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    let cp_listen = format!("127.0.0.1:{}", free_port());
    let public_url = format!("http://{cp_listen}");
    let cp = ControlPlane::start_on(
        &tmp.path().join("cp"),
        &Db::Sqlite,
        &cp_listen,
        &["--public-url", &public_url],
    );
    let gcloud = Gcloud::new(&cp.url, &cp.admin_token_path());

    // Producer side: deploy, a service account the proxy runs as, its controller role.
    write_spec(&work);
    expect_ok(
        "deploy",
        &gcloud.run_in(
            Some(&work),
            &["endpoints", "services", "deploy", "openapi.yaml"],
            Duration::from_secs(120),
        ),
    );
    expect_ok(
        "service-accounts create",
        &gcloud.run(&["iam", "service-accounts", "create", "esp-sa"]),
    );
    let key_file = work.join("creds.json");
    expect_ok(
        "keys create",
        &gcloud.run(&[
            "iam",
            "service-accounts",
            "keys",
            "create",
            key_file.to_str().expect("utf-8 path"),
            "--iam-account",
            SA_EMAIL,
        ]),
    );
    expect_ok(
        "add-iam-policy-binding",
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

    // Consumer side: consumer-proj enables the service and owns the keys. The proxy caches
    // every check answer (positive and negative) per key and caller and re-checks it only
    // every 60 s, so each phase below uses a key the proxy has never seen: `before` is cached
    // as allowed, `after_delete` as refused, and only `after_undelete` shows the undelete
    // without waiting a minute.
    expect_ok(
        "services enable",
        &gcloud.run(&["services", "enable", SERVICE, "--project", CONSUMER]),
    );
    let before = consumer_key(&gcloud, "before");
    let after_delete = consumer_key(&gcloud, "after-delete");
    let after_undelete = consumer_key(&gcloud, "after-undelete");
    let expired = consumer_key(&gcloud, "expired");
    let producer_key = {
        let out = gcloud.run(&[
            "services",
            "api-keys",
            "create",
            "--display-name=producer",
            "--format=value(response.keyString)",
        ]);
        expect_ok("producer api-keys create", &out);
        out.stdout.trim().to_string()
    };

    let backend_port = free_port();
    let mut echo = Proc::spawn(
        &["echo", "--port", &backend_port.to_string()],
        &tmp.path().join("echo.log"),
    );
    echo.wait_for_port(backend_port, "portico echo");
    let http_port = free_port();
    let esp_args = [
        "esp".to_string(),
        format!("--service={SERVICE}"),
        "--rollout_strategy=managed".to_string(),
        format!("--http_port={http_port}"),
        format!("--backend=localhost:{backend_port}"),
        format!("--service_account_key={}", key_file.display()),
        format!("--status_port={}", free_port()),
    ];
    let mut esp = Proc::spawn(&esp_args, &tmp.path().join("esp.log"));
    esp.wait_for_port(http_port, "portico esp");
    let base = format!("http://localhost:{http_port}");

    let (status, body) = curl_echo(&format!("{base}/echo?key={before}"));
    assert_eq!(status, 200, "body: {body}\nesp log:\n{}", esp.log());
    assert_eq!(lifecycle_state(&gcloud), "ACTIVE");

    // Delete the consumer project.
    let out = gcloud.run(&["projects", "delete", CONSUMER]);
    expect_ok("projects delete", &out);
    assert!(
        out.stderr.contains("Deleted [") && out.stderr.contains(CONSUMER),
        "projects delete output:\n{out}"
    );
    assert_eq!(lifecycle_state(&gcloud), "DELETE_REQUESTED");

    let (status, body) = curl_echo(&format!("{base}/echo?key={after_delete}"));
    assert_eq!(status, 403, "body: {body}\nesp log:\n{}", esp.log());
    let v = json(&body);
    assert_eq!(v["code"], 7, "{body}");
    assert_eq!(v["message"], "Project has been deleted.", "{body}");
    // The producer project is untouched: its own key still works.
    let (status, body) = curl_echo(&format!("{base}/echo?key={producer_key}"));
    assert_eq!(status, 200, "producer key after consumer delete: {body}");

    // Undelete: a key not yet cached by the proxy works again.
    expect_ok(
        "projects undelete",
        &gcloud.run(&["projects", "undelete", CONSUMER]),
    );
    assert_eq!(lifecycle_state(&gcloud), "ACTIVE");
    let (status, body) = curl_echo(&format!("{base}/echo?key={after_undelete}"));
    assert_eq!(
        status,
        200,
        "after undelete: {body}\nesp log:\n{}",
        esp.log()
    );

    // An expireTime in the past, set as docs/identity.md shows; the proxy has never seen the key.
    let out = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "10",
            "--fail-with-body",
            "--request",
            "PATCH",
            "--header",
            &format!("Authorization: Bearer {}", cp.admin_token()),
            "--header",
            "content-type: application/json",
            "--data",
            r#"{"expireTime":"2020-01-01T00:00:00Z"}"#,
            &format!(
                "{}/v2/projects/{CONSUMER}/locations/global/keys/expired?updateMask=expireTime",
                cp.url
            ),
        ])
        .output()
        .expect("run curl");
    let patched = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "PATCH expireTime failed: {patched}");
    assert_eq!(
        json(&patched)["response"]["expireTime"],
        "2020-01-01T00:00:00Z"
    );
    let (status, body) = curl_echo(&format!("{base}/echo?key={expired}"));
    assert_eq!(status, 400, "expired key: {body}\nesp log:\n{}", esp.log());
    let v = json(&body);
    assert_eq!(v["code"], 3, "{body}");
    assert_eq!(
        v["message"], "API key expired. Please renew the API key.",
        "{body}"
    );
    drop(esp);
    drop(echo);
}
