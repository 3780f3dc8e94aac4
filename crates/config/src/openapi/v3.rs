//! OpenAPI 3.0.x / 3.1.x input: each 3.x document is *lowered* to the OpenAPI 2.0 +
//! `x-google-*` tree the 2.0 converter ([`super::convert`]) already understands, then converted
//! by it. Everything whose meaning is the same in both versions (security AND/OR rules, API
//! keys, JWT providers, quota and metric checks, path templates, naming, `$ref`s between files)
//! is therefore decided in one place; this module only checks and translates what 3.x spells
//! differently, with messages in 3.x terms.
//!
//! Every node of the lowered tree keeps the position of the 3.x text it comes from, so the 2.0
//! converter's own diagnostics still point at the right `file:line:column`.
//!
//! | 3.x | lowered to (2.0) |
//! |---|---|
//! | `servers[i].url` of the one server with `x-google-endpoint` | `host` (hostname; port dropped with a warning) and `basePath` (its path) |
//! | `x-google-endpoint: {allowCors, target}` | `x-google-endpoints: [{name: host, allowCors, target}]` |
//! | `x-google-api-management.apiName` | `x-google-api-name` |
//! | `x-google-api-management.allowCors` | `x-google-endpoints[0].allowCors` |
//! | `x-google-api-management.metrics.<name>: {displayName}` | `x-google-management.metrics[{name, displayName}]` |
//! | `…quota.limits.<name>: {metric, values: N}` (or `…quota.<group>.limits.<name>`) | `x-google-management.quota.limits[{name, metric, values: {STANDARD: N}}]` |
//! | `x-google-backend: <name>` (root, path item, operation) + `…backends.<name>` | an inline `x-google-backend` object (snake_case keys) |
//! | `x-google-quota: {metric: cost}` (or `{metricCosts: {…}}`) | `x-google-quota: {metricCosts: {…}}` |
//! | `components.securitySchemes` | `securityDefinitions` (`apiKey` as is; `oauth2`, `openIdConnect`, `http bearer` with `x-google-auth` → `oauth2` + `x-google-issuer`…) |
//! | `requestBody` | a body parameter (named by `x-codegen-request-body-name`, else `body`) |
//! | parameter `schema.{type,format,items}` | the parameter's own `type`, `format`, `items` |
//! | `{var}` + `x-google-parameter: {pattern: '**'}` | `{var=**}` in the path |
//!
//! `components` stays in the lowered tree (its `parameters` lowered like operation parameters)
//! so `$ref`s such as `#/components/schemas/X` resolve where they point (see `refs.rs`).
//! Choices made where Google's behaviour is not documented are listed in docs/openapi.md.

use super::convert::{Ctx, HTTP_METHODS, MAX_BACKEND_TEXT, TOP};
use super::tree::{Key, Node, Pos, Value};
use std::collections::{HashMap, HashSet};

/// Names quoted in messages are cut (80 characters), so a 10 MB key is not a 10 MB message.
pub(crate) use crate::grpc::shown as cut;

/// 3.x top-level fields that are lowered or carried over.
const TOP_LEVEL_FIELDS: &[&str] = &[
    "openapi",
    "info",
    "jsonSchemaDialect",
    "servers",
    "paths",
    "webhooks",
    "components",
    "security",
    "tags",
    "externalDocs",
];

/// Operation fields the 2.0 converter reads, carried over as they are.
const OPERATION_COPIED: &[&str] = &[
    "tags",
    "summary",
    "description",
    "externalDocs",
    "operationId",
    "responses",
    "deprecated",
    "security",
];

/// The `openapi` value of a 3.x document, if `root` is one.
pub(crate) fn version_node(root: &Node) -> Option<&Node> {
    root.get("openapi")
}

fn key(text: &str, pos: Pos) -> Key {
    Key {
        text: text.to_string(),
        pos,
    }
}

fn string(text: &str, pos: Pos) -> Node {
    Node {
        value: Value::Str(text.to_string()),
        pos,
    }
}

fn mapping(entries: Vec<(Key, Node)>, pos: Pos) -> Node {
    Node {
        value: Value::Map(entries),
        pos,
    }
}

fn take_map(node: Node) -> Vec<(Key, Node)> {
    match node.value {
        Value::Map(m) => m,
        _ => Vec::new(),
    }
}

/// A named backend of `x-google-api-management.backends`, lowered to the 2.0 object.
struct NamedBackend {
    node: Node,
}

/// Lowers one 3.x document (one whose [`version_node`] is set) to the 2.0 form. Problems that
/// only 3.x can have are reported through `ctx`; the result is still converted so that every
/// problem is listed at once.
pub(crate) fn lower(root: Node, ctx: &mut Ctx<'_>) -> (Node, Lowered) {
    let root_pos = root.pos;
    let mut l = Lowering {
        ctx,
        backends: HashMap::new(),
        host: String::new(),
        wide_params: HashMap::new(),
        invalid_schemes: HashSet::new(),
    };
    let node = l.lower_root(root, root_pos);
    (
        node,
        Lowered {
            invalid_schemes: l.invalid_schemes,
        },
    )
}

struct Lowering<'c, 'a> {
    ctx: &'c mut Ctx<'a>,
    backends: HashMap<String, NamedBackend>,
    host: String,
    /// `components.parameters` entries carrying `x-google-parameter: {pattern: '**'}`: entry
    /// name → parameter name.
    wide_params: HashMap<String, String>,
    /// Security schemes reported here; the 2.0 converter treats them as already reported.
    invalid_schemes: HashSet<String>,
}

/// What the 2.0 converter needs to know about a lowered document.
#[derive(Debug, Default)]
pub(crate) struct Lowered {
    /// Security schemes whose problems were reported while lowering.
    pub(crate) invalid_schemes: HashSet<String>,
}

impl Lowering<'_, '_> {
    fn lower_root(&mut self, root: Node, root_pos: Pos) -> Node {
        let entries = take_map(root);
        let mut out: Vec<(Key, Node)> = Vec::new();
        let mut found: HashMap<String, (Key, Node)> = HashMap::new();
        for (k, v) in entries {
            let name = k.text.clone();
            match name.as_str() {
                "openapi" => {
                    self.check_version(&v);
                    out.push((key("swagger", k.pos), string("2.0", v.pos)));
                }
                "swagger" => self.ctx.error(
                    k.pos,
                    "a document cannot declare both \"openapi\" and \"swagger\"; an OpenAPI 3.x document has only openapi: 3.x.y",
                ),
                "host" | "basePath" | "schemes" => self.ctx.error(
                    k.pos,
                    format!("\"{name}\" is OpenAPI 2.0; in OpenAPI 3.x the service name and base path come from the url of the server marked with x-google-endpoint (servers: [{{url: \"https://HOST/BASE\", x-google-endpoint: {{}}}}])"),
                ),
                "consumes" | "produces" => self.ctx.error(
                    k.pos,
                    format!("\"{name}\" is OpenAPI 2.0; in OpenAPI 3.x media types are the keys of requestBody.content and responses.<code>.content"),
                ),
                "definitions" | "parameters" | "responses" | "securityDefinitions" => {
                    let new = match name.as_str() {
                        "definitions" => "components.schemas",
                        "securityDefinitions" => "components.securitySchemes",
                        "parameters" => "components.parameters",
                        _ => "components.responses",
                    };
                    self.ctx.error(
                        k.pos,
                        format!("\"{name}\" is OpenAPI 2.0; in OpenAPI 3.x write {new}"),
                    )
                }
                "x-google-management" => self.ctx.error(
                    k.pos,
                    "x-google-management is the OpenAPI 2.0 extension; in OpenAPI 3.x write x-google-api-management, with metrics and quota limits as mappings keyed by name",
                ),
                "x-google-endpoints" => self.ctx.error(
                    k.pos,
                    "x-google-endpoints is the OpenAPI 2.0 extension; in OpenAPI 3.x put x-google-endpoint: {} on the server whose url names the service, and x-google-api-management.allowCors for CORS",
                ),
                "x-google-api-name" => self.ctx.error(
                    k.pos,
                    "x-google-api-name is the OpenAPI 2.0 extension; in OpenAPI 3.x write x-google-api-management.apiName",
                ),
                "x-google-allow" => self.ctx.error(
                    k.pos,
                    "x-google-allow is not supported in OpenAPI 3.x documents (Google's limitation); declare every path",
                ),
                "x-google-api-management" | "x-google-backend" | "servers" | "components"
                | "paths" => {
                    found.insert(name, (k, v));
                }
                "webhooks" => self.ctx.warn(
                    k.pos,
                    "webhooks describe calls the API makes, not calls it receives; they are ignored",
                ),
                "jsonSchemaDialect" => {}
                _ if name.starts_with("x-google-") => out.push((k, v)),
                _ if name.starts_with("x-") => {}
                _ if TOP_LEVEL_FIELDS.contains(&name.as_str()) => out.push((k, v)),
                _ => self.ctx.error(
                    k.pos,
                    format!("unknown top-level field \"{name}\" (OpenAPI 3.x does not define it; vendor extensions start with \"x-\")"),
                ),
            }
        }

        // The server gives host and basePath (and possibly allowCors / target).
        let endpoint = match found.remove("servers") {
            Some((_, servers)) => self.servers(servers),
            None => {
                self.ctx.error(
                    TOP,
                    "missing \"servers\": one server must carry x-google-endpoint, and its url names the service (servers: [{url: \"https://my-api.endpoints.my-project.cloud.goog\", x-google-endpoint: {}}])",
                );
                None
            }
        };
        let mut endpoint_fields: Vec<(Key, Node)> = Vec::new();
        if let Some(e) = endpoint {
            self.host = e.host.clone();
            out.push((key("host", e.pos), string(&e.host, e.pos)));
            if !e.base_path.is_empty() {
                out.push((key("basePath", e.pos), string(&e.base_path, e.pos)));
            }
            endpoint_fields = e.fields;
        }

        // Google's extension of the document.
        if let Some((k, m)) = found.remove("x-google-api-management") {
            self.api_management(k, m, &mut out, &mut endpoint_fields);
        }
        if !endpoint_fields.is_empty() {
            let pos = endpoint_fields[0].0.pos;
            let mut entry = vec![(key("name", pos), string(&self.host, pos))];
            entry.extend(endpoint_fields);
            out.push((
                key("x-google-endpoints", pos),
                Node {
                    value: Value::Seq(vec![mapping(entry, pos)]),
                    pos,
                },
            ));
        }
        if let Some((k, b)) = found.remove("x-google-backend") {
            if let Some(b) = self.backend_ref(&b) {
                out.push((k, b));
            }
        }

        if let Some((k, c)) = found.remove("components") {
            let (components, schemes) = self.components(c);
            if let Some(s) = schemes {
                out.push((key("securityDefinitions", s.pos), s));
            }
            out.push((k, components));
        }
        if let Some((k, p)) = found.remove("paths") {
            let p = self.paths(p);
            out.push((k, p));
        }
        mapping(out, root_pos)
    }

    fn check_version(&mut self, v: &Node) {
        let text = v.scalar_text().unwrap_or_default();
        let ok = ["3.0", "3.1"].iter().any(|m| {
            text == *m
                || text.strip_prefix(m).is_some_and(|rest| {
                    rest.strip_prefix('.')
                        .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                })
        });
        if !ok {
            let shown = v
                .scalar_text()
                .map(|s| format!("\"{}\"", cut(&s)))
                .unwrap_or_else(|| v.kind().to_string());
            self.ctx.error(
                v.pos,
                format!("OpenAPI version {shown} is not supported: Portico accepts swagger: \"2.0\", openapi: 3.0.x and openapi: 3.1.x"),
            );
        }
    }

    /// The server marked with `x-google-endpoint`: exactly one.
    fn servers(&mut self, servers: Node) -> Option<Endpoint> {
        let pos = servers.pos;
        let Value::Seq(items) = servers.value else {
            self.ctx
                .error(pos, "servers must be a list of server objects");
            return None;
        };
        let mut chosen: Option<(Pos, Node)> = None;
        for item in items {
            let Some((mk, _)) = item.entry("x-google-endpoint") else {
                continue;
            };
            let mk_pos = mk.pos;
            if let Some((first, _)) = &chosen {
                self.ctx.error(
                    mk_pos,
                    format!("only one server may carry x-google-endpoint (another does at line {}); it names the service", first.line),
                );
                continue;
            }
            chosen = Some((mk_pos, item));
        }
        let Some((mk_pos, server)) = chosen else {
            self.ctx.error(
                pos,
                "no server carries x-google-endpoint: mark the server whose url names the service, e.g. {url: \"https://my-api.endpoints.my-project.cloud.goog\", x-google-endpoint: {}}",
            );
            return None;
        };
        let mut fields = Vec::new();
        if let Some(e) = server.get("x-google-endpoint") {
            match e.as_map() {
                Some(entries) => {
                    for (k, v) in entries {
                        match k.text.as_str() {
                            // Not documented for 3.x (seen in third-party specs): accepted.
                            "allowCors" | "target" => fields.push((k.clone(), v.clone())),
                            other => self.ctx.warn(
                                k.pos,
                                format!("x-google-endpoint field \"{}\" is unknown and ignored (known: allowCors, target)", cut(other)),
                            ),
                        }
                    }
                }
                None if e.value == Value::Null => {}
                None => self.ctx.error(
                    e.pos,
                    format!(
                        "x-google-endpoint must be a mapping (usually {{}}), not {}",
                        e.kind()
                    ),
                ),
            }
        }
        let Some(url) = server.get("url") else {
            self.ctx.error(
                mk_pos,
                "the server carrying x-google-endpoint has no url; its host names the service",
            );
            return None;
        };
        let Some(raw) = url.as_str() else {
            self.ctx.error(
                url.pos,
                format!("server url must be a string, not {}", url.kind()),
            );
            return None;
        };
        let text = substitute_variables(raw, server.get("variables"));
        let Some(rest) = text
            .strip_prefix("https://")
            .or_else(|| text.strip_prefix("http://"))
            .or_else(|| text.strip_prefix("grpc://"))
        else {
            let why = if text.starts_with('/') || !text.contains("://") {
                "a relative url gives no host"
            } else {
                "only http and https urls are accepted"
            };
            self.ctx.error(
                url.pos,
                format!("server url \"{}\" cannot name the service: {why}; write https://HOST[/basePath], e.g. https://my-api.endpoints.my-project.cloud.goog/v1", cut(&text)),
            );
            return None;
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let host = match authority.rsplit_once(':') {
            Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                self.ctx.warn(
                    url.pos,
                    format!("the port :{port} of the server url is not part of the service name and is ignored"),
                );
                h
            }
            _ => authority,
        };
        Some(Endpoint {
            host: host.to_string(),
            base_path: path.trim_end_matches('/').to_string(),
            pos: url.pos,
            fields,
        })
    }

    fn api_management(
        &mut self,
        k: Key,
        m: Node,
        out: &mut Vec<(Key, Node)>,
        endpoint_fields: &mut Vec<(Key, Node)>,
    ) {
        let pos = m.pos;
        let Value::Map(entries) = m.value else {
            if m.value != Value::Null {
                self.ctx.error(
                    pos,
                    format!(
                        "x-google-api-management must be a mapping, not {}",
                        m.kind()
                    ),
                );
            }
            return;
        };
        let mut management: Vec<(Key, Node)> = Vec::new();
        for (fk, v) in entries {
            match fk.text.as_str() {
                "apiName" => out.push((key("x-google-api-name", fk.pos), v)),
                "allowCors" => {
                    // The documented place wins over x-google-endpoint's.
                    endpoint_fields.retain(|(k, _)| k.text != "allowCors");
                    endpoint_fields.push((key("allowCors", fk.pos), v));
                }
                "metrics" => {
                    if let Some(list) = self.named_list(v, "x-google-api-management.metrics") {
                        management.push((key("metrics", fk.pos), list));
                    }
                }
                "quota" => {
                    if let Some(q) = self.quota(v) {
                        management.push((key("quota", fk.pos), q));
                    }
                }
                "backends" => self.backends(v),
                "mcp" | "ai" => self.ctx.warn(
                    fk.pos,
                    format!("x-google-api-management.{} is an API Gateway feature; Cloud Endpoints and Portico ignore it", fk.text),
                ),
                other => self.ctx.error(
                    fk.pos,
                    format!("unknown field \"{}\" in x-google-api-management (known: apiName, allowCors, metrics, quota, backends)", cut(other)),
                ),
            }
        }
        if !management.is_empty() {
            out.push((key("x-google-management", k.pos), mapping(management, pos)));
        }
    }

    /// A mapping keyed by name → the 2.0 list of objects with `name`.
    fn named_list(&mut self, node: Node, what: &str) -> Option<Node> {
        let pos = node.pos;
        let Value::Map(entries) = node.value else {
            self.ctx.error(
                pos,
                format!(
                    "{what} must be a mapping keyed by name, not {}",
                    node.kind()
                ),
            );
            return None;
        };
        let mut items = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let vpos = v.pos;
            let mut fields = match v.value {
                Value::Map(m) => m,
                Value::Null => Vec::new(),
                _ => {
                    self.ctx.error(
                        vpos,
                        format!(
                            "{what}.{} must be a mapping, not {}",
                            cut(&k.text),
                            v.kind()
                        ),
                    );
                    continue;
                }
            };
            if let Some((nk, _)) = fields.iter().find(|(f, _)| f.text == "name") {
                self.ctx.error(
                    nk.pos,
                    format!(
                        "{what}.{}: the name is the key; remove \"name\"",
                        cut(&k.text)
                    ),
                );
                continue;
            }
            fields.insert(0, (key("name", k.pos), string(&k.text, k.pos)));
            items.push(mapping(fields, k.pos));
        }
        Some(Node {
            value: Value::Seq(items),
            pos,
        })
    }

    /// `quota: {limits: {...}}`, or `quota: {<group>: {limits: {...}}}` (both readings of
    /// Google's documentation are accepted).
    fn quota(&mut self, node: Node) -> Option<Node> {
        let pos = node.pos;
        let Value::Map(entries) = node.value else {
            self.ctx.error(
                pos,
                format!(
                    "x-google-api-management.quota must be a mapping with limits, not {}",
                    node.kind()
                ),
            );
            return None;
        };
        let mut limits: Vec<(Key, Node)> = Vec::new();
        for (k, v) in entries {
            if k.text == "limits" {
                limits.push((k, v));
            } else if let Some((lk, lv)) = v.entry("limits") {
                limits.push((lk.clone(), lv.clone()));
                if let Some(m) = v.as_map() {
                    for (other, _) in m.iter().filter(|(o, _)| o.text != "limits") {
                        self.ctx.error(
                            other.pos,
                            format!("unknown field \"{}\" in x-google-api-management.quota.{} (known: limits)", cut(&other.text), cut(&k.text)),
                        );
                    }
                }
            } else {
                self.ctx.error(
                    k.pos,
                    format!("unknown field \"{}\" in x-google-api-management.quota (write quota: {{limits: {{<name>: {{metric, values}}}}}})", cut(&k.text)),
                );
            }
        }
        let mut all = Vec::new();
        for (_, l) in limits {
            let Some(list) = self.named_list(l, "x-google-api-management.quota.limits") else {
                continue;
            };
            let Value::Seq(items) = list.value else {
                continue;
            };
            for mut item in items {
                // values: N → values: {STANDARD: N}; 3.x has no unit (always per minute, per
                // consumer project, the only unit 2.0 allowed).
                if let Value::Map(fields) = &mut item.value {
                    if !fields.iter().any(|(f, _)| f.text == "unit") {
                        let p = item.pos;
                        fields.push((key("unit", p), string("1/min/{project}", p)));
                    }
                    for (fk, fv) in fields.iter_mut() {
                        if fk.text == "values" {
                            match fv.value {
                                Value::Int(_) => {
                                    let n = fv.clone();
                                    *fv = mapping(vec![(key("STANDARD", n.pos), n)], fv.pos);
                                }
                                Value::Map(_) => {}
                                _ => {
                                    self.ctx.error(
                                        fv.pos,
                                        format!("quota limit values must be an integer (the most the metric may reach per minute), not {}", fv.kind()),
                                    );
                                    // A stand-in, so the rest of the limit is still checked.
                                    let zero = Node {
                                        value: Value::Int(0),
                                        pos: fv.pos,
                                    };
                                    *fv = mapping(vec![(key("STANDARD", fv.pos), zero)], fv.pos);
                                }
                            }
                        }
                    }
                }
                all.push(item);
            }
        }
        Some(mapping(
            vec![(
                key("limits", pos),
                Node {
                    value: Value::Seq(all),
                    pos,
                },
            )],
            pos,
        ))
    }

    fn backends(&mut self, node: Node) {
        let pos = node.pos;
        let Value::Map(entries) = node.value else {
            self.ctx.error(
                pos,
                format!("x-google-api-management.backends must be a mapping of names to backends, not {}", node.kind()),
            );
            return;
        };
        for (k, v) in entries {
            let vpos = v.pos;
            let Value::Map(fields) = v.value else {
                self.ctx.error(
                    vpos,
                    format!(
                        "backend \"{}\" must be a mapping with address, not {}",
                        cut(&k.text),
                        v.kind()
                    ),
                );
                continue;
            };
            let mut lowered = Vec::new();
            let mut translation = false;
            for (fk, fv) in fields {
                // camelCase is Google's 3.x spelling; the 2.0 snake_case is accepted too.
                let snake = match fk.text.as_str() {
                    "address" | "deadline" | "protocol" => fk.text.clone(),
                    "jwtAudience" | "jwt_audience" => "jwt_audience".to_string(),
                    "disableAuth" | "disable_auth" => "disable_auth".to_string(),
                    "pathTranslation" | "path_translation" => {
                        translation = true;
                        "path_translation".to_string()
                    }
                    other => {
                        self.ctx.error(
                            fk.pos,
                            format!("unknown field \"{}\" in backend \"{}\" (known: address, jwtAudience, disableAuth, pathTranslation, deadline, protocol)", cut(other), cut(&k.text)),
                        );
                        continue;
                    }
                };
                // A backend is copied into every operation that names it: only small
                // scalars may be copied (the 2.0 converter checks their types and values).
                let too_big = match &fv.value {
                    Value::Seq(_) | Value::Map(_) => {
                        Some(format!("must be a single value, not {}", fv.kind()))
                    }
                    Value::Str(t) if t.len() > MAX_BACKEND_TEXT => {
                        Some(format!("is longer than {MAX_BACKEND_TEXT} bytes"))
                    }
                    _ => None,
                };
                if let Some(why) = too_big {
                    self.ctx.error(
                        fv.pos,
                        format!("backend \"{}\": {} {why}", cut(&k.text), fk.text),
                    );
                    continue;
                }
                if lowered.iter().any(|(l, _): &(Key, Node)| l.text == snake) {
                    self.ctx.error(
                        fk.pos,
                        format!(
                            "backend \"{}\" sets {snake} twice (camelCase and snake_case)",
                            cut(&k.text)
                        ),
                    );
                    continue;
                }
                lowered.push((key(&snake, fk.pos), fv));
            }
            // One default wherever the backend is used (2.0's depended on the placement).
            if !translation && lowered.iter().any(|(l, _)| l.text == "address") {
                lowered.push((
                    key("path_translation", vpos),
                    string("APPEND_PATH_TO_ADDRESS", vpos),
                ));
            }
            self.backends.insert(
                k.text.clone(),
                NamedBackend {
                    node: mapping(lowered, vpos),
                },
            );
        }
    }

    /// `x-google-backend: <name>` → a copy of the named backend, positioned at the name.
    fn backend_ref(&mut self, node: &Node) -> Option<Node> {
        match node.as_str() {
            Some(name) => match self.backends.get(name) {
                Some(b) => {
                    let mut copy = b.node.clone();
                    copy.pos = node.pos;
                    Some(copy)
                }
                None => {
                    let mut known: Vec<&str> = self.backends.keys().map(String::as_str).collect();
                    known.sort_unstable();
                    self.ctx.error(
                        node.pos,
                        format!(
                            "x-google-backend \"{}\" is not defined in x-google-api-management.backends{}",
                            cut(name),
                            if known.is_empty() {
                                String::new()
                            } else {
                                format!(" (defined: {})", cut(&known.join(", ")))
                            }
                        ),
                    );
                    None
                }
            },
            None if node.as_map().is_some() => {
                self.ctx.error(
                    node.pos,
                    "in OpenAPI 3.x x-google-backend is the name of a backend: define it under x-google-api-management.backends.<name> (address, pathTranslation, jwtAudience, ...) and write x-google-backend: <name>",
                );
                None
            }
            None => {
                self.ctx.error(
                    node.pos,
                    format!("x-google-backend must be the name of a backend in x-google-api-management.backends, not {}", node.kind()),
                );
                None
            }
        }
    }

    /// `components` with its parameters lowered, and the lowered security schemes.
    fn components(&mut self, c: Node) -> (Node, Option<Node>) {
        let pos = c.pos;
        let Value::Map(entries) = c.value else {
            self.ctx.error(
                pos,
                format!("components must be a mapping, not {}", c.kind()),
            );
            return (mapping(Vec::new(), pos), None);
        };
        let mut out = Vec::new();
        let mut schemes = None;
        for (k, v) in entries {
            match k.text.as_str() {
                "securitySchemes" => schemes = self.security_schemes(v),
                "parameters" => {
                    let vpos = v.pos;
                    let lowered = match v.value {
                        Value::Map(m) => m
                            .into_iter()
                            .map(|(pk, p)| {
                                let name = p.get("name").and_then(Node::scalar_text);
                                let (p, wide) = self.parameter(p);
                                if let (true, Some(n)) = (wide, name) {
                                    self.wide_params.insert(pk.text.clone(), n);
                                }
                                (pk, p)
                            })
                            .collect(),
                        _ => Vec::new(),
                    };
                    out.push((k, mapping(lowered, vpos)));
                }
                _ => out.push((k, v)),
            }
        }
        (mapping(out, pos), schemes)
    }

    fn security_schemes(&mut self, node: Node) -> Option<Node> {
        let pos = node.pos;
        let Value::Map(entries) = node.value else {
            self.ctx.error(
                pos,
                format!(
                    "components.securitySchemes must be a mapping, not {}",
                    node.kind()
                ),
            );
            return None;
        };
        let mut out = Vec::new();
        for (k, def) in entries {
            match self.security_scheme(&k, def) {
                Some(d) => out.push((k, d)),
                None => {
                    self.invalid_schemes.insert(k.text.clone());
                    out.push((k, mapping(Vec::new(), pos)));
                }
            }
        }
        Some(mapping(out, pos))
    }

    /// One security scheme as a 2.0 securityDefinition; `None` once its problem is reported
    /// (the scheme stays defined, so requirements naming it are not reported as undefined).
    fn security_scheme(&mut self, k: &Key, def: Node) -> Option<Node> {
        let name = cut(&k.text);
        let pos = def.pos;
        if def.as_map().is_none() {
            self.ctx.error(
                pos,
                format!(
                    "security scheme \"{name}\" must be a mapping, not {}",
                    def.kind()
                ),
            );
            return None;
        }
        if let Some(r) = def.get("$ref") {
            self.ctx.error(
                r.pos,
                format!("security scheme \"{name}\": $ref is not supported here; write the scheme in components.securitySchemes"),
            );
            return None;
        }
        for legacy in [
            "x-google-issuer",
            "x-google-jwks_uri",
            "x-google-audiences",
            "x-google-jwt-locations",
        ] {
            if let Some((lk, _)) = def.entry(legacy) {
                self.ctx.error(
                    lk.pos,
                    format!("security scheme \"{name}\": {legacy} is the OpenAPI 2.0 extension; in OpenAPI 3.x write x-google-auth: {{issuer, jwksUri, audiences: [...], jwtLocations: [...]}}"),
                );
            }
        }
        let ty = def.get("type").and_then(Node::as_str).unwrap_or_default();
        let ty_pos = def.get("type").map_or(pos, |t| t.pos);
        let auth = def.get("x-google-auth");
        match ty {
            "apiKey" => {
                if let Some(i) = def.get("in").filter(|i| i.as_str() == Some("cookie")) {
                    self.ctx.error(
                        i.pos,
                        format!("security scheme \"{name}\" (apiKey): API keys in a cookie are not supported; use in: query or in: header"),
                    );
                    return None;
                }
                if let Some(a) = auth {
                    self.ctx.warn(
                        a.pos,
                        format!(
                            "security scheme \"{name}\" is an apiKey: its x-google-auth is ignored"
                        ),
                    );
                }
                let mut out = vec![(key("type", ty_pos), string("apiKey", ty_pos))];
                for f in ["name", "in", "description"] {
                    if let Some((fk, fv)) = def.entry(f) {
                        out.push((fk.clone(), fv.clone()));
                    }
                }
                Some(mapping(out, pos))
            }
            "oauth2" | "openIdConnect" | "http" => {
                if ty == "http" {
                    let scheme = def.get("scheme").and_then(Node::as_str).unwrap_or_default();
                    if !scheme.eq_ignore_ascii_case("bearer") {
                        let spos = def.get("scheme").map_or(pos, |s| s.pos);
                        self.ctx.error(
                            spos,
                            format!("security scheme \"{name}\" (http) has scheme \"{}\"; only bearer, with x-google-auth, can be checked", cut(scheme)),
                        );
                        return None;
                    }
                }
                let Some(auth) = auth else {
                    self.ctx.error(
                        ty_pos,
                        format!("security scheme \"{name}\" ({ty}) has no x-google-auth: JWTs are checked only for schemes with x-google-auth: {{issuer, jwksUri, audiences}}"),
                    );
                    return None;
                };
                self.google_auth(&name, auth, ty_pos)
            }
            "" => {
                self.ctx.error(
                    pos,
                    format!("security scheme \"{name}\" has no type; use apiKey, or oauth2, openIdConnect or http bearer with x-google-auth"),
                );
                None
            }
            other => {
                self.ctx.error(
                    ty_pos,
                    format!("security scheme \"{name}\" has type \"{}\", which is not supported; use apiKey, or oauth2, openIdConnect or http bearer with x-google-auth", cut(other)),
                );
                None
            }
        }
    }

    /// `x-google-auth` → the 2.0 oauth2 definition with `x-google-issuer` and its siblings.
    fn google_auth(&mut self, name: &str, auth: &Node, ty_pos: Pos) -> Option<Node> {
        let Some(fields) = auth.as_map() else {
            self.ctx.error(
                auth.pos,
                format!(
                    "x-google-auth of \"{name}\" must be a mapping with issuer, not {}",
                    auth.kind()
                ),
            );
            return None;
        };
        let mut out = vec![(key("type", ty_pos), string("oauth2", ty_pos))];
        let mut ok = true;
        for (fk, fv) in fields {
            let lowered = match fk.text.as_str() {
                "issuer" => "x-google-issuer",
                // Google's samples write jwksUri; the literal migration rule gives jwks_uri.
                "jwksUri" | "jwks_uri" => "x-google-jwks_uri",
                "audiences" => "x-google-audiences",
                "jwtLocations" | "jwt_locations" => "x-google-jwt-locations",
                other => {
                    self.ctx.error(
                        fk.pos,
                        format!("unknown field \"{}\" in x-google-auth of \"{name}\" (known: issuer, jwksUri, audiences, jwtLocations)", cut(other)),
                    );
                    ok = false;
                    continue;
                }
            };
            if out.iter().any(|(k, _)| k.text == lowered) {
                self.ctx.error(
                    fk.pos,
                    format!("x-google-auth of \"{name}\" sets {} twice", fk.text),
                );
                ok = false;
                continue;
            }
            let value = if lowered == "x-google-jwt-locations" {
                match self.jwt_locations(name, fv) {
                    Some(v) => v,
                    None => {
                        ok = false;
                        continue;
                    }
                }
            } else {
                fv.clone()
            };
            out.push((key(lowered, fk.pos), value));
        }
        match auth.get("issuer") {
            Some(i) if i.as_str().is_some_and(|s| !s.is_empty()) => {}
            Some(i) => {
                self.ctx.error(
                    i.pos,
                    format!("x-google-auth issuer of \"{name}\" must be a non-empty string (the tokens' iss claim)"),
                );
                ok = false;
            }
            None => {
                self.ctx.error(
                    auth.pos,
                    format!("x-google-auth of \"{name}\" has no issuer; it must equal the tokens' iss claim"),
                );
                ok = false;
            }
        }
        ok.then(|| mapping(out, auth.pos))
    }

    /// `[{header, valuePrefix} | {query} | {cookie}]` → 2.0's `value_prefix` spelling.
    fn jwt_locations(&mut self, name: &str, node: &Node) -> Option<Node> {
        let Some(items) = node.as_seq() else {
            self.ctx.error(
                node.pos,
                format!("jwtLocations of \"{name}\" must be a list of {{header, valuePrefix}} or {{query}} entries, not {}", node.kind()),
            );
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let Some(fields) = item.as_map() else {
                // The 2.0 converter reports a non-mapping entry.
                out.push(item.clone());
                continue;
            };
            let renamed = fields
                .iter()
                .map(|(k, v)| {
                    let text = if k.text == "valuePrefix" {
                        "value_prefix"
                    } else {
                        k.text.as_str()
                    };
                    (key(text, k.pos), v.clone())
                })
                .collect();
            out.push(mapping(renamed, item.pos));
        }
        Some(Node {
            value: Value::Seq(out),
            pos: node.pos,
        })
    }

    fn paths(&mut self, paths: Node) -> Node {
        let pos = paths.pos;
        let Value::Map(entries) = paths.value else {
            // The 2.0 converter reports it.
            return paths;
        };
        let mut out = Vec::with_capacity(entries.len());
        for (pk, item) in entries {
            if pk.text.starts_with("x-") {
                continue;
            }
            if pk.text.contains('=') {
                self.ctx.error(
                    pk.pos,
                    format!("path \"{}\": {{name=...}} is OpenAPI 2.0 syntax; in OpenAPI 3.x write {{name}} and give the path parameter x-google-parameter: {{pattern: '**'}} to match several segments", cut(&pk.text)),
                );
                continue;
            }
            out.extend(self.path_item(pk, item));
        }
        mapping(out, pos)
    }

    /// One path item → one or more (when operations disagree on multi-segment variables).
    fn path_item(&mut self, pk: Key, item: Node) -> Vec<(Key, Node)> {
        let ipos = item.pos;
        let Value::Map(entries) = item.value else {
            return vec![(pk, item)];
        };
        if entries.iter().any(|(k, _)| k.text == "$ref") {
            if let Some((k, _)) = entries.iter().find(|(k, _)| k.text == "$ref") {
                self.ctx.error(
                    k.pos,
                    format!("path \"{}\": a path item $ref is not supported in OpenAPI 3.x documents; write the operations here", cut(&pk.text)),
                );
            }
            return Vec::new();
        }
        let mut shared: Vec<(Key, Node)> = Vec::new();
        let mut shared_wide: Vec<String> = Vec::new();
        let mut item_backend: Option<Node> = None;
        let mut ops: Vec<(Key, Node)> = Vec::new();
        for (k, v) in entries {
            match k.text.as_str() {
                "parameters" => {
                    let (list, wide) = self.parameters(v);
                    shared_wide = wide;
                    shared.push((k, list));
                }
                "summary" | "description" => {}
                "servers" => self.ctx.warn(
                    k.pos,
                    format!("path \"{}\": servers on a path item are ignored; the service's server is the one with x-google-endpoint", cut(&pk.text)),
                ),
                // Not documented for 3.x: applied to each operation that names none.
                "x-google-backend" => item_backend = Some(v),
                "trace" => self.ctx.error(
                    k.pos,
                    format!("path \"{}\": trace operations are not supported (get, put, post, delete, options, head, patch are)", cut(&pk.text)),
                ),
                m if HTTP_METHODS.contains(&m) => ops.push((k, v)),
                _ => shared.push((k, v)),
            }
        }
        // Lowered operations, grouped by the path they end up with.
        let mut groups: Vec<(String, Vec<(Key, Node)>)> = Vec::new();
        for (mk, op) in ops {
            let (op, wide) = self.operation(&pk.text, op, item_backend.as_ref());
            let path = widen(&pk.text, &shared_wide, &wide);
            match groups.iter_mut().find(|(p, _)| *p == path) {
                Some((_, g)) => g.push((mk, op)),
                None => groups.push((path, vec![(mk, op)])),
            }
        }
        if groups.is_empty() {
            return vec![(pk, mapping(shared, ipos))];
        }
        groups
            .into_iter()
            .map(|(path, ops)| {
                let mut entries = shared.clone();
                entries.extend(ops);
                (key(&path, pk.pos), mapping(entries, ipos))
            })
            .collect()
    }

    /// One operation, and the names of its multi-segment path parameters.
    fn operation(
        &mut self,
        path: &str,
        op: Node,
        item_backend: Option<&Node>,
    ) -> (Node, Vec<String>) {
        let pos = op.pos;
        let Value::Map(entries) = op.value else {
            return (op, Vec::new());
        };
        let mut out: Vec<(Key, Node)> = Vec::new();
        let mut params: Option<(Key, Node)> = None;
        let mut wide = Vec::new();
        let mut body: Option<Node> = None;
        let mut backend_set = false;
        let mut body_name: Option<String> = None;
        for (k, v) in entries {
            match k.text.as_str() {
                f if OPERATION_COPIED.contains(&f) => out.push((k, v)),
                "parameters" => {
                    let (list, w) = self.parameters(v);
                    wide = w;
                    params = Some((k, list));
                }
                "requestBody" => body = Some(self.request_body(&v, path)),
                "x-google-backend" => {
                    backend_set = true;
                    if let Some(b) = self.backend_ref(&v) {
                        out.push((k, b));
                    }
                }
                "x-google-quota" => out.push((k.clone(), self.operation_quota(v))),
                "callbacks" | "servers" => self.ctx.warn(
                    k.pos,
                    format!(
                        "path \"{}\": {} on an operation is ignored",
                        cut(path),
                        k.text
                    ),
                ),
                "x-codegen-request-body-name" => body_name = v.as_str().map(str::to_string),
                _ => out.push((k, v)),
            }
        }
        if !backend_set {
            if let Some(b) = item_backend.and_then(|b| self.backend_ref(b)) {
                out.push((key("x-google-backend", b.pos), b));
            }
        }
        if let Some(mut b) = body {
            // The name the 2.0 body parameter had, as 2.0→3.0 converters record it.
            let name = body_name.unwrap_or_else(|| "body".to_string());
            if let Value::Map(m) = &mut b.value {
                m.insert(0, (key("name", b.pos), string(&name, b.pos)));
            }
            match &mut params {
                Some((
                    _,
                    Node {
                        value: Value::Seq(list),
                        ..
                    },
                )) => list.push(b),
                _ => {
                    let bpos = b.pos;
                    params = Some((
                        key("parameters", bpos),
                        Node {
                            value: Value::Seq(vec![b]),
                            pos: bpos,
                        },
                    ))
                }
            }
        }
        if let Some(p) = params {
            out.push(p);
        }
        (mapping(out, pos), wide)
    }

    /// `requestBody` → a 2.0 body parameter (without its name yet).
    fn request_body(&mut self, rb: &Node, path: &str) -> Node {
        let pos = rb.pos;
        let schema = if let Some(r) = rb.get("$ref") {
            // Checked by the reference check like any other.
            mapping(vec![(key("$ref", r.pos), r.clone())], pos)
        } else {
            match rb.get("content").and_then(Node::as_map) {
                Some(content) => content
                    .iter()
                    .find_map(|(_, media)| media.get("schema").cloned())
                    .unwrap_or_else(|| mapping(Vec::new(), pos)),
                None => {
                    if rb.as_map().is_none() {
                        self.ctx.error(
                            pos,
                            format!(
                                "path \"{}\": requestBody must be a mapping with content, not {}",
                                cut(path),
                                rb.kind()
                            ),
                        );
                    }
                    mapping(Vec::new(), pos)
                }
            }
        };
        let mut entries = vec![(key("in", pos), string("body", pos))];
        if let Some(r) = rb.get("required") {
            entries.push((key("required", r.pos), r.clone()));
        }
        entries.push((key("schema", schema.pos), schema));
        mapping(entries, pos)
    }

    /// `{metric: cost}` → `{metricCosts: {metric: cost}}`; the 2.0 shape is accepted as is.
    fn operation_quota(&mut self, q: Node) -> Node {
        if q.get("metricCosts").is_some() {
            return q;
        }
        let pos = q.pos;
        mapping(vec![(key("metricCosts", pos), q)], pos)
    }

    /// A parameter list, lowered, with the names of multi-segment path parameters.
    fn parameters(&mut self, list: Node) -> (Node, Vec<String>) {
        let pos = list.pos;
        let Value::Seq(items) = list.value else {
            return (list, Vec::new());
        };
        let mut out = Vec::with_capacity(items.len());
        let mut wide = Vec::new();
        for p in items {
            if let Some(r) = p.get("$ref").and_then(Node::as_str) {
                let local = r
                    .strip_prefix("#/components/parameters/")
                    .unwrap_or_default();
                if let Some(n) = self.wide_params.get(local) {
                    wide.push(n.clone());
                }
                out.push(p);
                continue;
            }
            let name = p.get("name").and_then(Node::scalar_text);
            let (p, w) = self.parameter(p);
            if w {
                if let Some(n) = name {
                    wide.push(n);
                }
            }
            out.push(p);
        }
        (
            Node {
                value: Value::Seq(out),
                pos,
            },
            wide,
        )
    }

    /// One parameter object: `schema` details moved up, `x-google-parameter` read. Returns
    /// whether it is a multi-segment path parameter.
    fn parameter(&mut self, p: Node) -> (Node, bool) {
        let pos = p.pos;
        let Value::Map(entries) = p.value else {
            return (p, false);
        };
        let location = entries
            .iter()
            .find(|(k, _)| k.text == "in")
            .and_then(|(_, v)| v.as_str())
            .unwrap_or_default()
            .to_string();
        let mut out = Vec::with_capacity(entries.len() + 2);
        let mut wide = false;
        for (k, v) in entries {
            match k.text.as_str() {
                "schema" => {
                    for f in ["type", "format", "items", "enum", "default"] {
                        if let Some((fk, fv)) = v.entry(f) {
                            out.push((fk.clone(), fv.clone()));
                        }
                    }
                }
                "x-google-parameter" => {
                    let pattern = v.get("pattern");
                    match pattern.and_then(Node::as_str) {
                        Some("**") if location == "path" => wide = true,
                        Some("*") if location == "path" => {}
                        Some(_) if location != "path" => self.ctx.error(
                            k.pos,
                            "x-google-parameter applies to path parameters only (in: path)",
                        ),
                        _ => self.ctx.error(
                            pattern.map_or(v.pos, |n| n.pos),
                            "x-google-parameter must be {pattern: '**'} (several path segments) or {pattern: '*'} (one, the default)",
                        ),
                    }
                }
                "style" | "explode" | "allowReserved" | "content" | "example" | "examples" => {}
                _ => out.push((k, v)),
            }
        }
        (mapping(out, pos), wide)
    }
}

/// The marked server, resolved.
struct Endpoint {
    host: String,
    base_path: String,
    pos: Pos,
    /// `allowCors` / `target` from `x-google-endpoint`.
    fields: Vec<(Key, Node)>,
}

/// `{name}` in a server url → the variable's default (one pass over the url; an unknown
/// variable stays as written and makes the host invalid).
fn substitute_variables(url: &str, variables: Option<&Node>) -> String {
    let Some(vars) = variables.and_then(Node::as_map) else {
        return url.to_string();
    };
    let defaults: HashMap<&str, String> = vars
        .iter()
        .filter_map(|(k, v)| Some((k.text.as_str(), v.get("default")?.scalar_text()?)))
        .collect();
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        out.push_str(&rest[..open]);
        let name = &rest[open + 1..open + close];
        match defaults.get(name) {
            Some(d) => out.push_str(d),
            None => out.push_str(&rest[open..=open + close]),
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out
}

/// `path` with `{name}` turned into `{name=**}` for each multi-segment parameter (one pass).
fn widen(path: &str, shared: &[String], own: &[String]) -> String {
    if shared.is_empty() && own.is_empty() {
        return path.to_string();
    }
    let wide: HashSet<&str> = shared.iter().chain(own).map(String::as_str).collect();
    let mut out = String::with_capacity(path.len() + 3 * wide.len());
    let mut rest = path;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let name = &rest[open + 1..open + close];
        out.push_str(&rest[..open + close]);
        if wide.contains(name) {
            out.push_str("=**");
        }
        out.push('}');
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out
}

/// The 2.0 converter's messages about a lowered document, in 3.x terms: the fields it names
/// are the ones the user wrote under another name.
pub(crate) fn in_3x_terms(message: &str) -> String {
    const TERMS: &[(&str, &str)] = &[
        (
            "x-google-management.metrics",
            "x-google-api-management.metrics",
        ),
        ("x-google-management.quota", "x-google-api-management.quota"),
        (
            "an x-google-management metric",
            "an x-google-api-management metric",
        ),
        ("securityDefinition \"", "security scheme \""),
        ("x-google-jwks_uri", "x-google-auth jwksUri"),
        ("x-google-audiences", "x-google-auth audiences"),
        ("x-google-jwt-locations", "x-google-auth jwtLocations"),
        ("x-google-issuer", "x-google-auth issuer"),
        ("value_prefix", "valuePrefix"),
        ("path_translation", "pathTranslation"),
        ("jwt_audience", "jwtAudience"),
        ("disable_auth", "disableAuth"),
        ("x-google-quota.metricCosts", "x-google-quota"),
        ("definition \"", "schema \""),
    ];
    // Google's own wording is kept as it is (scripts look for it).
    if message.contains(super::convert::NO_API_KEY_WARNING) {
        return message.to_string();
    }
    let mut out = message.to_string();
    for (old, new) in TERMS {
        if out.contains(old) {
            out = out.replace(old, new);
        }
    }
    out
}
