//! Per-config method tables: where a request is **matched**.
//!
//! For every service config in the current rollout, [`ConfigRoutes::build`] compiles once (off
//! the request path) a `PathMatcher<Arc<MethodInfo>>` from `http.rules` plus everything the
//! pipeline needs per method (usage rule, API-key locations, auth requirements, quota costs,
//! backend rule, API name/version). A [`RouteTable`] holds the configs of one rollout with their
//! traffic percentages; the server swaps whole tables atomically when a new rollout arrives.
//!
//! CORS mechanism (A): when the service's own endpoint has `allowCors`, an `OPTIONS` rule with
//! selector `CORS` (or `CORS.1`, ... when taken), no auth and unregistered calls allowed is added
//! for every registered path template that has no explicit OPTIONS rule, as ESP's config loader
//! does.

use crate::auth::api_key::ApiKeyLocations;
use crate::forward::Forwarder;
use crate::settings::{BackendAddr, BackendScheme};
use portico_config::service::{
    AuthenticationRule, BackendProtocol, BackendRule, HttpRule, SystemParameter, UsageRule,
};
use portico_config::{PathMatcher, PathMatcherBuilder, Service};
use rand::Rng;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

/// Everything the pipeline needs about one matched method, built once per config.
#[derive(Debug, Clone)]
pub struct MethodInfo {
    /// `google.api.HttpRule.selector`, e.g. `1.echo_api_endpoints_demo_proj_cloud_goog.Echo`.
    pub selector: String,
    pub allow_unregistered_calls: bool,
    pub skip_service_control: bool,
    /// Configured API-key locations (custom ones replace the defaults).
    pub api_key_locations: ApiKeyLocations,
    /// The method's authentication rule when it has at least one requirement.
    pub auth: Option<AuthenticationRule>,
    /// `quota.metric_rules` costs for this selector.
    pub metric_costs: Vec<(String, i64)>,
    pub backend_rule: Option<BackendRule>,
    pub api_name: String,
    pub api_version: String,
    /// A preflight rule added for `allowCors` (proxied, never checked).
    pub cors_preflight: bool,
    /// `--enable_backend_routing`: where this method's requests go (from `backend.rules`).
    /// `None` with routing enabled means the method has no address (ESP answers 500).
    pub backend: Option<Arc<BackendTarget>>,
    /// The method's backend rule has no address: its requests go to `--backend` (with or
    /// without backend routing), bounded by the rule's deadline when it sets one, in the HTTP
    /// version its `protocol` asks for.
    pub local_backend: Option<LocalBackend>,
    /// A gRPC method with a streaming request or response (`apis[].methods[]`): no backend
    /// deadline applies to it, as in ESPv2 (a stream may rightly last longer than any
    /// deadline meant for one call).
    pub streaming: bool,
}

/// A backend rule without an address (ESPv2's sidecar form): settings for `--backend`.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    pub deadline: Option<std::time::Duration>,
    /// A client for `--backend` in the HTTP version the rule's `protocol` asks for, when that is
    /// not the one `--backend`'s scheme implies (`h2` for an `http://` backend); `None` uses the
    /// serving thread's own client. Shared by every method and thread that needs it.
    pub forwarder: Option<Forwarder>,
}

/// `backend.rules[].path_translation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathTranslation {
    /// Address path + the original request target (query included).
    AppendPathToAddress,
    /// Address path + `?` + path bindings as query parameters + the non-system query.
    ConstantAddress,
}

/// A compiled backend rule: its client (shared with the rules for the same backend and HTTP
/// version) and how to build the upstream target.
pub struct BackendTarget {
    pub address: String,
    pub forwarder: Forwarder,
    /// The address's path without a trailing `/` (empty for none).
    pub path_prefix: String,
    pub translation: PathTranslation,
    /// Host header for the backend: the address's host.
    pub host: http::HeaderValue,
    /// `host:port` the requests go to (the access log's `%UPSTREAM_HOST%`).
    pub authority: String,
    /// `deadline` of the rule, if set.
    pub deadline: Option<std::time::Duration>,
}

impl std::fmt::Debug for BackendTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTarget")
            .field("address", &self.address)
            .field("translation", &self.translation)
            .finish()
    }
}

/// Splits a rule address (`https://host[:port][/path]`, `http://...`, `grpc://host:port`) into
/// the `--backend` form and the path prefix.
fn parse_rule_address(address: &str) -> Result<(BackendAddr, String), String> {
    let scheme_end = address.find("://").map_or(0, |i| i + 3);
    let (hostport, path) = match address[scheme_end..].find('/') {
        Some(i) => (&address[..scheme_end + i], &address[scheme_end + i..]),
        None => (address, ""),
    };
    let backend = crate::settings::parse_backend(hostport)?;
    Ok((backend, path.trim_end_matches('/').to_string()))
}

impl BackendTarget {
    /// The upstream request target for a request. `bindings` are the path variable bindings
    /// as the path spelled them ([`portico_config::Match::escaped_bindings`], needed for
    /// `CONSTANT_ADDRESS` only); `system_query` names query parameters that are not forwarded
    /// as bindings (the API-key parameters, ESP v1 only); `keep_query`: the client's query goes
    /// whole, before the bindings ([`crate::dialect::Dialect::constant_address_keeps_query`]).
    pub fn upstream_target(
        &self,
        service: &Service,
        selector: &str,
        target: &str,
        bindings: &[portico_config::Binding],
        system_query: &[String],
        keep_query: bool,
    ) -> String {
        match self.translation {
            PathTranslation::AppendPathToAddress => format!("{}{}", self.path_prefix, target),
            PathTranslation::ConstantAddress => {
                let mut out = if self.path_prefix.is_empty() {
                    "/".to_string()
                } else {
                    self.path_prefix.clone()
                };
                let query = target.split_once('?').map(|(_, q)| q);
                let mut params: Vec<String> = Vec::new();
                for b in bindings {
                    let mut path = b.field_path.clone();
                    if let Some(first) = path.first_mut() {
                        if let Some(json) = service.request_field_json_name(selector, first) {
                            *first = json.to_string();
                        }
                    }
                    // As spelled in the path (both proxies forward it so), except that a `&`
                    // would cut the value into another parameter of the client's choosing.
                    params.push(format!(
                        "{}={}",
                        path.join("."),
                        b.value.replace('&', "%26")
                    ));
                }
                if keep_query {
                    // ESPv2: the query as sent, then the bindings (`?&b=1` after a bare `?`,
                    // as ESPv2 writes it).
                    if let Some(q) = query {
                        out.push('?');
                        out.push_str(q);
                        if !params.is_empty() {
                            out.push('&');
                        }
                    } else if !params.is_empty() {
                        out.push('?');
                    }
                    out.push_str(&params.join("&"));
                    return out;
                }
                // ESP v1: the bindings, then the query's `name=value` parameters that are not
                // system parameters, as sent.
                for pair in query.into_iter().flat_map(|q| q.split('&')) {
                    let Some((name, _)) = pair.split_once('=') else {
                        continue;
                    };
                    if !name.is_empty()
                        && !system_query.iter().any(|s| s.eq_ignore_ascii_case(name))
                    {
                        params.push(pair.to_string());
                    }
                }
                if !params.is_empty() {
                    out.push('?');
                    out.push_str(&params.join("&"));
                }
                out
            }
        }
    }
}

/// What a backend client is shared by: scheme, host, port and the HTTP version spoken.
type ClientKey = (BackendScheme, String, u16, http::Version);

/// Logs a rule whose `protocol` cannot change the HTTP version of its backend: `http/1.1` for
/// a `grpc://` backend, which is HTTP/2 whatever the rule says (Google ignores `protocol` for
/// anything but HTTP backends).
fn ignored_protocol_note(selector: &str, scheme: BackendScheme, protocol: BackendProtocol) {
    if matches!(scheme, BackendScheme::Grpc | BackendScheme::Grpcs)
        && protocol == BackendProtocol::Http1
    {
        tracing::warn!(
            selector,
            "backend rule protocol http/1.1 ignored: a grpc:// backend is always called over HTTP/2"
        );
    }
}

/// One service config, compiled.
pub struct ConfigRoutes {
    pub service: Arc<Service>,
    /// `Service.id`, the config id reported to Service Control.
    pub config_id: String,
    /// Service Control is configured (`control.environment` non-empty, or an override URL).
    pub service_control: bool,
    /// Some method needs JWT authentication.
    pub auth: bool,
    /// ESP's `ServiceContext::Enabled()`: with neither SC nor auth, requests are proxied
    /// untouched (no matching, no 404).
    pub enabled: bool,
    pub matcher: PathMatcher<Arc<MethodInfo>>,
    /// The JWT validator for this config, when some method has requirements.
    pub authenticator: Option<Arc<crate::auth::Authenticator>>,
    /// Rules the matcher refused (bad templates, duplicates), for diagnostics.
    pub skipped_rules: Vec<String>,
    /// Query parameters holding credentials in this config, masked in logs and reports.
    pub secrets: Arc<portico_servicecontrol::redact::SecretParams>,
    /// HTTP/JSON → gRPC transcoding and gRPC-Web for this config: built when `--backend` or a
    /// backend rule is `grpc://` and the config carries a descriptor set (as ESPv2 installs
    /// its transcoder and gRPC-Web filters only then).
    pub transcoder: Option<Arc<portico_transcode::Transcoder>>,
}

/// The config was deployed from a protobuf descriptor set (`gcloud endpoints services deploy
/// api_descriptor.pb api_config.yaml`): its APIs are gRPC services.
pub fn is_grpc_service(service: &Service) -> bool {
    service.source_info.as_ref().is_some_and(|si| {
        si.source_files
            .iter()
            .any(|f| f["fileType"] == "FILE_DESCRIPTOR_SET_PROTO")
    })
}

fn selector_api(service: &Service, selector: &str) -> (String, String) {
    for api in &service.apis {
        if let Some(rest) = selector.strip_prefix(api.name.as_str()) {
            if rest.starts_with('.') {
                return (api.name.clone(), api.version.clone());
            }
        }
    }
    (String::new(), String::new())
}

/// Process-wide inputs to compiling a config.
#[derive(Clone)]
pub struct RouteOptions {
    /// `--service_control_url_override` is set: Service Control is on even without
    /// `control.environment`.
    pub sc_override: bool,
    /// `--skip_service_control_filter` (ESP's `service_control off`): no config has Service
    /// Control, whatever it declares.
    pub skip_service_control: bool,
    /// `--skip_jwt_authn_filter` (ESP's `api_authentication off`): no method needs a JWT.
    pub skip_jwt_authn: bool,
    /// Shared across configs so JWKS stay cached through rollouts.
    pub key_cache: Arc<crate::auth::KeyCache>,
    pub auth_options: crate::auth::AuthOptions,
    /// `--enable_backend_routing`: compile `backend.rules` into per-method targets.
    pub backend_routing: bool,
    /// Timeout for rules without a `deadline` (`--http_request_timeout_s`).
    pub backend_timeout: std::time::Duration,
    /// TLS for `https://` rule addresses (trust anchors, client certificate), built once at
    /// start ([`crate::tls::client_config`]); `None`: the built-in roots, no client certificate.
    pub backend_tls: Option<Arc<rustls::ClientConfig>>,
    /// Connection cap for each rule address's pool; these pools are shared by all serving
    /// threads, so this is `--backend_max_connections` × threads.
    pub backend_pool: crate::upstream::PoolLimits,
    /// `--backend`, for the rules without an address whose `protocol` asks for another HTTP
    /// version than its scheme implies. `None`: such rules keep only their deadline.
    pub local_backend: Option<BackendAddr>,
    /// ESPv2's retries, for every backend client built here (each with its own count of
    /// retries in flight, as each is one of Envoy's clusters).
    pub backend_retry: Option<crate::retry::RetryPolicy>,
    /// ESPv2's `--disallow_colon_in_wildcard_path_segment`.
    pub disallow_colon_in_wildcard_path_segment: bool,
    /// The transcoding flags; transcoding is on when `--backend` is `grpc://` or some backend
    /// rule's address is.
    pub transcoding: portico_transcode::Options,
    /// ESPv2's `--cors_operation_delimiter`: `allowCors` preflight rules are one operation per
    /// method, `<API name><delimiter><method name>`, with the method's API and backend (ESPv2's
    /// auto-generated CORS methods). `None`: ESP's one `CORS` operation.
    pub cors_operation_delimiter: Option<String>,
    /// How every backend client built here connects, and the backends' counts of requests in
    /// flight (shared with `--backend`'s clients and kept across rollouts).
    pub backend_net: Arc<crate::backend_net::BackendNet>,
    /// `--enable_backend_address_override`: rule addresses are not used; every rule applies
    /// to `--backend` as a rule without an address does.
    pub backend_address_override: bool,
}

impl RouteOptions {
    pub fn new(sc_override: bool) -> RouteOptions {
        RouteOptions {
            sc_override,
            skip_service_control: false,
            skip_jwt_authn: false,
            key_cache: crate::auth::KeyCache::new(crate::auth::KeyCacheOptions::default()),
            auth_options: crate::auth::AuthOptions::default(),
            backend_routing: false,
            backend_timeout: std::time::Duration::from_secs_f64(
                crate::settings::DEFAULT_BACKEND_TIMEOUT_S,
            ),
            backend_tls: None,
            backend_pool: crate::upstream::PoolLimits::default(),
            local_backend: None,
            backend_retry: None,
            disallow_colon_in_wildcard_path_segment: false,
            transcoding: portico_transcode::Options::default(),
            cors_operation_delimiter: None,
            backend_net: crate::backend_net::BackendNet::system(),
            backend_address_override: false,
        }
    }
}

impl ConfigRoutes {
    /// The client for `backend` in the HTTP version `protocol` asks for: the one already
    /// built for the same scheme, host, port and version, or a new one kept in `clients`.
    fn shared_client(
        backend: &BackendAddr,
        protocol: BackendProtocol,
        opts: &RouteOptions,
        clients: &mut HashMap<ClientKey, Forwarder>,
    ) -> Result<Forwarder, String> {
        let version = Forwarder::version_for(backend.scheme, protocol);
        let key = (backend.scheme, backend.host.clone(), backend.port, version);
        if let Some(f) = clients.get(&key) {
            return Ok(f.clone());
        }
        let forwarder = Forwarder::with_net(
            backend,
            protocol,
            opts.backend_timeout,
            opts.backend_tls.clone(),
            opts.backend_pool,
            &opts.backend_net,
        )
        .map_err(|e| e.to_string())?
        .with_retries(opts.backend_retry.clone().map(crate::retry::Retries::new));
        clients.insert(key, forwarder.clone());
        Ok(forwarder)
    }

    /// The compiled form of a backend rule with an address.
    fn target_for(
        rule: &BackendRule,
        deadline: Option<std::time::Duration>,
        protocol: BackendProtocol,
        opts: &RouteOptions,
        clients: &mut HashMap<ClientKey, Forwarder>,
    ) -> Result<BackendTarget, String> {
        let (backend, path_prefix) = parse_rule_address(&rule.address)?;
        let host = http::HeaderValue::from_str(&backend.host)
            .map_err(|_| format!("invalid host {:?}", backend.host))?;
        ignored_protocol_note(&rule.selector, backend.scheme, protocol);
        Ok(BackendTarget {
            authority: backend.authority(),
            address: rule.address.clone(),
            forwarder: Self::shared_client(&backend, protocol, opts, clients)?,
            path_prefix,
            translation: if rule.path_translation == "CONSTANT_ADDRESS" {
                PathTranslation::ConstantAddress
            } else {
                PathTranslation::AppendPathToAddress
            },
            host,
            deadline,
        })
    }

    /// The config's transcoder, when a gRPC backend is configured (`--backend` or a rule
    /// address `grpc://`/`grpcs://`) and the config has a descriptor set. A config whose
    /// descriptor set cannot be used still serves gRPC pass-through; why is logged and kept
    /// with the skipped rules.
    fn transcoder(
        service: &Service,
        opts: &RouteOptions,
        skipped: &mut Vec<String>,
    ) -> Option<Arc<portico_transcode::Transcoder>> {
        let grpc_backend = opts
            .local_backend
            .as_ref()
            .is_some_and(|b| b.scheme == BackendScheme::Grpc)
            || service
                .backend
                .iter()
                .flat_map(|b| b.rules.iter())
                .any(|r| {
                    let a = r.address.to_ascii_lowercase();
                    a.starts_with("grpc://") || a.starts_with("grpcs://")
                });
        if !grpc_backend {
            return None;
        }
        match portico_transcode::Transcoder::from_service(service, opts.transcoding.clone()) {
            Ok(t) => Some(Arc::new(t)),
            Err(portico_transcode::BuildError::NoDescriptorSet) => None,
            Err(e) => {
                tracing::warn!(error = %e, "no HTTP/JSON transcoding for this config");
                skipped.push(format!("transcoding: {e}"));
                None
            }
        }
    }

    /// Compiles a service config.
    pub fn build(service: Arc<Service>, opts: &RouteOptions) -> ConfigRoutes {
        let service_control =
            !opts.skip_service_control && (opts.sc_override || service.has_service_control());
        let mut builder: PathMatcherBuilder<Arc<MethodInfo>> = PathMatcherBuilder::new()
            .disallow_colon_in_wildcards(opts.disallow_colon_in_wildcard_path_segment);
        let mut skipped_rules = Vec::new();

        let auth_rules: HashMap<&str, &AuthenticationRule> = service
            .authentication
            .iter()
            .flat_map(|a| a.rules.iter())
            .filter(|r| !opts.skip_jwt_authn && !r.requirements.is_empty())
            .map(|r| (r.selector.as_str(), r))
            .collect();
        let api_key_params: HashMap<&str, Vec<&SystemParameter>> = service
            .system_parameters
            .iter()
            .flat_map(|sp| sp.rules.iter())
            .map(|r| {
                (
                    r.selector.as_str(),
                    r.parameters
                        .iter()
                        .filter(|p| p.name == "api_key")
                        .collect(),
                )
            })
            .collect();
        let backend_rules: HashMap<&str, &BackendRule> = service
            .backend
            .iter()
            .flat_map(|b| b.rules.iter())
            .map(|r| (r.selector.as_str(), r))
            .collect();
        // Per-selector lookups built once: a config with 60,000 methods must not cost
        // 60,000² comparisons at every proxy start and rollout. First rule wins, as in
        // `Service::usage_rule`.
        let mut usage_rules: HashMap<&str, &UsageRule> = HashMap::new();
        for r in service.usage.iter().flat_map(|u| u.rules.iter()) {
            usage_rules.entry(r.selector.as_str()).or_insert(r);
        }
        let mut costs: HashMap<&str, Vec<(String, i64)>> = HashMap::new();
        for r in service.quota.iter().flat_map(|q| q.metric_rules.iter()) {
            // A cost <= 0 is charged as 1, as ESP does (see `control::metric_costs`).
            costs
                .entry(r.selector.as_str())
                .or_default()
                .extend(r.metric_costs.iter().map(|(n, c)| (n.clone(), (*c).max(1))));
        }
        // A deadline no time span can hold (NaN, negative, 1e300), or a protocol the proxy does
        // not speak, leaves its method without a backend (ESP's 500 for a method with no
        // address) rather than a panic or another protocol than asked. The config source
        // refuses such configs; this keeps a config built another way from being served wrong.
        let mut usable: HashMap<&str, (Option<std::time::Duration>, BackendProtocol)> =
            HashMap::new();
        for r in backend_rules.values() {
            let deadline = if r.deadline == 0.0 {
                Some(None)
            } else {
                portico_config::service::backend_deadline_problem(r.deadline)
                    .is_none()
                    .then(|| std::time::Duration::try_from_secs_f64(r.deadline).ok())
                    .flatten()
                    .map(Some)
            };
            let Some(deadline) = deadline else {
                skipped_rules.push(format!(
                    "backend {}: deadline {:?} is not a usable number of seconds",
                    r.selector, r.deadline
                ));
                continue;
            };
            match r.backend_protocol() {
                Ok(protocol) => {
                    usable.insert(r.selector.as_str(), (deadline, protocol));
                }
                Err(problem) => {
                    skipped_rules.push(format!("backend {}: protocol {problem}", r.selector))
                }
            }
        }

        // Clients are built here, once per config, never per request: one per backend and
        // HTTP version, shared by the methods (and serving threads) that use it.
        let mut clients: HashMap<ClientKey, Forwarder> = HashMap::new();
        let mut targets: HashMap<&str, Arc<BackendTarget>> = HashMap::new();
        // ESPv2's `--enable_backend_address_override`: an address counts as none.
        let has_address = |r: &BackendRule| !r.address.is_empty() && !opts.backend_address_override;
        if opts.backend_routing {
            for rule in backend_rules.values().filter(|r| has_address(r)) {
                let Some(&(deadline, protocol)) = usable.get(rule.selector.as_str()) else {
                    continue;
                };
                match Self::target_for(rule, deadline, protocol, opts, &mut clients) {
                    Ok(t) => {
                        targets.insert(rule.selector.as_str(), Arc::new(t));
                    }
                    Err(e) => {
                        tracing::warn!(selector = %rule.selector, address = %rule.address, error = %e, "backend rule not usable");
                        skipped_rules
                            .push(format!("backend {} {}: {e}", rule.selector, rule.address));
                    }
                }
            }
        }
        // Rules without an address apply to `--backend`. One whose protocol asks for another
        // HTTP version than `--backend`'s scheme implies gets a client of its own for it; the
        // other methods keep the serving threads' clients.
        let mut locals: HashMap<&str, LocalBackend> = HashMap::new();
        for rule in backend_rules.values().filter(|r| !has_address(r)) {
            let Some(&(deadline, protocol)) = usable.get(rule.selector.as_str()) else {
                continue;
            };
            let forwarder = match &opts.local_backend {
                Some(local)
                    if Forwarder::version_for(local.scheme, protocol)
                        != Forwarder::version_for(local.scheme, BackendProtocol::Unset) =>
                {
                    match Self::shared_client(local, protocol, opts, &mut clients) {
                        Ok(f) => Some(f),
                        Err(e) => {
                            tracing::warn!(selector = %rule.selector, error = %e, "backend rule not usable");
                            skipped_rules
                                .push(format!("backend {} (--backend): {e}", rule.selector));
                            continue;
                        }
                    }
                }
                Some(local) => {
                    ignored_protocol_note(&rule.selector, local.scheme, protocol);
                    None
                }
                None => None,
            };
            locals.insert(
                rule.selector.as_str(),
                LocalBackend {
                    deadline,
                    forwarder,
                },
            );
        }

        let streaming: HashSet<String> = service
            .apis
            .iter()
            .flat_map(|a| {
                a.methods
                    .iter()
                    .filter(|m| m.request_streaming || m.response_streaming)
                    .map(move |m| format!("{}.{}", a.name, m.name))
            })
            .collect();
        let info_for = |selector: &str| -> MethodInfo {
            let usage = usage_rules.get(selector).copied();
            let api_key_locations = match api_key_params.get(selector) {
                Some(params) if !params.is_empty() => {
                    let mut loc = ApiKeyLocations::default();
                    for p in params {
                        if !p.url_query_parameter.is_empty() {
                            loc.query.push(p.url_query_parameter.clone());
                        }
                        if !p.http_header.is_empty() {
                            match http::HeaderName::from_bytes(p.http_header.as_bytes()) {
                                Ok(h) => loc.headers.push(h),
                                Err(_) => tracing::warn!(
                                    selector,
                                    header = %p.http_header,
                                    "ignoring invalid api_key header name in system_parameters"
                                ),
                            }
                        }
                    }
                    loc
                }
                _ => ApiKeyLocations::esp_default(),
            };
            let (api_name, api_version) = selector_api(&service, selector);
            MethodInfo {
                selector: selector.to_string(),
                allow_unregistered_calls: usage.is_some_and(|u| u.allow_unregistered_calls),
                skip_service_control: usage.is_some_and(|u| u.skip_service_control),
                api_key_locations,
                auth: auth_rules.get(selector).map(|r| (*r).clone()),
                // A cost <= 0 is charged as 1, as ESP does.
                metric_costs: costs.get(selector).cloned().unwrap_or_default(),
                backend_rule: backend_rules.get(selector).map(|r| (*r).clone()),
                api_name,
                api_version,
                cors_preflight: false,
                local_backend: locals.get(selector).cloned(),
                backend: targets.get(selector).cloned(),
                streaming: streaming.contains(selector),
            }
        };

        let mut infos: HashMap<String, Arc<MethodInfo>> = HashMap::new();
        // Registered templates in order, and the same as a set for the membership test.
        let mut templates: Vec<String> = Vec::new();
        let mut template_set: HashSet<String> = HashSet::new();
        let mut options_templates: HashSet<String> = HashSet::new();
        let mut selectors: BTreeSet<String> = BTreeSet::new();
        // The selector that registered each template first (ESPv2 names a template's CORS
        // operation after it).
        let mut template_owner: HashMap<String, String> = HashMap::new();
        // Returns why the rule was not registered, if it was not.
        let mut register = |rule: &HttpRule,
                            builder: &mut PathMatcherBuilder<Arc<MethodInfo>>|
         -> Result<(), String> {
            let Some((method, path)) = rule.method_and_path() else {
                return Err(format!("{}: rule has no HTTP method", rule.selector));
            };
            selectors.insert(rule.selector.clone());
            let info = infos
                .entry(rule.selector.clone())
                .or_insert_with(|| Arc::new(info_for(&rule.selector)))
                .clone();
            match builder.register(method, path, info) {
                Ok(()) => {
                    if method == "OPTIONS" {
                        options_templates.insert(path.to_string());
                    }
                    if template_set.insert(path.to_string()) {
                        templates.push(path.to_string());
                        template_owner.insert(path.to_string(), rule.selector.clone());
                    }
                    Ok(())
                }
                Err(e) => Err(format!("{} {} {}: {}", rule.selector, method, path, e)),
            }
        };
        for rule in service.http.iter().flat_map(|h| h.rules.iter()) {
            // As ESP: additional bindings only exist through their rule, so a rule that cannot
            // be registered takes its bindings with it.
            if let Err(mut why) = register(rule, &mut builder) {
                let dropped = rule.additional_bindings.len();
                if dropped > 0 {
                    let s = if dropped == 1 { "" } else { "s" };
                    why.push_str(&format!(" ({dropped} additional binding{s} dropped)"));
                }
                tracing::warn!(selector = %rule.selector, reason = %why, "skipping HTTP rule");
                skipped_rules.push(why);
                continue;
            }
            for extra in &rule.additional_bindings {
                let mut extra = extra.clone();
                if extra.selector.is_empty() {
                    extra.selector = rule.selector.clone();
                }
                if let Err(why) = register(&extra, &mut builder) {
                    tracing::warn!(selector = %rule.selector, reason = %why, "skipping HTTP rule's additional binding");
                    skipped_rules.push(why);
                }
            }
        }

        let transcoder = Self::transcoder(&service, opts, &mut skipped_rules);
        if let Some(t) = &transcoder {
            // ESPv2 gives every method of the gRPC services `POST /package.Service/Method`
            // (the gRPC path, which a gRPC, gRPC-Web or JSON call uses alike); a rule that
            // already binds it keeps it.
            for method in t.methods() {
                let rule = HttpRule {
                    selector: method.full_name().to_string(),
                    post: Some(format!(
                        "/{}/{}",
                        method.parent_service().full_name(),
                        method.name()
                    )),
                    ..HttpRule::default()
                };
                if let Err(why) = register(&rule, &mut builder) {
                    tracing::debug!(reason = %why, "gRPC path already bound");
                }
            }
        }
        // A gRPC service whose config came without its descriptor set (a managed rollout's
        // BASIC view, no transcoder) is still called on each method's gRPC path, `POST
        // /<package.Service>/<Method>`, as both ESPs route gRPC calls: when its config carries
        // the descriptor set or, as ESPv2 decides, when `--backend` or a backend rule's address
        // is `grpc://`/`grpcs://`. Paths already bound keep their rule.
        let grpc_backend = opts
            .local_backend
            .as_ref()
            .is_some_and(|b| matches!(b.scheme, BackendScheme::Grpc | BackendScheme::Grpcs))
            || backend_rules
                .values()
                .any(|r| r.address.starts_with("grpc://") || r.address.starts_with("grpcs://"));
        if grpc_backend || is_grpc_service(&service) {
            for api in &service.apis {
                for m in &api.methods {
                    let rule = HttpRule {
                        selector: format!("{}.{}", api.name, m.name),
                        post: Some(format!("/{}/{}", api.name, m.name)),
                        ..HttpRule::default()
                    };
                    if let Err(why) = register(&rule, &mut builder) {
                        tracing::debug!(reason = %why, "gRPC path not added");
                    }
                }
            }
        }

        let allow_cors = service
            .endpoints
            .iter()
            .any(|e| e.name == service.name && e.allow_cors);
        if let (true, Some(delimiter)) = (allow_cors, &opts.cors_operation_delimiter) {
            // ESPv2: one generated operation per method, `<API><delimiter><method>`, proxied
            // to the method's backend, never needing a key or a JWT, reported under its name.
            let mut cors_infos: HashMap<String, Arc<MethodInfo>> = HashMap::new();
            for t in templates.iter().filter(|t| !options_templates.contains(*t)) {
                let Some(owner) = template_owner.get(t) else {
                    continue;
                };
                let info = cors_infos
                    .entry(owner.clone())
                    .or_insert_with(|| {
                        let (api, _) = selector_api(&service, owner);
                        let method = if api.is_empty() {
                            owner.rsplit_once('.').map_or(owner.as_str(), |(_, m)| m)
                        } else {
                            &owner[api.len() + 1..]
                        };
                        let api_part = if api.is_empty() {
                            owner.rsplit_once('.').map_or("", |(a, _)| a)
                        } else {
                            api.as_str()
                        };
                        let base = infos
                            .get(owner)
                            .map(|i| (**i).clone())
                            .unwrap_or_else(|| info_for(owner));
                        let cors_info = MethodInfo {
                            selector: format!("{api_part}{delimiter}{method}"),
                            allow_unregistered_calls: true,
                            skip_service_control: false,
                            api_key_locations: base.api_key_locations.clone(),
                            auth: None,
                            metric_costs: Vec::new(),
                            cors_preflight: true,
                            ..base
                        };
                        Arc::new(cors_info)
                    })
                    .clone();
                if let Err(e) = builder.register("OPTIONS", t, info.clone()) {
                    skipped_rules.push(format!("{} OPTIONS {t}: {e}", info.selector));
                }
            }
        } else if allow_cors {
            let mut cors_selector = "CORS".to_string();
            let mut n = 0;
            while selectors.contains(&cors_selector) {
                n += 1;
                cors_selector = format!("CORS.{n}");
            }
            let mut cors_info = info_for(&cors_selector);
            cors_info.allow_unregistered_calls = true;
            cors_info.auth = None;
            cors_info.metric_costs.clear();
            cors_info.cors_preflight = true;
            let cors_info = Arc::new(cors_info);
            for t in templates.iter().filter(|t| !options_templates.contains(*t)) {
                if let Err(e) = builder.register("OPTIONS", t, cors_info.clone()) {
                    skipped_rules.push(format!("{cors_selector} OPTIONS {t}: {e}"));
                }
            }
        }

        let auth = !auth_rules.is_empty();
        let authenticator = auth.then(|| {
            Arc::new(crate::auth::Authenticator::new(
                &service,
                &opts.auth_options,
                opts.key_cache.clone(),
            ))
        });
        ConfigRoutes {
            authenticator,
            secrets: Arc::new(portico_servicecontrol::redact::SecretParams::for_service(
                &service,
            )),
            config_id: service.id.clone(),
            service_control,
            auth,
            enabled: service_control || auth,
            matcher: builder.build(),
            skipped_rules,
            service,
            transcoder,
        }
    }
}

/// The configs of one rollout with their traffic percentages.
pub struct RouteTable {
    pub rollout_id: String,
    pub configs: Vec<(Arc<ConfigRoutes>, u32)>,
    total: u32,
    /// The credential parameters of every config of the rollout: a request is logged with
    /// all of them masked, whichever config it was (or was not) matched to.
    pub secrets: Arc<portico_servicecontrol::redact::SecretParams>,
}

impl RouteTable {
    /// A table from compiled configs. Percentages of 0 are kept for status reporting but never
    /// picked; if all are 0 the first config takes all traffic.
    pub fn new(rollout_id: String, configs: Vec<(Arc<ConfigRoutes>, u32)>) -> RouteTable {
        let total = configs.iter().map(|(_, p)| *p).sum();
        let mut secrets = portico_servicecontrol::redact::SecretParams::default();
        for (c, _) in &configs {
            secrets.extend(&c.secrets);
        }
        RouteTable {
            rollout_id,
            configs,
            total,
            secrets: Arc::new(secrets),
        }
    }

    /// Compiles every config of a rollout.
    pub fn from_services(
        rollout_id: String,
        services: &[(Arc<Service>, u32)],
        opts: &RouteOptions,
    ) -> RouteTable {
        let configs = services
            .iter()
            .map(|(s, p)| (Arc::new(ConfigRoutes::build(s.clone(), opts)), *p))
            .collect();
        RouteTable::new(rollout_id, configs)
    }

    /// Picks a config for one request, weighted by traffic percentage (ESP's weighted selector).
    pub fn pick(&self) -> Option<&Arc<ConfigRoutes>> {
        if self.configs.len() <= 1 || self.total == 0 {
            return self.configs.first().map(|(c, _)| c);
        }
        let mut r = rand::thread_rng().gen_range(0..self.total);
        for (c, p) in &self.configs {
            if r < *p {
                return Some(c);
            }
            r -= p;
        }
        self.configs.last().map(|(c, _)| c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(json: &str) -> Arc<Service> {
        Arc::new(serde_json::from_str(json).unwrap())
    }

    const BOOKSTORE: &str = r#"{
      "name": "bookstore.example.com", "id": "2024-01-01r0",
      "apis": [{"name": "1.bookstore", "version": "1.0.0", "methods": [{"name": "ListShelves"}]}],
      "http": {"rules": [
        {"selector": "1.bookstore.ListShelves", "get": "/shelves"},
        {"selector": "1.bookstore.CreateShelf", "post": "/shelves"},
        {"selector": "1.bookstore.GetShelf", "get": "/shelves/{shelf}"},
        {"selector": "1.bookstore.CorsShelf", "custom": {"kind": "OPTIONS", "path": "/shelves/{shelf}"}},
        {"selector": "1.bookstore.Bad", "get": "/a//b"}
      ]},
      "usage": {"rules": [{"selector": "1.bookstore.ListShelves", "allowUnregisteredCalls": true}]},
      "systemParameters": {"rules": [{"selector": "1.bookstore.GetShelf",
         "parameters": [{"name": "api_key", "httpHeader": "X-My-Key"}, {"name": "api_key", "urlQueryParameter": "mykey"}]}]},
      "quota": {"metricRules": [{"selector": "1.bookstore.CreateShelf", "metricCosts": {"writes": "2"}}]},
      "authentication": {"rules": [{"selector": "1.bookstore.CreateShelf", "requirements": [{"providerId": "p"}]}],
                         "providers": [{"id": "p", "issuer": "https://issuer"}]},
      "endpoints": [{"name": "bookstore.example.com", "allowCors": true}],
      "control": {"environment": "servicecontrol.example"}
    }"#;

    #[test]
    fn builds_method_infos() {
        let r = ConfigRoutes::build(svc(BOOKSTORE), &RouteOptions::new(false));
        assert!(r.enabled && r.service_control && r.auth);
        assert_eq!(r.config_id, "2024-01-01r0");
        let m = r.matcher.lookup("GET", "/shelves?x=1").unwrap();
        assert_eq!(m.selector, "1.bookstore.ListShelves");
        assert!(m.allow_unregistered_calls);
        assert_eq!(m.api_name, "1.bookstore");
        assert_eq!(m.api_version, "1.0.0");
        assert_eq!(m.api_key_locations, ApiKeyLocations::esp_default());
        let g = r.matcher.lookup("GET", "/shelves/7").unwrap();
        assert_eq!(g.api_key_locations.query, vec!["mykey".to_string()]);
        assert_eq!(
            g.api_key_locations.headers,
            vec![http::HeaderName::from_static("x-my-key")]
        );
        let c = r.matcher.lookup("POST", "/shelves").unwrap();
        assert_eq!(c.metric_costs, vec![("writes".to_string(), 2)]);
        assert!(c.auth.is_some());
        assert!(!c.allow_unregistered_calls);
        // An invalid template: the rule is skipped, not fatal.
        assert_eq!(r.skipped_rules.len(), 1, "{:?}", r.skipped_rules);
    }

    /// ESP registers a rule's additional bindings only when the rule itself registered: a rule
    /// whose own template is invalid (or already taken) is dropped whole.
    #[test]
    fn a_rule_that_fails_to_register_drops_its_additional_bindings() {
        let s = svc(
            r#"{"name":"s","control":{"environment":"x"},"http":{"rules":[
            {"selector":"Bad","get":"/a//b","additionalBindings":[
                {"get":"/bad/extra"},{"post":"/bad/{x}"}]},
            {"selector":"Good","get":"/good","additionalBindings":[
                {"get":"/good/extra"},{"get":"/good//broken"},{"get":"/good/more"}]},
            {"selector":"Dup","get":"/good","additionalBindings":[{"get":"/dup/extra"}]}
        ]}}"#,
        );
        let r = ConfigRoutes::build(s, &RouteOptions::new(false));
        assert!(r.matcher.lookup("GET", "/bad/extra").is_none());
        assert!(r.matcher.lookup("POST", "/bad/1").is_none());
        assert!(r.matcher.lookup("GET", "/dup/extra").is_none());
        for t in ["/good", "/good/extra", "/good/more"] {
            assert_eq!(r.matcher.lookup("GET", t).unwrap().selector, "Good", "{t}");
        }
        // One entry per dropped rule or binding, each naming what was dropped.
        assert_eq!(r.skipped_rules.len(), 3, "{:?}", r.skipped_rules);
        assert!(
            r.skipped_rules[0].starts_with("Bad GET /a//b:"),
            "{:?}",
            r.skipped_rules
        );
        assert!(r.skipped_rules[0].contains("2 additional bindings dropped"));
        assert!(r.skipped_rules[1].starts_with("Good GET /good//broken:"));
        assert!(r.skipped_rules[2].starts_with("Dup GET /good:"));
        assert!(r.skipped_rules[2].contains("1 additional binding dropped"));
    }

    #[test]
    fn allow_cors_adds_options_rules_but_keeps_explicit_ones() {
        let r = ConfigRoutes::build(svc(BOOKSTORE), &RouteOptions::new(false));
        let o = r.matcher.lookup("OPTIONS", "/shelves").unwrap();
        assert_eq!(o.selector, "CORS");
        assert!(o.cors_preflight && o.allow_unregistered_calls && o.auth.is_none());
        let explicit = r.matcher.lookup("OPTIONS", "/shelves/1").unwrap();
        assert_eq!(explicit.selector, "1.bookstore.CorsShelf");
        assert!(!explicit.allow_unregistered_calls);
    }

    #[test]
    fn espv2_names_a_cors_operation_per_method_with_the_delimiter() {
        let s = svc(r#"{"name":"s","apis":[{"name":"1.s.Api","version":"v2"}],
                "http":{"rules":[
                    {"selector":"1.s.Api.List","get":"/a"},
                    {"selector":"1.s.Api.Create","post":"/a"},
                    {"selector":"1.s.Api.Get","get":"/a/{id}"},
                    {"selector":"Other","get":"/b"},
                    {"selector":"1.s.Api.Opt","custom":{"kind":"OPTIONS","path":"/c"}},
                    {"selector":"1.s.Api.C","get":"/c"}]},
                "endpoints":[{"name":"s","allowCors":true}],
                "control":{"environment":"x"}}"#);
        for (delimiter, a, id) in [
            (
                crate::settings::DEFAULT_CORS_OPERATION_DELIMITER,
                "1.s.Api.ESPv2_Autogenerated_CORS_List",
                "1.s.Api.ESPv2_Autogenerated_CORS_Get",
            ),
            ("--", "1.s.Api--List", "1.s.Api--Get"),
        ] {
            let mut opts = RouteOptions::new(false);
            opts.cors_operation_delimiter = Some(delimiter.to_string());
            let r = ConfigRoutes::build(s.clone(), &opts);
            let o = r.matcher.lookup("OPTIONS", "/a").unwrap();
            // The template's first method names it, as ESPv2's first-come set does.
            assert_eq!(o.selector, a);
            assert!(o.cors_preflight && o.allow_unregistered_calls && o.auth.is_none());
            assert!(!o.skip_service_control && o.metric_costs.is_empty());
            assert_eq!(
                (o.api_name.as_str(), o.api_version.as_str()),
                ("1.s.Api", "v2")
            );
            assert_eq!(r.matcher.lookup("OPTIONS", "/a/7").unwrap().selector, id);
            let other = r.matcher.lookup("OPTIONS", "/b").unwrap();
            assert_eq!(other.selector, format!("{delimiter}Other"));
            // An explicit OPTIONS rule is kept.
            assert_eq!(
                r.matcher.lookup("OPTIONS", "/c").unwrap().selector,
                "1.s.Api.Opt"
            );
        }
    }

    #[test]
    fn colon_free_wildcards_follow_the_route_option() {
        let s = svc(
            r#"{"name":"s","http":{"rules":[{"selector":"A","get":"/v1/{name}"}]},
                "control":{"environment":"x"}}"#,
        );
        let r = ConfigRoutes::build(s.clone(), &RouteOptions::new(false));
        assert!(r.matcher.lookup("GET", "/v1/a:b").is_some());
        let mut opts = RouteOptions::new(false);
        opts.disallow_colon_in_wildcard_path_segment = true;
        let r = ConfigRoutes::build(s, &opts);
        assert!(r.matcher.lookup("GET", "/v1/a:b").is_none());
        assert!(r.matcher.lookup("GET", "/v1/ab").is_some());
    }

    #[test]
    fn cors_selector_avoids_collisions() {
        let s = svc(
            r#"{"name":"s","http":{"rules":[{"selector":"CORS","get":"/a"}]},
                        "endpoints":[{"name":"s","allowCors":true}]}"#,
        );
        let r = ConfigRoutes::build(s, &RouteOptions::new(false));
        assert_eq!(
            r.matcher.lookup("OPTIONS", "/a").unwrap().selector,
            "CORS.1"
        );
        assert!(
            !r.enabled,
            "no control, no auth: the proxy passes everything through"
        );
    }

    #[test]
    fn without_cors_there_is_no_options_rule() {
        let s = svc(
            r#"{"name":"s","http":{"rules":[{"selector":"A","get":"/a"}]},
                        "control":{"environment":"x"}}"#,
        );
        let r = ConfigRoutes::build(s, &RouteOptions::new(false));
        assert!(r.matcher.lookup("OPTIONS", "/a").is_none());
        assert!(r.enabled);
    }

    /// A deadline no time span can hold (`cannot convert float seconds to Duration` from
    /// `Duration::from_secs_f64`) is refused, not a panic, in a proxy with backend routing.
    #[tokio::test]
    async fn unusable_backend_deadlines_do_not_panic() {
        for bad in [1e300, -1.0, f64::NAN, f64::INFINITY, 1e-12] {
            let mut s: Service = serde_json::from_str(
                r#"{"name":"s","control":{"environment":"x"},
                    "http":{"rules":[{"selector":"A","get":"/a"},{"selector":"B","get":"/b"}]},
                    "backend":{"rules":[
                        {"selector":"A","address":"http://127.0.0.1:1/x","deadline":5},
                        {"selector":"B","address":"http://127.0.0.1:1/y","deadline":5}]}}"#,
            )
            .unwrap();
            if let Some(b) = s.backend.as_mut() {
                b.rules[1].deadline = bad;
            }
            let mut opts = RouteOptions::new(false);
            opts.backend_routing = true;
            let r = ConfigRoutes::build(Arc::new(s), &opts);
            let a = r.matcher.lookup("GET", "/a").unwrap();
            assert_eq!(
                a.backend.as_ref().and_then(|b| b.deadline),
                Some(std::time::Duration::from_secs(5))
            );
            let b = r.matcher.lookup("GET", "/b").unwrap();
            assert!(b.backend.is_none(), "{bad}");
            assert!(
                r.skipped_rules
                    .iter()
                    .any(|m| m.starts_with("backend B: deadline")),
                "{bad}: {:?}",
                r.skipped_rules
            );
        }
    }

    /// A rule's `protocol` picks the HTTP version of its client, for an address and for
    /// `--backend`, in any case; `grpc://` is HTTP/2 whatever it says. A config that reaches the
    /// routes without the config source's check (built in code) and names a protocol the proxy
    /// does not speak leaves that method without a backend.
    #[tokio::test]
    async fn backend_protocols_pick_the_http_version() {
        let http_rules: Vec<serde_json::Value> = ["A", "B", "C", "D", "E", "F", "G", "H"]
            .iter()
            .map(|m| serde_json::json!({"selector": m, "get": format!("/{m}")}))
            .collect();
        let s: Service = serde_json::from_value(serde_json::json!({
            "name": "s", "control": {"environment": "x"},
            "http": {"rules": http_rules},
            "backend": {"rules": [
                {"selector": "A", "address": "http://127.0.0.1:1/x", "protocol": "h2"},
                {"selector": "B", "address": "http://127.0.0.1:1/y"},
                {"selector": "C", "address": "grpc://127.0.0.1:1", "protocol": "HTTP/1.1"},
                {"selector": "D", "address": "https://localhost:1", "protocol": "H2"},
                {"selector": "E", "address": "http://127.0.0.1:1", "protocol": "h3"},
                {"selector": "F", "protocol": "gRPC", "deadline": 2},
                {"selector": "G", "protocol": "http/1.1"},
                {"selector": "H", "protocol": "http/2"}
            ]}
        }))
        .unwrap();
        let mut opts = RouteOptions::new(false);
        opts.backend_routing = true;
        opts.local_backend = Some(crate::settings::parse_backend("127.0.0.1:2").unwrap());
        let r = ConfigRoutes::build(Arc::new(s), &opts);
        let m = |sel: &str| r.matcher.lookup("GET", &format!("/{sel}")).unwrap();
        let version = |sel: &str| m(sel).backend.as_ref().map(|b| b.forwarder.version());
        assert_eq!(version("A"), Some(http::Version::HTTP_2));
        assert_eq!(version("B"), Some(http::Version::HTTP_11));
        assert_eq!(version("C"), Some(http::Version::HTTP_2));
        assert_eq!(version("D"), Some(http::Version::HTTP_2));
        assert!(m("E").backend.is_none() && m("E").local_backend.is_none());
        let f = m("F").local_backend.clone().unwrap();
        assert_eq!(f.deadline, Some(std::time::Duration::from_secs(2)));
        assert_eq!(
            f.forwarder.map(|f| f.version()),
            Some(http::Version::HTTP_2)
        );
        // `--backend`'s own protocol: the serving threads' clients.
        assert!(m("G").local_backend.as_ref().unwrap().forwarder.is_none());
        assert!(m("H").local_backend.is_none());
        let mut skipped = r.skipped_rules.clone();
        skipped.sort();
        assert_eq!(
            skipped,
            [
                "backend E: protocol \"h3\" is not supported: use \"http/1.1\", \"h2\" or \"grpc\" (in any case), or leave it unset",
                "backend H: protocol \"http/2\" is not supported: use \"http/1.1\", \"h2\" or \"grpc\" (in any case), or leave it unset",
            ]
        );
    }

    #[test]
    fn weighted_pick_follows_percentages() {
        let a = svc(r#"{"name":"s","id":"a"}"#);
        let b = svc(r#"{"name":"s","id":"b"}"#);
        let t =
            RouteTable::from_services("r".into(), &[(a, 80), (b, 20)], &RouteOptions::new(false));
        let mut count_a = 0;
        for _ in 0..5000 {
            if t.pick().unwrap().config_id == "a" {
                count_a += 1;
            }
        }
        // 80% ± a wide margin: the point is that both are picked in roughly that ratio.
        assert!((3600..4400).contains(&count_a), "{count_a}");
        let only = RouteTable::from_services(
            "r".into(),
            &[(svc(r#"{"name":"s","id":"z"}"#), 0)],
            &RouteOptions::new(false),
        );
        assert_eq!(only.pick().unwrap().config_id, "z");
    }
}
