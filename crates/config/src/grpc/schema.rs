//! The part of `google.api.Service` an `api_config.yaml` may set, as a table, and the walk that
//! checks a YAML tree against it and turns it into proto3 JSON (lowerCamel names), remembering
//! where each list element came from.
//!
//! Keys are the proto field names (`allow_unregistered_calls`); the lowerCamel JSON names
//! (`allowUnregisteredCalls`) are accepted too, as Google's YAML reader does, but not both
//! spellings of one field in one mapping.

use super::Diags;
use crate::openapi::tree::{Node, Value};
use serde_json::{Map, Value as Json};
use std::collections::HashMap;

#[derive(Clone, Copy)]
pub(super) enum Ty {
    Str,
    Bool,
    Int,
    Num,
    Msg(&'static Msg),
    /// `map<string, int64>`.
    IntMap,
}

pub(super) struct Field {
    pub name: &'static str,
    pub ty: Ty,
    pub repeated: bool,
}

pub(super) struct Msg {
    pub name: &'static str,
    pub fields: &'static [Field],
}

const fn one(name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        repeated: false,
    }
}

const fn many(name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        repeated: true,
    }
}

use Ty::*;

pub(super) static SERVICE: Msg = Msg {
    name: "google.api.Service",
    fields: &[
        one("type", Str),
        one("config_version", Int),
        one("name", Str),
        one("title", Str),
        one("producer_project_id", Str),
        one("id", Str),
        many("apis", Msg(&API)),
        one("documentation", Msg(&DOCUMENTATION)),
        one("http", Msg(&HTTP)),
        one("usage", Msg(&USAGE)),
        one("authentication", Msg(&AUTHENTICATION)),
        one("backend", Msg(&BACKEND)),
        one("quota", Msg(&QUOTA)),
        many("metrics", Msg(&METRIC)),
        one("system_parameters", Msg(&SYSTEM_PARAMETERS)),
        many("endpoints", Msg(&ENDPOINT)),
        one("control", Msg(&CONTROL)),
    ],
};

static API: Msg = Msg {
    name: "google.protobuf.Api",
    fields: &[one("name", Str), one("version", Str)],
};

static DOCUMENTATION: Msg = Msg {
    name: "google.api.Documentation",
    fields: &[one("summary", Str), one("overview", Str)],
};

static HTTP: Msg = Msg {
    name: "google.api.Http",
    fields: &[
        many("rules", Msg(&HTTP_RULE)),
        one("fully_decode_reserved_expansion", Bool),
    ],
};

pub(super) static HTTP_RULE: Msg = Msg {
    name: "google.api.HttpRule",
    fields: &[
        one("selector", Str),
        one("get", Str),
        one("put", Str),
        one("post", Str),
        one("delete", Str),
        one("patch", Str),
        one("custom", Msg(&CUSTOM_HTTP_PATTERN)),
        one("body", Str),
        one("response_body", Str),
        many("additional_bindings", Msg(&HTTP_RULE)),
    ],
};

static CUSTOM_HTTP_PATTERN: Msg = Msg {
    name: "google.api.CustomHttpPattern",
    fields: &[one("kind", Str), one("path", Str)],
};

static USAGE: Msg = Msg {
    name: "google.api.Usage",
    fields: &[many("requirements", Str), many("rules", Msg(&USAGE_RULE))],
};

static USAGE_RULE: Msg = Msg {
    name: "google.api.UsageRule",
    fields: &[
        one("selector", Str),
        one("allow_unregistered_calls", Bool),
        one("skip_service_control", Bool),
    ],
};

static AUTHENTICATION: Msg = Msg {
    name: "google.api.Authentication",
    fields: &[
        many("rules", Msg(&AUTHENTICATION_RULE)),
        many("providers", Msg(&AUTH_PROVIDER)),
    ],
};

static AUTHENTICATION_RULE: Msg = Msg {
    name: "google.api.AuthenticationRule",
    fields: &[
        one("selector", Str),
        one("allow_without_credential", Bool),
        many("requirements", Msg(&AUTH_REQUIREMENT)),
    ],
};

static AUTH_REQUIREMENT: Msg = Msg {
    name: "google.api.AuthRequirement",
    fields: &[one("provider_id", Str), one("audiences", Str)],
};

static AUTH_PROVIDER: Msg = Msg {
    name: "google.api.AuthProvider",
    fields: &[
        one("id", Str),
        one("issuer", Str),
        one("jwks_uri", Str),
        one("audiences", Str),
        one("authorization_url", Str),
        many("jwt_locations", Msg(&JWT_LOCATION)),
    ],
};

static JWT_LOCATION: Msg = Msg {
    name: "google.api.JwtLocation",
    fields: &[
        one("header", Str),
        one("query", Str),
        one("cookie", Str),
        one("value_prefix", Str),
    ],
};

static BACKEND: Msg = Msg {
    name: "google.api.Backend",
    fields: &[many("rules", Msg(&BACKEND_RULE))],
};

static BACKEND_RULE: Msg = Msg {
    name: "google.api.BackendRule",
    fields: &[
        one("selector", Str),
        one("address", Str),
        one("deadline", Num),
        one("path_translation", Str),
        one("jwt_audience", Str),
        one("disable_auth", Bool),
        one("protocol", Str),
    ],
};

static QUOTA: Msg = Msg {
    name: "google.api.Quota",
    fields: &[
        many("limits", Msg(&QUOTA_LIMIT)),
        many("metric_rules", Msg(&METRIC_RULE)),
    ],
};

static QUOTA_LIMIT: Msg = Msg {
    name: "google.api.QuotaLimit",
    fields: &[
        one("name", Str),
        one("description", Str),
        one("default_limit", Int),
        one("max_limit", Int),
        one("free_tier", Int),
        one("duration", Str),
        one("metric", Str),
        one("unit", Str),
        one("values", IntMap),
        one("display_name", Str),
    ],
};

static METRIC_RULE: Msg = Msg {
    name: "google.api.MetricRule",
    fields: &[one("selector", Str), one("metric_costs", IntMap)],
};

static METRIC: Msg = Msg {
    name: "google.api.MetricDescriptor",
    fields: &[
        one("name", Str),
        many("labels", Msg(&LABEL)),
        one("metric_kind", Str),
        one("value_type", Str),
        one("unit", Str),
        one("display_name", Str),
        one("description", Str),
    ],
};

static LABEL: Msg = Msg {
    name: "google.api.LabelDescriptor",
    fields: &[
        one("key", Str),
        one("value_type", Str),
        one("description", Str),
    ],
};

static SYSTEM_PARAMETERS: Msg = Msg {
    name: "google.api.SystemParameters",
    fields: &[many("rules", Msg(&SYSTEM_PARAMETER_RULE))],
};

static SYSTEM_PARAMETER_RULE: Msg = Msg {
    name: "google.api.SystemParameterRule",
    fields: &[
        one("selector", Str),
        many("parameters", Msg(&SYSTEM_PARAMETER)),
    ],
};

static SYSTEM_PARAMETER: Msg = Msg {
    name: "google.api.SystemParameter",
    fields: &[
        one("name", Str),
        one("http_header", Str),
        one("url_query_parameter", Str),
    ],
};

static ENDPOINT: Msg = Msg {
    name: "google.api.Endpoint",
    fields: &[
        one("name", Str),
        many("aliases", Str),
        one("target", Str),
        one("allow_cors", Bool),
    ],
};

static CONTROL: Msg = Msg {
    name: "google.api.Control",
    fields: &[one("environment", Str)],
};

/// `allow_unregistered_calls` → `allowUnregisteredCalls`.
pub(super) fn lower_camel(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Where the elements of the top-level lists came from (`"http.rules"` → the nodes, in file
/// order): merging appends lists, so element `i` of a merged list is element `i` here.
pub(super) type Origins<'n> = HashMap<String, Vec<(usize, &'n Node)>>;

pub(super) struct Walk<'d, 'n> {
    pub diags: &'d mut Diags,
    pub file: usize,
    pub origins: &'d mut Origins<'n>,
    pub watch: &'d crate::openapi::Watch<'d>,
}

impl<'n> Walk<'_, 'n> {
    /// `node` as the JSON of message `msg`, or `None` after reporting why it is not one.
    /// `path` is the dotted path of the top-level lists (empty once inside a list).
    pub fn message(
        &mut self,
        node: &'n Node,
        msg: &'static Msg,
        path: Option<&str>,
    ) -> Option<Json> {
        if self.watch.check().is_err() {
            return None;
        }
        let Some(entries) = node.as_map() else {
            if matches!(node.value, Value::Null) {
                return Some(Json::Object(Map::new()));
            }
            self.diags.error(
                self.file,
                node.pos,
                format!(
                    "Expected a mapping for '{}', found {}.",
                    msg.name,
                    node.kind()
                ),
            );
            return None;
        };
        let mut out = Map::new();
        let mut ok = true;
        for (k, v) in entries {
            let field = msg
                .fields
                .iter()
                .find(|f| f.name == k.text || lower_camel(f.name) == k.text);
            let Some(field) = field else {
                self.diags.error(
                    self.file,
                    k.pos,
                    format!(
                        "Found field '{}' which is unknown in '{}'.",
                        k.text, msg.name
                    ),
                );
                ok = false;
                continue;
            };
            let json_name = lower_camel(field.name);
            if out.contains_key(&json_name) {
                self.diags.error(
                    self.file,
                    k.pos,
                    format!(
                        "Field '{}' of '{}' is given twice (as '{}' and '{json_name}'); give it once.",
                        field.name, msg.name, field.name
                    ),
                );
                ok = false;
                continue;
            }
            if matches!(v.value, Value::Null) {
                continue;
            }
            let sub_path = path.map(|p| {
                if p.is_empty() {
                    field.name.to_string()
                } else {
                    format!("{p}.{}", field.name)
                }
            });
            let value = if field.repeated {
                let Some(items) = v.as_seq() else {
                    self.diags.error(
                        self.file,
                        v.pos,
                        format!(
                            "Field '{}' of '{}' must be a list, not {}.",
                            k.text,
                            msg.name,
                            v.kind()
                        ),
                    );
                    ok = false;
                    continue;
                };
                let mut list = Vec::with_capacity(items.len());
                for item in items {
                    if let (Some(p), Ty::Msg(_)) = (&sub_path, field.ty) {
                        self.origins
                            .entry(p.clone())
                            .or_default()
                            .push((self.file, item));
                    }
                    match self.value(item, field, &k.text, msg, None) {
                        Some(j) => list.push(j),
                        None => ok = false,
                    }
                }
                Json::Array(list)
            } else {
                match self.value(v, field, &k.text, msg, sub_path.as_deref()) {
                    Some(j) => j,
                    None => {
                        ok = false;
                        continue;
                    }
                }
            };
            out.insert(json_name, value);
        }
        ok.then_some(Json::Object(out))
    }

    fn value(
        &mut self,
        v: &'n Node,
        field: &Field,
        key: &str,
        msg: &Msg,
        path: Option<&str>,
    ) -> Option<Json> {
        let wrong = |this: &mut Self, what: &str| {
            this.diags.error(
                this.file,
                v.pos,
                format!(
                    "Field '{key}' of '{}' must be {what}, not {}.",
                    msg.name,
                    v.kind()
                ),
            );
            None
        };
        match field.ty {
            Ty::Str => match &v.value {
                Value::Seq(_) | Value::Map(_) => wrong(self, "a string"),
                _ => Some(Json::String(v.scalar_text().unwrap_or_default())),
            },
            Ty::Bool => match &v.value {
                Value::Bool(b) => Some(Json::Bool(*b)),
                _ => wrong(self, "true or false"),
            },
            Ty::Int => match int_of(v) {
                Some(i) => Some(Json::from(i)),
                None => wrong(self, "an integer"),
            },
            Ty::Num => match &v.value {
                Value::Int(i) => Some(Json::from(*i)),
                Value::Float(f, _) if f.is_finite() => {
                    serde_json::Number::from_f64(*f).map(Json::Number)
                }
                _ => wrong(self, "a number"),
            },
            Ty::IntMap => {
                let Some(entries) = v.as_map() else {
                    return wrong(self, "a mapping of names to integers");
                };
                let mut out = Map::new();
                let mut ok = true;
                for (k, e) in entries {
                    match int_of(e) {
                        Some(i) => {
                            out.insert(k.text.clone(), Json::from(i));
                        }
                        None => {
                            self.diags.error(
                                self.file,
                                e.pos,
                                format!(
                                    "The value of '{}' in field '{key}' of '{}' must be an integer, not {}.",
                                    k.text,
                                    msg.name,
                                    e.kind()
                                ),
                            );
                            ok = false;
                        }
                    }
                }
                ok.then_some(Json::Object(out))
            }
            Ty::Msg(m) => self.message(v, m, path),
        }
    }
}

/// An integer, written as a YAML integer or as a string of one (proto3 JSON's int64 form).
fn int_of(v: &Node) -> Option<i64> {
    match &v.value {
        Value::Int(i) => Some(*i),
        Value::Str(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Protobuf merge of two messages in JSON form: lists append, messages merge field by field,
/// anything else is replaced by the later value.
pub(super) fn merge(into: &mut Json, from: Json) {
    match (into, from) {
        (Json::Object(a), Json::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (Json::Array(a), Json::Array(b)) => a.extend(b),
        (slot, v) => *slot = v,
    }
}
