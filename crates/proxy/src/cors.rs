//! CORS mechanism (B): `--cors_preset=basic|cors_with_regex`, in each dialect's way.
//!
//! - ESP (`portico esp`): nginx itself answers preflights before the ESP module runs, so a
//!   preflight (any `OPTIONS` with an allowed origin) gets 204 with the CORS headers and is never
//!   checked nor reported; every other response (errors included) carries five CORS headers;
//!   `basic` sends the configured origin whatever the request's.
//! - ESPv2 (`portico espv2`): Envoy's CORS filter. Only a request whose single, non-empty
//!   `Origin` is allowed is a CORS request; the answer echoes that origin. A preflight also needs
//!   `Access-Control-Request-Method` and is answered 200 with the methods, headers and
//!   `--cors_max_age`; other answers get the origin, `Access-Control-Expose-Headers` and
//!   credentials, and only when an API route matched (the pipeline arms them after matching).
//!   Which `OPTIONS` requests are refused 400 is the pipeline's (`Dialect::refuses_bad_preflights`).
//!
//! Mechanism (A), `endpoints[].allowCors`, is routing, not headers: see `routing.rs`, which
//! registers OPTIONS rules that are proxied to the backend.

use crate::dialect::Dialect;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};

static ALLOW_ORIGIN: HeaderName = HeaderName::from_static("access-control-allow-origin");
static ALLOW_METHODS: HeaderName = HeaderName::from_static("access-control-allow-methods");
static ALLOW_HEADERS: HeaderName = HeaderName::from_static("access-control-allow-headers");
static ALLOW_CREDENTIALS: HeaderName = HeaderName::from_static("access-control-allow-credentials");
static EXPOSE_HEADERS: HeaderName = HeaderName::from_static("access-control-expose-headers");
static MAX_AGE: HeaderName = HeaderName::from_static("access-control-max-age");
static HSTS: HeaderName = HeaderName::from_static("strict-transport-security");

/// ESP's preflight `Access-Control-Max-Age` (20 days), and ESPv2's `--cors_max_age` default.
pub const DEFAULT_MAX_AGE_SECS: u64 = 1_728_000;

/// The largest compiled `--cors_allow_origin_regex` taken (the regex crate's measure). ESPv2
/// refuses RE2 programs over 1,000 instructions; the two measures differ, the intent is the
/// same: an origin pattern is small.
const ORIGIN_REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// The HSTS value ESP's template adds with `--enable_strict_transport_security`.
pub fn hsts_value() -> HeaderValue {
    HeaderValue::from_static("max-age=31536000; includeSubdomains;")
}

/// How the allowed origin is decided.
#[derive(Debug, Clone)]
pub enum OriginPolicy {
    /// ESP's `basic`: the configured value is sent as is (default `*`), whatever the request.
    Fixed(HeaderValue),
    /// ESP's `cors_with_regex`: only an `Origin` the regex finds (nginx's `~*`,
    /// case-insensitive) enables CORS, and it is echoed back.
    Regex(regex::Regex),
    /// ESPv2's `basic` with `*`: every origin is allowed and echoed back.
    Any,
    /// ESPv2's `basic`: this origin, byte for byte, echoed back.
    Exact(HeaderValue),
    /// ESPv2's `cors_with_regex`: an origin the regex matches whole (Envoy's full match,
    /// case-sensitive), echoed back.
    FullMatch(regex::Regex),
}

/// Validated `--cors_*` flags, with header values pre-built once.
#[derive(Debug, Clone)]
pub struct CorsSettings {
    pub origin: OriginPolicy,
    pub allow_methods: HeaderValue,
    pub allow_headers: HeaderValue,
    pub expose_headers: HeaderValue,
    pub allow_credentials: bool,
    pub hsts: bool,
    /// `Access-Control-Max-Age` on preflights, in seconds.
    pub max_age: HeaderValue,
    /// Whose CORS this is: nginx's `if` blocks (ESP) or Envoy's CORS filter (ESPv2).
    pub dialect: Dialect,
}

fn header_value(flag: &str, v: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(v).map_err(|_| format!("invalid {flag} {v:?}: not a valid header value"))
}

/// The flags of either dialect, before validation.
#[derive(Debug, Clone, Copy)]
pub struct CorsFlags<'a> {
    pub preset: &'a str,
    pub allow_origin: &'a str,
    pub allow_origin_regex: &'a str,
    pub allow_methods: &'a str,
    pub allow_headers: &'a str,
    pub expose_headers: &'a str,
    pub allow_credentials: bool,
    /// `--enable_strict_transport_security`: HSTS on preflights too.
    pub hsts: bool,
}

impl CorsSettings {
    /// ESP's `--cors_*` flags.
    #[allow(clippy::too_many_arguments)]
    pub fn from_flags(
        preset: &str,
        allow_origin: &str,
        allow_origin_regex: &str,
        allow_methods: &str,
        allow_headers: &str,
        allow_credentials: bool,
        expose_headers: &str,
        hsts: bool,
    ) -> Result<CorsSettings, String> {
        let origin = match preset {
            "basic" => OriginPolicy::Fixed(header_value("--cors_allow_origin", allow_origin)?),
            "cors_with_regex" => {
                if allow_origin_regex.is_empty() {
                    return Err(
                        "--cors_preset=cors_with_regex needs --cors_allow_origin_regex".into(),
                    );
                }
                // nginx's `~*`: case-insensitive.
                let re = regex::RegexBuilder::new(allow_origin_regex)
                    .case_insensitive(true)
                    .build()
                    .map_err(|e| {
                        format!("invalid --cors_allow_origin_regex {allow_origin_regex:?}: {e}")
                    })?;
                OriginPolicy::Regex(re)
            }
            other => {
                return Err(format!(
                    "invalid --cors_preset {other:?}: must be \"basic\" or \"cors_with_regex\""
                ))
            }
        };
        Ok(CorsSettings {
            origin,
            allow_methods: header_value("--cors_allow_methods", allow_methods)?,
            allow_headers: header_value("--cors_allow_headers", allow_headers)?,
            expose_headers: header_value("--cors_expose_headers", expose_headers)?,
            allow_credentials,
            hsts,
            max_age: HeaderValue::from(DEFAULT_MAX_AGE_SECS),
            dialect: Dialect::Esp,
        })
    }

    /// ESPv2's `--cors_*` flags, `--cors_max_age` already in seconds; refused as ESPv2's
    /// config manager refuses them.
    pub fn espv2(f: CorsFlags<'_>, max_age_secs: u64) -> Result<CorsSettings, String> {
        let origin = match f.preset {
            "basic" if f.allow_origin.is_empty() => {
                return Err("--cors_allow_origin cannot be empty when --cors_preset=basic".into())
            }
            "basic" if f.allow_origin == "*" => OriginPolicy::Any,
            "basic" => OriginPolicy::Exact(header_value("--cors_allow_origin", f.allow_origin)?),
            "cors_with_regex" => {
                if f.allow_origin_regex.is_empty() {
                    return Err("--cors_allow_origin_regex cannot be empty when \
                                --cors_preset=cors_with_regex"
                        .into());
                }
                // Envoy matches the whole value; the group keeps alternations inside the
                // anchors. The regex crate runs in time linear in the origin's length,
                // whatever the pattern.
                let re = regex::RegexBuilder::new(&format!("^(?:{})$", f.allow_origin_regex))
                    .size_limit(ORIGIN_REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| match e {
                        regex::Error::CompiledTooBig(limit) => format!(
                            "invalid --cors_allow_origin_regex {:?}: the compiled pattern is too \
                             big (over {limit} bytes); an origin pattern should be small",
                            f.allow_origin_regex
                        ),
                        e => format!(
                            "invalid --cors_allow_origin_regex {:?}: {e}",
                            f.allow_origin_regex
                        ),
                    })?;
                OriginPolicy::FullMatch(re)
            }
            _ => return Err("cors_preset must be either \"basic\" or \"cors_with_regex\"".into()),
        };
        Ok(CorsSettings {
            origin,
            allow_methods: header_value("--cors_allow_methods", f.allow_methods)?,
            allow_headers: header_value("--cors_allow_headers", f.allow_headers)?,
            expose_headers: header_value("--cors_expose_headers", f.expose_headers)?,
            allow_credentials: f.allow_credentials,
            hsts: f.hsts,
            max_age: HeaderValue::from(max_age_secs),
            dialect: Dialect::EspV2,
        })
    }

    /// Every origin is allowed and echoed back with `Access-Control-Allow-Credentials`: any
    /// site may read credentialed answers (ESPv2 does this with `*` and credentials).
    pub fn reflects_any_origin_with_credentials(&self) -> bool {
        matches!(self.origin, OriginPolicy::Any) && self.allow_credentials
    }

    /// The `Access-Control-Allow-Origin` value for this request, or `None` when CORS does not
    /// apply: for ESP's regex preset an `Origin` that is absent or does not match; for ESPv2 an
    /// `Origin` that is absent, empty, given twice or not allowed.
    pub fn allowed_origin(&self, request_headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = || request_headers.get(http::header::ORIGIN);
        match &self.origin {
            OriginPolicy::Fixed(v) => Some(v.clone()),
            OriginPolicy::Regex(re) => {
                let o = origin()?;
                re.is_match(o.to_str().ok()?).then(|| o.clone())
            }
            OriginPolicy::Any | OriginPolicy::Exact(_) | OriginPolicy::FullMatch(_) => {
                let mut all = request_headers.get_all(http::header::ORIGIN).iter();
                // Two origins are no origin: echoing either would speak for the other.
                let (Some(o), None) = (all.next(), all.next()) else {
                    return None;
                };
                if o.is_empty() {
                    return None;
                }
                let allowed = match &self.origin {
                    OriginPolicy::Exact(v) => v == o,
                    OriginPolicy::FullMatch(re) => o.to_str().is_ok_and(|s| re.is_match(s)),
                    _ => true,
                };
                allowed.then(|| o.clone())
            }
        }
    }

    /// Whether a request is a preflight by ESPv2's CORS route and Envoy's filter: it names
    /// the method it asks for (a non-empty `Access-Control-Request-Method`) and an `Origin`
    /// the preset allows.
    pub fn is_strict_preflight(&self, request_headers: &HeaderMap) -> bool {
        request_headers
            .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)
            .is_some_and(|m| !m.is_empty())
            && self.allowed_origin(request_headers).is_some()
    }

    /// The answer to a preflight: ESP's nginx 204, or Envoy's 200 (the allowed methods and
    /// headers, `*` standing for what the request asks, and the simple-request headers).
    pub fn preflight<B: Default>(
        &self,
        origin: HeaderValue,
        request_headers: &HeaderMap,
    ) -> Response<B> {
        let mut resp = Response::new(B::default());
        if self.dialect == Dialect::Esp {
            *resp.status_mut() = StatusCode::NO_CONTENT;
        }
        let h = resp.headers_mut();
        match self.dialect {
            Dialect::Esp => {
                h.insert(MAX_AGE.clone(), self.max_age.clone());
                h.insert(ALLOW_ORIGIN.clone(), origin);
                h.insert(ALLOW_METHODS.clone(), self.allow_methods.clone());
                h.insert(ALLOW_HEADERS.clone(), self.allow_headers.clone());
                if self.allow_credentials {
                    h.insert(ALLOW_CREDENTIALS.clone(), HeaderValue::from_static("true"));
                }
                h.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
            }
            Dialect::EspV2 => {
                let echo = |configured: &HeaderValue, asked: http::header::HeaderName| {
                    if configured == "*" {
                        request_headers.get(asked).cloned()
                    } else {
                        Some(configured.clone()).filter(|v| !v.is_empty())
                    }
                };
                if let Some(v) = echo(
                    &self.allow_methods,
                    http::header::ACCESS_CONTROL_REQUEST_METHOD,
                ) {
                    h.insert(ALLOW_METHODS.clone(), v);
                }
                if let Some(v) = echo(
                    &self.allow_headers,
                    http::header::ACCESS_CONTROL_REQUEST_HEADERS,
                ) {
                    h.insert(ALLOW_HEADERS.clone(), v);
                }
                h.insert(MAX_AGE.clone(), self.max_age.clone());
                self.decorate(origin, h);
            }
        }
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        if self.hsts {
            h.insert(HSTS.clone(), hsts_value());
        }
        resp
    }

    /// Adds the CORS headers to a non-preflight response (backend or proxy error alike): ESP's
    /// five, or Envoy's three (origin, credentials, expose headers).
    pub fn decorate(&self, origin: HeaderValue, h: &mut HeaderMap) {
        h.insert(ALLOW_ORIGIN.clone(), origin);
        if self.dialect == Dialect::Esp {
            h.insert(ALLOW_METHODS.clone(), self.allow_methods.clone());
            h.insert(ALLOW_HEADERS.clone(), self.allow_headers.clone());
        }
        if self.dialect == Dialect::Esp || !self.expose_headers.is_empty() {
            h.insert(EXPOSE_HEADERS.clone(), self.expose_headers.clone());
        }
        if self.allow_credentials {
            h.insert(ALLOW_CREDENTIALS.clone(), HeaderValue::from_static("true"));
        }
    }
}

/// Adds `Strict-Transport-Security` (ESP adds it to every response when enabled).
pub fn add_hsts(h: &mut HeaderMap) {
    h.insert(HSTS.clone(), hsts_value());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic() -> CorsSettings {
        CorsSettings::from_flags(
            "basic",
            "*",
            "",
            "GET, POST, PUT, PATCH, DELETE, OPTIONS",
            "DNT,Authorization",
            false,
            "Content-Length,Content-Range",
            false,
        )
        .unwrap()
    }

    #[test]
    fn basic_preflight_has_esp_headers() {
        let c = basic();
        let origin = c.allowed_origin(&HeaderMap::new()).unwrap();
        let r: Response<String> = c.preflight(origin, &HeaderMap::new());
        assert_eq!(r.status(), 204);
        let h = r.headers();
        assert_eq!(h["access-control-max-age"], "1728000");
        assert_eq!(h["access-control-allow-origin"], "*");
        assert_eq!(h["content-type"], "text/plain; charset=utf-8");
        assert_eq!(h["content-length"], "0");
        assert!(h.get("access-control-allow-credentials").is_none());
        assert!(h.get("strict-transport-security").is_none());
    }

    #[test]
    fn regex_preset_echoes_matching_origin_case_insensitively() {
        let c = CorsSettings::from_flags(
            "cors_with_regex",
            "*",
            r"^https://[a-z]+\.example\.com$",
            "GET",
            "X",
            true,
            "Y",
            true,
        )
        .unwrap();
        let mut h = HeaderMap::new();
        assert!(c.allowed_origin(&h).is_none());
        h.insert(
            "origin",
            HeaderValue::from_static("https://APP.example.com"),
        );
        assert_eq!(c.allowed_origin(&h).unwrap(), "https://APP.example.com");
        h.insert("origin", HeaderValue::from_static("https://evil.com"));
        assert!(c.allowed_origin(&h).is_none());
        let r: Response<String> = c.preflight(
            HeaderValue::from_static("https://app.example.com"),
            &HeaderMap::new(),
        );
        assert_eq!(r.headers()["access-control-allow-credentials"], "true");
        assert!(r.headers().contains_key("strict-transport-security"));
    }

    fn espv2(preset: &str, origin: &str, regex: &str) -> Result<CorsSettings, String> {
        CorsSettings::espv2(
            CorsFlags {
                preset,
                allow_origin: origin,
                allow_origin_regex: regex,
                allow_methods: "GET",
                allow_headers: "X",
                expose_headers: "Y",
                allow_credentials: false,
                hsts: false,
            },
            7200,
        )
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn strict_preflights_need_the_request_method_and_an_allowed_origin() {
        let h = headers;
        let acrm = ("access-control-request-method", "GET");
        let any = espv2("basic", "*", "").unwrap();
        assert!(any.is_strict_preflight(&h(&[acrm, ("origin", "https://a.example")])));
        assert!(!any.is_strict_preflight(&h(&[acrm])));
        assert!(!any.is_strict_preflight(&h(&[acrm, ("origin", "")])));
        assert!(!any.is_strict_preflight(&h(&[("origin", "https://a.example")])));
        assert!(!any.is_strict_preflight(&h(&[
            ("access-control-request-method", ""),
            ("origin", "https://a.example")
        ])));
        // Two origins are not one.
        assert!(!any.is_strict_preflight(&h(&[
            acrm,
            ("origin", "https://a.example"),
            ("origin", "https://a.example")
        ])));
        let one = espv2("basic", "https://a.example", "").unwrap();
        assert!(one.is_strict_preflight(&h(&[acrm, ("origin", "https://a.example")])));
        assert!(!one.is_strict_preflight(&h(&[acrm, ("origin", "https://A.example")])));
        assert!(!one.is_strict_preflight(&h(&[acrm, ("origin", "https://a.example/")])));
        assert!(!one.is_strict_preflight(&h(&[acrm, ("origin", "https://b.example")])));
        // Envoy matches the whole origin, case-sensitively; `|` stays inside the anchors.
        let re = espv2("cors_with_regex", "*", r"https://[a-z]+\.example|null").unwrap();
        assert!(re.is_strict_preflight(&h(&[acrm, ("origin", "https://a.example")])));
        assert!(re.is_strict_preflight(&h(&[acrm, ("origin", "null")])));
        for bad in [
            "https://a.evil",
            "https://a.example.evil",
            "xhttps://a.example",
            "https://A.example",
            "nullx",
        ] {
            assert!(
                !re.is_strict_preflight(&h(&[acrm, ("origin", bad)])),
                "{bad}"
            );
        }
    }

    #[test]
    fn espv2_answers_as_envoys_filter() {
        let mut c = espv2("basic", "*", "").unwrap();
        c.allow_methods = HeaderValue::from_static("*");
        c.allow_headers = HeaderValue::from_static("");
        c.allow_credentials = true;
        let req = headers(&[
            ("origin", "https://a.example"),
            ("access-control-request-method", "PATCH"),
            ("access-control-request-headers", "x-a"),
        ]);
        let origin = c.allowed_origin(&req).unwrap();
        let r: Response<String> = c.preflight(origin.clone(), &req);
        assert_eq!(r.status(), 200);
        let h = r.headers();
        assert_eq!(h["access-control-allow-origin"], "https://a.example");
        // `*` stands for what the request asks; an empty list is no header.
        assert_eq!(h["access-control-allow-methods"], "PATCH");
        assert!(h.get("access-control-allow-headers").is_none());
        assert_eq!(h["access-control-max-age"], "7200");
        assert_eq!(h["access-control-expose-headers"], "Y");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert!(h.get("content-type").is_none());
        let mut simple = HeaderMap::new();
        c.decorate(origin, &mut simple);
        assert_eq!(simple.len(), 3, "{simple:?}");
        assert!(c.reflects_any_origin_with_credentials());
    }

    #[test]
    fn espv2_refuses_what_its_config_manager_refuses() {
        assert!(espv2("basic", "", "")
            .unwrap_err()
            .contains("cannot be empty"));
        assert!(espv2("cors_with_regex", "*", "")
            .unwrap_err()
            .contains("cannot be empty"));
        assert!(espv2("other", "*", "")
            .unwrap_err()
            .contains("cors_preset must be either"));
        let e = espv2("cors_with_regex", "*", "((a{1000}){1000}){1000}").unwrap_err();
        assert!(e.contains("too big"), "{e}");
        assert!(espv2("basic", "bad\nvalue", "").is_err());
    }

    #[test]
    fn regex_preset_requires_a_regex() {
        let e = CorsSettings::from_flags("cors_with_regex", "*", "", "G", "H", false, "E", false)
            .unwrap_err();
        assert!(e.contains("--cors_allow_origin_regex"));
    }
}
