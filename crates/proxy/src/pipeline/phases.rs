//! The request phases before the backend is called, each one function: `prepare` (the head
//! settled, health checks, preflights, body limit, `--rewrite`), `match_request`,
//! `authenticate` (JWT) and `check_and_quota` (Service Control). Each returns what the next
//! needs, or the refusal; [`super::Pipeline::handle`] chains them.

use super::errors::proxy_error;
use super::state::{Ctx, Prepared, ReportInfo, Routed};
use super::{ConnInfo, Pipeline, ProxyBody};
use crate::auth::AuthInfo;
use crate::error::{Cause, Code, ErrorKind, EspError};
use crate::forward;
use crate::request_head;
use crate::routing::{ConfigRoutes, MethodInfo};
use crate::service_control::{ApiKeyState, CheckInput, CheckOk, QuotaInput};
use crate::trace::{new_span_id, Kind};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use hyper::body::Incoming;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

static X_ANDROID_PACKAGE: HeaderName = HeaderName::from_static("x-android-package");
static X_ANDROID_CERT: HeaderName = HeaderName::from_static("x-android-cert");
static X_IOS_BUNDLE: HeaderName = HeaderName::from_static("x-ios-bundle-identifier");

impl Pipeline {
    /// Everything before the config is picked: the head settled, health checks, preflights,
    /// the body limit, `--rewrite`. A plain function, so none of its locals take room in the
    /// request future (its size is memory per connection, docs/performance.md). `Err` is the
    /// response when the request ends here.
    // The `Err` is the response itself, moved out once; boxing it would allocate per request.
    #[allow(clippy::result_large_err)]
    pub(super) fn prepare(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Result<Prepared, Response<ProxyBody>> {
        let st = &self.state;
        let settings = &st.settings;
        let request_head_bytes = request_head_size(&req);
        // Measured on the head as the client sent it, before any header is dropped.
        let head_error = crate::limits::head_line_error(&req, &settings.header_limits);
        let (mut parts, body) = req.into_parts();
        // The head is settled before anything reads it: the method and the path matched below
        // are the ones forwarded, and dropped headers are seen by nothing (crate::request_head).
        let raw_target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let framing = request_head::Framing {
            version: parts.version,
            has_authority: parts.uri.authority().is_some(),
        };
        let settled = request_head::settle(
            &parts.method,
            framing,
            &mut parts.headers,
            raw_target,
            settings.head,
        );
        let h = &parts.headers;
        let client_ip = match settings.xff_hops {
            Some(hops) => forward::envoy_client_ip(conn.peer.ip(), h, hops),
            None => forward::real_client_ip(conn.peer.ip(), h, &settings.xff_trusted),
        };
        let caller_ip = settings
            .client_ip_header
            .as_deref()
            .and_then(|name| forward::ip_from_header(h, name, settings.client_ip_position))
            .or_else(|| {
                settings
                    .client_ip_from_forwarded
                    .then(|| forward::ip_from_forwarded(h))
                    .flatten()
            })
            .unwrap_or(client_ip);
        let cors_origin = settings.cors.as_ref().and_then(|c| c.allowed_origin(h));
        // ESPv2 decorates only the answers of requests an API route matched: the origin waits
        // in `Prepared` until then.
        let (cors_origin, cors_after_match) = if settings.dialect.cors_headers_need_a_route() {
            (None, cors_origin)
        } else {
            (cors_origin, None)
        };
        let start = Instant::now();
        let grpc_type = super::transcode::grpc_content_type(st.settings.dialect, h);
        let ctx = Ctx {
            dialect: settings.dialect,
            start,
            method: match &settled {
                Ok(s) => s.method.clone(),
                Err(e) => e.method().unwrap_or(&parts.method).clone(),
            },
            version: parts.version,
            // What the client's connection expects, whatever method is forwarded.
            head: parts.method == Method::HEAD,
            client_ip,
            caller_ip,
            tls: conn.tls,
            accept: settings
                .response_compression
                .as_ref()
                .and_then(|_| crate::compression::negotiate(h)),
            conn_facts: st.keep_conn_facts.then(|| {
                let mut request_headers = HeaderMap::new();
                for name in &st.response_rules_read {
                    if let Some(v) = h.get(name) {
                        request_headers.insert(name.clone(), v.clone());
                    }
                }
                // `:authority` is read as `Host`: an HTTP/2 (or absolute-form) request names its
                // host in the target instead.
                if let Some(a) = parts.uri.authority() {
                    if st.response_rules_read.contains(&header::HOST) {
                        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                            request_headers.insert(header::HOST, v);
                        }
                    }
                }
                Box::new(super::state::ConnFacts {
                    peer: conn.peer,
                    local: conn.local,
                    request_headers,
                })
            }),
            jwt_present: false,
            request_bytes: h
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            request_head_bytes,
            body_counter: (!body.is_end_stream())
                .then(|| crate::request_body::BodyCount::new(start)),
            user_agent: h.get(header::USER_AGENT).cloned(),
            content_type_grpc: grpc_type
                && h.get(header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")),
            grpc_web: grpc_type
                && h.get(header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc-web")),
            referer: h.get(header::REFERER).cloned(),
            cors_origin,
            trace: None,
            unsampled_trace: None,
        };

        // nginx refuses an over-long request or header line before anything else runs.
        if let Some(err) = head_error {
            let url = raw_target.to_string();
            return Err(self.fail(err, &ctx, url));
        }
        let settled = match settled {
            Ok(s) => s,
            Err(e) => {
                if let request_head::HeadError::UnderscoreInName { name } = &e {
                    // The answer is Envoy's bare `Bad Request`; the operator can see why here.
                    tracing::debug!(header = %name, "refused a request: '_' in a header name");
                }
                let err = e.esp_error();
                let resp = proxy_error(&err, &ctx, false);
                let url = raw_target.to_string();
                return Err(self.refuse(resp, Some(err), &ctx, url, &parts.headers));
            }
        };
        if settled.target.unescaped_slashes {
            // --disallow_escaped_slashes_in_path (ESPv2): the client asks again for the decoded
            // path, which is then checked like any other; gRPC clients cannot follow redirects.
            let url = raw_target.to_string();
            let location =
                HeaderValue::from_str(&request_head::redirect_target(&settled.target.text));
            return Err(match location {
                Ok(loc) if !ctx.content_type_grpc => {
                    let mut resp = Response::new(ProxyBody::empty());
                    *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                    resp.headers_mut().insert(header::LOCATION, loc);
                    self.refuse(resp, None, &ctx, url, &parts.headers)
                }
                _ => {
                    let err = EspError::new(
                        Code::InvalidArgument,
                        "The request path holds an escaped slash or backslash (%2F, %5C).",
                        Cause::Internal,
                    );
                    let resp = proxy_error(&err, &ctx, false);
                    self.refuse(resp, Some(err), &ctx, url, &parts.headers)
                }
            });
        }
        parts.method = settled.method;
        let normalized: &str = &settled.target.text;

        // nginx's exact-match health location and CORS preflight run before ESP.
        if st.healthz_path.as_deref() == Some(request_head::path_of(normalized)) {
            let mut resp = Response::new(ProxyBody::empty());
            // Envoy's health-check filter with `cluster_min_healthy_percentages` 100 for the
            // backend (ESPv2 under --health_check_grpc_backend): 503 while it is unhealthy.
            if st.backend_health.as_ref().is_some_and(|h| !h.is_healthy()) {
                *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            let mut resp = self.finalize(resp, &ctx, normalized.to_string(), None, None, None);
            resp.body_mut().mark_health_check();
            return Err(resp);
        }
        let origin = ctx.cors_origin.as_ref().or(cors_after_match.as_ref());
        if let (Some(cors), Some(origin)) = (&settings.cors, origin) {
            if ctx.method == Method::OPTIONS
                && (!settings.dialect.preflight_needs_request_method()
                    || cors.is_strict_preflight(&parts.headers))
            {
                let resp: Response<ProxyBody> = cors.preflight(origin.clone(), &parts.headers);
                return Err(self.finalize_plain(resp, &ctx, normalized.to_string(), None));
            }
        }
        if settings.client_max_body_size > 0 && ctx.request_bytes > settings.client_max_body_size {
            let err = EspError::payload_too_large();
            let url = normalized.to_string();
            return Err(self.fail(err, &ctx, url));
        }

        let target = rewrite(&settings.rewrites, normalized).into_owned();
        Ok(Prepared {
            ctx,
            parts,
            body,
            target,
            cors_after_match,
        })
    }

    /// **match**: the settled method and the rewritten target (undecoded) against the config's
    /// HTTP rules. No match is 404 code 5 (403 code 7 for OPTIONS); a path whose `;` parameters
    /// change the method matched is 400. Under `--enable_backend_routing` the method's backend
    /// address is resolved here, while the path bindings are at hand. `Err` carries the error
    /// and the report of the refused request.
    // The `Err` is moved out once into the response; boxing it would allocate per refusal.
    #[allow(clippy::result_large_err)]
    pub(super) fn match_request(
        &self,
        config: &Arc<ConfigRoutes>,
        parts: &http::request::Parts,
        target: &str,
    ) -> Result<(Arc<MethodInfo>, Option<Routed>), (EspError, ReportInfo)> {
        let settings = &self.state.settings;
        let match_method = parts.method.as_str();
        let grpc_path;
        let mut by_transcoder = false;
        let mut matched = config.matcher.matched(match_method, target);
        if matched.is_none() && settings.dialect.forwards_untranscodable_requests() {
            // ESPv2 routes first and transcodes after, with the transcoder's own matcher, so a
            // path its routes refuse (a colon in a wildcard segment under
            // --disallow_colon_in_wildcard_path_segment) can still be transcoded. ESPv2 then
            // runs no check for it (its deny-all route has no method); Portico matches it to
            // the method it calls, by that method's gRPC path, and checks it as that method.
            if let Some(call) = config
                .transcoder
                .as_ref()
                .and_then(|t| t.route(match_method, target).ok())
            {
                grpc_path = call.grpc_path();
                matched = config.matcher.matched("POST", &grpc_path);
                by_transcoder = true;
            }
        }
        if let Some(m) = matched.as_ref().filter(|_| !by_transcoder) {
            if settings.head.path.normalize
                && !self.same_method_without_parameters(config, match_method, target, m.value())
            {
                let err = EspError::new(
                    Code::InvalidArgument,
                    "The request path's \";\" parameters change which API method it names.",
                    Cause::Internal,
                );
                let report = self.report_info(config, None, None, &parts.headers);
                return Err((err, report));
            }
        }
        let Some(mi) = matched.as_ref().map(|m| m.value().clone()) else {
            let other_method = if settings.dialect.refuses_wrong_method_with_405() {
                config.matcher.template_for_any_method(target)
            } else {
                None
            };
            let err = if match_method == "OPTIONS"
                && settings.cors.is_some()
                && settings.dialect.refuses_bad_preflights()
            {
                // An OPTIONS no rule of the API takes, and not a valid preflight (those were
                // answered at `prepare`): ESPv2's CORS route answers 400, whatever the path.
                cors_preflight_refused()
            } else if let Some(template) = other_method {
                EspError::method_does_not_exist().with_kind(ErrorKind::MethodNotAllowed {
                    template: template.into(),
                })
            } else if match_method == "OPTIONS" {
                EspError::cors_not_allowed()
            } else {
                EspError::method_does_not_exist()
            };
            let report = self.report_info(config, None, None, &parts.headers);
            return Err((err, report));
        };

        // Backend routing: resolved now (bindings come from the match), applied when forwarding.
        let routed = if settings.enable_backend_routing {
            mi.backend.as_ref().map(|b| {
                let bindings = match b.translation {
                    crate::routing::PathTranslation::ConstantAddress => matched
                        .as_ref()
                        .map(|m| m.escaped_bindings())
                        .unwrap_or_default(),
                    crate::routing::PathTranslation::AppendPathToAddress => Vec::new(),
                };
                Routed {
                    target: b.clone(),
                    upstream_target: b.upstream_target(
                        &config.service,
                        &mi.selector,
                        target,
                        &bindings,
                        &mi.api_key_locations.query,
                        settings.dialect.constant_address_keeps_query(),
                    ),
                }
            })
        } else {
            None
        };
        Ok((mi, routed))
    }

    /// **authenticate**, the JWT stage: `Ok(None)` when the method needs no JWT; on failure the error and whether
    /// a token was present (for `WWW-Authenticate`).
    pub(super) async fn authenticate(
        &self,
        parts: &http::request::Parts,
        query: Option<&str>,
        mi: &MethodInfo,
        config: &ConfigRoutes,
    ) -> Result<Option<AuthInfo>, crate::auth::AuthError> {
        if mi.auth.is_none() {
            return Ok(None);
        }
        let Some(authn) = &config.authenticator else {
            return Err(crate::auth::AuthError {
                error: EspError::new(
                    Code::Internal,
                    "JWT authentication is required by this method but not configured",
                    Cause::Auth,
                ),
                token_present: false,
                authorization_url: None,
            });
        };
        authn
            .authenticate(&mi.selector, &parts.headers, query)
            .await
    }

    /// ESP's `CheckServiceControl` + `QuotaControl` for a matched method on a config with
    /// Service Control: no key → 401 unless unregistered calls are allowed; a key → `:check`
    /// (through the client's cache); then quota when the method has metric costs.
    pub(super) async fn check_and_quota(
        &self,
        config: &ConfigRoutes,
        mi: &MethodInfo,
        api_key: Option<&str>,
        ctx: &Ctx,
        headers: &mut HeaderMap,
        report: &mut ReportInfo,
    ) -> Result<(), EspError> {
        if api_key.is_none() && !mi.allow_unregistered_calls {
            return Err(EspError::unregistered_caller());
        }
        if api_key.is_some_and(|k| k.len() > crate::service_control::MAX_API_KEY_BYTES) {
            // No key is this long: answered as invalid before any cache or `:check`, and kept
            // out of the report (whose aggregates are keyed by it).
            report.api_key = None;
            report.api_key_state = ApiKeyState::Invalid;
            return Err(crate::service_control::invalid_api_key());
        }
        let Some(control) = &self.state.control else {
            return Err(EspError::new(
                Code::Unavailable,
                "Service Control is configured for this service but the proxy has no Service Control client",
                Cause::ServiceControl,
            ));
        };
        // ESP's spans: CheckServiceControl > CheckServiceControlCache > Call ServiceControl
        // server (a miss only), QuotaControl > QuotaServiceControlCache; ESPv2's: only the
        // remote call, under the ingress span. What is held across the check's await is one
        // pointer (boxed only when traced: the request future is memory per connection).
        let check_trace = ctx.trace.as_deref().map(|t| {
            Box::new(match t.dialect() {
                crate::dialect::Dialect::Esp => (SystemTime::now(), new_span_id(), new_span_id()),
                crate::dialect::Dialect::EspV2 => (SystemTime::now(), 0, t.root_id),
            })
        });
        // ESPv2 sends the request's context on the `:check`, traced or not.
        let check_context = match (&ctx.trace, ctx.unsampled_trace, &self.state.tracer) {
            (Some(t), _, _) if t.dialect() == crate::dialect::Dialect::EspV2 => {
                Some(t.check_context())
            }
            (None, Some(id), Some(tracer)) => Some(crate::trace::CheckContext {
                tracer,
                trace_id: id,
                sampled: false,
            }),
            _ => None,
        };
        let checked = if let Some(key) = api_key {
            let input = CheckInput {
                service_name: &config.service.name,
                service_config_id: &config.config_id,
                operation_name: &mi.selector,
                api_key: key,
                caller_ip: ctx.caller_ip,
                referer: header_str(headers, &header::REFERER),
                android_package: header_str(headers, &X_ANDROID_PACKAGE),
                android_cert: header_str(headers, &X_ANDROID_CERT),
                ios_bundle: header_str(headers, &X_IOS_BUNDLE),
                // The remote call's parent: the cache span (ESP) or the ingress span (ESPv2).
                trace: ctx
                    .trace
                    .as_deref()
                    .zip(check_trace.as_deref())
                    .map(|(t, c)| crate::trace::RemoteCall {
                        recorder: t,
                        parent: c.2,
                    }),
                context: check_context,
            };
            let outcome = control.check(input).await;
            report.api_key_state = ApiKeyState::after_check(&outcome);
            match outcome {
                Ok(ok) => {
                    if let Some(n) = ok.consumer_project_number.filter(|n| *n > 0) {
                        if let Ok(v) = HeaderValue::from_str(&n.to_string()) {
                            headers.insert(
                                self.state.settings.generated_headers.project_id.clone(),
                                v,
                            );
                        }
                    }
                    report.check = Some(ok);
                    Ok(())
                }
                Err(err) => {
                    report.check_network_failure = err.code == Code::Unavailable.as_i32();
                    if let Some(known) = &err.known_consumer {
                        report.check = Some(CheckOk {
                            consumer_project_number: known.consumer_project_number,
                            api_key_valid: true,
                            network_failure: false,
                            api_key_uid: known.api_key_uid.clone(),
                        });
                    }
                    Err(err)
                }
            }
        } else {
            Ok(())
        };
        let esp_spans = ctx
            .trace
            .as_deref()
            .filter(|t| t.dialect() == crate::dialect::Dialect::Esp);
        if let (Some(t), Some(c)) = (esp_spans, check_trace) {
            let (start, check_id, cache_id) = *c;
            let end = SystemTime::now();
            if api_key.is_some() {
                t.span(
                    cache_id,
                    "CheckServiceControlCache",
                    check_id,
                    start,
                    end,
                    Kind::Internal,
                );
            }
            t.span(
                check_id,
                "CheckServiceControl",
                t.root_id,
                start,
                end,
                Kind::Internal,
            );
        }
        checked?;
        let quota_start = esp_spans.map(|_| (SystemTime::now(), new_span_id()));
        let quota = if !mi.metric_costs.is_empty() {
            let q = control.allocate_quota(QuotaInput {
                service_name: &config.service.name,
                service_config_id: &config.config_id,
                method_name: &mi.selector,
                api_key: api_key.unwrap_or(""),
                producer_project_id: &config.service.producer_project_id,
                caller_ip: ctx.caller_ip,
                referer: header_str(headers, &header::REFERER),
                metric_costs: &mi.metric_costs,
            });
            if let (Some(t), Some((start, id))) = (esp_spans, quota_start) {
                let end = SystemTime::now();
                t.span(
                    new_span_id(),
                    "QuotaServiceControlCache",
                    id,
                    start,
                    end,
                    Kind::Internal,
                );
            }
            q
        } else {
            Ok(())
        };
        if let (Some(t), Some((start, id))) = (esp_spans, quota_start) {
            t.span(
                id,
                "QuotaControl",
                t.root_id,
                start,
                SystemTime::now(),
                Kind::Internal,
            );
        }
        quota
    }

    /// A path with `;` parameters must name the same method without them: servlet containers
    /// drop them before routing, so `/secret;x` (matched by `x-google-allow: all`'s `/**`)
    /// would run `/secret` unchecked. Only paths holding `;` pay for the second lookup.
    fn same_method_without_parameters(
        &self,
        config: &ConfigRoutes,
        method: &str,
        target: &str,
        matched: &Arc<MethodInfo>,
    ) -> bool {
        let path = request_head::path_of(target);
        if !path.contains(';') {
            return true;
        }
        // Compared as the servlet container routes it: stripped, then merged and resolved
        // (`/items;x//1` is `/items/1` to it even with --disable_merge_slashes_in_path).
        let Some(stripped) = request_head::servlet_path(path) else {
            return false;
        };
        config
            .matcher
            .lookup(method, &stripped)
            .is_some_and(|other| Arc::ptr_eq(other, matched))
    }
}

/// ESPv2's answer to an `OPTIONS` request under `--cors_preset` that is not a valid preflight
/// and that no rule of the API takes.
fn cors_preflight_refused() -> EspError {
    EspError::new(
        Code::InvalidArgument,
        "The CORS preflight request is missing one (or more) of the following required headers \
         [Origin, Access-Control-Request-Method] or has an unmatched Origin header.",
        Cause::Internal,
    )
    .with_kind(ErrorKind::CorsPreflightRefused)
}

/// Approximate size of the request line and headers as sent on HTTP/1.1.
fn request_head_size<B>(req: &Request<B>) -> u64 {
    let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    (line + headers + 2) as u64
}

/// Applies `--rewrite` rules to the raw target; the first matching rule wins.
pub fn rewrite<'a>(rules: &[crate::settings::RewriteRule], target: &'a str) -> Cow<'a, str> {
    for r in rules {
        if let Some(caps) = r.pattern.captures(target) {
            let mut out = String::new();
            caps.expand(&r.replacement, &mut out);
            return Cow::Owned(out);
        }
    }
    Cow::Borrowed(target)
}

fn header_str<'a>(h: &'a HeaderMap, n: &HeaderName) -> Option<&'a str> {
    h.get(n).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_first_match_wins_and_expands_groups() {
        let rules = vec![
            crate::settings::RewriteRule {
                pattern: regex::Regex::new("^/api/(.*)$").unwrap(),
                replacement: "/$1".into(),
            },
            crate::settings::RewriteRule {
                pattern: regex::Regex::new("^/api/x").unwrap(),
                replacement: "/never".into(),
            },
        ];
        assert_eq!(rewrite(&rules, "/api/x?key=1"), "/x?key=1");
        assert_eq!(rewrite(&rules, "/other"), "/other");
    }
}
