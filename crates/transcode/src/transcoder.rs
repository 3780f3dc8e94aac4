//! The transcoder proper: routes built from `http.rules`, requests woven from path, query and
//! JSON body into one message, responses printed as proto3 JSON.
//!
//! Weaving works on a JSON tree: the body is parsed (bounded by the caller), each path and
//! query binding is inserted at its field path (lowerCamel or proto spelling, whichever the
//! body used; repeated fields get the value appended after the body's), and the tree is then
//! read into a `DynamicMessage` in one pass with prost-reflect's proto3 JSON reader (unknown
//! fields ignored, as ESP does). Doing it on the tree keeps one code path for every field type
//! (int64 as string, enums, wrappers, `Timestamp`) instead of converting binding text per type.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use percent_encoding::percent_decode;
use portico_config::matcher::Binding;
use portico_config::service::{HttpRule, Service};
use portico_config::{PathMatcher, PathMatcherBuilder};
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor,
    MethodDescriptor, ReflectMessage, SerializeOptions,
};
use serde_json::{Map, Value};

use crate::json_error;

/// `sourceInfo.sourceFiles[].fileType` of a descriptor set.
const FILE_DESCRIPTOR_SET_PROTO: &str = "FILE_DESCRIPTOR_SET_PROTO";
const HTTP_BODY: &str = "google.api.HttpBody";

/// The transcoding flags (ESPv2 names); all off by default, as in ESPv2.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--transcoding_preserve_proto_field_names`: `price_in_usd`, not `priceInUsd`.
    pub preserve_proto_field_names: bool,
    /// `--transcoding_always_print_primitive_fields`: print scalars holding their default.
    pub always_print_primitive_fields: bool,
    /// `--transcoding_always_print_enums_as_ints`.
    pub always_print_enums_as_ints: bool,
    /// `--transcoding_stream_newline_delimited`: one object per line instead of an array.
    pub stream_newline_delimited: bool,
    /// `--transcoding_case_insensitive_enum_parsing`: `"comic"` reads as `COMIC`.
    pub case_insensitive_enum_parsing: bool,
    /// `--transcoding_ignore_query_parameters`: more names skipped besides the API-key and
    /// token parameters.
    pub ignore_query_parameters: Vec<String>,
    /// `--transcoding_ignore_unknown_query_parameters`.
    pub ignore_unknown_query_parameters: bool,
    /// `--transcoding_query_parameters_disable_unescape_plus`: `+` stays `+`.
    pub query_parameters_disable_unescape_plus: bool,
    /// `--transcoding_match_unregistered_custom_verb`: `/a/b:foo` is a custom verb `foo` even
    /// when no template declares it (so it matches no route).
    pub match_unregistered_custom_verb: bool,
}

/// Why a transcoder cannot be built from a config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("the service config holds no descriptor set (sourceInfo.sourceFiles with fileType FILE_DESCRIPTOR_SET_PROTO)")]
    NoDescriptorSet,
    #[error("sourceInfo.sourceFiles[{index}] ({path}): {reason}")]
    DescriptorSet {
        index: usize,
        path: String,
        reason: String,
    },
    #[error("api '{0}' is not a service of the descriptor set")]
    UnknownService(String),
    #[error("http rule for '{selector}': {reason}")]
    Rule { selector: String, reason: String },
}

/// Why a request matched no route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// No template matches the path (ESPv2: 404 "The current request is not defined by this API.").
    NotFound,
    /// A template matches the path, for other HTTP methods (ESPv2: 405 naming the template).
    MethodNotAllowed { template: String },
}

/// Why a request could not be turned into a gRPC message; [`RequestError::http_status`] is
/// what the caller answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The body is not JSON; the text is ESPv2's (sentence, context, caret).
    #[error("{0}")]
    MalformedJson(String),
    /// A query parameter names no field of the request message. ESPv2's transcoder then leaves
    /// the request as it is and the gRPC backend refuses the JSON content type: 415.
    #[error("the query parameter '{0}' does not name a field of the request message")]
    UnknownQueryParameter(String),
    /// A binding or body value does not fit its field.
    #[error("{0}")]
    Invalid(String),
}

impl RequestError {
    pub fn http_status(&self) -> u16 {
        match self {
            RequestError::UnknownQueryParameter(_) => 415,
            _ => 400,
        }
    }
}

/// Why a backend message could not be printed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the backend's response message is not a valid {message}: {reason}")]
pub struct ResponseError {
    message: String,
    reason: String,
}

#[derive(Debug)]
enum BodySpec {
    None,
    Whole,
    Field(FieldDescriptor),
}

/// One HTTP binding of a method.
#[derive(Debug)]
struct Route {
    method: MethodDescriptor,
    body: BodySpec,
    response_body: Option<FieldDescriptor>,
    /// The template's custom verb (`:registeredCustomVerb`), if it has one.
    verb: Option<String>,
}

/// Routes and message types of the gRPC services of one service config. Immutable; share it
/// behind an `Arc` and rebuild it when the config changes.
pub struct Transcoder {
    pool: DescriptorPool,
    /// The methods of the served services, in name order.
    methods: Vec<MethodDescriptor>,
    matcher: PathMatcher<Arc<Route>>,
    verbs: HashSet<String>,
    ignored: HashSet<String>,
    options: Options,
}

impl std::fmt::Debug for Transcoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transcoder")
            .field("verbs", &self.verbs)
            .field("ignored", &self.ignored)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// The descriptor pool of a service config: every `FILE_DESCRIPTOR_SET_PROTO` of
/// `sourceInfo.sourceFiles` (standard base64), in order; a file already in the pool is kept.
pub fn pool_from_service(service: &Service) -> Result<DescriptorPool, BuildError> {
    let mut pool = DescriptorPool::new();
    let mut found = false;
    let files = service
        .source_info
        .as_ref()
        .map(|s| s.source_files.as_slice())
        .unwrap_or_default();
    for (index, file) in files.iter().enumerate() {
        if file.get("fileType").and_then(Value::as_str) != Some(FILE_DESCRIPTOR_SET_PROTO) {
            continue;
        }
        let path = file
            .get("filePath")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let fail = |reason: String| BuildError::DescriptorSet {
            index,
            path: path.clone(),
            reason,
        };
        let contents = file
            .get("fileContents")
            .and_then(Value::as_str)
            .ok_or_else(|| fail("no fileContents".into()))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(contents)
            .map_err(|e| fail(format!("fileContents is not base64: {e}")))?;
        let mut next = pool.clone();
        // A third-party decoder on bytes from a config: a panic in it is an error, not a crash.
        let added = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            add_set(&mut next, &bytes).map(|()| next)
        }));
        pool = match added {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Err(fail(e)),
            Err(_) => return Err(fail("the descriptor decoder failed on it".into())),
        };
        found = true;
    }
    if !found {
        return Err(BuildError::NoDescriptorSet);
    }
    Ok(pool)
}

/// Adds the files of a set that the pool does not have yet (two sets of one config may both
/// carry `google/protobuf/empty.proto`).
fn add_set(pool: &mut DescriptorPool, bytes: &[u8]) -> Result<(), String> {
    use prost::Message as _;
    let mut set = prost_reflect::prost_types::FileDescriptorSet::decode(bytes)
        .map_err(|e| format!("not a FileDescriptorSet: {e}"))?;
    set.file
        .retain(|f| pool.get_file_by_name(f.name()).is_none());
    if set.file.is_empty() {
        return Ok(());
    }
    // Re-encoding drops extension options, which the transcoder does not read (the HTTP rules
    // come from `http.rules`).
    pool.add_file_descriptor_set(set).map_err(|e| e.to_string())
}

impl Transcoder {
    /// Builds the transcoder of a loaded service config: its descriptor sets, `apis[]` and
    /// `http.rules` (already expanded per method by the config compiler).
    pub fn from_service(service: &Service, options: Options) -> Result<Transcoder, BuildError> {
        let pool = pool_from_service(service)?;
        let services: Vec<&str> = service.apis.iter().map(|a| a.name.as_str()).collect();
        let rules = service
            .http
            .as_ref()
            .map(|h| h.rules.as_slice())
            .unwrap_or_default();
        let mut t = Transcoder::new(pool, &services, rules, options)?;
        // The API-key and token query parameters a config names replace the defaults' spellings
        // for the transcoder too (ESPv2 `grpc_transcoder.go`).
        if let Some(sp) = &service.system_parameters {
            for rule in &sp.rules {
                for p in &rule.parameters {
                    if !p.url_query_parameter.is_empty() {
                        t.ignored.insert(p.url_query_parameter.clone());
                    }
                }
            }
        }
        if let Some(auth) = &service.authentication {
            for provider in &auth.providers {
                for loc in &provider.jwt_locations {
                    if !loc.query.is_empty() {
                        t.ignored.insert(loc.query.clone());
                    }
                }
            }
        }
        Ok(t)
    }

    /// Builds from a pool, the gRPC services to serve (`package.Service`) and HTTP rules with
    /// full method selectors. Every method of those services is also reachable as
    /// `POST /package.Service/Method` with the whole message as the body (ESPv2 adds that
    /// binding).
    pub fn new(
        pool: DescriptorPool,
        services: &[&str],
        rules: &[HttpRule],
        options: Options,
    ) -> Result<Transcoder, BuildError> {
        // No `--disallow_colon_in_wildcard_path_segment` here: it shapes ESPv2's route regexes,
        // while its transcoder's path matcher (grpc-httpjson-transcoding's) has no such option.
        let mut builder = PathMatcherBuilder::new();
        let mut verbs = HashSet::new();
        let mut methods: HashMap<String, MethodDescriptor> = HashMap::new();
        for name in services {
            let svc = pool
                .get_service_by_name(name)
                .ok_or_else(|| BuildError::UnknownService(name.to_string()))?;
            for m in svc.methods() {
                methods.insert(m.full_name().to_string(), m);
            }
        }
        for rule in rules {
            let method = match methods.get(&rule.selector) {
                Some(m) => m.clone(),
                None => match find_method(&pool, &rule.selector) {
                    Some(m) => m,
                    // A rule for a method of no listed service has nothing to call.
                    None => continue,
                },
            };
            for binding in std::iter::once(rule).chain(rule.additional_bindings.iter()) {
                register(&mut builder, &mut verbs, &method, binding)?;
            }
        }
        let mut names: Vec<&String> = methods.keys().collect();
        names.sort();
        let mut listed = Vec::with_capacity(names.len());
        for name in names {
            let method = &methods[name];
            listed.push(method.clone());
            let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
            let route = Arc::new(Route {
                method: method.clone(),
                body: BodySpec::Whole,
                response_body: None,
                verb: None,
            });
            // A rule may already bind exactly this path; that one stays.
            let _ = builder.register("POST", &path, route);
        }
        let mut ignored: HashSet<String> = ["key", "api_key", "access_token"]
            .into_iter()
            .map(String::from)
            .collect();
        ignored.extend(options.ignore_query_parameters.iter().cloned());
        Ok(Transcoder {
            pool,
            methods: listed,
            matcher: builder.build(),
            verbs,
            ignored,
            options,
        })
    }

    /// The methods of the served services (`apis[]`), in name order.
    pub fn methods(&self) -> &[MethodDescriptor] {
        &self.methods
    }

    /// The descriptor pool (for error details and `Any`).
    pub fn pool(&self) -> &DescriptorPool {
        &self.pool
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The route for an HTTP method and raw target (`/path?query`).
    pub fn route<'t>(&'t self, http_method: &str, target: &str) -> Result<Call<'t>, RouteError> {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, q),
            None => (target, ""),
        };
        // The last segment's `:x`. ESPv2's transcoder (grpc-httpjson-transcoding's
        // `ExtractRequestParts`) reads it as a custom verb when some template of the service
        // declares `x` (or with the flag, always), and then only a template with that verb
        // matches; otherwise it is text of the segment. Portico's matcher may take the
        // colon text into a wildcard segment, so a match is checked for its verb.
        let verb = path
            .rsplit('/')
            .next()
            .and_then(|last| last.rsplit_once(':'))
            .map(|(_, v)| v);
        let verb = match verb {
            Some(v) if self.verbs.contains(v) => Some(v),
            Some(_) if self.options.match_unregistered_custom_verb => {
                // A verb no template has: no route.
                return Err(RouteError::NotFound);
            }
            _ => None,
        };
        match self.matcher.matched(http_method, path) {
            Some(m) if verb.is_some() && m.value().verb.as_deref() != verb => {
                Err(RouteError::NotFound)
            }
            Some(m) => Ok(Call {
                transcoder: self,
                route: Arc::clone(m.value()),
                bindings: m.bindings(),
                query: query.to_string(),
            }),
            None => match self.matcher.template_for_any_method(path) {
                Some(t) => Err(RouteError::MethodNotAllowed {
                    template: t.to_string(),
                }),
                None => Err(RouteError::NotFound),
            },
        }
    }
}

fn find_method(pool: &DescriptorPool, selector: &str) -> Option<MethodDescriptor> {
    let (service, method) = selector.rsplit_once('.')?;
    pool.get_service_by_name(service)?
        .methods()
        .find(|m| m.name() == method)
}

fn register(
    builder: &mut PathMatcherBuilder<Arc<Route>>,
    verbs: &mut HashSet<String>,
    method: &MethodDescriptor,
    rule: &HttpRule,
) -> Result<(), BuildError> {
    let fail = |reason: String| BuildError::Rule {
        selector: method.full_name().to_string(),
        reason,
    };
    let Some((http_method, template)) = rule.method_and_path() else {
        return Err(fail("no HTTP method and path".into()));
    };
    let input = method.input();
    let body = match rule.body.as_str() {
        "" => BodySpec::None,
        "*" => BodySpec::Whole,
        name => BodySpec::Field(input.get_field_by_name(name).ok_or_else(|| {
            fail(format!(
                "body field '{name}' is not in {}",
                input.full_name()
            ))
        })?),
    };
    let response_body = match rule.response_body.as_str() {
        "" => None,
        name => Some(method.output().get_field_by_name(name).ok_or_else(|| {
            fail(format!(
                "response_body field '{name}' is not in {}",
                method.output().full_name()
            ))
        })?),
    };
    let verb = template
        .rsplit('/')
        .next()
        .and_then(|l| l.rsplit_once(':'))
        .map(|(_, v)| v.to_string());
    if let Some(v) = &verb {
        verbs.insert(v.clone());
    }
    let route = Arc::new(Route {
        method: method.clone(),
        body,
        response_body,
        verb,
    });
    match builder.register(http_method, template, route) {
        Ok(()) => Ok(()),
        // Two rules with one pattern: the first stays, as a route table would keep it.
        Err(portico_config::TemplateError::Duplicate { .. }) => Ok(()),
        Err(e) => Err(fail(format!(
            "the path template {template:?} is not valid: {e}"
        ))),
    }
}

/// A request matched to a method.
#[derive(Debug)]
pub struct Call<'t> {
    transcoder: &'t Transcoder,
    route: Arc<Route>,
    bindings: Vec<Binding>,
    query: String,
}

impl Call<'_> {
    /// `package.Service.Method`, the selector the config's other rules use.
    pub fn selector(&self) -> &str {
        self.route.method.full_name()
    }

    /// The gRPC `:path`, `/package.Service/Method`.
    pub fn grpc_path(&self) -> String {
        format!(
            "/{}/{}",
            self.route.method.parent_service().full_name(),
            self.route.method.name()
        )
    }

    pub fn method(&self) -> &MethodDescriptor {
        &self.route.method
    }

    /// The request messages (unframed protobuf): one, or for a client-streaming method whose
    /// body is a JSON array, one per element. `body` must already be bounded by the caller.
    pub fn request_messages(
        &self,
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<Vec<Vec<u8>>, RequestError> {
        let input = self.route.method.input();
        let opts = &self.transcoder.options;
        let query = self.query_bindings()?;
        let parse = |body: &[u8]| -> Result<Value, RequestError> {
            serde_json::from_slice::<Value>(body)
                .map_err(|e| RequestError::MalformedJson(json_error::describe(&e, body)))
        };
        let http_body = |body: &[u8]| -> Value {
            let mut o = Map::new();
            if let Some(ct) = content_type {
                o.insert("contentType".into(), Value::String(ct.to_string()));
            }
            o.insert(
                "data".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(body)),
            );
            Value::Object(o)
        };
        let roots: Vec<Value> = match &self.route.body {
            BodySpec::None => vec![Value::Object(Map::new())],
            BodySpec::Whole if input.full_name() == HTTP_BODY => vec![http_body(body)],
            BodySpec::Whole if body.iter().all(u8::is_ascii_whitespace) => {
                vec![Value::Object(Map::new())]
            }
            BodySpec::Whole => match parse(body)? {
                Value::Array(items) if self.route.method.is_client_streaming() => items,
                v => vec![v],
            },
            BodySpec::Field(f) => {
                let mut o = Map::new();
                if matches!(f.kind(), Kind::Message(m) if m.full_name() == HTTP_BODY) {
                    o.insert(f.name().to_string(), http_body(body));
                } else if !body.iter().all(u8::is_ascii_whitespace) {
                    o.insert(f.name().to_string(), parse(body)?);
                }
                vec![Value::Object(o)]
            }
        };
        let mut out = Vec::with_capacity(roots.len());
        for mut root in roots {
            if !root.is_object() {
                return Err(RequestError::Invalid(format!(
                    "the body must be a JSON object for {}",
                    input.full_name()
                )));
            }
            for b in &self.bindings {
                insert(&mut root, &input, &b.field_path, &b.value, false).map_err(|e| match e {
                    InsertError::Unknown => RequestError::Invalid(format!(
                        "the path variable '{}' names no field of {}",
                        b.field_path.join("."),
                        input.full_name()
                    )),
                    InsertError::Bad(m) => RequestError::Invalid(m),
                })?;
            }
            for (path, value) in &query {
                match insert(&mut root, &input, path, value, true) {
                    Ok(()) => {}
                    Err(InsertError::Unknown) if opts.ignore_unknown_query_parameters => {}
                    Err(InsertError::Unknown) => {
                        return Err(RequestError::UnknownQueryParameter(path.join(".")))
                    }
                    Err(InsertError::Bad(m)) => return Err(RequestError::Invalid(m)),
                }
            }
            if opts.case_insensitive_enum_parsing {
                fix_enum_case(&mut root, &input, 0);
            }
            let de = DeserializeOptions::new().deny_unknown_fields(false);
            let msg = DynamicMessage::deserialize_with_options(input.clone(), root, &de)
                .map_err(|e| RequestError::Invalid(format!("Invalid request body: {e}")))?;
            out.push(prost::Message::encode_to_vec(&msg));
        }
        Ok(out)
    }

    /// The first query parameter that names no field of the request message (ESPv2's
    /// transcoder then passes the request on untranscoded, its `createTranscoder` having failed
    /// with INVALID_ARGUMENT); `None` when every one does, or when unknown ones are ignored.
    pub fn unknown_query_parameter(&self) -> Option<String> {
        if self.transcoder.options.ignore_unknown_query_parameters {
            return None;
        }
        let input = self.route.method.input();
        let query = match self.query_bindings() {
            Ok(q) => q,
            // Not an unknown name; the transcoding itself reports it.
            Err(_) => return None,
        };
        query.into_iter().find_map(|(path, value)| {
            let mut scratch = Value::Object(Map::new());
            match insert(&mut scratch, &input, &path, &value, true) {
                Err(InsertError::Unknown) => Some(path.join(".")),
                _ => None,
            }
        })
    }

    /// Query parameters as field paths and decoded values, minus the ignored names.
    fn query_bindings(&self) -> Result<Vec<(Vec<String>, String)>, RequestError> {
        let plus = !self
            .transcoder
            .options
            .query_parameters_disable_unescape_plus;
        let mut out = Vec::new();
        for pair in self.query.split('&') {
            if pair.is_empty() {
                continue;
            }
            let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| -> String {
                let s = if plus {
                    std::borrow::Cow::Owned(s.replace('+', " "))
                } else {
                    std::borrow::Cow::Borrowed(s)
                };
                percent_decode(s.as_bytes())
                    .decode_utf8_lossy()
                    .into_owned()
            };
            let name = decode(raw_name);
            if name.is_empty() || self.transcoder.ignored.contains(&name) {
                continue;
            }
            out.push((
                name.split('.').map(str::to_string).collect(),
                decode(raw_value),
            ));
        }
        Ok(out)
    }

    /// A printer for this method's response messages.
    pub fn response(&self) -> ResponseWriter {
        let o = &self.transcoder.options;
        ResponseWriter {
            output: self.route.method.output(),
            response_body: self.route.response_body.clone(),
            streaming: self.route.method.is_server_streaming(),
            newline: o.stream_newline_delimited,
            ser: SerializeOptions::new()
                .stringify_64_bit_integers(true)
                .use_enum_numbers(o.always_print_enums_as_ints)
                .use_proto_field_name(o.preserve_proto_field_names)
                .skip_default_fields(!o.always_print_primitive_fields),
            proto_names: o.preserve_proto_field_names,
            count: 0,
            content_type: None,
        }
    }
}

enum InsertError {
    Unknown,
    Bad(String),
}

fn find_field(msg: &MessageDescriptor, name: &str) -> Option<FieldDescriptor> {
    msg.get_field_by_name(name)
        .or_else(|| msg.get_field_by_json_name(name))
}

/// The key a field already has in a JSON object (either spelling), else its proto name.
fn key_for(obj: &Map<String, Value>, field: &FieldDescriptor) -> String {
    if obj.contains_key(field.json_name()) {
        field.json_name().to_string()
    } else {
        field.name().to_string()
    }
}

/// Inserts a path or query binding at `path` below `root` (an object).
fn insert(
    root: &mut Value,
    desc: &MessageDescriptor,
    path: &[String],
    value: &str,
    from_query: bool,
) -> Result<(), InsertError> {
    let mut msg = desc.clone();
    let mut node = root;
    for (i, seg) in path.iter().enumerate() {
        let field = find_field(&msg, seg).ok_or(InsertError::Unknown)?;
        let Value::Object(obj) = node else {
            return Err(InsertError::Bad(format!(
                "'{}' is not a message in the request body",
                path[..i].join(".")
            )));
        };
        let key = key_for(obj, &field);
        let last = i + 1 == path.len();
        if field.is_map() || (!last && field.is_list()) {
            return Err(InsertError::Bad(format!(
                "'{}' is a {} field and cannot be set from {}",
                path[..=i].join("."),
                if field.is_map() { "map" } else { "repeated" },
                if from_query { "the query" } else { "the path" }
            )));
        }
        if !last {
            match field.kind() {
                Kind::Message(m) if !is_scalar_wkt(&m) => {
                    let entry = obj.entry(key).or_insert_with(|| Value::Object(Map::new()));
                    if entry.is_null() {
                        *entry = Value::Object(Map::new());
                    }
                    node = entry;
                    msg = m;
                    continue;
                }
                _ => return Err(InsertError::Unknown),
            }
        }
        let v = scalar_json(&field, value, &path.join("."))?;
        if field.is_list() {
            let entry = obj.entry(key).or_insert_with(|| Value::Array(Vec::new()));
            match entry {
                Value::Array(items) => items.push(v),
                other => *other = Value::Array(vec![v]),
            }
        } else {
            obj.insert(key, v);
        }
        return Ok(());
    }
    Err(InsertError::Unknown)
}

/// Well-known types whose JSON form is a string, number or bool.
fn is_scalar_wkt(m: &MessageDescriptor) -> bool {
    matches!(
        m.full_name(),
        "google.protobuf.Timestamp"
            | "google.protobuf.Duration"
            | "google.protobuf.FieldMask"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.FloatValue"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.Int32Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.BoolValue"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
    )
}

/// The JSON value a binding's text stands for in a field of this kind. Numbers stay strings
/// (proto3 JSON reads `"4"` for every numeric type and keeps int64 exact).
fn scalar_json(field: &FieldDescriptor, value: &str, path: &str) -> Result<Value, InsertError> {
    let boolean = |v: &str| match v {
        "true" | "True" | "1" => Ok(Value::Bool(true)),
        "false" | "False" | "0" => Ok(Value::Bool(false)),
        _ => Err(InsertError::Bad(format!(
            "Invalid value for bool field {path}: {value:?}"
        ))),
    };
    match field.kind() {
        Kind::Bool => boolean(value),
        Kind::Enum(_) => Ok(match value.parse::<i32>() {
            Ok(n) => Value::from(n),
            Err(_) => Value::String(value.to_string()),
        }),
        Kind::Message(m) if m.full_name() == "google.protobuf.BoolValue" => boolean(value),
        Kind::Message(m) if is_scalar_wkt(&m) => Ok(Value::String(value.to_string())),
        Kind::Message(m) => Err(InsertError::Bad(format!(
            "'{path}' is a message ({}) and cannot be set from a path or query value",
            m.full_name()
        ))),
        _ => Ok(Value::String(value.to_string())),
    }
}

/// `--transcoding_case_insensitive_enum_parsing`: enum names matched without regard to case
/// are rewritten to their declared spelling before the strict proto3 JSON reader sees them.
fn fix_enum_case(v: &mut Value, desc: &MessageDescriptor, depth: usize) {
    // serde_json stops nesting at 128 levels; this walk needs no more.
    if depth > 128 {
        return;
    }
    let Value::Object(obj) = v else { return };
    for (key, value) in obj.iter_mut() {
        let Some(field) = find_field(desc, key) else {
            continue;
        };
        let values: Vec<&mut Value> = if field.is_map() {
            match value {
                Value::Object(o) => o.values_mut().collect(),
                _ => continue,
            }
        } else if field.is_list() {
            match value {
                Value::Array(a) => a.iter_mut().collect(),
                _ => continue,
            }
        } else {
            vec![value]
        };
        let kind = if field.is_map() {
            match field.kind() {
                Kind::Message(entry) => entry.map_entry_value_field().kind(),
                k => k,
            }
        } else {
            field.kind()
        };
        for item in values {
            match &kind {
                Kind::Enum(e) => {
                    if let Value::String(s) = item {
                        if e.get_value_by_name(s).is_none() {
                            if let Some(found) =
                                e.values().find(|ev| ev.name().eq_ignore_ascii_case(s))
                            {
                                *s = found.name().to_string();
                            }
                        }
                    }
                }
                Kind::Message(m) => fix_enum_case(item, m, depth + 1),
                _ => {}
            }
        }
    }
}

/// Prints a method's response messages: one JSON object for a unary method, a JSON array (or
/// newline-delimited objects) for a server-streaming one; `google.api.HttpBody` as its bytes.
#[derive(Debug)]
pub struct ResponseWriter {
    output: MessageDescriptor,
    response_body: Option<FieldDescriptor>,
    streaming: bool,
    newline: bool,
    ser: SerializeOptions,
    /// `SerializeOptions` keeps its settings private; the key `response_body` picks needs it.
    proto_names: bool,
    count: usize,
    content_type: Option<String>,
}

impl ResponseWriter {
    /// The response `content-type`: `application/json`, or the `content_type` of the first
    /// `google.api.HttpBody` message once one was printed.
    pub fn content_type(&self) -> &str {
        self.content_type.as_deref().unwrap_or("application/json")
    }

    /// True when the printed type is `google.api.HttpBody` (raw bytes, its own content type).
    pub fn is_http_body(&self) -> bool {
        self.printed_type().full_name() == HTTP_BODY
    }

    fn printed_type(&self) -> MessageDescriptor {
        match self.response_body.as_ref().map(FieldDescriptor::kind) {
            Some(Kind::Message(m)) => m,
            _ => self.output.clone(),
        }
    }

    /// The bytes to send for one backend message (unframed protobuf).
    pub fn message(&mut self, payload: &[u8]) -> Result<Bytes, ResponseError> {
        let msg =
            DynamicMessage::decode(self.output.clone(), payload).map_err(|e| ResponseError {
                message: self.output.full_name().to_string(),
                reason: e.to_string(),
            })?;
        let mut out = Vec::new();
        if self.is_http_body() {
            let body = match &self.response_body {
                Some(f) => match msg.get_field(f).as_message() {
                    Some(m) => m.clone(),
                    None => DynamicMessage::new(self.printed_type()),
                },
                None => msg,
            };
            let desc = body.descriptor();
            if self.count == 0 {
                if let Some(ct) = desc
                    .get_field_by_name("content_type")
                    .and_then(|f| body.get_field(&f).as_str().map(str::to_string))
                {
                    if !ct.is_empty() {
                        self.content_type = Some(ct);
                    }
                }
            }
            if let Some(data) = desc
                .get_field_by_name("data")
                .and_then(|f| body.get_field(&f).as_bytes().map(|b| b.to_vec()))
            {
                out.extend_from_slice(&data);
            }
            self.count += 1;
            return Ok(Bytes::from(out));
        }
        let json = self.to_json(&msg);
        if self.streaming {
            if self.newline {
                out.extend_from_slice(&json);
                out.push(b'\n');
            } else {
                out.push(if self.count == 0 { b'[' } else { b',' });
                out.extend_from_slice(&json);
            }
        } else {
            out.extend_from_slice(&json);
        }
        self.count += 1;
        Ok(Bytes::from(out))
    }

    /// What ends the body once the backend is done (`]` of a stream's array; `[]` when the
    /// stream had no message).
    pub fn finish(&self) -> Bytes {
        if self.streaming && !self.newline && !self.is_http_body() {
            Bytes::from_static(if self.count == 0 { b"[]" } else { b"]" })
        } else {
            Bytes::new()
        }
    }

    /// True for a server-streaming method (a JSON array or lines).
    pub fn is_streaming(&self) -> bool {
        self.streaming
    }

    /// Messages printed so far.
    pub fn count(&self) -> usize {
        self.count
    }

    fn to_json(&self, msg: &DynamicMessage) -> Vec<u8> {
        let Some(field) = &self.response_body else {
            return serialize(msg, &self.ser);
        };
        // Only the named field is printed: its JSON value, or its default when unset.
        let mut one = DynamicMessage::new(self.output.clone());
        if msg.has_field(field) {
            one.set_field(field, msg.get_field(field).into_owned());
        }
        let key = if self.proto_names {
            field.name()
        } else {
            field.json_name()
        };
        let printed = match serde_json::from_slice::<Value>(&serialize(&one, &self.ser)) {
            Ok(Value::Object(mut o)) => o.remove(key),
            _ => None,
        };
        let value = printed.unwrap_or_else(|| {
            if field.is_list() {
                Value::Array(Vec::new())
            } else if field.is_map() || matches!(field.kind(), Kind::Message(_)) {
                Value::Object(Map::new())
            } else {
                // A scalar at its default: print it as always-print would.
                let all = self.ser.clone().skip_default_fields(false);
                match serde_json::from_slice::<Value>(&serialize(&one, &all)) {
                    Ok(Value::Object(mut o)) => o.remove(key).unwrap_or(Value::Null),
                    _ => Value::Null,
                }
            }
        });
        serde_json::to_vec(&value).unwrap_or_default()
    }
}

fn serialize(msg: &DynamicMessage, opts: &SerializeOptions) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    match msg.serialize_with_options(&mut ser, opts) {
        Ok(()) => out,
        // A message decoded from the wire always prints; an Any of a type the pool lacks does
        // not, and is shown as an error object rather than dropped silently.
        Err(e) => {
            serde_json::to_vec(&serde_json::json!({ "error": e.to_string() })).unwrap_or_default()
        }
    }
}
