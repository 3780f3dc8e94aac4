//! Offline checks of everything under `deploy/` and of the `Dockerfile`.
//!
//! - Istio objects (`deploy/istio/*.yaml`) are validated against the CRD `openAPIV3Schema`s of
//!   istio/api v1.30.3. The repo carries the schemas it needs in `tests/fixtures/istio-crds/`
//!   (see the README there); when `../shared/specs/istio/` is present the full upstream file is
//!   used as well and the bundled copies are checked against it.
//! - The validator is structural: types, `required`, `enum`, numeric and size bounds,
//!   `oneOf`/`anyOf`/`allOf`/`not`, `x-kubernetes-int-or-string`, and unknown fields, which are
//!   rejected wherever the schema lists `properties` without `x-kubernetes-preserve-unknown-fields`.
//!   The apiserver would silently prune those, so a typo would otherwise vanish. The CEL rules
//!   (`x-kubernetes-validations`) are not evaluated.
//! - Kubernetes manifests are checked for internal consistency (selectors, ports, volumes,
//!   secrets) and the proxy's arguments are checked against the flags `portico esp --help` lists.

use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Real(s) => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(s.clone())),
        Yaml::Integer(i) => json!(i),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(yaml_to_json).collect()),
        Yaml::Hash(h) => {
            let mut m = Map::new();
            for (k, v) in h {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => panic!("unsupported YAML key {other:?}"),
                };
                m.insert(key, yaml_to_json(v));
            }
            Value::Object(m)
        }
        Yaml::Null => Value::Null,
        other => panic!("unsupported YAML node {other:?}"),
    }
}

fn load_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs = YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
    docs.iter()
        .map(yaml_to_json)
        .filter(|d| !d.is_null())
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in {}", dir.display());
    files
}

// ---------------------------------------------------------------------------------------------
// The structural validator.

fn type_ok(v: &Value, ty: &str) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        _ => false,
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Appends "PATH: problem" lines to `errs`.
fn validate(v: &Value, s: &Value, path: &str, errs: &mut Vec<String>) {
    let Some(s) = s.as_object() else { return };
    if v.is_null() && s.get("nullable") == Some(&Value::Bool(true)) {
        return;
    }
    let int_or_string = s.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    if int_or_string {
        if !(v.is_string() || v.is_i64() || v.is_u64()) {
            errs.push(format!(
                "{path}: expected integer or string, got {}",
                type_name(v)
            ));
            return;
        }
    } else if let Some(ty) = s.get("type").and_then(Value::as_str) {
        if !type_ok(v, ty) {
            errs.push(format!("{path}: expected {ty}, got {}", type_name(v)));
            return;
        }
    }
    if let Some(Value::Array(allowed)) = s.get("enum") {
        if !allowed.contains(v) {
            errs.push(format!(
                "{path}: {v} is not one of {}",
                Value::Array(allowed.clone())
            ));
        }
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = s.get("minimum").and_then(Value::as_f64) {
            if n < min {
                errs.push(format!("{path}: {n} is below the minimum {min}"));
            }
        }
        if let Some(max) = s.get("maximum").and_then(Value::as_f64) {
            if n > max {
                errs.push(format!("{path}: {n} is above the maximum {max}"));
            }
        }
    }
    if let Some(text) = v.as_str() {
        let len = text.chars().count() as u64;
        if let Some(max) = s.get("maxLength").and_then(Value::as_u64) {
            if len > max {
                errs.push(format!("{path}: longer than {max} characters"));
            }
        }
        if let Some(min) = s.get("minLength").and_then(Value::as_u64) {
            if len < min {
                errs.push(format!("{path}: shorter than {min} characters"));
            }
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if let Some(max) = s.get("maxItems").and_then(Value::as_u64) {
            if n > max {
                errs.push(format!("{path}: more than {max} items"));
            }
        }
        if let Some(min) = s.get("minItems").and_then(Value::as_u64) {
            if n < min {
                errs.push(format!("{path}: fewer than {min} items"));
            }
        }
        if let Some(item_schema) = s.get("items") {
            for (i, item) in items.iter().enumerate() {
                validate(item, item_schema, &format!("{path}[{i}]"), errs);
            }
        }
    }
    if let Some(obj) = v.as_object() {
        let n = obj.len() as u64;
        if let Some(max) = s.get("maxProperties").and_then(Value::as_u64) {
            if n > max {
                errs.push(format!("{path}: more than {max} entries"));
            }
        }
        if let Some(min) = s.get("minProperties").and_then(Value::as_u64) {
            if n < min {
                errs.push(format!("{path}: fewer than {min} entries"));
            }
        }
        if let Some(Value::Array(req)) = s.get("required") {
            for r in req.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    errs.push(format!("{path}: missing required field {r:?}"));
                }
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        let additional = s.get("additionalProperties");
        let preserve = s.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        for (k, child) in obj {
            let child_path = format!("{path}.{k}");
            if let Some(ps) = props.and_then(|p| p.get(k)) {
                validate(child, ps, &child_path, errs);
            } else if let Some(a @ Value::Object(_)) = additional {
                validate(child, a, &child_path, errs);
            } else if props.is_some() && !preserve && additional != Some(&Value::Bool(true)) {
                errs.push(format!("{child_path}: unknown field"));
            }
        }
    }
    // Composition: branches are evaluated in isolation; their errors only matter as a count.
    let branch_ok = |b: &Value| {
        let mut e = Vec::new();
        validate(v, b, path, &mut e);
        e.is_empty()
    };
    if let Some(Value::Array(all)) = s.get("allOf") {
        for b in all {
            validate(v, b, path, errs);
        }
    }
    if let Some(Value::Array(any)) = s.get("anyOf") {
        // int-or-string fields carry an anyOf of the two types, already checked above.
        if !int_or_string && !any.iter().any(branch_ok) {
            errs.push(format!("{path}: matches none of the anyOf alternatives"));
        }
    }
    if let Some(Value::Array(one)) = s.get("oneOf") {
        let matched = one.iter().filter(|b| branch_ok(b)).count();
        if matched != 1 {
            errs.push(format!(
                "{path}: matches {matched} of the oneOf alternatives (exactly one allowed; mutually exclusive fields set?)"
            ));
        }
    }
    if let Some(not) = s.get("not") {
        if branch_ok(not) {
            errs.push(format!("{path}: matches a schema it must not match"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CRD schemas.

/// (group, version, kind) → openAPIV3Schema.
type Schemas = BTreeMap<(String, String, String), Value>;

fn bundled_schemas() -> Schemas {
    let dir = repo().join("tests/fixtures/istio-crds");
    let mut out = Schemas::new();
    for entry in std::fs::read_dir(&dir).expect("fixtures dir") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read fixture");
        let crd: Value = serde_json::from_str(&text).expect("fixture JSON");
        let group = crd["group"].as_str().expect("group").to_string();
        let kind = crd["kind"].as_str().expect("kind").to_string();
        for (version, v) in crd["versions"].as_object().expect("versions") {
            out.insert(
                (group.clone(), version.clone(), kind.clone()),
                v["schema"].clone(),
            );
        }
    }
    assert!(out.len() >= 6, "fixtures incomplete: {:?}", out.keys());
    out
}

fn upstream_crd_file() -> Option<PathBuf> {
    let p = repo().join(
        "../shared/specs/istio/istio-api_v1.30.3_kubernetes_customresourcedefinitions.gen.yaml",
    );
    p.exists().then_some(p)
}

fn upstream_schemas(path: &Path) -> Schemas {
    let mut out = Schemas::new();
    for crd in load_docs(path) {
        let group = crd["spec"]["group"].as_str().expect("group").to_string();
        let kind = crd["spec"]["names"]["kind"]
            .as_str()
            .expect("kind")
            .to_string();
        for v in crd["spec"]["versions"].as_array().expect("versions") {
            let version = v["name"].as_str().expect("version").to_string();
            out.insert(
                (group.clone(), version, kind.clone()),
                v["schema"]["openAPIV3Schema"].clone(),
            );
        }
    }
    out
}

/// Validates one object (apiVersion/kind/metadata are the apiserver's, checked here directly).
fn validate_object(obj: &Value, schemas: &Schemas) -> Vec<String> {
    let mut errs = Vec::new();
    let api_version = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let label = format!("{kind}/{name}");
    let Some((group, version)) = api_version.split_once('/') else {
        return vec![format!("{label}: apiVersion {api_version:?} has no group")];
    };
    if name.is_empty() {
        errs.push(format!("{label}: metadata.name is required"));
    }
    for field in ["labels", "annotations"] {
        if let Some(m) = obj["metadata"].get(field) {
            let ok = m
                .as_object()
                .is_some_and(|m| m.values().all(Value::is_string));
            if !ok {
                errs.push(format!(
                    "{label}: metadata.{field} must map strings to strings"
                ));
            }
        }
    }
    let key = (group.to_string(), version.to_string(), kind.to_string());
    let Some(schema) = schemas.get(&key) else {
        errs.push(format!("{label}: no CRD schema for {api_version} {kind}"));
        return errs;
    };
    let mut body = obj.as_object().cloned().unwrap_or_default();
    for k in ["apiVersion", "kind", "metadata"] {
        body.remove(k);
    }
    validate(&Value::Object(body), schema, &label, &mut errs);
    errs
}

fn istio_objects() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    for f in yaml_files(&repo().join("deploy/istio")) {
        for d in load_docs(&f) {
            out.push((f.clone(), d));
        }
    }
    out
}

fn find<'a>(objs: &'a [(PathBuf, Value)], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name} under deploy/"))
}

#[test]
fn istio_objects_validate_against_bundled_crd_schemas() {
    let schemas = bundled_schemas();
    let objs = istio_objects();
    let mut errs = Vec::new();
    for (file, obj) in &objs {
        for e in validate_object(obj, &schemas) {
            errs.push(format!("{}: {e}", file.display()));
        }
    }
    assert!(errs.is_empty(), "schema errors:\n{}", errs.join("\n"));

    // The seed's objects, in today's form.
    let gw = find(&objs, "Gateway", "echo-gateway");
    assert_eq!(gw["spec"]["selector"]["istio"], "ingressgateway");
    assert_eq!(gw["spec"]["servers"][0]["port"]["number"], 80);
    let vs = find(&objs, "VirtualService", "echo");
    assert!(vs["spec"]["gateways"]
        .as_array()
        .expect("gateways")
        .contains(&json!("echo-gateway")));
    let route = &vs["spec"]["http"][0];
    assert_eq!(route["match"][0]["uri"]["prefix"], "/echo");
    assert_eq!(route["route"][0]["destination"]["host"], "esp-echo");
    assert_eq!(route["route"][0]["destination"]["port"]["number"], 80);
    let pa = find(&objs, "PeerAuthentication", "default");
    assert_eq!(pa["metadata"]["namespace"], "istio-system");
    assert_eq!(pa["spec"]["mtls"]["mode"], "STRICT");
    // The gateway and the route live where esp-echo does, so the short host name resolves.
    assert_eq!(vs["metadata"]["namespace"], gw["metadata"]["namespace"]);
}

#[test]
fn validator_rejects_what_the_apiserver_would_prune_or_refuse() {
    let schemas = bundled_schemas();
    let objs = istio_objects();
    let pa = find(&objs, "PeerAuthentication", "default").clone();
    let gw = find(&objs, "Gateway", "echo-gateway").clone();
    let vs = find(&objs, "VirtualService", "echo").clone();

    let mut bad_enum = pa.clone();
    bad_enum["spec"]["mtls"]["mode"] = json!("STRICTEST");
    let mut unknown = gw.clone();
    unknown["spec"]["servers"][0]["port"]["bogus"] = json!(true);
    let mut wrong_type = gw.clone();
    wrong_type["spec"]["servers"][0]["port"]["number"] = json!("eighty");
    let mut out_of_range = gw.clone();
    // Istio bounds ports to uint32 in the schema (the 1-65535 rule is CEL, which is not evaluated).
    out_of_range["spec"]["servers"][0]["port"]["number"] = json!(1u64 << 32);
    let mut missing = gw.clone();
    missing["spec"]["servers"][0]
        .as_object_mut()
        .expect("server")
        .remove("hosts");
    let mut two_of_one_of = vs.clone();
    two_of_one_of["spec"]["http"][0]["match"][0]["uri"]["exact"] = json!("/echo");
    let mut old_name = pa.clone();
    old_name["kind"] = json!("MeshPolicy");

    for (what, obj, needle) in [
        ("enum", bad_enum, "not one of"),
        ("unknown field", unknown, "unknown field"),
        ("type", wrong_type, "expected integer"),
        ("maximum", out_of_range, "above the maximum"),
        ("required", missing, "missing required field \"hosts\""),
        ("oneOf", two_of_one_of, "oneOf"),
        ("removed kind", old_name, "no CRD schema"),
    ] {
        let errs = validate_object(&obj, &schemas);
        assert!(
            errs.iter().any(|e| e.contains(needle)),
            "{what}: expected an error containing {needle:?}, got {errs:?}"
        );
    }
}

#[test]
fn the_seeds_v1alpha3_objects_still_validate() {
    // The Istio page's Gateway and VirtualService verbatim in structure (v1alpha3 is still served).
    let seed = r#"
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata:
  name: echo-gateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 80
      name: http
      protocol: HTTP
    hosts:
    - "*"
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: echo
spec:
  hosts:
  - "*"
  gateways:
  - echo-gateway
  http:
  - match:
    - uri:
        prefix: /echo
    route:
    - destination:
        port:
          number: 80
        host: esp-echo
"#;
    let schemas = bundled_schemas();
    let docs = YamlLoader::load_from_str(seed).expect("seed YAML");
    for d in &docs {
        let errs = validate_object(&yaml_to_json(d), &schemas);
        assert!(errs.is_empty(), "{errs:?}");
    }
}

#[test]
fn bundled_crd_schemas_match_upstream_and_objects_validate_against_it() {
    let Some(path) = upstream_crd_file() else {
        eprintln!(
            "SKIPPED: ../shared/specs/istio/ is absent; validated against the bundled fixtures only"
        );
        return;
    };
    let upstream = upstream_schemas(&path);
    for (key, schema) in bundled_schemas() {
        assert_eq!(
            upstream.get(&key),
            Some(&schema),
            "tests/fixtures/istio-crds differs from {} for {key:?}; re-run extract.py",
            path.display()
        );
    }
    let mut errs = Vec::new();
    for (file, obj) in istio_objects() {
        for e in validate_object(&obj, &upstream) {
            errs.push(format!("{}: {e}", file.display()));
        }
    }
    assert!(errs.is_empty(), "schema errors:\n{}", errs.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Kubernetes manifests.

fn k8s_objects() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    for f in yaml_files(&repo().join("deploy/kubernetes")) {
        for d in load_docs(&f) {
            out.push((f.clone(), d));
        }
    }
    out
}

/// Long flag names `portico SUB --help` lists.
fn subcommand_flags(sub: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_portico"))
        .args([sub, "--help"])
        .output()
        .expect("run portico --help");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "portico {sub} --help failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    let flags: BTreeSet<String> = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.split(['=', '<']).next().unwrap_or_default().to_string())
        .filter(|w| !w.is_empty())
        .collect();
    assert!(flags.contains("help"), "unexpected help text:\n{text}");
    flags
}

fn esp_flags() -> BTreeSet<String> {
    let flags = subcommand_flags("esp");
    assert!(flags.contains("backend"), "unexpected esp flags: {flags:?}");
    flags
}

fn flag_names(args: &[String]) -> Vec<String> {
    args.iter()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or_default().to_string())
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn kubernetes_manifests_are_consistent() {
    let objs = k8s_objects();
    let mut errs = Vec::new();
    let mut deployments = Vec::new();
    for (file, o) in &objs {
        let f = file.display();
        let kind = o["kind"].as_str().unwrap_or_default();
        let name = o["metadata"]["name"].as_str().unwrap_or_default();
        if o["apiVersion"].as_str().is_none() || kind.is_empty() || name.is_empty() {
            errs.push(format!(
                "{f}: object without apiVersion/kind/metadata.name: {o}"
            ));
            continue;
        }
        match (o["apiVersion"].as_str().unwrap_or_default(), kind) {
            ("v1", "Namespace" | "Service" | "PersistentVolumeClaim" | "Secret")
            | ("apps/v1", "Deployment") => {}
            (api, kind) => errs.push(format!("{f}: unexpected {api} {kind}")),
        }
        if kind == "Deployment" {
            let sel = &o["spec"]["selector"]["matchLabels"];
            let labels = &o["spec"]["template"]["metadata"]["labels"];
            let sel_map = sel.as_object().cloned().unwrap_or_default();
            if sel_map.is_empty() || sel_map.iter().any(|(k, v)| &labels[k] != v) {
                errs.push(format!(
                    "{f}: {name}: selector {sel} does not match labels {labels}"
                ));
            }
            let pod = &o["spec"]["template"]["spec"];
            let volumes: BTreeSet<&str> = pod["volumes"]
                .as_array()
                .map(|v| v.iter().filter_map(|v| v["name"].as_str()).collect())
                .unwrap_or_default();
            for c in pod["containers"].as_array().expect("containers") {
                for m in c["volumeMounts"].as_array().into_iter().flatten() {
                    let vol = m["name"].as_str().unwrap_or_default();
                    if !volumes.contains(vol) {
                        errs.push(format!("{f}: {name}: mount of undeclared volume {vol:?}"));
                    }
                }
            }
            deployments.push((file.clone(), o.clone()));
        }
    }
    // Every Service selects a Deployment in its namespace and targets a port that is served.
    for (file, svc) in objs.iter().filter(|(_, o)| o["kind"] == "Service") {
        let f = file.display();
        let ns = &svc["metadata"]["namespace"];
        let sel = svc["spec"]["selector"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let target = deployments.iter().find(|(_, d)| {
            &d["metadata"]["namespace"] == ns
                && sel
                    .iter()
                    .all(|(k, v)| &d["spec"]["template"]["metadata"]["labels"][k] == v)
        });
        let Some((_, dep)) = target else {
            errs.push(format!(
                "{f}: Service {} selects no Deployment",
                svc["metadata"]["name"]
            ));
            continue;
        };
        let container_ports: BTreeSet<i64> = dep["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["containerPort"].as_i64())
            .collect();
        for p in svc["spec"]["ports"].as_array().into_iter().flatten() {
            let t = p["targetPort"].as_i64().or(p["port"].as_i64()).unwrap_or(0);
            if !container_ports.contains(&t) {
                errs.push(format!(
                    "{f}: Service port {p} targets {t}, not a containerPort"
                ));
            }
        }
    }
    assert!(errs.is_empty(), "manifest errors:\n{}", errs.join("\n"));

    // The seed's sidecar, as the walkthrough writes it.
    let echo = objs
        .iter()
        .find(|(_, o)| o["kind"] == "Deployment" && o["metadata"]["name"] == "esp-echo")
        .map(|(_, o)| o)
        .expect("esp-echo Deployment");
    let pod = &echo["spec"]["template"]["spec"];
    let esp = pod["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "esp")
        .expect("esp container");
    let args = strings(&esp["args"]);
    for want in [
        "--http_port=8082",
        "--backend=127.0.0.1:8081",
        "--rollout_strategy=managed",
        "--service_account_key=/etc/nginx/creds/service-account-creds.json",
    ] {
        assert!(
            args.iter().any(|a| a == want),
            "esp args lack {want}: {args:?}"
        );
    }
    assert!(args.iter().any(|a| a.starts_with("--service=")));
    let mount = &esp["volumeMounts"][0];
    assert_eq!(mount["mountPath"], "/etc/nginx/creds");
    let vol = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("creds volume");
    assert_eq!(vol["secret"]["secretName"], "service-account-creds");
    assert!(echo["spec"]["template"]["metadata"]["annotations"]
        ["traffic.sidecar.istio.io/includeOutboundIPRanges"]
        .is_string());
    let svc = objs
        .iter()
        .find(|(_, o)| o["kind"] == "Service" && o["metadata"]["name"] == "esp-echo")
        .map(|(_, o)| o)
        .expect("esp-echo Service");
    assert_eq!(svc["spec"]["ports"][0]["port"], 80);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8082);
    // The backend must only be reachable through the proxy in the same pod.
    let backend = pod["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "echo")
        .expect("echo container");
    assert_eq!(strings(&backend["args"]), vec!["--listen=127.0.0.1:8081"]);
}

#[test]
fn sidecar_args_are_flags_portico_esp_accepts() {
    let known = esp_flags();
    let mut checked = 0;
    for (file, o) in k8s_objects() {
        for c in o["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            // Containers without `command` run the image's entrypoint, `portico esp`.
            if c.get("command").is_some() {
                continue;
            }
            for flag in flag_names(&strings(&c["args"])) {
                assert!(
                    known.contains(&flag),
                    "{}: --{flag} is not a `portico esp` flag (known: {known:?})",
                    file.display()
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 5,
        "found only {checked} proxy flags in deploy/kubernetes"
    );
}

#[test]
fn other_containers_use_real_subcommands_flags_and_variables() {
    // Environment variables the control plane reads: those its --help shows, plus the ones
    // read directly in its source (PORTICO_MASTER_KEY).
    let help = Command::new(env!("CARGO_BIN_EXE_portico"))
        .args(["control-plane", "--help"])
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let crypto = std::fs::read_to_string(repo().join("crates/control-plane/src/crypto.rs"))
        .unwrap_or_default();
    let mut checked = 0;
    for (file, o) in k8s_objects() {
        for c in o["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let command = strings(&c["command"]);
            if command.is_empty() {
                continue;
            }
            assert_eq!(command[0], "/usr/local/bin/portico", "{}", file.display());
            let sub = command.get(1).expect("subcommand");
            let known = subcommand_flags(sub);
            for flag in flag_names(&strings(&c["args"])) {
                assert!(
                    known.contains(&flag),
                    "{}: --{flag} is not a `portico {sub}` flag (known: {known:?})",
                    file.display()
                );
                checked += 1;
            }
            for env in c["env"].as_array().into_iter().flatten() {
                let name = env["name"].as_str().expect("env name");
                assert!(
                    help.contains(&format!("[env: {name}="))
                        || crypto.contains(&format!("\"{name}\"")),
                    "{}: {name} is not read by portico {sub}",
                    file.display()
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "checked only {checked} flags and variables");
}

// ---------------------------------------------------------------------------------------------
// The Dockerfile (hadolint runs in .ci/lint-dockerfile.sh; this checks what it means).

#[test]
fn dockerfile_runs_portico_esp_with_the_seeds_flags() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    // Join continuation lines, drop comments.
    let joined = text.replace("\\\n", " ");
    let instrs: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&str> = instrs
        .iter()
        .filter_map(|l| l.strip_prefix("FROM "))
        .collect();
    // The builder, the runtime, and one stage per dialect; ESP's is last, the default target.
    assert_eq!(
        froms,
        [
            "rust:1.95-bookworm AS builder",
            "debian:bookworm-slim AS runtime",
            "runtime AS espv2",
            "runtime AS esp"
        ],
        "multi-stage build expected"
    );
    assert!(
        instrs.iter().any(|l| l.contains("ca-certificates")),
        "runtime needs CA certificates"
    );
    let entries: Vec<Vec<String>> = instrs
        .iter()
        .filter_map(|l| l.strip_prefix("ENTRYPOINT "))
        .map(|e| serde_json::from_str(e).expect("ENTRYPOINT in exec (JSON) form"))
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(
        entries[0],
        [
            "/usr/local/bin/portico",
            "espv2",
            "--listener_address=0.0.0.0"
        ]
    );
    // An ESPv2 command line after the image name: every flag is one `portico espv2` takes.
    let espv2 = subcommand_flags("espv2");
    let espv2_line: Vec<String> = entries[0][2..]
        .iter()
        .cloned()
        .chain(
            [
                "--service=SERVICE",
                "--rollout_strategy=managed",
                "--backend=http://127.0.0.1:8080",
                "--listener_port=8081",
                "--non_gcp",
                "--service_account_key=/esp/service-account-creds.json",
            ]
            .map(String::from),
        )
        .collect();
    for flag in flag_names(&espv2_line) {
        assert!(
            espv2.contains(&flag),
            "--{flag} is not a `portico espv2` flag"
        );
    }
    let entry = &entries[1];
    assert_eq!(
        entry,
        &["/usr/local/bin/portico", "esp", "--listen_address=0.0.0.0"]
    );
    let expose: BTreeSet<&str> = instrs
        .iter()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(str::split_whitespace)
        .collect();
    assert_eq!(expose, BTreeSet::from(["8080", "8090"]));

    // The walkthrough's docker run arguments, appended to the entrypoint.
    let known = esp_flags();
    let seed = [
        "--service=YOUR_SERVICE_NAME",
        "--rollout_strategy=managed",
        "--http_port=8082",
        "--backend=localhost:8080",
        "--service_account_key=/esp/service-account-creds.json",
    ];
    let all: Vec<String> = entry[2..]
        .iter()
        .cloned()
        .chain(seed.iter().map(|s| s.to_string()))
        .collect();
    for flag in flag_names(&all) {
        assert!(
            known.contains(&flag),
            "--{flag} is not a `portico esp` flag"
        );
    }
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target/"));
}
