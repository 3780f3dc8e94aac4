//! Identity driven by the real `gcloud` (528) against `portico control-plane`, on SQLite and on
//! PostgreSQL (separate tests so they run in parallel):
//! service accounts (create, duplicate, bad id, list), keys (create → a key file that loads with
//! `portico_credentials`), the OAuth2 JWT-bearer grant at the key file's `token_uri` (success,
//! replay refused, expired / over-long / wrong-audience assertions refused), `gcloud auth
//! activate-service-account` and IAM enforcement on its calls (403 before and 200 after
//! `endpoints services add-iam-policy-binding ... roles/servicemanagement.serviceController`),
//! ESP-style self-signed JWTs as bearer tokens, project IAM policies (`roles/cloudtrace.agent`,
//! stale etag → 409 ABORTED), project roles for a service account on the API Keys API, API keys
//! (create with an API target, list, get-key-string, lookup, delete, undelete, update), a deleted
//! key that stops working at once, and that neither key strings nor private keys are stored in
//! the clear (the SQLite files, or every text column of every table in the PostgreSQL schema).

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{postgres_or_skip, ControlPlane, Db, Gcloud, Output};
use portico_credentials::ServiceAccountKey;
use serde_json::{json, Value};

const SVC: &str = "echo-api.endpoints.demo-proj.cloud.goog";
const SA_EMAIL: &str = "esp-sa@demo-proj.iam.gserviceaccount.com";
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

fn must(out: Output, what: &str, cp: &ControlPlane) -> Output {
    assert!(
        out.ok(),
        "{what} failed:\n{out}\n--- server log ---\n{}",
        cp.log()
    );
    out
}

fn must_fail(out: Output, what: &str, expect: &str) -> Output {
    assert!(!out.ok(), "{what} unexpectedly succeeded:\n{out}");
    assert!(
        out.stderr.contains(expect),
        "{what}: expected {expect:?} in stderr:\n{out}"
    );
    out
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A gcloud whose only credential is whatever `auth activate-service-account` stores (no
/// `access_token_file`), so its calls carry the service account's access token.
fn service_account_gcloud(base_url: &str, any_token_file: &Path) -> Gcloud {
    let g = Gcloud::new(base_url, any_token_file);
    let conf = g.config_dir().join("configurations/config_default");
    let text = std::fs::read_to_string(&conf).expect("read gcloud config");
    let without_token: String = text
        .lines()
        .filter(|l| !l.starts_with("access_token_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&conf, without_token).expect("rewrite gcloud config");
    g
}

/// POSTs a JWT-bearer grant; returns (status, body).
fn token_grant(token_uri: &str, assertion: &str) -> (u16, Value) {
    let resp = http()
        .post(token_uri)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        ))
        .send()
        .expect("POST token");
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

fn get_with(url: &str, token: &str) -> (u16, Value) {
    let resp = http().get(url).bearer_auth(token).send().expect("GET");
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

fn post_json(url: &str, token: &str, body: &Value) -> (u16, Value) {
    let resp = http()
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .expect("POST");
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

/// Every text column of every table in the PostgreSQL test schema, concatenated.
fn postgres_text_dump(url: &str, schema: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .expect("connect postgres");
        let cols: Vec<(String, String)> = sqlx::query_as(
            "SELECT table_name::text, column_name::text FROM information_schema.columns \
             WHERE table_schema = $1 AND data_type IN ('text', 'character varying', 'bytea', \
             'json', 'jsonb')",
        )
        .bind(schema)
        .fetch_all(&pool)
        .await
        .expect("list columns");
        assert!(
            cols.iter().any(|(t, _)| t == "apikeys_keys"),
            "schema {schema} has no apikeys_keys table: {cols:?}"
        );
        let mut dump = String::new();
        for (table, column) in cols {
            let sql = format!(
                "SELECT COALESCE(string_agg(\"{column}\"::text, E'\\n'), '') FROM \"{schema}\".\"{table}\""
            );
            let (text,): (String,) = sqlx::query_as(&sql)
                .fetch_one(&pool)
                .await
                .unwrap_or_else(|e| panic!("dump {table}.{column}: {e}"));
            dump.push_str(&text);
            dump.push('\n');
        }
        pool.close().await;
        dump
    })
}

/// Bytes of every file of the SQLite database (main file, WAL, shared memory).
fn sqlite_bytes(data_dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    let mut seen = 0;
    for entry in std::fs::read_dir(data_dir).expect("data dir") {
        let p = entry.expect("entry").path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("portico.db") {
            all.extend(std::fs::read(&p).expect("read db file"));
            seen += 1;
        }
    }
    assert!(seen > 0, "no SQLite files in {}", data_dir.display());
    all
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn identity_walkthrough(db: Db) {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let cp = ControlPlane::start(&data, &db);
    let admin = Gcloud::new(&cp.url, &cp.admin_token_path());
    let admin_token = cp.admin_token();

    // --- Service accounts --------------------------------------------------------------------
    let out = must(
        admin.run(&[
            "iam",
            "service-accounts",
            "create",
            "esp-sa",
            "--display-name",
            "My Service Account",
        ]),
        "service-accounts create",
        &cp,
    );
    assert!(
        out.stderr.contains("Created service account [esp-sa]"),
        "{out}"
    );
    must_fail(
        admin.run(&["iam", "service-accounts", "create", "esp-sa"]),
        "duplicate create",
        "Service account esp-sa already exists within project projects/demo-proj.",
    );
    must_fail(
        admin.run(&["iam", "service-accounts", "create", "Bad_Name"]),
        "bad account id",
        "INVALID_ARGUMENT: Invalid account ID 'Bad_Name'",
    );
    let out = must(
        admin.run(&[
            "iam",
            "service-accounts",
            "list",
            "--format=value(email,displayName)",
        ]),
        "service-accounts list",
        &cp,
    );
    assert!(
        out.stdout
            .contains(&format!("{SA_EMAIL}\tMy Service Account")),
        "{out}"
    );
    let out = must(
        admin.run(&[
            "iam",
            "service-accounts",
            "describe",
            SA_EMAIL,
            "--format=json",
        ]),
        "describe",
        &cp,
    );
    let described: Value = serde_json::from_str(&out.stdout).expect("describe json");
    assert_eq!(described["projectId"], "demo-proj");

    // --- Keys ---------------------------------------------------------------------------------
    let work = root.path().join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    let out = must(
        admin.run_in(
            Some(&work),
            &[
                "iam",
                "service-accounts",
                "keys",
                "create",
                "./service-account-creds.json",
                "--iam-account",
                SA_EMAIL,
            ],
            Duration::from_secs(120),
        ),
        "keys create",
        &cp,
    );
    let key_path = work.join("service-account-creds.json");
    let key = ServiceAccountKey::from_file(&key_path).expect("key file loads");
    assert!(
        out.stderr.contains(&format!(
            "created key [{}] of type [json] as [./service-account-creds.json] for [{SA_EMAIL}]",
            key.private_key_id
        )),
        "{out}"
    );
    assert_eq!(key.client_email, SA_EMAIL);
    assert_eq!(key.project_id, "demo-proj");
    assert_eq!(key.token_uri, format!("{}/token", cp.url));
    assert_eq!(key.client_id, described["uniqueId"].as_str().unwrap_or("?"));
    let out = must(
        admin.run(&[
            "iam",
            "service-accounts",
            "keys",
            "list",
            "--iam-account",
            SA_EMAIL,
            "--format=value(name)",
        ]),
        "keys list",
        &cp,
    );
    assert!(out.stdout.contains(&key.private_key_id), "{out}");

    // --- JWT-bearer grant ---------------------------------------------------------------------
    let t0 = now();
    let assertion = key
        .jwt_bearer_assertion(CLOUD_PLATFORM, t0, 600)
        .expect("assertion");
    let (status, body) = token_grant(&key.token_uri, &assertion);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    let access_token = body["access_token"]
        .as_str()
        .expect("access_token")
        .to_string();
    let (status, body) = token_grant(&key.token_uri, &assertion);
    assert_eq!(status, 400, "replay must be refused: {body}");
    assert_eq!(body["error"], "invalid_grant");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap_or("")
            .contains("already been used"),
        "{body}"
    );
    // gcloud's fixed audience is accepted too.
    let google_aud = key
        .sign_jwt(&json!({
            "iss": SA_EMAIL, "aud": "https://oauth2.googleapis.com/token",
            "scope": CLOUD_PLATFORM, "iat": t0, "exp": t0 + 3600,
        }))
        .expect("sign");
    assert_eq!(token_grant(&key.token_uri, &google_aud).0, 200);
    for (why, claims) in [
        (
            "expired",
            json!({"iss": SA_EMAIL, "aud": key.token_uri, "scope": CLOUD_PLATFORM,
                   "iat": t0 - 7200, "exp": t0 - 3600}),
        ),
        (
            "lifetime over an hour",
            json!({"iss": SA_EMAIL, "aud": key.token_uri, "scope": CLOUD_PLATFORM,
                   "iat": t0, "exp": t0 + 7200}),
        ),
        (
            "wrong audience",
            json!({"iss": SA_EMAIL, "aud": "https://example.com/token", "scope": CLOUD_PLATFORM,
                   "iat": t0, "exp": t0 + 600}),
        ),
        (
            "no scope",
            json!({"iss": SA_EMAIL, "aud": key.token_uri, "iat": t0, "exp": t0 + 600}),
        ),
        (
            "issuer not the key's account",
            json!({"iss": "other-sa@demo-proj.iam.gserviceaccount.com", "aud": key.token_uri,
                   "scope": CLOUD_PLATFORM, "iat": t0, "exp": t0 + 600}),
        ),
    ] {
        let jwt = key.sign_jwt(&claims).expect("sign");
        let (status, body) = token_grant(&key.token_uri, &jwt);
        assert_eq!(status, 400, "{why}: {body}");
        assert_eq!(body["error"], "invalid_grant", "{why}: {body}");
    }
    // The token authenticates (403 on a project it has no role in, not 401); garbage does not.
    let sa_list_url = format!("{}/v1/projects/demo-proj/serviceAccounts", cp.url);
    let (status, body) = get_with(&sa_list_url, &access_token);
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["status"], "PERMISSION_DENIED");
    assert_eq!(get_with(&sa_list_url, "ya29.not-a-token").0, 401);

    // --- Deploy as admin; the service account needs the serviceController role ----------------
    let spec = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/servicemanagement/echo-openapi.yaml"),
    )
    .expect("fixture");
    let spec_dir = root.path().join("spec");
    std::fs::create_dir_all(&spec_dir).expect("spec dir");
    std::fs::write(spec_dir.join("openapi.yaml"), spec).expect("write spec");
    must(
        admin.run_in(
            Some(&spec_dir),
            &["endpoints", "services", "deploy", "openapi.yaml"],
            Duration::from_secs(180),
        ),
        "deploy",
        &cp,
    );

    let sa = service_account_gcloud(&cp.url, &cp.admin_token_path());
    let out = must(
        sa.run(&[
            "auth",
            "activate-service-account",
            "--key-file",
            key_path.to_str().expect("utf8 path"),
        ]),
        "activate-service-account",
        &cp,
    );
    assert!(out.stderr.contains(SA_EMAIL), "{out}");
    must_fail(
        sa.run(&["endpoints", "configs", "list", &format!("--service={SVC}")]),
        "configs list without a role",
        "does not have permission",
    );
    must(
        admin.run(&[
            "endpoints",
            "services",
            "add-iam-policy-binding",
            SVC,
            "--member",
            &format!("serviceAccount:{SA_EMAIL}"),
            "--role",
            "roles/servicemanagement.serviceController",
        ]),
        "add serviceController binding",
        &cp,
    );
    let out = must(
        sa.run(&[
            "endpoints",
            "configs",
            "list",
            &format!("--service={SVC}"),
            "--format=value(id)",
        ]),
        "configs list with serviceController",
        &cp,
    );
    assert!(out.stdout.trim().ends_with("r0"), "{out}");
    // A disabled account is locked out until enabled again.
    must(
        admin.run(&["iam", "service-accounts", "disable", SA_EMAIL]),
        "service-accounts disable",
        &cp,
    );
    must_fail(
        sa.run(&["endpoints", "configs", "list", &format!("--service={SVC}")]),
        "configs list while disabled",
        "is disabled",
    );
    must(
        admin.run(&["iam", "service-accounts", "enable", SA_EMAIL]),
        "service-accounts enable",
        &cp,
    );
    must(
        sa.run(&["endpoints", "configs", "list", &format!("--service={SVC}")]),
        "configs list after enable",
        &cp,
    );
    // The role is scoped to that service: project admin APIs stay closed.
    must_fail(
        sa.run(&["iam", "service-accounts", "list"]),
        "SA listing accounts without a project role",
        "Permission 'iam.serviceAccounts.list' denied",
    );

    // ESP's runtime credential: a self-signed JWT used directly as the bearer token.
    let configs_url = format!("{}/v1/services/{SVC}/configs", cp.url);
    let esp_token = key
        .self_signed_token(
            &format!("{}/google.api.servicemanagement.v1.ServiceManager", cp.url),
            now(),
            3600,
        )
        .expect("self-signed");
    let (status, body) = get_with(&configs_url, &esp_token);
    assert_eq!(status, 200, "{body}");
    let wrong_aud = key
        .self_signed_token("https://example.com/some-other-api", now(), 3600)
        .expect("self-signed");
    let (status, body) = get_with(&configs_url, &wrong_aud);
    assert_eq!(status, 401, "{body}");

    // --- Project IAM policy ------------------------------------------------------------------
    let out = must(
        admin.run(&[
            "projects",
            "add-iam-policy-binding",
            "demo-proj",
            "--member",
            &format!("serviceAccount:{SA_EMAIL}"),
            "--role",
            "roles/cloudtrace.agent",
        ]),
        "projects add-iam-policy-binding",
        &cp,
    );
    assert!(
        out.stderr
            .contains("Updated IAM policy for project [demo-proj]."),
        "{out}"
    );
    let out = must(
        admin.run(&["projects", "get-iam-policy", "demo-proj", "--format=json"]),
        "projects get-iam-policy",
        &cp,
    );
    let policy: Value = serde_json::from_str(&out.stdout).expect("policy json");
    assert_eq!(policy["version"], 3, "{policy}");
    let bindings = policy["bindings"].as_array().expect("bindings");
    assert!(
        bindings
            .iter()
            .any(|b| b["role"] == "roles/cloudtrace.agent"
                && b["members"].as_array().is_some_and(|m| m
                    .iter()
                    .any(|x| x == &json!(format!("serviceAccount:{SA_EMAIL}"))))),
        "{policy}"
    );
    // A writer holding the never-set etag loses to the change above.
    let (status, body) = post_json(
        &format!("{}/v1/projects/demo-proj:setIamPolicy", cp.url),
        &admin_token,
        &json!({"policy": {"bindings": [], "etag": "ACAB", "version": 3}}),
    );
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["status"], "ABORTED");

    // --- API keys ----------------------------------------------------------------------------
    let out = must(
        admin.run(&[
            "services",
            "api-keys",
            "create",
            "--display-name=echo key",
            &format!("--api-target=service={SVC}"),
            "--key-id=echo-key",
            "--format=json",
        ]),
        "api-keys create",
        &cp,
    );
    let op: Value = serde_json::from_str(&out.stdout).expect("create op json");
    let key_string = op["response"]["keyString"]
        .as_str()
        .unwrap_or_else(|| panic!("no keyString in {op}"))
        .to_string();
    assert!(
        key_string.starts_with("AIza") && key_string.len() == 39,
        "{key_string}"
    );
    assert_eq!(
        op["response"]["restrictions"]["apiTargets"][0]["service"],
        SVC
    );
    let key_name = op["response"]["name"].as_str().expect("name").to_string();
    assert!(
        key_name.ends_with("/locations/global/keys/echo-key"),
        "{key_name}"
    );
    let out = must(
        admin.run(&["services", "api-keys", "list", "--format=value(name)"]),
        "api-keys list",
        &cp,
    );
    assert!(out.stdout.contains(&key_name), "{out}");
    let out = must(
        admin.run(&[
            "services",
            "api-keys",
            "get-key-string",
            &key_name,
            "--format=value(keyString)",
        ]),
        "get-key-string by full name (project number)",
        &cp,
    );
    assert_eq!(out.stdout.trim(), key_string);
    let out = must(
        admin.run(&["services", "api-keys", "lookup", &key_string]),
        "api-keys lookup",
        &cp,
    );
    assert!(out.stdout.contains(&format!("name: {key_name}")), "{out}");
    must(
        admin.run(&[
            "services",
            "api-keys",
            "update",
            "echo-key",
            "--allowed-ips=10.0.0.0/8,192.0.2.7",
        ]),
        "api-keys update",
        &cp,
    );
    must(
        admin.run(&["services", "api-keys", "delete", "echo-key"]),
        "api-keys delete",
        &cp,
    );
    let out = must(
        admin.run(&["services", "api-keys", "list", "--format=value(name)"]),
        "list without deleted",
        &cp,
    );
    assert!(!out.stdout.contains(&key_name), "{out}");
    let out = must(
        admin.run(&[
            "services",
            "api-keys",
            "list",
            "--show-deleted",
            "--format=value(name,deleteTime)",
        ]),
        "list --show-deleted",
        &cp,
    );
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with(&key_name))
        .unwrap_or_else(|| panic!("deleted key missing from --show-deleted:\n{out}"));
    assert!(
        line.contains('\t') && line.trim_end().len() > key_name.len(),
        "{line}"
    );
    must_fail(
        admin.run(&["services", "api-keys", "lookup", &key_string]),
        "lookup of a deleted key",
        "NOT_FOUND",
    );
    must(
        admin.run(&["services", "api-keys", "undelete", "echo-key"]),
        "api-keys undelete",
        &cp,
    );
    let out = must(
        admin.run(&[
            "services",
            "api-keys",
            "describe",
            "echo-key",
            "--format=json",
        ]),
        "describe after undelete",
        &cp,
    );
    let described: Value = serde_json::from_str(&out.stdout).expect("key json");
    assert!(described.get("deleteTime").is_none(), "{described}");
    assert_eq!(
        described["restrictions"]["serverKeyRestrictions"]["allowedIps"],
        json!(["10.0.0.0/8", "192.0.2.7"])
    );
    assert!(described.get("keyString").is_none(), "{described}");

    // A project role opens the API Keys API to the service account.
    must_fail(
        sa.run(&["services", "api-keys", "list"]),
        "SA api-keys list without a project role",
        "Permission 'apikeys.keys.list' denied",
    );
    must(
        admin.run(&[
            "projects",
            "add-iam-policy-binding",
            "demo-proj",
            "--member",
            &format!("serviceAccount:{SA_EMAIL}"),
            "--role",
            "roles/serviceusage.apiKeysViewer",
        ]),
        "grant apiKeysViewer",
        &cp,
    );
    let out = must(
        sa.run(&["services", "api-keys", "list", "--format=value(name)"]),
        "SA api-keys list as apiKeysViewer",
        &cp,
    );
    assert!(out.stdout.contains(&key_name), "{out}");
    must_fail(
        sa.run(&["services", "api-keys", "get-key-string", "echo-key"]),
        "viewer reading a key string",
        "Permission 'apikeys.keys.getKeyString' denied",
    );

    // --- Secrets at rest ---------------------------------------------------------------------
    let pem_body_line = key
        .private_key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .nth(3)
        .expect("PEM body line")
        .to_string();
    let log = cp.log();
    for (what, secret) in [
        ("API key string", &key_string),
        ("private key", &pem_body_line),
    ] {
        assert!(
            !log.contains(secret.as_str()),
            "{what} appears in the server log"
        );
        match &db {
            Db::Sqlite => {
                let bytes = sqlite_bytes(&data);
                assert!(
                    !contains(&bytes, secret),
                    "{what} stored in clear in SQLite"
                );
            }
            Db::Postgres { url, schema } => {
                let dump = postgres_text_dump(url, schema);
                assert!(
                    !dump.contains(secret.as_str()),
                    "{what} stored in clear in PostgreSQL"
                );
                // The dump is not vacuous: the key's public record is there.
                assert!(dump.contains("echo-key"), "dump lacks the API key row");
            }
        }
    }

    // --- Deleting the key revokes what it minted ------------------------------------------------
    must(
        admin.run(&[
            "iam",
            "service-accounts",
            "keys",
            "delete",
            &key.private_key_id,
            "--iam-account",
            SA_EMAIL,
        ]),
        "keys delete",
        &cp,
    );
    let (status, body) = get_with(&configs_url, &access_token);
    assert_eq!(status, 401, "access token of a deleted key: {body}");
    let (status, body) = get_with(&configs_url, &esp_token);
    assert_eq!(status, 401, "self-signed JWT of a deleted key: {body}");
    let fresh = key
        .jwt_bearer_assertion(CLOUD_PLATFORM, now(), 600)
        .expect("assertion");
    let (status, body) = token_grant(&key.token_uri, &fresh);
    assert_eq!(status, 400, "grant with a deleted key: {body}");
    must_fail(
        sa.run(&["endpoints", "configs", "list", &format!("--service={SVC}")]),
        "gcloud with a deleted key",
        // gcloud gets 401, tries to refresh, and the grant is refused.
        "invalid_grant: Invalid JWT Signature.",
    );

    // Deleting the account.
    must(
        admin.run(&["iam", "service-accounts", "delete", SA_EMAIL]),
        "service-accounts delete",
        &cp,
    );
    must_fail(
        admin.run(&["iam", "service-accounts", "describe", SA_EMAIL]),
        "describe deleted account",
        "NOT_FOUND",
    );
}

#[test]
fn gcloud_identity_sqlite() {
    identity_walkthrough(Db::Sqlite);
}

#[test]
fn gcloud_identity_postgres() {
    if let Some(db) = postgres_or_skip("gcloud_identity_postgres") {
        identity_walkthrough(db);
    }
}
