//! End to end, as a user meets it: `portico esp` exports its traces to the control plane's
//! Cloud Trace API (`PATCH /v1/projects/P/traces`, authenticated with the proxy's
//! service-account token, ESP's way). Without `roles/cloudtrace.agent` on the project the
//! control plane refuses them (403) and the proxy says so once, at warning level, with the
//! `gcloud` command that fixes it; after the walkthrough's real `gcloud projects
//! add-iam-policy-binding ... --role roles/cloudtrace.agent`, the traces appear through
//! `GET /v1/projects/P/traces` and in the console's Traces view (headless Chromium).
//!
//! Every process is real (the `portico` binary, gcloud, curl) on loopback ports chosen at run
//! time; skipped loudly without gcloud (a failure under `CI=true`).

mod common;

use common::{expect_ok, free_port, json, ControlPlane, Db, Gcloud, Proc};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SERVICE: &str = "echo-api.endpoints.demo-proj.cloud.goog";
const SA_EMAIL: &str = "esp-sa@demo-proj.iam.gserviceaccount.com";
const FIX: &str = "gcloud projects add-iam-policy-binding demo-proj --member \
                   serviceAccount:esp-sa@demo-proj.iam.gserviceaccount.com --role \
                   roles/cloudtrace.agent";

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

/// POST /echo with the key and a forced trace; the status.
fn traced_echo(base: &str, key: &str, trace: &str) -> u16 {
    let out = Command::new("curl")
        .args([
            "--silent",
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_code}",
            "--max-time",
            "20",
            "--header",
            "Content-Type: application/json",
            "--header",
            &format!("X-Cloud-Trace-Context: {trace}/1;o=1"),
            "--data",
            r#"{"message":"hello world"}"#,
            &format!("{base}/echo?key={key}"),
        ])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// `GET {cp}/v1/projects/demo-proj/traces/{trace}` as the admin: (status, body).
fn get_trace(cp: &str, token: &str, trace: &str) -> (u16, String) {
    let r = reqwest::blocking::Client::new()
        .get(format!("{cp}/v1/projects/demo-proj/traces/{trace}"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(10))
        .send()
        .expect("get trace");
    let status = r.status().as_u16();
    (status, r.text().unwrap_or_default())
}

fn warnings(log: &str) -> usize {
    log.lines().filter(|l| l.contains(FIX)).count()
}

#[test]
fn traces_need_the_cloudtrace_agent_binding() {
    if !common::gcloud_available("traces_need_the_cloudtrace_agent_binding") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    let cp_port = free_port();
    let cp_listen = format!("127.0.0.1:{cp_port}");
    let public_url = format!("http://{cp_listen}");
    let cp = ControlPlane::start_on(
        &tmp.path().join("cp"),
        &Db::Sqlite,
        &cp_listen,
        &["--public-url", &public_url],
    );
    let admin = cp.admin_token();
    let gcloud = Gcloud::new(&cp.url, &cp.admin_token_path());

    // The walkthrough, without the Cloud Trace binding yet.
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
    let key_file = work.join("service-account-creds.json");
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
    let out = gcloud.run(&[
        "services",
        "api-keys",
        "create",
        "--display-name=echo key",
        "--format=value(response.keyString)",
    ]);
    expect_ok("api-keys create", &out);
    let key = out.stdout.trim().to_string();

    let backend_port = free_port();
    let mut echo = Proc::spawn(
        &["echo", "--port", &backend_port.to_string()],
        &tmp.path().join("echo.log"),
    );
    echo.wait_for_port(backend_port, "portico echo");
    let http_port = free_port();
    let mut esp = Proc::spawn(
        &[
            "esp".to_string(),
            format!("--service={SERVICE}"),
            "--rollout_strategy=managed".to_string(),
            format!("--http_port={http_port}"),
            format!("--backend=localhost:{backend_port}"),
            format!("--service_account_key={}", key_file.display()),
            format!("--status_port={}", free_port()),
        ],
        &tmp.path().join("esp.log"),
    );
    esp.wait_for_port(http_port, "portico esp");
    let base = format!("http://localhost:{http_port}");

    // Refused: the proxy says so once, with the fix; the API is unaffected.
    let t1 = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
    assert_eq!(traced_echo(&base, &key, t1), 200, "{}", esp.log());
    let deadline = Instant::now() + Duration::from_secs(20);
    while warnings(&esp.log()) == 0 {
        assert!(
            Instant::now() < deadline,
            "no warning naming the binding; esp log:\n{}\ncontrol plane log:\n{}",
            esp.log(),
            cp.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(esp.log().contains("WARN"), "{}", esp.log());
    let t2 = "a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2";
    assert_eq!(traced_echo(&base, &key, t2), 200);
    // Two more export rounds (one per second) are refused silently.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(warnings(&esp.log()), 1, "{}", esp.log());
    for t in [t1, t2] {
        assert_eq!(
            get_trace(&cp.url, &admin, t).0,
            404,
            "nothing of {t} was stored"
        );
    }

    // The walkthrough's binding.
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
    let t3 = "a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3";
    assert_eq!(traced_echo(&base, &key, t3), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    let trace = loop {
        let (status, body) = get_trace(&cp.url, &admin, t3);
        if status == 200 {
            break json(&body);
        }
        assert!(
            Instant::now() < deadline,
            "trace {t3} not stored ({status} {body}); esp log:\n{}",
            esp.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let spans = trace["spans"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = spans.iter().filter_map(|s| s["name"].as_str()).collect();
    let root = names
        .iter()
        .find(|n| n.starts_with(&format!("{SERVICE}/")))
        .unwrap_or_else(|| panic!("no root span: {names:?}"));
    assert!(root.ends_with("Echo"), "{root}");
    for n in [
        "CheckServiceControl",
        "CheckServiceControlCache",
        "QuotaControl",
        "Backend",
    ] {
        assert!(names.contains(&n), "{n} missing: {names:?}");
    }
    // The root's parent is the client's span 1.
    let root_span = spans
        .iter()
        .find(|s| s["name"] == *root)
        .expect("root span");
    assert_eq!(root_span["parentSpanId"], "1", "{root_span:#}");

    // And the list finds it by its root span's name.
    let r = reqwest::blocking::Client::new()
        .get(format!("{}/v1/projects/demo-proj/traces", cp.url))
        .query(&[
            ("filter", format!("+root:{root}")),
            ("view", "ROOTSPAN".into()),
        ])
        .bearer_auth(&admin)
        .timeout(Duration::from_secs(10))
        .send()
        .expect("list traces");
    assert_eq!(r.status().as_u16(), 200);
    let list = json(&r.text().unwrap_or_default());
    let ids: Vec<&str> = list["traces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["traceId"].as_str())
        .collect();
    assert!(ids.contains(&t3), "{list:#}");
    assert!(!ids.contains(&t1), "{list:#}");

    // And the console shows it: in the Traces list, and as a waterfall with ESP's spans.
    if let Some(chromium) = chromium_or_skip("traces_need_the_cloudtrace_agent_binding (console)") {
        let list = console_dom(
            &chromium,
            tmp.path(),
            &cp.url,
            &format!("token={admin}&view=traces"),
        );
        assert!(
            list.contains(r#"data-state="ready""#)
                && list.contains(root)
                && list.contains(&format!("trace={t3}"))
                && !list.contains(&format!("trace={t1}")),
            "the console's Traces view does not list {t3}:\n{list}"
        );
        let one = console_dom(
            &chromium,
            tmp.path(),
            &cp.url,
            &format!("token={admin}&view=trace&trace={t3}"),
        );
        for n in ["CheckServiceControl", "QuotaControl", "Backend"] {
            assert!(
                one.contains(&format!(">{n}<")),
                "{n} not in the waterfall:\n{one}"
            );
        }
    }
    drop(esp);
    drop(echo);
}

/// Debian's `chromium` (or `PORTICO_CHROMIUM`); absent → a loud skip, or a failure under `CI=true`.
fn chromium_or_skip(test: &str) -> Option<std::path::PathBuf> {
    let bin = std::env::var_os("PORTICO_CHROMIUM")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromium".into());
    if bin.is_file() {
        return Some(bin);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: chromium is not installed and CI=true"
    );
    eprintln!("SKIPPED: {test}: chromium is not installed (/usr/bin/chromium or PORTICO_CHROMIUM)");
    None
}

/// The console's DOM once its script has run (`--dump-dom`), the token handed over in the fragment.
fn console_dom(bin: &Path, dir: &Path, base: &str, fragment: &str) -> String {
    let profile = tempfile::tempdir_in(dir).expect("profile dir");
    // Bounded: coreutils' timeout ends a browser that hangs.
    let out = Command::new("timeout")
        .arg("90")
        .arg(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--virtual-time-budget=10000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("{base}/console#{fragment}"))
        .output()
        .expect("run chromium");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
