//! The API key of a request: where ESP looks for it ([`ApiKeyLocations`], from the config's
//! `system_parameters`) and the lookup itself ([`extract_api_key`], §2.4). Beside the JWT
//! lookup ([`super::token`]) because both read a credential out of the request; checking the
//! key is Service Control's ([`crate::service_control`]).

use http::header::HeaderMap;

/// Where to look for the API key of a method (§2.4).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiKeyLocations {
    /// Query parameter names, in config order (tried first).
    pub query: Vec<String>,
    /// Header names, in config order (tried after the queries).
    pub headers: Vec<http::HeaderName>,
}

impl ApiKeyLocations {
    /// ESP's default when no `system_parameters` name the key: `key`, `api_key`, `x-api-key`.
    pub fn esp_default() -> ApiKeyLocations {
        ApiKeyLocations {
            query: vec!["key".into(), "api_key".into()],
            headers: vec![http::HeaderName::from_static("x-api-key")],
        }
    }
}

/// The query string's value for `name` as nginx's `ngx_http_arg` finds it: first occurrence,
/// name compared case-insensitively, value raw (still percent-encoded).
fn query_arg<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k.eq_ignore_ascii_case(name) {
            return Some(v);
        }
    }
    None
}

/// ESP's API-key lookup (§2.4): every configured query parameter in order, then every header;
/// an empty value counts as absent.
pub fn extract_api_key<'a>(
    query: Option<&'a str>,
    headers: &'a HeaderMap,
    loc: &ApiKeyLocations,
) -> Option<&'a str> {
    if let Some(q) = query {
        for name in &loc.query {
            if let Some(v) = query_arg(q, name).filter(|v| !v.is_empty()) {
                return Some(v);
            }
        }
    }
    for h in &loc.headers {
        if let Some(v) = headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
        {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{HeaderName, HeaderValue};

    fn hm(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn default_order_key_then_api_key_then_header() {
        let d = ApiKeyLocations::esp_default();
        let h = hm(&[("x-api-key", "H")]);
        assert_eq!(extract_api_key(Some("api_key=A&key=B"), &h, &d), Some("B"));
        assert_eq!(extract_api_key(Some("api_key=A"), &h, &d), Some("A"));
        assert_eq!(extract_api_key(None, &h, &d), Some("H"));
        assert_eq!(
            extract_api_key(Some("other=1"), &HeaderMap::new(), &d),
            None
        );
    }

    #[test]
    fn query_names_are_case_insensitive_and_values_raw() {
        let d = ApiKeyLocations::esp_default();
        assert_eq!(
            extract_api_key(Some("KEY=a%2Bb"), &HeaderMap::new(), &d),
            Some("a%2Bb")
        );
    }

    #[test]
    fn empty_value_counts_as_absent() {
        let d = ApiKeyLocations::esp_default();
        let h = hm(&[("x-api-key", "")]);
        assert_eq!(extract_api_key(Some("key=&api_key=Z"), &h, &d), Some("Z"));
        assert_eq!(extract_api_key(Some("key="), &h, &d), None);
    }

    #[test]
    fn custom_locations_replace_defaults_queries_first() {
        let loc = ApiKeyLocations {
            query: vec!["mykey".into()],
            headers: vec![HeaderName::from_static("x-my-key")],
        };
        let h = hm(&[("x-my-key", "HDR"), ("x-api-key", "DEFAULT")]);
        assert_eq!(extract_api_key(Some("key=K&mykey=Q"), &h, &loc), Some("Q"));
        assert_eq!(extract_api_key(Some("key=K"), &h, &loc), Some("HDR"));
        let only_default = hm(&[("x-api-key", "DEFAULT")]);
        assert_eq!(extract_api_key(Some("key=K"), &only_default, &loc), None);
    }
}
