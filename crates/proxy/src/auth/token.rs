//! Where a request carries its JWT.
//!
//! ESP's default order: `X-Goog-Iap-Jwt-Assertion` (raw), then `Authorization` (`Bearer `
//! stripped, case-sensitively; any other value used whole), then the `access_token` query
//! parameter, only when there is no `Authorization` header at all. A provider that configures
//! `jwtLocations` is looked up at those locations instead of the defaults.

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

/// The request's token, if any.
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
