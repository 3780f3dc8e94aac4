//! Conformance against Google's api-compiler test corpus (`shared/specs/api-compiler-testdata`,
//! outside the repo): each `X.json|yaml` has an `X.baseline` holding either the expected service
//! config (text proto, possibly after WARNING lines) or the diagnostics that rejected it.
//!
//! For accepted inputs the test checks the facts the proxy depends on: the service name, every
//! HTTP rule (selector, method, path) and every usage rule's `allow_unregistered_calls`. For
//! rejected inputs it checks that the conversion fails too (for a `$ref` to a file that was not
//! sent, that the error names that reference). Skips (loudly) without the corpus.

use portico_config::{convert, SourceFile};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Cases whose baseline Portico deliberately does not reproduce, with the reason.
const EXCLUDED: &[(&str, &str)] = &[
    ("x_google_allow_extension_all", "x-google-allow: all becomes ESP's single custom {kind: \"*\", path: \"/**\"} rule, not api-compiler's five per-method catch-all methods"),
    ("x_google_allow_extension_all_with_existing_catchall_methods", "same x-google-allow: all modelling difference"),
    ("x_google_allow_extension_with_auth", "same x-google-allow: all modelling difference"),
    ("x_google_allow_extension_with_auth_in_operation", "same x-google-allow: all modelling difference"),
    ("operation_name_slash", "its security requirement names an undefined securityDefinition, which is rejected (as in x_google_audiences); the root path itself is accepted"),
    ("oauth_in_security", "an API key OR'ed with another scheme is rejected (Google's documented limitation); api-compiler accepted it and allowed unregistered calls"),
    ("x_google_audiences", "a security requirement naming an undefined securityDefinition is rejected; api-compiler ignored it"),
    ("additional_properties", "request/response message types are not generated, so the body-must-be-a-message check does not exist"),
    ("no_opertion_id", "no input file in the corpus"),
    ("bookstore_visibility", "no input file in the corpus (visibility rules come from a separate service config)"),
];

/// Multi-file cases whose files do not share the baseline's name.
const EXPLICIT_INPUTS: &[(&str, &[&str])] = &[
    ("multiple_swagger", &["petstore.json", "petstore_v2.json"]),
    ("multiple_swagger_hosts", &["petstore.json", "uber.json"]),
    (
        "multiple_swagger_duplicate_versions",
        &["library_example.json", "library_example_v2.json"],
    ),
    // One OpenAPI file and the two files its `$ref`s lead into (neither has `swagger`).
    (
        "distributed_swagger",
        &[
            "distributed_swagger.json",
            "distributed_shared_swagger_defs.json",
            "distributed_shared_json.json",
        ],
    ),
    // api-compiler refuses it for its name; Portico takes any file name and refuses it for its
    // content (not a mapping), so the verdicts agree for different reasons.
    ("invalid_extension", &["invalid_extension.invalid"]),
    // Submitted alone, as api-compiler's test does: its first `$ref` names a file not sent.
    (
        "distributed_swagger_missing_file",
        &["distributed_swagger_missing_file.json"],
    ),
];

/// Cases whose baseline was produced with an explicit service name instead of `host`.
const NAME_GIVEN_EXPLICITLY: &[&str] = &["bookstore"];

fn corpus() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/specs/api-compiler-testdata"
    ))
    .to_path_buf()
}

/// The input files of a case: `X.ext`, or `X` with '_' spelled '-', plus `X2.ext`, `X3.ext`...
fn inputs(dir: &Path, case: &str) -> Vec<PathBuf> {
    if let Some((_, files)) = EXPLICIT_INPUTS.iter().find(|(c, _)| *c == case) {
        return files.iter().map(|f| dir.join(f)).collect();
    }
    let mut found = Vec::new();
    for stem in [case.to_string(), case.replace('_', "-")] {
        for ext in ["json", "yaml", "yml"] {
            let p = dir.join(format!("{stem}.{ext}"));
            // compiler_warning.yaml is a Google service-config YAML, not an OpenAPI file.
            if p.exists() && !(case == "compiler_warning" && ext == "yaml") {
                found.push(p);
                for n in 2..10 {
                    let q = dir.join(format!("{stem}{n}.{ext}"));
                    if q.exists() {
                        found.push(q);
                    }
                }
            }
        }
        if !found.is_empty() {
            break;
        }
    }
    found
}

/// A minimal text-proto reader: enough for the baseline files.
#[derive(Debug, Default)]
struct Msg {
    fields: Vec<(String, Field)>,
}

#[derive(Debug)]
enum Field {
    Scalar(String),
    Msg(Msg),
}

impl Msg {
    fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a Field> + 'a {
        self.fields
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v)
    }
    fn msgs<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a Msg> + 'a {
        self.all(key).filter_map(|f| match f {
            Field::Msg(m) => Some(m),
            Field::Scalar(_) => None,
        })
    }
    fn scalar<'a>(&'a self, key: &'a str) -> Option<&'a str> {
        self.all(key).find_map(|f| match f {
            Field::Scalar(s) => Some(s.as_str()),
            Field::Msg(_) => None,
        })
    }
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    if let Some(inner) = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        inner.replace("\\\"", "\"").replace("\\\\", "\\")
    } else {
        v.to_string()
    }
}

fn parse_text_proto<'a>(lines: &mut impl Iterator<Item = &'a str>) -> Msg {
    let mut msg = Msg::default();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if t == "}" {
            break;
        }
        if let Some(name) = t.strip_suffix(" {") {
            let child = parse_text_proto(lines);
            msg.fields.push((name.to_string(), Field::Msg(child)));
        } else if let Some((k, v)) = t.split_once(": ") {
            msg.fields.push((k.to_string(), Field::Scalar(unquote(v))));
        }
    }
    msg
}

/// The service-config part of a baseline (after any WARNING lines), if it has one.
fn baseline_config(text: &str) -> Option<Msg> {
    if text.lines().any(|l| l.starts_with("ERROR:"))
        || text.contains("Service config creation failed")
    {
        return None;
    }
    let start = text
        .find("\nname: ")
        .map(|i| i + 1)
        .or_else(|| text.starts_with("name: ").then_some(0))?;
    Some(parse_text_proto(&mut text[start..].lines()))
}

type Facts = (
    String,
    BTreeSet<(String, String, String)>,
    BTreeMap<String, bool>,
    Extra,
);

/// Facts beyond routing: authentication, quota and endpoints.
#[derive(Debug, Default, PartialEq, Eq)]
struct Extra {
    /// selector → (provider, audiences) of rules that have requirements.
    auth: BTreeMap<String, BTreeSet<(String, String)>>,
    /// (id, issuer, jwks_uri, audiences)
    providers: BTreeSet<(String, String, String, String)>,
    /// (name, metric, unit, values)
    limits: BTreeSet<(String, String, String, String)>,
    /// selector → costs
    metric_rules: BTreeMap<String, String>,
    /// (name, target, allow_cors)
    endpoints: BTreeSet<(String, String, bool)>,
}

fn facts_from_baseline(m: &Msg) -> Facts {
    let name = m.scalar("name").unwrap_or_default().to_string();
    let mut rules = BTreeSet::new();
    for http in m.msgs("http") {
        for r in http.msgs("rules") {
            let sel = r.scalar("selector").unwrap_or_default().to_string();
            for method in ["get", "put", "post", "delete", "patch"] {
                if let Some(p) = r.scalar(method) {
                    rules.insert((sel.clone(), method.to_uppercase(), p.to_string()));
                }
            }
            for c in r.msgs("custom") {
                rules.insert((
                    sel.clone(),
                    c.scalar("kind").unwrap_or_default().to_string(),
                    c.scalar("path").unwrap_or_default().to_string(),
                ));
            }
        }
    }
    let mut usage = BTreeMap::new();
    for u in m.msgs("usage") {
        for r in u.msgs("rules") {
            usage.insert(
                r.scalar("selector").unwrap_or_default().to_string(),
                r.scalar("allow_unregistered_calls") == Some("true"),
            );
        }
    }
    let mut extra = Extra::default();
    for a in m.msgs("authentication") {
        for r in a.msgs("rules") {
            let reqs: BTreeSet<(String, String)> = r
                .msgs("requirements")
                .map(|q| {
                    (
                        q.scalar("provider_id").unwrap_or_default().to_string(),
                        q.scalar("audiences").unwrap_or_default().to_string(),
                    )
                })
                .collect();
            if !reqs.is_empty() {
                extra
                    .auth
                    .insert(r.scalar("selector").unwrap_or_default().to_string(), reqs);
            }
        }
        for p in a.msgs("providers") {
            let f = |k: &str| p.scalar(k).unwrap_or_default().to_string();
            extra
                .providers
                .insert((f("id"), f("issuer"), f("jwks_uri"), f("audiences")));
        }
    }
    let key_values = |m: &Msg, field: &str| -> String {
        let map: BTreeMap<String, String> = m
            .msgs(field)
            .map(|v| {
                (
                    v.scalar("key").unwrap_or_default().to_string(),
                    v.scalar("value").unwrap_or_default().to_string(),
                )
            })
            .collect();
        format!("{map:?}")
    };
    for q in m.msgs("quota") {
        for l in q.msgs("limits") {
            let f = |k: &str| l.scalar(k).unwrap_or_default().to_string();
            extra
                .limits
                .insert((f("name"), f("metric"), f("unit"), key_values(l, "values")));
        }
        for r in q.msgs("metric_rules") {
            extra.metric_rules.insert(
                r.scalar("selector").unwrap_or_default().to_string(),
                key_values(r, "metric_costs"),
            );
        }
    }
    for e in m.msgs("endpoints") {
        extra.endpoints.insert((
            e.scalar("name").unwrap_or_default().to_string(),
            e.scalar("target").unwrap_or_default().to_string(),
            e.scalar("allow_cors") == Some("true"),
        ));
    }
    (name, rules, usage, extra)
}

fn facts_from_service(s: &portico_config::Service) -> Facts {
    let mut rules = BTreeSet::new();
    for r in s.http.iter().flat_map(|h| &h.rules) {
        if let Some((m, p)) = r.method_and_path() {
            rules.insert((r.selector.clone(), m.to_string(), p.to_string()));
        }
    }
    let usage = s
        .usage
        .iter()
        .flat_map(|u| &u.rules)
        .map(|r| (r.selector.clone(), r.allow_unregistered_calls))
        .collect();
    let mut extra = Extra::default();
    if let Some(a) = &s.authentication {
        for r in &a.rules {
            let reqs: BTreeSet<(String, String)> = r
                .requirements
                .iter()
                .map(|q| (q.provider_id.clone(), q.audiences.clone()))
                .collect();
            if !reqs.is_empty() {
                extra.auth.insert(r.selector.clone(), reqs);
            }
        }
        for p in &a.providers {
            extra.providers.insert((
                p.id.clone(),
                p.issuer.clone(),
                p.jwks_uri.clone(),
                p.audiences.clone(),
            ));
        }
    }
    let render = |m: &BTreeMap<String, i64>| {
        let m: BTreeMap<&String, String> = m.iter().map(|(k, v)| (k, v.to_string())).collect();
        format!("{m:?}")
    };
    if let Some(q) = &s.quota {
        for l in &q.limits {
            extra.limits.insert((
                l.name.clone(),
                l.metric.clone(),
                l.unit.clone(),
                render(&l.values),
            ));
        }
        for r in &q.metric_rules {
            extra
                .metric_rules
                .insert(r.selector.clone(), render(&r.metric_costs));
        }
    }
    for e in &s.endpoints {
        extra
            .endpoints
            .insert((e.name.clone(), e.target.clone(), e.allow_cors));
    }
    (s.name.clone(), rules, usage, extra)
}

#[test]
fn api_compiler_corpus() {
    let dir = corpus();
    if !dir.is_dir() {
        eprintln!(
            "SKIPPED: api-compiler corpus not found at {}",
            dir.display()
        );
        return;
    }
    let mut baselines: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("corpus directory is readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "baseline"))
        .collect();
    baselines.sort();

    let (mut accepted_ok, mut rejected_ok, mut excluded) = (0, 0, 0);
    let mut failures = Vec::new();
    for b in &baselines {
        let case = b
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        if let Some((_, why)) = EXCLUDED.iter().find(|(c, _)| *c == case) {
            eprintln!("excluded {case}: {why}");
            excluded += 1;
            continue;
        }
        let files = inputs(&dir, &case);
        if files.is_empty() {
            failures.push(format!("{case}: no input file found"));
            continue;
        }
        let sources: Vec<SourceFile> = files
            .iter()
            .map(|p| {
                SourceFile::new(
                    p.file_name().and_then(|n| n.to_str()).unwrap_or_default(),
                    std::fs::read(p).expect("input is readable"),
                )
            })
            .collect();
        let baseline = std::fs::read_to_string(b).expect("baseline is readable");
        let result = convert(&sources);
        match (baseline_config(&baseline), result) {
            (Some(expected), Ok(conv)) => {
                let mut want = facts_from_baseline(&expected);
                let got = facts_from_service(&conv.service);
                if NAME_GIVEN_EXPLICITLY.contains(&case.as_str()) {
                    want.0.clone_from(&got.0);
                    want.3.endpoints.clone_from(&got.3.endpoints);
                }
                if want == got {
                    accepted_ok += 1;
                } else {
                    failures.push(format!(
                        "{case}: facts differ\n  want {want:?}\n  got  {got:?}"
                    ));
                }
            }
            (Some(_), Err(e)) => {
                failures.push(format!("{case}: rejected but Google accepts it:\n{e}"))
            }
            // A missing file must be refused for that file, as Google's baseline names it.
            (None, Err(e)) => match baseline.split_once("Unable to load RELATIVE ref: ") {
                Some((_, rest)) => {
                    let wanted = rest.lines().next().unwrap_or_default().trim();
                    if e.errors().any(|d| {
                        d.message
                            .starts_with(&format!("reference \"{wanted}\" cannot be resolved"))
                    }) {
                        rejected_ok += 1;
                    } else {
                        failures.push(format!("{case}: refused, but not for {wanted}:\n{e}"));
                    }
                }
                None => rejected_ok += 1,
            },
            (None, Ok(_)) => failures.push(format!("{case}: accepted but Google rejects it")),
        }
    }
    eprintln!(
        "api-compiler conformance: {} passed ({accepted_ok} accepted with matching name, http, usage, auth, quota and endpoints, {rejected_ok} rejected as expected), {excluded} excluded, {} failed",
        accepted_ok + rejected_ok,
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        accepted_ok >= 20,
        "too few accepted cases compared: {accepted_ok}"
    );
    assert!(
        rejected_ok >= 10,
        "too few rejected cases compared: {rejected_ok}"
    );
}
