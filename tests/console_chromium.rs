//! The web console in a real headless Chromium, against a real `portico control-plane`.
//!
//! The control plane gets real data through its public APIs (the calls gcloud makes): a service
//! deployed from the echo fixture, Service Control reports with request counts, latencies and
//! `endpoints_log` entries, an API key, a service account with a key. Chromium then loads
//! `/console#token=...&view=...` with `--dump-dom`, and the rendered DOM must show that data,
//! must never contain the API key string or the admin token, and a wrong token must produce the
//! API's UNAUTHENTICATED error in the banner.
//!
//! A second test drives Chromium over the DevTools protocol (on a pipe, see [`Browser`]) for what
//! needs clicks and live state: the fragment hand-over (token in sessionStorage, gone from the
//! address), "Show key" / "Hide key", sign out and the sign-in form, no Content-Security-Policy
//! violations, and, from the browser's own network log, that the token travelled only in the
//! Authorization header (never in a URL, a cookie or a referrer).
//!
//! Chromium: `/usr/bin/chromium` (or `PORTICO_CHROMIUM`). Absent → `SKIPPED:` unless `CI=true`.
//! Screenshots go to the test's temp dir, or to `PORTICO_CONSOLE_SCREENSHOT_DIR` when set (to
//! look at them).

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{ControlPlane, Db};
use serde_json::{json, Value};

const SERVICE: &str = "echo-api.endpoints.demo-proj.cloud.goog";
const METHOD: &str = "1.echo_api_endpoints_demo_proj_cloud_goog.Echo";
const KEY_NAME: &str = "Console e2e key";
/// A display name that would be live markup if the console ever parsed API data as HTML.
const HOSTILE_NAME: &str = "<img src=x id=injected>";
const OK_REQUESTS: i64 = 17;
const ERROR_REQUESTS: i64 = 3;

fn chromium_or_skip(test: &str) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = std::env::var_os("PORTICO_CHROMIUM")
        .map(PathBuf::from)
        .into_iter()
        .chain(["/usr/bin/chromium", "/usr/bin/chromium-browser"].map(PathBuf::from))
        .collect();
    if let Some(p) = candidates.into_iter().find(|p| p.is_file()) {
        return Some(p);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: chromium is not installed and CI=true");
    }
    eprintln!("SKIPPED: {test}: chromium is not installed (/usr/bin/chromium or PORTICO_CHROMIUM)");
    None
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client")
}

fn call(base: &str, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let c = client();
    let url = format!("{base}{path}");
    let mut rb = match method {
        "GET" => c.get(&url),
        "PATCH" => c.patch(&url),
        _ => c.post(&url),
    }
    .bearer_auth(token);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn ok(base: &str, token: &str, method: &str, path: &str, body: Option<Value>) -> Value {
    let (s, v) = call(base, token, method, path, body);
    assert!((200..300).contains(&s), "{method} {path} → {s}: {v}");
    v
}

/// What the console test needs to find again.
struct Seeded {
    config_id: String,
    key_string: String,
    key_uid: String,
    sa_email: String,
    sa_key_id: String,
}

/// Deploys the echo fixture, reports traffic for it, and creates keys, all through the APIs.
fn seed(base: &str, admin: &str) -> Seeded {
    ok(
        base,
        admin,
        "POST",
        "/v1/services",
        Some(json!({"serviceName": SERVICE, "producerProjectId": "demo-proj"})),
    );
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/servicemanagement/echo-openapi.yaml");
    let source = std::fs::read(&fixture).expect("read echo fixture");
    let submitted = ok(
        base,
        admin,
        "POST",
        &format!("/v1/services/{SERVICE}/configs:submit"),
        Some(json!({"configSource": {"files": [{
            "filePath": "openapi.yaml",
            "fileContents": base64::engine::general_purpose::STANDARD.encode(source),
            "fileType": "OPEN_API_YAML",
        }]}})),
    );
    let config_id = submitted["response"]["serviceConfig"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no config id in {submitted}"))
        .to_string();
    ok(
        base,
        admin,
        "POST",
        &format!("/v1/services/{SERVICE}/rollouts"),
        Some(json!({"trafficPercentStrategy": {"percentages": {config_id.as_str(): 100}}})),
    );

    let created = ok(
        base,
        admin,
        "POST",
        "/v2/projects/demo-proj/locations/global/keys",
        Some(json!({
            "displayName": KEY_NAME,
            "restrictions": {
                "apiTargets": [{"service": SERVICE}],
                "serverKeyRestrictions": {"allowedIps": ["127.0.0.1"]},
            },
        })),
    );
    let key_string = created["response"]["keyString"]
        .as_str()
        .unwrap_or_else(|| panic!("no keyString in {created}"))
        .to_string();
    let key_uid = created["response"]["uid"]
        .as_str()
        .unwrap_or_else(|| panic!("no uid in {created}"))
        .to_string();
    ok(
        base,
        admin,
        "POST",
        "/v2/projects/demo-proj/locations/global/keys",
        Some(json!({"displayName": HOSTILE_NAME})),
    );

    let sa = ok(
        base,
        admin,
        "POST",
        "/v1/projects/demo-proj/serviceAccounts",
        Some(json!({"accountId": "console-runner",
                    "serviceAccount": {"displayName": "Console runner"}})),
    );
    let sa_email = sa["email"].as_str().expect("email").to_string();
    let sa_key = ok(
        base,
        admin,
        "POST",
        &format!("/v1/projects/demo-proj/serviceAccounts/{sa_email}/keys"),
        Some(json!({})),
    );
    let sa_key_id = sa_key["name"]
        .as_str()
        .and_then(|n| n.rsplit('/').next())
        .expect("key name")
        .to_string();

    // Service Control reports, shaped as the proxy sends them: one batch of successes and one of
    // server errors, each with its request log entry. The consumer is the API key, which the
    // control plane resolves to its project and masks in stored logs.
    let latency = |mean_s: f64, n: i64| {
        json!({"count": n.to_string(), "mean": mean_s,
               "bucketCounts": ["0", n.to_string(), "0"],
               "explicitBuckets": {"bounds": [0.001, 0.01]}})
    };
    let op = |id: &str, code: i64, requests: i64, errors: i64| {
        json!({
            "operationId": id,
            "operationName": METHOD,
            "consumerId": format!("api_key:{key_string}"),
            "labels": {
                "serviceruntime.googleapis.com/api_method": METHOD,
                "/response_code": code.to_string(),
                "/response_code_class": format!("{}xx", code / 100),
            },
            "metricValueSets": [
                {"metricName": "serviceruntime.googleapis.com/api/producer/request_count",
                 "metricValues": [{"int64Value": requests.to_string()}]},
                {"metricName": "serviceruntime.googleapis.com/api/producer/error_count",
                 "metricValues": [{"int64Value": errors.to_string()}]},
                {"metricName": "serviceruntime.googleapis.com/api/producer/total_latencies",
                 "metricValues": [{"distributionValue": latency(0.004, requests)}]},
            ],
            "logEntries": [{
                "name": "endpoints_log",
                "structPayload": {
                    "api_method": METHOD,
                    "http_response_code": code,
                    "http_method": "POST",
                    "url": format!("/echo?key={key_string}"),
                    "api_key": key_string,
                },
            }],
        })
    };
    ok(
        base,
        admin,
        "POST",
        &format!("/v1/services/{SERVICE}:report"),
        Some(json!({"serviceConfigId": config_id, "operations": [
            op("console-e2e-ok", 200, OK_REQUESTS, 0),
            op("console-e2e-err", 503, ERROR_REQUESTS, ERROR_REQUESTS),
        ]})),
    );

    Seeded {
        config_id,
        key_string,
        key_uid,
        sa_email,
        sa_key_id,
    }
}

/// Flags every Chromium run gets: headless, and nothing that reaches for Google's hosts.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
];

/// Runs headless Chromium on `url` with `extra` flags; returns stdout. Killed after 90 s.
fn chromium(bin: &Path, profile: &Path, url: &str, extra: &[&str]) -> String {
    let mut child = Command::new(bin)
        .args(CHROMIUM_FLAGS)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--virtual-time-budget=10000")
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chromium");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "chromium did not finish within 90 s; stderr:\n{}",
                    err_t.join().unwrap_or_default()
                );
            }
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    assert!(
        status.success(),
        "chromium exited with {status}; stderr:\n{stderr}"
    );
    stdout
}

/// `--dump-dom` of the console opened with the token handed over in the fragment.
fn console_dom(bin: &Path, dir: &Path, base: &str, fragment: &str) -> String {
    let profile = tempfile::tempdir_in(dir).expect("profile dir");
    chromium(
        bin,
        profile.path(),
        &format!("{base}/console#{fragment}"),
        &["--dump-dom"],
    )
}

/// The part of `dom` from the element with `id` up to the next `<h3` (one console section).
fn section<'a>(dom: &'a str, id: &str) -> &'a str {
    let marker = format!("id=\"{id}\"");
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no #{id} in the DOM:\n{dom}"));
    let rest = &dom[start + marker.len()..];
    let end = rest.find("<h3").unwrap_or(rest.len());
    &rest[..end]
}

fn assert_ready(dom: &str, what: &str) {
    assert!(
        dom.contains(r#"data-state="ready""#),
        "{what}: the console did not finish rendering without errors:\n{dom}"
    );
}

#[test]
fn console_renders_real_data_and_hides_secrets() {
    let test = "console_renders_real_data_and_hides_secrets";
    let Some(bin) = chromium_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(&dir.path().join("cp"), &Db::Sqlite);
    let admin = cp.admin_token();
    let seeded = seed(&cp.url, &admin);
    let never = |dom: &str, what: &str| {
        assert!(
            !dom.contains(&seeded.key_string),
            "{what}: the API key string is in the DOM"
        );
        assert!(
            !dom.contains(&admin),
            "{what}: the admin token is in the DOM"
        );
    };

    // The service page: configs, rollouts, traffic totals, latency, consumers, logs.
    let dom = console_dom(
        &bin,
        dir.path(),
        &cp.url,
        &format!("token={admin}&view=service&service={SERVICE}"),
    );
    assert_ready(&dom, "service view");
    never(&dom, "service view");
    assert!(dom.contains(&format!("<h2>{SERVICE}</h2>")), "{dom}");
    assert!(dom.contains("Echo Sample"), "config title missing:\n{dom}");
    let configs = section(&dom, "configs");
    assert!(
        configs.contains(&format!("<code>{}</code>", seeded.config_id)),
        "config id missing:\n{configs}"
    );
    let rollouts = section(&dom, "rollouts");
    assert!(
        rollouts.contains("SUCCESS") && rollouts.contains(&format!("{}: 100%", seeded.config_id)),
        "rollout missing:\n{rollouts}"
    );
    let traffic = section(&dom, "traffic");
    let total = OK_REQUESTS + ERROR_REQUESTS;
    assert!(
        traffic.contains(&format!(r#"id="total-requests">{total}<"#))
            && traffic.contains(&format!(r#"id="total-errors">{ERROR_REQUESTS}<"#)),
        "reported totals missing:\n{traffic}"
    );
    assert!(
        traffic.contains("<svg") && traffic.contains(r#"class="bar-req""#),
        "no chart bars:\n{traffic}"
    );
    let latency = section(&dom, "latency");
    assert!(
        latency.contains(METHOD) && latency.contains("≤ 10 ms"),
        "latency row missing:\n{latency}"
    );
    let consumers = section(&dom, "consumers");
    assert!(
        consumers.contains("project_number:") && consumers.contains(&format!(">{total}<")),
        "consumer row missing:\n{consumers}"
    );
    let logs = section(&dom, "logs");
    assert!(
        logs.contains(METHOD) && logs.contains(">200<") && logs.contains(">503<"),
        "log entries missing:\n{logs}"
    );

    // The status-class filter narrows the logs to server errors.
    let dom = console_dom(
        &bin,
        dir.path(),
        &cp.url,
        &format!("token={admin}&view=service&service={SERVICE}&status=5xx"),
    );
    assert_ready(&dom, "filtered logs");
    let logs = section(&dom, "logs");
    assert!(
        logs.contains("status-5xx") && !logs.contains("status-2xx"),
        "5xx filter not applied:\n{logs}"
    );

    // Services list.
    let dom = console_dom(&bin, dir.path(), &cp.url, &format!("token={admin}"));
    assert_ready(&dom, "services view");
    never(&dom, "services view");
    assert!(
        dom.contains(SERVICE) && dom.contains(&format!("<code>{}</code>", seeded.config_id)),
        "services table:\n{dom}"
    );

    // API keys: names, uids and restrictions, never the key string; hostile names stay text.
    let dom = console_dom(
        &bin,
        dir.path(),
        &cp.url,
        &format!("token={admin}&view=keys"),
    );
    assert_ready(&dom, "keys view");
    never(&dom, "keys view");
    assert!(
        dom.contains(KEY_NAME) && dom.contains(&seeded.key_uid),
        "{dom}"
    );
    assert!(dom.contains("Server IPs: 127.0.0.1"), "{dom}");
    assert!(dom.contains("Show key"), "{dom}");
    assert!(
        dom.contains("&lt;img src=x id=injected&gt;") && !dom.contains(r#"id="injected""#),
        "a display name was parsed as HTML:\n{dom}"
    );

    // Service accounts and their key ids.
    let dom = console_dom(
        &bin,
        dir.path(),
        &cp.url,
        &format!("token={admin}&view=accounts"),
    );
    assert_ready(&dom, "accounts view");
    never(&dom, "accounts view");
    assert!(
        dom.contains(&seeded.sa_email) && dom.contains(&seeded.sa_key_id),
        "{dom}"
    );
    assert!(!dom.contains("PRIVATE KEY"), "{dom}");

    // A wrong token: the API's own error, verbatim, in the banner.
    let dom = console_dom(
        &bin,
        dir.path(),
        &cp.url,
        "token=not-the-admin-token&view=services",
    );
    let banner = section(&dom, "banner");
    assert!(
        banner.contains("UNAUTHENTICATED: Request had invalid authentication credentials"),
        "no UNAUTHENTICATED banner:\n{dom}"
    );
    assert!(dom.contains(r#"data-state="error""#), "{dom}");

    // No token at all: the sign-in form, and no API data.
    let dom = console_dom(&bin, dir.path(), &cp.url, "view=services");
    assert!(
        dom.contains(r#"data-state="signed-out""#) && dom.contains(r#"for="token""#),
        "{dom}"
    );
    assert!(!dom.contains(SERVICE), "{dom}");

    // Screenshots of the busiest page, for a human to look at.
    let shots = std::env::var_os("PORTICO_CONSOLE_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().to_path_buf());
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    for (name, fragment) in [
        (
            "console-service.png",
            format!("token={admin}&view=service&service={SERVICE}"),
        ),
        ("console-keys.png", format!("token={admin}&view=keys")),
    ] {
        let file = shots.join(name);
        let profile = tempfile::tempdir_in(dir.path()).expect("profile dir");
        chromium(
            &bin,
            profile.path(),
            &format!("{}/console#{fragment}", cp.url),
            &[
                &format!("--screenshot={}", file.display()),
                "--window-size=1280,900",
            ],
        );
        let png = std::fs::read(&file).expect("screenshot written");
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
            "{name} is not a plausible PNG ({} bytes)",
            png.len()
        );
        eprintln!("screenshot: {}", file.display());
    }

    // No request the browser made carried a secret in its URL (the server logs every path).
    let log = cp.log();
    assert!(!log.contains(&admin), "admin token in the server log");
    assert!(
        !log.contains(&seeded.key_string),
        "API key in the server log"
    );
    assert!(
        log.contains("/console/app.js"),
        "console not requested?\n{log}"
    );
}

/// Trace ids of the two traces [`seed_traces`] writes.
const TRACE_ESP: &str = "0af7651916cd43dd8448eb211c80319c";
const TRACE_ESPV2: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// Two traces through the Cloud Trace v1 API, shaped as the proxies export them: ESP's tree
/// (root SERVICE/METHOD, CheckServiceControl with its remote call, Backend; 40 ms, 200) and an
/// ESPv2 one (`ingress Echo`, 3 ms, 503, a label value that would be markup if parsed as HTML).
/// Then a report whose log entry names the ESP trace, as ESPv2's reports do.
fn seed_traces(base: &str, admin: &str, config_id: &str) {
    let span =
        |id: u64, parent: Option<u64>, name: &str, from_ms: u32, to_ms: u32, labels: Value| {
            let mut v = json!({
                "spanId": id.to_string(),
                "kind": "RPC_SERVER",
                "name": name,
                "startTime": format!("2026-12-06T10:00:00.{:03}000Z", from_ms),
                "endTime": format!("2026-12-06T10:00:00.{:03}000Z", to_ms),
                "labels": labels,
            });
            if let Some(p) = parent {
                v["parentSpanId"] = json!(p.to_string());
            }
            v
        };
    // Span ids above 2^53: the console must keep them as strings to find parents.
    let root = 9_007_199_254_740_993_u64;
    let check = root + 2;
    ok(
        base,
        admin,
        "PATCH",
        "/v1/projects/demo-proj/traces",
        Some(json!({"traces": [
            {"projectId": "demo-proj", "traceId": TRACE_ESP, "spans": [
                span(check + 1, Some(check), "Call ServiceControl server", 3, 9, json!({})),
                span(root, None, &format!("{SERVICE}/{METHOD}"), 0, 40,
                     json!({"/http/status_code": "200",
                            "trace.cloud.google.com/agent": "esp/1.60.0",
                            "000": "Http request URL: /echo"})),
                span(check, Some(root), "CheckServiceControl", 2, 10, json!({})),
                span(root + 9, Some(root), "Backend", 12, 38, json!({})),
            ]},
            {"projectId": "demo-proj", "traceId": TRACE_ESPV2, "spans": [
                span(7, None, "ingress Echo", 100, 103,
                     json!({"http.status_code": "503", "note": HOSTILE_NAME})),
            ]},
        ]})),
    );
    ok(
        base,
        admin,
        "POST",
        &format!("/v1/services/{SERVICE}:report"),
        Some(json!({"serviceConfigId": config_id, "operations": [{
            "operationId": "console-e2e-traced",
            "operationName": METHOD,
            "labels": {"/response_code": "200", "/response_code_class": "2xx"},
            "logEntries": [{
                "name": "endpoints_log",
                "trace": format!("projects/demo-proj/traces/{TRACE_ESP}"),
                "structPayload": {"api_method": METHOD, "http_response_code": 200},
            }],
        }]})),
    );
}

#[test]
fn console_traces_list_filters_waterfall_and_log_link() {
    let test = "console_traces_list_filters_waterfall_and_log_link";
    let Some(bin) = chromium_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(&dir.path().join("cp"), &Db::Sqlite);
    let admin = cp.admin_token();
    let seeded = seed(&cp.url, &admin);
    seed_traces(&cp.url, &admin, &seeded.config_id);
    let esp_root = format!("{SERVICE}/{METHOD}");

    // The list: both traces, newest first, with latency, span count and status.
    let dom = console_dom(
        &bin,
        dir.path(),
        &cp.url,
        &format!("token={admin}&view=traces"),
    );
    assert_ready(&dom, "traces view");
    let list = section(&dom, "trace-list");
    let (a, b) = (
        list.find(&esp_root)
            .unwrap_or_else(|| panic!("ESP trace missing:\n{list}")),
        list.find("ingress Echo")
            .unwrap_or_else(|| panic!("ESPv2 trace missing:\n{list}")),
    );
    assert!(b < a, "not newest first:\n{list}");
    assert!(
        list.contains(">40.0 ms<") && list.contains(">3.00 ms<") && list.contains(">4<"),
        "latency or span count missing:\n{list}"
    );
    assert!(
        list.contains(r#"class="num status-2xx">200<"#)
            && list.contains(r#"class="num status-5xx">503<"#),
        "status missing:\n{list}"
    );
    assert!(
        list.contains(&format!(r##"href="#view=trace&amp;trace={TRACE_ESP}""##)),
        "no link to the trace:\n{list}"
    );

    // Filters: by root span name (the service page's link) and by minimum latency.
    let dom = console_dom(
        &bin,
        dir.path(),
        &cp.url,
        &format!("token={admin}&view=traces&root={SERVICE}/"),
    );
    assert_ready(&dom, "traces by root");
    let list = section(&dom, "trace-list");
    assert!(
        list.contains(&esp_root) && !list.contains("ingress Echo"),
        "{list}"
    );
    let dom = console_dom(
        &bin,
        dir.path(),
        &cp.url,
        &format!("token={admin}&view=traces&minms=10"),
    );
    assert_ready(&dom, "traces by latency");
    let list = section(&dom, "trace-list");
    assert!(
        list.contains(&esp_root) && !list.contains("ingress Echo"),
        "{list}"
    );
    let dom = console_dom(
        &bin,
        dir.path(),
        &cp.url,
        &format!("token={admin}&view=traces&minms=100"),
    );
    assert!(
        section(&dom, "trace-list").contains("No trace matches this filter."),
        "{dom}"
    );
    let dom = console_dom(
        &bin,
        dir.path(),
        &cp.url,
        &format!("token={admin}&view=traces&minms=-3"),
    );
    assert!(
        section(&dom, "banner").contains("INVALID_ARGUMENT: minimum latency"),
        "{dom}"
    );

    // The waterfall: the tree in order, nested, each span's labels; ids beyond 2^53 kept.
    let dom = console_dom(
        &bin,
        dir.path(),
        &cp.url,
        &format!("token={admin}&view=trace&trace={TRACE_ESP}"),
    );
    assert_ready(&dom, "trace view");
    let fall = section(&dom, "waterfall");
    let pos = |name: &str| {
        fall.find(&format!(">{name}<"))
            .unwrap_or_else(|| panic!("{name} missing from the waterfall:\n{fall}"))
    };
    let order = [
        pos(&esp_root),
        pos("CheckServiceControl"),
        pos("Call ServiceControl server"),
        pos("Backend"),
    ];
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "span order {order:?}:\n{fall}"
    );
    for (depth, n) in [(0, 1), (1, 2), (2, 1)] {
        assert_eq!(
            fall.matches(&format!(r#"data-depth="{depth}""#)).count(),
            n,
            "spans at depth {depth}:\n{fall}"
        );
    }
    assert!(
        fall.contains("trace.cloud.google.com/agent")
            && fall.contains("<code>esp/1.60.0</code>")
            && fall.contains("Http request URL: /echo")
            && fall.contains("9007199254740993"),
        "labels or span id missing:\n{fall}"
    );
    assert!(fall.contains("<rect"), "no bars:\n{fall}");

    // A label that looks like markup stays text.
    let dom = console_dom(
        &bin,
        dir.path(),
        &cp.url,
        &format!("token={admin}&view=trace&trace={TRACE_ESPV2}"),
    );
    assert_ready(&dom, "ESPv2 trace view");
    assert!(
        dom.contains("&lt;img src=x id=injected&gt;") && !dom.contains(r#"id="injected""#),
        "a label was parsed as HTML:\n{dom}"
    );

    // The request log links the traced request to its trace.
    let dom = console_dom(
        &bin,
        dir.path(),
        &cp.url,
        &format!("token={admin}&view=service&service={SERVICE}"),
    );
    assert_ready(&dom, "service view");
    let logs = section(&dom, "logs");
    assert_eq!(
        logs.matches(&format!(r##"href="#view=trace&amp;trace={TRACE_ESP}""##))
            .count(),
        1,
        "exactly the traced request links to its trace:\n{logs}"
    );
    assert!(
        dom.contains(&format!(r##"href="#view=traces&amp;root={SERVICE}%2F""##)),
        "no link from the service to its traces:\n{dom}"
    );

    // An unknown trace: the API's NOT_FOUND; a malformed id: the console's own message.
    let dom = console_dom(
        &bin,
        dir.path(),
        &cp.url,
        &format!("token={admin}&view=trace&trace=ffffffffffffffffffffffffffffffff"),
    );
    assert!(section(&dom, "banner").contains("NOT_FOUND"), "{dom}");
    let dom = console_dom(
        &bin,
        dir.path(),
        &cp.url,
        &format!("token={admin}&view=trace&trace=../keys"),
    );
    assert!(
        section(&dom, "banner").contains("INVALID_ARGUMENT: the address names no trace id"),
        "{dom}"
    );

    let shots = std::env::var_os("PORTICO_CONSOLE_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().to_path_buf());
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let file = shots.join("console-trace.png");
    let profile = tempfile::tempdir_in(dir.path()).expect("profile dir");
    chromium(
        &bin,
        profile.path(),
        &format!(
            "{}/console#token={admin}&view=trace&trace={TRACE_ESP}",
            cp.url
        ),
        &[
            &format!("--screenshot={}", file.display()),
            "--window-size=1280,700",
        ],
    );
    assert!(std::fs::read(&file)
        .expect("screenshot")
        .starts_with(b"\x89PNG"));
    eprintln!("screenshot: {}", file.display());
}

// ---------------------------------------------------------------------------------------------
// Clicks: Chromium driven over the DevTools protocol

/// Chromium with `--remote-debugging-pipe`: the browser reads commands from its fd 3 and writes
/// answers and events to its fd 4, as NUL-separated JSON, so no WebSocket client is needed.
/// Killed on drop.
struct Browser {
    child: Child,
    commands: File,
    replies: mpsc::Receiver<Value>,
    /// Events seen while waiting for answers (e.g. `Network.requestWillBeSent`).
    events: Vec<Value>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

fn cloexec_pipe() -> (i32, i32) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    (fds[0], fds[1])
}

impl Browser {
    fn start(bin: &Path, dir: &Path) -> Browser {
        let profile = tempfile::tempdir_in(dir).expect("profile dir");
        let (browser_reads, we_write) = cloexec_pipe();
        let (we_read, browser_writes) = cloexec_pipe();
        let mut cmd = Command::new(bin);
        cmd.args(CHROMIUM_FLAGS)
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("--remote-debugging-pipe")
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2) are made.
        // The descriptors are first copied above 10 (close-on-exec) so that placing one on 3
        // cannot overwrite the other; dup2 then installs them on 3 and 4 without close-on-exec.
        unsafe {
            cmd.pre_exec(move || {
                let r = libc::fcntl(browser_reads, libc::F_DUPFD_CLOEXEC, 10);
                let w = libc::fcntl(browser_writes, libc::F_DUPFD_CLOEXEC, 10);
                if r < 0 || w < 0 || libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn chromium");
        // SAFETY: each descriptor came from pipe2 above and is owned by exactly one File.
        let (commands, mut events, theirs) = unsafe {
            (
                File::from_raw_fd(we_write),
                File::from_raw_fd(we_read),
                [
                    File::from_raw_fd(browser_reads),
                    File::from_raw_fd(browser_writes),
                ],
            )
        };
        drop(theirs); // the child has its copies; ours would keep the pipes from closing
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            loop {
                let n = match events.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.iter().position(|b| *b == 0) {
                    let msg: Vec<u8> = buf.drain(..=end).collect();
                    if let Ok(v) = serde_json::from_slice::<Value>(&msg[..msg.len() - 1]) {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Browser {
            child,
            commands,
            replies,
            next_id: 1,
            events: Vec::new(),
            _profile: profile,
        }
    }

    /// Sends one command (to the browser, or to a page `session`) and waits up to 30 s for its
    /// answer; events in between are dropped. `Err` carries a protocol error.
    fn try_call(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .unwrap_or_else(|e| panic!("{method}: writing to chromium: {e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .replies
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("{method}: no answer from chromium: {e}"));
            if v["id"] == json!(id) {
                return match v.get("error") {
                    Some(e) => Err(e.to_string()),
                    None => Ok(v["result"].clone()),
                };
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.try_call(session, method, params)
            .unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    /// Evaluates `expr` in the page (promises awaited): its JSON value, or `Err` with the
    /// exception or protocol error (e.g. no document yet while the page is loading).
    fn try_eval(&mut self, session: &str, expr: &str) -> Result<Value, String> {
        let r = self.try_call(
            Some(session),
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        )?;
        match r.get("exceptionDetails") {
            Some(e) => Err(e.to_string()),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    fn eval(&mut self, session: &str, expr: &str) -> Value {
        self.try_eval(session, expr)
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
    }

    /// Polls `expr` until it is truthy (not null/false/""/0); panics after `timeout` with the
    /// last value or error.
    fn wait_for(&mut self, session: &str, expr: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.try_eval(session, expr);
            let truthy = match &r {
                Ok(Value::Null | Value::Bool(false)) | Err(_) => false,
                Ok(Value::String(s)) => !s.is_empty(),
                Ok(Value::Number(n)) => n.as_f64() != Some(0.0),
                Ok(_) => true,
            };
            if truthy {
                return r.unwrap_or(Value::Null);
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {expr}; last: {r:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Opens `url` in a new tab and returns the tab's session id. Before the page's own code
    /// runs, a listener records Content-Security-Policy violations in
    /// `window.__cspViolations`, so tests can show the page works under its own policy.
    fn open(&mut self, url: &str) -> String {
        let target = self.call(None, "Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        let session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        self.call(Some(&session), "Page.enable", json!({}));
        self.call(Some(&session), "Network.enable", json!({}));
        self.call(
            Some(&session),
            "Page.addScriptToEvaluateOnNewDocument",
            json!({"source": "window.__cspViolations = []; \
                document.addEventListener('securitypolicyviolation', (e) => \
                window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));"}),
        );
        self.call(Some(&session), "Page.navigate", json!({"url": url}));
        session
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const READY: &str = "document.getElementById('main').dataset.state === 'ready'";

#[test]
fn console_sign_in_fragment_hand_over_and_show_key() {
    let test = "console_sign_in_fragment_hand_over_and_show_key";
    let Some(bin) = chromium_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(&dir.path().join("cp"), &Db::Sqlite);
    let admin = cp.admin_token();
    let seeded = seed(&cp.url, &admin);
    let mut b = Browser::start(&bin, dir.path());
    let wait = Duration::from_secs(30);

    // The fragment hand-over: the token ends up in sessionStorage and out of the address.
    let page = b.open(&format!("{}/console#token={admin}&view=keys", cp.url));
    b.wait_for(&page, READY, wait);
    let href = b.eval(&page, "location.href");
    let href = href.as_str().expect("href");
    assert!(
        !href.contains(&admin) && !href.contains("token="),
        "token left in the address: {href}"
    );
    assert!(href.ends_with("#view=keys"), "{href}");
    assert_eq!(
        b.eval(&page, "sessionStorage.getItem('portico.adminToken')"),
        json!(admin)
    );
    assert_eq!(b.eval(&page, "document.cookie"), json!(""));
    // Two entries, the blank tab and the console: the hand-over rewrote its entry in place
    // instead of pushing a clean one after the one holding the token.
    assert_eq!(
        b.eval(&page, "history.length"),
        json!(2),
        "a history entry kept the token"
    );

    // The key string appears only after "Show key", and goes again with "Hide key".
    let text = "document.body.innerText";
    let before = b.eval(&page, text);
    assert!(!before.as_str().unwrap_or("").contains(&seeded.key_string));
    let button =
        format!("document.querySelector('button[aria-label=\"Show key string of {KEY_NAME}\"]')");
    b.eval(&page, &format!("{button}.click()"));
    let shown = b.wait_for(
        &page,
        "document.querySelector('.key-string')?.textContent",
        wait,
    );
    assert_eq!(shown, json!(seeded.key_string));
    b.eval(
        &page,
        &format!(
            "document.querySelector('button[aria-label=\"Hide key string of {KEY_NAME}\"]').click()"
        ),
    );
    b.wait_for(
        &page,
        "document.querySelector('.key-string') === null",
        wait,
    );
    let after = b.eval(&page, text);
    assert!(!after.as_str().unwrap_or("").contains(&seeded.key_string));

    // Sign out forgets the token; a wrong one typed into the form gets the API's error; the
    // right one brings the view back.
    b.eval(&page, "document.getElementById('sign-out').click()");
    b.wait_for(
        &page,
        "document.getElementById('main').dataset.state === 'signed-out'",
        wait,
    );
    assert_eq!(
        b.eval(&page, "sessionStorage.getItem('portico.adminToken')"),
        Value::Null
    );
    let submit = |token: &str| {
        format!(
            "document.getElementById('token').value = {}; \
             document.getElementById('sign-in-form').requestSubmit()",
            json!(token)
        )
    };
    b.eval(&page, &submit("ptk_wrong"));
    let banner = b.wait_for(
        &page,
        "document.getElementById('main').dataset.state === 'error' && \
         document.getElementById('banner').textContent",
        wait,
    );
    assert!(
        banner
            .as_str()
            .unwrap_or("")
            .starts_with("UNAUTHENTICATED: Request had invalid authentication credentials"),
        "{banner}"
    );
    assert_eq!(
        b.eval(&page, "document.getElementById('sign-in').hidden"),
        json!(false),
        "the sign-in form should be offered again"
    );
    b.eval(&page, &submit(&admin));
    b.wait_for(&page, READY, wait);
    let body = b.eval(&page, text);
    assert!(body.as_str().unwrap_or("").contains(KEY_NAME), "{body}");
    assert_eq!(
        b.eval(&page, "document.getElementById('token').value"),
        json!("")
    );

    // Refresh re-reads the data: a key created behind the page's back shows up.
    ok(
        &cp.url,
        &admin,
        "POST",
        "/v2/projects/demo-proj/locations/global/keys",
        Some(json!({"displayName": "Created after load"})),
    );
    b.eval(&page, "document.getElementById('refresh').click()");
    b.wait_for(
        &page,
        "document.getElementById('main').dataset.state === 'ready' && \
         document.body.innerText.includes('Created after load')",
        wait,
    );

    assert_eq!(
        b.eval(&page, "window.__cspViolations"),
        json!([]),
        "the console broke its own Content-Security-Policy"
    );

    // The service page's selects: the status-class filter and the time window. A new tab has
    // its own sessionStorage, so the token is handed over again.
    let svc = b.open(&format!(
        "{}/console#token={admin}&view=service&service={SERVICE}",
        cp.url
    ));
    b.wait_for(&svc, READY, wait);
    let choose = |id: &str, value: &str| {
        format!(
            "{{ const s = document.getElementById('{id}'); s.value = '{value}'; \
             s.dispatchEvent(new Event('change')); }}"
        )
    };
    assert_eq!(
        b.eval(
            &svc,
            "document.querySelectorAll('#view td.status-2xx').length"
        ),
        json!(1)
    );
    b.eval(&svc, &choose("status-filter", "5xx"));
    b.wait_for(
        &svc,
        "location.hash.includes('status=5xx') && \
         document.getElementById('main').dataset.state === 'ready' && \
         document.querySelectorAll('#view td.status-5xx').length === 1 && \
         document.querySelectorAll('#view td.status-2xx').length === 0",
        wait,
    );
    b.eval(&svc, &choose("window", "6h"));
    let totals = b.wait_for(
        &svc,
        "location.hash.includes('since=6h') && \
         document.getElementById('main').dataset.state === 'ready' && \
         document.querySelector('.totals').textContent",
        wait,
    );
    let total = OK_REQUESTS + ERROR_REQUESTS;
    assert!(
        totals
            .as_str()
            .is_some_and(|t| t.contains(&format!("Requests: {total}"))
                && t.contains("per 5 minutes, last 6 hours")),
        "{totals}"
    );
    assert_eq!(b.eval(&svc, "window.__cspViolations"), json!([]));
    // Basic accessibility: every visible control has a label, every table a caption and
    // column headers, the chart an accessible name, and there is one h1.
    let unlabelled = b.eval(
        &svc,
        "[...document.querySelectorAll('input, select, button')] \
           .filter((el) => !el.closest('[hidden]')) \
           .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') \
             && !el.textContent.trim()) \
           .map((el) => el.outerHTML)",
    );
    assert_eq!(unlabelled, json!([]), "controls without a label");
    let bare_tables = b.eval(
        &svc,
        "[...document.querySelectorAll('table')] \
           .filter((t) => !t.caption || !t.querySelector('thead th[scope=col]')).length",
    );
    assert_eq!(
        bare_tables,
        json!(0),
        "tables without caption or column headers"
    );
    let chart_name = b.eval(
        &svc,
        "document.getElementById(document.querySelector('svg.chart') \
           .getAttribute('aria-labelledby')).textContent",
    );
    assert!(
        chart_name
            .as_str()
            .is_some_and(|n| n.contains(&format!("{total} requests"))),
        "{chart_name}"
    );
    assert_eq!(
        b.eval(&svc, "document.querySelectorAll('h1').length"),
        json!(1)
    );

    // Every request the page made: secrets only ever in the Authorization header, never in a
    // URL, no cookies, no referrer.
    b.eval(&page, "1"); // flush events that arrived after the last answer
    let requests: Vec<&Value> = b
        .events
        .iter()
        .filter(|e| e["method"] == "Network.requestWillBeSent")
        .map(|e| &e["params"]["request"])
        .collect();
    let api_calls: Vec<&&Value> = requests
        .iter()
        .filter(|r| {
            r["url"].as_str().is_some_and(|u| {
                let path = u.splitn(4, '/').nth(3).unwrap_or("");
                ["v1/", "v2/", "portico/"]
                    .iter()
                    .any(|p| path.starts_with(p))
            })
        })
        .collect();
    assert!(
        api_calls
            .iter()
            .any(|r| r["url"].as_str().is_some_and(|u| u.ends_with("/keyString"))),
        "no keyString request seen: {requests:?}"
    );
    for r in &requests {
        let url = r["url"].as_str().unwrap_or("");
        assert!(
            !url.contains(&admin) && !url.contains(&seeded.key_string),
            "a secret in a request URL: {url}"
        );
        let headers = r["headers"].as_object().cloned().unwrap_or_default();
        for (name, value) in &headers {
            let lower = name.to_ascii_lowercase();
            assert!(lower != "cookie", "{url} sent a cookie: {headers:?}");
            // DevTools lists an empty Referer when the policy suppressed it.
            assert!(
                lower != "referer" || value.as_str() == Some(""),
                "{url} sent a referrer: {headers:?}"
            );
        }
    }
    for r in &api_calls {
        let auth = r["headers"]
            .as_object()
            .and_then(|h| {
                h.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            })
            .and_then(|(_, v)| v.as_str())
            .unwrap_or("");
        assert!(
            auth.starts_with("Bearer "),
            "{} sent without the bearer token",
            r["url"]
        );
    }
}
