//! gRPC service configs: a descriptor set (`FILE_DESCRIPTOR_SET_PROTO`) and one or more
//! `api_config.yaml` files (`SERVICE_CONFIG_YAML`) → `google.api.Service`, the conversion
//! Service Management performs on `gcloud endpoints services deploy api_descriptor.pb
//! api_config.yaml`.
//!
//! Entry point: [`convert`]. Like the OpenAPI path it reports every problem at once, each with
//! `file:line:column` (line 0 = the whole file, as for a descriptor set) and a sentence.
//!
//! # What it does
//!
//! - Each YAML file must be a mapping with `type: google.api.Service`; its keys are checked
//!   against a table of the `google.api.Service` fields Portico knows (`schema.rs`): an unknown
//!   key is an error that names the message it is unknown in. Several files merge as protobuf
//!   messages do: lists are appended, single fields are replaced by later files.
//! - `config_version` must be given (3; another value is a warning).
//! - Each `apis[].name` must be a service of the descriptor set (`Cannot resolve api 'x'.`);
//!   its methods (request/response type URLs, streaming flags) and version (from the package:
//!   `...v2` → `v2`, else `v1`) fill `apis[]`.
//! - Rule selectors (`http`, `usage`, `authentication`, `backend`, `quota.metric_rules`,
//!   `system_parameters`) are `*`, `package.Service.*` or `package.Service.Method`, several
//!   separated by commas. They are expanded to one rule per method with its full selector (the
//!   proxies look rules up by exact selector); when several rules match a method, the last
//!   one wins. A selector that matches no method is a warning, bad syntax an error.
//! - A method's HTTP rule is the YAML `http.rules` entry that matches it, or else its
//!   `google.api.http` option; the YAML rule replaces the option entirely. Every path template
//!   is parsed with [`crate::template`], path variables and `body`/`response_body` are checked
//!   against the request and response messages.
//! - Added as on the OpenAPI path: `control.environment`, `endpoints` (`{name}` when none is
//!   given), the `endpoints_log` log, the `api` monitored resource, the
//!   `serviceruntime.googleapis.com` metrics with their logging and monitoring destinations,
//!   and `sourceInfo` holding every input file with its `fileType`.
//!
//! `PROTO_FILE`s are kept in `sourceInfo` for display and are otherwise unused; they are valid
//! only beside a descriptor set.

mod descriptor;
mod schema;

use crate::openapi::tree::{self, Node, Pos};
use crate::openapi::{
    generated, Conversion, ConvertError, ConvertOptions, Diagnostic, Interrupted, Severity,
    SourceFile, Watch,
};
use crate::service::*;
use crate::template::Template;
use base64::Engine;
use descriptor::{Descriptors, HttpRuleProto, Pattern};
use prost_reflect::{Kind, MessageDescriptor, MethodDescriptor, Syntax};
use std::collections::{HashMap, HashSet};

const CONTROL_ENVIRONMENT: &str = "servicecontrol.googleapis.com";
const CONFIG_FILE_TYPE_URL: &str = "type.googleapis.com/google.api.servicemanagement.v1.ConfigFile";
const TYPE_URL_PREFIX: &str = "type.googleapis.com/";
const CURRENT_CONFIG_VERSION: i64 = 3;
const SERVICE_TYPE: &str = "google.api.Service";

/// `google.api.servicemanagement.v1.ConfigFile.FileType` values a gRPC submission uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    /// `api_config.yaml`: a `google.api.Service` in YAML.
    ServiceConfigYaml,
    /// A `protoc --descriptor_set_out` file.
    FileDescriptorSetProto,
    /// A `.proto` source, kept for display only.
    ProtoFile,
}

impl FileType {
    /// The enum name, as gcloud sends it and `sourceInfo` keeps it.
    pub fn as_str(self) -> &'static str {
        match self {
            FileType::ServiceConfigYaml => "SERVICE_CONFIG_YAML",
            FileType::FileDescriptorSetProto => "FILE_DESCRIPTOR_SET_PROTO",
            FileType::ProtoFile => "PROTO_FILE",
        }
    }

    /// The type for an enum name; `None` for the OpenAPI types and anything else.
    pub fn from_name(name: &str) -> Option<FileType> {
        match name {
            "SERVICE_CONFIG_YAML" => Some(FileType::ServiceConfigYaml),
            "FILE_DESCRIPTOR_SET_PROTO" => Some(FileType::FileDescriptorSetProto),
            "PROTO_FILE" => Some(FileType::ProtoFile),
            _ => None,
        }
    }
}

/// One input file and its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcSource {
    pub file_type: FileType,
    pub file: SourceFile,
}

impl GrpcSource {
    pub fn new(
        file_type: FileType,
        path: impl Into<String>,
        contents: impl Into<Vec<u8>>,
    ) -> GrpcSource {
        GrpcSource {
            file_type,
            file: SourceFile::new(path, contents),
        }
    }
}

/// Converts a gRPC submission (see the module docs).
pub fn convert(files: &[GrpcSource]) -> Result<Conversion, ConvertError> {
    convert_with(files, &ConvertOptions::default())
}

/// Diagnostics of one conversion, in file order once sorted.
pub(super) struct Diags {
    files: Vec<String>,
    list: Vec<(usize, Diagnostic)>,
}

const WHOLE_FILE: Pos = Pos { line: 0, column: 0 };
const TOP: Pos = Pos { line: 1, column: 1 };

impl Diags {
    fn push(&mut self, severity: Severity, file: usize, pos: Pos, message: String) {
        self.list.push((
            file,
            Diagnostic {
                severity,
                file: self.files.get(file).cloned().unwrap_or_default(),
                line: pos.line,
                column: pos.column,
                message,
            },
        ));
    }
    pub(super) fn error(&mut self, file: usize, pos: Pos, message: String) {
        self.push(Severity::Error, file, pos, message);
    }
    pub(super) fn warn(&mut self, file: usize, pos: Pos, message: String) {
        self.push(Severity::Warning, file, pos, message);
    }
    fn has_errors(&self) -> bool {
        self.list.iter().any(|(_, d)| d.severity == Severity::Error)
    }
    fn finish(mut self) -> Vec<Diagnostic> {
        self.list
            .sort_by_key(|(i, d)| (*i, d.line, d.column, d.severity == Severity::Warning));
        let mut seen = HashSet::new();
        self.list
            .into_iter()
            .map(|(_, d)| d)
            .filter(|d| {
                seen.insert((
                    d.file.clone(),
                    d.line,
                    d.column,
                    d.severity,
                    d.message.clone(),
                ))
            })
            .collect()
    }
}

/// [`convert`] within the bounds of `opts`.
pub fn convert_with(
    files: &[GrpcSource],
    opts: &ConvertOptions,
) -> Result<Conversion, ConvertError> {
    let watch = Watch::new(opts);
    let mut diags = Diags {
        files: files.iter().map(|f| f.file.path.clone()).collect(),
        list: Vec::new(),
    };
    let result = run(files, &watch, &mut diags);
    let _ = watch.check_now();
    if let Some(why) = watch.stopped() {
        diags.list.push((
            usize::MAX,
            Diagnostic {
                severity: Severity::Error,
                file: String::new(),
                line: 0,
                column: 0,
                message: match why {
                    Interrupted::DeadlineExceeded => {
                        "the conversion took longer than the time allowed and was stopped"
                    }
                    Interrupted::Cancelled => "the conversion was cancelled",
                }
                .to_string(),
            },
        ));
        return Err(ConvertError {
            diagnostics: diags.finish(),
            interrupted: Some(why),
        });
    }
    let failed = diags.has_errors();
    let diagnostics = diags.finish();
    match result {
        Some(service) if !failed => Ok(Conversion {
            service,
            warnings: diagnostics,
        }),
        _ => Err(ConvertError {
            diagnostics,
            interrupted: None,
        }),
    }
}

/// `text` for a message: whole when short, else its first 80 characters and "...", so a
/// selector or name as long as the file is not repeated whole in every diagnostic. (The
/// OpenAPI converter uses it too.)
pub(crate) fn shown(text: &str) -> String {
    const SHOWN: usize = 80;
    match text.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

fn no_file_error(message: &str) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        file: String::new(),
        line: 0,
        column: 0,
        message: message.to_string(),
    }
}

fn run(files: &[GrpcSource], watch: &Watch<'_>, diags: &mut Diags) -> Option<Service> {
    let of = |t: FileType| -> Vec<usize> {
        (0..files.len())
            .filter(|i| files[*i].file_type == t)
            .collect()
    };
    let (yamls, sets, protos) = (
        of(FileType::ServiceConfigYaml),
        of(FileType::FileDescriptorSetProto),
        of(FileType::ProtoFile),
    );
    if yamls.is_empty() {
        diags.list.push((
            usize::MAX,
            no_file_error(
                "a gRPC service needs a SERVICE_CONFIG_YAML file (api_config.yaml, with \
                 type: google.api.Service) that names the service and its APIs",
            ),
        ));
    }
    if sets.is_empty() {
        for &i in &protos {
            diags.error(
                i,
                WHOLE_FILE,
                "A PROTO_FILE is kept for display only and is valid only beside a \
                 FILE_DESCRIPTOR_SET_PROTO; compile it with protoc --include_imports \
                 --include_source_info --descriptor_set_out=api_descriptor.pb and deploy the \
                 .pb file too."
                    .to_string(),
            );
        }
    }

    let mut descs = Descriptors::default();
    for &i in &sets {
        if let Err(reason) = descs.add(i, &files[i].file.contents) {
            diags.error(
                i,
                WHOLE_FILE,
                format!(
                    "The descriptor set cannot be used: {reason}. Build it with protoc \
                     --include_imports --include_source_info --descriptor_set_out=FILE."
                ),
            );
        }
    }

    // Every tree first: the origins of merged list elements point into them.
    let mut trees: Vec<(usize, Node)> = Vec::new();
    for &i in &yamls {
        if watch.check().is_err() {
            return None;
        }
        if let Some(root) = parse_yaml(i, &files[i].file, watch, diags) {
            trees.push((i, root));
        }
    }
    let mut origins = schema::Origins::new();
    let mut merged = serde_json::Value::Object(Default::default());
    let mut config_version: Option<(usize, &Node)> = None;
    for (i, root) in &trees {
        if root.as_map().is_none() {
            diags.error(
                *i,
                root.pos,
                format!(
                    "The service config must be a mapping (a {SERVICE_TYPE}), not {}.",
                    root.kind()
                ),
            );
            continue;
        }
        match root.get("type") {
            None => diags.error(
                *i,
                TOP,
                "Expected a field 'type' specifying the configuration type name in root object."
                    .to_string(),
            ),
            Some(t) if t.as_str() != Some(SERVICE_TYPE) => diags.error(
                *i,
                t.pos,
                format!(
                    "The specified configuration type '{}' is unknown; a gRPC service config has \
                     type: {SERVICE_TYPE}.",
                    t.scalar_text().unwrap_or_else(|| t.kind().to_string())
                ),
            ),
            Some(_) => {}
        }
        if let Some(v) = root
            .get("config_version")
            .or_else(|| root.get("configVersion"))
        {
            config_version = Some((*i, v));
        }
        let mut walk = schema::Walk {
            diags,
            file: *i,
            origins: &mut origins,
            watch,
        };
        if let Some(json) = walk.message(root, &schema::SERVICE, Some("")) {
            schema::merge(&mut merged, json);
        }
    }
    if watch.stopped().is_some() || diags.has_errors() || trees.len() != yamls.len() {
        return None;
    }
    let first_yaml = yamls[0];
    match config_version {
        None => diags.error(
            first_yaml,
            WHOLE_FILE,
            "config_version is not specified in the service config file.".to_string(),
        ),
        Some((i, v)) => {
            if merged.get("configVersion").and_then(|c| c.as_i64()) != Some(CURRENT_CONFIG_VERSION)
            {
                diags.warn(
                    i,
                    v.pos,
                    format!(
                        "config_version {} is not the current version {CURRENT_CONFIG_VERSION}; \
                         the file is read as version {CURRENT_CONFIG_VERSION}.",
                        v.scalar_text().unwrap_or_default()
                    ),
                );
            }
        }
    }
    if let Some(o) = merged.as_object_mut() {
        o.remove("type");
        o.remove("configVersion");
    }
    let mut svc: Service = match serde_json::from_value(merged) {
        Ok(s) => s,
        Err(e) => {
            diags.error(
                first_yaml,
                WHOLE_FILE,
                format!("The service config cannot be read: {e}."),
            );
            return None;
        }
    };
    svc.config_version = CURRENT_CONFIG_VERSION as u32;
    if svc.name.is_empty() {
        diags.error(
            first_yaml,
            TOP,
            "The service config has no 'name'; give the service's name, e.g. \
             name: bookstore.endpoints.my-project.cloud.goog."
                .to_string(),
        );
    }
    let ctx = Ctx {
        origins: &origins,
        first_yaml,
        watch,
    };
    let methods = resolve_apis(&mut svc, &descs, &ctx, diags);
    expand_rules(&mut svc, &methods, &descs, &ctx, diags);
    finish(&mut svc, files);
    Some(svc)
}

fn parse_yaml(
    index: usize,
    file: &SourceFile,
    watch: &Watch<'_>,
    diags: &mut Diags,
) -> Option<Node> {
    let text = match std::str::from_utf8(&file.contents) {
        Ok(t) => t,
        Err(e) => {
            let line = file.contents[..e.valid_up_to()]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                + 1;
            diags.error(
                index,
                Pos { line, column: 1 },
                "The file is not valid UTF-8 text.".to_string(),
            );
            return None;
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let json = file.path.to_ascii_lowercase().ends_with(".json");
    match tree::parse_watched(text, json, watch) {
        Ok(root) => Some(root),
        Err(errors) => {
            for e in errors {
                diags.error(index, e.pos, e.message);
            }
            None
        }
    }
}

struct Ctx<'a, 'n> {
    origins: &'a schema::Origins<'n>,
    first_yaml: usize,
    watch: &'a Watch<'a>,
}

impl Ctx<'_, '_> {
    /// File and position of element `i` of the merged list `path`, and of its field `field`
    /// when it has one.
    fn at(&self, path: &str, i: usize, field: &str) -> (usize, Pos) {
        match self.origins.get(path).and_then(|o| o.get(i)) {
            Some((file, node)) => (*file, self.field_pos(path, i, field).unwrap_or(node.pos)),
            None => (self.first_yaml, WHOLE_FILE),
        }
    }

    /// Position of field `field` of element `i` of the merged list `path`, when it is there.
    fn field_pos(&self, path: &str, i: usize, field: &str) -> Option<Pos> {
        let (_, node) = self.origins.get(path)?.get(i)?;
        node.get(field)
            .or_else(|| node.get(&schema::lower_camel(field)))
            .map(|n| n.pos)
    }
}

/// The methods of the service's APIs, in order: selectors and descriptors.
struct Methods {
    list: Vec<(String, MethodDescriptor)>,
    by_selector: HashMap<String, usize>,
}

fn resolve_apis(
    svc: &mut Service,
    descs: &Descriptors,
    ctx: &Ctx<'_, '_>,
    diags: &mut Diags,
) -> Methods {
    let mut methods = Methods {
        list: Vec::new(),
        by_selector: HashMap::new(),
    };
    let mut apis = Vec::new();
    let mut names = HashSet::new();
    for (i, api) in std::mem::take(&mut svc.apis).into_iter().enumerate() {
        let (file, pos) = ctx.at("apis", i, "name");
        if !names.insert(api.name.clone()) {
            diags.warn(
                file,
                pos,
                format!(
                    "API '{}' is listed more than once; the later entry is ignored.",
                    shown(&api.name)
                ),
            );
            continue;
        }
        let Some(service) = descs.pool.get_service_by_name(&api.name) else {
            let hint = if descs.pool.services().len() == 0 {
                " The submission has no descriptor set with services (FILE_DESCRIPTOR_SET_PROTO)."
                    .to_string()
            } else {
                let known: Vec<String> = descs
                    .pool
                    .services()
                    .take(10)
                    .map(|s| s.full_name().to_string())
                    .collect();
                format!(" The descriptor set defines: {}.", known.join(", "))
            };
            diags.error(
                file,
                pos,
                format!("Cannot resolve api '{}'.{hint}", shown(&api.name)),
            );
            continue;
        };
        let proto_file = service.parent_file();
        let version = if api.version.is_empty() {
            version_from_package(proto_file.package_name())
        } else {
            api.version.clone()
        };
        let mut out = Api {
            name: api.name.clone(),
            methods: Vec::new(),
            version,
            source_context: Some(SourceContext {
                file_name: proto_file.name().to_string(),
            }),
            syntax: match proto_file.syntax() {
                Syntax::Proto2 => "SYNTAX_PROTO2",
                _ => "SYNTAX_PROTO3",
            }
            .to_string(),
        };
        for m in service.methods() {
            let selector = format!("{}.{}", api.name, m.name());
            out.methods.push(Method {
                name: m.name().to_string(),
                request_type_url: format!("{TYPE_URL_PREFIX}{}", m.input().full_name()),
                response_type_url: format!("{TYPE_URL_PREFIX}{}", m.output().full_name()),
                request_streaming: m.is_client_streaming(),
                response_streaming: m.is_server_streaming(),
            });
            if let std::collections::hash_map::Entry::Vacant(e) =
                methods.by_selector.entry(selector.clone())
            {
                e.insert(methods.list.len());
                methods.list.push((selector, m));
            }
        }
        apis.push(out);
    }
    svc.apis = apis;
    methods
}

/// `v2` for a package ending in `.v2` (or `v1beta1`, ...), else `v1`, as Google's compiler
/// picks an API's default version.
fn version_from_package(package: &str) -> String {
    let last = package.rsplit('.').next().unwrap_or_default();
    let mut chars = last.chars();
    if chars.next() == Some('v') && chars.next().is_some_and(|c| c.is_ascii_digit()) {
        last.to_string()
    } else {
        "v1".to_string()
    }
}

enum Sel<'s> {
    All,
    /// `a.b.*` → `a.b.`
    Prefix(&'s str),
    Exact(&'s str),
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_dotted(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(is_ident)
}

/// `*`, `a.b.C.M`, `a.b.C.*`, several separated by commas; `None` for anything else.
fn parse_selector(s: &str) -> Option<Vec<(&str, Sel<'_>)>> {
    s.split(',')
        .map(|part| {
            let part = part.trim();
            if part == "*" {
                Some((part, Sel::All))
            } else if let Some(prefix) = part.strip_suffix(".*") {
                is_dotted(prefix).then(|| (part, Sel::Prefix(&part[..prefix.len() + 1])))
            } else {
                is_dotted(part).then_some((part, Sel::Exact(part)))
            }
        })
        .collect()
}

/// For each method (in order), the index of the last rule whose selector matches it.
/// `path` names the list in the YAML (`usage.rules`) for positions, `aspect` the rule kind in
/// messages.
fn winners(
    aspect: &str,
    path: &str,
    selectors: &[String],
    methods: &Methods,
    ctx: &Ctx<'_, '_>,
    diags: &mut Diags,
) -> Vec<Option<usize>> {
    let mut winner: Vec<Option<usize>> = vec![None; methods.list.len()];
    for (i, selector) in selectors.iter().enumerate() {
        if ctx.watch.check().is_err() {
            break;
        }
        let (file, pos) = ctx.at(path, i, "selector");
        if selector.is_empty() {
            diags.error(
                file,
                pos,
                format!("{aspect} rule has no selector; use '*' for every method."),
            );
            continue;
        }
        let Some(parts) = parse_selector(selector) else {
            diags.error(
                file,
                pos,
                format!(
                    "{aspect} rule has bad syntax in selector '{}'.",
                    shown(selector)
                ),
            );
            continue;
        };
        let mut unmatched = Vec::new();
        for (text, sel) in parts {
            let mut matched = false;
            match sel {
                Sel::Exact(name) => {
                    if let Some(&m) = methods.by_selector.get(name) {
                        winner[m] = Some(i);
                        matched = true;
                    }
                }
                Sel::All => {
                    for w in winner.iter_mut() {
                        *w = Some(i);
                        matched = true;
                    }
                }
                Sel::Prefix(prefix) => {
                    for (m, (name, _)) in methods.list.iter().enumerate() {
                        if name.starts_with(prefix) {
                            winner[m] = Some(i);
                            matched = true;
                        }
                    }
                }
            }
            if !matched {
                unmatched.push(text);
            }
        }
        if !unmatched.is_empty() {
            diags.warn(
                file,
                pos,
                format!(
                    "{aspect} rule has selector(s) '{}' that do not match and are not shadowed \
                     by other rules.",
                    shown(&unmatched.join(","))
                ),
            );
        }
    }
    winner
}

/// One rule per method with its full selector: the last matching rule, copied.
fn expand<R: Clone>(
    aspect: &str,
    path: &str,
    rules: Vec<R>,
    selector: fn(&mut R) -> &mut String,
    methods: &Methods,
    ctx: &Ctx<'_, '_>,
    diags: &mut Diags,
) -> Vec<R> {
    let mut rules = rules;
    let selectors: Vec<String> = rules.iter_mut().map(|r| selector(r).clone()).collect();
    let winner = winners(aspect, path, &selectors, methods, ctx, diags);
    winner
        .iter()
        .zip(&methods.list)
        .filter_map(|(w, (name, _))| {
            let mut r = rules[(*w)?].clone();
            *selector(&mut r) = name.clone();
            Some(r)
        })
        .collect()
}

fn expand_rules(
    svc: &mut Service,
    methods: &Methods,
    descs: &Descriptors,
    ctx: &Ctx<'_, '_>,
    diags: &mut Diags,
) {
    if let Some(u) = &mut svc.usage {
        u.rules = expand(
            "usage",
            "usage.rules",
            std::mem::take(&mut u.rules),
            |r| &mut r.selector,
            methods,
            ctx,
            diags,
        );
    }
    if let Some(a) = &mut svc.authentication {
        a.rules = expand(
            "authentication",
            "authentication.rules",
            std::mem::take(&mut a.rules),
            |r| &mut r.selector,
            methods,
            ctx,
            diags,
        );
    }
    if let Some(b) = &mut svc.backend {
        for (i, r) in b.rules.iter().enumerate() {
            if let Some(problem) = backend_deadline_problem(r.deadline) {
                let (file, pos) = ctx.at("backend.rules", i, "deadline");
                diags.error(
                    file,
                    pos,
                    format!("backend rule deadline {:?} {problem}.", r.deadline),
                );
            }
            if let Err(problem) = r.backend_protocol() {
                let (file, pos) = ctx.at("backend.rules", i, "protocol");
                diags.error(file, pos, format!("backend rule protocol {problem}."));
            }
        }
        b.rules = expand(
            "backend",
            "backend.rules",
            std::mem::take(&mut b.rules),
            |r| &mut r.selector,
            methods,
            ctx,
            diags,
        );
    }
    if let Some(q) = &mut svc.quota {
        for (i, r) in q.metric_rules.iter().enumerate() {
            for (metric, cost) in &r.metric_costs {
                if let Some(problem) = metric_cost_problem(*cost) {
                    let (file, pos) = ctx.at("quota.metric_rules", i, "metric_costs");
                    diags.error(
                        file,
                        pos,
                        format!("quota rule: the cost {cost} of metric '{metric}' {problem}."),
                    );
                }
            }
        }
        q.metric_rules = expand(
            "quota",
            "quota.metric_rules",
            std::mem::take(&mut q.metric_rules),
            |r| &mut r.selector,
            methods,
            ctx,
            diags,
        );
    }
    if let Some(s) = &mut svc.system_parameters {
        s.rules = expand(
            "system_parameters",
            "system_parameters.rules",
            std::mem::take(&mut s.rules),
            |r| &mut r.selector,
            methods,
            ctx,
            diags,
        );
    }
    let yaml_rules = svc.http.take().map(|h| h.rules).unwrap_or_default();
    let selectors: Vec<String> = yaml_rules.iter().map(|r| r.selector.clone()).collect();
    let winner = winners("http", "http.rules", &selectors, methods, ctx, diags);
    let mut rules = Vec::new();
    for (w, (selector, method)) in winner.iter().zip(&methods.list) {
        if ctx.watch.check().is_err() {
            return;
        }
        let (rule, file, pos, from_option) = match w {
            Some(i) => {
                let (file, pos) = ctx.at("http.rules", *i, "selector");
                (yaml_rules[*i].clone(), file, pos, false)
            }
            None => {
                let file = descs.file_of(method).unwrap_or(ctx.first_yaml);
                match descs.http_option(method) {
                    Ok(Some(p)) => (rule_from_proto(p), file, WHOLE_FILE, true),
                    Ok(None) => continue,
                    Err(e) => {
                        diags.error(file, WHOLE_FILE, format!("Method '{selector}': {e}."));
                        continue;
                    }
                }
            }
        };
        let mut problems = Vec::new();
        check_rule(&rule, method, false, &mut problems);
        // Point at the pattern rather than the selector: it is what is usually wrong.
        let pos = match w {
            Some(i) if !problems.is_empty() => ["get", "put", "post", "delete", "patch", "custom"]
                .iter()
                .find_map(|f| ctx.field_pos("http.rules", *i, f))
                .unwrap_or(pos),
            _ => pos,
        };
        for p in problems {
            let message = if from_option {
                format!("Method '{selector}', option google.api.http: {p}.")
            } else {
                format!("http rule for '{selector}': {p}.")
            };
            diags.error(file, pos, message);
        }
        let mut rule = rule;
        rule.selector = selector.clone();
        rules.push(rule);
    }
    svc.http = Some(Http { rules });
}

fn rule_from_proto(p: HttpRuleProto) -> HttpRule {
    let mut r = HttpRule {
        selector: p.selector,
        body: p.body,
        response_body: p.response_body,
        additional_bindings: p
            .additional_bindings
            .into_iter()
            .map(rule_from_proto)
            .collect(),
        ..Default::default()
    };
    match p.pattern {
        Some(Pattern::Get(t)) => r.get = Some(t),
        Some(Pattern::Put(t)) => r.put = Some(t),
        Some(Pattern::Post(t)) => r.post = Some(t),
        Some(Pattern::Delete(t)) => r.delete = Some(t),
        Some(Pattern::Patch(t)) => r.patch = Some(t),
        Some(Pattern::Custom(c)) => {
            r.custom = Some(CustomHttpPattern {
                kind: c.kind,
                path: c.path,
            })
        }
        None => {}
    }
    r
}

/// What is wrong with `rule` as the HTTP mapping of `method`, as sentence fragments.
fn check_rule(rule: &HttpRule, method: &MethodDescriptor, nested: bool, out: &mut Vec<String>) {
    let patterns = [
        rule.get.is_some(),
        rule.put.is_some(),
        rule.post.is_some(),
        rule.delete.is_some(),
        rule.patch.is_some(),
        rule.custom.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if patterns == 0 {
        out.push(
            "the rule has no pattern; set one of get, put, post, delete, patch or custom"
                .to_string(),
        );
    } else if patterns > 1 {
        out.push(
            "the rule sets more than one of get, put, post, delete, patch and custom; set one"
                .to_string(),
        );
    }
    if let Some(c) = &rule.custom {
        if c.kind.is_empty() {
            out.push("custom pattern has no kind (an HTTP method, or * for any)".to_string());
        }
    }
    if let Some((_, path)) = rule.method_and_path() {
        match Template::parse(path) {
            Err(e) => out.push(format!("the path template \"{path}\" is not valid: {e}")),
            Ok(t) => {
                let input = method.input();
                for v in &t.variables {
                    if let Err(e) = field_path(&input, &v.field_path) {
                        out.push(format!(
                            "variable '{}' in path template \"{path}\" {e}",
                            v.field_path.join(".")
                        ));
                    }
                }
            }
        }
    }
    match rule.body.as_str() {
        "" | "*" => {}
        b if b.contains('.') => out.push(format!(
            "body field path '{b}' should not reference sub messages"
        )),
        b => {
            if method.input().get_field_by_name(b).is_none() {
                out.push(format!(
                    "body field '{b}' is not a field of the request message '{}'",
                    method.input().full_name()
                ));
            }
        }
    }
    if !rule.response_body.is_empty()
        && method
            .output()
            .get_field_by_name(&rule.response_body)
            .is_none()
    {
        out.push(format!(
            "response_body field '{}' is not a field of the response message '{}'",
            rule.response_body,
            method.output().full_name()
        ));
    }
    if nested {
        if !rule.additional_bindings.is_empty() {
            out.push(
                "rules in additional_bindings must not specify additional_bindings".to_string(),
            );
        }
        if !rule.selector.is_empty() {
            out.push("rules in additional_bindings must not specify a selector".to_string());
        }
    } else {
        for b in &rule.additional_bindings {
            check_rule(b, method, true, out);
        }
    }
}

/// Checks that `path` (`book.id`) names a non-repeated field through non-repeated messages.
fn field_path(message: &MessageDescriptor, path: &[String]) -> Result<(), String> {
    let mut msg = message.clone();
    for (i, name) in path.iter().enumerate() {
        let Some(f) = msg.get_field_by_name(name) else {
            return Err(format!(
                "does not name a field: '{}' has no field '{name}'",
                msg.full_name()
            ));
        };
        if f.is_list() || f.is_map() {
            return Err(format!(
                "names the repeated field '{name}' of '{}'; a path variable binds one value",
                msg.full_name()
            ));
        }
        if i + 1 < path.len() {
            match f.kind() {
                Kind::Message(m) => msg = m,
                _ => {
                    return Err(format!(
                        "goes through '{name}' of '{}', which is not a message",
                        msg.full_name()
                    ))
                }
            }
        }
    }
    Ok(())
}

fn finish(svc: &mut Service, files: &[GrpcSource]) {
    if svc.usage.is_none() {
        svc.usage = Some(Usage::default());
    }
    if svc
        .control
        .as_ref()
        .is_none_or(|c| c.environment.is_empty())
    {
        svc.control = Some(Control {
            environment: CONTROL_ENVIRONMENT.to_string(),
        });
    }
    if svc.endpoints.is_empty() {
        svc.endpoints = vec![Endpoint {
            name: svc.name.clone(),
            ..Default::default()
        }];
    }
    svc.logs = generated::logs();
    let user_metrics = std::mem::take(&mut svc.metrics);
    svc.metrics = generated::metrics();
    svc.metrics.extend(generated::streaming_metrics());
    let known: HashSet<String> = svc.metrics.iter().map(|m| m.name.clone()).collect();
    svc.metrics.extend(
        user_metrics
            .into_iter()
            .filter(|m| !known.contains(&m.name)),
    );
    svc.monitored_resources = generated::monitored_resources();
    svc.logging = Some(generated::logging());
    let mut monitoring = generated::monitoring();
    generated::add_streaming_monitoring(&mut monitoring);
    svc.monitoring = Some(monitoring);
    svc.source_info = Some(SourceInfo {
        source_files: files
            .iter()
            .map(|f| {
                serde_json::json!({
                    "@type": CONFIG_FILE_TYPE_URL,
                    "filePath": f.file.path,
                    "fileContents": base64::engine::general_purpose::STANDARD.encode(&f.file.contents),
                    "fileType": f.file_type.as_str(),
                })
            })
            .collect(),
    });
}

#[cfg(test)]
mod tests;
