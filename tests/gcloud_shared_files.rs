//! `gcloud endpoints services deploy api.yaml common.yaml` with the real `gcloud` (528) against
//! `portico control-plane`: an API whose definitions, a parameter and a path item live in a
//! second file. gcloud sends each file under its base name and only files with `swagger` and
//! `host`; the control plane resolves the `$ref`s between them and refuses a missing file with
//! the referring file and line in gcloud's output.

mod common;

use common::{gcloud_available, today_utc, ControlPlane, Db, Gcloud, Output};
use std::path::Path;
use std::time::Duration;

const SVC: &str = "echo-api.endpoints.demo-proj.cloud.goog";

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/servicemanagement")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn deploy(g: &Gcloud, dir: &Path, files: &[&str]) -> Output {
    let mut args = vec!["endpoints", "services", "deploy"];
    args.extend_from_slice(files);
    g.run_in(Some(dir), &args, Duration::from_secs(180))
}

fn config_count(g: &Gcloud) -> usize {
    let out = g.run(&[
        "endpoints",
        "configs",
        "list",
        "--service",
        SVC,
        "--format=value(id)",
    ]);
    assert!(out.ok(), "configs list: {out}");
    out.stdout.lines().count()
}

#[test]
fn gcloud_deploys_an_api_split_over_two_files() {
    if !gcloud_available("gcloud_deploys_an_api_split_over_two_files") {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(&root.path().join("data"), &Db::Sqlite);
    let g = Gcloud::new(&cp.url, &cp.admin_token_path());
    let day = today_utc();
    let api = fixture("echo-split-openapi.yaml");
    let shared = fixture("echo-common.yaml");
    let dir = root.path().join("specs");
    std::fs::create_dir_all(dir.join("shared")).expect("spec dirs");
    std::fs::write(dir.join("echo-split-openapi.yaml"), &api).expect("write");
    std::fs::write(dir.join("echo-common.yaml"), &shared).expect("write");
    // The same file in a subdirectory: gcloud sends it as "echo-common.yaml" all the same.
    std::fs::write(dir.join("shared/echo-common.yaml"), &shared).expect("write");

    let out = deploy(&g, &dir, &["echo-split-openapi.yaml", "echo-common.yaml"]);
    assert!(
        out.ok(),
        "deploy failed:\n{out}\n--- server log ---\n{}",
        cp.log()
    );
    assert!(
        out.stderr.contains(&format!(
            "Service Configuration [{day}r0] uploaded for service [{SVC}]"
        )),
        "{out}"
    );
    let out = g.run(&[
        "endpoints",
        "configs",
        "describe",
        &format!("{day}r0"),
        "--service",
        SVC,
        "--format=json",
    ]);
    assert!(out.ok(), "{out}");
    let cfg: serde_json::Value = serde_json::from_str(&out.stdout).expect("json config");
    let rules: Vec<(String, String)> = cfg["http"]["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            let method = ["get", "post"]
                .into_iter()
                .find(|m| r.get(*m).is_some())
                .unwrap_or_default();
            (
                method.to_string(),
                r[method].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        rules,
        [
            ("post".to_string(), "/echo".to_string()),
            ("get".to_string(), "/echo/{id}".to_string())
        ],
        "{cfg}"
    );
    assert_eq!(cfg["apis"].as_array().map(Vec::len), Some(1), "{cfg}");

    // From a subdirectory: the base name is what the control plane sees.
    let out = deploy(
        &g,
        &dir,
        &["echo-split-openapi.yaml", "shared/echo-common.yaml"],
    );
    assert!(out.ok(), "deploy from a subdirectory:\n{out}");
    assert!(out.stderr.contains(&format!("[{day}r1]")), "{out}");

    // Without the second file: refused with the referring file and line.
    let line = api
        .lines()
        .position(|l| l.contains("$ref: \"./echo-common.yaml#/definitions/message\""))
        .expect("line")
        + 1;
    let out = deploy(&g, &dir, &["echo-split-openapi.yaml"]);
    assert!(!out.ok(), "deployed without its shared file:\n{out}");
    assert!(
        out.stderr
            .contains("INVALID_ARGUMENT: Cannot convert to service config."),
        "{out}"
    );
    assert!(
        out.stderr.contains(&format!(
            "echo-split-openapi.yaml:{line}:19: reference \"./echo-common.yaml#/definitions/message\" cannot be resolved: the submission has no file \"echo-common.yaml\""
        )),
        "{out}"
    );

    // gcloud itself refuses a shared file without `swagger` before sending anything, which is
    // why the fixture carries `swagger` and `host`.
    let bare = shared
        .lines()
        .filter(|l| !l.starts_with("swagger") && !l.starts_with("host"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("bare-common.yaml"), bare).expect("write");
    let out = deploy(&g, &dir, &["echo-split-openapi.yaml", "bare-common.yaml"]);
    assert!(!out.ok(), "{out}");
    assert!(
        out.stderr.contains(
            "Unable to parse Open API, or Google Service Configuration specification from bare-common.yaml"
        ),
        "{out}"
    );
    assert_eq!(config_count(&g), 2);
}
