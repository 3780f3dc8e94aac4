//! A gRPC service deployed with the real `gcloud` (528) against `portico control-plane`:
//! `gcloud endpoints services deploy api_descriptor.pb api_config.yaml` (then with
//! api_config_http.yaml, then api_config_auth.yaml) from examples/bookstore-grpc, each read
//! back with `gcloud endpoints configs describe`; and bad submissions (an API the descriptor
//! lacks, a bad HTTP rule, a broken descriptor, an unknown YAML field) refused with their
//! file:line messages in gcloud's output. The descriptor set is compiled here with protox, as
//! `protoc --include_imports --include_source_info` would build it.

mod common;

use common::{gcloud_available, today_utc, ControlPlane, Db, Gcloud, Output};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SVC: &str = "bookstore.endpoints.demo-proj.cloud.goog";
const PKG: &str = "endpoints.examples.bookstore.Bookstore";

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bookstore-grpc")
}

fn example(name: &str) -> String {
    let p = example_dir().join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn descriptor_set() -> Vec<u8> {
    let mut c = protox::Compiler::new([example_dir()]).expect("protox");
    c.include_imports(true).include_source_info(true);
    c.open_files(["bookstore.proto"])
        .expect("compile bookstore.proto");
    c.encode_file_descriptor_set()
}

/// A directory holding `files` (name, contents), as a user's checkout would.
fn work_dir(root: &Path, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).expect("work dir");
    for (file, contents) in files {
        std::fs::write(d.join(file), contents).expect("write file");
    }
    d
}

fn deploy(g: &Gcloud, dir: &Path, files: &[&str]) -> Output {
    let mut args = vec!["endpoints", "services", "deploy"];
    args.extend_from_slice(files);
    g.run_in(Some(dir), &args, Duration::from_secs(180))
}

fn must(out: Output, what: &str, cp: &ControlPlane) -> Output {
    assert!(
        out.ok(),
        "{what} failed:\n{out}\n--- server log ---\n{}",
        cp.log()
    );
    out
}

fn describe(g: &Gcloud, id: &str, cp: &ControlPlane) -> Value {
    let out = must(
        g.run(&[
            "endpoints",
            "configs",
            "describe",
            id,
            "--service",
            SVC,
            "--format=json",
        ]),
        "configs describe",
        cp,
    );
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The HTTP rule of `method` in a described config.
fn rule<'c>(cfg: &'c Value, method: &str) -> &'c Value {
    let sel = format!("{PKG}.{method}");
    cfg["http"]["rules"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["selector"] == sel.as_str()))
        .unwrap_or_else(|| panic!("no http rule for {sel} in {cfg}"))
}

/// 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in {text}"))
        + 1
}

#[test]
fn gcloud_deploys_a_grpc_service() {
    if !gcloud_available("gcloud_deploys_a_grpc_service") {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(&root.path().join("data"), &Db::Sqlite);
    let g = Gcloud::new(&cp.url, &cp.admin_token_path());
    let day = today_utc();
    let pb = descriptor_set();
    let config = example("api_config.yaml");
    let http = example("api_config_http.yaml");
    let auth = example("api_config_auth.yaml");
    let dir = work_dir(
        root.path(),
        "bookstore",
        &[
            ("api_descriptor.pb", &pb),
            ("api_config.yaml", config.as_bytes()),
            ("api_config_http.yaml", http.as_bytes()),
            ("api_config_auth.yaml", auth.as_bytes()),
        ],
    );

    // Keys: the methods, the annotations' HTTP rules and the one usage rule.
    let out = must(
        deploy(&g, &dir, &["api_descriptor.pb", "api_config.yaml"]),
        "deploy with keys",
        &cp,
    );
    let r0 = format!("{day}r0");
    assert!(
        out.stderr.contains(&format!(
            "Service Configuration [{r0}] uploaded for service [{SVC}]"
        )),
        "{out}"
    );
    let cfg = describe(&g, &r0, &cp);
    assert_eq!(cfg["name"], SVC);
    assert_eq!(cfg["producerProjectId"], "demo-proj");
    assert_eq!(cfg["apis"][0]["name"], PKG);
    assert_eq!(cfg["apis"][0]["version"], "v1");
    let methods = cfg["apis"][0]["methods"].as_array().expect("methods");
    assert_eq!(methods.len(), 15, "{cfg}");
    assert_eq!(methods[8]["name"], "StreamBooks");
    assert_eq!(methods[8]["responseStreaming"], true);
    assert_eq!(
        methods[1]["requestTypeUrl"],
        "type.googleapis.com/endpoints.examples.bookstore.CreateShelfRequest"
    );
    assert_eq!(cfg["http"]["rules"].as_array().map(Vec::len), Some(11));
    assert_eq!(rule(&cfg, "ListShelves")["get"], "/v1/shelves");
    assert_eq!(rule(&cfg, "CreateShelf")["body"], "shelf");
    assert_eq!(
        rule(&cfg, "CreateBook")["additionalBindings"][0]["post"],
        "/v1/shelves/{shelf}/books/{book.id}/{book.author}"
    );
    assert_eq!(
        cfg["usage"]["rules"],
        serde_json::json!([{"selector": format!("{PKG}.ListShelves"), "allowUnregisteredCalls": true}])
    );
    assert_eq!(
        cfg["control"]["environment"],
        "servicecontrol.googleapis.com"
    );

    // With api_config_http.yaml: its rules replace the annotations of the methods it names.
    must(
        deploy(
            &g,
            &dir,
            &[
                "api_descriptor.pb",
                "api_config.yaml",
                "api_config_http.yaml",
            ],
        ),
        "deploy with http rules",
        &cp,
    );
    let cfg = describe(&g, &format!("{day}r1"), &cp);
    assert_eq!(rule(&cfg, "ListShelves")["get"], "/v2/shelves");
    assert_eq!(rule(&cfg, "CreateShelf")["post"], "/v2/shelves");
    assert_eq!(rule(&cfg, "CreateShelf")["body"], "*");
    assert_eq!(
        rule(&cfg, "StreamBooks")["get"],
        "/v2/shelves/{shelf}/books:stream"
    );
    assert_eq!(
        rule(&cfg, "DeleteBook")["delete"],
        "/v1/shelves/{shelf}/books/{book}"
    );
    assert_eq!(cfg["title"], "Bookstore gRPC API");

    // JWT: the "*" rules are stored once per method, with the full selector.
    must(
        deploy(&g, &dir, &["api_descriptor.pb", "api_config_auth.yaml"]),
        "deploy with auth",
        &cp,
    );
    let cfg = describe(&g, &format!("{day}r2"), &cp);
    let auth_rules = cfg["authentication"]["rules"]
        .as_array()
        .expect("auth rules");
    assert_eq!(auth_rules.len(), 15, "{cfg}");
    assert_eq!(auth_rules[0]["selector"], format!("{PKG}.ListShelves"));
    assert_eq!(
        auth_rules[14]["requirements"][0]["providerId"],
        "bookstore_sa"
    );
    let usage = cfg["usage"]["rules"].as_array().expect("usage rules");
    assert_eq!(usage.len(), 15);
    assert!(usage.iter().all(|r| r["allowUnregisteredCalls"] == true
        && r["selector"]
            .as_str()
            .is_some_and(|s| s.starts_with(PKG) && !s.ends_with('*'))));
    assert_eq!(
        cfg["authentication"]["providers"][0]["issuer"],
        "bookstore-sa@demo-proj.iam.gserviceaccount.com"
    );

    // Bad submissions, each with its message in gcloud's output.
    let library = config.replace(
        "- name: endpoints.examples.bookstore.Bookstore",
        "- name: endpoints.examples.bookstore.Bookstore\n- name: endpoints.examples.bookstore.Library",
    );
    let library_line = line_of(&library, "bookstore.Library");
    let bad_http = http.replace("get: /v2/shelves/{shelf}", "get: /v2/shelves//{shelf}");
    let bad_http_line = line_of(&bad_http, "/v2/shelves//");
    let unknown = config.replace(
        "title: Bookstore gRPC API",
        "title: Bookstore gRPC API\nfoo: bar",
    );
    let unknown_line = line_of(&unknown, "foo: bar");
    let mut truncated = pb.clone();
    truncated.truncate(pb.len() / 2);
    // (work dir, files written there, deploy arguments, the message gcloud must print)
    type Case<'a> = (&'a str, Vec<(&'a str, Vec<u8>)>, Vec<&'a str>, String);
    let cases: Vec<Case> = vec![
        (
            "missing-api",
            vec![("api_descriptor.pb", pb.clone()), ("api_config.yaml", library.into_bytes())],
            vec!["api_descriptor.pb", "api_config.yaml"],
            format!("api_config.yaml:{library_line}:9: Cannot resolve api 'endpoints.examples.bookstore.Library'."),
        ),
        (
            "bad-http",
            vec![
                ("api_descriptor.pb", pb.clone()),
                ("api_config.yaml", config.clone().into_bytes()),
                ("api_config_http.yaml", bad_http.into_bytes()),
            ],
            vec!["api_descriptor.pb", "api_config.yaml", "api_config_http.yaml"],
            format!(
                "api_config_http.yaml:{bad_http_line}:10: http rule for '{PKG}.GetShelf': the path \
                 template \"/v2/shelves//{{shelf}}\" is not valid: segment 3 is empty (\"//\")"
            ),
        ),
        (
            "broken-descriptor",
            vec![("api_descriptor.pb", truncated), ("api_config.yaml", config.clone().into_bytes())],
            vec!["api_descriptor.pb", "api_config.yaml"],
            "api_descriptor.pb: The descriptor set cannot be used: it is not a protobuf-encoded \
             google.protobuf.FileDescriptorSet"
                .to_string(),
        ),
        (
            "unknown-field",
            vec![("api_descriptor.pb", pb.clone()), ("api_config.yaml", unknown.into_bytes())],
            vec!["api_descriptor.pb", "api_config.yaml"],
            format!("api_config.yaml:{unknown_line}:1: Found field 'foo' which is unknown in 'google.api.Service'."),
        ),
    ];
    for (name, files, args, expected) in cases {
        let files: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        let d = work_dir(root.path(), name, &files);
        let out = deploy(&g, &d, &args);
        assert!(!out.ok(), "{name} deployed:\n{out}");
        assert!(
            out.stderr
                .contains("INVALID_ARGUMENT: Cannot convert to service config."),
            "{name}: {out}"
        );
        assert!(
            out.stderr.contains(&expected),
            "{name}: expected {expected:?} in\n{out}"
        );
    }

    // The refused submissions stored nothing.
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
    assert_eq!(
        ids,
        [format!("{day}r2"), format!("{day}r1"), format!("{day}r0")],
        "{out}"
    );
}
