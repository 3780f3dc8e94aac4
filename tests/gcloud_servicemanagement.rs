//! Service Management and Service Usage driven by the real `gcloud` (528) against
//! `portico control-plane`, once on SQLite and once on PostgreSQL (separate tests so they run in
//! parallel). Covers: deploy (r0, r1), `--validate-only`, a rejected spec with its file:line in
//! gcloud's output, services list/describe/delete/undelete, configs list/describe, operations
//! describe, service IAM bindings, UNAUTHENTICATED without the admin token, a stale etag
//! answered with 409 ABORTED, and a restart that keeps everything.

mod common;

use common::{
    drop_postgres_schema, gcloud_available, postgres_or_skip, today_utc, ControlPlane, Db, Gcloud,
    Output,
};
use serde_json::{json, Value};
use std::path::Path;

const SVC: &str = "echo-api.endpoints.demo-proj.cloud.goog";
const SA_MEMBER: &str = "serviceAccount:echo-sa@demo-proj.iam.gserviceaccount.com";

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/servicemanagement")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Writes `spec` as `<dir>/openapi.yaml` (gcloud sends the basename, which diagnostics show).
fn spec_dir(root: &Path, name: &str, spec: &str) -> std::path::PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).expect("spec dir");
    std::fs::write(d.join("openapi.yaml"), spec).expect("write spec");
    d
}

fn must(out: Output, what: &str, cp: &ControlPlane) -> Output {
    assert!(
        out.ok(),
        "{what} failed:\n{out}\n--- server log ---\n{}",
        cp.log()
    );
    out
}

fn deploy(g: &Gcloud, dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["endpoints", "services", "deploy", "openapi.yaml"];
    args.extend_from_slice(extra);
    g.run_in(Some(dir), &args, std::time::Duration::from_secs(180))
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("client")
}

fn walkthrough(db: Db) {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cp = ControlPlane::start(&root.path().join("data"), &db);
    let g = Gcloud::new(&cp.url, &cp.admin_token_path());
    let day = today_utc();
    let v1 = spec_dir(root.path(), "v1", &fixture("echo-openapi.yaml"));
    let v2 = spec_dir(root.path(), "v2", &fixture("echo-openapi-v2.yaml"));
    let broken = spec_dir(root.path(), "broken", &fixture("broken-openapi.yaml"));

    // First deploy creates the service, submits r0, rolls it out and enables it.
    let out = must(deploy(&g, &v1, &[]), "first deploy", &cp);
    let r0 = format!("{day}r0");
    assert!(
        out.stderr.contains(&format!(
            "Service Configuration [{r0}] uploaded for service [{SVC}]"
        )),
        "{out}"
    );
    let submit_op = out
        .stderr
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("gcloud endpoints operations describe ")
                .filter(|op| op.starts_with("operations/serviceConfigs."))
        })
        .unwrap_or_else(|| panic!("no operation named in:\n{out}"))
        .to_string();

    // Second deploy: r1.
    let out = must(deploy(&g, &v2, &[]), "second deploy", &cp);
    let r1 = format!("{day}r1");
    assert!(
        out.stderr.contains(&format!(
            "Service Configuration [{r1}] uploaded for service [{SVC}]"
        )),
        "{out}"
    );

    // --validate-only prints the converted config and stores nothing.
    let out = must(deploy(&g, &v1, &["--validate-only"]), "validate-only", &cp);
    assert!(out.stdout.contains("serviceConfig:"), "{out}");
    assert!(out.stdout.contains(&format!("name: {SVC}")), "{out}");

    // A broken spec fails with the file:line location in gcloud's stderr.
    let out = deploy(&g, &broken, &[]);
    assert!(!out.ok(), "broken spec deployed:\n{out}");
    assert!(
        out.stderr
            .contains("INVALID_ARGUMENT: Cannot convert to service config."),
        "{out}"
    );
    assert!(out.stderr.contains("openapi.yaml:"), "{out}");

    // A YAML alias bomb and a deadline no proxy can use are refused
    // with their line, and the control plane stays up for what follows.
    let echo = fixture("echo-openapi.yaml");
    let mut bomb = echo.clone();
    bomb.push_str("x-bomb:\n  l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let refs = vec![format!("*l{}", i - 1); 10].join(", ");
        bomb.push_str(&format!("  l{i}: &l{i} [{refs}]\n"));
    }
    let bomb_line = echo.lines().count() + 7;
    let deadline = echo.replacen(
        "paths:\n",
        "x-google-backend:\n  address: https://b.example.com\n  deadline: 1e300\npaths:\n",
        1,
    );
    let deadline_line = deadline
        .lines()
        .position(|l| l.contains("1e300"))
        .expect("deadline line")
        + 1;
    for (name, spec, expected) in [
        (
            "bomb",
            bomb,
            format!("openapi.yaml:{bomb_line}:42: YAML aliases expand this document beyond 1000000 copied nodes"),
        ),
        (
            "deadline",
            deadline,
            format!("openapi.yaml:{deadline_line}:13: x-google-backend deadline 1e300 is out of range"),
        ),
    ] {
        let out = deploy(&g, &spec_dir(root.path(), name, &spec), &[]);
        assert!(!out.ok(), "{name} deployed:\n{out}");
        assert!(out.stderr.contains(&expected), "{name}: {out}");
    }

    // configs list: newest first, exactly the two deployed configs.
    let out = must(
        g.run(&[
            "endpoints",
            "configs",
            "list",
            "--service",
            SVC,
            "--format=value(id)",
        ]),
        "configs list",
        &cp,
    );
    let ids: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(ids, vec![r1.as_str(), r0.as_str()], "{out}");

    let out = must(
        g.run(&["endpoints", "configs", "describe", &r0, "--service", SVC]),
        "configs describe",
        &cp,
    );
    assert!(out.stdout.contains(&format!("id: {r0}")), "{out}");
    assert!(out.stdout.contains("producerProjectId: demo-proj"), "{out}");
    let out = g.run(&[
        "endpoints",
        "configs",
        "describe",
        "2020-01-01r9",
        "--service",
        SVC,
    ]);
    assert!(!out.ok());
    assert!(
        out.stderr.contains(&format!(
            "NOT_FOUND: Service configuration '2020-01-01r9' not found for service '{SVC}'."
        )),
        "{out}"
    );

    let out = must(
        g.run(&["endpoints", "services", "list"]),
        "services list",
        &cp,
    );
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with(SVC))
        .unwrap_or_else(|| panic!("{SVC} not listed:\n{out}"));
    // TITLE comes from the newest config (info.title of the fixture).
    assert!(row.trim_end().ends_with("Echo Sample"), "{out}");
    let out = must(
        g.run(&["endpoints", "services", "describe", SVC]),
        "services describe",
        &cp,
    );
    assert!(out.stdout.contains("producerProjectId: demo-proj"), "{out}");
    assert!(out.stdout.contains(&format!("serviceName: {SVC}")), "{out}");

    let out = must(
        g.run(&["endpoints", "operations", "describe", &submit_op]),
        "operations describe",
        &cp,
    );
    assert!(out.stdout.contains("done: true"), "{out}");
    assert!(out.stdout.contains(&format!("id: {r0}")), "{out}");

    let out = must(
        g.run(&[
            "endpoints",
            "operations",
            "list",
            "--service",
            SVC,
            "--format=value(name)",
        ]),
        "operations list",
        &cp,
    );
    assert!(out.stdout.lines().any(|l| l == submit_op), "{out}");
    assert_eq!(
        out.stdout
            .lines()
            .filter(|l| l.starts_with("operations/rollouts."))
            .count(),
        2,
        "{out}"
    );

    // The tutorial's batch enable, then the deploy's own enable, as `services list --enabled`.
    must(
        g.run(&[
            "services",
            "enable",
            "servicemanagement.googleapis.com",
            "servicecontrol.googleapis.com",
            "endpoints.googleapis.com",
        ]),
        "services enable",
        &cp,
    );
    let out = must(
        g.run(&[
            "services",
            "list",
            "--enabled",
            "--format=value(config.name)",
        ]),
        "services list --enabled",
        &cp,
    );
    let enabled: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        enabled,
        vec![
            SVC,
            "endpoints.googleapis.com",
            "servicecontrol.googleapis.com",
            "servicemanagement.googleapis.com"
        ],
        "{out}"
    );
    let out = g.run(&["services", "enable", "not-a-service.example.com"]);
    assert!(!out.ok(), "{out}");
    assert!(out.stderr.contains("not-a-service.example.com"), "{out}");

    // Service IAM.
    let out = must(
        g.run(&[
            "endpoints",
            "services",
            "add-iam-policy-binding",
            SVC,
            "--member",
            SA_MEMBER,
            "--role",
            "roles/servicemanagement.serviceController",
        ]),
        "add-iam-policy-binding",
        &cp,
    );
    assert!(
        out.stderr
            .contains(&format!("Updated IAM policy for service [{SVC}].")),
        "{out}"
    );
    let out = must(
        g.run(&["endpoints", "services", "get-iam-policy", SVC]),
        "get-iam-policy",
        &cp,
    );
    assert!(out.stdout.contains(SA_MEMBER), "{out}");
    assert!(
        out.stdout
            .contains("role: roles/servicemanagement.serviceController"),
        "{out}"
    );
    let out = must(
        g.run(&["endpoints", "services", "check-iam-policy", SVC]),
        "check-iam-policy",
        &cp,
    );
    assert!(
        out.stdout
            .contains("servicemanagement.services.setIamPolicy"),
        "{out}"
    );

    // A stale etag is a 409 ABORTED.
    let c = http();
    let resp = c
        .post(format!("{}/v1/services/{SVC}:setIamPolicy", cp.url))
        .bearer_auth(cp.admin_token())
        .json(&json!({"policy": {"bindings": [], "etag": "ACAB", "version": 1}}))
        .send()
        .expect("setIamPolicy");
    assert_eq!(resp.status().as_u16(), 409);
    let body: Value = resp.json().expect("json");
    assert_eq!(body["error"]["status"], "ABORTED", "{body}");

    // Without the admin token: UNAUTHENTICATED.
    let bogus = root.path().join("bogus-token");
    std::fs::write(&bogus, "not-the-admin-token\n").expect("write token");
    let stranger = Gcloud::new(&cp.url, &bogus);
    let out = stranger.run(&["endpoints", "services", "list"]);
    assert!(!out.ok(), "{out}");
    assert!(out.stderr.contains("UNAUTHENTICATED"), "{out}");

    // Delete hides the service; undelete brings it back.
    must(
        g.run(&["endpoints", "services", "delete", SVC]),
        "services delete",
        &cp,
    );
    let out = g.run(&["endpoints", "services", "describe", SVC]);
    assert!(!out.ok(), "deleted service still described:\n{out}");
    let out = must(
        g.run(&["endpoints", "services", "undelete", SVC]),
        "services undelete",
        &cp,
    );
    assert!(out.stdout.contains("done: true"), "{out}");

    // Restart: services, configs, rollouts and policies are all still there.
    cp.restart();
    g.configure(&cp.url, &cp.admin_token_path());
    let out = must(
        g.run(&[
            "endpoints",
            "configs",
            "list",
            "--service",
            SVC,
            "--format=value(id)",
        ]),
        "configs list after restart",
        &cp,
    );
    let ids: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(ids, vec![r1.as_str(), r0.as_str()], "{out}");
    let out = must(
        g.run(&["endpoints", "services", "get-iam-policy", SVC]),
        "get-iam-policy after restart",
        &cp,
    );
    assert!(out.stdout.contains(SA_MEMBER), "{out}");
    let rollouts: Value = c
        .get(format!("{}/v1/services/{SVC}/rollouts", cp.url))
        .bearer_auth(cp.admin_token())
        .send()
        .expect("rollouts")
        .json()
        .expect("json");
    let list = rollouts["rollouts"].as_array().expect("rollouts");
    // Newest first: the split undelete restored, the deletion's deleteServiceStrategy
    // rollout, then the rollouts of r1 and r0.
    assert_eq!(list.len(), 4, "{rollouts}");
    for i in [0, 2] {
        assert_eq!(
            list[i]["trafficPercentStrategy"]["percentages"][r1.as_str()],
            100.0,
            "{rollouts}"
        );
    }
    assert!(list[1].get("deleteServiceStrategy").is_some(), "{rollouts}");
    assert_eq!(
        list[3]["trafficPercentStrategy"]["percentages"][r0.as_str()],
        100.0,
        "{rollouts}"
    );
    // The next deploy continues the day's numbering.
    let out = must(deploy(&g, &v1, &[]), "deploy after restart", &cp);
    assert!(
        out.stderr
            .contains(&format!("Service Configuration [{day}r2] uploaded")),
        "{out}"
    );
    cp.stop();
    drop_postgres_schema(&db);
}

#[test]
fn gcloud_servicemanagement_sqlite() {
    if gcloud_available("gcloud_servicemanagement_sqlite") {
        walkthrough(Db::Sqlite);
    }
}

#[test]
fn gcloud_servicemanagement_postgres() {
    if !gcloud_available("gcloud_servicemanagement_postgres") {
        return;
    }
    if let Some(db) = postgres_or_skip("gcloud_servicemanagement_postgres") {
        walkthrough(db);
    }
}
