//! Where a request carries its JWT.
//!
//! ESP's default order ([`extract`]): `X-Goog-Iap-Jwt-Assertion` (raw), then `Authorization`
//! (`Bearer ` stripped, case-sensitively; any other value used whole), then the `access_token`
//! query parameter, only when there is no `Authorization` header at all. A provider that
//! configures `jwtLocations` is looked up at those locations instead of the defaults.
//!
//! ESPv2's ([`extract_espv2`], Envoy's `jwt_authn` extractor): `Authorization` only when it holds
//! `Bearer ` (anywhere), the token being the run of base64url characters and dots that follows;
//! then `X-Goog-Iap-Jwt-Assertion`; then `access_token`, whatever other headers there are. A
//! custom header location with a prefix reads its value the same way.

use http::HeaderMap;
use portico_config::service::JwtLocation;

/// One custom place to look, from a provider's `jwtLocations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Header { name: String, prefix: String },
    Query { name: String, prefix: String },
}

impl Location {
    pub fn from_config(l: &JwtLocation) -> Option<Location> {
        if !l.header.is_empty() {
            Some(Location::Header {
                name: l.header.clone(),
                prefix: l.value_prefix.clone(),
            })
        } else if !l.query.is_empty() {
            Some(Location::Query {
                name: l.query.clone(),
                prefix: l.value_prefix.clone(),
            })
        } else {
            // Cookies: ESP v1 never read tokens from cookies, and neither do we.
            None
        }
    }
}

/// The places to search for one method, combined over its providers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locations {
    /// Whether any provider uses ESP's default locations.
    pub defaults: bool,
    pub custom: Vec<Location>,
}

/// The first value of query parameter `name` (case-insensitive, like nginx's `$arg_`),
/// percent-decoded.
pub fn query_param(raw_query: Option<&str>, name: &str) -> Option<String> {
    raw_query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if !k.eq_ignore_ascii_case(name) {
            return None;
        }
        Some(
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned(),
        )
    })
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

fn strip_prefix(value: &str, prefix: &str) -> Option<String> {
    value.strip_prefix(prefix).map(|v| v.trim().to_string())
}

/// The token in a header value after `prefix`, as Envoy reads it: from the first token
/// character after the prefix's first occurrence, up to the first character that is not one
/// (the whole value when no token character follows, which then fails as a token).
fn after_prefix(value: &str, prefix: &str) -> Option<String> {
    let is_token = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let rest = &value[value.find(prefix)? + prefix.len()..];
    let Some(start) = rest.find(is_token) else {
        return Some(value.to_string());
    };
    let rest = &rest[start..];
    let end = rest.find(|c: char| !is_token(c)).unwrap_or(rest.len());
    Some(rest[..end].to_string())
}

/// The request's token by ESPv2's rules (see the module docs), if any.
pub fn extract_espv2(
    headers: &HeaderMap,
    raw_query: Option<&str>,
    locations: &Locations,
) -> Option<String> {
    if locations.defaults {
        let found = header_str(headers, "authorization")
            .and_then(|v| after_prefix(v, "Bearer "))
            .or_else(|| header_str(headers, "x-goog-iap-jwt-assertion").map(str::to_string))
            .or_else(|| query_param_exact(raw_query, "access_token"));
        if let Some(t) = found.and_then(non_empty) {
            return Some(t);
        }
    }
    for loc in &locations.custom {
        let found = match loc {
            Location::Header { name, prefix } if prefix.is_empty() => {
                header_str(headers, name).map(str::to_string)
            }
            Location::Header { name, prefix } => {
                header_str(headers, name).and_then(|v| after_prefix(v, prefix))
            }
            Location::Query { name, .. } => query_param_exact(raw_query, name),
        };
        if let Some(t) = found.and_then(non_empty) {
            return Some(t);
        }
    }
    None
}

/// The first value of query parameter `name` (case-sensitive, as Envoy matches it),
/// percent-decoded.
fn query_param_exact(raw_query: Option<&str>, name: &str) -> Option<String> {
    raw_query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// The request's token by ESP v1's rules, if any.
pub fn extract(
    headers: &HeaderMap,
    raw_query: Option<&str>,
    locations: &Locations,
) -> Option<String> {
    if locations.defaults {
        if let Some(t) = header_str(headers, "x-goog-iap-jwt-assertion") {
            if !t.is_empty() {
                return Some(t.to_string());
            }
        }
        if let Some(auth) = headers.get(http::header::AUTHORIZATION) {
            let auth = auth.to_str().unwrap_or("");
            let token = auth.strip_prefix("Bearer ").unwrap_or(auth);
            if !token.is_empty() {
                return Some(token.to_string());
            }
        } else if let Some(t) = query_param(raw_query, "access_token").and_then(non_empty) {
            return Some(t);
        }
    }
    for loc in &locations.custom {
        let found = match loc {
            Location::Header { name, prefix } => {
                header_str(headers, name).and_then(|v| strip_prefix(v, prefix))
            }
            Location::Query { name, prefix } => {
                query_param(raw_query, name).and_then(|v| strip_prefix(&v, prefix))
            }
        };
        if let Some(t) = found.and_then(non_empty) {
            return Some(t);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Locations {
        Locations {
            defaults: true,
            custom: vec![],
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn espv2_reads_tokens_as_envoy_does() {
        assert_eq!(
            after_prefix("Bearer a.b.c", "Bearer ").as_deref(),
            Some("a.b.c")
        );
        assert_eq!(
            after_prefix("x, Bearer  a.b-c_d, y", "Bearer ").as_deref(),
            Some("a.b-c_d")
        );
        assert_eq!(
            after_prefix("Bearer a.b.c=", "Bearer ").as_deref(),
            Some("a.b.c")
        );
        assert_eq!(
            after_prefix("Bearer é", "Bearer ").as_deref(),
            Some("Bearer é")
        );
        assert_eq!(
            after_prefix("Bearer ", "Bearer ").as_deref(),
            Some("Bearer ")
        );
        assert_eq!(after_prefix("bearer a", "Bearer "), None);
        let h = headers(&[
            ("authorization", "Basic x"),
            ("x-goog-iap-jwt-assertion", "iap"),
        ]);
        assert_eq!(
            extract_espv2(&h, Some("access_token=q"), &defaults()).as_deref(),
            Some("iap")
        );
        let h = headers(&[
            ("authorization", "Bearer a"),
            ("x-goog-iap-jwt-assertion", "iap"),
        ]);
        assert_eq!(extract_espv2(&h, None, &defaults()).as_deref(), Some("a"));
        let h = headers(&[("authorization", "Basic x")]);
        assert_eq!(
            extract_espv2(&h, Some("access_token=q%2E"), &defaults()).as_deref(),
            Some("q.")
        );
        assert_eq!(extract_espv2(&h, Some("Access_Token=q"), &defaults()), None);
        let custom = Locations {
            defaults: false,
            custom: vec![
                Location::Header {
                    name: "x-jwt".into(),
                    prefix: "Token ".into(),
                },
                Location::Query {
                    name: "jwt".into(),
                    prefix: "ignored".into(),
                },
            ],
        };
        let h = headers(&[("x-jwt", "Token abc")]);
        assert_eq!(extract_espv2(&h, None, &custom).as_deref(), Some("abc"));
        assert_eq!(
            extract_espv2(&HeaderMap::new(), Some("jwt=abc"), &custom).as_deref(),
            Some("abc")
        );
        assert_eq!(
            extract_espv2(&headers(&[("authorization", "Bearer a")]), None, &custom),
            None
        );
    }

    #[test]
    fn iap_header_wins_then_authorization() {
        let h = headers(&[
            ("authorization", "Bearer a"),
            ("x-goog-iap-jwt-assertion", "iap"),
        ]);
        assert_eq!(
            extract(&h, Some("access_token=q"), &defaults()).as_deref(),
            Some("iap")
        );
        let h = headers(&[("authorization", "Bearer a")]);
        assert_eq!(
            extract(&h, Some("access_token=q"), &defaults()).as_deref(),
            Some("a")
        );
    }

    #[test]
    fn non_bearer_authorization_is_used_whole_and_blocks_the_query() {
        let h = headers(&[("authorization", "bearer a")]);
        assert_eq!(
            extract(&h, Some("access_token=q"), &defaults()).as_deref(),
            Some("bearer a")
        );
        let h = headers(&[("authorization", "")]);
        assert_eq!(extract(&h, Some("access_token=q"), &defaults()), None);
    }

    #[test]
    fn access_token_query_without_authorization() {
        let h = HeaderMap::new();
        assert_eq!(
            extract(&h, Some("x=1&ACCESS_TOKEN=a%2Eb"), &defaults()).as_deref(),
            Some("a.b")
        );
        assert_eq!(extract(&h, Some("access_token="), &defaults()), None);
        assert_eq!(extract(&h, None, &defaults()), None);
    }

    #[test]
    fn custom_locations_with_prefix() {
        let locs = Locations {
            defaults: false,
            custom: vec![
                Location::Header {
                    name: "x-jwt".into(),
                    prefix: "JWT ".into(),
                },
                Location::Query {
                    name: "jwt".into(),
                    prefix: String::new(),
                },
            ],
        };
        let h = headers(&[("authorization", "Bearer ignored"), ("x-jwt", "Other t")]);
        assert_eq!(extract(&h, Some("jwt=q"), &locs).as_deref(), Some("q"));
        let h = headers(&[("x-jwt", "JWT t")]);
        assert_eq!(extract(&h, None, &locs).as_deref(), Some("t"));
    }
}
