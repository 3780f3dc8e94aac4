//! Two control-plane replicas behind two proxies, end to end (docs/operations.md, "Several
//! nodes"):
//!
//! 1. control planes A and B on one PostgreSQL schema and one Redis, sharing the admin token file
//!    and the master key file, each on its own port;
//! 2. gcloud pointed at A deploys the echo spec, creates the service account, its key, the
//!    serviceController binding and an API key;
//! 3. one `portico echo`, two `portico esp` (proxy 1 reaches A, proxy 2 reaches B): 401 without
//!    the key, 200 with it on both (B checks a key A created: shared storage and master key);
//! 4. gcloud pointed at B deploys a config with a per-minute quota on POST /echo; requests sent
//!    alternately through both proxies are admitted up to the shared limit, the rest get 429
//!    code 8, and the Redis counter both replicas write holds exactly the limit;
//! 5. both replicas' rollups show every request sent through either proxy;
//! 6. A is killed: proxy 1 keeps serving its cached consumer, B and proxy 2 keep serving
//!    everything (traffic, the read API, gcloud); when A is back on its address, proxy 1's
//!    buffered reports arrive and both replicas count every request.
//!
//! Isolation: a fresh PostgreSQL schema per run; the control plane prefixes its Redis keys with
//! `portico:<schema>:`, so the shared Redis needs no database or prefix of its own.

mod common;

use common::{curl_echo, expect_ok, free_port, json, ControlPlane, Db, Gcloud, Proc};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SERVICE: &str = "echo-api.endpoints.demo-proj.cloud.goog";
const SA_EMAIL: &str = "esp-sa@demo-proj.iam.gserviceaccount.com";
const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The per-minute limit of step 4, in requests (each POST /echo costs 1).
const LIMIT: i64 = 10;
/// Requests sent in step 4, alternating between the proxies.
const QUOTA_REQUESTS: usize = 30;
/// Pause between two step-4 requests (each proxy sees one request every 2 × PACE).
const PACE: Duration = Duration::from_millis(700);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Skips loudly when Redis is absent (a failure when `CI=true`).
fn redis_or_skip(test: &str) -> bool {
    let up = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:6379".parse().expect("addr"),
        Duration::from_millis(500),
    )
    .is_ok();
    if !up {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: Redis is not reachable on 127.0.0.1:6379 and CI=true");
        }
        eprintln!("SKIPPED: {test}: Redis is not reachable on 127.0.0.1:6379");
    }
    up
}

/// A file only its owner can read (both secrets are refused or warned about otherwise).
fn write_secret(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .expect("create secret file");
    f.write_all(text.as_bytes()).expect("write secret");
}

fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .expect("read /dev/urandom");
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// The getting-started spec for demo-proj; with `limit`, POST /echo costs 1 unit of
/// `echo-requests`, limited to `limit` per minute per consumer project.
fn write_spec(dir: &Path, limit: Option<i64>) -> PathBuf {
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/echo/openapi.yaml"
    ))
    .expect("examples/echo/openapi.yaml");
    let mut spec = src.replace("YOUR-PROJECT-ID", "demo-proj");
    if let Some(limit) = limit {
        let op = "      operationId: \"echo\"\n";
        let at = spec.find(op).expect("spec has operationId echo") + op.len();
        spec.insert_str(
            at,
            "      x-google-quota:\n        metricCosts:\n          echo-requests: 1\n",
        );
        let paths = spec.find("\npaths:\n").expect("spec has paths:") + 1;
        spec.insert_str(
            paths,
            &format!(
                "x-google-management:\n  metrics:\n    - name: \"echo-requests\"\n      \
                 displayName: \"Echo requests\"\n      valueType: INT64\n      \
                 metricKind: DELTA\n  quota:\n    limits:\n      - name: \"echo-limit\"\n        \
                 metric: \"echo-requests\"\n        unit: \"1/min/{{project}}\"\n        \
                 values:\n          STANDARD: {limit}\n"
            ),
        );
    }
    let path = dir.join("openapi.yaml");
    std::fs::write(&path, spec).expect("write openapi.yaml");
    path
}

/// Deploys `dir/openapi.yaml` and returns the new config id gcloud printed.
fn deploy(gcloud: &Gcloud, dir: &Path) -> String {
    let out = gcloud.run_in(
        Some(dir),
        &["endpoints", "services", "deploy", "openapi.yaml"],
        Duration::from_secs(120),
    );
    expect_ok("deploy", &out);
    let marker = "Service Configuration [";
    let at = out
        .stderr
        .find(marker)
        .unwrap_or_else(|| panic!("no config id in deploy output:\n{out}"))
        + marker.len();
    let rest = &out.stderr[at..];
    rest[..rest.find(']').expect("closing bracket")].to_string()
}

/// Waits (≤ 30 s) until the proxy's status port reports `config_id` as the only config in force.
fn wait_for_rollout(status_port: u16, config_id: &str, esp: &Proc) {
    let client = http_client();
    let url = format!("http://127.0.0.1:{status_port}/endpoints_status");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = serde_json::Value::Null;
    loop {
        if let Ok(r) = client.get(&url).send() {
            if let Ok(v) = r.json::<serde_json::Value>() {
                last = v["processes"][0]["espStatus"][0]["serviceConfigRollouts"]["percentages"]
                    .clone();
                if last == serde_json::json!({ config_id: "100" }) {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "proxy on status port {status_port} did not serve {config_id} within 30 s \
             (percentages {last}); log:\n{}",
            esp.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn http_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// Sum of `requestCount` of the echo method in one replica's rollups over the last hour, or
/// `None` when the read API does not answer 200 with JSON.
fn echo_requests_reported(cp_url: &str, token: &str) -> Option<i64> {
    let resp = http_client()
        .get(format!(
            "{cp_url}/portico/v1/services/{SERVICE}/timeseries?since=1h"
        ))
        .bearer_auth(token)
        .send()
        .ok()?;
    if resp.status() != 200 {
        return None;
    }
    let v: serde_json::Value = resp.json().ok()?;
    Some(common::echo_request_count(&v))
}

/// Waits (≤ 30 s) until every replica in `cps` reports exactly `expected` echo requests; fails
/// at once if one reports more (a report counted twice).
fn wait_for_reports(cps: &[(&str, &str)], token: &str, expected: i64, logs: &dyn Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen: Vec<Option<i64>> = cps
            .iter()
            .map(|(_, url)| echo_requests_reported(url, token))
            .collect();
        for ((name, _), n) in cps.iter().zip(&seen) {
            assert!(
                n.is_none_or(|n| n <= expected),
                "control plane {name} reports {n:?} echo requests, more than the {expected} sent"
            );
        }
        if seen.iter().all(|n| *n == Some(expected)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "rollups did not reach {expected} echo requests within 30 s: {:?} = {seen:?}\n{}",
            cps.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The quota counters this run's replicas keep in Redis for the minute starting at
/// `window_start_ms`: (key, units used).
fn redis_counters(schema: &str, window_start_ms: u64) -> Vec<(String, i64)> {
    let client = redis::Client::open(REDIS_URL).expect("redis url");
    let mut con = client.get_connection().expect("connect to Redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("portico:{schema}:quota:*"))
        .query(&mut con)
        .expect("KEYS");
    let suffix = format!(":{window_start_ms}");
    keys.into_iter()
        .filter(|k| k.ends_with(&suffix))
        .map(|k| {
            let v: Option<i64> = redis::cmd("GET").arg(&k).query(&mut con).expect("GET");
            (k, v.unwrap_or(0))
        })
        .collect()
}

#[test]
fn two_control_planes_two_proxies_share_keys_quota_and_reports() {
    const TEST: &str = "multinode";
    if !common::gcloud_available(TEST) || !redis_or_skip(TEST) {
        return;
    }
    let Some(db) = common::postgres_or_skip(TEST) else {
        return;
    };
    let Db::Postgres { schema, .. } = &db else {
        unreachable!("postgres_or_skip returns Db::Postgres");
    };
    let schema = schema.clone();

    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).expect("work dir");

    // 1. The secrets every replica must share, provisioned once as an operator would (a
    //    Kubernetes Secret mounted into each replica), then two replicas on one schema and one
    //    Redis. Each has its own --data dir (logs only): nothing there is shared.
    let secrets = tmp.path().join("secrets");
    std::fs::create_dir_all(&secrets).expect("secrets dir");
    let token_file = secrets.join("admin-token");
    let master_key_file = secrets.join("master-key");
    write_secret(&token_file, &format!("{}\n", random_hex(32)));
    write_secret(&master_key_file, &format!("{}\n", random_hex(32)));
    let token = std::fs::read_to_string(&token_file)
        .expect("token")
        .trim()
        .to_string();
    let shared_flags = [
        "--redis-url",
        REDIS_URL,
        "--admin-token-file",
        token_file.to_str().expect("utf-8 path"),
        "--master-key-file",
        master_key_file.to_str().expect("utf-8 path"),
    ];
    let mut cp_a = ControlPlane::start_with(&tmp.path().join("cp-a"), &db, &shared_flags);
    let cp_b = ControlPlane::start_with(&tmp.path().join("cp-b"), &db, &shared_flags);
    assert_ne!(cp_a.addr, cp_b.addr);
    // Logs by path, so they can be shown after A is stopped.
    let cp_logs = [
        ("control plane A", cp_a.data_dir.join("control-plane.log")),
        ("control plane B", cp_b.data_dir.join("control-plane.log")),
        ("esp1 (A)", tmp.path().join("esp1.log")),
        ("esp2 (B)", tmp.path().join("esp2.log")),
    ];
    let all_logs = || -> String {
        cp_logs
            .iter()
            .map(|(name, path)| {
                format!(
                    "--- {name} ---\n{}\n",
                    std::fs::read_to_string(path).unwrap_or_default()
                )
            })
            .collect()
    };

    // 2. The walkthrough against A.
    let gcloud_a = Gcloud::new(&cp_a.url, &token_file);
    write_spec(&work, None);
    let config0 = deploy(&gcloud_a, &work);
    expect_ok(
        "service-accounts create",
        &gcloud_a.run(&[
            "iam",
            "service-accounts",
            "create",
            "esp-sa",
            "--display-name",
            "My Service Account",
        ]),
    );
    let key_file_a = work.join("service-account-creds.json");
    expect_ok(
        "keys create",
        &gcloud_a.run(&[
            "iam",
            "service-accounts",
            "keys",
            "create",
            key_file_a.to_str().expect("utf-8 path"),
            "--iam-account",
            SA_EMAIL,
        ]),
    );
    expect_ok(
        "endpoints add-iam-policy-binding",
        &gcloud_a.run(&[
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
    let out = gcloud_a.run(&[
        "services",
        "api-keys",
        "create",
        "--display-name=echo key",
        "--format=value(response.keyString)",
    ]);
    expect_ok("api-keys create", &out);
    let key = out.stdout.trim().to_string();
    assert!(key.starts_with("AIza"), "unexpected key string:\n{out}");

    // The key file names A (A's public URL is its listen address). Behind a load balancer every
    // replica would be started with --public-url set to the balancer's address and all proxies
    // would mount this one file (one Secret); whichever replica the balancer picks accepts the
    // key, because the public key is in the shared database. There is no balancer here, so the
    // second proxy gets the same credentials with token_uri pointing at B: the balancer sending
    // proxy 2 to B, made deterministic. (A second key created on B would test less: B would then
    // only ever see keys it issued itself.)
    let mut creds = json(&std::fs::read_to_string(&key_file_a).expect("key file"));
    let token_uri = creds["token_uri"].as_str().expect("token_uri").to_string();
    assert!(
        token_uri.starts_with(&format!("{}/", cp_a.url)),
        "token_uri {token_uri} does not name A ({})",
        cp_a.url
    );
    creds["token_uri"] = token_uri.replacen(&cp_a.url, &cp_b.url, 1).into();
    let key_file_b = work.join("service-account-creds-b.json");
    std::fs::write(&key_file_b, creds.to_string()).expect("write key file for B");

    // 3. One backend, two proxies.
    let backend_port = free_port();
    let mut echo = Proc::spawn(
        &["echo", "--port", &backend_port.to_string()],
        &tmp.path().join("echo.log"),
    );
    echo.wait_for_port(backend_port, "portico echo");
    let start_esp = |name: &str, key_file: &Path| -> (Proc, u16, u16) {
        let http_port = free_port();
        let status_port = free_port();
        let args = [
            "esp".to_string(),
            format!("--service={SERVICE}"),
            "--rollout_strategy=managed".to_string(),
            format!("--http_port={http_port}"),
            format!("--backend=localhost:{backend_port}"),
            format!("--service_account_key={}", key_file.display()),
            format!("--status_port={status_port}"),
        ];
        let mut p = Proc::spawn(&args, &tmp.path().join(format!("{name}.log")));
        p.wait_for_port(http_port, name);
        (p, http_port, status_port)
    };
    let (esp1, http1, status1) = start_esp("esp1", &key_file_a);
    let (esp2, http2, status2) = start_esp("esp2", &key_file_b);
    wait_for_rollout(status1, &config0, &esp1);
    wait_for_rollout(status2, &config0, &esp2);
    let proxies = [
        format!("http://127.0.0.1:{http1}"),
        format!("http://127.0.0.1:{http2}"),
    ];
    // Every POST /echo sent through either proxy; each one must be reported exactly once.
    let mut echo_sent: i64 = 0;
    for base in &proxies {
        let (status, body) = curl_echo(&format!("{base}/echo"));
        echo_sent += 1;
        assert_eq!(status, 401, "{base}: {body}\n{}", all_logs());
        assert_eq!(json(&body)["code"], 16, "{body}");
        let (status, body) = curl_echo(&format!("{base}/echo?key={key}"));
        echo_sent += 1;
        assert_eq!(status, 200, "{base}: {body}\n{}", all_logs());
        assert_eq!(json(&body), serde_json::json!({"message": "hello world"}));
    }

    // The other direction: a key created through B is accepted by proxy 1, which asks A.
    let gcloud_b = Gcloud::new(&cp_b.url, &token_file);
    let out = gcloud_b.run(&[
        "services",
        "api-keys",
        "create",
        "--display-name=echo key via B",
        "--format=value(response.keyString)",
    ]);
    expect_ok("api-keys create via B", &out);
    let key_b = out.stdout.trim().to_string();
    assert!(
        key_b.starts_with("AIza") && key_b != key,
        "unexpected key:\n{out}"
    );
    let (status, body) = curl_echo(&format!("{}/echo?key={key_b}", proxies[0]));
    echo_sent += 1;
    assert_eq!(
        status,
        200,
        "key from B via proxy 1: {body}\n{}",
        all_logs()
    );

    // 4. A per-minute quota, deployed through B this time.
    write_spec(&work, Some(LIMIT));
    let config1 = deploy(&gcloud_b, &work);
    assert_ne!(config1, config0);
    wait_for_rollout(status1, &config1, &esp1);
    wait_for_rollout(status2, &config1, &esp2);

    // The counters are per epoch-aligned minute; the burst below takes ~25 s, so start it early
    // in a minute (waiting out the current one if needed) so it all lands in one window.
    let sec = (now_ms() / 1000) % 60;
    if sec > 8 {
        std::thread::sleep(Duration::from_secs(60 - sec + 1));
    }
    let window_start = now_ms() / 60_000 * 60_000;
    let mut admitted = [0i64; 2];
    let mut exhausted = [0i64; 2];
    for i in 0..QUOTA_REQUESTS {
        let p = i % 2;
        let (status, body) = curl_echo(&format!("{}/echo?key={key}", proxies[p]));
        echo_sent += 1;
        match status {
            200 => admitted[p] += 1,
            429 => {
                let v = json(&body);
                assert_eq!(v["code"], 8, "429 without code 8: {body}");
                exhausted[p] += 1;
            }
            _ => panic!(
                "proxy {}: unexpected {status}: {body}\n{}",
                p + 1,
                all_logs()
            ),
        }
        std::thread::sleep(PACE);
    }
    assert_eq!(
        now_ms() / 60_000 * 60_000,
        window_start,
        "the quota burst crossed a minute boundary; the counts below would mix two windows"
    );
    let total_admitted = admitted[0] + admitted[1];
    eprintln!(
        "quota: admitted {admitted:?}, 429 {exhausted:?} (limit {LIMIT}/min, {QUOTA_REQUESTS} sent)"
    );
    // Why a bound and not equality: as in ESP, a proxy admits on its cached verdict and sends the
    // aggregated cost in the background once per refresh interval (1 s, on a 1 s tick). After the
    // shared counter is full, each proxy keeps admitting until the answer to its next allocation
    // arrives: at most about one tick plus one skipped tick (allocation in flight) plus a round
    // trip, ~2.5 s, in which it sees at most 2 of our requests (one every 2 × 700 ms). Hence
    // LIMIT ≤ admitted ≤ LIMIT + 3 per proxy. The bound stays below 2 × LIMIT, what two replicas
    // with separate counters would admit.
    let slack_per_proxy = 3;
    assert!(
        total_admitted >= LIMIT && total_admitted <= LIMIT + 2 * slack_per_proxy,
        "admitted {total_admitted} requests ({admitted:?}) with a shared limit of {LIMIT}/min\n{}",
        all_logs()
    );
    assert!(
        exhausted[0] > 0 && exhausted[1] > 0,
        "both proxies must learn the shared verdict: 429s per proxy {exhausted:?}"
    );
    // The exact count of allocated units: the counter both replicas increment (atomically, in a
    // Lua script) never exceeds the limit, and a 429 only follows a full counter.
    let counters = redis_counters(&schema, window_start);
    assert_eq!(
        counters.len(),
        1,
        "expected one quota counter for this minute under portico:{schema}:, got {counters:?}"
    );
    assert_eq!(
        counters[0].1, LIMIT,
        "units allocated in Redis this minute ({}), want exactly the limit",
        counters[0].0
    );

    // 5. Reports from both proxies land in the same rollups, read through either replica.
    wait_for_reports(
        &[("A", &cp_a.url), ("B", &cp_b.url)],
        &token,
        echo_sent,
        &all_logs,
    );

    // 6. The operator lifts the limit (through B), then A dies.
    write_spec(&work, Some(1_000_000));
    let config2 = deploy(&gcloud_b, &work);
    wait_for_rollout(status1, &config2, &esp1);
    wait_for_rollout(status2, &config2, &esp2);
    // A proxy re-asks a refused allocation once per refresh interval; wait until both admit.
    for (p, base) in proxies.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (status, body) = curl_echo(&format!("{base}/echo?key={key}"));
            echo_sent += 1;
            if status == 200 {
                break;
            }
            assert!(
                status == 429 && Instant::now() < deadline,
                "proxy {} still refuses after the limit was lifted: {status} {body}",
                p + 1
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    wait_for_reports(
        &[("A", &cp_a.url), ("B", &cp_b.url)],
        &token,
        echo_sent,
        &all_logs,
    );
    let reported_before_outage = echo_sent;

    cp_a.stop();
    const DURING_OUTAGE: i64 = 20;
    for i in 0..DURING_OUTAGE {
        for (p, base) in proxies.iter().enumerate() {
            let (status, body) = curl_echo(&format!("{base}/echo?key={key}"));
            assert_eq!(
                status,
                200,
                "request {i} through proxy {} after A was killed: {body}\n{}",
                p + 1,
                all_logs()
            );
        }
    }
    // B keeps serving its read API and Service Control: proxy 2's requests made during the
    // outage reach B's rollups (proxy 1's are buffered for A, so the count is exactly these).
    wait_for_reports(
        &[("B", &cp_b.url)],
        &token,
        reported_before_outage + DURING_OUTAGE,
        &all_logs,
    );
    // And Service Management through B still works for gcloud.
    expect_ok(
        "services describe via B",
        &gcloud_b.run(&["endpoints", "services", "describe", SERVICE]),
    );

    // A comes back on its address (the one proxy 1's key file names): the reports proxy 1
    // buffered during the outage are delivered, and both replicas count every request.
    let a_addr = cp_a.addr.to_string();
    drop(cp_a);
    let cp_a = ControlPlane::start_on(&tmp.path().join("cp-a"), &db, &a_addr, &shared_flags);
    wait_for_reports(
        &[("A", &cp_a.url), ("B", &cp_b.url)],
        &token,
        reported_before_outage + 2 * DURING_OUTAGE,
        &all_logs,
    );

    drop(esp1);
    drop(esp2);
    drop(echo);
    drop(cp_b);
    drop(cp_a);
    common::drop_postgres_schema(&db);
}
