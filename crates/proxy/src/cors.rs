//! CORS mechanism (B) of ESP: `--cors_preset=basic|cors_with_regex`. In ESP nginx itself answers
//! preflights before the ESP module runs, so a preflight gets 204 with the CORS headers and is
//! never checked nor reported; every other response (errors included) carries the CORS headers.
//!
//! Mechanism (A), `endpoints[].allowCors`, is routing, not headers: see `routing.rs`, which
//! registers OPTIONS rules that are proxied to the backend.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};

static ALLOW_ORIGIN: HeaderName = HeaderName::from_static("access-control-allow-origin");
static ALLOW_METHODS: HeaderName = HeaderName::from_static("access-control-allow-methods");
static ALLOW_HEADERS: HeaderName = HeaderName::from_static("access-control-allow-headers");
static ALLOW_CREDENTIALS: HeaderName = HeaderName::from_static("access-control-allow-credentials");
static EXPOSE_HEADERS: HeaderName = HeaderName::from_static("access-control-expose-headers");
static MAX_AGE: HeaderName = HeaderName::from_static("access-control-max-age");
static HSTS: HeaderName = HeaderName::from_static("strict-transport-security");

/// The HSTS value ESP's template adds with `--enable_strict_transport_security`.
pub fn hsts_value() -> HeaderValue {
    HeaderValue::from_static("max-age=31536000; includeSubdomains;")
}

/// How the allowed origin is decided.
#[derive(Debug, Clone)]
pub enum OriginPolicy {
    /// `basic`: the configured value is sent as is (default `*`).
    Fixed(HeaderValue),
    /// `cors_with_regex`: only a matching `Origin` enables CORS, and it is echoed back.
    Regex(regex::Regex),
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
}

fn header_value(flag: &str, v: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(v).map_err(|_| format!("invalid {flag} {v:?}: not a valid header value"))
}

impl CorsSettings {
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
        })
    }

    /// The `Access-Control-Allow-Origin` value for this request, or `None` when CORS does not
    /// apply (regex preset and the Origin is absent or does not match).
    pub fn allowed_origin(&self, request_headers: &HeaderMap) -> Option<HeaderValue> {
        match &self.origin {
            OriginPolicy::Fixed(v) => Some(v.clone()),
            OriginPolicy::Regex(re) => {
                let origin = request_headers.get(http::header::ORIGIN)?;
                let s = origin.to_str().ok()?;
                re.is_match(s).then(|| origin.clone())
            }
        }
    }

    /// Whether a request is a preflight by ESPv2's CORS route: it names the method it asks
    /// for (`Access-Control-Request-Method`) and an `Origin` the preset allows — any origin for
    /// `basic` with `*`, exactly the configured one for another `basic` value, a match of the
    /// regex for `cors_with_regex`.
    pub fn is_strict_preflight(&self, request_headers: &HeaderMap) -> bool {
        if !request_headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD) {
            return false;
        }
        let Some(origin) = request_headers.get(http::header::ORIGIN) else {
            return false;
        };
        match &self.origin {
            OriginPolicy::Fixed(v) => v == "*" || v == origin,
            OriginPolicy::Regex(_) => self.allowed_origin(request_headers).is_some(),
        }
    }

    /// The 204 answer to a preflight.
    pub fn preflight<B: Default>(&self, origin: HeaderValue) -> Response<B> {
        let mut resp = Response::new(B::default());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        h.insert(MAX_AGE.clone(), HeaderValue::from_static("1728000"));
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
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        if self.hsts {
            h.insert(HSTS.clone(), hsts_value());
        }
        resp
    }

    /// Adds the CORS headers to a non-preflight response (backend or proxy error alike).
    pub fn decorate(&self, origin: HeaderValue, h: &mut HeaderMap) {
        h.insert(ALLOW_ORIGIN.clone(), origin);
        h.insert(ALLOW_METHODS.clone(), self.allow_methods.clone());
        h.insert(ALLOW_HEADERS.clone(), self.allow_headers.clone());
        h.insert(EXPOSE_HEADERS.clone(), self.expose_headers.clone());
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
        let r: Response<String> = c.preflight(origin);
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
        let r: Response<String> = c.preflight(HeaderValue::from_static("https://app.example.com"));
        assert_eq!(r.headers()["access-control-allow-credentials"], "true");
        assert!(r.headers().contains_key("strict-transport-security"));
    }

    #[test]
    fn strict_preflights_need_the_request_method_and_an_allowed_origin() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(*k, HeaderValue::from_static(v));
            }
            m
        };
        let acrm = ("access-control-request-method", "GET");
        let any = basic();
        assert!(any.is_strict_preflight(&h(&[acrm, ("origin", "https://a.example")])));
        assert!(!any.is_strict_preflight(&h(&[acrm])));
        assert!(!any.is_strict_preflight(&h(&[("origin", "https://a.example")])));
        let one = CorsSettings::from_flags(
            "basic",
            "https://a.example",
            "",
            "GET",
            "X",
            false,
            "Y",
            false,
        )
        .unwrap();
        assert!(one.is_strict_preflight(&h(&[acrm, ("origin", "https://a.example")])));
        assert!(!one.is_strict_preflight(&h(&[acrm, ("origin", "https://A.example")])));
        assert!(!one.is_strict_preflight(&h(&[acrm, ("origin", "https://b.example")])));
        let re = CorsSettings::from_flags(
            "cors_with_regex",
            "*",
            r"^https://[a-z]+\.example$",
            "GET",
            "X",
            false,
            "Y",
            false,
        )
        .unwrap();
        assert!(re.is_strict_preflight(&h(&[acrm, ("origin", "https://a.example")])));
        assert!(!re.is_strict_preflight(&h(&[acrm, ("origin", "https://a.evil")])));
    }

    #[test]
    fn regex_preset_requires_a_regex() {
        let e = CorsSettings::from_flags("cors_with_regex", "*", "", "G", "H", false, "E", false)
            .unwrap_err();
        assert!(e.contains("--cors_allow_origin_regex"));
    }
}
